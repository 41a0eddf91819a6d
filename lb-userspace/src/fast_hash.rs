//! Hash maps and sets for the agent's large lookup tables: those a full sync fills with
//! hundreds of thousands of entries and only probes by key (no order, no range). A B-tree
//! costs a dozen compares per probe there; `foldhash` one hash (seeded per process, so keys
//! from the cluster cannot be chosen to collide).

pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
