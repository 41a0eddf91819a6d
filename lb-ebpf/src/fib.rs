//! The kernel FIB as programs see it (`bpf_fib_lookup`): XDP forwarding and TC host routing
//! pick a next hop with it (and edit the frame as the stack's forwarding would), and the pod
//! source check asks it where an address is routed.

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
// The helper's return codes, from the kernel's own header (aya's bindings): a hand-copied
// list had FWD_DISABLED as 3 (PROHIBIT) and FRAG_NEEDED as 4 (NOT_FWDED).
use aya_ebpf::bindings as b;
pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = b::BPF_FIB_LKUP_RET_SUCCESS as i64;
/// Forwarding is off on the interface: the FIB cannot say.
pub const BPF_FIB_LKUP_RET_FWD_DISABLED: i64 = b::BPF_FIB_LKUP_RET_FWD_DISABLED as i64;
/// Routed, but the neighbour is not resolved yet (the egress interface is set).
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = b::BPF_FIB_LKUP_RET_NO_NEIGH as i64;
/// The packet (`tot_len`) exceeds the route's MTU, which is then in `tot_len`.
pub const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = b::BPF_FIB_LKUP_RET_FRAG_NEEDED as i64;

/// `struct bpf_fib_lookup` (64 bytes), with its unions as plain fields.
#[repr(C)]
pub struct FibParams {
    pub family: u8,
    pub l4_protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub tot_len: u16,
    pub ifindex: u32,
    pub tos_flowinfo: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub vlan: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

pub const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Fills `p` for the frame at `data..end` (Ethernet, then IPv4 or IPv6): family, protocol,
/// TOS or flow label, addresses and, with `with_len`, the IP datagram's length (for the
/// helper's MTU check). None for another ethertype, a short header, or a TTL / hop limit
/// that would expire on forwarding (the stack answers that).
#[inline(always)]
pub fn params_from_frame(data: usize, end: usize, p: &mut FibParams, with_len: bool) -> Option<()> {
    if data + ETH_LEN > end {
        return None;
    }
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
                if with_len {
                    p.tot_len = u16::from_be(*(ip.add(2) as *const u16));
                }
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
                if with_len {
                    p.tot_len = u16::from_be(*(ip.add(4) as *const u16)) + 40;
                }
                p.src = crate::parse::load_addr(ip.add(8).cast());
                p.dst = crate::parse::load_addr(ip.add(24).cast());
            }
        }
        _ => return None,
    }
    Some(())
}

/// What the stack does to a packet it routes: the TTL (hop limit) drops by one, with the
/// IPv4 header checksum to match. False (nothing written) when the header is not there:
/// checked here again because the verifier forgets packet bounds across a helper call.
#[inline(always)]
pub fn decrement_ttl(data: usize, end: usize, family: u8) -> bool {
    let ip = (data + ETH_LEN) as *mut u8;
    if family == AF_INET {
        if data + ETH_LEN + 20 > end {
            return false;
        }
        // SAFETY: 20 bytes of IPv4 header checked above.
        unsafe {
            *ip.add(8) -= 1;
            // RFC 1624: the TTL is the high byte of its 16-bit word, so the sum gains 0x0100.
            let csum = ip.add(10) as *mut u16;
            let sum = u16::from_be(*csum) as u32 + 0x0100;
            *csum = (((sum & 0xffff) + (sum >> 16)) as u16).to_be();
        }
    } else {
        if data + ETH_LEN + 40 > end {
            return false;
        }
        // SAFETY: 40 bytes of IPv6 header checked above.
        unsafe { *ip.add(7) -= 1 };
    }
    true
}

/// Sets the frame's MACs to the next hop the lookup found.
///
/// # Safety
/// 14 writable bytes at `data` (`decrement_ttl` returned true for this frame).
#[inline(always)]
pub unsafe fn set_macs(data: usize, p: &FibParams) {
    // SAFETY: the caller's 14 bytes.
    unsafe {
        write_mac(data as *mut u8, &p.dmac);
        write_mac((data + 6) as *mut u8, &p.smac);
    }
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
