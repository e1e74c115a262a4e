//! The agent's controller on a real data plane across many reloads: a blue/green rename of the
//! target group and a change of its table size on every reload, each reconciled into the
//! kernel's maps, and after each the real program still balances new flows over every target.

use std::{collections::BTreeMap, time::Instant};

use anyhow::{ensure, Context, Result};
use lb_common::maps::PROGRAM_XDP;
use lb_tests::{
    lab::{Lab, CLIENT4},
    packet::{Packet, TCP_SYN},
    world::run_prog,
};
use lb_userspace::{
    config::{self, Config},
    control::Controller,
    dataplane::{self, MapSizes},
    maps::KernelMaps,
};

const XDP_REDIRECT: u32 = 4;
const VIP: &str = "10.9.0.10";
const TARGETS: [&str; 3] = ["10.2.0.11", "10.2.0.12", "10.2.0.13"];
/// The group's `hash_table_size`, by reload.
const SIZES: [u32; 4] = [65_537, 32_771, 65_521, 16_381];
const RELOADS: usize = 100;
/// New flows per reload.
const FLOWS: u16 = 48;

/// The config of reload `n`: the listener's group is "blue-N".
fn config(n: usize) -> Result<Config> {
    let mut c = format!(
        r#"[agent]
interfaces = ["cli0", "bk0"]
target_interfaces = ["bk0"]

[[listener]]
name = "web"
address = "{VIP}"
port = 80
target_group = "blue-{n}"

[[target_group]]
name = "blue-{n}"
hash_table_size = {}
"#,
        SIZES[n % SIZES.len()]
    );
    for t in TARGETS {
        c.push_str(&format!(
            "\n[[target_group.target]]\naddress = \"{t}\"\nport = 8080\n"
        ));
    }
    config::parse(&c, &format!("reload-{n}.toml")).with_context(|| format!("config {n}:\n{c}"))
}

#[test]
fn a_hundred_blue_green_reloads_keep_every_target_serving() -> Result<()> {
    let lab = Lab::new()?;
    let first = config(0)?;
    let mut ebpf = dataplane::load(MapSizes {
        flow_table: 65_536,
        table_slots: lb_userspace::agent::table_slots(&first),
    })?;
    let mut maps = KernelMaps::new(&mut ebpf)?;
    let interfaces = BTreeMap::from([("cli0".to_string(), lab.cli), ("bk0".to_string(), lab.bk)]);
    // No health checks run: the targets stay initial, and the group fails open over all of
    // them.
    let mut ctl = Controller::new(first, [7, 11], interfaces, Instant::now())?;
    ctl.reconcile(&mut maps, Instant::now())
        .context("the first reconcile")?;
    let mut sport = 10_000u16;
    for n in 0..=RELOADS {
        if n > 0 {
            ctl.reload(config(n)?, Instant::now())
                .with_context(|| format!("reload {n}"))?;
            ctl.reconcile(&mut maps, Instant::now())
                .with_context(|| format!("reconcile after reload {n} (group blue-{n})"))?;
        }
        let prog = dataplane::program_mut(&mut ebpf, PROGRAM_XDP)?;
        let mut served: BTreeMap<String, u32> = BTreeMap::new();
        for _ in 0..FLOWS {
            sport += 1;
            let syn = Packet::tcp(CLIENT4, sport, VIP, 80, TCP_SYN).bytes();
            let (action, out) = run_prog(prog, lab.cli, &syn)?;
            ensure!(
                action == XDP_REDIRECT,
                "reload {n}: a SYN from port {sport} got action {action}, not a redirect"
            );
            let dst = std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            *served.entry(dst.to_string()).or_default() += 1;
        }
        let expected: Vec<&str> = TARGETS.to_vec();
        ensure!(
            served.keys().map(String::as_str).collect::<Vec<_>>() == expected,
            "reload {n} (group blue-{n}, {} slots): {FLOWS} new flows went to {served:?}, not to each of {expected:?}",
            SIZES[n % SIZES.len()]
        );
    }
    Ok(())
}
