//! The `lb` inspection commands read real pinned maps (root; loads the datapath).

use std::{path::PathBuf, process::Command};

use lb_common::abi::*;
use lb_userspace::{
    dataplane::{AyaDataplane, Dataplane},
    loader,
};

fn privileged() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_ne!(std::env::var("LB_REQUIRE_PRIVILEGED").as_deref(), Ok("1"), "needs root");
    eprintln!("SKIP: needs root");
    false
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lb(pin: &PinDir, args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_lb")).arg("--pin-dir").arg(&pin.0).args(args).output().unwrap();
    assert!(out.status.success(), "lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn lists_services_backends_and_stats_from_pins() {
    if !privileged() {
        return;
    }
    let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/lb-cli-test-{}", std::process::id())));
    let caps = loader::Capacities { maglev_slots: 1 << 16, flows: 4096, ..Default::default() };
    let ebpf = loader::load(&pin.0, &caps).unwrap();
    let mut dp = AyaDataplane::open(&pin.0).unwrap();
    dp.set_backend(1, &BackendValue::new("198.18.1.1".parse().unwrap(), 9376, BE_F_PRESENT | BE_F_LOCAL))
        .unwrap();
    dp.write_maglev(0, &[1; 101]).unwrap();
    let v = ServiceValue {
        service_id: 5,
        backend_count: 1,
        maglev_offset: 0,
        maglev_size: 101,
        ..Default::default()
    };
    dp.set_service(&ServiceKey::new("198.19.0.10".parse().unwrap(), 80, PROTO_TCP), &v).unwrap();

    let svc: serde_json::Value = serde_json::from_str(&lb(&pin, &["service", "list", "-o", "json"])).unwrap();
    assert_eq!(svc[0]["frontend"], "198.19.0.10:80/TCP");
    assert_eq!(svc[0]["maglev_size"], 101);
    let table = lb(&pin, &["backend", "list"]);
    assert!(table.contains("198.18.1.1:9376") && table.contains("local"), "{table}");
    let why = lb(&pin, &["explain", "198.18.100.1:40000", "198.19.0.10:80/tcp"]);
    assert!(
        why.contains("frontend of service 5") && why.contains("picked: backend 1 198.18.1.1:9376"),
        "{why}"
    );
    assert!(why.contains("client address kept"), "{why}");
    let why = lb(&pin, &["explain", "198.18.100.1", "198.19.0.11:80"]);
    assert!(why.contains("assuming 40000") && why.contains("not a frontend: passed untouched"), "{why}");
    let stats: serde_json::Value = serde_json::from_str(&lb(&pin, &["stats", "-o", "json"])).unwrap();
    assert_eq!(stats["new_flow"]["packets"], 0);
    // Still readable after the loading process let go of its handles.
    drop(ebpf);
    drop(dp);
    assert!(lb(&pin, &["service", "list"]).contains("198.19.0.10:80/TCP"));
}

/// A veth pair in a private network namespace, deleted on drop (also on failure).
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?}");
}

#[test]
fn attaches_native_xdp_and_tcx_on_veth() {
    if !privileged() {
        return;
    }
    let ns = Netns(format!("lbattach{}", std::process::id()));
    sh(&["ip", "netns", "add", &ns.0]);
    sh(&["ip", "-n", &ns.0, "link", "add", "lbt0", "type", "veth", "peer", "name", "lbt1"]);
    sh(&["ip", "-n", &ns.0, "link", "set", "lbt0", "up"]);
    sh(&["ip", "-n", &ns.0, "link", "set", "lbt1", "up"]);
    let pin = PinDir(PathBuf::from(format!("/sys/fs/bpf/lb-attach-test-{}", std::process::id())));
    let caps = loader::Capacities { maglev_slots: 1 << 16, flows: 4096, ..Default::default() };
    // Attach from inside the namespace, on a thread so the test process stays where it is.
    let ns_name = ns.0.clone();
    let pin_dir = pin.0.clone();
    let (xdp, tc, shown) = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
        // SAFETY: setns on this thread only, with a valid netns fd.
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
        let mut ebpf = loader::load(&pin_dir, &caps).unwrap();
        let xdp = lb_userspace::attach::attach_xdp(&mut ebpf, "lbt0").unwrap();
        let tc = lb_userspace::attach::attach_tc(&mut ebpf, "lbt1").unwrap();
        let shown = Command::new("ip").args(["link", "show", "lbt0"]).output().unwrap();
        (xdp, tc, String::from_utf8_lossy(&shown.stdout).into_owned())
    })
    .join()
    .unwrap();
    assert_eq!(xdp, lb_userspace::attach::Attached::XdpNative, "veth supports native XDP");
    assert_eq!(tc, lb_userspace::attach::Attached::Tcx, "kernel >= 6.6 has tcx");
    assert!(shown.contains("xdp"), "{shown}");
}
