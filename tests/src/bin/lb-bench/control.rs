//! `control`: how fast a Service set reaches the datapath, ours against what kube-proxy does
//! with the same set on the same machine in the same run.
//!
//! * Full sync of N services × 4 endpoints (ClusterIP, one EndpointSlice each): our Model +
//!   plan + map writes into the real (loaded) datapath, vs `iptables-restore` of kube-proxy's
//!   iptables-mode rules (KUBE-SERVICES → KUBE-SVC-* with `statistic --mode random` →
//!   KUBE-SEP-* DNAT, comments included), vs `nft -f` of kube-proxy's nftables-mode ruleset
//!   (one verdict map on `daddr . l4proto . dport`, `numgen random mod 4 vmap` per service).
//!   The kernel baselines load into a scratch network namespace.
//! * One endpoint replaced in the last service: ours, from the change to the first packet
//!   (BPF_PROG_TEST_RUN, new flows) that lands on the new endpoint; kube-proxy's partial
//!   sync of the changed chains (`iptables-restore --noflush`, `nft -f` of the delta).
//! * Maglev disruption when 1 of N backends goes: slots that moved / the ideal 1/N.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_tests::harness::*;
use lb_userspace::{
    loader, maglev,
    model::{self, Cluster, NodeContext, NodePortAddresses},
    reconcile::{self, Applied, Limits},
};
use serde_json::json;

const ENDPOINTS: u32 = 4;
const NS: &str = "default";

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i % 65_536))
}

fn svc_port(i: u32) -> u16 {
    80 + (i / 65_536) as u16
}

/// Endpoint `k` (unique address:port over the whole set, inside 198.18.0.0/15).
fn endpoint(k: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (k % 131_072)), 9000 + (k / 131_072) as u16)
}

fn service(i: u32) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip(i).to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: svc_port(i).into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(i: u32, eps: &[(Ipv4Addr, u16)]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abc")),
            namespace: Some(NS.into()),
            labels: Some([(model::SERVICE_NAME_LABEL.to_string(), format!("svc-{i}"))].into()),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        // Slices of one service share the target port; ours are all the first endpoint's.
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(eps[0].1.into()),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: eps
            .iter()
            .map(|(ip, _)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
    }
}

/// Endpoints of service `i`: 4 consecutive endpoints, same port (one slice port).
fn endpoints_of(i: u32) -> Vec<(Ipv4Addr, u16)> {
    let port = endpoint(i * ENDPOINTS).1;
    (0..ENDPOINTS).map(|j| (endpoint(i * ENDPOINTS + j).0, port)).collect()
}

fn cluster(n: u32) -> Cluster {
    let mut c = Cluster::default();
    for i in 0..n {
        c.services.insert((NS.into(), format!("svc-{i}")), service(i));
        c.slices.insert((NS.into(), format!("svc-{i}-abc")), slice(i, &endpoints_of(i)));
    }
    c
}

fn node() -> NodeContext {
    NodeContext {
        name: "bench".into(),
        nodeport_addresses: NodePortAddresses::Primary,
        fallback_addresses: vec![],
    }
}

/// A chain-name hash like kube-proxy's (16 base32-ish characters).
fn chain_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

fn svc_chain(i: u32) -> String {
    format!("KUBE-SVC-{}", chain_hash(&format!("{NS}/svc-{i}:http")))
}

fn sep_chain(i: u32, ep: (Ipv4Addr, u16)) -> String {
    format!("KUBE-SEP-{}", chain_hash(&format!("{NS}/svc-{i}:http{}:{}", ep.0, ep.1)))
}

fn nft_svc_chain(i: u32) -> String {
    format!("service-{}", &chain_hash(&format!("{NS}/svc-{i}:http"))[..8])
}

fn nft_ep_chain(i: u32, ep: (Ipv4Addr, u16)) -> String {
    format!("endpoint-{}", &chain_hash(&format!("{i}{}:{}", ep.0, ep.1))[..8])
}

fn iptables_service(out: &mut String, i: u32, eps: &[(Ipv4Addr, u16)], declare: bool) {
    let svc = svc_chain(i);
    if declare {
        let _ = writeln!(out, ":{svc} - [0:0]");
    }
    for ep in eps {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(i, *ep));
    }
    let n = eps.len();
    for (k, ep) in eps.iter().enumerate() {
        let sep = sep_chain(i, *ep);
        if k + 1 < n {
            let p = 1.0 / (n - k) as f64;
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{NS}/svc-{i}:http -> {}:{}\" -m statistic --mode random --probability {p:.10} -j {sep}",
                ep.0, ep.1
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{NS}/svc-{i}:http -> {}:{}\" -j {sep}",
                ep.0, ep.1
            );
        }
    }
    for ep in eps {
        let sep = sep_chain(i, *ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{NS}/svc-{i}:http\" -s {}/32 -j KUBE-MARK-MASQ",
            ep.0
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{NS}/svc-{i}:http\" -m tcp -p tcp -j DNAT --to-destination {}:{}",
            ep.0, ep.1
        );
    }
}

/// kube-proxy's iptables-mode nat table for `n` services.
fn iptables_rules(n: u32) -> String {
    let mut out = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut services = String::new();
    let mut chains = String::new();
    for i in 0..n {
        let _ = writeln!(
            services,
            "-A KUBE-SERVICES -m comment --comment \"{NS}/svc-{i}:http cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
            vip(i),
            svc_port(i),
            svc_chain(i)
        );
        iptables_service(&mut chains, i, &endpoints_of(i), true);
    }
    out.push_str(&chains);
    out.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    out.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    out.push_str(&services);
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's partial sync after one endpoint of service `i` changed: the service chain
/// rewritten, the new endpoint chain added, the old one deleted (`--noflush`).
fn iptables_change(i: u32, new_eps: &[(Ipv4Addr, u16)], gone: (Ipv4Addr, u16)) -> String {
    let mut out = String::from("*nat\n");
    iptables_service(&mut out, i, new_eps, true);
    let _ = writeln!(out, "-F {}\n-X {}", sep_chain(i, gone), sep_chain(i, gone));
    out.push_str("COMMIT\n");
    out
}

fn nft_service(out: &mut String, i: u32, eps: &[(Ipv4Addr, u16)]) {
    let svc = nft_svc_chain(i);
    let map: Vec<String> =
        eps.iter().enumerate().map(|(k, ep)| format!("{k} : goto {}", nft_ep_chain(i, *ep))).collect();
    // Endpoint chains first: the service's vmap jumps to them.
    for ep in eps {
        let c = nft_ep_chain(i, *ep);
        let _ = writeln!(out, "add chain ip kube-proxy {c}");
        let _ = writeln!(out, "flush chain ip kube-proxy {c}");
        let _ = writeln!(out, "add rule ip kube-proxy {c} ip saddr {} jump mark-for-masquerade", ep.0);
        let _ = writeln!(out, "add rule ip kube-proxy {c} meta l4proto tcp dnat to {}:{}", ep.0, ep.1);
    }
    let _ = writeln!(out, "add chain ip kube-proxy {svc}");
    let _ = writeln!(out, "flush chain ip kube-proxy {svc}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        map.join(", ")
    );
}

/// kube-proxy's nftables-mode ruleset for `n` services.
fn nft_rules(n: u32) -> String {
    let mut out = String::from(
        "add table ip kube-proxy\n\
         add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; policy accept ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n",
    );
    let mut elements = Vec::with_capacity(n as usize);
    for i in 0..n {
        nft_service(&mut out, i, &endpoints_of(i));
        elements.push(format!("{} . tcp . {} : goto {}", vip(i), svc_port(i), nft_svc_chain(i)));
    }
    for chunk in elements.chunks(1000) {
        let _ = writeln!(out, "add element ip kube-proxy service-ips {{ {} }}", chunk.join(", "));
    }
    out
}

fn nft_change(i: u32, new_eps: &[(Ipv4Addr, u16)], gone: (Ipv4Addr, u16)) -> String {
    let mut out = String::new();
    nft_service(&mut out, i, new_eps);
    let _ = writeln!(out, "delete chain ip kube-proxy {}", nft_ep_chain(i, gone));
    out
}

/// A network namespace for the kernel baselines, removed on drop.
struct Scratch(String);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        let name = format!("lbbench{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status()?.success();
        ensure!(ok, "ip netns add {name}");
        Ok(Scratch(name))
    }

    /// Runs `cmd args < input` in the namespace; the time, or None past `limit` (killed).
    fn time(
        &self,
        cmd: &str,
        args: &[&str],
        input: &Path,
        limit: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        // Errors go to a file: a pipe nobody reads until exit can fill up and stall the tool.
        let err_path = input.with_extension("err");
        let t = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, cmd])
            .args(args)
            .stdin(fs::File::open(input)?)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("starting {cmd}"))?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let err = fs::read_to_string(&err_path).unwrap_or_default();
                    let err: String = err.lines().take(5).collect::<Vec<_>>().join("\n");
                    bail!("{cmd} {}: {status}: {err}", args.join(" "));
                }
                return Ok(Some(t.elapsed()));
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn reset(&self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "add", &self.0]).status();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Row {
    services: u32,
    ours_full_ms: f64,
    ours_model_ms: f64,
    ours_change_ms: f64,
    ipt_full_ms: Option<f64>,
    ipt_change_ms: Option<f64>,
    nft_full_ms: Option<f64>,
    nft_change_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Our side: full sync into a loaded datapath, then one endpoint change timed to the first
/// new flow that lands on the new endpoint.
fn ours(n: u32) -> anyhow::Result<(f64, f64, f64)> {
    let m = maglev::table_size(ENDPOINTS as usize, lb_common::maglev::DEFAULT_MAX_TABLE);
    let caps = loader::Capacities {
        frontends: 2 * n + 1024,
        services: n + 1024,
        backends: ENDPOINTS * n + 1024,
        maglev_slots: (n + 4) * m,
        flows: 65_536,
        ..Default::default()
    };
    let limits = Limits {
        max_table: lb_common::maglev::DEFAULT_MAX_TABLE,
        maglev_slots: caps.maglev_slots,
        backends: caps.backends,
        services: caps.services,
    };
    let mut l = Loaded::with_caps(&caps);
    let mut c = cluster(n);
    let t = Instant::now();
    let desired = model::desired(&c, &node());
    let model_ms = ms(t.elapsed());
    let mut applied = Applied::default();
    let ops = reconcile::plan(&desired, &applied, &limits)?;
    reconcile::execute(&mut l.dp, &mut applied, &ops)?;
    let full_ms = ms(t.elapsed());

    // One endpoint of the last service replaced by a new one.
    let last = n - 1;
    let mut eps = endpoints_of(last);
    let new_ep = (Ipv4Addr::new(198, 19, 255, 1), eps[0].1);
    eps[0] = new_ep;
    let t = Instant::now();
    c.slices.insert((NS.into(), format!("svc-{last}-abc")), slice(last, &eps));
    let desired = model::desired(&c, &node());
    let ops = reconcile::plan(&desired, &applied, &limits)?;
    reconcile::execute(&mut l.dp, &mut applied, &ops)?;
    let mut i = 0u32;
    loop {
        let pkt =
            Spec::tcp("198.18.200.1", 20_000 + (i % 40_000) as u16, &vip(last).to_string(), svc_port(last))
                .build();
        let (rc, out, _) = run_timed(l.xdp(), &pkt);
        ensure!(rc == XDP_PASS, "return code {rc}");
        if inspect(&out).dst == IpAddr::V4(new_ep.0) {
            break;
        }
        i += 1;
        ensure!(i < 10_000, "no flow reached the new endpoint");
    }
    let change_ms = ms(t.elapsed());
    Ok((full_ms, model_ms, change_ms))
}

/// Maglev disruption when one of `n` backends goes, as moved slots ÷ the ideal 1/N: ours
/// (rebuilt from the applied table) and plain Maglev (the paper's fresh population at the
/// same table size). (A table whose size changed would move nearly every flow: the reason
/// the reconciler keeps M when backends leave.)
fn disruption(n: usize) -> (f64, f64) {
    let names: Vec<(u32, Vec<u8>)> =
        (1..=n as u32).map(|i| (i, format!("198.18.1.{i}:9376").into_bytes())).collect();
    let size = maglev::table_size(n, lb_common::maglev::DEFAULT_MAX_TABLE);
    let before = maglev::build(&names, size);
    let rest = &names[1..];
    let moved = |after: &[u32]| {
        before.iter().zip(after).filter(|(a, b)| a != b).count() as f64 / size as f64 * n as f64
    };
    (moved(&maglev::rebuild(Some(&before), rest, size)), moved(&maglev::build(rest, size)))
}

pub fn run(quick: bool, out: PathBuf, sweep: &[u32], nft_max: u32) -> anyhow::Result<()> {
    if !privileged() {
        bail!("bench control needs root");
    }
    let limit = if quick { Duration::from_secs(120) } else { Duration::from_secs(600) };
    let scratch = Scratch::new()?;
    let work = std::env::temp_dir().join(format!("lb-bench-control-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let mut rows = Vec::new();
    for &n in sweep.iter().filter(|n| **n > 0) {
        eprintln!("bench control: {n} services × {ENDPOINTS} endpoints ...");
        let (ours_full_ms, ours_model_ms, ours_change_ms) = ours(n)?;
        eprintln!(
            "  ours: full sync {ours_full_ms:.1} ms (model {ours_model_ms:.1} ms), one endpoint change to first packet {ours_change_ms:.2} ms"
        );
        let last = n - 1;
        let mut eps = endpoints_of(last);
        let gone = eps[0];
        eps[0] = (Ipv4Addr::new(198, 19, 255, 1), gone.1);

        scratch.reset();
        let f = work.join("iptables.rules");
        fs::write(&f, iptables_rules(n))?;
        let ipt_full = scratch.time("iptables-restore", &[], &f, limit)?;
        let ipt_change = if ipt_full.is_some() {
            fs::write(&f, iptables_change(last, &eps, gone))?;
            scratch.time("iptables-restore", &["--noflush"], &f, limit)?
        } else {
            None
        };
        eprintln!("  iptables-restore: full {:?}, change {:?}", ipt_full, ipt_change);

        let (nft_full, nft_change) = if n <= nft_max {
            scratch.reset();
            let f = work.join("nft.rules");
            fs::write(&f, nft_rules(n))?;
            let full = scratch.time("nft", &["-f", "-"], &f, limit)?;
            let change = if full.is_some() {
                fs::write(&f, nft_change(last, &eps, gone))?;
                scratch.time("nft", &["-f", "-"], &f, limit)?
            } else {
                None
            };
            eprintln!("  nft -f: full {full:?}, change {change:?}");
            (full, change)
        } else {
            (None, None)
        };
        rows.push(Row {
            services: n,
            ours_full_ms,
            ours_model_ms,
            ours_change_ms,
            ipt_full_ms: ipt_full.map(ms),
            ipt_change_ms: ipt_change.map(ms),
            nft_full_ms: nft_full.map(ms),
            nft_change_ms: nft_change.map(ms),
        });
    }
    let _ = fs::remove_dir_all(&work);
    drop(scratch);

    let cell = |v: Option<f64>, n: u32, max: u32| match v {
        Some(v) => format!("{v:.0}"),
        None if n > max => "not run".into(),
        None => format!("> {:.0} (stopped)", ms(limit)),
    };
    let mut md = format!(
        "### `cargo xtask bench control` — {}\n\nKernel {}, {} CPUs. {ENDPOINTS} endpoints per ClusterIP service, one EndpointSlice each. Ours: Model + plan + map writes into the loaded datapath; \"change\" = one endpoint replaced in the last service, timed to the first new flow (BPF_PROG_TEST_RUN) that lands on it. Baselines load kube-proxy-shaped rules into a scratch network namespace; their \"change\" is kube-proxy's partial sync of the changed chains.\n\n",
        if quick { "quick" } else { "full" },
        super::kernel(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    md.push_str("| services | ours full sync (ms) | iptables-restore (ms) | nft -f (ms) | ours vs iptables | ours vs nft | ours change → first packet (ms) | iptables change (ms) | nft change (ms) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        let ratio =
            |b: Option<f64>| b.map(|b| format!("{:.0}× faster", b / r.ours_full_ms)).unwrap_or("–".into());
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {} |",
            r.services,
            r.ours_full_ms,
            cell(r.ipt_full_ms, r.services, u32::MAX),
            cell(r.nft_full_ms, r.services, nft_max),
            ratio(r.ipt_full_ms),
            ratio(r.nft_full_ms),
            r.ours_change_ms,
            cell(r.ipt_change_ms, r.services, u32::MAX),
            cell(r.nft_change_ms, r.services, nft_max),
        );
    }
    md.push_str("\nMaglev disruption when 1 of N backends goes (moved flows ÷ the ideal 1/N; goal ≤ 1.1):\n\n| N | ours (rebuild from the applied table) | plain Maglev (fresh population, same size) |\n|---:|---:|---:|\n");
    let mut maglev_rows = Vec::new();
    for n in [4usize, 10, 50, 100] {
        let (o, p) = disruption(n);
        let _ = writeln!(md, "| {n} | {o:.2} | {p:.2} |");
        maglev_rows.push(json!({"backends": n, "ours": o, "plain": p}));
    }
    if let Some(r) = rows.iter().find(|r| r.services == 30_000) {
        let _ = writeln!(
            md,
            "\nGoals at 30 000 services: full sync < 1 s → {:.0} ms; ≥ 10× iptables-restore → {}; one endpoint change < 10 ms → {:.2} ms.",
            r.ours_full_ms,
            r.ipt_full_ms.map(|b| format!("{:.0}×", b / r.ours_full_ms)).unwrap_or("not measured".into()),
            r.ours_change_ms
        );
    }
    println!("{md}");
    fs::create_dir_all(&out)?;
    fs::write(out.join("control.md"), &md)?;
    let j = json!({
        "kernel": super::kernel(),
        "rows": rows.iter().map(|r| json!({
            "services": r.services, "ours_full_ms": r.ours_full_ms, "ours_model_ms": r.ours_model_ms,
            "ours_change_to_first_packet_ms": r.ours_change_ms, "iptables_restore_ms": r.ipt_full_ms,
            "iptables_change_ms": r.ipt_change_ms, "nft_ms": r.nft_full_ms, "nft_change_ms": r.nft_change_ms,
        })).collect::<Vec<_>>(),
        "maglev_disruption": maglev_rows,
    });
    fs::write(out.join("control.json"), serde_json::to_string_pretty(&j)?)?;
    eprintln!("bench control: wrote {}", out.join("control.md").display());
    Ok(())
}
