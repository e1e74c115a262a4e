//! The control API's client side: one call over the unix socket, and the readable status table.

use std::{fmt::Write, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::http;

/// The agent refused the call as bad input (HTTP 4xx): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// Sends one request to the agent at `api` (`unix:/path`) and returns the JSON answer.
pub async fn call(api: &str, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let Some(socket) = api.strip_prefix("unix:") else {
        return Err(BadRequest(format!("--api {api:?}: expected unix:/path/to/api.sock")).into());
    };
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.with_context(|| {
            format!("connecting to the agent at {socket} (is `lb-agent run` running? --api selects another socket)")
        })?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()?
            .unwrap_or_default();
        http::exchange(&mut stream, method, path, &body).await
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .context("the agent did not answer within 30 s")??;
    let value: Value = serde_json::from_slice(&body)
        .with_context(|| format!("the agent answered {status} with a body that is not JSON"))?;
    match status {
        200 => Ok(value),
        400..=499 => Err(BadRequest(error_text(&value)).into()),
        _ => bail!("the agent answered {status}: {}", error_text(&value)),
    }
}

fn error_text(v: &Value) -> String {
    v["error"]
        .as_str()
        .map_or_else(|| v.to_string(), String::from)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The status as tables: listeners, then each group with its targets.
pub fn status_table(status: &Value) -> String {
    let mut o = String::new();
    let empty = Vec::new();
    let _ = writeln!(
        o,
        "{:<16} {:<40} {:<9} {:<8} ALLOWED SOURCES",
        "LISTENER", "ADDRESS", "PROTOCOL", "GROUP"
    );
    for l in status["listeners"].as_array().unwrap_or(&empty) {
        let addr = match l["address"].as_str() {
            Some(a) if a.contains(':') => format!("[{a}]:{}", l["port"]),
            Some(a) => format!("{a}:{}", l["port"]),
            None => "-".into(),
        };
        let sources: Vec<String> = l["allowed_sources"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(s)
            .collect();
        let _ = writeln!(
            o,
            "{:<16} {:<40} {:<9} {:<8} {}",
            s(&l["name"]),
            addr,
            s(&l["protocol"]),
            s(&l["target_group"]),
            sources.join(",")
        );
    }
    for g in status["target_groups"].as_array().unwrap_or(&empty) {
        let hc = &g["health_check"];
        let _ = writeln!(
            o,
            "\nGROUP {}{}  (check: {} port {} every {}, timeout {}, healthy {} / unhealthy {})",
            s(&g["name"]),
            if g["fail_open"].as_bool() == Some(true) {
                "  FAIL-OPEN: no healthy target, new flows go to all"
            } else {
                ""
            },
            s(&hc["protocol"]),
            s(&hc["port"]),
            s(&hc["interval"]),
            if hc["timeout"].is_null() {
                "default".into()
            } else {
                s(&hc["timeout"])
            },
            s(&hc["healthy_threshold"]),
            s(&hc["unhealthy_threshold"]),
        );
        let _ = writeln!(
            o,
            "  {:<44} {:>6} {:<10} {:<32} {:<9} LAST CHECK",
            "TARGET", "WEIGHT", "STATE", "REASON", "NEW FLOWS"
        );
        for t in g["targets"].as_array().unwrap_or(&empty) {
            let last = &t["last_check"];
            let check = if last.is_null() {
                "-".to_string()
            } else {
                let detail = last["detail"]
                    .as_str()
                    .filter(|d| !d.is_empty())
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                format!(
                    "{} {:.1} ms{detail}",
                    s(&last["result"]),
                    last["latency_ms"].as_f64().unwrap_or(0.0)
                )
            };
            let _ = writeln!(
                o,
                "  {:<44} {:>6} {:<10} {:<32} {:<9} {}",
                s(&t["target"]),
                s(&t["weight"]),
                s(&t["state"]),
                s(&t["reason"]),
                if t["receives_new_flows"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                check
            );
        }
    }
    let dp = &status["datapath"];
    let _ = writeln!(
        o,
        "\n{:<16} {:>7} {:<8} {:<13} ROLE DECIDED BY",
        "INTERFACE", "IFINDEX", "XDP", "FACES TARGETS"
    );
    for i in dp["interfaces"].as_array().unwrap_or(&empty) {
        let routed = i["targets_routed"]
            .as_u64()
            .map(|n| format!(" ({n} target address(es) routed here)"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<16} {:>7} {:<8} {:<13} {}{routed}",
            s(&i["name"]),
            s(&i["ifindex"]),
            s(&i["mode"]),
            match i["faces_targets"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            s(&i["role"]),
        );
    }
    let _ = writeln!(o, "pinned at {}", s(&dp["pin_path"]));
    let cache = &dp["route_cache"];
    match cache["enabled"].as_bool() {
        Some(true) => {
            let _ = writeln!(o, "next-hop cache: on (route epoch {})", s(&cache["epoch"]));
        }
        Some(false) => {
            let _ = writeln!(o, "next-hop cache: off ({})", s(&cache["reason"]));
        }
        None => {}
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_each_interface_role() {
        let status = serde_json::json!({
            "listeners": [], "target_groups": [],
            "datapath": {"pin_path": "/sys/fs/bpf/lb", "interfaces": [
                {"name": "eth0", "ifindex": 3, "mode": "native", "faces_targets": false,
                 "role_source": "routes", "role": "derived: routes to the targets", "targets_routed": 0},
                {"name": "eth1", "ifindex": 4, "mode": "native", "faces_targets": true,
                 "role_source": "routes", "role": "derived: routes to the targets", "targets_routed": 3},
            ], "route_cache": {"enabled": false, "reason": "policy routing: IPv4 rule 100: from 10.0.1.3/32 lookup 100", "epoch": 0}},
        });
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
}
