//! The relay's URI Template (RFC 9298 §2, RFC 6570), run in reverse: instead of expanding the
//! template, [`UriTemplate::match_path`] compares a request's `:path` against it and hands back the
//! raw, still percent-encoded values of `target_host` and `target_port`. Decoding and validating
//! those values is [`super::target`]'s job, so that percent-decoding happens exactly once.
//!
//! The matcher follows the template's structure (literals, expressions and their operators); it
//! never assumes a fixed number of path segments. Decisions, each explained where implemented:
//!
//! - **Template forms.** RFC 9298 §2 wants an absolute template (`https://relay.example/...`); only
//!   its path and query are matched, since `:path` carries nothing else and the authority is the
//!   caller's concern ([`UriTemplate::authority`]). As a server-side convenience a template may
//!   also be just the path and query (`/.well-known/masque/udp/{target_host}/{target_port}/`): the
//!   relay knows its own authority.
//! - **Operators.** [`FromStr`] enforces RFC 9298 §2, which forbids `+`, `#`, `.`, `/` and `;`
//!   expressions; compliant clients refuse such templates, so a relay configured with one could
//!   serve no one. [`UriTemplate::parse_level3`] accepts every level-3 operator except `#`
//!   (a fragment never reaches the server) for other uses.
//! - **Variables.** `target_host` and `target_port` are required, each at most once (a variable
//!   repeated would need equal values in two places; nobody needs that). Other variables are
//!   allowed: they must match what their operator could expand to, including nothing at all (an
//!   undefined variable expands to nothing), and their values are discarded.
//! - **Values** match `unreserved / pct-encoded` (plus `reserved` for `+`, as RFC 6570 allows).
//!   A `%` is taken as part of a value without checking the two hex digits after it, so `%zz`
//!   reaches `target` and becomes a precise 400 instead of a 404.
//! - **Literals** match byte for byte (paths are case-sensitive), except that the hex digits of a
//!   percent-encoded triplet compare case-insensitively (RFC 3986 §2.1). The trailing slash of
//!   the default template is therefore required.
//! - **Query.** Parameters match by name, in any order; parameters the template does not name are
//!   ignored; a parameter the template names that appears twice makes the request not match (two
//!   different hosts would be ambiguous, and a smuggling vector). A template without a query
//!   matches only requests without one.
//! - **Missing versus empty.** A query variable whose parameter is absent comes back `None`; one
//!   that is present with an empty value, `Some("")`. In the path, an empty match is `Some("")`.
//! - **Ambiguity.** RFC 6570 §1.4 warns that matching is only reliable when expressions are
//!   delimited by characters their expansion cannot contain. Two expressions with nothing between
//!   them are refused at configuration time; otherwise the matcher backtracks, preferring the
//!   longest value for the earlier variable (so `{target_host}.{target_port}` splits
//!   `example.com.443` as `example.com` and `443`). Multi-variable expressions assign their
//!   comma- (or operator-) separated items to the variables in order. Request targets over
//!   [`MAX_REQUEST_TARGET_LEN`] bytes, or needing more than a fixed amount of backtracking (only
//!   contrived templates can), do not match.
//! - **Origin form only.** `match_path` takes `/path?query`. An HTTP/1.1 absolute-form target
//!   (`GET https://relay.example/...`, as in RFC 9298 §3.2's example) must be reduced to its
//!   path and query by the caller first.

use std::str::FromStr;

//= https://www.rfc-editor.org/rfc/rfc6570#section-1.4
//# Variable matching only works well if the template
//# expressions are delimited by the beginning or end of the URI or by
//# characters that cannot be part of the expansion, such as reserved
//# characters surrounding a simple string expression.

/// Request targets longer than this never match. A valid CONNECT-UDP `:path` is a few hundred
/// bytes at most (a 253-byte host name, percent-encoded, plus the template).
pub const MAX_REQUEST_TARGET_LEN: usize = 4096;

/// Most work (splits tried plus bytes re-examined) one match may take. Real templates need a few
/// dozen steps; only contrived templates whose literals consist of value characters, fed
/// adversarial targets, could take more, and those targets then simply do not match. This keeps
/// the backtracking matcher's cost bounded whatever the client sends.
const MAX_MATCH_STEPS: usize = 1 << 20;

const TARGET_HOST: &str = "target_host";
const TARGET_PORT: &str = "target_port";

/// Why a configured URI Template was refused. Positions are byte offsets into the template.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TemplateError {
    #[error("byte {position}: URI templates may only contain ASCII characters 0x21-0x7E")]
    InvalidCharacter { position: usize },
    #[error("byte {position}: {ch:?} is not allowed in a URI template literal")]
    InvalidLiteral { position: usize, ch: char },
    #[error("byte {position}: '%' must start a percent-encoded triplet (%XX)")]
    BadPercentEncoding { position: usize },
    #[error("byte {position}: unbalanced or nested braces")]
    UnbalancedBraces { position: usize },
    #[error("byte {position}: empty expression")]
    EmptyExpression { position: usize },
    #[error("byte {position}: operator {operator:?} is reserved by RFC 6570 and not supported")]
    UnsupportedOperator { position: usize, operator: char },
    #[error(
        "byte {position}: operator {operator:?} is not allowed in a CONNECT-UDP template \
         (RFC 9298 section 2)"
    )]
    ForbiddenOperator { position: usize, operator: char },
    #[error("byte {position}: a fragment never reaches the server and cannot be matched")]
    Fragment { position: usize },
    #[error(
        "variable {variable:?}: level 4 modifiers (\"*\", \":n\") are not supported; \
         the template must be level 3 or lower"
    )]
    UnsupportedModifier { variable: String },
    #[error("byte {position}: invalid variable name")]
    InvalidVariableName { position: usize },
    #[error("variable {0:?} appears more than once")]
    DuplicateVariable(String),
    #[error("the template lacks the {0:?} variable")]
    MissingVariable(&'static str),
    #[error("invalid or missing URI scheme (use \"https://host/path...\" or \"/path...\")")]
    InvalidScheme,
    #[error("the authority must be non-empty and contain no expressions")]
    InvalidAuthority,
    #[error("the path must start with \"/\"")]
    PathMustStartWithSlash,
    #[error(
        "byte {position}: two expressions with nothing between them cannot be matched \
         unambiguously"
    )]
    AdjacentExpressions { position: usize },
    #[error("byte {position}: this query expression or parameter cannot be matched by name")]
    MisplacedQuery { position: usize },
    #[error("query parameter {0:?} appears more than once")]
    DuplicateQueryParameter(String),
}

/// A parsed URI Template, ready to match request targets.
#[derive(Debug, Clone)]
pub struct UriTemplate {
    raw: String,
    /// Byte range of the authority in `raw`, for absolute templates.
    authority: Option<(usize, usize)>,
    /// Literals and expressions of the path, matched in sequence.
    path: Vec<Token>,
    /// The query's parameters, matched by name; `None` when the template has no query.
    query: Option<Vec<QueryParam>>,
}

/// The raw (percent-encoded) variable values of a matching request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TemplateMatch<'a> {
    pub target_host: Option<&'a str>,
    pub target_port: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// RFC 9298 §2: no `+ # . / ;`.
    ConnectUdp,
    /// Any RFC 6570 level-3 operator that can appear in a request target (all but `#`).
    Level3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Simple,
    Reserved,
    Label,
    PathSegment,
    PathParam,
    FormQuery,
    FormContinuation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Host,
    Port,
    Other,
}

#[derive(Debug, Clone)]
struct Var {
    name: String,
    role: Role,
}

#[derive(Debug, Clone)]
struct Expr {
    op: Op,
    vars: Vec<Var>,
    position: usize,
}

#[derive(Debug, Clone)]
enum Token {
    Literal { text: String, position: usize },
    Expr(Expr),
}

/// One `name=value` pair the template expects in the query. `pattern` is matched against the
/// value like a small path (so `h=x{target_host}` works); an empty pattern means a fixed,
/// valueless parameter such as `?flag`.
#[derive(Debug, Clone)]
struct QueryParam {
    name: String,
    pattern: Vec<Token>,
}

impl QueryParam {
    fn has_vars(&self) -> bool {
        self.pattern.iter().any(|t| matches!(t, Token::Expr(_)))
    }
}

impl FromStr for UriTemplate {
    type Err = TemplateError;

    /// Parses a CONNECT-UDP template: RFC 6570 level 3 with RFC 9298 §2's restrictions.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, Profile::ConnectUdp)
    }
}

impl UriTemplate {
    /// Parses any RFC 6570 level-3 template, including the `+`, `.`, `/` and `;` operators that
    /// RFC 9298 §2 forbids in CONNECT-UDP templates. `#` is still refused: `:path` has no fragment.
    pub fn parse_level3(s: &str) -> Result<Self, TemplateError> {
        Self::parse(s, Profile::Level3)
    }

    /// The template as configured.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The authority of an absolute template (`relay.example:443`), `None` for a path-only one.
    pub fn authority(&self) -> Option<&str> {
        self.authority.map(|(start, end)| &self.raw[start..end])
    }

    /// Returns the raw values of target_host and target_port (percent-encoding untouched) or None
    /// when the path does not match the template.
    ///
    /// `path_and_query` is the origin-form request target: `:path` on HTTP/2 and HTTP/3, the
    /// request-target on HTTP/1.1 (an absolute-form target must be reduced to its path first).
    pub fn match_path<'a>(&self, path_and_query: &'a str) -> Option<TemplateMatch<'a>> {
        // A request target never carries a fragment (RFC 9113 §8.3.1, RFC 9114 §4.3.1); one that
        // does is malformed, not a target we should try to make sense of.
        if path_and_query.len() > MAX_REQUEST_TARGET_LEN || path_and_query.contains('#') {
            return None;
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let mut caps = match_sequence(&self.path, path, TemplateMatch::default())?;
        match (&self.query, query) {
            (None, None) => {}
            // The template has no query component, so a request with one is another resource.
            (None, Some(_)) => return None,
            (Some(params), q) => caps = match_query(params, q.unwrap_or(""), caps)?,
        }
        Some(caps)
    }

    fn parse(s: &str, profile: Profile) -> Result<Self, TemplateError> {
        //= https://www.rfc-editor.org/rfc/rfc9298#section-2
        //# The URI Template MUST NOT contain any non-ASCII Unicode characters
        //# and MUST only contain ASCII characters in the range 0x21-0x7E
        //# inclusive (note that percent-encoding is allowed; see Section 2.1
        //# of [URI]).
        if let Some(position) = s.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(TemplateError::InvalidCharacter { position });
        }
        // From here on every character is one byte, so byte offsets are character offsets.
        let (authority, path_start) = split_prefix(s)?;
        let tokens = tokenize(s, path_start, profile)?;
        check_variables(&tokens)?;
        let (path, query) = split_query(tokens)?;
        check_not_adjacent(&path)?;
        let query = query.map(build_query).transpose()?;
        Ok(Self {
            raw: s.to_owned(),
            authority,
            path,
            query,
        })
    }
}

/// Finds where the path starts, and the authority of an absolute template.
fn split_prefix(s: &str) -> Result<(Option<(usize, usize)>, usize), TemplateError> {
    if let Some(rest) = s.strip_prefix('/') {
        // "//host/..." is a scheme-relative reference, not a path.
        if rest.starts_with('/') {
            return Err(TemplateError::InvalidScheme);
        }
        return Ok((None, 0));
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# The URI Template MUST be in absolute form and MUST include non-
    //# empty scheme, authority, and path components.
    let Some(sep) = s.find("://") else {
        return Err(TemplateError::PathMustStartWithSlash);
    };
    // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    let scheme = &s.as_bytes()[..sep];
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(TemplateError::InvalidScheme);
    }
    let start = sep + 3;
    let end = s[start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| start + i);
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# All template variables MUST be within the path or query components
    //# of the URI.
    let authority = &s[start..end];
    if authority.is_empty() || authority.contains(['{', '}']) {
        return Err(TemplateError::InvalidAuthority);
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# The path component of the URI Template MUST start with a slash
    //# ("/").
    if !s[end..].starts_with('/') {
        return Err(TemplateError::PathMustStartWithSlash);
    }
    Ok((Some((start, end)), end))
}

/// Splits `s[start..]` into literals and expressions, validating both.
fn tokenize(s: &str, start: usize, profile: Profile) -> Result<Vec<Token>, TemplateError> {
    let b = s.as_bytes();
    let mut tokens = Vec::new();
    let mut literal_start = start;
    let mut i = start;
    let flush = |tokens: &mut Vec<Token>, from: usize, to: usize| {
        if from < to {
            tokens.push(Token::Literal {
                text: s[from..to].to_owned(),
                position: from,
            });
        }
    };
    while i < b.len() {
        match b[i] {
            b'{' => {
                flush(&mut tokens, literal_start, i);
                //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2
                //# Each expression is indicated by an opening brace ("{") character and
                //# continues until the next closing brace ("}").  Expressions cannot be
                //# nested.
                let close = match s[i + 1..].find(['{', '}']) {
                    Some(j) if b[i + 1 + j] == b'}' => i + 1 + j,
                    _ => return Err(TemplateError::UnbalancedBraces { position: i }),
                };
                tokens.push(Token::Expr(parse_expression(&s[i + 1..close], i, profile)?));
                i = close + 1;
                literal_start = i;
            }
            b'}' => return Err(TemplateError::UnbalancedBraces { position: i }),
            // `:path` never holds a fragment, so a template with one could never match.
            b'#' => return Err(TemplateError::Fragment { position: i }),
            b'%' => {
                let hex = |k: usize| b.get(k).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return Err(TemplateError::BadPercentEncoding { position: i });
                }
                i += 3;
            }
            //= https://www.rfc-editor.org/rfc/rfc6570#section-2.1
            //# literals      =  %x21 / %x23-24 / %x26 / %x28-3B / %x3D / %x3F-5B
            //#               /  %x5D / %x5F / %x61-7A / %x7E / ucschar / iprivate
            //#               /  pct-encoded
            // The single quote is allowed: erratum 6937 (verified) removed it from the excluded
            // set. Everything else outside 0x21-0x7E was refused before tokenizing.
            c @ (b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'|') => {
                return Err(TemplateError::InvalidLiteral {
                    position: i,
                    ch: char::from(c),
                });
            }
            _ => i += 1,
        }
    }
    flush(&mut tokens, literal_start, b.len());
    Ok(tokens)
}

/// Parses the inside of `{...}`; `position` is the offset of the `{`.
fn parse_expression(body: &str, position: usize, profile: Profile) -> Result<Expr, TemplateError> {
    let Some(&first) = body.as_bytes().first() else {
        return Err(TemplateError::EmptyExpression { position });
    };
    //= https://www.rfc-editor.org/rfc/rfc6570#section-2.2
    //# operator      =  op-level2 / op-level3 / op-reserve
    //# op-level2     =  "+" / "#"
    //# op-level3     =  "." / "/" / ";" / "?" / "&"
    //# op-reserve    =  "=" / "," / "!" / "@" / "|"
    let op = match first {
        b'+' => Some(Op::Reserved),
        b'#' => None,
        b'.' => Some(Op::Label),
        b'/' => Some(Op::PathSegment),
        b';' => Some(Op::PathParam),
        b'?' => Some(Op::FormQuery),
        b'&' => Some(Op::FormContinuation),
        b'=' | b',' | b'!' | b'@' | b'|' => {
            return Err(TemplateError::UnsupportedOperator {
                position,
                operator: char::from(first),
            });
        }
        _ => {
            let vars = parse_variable_list(body, position)?;
            return Ok(Expr {
                op: Op::Simple,
                vars,
                position,
            });
        }
    };
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# The URI Template MUST NOT use Reserved Expansion ("+" operator),
    //# Fragment Expansion ("#" operator), Label Expansion with Dot-
    //# Prefix, Path Segment Expansion with Slash-Prefix, nor Path-Style
    //# Parameter Expansion with Semicolon-Prefix.
    if profile == Profile::ConnectUdp && matches!(first, b'+' | b'#' | b'.' | b'/' | b';') {
        return Err(TemplateError::ForbiddenOperator {
            position,
            operator: char::from(first),
        });
    }
    let Some(op) = op else {
        return Err(TemplateError::Fragment { position });
    };
    let vars = parse_variable_list(&body[1..], position)?;
    Ok(Expr { op, vars, position })
}

fn parse_variable_list(list: &str, position: usize) -> Result<Vec<Var>, TemplateError> {
    //= https://www.rfc-editor.org/rfc/rfc6570#section-2.3
    //# variable-list =  varspec *( "," varspec )
    //# varspec       =  varname [ modifier-level4 ]
    //# varname       =  varchar *( ["."] varchar )
    //# varchar       =  ALPHA / DIGIT / "_" / pct-encoded
    list.split(',')
        .map(|spec| {
            let (name, modifier) = match spec.find([':', '*']) {
                Some(i) => (&spec[..i], true),
                None => (spec, false),
            };
            if !is_varname(name) {
                return Err(TemplateError::InvalidVariableName { position });
            }
            //= https://www.rfc-editor.org/rfc/rfc9298#section-2
            //# The URI Template MUST be a level 3 template or lower.
            if modifier {
                return Err(TemplateError::UnsupportedModifier {
                    variable: name.to_owned(),
                });
            }
            let role = match name {
                TARGET_HOST => Role::Host,
                TARGET_PORT => Role::Port,
                _ => Role::Other,
            };
            Ok(Var {
                name: name.to_owned(),
                role,
            })
        })
        .collect()
}

fn is_varname(name: &str) -> bool {
    let b = name.as_bytes();
    let mut i = 0;
    // Whether the previous item was a varchar: a "." must sit between two of them.
    let mut after_varchar = false;
    while i < b.len() {
        match b[i] {
            c if c.is_ascii_alphanumeric() || c == b'_' => i += 1,
            b'%' if b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3;
            }
            b'.' if after_varchar => {
                after_varchar = false;
                i += 1;
                continue;
            }
            _ => return false,
        }
        after_varchar = true;
    }
    after_varchar
}

fn expressions(tokens: &[Token]) -> impl Iterator<Item = &Expr> {
    tokens.iter().filter_map(|t| match t {
        Token::Expr(e) => Some(e),
        Token::Literal { .. } => None,
    })
}

fn check_variables(tokens: &[Token]) -> Result<(), TemplateError> {
    let mut seen: Vec<&str> = Vec::new();
    for var in expressions(tokens).flat_map(|e| &e.vars) {
        if seen.contains(&var.name.as_str()) {
            return Err(TemplateError::DuplicateVariable(var.name.clone()));
        }
        seen.push(&var.name);
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-2
    //# The URI Template MUST contain the two variables "target_host" and
    //# "target_port" and MAY contain other variables.
    for required in [TARGET_HOST, TARGET_PORT] {
        if !seen.contains(&required) {
            return Err(TemplateError::MissingVariable(required));
        }
    }
    Ok(())
}

/// Query-side tokens, and whether the query was opened by a literal `?` (after which a `{?...}`
/// would expand to a second `?`).
type QueryTokens = (Vec<Token>, bool);

/// Cuts the token stream where the query starts: at the first literal `?` or `{?...}`.
fn split_query(tokens: Vec<Token>) -> Result<(Vec<Token>, Option<QueryTokens>), TemplateError> {
    let mut path = Vec::new();
    let mut query: Option<QueryTokens> = None;
    for token in tokens {
        if let Some((q, _)) = &mut query {
            q.push(token);
            continue;
        }
        match token {
            Token::Literal { text, position } => match text.find('?') {
                Some(at) => {
                    if at > 0 {
                        path.push(Token::Literal {
                            text: text[..at].to_owned(),
                            position,
                        });
                    }
                    let mut q = Vec::new();
                    if at + 1 < text.len() {
                        q.push(Token::Literal {
                            text: text[at + 1..].to_owned(),
                            position: position + at + 1,
                        });
                    }
                    query = Some((q, true));
                }
                None => path.push(Token::Literal { text, position }),
            },
            Token::Expr(e) if e.op == Op::FormQuery => query = Some((vec![Token::Expr(e)], false)),
            // `{&x}` continues a query; in a path it would put "&x=" in a path segment.
            Token::Expr(e) if e.op == Op::FormContinuation => {
                return Err(TemplateError::MisplacedQuery {
                    position: e.position,
                });
            }
            Token::Expr(e) => path.push(Token::Expr(e)),
        }
    }
    Ok((path, query))
}

fn check_not_adjacent(tokens: &[Token]) -> Result<(), TemplateError> {
    for pair in tokens.windows(2) {
        if let [Token::Expr(_), Token::Expr(e)] = pair {
            return Err(TemplateError::AdjacentExpressions {
                position: e.position,
            });
        }
    }
    Ok(())
}

/// Turns the query side of the template into named parameters. Form-style expressions
/// (`{?a,b}`, `{&a,b}`) give one parameter per variable; literal text is split on `&` and each
/// piece's name is the text before its first `=`.
fn build_query((tokens, opened_by_literal): QueryTokens) -> Result<Vec<QueryParam>, TemplateError> {
    let mut params: Vec<QueryParam> = Vec::new();
    let mut current: Vec<Token> = Vec::new();
    // After a form-style expression, only "&..." or another form-style expression may follow:
    // anything else would be glued onto that expression's last value.
    let mut after_form = false;
    for (index, token) in tokens.into_iter().enumerate() {
        match token {
            Token::Literal { text, position } => {
                if after_form && !text.starts_with('&') {
                    return Err(TemplateError::MisplacedQuery { position });
                }
                let mut offset = position;
                for (k, piece) in text.split('&').enumerate() {
                    if k > 0 {
                        finish_param(&mut current, &mut params)?;
                    }
                    if !piece.is_empty() {
                        current.push(Token::Literal {
                            text: piece.to_owned(),
                            position: offset,
                        });
                    }
                    offset += piece.len() + 1;
                }
                after_form = false;
            }
            Token::Expr(e) if matches!(e.op, Op::FormQuery | Op::FormContinuation) => {
                // `{?...}` opens the query; anywhere else it would expand to a second "?".
                if e.op == Op::FormQuery && (index > 0 || opened_by_literal) {
                    return Err(TemplateError::MisplacedQuery {
                        position: e.position,
                    });
                }
                finish_param(&mut current, &mut params)?;
                //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2.8
                //# o  if the variable has a simple string value or no explode modifier
                //#    is given, append the variable name (encoded as if it were a
                //#    literal string) and an equals character ("=") to the result
                //#    string; and,
                for var in e.vars {
                    params.push(QueryParam {
                        name: var.name.clone(),
                        pattern: vec![Token::Expr(Expr {
                            op: Op::Simple,
                            vars: vec![var],
                            position: e.position,
                        })],
                    });
                }
                after_form = true;
            }
            Token::Expr(e) => {
                if after_form {
                    return Err(TemplateError::MisplacedQuery {
                        position: e.position,
                    });
                }
                current.push(Token::Expr(e));
            }
        }
    }
    finish_param(&mut current, &mut params)?;
    for (i, p) in params.iter().enumerate() {
        if params[..i].iter().any(|q| q.name == p.name) {
            return Err(TemplateError::DuplicateQueryParameter(p.name.clone()));
        }
    }
    Ok(params)
}

/// Closes the literal-query parameter collected in `current` (e.g. `h=` `{target_host}`).
fn finish_param(
    current: &mut Vec<Token>,
    params: &mut Vec<QueryParam>,
) -> Result<(), TemplateError> {
    let mut tokens = std::mem::take(current).into_iter();
    let Some(first) = tokens.next() else {
        return Ok(());
    };
    let (text, position) = match first {
        Token::Literal { text, position } => (text, position),
        // A parameter whose name is a variable cannot be looked up by name.
        Token::Expr(e) => {
            return Err(TemplateError::MisplacedQuery {
                position: e.position,
            })
        }
    };
    let rest: Vec<Token> = tokens.collect();
    let (name, pattern) = match text.split_once('=') {
        Some((name, value)) => {
            let mut pattern = Vec::with_capacity(rest.len() + 1);
            if !value.is_empty() {
                pattern.push(Token::Literal {
                    text: value.to_owned(),
                    position: position + name.len() + 1,
                });
            }
            pattern.extend(rest);
            (name, pattern)
        }
        // "?flag" alone is a fixed parameter; "?h{target_host}" has no "=" to split on.
        None if rest.is_empty() => (text.as_str(), Vec::new()),
        None => return Err(TemplateError::MisplacedQuery { position }),
    };
    if name.is_empty() {
        return Err(TemplateError::MisplacedQuery { position });
    }
    check_not_adjacent(&pattern)?;
    params.push(QueryParam {
        name: name.to_owned(),
        pattern,
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Matching

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_reserved(b: u8) -> bool {
    matches!(
        b,
        b':' | b'/'
            | b'?'
            | b'#'
            | b'['
            | b']'
            | b'@'
            | b'!'
            | b'$'
            | b'&'
            | b'\''
            | b'('
            | b')'
            | b'*'
            | b'+'
            | b','
            | b';'
            | b'='
    )
}

impl Op {
    /// Characters a single variable's value may hold once expanded by this operator.
    fn value_allows(self, b: u8) -> bool {
        //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2.1
        //# The allowed set for a given expansion depends on the expression type:
        //# reserved ("+") and fragment ("#") expansions allow the set of
        //# characters in the union of ( unreserved / reserved / pct-encoded ) to
        //# be passed through without pct-encoding, whereas all other expression
        //# types allow only unreserved characters to be passed through without
        //# pct-encoding.
        // '%' is let through unchecked: a bad escape is for `target` to report.
        match self {
            Op::Reserved => b != b'#' && (is_unreserved(b) || is_reserved(b) || b == b'%'),
            _ => is_unreserved(b) || b == b'%',
        }
    }

    /// Characters the whole expansion may hold: values plus prefix and separators.
    fn expansion_allows(self, b: u8, multi: bool) -> bool {
        self.value_allows(b)
            || match self {
                Op::Simple => multi && b == b',',
                Op::PathSegment => b == b'/',
                Op::PathParam => b == b';' || b == b'=',
                Op::Reserved | Op::Label | Op::FormQuery | Op::FormContinuation => false,
            }
    }

    /// The prefix a non-empty expansion starts with, and the separator between values.
    fn prefix_and_separator(self) -> (Option<char>, char) {
        //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2.1
        //#       Type    Separator
        //#                  ","     (default)
        //#         +        ","
        //#         #        ","
        //#         .        "."
        //#         /        "/"
        //#         ;        ";"
        //#         ?        "&"
        //#         &        "&"
        match self {
            Op::Simple | Op::Reserved => (None, ','),
            Op::Label => (Some('.'), '.'),
            Op::PathSegment => (Some('/'), '/'),
            Op::PathParam => (Some(';'), ';'),
            Op::FormQuery => (Some('?'), '&'),
            Op::FormContinuation => (Some('&'), '&'),
        }
    }
}

impl<'a> TemplateMatch<'a> {
    fn set(&mut self, role: Role, value: &'a str) {
        match role {
            Role::Host => self.target_host = Some(value),
            Role::Port => self.target_port = Some(value),
            Role::Other => {}
        }
    }
}

/// Where the literal `lit` matches `input` at `pos`, returns the end of the match.
fn literal_at(lit: &str, input: &str, pos: usize) -> Option<usize> {
    let l = lit.as_bytes();
    let s = input.as_bytes().get(pos..pos.checked_add(l.len())?)?;
    let mut i = 0;
    while i < l.len() {
        if l[i] == b'%' {
            //= https://www.rfc-editor.org/rfc/rfc3986#section-2.1
            //# If two URIs differ only in the case of hexadecimal digits used in
            //# percent-encoded octets, they are equivalent.
            // The template's triplets were validated, so `l[i + 1..i + 3]` exists.
            if s[i] != b'%' || !s[i + 1..i + 3].eq_ignore_ascii_case(&l[i + 1..i + 3]) {
                return None;
            }
            i += 3;
        } else if s[i] == l[i] {
            i += 1;
        } else {
            return None;
        }
    }
    Some(pos + l.len())
}

/// Matches `input` entirely against a sequence of literals and expressions.
fn match_sequence<'a>(
    tokens: &[Token],
    input: &'a str,
    caps: TemplateMatch<'a>,
) -> Option<TemplateMatch<'a>> {
    Matcher {
        tokens,
        input,
        failed: Vec::new(),
        steps: 0,
    }
    .run(0, 0, caps)
}

struct Matcher<'t, 'a> {
    tokens: &'t [Token],
    input: &'a str,
    /// Bitset of (token index, position) states already known not to match. Whether the rest of
    /// the template matches from a state does not depend on how it was reached, so remembering
    /// failures keeps backtracking polynomial. Allocated on the first failure.
    failed: Vec<u64>,
    /// Work done so far, against [`MAX_MATCH_STEPS`].
    steps: usize,
}

impl<'a> Matcher<'_, 'a> {
    fn state(&self, idx: usize, pos: usize) -> usize {
        idx * (self.input.len() + 1) + pos
    }

    fn known_failure(&self, idx: usize, pos: usize) -> bool {
        let s = self.state(idx, pos);
        self.failed
            .get(s / 64)
            .is_some_and(|w| w & (1 << (s % 64)) != 0)
    }

    fn mark_failure(&mut self, idx: usize, pos: usize) {
        if self.failed.is_empty() {
            let states = (self.tokens.len() + 1) * (self.input.len() + 1);
            self.failed = vec![0; states.div_ceil(64)];
        }
        let s = self.state(idx, pos);
        self.failed[s / 64] |= 1 << (s % 64);
    }

    fn run(
        &mut self,
        idx: usize,
        pos: usize,
        caps: TemplateMatch<'a>,
    ) -> Option<TemplateMatch<'a>> {
        let Some(token) = self.tokens.get(idx) else {
            return (pos == self.input.len()).then_some(caps);
        };
        if self.steps > MAX_MATCH_STEPS || self.known_failure(idx, pos) {
            return None;
        }
        let result = match token {
            Token::Literal { text, .. } => {
                literal_at(text, self.input, pos).and_then(|end| self.run(idx + 1, end, caps))
            }
            Token::Expr(e) => self.run_expr(e, idx, pos, caps),
        };
        if result.is_none() {
            self.mark_failure(idx, pos);
        }
        result
    }

    fn run_expr(
        &mut self,
        e: &Expr,
        idx: usize,
        pos: usize,
        caps: TemplateMatch<'a>,
    ) -> Option<TemplateMatch<'a>> {
        let bytes = self.input.as_bytes();
        let multi = e.vars.len() > 1;
        let run_end = pos
            + bytes[pos..]
                .iter()
                .take_while(|&&b| e.op.expansion_allows(b, multi))
                .count();
        // Adjacent expressions were refused at parse time, so what follows is a literal or the end.
        let next = match self.tokens.get(idx + 1) {
            Some(Token::Literal { text, .. }) => Some(text.as_str()),
            _ => None,
        };
        // Longest value first; the run holds only ASCII, so every `end` is a char boundary. With
        // nothing after the expression, only the whole run can reach the end of the input.
        let shortest = if next.is_none() { run_end } else { pos };
        for end in (shortest..=run_end).rev() {
            // One step per split tried, plus the bytes `extract` may have to look at again.
            self.steps += 1 + if needs_scan(e) { end - pos } else { 0 };
            if self.steps > MAX_MATCH_STEPS {
                return None;
            }
            let fits = match next {
                Some(lit) => literal_at(lit, self.input, end).is_some(),
                None => end == self.input.len(),
            };
            if !fits {
                continue;
            }
            let Some(c) = extract(e, &self.input[pos..end], caps) else {
                continue;
            };
            if let Some(done) = self.run(idx + 1, end, c) {
                return Some(done);
            }
        }
        None
    }
}

/// Whether [`extract`] looks at every byte of the expansion. It does not when the expansion is a
/// single value, whose characters the scan in [`Matcher::run_expr`] already checked.
fn needs_scan(e: &Expr) -> bool {
    e.vars.len() > 1 || matches!(e.op, Op::PathSegment | Op::PathParam)
}

/// Assigns the variables of `e` from its expansion `m`, or `None` if `m` is not one.
///
/// `m` holds only characters `e.op.expansion_allows`, so the values need no character check
/// beyond the separators that the expansion allows and a value does not.
fn extract<'a>(e: &Expr, m: &'a str, mut caps: TemplateMatch<'a>) -> Option<TemplateMatch<'a>> {
    let (prefix, sep) = e.op.prefix_and_separator();
    let body = match prefix {
        //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2.1
        //# A variable that is undefined (Section 2.3) has no value and is
        //# ignored by the expansion process.  If all of the variables in an
        //# expression are undefined, then the expression's expansion is the
        //# empty string.
        Some(_) if m.is_empty() => return Some(caps),
        Some(p) => m.strip_prefix(p)?,
        None => m,
    };
    if e.op == Op::PathParam {
        //= https://www.rfc-editor.org/rfc/rfc6570#section-3.2.7
        //# *  if the variable's value is not empty, append "=" to the result
        //#    string;
        let mut seen = vec![false; e.vars.len()];
        for item in body.split(sep) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            let i = e.vars.iter().position(|v| v.name == name)?;
            if std::mem::replace(&mut seen[i], true) || value.contains('=') {
                return None;
            }
            caps.set(e.vars[i].role, value);
        }
        return Some(caps);
    }
    if let [var] = e.vars.as_slice() {
        // One variable owns the whole body (a label value may itself contain dots), but a
        // path segment cannot contain "/".
        if e.op == Op::PathSegment && body.contains('/') {
            return None;
        }
        caps.set(var.role, body);
        return Some(caps);
    }
    // Several variables: items in template order. Undefined variables are skipped by the
    // expansion, so fewer items than variables leaves the trailing ones missing.
    let mut vars = e.vars.iter();
    for item in body.split(sep) {
        caps.set(vars.next()?.role, item);
    }
    Some(caps)
}

/// Matches the request's query against the template's parameters, by name.
fn match_query<'a>(
    params: &[QueryParam],
    query: &'a str,
    mut caps: TemplateMatch<'a>,
) -> Option<TemplateMatch<'a>> {
    for param in params {
        let mut found = None;
        for piece in query.split('&').filter(|p| !p.is_empty()) {
            // A bare "name" is the same as "name=": both carry an empty value.
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            if literal_at(&param.name, name, 0) == Some(name.len()) {
                if found.is_some() {
                    return None;
                }
                found = Some(value);
            }
        }
        match found {
            Some(value) => caps = match_sequence(&param.pattern, value, caps)?,
            // An absent parameter leaves its variables undefined (the caller's 400), but a fixed
            // parameter of the template must be there.
            None if param.has_vars() => {}
            None => return None,
        }
    }
    Some(caps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEFAULT: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";

    fn t(s: &str) -> UriTemplate {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn l3(s: &str) -> UriTemplate {
        UriTemplate::parse_level3(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn m<'a>(host: Option<&'a str>, port: Option<&'a str>) -> Option<TemplateMatch<'a>> {
        Some(TemplateMatch {
            target_host: host,
            target_port: port,
        })
    }

    fn both<'a>(host: &'a str, port: &'a str) -> Option<TemplateMatch<'a>> {
        m(Some(host), Some(port))
    }

    fn err(s: &str) -> TemplateError {
        s.parse::<UriTemplate>().unwrap_err()
    }

    #[test]
    fn default_template() {
        let tpl = t(DEFAULT);
        assert_eq!(tpl.as_str(), DEFAULT);
        assert_eq!(tpl.authority(), None);
        let ok = [
            ("/.well-known/masque/udp/192.0.2.6/443/", "192.0.2.6", "443"),
            (
                "/.well-known/masque/udp/example.com/53/",
                "example.com",
                "53",
            ),
            (
                "/.well-known/masque/udp/2001%3Adb8%3A%3A42/443/",
                "2001%3Adb8%3A%3A42",
                "443",
            ),
            // Values come back raw; judging them is `target`'s job.
            ("/.well-known/masque/udp/%zz/0/", "%zz", "0"),
            ("/.well-known/masque/udp/h/%34%34%33/", "h", "%34%34%33"),
        ];
        for (path, host, port) in ok {
            assert_eq!(tpl.match_path(path), both(host, port), "{path}");
        }
        // Empty values match; the caller refuses them with 400.
        assert_eq!(
            tpl.match_path("/.well-known/masque/udp//443/"),
            both("", "443")
        );
        assert_eq!(tpl.match_path("/.well-known/masque/udp/h//"), both("h", ""));
    }

    #[test]
    fn default_template_mismatches() {
        let tpl = t(DEFAULT);
        for path in [
            "",
            "/",
            "/.well-known/masque/udp/",
            "/.well-known/masque/udp/192.0.2.6/443", // trailing slash is required
            "/.well-known/masque/udp/192.0.2.6/443//", // extra empty segment
            "/.well-known/masque/udp/192.0.2.6/443/x/", // extra segment
            "/.well-known/masque/udp/a/b/443/",      // a host cannot span segments
            "/.well-known/masque/tcp/192.0.2.6/443/", // wrong prefix
            "/.WELL-KNOWN/masque/udp/192.0.2.6/443/", // paths are case-sensitive
            "/x/.well-known/masque/udp/192.0.2.6/443/",
            "/.well-known/masque/udp/192.0.2.6/443/?x=1", // no query in the template
            "/.well-known/masque/udp/192.0.2.6/443/?",
            "/.well-known/masque/udp/192.0.2.6/443/#frag",
            "/.well-known/masque/udp/2001:db8::1/443/", // raw ':' is not unreserved
            "/.well-known/masque/udp/[::1]/443/",
            "/.well-known/masque/udp/a,b/443/",
            "/.well-known/masque/udp/h%20x y/443/",
            "/.well-known/masque/udp/héllo/443/",
        ] {
            assert_eq!(tpl.match_path(path), None, "{path:?}");
        }
        let long = format!(
            "/.well-known/masque/udp/{}/443/",
            "a".repeat(MAX_REQUEST_TARGET_LEN)
        );
        assert_eq!(tpl.match_path(&long), None);
    }

    #[test]
    fn rfc_examples_with_full_uri() {
        let tpl = t("https://example.org/.well-known/masque/udp/{target_host}/{target_port}/");
        assert_eq!(tpl.authority(), Some("example.org"));
        assert_eq!(
            tpl.match_path("/.well-known/masque/udp/192.0.2.6/443/"),
            both("192.0.2.6", "443")
        );
        assert_eq!(
            tpl.match_path("https://example.org/.well-known/masque/udp/h/1/"),
            None
        );

        let tpl = t("https://proxy.example.org:4443/masque?h={target_host}&p={target_port}");
        assert_eq!(tpl.authority(), Some("proxy.example.org:4443"));
        assert_eq!(
            tpl.match_path("/masque?h=192.0.2.6&p=443"),
            both("192.0.2.6", "443")
        );

        let tpl = t("https://proxy.example.org:4443/masque{?target_host,target_port}");
        assert_eq!(
            tpl.match_path("/masque?target_host=2001%3Adb8%3A%3A42&target_port=443"),
            both("2001%3Adb8%3A%3A42", "443")
        );
    }

    #[test]
    fn literal_query_template() {
        let tpl = t("/masque?h={target_host}&p={target_port}");
        assert_eq!(
            tpl.match_path("/masque?h=a.example&p=53"),
            both("a.example", "53")
        );
        // Any order, unknown parameters ignored.
        assert_eq!(tpl.match_path("/masque?x=1&p=53&y&h=a"), both("a", "53"));
        // Missing versus empty.
        assert_eq!(tpl.match_path("/masque?h=a"), m(Some("a"), None));
        assert_eq!(tpl.match_path("/masque?h=a&p="), both("a", ""));
        assert_eq!(tpl.match_path("/masque?h=a&p"), both("a", ""));
        assert_eq!(tpl.match_path("/masque"), m(None, None));
        assert_eq!(tpl.match_path("/masque?"), m(None, None));
        // Mismatches: wrong path, repeated parameter, a value that is not unreserved.
        for path in [
            "/masque/?h=a&p=1",
            "/masquerade?h=a&p=1",
            "/masque?h=a&p=1&h=b",
            "/masque?h=a/b&p=1",
            "/masque?h=a?b&p=1",
            "/masque?h=a&p=1#x",
        ] {
            assert_eq!(tpl.match_path(path), None, "{path}");
        }
        // Names are case-sensitive and not percent-decoded.
        assert_eq!(tpl.match_path("/masque?H=a&%68=b&p=1"), m(None, Some("1")));
    }

    #[test]
    fn form_style_query_template() {
        let tpl = t("/masque{?target_host,target_port}");
        assert_eq!(
            tpl.match_path("/masque?target_host=example.com&target_port=443"),
            both("example.com", "443")
        );
        assert_eq!(
            tpl.match_path("/masque?target_port=443&utm=x&target_host=example.com"),
            both("example.com", "443")
        );
        assert_eq!(
            tpl.match_path("/masque?target_port=443"),
            m(None, Some("443"))
        );
        assert_eq!(tpl.match_path("/masque"), m(None, None));
        assert_eq!(tpl.match_path("/masque/?target_port=443"), None);
    }

    #[test]
    fn fixed_parameters_and_continuation() {
        let tpl = t("/udp?v=1&flag{&target_host,target_port}");
        assert_eq!(
            tpl.match_path("/udp?v=1&flag&target_host=h&target_port=1"),
            both("h", "1")
        );
        assert_eq!(
            tpl.match_path("/udp?flag=&target_port=1&v=1&target_host=h"),
            both("h", "1")
        );
        // Fixed parameters are required, with their exact value.
        assert_eq!(
            tpl.match_path("/udp?flag&target_host=h&target_port=1"),
            None
        );
        assert_eq!(
            tpl.match_path("/udp?v=2&flag&target_host=h&target_port=1"),
            None
        );
        assert_eq!(tpl.match_path("/udp?v=1&target_host=h&target_port=1"), None);

        let tpl = t("/udp/{target_host}?port={target_port}");
        assert_eq!(tpl.match_path("/udp/h?port=9"), both("h", "9"));
        assert_eq!(tpl.match_path("/udp/h"), m(Some("h"), None));

        // A parameter value with literal text around the variable.
        let tpl = t("/udp?target=x{target_host}y&port={target_port}");
        assert_eq!(
            tpl.match_path("/udp?port=1&target=xhosty"),
            both("host", "1")
        );
        assert_eq!(tpl.match_path("/udp?port=1&target=xy"), both("", "1"));
        assert_eq!(tpl.match_path("/udp?port=1&target=host"), None);
    }

    #[test]
    fn path_templates_without_well_known_prefix() {
        let tpl = t("/proxy/{target_host}/{target_port}");
        assert_eq!(tpl.match_path("/proxy/h/1"), both("h", "1"));
        assert_eq!(tpl.match_path("/proxy/h/1/"), None);
        assert_eq!(tpl.match_path("/proxy/h"), None);

        // Delimiters that values may contain: the earlier variable takes the longest value.
        let tpl = t("/udp/{target_host}.{target_port}");
        assert_eq!(
            tpl.match_path("/udp/example.com.443"),
            both("example.com", "443")
        );
        let host = format!("{}b", "a.".repeat(126));
        let path = format!("/udp/{host}.443");
        assert_eq!(tpl.match_path(&path), both(&host, "443"));
        let tpl = t("/udp/{target_host}:{target_port}/x");
        assert_eq!(
            tpl.match_path("/udp/2001%3Adb8%3A%3A1:443/x"),
            both("2001%3Adb8%3A%3A1", "443")
        );

        // Several variables in one simple expression.
        let tpl = t("/udp/{target_host,target_port}/");
        assert_eq!(tpl.match_path("/udp/h,1/"), both("h", "1"));
        assert_eq!(tpl.match_path("/udp/,1/"), both("", "1"));
        assert_eq!(tpl.match_path("/udp/h/"), m(Some("h"), None));
        assert_eq!(tpl.match_path("/udp/h,1,2/"), None);

        // Literal percent-encoding compares hex digits case-insensitively.
        let tpl = t("/m%7Eu/{target_host}/{target_port}");
        assert_eq!(tpl.match_path("/m%7eu/h/1"), both("h", "1"));
        assert_eq!(tpl.match_path("/m~u/h/1"), None);
    }

    #[test]
    fn unknown_variables() {
        let tpl = t("/v/{version}/{target_host}/{target_port}/");
        assert_eq!(tpl.match_path("/v/2/h/1/"), both("h", "1"));
        // An undefined variable expands to nothing, so an empty segment still matches.
        assert_eq!(tpl.match_path("/v//h/1/"), both("h", "1"));
        assert_eq!(tpl.match_path("/v/h/1/"), None);

        let tpl = t("/m{?target_host,target_port,user}");
        assert_eq!(
            tpl.match_path("/m?target_host=h&target_port=1"),
            both("h", "1")
        );
        assert_eq!(
            tpl.match_path("/m?user=u&target_host=h&target_port=1"),
            both("h", "1")
        );
        assert_eq!(
            tpl.match_path("/m?user=a/b&target_host=h&target_port=1"),
            None
        );
    }

    #[test]
    fn level3_operators() {
        let tpl = l3("/p{/target_host,target_port}");
        assert_eq!(tpl.match_path("/p/h/1"), both("h", "1"));
        assert_eq!(tpl.match_path("/p/h"), m(Some("h"), None));
        assert_eq!(tpl.match_path("/p"), m(None, None));
        assert_eq!(tpl.match_path("/p/h/1/2"), None);

        let tpl = l3("/p{/target_host}/x{/target_port}");
        assert_eq!(tpl.match_path("/p/h/x/1"), both("h", "1"));

        let tpl = l3("/p/{+target_host}/{target_port}");
        assert_eq!(tpl.match_path("/p/a:b/c/1"), both("a:b/c", "1"));

        let tpl = l3("/p/{+target_host,target_port}/");
        assert_eq!(tpl.match_path("/p/[::1],1/"), both("[::1]", "1"));

        let tpl = l3("/p/x{.target_host}/{target_port}");
        assert_eq!(
            tpl.match_path("/p/x.example.com/1"),
            both("example.com", "1")
        );
        assert_eq!(tpl.match_path("/p/x/1"), m(None, Some("1")));
        assert_eq!(tpl.match_path("/p/xexample/1"), None);

        let tpl = l3("/p{;target_host,target_port}/");
        assert_eq!(
            tpl.match_path("/p;target_host=h;target_port=1/"),
            both("h", "1")
        );
        assert_eq!(
            tpl.match_path("/p;target_port=1;target_host=h/"),
            both("h", "1")
        );
        assert_eq!(
            tpl.match_path("/p;target_host;target_port=1/"),
            both("", "1")
        );
        assert_eq!(tpl.match_path("/p;target_host=h;target_host=i/"), None);
        assert_eq!(tpl.match_path("/p;other=h/"), None);
        assert_eq!(tpl.match_path("/p/"), m(None, None));
    }

    #[test]
    fn rfc9298_forbidden_operators() {
        for (tpl, op) in [
            ("/p/{+target_host}/{target_port}", '+'),
            ("/p{/target_host,target_port}", '/'),
            ("/p{.target_host}/{target_port}", '.'),
            ("/p{;target_host,target_port}", ';'),
            ("/p/{target_host}/{target_port}{#frag}", '#'),
        ] {
            assert!(
                matches!(err(tpl), TemplateError::ForbiddenOperator { operator, .. } if operator == op),
                "{tpl}"
            );
        }
        assert!(matches!(
            UriTemplate::parse_level3("/{target_host}/{target_port}{#f}"),
            Err(TemplateError::Fragment { .. })
        ));
    }

    #[test]
    fn invalid_templates() {
        use TemplateError as E;
        let cases: &[(&str, TemplateError)] = &[
            ("", E::PathMustStartWithSlash),
            (
                "masque/{target_host}/{target_port}",
                E::PathMustStartWithSlash,
            ),
            ("https://relay.example", E::PathMustStartWithSlash),
            (
                "https://relay.example?{target_host}{target_port}",
                E::PathMustStartWithSlash,
            ),
            (
                "//relay.example/{target_host}/{target_port}",
                E::InvalidScheme,
            ),
            ("1http://r/{target_host}/{target_port}", E::InvalidScheme),
            ("https:///{target_host}/{target_port}", E::InvalidAuthority),
            ("https://{target_host}/{target_port}", E::InvalidAuthority),
            (
                "/{target_host}/{target_port}/ x",
                E::InvalidCharacter { position: 29 },
            ),
            (
                "/{target_host}/{target_port}/\u{e9}",
                E::InvalidCharacter { position: 29 },
            ),
            (
                "/{target_host}/{target_port",
                E::UnbalancedBraces { position: 15 },
            ),
            (
                "/{target_host}/target_port}",
                E::UnbalancedBraces { position: 26 },
            ),
            (
                "/{target_{host}/{target_port}",
                E::UnbalancedBraces { position: 1 },
            ),
            (
                "/{}/{target_host}/{target_port}",
                E::EmptyExpression { position: 1 },
            ),
            (
                "/{target_host}/{target_port}/#f",
                E::Fragment { position: 29 },
            ),
            (
                "/{target_host}/{target_port}/%4",
                E::BadPercentEncoding { position: 29 },
            ),
            (
                "/{target_host}/{target_port}/%zz",
                E::BadPercentEncoding { position: 29 },
            ),
            (
                "/{target_host}/{target_port}/<",
                E::InvalidLiteral {
                    position: 29,
                    ch: '<',
                },
            ),
            (
                "/{target_host}/{target_port}/|",
                E::InvalidLiteral {
                    position: 29,
                    ch: '|',
                },
            ),
            (
                "/{=target_host}/{target_port}",
                E::UnsupportedOperator {
                    position: 1,
                    operator: '=',
                },
            ),
            (
                "/{,target_host}/{target_port}",
                E::UnsupportedOperator {
                    position: 1,
                    operator: ',',
                },
            ),
            (
                "/{!target_host}/{target_port}",
                E::UnsupportedOperator {
                    position: 1,
                    operator: '!',
                },
            ),
            (
                "/{@target_host}/{target_port}",
                E::UnsupportedOperator {
                    position: 1,
                    operator: '@',
                },
            ),
            (
                "/{|target_host}/{target_port}",
                E::UnsupportedOperator {
                    position: 1,
                    operator: '|',
                },
            ),
            (
                "/{target_host*}/{target_port}",
                E::UnsupportedModifier {
                    variable: "target_host".into(),
                },
            ),
            (
                "/{target_host:3}/{target_port}",
                E::UnsupportedModifier {
                    variable: "target_host".into(),
                },
            ),
            (
                "/{target-host}/{target_port}",
                E::InvalidVariableName { position: 1 },
            ),
            (
                "/{$x}/{target_host}/{target_port}",
                E::InvalidVariableName { position: 1 },
            ),
            (
                "/{a..b}/{target_host}/{target_port}",
                E::InvalidVariableName { position: 1 },
            ),
            (
                "/{.}/{target_host}/{target_port}",
                E::ForbiddenOperator {
                    position: 1,
                    operator: '.',
                },
            ),
            (
                "/{target_host,}/{target_port}",
                E::InvalidVariableName { position: 1 },
            ),
            (
                "/{target_host}/{target_host}/{target_port}",
                E::DuplicateVariable("target_host".into()),
            ),
            ("/no/vars", E::MissingVariable("target_host")),
            ("/{target_host}/", E::MissingVariable("target_port")),
            (
                "/{TARGET_HOST}/{target_port}",
                E::MissingVariable("target_host"),
            ),
            (
                "/{target_host}{target_port}",
                E::AdjacentExpressions { position: 14 },
            ),
            (
                "/{target_host}/{x}{target_port}",
                E::AdjacentExpressions { position: 18 },
            ),
            (
                "/{&target_host}/{target_port}",
                E::MisplacedQuery { position: 1 },
            ),
            (
                "/m?a=1{?target_host,target_port}",
                E::MisplacedQuery { position: 6 },
            ),
            (
                "/m{?target_host}{?target_port}",
                E::MisplacedQuery { position: 16 },
            ),
            (
                "/m{?target_host}x{&target_port}",
                E::MisplacedQuery { position: 16 },
            ),
            (
                "/m{?target_host}{target_port}",
                E::MisplacedQuery { position: 16 },
            ),
            (
                "/m?{target_host}={target_port}",
                E::MisplacedQuery { position: 3 },
            ),
            (
                "/m?h{target_host}&p={target_port}",
                E::MisplacedQuery { position: 3 },
            ),
            (
                "/m?={target_host}&p={target_port}",
                E::MisplacedQuery { position: 3 },
            ),
            (
                "/m?h={target_host}{x}&p={target_port}",
                E::AdjacentExpressions { position: 18 },
            ),
            (
                "/m?h={target_host}&h={target_port}",
                E::DuplicateQueryParameter("h".into()),
            ),
            (
                "/m?target_host=1{&target_host,target_port}",
                E::DuplicateQueryParameter("target_host".into()),
            ),
        ];
        for (tpl, want) in cases {
            assert_eq!(&err(tpl), want, "{tpl}");
        }
    }

    #[test]
    fn accepted_odd_templates() {
        // Single quotes are literals since RFC 6570 erratum 6937; pct-encoded variable names
        // are names of their own.
        t("/it's/{target_host}/{target_port}");
        t("/{target_host}/{target_port}/{a%41.b_c}");
        t("https://relay.example:443/{target_host}/{target_port}/");
        t("/m?x=1{&target_host,target_port}");
        t("/m?h={target_host}&&p={target_port}&fixed");
    }

    #[test]
    fn errors_display() {
        let e = err("/{target_host}/");
        assert_eq!(
            e.to_string(),
            "the template lacks the \"target_port\" variable"
        );
        let e = err("/{+target_host}/{target_port}");
        assert!(e.to_string().contains("RFC 9298"), "{e}");
    }

    // --- property tests ------------------------------------------------------------------

    /// A minimal RFC 6570 expander for the operators the matcher supports, for round trips.
    /// Values are already unreserved / pct-encoded, so they are copied as they are.
    fn expand(template: &str, host: Option<&str>, port: Option<&str>) -> String {
        let value = |name: &str| match name {
            TARGET_HOST => host,
            TARGET_PORT => port,
            _ => None,
        };
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = open + rest[open..].find('}').unwrap();
            let body = &rest[open + 1..close];
            rest = &rest[close + 1..];
            let (op, list) = match body.as_bytes()[0] {
                c @ (b'+' | b'.' | b'/' | b';' | b'?' | b'&') => (Some(c), &body[1..]),
                _ => (None, body),
            };
            let (first, sep, named, ifemp) = match op {
                None | Some(b'+') => ("", ",", false, ""),
                Some(b'.') => (".", ".", false, ""),
                Some(b'/') => ("/", "/", false, ""),
                Some(b';') => (";", ";", true, ""),
                Some(b'?') => ("?", "&", true, "="),
                _ => ("&", "&", true, "="),
            };
            let mut defined = 0;
            for name in list.split(',') {
                let Some(v) = value(name) else { continue };
                out.push_str(if defined == 0 { first } else { sep });
                defined += 1;
                if named {
                    out.push_str(name);
                    out.push_str(if v.is_empty() { ifemp } else { "=" });
                }
                out.push_str(v);
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn expander_matches_rfc_examples() {
        assert_eq!(
            expand(DEFAULT, Some("h"), Some("1")),
            "/.well-known/masque/udp/h/1/"
        );
        assert_eq!(
            expand("/m{?target_host,target_port}", Some("h"), Some("")),
            "/m?target_host=h&target_port="
        );
        assert_eq!(expand("/m{?target_host,target_port}", None, None), "/m");
        assert_eq!(
            expand("{;target_host,target_port}", Some(""), Some("1")),
            ";target_host;target_port=1"
        );
    }

    /// Characters of `unreserved / pct-encoded`, in either hex case.
    fn value(allow_empty: bool) -> impl Strategy<Value = String> {
        let unreserved = proptest::sample::select(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
                .chars()
                .map(String::from)
                .collect::<Vec<_>>(),
        );
        let pct = (any::<u8>(), any::<bool>()).prop_map(|(b, lower)| {
            let s = format!("%{b:02X}");
            if lower {
                s.to_ascii_lowercase()
            } else {
                s
            }
        });
        let min = usize::from(!allow_empty);
        proptest::collection::vec(prop_oneof![3 => unreserved, 1 => pct], min..40)
            .prop_map(|parts| parts.concat())
    }

    const ROUND_TRIP: &[&str] = &[
        DEFAULT,
        "https://relay.example:443/.well-known/masque/udp/{target_host}/{target_port}/",
        "/proxy/{target_host}/{target_port}",
        "/masque?h={target_host}&p={target_port}",
        "/masque{?target_host,target_port}",
        "/masque{?target_port,extra,target_host}",
        "/masque?v=1{&target_host,target_port}",
        "/a/{target_port}/b?x=y&host={target_host}",
        "/u/{target_host}:{target_port}/",
        "/u/{target_host}.{target_port}",
    ];

    const ROUND_TRIP_LEVEL3: &[&str] = &[
        "/p{/target_host,target_port}",
        "/p{/target_host}/q{/target_port}",
        "/p{;target_host,target_port}/",
        "/p/x{.target_host}/{target_port}",
        "/p/{+target_host}/{target_port}/",
    ];

    proptest! {
        #[test]
        fn expand_then_match_round_trips(host in value(false), port in value(false)) {
            for tpl in ROUND_TRIP {
                // Only an absolute template's path and query reach `:path`.
                let path_tpl = tpl.find("://").map_or(*tpl, |i| &tpl[i + 3 + tpl[i + 3..].find('/').unwrap()..]);
                let path = expand(path_tpl, Some(&host), Some(&port));
                // A port with a '.' cannot be told apart from a host label: skip that template.
                if tpl.contains("}.{") && port.contains('.') {
                    continue;
                }
                prop_assert_eq!(t(tpl).match_path(&path), both(&host, &port), "{} -> {}", tpl, path);
            }
            for tpl in ROUND_TRIP_LEVEL3 {
                let path = expand(tpl, Some(&host), Some(&port));
                prop_assert_eq!(l3(tpl).match_path(&path), both(&host, &port), "{} -> {}", tpl, path);
            }
        }

        #[test]
        fn empty_and_missing_values_round_trip(
            host in proptest::option::of(value(true)),
            port in proptest::option::of(value(true)),
        ) {
            // Form-style queries and named path parameters tell "empty" from "missing".
            for tpl in ["/masque{?target_host,target_port}", "/m?v=1{&target_port,target_host}"] {
                let path = expand(tpl, host.as_deref(), port.as_deref());
                prop_assert_eq!(t(tpl).match_path(&path), m(host.as_deref(), port.as_deref()));
            }
            let tpl = "/p{;target_host,target_port}/";
            let path = expand(tpl, host.as_deref(), port.as_deref());
            prop_assert_eq!(l3(tpl).match_path(&path), m(host.as_deref(), port.as_deref()));
        }

        #[test]
        fn matching_never_panics(path in "[/?&=a-z%0-9.,;:{}#\\[\\]+-]{0,64}", raw in any::<String>()) {
            for tpl in ROUND_TRIP {
                let tpl = t(tpl);
                let _ = tpl.match_path(&path);
                let _ = tpl.match_path(&raw);
            }
            for tpl in ROUND_TRIP_LEVEL3 {
                let tpl = l3(tpl);
                let _ = tpl.match_path(&path);
                let _ = tpl.match_path(&raw);
            }
        }

        #[test]
        fn parsing_never_panics(s in "[/?&=a-z_%0-9.,;:{}#+*!@|<>-]{0,40}", raw in any::<String>()) {
            let _ = s.parse::<UriTemplate>();
            let _ = UriTemplate::parse_level3(&s);
            let _ = raw.parse::<UriTemplate>();
        }
    }

    #[test]
    fn pathological_backtracking_is_bounded() {
        // Literals made of value characters force the matcher to try many splits; the failure
        // memo and the step budget keep this quick even at the length limit.
        let tpl = t("/{a}.{target_host}.{target_port}/x");
        let path = format!("/{}", ".".repeat(MAX_REQUEST_TARGET_LEN - 1));
        let start = std::time::Instant::now();
        assert_eq!(tpl.match_path(&path), None);
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }
}
