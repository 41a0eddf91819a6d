//! The kernel FIB as programs see it (`bpf_fib_lookup`): XDP forwarding picks a next hop
//! with it, and the pod source check asks it where an address is routed.

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// Forwarding is off on the interface: the FIB cannot say.
pub const BPF_FIB_LKUP_RET_FWD_DISABLED: i64 = 3;
/// Routed, but the neighbour is not resolved yet (the egress interface is set).
pub const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

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
