//! The benchmark floor: an XDP program that does nothing but pass, timed the same way as
//! `lb_xdp` so the program cost can be reported net of the test-run overhead. It has no maps,
//! so iproute2 can load it too (the lab's switch ports run it).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
// The panic handler.
use lb_ebpf as _;

#[xdp]
pub fn lb_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
