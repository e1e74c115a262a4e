//! Rare events worth a line in the agent's log, sent through aya-log (the `AYA_LOGS` ring
//! buffer, which the agent reads): a redirect to an interface `LB_DEVMAP` lacks, a FIB answer
//! the program has no case for, a refused map insert. Never anything normal traffic does.
//!
//! Each event has a counter in `LB_COUNTERS` (the metrics), and is logged only when this CPU's
//! count reaches a power of two: 1, 2, 4, 8, … The event is rare but can come with every
//! packet (a route to a target turned into a blackhole, a full map during a flood), so what
//! it adds to such a packet must stay a check: the counter is bumped in place, and the test is
//! an AND and a compare on the value just written, with no helper call, no clock and no state
//! of its own; only a power of two calls the logger. A flood costs at most one record per
//! doubling (64 per CPU and event, ever), so the ring buffer cannot fill up however long it
//! lasts; each line carries the count so far, and the counter keeps the exact figure. (A
//! time-based limit, one line per second say, would cost a clock read per event and a slot
//! of state; the agent rate-limits what reaches its log anyway.) Counters live as long as the
//! maps: after an adopting restart an event's next line comes at its next power of two.

use aya_log_ebpf::warn;
use lb_common::{counter, FAMILY_V4};

use crate::maps::LB_COUNTERS;

/// Bumps this CPU's counter `index`; the new count when it is a power of two (time to log).
#[inline(always)]
fn count_sampled(index: u32) -> Option<u64> {
    let c = LB_COUNTERS.get_ptr_mut(index)?;
    // SAFETY: this CPU's value; XDP runs with preemption off.
    let n = unsafe {
        *c += 1;
        *c
    };
    (n & (n - 1) == 0).then_some(n)
}

/// The frame could not be redirected to `ifindex` (not in `LB_DEVMAP`): it goes to the stack.
#[inline(always)]
pub fn redirect_failed(ifindex: u32) {
    if let Some(n) = count_sampled(counter::REDIRECT_FAILED) {
        lb_log_redirect_failed(ifindex, n);
    }
}

/// The FIB answered `rc`, which the program has no case for, about `dst` (of `family`): the
/// packet is passed to the stack (and counted as `PASS_FIB_OTHER` too).
#[inline(always)]
pub fn fib_unexpected(rc: i64, family: u8, dst: &[u32; 4]) {
    if let Some(n) = count_sampled(counter::FIB_UNEXPECTED) {
        if family == FAMILY_V4 {
            lb_log_fib_unexpected_v4(rc, dst[0], n);
        } else {
            let lo = dst[0] as u64 | (dst[1] as u64) << 32;
            let hi = dst[2] as u64 | (dst[3] as u64) << 32;
            lb_log_fib_unexpected_v6(rc, lo, hi, n);
        }
    }
}

/// The map an insert failed on.
#[derive(Clone, Copy)]
pub enum Table {
    Flows = 0,
    ReplyFlows = 1,
    ReplyFrags = 2,
}

/// An insert into `table` failed with `err` (a negative errno); counted as `FLOW_INSERT_FAILED`.
#[inline(always)]
pub fn insert_failed(table: Table, err: i32) {
    if let Some(n) = count_sampled(counter::FLOW_INSERT_FAILED) {
        lb_log_insert_failed(table as u32, err, n);
    }
}

// The loggers are global functions (exported, scalar arguments, a scalar result): the verifier
// checks each once, where a static function is checked again at every call site for every
// state that reaches it (the record's code, ~600 instructions, once per ring-buffer size it
// may pick: that took `lb_xdp` near the verifier's limit of a million instructions). Each
// keeps to a few arguments, and so to a small frame: with the ICMP program's 432 bytes, a call
// must stay within the 512 of the BPF stack.

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_redirect_failed(ifindex: u32, n: u64) -> u32 {
    // aya-log-ebpf 0.2 writes to its ring buffer without the program's context: `&()`.
    warn!(
        &(),
        target: "redirect",
        "redirect to ifindex {} failed (not in LB_DEVMAP): passed to the stack; {} on this CPU so far",
        ifindex,
        n
    );
    0
}

/// BPF_FIB_LKUP_RET_* (include/uapi/linux/bpf.h).
#[inline(always)]
fn fib_answer(rc: i64) -> &'static str {
    match rc {
        1 => "blackhole route",
        2 => "unreachable route",
        3 => "prohibited route",
        5 => "forwarding disabled on the ingress interface",
        6 => "unsupported lightweight tunnel",
        9 => "no source address",
        _ => "unknown answer",
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_fib_unexpected_v4(rc: i64, dst: u32, n: u64) -> u32 {
    warn!(
        &(),
        target: "fib",
        "FIB lookup for {:i} answered {} ({}): passed to the stack; {} on this CPU so far",
        dst.to_ne_bytes(),
        rc,
        fib_answer(rc),
        n
    );
    0
}

/// `lo` and `hi`: the address's words 0–1 and 2–3, as `fib_unexpected` packs them.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_fib_unexpected_v6(rc: i64, lo: u64, hi: u64, n: u64) -> u32 {
    // SAFETY: 16 bytes either way: the address's bytes in network order.
    let dst: [u8; 16] = unsafe { core::mem::transmute([lo, hi]) };
    warn!(
        &(),
        target: "fib",
        "FIB lookup for {:i} answered {} ({}): passed to the stack; {} on this CPU so far",
        dst,
        rc,
        fib_answer(rc),
        n
    );
    0
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_log_insert_failed(table: u32, err: i32, n: u64) -> u32 {
    let map = match table {
        0 => "LB_FLOWS",
        1 => "LB_REPLY_FLOWS",
        _ => "LB_REPLY_FRAGS",
    };
    warn!(
        &(),
        target: "map_insert",
        "insert into {} failed with error {}; {} on this CPU so far",
        map,
        err,
        n
    );
    0
}
