//! Client authentication for the proxy: `Proxy-Authorization` with Bearer tokens or Basic
//! credentials (RFC 9110 §11.6.2, §11.7.1; RFC 7617; RFC 6750 §2.1), checked against a
//! credentials file that stores only hashes. No I/O: the caller reads the file and passes the
//! header value; this module parses and decides.
//!
//! Credentials file, one entry per line (`#` starts a comment):
//!
//! ```text
//! token <name> <sha256-hex of the token>
//! basic <user> <salt-hex> <sha256-hex of salt || password>
//! ```
//!
//! Tokens are long random strings, so an unsalted hash suffices and makes lookup O(1); Basic
//! passwords get a per-user salt. `masque-relay hash-credential` prints such lines. Comparisons
//! of hashes are constant-time.

use std::collections::HashMap;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{digest, Context, SHA256};
use base64::Engine as _;

/// Who a request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(pub String);

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Proxy-Authorization")]
    Missing,
    #[error("malformed Proxy-Authorization")]
    Malformed,
    #[error("unknown or wrong credentials")]
    Invalid,
}

/// A line of the credentials file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct FileError {
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct BasicEntry {
    salt: Vec<u8>,
    hash: [u8; 32],
}

/// The credentials the relay accepts.
#[derive(Debug, Clone, Default)]
pub struct CredentialStore {
    tokens: HashMap<[u8; 32], String>,
    basic: HashMap<String, BasicEntry>,
}

/// The challenge sent with a 407 (RFC 9110 §11.7.1).
pub const CHALLENGE: &str = "Basic realm=\"masque-relay\", Bearer realm=\"masque-relay\"";

/// SHA-256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    to_array(digest(&SHA256, token.as_bytes()).as_ref())
}

/// SHA-256 of `salt || password`.
pub fn password_hash(salt: &[u8], password: &str) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(salt);
    ctx.update(password.as_bytes());
    to_array(ctx.finish().as_ref())
}

fn to_array(d: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(d);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A credentials-file line for a token.
pub fn token_line(name: &str, token: &str) -> String {
    format!("token {name} {}", hex(&token_hash(token)))
}

/// A credentials-file line for a Basic user, with the given salt.
pub fn basic_line(user: &str, password: &str, salt: &[u8]) -> String {
    format!(
        "basic {user} {} {}",
        hex(salt),
        hex(&password_hash(salt, password))
    )
}

impl CredentialStore {
    /// Parses a credentials file.
    pub fn parse(text: &str) -> Result<Self, FileError> {
        let mut store = CredentialStore::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |reason: &str| FileError {
                line: i + 1,
                reason: reason.to_owned(),
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["token", name, hash] => {
                    let h = unhex(hash)
                        .filter(|h| h.len() == 32)
                        .ok_or_else(|| bad("token hash must be 64 hex digits"))?;
                    if store
                        .tokens
                        .insert(to_array(&h), (*name).to_owned())
                        .is_some()
                    {
                        return Err(bad("duplicate token"));
                    }
                }
                ["basic", user, salt, hash] => {
                    if user.contains(':') {
                        return Err(bad("a Basic user name cannot contain ':'"));
                    }
                    let salt = unhex(salt)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| bad("salt must be hex digits"))?;
                    let h = unhex(hash)
                        .filter(|h| h.len() == 32)
                        .ok_or_else(|| bad("password hash must be 64 hex digits"))?;
                    let entry = BasicEntry {
                        salt,
                        hash: to_array(&h),
                    };
                    if store.basic.insert((*user).to_owned(), entry).is_some() {
                        return Err(bad("duplicate user"));
                    }
                }
                _ => return Err(bad("expected `token NAME HASH` or `basic USER SALT HASH`")),
            }
        }
        Ok(store)
    }

    /// Number of credentials.
    pub fn len(&self) -> usize {
        self.tokens.len() + self.basic.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a `Proxy-Authorization` header value.
    pub fn check(&self, header: Option<&[u8]>) -> Result<Identity, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let value = std::str::from_utf8(value)
            .map_err(|_| AuthError::Malformed)?
            .trim();
        let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Malformed)?;
        let rest = rest.trim();
        // Auth schemes are case-insensitive (RFC 9110 §11.1).
        if scheme.eq_ignore_ascii_case("bearer") {
            let name = self
                .tokens
                .get(&token_hash(rest))
                .ok_or(AuthError::Invalid)?;
            return Ok(Identity(name.clone()));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| AuthError::Malformed)?;
            let decoded = String::from_utf8(decoded).map_err(|_| AuthError::Malformed)?;
            let (user, password) = decoded.split_once(':').ok_or(AuthError::Malformed)?;
            let entry = self.basic.get(user).ok_or(AuthError::Invalid)?;
            let h = password_hash(&entry.salt, password);
            verify_slices_are_equal(&h, &entry.hash).map_err(|_| AuthError::Invalid)?;
            return Ok(Identity(user.to_owned()));
        }
        Err(AuthError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> CredentialStore {
        let text = format!(
            "# relay credentials\n{}\n{}  # alice\n\n",
            token_line("ci", "s3cr3t-token-value"),
            basic_line("alice", "wonderland", b"\x01\x02\x03\x04")
        );
        CredentialStore::parse(&text).unwrap()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn bearer_and_basic_are_accepted() {
        let s = store();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.check(Some(b"Bearer s3cr3t-token-value")),
            Ok(Identity("ci".into()))
        );
        assert_eq!(
            s.check(Some(b"bearer   s3cr3t-token-value ")),
            Ok(Identity("ci".into()))
        );
        let basic = format!("Basic {}", b64("alice:wonderland"));
        assert_eq!(
            s.check(Some(basic.as_bytes())),
            Ok(Identity("alice".into()))
        );
    }

    #[test]
    fn everything_else_is_refused() {
        let s = store();
        assert_eq!(s.check(None), Err(AuthError::Missing));
        assert_eq!(s.check(Some(b"Bearer wrong")), Err(AuthError::Invalid));
        assert_eq!(s.check(Some(b"Bearer")), Err(AuthError::Malformed));
        assert_eq!(s.check(Some(b"Digest abc")), Err(AuthError::Malformed));
        assert_eq!(s.check(Some(b"\xff\xfe")), Err(AuthError::Malformed));
        for bad in ["alice:wrong", "bob:wonderland", "alice", "alice:"] {
            let v = format!("Basic {}", b64(bad));
            assert!(s.check(Some(v.as_bytes())).is_err(), "{bad}");
        }
        assert_eq!(s.check(Some(b"Basic !!!")), Err(AuthError::Malformed));
    }

    #[test]
    fn file_errors_name_the_line() {
        let zeros = "0".repeat(64);
        let cases: Vec<(String, usize)> = vec![
            ("token x 1234".to_owned(), 1),
            ("\nbasic u zz 00".to_owned(), 2),
            (format!("token a {zeros}\ntoken b {zeros}"), 2),
            ("password alice x".to_owned(), 1),
            (format!("basic a:b 01 {zeros}"), 1),
        ];
        for (text, line) in cases {
            assert_eq!(
                CredentialStore::parse(&text).unwrap_err().line,
                line,
                "{text}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn check_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = store().check(Some(&bytes));
        }

        #[test]
        fn basic_round_trips(user in "[a-z]{1,12}", pw in "[ -~]{0,40}", salt in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16)) {
            let s = CredentialStore::parse(&basic_line(&user, &pw, &salt)).unwrap();
            let v = format!("Basic {}", b64(&format!("{user}:{pw}")));
            proptest::prop_assert_eq!(s.check(Some(v.as_bytes())), Ok(Identity(user.clone())));
        }
    }
}
