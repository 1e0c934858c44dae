//! Turning target host names into addresses, behind a trait so tests and embedders can put
//! their own resolver in (`Relay::start_with_resolver`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

/// A boxed resolution in progress.
pub type Resolution = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

/// Turns a target host name into addresses. The relay uses [`SystemResolver`]; tests and
/// embedders can put another behind [`crate::Relay::start_with_resolver`].
pub trait Resolve: Send + Sync + std::fmt::Debug {
    fn resolve(&self, host: &str, port: u16) -> Resolution;
}

/// The system resolver (getaddrinfo on tokio's blocking pool): /etc/hosts, nsswitch and
/// resolv.conf apply, and the worker's event loop never blocks on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> Resolution {
        let host = host.to_owned();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}
