//! XDP forwarding (`CFG_F_XDP_FORWARD`, `lb agent --xdp-forward`): a packet `lb_xdp` has
//! translated leaves from XDP instead of climbing the node's stack. The kernel FIB picks the
//! egress port and next hop; the TTL drops by one and the MACs are set as the stack would;
//! then XDP_TX when the egress is the ingress port, else a redirect — only to ports in
//! `lb_xdp_tx_ports` (the agent's XDP interfaces, whose drivers take redirected frames). Any
//! other case (no route, neighbour not resolved yet, local destination, MTU, VLAN) goes up
//! the stack unchanged, which resolves it. Opt-in: forwarded packets skip the node's
//! netfilter.

use aya_ebpf::{bindings::xdp_action, helpers::generated::bpf_fib_lookup, programs::XdpContext};
use lb_common::abi::*;

use crate::{
    fib::{AF_INET, AF_INET6, BPF_FIB_LKUP_RET_SUCCESS, FibParams},
    maps::{STATS_XDP_FORWARD, XDP_TX_PORTS},
};

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[inline(always)]
fn count(slot: u32, bytes: u64) {
    if let Some(c) = STATS_XDP_FORWARD.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Forwards a translated packet: the XDP verdict, or None to pass it to the stack.
#[inline(always)]
pub fn translated(ctx: &XdpContext) -> Option<u32> {
    let flags = crate::select::config_flags();
    if flags & CFG_F_XDP_FORWARD == 0 {
        return None;
    }
    let verdict = forward(ctx);
    let slot = match verdict {
        Some(xdp_action::XDP_TX) => XDP_FWD_TX,
        Some(_) => XDP_FWD_REDIRECTED,
        None => XDP_FWD_TO_STACK,
    };
    count(slot, (ctx.data_end() - ctx.data()) as u64);
    verdict
}

#[inline(never)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + ETH_LEN > end {
        return None;
    }
    // SAFETY: ctx.ctx is the program's context; ingress_ifindex is a plain field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: all-zero `FibParams` are valid (integers).
    let mut p = core::mem::MaybeUninit::uninit();
    let p: &mut FibParams = unsafe { crate::zero::zeroed(&mut p) };
    p.ifindex = ingress;
    // SAFETY: 14 bytes checked above.
    let proto = u16::from_be(unsafe { *((data + 12) as *const u16) });
    let l3 = data + ETH_LEN;
    match proto {
        ETH_P_IP => {
            if l3 + 20 > end {
                return None;
            }
            let ip = l3 as *const u8;
            // SAFETY: 20 bytes of IPv4 header checked above.
            unsafe {
                if *ip.add(8) <= 1 {
                    return None;
                }
                p.family = AF_INET;
                p.tos_flowinfo = *ip.add(1) as u32;
                p.l4_protocol = *ip.add(9);
                p.tot_len = u16::from_be(*(ip.add(2) as *const u16));
                p.src[0] = *(ip.add(12) as *const u32);
                p.dst[0] = *(ip.add(16) as *const u32);
            }
        }
        ETH_P_IPV6 => {
            if l3 + 40 > end {
                return None;
            }
            let ip = l3 as *const u8;
            // SAFETY: 40 bytes of IPv6 header checked above.
            unsafe {
                if *ip.add(7) <= 1 {
                    return None;
                }
                p.family = AF_INET6;
                p.l4_protocol = *ip.add(6);
                p.tot_len = u16::from_be(*(ip.add(4) as *const u16)) + 40;
                p.src = read_words(ip.add(8));
                p.dst = read_words(ip.add(24));
            }
        }
        _ => return None,
    }
    // SAFETY: helper call with a valid context and a 64-byte parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            (p as *mut FibParams).cast(),
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS || XDP_TX_PORTS.get(p.ifindex).is_none() {
        return None;
    }
    // Committed: decrement TTL / hop limit, set the MACs.
    // SAFETY: the header lengths were checked above for this family.
    unsafe {
        if p.family == AF_INET {
            let ip = l3 as *mut u8;
            *ip.add(8) -= 1;
            // RFC 1624: the TTL is the high byte of its 16-bit word, so the sum gains 0x0100.
            let csum = ip.add(10) as *mut u16;
            let sum = u16::from_be(*csum) as u32 + 0x0100;
            *csum = (((sum & 0xffff) + (sum >> 16)) as u16).to_be();
        } else {
            *(l3 as *mut u8).add(7) -= 1;
        }
        write_mac(data as *mut u8, &p.dmac);
        write_mac((data + 6) as *mut u8, &p.smac);
    }
    if p.ifindex == ingress {
        return Some(xdp_action::XDP_TX);
    }
    // Fails only if the port left the map since the check: the frame is already rewritten
    // for the next hop, so the stack could not take it.
    Some(XDP_TX_PORTS.redirect(p.ifindex, 0).unwrap_or(xdp_action::XDP_DROP))
}

// Word by word: a whole-array copy between the packet and the stack (which LLVM cannot
// prove apart) becomes a call to the byte-at-a-time `memmove`.

/// Reads an IPv6 address at `p`.
///
/// # Safety
/// 16 readable bytes at `p`.
#[inline(always)]
unsafe fn read_words(p: *const u8) -> [u32; 4] {
    let w = p as *const u32;
    // SAFETY: the caller's 16 bytes; unaligned packet reads are allowed (see parse.rs).
    unsafe { [*w, *w.add(1), *w.add(2), *w.add(3)] }
}

/// Writes a MAC address at `p`.
///
/// # Safety
/// 6 writable bytes at `p`.
#[inline(always)]
unsafe fn write_mac(p: *mut u8, mac: &[u8; 6]) {
    // SAFETY: the caller's 6 bytes.
    unsafe {
        *(p as *mut u32) = u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]);
        *(p.add(4) as *mut u16) = u16::from_ne_bytes([mac[4], mac[5]]);
    }
}
