//! Connections from the agent to a destination, made from sockets created inside a pod's
//! network namespace, so they leave with that pod's address.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::{Request, Response, body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::netns::Netns;

/// Reasons a destination could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Opens a TCP connection to `addr` from a socket made in `netns`.
pub async fn connect(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let attempt = async {
        let socket = netns.tcp_socket(addr.is_ipv6()).await?;
        socket.set_nodelay(true)?;
        socket.connect(addr).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
    }
}

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// One HTTP/1.1 connection to a destination, opened on first use and reopened when the
/// destination closed it. Each client connection gets its own, so keep-alive on one side
/// maps onto keep-alive on the other.
pub struct HttpUpstream {
    netns: Netns,
    addr: SocketAddr,
    timeout: Duration,
    sender: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
}

impl HttpUpstream {
    pub fn new(netns: Netns, addr: SocketAddr, timeout: Duration) -> HttpUpstream {
        HttpUpstream {
            netns,
            addr,
            timeout,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `request` and returns the response head; the body streams afterwards.
    pub async fn send(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut slot = self.sender.lock().await;
        let reusable = slot.as_ref().is_some_and(|sender| !sender.is_closed());
        if !reusable {
            *slot = Some(self.handshake().await?);
        }
        let sender = slot.as_mut().expect("sender was just set");
        let http_error = |source| UpstreamError::Http {
            addr: self.addr,
            source,
        };
        sender.ready().await.map_err(http_error)?;
        sender.send_request(request).await.map_err(http_error)
    }

    async fn handshake(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let stream = connect(&self.netns, self.addr, self.timeout).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Http {
                addr: self.addr,
                source,
            })?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(upstream.addr = %addr, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}
