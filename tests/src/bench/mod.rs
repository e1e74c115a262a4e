//! The pieces of `cargo xtask bench` (the `lb-bench` binary): end to end against nftables DNAT
//! and HAProxy, control-plane figures, map-writing figures, and the failover picture.

pub mod control;
pub mod e2e;
pub mod forward;
pub mod maps;
pub mod packet;
pub mod plot;
