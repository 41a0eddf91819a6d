//! Programs for the forwarding benchmarks, loaded only by `lb-bench`:
//! * `lb_drop` — the sink at the far end (the kernel counts its drops per veth queue);
//! * `lb_redirect` — the XDP forwarding floor: every frame on to `lb_bench_out[0]`;
//! * `lb_gen` — the live-frames generator (BPF_PROG_TEST_RUN with `xdp_live_frames`):
//!   writes the 64-byte frame of `lb_bench_frame[0]` and transmits it out of the device it
//!   runs on. (Live frames come back from a page pool as the last program left them — a
//!   load balancer rewrites them in place — so every run writes the frame again.)
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};
// The panic handler.
use lb_ebpf as _;

#[map(name = "lb_bench_out")]
static OUT: DevMap = DevMap::with_max_entries(1, 0);

#[xdp]
pub fn lb_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn lb_redirect(_ctx: XdpContext) -> u32 {
    OUT.redirect(0, 0).unwrap_or(xdp_action::XDP_ABORTED)
}

/// The generator's frame: 64 bytes.
#[map(name = "lb_bench_frame")]
static FRAME: Array<[u64; 8]> = Array::with_max_entries(1, 0);

#[xdp]
pub fn lb_gen(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 64 <= end
        && let Some(frame) = FRAME.get(0)
    {
        // SAFETY: 64 bytes of packet checked above.
        unsafe { core::ptr::write_unaligned(data as *mut [u64; 8], *frame) };
    }
    xdp_action::XDP_TX
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
