//! Shared between the kernel datapath (`lb-ebpf`, `no_std`) and the host (`lb-userspace`,
//! tests): the map ABI, map names and capacities, the verdict reasons, and the pure functions
//! both sides must agree on bit for bit (checksums, flow hash, Maglev slot choice, and the
//! rules `lb explain` applies too).
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod abi;
pub mod addr_filter;
pub mod csum;
pub mod ct;
pub mod hash;
pub mod maglev;
pub mod maps;
pub mod rules;
pub mod verdict;
