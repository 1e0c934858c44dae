//! Configuration: the TOML file, the command-line flags that override it, and validation.
//!
//! [`Config`] is what an operator writes (every field has a default, so an empty file is a valid
//! configuration). [`Config::validate`] turns it into [`Checked`], the only form the rest of the
//! relay accepts: once a value has passed validation nobody downstream re-checks it. A bad value is
//! reported as a [`ConfigError`] naming the field and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::proto::uri_template::UriTemplate;
use crate::relay::policy::AddrRule;

/// The default URI template of RFC 9298 §2's example, used by most clients.
pub const DEFAULT_URI_TEMPLATE: &str = "/.well-known/masque/udp/{target_host}/{target_port}/";
/// The default listen address: loopback only, so a first run exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
/// The default `/metrics` address: loopback only, on the port OpenTelemetry's Prometheus
/// exporter uses.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// The relay's configuration file. Every field is optional; the default is given on each field.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port to listen on: UDP for HTTP/3, TCP for HTTP/2 and HTTP/1.1 over TLS. Port
    /// 0 picks a free port. Default `127.0.0.1:4433`.
    pub listen: String,
    /// Number of worker threads; 0 means one per available core. Default 0.
    pub workers: usize,
    /// Pin worker `i` to the `i`-th available core. Default true.
    pub pin_workers: bool,
    /// PEM file with the certificate chain. Empty (the default) means a self-signed certificate
    /// for `localhost` is generated at start, for local use only.
    pub cert: Option<PathBuf>,
    /// PEM file with the private key for `cert`. Required when `cert` is set.
    pub key: Option<PathBuf>,
    /// RFC 6570 (level 3) URI template clients use, with `target_host` and `target_port`.
    /// Default `/.well-known/masque/udp/{target_host}/{target_port}/`.
    pub uri_template: String,
    /// Targets allowed even though the default deny list (loopback, private, link-local, ...)
    /// refuses them: `CIDR[:PORT[-PORT]]`. Default empty.
    pub allow_targets: Vec<String>,
    /// Targets always refused, whatever else says: `CIDR[:PORT[-PORT]]`. Default empty.
    pub deny_targets: Vec<String>,
    /// A flow with no datagram in either direction for this many seconds is closed.
    /// RFC 9298 §3.1 asks for at least two minutes. Default 120.
    pub flow_idle_timeout_secs: u64,
    /// Upper bound on resolving a target host name, in milliseconds. Default 5000.
    pub resolve_timeout_ms: u64,
    /// On SIGTERM the relay drains: no new connections or requests, established flows go on
    /// relaying for at most this many seconds, then it exits. Default 30.
    pub drain_timeout_secs: u64,
    /// Time a client has to finish the TLS handshake and send its first request, in seconds.
    /// Default 10.
    pub handshake_timeout_secs: u64,
    /// Largest UDP payload relayed in either direction, in bytes (at most 65527, RFC 9298 §5).
    /// Default 65527.
    pub max_udp_payload: usize,
    /// Bytes of target-to-client datagrams that may wait per flow for a client that reads slowly;
    /// beyond it datagrams are dropped and counted. Default 262144.
    pub client_send_buffer: usize,
    /// Address and port of the Prometheus `/metrics` endpoint (plain HTTP, served by its own
    /// thread), or `off`. Port 0 picks a free port. Default `127.0.0.1:9464`.
    pub metrics: String,
    /// HTTP/2 settings.
    pub http2: Http2Config,
    /// HTTP/3 (QUIC) settings.
    pub http3: Http3Config,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Abuse limits.
    pub limits: LimitsConfig,
    /// The datagram I/O engine.
    pub io: IoConfig,
}

/// The datagram I/O engine of each worker (not reloadable: read at start).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoConfig {
    /// `auto` (io_uring when the start-up probe finds it usable, else the fallback), `uring`
    /// (refuse to start without it) or `mmsg` (recvmmsg/sendmmsg + epoll). Default `auto`.
    pub backend: crate::io::dgram::Choice,
    /// Payload bytes of each target receive buffer; a longer datagram (or GRO train) from a
    /// target is dropped and counted (`truncated_receive`), never relayed cut short. At 65536
    /// egress sockets receive with UDP GRO (whole trains of datagrams from one target in one
    /// buffer); below, without. 512..=65536. Default 65536.
    pub target_buffer_size: usize,
    /// Target receive buffers per worker (a power of two, 64..=32768). Default 1024: a lone
    /// flow's burst of a few hundred datagrams fits. At the default size that is 64 MiB of
    /// address space per worker, resident as GRO trains fill the buffers.
    pub target_buffers: u16,
    /// Egress sockets (sending to targets, receiving their replies) a worker may open per
    /// address family. Each serves at most one flow per target address, so this caps the
    /// flows to any one target per worker; flows to different targets share sockets.
    /// 1..=60000. Default 16384.
    pub egress_sockets_max: u32,
    /// SO_RCVBUF / SO_SNDBUF asked for each egress socket (the kernel caps it at
    /// net.core.rmem_max / wmem_max; the sysctl profiles raise those). Default 4 MiB.
    pub egress_socket_buffer: usize,
    /// QUIC receive buffers per worker, 64 KiB each for GRO trains (a power of two,
    /// 8..=4096). Default 64.
    pub quic_buffers: u16,
    /// Let the memory allocator back the heap with transparent huge pages. Default off: the
    /// relay's memory then grows by the 4 KiB pages its connections and flows touch, not by
    /// 2 MiB pages zeroed at first touch (measured: 22 -> 9 MiB RSS at start, 3178 -> 2281
    /// bytes per idle flow at 10 000 flows, 1784 -> 1673 at 100 000, no difference in CPU per
    /// relayed datagram).
    pub transparent_huge_pages: bool,
}

impl Default for IoConfig {
    fn default() -> Self {
        let d = crate::io::dgram::Sizes::default();
        Self {
            backend: crate::io::dgram::Choice::Auto,
            target_buffer_size: d.target_buffer_size,
            target_buffers: d.target_buffers,
            egress_sockets_max: 16_384,
            egress_socket_buffer: 4 << 20,
            quic_buffers: d.quic_buffers,
            transparent_huge_pages: false,
        }
    }
}

impl IoConfig {
    pub fn sizes(&self) -> crate::io::dgram::Sizes {
        crate::io::dgram::Sizes {
            target_buffer_size: self.target_buffer_size,
            target_buffers: self.target_buffers,
            quic_buffers: self.quic_buffers,
        }
    }
}

/// Client authentication. With neither field set, any client may use the relay (fine on
/// loopback; the relay warns at start when it listens beyond it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Credentials file (hashed Bearer tokens and Basic users; see `masque-relay
    /// hash-credential`). When set, every request needs a valid `Proxy-Authorization`, else
    /// 407. Reloaded on SIGHUP. Default none.
    pub credentials_file: Option<PathBuf>,
    /// PEM file of CA certificates for client certificates (mTLS). When set, the TLS and QUIC
    /// handshakes require a client certificate issued by one of them. Default none.
    pub client_ca: Option<PathBuf>,
}

/// Limits on what clients may take. 0 means unlimited where noted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Flows open on the whole relay; beyond it requests get 503. 0 = unlimited. Default 100000.
    pub max_flows: usize,
    /// Flows open per authenticated identity; beyond it 429. 0 = unlimited. Default 10000.
    pub max_flows_per_identity: usize,
    /// Flows open per client connection; beyond it 429. Default 256.
    pub max_flows_per_connection: usize,
    /// New flows per second per connection (token bucket, burst of twice the rate); beyond it
    /// 429. 0 = unlimited. Default 200.
    pub new_flows_per_second: u32,
    /// Datagrams per second per flow and direction (burst of a tenth of a second's worth, at
    /// least 64); beyond it datagrams are dropped and counted. 0 = unlimited. Default 200000.
    pub datagrams_per_second: u32,
    /// TLS handshakes in progress per worker; more connections are closed at once.
    /// Default 1024.
    pub max_pending_handshakes: usize,
    /// TCP connections per worker; more are closed at once. Default 20000.
    pub max_connections_per_worker: usize,
    /// When the relay's memory cgroup is above this percentage of its limit, new flows get
    /// 503 until usage falls again (checked ten times a second). 0 turns it off. Default 85.
    pub memory_high_percent: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_flows: 100_000,
            max_flows_per_identity: 10_000,
            max_flows_per_connection: 256,
            new_flows_per_second: 200,
            datagrams_per_second: 200_000,
            max_pending_handshakes: 1024,
            max_connections_per_worker: 20_000,
            memory_high_percent: 85,
        }
    }
}

/// HTTP/3 and QUIC settings. The QUIC listener uses the same address and port as `listen`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http3Config {
    /// Serve HTTP/3 on UDP at the `listen` address. Default true.
    pub enabled: bool,
    /// Concurrent request streams (flows) per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_FIELD_SECTION_SIZE, and the limit on a request's decoded headers, in
    /// bytes. Default 16384.
    pub max_field_section_size: u64,
    /// A connection with no packet for this many seconds is closed. Default 30.
    pub idle_timeout_secs: u64,
    /// Size of the first QUIC packets sent, in bytes (1200..=65527). Path MTU discovery grows it
    /// from there. At least 1350 keeps inner QUIC packets of 1200 bytes and more relayable in
    /// DATAGRAM frames. Default 1350.
    pub initial_mtu: u16,
    /// Bytes of DATAGRAM frames that may wait per connection, each way; beyond it target
    /// datagrams are dropped and counted. Default 1048576.
    pub datagram_buffer: usize,
    /// When more handshakes than this are pending on a worker, new clients must first prove
    /// their address with a Retry. Default 64.
    pub retry_threshold: usize,
    /// Connections per worker; more are refused. Default 10000.
    pub max_connections_per_worker: usize,
    /// SO_RCVBUF / SO_SNDBUF asked for the QUIC socket, in bytes (capped by
    /// net.core.rmem_max / wmem_max). Default 4194304.
    pub socket_buffer: usize,
}

impl Default for Http3Config {
    fn default() -> Self {
        Self {
            enabled: true,
            max_concurrent_streams: 256,
            max_field_section_size: 16 * 1024,
            idle_timeout_secs: 30,
            initial_mtu: 1350,
            datagram_buffer: 1024 * 1024,
            retry_threshold: 64,
            max_connections_per_worker: 10_000,
            socket_buffer: 4 * 1024 * 1024,
        }
    }
}

/// HTTP/2 limits, all set explicitly rather than left to library defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http2Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: flows one connection may have open. Default 256.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE, in bytes. Default 65536.
    pub max_header_list_size: u32,
    /// Initial per-stream receive window, in bytes. Default 1048576.
    pub initial_stream_window: u32,
    /// Initial connection receive window, in bytes. Default 2097152. It bounds what a client
    /// has in flight on the connection, so also what waits in the relay while a busy worker
    /// catches up: with DATAGRAM capsules of small datagrams, one DATA frame each, h2 keeps a
    /// few hundred bytes of bookkeeping per frame on top (a full window of 64-byte datagrams
    /// is about 31 000 frames). A window of frames of 48 bytes and more is accepted; a client
    /// that fills it with smaller ones is closed with ENHANCE_YOUR_CALM.
    pub initial_connection_window: u32,
    /// Largest frame payload the relay accepts, in bytes (16384..=16777215). Default 65535.
    pub max_frame_size: u32,
    /// A TCP client connection (HTTP/2 or HTTP/1.1) whose client has taken none of the bytes the
    /// relay has for it for this many seconds is closed: it stopped reading, e.g. a PING or
    /// SETTINGS flood that never reads the answers. Idle connections are not affected. At
    /// least 1. Default 30.
    pub write_stall_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            workers: 0,
            pin_workers: true,
            cert: None,
            key: None,
            uri_template: DEFAULT_URI_TEMPLATE.to_owned(),
            allow_targets: Vec::new(),
            deny_targets: Vec::new(),
            flow_idle_timeout_secs: 120,
            resolve_timeout_ms: 5000,
            drain_timeout_secs: 30,
            handshake_timeout_secs: 10,
            max_udp_payload: crate::proto::capsule::MAX_UDP_PAYLOAD,
            client_send_buffer: 256 * 1024,
            metrics: DEFAULT_METRICS.to_owned(),
            http2: Http2Config::default(),
            http3: Http3Config::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            io: IoConfig::default(),
        }
    }
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 256,
            max_header_list_size: 64 * 1024,
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 2 * 1024 * 1024,
            max_frame_size: 65_535,
            write_stall_timeout_secs: 30,
        }
    }
}

impl Http2Config {
    /// `write_stall_timeout_secs` as a duration.
    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_secs(self.write_stall_timeout_secs)
    }
}

/// A configuration value that cannot be used: which field, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field as written in the TOML file (flags name the same field).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

/// A validated configuration: parsed, in range, ready to use.
#[derive(Debug, Clone)]
pub struct Checked {
    pub listen: SocketAddr,
    pub workers: usize,
    pub pin_workers: bool,
    pub tls: TlsSource,
    pub uri_template: UriTemplate,
    pub allow_targets: Vec<AddrRule>,
    pub deny_targets: Vec<AddrRule>,
    pub flow_idle_timeout: Duration,
    pub resolve_timeout: Duration,
    pub handshake_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_udp_payload: usize,
    pub client_send_buffer: usize,
    /// Where `/metrics` is served; `None` when `metrics = "off"`.
    pub metrics: Option<SocketAddr>,
    pub http2: Http2Config,
    pub http3: Http3Config,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub io: IoConfig,
}

/// Where the TLS certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files given by the operator.
    Files { cert: PathBuf, key: PathBuf },
    /// Generate a self-signed certificate for `localhost` at start.
    SelfSigned,
}

impl Config {
    /// Reads and parses a TOML file. Unknown fields are errors, so a typo is not silently ignored.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("config", format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| bad("config", e.message().to_owned() + &span_hint(&e)))
    }

    /// Checks every field and produces the configuration the relay runs on.
    pub fn validate(&self) -> Result<Checked, ConfigError> {
        let listen = SocketAddr::from_str(&self.listen).map_err(|e| {
            bad(
                "listen",
                format!("{:?} is not ADDR:PORT ({e})", self.listen),
            )
        })?;
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > 1024 => return Err(bad("workers", format!("{n} is more than 1024"))),
            n => n,
        };
        let tls = match (&self.cert, &self.key) {
            (None, None) => TlsSource::SelfSigned,
            (Some(cert), Some(key)) => {
                for (field, path) in [("cert", cert), ("key", key)] {
                    if !path.is_file() {
                        return Err(bad(
                            field,
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                }
                TlsSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }
            }
            (Some(_), None) => return Err(bad("key", "cert is set but key is not")),
            (None, Some(_)) => return Err(bad("cert", "key is set but cert is not")),
        };
        let uri_template = UriTemplate::from_str(&self.uri_template)
            .map_err(|e| bad("uri_template", format!("{:?}: {e}", self.uri_template)))?;
        let parse_rules = |field: &'static str, rules: &[String]| {
            rules
                .iter()
                .map(|r| AddrRule::from_str(r).map_err(|e| bad(field, format!("{r:?}: {e}"))))
                .collect::<Result<Vec<_>, _>>()
        };
        let allow_targets = parse_rules("allow_targets", &self.allow_targets)?;
        let deny_targets = parse_rules("deny_targets", &self.deny_targets)?;
        if self.flow_idle_timeout_secs == 0 {
            return Err(bad("flow_idle_timeout_secs", "must be at least 1"));
        }
        if !(512..=65_536).contains(&self.io.target_buffer_size) {
            return Err(bad("io.target_buffer_size", "must be within 512..=65536"));
        }
        if !(64..=32_768).contains(&self.io.target_buffers)
            || !self.io.target_buffers.is_power_of_two()
        {
            return Err(bad(
                "io.target_buffers",
                "must be a power of two within 64..=32768",
            ));
        }
        if !(1..=60_000).contains(&self.io.egress_sockets_max) {
            return Err(bad("io.egress_sockets_max", "must be within 1..=60000"));
        }
        if !(8..=4096).contains(&self.io.quic_buffers) || !self.io.quic_buffers.is_power_of_two() {
            return Err(bad(
                "io.quic_buffers",
                "must be a power of two within 8..=4096",
            ));
        }
        if self.resolve_timeout_ms == 0 {
            return Err(bad("resolve_timeout_ms", "must be at least 1"));
        }
        if self.handshake_timeout_secs == 0 {
            return Err(bad("handshake_timeout_secs", "must be at least 1"));
        }
        if !(1..=crate::proto::capsule::MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return Err(bad(
                "max_udp_payload",
                format!("{} is outside 1..=65527", self.max_udp_payload),
            ));
        }
        if self.client_send_buffer < 2048 {
            return Err(bad("client_send_buffer", "must be at least 2048 bytes"));
        }
        let metrics = match self.metrics.as_str() {
            "off" => None,
            a => Some(
                SocketAddr::from_str(a)
                    .map_err(|e| bad("metrics", format!("{a:?} is not ADDR:PORT or off ({e})")))?,
            ),
        };
        let h2 = &self.http2;
        if h2.max_concurrent_streams == 0 {
            return Err(bad("http2.max_concurrent_streams", "must be at least 1"));
        }
        if h2.max_header_list_size < 1024 {
            return Err(bad("http2.max_header_list_size", "must be at least 1024"));
        }
        if !(16_384..=16_777_215).contains(&h2.max_frame_size) {
            return Err(bad(
                "http2.max_frame_size",
                "must be within 16384..=16777215",
            ));
        }
        if h2.write_stall_timeout_secs == 0 {
            return Err(bad("http2.write_stall_timeout_secs", "must be at least 1"));
        }
        for (field, v) in [
            ("http2.initial_stream_window", h2.initial_stream_window),
            (
                "http2.initial_connection_window",
                h2.initial_connection_window,
            ),
        ] {
            if !(65_535..=(1 << 31) - 1).contains(&v) {
                return Err(bad(field, format!("{v} is outside 65535..=2147483647")));
            }
        }
        for (field, path) in [
            ("auth.credentials_file", &self.auth.credentials_file),
            ("auth.client_ca", &self.auth.client_ca),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(bad(
                        field,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        let l = &self.limits;
        if l.max_flows_per_connection == 0 {
            return Err(bad("limits.max_flows_per_connection", "must be at least 1"));
        }
        if l.max_pending_handshakes == 0 {
            return Err(bad("limits.max_pending_handshakes", "must be at least 1"));
        }
        if l.memory_high_percent > 100 {
            return Err(bad("limits.memory_high_percent", "must be within 0..=100"));
        }
        if l.max_connections_per_worker == 0 {
            return Err(bad(
                "limits.max_connections_per_worker",
                "must be at least 1",
            ));
        }
        let h3 = &self.http3;
        if h3.max_concurrent_streams == 0 {
            return Err(bad("http3.max_concurrent_streams", "must be at least 1"));
        }
        if h3.max_field_section_size < 1024 {
            return Err(bad("http3.max_field_section_size", "must be at least 1024"));
        }
        if h3.idle_timeout_secs == 0 || h3.idle_timeout_secs > 3600 {
            return Err(bad("http3.idle_timeout_secs", "must be within 1..=3600"));
        }
        if !(1200..=65_527).contains(&h3.initial_mtu) {
            return Err(bad("http3.initial_mtu", "must be within 1200..=65527"));
        }
        if h3.datagram_buffer < 65_536 {
            return Err(bad("http3.datagram_buffer", "must be at least 65536"));
        }
        if h3.max_connections_per_worker == 0 {
            return Err(bad(
                "http3.max_connections_per_worker",
                "must be at least 1",
            ));
        }
        Ok(Checked {
            listen,
            workers,
            pin_workers: self.pin_workers,
            tls,
            uri_template,
            allow_targets,
            deny_targets,
            flow_idle_timeout: Duration::from_secs(self.flow_idle_timeout_secs),
            resolve_timeout: Duration::from_millis(self.resolve_timeout_ms),
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            max_udp_payload: self.max_udp_payload,
            client_send_buffer: self.client_send_buffer,
            metrics,
            http2: self.http2.clone(),
            http3: self.http3.clone(),
            auth: self.auth.clone(),
            limits: self.limits.clone(),
            io: self.io.clone(),
        })
    }
}

fn span_hint(e: &toml::de::Error) -> String {
    e.span()
        .map(|s| format!(" (at byte {})", s.start))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        let c = Config::from_toml("").unwrap().validate().unwrap();
        assert_eq!(c.listen, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(c.flow_idle_timeout, Duration::from_secs(120));
        assert!(matches!(c.tls, TlsSource::SelfSigned));
        assert!(c.workers >= 1);
        assert_eq!(c.http2.max_concurrent_streams, 256);
        assert_eq!(c.http2.write_stall_timeout(), Duration::from_secs(30));
    }

    #[test]
    fn fields_parse() {
        let c = Config::from_toml(
            r#"
            listen = "[::1]:8443"
            workers = 3
            allow_targets = ["127.0.0.0/8", "::1/128:1000-2000"]
            flow_idle_timeout_secs = 5
            uri_template = "/masque{?target_host,target_port}"
            [http2]
            max_concurrent_streams = 10
            "#,
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.listen, "[::1]:8443".parse().unwrap());
        assert_eq!(c.workers, 3);
        assert_eq!(c.allow_targets.len(), 2);
        assert_eq!(c.flow_idle_timeout, Duration::from_secs(5));
        assert_eq!(c.http2.max_concurrent_streams, 10);
    }

    fn field_of(toml: &str) -> &'static str {
        match Config::from_toml(toml) {
            Err(e) => e.field,
            Ok(c) => c.validate().unwrap_err().field,
        }
    }

    #[test]
    fn bad_values_name_their_field() {
        assert_eq!(field_of("listen = \"nowhere\""), "listen");
        assert_eq!(field_of("workers = 5000"), "workers");
        assert_eq!(
            field_of("allow_targets = [\"10.0.0.0/33\"]"),
            "allow_targets"
        );
        assert_eq!(field_of("deny_targets = [\"x\"]"), "deny_targets");
        assert_eq!(field_of("uri_template = \"/no/vars\""), "uri_template");
        assert_eq!(
            field_of("flow_idle_timeout_secs = 0"),
            "flow_idle_timeout_secs"
        );
        assert_eq!(field_of("max_udp_payload = 70000"), "max_udp_payload");
        assert_eq!(field_of("[io]\ntarget_buffers = 100"), "io.target_buffers");
        assert_eq!(
            field_of("[io]\ntarget_buffer_size = 100"),
            "io.target_buffer_size"
        );
        assert_eq!(field_of("cert = \"/nonexistent.pem\""), "key");
        assert_eq!(
            field_of("cert = \"/nonexistent.pem\"\nkey = \"/nonexistent.key\""),
            "cert"
        );
        assert_eq!(
            field_of("[http2]\nmax_frame_size = 10"),
            "http2.max_frame_size"
        );
        assert_eq!(
            field_of("[http2]\nwrite_stall_timeout_secs = 0"),
            "http2.write_stall_timeout_secs"
        );
        assert_eq!(field_of("no_such_field = 1"), "config");
    }
}
