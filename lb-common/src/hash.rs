//! The flow hash that picks a Maglev slot. The kernel computes it per new flow; the host
//! computes the same value to predict (and explain) which backend a flow gets.

use crate::abi::FlowKey;

const SEED: u32 = 0x5bd1_e995;

/// murmur3's 32-bit finaliser: full avalanche, so nearby tuples spread over all slots.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    (h ^ fmix32(w)).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// Hash of a flow's 5-tuple (as stored in `FlowKey`, raw packet words).
#[inline(always)]
pub const fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = SEED;
    let mut i = 0;
    while i < 4 {
        h = mix(h, k.src[i]);
        h = mix(h, k.dst[i]);
        i += 1;
    }
    h = mix(h, (k.sport as u32) << 16 | k.dport as u32);
    h = mix(h, k.proto as u32);
    fmix32(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::PROTO_TCP;

    #[test]
    fn spreads_consecutive_ports() {
        let mut buckets = [0u32; 16];
        for p in 0..16_000u16 {
            let k =
                FlowKey::new("198.18.0.1".parse().unwrap(), p, "198.19.0.1".parse().unwrap(), 80, PROTO_TCP);
            buckets[(flow_hash(&k) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((900..1100).contains(&b), "{buckets:?}");
        }
    }
}
