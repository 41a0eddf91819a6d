//! Packet rewriting, per hook. The decision logic is shared and generic over `Packet`; only
//! the primitives differ:
//!
//! * XDP writes the packet directly and updates checksums with `lb_common::csum` (RFC 1624).
//!   XDP cannot see `ip_summed`; frames from real NICs carry complete checksums.
//! * TC uses `bpf_l3/l4_csum_replace`, which know whether the skb is CHECKSUM_PARTIAL (only
//!   the pseudo-header sum in the field, as sent by a veth peer with TX offload): with
//!   `BPF_F_PSEUDO_HDR` they update it correctly, and port changes leave it alone.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    abi::{Addr, HOOK_TC, HOOK_XDP, PROTO_UDP},
    csum,
    verdict::Reason,
};

use crate::parse::{FRAG_LATER, Headers, load_addr, ptr_at, store_addr};

const REWRITE: Reason = Reason::RewriteFailed;
const CSUM: Reason = Reason::ChecksumFailed;
const ROOM: Reason = Reason::AdjustRoomFailed;

/// Which side of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Destination (client -> frontend becomes client -> backend).
    Dst,
    /// Source (backend -> client becomes frontend -> client).
    Src,
}

impl Side {
    #[inline(always)]
    pub fn other(self) -> Side {
        match self {
            Side::Dst => Side::Src,
            Side::Src => Side::Dst,
        }
    }
}

/// The per-hook primitives the shared logic needs.
pub trait Packet {
    /// The hook on pod interfaces (TC), where pods' own traffic arrives. Only there: refuse
    /// the ports a ClusterIP does not serve (ClusterIPs are reached from pods), and drop the
    /// stale reverse entry a pod's direct SYN would collide with. The node-interface hook
    /// keeps its miss path to one lookup.
    const POD_FACING: bool;
    /// `abi::HOOK_*`, for events.
    const HOOK: u8;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// The program's context, for helpers that take it (`bpf_fib_lookup`).
    fn ctx_ptr(&self) -> *mut core::ffi::c_void;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet (for byte counters).
    fn len(&self) -> u32;
    /// The payload size of each segment the packet stands for when it is a GSO (or GRO)
    /// packet, else 0: what the path MTU applies to.
    fn gso_size(&self) -> u32;
    /// Rewrites address and port on one side, checksums included.
    /// The error says which step failed (`RewriteFailed`, `ChecksumFailed`).
    fn rewrite(&mut self, h: &Headers, side: Side, addr: &Addr, port: u16) -> Result<(), Reason>;
    /// Rewrites only the address on one side (non-first fragments carry no L4 header; an
    /// IPv6 header has no checksum).
    fn rewrite_l3(&mut self, h: &Headers, side: Side, addr: &Addr) -> Result<(), Reason>;
    /// Inserts `n` bytes right after the `l2_len`-byte link header (`AdjustRoomFailed`).
    fn grow_after_l2(&mut self, l2_len: usize, n: u32) -> Result<(), Reason>;
    /// Cuts the packet to `len` bytes (`AdjustRoomFailed`).
    fn truncate(&mut self, len: u32) -> Result<(), Reason>;
    /// Whether the packet's source may create or change flow state here
    /// (`source_check`; only pod interfaces check).
    fn source_ok(&self, h: &Headers) -> bool;
}

#[inline(always)]
fn addr_off(h: &Headers, side: Side) -> usize {
    match (h.v6, side) {
        (false, Side::Src) => h.l3_off + 12,
        (false, Side::Dst) => h.l3_off + 16,
        (true, Side::Src) => h.l3_off + 8,
        (true, Side::Dst) => h.l3_off + 24,
    }
}

#[inline(always)]
fn port_off(h: &Headers, side: Side) -> usize {
    h.l4_off + if side == Side::Src { 0 } else { 2 }
}

impl Packet for XdpContext {
    const POD_FACING: bool = false;
    const HOOK: u8 = HOOK_XDP;

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the program's own context; a plain field.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.cast()
    }

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn rewrite(&mut self, h: &Headers, side: Side, addr: &Addr, port: u16) -> Result<(), Reason> {
        let (data, end) = (Packet::data(self), Packet::data_end(self));
        let old_addr: Addr;
        // SAFETY (all derefs below): pointers come from ptr_at, bounds-checked. Plain word
        // loads and stores, as `parse::read`: an unaligned one takes a byte at a time.
        unsafe {
            if h.v6 {
                let a = ptr_at::<Addr>(data, end, addr_off(h, side)).ok_or(REWRITE)?;
                old_addr = load_addr(a);
                store_addr(a, addr);
            } else {
                let a = ptr_at::<u32>(data, end, addr_off(h, side)).ok_or(REWRITE)?;
                let old = a.read();
                old_addr = lb_common::abi::v4_mapped(old);
                a.write(addr[3]);
                let c = ptr_at::<u16>(data, end, h.l3_off + 10).ok_or(REWRITE)?;
                c.write(csum::update32(c.read(), old, addr[3]));
            }
            let p = ptr_at::<u16>(data, end, port_off(h, side)).ok_or(REWRITE)?;
            let old_port = p.read();
            p.write(port);
            let c = ptr_at::<u16>(data, end, h.l4_csum_off()).ok_or(REWRITE)?;
            let udp = h.proto == PROTO_UDP;
            c.write(csum::l4_rewrite(c.read(), &old_addr, addr, old_port, port, udp));
        }
        Ok(())
    }

    #[inline(always)]
    fn rewrite_l3(&mut self, h: &Headers, side: Side, addr: &Addr) -> Result<(), Reason> {
        let (data, end) = (Packet::data(self), Packet::data_end(self));
        // SAFETY: bounds-checked pointers (plain word access, as in `rewrite`).
        unsafe {
            if h.v6 {
                let a = ptr_at::<Addr>(data, end, addr_off(h, side)).ok_or(REWRITE)?;
                store_addr(a, addr);
                return Ok(());
            }
            let a = ptr_at::<u32>(data, end, addr_off(h, side)).ok_or(REWRITE)?;
            let old = a.read();
            a.write(addr[3]);
            let c = ptr_at::<u16>(data, end, h.l3_off + 10).ok_or(REWRITE)?;
            c.write(csum::update32(c.read(), old, addr[3]));
        }
        Ok(())
    }

    #[inline(always)]
    fn grow_after_l2(&mut self, l2_len: usize, n: u32) -> Result<(), Reason> {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(n as i32)) } != 0 {
            return Err(ROOM);
        }
        // Move the link header to the new front; the gap is then right after it.
        let (data, end) = (Packet::data(self), Packet::data_end(self));
        let n = n as usize;
        // Link header is 14 or 18 bytes: copy two words of 2 bytes at a time to stay simple.
        let mut i = 0;
        while i < 18 {
            if i >= l2_len {
                break;
            }
            let from = ptr_at::<u16>(data, end, n + i).ok_or(ROOM)?;
            let to = ptr_at::<u16>(data, end, i).ok_or(ROOM)?;
            // SAFETY: bounds-checked pointers.
            unsafe { to.write_unaligned(from.read_unaligned()) };
            i += 2;
        }
        Ok(())
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<(), Reason> {
        let cur = Packet::len(self) as i32;
        // SAFETY: helper call on our own context.
        match unsafe { bpf_xdp_adjust_tail(self.ctx, len as i32 - cur) } {
            0 => Ok(()),
            _ => Err(ROOM),
        }
    }

    #[inline(always)]
    fn source_ok(&self, _h: &Headers) -> bool {
        true
    }
}

impl Packet for TcContext {
    const POD_FACING: bool = true;
    const HOOK: u8 = HOOK_TC;

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the program's own skb; a plain field.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn ctx_ptr(&self) -> *mut core::ffi::c_void {
        self.skb.skb.cast()
    }

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: the program's own skb; a plain field.
        unsafe { (*self.skb.skb).gso_size }
    }

    #[inline(always)]
    fn rewrite(&mut self, h: &Headers, side: Side, addr: &Addr, port: u16) -> Result<(), Reason> {
        let csum_off = h.l4_csum_off();
        let mangled = if h.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        let a_off = addr_off(h, side);
        if h.v6 {
            let old: Addr = self.load(a_off).map_err(|_| REWRITE)?;
            let mut i = 0;
            while i < 4 {
                self.l4_csum_replace(
                    csum_off,
                    old[i] as u64,
                    addr[i] as u64,
                    BPF_F_PSEUDO_HDR as u64 | mangled | 4,
                )
                .map_err(|_| CSUM)?;
                i += 1;
            }
            self.store(a_off, addr, 0).map_err(|_| REWRITE)?;
        } else {
            let old: u32 = self.load(a_off).map_err(|_| REWRITE)?;
            self.l3_csum_replace(h.l3_off + 10, old as u64, addr[3] as u64, 4).map_err(|_| CSUM)?;
            self.l4_csum_replace(csum_off, old as u64, addr[3] as u64, BPF_F_PSEUDO_HDR as u64 | mangled | 4)
                .map_err(|_| CSUM)?;
            self.store(a_off, &addr[3], 0).map_err(|_| REWRITE)?;
        }
        let p_off = port_off(h, side);
        let old_port: u16 = self.load(p_off).map_err(|_| REWRITE)?;
        self.l4_csum_replace(csum_off, old_port as u64, port as u64, mangled | 2).map_err(|_| CSUM)?;
        self.store(p_off, &port, 0).map_err(|_| REWRITE)
    }

    #[inline(always)]
    fn rewrite_l3(&mut self, h: &Headers, side: Side, addr: &Addr) -> Result<(), Reason> {
        let a_off = addr_off(h, side);
        if h.v6 {
            return self.store(a_off, addr, 0).map_err(|_| REWRITE);
        }
        let old: u32 = self.load(a_off).map_err(|_| REWRITE)?;
        self.l3_csum_replace(h.l3_off + 10, old as u64, addr[3] as u64, 4).map_err(|_| CSUM)?;
        self.store(a_off, &addr[3], 0).map_err(|_| REWRITE)
    }

    #[inline(always)]
    fn grow_after_l2(&mut self, _l2_len: usize, n: u32) -> Result<(), Reason> {
        self.adjust_room(n as i32, BPF_ADJ_ROOM_MAC, 0).map_err(|_| ROOM)
    }

    #[inline(always)]
    fn truncate(&mut self, len: u32) -> Result<(), Reason> {
        // SAFETY: helper call on our own skb.
        match unsafe { bpf_skb_change_tail(self.skb.skb, len, 0) } {
            0 => Ok(()),
            _ => Err(ROOM),
        }
    }

    #[inline(always)]
    fn source_ok(&self, h: &Headers) -> bool {
        // SAFETY: reading our own skb's ingress ifindex.
        let ingress = unsafe { (*self.skb.skb).ifindex };
        crate::source_check::source_ok(self.skb.skb.cast(), ingress, &h.src, h.v6)
    }
}

/// Applies a translation to whatever kind of packet this is: full L3+L4 rewrite, or just the
/// address for a non-first fragment.
#[inline(always)]
pub fn apply<P: Packet>(pkt: &mut P, h: &Headers, side: Side, addr: &Addr, port: u16) -> Result<(), Reason> {
    if h.frag == FRAG_LATER { pkt.rewrite_l3(h, side, addr) } else { pkt.rewrite(h, side, addr, port) }
}
