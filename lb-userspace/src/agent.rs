//! `lb-agent run`: the runtime around the controller. One loop (`run`) owns the controller and
//! the maps; health checkers, the control API and the metrics listener are tasks that talk to
//! it over channels (the API's handlers send it typed [`Command`]s). Every change (a health
//! transition, an API call, a deadline, SIGHUP) ends in one reconciliation that writes only
//! what changed.
//!
//! Here: the loop, reconciliation and the supervision of the checkers and table builds;
//! `commands` carries out the API's commands, `views` builds the status and the metrics page,
//! `server` serves the API, `upkeep` sweeps flows and follows routes and links.

mod announcing;
mod commands;
mod server;
mod upkeep;
mod views;

pub use commands::{Command, Failure, Outcome};
pub use server::{api_router, metrics_router, parse_body, serve, Limits, Listen, LIMITS};

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use crate::{
    access_log::{self, AccessLog},
    config::{self, Config},
    control::Controller,
    daemon,
    datapath::{self, Datapath},
    health::{self, HealthEvent, Schedule, TargetState},
    links::{self, LinkWatcher},
    maps::{FlowTable, RouteEpoch, TargetSignals},
    metrics::HealthMetrics,
    model::{Model, TargetKey},
    reconcile::{build_table, Reconciler},
    route_epoch::RouteCache,
    routes::{Answer, NetlinkRoutes},
    state::{self, RoleSource, TableSpec, ZoneScope},
    statefile::{self, StateFile},
};

/// How often idle flows are looked for at most: a quarter of the shortest idle timeout, but
/// not more often than every second (flow timestamps tick at ~1.07 s).
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

fn sweep_interval(config: &Config) -> Duration {
    config
        .listeners
        .iter()
        .flat_map(|l| {
            l.protocol
                .ip_protocols()
                .iter()
                .map(|&p| l.idle_timeout_for(p) / 4)
        })
        .fold(SWEEP_INTERVAL, Duration::min)
        .max(Duration::from_secs(1))
}
/// After a failed map write, the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the routes to every target are asked again (interface roles follow route
/// changes), when roles are derived from them.
const ROUTE_RECHECK: Duration = Duration::from_secs(30);

pub struct RunOptions {
    pub config_path: PathBuf,
    pub keep_datapath: bool,
}

struct Agent {
    config_path: PathBuf,
    ctl: Controller,
    dp: Datapath,
    checkers: health::Checkers<TargetKey>,
    events: mpsc::Sender<HealthEvent<TargetKey>>,
    health_metrics: HealthMetrics,
    active_flows: BTreeMap<String, u64>,
    /// The sweep's own handles on the flow maps; None while a sweep runs.
    flow_table: Option<FlowTable>,
    /// The route lookup; None while the periodic re-check has it on a blocking thread.
    route_lookup: Option<NetlinkRoutes>,
    retry_at: Option<Instant>,
    /// Consistent-hash tables are built on a blocking thread; their results come back here.
    builds: mpsc::Sender<BuiltTables>,
    /// A build is running.
    building: bool,
    /// Reconciliations in which a write failed, and the last one's error.
    failed_reconciliations: u64,
    last_write_error: Option<String>,
    /// Answers to calls that changed the maps, held until the tables they wait for are
    /// published: each with the build round that publishes its tables, and what sends it.
    held: Vec<(u64, Box<dyn FnOnce()>)>,
    /// Builds started so far, and the specs of the last one.
    build_round: u64,
    round_specs: Vec<TableSpec>,
    /// When a build last failed (the next waits a second).
    build_failed_at: Option<Instant>,
    /// Link notifications for `agent.interfaces` (None: the socket could not be opened).
    links: Option<LinkWatcher>,
    /// The route epoch of the next-hop cache (its watcher runs as a task of its own).
    route_cache: RouteCache,
    /// The access log's thread (None: its ring buffer could not be opened), and the names it
    /// was last sent.
    access_log: Option<AccessLog>,
    log_names: access_log::Names,
    /// Each group's zone scope as last seen, how often it entered the fallback (counted once
    /// a target of the zone was checked), and whether this fallback was counted.
    zone_scopes: BTreeMap<String, (ZoneScope, u64, bool)>,
    /// The passive health signals' handles (None: they could not be opened), the cookie of the
    /// target each id's counters belong to, and the ejections so far by target.
    signals: Option<TargetSignals>,
    signal_cookies: HashMap<u32, u32>,
    passive_ejections: BTreeMap<TargetKey, u64>,
    /// Scale-out: the task that makes BIRD announce what this node can serve, with the
    /// settings it was last given (None: `[announce]` was never on).
    announcer: Option<(crate::announce::Announcer, crate::config::AnnounceConfig)>,
    /// `lb-agent drain` in progress.
    drain: Option<announcing::Drain>,
    /// Stopping (the VIPs are being withdrawn before XDP detaches).
    stopping: bool,
}

/// How often the failures in a row are read, while some group ejects on them.
const PASSIVE_POLL: Duration = Duration::from_millis(200);

/// Tables built off the runtime thread, by spec.
type BuiltTables = Vec<(TableSpec, Result<Vec<u32>>)>;

/// A periodic route re-check's lookup, handed back, and its answers.
type RouteCheck = (NetlinkRoutes, Vec<(IpAddr, Answer)>);

/// The flow-hash key: random for an empty seed (one node); otherwise derived from the seed, so
/// every node given the same seed hashes flows alike.
pub fn hash_key(seed: &str) -> Result<[u32; 2]> {
    if seed.is_empty() {
        let mut key = [0u8; 8];
        // SAFETY: writes at most key.len() bytes into key.
        let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        anyhow::ensure!(n == key.len() as isize, "getrandom failed");
        return Ok([
            u32::from_ne_bytes(key[..4].try_into().expect("4 bytes")),
            u32::from_ne_bytes(key[4..].try_into().expect("4 bytes")),
        ]);
    }
    // A chain of the keyed hash over the seed's bytes, under two fixed keys.
    let derive = |k: [u32; 2]| {
        let mut h = seed.len() as u32;
        for chunk in seed.as_bytes().chunks(4) {
            let mut w = [0u8; 4];
            w[..chunk.len()].copy_from_slice(chunk);
            h = lb_common::hash::halfsiphash13(k, &[h, u32::from_le_bytes(w)]);
        }
        h
    };
    Ok([
        derive([0x6c62_2d61, 0x6765_6e74]),
        derive([0x666c_6f77, 0x2d6b_6579]),
    ])
}

/// `LB_TABLES` slots for a config: both halves of every group, with room for groups a reload
/// adds.
pub fn table_slots(config: &Config) -> u32 {
    let sum: u64 = config
        .target_groups
        .iter()
        .map(|g| g.hash_table_size as u64)
        .sum();
    (4 * sum)
        .max(lb_common::maps::DEFAULT_TABLE_SLOTS as u64)
        .min(u32::MAX as u64 / 2) as u32
}

fn api_path(config: &Config) -> PathBuf {
    PathBuf::from(config.agent.api.trim_start_matches("unix:"))
}

/// Binds the API socket (0600), replacing a stale one; refuses when another agent answers on it.
async fn bind_api(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another lb-agent answers on {}; stop it first (or set agent.api)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn run(opts: RunOptions) -> Result<()> {
    // Signals first: one that comes during start-up is taken once the agent runs, and it stops
    // as usual (detached and unpinned, or with --keep-datapath its state saved), instead of
    // dying half-way with links pinned and no state file.
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    info!("signal handlers installed (SIGTERM, SIGINT: stop; SIGHUP: reload)");
    let config = config::load(&opts.config_path)?;
    datapath::check_privileges()?;
    // One agent per pin path, for its whole life; taken before anything is touched.
    let pin_dir = PathBuf::from(&config.agent.pin_path);
    let _lock = statefile::lock(Path::new(statefile::STATE_DIR), &pin_dir)?;
    datapath::check_pin_path_outlives(&pin_dir, opts.keep_datapath)?;
    // The API socket first: it is how a second agent on the same config finds the first.
    let api = bind_api(&api_path(&config)).await?;
    let metrics_listener = match config.agent.metrics.as_str() {
        "" => None,
        a => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding agent.metrics {a}"))?,
        ),
    };
    let now = Instant::now();
    let mut dp = datapath::open(&config, table_slots(&config))?;
    if let Some(log) = dp.log.take() {
        tokio::spawn(log.forward());
    }
    let interfaces: BTreeMap<String, u32> = dp
        .attached
        .iter()
        .map(|(name, (i, _))| (name.clone(), *i))
        .collect();
    let adopted = dp.adopted.take();
    let fresh = adopted.is_none();
    let setup = (|| -> Result<(Controller, FlowTable, RouteEpoch)> {
        let ctl = match adopted {
            None => {
                let key = hash_key(&config.agent.hash_seed)?;
                Controller::new(config, key, interfaces, now)?
            }
            Some(state) => adopt(&mut dp, state, config, interfaces, now)?,
        };
        Ok((ctl, dp.maps.flow_table()?, dp.maps.route_epoch()?))
    })();
    let (ctl, flow_table, route_epoch) = match setup {
        Ok(v) => v,
        Err(e) if fresh => {
            // Nothing was serving before this run: leave nothing attached.
            if let Err(t) = dp.tear_down() {
                warn!(error = %format!("{t:#}"), "tearing the data plane down after a failed start");
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let (events, mut health_rx) = mpsc::channel(1024);
    let (builds, mut built) = mpsc::channel(1);
    let route_cache = RouteCache::start(ctl.config.agent.route_cache, route_epoch);
    let mut agent = Agent {
        config_path: opts.config_path.clone(),
        ctl,
        dp,
        checkers: health::Checkers::default(),
        events,
        health_metrics: HealthMetrics::default(),
        active_flows: BTreeMap::new(),
        flow_table: Some(flow_table),
        route_lookup: Some(NetlinkRoutes::default()),
        retry_at: None,
        builds,
        building: false,
        held: Vec::new(),
        build_round: 0,
        round_specs: Vec::new(),
        build_failed_at: None,
        failed_reconciliations: 0,
        last_write_error: None,
        links: LinkWatcher::open()
            .map_err(|e| warn!(error = %format!("{e:#}"), "not watching interfaces: an interface deleted and made again is not re-attached"))
            .ok(),
        route_cache,
        access_log: None,
        log_names: access_log::Names::default(),
        zone_scopes: BTreeMap::new(),
        signals: None,
        signal_cookies: HashMap::new(),
        passive_ejections: BTreeMap::new(),
        announcer: None,
        drain: None,
        stopping: false,
    };
    agent.signals = agent
        .dp
        .maps
        .target_signals()
        .map_err(|e| warn!(error = %format!("{e:#}"), "no passive health signals: their maps cannot be read"))
        .ok();
    // Counters of the targets the maps already served (an adopted data plane) are theirs.
    agent.signal_cookies = agent.ctl.model.cookies();
    // Named from the start: after a restart the ring may hold records of the earlier run.
    agent.log_names = agent.log_names();
    agent.access_log = agent
        .dp
        .maps
        .flow_events()
        .and_then(|events| {
            AccessLog::start(
                events,
                agent.ctl.config.agent.access_log.clone(),
                agent.log_names.clone(),
            )
        })
        .map_err(|e| warn!(error = %format!("{e:#}"), "no access log: its events cannot be read"))
        .ok();
    agent.lookup_new_routes();
    agent.apply(now, "start");
    // From now on tables are built off the runtime thread: probes and API calls go on.
    agent.ctl.reconciler.build_inline = false;
    agent.sync_checkers();
    info!(
        config = %opts.config_path.display(),
        listeners = agent.ctl.config.listeners.len(),
        targets = agent.ctl.model.targets.len(),
        "lb-agent running"
    );

    let (commands_tx, mut commands) = mpsc::channel::<Command>(64);
    let api_app = server::api_router(commands_tx.clone(), LIMITS);
    tokio::spawn(server::serve(api, api_app, LIMITS, "control API"));
    if let Some(l) = metrics_listener {
        let app = server::metrics_router(commands_tx, LIMITS);
        tokio::spawn(server::serve(l, app, LIMITS, "metrics"));
    }
    let mut sweep = tokio::time::interval(sweep_interval(&agent.ctl.config));
    let (swept_tx, mut swept) = mpsc::channel(1);
    let mut route_recheck =
        tokio::time::interval_at((Instant::now() + ROUTE_RECHECK).into(), ROUTE_RECHECK);
    let (rechecked_tx, mut rechecked) = mpsc::channel(1);
    let mut passive = tokio::time::interval(PASSIVE_POLL);
    passive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut drain_sample = tokio::time::interval(announcing::DRAIN_SAMPLE);
    drain_sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Attached, maps written, the API served: systemd may go on (Type=notify).
    daemon::ready(&agent.ctl.config);
    let mut watchdog = daemon::Watchdog::from_env();

    loop {
        let period = sweep_interval(&agent.ctl.config);
        if period != sweep.period() {
            sweep = tokio::time::interval(period); // a reload changed the idle timeouts
        }
        let deadline = agent.next_deadline();
        tokio::select! {
            Some(event) = health_rx.recv() => agent.on_health(event),
            Some(command) = commands.recv() => agent.on_command(command),
            _ = sleep_until(deadline) => {
                agent.apply(Instant::now(), "timer");
            }
            _ = sweep.tick() => agent.start_sweep(&swept_tx),
            Some((table, result)) = swept.recv() => agent.sweep_done(table, result),
            _ = route_recheck.tick() => agent.start_route_check(&rechecked_tx),
            Some(check) = rechecked.recv() => agent.route_check_done(check),
            Some(tables) = built.recv() => agent.tables_built(tables),
            watch = links::next(agent.links.as_mut()) => {
                if agent.on_links(watch) {
                    agent.start_route_check(&rechecked_tx);
                }
            }
            _ = sighup.recv() => {
                daemon::reloading();
                if let Some(log) = &agent.access_log {
                    log.reopen(); // after logrotate moved it
                }
                if agent.reload().is_err() {
                    warn!("SIGHUP: reload rejected; the running config stays");
                    daemon::reload_rejected(&agent.ctl.config);
                } else {
                    daemon::ready(&agent.ctl.config);
                }
            }
            _ = passive.tick(), if agent.passive_on() => agent.check_passive(),
            _ = drain_sample.tick(), if agent.drain.is_some() => agent.sample_drain(),
            _ = watchdog.tick() => watchdog.ping(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if !opts.keep_datapath {
        // The router first: no new client packet may reach a node without XDP.
        agent.withdraw_before_stop().await;
    }
    agent.shut_down(opts.keep_datapath)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Takes over the data plane an earlier run left pinned: its hash key and what its maps hold
/// (read back), its ids and target states (from the state file), then moves to `config`.
fn adopt(
    dp: &mut Datapath,
    state: StateFile,
    config: Config,
    interfaces: BTreeMap<String, u32>,
    now: Instant,
) -> Result<Controller> {
    let old_config = state.config;
    // What the earlier run wrote, read back: the shadow the diff starts from, whatever was
    // half-written when it stopped.
    let view = dp.maps.view().context("reading the pinned maps back")?;
    // The key the flows were hashed with; if the earlier run never got to write LB_CONFIG,
    // no flow was, and the key comes from the seed as at a fresh start.
    let hash_key = if view.config.flags & lb_common::CONFIG_F_READY != 0 {
        view.config.hash_key
    } else {
        hash_key(&old_config.agent.hash_seed)?
    };
    let model = Model::restore(state.model, now);
    let reconciler = Reconciler::from_view(&view);
    let mut ctl = Controller::adopted(old_config, model, hash_key, interfaces, reconciler);
    ctl.reload(config, now)?;
    info!(
        pin_path = %dp.pin_dir.display(),
        targets = ctl.model.targets.len(),
        "adopted the pinned data plane (flows, tables and target states carry on)"
    );
    Ok(ctl)
}

/// An interface's name for the log, from its ifindex.
fn interface_name(interfaces: &BTreeMap<String, u32>, ifindex: u32) -> String {
    interfaces
        .iter()
        .find(|(_, &i)| i == ifindex)
        .map(|(n, _)| n.clone())
        .unwrap_or_else(|| {
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: a buffer of IF_NAMESIZE bytes, as if_indextoname requires.
            let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
            if p.is_null() {
                format!("ifindex {ifindex}")
            } else {
                // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
                let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
                name.to_string_lossy().into_owned()
            }
        })
}

impl Agent {
    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        match (self.ctl.next_deadline(now), self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Reconciles, logs state changes, and keeps checkers and the state file in step; then
    /// starts building the tables the maps wait for. A failed write is logged and retried.
    fn apply(&mut self, now: Instant, why: &str) -> Option<Duration> {
        self.reset_new_targets_signals();
        let result = self.reconcile_now(now, why);
        self.start_builds();
        self.update_log_names();
        self.follow_zone_scopes();
        self.follow_announcements();
        result
    }

    /// Zeroes the passive signals of ids a new target took (before it can get traffic).
    fn reset_new_targets_signals(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let now = self.ctl.model.cookies();
        for (&id, &cookie) in &now {
            if self.signal_cookies.get(&id) != Some(&cookie) {
                if let Err(e) = signals.reset(id) {
                    warn!(error = %format!("{e:#}"), id, "resetting a new target's passive signals");
                }
            }
        }
        self.signal_cookies = now;
    }

    /// Does some group eject targets on passive signals?
    fn passive_on(&self) -> bool {
        self.signals.is_some()
            && self
                .ctl
                .config
                .target_groups
                .iter()
                .any(|g| g.health_check.passive_unhealthy_after > 0)
    }

    /// Ejects the healthy targets whose last `passive_unhealthy_after` connections failed:
    /// unhealthy at once, their checker restarted from unhealthy (so `healthy_threshold` passes
    /// bring them back), their failures counted from 0 again.
    fn check_passive(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let mut ejected = Vec::new();
        for (key, t) in &self.ctl.model.targets {
            let Some(g) = self.ctl.config.group(&key.group) else {
                continue;
            };
            let after = g.health_check.passive_unhealthy_after;
            if after == 0 || t.health != TargetState::Healthy || t.draining_until.is_some() {
                continue;
            }
            match signals.failures_in_a_row(t.id) {
                Ok(n) if n >= after as u64 => ejected.push((key.clone(), t.id, n)),
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %format!("{e:#}"), target = %key, "reading failures in a row")
                }
            }
        }
        if ejected.is_empty() {
            return;
        }
        let now = Instant::now();
        for (key, id, n) in &ejected {
            if !self.ctl.model.eject(key, now) {
                continue;
            }
            warn!(target = %key, failures_in_a_row = n, "target unhealthy: its last connections failed (passive health, Target.ConnectionsFailed); it comes back through the health checks");
            *self.passive_ejections.entry(key.clone()).or_default() += 1;
            if let Err(e) = signals.clear_failures(*id) {
                warn!(error = %format!("{e:#}"), target = %key, "clearing failures in a row");
            }
            // Its checker starts again from unhealthy: healthy_threshold passes to come back.
            self.checkers.retain(|k, _| k != key);
        }
        self.apply(now, "passive health");
        self.sync_checkers();
    }

    /// Logs (and counts) groups entering and leaving the zone fallback.
    fn follow_zone_scopes(&mut self) {
        let c = &self.ctl.config;
        let mut next = BTreeMap::new();
        for g in &c.target_groups {
            let targets = self.ctl.model.group_targets(&g.name);
            let scope = state::zone_scope(c, g, targets.clone());
            let (was, mut entered, mut warned) = self
                .zone_scopes
                .get(&g.name)
                .copied()
                .unwrap_or((ZoneScope::All, 0, false));
            // While every target of the zone is still waiting for its first checks (start,
            // registration) its flows go elsewhere too, but nothing failed: not counted until
            // one of them has been checked.
            let failed = targets
                .filter(|t| state::in_zone(&c.agent.zone, t))
                .any(|t| t.health != TargetState::Initial);
            if scope == ZoneScope::Fallback && failed && !warned {
                entered += 1;
                warned = true;
                warn!(group = %g.name, zone = %c.agent.zone, "no healthy target in this node's zone: new flows go to the other zones' healthy targets (zone fallback)");
            } else if was == ZoneScope::Fallback && scope != ZoneScope::Fallback {
                if warned {
                    info!(group = %g.name, zone = %c.agent.zone, scope = scope.as_str(), "zone fallback over");
                }
                warned = false;
            }
            next.insert(g.name.clone(), (scope, entered, warned));
        }
        self.zone_scopes = next;
    }

    /// Tells the access log the names of listeners and targets, when they changed.
    fn update_log_names(&mut self) {
        let Some(log) = &self.access_log else {
            return;
        };
        let names = self.log_names();
        if names != self.log_names {
            log.set_names(names.clone());
            self.log_names = names;
        }
    }

    /// The names of listeners and targets by id, as the access log needs them.
    fn log_names(&self) -> access_log::Names {
        let model = &self.ctl.model;
        access_log::Names {
            listeners: self
                .ctl
                .config
                .listeners
                .iter()
                .filter_map(|l| Some((model.listener_ids.get(&l.name)?, l.name.clone())))
                .collect(),
            targets: model
                .targets
                .iter()
                .map(|(k, t)| (t.id, (t.cookie, k.clone())))
                .collect(),
        }
    }

    fn reconcile_now(&mut self, now: Instant, why: &str) -> Option<Duration> {
        let started = Instant::now();
        let interfaces = self.ctl.reconciler.shadow().interfaces.clone();
        let result = self.ctl.reconcile(&mut self.dp.maps, now);
        if self.ctl.reconciler.shadow().interfaces != interfaces {
            // LB_DEVMAP / LB_IFACES changed: cached next hops are looked up again.
            self.route_cache.bump();
        }
        match result {
            Ok(step) => {
                let took = started.elapsed();
                self.retry_at = None;
                self.last_write_error = None;
                for c in &step.changes {
                    info!(
                        target = %c.target,
                        from = %c.from,
                        to = %c.to,
                        reason = c.reason.map_or("", |r| r.as_str()),
                        "target state changed"
                    );
                }
                for k in &step.removed {
                    info!(target = %k, "target removed after draining");
                }
                if let Some(roles) = &step.roles {
                    let facing: Vec<String> = roles
                        .targets
                        .iter()
                        .map(|&i| interface_name(&self.ctl.interfaces, i))
                        .collect();
                    info!(
                        faces_targets = %facing.join(","),
                        how = roles.source.describe(),
                        "interface roles (reverse NAT only on interfaces that face targets)"
                    );
                    if roles.source == RoleSource::Fallback {
                        warn!("no target is routed out of an attached interface: every interface is marked as facing targets, so reverse NAT is not restricted to the target side (set agent.target_interfaces)");
                    }
                }
                if step.applied.writes + step.applied.tables > 0 {
                    debug!(
                        why,
                        writes = step.applied.writes,
                        tables = step.applied.tables,
                        micros = took.as_micros() as u64,
                        "maps written"
                    );
                }
                if !step.changes.is_empty() || !step.removed.is_empty() {
                    self.sync_checkers();
                }
                if step.applied.writes + step.applied.tables > 0 || !step.changes.is_empty() {
                    self.save_state(now);
                }
                Some(took)
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "writing the maps failed; retrying in 1 s");
                self.failed_reconciliations += 1;
                self.last_write_error = Some(format!("{e:#}"));
                self.retry_at = Some(now + RETRY_AFTER);
                // What the agent intends survives a restart even when the maps lag: the next
                // run reads the maps back and finishes the job.
                self.save_state(now);
                None
            }
        }
    }

    /// Builds the tables the last reconciliation is waiting for, on a blocking thread.
    fn start_builds(&mut self) {
        let specs = self.ctl.reconciler.pending().to_vec();
        let backing_off = self
            .build_failed_at
            .is_some_and(|t| t.elapsed() < RETRY_AFTER);
        if self.building || specs.is_empty() || backing_off {
            return;
        }
        self.building = true;
        self.build_round += 1;
        self.round_specs = specs.clone();
        let done = self.builds.clone();
        tokio::task::spawn_blocking(move || {
            let tables = specs
                .into_iter()
                .map(|spec| {
                    // A panic in a build must not leave the agent waiting for it for ever.
                    let table = std::panic::catch_unwind(|| build_table(&spec))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("building the table panicked")));
                    (spec, table)
                })
                .collect();
            let _ = done.blocking_send(tables);
        });
    }

    fn tables_built(&mut self, tables: BuiltTables) {
        self.building = false;
        let round = self.build_round;
        for (spec, table) in tables {
            match table {
                Ok(t) => self.ctl.reconciler.add_built(spec, t),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "building a table failed; retrying in 1 s");
                    self.build_failed_at = Some(Instant::now());
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
        self.apply(Instant::now(), "tables built");
        // Calls whose tables were in this round (or a failed one) are answered now, even if
        // later changes keep the builder busy.
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(needs, _)| *needs <= round || !self.building);
        self.held = waiting;
        for (_, answer) in ready {
            answer();
        }
    }

    fn save_state(&self, now: Instant) {
        if let Err(e) = self
            .dp
            .save_state(self.ctl.config.clone(), self.ctl.model.save(now))
        {
            warn!(error = %format!("{e:#}"), "could not write the state file");
        }
    }

    /// One checker per target that is in use and not draining, restarted when its check
    /// changes; the others stopped.
    fn sync_checkers(&mut self) {
        let config = &self.ctl.config;
        let mut wanted: HashMap<TargetKey, (Box<dyn health::ProbeBox>, Schedule, TargetState)> =
            HashMap::new();
        for (key, t) in &self.ctl.model.targets {
            let (state, _) = self.ctl.model.shown_state(config, key, t);
            if matches!(state, TargetState::Draining | TargetState::Unused) {
                continue;
            }
            let Some(g) = config.group(&key.group) else {
                continue;
            };
            let hc = &g.health_check;
            let addr = SocketAddr::new(key.addr, hc.port.resolve(key.port));
            let schedule = Schedule {
                interval: hc.interval.0,
                healthy_threshold: hc.healthy_threshold,
                unhealthy_threshold: hc.unhealthy_threshold,
            };
            wanted.insert(
                key.clone(),
                (health::probe_for(hc, addr), schedule, t.health),
            );
        }
        self.checkers.retain(|key, spec| {
            wanted
                .get(key)
                .is_some_and(|(p, s, _)| *spec == (p.describe_boxed(), *s))
        });
        for (key, (probe, schedule, state)) in wanted {
            if self.checkers.contains(&key) {
                continue;
            }
            let spec = (probe.describe_boxed(), schedule);
            debug!(target = %key, check = %spec.0, "health checker started");
            let started = self.checkers.start(key.clone(), spec);
            tokio::spawn(health::run_checker(
                key,
                started.generation,
                probe,
                schedule,
                state,
                self.events.clone(),
                started.cancel,
            ));
        }
    }

    fn on_health(&mut self, event: HealthEvent<TargetKey>) {
        let key = event.target.clone();
        if !self.ctl.record_current(&self.checkers, &event) {
            debug!(target = %key, generation = event.generation, "report of a stopped or restarted checker dropped");
            return;
        }
        self.health_metrics
            .observe(&key, event.outcome.label(), event.latency.as_secs_f64());
        if let health::Outcome::Fail(reason, detail) = &event.outcome {
            debug!(target = %key, reason = %reason, detail, "health check failed");
        }
        if event.transition.is_some() {
            self.apply(event.at.into_std(), "health");
            info!(
                target = %key,
                after_check_us = event.at.elapsed().as_micros() as u64,
                "maps follow the health transition"
            );
        }
    }

    fn shut_down(mut self, keep: bool) -> Result<()> {
        daemon::stopping();
        self.checkers.stop_all();
        let _ = std::fs::remove_file(api_path(&self.ctl.config));
        // Nobody watches the routes once the agent is gone: no cached next hop may outlive it.
        self.route_cache.stop("the agent exited");
        if keep {
            self.save_state(Instant::now());
            info!(pin_path = %self.dp.pin_dir.display(), "exiting; the data plane stays attached and pinned (--keep-datapath); its next-hop cache is off (every packet looked up) until an agent runs again");
            return Ok(());
        }
        self.dp.tear_down()
    }
}
