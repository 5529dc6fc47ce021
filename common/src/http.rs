//! A minimal HTTP/1.1 responder for the operational endpoints of jetmq's programs:
//! `GET /metrics`, `GET /healthz`, `GET /readyz` and the like.
//!
//! One request per connection, no keep-alive, no request body: the request head is read
//! (at most [`MAX_REQUEST_HEAD`] bytes, within [`READ_TIMEOUT`]), its path is handed to a
//! plain function that returns a [`Response`], and the connection is closed after the
//! answer. That is all Prometheus, Kubernetes probes and `curl` need.
//!
//! Why not hyper (already in the dependency tree through the OTLP exporter's HTTP client)?
//! Serving with it takes its `server` features plus hyper-util (the Tokio I/O adapter and
//! a timer for the header read timeout) and http-body-util, and about as many lines of glue
//! as this whole module; and here the bytes on the wire stay exactly what they were.
//!
//! ```no_run
//! use jetmq_common::http::{self, Response};
//!
//! # async fn example() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
//! tokio::spawn(http::serve(listener, |path: &str| match path {
//!     "/healthz" => Response::text(http::Status::Ok, "ok\n"),
//!     "/metrics" => Response::metrics("# no metrics yet\n".to_owned()),
//!     _ => Response::not_found(),
//! }));
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most of a request head that is read; the rest (if any) is ignored.
pub const MAX_REQUEST_HEAD: usize = 4096;
/// How long a client may take to send its request head; after that the connection is
/// closed without an answer. Writing the answer is bounded by the same time.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";
/// Content type of plain text answers.
pub const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// The status codes these endpoints answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotFound,
    ServiceUnavailable,
}

impl Status {
    /// The status line's code and reason phrase.
    pub fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::NotFound => "404 Not Found",
            Status::ServiceUnavailable => "503 Service Unavailable",
        }
    }
}

/// What to answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    /// A plain text answer.
    pub fn text(status: Status, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: PLAIN_TEXT,
            body: body.into(),
        }
    }

    /// A metrics page (see [`crate::prometheus`]).
    pub fn metrics(body: String) -> Self {
        Response {
            status: Status::Ok,
            content_type: PROMETHEUS_TEXT,
            body,
        }
    }

    /// `404 Not Found`.
    pub fn not_found() -> Self {
        Response::text(Status::NotFound, "not found\n")
    }

    /// `200 ready` or `503 not ready`: what a readiness probe expects.
    pub fn readiness(ready: bool) -> Self {
        if ready {
            Response::text(Status::Ok, "ready\n")
        } else {
            Response::text(Status::ServiceUnavailable, "not ready\n")
        }
    }

    /// The response as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status.line(),
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// Answers every connection on `listener` with `answer(path)` until the future is dropped
/// (abort its task, or race it against a shutdown signal in `tokio::select!`). `path` is
/// the request target as sent (query string included), or `""` if the request had none.
pub async fn serve<F>(listener: TcpListener, answer: F)
where
    F: Fn(&str) -> Response + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                tracing::warn!(error = %e, "HTTP endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(answer_one(socket, answer));
    }
}

/// Reads the request head of `socket` and writes the answer.
async fn answer_one<F>(mut socket: TcpStream, answer: Arc<F>)
where
    F: Fn(&str) -> Response,
{
    let Ok(head) = tokio::time::timeout(READ_TIMEOUT, read_head(&mut socket)).await else {
        return;
    };
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("");
    let response = answer(path).to_bytes();
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        let _ = socket.write_all(&response).await;
        let _ = socket.shutdown().await;
    })
    .await;
}

/// The request head: bytes up to the blank line, the end of the stream, an error or
/// [`MAX_REQUEST_HEAD`], whichever comes first.
async fn read_head(socket: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    while len < buf.len() {
        match socket.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                len += n;
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    buf.truncate(len);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(request).await.expect("write");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn answers_by_path_and_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, |path: &str| match path {
            "/healthz" => Response::text(Status::Ok, "ok\n"),
            "/readyz" => Response::readiness(false),
            "/metrics" => Response::metrics("m 1\n".to_owned()),
            _ => Response::not_found(),
        }));
        assert_eq!(
            get(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        assert!(get(addr, b"GET /readyz HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert_eq!(
            get(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 4\r\nConnection: close\r\n\r\nm 1\n"
        );
        assert!(get(addr, b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404 Not Found\r\n"));
        server.abort();
    }

    #[tokio::test]
    async fn a_head_in_pieces_and_an_oversized_head_are_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, |path: &str| {
            Response::text(Status::Ok, format!("[{path}]"))
        }));
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /hea").await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        conn.write_all(b"lthz HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("read");
        assert!(response.ends_with("[/healthz]"), "{response}");
        // A head that fills the buffer without ending: answered from what was read.
        let mut huge = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD, b'a');
        assert!(get(addr, &huge).await.ends_with("[/x]"));
        // No request line at all: the empty path.
        assert!(get(addr, b"\r\n\r\n").await.ends_with("[]"));
        server.abort();
    }
}
