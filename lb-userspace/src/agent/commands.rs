//! What the control API asks of the agent: typed commands, each with a one-shot reply, sent to
//! the one loop that owns the controller (`run`), and how the loop carries them out.

use std::time::Instant;

use axum::http::StatusCode;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::Agent;
use crate::{
    api::{
        DrainRequest, DrainStatus, Plan, PlanRequest, ReloadReply, Status, TargetReply,
        TargetRequest,
    },
    config,
    control::{self, Refused},
    model::TargetKey,
    plan,
};

/// A command for the agent's loop; the loop answers on its one-shot sender.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    /// The Prometheus page.
    Metrics(oneshot::Sender<String>),
    Register(TargetRequest, oneshot::Sender<Outcome<TargetReply>>),
    Deregister(TargetRequest, oneshot::Sender<Outcome<TargetReply>>),
    /// Re-read the config file.
    Reload(oneshot::Sender<Outcome<ReloadReply>>),
    /// What a config would change (`lb-agent plan`, `reload --dry-run`).
    Plan(PlanRequest, oneshot::Sender<Outcome<Plan>>),
    /// `lb-agent drain`: withdraw the VIPs (or announce them again), then its progress.
    Drain(DrainRequest, oneshot::Sender<Outcome<DrainStatus>>),
    DrainStatus(oneshot::Sender<DrainStatus>),
}

/// A command's result: its answer, or why it was refused (the HTTP status and the message).
pub type Outcome<T> = Result<T, Failure>;

/// A refused or failed command: the status it is answered with and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    pub error: String,
}

impl Failure {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
}

impl Agent {
    /// Carries out one command; an answer to a call that changed the maps waits for the tables
    /// it needs (`answer_when_published`).
    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Metrics(reply) => {
                let _ = reply.send(self.metrics_page());
            }
            Command::Register(request, reply) => {
                let outcome = self.target_call(request, true);
                self.answer_when_published(reply, outcome);
            }
            Command::Deregister(request, reply) => {
                let outcome = self.target_call(request, false);
                self.answer_when_published(reply, outcome);
            }
            Command::Reload(reply) => {
                let outcome = self.reload();
                self.answer_when_published(reply, outcome);
            }
            Command::Plan(request, reply) => self.plan(request, reply),
            Command::Drain(request, reply) => {
                let _ = reply.send(self.drain(request));
            }
            Command::DrainStatus(reply) => {
                let _ = reply.send(self.drain_status());
            }
        }
    }

    /// Previews a config: the tables and fates now, in the loop; the live flows counted on a
    /// blocking thread with handles of its own, then the answer.
    fn plan(&mut self, request: PlanRequest, reply: oneshot::Sender<Outcome<Plan>>) {
        let (config, name) = match &request.config {
            Some(text) => {
                let name = request.path.clone().unwrap_or_else(|| "NEW".into());
                (config::parse(text, &name), name)
            }
            None => {
                let name = self.config_path.display().to_string();
                (config::load(&self.config_path), name)
            }
        };
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(Failure::bad_request(format!(
                    "the config is invalid:\n{e}"
                ))));
                return;
            }
        };
        let pending = match plan::plan(&self.ctl, config, &name, Instant::now()) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(Failure::bad_request(format!("{e:#}"))));
                return;
            }
        };
        let table = match self.dp.maps.flow_table() {
            Ok(t) => t,
            Err(e) => {
                let _ = reply.send(Err(Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("opening the flow table: {e:#}"),
                )));
                return;
            }
        };
        tokio::spawn(async move {
            let counted = tokio::task::spawn_blocking(move || plan::count_live(&table)).await;
            let answer = match counted {
                Ok(Ok(live)) => Ok(pending.with_flows(&live)),
                Ok(Err(e)) => Err(Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("counting live flows: {e:#}"),
                )),
                Err(e) => Err(Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("counting live flows: {e}"),
                )),
            };
            let _ = reply.send(answer);
        });
    }

    /// Answers a call that changed the maps only once the tables it needs are published (a
    /// caller that registers or deregisters a target can rely on the tables following).
    fn answer_when_published<T: 'static>(&mut self, reply: oneshot::Sender<T>, answer: T) {
        if self.building {
            // Its tables are in the running round, or in the next one.
            let in_round = self
                .ctl
                .reconciler
                .pending()
                .iter()
                .all(|s| self.round_specs.contains(s));
            let needs = self.build_round + u64::from(!in_round);
            self.held.push((
                needs,
                Box::new(move || {
                    let _ = reply.send(answer);
                }),
            ));
        } else {
            let _ = reply.send(answer);
        }
    }

    pub(super) fn reload(&mut self) -> Outcome<ReloadReply> {
        let config = match config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                warn!(
                    problems = e.problems.len(),
                    "reload: the config is invalid; the running config stays\n{e}"
                );
                return Err(Failure::bad_request(format!(
                    "the new config is invalid; the running config stays:\n{e}"
                )));
            }
        };
        let mut config = config;
        let (agent, notes) = control::reloaded_agent(&self.ctl.config.agent, &config.agent);
        config.agent = agent;
        let now = Instant::now();
        if let Err(e) = self.ctl.reload(config, now) {
            return Err(Failure::bad_request(format!("{e:#}")));
        }
        self.lookup_new_routes();
        if let Some(log) = &self.access_log {
            // A new path, or (logrotate) the same file moved away: write to the path afresh.
            log.set_path(self.ctl.config.agent.access_log.clone());
            log.reopen();
        }
        let took = self.apply(now, "reload");
        self.sync_checkers();
        for n in &notes {
            warn!("reload: {n}");
        }
        info!(config = %self.config_path.display(), "config reloaded");
        Ok(ReloadReply {
            ok: true,
            summary: self.ctl.config.summary(),
            notes,
            maps_written_ms: took.map(|d| d.as_secs_f64() * 1000.0),
        })
    }

    fn target_call(&mut self, request: TargetRequest, register: bool) -> Outcome<TargetReply> {
        let key = TargetKey {
            group: request.group,
            addr: request.target.ip(),
            port: request.target.port(),
        };
        let now = Instant::now();
        let result = if register {
            self.ctl.register(key.clone(), request.weight, request.zone)
        } else {
            self.ctl.deregister(&key, now)
        };
        if let Err(e) = result {
            // 400, or 409 for a registration the running config or a limit refuses.
            let status = e
                .downcast_ref::<Refused>()
                .and_then(|r| StatusCode::from_u16(r.status).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            return Err(Failure::new(status, format!("{e:#}")));
        }
        info!(target = %key, "{}", if register { "target registered" } else { "target deregistered (draining)" });
        if register {
            self.lookup_new_routes();
        }
        let took = self.apply(now, if register { "register" } else { "deregister" });
        self.sync_checkers();
        match took {
            Some(d) => Ok(TargetReply {
                ok: true,
                target: key.to_string(),
                maps_written_ms: d.as_secs_f64() * 1000.0,
            }),
            None => Err(Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "writing the maps failed (see the agent's log); retrying",
            )),
        }
    }
}
