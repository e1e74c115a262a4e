//! Scale-out in the agent's loop: after every change the VIPs' wanted announcements go to the
//! announcer task (`crate::announce`); `lb-agent drain` withdraws them and follows the client
//! traffic until the router sends nothing here; a stop withdraws them before XDP detaches.

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime},
};

use axum::http::StatusCode;
use tracing::{info, warn};

use super::{Agent, Failure, Outcome};
use crate::{
    announce::{self, Announcer, NodeMode},
    api::{DrainRequest, DrainStatus, DRAIN_QUIET_S},
};

/// A drain in progress.
pub(super) struct Drain {
    since: Instant,
    since_wall: SystemTime,
    /// (when, client packets, reply packets, new flows) summed over listeners, every
    /// `DRAIN_SAMPLE`, the last second of them.
    samples: VecDeque<(Instant, [u64; 3])>,
    last_client_packet: Instant,
    /// Logged as done.
    reported: bool,
}

/// How often the traffic is sampled while draining or stopping.
pub(super) const DRAIN_SAMPLE: Duration = Duration::from_millis(100);
/// At a stop, the client traffic counts as over after this long without a packet.
const STOP_QUIET: Duration = Duration::from_millis(200);

impl Agent {
    fn node_mode(&self) -> NodeMode {
        if self.stopping {
            NodeMode::Stopping
        } else if self.drain.is_some() {
            NodeMode::Draining
        } else {
            NodeMode::Serving
        }
    }

    /// Tells the announcer what to announce now (starting it when `[announce]` turned on).
    pub(super) fn follow_announcements(&mut self) {
        let settings = &self.ctl.config.announce;
        if !settings.enabled() && self.announcer.is_none() {
            return; // never on: nothing to work out after each reconciliation
        }
        let mut vips = announce::wanted(&self.ctl.config, &self.ctl.model, self.node_mode());
        if !settings.enabled() {
            // Off (from the start, or since a reload): whatever was announced is withdrawn,
            // through the settings it was announced with.
            if let Some((a, last)) = &self.announcer {
                vips.values_mut().for_each(|w| *w = announce::Why::Stopping);
                a.set(last, vips);
            }
            return;
        }
        match &mut self.announcer {
            Some((a, last)) => {
                a.set(settings, vips);
                *last = settings.clone();
            }
            None => {
                info!(socket = %settings.bird_socket, file = %settings.bird_config, "announcing the VIPs through BIRD while this node can serve them");
                self.announcer = Some((Announcer::start(settings.clone(), vips), settings.clone()));
            }
        }
    }

    pub(super) fn announcing(&self) -> bool {
        self.ctl.config.announce.enabled() && self.announcer.is_some()
    }

    /// `POST /v1/drain`: withdraw every VIP (or, with `cancel`, announce again).
    pub(super) fn drain(&mut self, request: DrainRequest) -> Outcome<DrainStatus> {
        if !self.announcing() {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "nothing is announced here: [announce] bird_socket is empty, so a drain could not withdraw the VIPs (take this node out of the router's paths another way)",
            ));
        }
        if request.cancel {
            if self.drain.take().is_some() {
                info!(
                    "drain cancelled: the VIPs are announced again while this node can serve them"
                );
            }
        } else if self.drain.is_none() {
            let now = Instant::now();
            let totals = self.traffic_totals();
            info!("draining: every VIP withdrawn; flows that still arrive are forwarded");
            self.drain = Some(Drain {
                since: now,
                since_wall: SystemTime::now(),
                samples: VecDeque::from([(now, totals)]),
                last_client_packet: now,
                reported: false,
            });
        }
        self.follow_announcements();
        Ok(self.drain_status())
    }

    pub(super) fn drain_status(&self) -> DrainStatus {
        let Some(d) = &self.drain else {
            return DrainStatus::default();
        };
        // BIRD's confirmation, and how long after the decision (the drain command) it came.
        let (withdrawn, after) = self
            .announcer
            .as_ref()
            .map_or((false, None), |(a, _)| a.confirmed());
        let per_s = |i: usize| match (d.samples.front(), d.samples.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                ((b.1[i] - a.1[i]) as f64 / (b.0 - a.0).as_secs_f64()).round() as u64
            }
            _ => 0,
        };
        let quiet = d.last_client_packet.elapsed().as_secs_f64();
        DrainStatus {
            draining: true,
            since: Some(humantime::format_rfc3339_millis(d.since_wall).to_string()),
            elapsed_s: d.since.elapsed().as_secs_f64(),
            withdrawn,
            withdrawn_after_ms: after.filter(|_| withdrawn).map(|t| t.as_secs_f64() * 1e3),
            client_packets_per_s: per_s(0),
            reply_packets_per_s: per_s(1),
            new_flows_per_s: per_s(2),
            quiet_for_s: quiet,
            timeout_s: self.ctl.config.announce.drain_timeout.0.as_secs_f64(),
            done: withdrawn && quiet >= DRAIN_QUIET_S,
        }
    }

    /// Client packets, replies and new flows of every listener, since the data plane started.
    fn traffic_totals(&self) -> [u64; 3] {
        self.listener_stats().values().fold([0; 3], |t, s| {
            [
                t[0] + s.in_packets,
                t[1] + s.out_packets,
                t[2] + s.new_flows,
            ]
        })
    }

    /// While draining: one sample of the traffic (the last second kept); the drain's end
    /// logged once.
    pub(super) fn sample_drain(&mut self) {
        let totals = self.traffic_totals();
        let Some(d) = self.drain.as_mut() else {
            return;
        };
        let now = Instant::now();
        if d.samples.back().is_some_and(|(_, b)| totals[0] > b[0]) {
            d.last_client_packet = now;
        }
        d.samples.push_back((now, totals));
        while d
            .samples
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_secs(1))
        {
            d.samples.pop_front();
        }
        let status = self.drain_status();
        let d = self.drain.as_mut().expect("draining");
        if status.done && !d.reported {
            d.reported = true;
            info!(
                after_s = format!("{:.1}", status.elapsed_s),
                withdrawn_ms = status.withdrawn_after_ms.map(|m| format!("{m:.1}")),
                reply_packets_per_s = status.reply_packets_per_s,
                "drained: no client packet for a second; the node can stop (replies still pass while targets route through it)"
            );
        }
    }

    /// Before a stop that detaches XDP: every VIP withdrawn (BIRD confirms), then forwarding
    /// goes on while client packets still arrive (the router's update on its way), at most
    /// `announce.withdraw_grace`.
    pub(super) async fn withdraw_before_stop(&mut self) {
        if !self.announcing() {
            return;
        }
        self.stopping = true;
        self.follow_announcements();
        let started = Instant::now();
        let grace = self.ctl.config.announce.withdraw_grace.0;
        let settled = match &self.announcer {
            Some((a, _)) => a.settled(grace.max(Duration::from_secs(1))).await,
            None => false,
        };
        if !settled {
            warn!("stopping: BIRD did not confirm the withdrawal of the VIPs; detaching anyway");
        }
        let mut last = self.traffic_totals()[0];
        let mut quiet_since = Instant::now();
        while started.elapsed() < grace && quiet_since.elapsed() < STOP_QUIET {
            tokio::time::sleep(DRAIN_SAMPLE / 2).await;
            let now = self.traffic_totals()[0];
            if now != last {
                quiet_since = Instant::now();
                last = now;
            }
        }
        info!(
            withdrawn = settled,
            after_ms = started.elapsed().as_millis() as u64,
            "stopping: VIPs withdrawn; client traffic over (or withdraw_grace passed)"
        );
    }
}
