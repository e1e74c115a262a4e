//! Health checking: the threshold state machine, TCP and HTTP probes, and the checker task that
//! runs one target's probes on its interval and reports every result (with any transition) as a
//! `HealthEvent`. Checkers never touch the maps: the agent decides what a transition means.

mod probe;

use std::{collections::HashMap, fmt, hash::Hash, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

pub use probe::{HttpProbe, Probe, TcpProbe};

/// A target's state as NLB names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Initial,
    Healthy,
    Unhealthy,
    Draining,
    Unused,
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Initial => "initial",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
            Self::Unused => "unused",
        })
    }
}

/// Why a target is in its state (NLB's reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    #[serde(rename = "Elb.InitialHealthChecking")]
    InitialHealthChecking,
    #[serde(rename = "Target.Timeout")]
    Timeout,
    #[serde(rename = "Target.ResponseCodeMismatch")]
    ResponseCodeMismatch,
    #[serde(rename = "Target.FailedHealthChecks")]
    FailedHealthChecks,
    #[serde(rename = "Target.ConnectionRefused")]
    ConnectionRefused,
    #[serde(rename = "Target.DeregistrationInProgress")]
    DeregistrationInProgress,
    #[serde(rename = "Target.NotInUse")]
    NotInUse,
    /// Passive health: `passive_unhealthy_after` connections in a row failed.
    #[serde(rename = "Target.ConnectionsFailed")]
    ConnectionsFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialHealthChecking => "Elb.InitialHealthChecking",
            Self::Timeout => "Target.Timeout",
            Self::ResponseCodeMismatch => "Target.ResponseCodeMismatch",
            Self::FailedHealthChecks => "Target.FailedHealthChecks",
            Self::ConnectionRefused => "Target.ConnectionRefused",
            Self::DeregistrationInProgress => "Target.DeregistrationInProgress",
            Self::NotInUse => "Target.NotInUse",
            Self::ConnectionsFailed => "Target.ConnectionsFailed",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The reason, and what happened in words (for logs and status).
    Fail(Reason, String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail(Reason::Timeout, _) => "timeout",
            Self::Fail(Reason::ResponseCodeMismatch, _) => "response_code_mismatch",
            Self::Fail(Reason::ConnectionRefused, _) => "connection_refused",
            Self::Fail(..) => "failed",
        }
    }
}

/// A change of health state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: TargetState,
    pub to: TargetState,
    pub reason: Option<Reason>,
}

/// Rise/fall thresholds: the state changes only after `healthy` consecutive passes or
/// `unhealthy` consecutive failures.
#[derive(Clone, Debug)]
pub struct Tracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    state: TargetState,
    reason: Option<Reason>,
    passes: u32,
    failures: u32,
}

impl Tracker {
    /// A tracker in `state` (`Initial` for a new target; the last known state on a restart).
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32, state: TargetState) -> Self {
        Self {
            healthy_threshold,
            unhealthy_threshold,
            state,
            reason: (state == TargetState::Initial).then_some(Reason::InitialHealthChecking),
            passes: 0,
            failures: 0,
        }
    }

    pub fn state(&self) -> TargetState {
        self.state
    }

    pub fn reason(&self) -> Option<Reason> {
        self.reason
    }

    /// Counts one probe result; returns the transition it completes, if any.
    pub fn record(&mut self, outcome: &Outcome) -> Option<Transition> {
        let from = self.state;
        match outcome {
            Outcome::Pass => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                if from != TargetState::Healthy && self.passes >= self.healthy_threshold {
                    self.state = TargetState::Healthy;
                    self.reason = None;
                }
            }
            Outcome::Fail(reason, _) => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                if from != TargetState::Unhealthy && self.failures >= self.unhealthy_threshold {
                    self.state = TargetState::Unhealthy;
                }
                if self.state == TargetState::Unhealthy {
                    self.reason = Some(*reason);
                }
            }
        }
        (self.state != from).then_some(Transition {
            from,
            to: self.state,
            reason: self.reason,
        })
    }
}

/// One probe's result as the checker task reports it.
#[derive(Clone, Debug)]
pub struct HealthEvent<K> {
    pub target: K,
    /// The generation of the checker that probed (`Checkers::start`): a report of a checker
    /// stopped or restarted since is not the current checker's, and is dropped.
    pub generation: u64,
    pub outcome: Outcome,
    pub latency: Duration,
    pub at: Instant,
    pub transition: Option<Transition>,
}

/// How often to probe, and the thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Probes one target every `interval` (±5%, and a first probe within the first tenth of an
/// interval so that checkers started together spread out) until `cancel`, sending every
/// result to `events`, tagged with `generation`.
pub async fn run_checker<K: Clone, P: Probe>(
    target: K,
    generation: u64,
    probe: P,
    schedule: Schedule,
    initial: TargetState,
    events: mpsc::Sender<HealthEvent<K>>,
    cancel: CancellationToken,
) {
    let mut tracker = Tracker::new(
        schedule.healthy_threshold,
        schedule.unhealthy_threshold,
        initial,
    );
    let mut jitter = Jitter::new(&probe);
    let mut next = Instant::now() + schedule.interval.mul_f64(jitter.next() * 0.1);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = probe.probe() => outcome,
        };
        let at = Instant::now();
        let transition = tracker.record(&outcome);
        let event = HealthEvent {
            target: target.clone(),
            generation,
            outcome,
            latency: at - started,
            at,
            transition,
        };
        if events.send(event).await.is_err() {
            return;
        }
        let factor = 0.95 + 0.1 * jitter.next();
        next += schedule.interval.mul_f64(factor);
        if next < Instant::now() {
            next = Instant::now();
        }
    }
}

/// What a checker was started with: its probe (described) and schedule. A change restarts it.
pub type CheckSpec = (String, Schedule);

/// The running checkers, one per target, each with a generation of its own. A stopped checker
/// may still have reports on their way (queued, or blocked on a full channel when it was
/// stopped); only reports that carry the current generation of their target's checker count.
#[derive(Debug)]
pub struct Checkers<K> {
    running: HashMap<K, Running>,
    last_generation: u64,
}

#[derive(Debug)]
struct Running {
    spec: CheckSpec,
    generation: u64,
    cancel: CancellationToken,
}

/// A checker `Checkers::start` registered: the generation its reports must carry, and the
/// token that stops it.
#[derive(Debug)]
pub struct Started {
    pub generation: u64,
    pub cancel: CancellationToken,
}

impl<K> Default for Checkers<K> {
    fn default() -> Self {
        Self {
            running: HashMap::new(),
            last_generation: 0,
        }
    }
}

impl<K: Eq + Hash> Checkers<K> {
    /// Registers a new checker for `key` (stopping the one it replaces) under a generation no
    /// checker had before; the caller runs it (`run_checker`) with what this returns.
    pub fn start(&mut self, key: K, spec: CheckSpec) -> Started {
        self.last_generation += 1;
        let started = Started {
            generation: self.last_generation,
            cancel: CancellationToken::new(),
        };
        let running = Running {
            spec,
            generation: started.generation,
            cancel: started.cancel.clone(),
        };
        if let Some(old) = self.running.insert(key, running) {
            old.cancel.cancel();
        }
        started
    }

    /// Stops the checkers `keep` turns down (given the target and the spec it was started with).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &CheckSpec) -> bool) {
        self.running.retain(|key, r| {
            let kept = keep(key, &r.spec);
            if !kept {
                r.cancel.cancel();
            }
            kept
        });
    }

    pub fn contains(&self, key: &K) -> bool {
        self.running.contains_key(key)
    }

    /// The generation of `key`'s running checker.
    pub fn generation(&self, key: &K) -> Option<u64> {
        self.running.get(key).map(|r| r.generation)
    }

    /// Does `event` come from the running checker of its target? Not when that checker was
    /// stopped, or restarted (a new spec) since it probed.
    pub fn is_current(&self, event: &HealthEvent<K>) -> bool {
        self.generation(&event.target) == Some(event.generation)
    }

    /// Stops every checker.
    pub fn stop_all(&mut self) {
        self.retain(|_, _| false);
    }
}

/// A small xorshift generator: jitter needs spread, not secrecy.
struct Jitter(u64);

impl Jitter {
    fn new<P: Probe>(probe: &P) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() as u64);
        let seed = probe.describe().bytes().fold(nanos | 1, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Self(seed | 1)
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The probe a target's health check config asks for.
pub fn probe_for(check: &crate::config::HealthCheckConfig, addr: SocketAddr) -> Box<dyn ProbeBox> {
    let timeout = check.effective_timeout();
    match check.protocol {
        crate::config::HealthCheckProtocol::Tcp => Box::new(TcpProbe { addr, timeout }),
        crate::config::HealthCheckProtocol::Http => Box::new(HttpProbe {
            addr,
            timeout,
            path: check.path.clone(),
            matcher: check.matcher.clone(),
        }),
    }
}

/// A probe behind a box (the agent holds TCP and HTTP probes alike).
pub trait ProbeBox: Send + Sync {
    fn probe_boxed(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + '_>>;
    fn describe_boxed(&self) -> String;
}

impl<P: Probe> ProbeBox for P {
    fn probe_boxed(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + '_>> {
        Box::pin(self.probe())
    }
    fn describe_boxed(&self) -> String {
        self.describe()
    }
}

impl Probe for Box<dyn ProbeBox> {
    fn probe(&self) -> impl std::future::Future<Output = Outcome> + Send {
        self.as_ref().probe_boxed()
    }
    fn describe(&self) -> String {
        self.as_ref().describe_boxed()
    }
}

#[cfg(test)]
mod tests;
