//! Bench-only XDP programs for the forwarding-capacity figures (`cargo xtask bench --only
//! forwarding`); never loaded by the agent. The kernel injects frames with
//! `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` into `lb_bench_gen`, as a NIC would
//! hand them to a driver's XDP hook. Live-frame pages are recycled without their contents
//! being restored, so `lb_bench_gen` writes the frame from a template first and then
//! tail-calls the program under test (`BENCH_NEXT[0]`: the balancer's `lb_xdp`,
//! `lb_bench_redirect` or `lb_bench_pass`). `lb_bench_sink`, attached to the peer of the
//! target-side veth, counts the frames that arrive, checks their destination, and drops them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// Every frame the generator writes has this many bytes (the template's).
pub const FRAME_LEN: usize = 64;
/// Template flag: a distinct flow per frame (source address low half and source port from a
/// per-CPU sequence number, checksums updated).
pub const GEN_F_NEW_FLOWS: u32 = 1;

/// The generator's frame: `FRAME_LEN` bytes, the offset of the L4 checksum (50: TCP, 40:
/// UDP), flags.
#[repr(C, align(8))]
pub struct Template {
    pub bytes: [u8; FRAME_LEN],
    pub l4_csum_off: u32,
    pub flags: u32,
}

/// What the sink counts as delivered: IPv4, `dst & mask == addr & mask`, destination port
/// `port` (all three as the frame's bytes read natively).
#[repr(C)]
pub struct Expect {
    pub addr: u32,
    pub mask: u32,
    pub port: u32,
}

/// `BENCH_COUNTERS` indices.
pub const C_SINK_GOOD: u32 = 0;
pub const C_SINK_BAD: u32 = 1;
pub const C_SINK_OTHER: u32 = 2;
pub const C_GEN_TAIL_FAILED: u32 = 3;
pub const C_GEN_SEQ: u32 = 4;

#[map]
static BENCH_TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);
#[map]
static BENCH_EXPECT: Array<Expect> = Array::with_max_entries(1, 0);
#[map]
static BENCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(8, 0);
/// Slot 0: the program under test.
#[map]
static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Slot 0: the target-side interface (for `lb_bench_redirect`).
#[map]
static BENCH_DEVMAP: DevMap = DevMap::with_max_entries(1, 0);

#[inline(always)]
fn counter(i: u32) -> Option<&'static mut u64> {
    // SAFETY: this CPU's value; XDP runs with preemption off.
    BENCH_COUNTERS.get_ptr_mut(i).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn bump(i: u32) {
    if let Some(c) = counter(i) {
        *c += 1;
    }
}

/// RFC 1624 incremental update of a ones-complement checksum for 16-bit words replaced.
#[inline(always)]
fn csum_replace(csum: u16, old: &[u16; 3], new: &[u16; 3]) -> u16 {
    let mut s: u32 = (!csum) as u32;
    for i in 0..3 {
        s += (!old[i]) as u32 + new[i] as u32;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn rd16(b: &[u8; FRAME_LEN], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

#[xdp]
pub fn lb_bench_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FRAME_LEN > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(t) = BENCH_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: FRAME_LEN bytes from `start` are inside the frame (checked above).
    let frame = unsafe { &mut *(start as *mut [u8; FRAME_LEN]) };
    // SAFETY: map values are 8-byte aligned, and so is an XDP frame's start (after the
    // headroom); FRAME_LEN / 8 words fit in both.
    unsafe {
        let src = t.bytes.as_ptr() as *const u64;
        let dst = start as *mut u64;
        for i in 0..FRAME_LEN / 8 {
            *dst.add(i) = *src.add(i);
        }
    }
    if t.flags & GEN_F_NEW_FLOWS != 0 {
        let Some(seq) = counter(C_GEN_SEQ) else {
            return xdp_action::XDP_ABORTED;
        };
        *seq += 1;
        let n = *seq;
        // Source address bytes 28..30 (its low half) and source port 34..36.
        let hi = ((n >> 16) as u16).to_be();
        let lo = (n as u16).to_be();
        let old_ip = rd16(&t.bytes, 28);
        let old_port = rd16(&t.bytes, 34);
        frame[28..30].copy_from_slice(&hi.to_ne_bytes());
        frame[34..36].copy_from_slice(&lo.to_ne_bytes());
        let ip_csum = csum_replace(rd16(&t.bytes, 24), &[old_ip, 0, 0], &[hi, 0, 0]);
        frame[24..26].copy_from_slice(&ip_csum.to_ne_bytes());
        // Constant offsets only (the verifier checks each packet access).
        let (old, new) = ([old_ip, old_port, 0], [hi, lo, 0]);
        if t.l4_csum_off == 50 {
            let l4 = csum_replace(rd16(&t.bytes, 50), &old, &new);
            frame[50..52].copy_from_slice(&l4.to_ne_bytes());
        } else if t.l4_csum_off == 40 {
            let l4 = csum_replace(rd16(&t.bytes, 40), &old, &new);
            frame[40..42].copy_from_slice(&l4.to_ne_bytes());
        }
    }
    // SAFETY: a tail call with this program's context.
    unsafe { BENCH_NEXT.tail_call(&ctx, 0) };
    bump(C_GEN_TAIL_FAILED);
    xdp_action::XDP_ABORTED
}

/// The floor: no lookup, straight to the target-side interface.
#[xdp]
pub fn lb_bench_redirect(_ctx: XdpContext) -> u32 {
    BENCH_DEVMAP
        .redirect(0, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

/// The kernel's path: the frame enters the stack as received on the ingress interface.
#[xdp]
pub fn lb_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn lb_bench_sink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 38 > end {
        bump(C_SINK_OTHER);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: 38 bytes from `start` are inside the frame.
    let f = unsafe { &*(start as *const [u8; 38]) };
    // IPv4 without options only: the bench sends nothing else.
    if f[12] != 0x08 || f[13] != 0x00 {
        bump(C_SINK_OTHER);
        return xdp_action::XDP_DROP;
    }
    let Some(e) = BENCH_EXPECT.get(0) else {
        bump(C_SINK_BAD);
        return xdp_action::XDP_DROP;
    };
    let dst = u32::from_ne_bytes([f[30], f[31], f[32], f[33]]);
    let port = u16::from_ne_bytes([f[36], f[37]]) as u32;
    if f[14] == 0x45 && dst & e.mask == e.addr & e.mask && port == e.port {
        bump(C_SINK_GOOD);
    } else {
        bump(C_SINK_BAD);
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
