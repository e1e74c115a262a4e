//! The one definition of the kernel/user ABI of the balancer, plus the pure logic both sides
//! share: checksum arithmetic, the keyed flow hash and (host only) the Maglev table builder.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size assertion; no
//! `bool`, enum or `Option` crosses the boundary. Addresses are kept as `[u32; 4]` holding the
//! raw network-order bytes (an IPv4 address uses word 0, the rest zero); ports are `*_be`.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod csum;
pub mod hash;
pub mod maps;
pub mod types;

#[cfg(feature = "std")]
pub mod addr;
#[cfg(feature = "std")]
pub mod maglev;

pub use types::*;
