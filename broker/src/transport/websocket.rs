//! MQTT over WebSocket: the HTTP upgrade (path and `mqtt` subprotocol) and an adapter that
//! turns binary WebSocket messages back into the MQTT byte stream.
//!
//! MQTT packets may span messages and one message may hold several packets, so the adapter
//! is a plain byte stream: each received binary message is read out in order, and each
//! write becomes one binary message. Text messages are a protocol violation (MQTT 5.0
//! §6.0) and close the connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Subprotocols we answer, in order of preference (`mqttv3.1` is what MQTT 3.1 clients offer).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// WebSocket settings for one connection: small eager read buffer (thousands of idle
/// connections), frames and messages no larger than an MQTT packet allows.
pub fn config(max_packet_size: u32) -> WebSocketConfig {
    // A message may carry a whole packet plus the start of the next one.
    let max = max_packet_size as usize + 64 * 1024;
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_frame_size(Some(max))
        .max_message_size(Some(max))
}

/// Performs the server side of the upgrade on `stream`.
pub async fn accept<S>(stream: S, path: &str, max_packet_size: u32) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = path.to_owned();
    // The error type is tungstenite's (an HTTP response), not ours to make smaller.
    #[allow(clippy::result_large_err)]
    let callback = move |request: &Request, mut response: Response| {
        if request.uri().path() != path {
            let mut refusal = ErrorResponse::new(Some("not found".to_owned()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        if let Some(chosen) = choose_subprotocol(request) {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        }
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(config(max_packet_size)),
    )
    .await?;
    Ok(WsStream {
        ws,
        read: Bytes::new(),
    })
}

/// The subprotocol to answer with. A client that offers none still gets a connection
/// (some embedded clients don't send the header); one that offers only others gets none
/// selected, and a browser will then drop the connection itself.
fn choose_subprotocol(request: &Request) -> Option<&'static str> {
    let offered: Vec<String> = request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .collect();
    SUBPROTOCOLS
        .into_iter()
        .find(|p| offered.iter().any(|o| o == p))
}

/// A WebSocket connection seen as the MQTT byte stream it carries.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The rest of the last binary message received.
    read: Bytes,
}

fn io_error(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.read.is_empty() {
                let n = self.read.len().min(buf.remaining());
                buf.put_slice(&self.read[..n]);
                self.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Ping/Pong are answered by tungstenite itself; empty messages carry nothing.
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                Some(Ok(Message::Binary(data))) => self.read = data,
                Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT needs binary messages",
                    )))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    async fn pair(
        offered: Option<&str>,
        path: &str,
    ) -> (
        Result<WsStream<tokio::io::DuplexStream>, WsError>,
        Result<
            (
                WebSocketStream<tokio::io::DuplexStream>,
                tokio_tungstenite::tungstenite::handshake::client::Response,
            ),
            WsError,
        >,
    ) {
        let (server, client) = tokio::io::duplex(1 << 20);
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .expect("request");
        if let Some(offered) = offered {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(offered).expect("header"),
            );
        }
        tokio::join!(
            accept(server, "/mqtt", 1024),
            tokio_tungstenite::client_async(request, client)
        )
    }

    #[tokio::test]
    async fn upgrade_selects_mqtt_and_carries_bytes_both_ways() {
        let (server, client) = pair(Some("mqttv3.1, mqtt"), "/mqtt").await;
        let mut server = server.expect("server side");
        let (mut client, response) = client.expect("client side");
        assert_eq!(
            response.headers().get("Sec-WebSocket-Protocol"),
            Some(&HeaderValue::from_static("mqtt"))
        );
        // One packet split over two messages, then two packets in one message.
        client
            .send(Message::Binary(Bytes::from_static(&[0xc0])))
            .await
            .expect("send");
        client
            .send(Message::Binary(Bytes::new()))
            .await
            .expect("send");
        client
            .send(Message::Binary(Bytes::from_static(&[0x00, 0xe0, 0x00])))
            .await
            .expect("send");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(got, [0xc0, 0x00, 0xe0, 0x00]);
        server.write_all(&[0xd0, 0x00]).await.expect("write");
        server.flush().await.expect("flush");
        let message = client.next().await.expect("message").expect("ok");
        assert_eq!(message, Message::Binary(Bytes::from_static(&[0xd0, 0x00])));
        // A text message ends the stream with an error.
        client
            .send(Message::Text("hello".into()))
            .await
            .expect("send");
        let err = server.read(&mut got).await.expect_err("text is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn wrong_path_is_refused() {
        let (server, client) = pair(Some("mqtt"), "/other").await;
        assert!(server.is_err());
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_buffering() {
        let (server, client) = pair(None, "/mqtt").await;
        let mut server = server.expect("server side");
        let (mut client, response) = client.expect("client side");
        assert!(response.headers().get("Sec-WebSocket-Protocol").is_none());
        let big = Bytes::from(vec![0u8; 1024 + 64 * 1024 + 1]);
        let (_, read) = tokio::join!(client.send(Message::Binary(big)), async {
            let mut buf = [0u8; 16];
            server.read(&mut buf).await
        });
        assert!(read.is_err(), "{read:?}");
    }
}
