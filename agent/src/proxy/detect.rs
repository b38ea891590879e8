//! Protocol detection on an accepted connection: HTTP/1.x requests start with a method
//! token and a space. Bytes are only peeked, so the stream is handed on untouched.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// Protocol a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Anything else, including a client that sent nothing in time (server-first
    /// protocols such as SMTP or MySQL) and HTTP/2 with prior knowledge.
    Other,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// Classifies the first bytes; `None` means more bytes are needed to tell.
pub fn classify(head: &[u8]) -> Option<Protocol> {
    let mut undecided = false;
    for method in METHODS {
        if head.starts_with(method) {
            return Some(Protocol::Http1);
        }
        if method.starts_with(head) {
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Other)
    }
}

/// Peeks at `stream` until its protocol is known, the peer closes, or `timeout` passes.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Protocol {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 8];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buffer)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Protocol::Other,
        };
        if let Some(protocol) = classify(&buffer[..n]) {
            return protocol;
        }
        // peek returns at once while any byte is buffered, so wait for the rest of the
        // method token instead of spinning on the same bytes.
        if Instant::now() + Duration::from_millis(2) >= deadline {
            return Protocol::Other;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"PATCH /x"), Some(Protocol::Http1));
    }

    #[test]
    fn prefixes_need_more_bytes() {
        assert_eq!(classify(b"G"), None);
        assert_eq!(classify(b"DELE"), None);
        assert_eq!(classify(b"P"), None);
    }

    #[test]
    fn other_protocols_are_not_http() {
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Other));
        assert_eq!(classify(b"PRI * HTTP/2.0"), Some(Protocol::Other));
        assert_eq!(classify(b"GETX"), Some(Protocol::Other));
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Protocol::Other));
    }

    #[tokio::test]
    async fn silent_client_is_other() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(
            sniff(&server, Duration::from_millis(50)).await,
            Protocol::Other
        );
    }

    #[tokio::test]
    async fn split_method_is_http() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(b"ST / HTTP/1.1\r\n").await.unwrap();
            client
        });
        assert_eq!(
            sniff(&server, Duration::from_secs(2)).await,
            Protocol::Http1
        );
        drop(writer.await.unwrap());
    }
}
