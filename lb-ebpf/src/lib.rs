//! What every program object of this crate shares. The datapath modules live with the `lb`
//! binary (src/main.rs); the benchmark helpers are in src/bin.
#![no_std]

// eBPF cannot unwind: the verifier rejects any path that could reach this.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
