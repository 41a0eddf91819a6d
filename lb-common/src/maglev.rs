//! Maglev slot choice shared by kernel and host. (The table builder lives in the agent.)

/// Slot inside a service's range for a flow hash.
#[inline(always)]
pub const fn slot(hash: u32, size: u32) -> u32 {
    if size == 0 { 0 } else { hash % size }
}

/// Default lookup-table size factor: M is the smallest prime >= 100 x backends.
pub const SLOTS_PER_BACKEND: u32 = 100;
/// Default upper bound for one service's table (a prime).
pub const DEFAULT_MAX_TABLE: u32 = 65_537;
