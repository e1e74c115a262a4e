//! Scale-out: the VIPs announced over BGP by BIRD while this node can serve them.
//!
//! The agent does not speak BGP. It gives BIRD one static protocol per VIP (a `/32` or `/128`
//! route) in a file BIRD's config includes (`announce.bird_config`), and turns each protocol on
//! (`enable`) or off (`disable`) over BIRD's control socket: a withdrawal is one command on an
//! open connection, a few milliseconds, where a `configure` would re-read all of BIRD's config.
//! The file always says what the agent last wanted (`disabled yes|no`), so a BIRD restart or an
//! operator's `birdc configure` comes up in the same state; `configure` is sent only when the
//! set of VIPs changes. The operator's BIRD config decides where the routes go (the BGP
//! sessions, BFD, the export filter `proto ~ "lb_vip*"`).
//!
//! `wanted` says what to announce (a pure function of config, targets and the drain); the
//! [`Announcer`] task makes BIRD follow it, reconnecting when BIRD is away, and reports what
//! BIRD confirmed and its BGP sessions for status and metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use birdc::{Client, Connection, Message};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    api::{AnnounceStatus, BgpSession, RouteAnnouncement},
    config::{AnnounceConfig, Cidr, Config},
    health::TargetState,
    model::Model,
    state::zone_scope,
};

#[cfg(test)]
mod tests;

/// Why a VIP is (or is not) announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// No listener's group has a target that could take a new flow.
    NoTarget,
    /// Every target that could serve is still waiting for its first checks.
    Checking,
    /// `lb-agent drain`.
    Draining,
    /// The agent is stopping (without --keep-datapath).
    Stopping,
    /// Fail-open (below), but `announce.fail_open = false`: this node stops attracting flows
    /// it could only send to targets it sees down.
    FailOpenWithdrawn,
    /// No healthy target, but every target was checked: fail-open spreads new flows over all
    /// of them, on every node alike.
    FailOpen,
    /// A healthy target takes new flows.
    Serving,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::NoTarget => "no_target",
            Why::Checking => "checking",
            Why::Draining => "draining",
            Why::Stopping => "stopping",
            Why::FailOpenWithdrawn => "fail_open_withdrawn",
            Why::FailOpen => "fail_open",
            Why::Serving => "serving",
        }
    }

    pub fn announce(self) -> bool {
        matches!(self, Why::Serving | Why::FailOpen)
    }
}

/// What BIRD announces for this node: a VIP (its /32 or /128), or a return route for the
/// targets (`announce.return_routes`: the client networks, usually a default route, whose
/// replies this node reverse-NATs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    Vip(IpAddr),
    Return(Cidr),
}

impl Route {
    pub fn prefix(self) -> Cidr {
        match self {
            Route::Vip(addr) => Cidr {
                addr,
                len: if addr.is_ipv4() { 32 } else { 128 },
            },
            Route::Return(c) => c,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Route::Vip(_) => "vip",
            Route::Return(_) => "return",
        }
    }

    /// Its BIRD protocol: `lb_vip_198_18_100_10`, `lb_vip6_fd00_100__10`,
    /// `lb_return_0_0_0_0_0`, `lb_return6_fd00_1___64`.
    pub fn protocol(self) -> String {
        let word = |a: IpAddr| a.to_string().replace(['.', ':'], "_");
        match self {
            Route::Vip(a) => format!("lb_vip{}_{}", family(a), word(a)),
            Route::Return(c) => format!("lb_return{}_{}_{}", family(c.addr), word(c.addr), c.len),
        }
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        ""
    } else {
        "6"
    }
}

/// Is `name` one of the protocols the agent writes?
fn is_ours(name: &str) -> bool {
    name.starts_with("lb_vip") || name.starts_with("lb_return")
}

/// The node as a whole: serving, draining (`lb-agent drain`) or stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeMode {
    Serving,
    Draining,
    Stopping,
}

/// Each VIP and why it is announced or not: a listener of the VIP can serve when its group
/// (in its zone scope) has a healthy target that takes new flows, or, with none healthy
/// (fail-open), targets that all were checked. While every candidate still waits for its
/// first checks (a node starting) the VIP is not announced: fail-open there would send flows
/// to targets the other nodes know are down. With `announce.fail_open = false`, fail-open
/// alone does not announce.
///
/// The return routes are announced while the node runs and is not draining: any node
/// reverse-NATs any reply, whether or not it can serve new flows itself.
pub fn wanted(config: &Config, model: &Model, mode: NodeMode) -> BTreeMap<Route, Why> {
    let mut out: BTreeMap<Route, Why> = BTreeMap::new();
    for l in &config.listeners {
        let Some(g) = config.group(&l.target_group) else {
            continue;
        };
        let targets = model.group_targets(&g.name);
        let scope = zone_scope(config, g, targets.clone());
        let candidates: Vec<_> = targets
            .filter(|t| t.draining_until.is_none() && scope.includes(&config.agent.zone, t))
            .collect();
        let why = if candidates.iter().any(|t| t.health == TargetState::Healthy) {
            Why::Serving
        } else if candidates.is_empty() {
            Why::NoTarget
        } else if candidates.iter().any(|t| t.health == TargetState::Initial) {
            Why::Checking
        } else if config.announce.fail_open {
            Why::FailOpen
        } else {
            Why::FailOpenWithdrawn
        };
        let best = out.entry(Route::Vip(l.address)).or_insert(why);
        *best = (*best).max(why);
    }
    for c in &config.announce.return_routes {
        out.insert(Route::Return(*c), Why::Serving);
    }
    for why in out.values_mut() {
        *why = match mode {
            NodeMode::Serving => *why,
            NodeMode::Draining => Why::Draining,
            NodeMode::Stopping => Why::Stopping,
        };
    }
    out
}

/// The file BIRD includes: one static protocol per route, disabled unless announced.
pub fn render(routes: &BTreeMap<Route, bool>) -> String {
    let mut s = String::from(
        "# Written by lb-agent (announce.bird_config); do not edit. One static protocol per\n\
         # route, enabled while this node announces it. Export the VIPs to the routers with\n\
         # `export where proto ~ \"lb_vip*\";` and the return routes to the targets with\n\
         # `export where proto ~ \"lb_return*\";`.\n",
    );
    for (route, &on) in routes {
        let prefix = route.prefix();
        let channel = if prefix.addr.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        s.push_str(&format!(
            "\nprotocol static {} {{\n\t{channel};\n\troute {}/{} blackhole;\n\tdisabled {};\n}}\n",
            route.protocol(),
            prefix.addr,
            prefix.len,
            if on { "no" } else { "yes" },
        ));
    }
    s
}

/// What the announcer is asked to make true.
#[derive(Clone, Debug, PartialEq)]
struct Desire {
    settings: AnnounceConfig,
    routes: BTreeMap<Route, Why>,
    /// When what to announce last changed (the decision a withdrawal's latency is measured from).
    changed_at: Instant,
    /// Counts changes of the desire.
    seq: u64,
}

/// What the task found and did, for status and metrics.
#[derive(Clone, Debug, Default)]
struct Seen {
    bird_error: Option<String>,
    /// Each of our protocols' state as BIRD last reported it (up = announced).
    protocols: BTreeMap<String, bool>,
    since: BTreeMap<Route, SystemTime>,
    changes: BTreeMap<Route, u64>,
    sessions: Vec<BgpSession>,
    last_change: Option<SystemTime>,
    /// How long after its decision BIRD confirmed the last change it needed (the `seq` it
    /// confirmed is the `applied` watch's).
    applied_after: Option<Duration>,
}

impl Seen {
    /// Whether BIRD announces `route`, as it last reported; None when not known (BIRD not
    /// reachable, or the route not in it).
    fn announced(&self, route: Route) -> Option<bool> {
        if self.bird_error.is_some() {
            return None;
        }
        self.protocols.get(&route.protocol()).copied()
    }
}

/// The handle on the task that makes BIRD follow the wanted announcements.
pub struct Announcer {
    desire: watch::Sender<Desire>,
    seen: Arc<Mutex<Seen>>,
    applied: watch::Receiver<u64>,
}

/// How often BIRD's protocols are read again, and a lost connection retried.
const REFRESH: Duration = Duration::from_secs(1);
/// The longest one exchange with BIRD may take.
const BIRD_TIMEOUT: Duration = Duration::from_secs(3);

impl Announcer {
    pub fn start(settings: AnnounceConfig, routes: BTreeMap<Route, Why>) -> Self {
        let (desire, rx) = watch::channel(Desire {
            settings,
            routes,
            changed_at: Instant::now(),
            seq: 1,
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (applied_tx, applied) = watch::channel(0);
        tokio::spawn(drive(rx, seen.clone(), applied_tx));
        Self {
            desire,
            seen,
            applied,
        }
    }

    /// Asks for `routes` under `settings`; nothing happens when neither changed.
    pub fn set(&self, settings: &AnnounceConfig, routes: BTreeMap<Route, Why>) {
        self.desire.send_if_modified(|d| {
            let on = |r: &BTreeMap<Route, Why>| -> Vec<(Route, bool)> {
                r.iter().map(|(k, w)| (*k, w.announce())).collect()
            };
            let announce_changed = on(&d.routes) != on(&routes);
            if d.settings == *settings && d.routes == routes {
                return false;
            }
            if announce_changed {
                d.changed_at = Instant::now();
            }
            d.seq += 1;
            d.settings = settings.clone();
            d.routes = routes;
            true
        });
    }

    /// Waits (at most `limit`) until BIRD confirmed what was last asked; false on timeout.
    pub async fn settled(&self, limit: Duration) -> bool {
        let seq = self.desire.borrow().seq;
        let mut applied = self.applied.clone();
        tokio::time::timeout(limit, applied.wait_for(|&a| a >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Did BIRD confirm every wanted state, and how long after the decision?
    pub fn confirmed(&self) -> (bool, Option<Duration>) {
        let seq = self.desire.borrow().seq;
        let seen = self.seen.lock().expect("announce state");
        (*self.applied.borrow() >= seq, seen.applied_after)
    }

    pub fn status(&self, draining: bool) -> AnnounceStatus {
        let d = self.desire.borrow().clone();
        let seen = self.seen.lock().expect("announce state").clone();
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        AnnounceStatus {
            bird_socket: d.settings.bird_socket.clone(),
            bird_config: d.settings.bird_config.clone(),
            bird_error: seen.bird_error.clone(),
            draining,
            routes: d
                .routes
                .iter()
                .map(|(&route, why)| {
                    let protocol = route.protocol();
                    let prefix = route.prefix();
                    RouteAnnouncement {
                        prefix: format!("{}/{}", prefix.addr, prefix.len),
                        kind: route.kind().into(),
                        announced: seen.announced(route),
                        protocol,
                        wanted: why.announce(),
                        reason: why.as_str().into(),
                        since: seen.since.get(&route).copied().map(time),
                    }
                })
                .collect(),
            sessions: seen.sessions.clone(),
            last_change: seen.last_change.map(time),
        }
    }

    /// Per VIP: wanted, announced (as BIRD says), changes BIRD confirmed; BIRD reachable;
    /// sessions; the time of the last change.
    pub fn metrics(&self) -> AnnounceMetrics {
        let d = self.desire.borrow().clone();
        let seen = self.seen.lock().expect("announce state").clone();
        AnnounceMetrics {
            routes: d
                .routes
                .iter()
                .map(|(&route, why)| {
                    (
                        route,
                        why.announce(),
                        seen.announced(route) == Some(true),
                        seen.changes.get(&route).copied().unwrap_or(0),
                    )
                })
                .collect(),
            bird_up: seen.bird_error.is_none(),
            sessions: seen.sessions,
            last_change: seen.last_change,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AnnounceMetrics {
    /// (route, wanted, announced, changes).
    pub routes: Vec<(Route, bool, bool, u64)>,
    pub bird_up: bool,
    pub sessions: Vec<BgpSession>,
    pub last_change: Option<SystemTime>,
}

/// The task: connect, make BIRD follow the desire, read its protocols every second; on any
/// error drop the connection and start again a second later.
async fn drive(
    mut rx: watch::Receiver<Desire>,
    seen: Arc<Mutex<Seen>>,
    applied: watch::Sender<u64>,
) {
    let mut bird = Bird::default();
    loop {
        let desire = rx.borrow_and_update().clone();
        let result = bird.follow(&desire, &seen).await;
        match result {
            Ok(after) => {
                let mut s = seen.lock().expect("announce state");
                if s.bird_error.take().is_some() {
                    info!(socket = %desire.settings.bird_socket, "talking to BIRD again");
                }
                if after.is_some() {
                    s.applied_after = after;
                }
                let _ = applied.send(desire.seq);
            }
            Err(e) => {
                bird.conn = None;
                let e = format!("{e:#}");
                let mut s = seen.lock().expect("announce state");
                if s.bird_error.as_deref() != Some(e.as_str()) {
                    warn!(error = %e, "BIRD: announcements not applied; retrying every second");
                }
                s.bird_error = Some(e);
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// The connection and what was last written and configured.
#[derive(Default)]
struct Bird {
    conn: Option<(String, Connection)>,
    /// The file's content as last written, and the VIP set BIRD was last configured with.
    written: Option<(PathBuf, String)>,
    configured: Option<BTreeSet<Route>>,
    /// Our protocols' states as BIRD last reported them (and our commands changed them).
    up: Option<BTreeMap<String, bool>>,
}

impl Bird {
    /// Makes BIRD follow `d`; returns how long after the decision BIRD confirmed the last
    /// change it needed (None: nothing to change).
    async fn follow(&mut self, d: &Desire, seen: &Mutex<Seen>) -> Result<Option<Duration>> {
        let socket = &d.settings.bird_socket;
        if self.conn.as_ref().is_none_or(|(s, _)| s != socket) {
            let conn =
                tokio::time::timeout(BIRD_TIMEOUT, Client::for_unix_socket(socket).connect())
                    .await
                    .context("BIRD did not answer")?
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("connecting to BIRD at {socket}"))?;
            self.conn = Some((socket.clone(), conn));
            self.configured = None; // a new BIRD, or one restarted: check again
            self.up = None;
        }
        let wanted: BTreeMap<Route, bool> =
            d.routes.iter().map(|(r, w)| (*r, w.announce())).collect();
        let up = match self.up.take() {
            Some(up) => up,
            None => self.protocols(seen).await?,
        };
        let set: BTreeSet<Route> = wanted.keys().copied().collect();
        let missing = set.iter().any(|r| !up.contains_key(&r.protocol()));
        let stale = up.keys().any(|p| !set.iter().any(|r| r.protocol() == *p));
        let mut up = up;
        if self.configured.as_ref() != Some(&set) || missing || stale {
            // The set changed (or BIRD lost our protocols): the file, then `configure`, which
            // also applies each protocol's `disabled`.
            self.write(&d.settings.bird_config, &wanted)?;
            self.request("configure").await?;
            up = self.protocols(seen).await?;
            if let Some(r) = set.iter().find(|r| !up.contains_key(&r.protocol())) {
                let dir = Path::new(&d.settings.bird_config)
                    .parent()
                    .map_or_else(String::new, |p| p.display().to_string());
                anyhow::bail!(
                    "BIRD has no protocol {} after `configure`: does its config include \"{dir}/*.conf\"?",
                    r.protocol()
                );
            }
            self.configured = Some(set);
        }
        // The latency-critical step: one command per VIP whose state differs, on the open
        // connection, before anything else.
        let mut changed = Vec::new();
        for (route, &on) in &wanted {
            let name = route.protocol();
            if up.get(&name) == Some(&on) {
                continue;
            }
            self.request(&format!("{} {name}", if on { "enable" } else { "disable" }))
                .await?;
            up.insert(name, on);
            changed.push((*route, on));
        }
        let after = (!changed.is_empty()).then(|| d.changed_at.elapsed());
        if let Some(after) = after {
            let now = SystemTime::now();
            let mut s = seen.lock().expect("announce state");
            for (route, on) in changed {
                s.since.insert(route, now);
                *s.changes.entry(route).or_default() += 1;
                let prefix = route.prefix();
                info!(
                    route = %format!("{}/{}", prefix.addr, prefix.len),
                    kind = route.kind(),
                    reason = d.routes[&route].as_str(),
                    bird_confirmed_ms = format!("{:.1}", after.as_secs_f64() * 1e3),
                    "{}",
                    if on { "announced (BIRD)" } else { "withdrawn (BIRD)" }
                );
            }
            s.last_change = Some(now);
        }
        // The file follows, so that a BIRD restart comes up the same; then BIRD's view again
        // (sessions for status, and our protocols for the next round).
        self.write(&d.settings.bird_config, &wanted)?;
        self.up = Some(self.protocols(seen).await?);
        Ok(after)
    }

    /// One exchange; BIRD's error replies (8xxx, 9xxx) are errors.
    async fn request(&mut self, command: &str) -> Result<Vec<Message>> {
        let (_, conn) = self.conn.as_mut().context("not connected")?;
        let messages = tokio::time::timeout(BIRD_TIMEOUT, conn.send_request(command))
            .await
            .with_context(|| format!("BIRD did not answer `{command}`"))?
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("BIRD: `{command}`"))?;
        if let Some(m) = messages.iter().find(|m| m.code() >= 8000) {
            anyhow::bail!("BIRD refused `{command}`: {m:?}");
        }
        Ok(messages)
    }

    /// `show protocols`: our protocols' states (up or not), and the BGP and BFD sessions.
    async fn protocols(&mut self, seen: &Mutex<Seen>) -> Result<BTreeMap<String, bool>> {
        let messages = self.request("show protocols").await?;
        let list = messages
            .iter()
            .filter_map(birdc::Protocol::from_enum)
            .flatten();
        let mut ours = BTreeMap::new();
        let mut sessions = Vec::new();
        for p in list {
            if is_ours(&p.name) {
                ours.insert(p.name.clone(), p.state == "up");
            } else if p.proto == "BGP" || p.proto == "BFD" {
                sessions.push(BgpSession {
                    name: p.name,
                    protocol: p.proto,
                    state: p.state,
                    info: p.info.unwrap_or_default(),
                    since: p.since,
                });
            }
        }
        let mut s = seen.lock().expect("announce state");
        s.protocols = ours.clone();
        s.sessions = sessions;
        Ok(ours)
    }

    /// Writes the file when its content changed (atomically; the directory 0755 and the file
    /// 0644, BIRD runs as its own user).
    fn write(&mut self, path: &str, wanted: &BTreeMap<Route, bool>) -> Result<()> {
        let text = render(wanted);
        let path = PathBuf::from(path);
        if self.written.as_ref() == Some(&(path.clone(), text.clone())) {
            return Ok(());
        }
        write_file(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        self.written = Some((path, text));
        Ok(())
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{MetadataExt, PermissionsExt},
    };
    let dir = path.parent().context("no directory")?;
    std::fs::create_dir_all(dir)?;
    // BIRD runs as its own user: the directory readable by all when it is the agent's (made
    // here, or by the unit's RuntimeDirectory with the agent's UMask); someone else's is left
    // as it is.
    // SAFETY: geteuid has no preconditions.
    if std::fs::metadata(dir)?.uid() == unsafe { libc::geteuid() } {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path)?;
    Ok(())
}
