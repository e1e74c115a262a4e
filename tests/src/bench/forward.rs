//! Forwarding capacity on one core, with frames injected the way a NIC hands them to XDP.
//!
//! `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` runs the bench object's
//! `lb_bench_gen` on `repeat` frames as if received on the balancer's client-side interface
//! (`cli0`, `ingress_ifindex`) of a private namespace (`lab::Lab`); the kernel then carries out
//! each verdict for real: XDP_REDIRECT transmits to the target-side veth `bk0`, XDP_PASS hands
//! the frame to the stack as received on `cli0`. The generator writes each frame from a
//! template first (live-frame pages are recycled without their contents being restored) and
//! tail-calls the program under test. `lb_bench_sink`, attached in native mode to `bk1` (the
//! peer of `bk0`), counts the frames that arrive with the expected destination and drops them.
//!
//! Per case and round: the kernel-measured time per frame (it covers the generator, the
//! program under test, the redirect or the stack, and the sink's softirq on the same CPU).
//! After every round the counts are checked: every frame sent reached the sink with the
//! expected destination address and port, the generator's tail call never failed, and the
//! stack received exactly the frames it should (none on the XDP paths: IPv4 `InReceives` of
//! the namespace).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use lb_common::maps::{DEFAULT_FLOW_TABLE_SIZE, PROGRAM_XDP};
use lb_userspace::dataplane;

use crate::{
    bench::packet::pin_to_cpu,
    harness::poll,
    lab::{sh, Lab, CLIENT4},
    packet::{Packet, TCP_ACK, TCP_SYN},
    world::{World, VIP4},
};

/// The bench-only XDP object (lb-bench-ebpf), built by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-xdp"));

/// lb-bench-ebpf's constants (its `Template`, `GEN_F_NEW_FLOWS`, `C_*`).
const FRAME_LEN: usize = 64;
const GEN_F_NEW_FLOWS: u32 = 1;
const C_SINK_GOOD: u32 = 0;
const C_SINK_BAD: u32 = 1;
const C_GEN_TAIL_FAILED: u32 = 3;

/// The target-side network the nftables rule and the balancer forward to.
const TARGET: &str = "10.2.0.11";
const TARGET_PORT: u16 = 8080;

/// The CPU the measuring thread is pinned to.
pub const CPU: usize = 0;

#[derive(Clone, Copy, PartialEq)]
enum Next {
    /// `lb_bench_redirect`: straight to `bk0`.
    Redirect,
    /// The balancer's `lb_xdp`.
    Balancer,
    /// `lb_bench_pass`: to the stack.
    Pass,
}

#[derive(Clone, Copy)]
enum Setup {
    None,
    /// A route to the VIP through the target.
    Route,
    /// nftables DNAT of the VIP to the target (and the route, harmless once DNATed).
    Nft,
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    new_flows: bool,
    next: Next,
    setup: Setup,
    /// The destination the sink accepts: address, prefix length, port.
    expect: (&'static str, u32, u16),
}

/// One row: name, ns/frame of each round (sorted), frames per round.
pub struct Row {
    pub name: &'static str,
    pub ns: Vec<f64>,
    pub frames: u32,
}

impl Row {
    pub fn median(&self) -> f64 {
        self.ns[self.ns.len() / 2]
    }
    pub fn mpps(&self) -> f64 {
        1e3 / self.median()
    }
}

/// A 64-byte frame from the client to the VIP (what `lb_bench_gen` writes).
fn frame(mut p: Packet) -> Vec<u8> {
    let head = p.bytes().len() - p.payload.len();
    p.payload = vec![0; FRAME_LEN - head];
    let f = p.bytes();
    assert_eq!(f.len(), FRAME_LEN);
    f
}

fn cases() -> Vec<Case> {
    let tcp = frame(Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_ACK));
    let syn = frame(Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN));
    let udp = frame(Packet::udp(CLIENT4, 40000, VIP4, 80));
    let rewritten = ("10.2.0.0", 24, TARGET_PORT);
    let routed = (VIP4, 32, 80);
    let dnat = (TARGET, 32, TARGET_PORT);
    let case = |name, frame: &Vec<u8>, new_flows, next, setup, expect| Case {
        name,
        frame: frame.clone(),
        new_flows,
        next,
        setup,
        expect,
    };
    vec![
        case(
            "floor: empty program, XDP_REDIRECT",
            &tcp,
            false,
            Next::Redirect,
            Setup::None,
            routed,
        ),
        case(
            "this balancer, established TCP flow",
            &tcp,
            false,
            Next::Balancer,
            Setup::None,
            rewritten,
        ),
        case(
            "this balancer, established UDP flow",
            &udp,
            false,
            Next::Balancer,
            Setup::None,
            rewritten,
        ),
        case(
            "this balancer, a new TCP flow per frame",
            &syn,
            true,
            Next::Balancer,
            Setup::None,
            rewritten,
        ),
        case(
            "kernel routing (XDP_PASS, forwarded by the stack)",
            &tcp,
            false,
            Next::Pass,
            Setup::Route,
            routed,
        ),
        case(
            "nftables DNAT, established TCP flow",
            &tcp,
            false,
            Next::Pass,
            Setup::Nft,
            dnat,
        ),
        case(
            "nftables DNAT, established UDP flow",
            &udp,
            false,
            Next::Pass,
            Setup::Nft,
            dnat,
        ),
    ]
}

/// The sum over CPUs of a bench counter.
fn counter(bench: &Ebpf, index: u32) -> Result<u64> {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(bench.map("BENCH_COUNTERS").context("BENCH_COUNTERS")?)?;
    Ok(map.get(&index, 0)?.iter().sum())
}

/// IPv4 packets the calling thread's namespace received (`Ip: InReceives`).
fn ip_in_receives() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").context("reading snmp")?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (
        ip.next().context("Ip: names")?,
        ip.next().context("Ip: values")?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .context("no InReceives")?;
    values
        .split_whitespace()
        .nth(at)
        .context("InReceives value")?
        .parse()
        .context("InReceives")
}

fn load_xdp<'a>(bench: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let p: &mut Xdp = bench
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    p.load().with_context(|| format!("loading {name}"))?;
    Ok(p)
}

/// Measures every case, `rounds` rounds of `frames` frames each, on the calling thread
/// (pinned to `CPU` and moved to a private network namespace: run it on a thread of its own).
/// `only` keeps the cases whose name starts with one of its prefixes (empty: all).
pub fn run(frames: u32, rounds: usize, only: &[&str]) -> Result<Vec<Row>> {
    pin_to_cpu(CPU)?;
    let lab = Lab::new()?;
    // The balancer, provisioned by the agent's reconciler from inside this namespace, so that
    // LB_DEVMAP holds this namespace's ifindexes.
    let mut world = World::with_flow_table(DEFAULT_FLOW_TABLE_SIZE)?;
    let mut bench = Ebpf::load(OBJECT).context("loading the bench object")?;
    for name in ["lb_bench_gen", "lb_bench_redirect", "lb_bench_pass"] {
        load_xdp(&mut bench, name)?;
    }
    load_xdp(&mut bench, "lb_bench_sink")?
        .attach("bk1", XdpMode::Driver)
        .context("attaching the sink to bk1")?;
    DevMap::try_from(bench.map_mut("BENCH_DEVMAP").context("BENCH_DEVMAP")?)?
        .set(0, lab.bk, None, 0)
        .context("BENCH_DEVMAP")?;
    sh(&format!("ip route add {VIP4}/32 via {TARGET} dev bk0"))?;

    let md: [u32; 6] = [0, FRAME_LEN as u32, 0, lab.cli, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut rows = Vec::new();
    for case in cases() {
        if !only.is_empty() && !only.iter().any(|p| case.name.starts_with(p)) {
            continue;
        }
        // What runs after the generator.
        let next_fd = match case.next {
            Next::Balancer => dataplane::program_mut(&mut world.ebpf, PROGRAM_XDP)?
                .fd()?
                .try_clone()?,
            Next::Redirect => xdp(&mut bench, "lb_bench_redirect")?.fd()?.try_clone()?,
            Next::Pass => xdp(&mut bench, "lb_bench_pass")?.fd()?.try_clone()?,
        };
        ProgramArray::try_from(bench.map_mut("BENCH_NEXT").context("BENCH_NEXT")?)?
            .set(0, &next_fd, 0)
            .context("BENCH_NEXT")?;
        let mut template = [0u8; FRAME_LEN + 8];
        template[..FRAME_LEN].copy_from_slice(&case.frame);
        let l4_csum_off: u32 = if case.frame[23] == 6 { 50 } else { 40 };
        template[FRAME_LEN..FRAME_LEN + 4].copy_from_slice(&l4_csum_off.to_ne_bytes());
        let flags = if case.new_flows { GEN_F_NEW_FLOWS } else { 0 };
        template[FRAME_LEN + 4..].copy_from_slice(&flags.to_ne_bytes());
        Array::<_, [u8; FRAME_LEN + 8]>::try_from(
            bench.map_mut("BENCH_TEMPLATE").context("BENCH_TEMPLATE")?,
        )?
        .set(0, template, 0)?;
        let (addr, prefix, port) = case.expect;
        let addr: std::net::Ipv4Addr = addr.parse()?;
        let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
        let expect: [u32; 3] = [
            u32::from_ne_bytes(addr.octets()),
            u32::from_ne_bytes(mask.to_be_bytes()),
            u16::from_ne_bytes(port.to_be_bytes()) as u32,
        ];
        Array::<_, [u32; 3]>::try_from(bench.map_mut("BENCH_EXPECT").context("BENCH_EXPECT")?)?
            .set(0, expect, 0)?;
        if let Setup::Nft = case.setup {
            sh("nft add table ip lbbench")?;
            sh("nft 'add chain ip lbbench pre { type nat hook prerouting priority dstnat; }'")?;
            for proto in ["tcp", "udp"] {
                sh(&format!(
                    "nft add rule ip lbbench pre ip daddr {VIP4} {proto} dport 80 dnat to {TARGET}:{TARGET_PORT}"
                ))?;
            }
        }
        if case.next == Next::Balancer && !case.new_flows {
            // The flow's first packet (a SYN for TCP), so that every measured frame hits it.
            let mut first = case.frame.clone();
            if first[23] == 6 {
                first = frame(Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN));
            }
            let (action, _) = world.run(lab.cli, &first)?;
            ensure!(
                action == 4,
                "{}: the flow's first packet: action {action}",
                case.name
            );
        }
        // One frame first: the conntrack entry of the nftables cases is confirmed before a
        // batch arrives (a batch's frames would otherwise each make one, and all but the first
        // be dropped as clashes).
        send(&mut bench, &case, &ctx, 1)?;
        let mut ns = Vec::new();
        for _ in 0..rounds {
            ns.push(send(&mut bench, &case, &ctx, frames)?);
        }
        if let Setup::Nft = case.setup {
            sh("nft delete table ip lbbench")?;
        }
        ns.sort_by(f64::total_cmp);
        rows.push(Row {
            name: case.name,
            ns,
            frames,
        });
    }
    Ok(rows)
}

/// Sends `frames` frames of `case` through the generator and checks where they went: every
/// one at the sink with the expected destination, no tail call failed, the stack received the
/// frames of the XDP_PASS cases and no others. Returns the kernel-measured ns per frame.
fn send(bench: &mut Ebpf, case: &Case, ctx: &[u8], frames: u32) -> Result<f64> {
    let (addr, prefix, port) = case.expect;
    let (good0, bad0, failed0) = (
        counter(bench, C_SINK_GOOD)?,
        counter(bench, C_SINK_BAD)?,
        counter(bench, C_GEN_TAIL_FAILED)?,
    );
    let stack0 = ip_in_receives()?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&case.frame);
    opts.ctx_in = Some(ctx);
    opts.repeat = frames;
    opts.attrs = TestRunAttrs::new().xdp_live_frames(0);
    let r = xdp(bench, "lb_bench_gen")?
        .test_run(opts)
        .with_context(|| format!("{}: BPF_PROG_TEST_RUN (live frames)", case.name))?;
    // The sink runs in the softirq on this CPU, normally before the call returns; a deferred
    // softirq (ksoftirqd) catches up within milliseconds.
    let sink = |bench: &Ebpf| -> Result<(u64, u64)> {
        Ok((
            counter(bench, C_SINK_GOOD)? - good0,
            counter(bench, C_SINK_BAD)? - bad0,
        ))
    };
    let all_there = poll(Duration::from_secs(5), "frames at the sink", || {
        let (good, bad) = sink(bench)?;
        Ok((good + bad >= frames as u64).then_some(()))
    });
    let (good, bad) = sink(bench)?;
    let to_stack = ip_in_receives()? - stack0;
    ensure!(
        all_there.is_ok() && good == frames as u64 && bad == 0,
        "{}: {frames} frames sent, {good} reached the sink with destination {addr}/{prefix} \
         port {port}, {bad} with another; {to_stack} entered the stack",
        case.name
    );
    let failed = counter(bench, C_GEN_TAIL_FAILED)? - failed0;
    ensure!(failed == 0, "{}: {failed} tail calls failed", case.name);
    let want = if case.next == Next::Pass {
        frames as u64
    } else {
        0
    };
    ensure!(
        to_stack == want,
        "{}: {to_stack} frames entered the stack, expected {want}",
        case.name
    );
    // The kernel reports the time per frame (total ÷ repeat), in whole ns.
    Ok(r.duration.as_nanos() as f64)
}

fn xdp<'a>(bench: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    bench
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .map_err(Into::into)
}
