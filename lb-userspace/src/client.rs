//! The control API's client side: typed calls over the unix socket (hyper's HTTP/1 client), and
//! the readable status table.

use std::{fmt::Write, path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Bytes,
    header::{CONTENT_TYPE, HOST},
    Method, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};

use crate::api::{
    self, ApiError, DrainRequest, DrainStatus, Plan, PlanRequest, ReloadReply, Status, TargetReply,
    TargetRequest,
};

/// The agent refused the call as bad input (HTTP 4xx): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// How long a call may take, connecting included.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// The largest answer read (a status of thousands of targets is a few MiB).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// The running agent's control API, as `--api` names it (`unix:/path/to/api.sock`).
#[derive(Clone, Debug)]
pub struct Api {
    socket: PathBuf,
}

impl Api {
    pub fn new(api: &str) -> Result<Self> {
        match api.strip_prefix("unix:") {
            Some(socket) if !socket.is_empty() => Ok(Self {
                socket: socket.into(),
            }),
            _ => Err(BadRequest(format!("--api {api:?}: expected unix:/path/to/api.sock")).into()),
        }
    }

    pub async fn status(&self) -> Result<Status> {
        self.call(Method::GET, api::STATUS, None::<&()>).await
    }

    pub async fn register(&self, target: &TargetRequest) -> Result<TargetReply> {
        self.call(Method::POST, api::REGISTER, Some(target)).await
    }

    pub async fn deregister(&self, target: &TargetRequest) -> Result<TargetReply> {
        self.call(Method::POST, api::DEREGISTER, Some(target)).await
    }

    pub async fn reload(&self) -> Result<ReloadReply> {
        self.call(Method::POST, api::RELOAD, None::<&()>).await
    }

    pub async fn plan(&self, request: &PlanRequest) -> Result<Plan> {
        self.call(Method::POST, api::PLAN, Some(request)).await
    }

    pub async fn drain(&self, request: &DrainRequest) -> Result<DrainStatus> {
        self.call(Method::POST, api::DRAIN, Some(request)).await
    }

    pub async fn drain_status(&self) -> Result<DrainStatus> {
        self.call(Method::GET, api::DRAIN, None::<&()>).await
    }

    /// One call with a typed answer: a 4xx is [`BadRequest`] with the agent's message, any
    /// other failure an error.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        let (status, answer) = self.raw(method, path, body).await?;
        if status.is_success() {
            return serde_json::from_slice(&answer).with_context(|| {
                format!(
                    "the agent's answer to {path} is not what this client reads: {}",
                    String::from_utf8_lossy(&answer)
                )
            });
        }
        let message = serde_json::from_slice::<ApiError>(&answer)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&answer).trim().to_string());
        if status.is_client_error() {
            return Err(BadRequest(message).into());
        }
        bail!("the agent answered {status}: {message}")
    }

    /// One request as it is (for tests and tools): the status and the body of the answer.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        tokio::time::timeout(CALL_DEADLINE, self.exchange(method, path, body))
            .await
            .map_err(|_| anyhow!("the agent did not answer within {CALL_DEADLINE:?}"))?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let socket = &self.socket;
        let stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
            format!(
                "connecting to the agent at {} (is `lb-agent run` running? --api selects another socket)",
                socket.display()
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the agent")?;
        // Drives the connection; it ends when `sender` is dropped.
        tokio::spawn(connection);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "lb-agent")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .context("building the request")?;
        let response = sender
            .send_request(request)
            .await
            .context("sending the call to the agent")?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the agent's answer: {e}"))?
            .to_bytes();
        Ok((status, answer))
    }
}

/// A config value in its config-file spelling (`tcp`, `traffic-port`, `10s`).
fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => "-".into(),
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// One line of a drain's progress.
pub fn drain_line(d: &DrainStatus) -> String {
    let withdrawn = match (d.withdrawn, d.withdrawn_after_ms) {
        (true, Some(ms)) => format!("withdrawn (BIRD confirmed {ms:.1} ms after the command)"),
        (true, None) => "withdrawn".into(),
        (false, _) => "withdrawing (BIRD has not confirmed yet)".into(),
    };
    format!(
        "{:6.1} s  {withdrawn}; last second: {} client packets/s, {} replies/s, {} new flows/s; quiet for {:.1} s",
        d.elapsed_s, d.client_packets_per_s, d.reply_packets_per_s, d.new_flows_per_s, d.quiet_for_s
    )
}

/// What is announced through BIRD, and BIRD's sessions.
fn announce_table(o: &mut String, a: &crate::api::AnnounceStatus) {
    let bird = match &a.bird_error {
        None => "talking to BIRD".to_string(),
        Some(e) => format!("BIRD NOT REACHABLE: {e}"),
    };
    let drain = if a.draining { "; DRAINING" } else { "" };
    let _ = writeln!(o, "\nannounce: {bird} at {}{drain}", a.bird_socket);
    let _ = writeln!(
        o,
        "  {:<28} {:<7} {:<7} {:<10} {:<10} SINCE",
        "ROUTE", "KIND", "WANTED", "WHY", "ANNOUNCED"
    );
    for r in &a.routes {
        let _ = writeln!(
            o,
            "  {:<28} {:<7} {:<7} {:<10} {:<10} {}",
            r.prefix,
            r.kind,
            if r.wanted { "yes" } else { "no" },
            r.reason,
            r.announced.map_or("?", |up| if up { "yes" } else { "no" }),
            r.since.as_deref().unwrap_or("-"),
        );
    }
    for s in &a.sessions {
        let _ = writeln!(
            o,
            "  session {} ({}): {} {} since {}",
            s.name, s.protocol, s.state, s.info, s.since
        );
    }
}

/// The status as tables: listeners, then each group with its targets.
pub fn status_table(status: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<16} {:<40} {:<9} {:<8} ALLOWED SOURCES",
        "LISTENER", "ADDRESS", "PROTOCOL", "GROUP"
    );
    for l in &status.listeners {
        let addr = std::net::SocketAddr::new(l.address, l.port).to_string();
        let sources: Vec<String> = l.allowed_sources.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            o,
            "{:<16} {:<40} {:<9} {:<8} {}",
            l.name,
            addr,
            word(&l.protocol),
            l.target_group,
            sources.join(",")
        );
    }
    for g in &status.target_groups {
        let hc = &g.health_check;
        let _ = writeln!(
            o,
            "\nGROUP {}{}  (check: {} port {} every {}, timeout {}, healthy {} / unhealthy {})",
            g.name,
            if g.fail_open {
                "  FAIL-OPEN: no healthy target, new flows go to all"
            } else {
                ""
            },
            word(&hc.protocol),
            word(&hc.port),
            hc.interval,
            hc.timeout
                .map_or_else(|| "default".into(), |t| t.to_string()),
            hc.healthy_threshold,
            hc.unhealthy_threshold,
        );
        let _ = writeln!(
            o,
            "  {:<44} {:>6} {:<10} {:<32} {:<9} LAST CHECK",
            "TARGET", "WEIGHT", "STATE", "REASON", "NEW FLOWS"
        );
        for t in &g.targets {
            let check = match &t.last_check {
                None => "-".to_string(),
                Some(last) => {
                    let detail = if last.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", last.detail)
                    };
                    format!("{} {:.1} ms{detail}", last.result, last.latency_ms)
                }
            };
            let _ = writeln!(
                o,
                "  {:<44} {:>6} {:<10} {:<32} {:<9} {}",
                t.target.to_string(),
                t.weight,
                t.state.to_string(),
                t.reason.map_or("-", |r| r.as_str()),
                if t.receives_new_flows { "yes" } else { "no" },
                check
            );
        }
    }
    if let Some(a) = &status.announce {
        announce_table(&mut o, a);
    }
    let dp = &status.datapath;
    let _ = writeln!(
        o,
        "\n{:<16} {:>7} {:<8} {:<13} ROLE DECIDED BY",
        "INTERFACE", "IFINDEX", "XDP", "FACES TARGETS"
    );
    for i in &dp.interfaces {
        let routed = i
            .targets_routed
            .map(|n| format!(" ({n} target address(es) routed here)"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<16} {:>7} {:<8} {:<13} {}{routed}",
            i.name,
            i.ifindex,
            i.mode,
            if i.faces_targets { "yes" } else { "no" },
            i.role,
        );
    }
    let _ = writeln!(o, "pinned at {}", dp.pin_path.display());
    let cache = &dp.route_cache;
    if cache.enabled {
        let _ = writeln!(o, "next-hop cache: on (route epoch {})", cache.epoch);
    } else {
        let _ = writeln!(
            o,
            "next-hop cache: off ({})",
            cache.reason.as_deref().unwrap_or("-")
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{DatapathStatus, InterfaceStatus, MapsStatus},
        route_epoch::RouteCacheStatus,
        state::RoleSource,
    };

    #[test]
    fn status_shows_each_interface_role() {
        let interface = |name: &str, ifindex, faces_targets, routed| InterfaceStatus {
            name: name.into(),
            ifindex,
            mode: "native".into(),
            reattachments: 0,
            faces_targets,
            role_source: RoleSource::Routes,
            role: RoleSource::Routes.describe().into(),
            targets_routed: Some(routed),
        };
        let status = Status {
            zone: None,
            announce: None,
            listeners: vec![],
            target_groups: vec![],
            datapath: DatapathStatus {
                pin_path: "/sys/fs/bpf/lb".into(),
                interfaces: vec![
                    interface("eth0", 3, false, 0),
                    interface("eth1", 4, true, 3),
                ],
                maps: MapsStatus {
                    in_sync: true,
                    entries_in_doubt: 0,
                    tables_building: false,
                    failed_reconciliations: 0,
                    last_error: None,
                },
                route_cache: RouteCacheStatus {
                    enabled: false,
                    reason: Some(
                        "policy routing: IPv4 rule 100: from 10.0.1.3/32 lookup 100".into(),
                    ),
                    epoch: 0,
                    changes: 0,
                },
                drops: vec![],
                access_log: None,
            },
        };
        let table = status_table(&status);
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} line in\n{table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("eth0"),
            "eth0 3 native no derived: routes to the targets (0 target address(es) routed here)"
        );
        assert!(line("eth1").starts_with("eth1 4 native yes derived"));
        assert!(table.contains("pinned at /sys/fs/bpf/lb"));
        assert!(table.contains(
            "next-hop cache: off (policy routing: IPv4 rule 100: from 10.0.1.3/32 lookup 100)"
        ));
    }

    #[test]
    fn api_names_a_unix_socket() {
        assert!(Api::new("unix:/run/lb-agent/api.sock").is_ok());
        for bad in ["/run/lb-agent/api.sock", "unix:", "127.0.0.1:9900"] {
            let e = Api::new(bad).unwrap_err();
            assert!(e.downcast_ref::<BadRequest>().is_some(), "{bad}: {e:#}");
        }
    }
}
