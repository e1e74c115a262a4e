//! Control-plane figures: consistent-hash build time, the agent's memory with 100 listeners and
//! 1,000 targets, and the kernel memory of its maps.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{
    harness::{poll, Balancer},
    topology::Topology,
};

/// Median milliseconds to build a 65,537-slot table over `n` targets of weight 1.
pub fn table_build_ms(n: usize) -> Result<f64> {
    let spec = super::table_spec(
        0..n as u32,
        |i| std::net::Ipv4Addr::from(0x0a00_0000 | i).into(),
        65_537,
    );
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let t = lb_userspace::reconcile::build_table(&spec).map(|t| t.len());
            (t, start.elapsed().as_secs_f64() * 1e3)
        })
        .map(|(t, ms)| t.map(|_| ms))
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// 100 listeners over 10 groups of 100 targets (10 listeners per group), default sizes
/// otherwise. Targets are addresses nothing answers for: their checks fail and every group
/// fails open, which is the most the agent has to hold.
fn big_config() -> String {
    let mut c = String::from(
        "[agent]\ninterfaces = [\"l0\", \"l1\"]\napi = \"unix:DIR/api.sock\"\nmetrics = \"127.0.0.1:9900\"\npin_path = \"DIR/bpf/lb\"\n",
    );
    for l in 0..100 {
        c.push_str(&format!(
            "\n[[listener]]\nname = \"l{l}\"\naddress = \"10.0.100.10\"\nport = {}\ntarget_group = \"g{}\"\n",
            1000 + l,
            l / 10
        ));
    }
    for g in 0..10 {
        c.push_str(&format!(
            "\n[[target_group]]\nname = \"g{g}\"\n\n[target_group.health_check]\ninterval = \"5s\"\ntimeout = \"1s\"\n"
        ));
        for t in 0..100 {
            c.push_str(&format!(
                "\n[[target_group.target]]\naddress = \"10.{}.{}.{}\"\nport = 8080\n",
                20 + g,
                t / 200,
                1 + t % 200
            ));
        }
    }
    c
}

pub struct Scale {
    pub rss_mib: f64,
    pub listeners: usize,
    pub targets: usize,
    /// (map, max entries, bytes of kernel memory)
    pub maps: Vec<(String, u64, u64)>,
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix(" kB")?
                .trim()
                .parse()
                .ok()
        })
        .context("VmRSS")
}

/// Starts the agent on the big config; its resident memory once every target has been checked,
/// and the kernel memory of its maps (bpftool's `bytes_memlock`).
pub fn scale() -> Result<Scale> {
    let topo = Topology::routed(0)?;
    let mut b = Balancer::start(topo, &big_config(), &[])?;
    b.log_on_drop = false;
    let checked = || -> Result<Option<usize>> {
        let s = b.status()?;
        let targets: Vec<_> = s.target_groups.iter().flat_map(|g| &g.targets).collect();
        Ok(
            (targets.len() == 1000 && targets.iter().all(|t| t.last_check.is_some()))
                .then_some(targets.len()),
        )
    };
    let targets = poll(Duration::from_secs(30), "every target checked", || {
        Ok(checked().ok().flatten())
    })?;
    let pid = b.topo.pid(b.agent.context("agent")?);
    let rss = rss_kib(pid)?;
    let mut maps = Vec::new();
    for name in lb_common::maps::ALL_MAPS {
        let pin = b.topo.bpffs().join("lb/maps").join(name);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin)
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool on {}", pin.display()))?;
        maps.push((
            name.to_string(),
            v["max_entries"].as_u64().unwrap_or(0),
            v["bytes_memlock"].as_u64().unwrap_or(0),
        ));
    }
    Ok(Scale {
        rss_mib: rss as f64 / 1024.0,
        listeners: 100,
        targets,
        maps,
    })
}
