//! The agent's HTTP endpoints: `/metrics`, `/healthz` and `/livez` on their own thread, and
//! one responder per `healthCheckNodePort` on the sync loop's.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Instant};

use prometheus_client::registry::Registry;

use super::{
    AgentConfig, lock, log,
    metrics::{self, AgentMetrics, Datapath},
    state::{Shared, Status},
};
use crate::{
    http::{self, Response},
    model::HealthCheck,
};

/// `/metrics` on `--metrics-bind-address`, `/healthz` and `/livez` on `--healthz-bind-address`,
/// served from a thread of their own: they answer within milliseconds whatever the sync loop
/// is doing (parsing a file, planning, writing maps). A scrape is encoded on one blocking
/// thread at a time, so a flood of scrapes queues instead of multiplying threads.
pub fn spawn_http(
    cfg: &AgentConfig,
    status: Shared,
    metrics: &AgentMetrics,
    datapath: Datapath,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, what: &str| {
        std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| anyhow::anyhow!("{what}: binding {addr}: {e}"))
    };
    let metrics_listener = bind(cfg.metrics_bind, "--metrics-bind-address")?;
    let healthz = bind(cfg.healthz_bind, "--healthz-bind-address")?;
    let registry: Arc<Registry> = Arc::new(metrics.registry(datapath));
    std::thread::Builder::new().name("http".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let (Ok(metrics_listener), Ok(healthz)) = (
                tokio::net::TcpListener::from_std(metrics_listener),
                tokio::net::TcpListener::from_std(healthz),
            ) else {
                return;
            };
            let st = status.clone();
            let encoding = Arc::new(tokio::sync::Semaphore::new(1));
            tokio::task::spawn_local(http::serve(metrics_listener, move |path| {
                let (st, registry, encoding) = (st.clone(), registry.clone(), encoding.clone());
                async move {
                    match path.as_str() {
                        "/metrics" => {
                            let Ok(_turn) = encoding.acquire().await else {
                                return Response::text(503, "shutting down\n");
                            };
                            let text = tokio::task::spawn_blocking(move || metrics::render(&registry))
                                .await
                                .unwrap_or_default();
                            Response { status: 200, content_type: metrics::CONTENT_TYPE, body: text }
                        }
                        "/healthz" => healthz_answer(&lock(&st)),
                        "/livez" => livez_answer(&lock(&st)),
                        _ => Response::text(404, "try /metrics\n"),
                    }
                }
            }));
            http::serve(healthz, move |path| {
                let r = match path.as_str() {
                    "/healthz" => healthz_answer(&lock(&status)),
                    "/livez" => livez_answer(&lock(&status)),
                    _ => Response::text(404, "try /healthz or /livez\n"),
                };
                async move { r }
            })
            .await;
        });
    })?;
    log(format!(
        "metrics on http://{}/metrics, health on http://{}/healthz",
        cfg.metrics_bind, cfg.healthz_bind
    ));
    Ok(())
}

/// Like kube-proxy's: healthy once a sync succeeded, unless changes have waited longer than
/// `--healthz-stale-after` for one (syncs failing, or the loop stuck).
fn healthz_answer(st: &Status) -> Response {
    let ago = |t: Instant| format!("{:.1}s ago", t.elapsed().as_secs_f64());
    let Some(last) = st.last_sync_ok else {
        return Response::json(503, "{\"lastUpdated\": null, \"reason\": \"no successful sync yet\"}");
    };
    match st.pending_since.filter(|p| p.elapsed() > st.stale_after) {
        Some(p) => Response::json(
            503,
            format!(
                "{{\"lastUpdated\": \"{}\", \"reason\": \"changes pending since {} ({} failed syncs so far, {} services not programmed)\"}}",
                ago(last),
                ago(p),
                st.sync_errors,
                st.unprogrammed.len()
            ),
        ),
        None => Response::json(200, format!("{{\"lastUpdated\": \"{}\"}}", ago(last))),
    }
}

/// Alive while the sync loop turns (it turns at least every 250 ms), whatever the syncs do.
fn livez_answer(st: &Status) -> Response {
    let idle = st.loop_turn.elapsed();
    let code = if idle > st.stale_after { 503 } else { 200 };
    Response::json(code, format!("{{\"loopTurn\": \"{:.1}s ago\"}}", idle.as_secs_f64()))
}

/// One HTTP responder per `healthCheckNodePort`, started and stopped as Services change.
pub fn sync_health_servers(
    servers: &mut BTreeMap<u16, tokio::task::JoinHandle<()>>,
    want: &BTreeMap<u16, HealthCheck>,
    status: &Shared,
) {
    servers.retain(|port, task| {
        let keep = want.contains_key(port);
        if !keep {
            task.abort();
        }
        keep
    });
    for port in want.keys() {
        if servers.contains_key(port) {
            continue;
        }
        let addr = SocketAddr::from(([0, 0, 0, 0], *port));
        let listener = match std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => l,
            Err(e) => {
                log(format!("warning: healthCheckNodePort {port}: {e}"));
                continue;
            }
        };
        let status = status.clone();
        let port = *port;
        servers.insert(
            port,
            tokio::task::spawn_local(http::serve(listener, move |_path| {
                let hc = lock(&status).health_checks.get(&port).cloned();
                async move {
                    let (service, n) = hc.map(|h| (h.service, h.local_endpoints)).unwrap_or_default();
                    let (ns, name) = service.split_once('/').unwrap_or(("", ""));
                    let body =
                        serde_json::json!({"service": {"namespace": ns, "name": name}, "localEndpoints": n});
                    Response::json(if n > 0 { 200 } else { 503 }, body.to_string())
                }
            })),
        );
    }
}
