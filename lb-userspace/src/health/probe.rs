//! TCP and HTTP probes. Each probe is bounded by its timeout end to end, and an HTTP probe (on
//! hyper's client) reads at most `MAX_RESPONSE_HEAD` bytes: the status line and headers, never
//! the body.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use http_body_util::Empty;
use hyper::{body::Bytes, header, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Outcome, Reason};
use crate::config::Matcher;

/// Bytes of status line and headers an HTTP check reads before giving up on the response.
pub const MAX_RESPONSE_HEAD: usize = 8192;

/// One health check of one target.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self) -> impl Future<Output = Outcome> + Send;
    /// What is probed, e.g. `tcp 10.0.0.1:80`.
    fn describe(&self) -> String;
}

/// Passes when a TCP connection is established within `timeout`.
#[derive(Clone, Debug)]
pub struct TcpProbe {
    pub addr: SocketAddr,
    pub timeout: Duration,
}

impl Probe for TcpProbe {
    async fn probe(&self) -> Outcome {
        match tokio::time::timeout(self.timeout, TcpStream::connect(self.addr)).await {
            Err(_) => timed_out(self.timeout, "connect"),
            Ok(Err(e)) => connect_failed(&e),
            Ok(Ok(_stream)) => Outcome::Pass,
        }
    }

    fn describe(&self) -> String {
        format!("tcp {}", self.addr)
    }
}

/// Passes when an HTTP/1.1 `GET path` answers, within `timeout`, with a status `matcher` accepts.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    pub addr: SocketAddr,
    pub timeout: Duration,
    pub path: String,
    pub matcher: Matcher,
}

impl Probe for HttpProbe {
    async fn probe(&self) -> Outcome {
        match tokio::time::timeout(self.timeout, self.exchange()).await {
            Err(_) => timed_out(self.timeout, "response"),
            Ok(Err(outcome)) => outcome,
            Ok(Ok(status)) if self.matcher.matches(status) => Outcome::Pass,
            Ok(Ok(status)) => Outcome::Fail(
                Reason::ResponseCodeMismatch,
                format!("status {status}, expected {}", self.matcher),
            ),
        }
    }

    fn describe(&self) -> String {
        format!("http {}{}", self.addr, self.path)
    }
}

impl HttpProbe {
    /// Connects, sends the request and reads the response head (hyper's HTTP/1 client on one
    /// connection); the status code. The body is never read.
    async fn exchange(&self) -> Result<u16, Outcome> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| connect_failed(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            // As most servers and their logs spell them (`Host:`), not hyper's lower case.
            .title_case_headers(true)
            // The head must fit in this (hyper's smallest read buffer is 8 KiB).
            .max_buf_size(MAX_RESPONSE_HEAD)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("sending the request: {e}")))?;
        // The connection runs as a task of its own until the head is in, and goes when the
        // probe ends (also when its timeout drops it).
        let connection = AbortOnDrop(tokio::spawn(connection));
        let request = Request::get(self.path.as_str())
            .header(header::HOST, self.addr.to_string())
            .header(
                header::USER_AGENT,
                concat!("lb-agent/", env!("CARGO_PKG_VERSION"), " health-check"),
            )
            .header(header::ACCEPT, "*/*")
            .header(header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| failed(format!("path {:?}: {e}", self.path)))?;
        let answer = sender.send_request(request).await;
        drop(connection);
        match answer {
            Ok(response) => Ok(response.status().as_u16()),
            Err(e) if e.is_parse_too_large() => Err(failed(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            ))),
            Err(e) if e.is_parse() => Err(failed(format!("not an HTTP/1.x response: {e}"))),
            Err(e) => Err(failed(format!("reading the response: {e}"))),
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn failed(what: String) -> Outcome {
    Outcome::Fail(Reason::FailedHealthChecks, what)
}

fn timed_out(timeout: Duration, stage: &str) -> Outcome {
    Outcome::Fail(
        Reason::Timeout,
        format!("no {stage} within {}", crate::config::Duration(timeout)),
    )
}

fn connect_failed(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            Outcome::Fail(Reason::ConnectionRefused, "connection refused".into())
        }
        _ => failed(format!("connect: {e}")),
    }
}
