//! The kernel FIB as programs see it (`bpf_fib_lookup`): XDP forwarding picks a next hop
//! with it, and the pod source check asks it where an address is routed.

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
