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
    let stats: serde_json::Value = serde_json::from_str(&lb(&pin, &["stats", "-o", "json"])).unwrap();
    assert_eq!(stats["new_flow"]["packets"], 0);
    // Still readable after the loading process let go of its handles.
    drop(ebpf);
    drop(dp);
    assert!(lb(&pin, &["service", "list"]).contains("198.19.0.10:80/TCP"));
}
