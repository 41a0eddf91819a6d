//! The agent's small HTTP servers: `/metrics` (Prometheus text), `/healthz` and `/livez`
//! like kube-proxy's, and the `healthCheckNodePort` responders of ETP=Local Services.
//! HTTP/1.1 by hyper, one request per connection: these are probes and scrapes, not user
//! traffic, and whatever can reach the port (any pod) must not be able to wear the agent
//! down: connections are capped, a request head must arrive within a deadline, a whole
//! exchange within another, and a failing accept (out of file descriptors) backs off.

use std::{convert::Infallible, future::Future, rc::Rc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

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

/// Connections served at once per server; more are closed at once. Probes and scrapes
/// need a handful; a pod opening thousands must not exhaust the agent's file descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its whole request head.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection may live at all (a client reading its answer a byte at a time).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// The pause after a failed accept (out of file descriptors, say), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// The largest request head read; probes send a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Bodies from this size on are `Large`.
const LARGE_BODY: usize = 1 << 20;

/// A large body (a scrape of 100 000 Services: tens of megabytes, and the garbage of
/// building it): once sent, the allocator gives the memory back to the kernel (off the
/// runtime's thread), or the resident set would keep it until the next large sync.
struct Large(String);

impl AsRef<[u8]> for Large {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Drop for Large {
    fn drop(&mut self) {
        let text = std::mem::take(&mut self.0);
        let give_back = move || {
            drop(text);
            crate::memory::return_freed();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(give_back)),
            Err(_) => give_back(),
        }
    }
}

/// Answers one request: `GET` and `HEAD` (hyper leaves out the body) by `handler`, any
/// other method 405 with `Allow`.
async fn answer<H, F>(handler: &H, req: Request<Incoming>) -> hyper::Response<Full<Bytes>>
where
    H: Fn(String) -> F,
    F: Future<Output = Response>,
{
    let r = if req.method() == Method::GET || req.method() == Method::HEAD {
        handler(req.uri().path().to_string()).await
    } else {
        Response::text(405, "only GET and HEAD\n")
    };
    let body =
        if r.body.len() >= LARGE_BODY { Bytes::from_owner(Large(r.body)) } else { Bytes::from(r.body) };
    let mut out = hyper::Response::new(Full::new(body));
    *out.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = out.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(r.content_type));
    if r.status == 405 {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    out
}

/// Serves `handler` on `listener` until the task is dropped (see the module's limits).
pub fn serve<H, F>(listener: TcpListener, handler: H) -> impl Future<Output = ()>
where
    H: Fn(String) -> F + 'static,
    F: Future<Output = Response> + 'static,
{
    let handler = Rc::new(handler);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    async move {
        loop {
            let stream = match listener.accept().await {
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
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(answer(&*handler, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(READ_DEADLINE)
                    .keep_alive(false)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn serves_one_request_per_connection() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let addr = serving(|path| async move {
                    if path == "/healthz" { Response::text(200, "ok") } else { Response::text(404, "no") }
                })
                .await;
                for (path, want) in [("/healthz", "HTTP/1.1 200 OK"), ("/nope", "HTTP/1.1 404 Not Found")] {
                    let out = ask(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
                    assert!(out.starts_with(want), "{out}");
                }
            })
            .await;
    }

    /// Serves `handler` on a loopback port from the current `LocalSet`; its address.
    async fn serving<H, F>(handler: H) -> SocketAddr
    where
        H: Fn(String) -> F + 'static,
        F: Future<Output = Response> + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::task::spawn_local(serve(l, handler));
        addr
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
                let addr = serving(|_| async { Response::text(200, "body") }).await;
                let post = ask(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
                assert!(
                    post.starts_with("HTTP/1.1 405 Method Not Allowed")
                        && post.to_lowercase().contains("allow: get, head"),
                    "{post}"
                );
                let head = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
                assert!(
                    head.to_lowercase().contains("content-length: 4") && !head.ends_with("body"),
                    "{head}"
                );
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

    /// A body over `LARGE_BODY` (given back to the kernel once sent) arrives whole, each time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_body_is_sent_whole() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let body: String = (0..LARGE_BODY + 7).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
                let served = body.clone();
                let addr = serving(move |_| {
                    let b = served.clone();
                    async move { Response::text(200, b) }
                })
                .await;
                for _ in 0..2 {
                    let got = ask(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
                    let (head, got) = got.split_once("\r\n\r\n").expect("a head and a body");
                    assert!(
                        head.to_lowercase().contains(&format!("content-length: {}", body.len())),
                        "{head}"
                    );
                    assert!(got == body, "the body as it was built ({} of {} bytes)", got.len(), body.len());
                }
            })
            .await;
    }
}
