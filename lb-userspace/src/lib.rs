//! The agent's library: config, health checks, desired state, reconciler, map writer and the
//! control API. The `lb-agent` binary and the tests use the same code.

pub mod config;
pub mod dataplane;
pub mod health;
pub mod maps;
