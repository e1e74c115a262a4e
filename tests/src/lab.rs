//! A private network namespace for the calling thread, with interfaces, routes and static
//! neighbours, so that the program's FIB lookups see a known topology. The namespace goes away
//! with the thread: nothing is added to the root namespace and nothing is left behind.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a command in the calling thread's network namespace (children inherit it).
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("spawning `{cmd}`"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into a new, empty network namespace.
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (needs root)");
    }
    Ok(())
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}");
    }
    Ok(i)
}

/// The fixture topology, seen from the balancer:
///
/// ```text
///   clients 10.1.0.0/24, fd00:1::/64          targets 10.2.0.0/24, fd00:2::/64
///   (and 10.3.0.0/24 routed via 10.1.0.254)
///        ── cli0 [02:00:00:00:01:01] ─ balancer ─ bk0 [02:00:00:00:02:01] ──
/// ```
///
/// Static neighbours: every client and target below has a known MAC (`mac_of`), except
/// `TARGET_NO_NEIGH`. `ONE_ARM_TARGET` sits on the client side (XDP_TX).
pub struct Lab {
    pub cli: u32,
    pub bk: u32,
}

pub const CLI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const BK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const CLIENT4: &str = "10.1.0.2";
pub const CLIENT6: &str = "fd00:1::2";
pub const FAR_CLIENT4: &str = "10.3.0.2";
pub const ROUTER4: &str = "10.1.0.254";
pub const TARGET_NO_NEIGH: &str = "10.2.0.99";
pub const ONE_ARM_TARGET: &str = "10.1.0.50";
/// Addresses with static neighbour entries.
pub const NEIGHBOURS: [&str; 9] = [
    "10.1.0.2",
    "10.1.0.254",
    "10.1.0.50",
    "10.2.0.11",
    "10.2.0.12",
    "10.2.0.13",
    "fd00:1::2",
    "fd00:2::11",
    "fd00:2::12",
];

/// The MAC our static neighbour entry gives `ip`.
pub fn mac_of(ip: &str) -> [u8; 6] {
    let i = NEIGHBOURS
        .iter()
        .position(|n| *n == ip)
        .expect("a lab neighbour");
    [0x02, 0xaa, 0, 0, 0, i as u8 + 1]
}

impl Lab {
    /// Enters a fresh namespace and builds the topology in it.
    pub fn new() -> Result<Self> {
        enter_private_netns()?;
        sh("ip link set lo up")?;
        sh("ip link add cli0 address 02:00:00:00:01:01 type veth peer name cli1")?;
        sh("ip link add bk0 address 02:00:00:00:02:01 type veth peer name bk1")?;
        for i in ["cli0", "cli1", "bk0", "bk1"] {
            sh(&format!("ip link set {i} up"))?;
        }
        sh("ip addr add 10.1.0.1/24 dev cli0 && ip addr add 10.2.0.1/24 dev bk0")?;
        sh("ip -6 addr add fd00:1::1/64 dev cli0 nodad && ip -6 addr add fd00:2::1/64 dev bk0 nodad")?;
        sh("ip route add 10.3.0.0/24 via 10.1.0.254")?;
        sh("sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv6.conf.all.forwarding=1")?;
        for n in NEIGHBOURS {
            let dev = if n.starts_with("10.1.") || n.starts_with("fd00:1:") {
                "cli0"
            } else {
                "bk0"
            };
            let m = mac_of(n);
            let mac = m
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            sh(&format!(
                "ip neigh replace {n} lladdr {mac} dev {dev} nud permanent"
            ))?;
        }
        Ok(Self {
            cli: ifindex("cli0")?,
            bk: ifindex("bk0")?,
        })
    }
}
