//! The agent's library: config, health checks, target model, desired state, reconciler, map
//! writer and the control API. The `lb-agent` binary and the tests use the same code.

pub mod access_log;
pub mod agent;
pub mod announce;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dataplane;
pub mod expiry;
pub mod health;
pub mod links;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod route_epoch;
pub mod routes;
pub mod state;
pub mod statefile;
pub mod web;
pub mod xdp_log;
