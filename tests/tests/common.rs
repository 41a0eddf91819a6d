//! Shared helpers for the privileged tests: the privilege gate, a loaded datapath in a
//! private pin dir (removed on drop, also when a test fails), and packet builders.
#![allow(dead_code, reason = "each test file uses a subset")]

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use lb_common::{abi::*, csum};
use lb_userspace::{dataplane::AyaDataplane, loader};

/// True if privileged tests can run here. Without root they are skipped loudly — unless
/// `LB_REQUIRE_PRIVILEGED=1` (CI), where that is a failure.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("privileged test cannot run (not root) and LB_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("SKIP: privileged test needs root");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A loaded datapath with its maps pinned in a private directory.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub dp: AyaDataplane,
    pub pin_dir: PathBuf,
}

impl Loaded {
    pub fn new() -> Self {
        Self::with_caps(&loader::Capacities { flows: 65_536, maglev_slots: 1 << 20, ..Default::default() })
    }

    pub fn with_caps(caps: &loader::Capacities) -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let ebpf = loader::load(&pin_dir, caps).expect("load datapath");
        let dp = AyaDataplane::open(&pin_dir).expect("open pinned maps");
        Loaded { ebpf, dp, pin_dir }
    }

    pub fn xdp(&self) -> &Xdp {
        self.ebpf.program(loader::XDP_PROGRAM).unwrap().try_into().unwrap()
    }

    pub fn tc(&self) -> &SchedClassifier {
        self.ebpf.program(loader::TC_PROGRAM).unwrap().try_into().unwrap()
    }

    /// Runs `lb_xdp` once on `pkt`: (return code, output bytes).
    pub fn run_xdp(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        run(self.xdp(), pkt)
    }

    /// Runs `lb_tc_pod` once on `pkt`: (return code, output bytes).
    pub fn run_tc(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        run(self.tc(), pkt)
    }
}

/// One BPF_PROG_TEST_RUN call, repeat 1: (return code, output packet, kernel-reported ns).
pub fn run_timed<P>(prog: &P, pkt: &[u8]) -> (u32, Vec<u8>, u64)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog
        .test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ..TestRunOptions::new() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out, r.duration.as_nanos() as u64)
}

fn run<P>(prog: &P, pkt: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (rc, out, _) = run_timed(prog, pkt);
    (rc, out)
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
