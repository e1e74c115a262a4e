//! The control API's requests and answers: the one definition the agent's server, the CLI and
//! the tests share. Their JSON names are a contract (docs/config.md, "Control API"): fields
//! are only ever added.
//!
//! Requests refuse unknown fields (a misspelt `wieght` is an error, not a default); answers
//! accept them, so an older client reads a newer agent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Cidr, HealthCheckConfig, Protocol},
    health::{Reason, TargetState},
    model::Origin,
    route_epoch::RouteCacheStatus,
    state::{RoleSource, ZoneScope},
};

/// `GET /v1/status`.
pub const STATUS: &str = "/v1/status";
/// `POST /v1/plan`, body [`PlanRequest`], answer [`Plan`]: what a config would change.
pub const PLAN: &str = "/v1/plan";
/// `POST /v1/targets/register`, body [`TargetRequest`], answer [`TargetReply`].
pub const REGISTER: &str = "/v1/targets/register";
/// `POST /v1/targets/deregister`, body [`TargetRequest`] (`weight`, `zone` ignored), answer
/// [`TargetReply`].
pub const DEREGISTER: &str = "/v1/targets/deregister";
/// `POST /v1/reload`, no body, answer [`ReloadReply`].
pub const RELOAD: &str = "/v1/reload";
/// `GET /metrics`: the metrics page (OpenMetrics text).
pub const METRICS: &str = "/metrics";
/// `lb-agent drain`: POST starts (or cancels) draining, GET reports its progress.
pub const DRAIN: &str = "/v1/drain";

/// A target to register or deregister.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    pub group: String,
    /// `ADDR:PORT` (`[v6]:port` for IPv6).
    pub target: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
}

fn default_weight() -> u32 {
    config::DEFAULT_WEIGHT
}

/// A registration or deregistration that the maps follow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetReply {
    pub ok: bool,
    /// `group/addr:port`.
    pub target: String,
    /// How long writing the maps took.
    pub maps_written_ms: f64,
}

/// A reload that applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub ok: bool,
    /// The new config in one line.
    pub summary: String,
    /// `[agent]` keys left for the next start, and the like.
    #[serde(default)]
    pub notes: Vec<String>,
    /// How long writing the maps took; null when the write failed (the agent retries).
    pub maps_written_ms: Option<f64>,
}

/// Every answer that is not a 2xx.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `POST /v1/plan`: the config to preview (its text: the agent may not see the caller's
/// files), or none for the agent's own config file (`reload --dry-run`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    #[serde(default)]
    pub config: Option<String>,
    /// The file's name in error messages.
    #[serde(default)]
    pub path: Option<String>,
}

/// What a config would change if the agent reloaded it now (nothing is changed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The config previewed.
    pub config: String,
    /// What a reload would leave for the next start (`[agent]` keys).
    pub notes: Vec<String>,
    pub groups: Vec<GroupPlan>,
    /// Live flows counted in the flow table (not closing).
    pub live_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupPlan {
    pub name: String,
    /// `added`, `removed`, `changed` (its table or a target's fate) or `unchanged`.
    pub change: String,
    pub table_size_before: u32,
    pub table_size_after: u32,
    /// Table slots whose target changes (all of them when the group appears, goes, or its
    /// table size changes): the share of new flows that would go elsewhere.
    pub slots_moved: u64,
    pub share_moved: f64,
    /// Live flows whose target is removed (its flows end), terminated (rescheduled: TCP
    /// clients get a reset), or starts draining (its flows go on until the delay ends).
    pub flows_removed: u64,
    pub flows_terminated: u64,
    pub flows_draining: u64,
    pub targets: Vec<TargetPlan>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetPlan {
    pub target: SocketAddr,
    /// Its share of the group's table (of new flows), now and after.
    pub share_before: f64,
    pub share_after: f64,
    pub starts_new_flows: bool,
    pub stops_new_flows: bool,
    /// `stays`, `added`, `draining`, `removed` or `terminated`.
    pub fate: String,
    /// Its live flows now.
    pub live_flows: u64,
}

/// `GET /v1/status`: what `lb-agent status --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This node's zone (`agent.zone`); null when it has none.
    #[serde(default)]
    pub zone: Option<String>,
    pub listeners: Vec<ListenerStatus>,
    pub target_groups: Vec<GroupStatus>,
    pub datapath: DatapathStatus,
    /// The VIPs announced over BGP through BIRD (`[announce]`); null when it is off.
    #[serde(default)]
    pub announce: Option<AnnounceStatus>,
}

/// What this node announces, as BIRD reports it (`lb_vip_announced` and friends).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    pub bird_socket: String,
    /// The file of the VIPs' static protocols BIRD includes.
    pub bird_config: String,
    /// null while the agent talks to BIRD; else why it cannot (it retries every second).
    pub bird_error: Option<String>,
    /// `lb-agent drain` withdrew every VIP.
    pub draining: bool,
    /// The VIPs, then the return routes (`announce.return_routes`).
    pub routes: Vec<RouteAnnouncement>,
    /// BIRD's BGP and BFD protocols (`show protocols`).
    pub sessions: Vec<BgpSession>,
    /// When BIRD last confirmed a VIP announced or withdrawn (RFC 3339).
    pub last_change: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteAnnouncement {
    /// `198.18.100.10/32`, `0.0.0.0/0`.
    pub prefix: String,
    /// vip | return.
    pub kind: String,
    /// Its static protocol in BIRD.
    pub protocol: String,
    /// What the agent wants: a VIP announced while a listener of it can serve, a return route
    /// while the node runs and does not drain.
    pub wanted: bool,
    /// Why: serving | fail_open | checking | no_target | draining | stopping.
    pub reason: String,
    /// What BIRD says (its protocol up); null when not known (BIRD not reachable).
    pub announced: Option<bool>,
    /// When BIRD confirmed the last change (RFC 3339).
    pub since: Option<String>,
}

/// One of BIRD's protocols as `show protocols` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    pub name: String,
    /// BGP or BFD.
    pub protocol: String,
    /// up | down | start | …
    pub state: String,
    /// BIRD's info column (Established, Active, Connect, …).
    pub info: String,
    /// BIRD's since column.
    pub since: String,
}

/// `POST /v1/drain`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Announce again (end a drain).
    #[serde(default)]
    pub cancel: bool,
}

/// A drain's progress (`POST` and `GET /v1/drain`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    pub draining: bool,
    /// When the drain began (RFC 3339).
    pub since: Option<String>,
    pub elapsed_s: f64,
    /// BIRD confirmed every VIP withdrawn.
    pub withdrawn: bool,
    /// From the drain command to BIRD's confirmation.
    pub withdrawn_after_ms: Option<f64>,
    /// Over the last second: client packets to the VIPs still arriving, replies reverse-NATed,
    /// flow-table entries created.
    pub client_packets_per_s: u64,
    pub reply_packets_per_s: u64,
    pub new_flows_per_s: u64,
    /// Since the last client packet to a VIP reached this node.
    pub quiet_for_s: f64,
    /// `announce.drain_timeout`: how long `lb-agent drain` waits by default.
    pub timeout_s: f64,
    /// Withdrawn, and no client packet for `DRAIN_QUIET_S` (the router sends nothing here any more):
    /// the node can stop.
    pub done: bool,
}

/// A drain is done when no client packet arrived for this long after the withdrawal.
pub const DRAIN_QUIET_S: f64 = 1.0;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub target_group: String,
    pub allowed_sources: Vec<Cidr>,
    /// The listener's counters; null when its statistics could not be read.
    #[serde(default)]
    pub traffic: Option<Traffic>,
}

/// A listener's traffic since its data plane started (`lb_packets_total` and friends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Client → target.
    pub packets_in: u64,
    /// Target → client.
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Flow-table entries created.
    pub new_flows: u64,
    /// Flows seen at the last sweep of the flow table.
    pub active_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    /// No healthy target: new flows go to all its non-draining targets.
    pub fail_open: bool,
    /// Its effective `cross_zone` (the group's, else `agent.cross_zone`).
    #[serde(default)]
    pub cross_zone: bool,
    /// Which zones its new flows go to: `all`, `local` (this node's zone), or `fallback`
    /// (this node's zone has no healthy target: every zone's).
    #[serde(default = "all_zones")]
    pub zone_scope: ZoneScope,
    pub health_check: HealthCheckConfig,
    pub targets: Vec<TargetStatus>,
}

fn all_zones() -> ZoneScope {
    ZoneScope::All
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// `addr:port` (`[v6]:port`).
    pub target: SocketAddr,
    pub weight: u32,
    pub zone: Option<String>,
    pub origin: Origin,
    pub state: TargetState,
    pub reason: Option<Reason>,
    /// In its group's table: new flows may go to it.
    pub receives_new_flows: bool,
    /// Null until its first check.
    pub last_check: Option<LastCheck>,
    /// What its traffic says of it (TCP): null when the counters cannot be read.
    #[serde(default)]
    pub passive: Option<PassiveSignals>,
}

/// A target's passive health signals, from the data path (`lb_target_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassiveSignals {
    /// Flows scheduled to it.
    pub new_flows: u64,
    /// Connections it answered (SYN-ACK seen).
    pub answered: u64,
    /// Connections it reset (an RST from it).
    pub resets: u64,
    /// Connections whose SYN the client sent again before it answered.
    pub syns_unanswered: u64,
    /// Connections it refused (an RST before any SYN-ACK).
    pub refused: u64,
    /// Connections that failed (refused or unanswered) since its last answered one.
    pub failures_in_a_row: u64,
    /// Times passive health made it unhealthy since the agent started.
    pub ejections: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastCheck {
    /// `pass`, or why it failed (the `result` label of `lb_health_checks_total`).
    pub result: String,
    pub detail: String,
    pub latency_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub pin_path: PathBuf,
    pub interfaces: Vec<InterfaceStatus>,
    pub maps: MapsStatus,
    pub route_cache: RouteCacheStatus,
    /// Packets the data path dropped, by reason (`lb_dropped_packets_total`); empty when the
    /// counters could not be read.
    #[serde(default)]
    pub drops: Vec<Drops>,
    /// The access log (`agent.access_log`); null when it is off.
    #[serde(default)]
    pub access_log: Option<AccessLogStatus>,
}

/// The access log's counters since the agent started (`lb_access_log_*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessLogStatus {
    pub path: String,
    /// Records written, by close reason.
    pub records: BTreeMap<String, u64>,
    /// Records that could not be written (the file could not be opened or written).
    pub write_errors: u64,
    /// Flow starts and ends the data path could not send (its ring buffer was full), since
    /// the data plane was loaded; null when the counters could not be read.
    pub events_lost: Option<u64>,
    /// Logged flows whose start was seen and whose end was not yet.
    pub open_flows: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    pub reason: String,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// The XDP mode it is attached in.
    pub mode: String,
    /// Times XDP was attached afresh (the interface was made again).
    pub reattachments: u64,
    pub faces_targets: bool,
    pub role_source: RoleSource,
    /// How the role was decided, in words.
    pub role: String,
    /// Target addresses the kernel routes out of it, when routes decide the roles.
    pub targets_routed: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsStatus {
    pub in_sync: bool,
    pub entries_in_doubt: u64,
    pub tables_building: bool,
    pub failed_reconciliations: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            zone: None,
            announce: None,
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "198.18.100.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                target_group: "web".into(),
                allowed_sources: vec!["0.0.0.0/0".parse().unwrap()],
                traffic: Some(Traffic {
                    packets_in: 1,
                    packets_out: 2,
                    bytes_in: 3,
                    bytes_out: 4,
                    new_flows: 5,
                    active_flows: 6,
                }),
            }],
            target_groups: vec![GroupStatus {
                name: "web".into(),
                fail_open: false,
                cross_zone: false,
                zone_scope: crate::state::ZoneScope::All,
                health_check: HealthCheckConfig::default(),
                targets: vec![TargetStatus {
                    target: "[fd00::1]:8080".parse().unwrap(),
                    weight: 100,
                    zone: None,
                    origin: Origin::Api,
                    state: TargetState::Healthy,
                    reason: None,
                    receives_new_flows: true,
                    last_check: Some(LastCheck {
                        result: "pass".into(),
                        detail: String::new(),
                        latency_ms: 0.5,
                    }),
                    passive: Some(PassiveSignals {
                        new_flows: 10,
                        answered: 9,
                        resets: 1,
                        syns_unanswered: 0,
                        refused: 1,
                        failures_in_a_row: 1,
                        ejections: 0,
                    }),
                }],
            }],
            datapath: DatapathStatus {
                pin_path: "/sys/fs/bpf/lb".into(),
                interfaces: vec![InterfaceStatus {
                    name: "eth0".into(),
                    ifindex: 3,
                    mode: "native".into(),
                    reattachments: 0,
                    faces_targets: true,
                    role_source: RoleSource::OneArm,
                    role: RoleSource::OneArm.describe().into(),
                    targets_routed: None,
                }],
                maps: MapsStatus {
                    in_sync: true,
                    entries_in_doubt: 0,
                    tables_building: false,
                    failed_reconciliations: 0,
                    last_error: None,
                },
                route_cache: RouteCacheStatus::default(),
                drops: vec![Drops {
                    reason: "not_allowed".into(),
                    packets: 7,
                }],
                access_log: Some(AccessLogStatus {
                    path: "/var/log/lb-agent/access.log".into(),
                    records: [("fin".to_string(), 9), ("rst".to_string(), 1)].into(),
                    write_errors: 0,
                    events_lost: Some(0),
                    open_flows: 3,
                }),
            },
        }
    }

    /// The documented names (docs/config.md, "Control API"), read the way scripts read them.
    #[test]
    fn status_json_keeps_the_documented_names() {
        let v = serde_json::to_value(status()).unwrap();
        let l = &v["listeners"][0];
        assert_eq!(l["address"], "198.18.100.10");
        assert_eq!(l["port"], 80);
        assert_eq!(l["protocol"], "tcp");
        assert_eq!(l["target_group"], "web");
        assert_eq!(l["allowed_sources"][0], "0.0.0.0/0");
        let traffic = &l["traffic"];
        for (k, n) in [
            ("packets_in", 1),
            ("packets_out", 2),
            ("bytes_in", 3),
            ("bytes_out", 4),
            ("new_flows", 5),
            ("active_flows", 6),
        ] {
            assert_eq!(traffic[k], n, "traffic.{k}");
        }
        let g = &v["target_groups"][0];
        assert_eq!(g["name"], "web");
        assert_eq!(g["fail_open"], false);
        assert_eq!(g["health_check"]["interval"], "30s");
        assert!(g["health_check"]["timeout"].is_null());
        let t = &g["targets"][0];
        assert_eq!(t["target"], "[fd00::1]:8080");
        assert_eq!(t["weight"], 100);
        assert!(t["zone"].is_null());
        assert_eq!(t["origin"], "api");
        assert_eq!(t["state"], "healthy");
        assert!(t["reason"].is_null());
        assert_eq!(t["receives_new_flows"], true);
        assert_eq!(t["last_check"]["result"], "pass");
        assert_eq!(t["last_check"]["detail"], "");
        assert_eq!(t["last_check"]["latency_ms"], 0.5);
        let dp = &v["datapath"];
        assert_eq!(dp["pin_path"], "/sys/fs/bpf/lb");
        let i = &dp["interfaces"][0];
        assert_eq!(i["name"], "eth0");
        assert_eq!(i["ifindex"], 3);
        assert_eq!(i["mode"], "native");
        assert_eq!(i["reattachments"], 0);
        assert_eq!(i["faces_targets"], true);
        assert_eq!(i["role_source"], "one_arm");
        assert_eq!(i["role"], "derived: one interface (one-arm)");
        assert!(i["targets_routed"].is_null());
        let m = &dp["maps"];
        assert_eq!(m["in_sync"], true);
        assert_eq!(m["entries_in_doubt"], 0);
        assert_eq!(m["tables_building"], false);
        assert_eq!(m["failed_reconciliations"], 0);
        assert!(m["last_error"].is_null());
        let rc = &dp["route_cache"];
        assert_eq!(rc["enabled"], false);
        assert!(rc["reason"].is_null());
        assert_eq!(rc["epoch"], 0);
        assert_eq!(rc["changes"], 0);
        assert_eq!(dp["drops"][0]["reason"], "not_allowed");
        assert_eq!(dp["drops"][0]["packets"], 7);
    }

    #[test]
    fn status_reads_back_what_it_wrote() {
        let s = status();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), s);
    }

    #[test]
    fn target_request_defaults_and_refuses_unknown_fields() {
        let r: TargetRequest =
            serde_json::from_str(r#"{"group":"web","target":"10.0.0.1:80"}"#).unwrap();
        assert_eq!(r.weight, config::DEFAULT_WEIGHT);
        assert_eq!(r.zone, None);
        let e = serde_json::from_str::<TargetRequest>(
            r#"{"group":"web","target":"10.0.0.1:80","wieght":5}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `wieght`"), "{e}");
    }
}
