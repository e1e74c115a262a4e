//! Test support: a packet builder, an independent checksum checker, pcap output, a private
//! network namespace per test, and a data plane loaded and provisioned through the agent's
//! own map writer.

pub mod bench;
pub mod cluster;
pub mod harness;
pub mod lab;
pub mod packet;
pub mod pcap;
pub mod topology;
pub mod world;
