//! The XDP program's log (aya-log): the records of its rare events (`lb-ebpf/src/events.rs`)
//! read from its `AYA_LOGS` ring buffer and written to the agent's log, under the tracing
//! target `lb_xdp` (`RUST_LOG=lb_xdp=off` silences them), with the program's event name (the
//! record's target: `fib`, `redirect`, `map_insert`) as the field `xdp_event`.
//!
//! The program logs an event only when a CPU's count of it reaches a power of two; here, on
//! top, at most `BURST` lines per second go out for each event and level: the rest are
//! counted, and one line ("N messages suppressed") says how many once the second is over. A
//! flood of events cannot flood the journal.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::warn;

/// The tracing target of the forwarded lines.
pub const TARGET: &str = "lb_xdp";
/// Lines per `WINDOW` for each event and level.
pub const BURST: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(1);

/// At most `burst` lines per `window` for each key; the others are counted, and reported once
/// the window has passed.
pub struct RateLimiter<K> {
    burst: u32,
    window: Duration,
    keys: HashMap<K, Window>,
}

struct Window {
    start: Instant,
    emitted: u32,
    suppressed: u64,
}

/// What to do with a line (`RateLimiter::admit`).
#[derive(Debug, PartialEq, Eq)]
pub struct Admit {
    /// Write it.
    pub emit: bool,
    /// Lines of its key suppressed in the window that just ended, to report first.
    pub suppressed_before: u64,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            keys: HashMap::new(),
        }
    }

    /// A line of `key` at `now`.
    pub fn admit(&mut self, key: &K, now: Instant) -> Admit {
        let fresh = Window {
            start: now,
            emitted: 0,
            suppressed: 0,
        };
        let w = self.keys.entry(key.clone()).or_insert(fresh);
        let mut suppressed_before = 0;
        if now.saturating_duration_since(w.start) >= self.window {
            suppressed_before = w.suppressed;
            *w = Window {
                start: now,
                emitted: 0,
                suppressed: 0,
            };
        }
        let emit = w.emitted < self.burst;
        if emit {
            w.emitted += 1;
        } else {
            w.suppressed += 1;
        }
        Admit {
            emit,
            suppressed_before,
        }
    }

    /// The keys whose window ended by `now` with lines suppressed, and how many: reported
    /// here, as no later line of theirs may come to carry the count. Ended windows are
    /// forgotten.
    pub fn expired(&mut self, now: Instant) -> Vec<(K, u64)> {
        let window = self.window;
        let mut out = Vec::new();
        self.keys.retain(|key, w| {
            if now.saturating_duration_since(w.start) < window {
                return true;
            }
            if w.suppressed > 0 {
                out.push((key.clone(), w.suppressed));
            }
            false
        });
        out
    }
}

type Key = (String, log::Level);

/// The `log::Log` that aya-log writes the program's records to: into `tracing`, rate-limited.
#[derive(Clone)]
pub struct Forwarder {
    limiter: Arc<Mutex<RateLimiter<Key>>>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self {
            limiter: Arc::new(Mutex::new(RateLimiter::new(BURST, WINDOW))),
        }
    }
}

impl Forwarder {
    /// Writes `record` (or counts it as suppressed) as of `now`.
    pub fn forward(&self, record: &log::Record<'_>, now: Instant) {
        let key = (record.target().to_string(), record.level());
        let admit = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&key, now);
        if admit.suppressed_before > 0 {
            suppressed(&key, admit.suppressed_before);
        }
        if admit.emit {
            emit(record.level(), record.target(), *record.args());
        }
    }

    /// Reports the lines suppressed in windows that ended by `now`.
    pub fn report_suppressed(&self, now: Instant) {
        let ended = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expired(now);
        for (key, n) in ended {
            suppressed(&key, n);
        }
    }
}

impl log::Log for Forwarder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.forward(record, Instant::now());
    }

    fn flush(&self) {}
}

fn emit(level: log::Level, event: &str, message: fmt::Arguments<'_>) {
    match level {
        log::Level::Error => tracing::error!(target: TARGET, xdp_event = event, "{message}"),
        log::Level::Warn => tracing::warn!(target: TARGET, xdp_event = event, "{message}"),
        log::Level::Info => tracing::info!(target: TARGET, xdp_event = event, "{message}"),
        log::Level::Debug => tracing::debug!(target: TARGET, xdp_event = event, "{message}"),
        log::Level::Trace => tracing::trace!(target: TARGET, xdp_event = event, "{message}"),
    }
}

fn suppressed((event, level): &Key, n: u64) {
    emit(
        *level,
        event,
        format_args!("{n} messages suppressed (at most {BURST} per second)"),
    );
}

/// The reader of the program's log, for the agent's lifetime (the program writes whether or
/// not anyone reads; records are lost only while nobody does and the ring buffer is full).
pub struct XdpLog {
    logger: EbpfLogger<Forwarder>,
    forwarder: Forwarder,
}

impl XdpLog {
    /// Takes the log ring buffer of an object just loaded.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self> {
        let forwarder = Forwarder::default();
        let logger = EbpfLogger::init_with_logger(ebpf, forwarder.clone())
            .context("opening the XDP program's log (AYA_LOGS)")?;
        Ok(Self { logger, forwarder })
    }

    /// Finds the log ring buffer among the maps of the loaded program `prog_id` (one an
    /// earlier run loaded and pinned).
    pub fn adopt(prog_id: u32) -> Result<Self> {
        let forwarder = Forwarder::default();
        let logger = EbpfLogger::init_from_id_with_logger(prog_id, forwarder.clone())
            .with_context(|| format!("opening the log (AYA_LOGS) of XDP program {prog_id}"))?;
        Ok(Self { logger, forwarder })
    }

    /// Forwards records as they come, and reports suppressed lines every second, until the
    /// runtime stops.
    pub async fn forward(self) {
        let Self { logger, forwarder } = self;
        // SAFETY: the logger owns the ring buffer's map fd, open until the logger (which the
        // AsyncFd holds) is dropped, and always returns that one.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        let mut fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "not reading the XDP program's log: polling its ring buffer failed");
                return;
            }
        };
        let mut tick = tokio::time::interval(WINDOW);
        loop {
            tokio::select! {
                ready = fd.readable_mut() => match ready {
                    Ok(mut guard) => {
                        drain(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                    Err(e) => {
                        warn!(error = %e, "not reading the XDP program's log any more: polling its ring buffer failed");
                        return;
                    }
                },
                _ = tick.tick() => {
                    // Also a fallback for a wake-up that was missed.
                    drain(fd.get_mut());
                    forwarder.report_suppressed(Instant::now());
                }
            }
        }
    }
}

/// Hands every record in the ring buffer to the forwarder.
fn drain(logger: &mut EbpfLogger<Forwarder>) {
    // aya-log 0.3 panics on a record it cannot parse (the item is consumed all the same): that
    // must not end the agent's reading of the log.
    if catch_unwind(AssertUnwindSafe(|| logger.flush())).is_err() {
        warn!("skipped an unreadable record of the XDP program's log");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_limiter_passes_a_burst_then_counts_and_reports_the_rest() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(3, Duration::from_secs(1));
        let pass = Admit {
            emit: true,
            suppressed_before: 0,
        };
        let held = Admit {
            emit: false,
            suppressed_before: 0,
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        for ms in [0, 10, 20] {
            assert_eq!(l.admit(&"fib", at(ms)), pass);
        }
        for ms in [30, 500, 999] {
            assert_eq!(l.admit(&"fib", at(ms)), held);
        }
        // Another key has a budget of its own.
        assert_eq!(l.admit(&"redirect", at(999)), pass);
        // A second after the window began: a new window, the old one's count reported first.
        assert_eq!(
            l.admit(&"fib", at(1000)),
            Admit {
                emit: true,
                suppressed_before: 3
            }
        );
        assert_eq!(l.admit(&"fib", at(1001)), pass);
    }

    #[test]
    fn ended_windows_report_what_they_suppressed_once_and_are_forgotten() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = RateLimiter::new(1, Duration::from_secs(1));
        for _ in 0..5 {
            l.admit(&"fib", at(0));
        }
        l.admit(&"redirect", at(0));
        l.admit(&"insert", at(600));
        l.admit(&"insert", at(600));
        assert!(l.expired(at(999)).is_empty());
        // fib's window is over (4 suppressed); redirect's too (none: nothing to say);
        // insert's runs until 1.6 s.
        assert_eq!(l.expired(at(1000)), [("fib", 4)]);
        assert!(l.expired(at(1100)).is_empty());
        assert_eq!(l.expired(at(1600)), [("insert", 1)]);
        // Forgotten: the next line starts a fresh window, with nothing to report.
        assert_eq!(
            l.admit(&"fib", at(1700)),
            Admit {
                emit: true,
                suppressed_before: 0
            }
        );
    }

    /// A `tracing` writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_reach_tracing_under_their_event_and_a_flood_is_cut_to_a_count() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        let forwarder = Forwarder::default();
        let t0 = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..25u64 {
                forwarder.forward(
                    &log::Record::builder()
                        .level(log::Level::Warn)
                        .target("fib")
                        .args(format_args!("FIB lookup answered 5; {i} so far"))
                        .build(),
                    t0 + Duration::from_millis(i),
                );
            }
            forwarder.report_suppressed(t0 + Duration::from_millis(999));
            forwarder.report_suppressed(t0 + WINDOW);
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), BURST as usize + 1, "{text}");
        for (i, line) in lines[..BURST as usize].iter().enumerate() {
            assert!(
                line.contains(" WARN lb_xdp: ")
                    && line.contains(&format!(
                        "FIB lookup answered 5; {i} so far xdp_event=\"fib\""
                    )),
                "{line}"
            );
        }
        assert!(
            lines[BURST as usize].contains(&format!(
                "WARN lb_xdp: {} messages suppressed (at most {BURST} per second) xdp_event=\"fib\"",
                25 - BURST
            )),
            "{text}"
        );
    }
}
