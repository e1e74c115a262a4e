//! Upkeep the agent does on its own: sweeps of idle flows, the routes to the targets (looked up
//! for new targets, re-checked periodically) and the XDP links of `agent.interfaces`.

use std::{collections::BTreeMap, collections::BTreeSet, time::Instant};

use lb_common::PROTO_UDP;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{interface_name, Agent, RouteCheck, RETRY_AFTER};
use crate::{
    datapath::LinkState,
    expiry::{self, ExpiryPlan, ListenerTimeouts, Sweep},
    links::{self, Watch},
    maps::FlowTable,
    routes::{Answer, RouteNote},
};

fn log_route_notes(notes: &[RouteNote], interfaces: &BTreeMap<String, u32>) {
    for n in notes {
        match n {
            RouteNote::Useless {
                addr,
                answer: Answer::NoRoute,
            } => warn!(
                address = %addr,
                "no route to the target: it makes no interface face targets"
            ),
            RouteNote::Useless {
                addr,
                answer: Answer::Failed(e),
            } => warn!(
                address = %addr,
                error = %e,
                "route lookup failed: the target makes no interface face targets"
            ),
            RouteNote::Useless {
                addr,
                answer: Answer::Via(i),
            } => warn!(
                address = %addr,
                interface = %interface_name(interfaces, *i),
                "the target is routed out of an interface XDP is not attached to: it makes no interface face targets"
            ),
            RouteNote::Routed { addr, ifindex } => info!(
                address = %addr,
                interface = %interface_name(interfaces, *ifindex),
                "the target is now routed out of an attached interface"
            ),
        }
    }
}

impl Agent {
    /// Starts a sweep of the flow table on a blocking thread (unless one is still running);
    /// its result comes back through `done`.
    pub(super) fn start_sweep(&mut self, done: &mpsc::Sender<(FlowTable, Sweep)>) {
        let Some(mut table) = self.flow_table.take() else {
            return; // the last sweep is still running
        };
        let model = &self.ctl.model;
        let plan = ExpiryPlan {
            listeners: self
                .ctl
                .config
                .listeners
                .iter()
                .filter_map(|l| {
                    let t = ListenerTimeouts {
                        name: l.name.clone(),
                        tcp: l.idle_timeout_for(lb_common::PROTO_TCP),
                        udp: l.idle_timeout_for(PROTO_UDP),
                    };
                    Some((model.listener_ids.get(&l.name)?, t))
                })
                .collect(),
            targets: self
                .ctl
                .reconciler
                .shadow()
                .targets
                .iter()
                .map(|(&id, t)| (id, (t.addr, t.port_be)))
                .collect(),
            access_log: self.access_log.is_some() && !self.ctl.config.agent.access_log.is_empty(),
        };
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let sweep = expiry::sweep(&mut table, &plan, expiry::now_ticks());
            let _ = done.blocking_send((table, sweep));
        });
    }

    /// Looks up the routes of targets that have none yet (start, reload, register), unless the
    /// periodic re-check has the lookup (it looks them up when it returns).
    pub(super) fn lookup_new_routes(&mut self) {
        let Some(lookup) = self.route_lookup.as_mut() else {
            return;
        };
        let notes = self.ctl.lookup_routes(lookup, false);
        log_route_notes(&notes, &self.ctl.interfaces);
    }

    /// Asks for the route of every target again on a blocking thread (a route that changed
    /// moves the interface roles); the answers come back through `done`.
    pub(super) fn start_route_check(&mut self, done: &mpsc::Sender<RouteCheck>) {
        let queries = self.ctl.route_queries(true);
        if queries.is_empty() {
            return;
        }
        let Some(mut lookup) = self.route_lookup.take() else {
            return; // the last check is still running
        };
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            use crate::routes::RouteLookup;
            let answers = queries
                .into_iter()
                .map(|a| (a, lookup.egress(a).into()))
                .collect();
            let _ = done.blocking_send((lookup, answers));
        });
    }

    pub(super) fn route_check_done(&mut self, (lookup, answers): RouteCheck) {
        self.route_lookup = Some(lookup);
        let notes = self.ctl.routes_answered(answers);
        log_route_notes(&notes, &self.ctl.interfaces);
        self.lookup_new_routes(); // targets registered while the check ran
        self.apply(Instant::now(), "routes");
    }

    /// Link notifications (or a resync): an interface of `agent.interfaces` that no longer runs
    /// our program through its pin is attached afresh, and the maps follow its ifindex
    /// (`LB_IFACES`, `LB_DEVMAP`); one that is gone is said once. True when the routes to the
    /// targets are worth asking again (an attached interface changed).
    pub(super) fn on_links(&mut self, watch: Watch) -> bool {
        let (names, touched): (BTreeSet<String>, bool) = match watch {
            Watch::Events(events) => (
                links::due(&events, &self.ctl.interfaces, self.dp.prog_id),
                links::touches(&events, &self.ctl.interfaces),
            ),
            Watch::Resync(why) => {
                debug!(why, "checking every interface's XDP link");
                (self.ctl.interfaces.keys().cloned().collect(), false)
            }
        };
        let mut moved = false;
        for name in names {
            let (index, fresh) = match self.dp.ensure_attached(&name) {
                Ok(LinkState::Missing) => {
                    if self.links.as_mut().is_some_and(|l| l.gone(&name)) {
                        warn!(interface = %name, "interface gone: XDP is attached again when an interface of that name is back (its pin stays)");
                    }
                    continue;
                }
                Ok(LinkState::Serving(i)) => (i, false),
                Ok(LinkState::Reattached(i)) => (i, true),
                Err(e) => {
                    error!(interface = %name, error = %format!("{e:#}"), "attaching XDP afresh failed; retrying in 1 s");
                    if let Some(l) = self.links.as_mut() {
                        l.recheck_after(RETRY_AFTER);
                    }
                    continue;
                }
            };
            if self.links.as_mut().is_some_and(|l| l.back(&name)) {
                info!(interface = %name, ifindex = index, "interface back");
            }
            let old = self.ctl.interfaces.insert(name.clone(), index);
            if old != Some(index) {
                moved = true;
            } else if fresh {
                // The same ifindex again (moved in from another namespace): the kernel dropped
                // its LB_DEVMAP entry with the old interface; the reconciler writes it again.
                self.ctl.reconciler.doubt_interface(index);
                moved = true;
            }
        }
        if moved {
            self.apply(Instant::now(), "interfaces");
        }
        touched || moved
    }

    pub(super) fn sweep_done(&mut self, table: FlowTable, sweep: Sweep) {
        if sweep.expired > 0 {
            debug!(expired = sweep.expired, "idle flows expired");
        }
        self.active_flows = sweep.active;
        self.flow_table = Some(table);
        if let Some(log) = &self.access_log {
            log.swept(sweep.logged);
        }
    }
}
