//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN.
//!
//! One packet per call (`repeat = 1`: with more, the kernel would feed the rewritten packet
//! back in), each call of a case paired with one of the empty `lb_xdp_pass` program (which
//! goes first alternates), the thread pinned to one CPU. Per round: the median over the pairs
//! of (case − floor), kernel-measured durations. Reported: median of the rounds, with min–max
//! (the method of the Katran side-by-side figures quoted in BENCHMARKS.md).

use anyhow::{Context, Result};
use lb_common::maps::{DEFAULT_FLOW_TABLE_SIZE, PROGRAM_XDP, PROGRAM_XDP_PASS};
use lb_userspace::dataplane;

use crate::{
    lab::{Lab, CLIENT4, ROUTER4},
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN},
    world::{run_prog_timed, World, VIP4},
};

struct Case {
    name: &'static str,
    /// The frame of call `n` (new flows patch a distinct 5-tuple into it).
    frame: Box<dyn Fn(u64) -> Vec<u8>>,
    ingress_backend: bool,
    expect: u32,
    /// `flow_insert_limit` while the case runs.
    insert_limit: u32,
    /// Runs in the world with `agent.access_log` set (every listener logged).
    logged: bool,
}

/// The insert budget is checked on every new flow but never reached.
const NEVER_REACHED: u32 = u32::MAX;

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// One row: path, median net ns, min, max, median floor ns.
pub type Row = (&'static str, f64, f64, f64, f64);

/// Measures every path, `calls` per round, `rounds` rounds, on the calling thread (pinned to
/// CPU 0 and moved to a private network namespace: run it on a thread of its own).
pub fn run(calls: u64, rounds: usize) -> Result<Vec<Row>> {
    pin_to_cpu(0)?;
    let lab = Lab::new()?;
    let mut world = World::with_flow_table(DEFAULT_FLOW_TABLE_SIZE)?;

    let syn = Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN).bytes();
    let syn_past = syn.clone();
    // A router's "fragmentation needed" about a reply of the established flow below.
    let mut reply = Packet::tcp(VIP4, 80, CLIENT4, 39999, TCP_ACK | TCP_PSH);
    reply.payload = vec![0; 1400];
    let icmp = Packet::icmp(
        ROUTER4,
        VIP4,
        3,
        4,
        [0, 0, 0x05, 0x78],
        reply.quoted(576 - 28),
    )
    .bytes();
    let established = Packet::tcp(CLIENT4, 39999, VIP4, 80, TCP_ACK).bytes();
    world.run(
        lab.cli,
        &Packet::tcp(CLIENT4, 39999, VIP4, 80, TCP_SYN).bytes(),
    )?;
    // The same paths with the access log on: the flow's counters, its start event, and a
    // flow lookup per reply.
    let mut logged = World::build_with_access_log(DEFAULT_FLOW_TABLE_SIZE)?;
    logged.run(
        lab.cli,
        &Packet::tcp(CLIENT4, 39999, VIP4, 80, TCP_SYN).bytes(),
    )?;
    let mut ring = logged.maps.flow_events()?;
    let syn_logged = Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN).bytes();
    let established_logged = established.clone();
    let cases = [
        Case {
            name: "new TCP flow (flow-table miss + insert)",
            frame: Box::new(move |n| {
                // A distinct (source address, source port) per call; checksums are not
                // the program's concern on this path.
                let mut f = syn.clone();
                let src = u32::from_be_bytes([10, 1, 0, 0]) + 16 + (n / 50_000) as u32;
                f[26..30].copy_from_slice(&src.to_be_bytes());
                f[34..36].copy_from_slice(&(10_000 + (n % 50_000) as u16).to_be_bytes());
                f
            }),
            ingress_backend: false,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "new TCP flow past the insert budget (no insert)",
            frame: Box::new(move |n| {
                let mut f = syn_past.clone();
                let src = u32::from_be_bytes([10, 1, 0, 0]) + 200 + (n / 50_000) as u32;
                f[26..30].copy_from_slice(&src.to_be_bytes());
                f[34..36].copy_from_slice(&(10_000 + (n % 50_000) as u16).to_be_bytes());
                f
            }),
            ingress_backend: false,
            expect: 4,
            insert_limit: 1,
            logged: false,
        },
        Case {
            name: "established flow (hit)",
            frame: Box::new(move |_| established.clone()),
            ingress_backend: false,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "reply (reverse NAT)",
            frame: Box::new(|_| Packet::tcp("10.2.0.11", 8080, CLIENT4, 39999, TCP_ACK).bytes()),
            ingress_backend: true,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "ICMP frag-needed to a VIP (to the flow's target)",
            frame: Box::new(move |_| icmp.clone()),
            ingress_backend: false,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "non-VIP pass",
            frame: Box::new(|_| Packet::tcp(CLIENT4, 40000, "10.2.0.11", 22, TCP_ACK).bytes()),
            ingress_backend: false,
            expect: 2,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "dropped (VIP, no listener)",
            frame: Box::new(|_| Packet::tcp(CLIENT4, 40000, VIP4, 22, TCP_SYN).bytes()),
            ingress_backend: false,
            expect: 1,
            insert_limit: NEVER_REACHED,
            logged: false,
        },
        Case {
            name: "new TCP flow, access-logged (insert + start event)",
            frame: Box::new(move |n| {
                let mut f = syn_logged.clone();
                let src = u32::from_be_bytes([10, 1, 0, 0]) + 400 + (n / 50_000) as u32;
                f[26..30].copy_from_slice(&src.to_be_bytes());
                f[34..36].copy_from_slice(&(10_000 + (n % 50_000) as u16).to_be_bytes());
                f
            }),
            ingress_backend: false,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: true,
        },
        Case {
            name: "established flow, access-logged (counters)",
            frame: Box::new(move |_| established_logged.clone()),
            ingress_backend: false,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: true,
        },
        Case {
            name: "reply, access-logged (flow lookup + counters)",
            frame: Box::new(|_| Packet::tcp("10.2.0.11", 8080, CLIENT4, 39999, TCP_ACK).bytes()),
            ingress_backend: true,
            expect: 4,
            insert_limit: NEVER_REACHED,
            logged: true,
        },
    ];

    let floor_frame = Packet::tcp(CLIENT4, 40000, VIP4, 80, TCP_SYN).bytes();
    let mut new_flow_counter = 0u64;
    // Rounds outside, cases inside: a slow spell of the machine (these are shared VMs) falls
    // on a round of every case, not on every round of one case.
    let mut nets = vec![Vec::new(); cases.len()];
    let mut floors = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (c, case) in cases.iter().enumerate() {
            let world = if case.logged { &mut logged } else { &mut world };
            world.set_insert_limit(case.insert_limit)?;
            let ingress = if case.ingress_backend {
                lab.bk
            } else {
                lab.cli
            };
            let mut diffs = Vec::with_capacity(calls as usize);
            let mut floor_ns = Vec::with_capacity(calls as usize);
            for i in 0..calls {
                let n = if case.name.starts_with("new") {
                    new_flow_counter += 1;
                    new_flow_counter
                } else {
                    i
                };
                let frame = (case.frame)(n);
                let run_floor = |world: &mut World| -> Result<u128> {
                    let floor = dataplane::program_mut(&mut world.ebpf, PROGRAM_XDP_PASS)?;
                    Ok(timed(floor, ingress, &floor_frame)?.1)
                };
                let before = if i % 2 == 0 {
                    Some(run_floor(world)?)
                } else {
                    None
                };
                let prog = dataplane::program_mut(&mut world.ebpf, PROGRAM_XDP)?;
                let (action, duration) = timed(prog, ingress, &frame)?;
                anyhow::ensure!(action == case.expect, "{}: action {action}", case.name);
                let floor = match before {
                    Some(f) => f,
                    None => run_floor(world)?,
                };
                if case.logged {
                    // Read the start events as the agent would (outside the timed call), so
                    // the ring never fills.
                    while ring.next_event().is_some() {}
                }
                diffs.push(duration as f64 - floor as f64);
                floor_ns.push(floor as f64);
            }
            nets[c].push(median(&mut diffs));
            floors[c].push(median(&mut floor_ns));
        }
    }
    let rows = cases
        .iter()
        .zip(nets.iter_mut().zip(floors.iter_mut()))
        .map(|(case, (nets, floors))| {
            nets.sort_by(f64::total_cmp);
            floors.sort_by(f64::total_cmp);
            (
                case.name,
                nets[rounds / 2],
                nets[0],
                nets[rounds - 1],
                floors[rounds / 2],
            )
        })
        .collect();
    Ok(rows)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(prog: &aya::programs::Xdp, ingress: u32, frame: &[u8]) -> Result<(u32, u128)> {
    run_prog_timed(prog, ingress, frame).map(|(action, _, d)| (action, d.as_nanos()))
}
