//! The agent's small HTTP servers: `/metrics` (Prometheus text), `/healthz` and `/livez`
//! like kube-proxy's, and the `healthCheckNodePort` responders of ETP=Local Services. Plain
//! HTTP/1.1, one request per connection: these are probes and scrapes, not user traffic.

use std::{future::Future, net::SocketAddr, rc::Rc};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// A response: status code, content type, body.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Response { status, content_type: "application/json", body: body.into() }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Connections served at once per server; more are closed at once. Probes and scrapes
/// need a handful; a pod opening thousands must not exhaust the agent's file descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its whole request head.
const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// The pause after a failed accept (out of file descriptors, say), instead of spinning.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// What a client asked.
enum Request {
    /// `GET` or `HEAD` (no body in the answer) of a path.
    Get { path: String, head: bool },
    /// Any other method: answered 405.
    OtherMethod,
}

/// The request head, read within `READ_DEADLINE`; None for a client that sent nothing
/// usable in time.
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            if buf.len() > 16 * 1024 {
                return None;
            }
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    };
    tokio::time::timeout(READ_DEADLINE, read).await.ok()??;
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let method = parts.next()?;
    if method != "GET" && method != "HEAD" {
        return Some(Request::OtherMethod);
    }
    let path = parts.next()?.split('?').next()?.to_string();
    Some(Request::Get { path, head: method == "HEAD" })
}

/// Serves `handler` on `listener` until the task is dropped: `GET` and `HEAD`, at most
/// `MAX_CONNECTIONS` at once, each request head within a deadline.
pub fn serve<H, F>(listener: TcpListener, handler: H) -> impl Future<Output = ()>
where
    H: Fn(String) -> F + 'static,
    F: Future<Output = Response> + 'static,
{
    let handler = Rc::new(handler);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    async move {
        loop {
            let mut stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // Over the limit: closed unanswered.
            let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
            let handler = handler.clone();
            tokio::task::spawn_local(async move {
                let _slot = slot;
                let (r, head) = match read_request(&mut stream).await {
                    None => return,
                    Some(Request::OtherMethod) => (Response::text(405, "only GET and HEAD\n"), false),
                    Some(Request::Get { path, head }) => (handler(path).await, head),
                };
                let allow = if r.status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
                let head_text = format!(
                    "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
                    r.status,
                    reason(r.status),
                    r.content_type,
                    r.body.len()
                );
                let _ = stream.write_all(head_text.as_bytes()).await;
                if !head {
                    let _ = stream.write_all(r.body.as_bytes()).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    }
}

/// Binds `addr`, naming it in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("{what}: binding {addr}: {e}"))
}

/// A Prometheus histogram with fixed buckets (seconds).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// kube-proxy's layout for its sync and programming durations: 1 ms doubling 15 times.
    pub fn kube_proxy_buckets() -> Self {
        let bounds: Vec<f64> = (0..15).map(|i| 0.001 * 2f64.powi(i)).collect();
        Histogram { counts: vec![0; bounds.len()], bounds, sum: 0.0, count: 0 }
    }

    /// kube-proxy's layout for network programming latency: 0.25 s steps to 0.5 s, then 1 s
    /// steps to 59 s, 5 s steps to 115 s, 30 s steps to 300 s.
    pub fn network_programming_buckets() -> Self {
        let mut bounds = vec![0.25, 0.5];
        bounds.extend((1..=59).map(f64::from));
        bounds.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
        bounds.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
        Histogram { counts: vec![0; bounds.len()], bounds, sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Prometheus text for `name` (with HELP and TYPE lines).
    pub fn render(&self, name: &str, help: &str) -> String {
        let mut s = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            s += &format!("{name}_bucket{{le=\"{b}\"}} {c}\n");
        }
        s += &format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            self.count, self.sum, self.count
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::kube_proxy_buckets();
        h.observe(0.0005);
        h.observe(0.003);
        let text = h.render("x", "help");
        assert!(text.contains("x_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("x_bucket{le=\"0.004\"} 2\n"));
        assert!(text.contains("x_bucket{le=\"+Inf\"} 2\nx_sum 0.0035\nx_count 2\n"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_one_request_per_connection() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                tokio::task::spawn_local(serve(l, |path| async move {
                    if path == "/healthz" { Response::text(200, "ok") } else { Response::text(404, "no") }
                }));
                for (path, want) in [("/healthz", "HTTP/1.1 200 OK"), ("/nope", "HTTP/1.1 404 Not Found")] {
                    let out = ask(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
                    assert!(out.starts_with(want), "{out}");
                }
            })
            .await;
    }

    async fn ask(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// Another method gets 405 with `Allow`; `HEAD` gets the head and no body; connections
    /// over `MAX_CONNECTIONS` are closed unanswered, and served again once the others end.
    #[tokio::test(flavor = "current_thread")]
    async fn methods_head_and_the_connection_limit() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                tokio::task::spawn_local(serve(l, |_| async { Response::text(200, "body") }));
                let post = ask(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
                assert!(
                    post.starts_with("HTTP/1.1 405 Method Not Allowed") && post.contains("Allow: GET, HEAD"),
                    "{post}"
                );
                let head = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
                assert!(head.contains("Content-Length: 4") && !head.ends_with("body"), "{head}");
                assert!(ask(addr, "GET / HTTP/1.1\r\n\r\n").await.ends_with("body"));
                // Idle clients holding every slot.
                let mut idle = Vec::new();
                for _ in 0..MAX_CONNECTIONS {
                    idle.push(TcpStream::connect(addr).await.unwrap());
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                assert_eq!(ask(addr, "GET / HTTP/1.1\r\n\r\n").await, "", "over the limit: closed");
                drop(idle);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                assert!(ask(addr, "GET / HTTP/1.1\r\n\r\n").await.ends_with("body"), "served again");
            })
            .await;
    }
}
