//! The agent's log, through `tracing`: `--log-format text` (the default) prints
//! `[  uptime s] message` lines; `--log-format json` one JSON object per line with
//! `timestamp`, `level`, `message`, `uptime_s`, `target` and the event's own fields (a sync
//! adds `services`, `not_programmed`, `frontends`, `backends`, `changed`, `writes`,
//! `duration_ms`). Lines logged during a sync carry its span, `span`: `name` "sync", `all`,
//! `service_changes`, `endpoint_changes`, and once known `writes` and `duration_ms`.
//! `RUST_LOG` filters as usual (default `info`).

use std::{fmt, sync::OnceLock, time::Instant};

use clap::ValueEnum;
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static START: OnceLock<Instant> = OnceLock::new();

/// Seconds since the agent started (since `init`).
pub fn uptime_s() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Installs the global subscriber (once; later calls keep the first). The datapath's
/// messages (target `bpf`) pass up to `bpf`'s level, so `--bpf-log debug` needs no
/// `RUST_LOG`.
pub fn init(format: LogFormat, bpf: crate::loader::BpfLog) {
    let _ = START.set(Instant::now());
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let bpf_level = match bpf {
        crate::loader::BpfLog::Off => None,
        crate::loader::BpfLog::Error => Some("error"),
        crate::loader::BpfLog::Warn => Some("warn"),
        crate::loader::BpfLog::Info => Some("info"),
        crate::loader::BpfLog::Debug => Some("debug"),
        crate::loader::BpfLog::Trace => Some("trace"),
    };
    if let Some(directive) = bpf_level.and_then(|l| format!("bpf={l}").parse().ok()) {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.event_format(Text).try_init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init()
        }
    };
}

/// `[  uptime s] message`: what the agent printed before it used `tracing`, which the
/// tests and the README's examples read.
struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut message = Message(String::new());
        event.record(&mut message);
        writeln!(w, "[{:>9.3}s] {}", uptime_s(), message.0)
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}

/// Logs `msg` at the level its prefix says (`error:`, `warning:`, else info).
pub fn line(msg: &str) {
    let uptime_s = uptime_s();
    if msg.starts_with("error") {
        tracing::error!(uptime_s, "{msg}");
    } else if msg.starts_with("warning") {
        tracing::warn!(uptime_s, "{msg}");
    } else {
        tracing::info!(uptime_s, "{msg}");
    }
}
