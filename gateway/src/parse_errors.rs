//! Problem+json for the requests hyper refuses before the router sees them.
//!
//! A request hyper cannot parse (a NUL in a header, a malformed request line), or one past its
//! limits (too many or too large headers, a URI too long), is answered by hyper itself, with
//! `connection: close`, `content-length: 0` and no body, and the connection is closed. Every
//! other error of this API is problem+json, so [`ProblemListener`] hands hyper connections
//! whose writes are watched: hyper's bodiless error head, which begins exactly
//! `HTTP/1.1 <4xx or 5xx> <reason>\r\nconnection: close\r\ncontent-length: 0\r\n` (a response of
//! the router always names its content type first, and has a body), is rewritten into the same
//! status with a problem+json body. Nothing else is touched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::StatusCode;
use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::error::Problem;

/// A [`TcpListener`] whose connections answer hyper's own refusals as problem+json.
pub struct ProblemListener(pub TcpListener);

impl Listener for ProblemListener {
    type Io = ProblemIo<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, address) = Listener::accept(&mut self.0).await;
        (
            ProblemIo {
                inner: stream,
                rewritten: Vec::new(),
                written: 0,
            },
            address,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection whose hyper error heads are rewritten on their way out.
pub struct ProblemIo<T> {
    inner: T,
    /// A rewritten response still to be sent, and how much of it was.
    rewritten: Vec<u8>,
    written: usize,
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    /// Sends what is left of a rewritten response.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.rewritten.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.rewritten[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.rewritten.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        if let Some((head_len, rewritten)) = rewrite(buf) {
            self.rewritten = rewritten;
            // The head counts as written once its replacement is queued; the replacement goes
            // out now as far as the socket takes it, and the rest on the next write or flush.
            if let Poll::Ready(Err(error)) = self.poll_drain(cx) {
                return Poll::Ready(Err(error));
            }
            return Poll::Ready(Ok(head_len));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When `buf` starts with hyper's bodiless error head, the head's length and the response to
/// send instead.
fn rewrite(buf: &[u8]) -> Option<(usize, Vec<u8>)> {
    const PREFIX: &[u8] = b"HTTP/1.1 ";
    const HYPER_HEADERS: &[u8] = b"connection: close\r\ncontent-length: 0\r\n";
    let rest = buf.strip_prefix(PREFIX)?;
    let status_line_end = rest.windows(2).position(|w| w == b"\r\n")?;
    let code: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    if status.as_u16() < 400 {
        return None;
    }
    let headers = &rest[status_line_end + 2..];
    let after = headers.strip_prefix(HYPER_HEADERS)?;
    let head_end = after
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)?;
    // The headers hyper added after `content-length` (its `date`), and the blank line.
    let trailing = &after[..head_end];
    let head_len = PREFIX.len() + status_line_end + 2 + HYPER_HEADERS.len() + head_end;
    let body = problem(status);
    let mut out = Vec::with_capacity(head_len + body.len() + 64);
    out.extend_from_slice(&buf[..PREFIX.len() + status_line_end + 2]);
    out.extend_from_slice(b"content-type: application/problem+json\r\nconnection: close\r\n");
    out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    out.extend_from_slice(trailing);
    out.extend_from_slice(&body);
    Some((head_len, out))
}

/// The problem+json body for a status hyper answered on its own.
fn problem(status: StatusCode) -> Vec<u8> {
    let (code, detail) = match status {
        StatusCode::BAD_REQUEST => (
            "malformed_request",
            "the request is not valid HTTP/1.1: a malformed request line, or a header name or \
             value with a forbidden character",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request's headers are too many or too large",
        ),
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request's URI is too long"),
        StatusCode::REQUEST_TIMEOUT => (
            "request_timeout",
            "the request's headers did not arrive in time",
        ),
        StatusCode::HTTP_VERSION_NOT_SUPPORTED => (
            "http_version_not_supported",
            "this server speaks HTTP/1.0, HTTP/1.1 and HTTP/2",
        ),
        _ => ("malformed_request", "the request could not be read"),
    };
    let problem = Problem::new(status, code, detail.to_owned());
    serde_json::to_vec(&problem).expect("problems serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(response: &[u8]) -> (String, serde_json::Value) {
        let text = std::str::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), serde_json::from_str(body).unwrap())
    }

    #[test]
    fn hypers_bodiless_error_becomes_problem_json_of_the_same_status() {
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                       content-length: 0\r\ndate: Mon, 30 Nov 2026 10:23:16 GMT\r\n\r\n";
        let (head_len, out) = rewrite(canned).unwrap();
        assert_eq!(head_len, canned.len());
        let (head, body) = parse(&out);
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("content-type: application/problem+json"));
        assert!(head.contains("date: Mon, 30 Nov 2026"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, serde_json::to_vec(&body).unwrap().len());
        assert_eq!(body["status"], 431);
        assert_eq!(body["code"], "headers_too_large");
    }

    #[test]
    fn responses_of_the_router_pass_untouched() {
        for response in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"{\"partial\": \"body\"}",
        ] {
            assert!(rewrite(response).is_none(), "{response:?}");
        }
    }

    #[tokio::test]
    async fn a_rewritten_response_is_sent_whole_through_a_socket_that_takes_little_at_a_time() {
        let canned = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                       date: Mon, 30 Nov 2026 10:23:16 GMT\r\n\r\n";
        let (client, mut server) = tokio::io::duplex(7);
        let mut io = ProblemIo {
            inner: client,
            rewritten: Vec::new(),
            written: 0,
        };
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut server, &mut all)
                .await
                .unwrap();
            all
        });
        tokio::io::AsyncWriteExt::write_all(&mut io, canned)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut io).await.unwrap();
        drop(io);
        let (head, body) = parse(&reader.await.unwrap());
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert_eq!(body["code"], "malformed_request");
    }
}
