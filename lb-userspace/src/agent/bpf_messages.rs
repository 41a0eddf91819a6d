//! `--bpf-log`: the datapath's `aya-log` messages, rendered with names and logged with
//! target `bpf`. The programs send numbers only (kind, reason, interface index, protocol:
//! strings cost their verifier a loop); this side names them.

use lb_common::{abi::*, verdict::Reason};

use super::log;
use crate::loader::BpfLog;

/// Starts copying the datapath's messages into the log as they come.
pub fn start(ebpf: &mut aya::Ebpf, level: BpfLog) {
    let logger =
        aya_log::EbpfLogger::init_with_logger(ebpf, Namer).map_err(anyhow::Error::from).and_then(|l| {
            // SAFETY: the logger owns its ring buffer's fd, open and unchanged until it is dropped
            // with the AsyncFd.
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("{e}"))
        });
    match logger {
        Ok(mut logger) => {
            log(format!("datapath messages at {level:?} and above go to this log (target bpf)"));
            tokio::task::spawn_local(async move {
                while let Ok(mut ready) = logger.readable_mut().await {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
            });
        }
        Err(e) => log(format!("warning: --bpf-log: cannot read the datapath's messages: {e:#}")),
    }
}

/// Renders each record (`render`) and logs it at its level.
struct Namer;

impl log::Log for Namer {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = render(&record.args().to_string());
        match record.level() {
            log::Level::Error => tracing::error!(target: "bpf", "{text}"),
            log::Level::Warn => tracing::warn!(target: "bpf", "{text}"),
            log::Level::Info => tracing::info!(target: "bpf", "{text}"),
            log::Level::Debug => tracing::debug!(target: "bpf", "{text}"),
            log::Level::Trace => tracing::trace!(target: "bpf", "{text}"),
        }
    }

    fn flush(&self) {}
}

/// `datapath event K reason R if I proto P [src]:sport -> [dst]:dport` (bpf_log.rs) as
/// `datapath reject: reject_unknown_port on eth0, tcp 198.18.1.100:40000 -> 198.19.0.10:81`;
/// anything else as it came.
pub fn render(message: &str) -> String {
    let words: Vec<&str> = message.split(' ').collect();
    let [_, "event", kind, "reason", reason, "if", ifindex, "proto", proto, src, "->", dst] = words[..]
    else {
        return message.to_string();
    };
    let kind = match kind.parse::<u8>() {
        Ok(EVENT_DROP) => "drop",
        Ok(EVENT_REJECT) => "reject",
        _ => kind,
    };
    let reason = reason.parse().map(|r| Reason::from_u32(r).name()).unwrap_or(reason);
    let proto = match proto.parse::<u8>() {
        Ok(p) => proto_name(p).to_lowercase(),
        Err(_) => proto.to_string(),
    };
    let iface = ifindex
        .parse::<u32>()
        .ok()
        .and_then(|i| crate::links::interfaces().into_iter().find(|(_, idx)| *idx == i).map(|(n, _)| n))
        .unwrap_or_else(|| format!("if{ifindex}"));
    format!("datapath {kind}: {reason} on {iface}, {proto} {} -> {}", endpoint(src), endpoint(dst))
}

/// `[::ffff:a.b.c.d]:p` as `a.b.c.d:p`, `[v6]:p` as it is.
fn endpoint(s: &str) -> String {
    match s.strip_prefix("[::ffff:").and_then(|r| r.split_once("]:")) {
        Some((v4, port)) if v4.contains('.') => format!("{v4}:{port}"),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_named() {
        let m = "datapath event 2 reason 18 if 999999 proto 6 [::ffff:198.18.1.100]:40000 -> [::ffff:198.19.0.10]:81";
        assert_eq!(
            render(m),
            "datapath reject: reject_unknown_port on if999999, tcp 198.18.1.100:40000 -> 198.19.0.10:81"
        );
        let v6 = "datapath event 1 reason 7 if 999999 proto 17 [2001:2::1]:5 -> [2001:2::2]:80";
        assert_eq!(
            render(v6),
            "datapath drop: drop_no_backend on if999999, udp [2001:2::1]:5 -> [2001:2::2]:80"
        );
        assert_eq!(render("something else"), "something else");
    }
}
