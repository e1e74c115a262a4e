//! `lb-agent run` as a systemd service (`Type=notify`, see `packaging/lb-agent.service`): it
//! tells the service manager when it is ready (the data path attached, the maps written, the
//! control API listening), pings the watchdog from the loop that owns the controller (a loop
//! that wedges stops the pings, and systemd restarts the agent), and says when it reloads
//! (SIGHUP) and when it stops. Each message also carries a `STATUS=` line for `systemctl
//! status`.
//!
//! Without `NOTIFY_SOCKET` in the environment (not started by systemd) every call here does
//! nothing; a message that cannot be sent is logged once and otherwise ignored: the agent
//! serves whether or not anyone listens.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use sd_notify::NotifyState;
use tokio::time::{Interval, MissedTickBehavior};
use tracing::{info, warn};

use crate::config::Config;

/// The agent is serving: sent once after start-up, and again after each reload.
pub fn ready(config: &Config) {
    let status = format!("serving: {}", config.summary());
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A reload (SIGHUP) begins: `RELOADING=1` with the time it began, as `Type=notify-reload`
/// wants (plain `Type=notify` takes it too); `ready` or `reload_rejected` ends it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => warn!(error = %e, "reading CLOCK_MONOTONIC for MONOTONIC_USEC"),
    }
    send(&states);
}

/// A reload that was refused: the running config stays, and the agent is ready again.
pub fn reload_rejected(config: &Config) {
    let status = format!(
        "serving: {} (the last reload was rejected)",
        config.summary()
    );
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// The agent is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The watchdog of the agent's loop: ticks every half of `WATCHDOG_USEC` when systemd set one
/// for this process (`WatchdogSec=`), never otherwise. The loop pings (`ping`) on each tick.
pub struct Watchdog {
    interval: Option<Interval>,
}

impl Watchdog {
    pub fn from_env() -> Self {
        let period = ping_period(sd_notify::watchdog_enabled());
        if let Some(p) = period {
            info!(
                every_ms = p.as_millis() as u64,
                "pinging systemd's watchdog"
            );
        }
        Self::every(period)
    }

    fn every(period: Option<Duration>) -> Self {
        Self {
            interval: period.map(|p| {
                let mut i = tokio::time::interval(p);
                // A late loop pings once when it comes back, not a burst.
                i.set_missed_tick_behavior(MissedTickBehavior::Delay);
                i
            }),
        }
    }

    /// Waits for the next ping (for ever without a watchdog).
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn ping(&self) {
        send(&[NotifyState::Watchdog]);
    }
}

/// How often to ping a watchdog of `timeout`: half of it (as sd_watchdog_enabled(3)
/// advises); None without a watchdog or with a zero timeout.
fn ping_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero()).map(|t| t / 2)
}

fn send(states: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); going on without it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_watchdog_timeout() {
        assert_eq!(
            ping_period(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            ping_period(Some(Duration::from_micros(3))),
            Some(Duration::from_nanos(1500))
        );
        assert_eq!(ping_period(Some(Duration::ZERO)), None);
        assert_eq!(ping_period(None), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ticks_at_its_period_and_never_without_one() {
        let mut w = Watchdog::every(Some(Duration::from_secs(5)));
        let start = tokio::time::Instant::now();
        w.tick().await; // at once
        w.tick().await;
        w.tick().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        let mut none = Watchdog::every(None);
        let waited = tokio::time::timeout(Duration::from_secs(3600), none.tick()).await;
        assert!(waited.is_err(), "a watchdog without a period ticked");
    }
}
