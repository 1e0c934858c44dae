//! The `/metrics` endpoint: a small HTTP/1.1 server on its own thread (never a worker), with its
//! own single-threaded runtime.
//!
//! It answers `GET /metrics` with the text exposition and closes the connection;
//! anything else gets `404` (`405` for another method on `/metrics`). A request head larger than
//! [`MAX_REQUEST`] gets `431`; a client has [`IO_TIMEOUT`] for the whole exchange, and at most
//! [`MAX_CONNECTIONS`] are served at once (more are closed at accept), so a slow or hostile
//! client can neither hold the endpoint nor grow its memory. Encoding a scrape happens on this
//! thread and only reads the workers' counters.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// Largest request head read, in bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request and read the response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The exposition's media type (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// A running `/metrics` server.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds the listening socket (done before anything else starts, so a bad address stops the
    /// relay before its workers run).
    pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Serves `registry` on `listener` from a new thread until `shutdown` turns true (or its
    /// sender is dropped).
    pub fn start(
        listener: std::net::TcpListener,
        registry: prometheus::Registry,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("metrics".to_owned())
            .spawn(move || rt.block_on(accept_loop(listener, Arc::new(registry), shutdown)))?;
        Ok(Self {
            addr,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the server thread to end (after the shutdown signal).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    registry: Arc<prometheus::Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot register the metrics listener");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    break;
                }
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: too many connections, closing");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(IO_TIMEOUT, serve(tcp, &registry)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection failed"),
                Err(_) => debug!(%peer, "metrics client too slow, closed"),
            }
            drop(slot);
        });
    }
}

/// Serves one request on one connection.
async fn serve(mut tcp: tokio::net::TcpStream, registry: &prometheus::Registry) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut filled = 0;
    let response = loop {
        if filled == buf.len() {
            break Response::status(431, "Request Header Fields Too Large");
        }
        let n = tcp.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(()); // closed before a complete request
        }
        filled += n;
        match parse(&buf[..filled]) {
            Head::Partial => continue,
            Head::Bad => break Response::status(400, "Bad Request"),
            Head::TooLarge => break Response::status(431, "Request Header Fields Too Large"),
            Head::Complete { method, path } => break route(&method, &path, registry),
        }
    };
    tcp.write_all(&response.bytes).await?;
    tcp.shutdown().await?;
    if response.status >= 400 {
        // The client may still be sending (an oversized head): read and discard a bounded amount
        // before closing, since closing with unread input resets the connection and the client
        // could lose the response. The caller's timeout bounds the time.
        let mut drained = 0;
        while drained < 4 * MAX_REQUEST {
            match tcp.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
    }
    Ok(())
}

/// What a request head parsed to.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    Partial,
    Bad,
    /// More header lines than the parser takes.
    TooLarge,
    Complete {
        method: String,
        path: String,
    },
}

/// Header lines a request may have.
pub const MAX_HEADERS: usize = 64;

/// Parses a request head with `httparse`.
pub fn parse(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
            (Some(m), Some(p)) => Head::Complete {
                method: m.to_owned(),
                path: p.to_owned(),
            },
            _ => Head::Bad,
        },
        Err(httparse::Error::TooManyHeaders) => Head::TooLarge,
        Err(_) => Head::Bad,
    }
}

/// A complete response, ready to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub bytes: Vec<u8>,
}

impl Response {
    fn new(status: u16, reason: &str, content_type: &str, body: &[u8], extra: &str) -> Self {
        let mut bytes = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        Self { status, bytes }
    }

    fn status(status: u16, reason: &str) -> Self {
        Self::new(status, reason, "text/plain; charset=utf-8", b"", "")
    }
}

/// The response to a complete request.
pub fn route(method: &str, path: &str, registry: &prometheus::Registry) -> Response {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != "/metrics" {
        return Response::status(404, "Not Found");
    }
    match method {
        "GET" => {
            let text = super::collector::encode(registry);
            Response::new(200, "OK", CONTENT_TYPE, text.as_bytes(), "")
        }
        _ => Response::new(
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            b"",
            "Allow: GET\r\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{RelayCollector, WorkerStats};

    fn registry() -> prometheus::Registry {
        RelayCollector::registry(&[Arc::new(WorkerStats::default())])
    }

    fn text(r: &Response) -> String {
        String::from_utf8(r.bytes.clone()).unwrap()
    }

    #[test]
    fn parses_heads() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Head::Partial
        );
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Head::Complete {
                method: "GET".into(),
                path: "/metrics".into()
            }
        );
        assert_eq!(parse(b"\x00\x01garbage\r\n\r\n"), Head::Bad);
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Head::TooLarge);
    }

    #[test]
    fn routes() {
        let reg = registry();
        let ok = route("GET", "/metrics", &reg);
        assert_eq!(ok.status, 200);
        let t = text(&ok);
        assert!(
            t.contains("\r\nContent-Type: text/plain; version=0.0.4"),
            "{t}"
        );
        assert!(t.contains("masque_relay_flows_opened_total{worker=\"0\"} 0\n"));
        assert_eq!(route("GET", "/metrics?x=1", &reg).status, 200);
        assert_eq!(route("GET", "/", &reg).status, 404);
        assert_eq!(route("GET", "/metricsx", &reg).status, 404);
        assert_eq!(route("POST", "/metrics", &reg).status, 405);
        assert_eq!(route("HEAD", "/metrics", &reg).status, 405);
    }
}
