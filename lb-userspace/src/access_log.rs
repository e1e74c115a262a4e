//! The access log (`agent.access_log`): one JSON line per finished flow of the listeners that
//! have `access_log` on, NLB's access logs at L4.
//!
//! Where the records come from:
//! - the XDP program sends a flow's start and its end to the `LB_FLOW_EVENTS` ring buffer
//!   (`lb-ebpf/src/conn.rs`): the end on an RST, on the first packet after both FINs (the last
//!   ACK), or when its target stops forwarding (removed, or unhealthy with termination); with
//!   its packets and bytes each way;
//! - the idle-flow sweep reports the entries it removes whose end was not sent (idle, or
//!   closed without a last ACK seen, or an end the ring had no room for), and the logged flows
//!   it left: a flow that started before the sweep and is neither was evicted from the LRU.
//!
//! Records lost because the ring buffer was full are counted by the data path
//! (`lb_access_log_events_lost_total`); a record that cannot be written, by
//! `lb_access_log_write_errors_total`. Nothing is dropped silently.
//!
//! The log runs on a thread of its own: a slow or stalled disk never holds up the agent's loop.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    net::{IpAddr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use lb_common::{
    addr, FlowEvent, FlowKey, FlowValue, FLOW_END_EVICTED, FLOW_END_FIN, FLOW_END_IDLE,
    FLOW_END_RST, FLOW_END_TARGET_REMOVED, FLOW_END_TARGET_UNHEALTHY, FLOW_EVENT_END,
    FLOW_EVENT_START, FLOW_F_CLOSING, FLOW_F_RST, FLOW_TICK_SHIFT, PROTO_UDP,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    api::AccessLogStatus,
    expiry::{now_coarse_ns, LoggedFlows},
    maps::FlowEvents,
    model::TargetKey,
};

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// When the flow's first packet was seen, RFC 3339 UTC with milliseconds.
    pub start: String,
    /// When it ended (its last packet; for an idle flow, its last packet to within ~1 s; for
    /// an evicted one, when the sweep found it gone).
    pub end: String,
    /// This node (its host name).
    pub node: String,
    pub listener: String,
    /// "tcp" or "udp".
    pub protocol: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    /// The target group and target; absent when the target is no longer known.
    pub group: Option<String>,
    pub target: Option<SocketAddr>,
    /// Client → target, whole frames as received; absent for an evicted flow (its counters
    /// went with its entry).
    pub packets_in: Option<u64>,
    pub bytes_in: Option<u64>,
    /// Target → client.
    pub packets_out: Option<u64>,
    pub bytes_out: Option<u64>,
    /// fin | rst | idle_timeout | target_removed | target_unhealthy | evicted
    pub reason: String,
}

/// What the log needs to name listeners and targets; the agent sends it after each change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Names {
    /// Listener id → name.
    pub listeners: HashMap<u32, String>,
    /// Target id → (cookie, key) of every registered target.
    pub targets: HashMap<u32, (u32, TargetKey)>,
}

/// Every close reason a record can give, in the order `LogStats::records` counts them.
pub const REASONS: [&str; 6] = [
    "fin",
    "rst",
    "idle_timeout",
    "target_removed",
    "target_unhealthy",
    "evicted",
];

/// The log's counters, shared with the agent (status, metrics).
#[derive(Debug, Default)]
pub struct LogStats {
    /// Records written, by `REASONS` index.
    pub records: [AtomicU64; REASONS.len()],
    pub write_errors: AtomicU64,
    pub open_flows: AtomicU64,
}

impl LogStats {
    /// As the status shows them, with the data path's count of lost events.
    pub fn status(&self, path: &str, events_lost: Option<u64>) -> AccessLogStatus {
        AccessLogStatus {
            path: path.into(),
            records: REASONS
                .iter()
                .zip(&self.records)
                .map(|(r, n)| (r.to_string(), n.load(Relaxed)))
                .collect(),
            write_errors: self.write_errors.load(Relaxed),
            events_lost,
            open_flows: self.open_flows.load(Relaxed),
        }
    }
}

enum Message {
    Names(Names),
    Path(String),
    Reopen,
    Swept(LoggedFlows),
    Stop,
}

/// The running access log.
pub struct AccessLog {
    tx: mpsc::Sender<Message>,
    pub stats: Arc<LogStats>,
    thread: Option<JoinHandle<()>>,
}

/// How long the thread waits for the ring buffer before it looks at its messages.
const POLL: Duration = Duration::from_millis(100);
/// A file that could not be opened is tried again after this long.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

impl AccessLog {
    /// Starts the log's thread, reading `events` and writing to `path` ("" writes nothing
    /// until a path is set).
    pub fn start(events: FlowEvents, path: String, names: Names) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(LogStats::default());
        let mut writer = Writer::new(path, names, stats.clone());
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(events, rx))
            .context("starting the access log's thread")?;
        Ok(Self {
            tx,
            stats,
            thread: Some(thread),
        })
    }

    pub fn set_names(&self, names: Names) {
        let _ = self.tx.send(Message::Names(names));
    }

    /// A reload changed `agent.access_log`.
    pub fn set_path(&self, path: String) {
        let _ = self.tx.send(Message::Path(path));
    }

    /// Closes and reopens the file (SIGHUP, after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.send(Message::Reopen);
    }

    pub fn swept(&self, logged: LoggedFlows) {
        let _ = self.tx.send(Message::Swept(logged));
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let _ = self.tx.send(Message::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A flow whose start was seen and whose end was not yet.
struct OpenFlow {
    start_ns: u64,
    listener_id: u32,
    target_id: u32,
    target_cookie: u32,
}

struct Writer {
    path: String,
    file: Option<BufWriter<File>>,
    failed_at: Option<Instant>,
    node: String,
    names: Names,
    /// Targets no longer registered, by id: their flows' records still name them.
    gone: HashMap<u32, (u32, TargetKey)>,
    open: HashMap<FlowKey, OpenFlow>,
    stats: Arc<LogStats>,
}

/// A time of CLOCK_MONOTONIC_COARSE (ns) as RFC 3339, against `now` (wall, monotonic ns).
fn wall(t_ns: u64, now: (SystemTime, u64)) -> String {
    let ago = Duration::from_nanos(now.1.saturating_sub(t_ns));
    humantime::format_rfc3339_millis(now.0 - ago).to_string()
}

fn socket(words: [u32; 4], family: u8, port_be: u16) -> SocketAddr {
    let ip = addr::from_words(&words, family).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    SocketAddr::new(ip, u16::from_be(port_be))
}

impl Writer {
    fn new(path: String, names: Names, stats: Arc<LogStats>) -> Self {
        Self {
            path,
            file: None,
            failed_at: None,
            node: rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned(),
            names,
            gone: HashMap::new(),
            open: HashMap::new(),
            stats,
        }
    }

    fn run(&mut self, mut events: FlowEvents, rx: mpsc::Receiver<Message>) {
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: POLL.as_nanos() as i64,
        };
        loop {
            let mut fds = [rustix::event::PollFd::new(
                &events,
                rustix::event::PollFlags::IN,
            )];
            if let Err(e) = rustix::event::poll(&mut fds, Some(&timeout)) {
                if e != rustix::io::Errno::INTR {
                    warn!(error = %e, "access log: waiting for flow events");
                    std::thread::sleep(POLL);
                }
            }
            self.drain(&mut events);
            loop {
                match rx.try_recv() {
                    Ok(Message::Names(n)) => self.rename(n),
                    Ok(Message::Path(p)) => {
                        if p != self.path {
                            self.close();
                            self.path = p;
                        }
                    }
                    Ok(Message::Reopen) => self.close(),
                    Ok(Message::Swept(logged)) => {
                        // Ends already in the ring (the data path marked those entries
                        // logged before the sweep read them) come first.
                        self.drain(&mut events);
                        self.swept(logged);
                    }
                    Ok(Message::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        self.drain(&mut events);
                        self.flush();
                        return;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            self.flush();
            self.stats.open_flows.store(self.open.len() as u64, Relaxed);
        }
    }

    fn drain(&mut self, events: &mut FlowEvents) {
        let now = (SystemTime::now(), now_coarse_ns());
        while let Some(e) = events.next_event() {
            self.on_event(&e, now);
        }
    }

    fn on_event(&mut self, e: &FlowEvent, now: (SystemTime, u64)) {
        match e.kind {
            FLOW_EVENT_START => {
                self.open.insert(
                    e.key,
                    OpenFlow {
                        start_ns: e.value.start_ns,
                        listener_id: e.value.listener_id,
                        target_id: e.value.target_id,
                        target_cookie: e.value.target_cookie,
                    },
                );
            }
            FLOW_EVENT_END => {
                self.open.remove(&e.key);
                let reason = Self::reason(e.reason);
                self.write_flow(&e.key, &e.value, e.time_ns, reason, now);
            }
            _ => {}
        }
    }

    fn reason(code: u32) -> &'static str {
        match code {
            FLOW_END_FIN => "fin",
            FLOW_END_RST => "rst",
            FLOW_END_IDLE => "idle_timeout",
            FLOW_END_EVICTED => "evicted",
            FLOW_END_TARGET_REMOVED => "target_removed",
            FLOW_END_TARGET_UNHEALTHY => "target_unhealthy",
            _ => "unknown",
        }
    }

    fn target(&self, id: u32, cookie: u32) -> Option<&TargetKey> {
        [self.names.targets.get(&id), self.gone.get(&id)]
            .into_iter()
            .flatten()
            .find(|(c, _)| *c == cookie)
            .map(|(_, k)| k)
    }

    fn rename(&mut self, names: Names) {
        for (id, old) in self.names.targets.drain() {
            if names.targets.get(&id).is_none_or(|new| new.0 != old.0) {
                self.gone.insert(id, old);
            }
        }
        self.names = names;
    }

    fn swept(&mut self, logged: LoggedFlows) {
        let now = (SystemTime::now(), now_coarse_ns());
        for (key, v) in &logged.ended {
            self.open.remove(key);
            let code = if v.flags & FLOW_F_RST != 0 {
                FLOW_END_RST
            } else if v.flags & FLOW_F_CLOSING != 0 {
                FLOW_END_FIN
            } else {
                FLOW_END_IDLE
            };
            let last = (v.last_seen_ticks as u64) << FLOW_TICK_SHIFT;
            // The tick is the last packet's time rounded down: never before the start.
            let end = last.max(v.start_ns);
            let reason = Self::reason(code);
            self.write_flow(key, v, end, reason, now);
        }
        if logged.began_ns == 0 {
            return;
        }
        // Started before the pass began, and neither left in the table nor removed by it.
        let evicted: Vec<FlowKey> = self
            .open
            .iter()
            .filter(|(k, f)| f.start_ns < logged.began_ns && !logged.live.contains(*k))
            .map(|(k, _)| *k)
            .collect();
        for key in evicted {
            if let Some(f) = self.open.remove(&key) {
                let record = self.record(
                    &key,
                    f.listener_id,
                    f.target_id,
                    f.target_cookie,
                    (f.start_ns, logged.began_ns),
                    None,
                    "evicted",
                    now,
                );
                self.write(&record);
            }
        }
    }

    fn write_flow(
        &mut self,
        key: &FlowKey,
        v: &FlowValue,
        end_ns: u64,
        reason: &'static str,
        now: (SystemTime, u64),
    ) {
        let record = self.record(
            key,
            v.listener_id,
            v.target_id,
            v.target_cookie,
            (v.start_ns, end_ns),
            Some([v.packets_in, v.bytes_in, v.packets_out, v.bytes_out]),
            reason,
            now,
        );
        self.write(&record);
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        key: &FlowKey,
        listener_id: u32,
        target_id: u32,
        cookie: u32,
        (start_ns, end_ns): (u64, u64),
        counts: Option<[u64; 4]>,
        reason: &str,
        now: (SystemTime, u64),
    ) -> AccessRecord {
        let target = self.target(target_id, cookie);
        AccessRecord {
            start: wall(start_ns, now),
            end: wall(end_ns.max(start_ns), now),
            node: self.node.clone(),
            listener: self
                .names
                .listeners
                .get(&listener_id)
                .cloned()
                .unwrap_or_else(|| format!("#{listener_id}")),
            protocol: if key.protocol == PROTO_UDP {
                "udp"
            } else {
                "tcp"
            }
            .into(),
            client: socket(key.src_addr, key.family, key.src_port_be),
            vip: socket(key.dst_addr, key.family, key.dst_port_be),
            group: target.map(|t| t.group.clone()),
            target: target.map(|t| SocketAddr::new(t.addr, t.port)),
            packets_in: counts.map(|c| c[0]),
            bytes_in: counts.map(|c| c[1]),
            packets_out: counts.map(|c| c[2]),
            bytes_out: counts.map(|c| c[3]),
            reason: reason.into(),
        }
    }

    fn write(&mut self, record: &AccessRecord) {
        if self.path.is_empty() {
            return;
        }
        let Some(file) = self.file() else {
            self.stats.write_errors.fetch_add(1, Relaxed);
            return;
        };
        let written = serde_json::to_writer(&mut *file, record)
            .map_err(std::io::Error::from)
            .and_then(|()| file.write_all(b"\n"));
        match written {
            Ok(()) => {
                if let Some(i) = REASONS.iter().position(|r| *r == record.reason) {
                    self.stats.records[i].fetch_add(1, Relaxed);
                }
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Relaxed);
                warn!(path = %self.path, error = %e, "access log: writing a record failed; reopening");
                self.file = None;
                self.failed_at = Some(Instant::now());
            }
        }
    }

    /// The open file, opening it (at most once per `REOPEN_AFTER` after a failure).
    fn file(&mut self) -> Option<&mut BufWriter<File>> {
        if self.file.is_none() {
            if self.failed_at.is_some_and(|t| t.elapsed() < REOPEN_AFTER) {
                return None;
            }
            match OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&self.path)
            {
                Ok(f) => {
                    info!(path = %self.path, "access log opened");
                    self.file = Some(BufWriter::with_capacity(64 * 1024, f));
                    self.failed_at = None;
                }
                Err(e) => {
                    warn!(path = %self.path, error = %e, "access log: cannot open the file; records are counted as write errors until it opens");
                    self.failed_at = Some(Instant::now());
                }
            }
        }
        self.file.as_mut()
    }

    fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.flush() {
                warn!(path = %self.path, error = %e, "access log: flushing failed; reopening");
                self.file = None;
                self.failed_at = Some(Instant::now());
            }
        }
    }

    fn close(&mut self) {
        self.flush();
        self.file = None;
        self.failed_at = None;
    }
}
