//! `lb explain SRC[:PORT] DST:PORT/PROTO`: which backend this flow gets, and why, read from
//! the pinned maps with the datapath's own rules (flow table first, then the frontend, source
//! ranges, no-backend verdict, affinity, the Maglev slot from lb-common's flow hash, SNAT).

use std::net::{IpAddr, SocketAddr};

use crate::{
    conntrack_gc::monotonic_ns,
    dataplane::{AyaDataplane, Dataplane},
    describe::{backend_flags, fmt_ip},
};
use anyhow::{Context as _, bail};
use lb_common::{abi::*, hash::flow_hash, maglev, rules};

/// Source port assumed when none is given (the slot depends on it).
const DEFAULT_SPORT: u16 = 40_000;

fn parse_src(s: &str) -> anyhow::Result<(IpAddr, u16, bool)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port(), true));
    }
    let ip =
        s.trim_matches(['[', ']']).parse().with_context(|| format!("source {s:?}: want IP or IP:PORT"))?;
    Ok((ip, DEFAULT_SPORT, false))
}

fn parse_dst(s: &str) -> anyhow::Result<(IpAddr, u16, u8)> {
    let (addr, proto) = s.rsplit_once('/').unwrap_or((s, "tcp"));
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        p => bail!("protocol {p:?}: want tcp or udp"),
    };
    let sa: SocketAddr =
        addr.parse().with_context(|| format!("destination {addr:?}: want IP:PORT[/tcp|udp]"))?;
    Ok((sa.ip(), sa.port(), proto))
}

fn ep(ip: IpAddr, port: u16) -> String {
    format!("{}:{port}", fmt_ip(ip))
}

/// Backend `id`, if it is in use.
fn backend(dp: &AyaDataplane, id: u32) -> Option<BackendValue> {
    dp.backends().ok()?.into_iter().find(|(i, _)| *i == id).map(|(_, b)| b)
}

fn backend_line(id: u32, be: Option<&BackendValue>) -> String {
    match be {
        Some(b) => format!("backend {id} {} {}", ep(b.ip(), b.port()), backend_flags(b.flags)),
        None => format!("backend {id} (not in the backend map)"),
    }
}

/// `client`'s affinity entry for `svc`, if the programs would honour it now
/// (`rules::affinity_honoured`).
fn honoured_affinity(dp: &AyaDataplane, svc: &ServiceValue, client: Addr) -> Option<AffinityValue> {
    let a = dp.affinity(&AffinityKey { client, service_id: svc.service_id })?;
    let member = dp.member(&MemberKey { service_id: svc.service_id, backend_id: a.backend_id });
    rules::affinity_honoured(svc, &a, member, backend(dp, a.backend_id).is_some(), monotonic_ns())
        .then_some(a)
}

/// The explanation, one finding per line.
pub fn explain(dp: &AyaDataplane, src: &str, dst: &str) -> anyhow::Result<Vec<String>> {
    let (sip, sport, given) = parse_src(src)?;
    let (dip, dport, proto) = parse_dst(dst)?;
    let mut out = vec![format!("flow {} -> {}/{}", ep(sip, sport), ep(dip, dport), proto_name(proto))];
    if !given {
        out.push(format!("(no source port given: assuming {sport}; the Maglev slot depends on it)"));
    }
    let key = FlowKey::new(sip, sport, dip, dport, proto);
    if let Some(v) = dp.flow(&key) {
        out.push(format!(
            "known flow (flow table): forward to {} — {}; the backend stays while it lives",
            ep(ip_from_addr(&v.addr), u16::from_be(v.port)),
            backend_line(v.backend_id, backend(dp, v.backend_id).as_ref())
        ));
        if v.flags & FLOW_F_SNAT != 0 {
            out.push(format!("source-NATed to {}", ep(ip_from_addr(&v.nat_addr), u16::from_be(v.nat_port))));
        }
        return Ok(out);
    }
    let Some(svc) = dp.service(&ServiceKey::new(dip, dport, proto)) else {
        if dp.service(&ServiceKey::new(dip, 0, 0)).is_some() {
            out.push("a ClusterIP, but not this port/protocol: refused at the pod hook (TCP RST / ICMP port unreachable)".into());
        } else {
            out.push("not a frontend: passed untouched".into());
        }
        return Ok(out);
    };
    out.push(format!(
        "frontend of service {}: {} backends, Maglev range {}+{}",
        svc.service_id, svc.backend_count, svc.maglev_offset, svc.maglev_size
    ));
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        let allowed = dp.source_ranges()?.iter().any(|(id, net)| *id == svc.service_id && net.contains(&sip));
        if !allowed {
            out.push("source outside loadBalancerSourceRanges: dropped".into());
            return Ok(out);
        }
        out.push("source inside loadBalancerSourceRanges".into());
    }
    let config = dp.config()?;
    if svc.backend_count == 0 {
        out.push(if rules::no_backend_drops(&svc, config.flags) {
            "no usable backend: dropped (traffic policy Local without a local endpoint, or --no-backend-response drop)".into()
        } else {
            "no usable backend: refused (TCP RST / ICMP port unreachable)".into()
        });
        return Ok(out);
    }
    if svc.flags & SVC_F_AFFINITY != 0 {
        if let Some(a) = honoured_affinity(dp, &svc, addr_from_ip(sip)) {
            out.push(format!(
                "sessionAffinity ClientIP ({} s): this client's entry decides",
                svc.affinity_timeout
            ));
            let be = backend(dp, a.backend_id);
            out.push(format!("picked: {}", backend_line(a.backend_id, be.as_ref())));
            snat_line(&mut out, &svc, be, sip, &config);
            return Ok(out);
        }
        out.push(format!(
            "sessionAffinity ClientIP ({} s): no live entry for this client; the slot decides and makes one:",
            svc.affinity_timeout
        ));
    }
    if config.flags & CFG_F_RANDOM != 0 {
        out.push("--lb-algorithm random: any slot of the range; the hash slot, for example:".into());
    }
    let hash = flow_hash(&key);
    let slot = maglev::slot(hash, svc.maglev_size);
    let id = dp.read_maglev(svc.maglev_offset + slot, 1)?.first().copied().unwrap_or(0);
    out.push(format!("new flow: flow hash {hash:#010x}, slot {slot} of {} -> backend {id}", svc.maglev_size));
    let be = backend(dp, id);
    out.push(format!("picked: {}", backend_line(id, be.as_ref())));
    snat_line(&mut out, &svc, be, sip, &config);
    Ok(out)
}

/// `lb explain --from-host DST`: what a socket in the node's own network namespace gets at
/// connect time (`lb_ebpf::sock`), with the same rules the program follows.
pub fn explain_from_host(dp: &AyaDataplane, dst: &str) -> anyhow::Result<Vec<String>> {
    let (dip, dport, proto) = parse_dst(dst)?;
    let mut out = vec![format!(
        "a socket of this node connecting to {}/{} (connect-time load balancing, cgroup sock_addr)",
        ep(dip, dport),
        proto_name(proto)
    )];
    let config = dp.config()?;
    if config.host_netns_cookie == 0 {
        out.push(
            "connect-time load balancing is off (--cgroup-root off, or it could not attach: see the agent log): \
             the socket connects as asked"
                .into(),
        );
        return Ok(out);
    }
    let Some(svc) = dp.service(&ServiceKey::new(dip, dport, proto)) else {
        out.push(if dp.service(&ServiceKey::new(dip, 0, 0)).is_some() {
            "a ClusterIP, but not this port/protocol: the call fails with ECONNREFUSED".into()
        } else {
            "not a frontend: the socket connects as asked".into()
        });
        return Ok(out);
    };
    out.push(format!(
        "frontend of service {}: {} backends, Maglev range {}+{}",
        svc.service_id, svc.backend_count, svc.maglev_offset, svc.maglev_size
    ));
    if svc.backend_count == 0 {
        out.push("no usable backend: the call fails with ECONNREFUSED".into());
        return Ok(out);
    }
    let node = if dip.is_ipv4() { config.snat_v4 } else { config.snat_v6 };
    if svc.flags & SVC_F_AFFINITY != 0
        && let Some(a) = honoured_affinity(dp, &svc, node)
    {
        out.push(format!(
            "sessionAffinity ClientIP: the node's address {} has an entry, which decides",
            ip_from_addr(&node)
        ));
        out.push(format!("picked: {}", backend_line(a.backend_id, backend(dp, a.backend_id).as_ref())));
        return Ok(out);
    }
    // Each socket hashes its own cookie: any backend of the range, in proportion to its slots.
    let slots = dp.read_maglev(svc.maglev_offset, svc.maglev_size)?;
    let mut share: std::collections::BTreeMap<u32, u32> = Default::default();
    for id in slots {
        *share.entry(id).or_default() += 1;
    }
    out.push("each socket hashes its own cookie, so sockets spread over the range:".into());
    for (id, n) in share {
        let pct = 100.0 * f64::from(n) / f64::from(svc.maglev_size.max(1));
        out.push(format!("  {pct:5.1}%  {}", backend_line(id, backend(dp, id).as_ref())));
    }
    out.push(
        "the socket then talks to the backend directly (no translation, no source NAT); getpeername and \
         UDP replies show the frontend"
            .into(),
    );
    Ok(out)
}

/// Whether the flow to `be` is source-NATed (`rules::needs_snat`), and why.
fn snat_line(
    out: &mut Vec<String>,
    svc: &ServiceValue,
    be: Option<BackendValue>,
    sip: IpAddr,
    config: &Config,
) {
    let Some(b) = be else { return };
    if rules::needs_snat(svc, &b, &addr_from_ip(sip)) {
        let snat = if sip.is_ipv4() { config.snat_v4 } else { config.snat_v6 };
        let why = if b.ip() == sip { "hairpin" } else { "external frontend, backend on another node" };
        out.push(format!("source NAT to {} ({why})", ip_from_addr(&snat)));
    } else {
        out.push("client address kept (no source NAT)".into());
    }
}
