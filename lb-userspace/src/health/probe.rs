//! TCP and HTTP probes. Each probe is bounded by its timeout end to end, and an HTTP probe reads
//! at most `MAX_RESPONSE_HEAD` bytes: the status line and headers, never the body.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

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
    /// Connects, sends the request and reads the response head; the status code.
    async fn exchange(&self) -> Result<u16, Outcome> {
        let mut stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| connect_failed(&e))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-agent/{} health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path,
            self.addr,
            env!("CARGO_PKG_VERSION")
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| failed(format!("sending the request: {e}")))?;
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 2048];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| failed(format!("reading the response: {e}")))?;
            if n == 0 {
                return Err(failed(format!(
                    "connection closed after {} bytes, before the response head ended",
                    head.len()
                )));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&head, b"\r\n\r\n") {
                return parse_status(&head[..end]);
            }
            if head.len() > MAX_RESPONSE_HEAD {
                return Err(failed(format!(
                    "response head longer than {MAX_RESPONSE_HEAD} bytes"
                )));
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(head: &[u8]) -> Result<u16, Outcome> {
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    match (
        version.starts_with("HTTP/1."),
        code.len() == 3,
        code.parse::<u16>(),
    ) {
        (true, true, Ok(status)) if (100..=599).contains(&status) => Ok(status),
        _ => Err(failed(format!("not an HTTP/1.x status line: {line:?}"))),
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
