//! How many threads the few parallel steps of a full sync use.

use std::num::NonZero;

/// The CPUs this process may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, NonZero::get)
}
