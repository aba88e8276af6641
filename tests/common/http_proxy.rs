//! A proxy that reads the requests it carries, to put between one operator replica and the apiserver: it can make
//! the replica's watches lag (every event delivered late and in order, the connection alive) while its reads and
//! writes are answered at once, or hold back the answers of one kind of request (the request reaches the apiserver
//! and takes effect at once; its answer comes late), or refuse one kind of request with a `503` without passing it
//! on (an apiserver that is restarting, or overloaded). The byte-copying [`super::proxy::Proxy`] cannot tell one
//! request from another under TLS, so it can only delay everything.
//!
//! The replica speaks plain HTTP to it, on the apiserver's own IP ([`HttpProxy::kubeconfig`]); each request goes on over HTTPS to
//! the apiserver with the replica's own headers, its bearer token included, so the replica keeps its identity and
//! its RBAC. A request the apiserver cannot be reached for closes the replica's connection, as a refused or reset
//! connection would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderName, TRANSFER_ENCODING};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a relayed answer's body is made of: its chunks as they are let through, or the upstream's failure (which
/// ends the replica's connection mid-answer, as the upstream's did).
type Chunk = Result<Frame<Bytes>, std::io::Error>;
type ProxyBody = StreamBody<mpsc::Receiver<Chunk>>;

/// A running proxy; dropping it closes every connection and stops listening.
pub struct HttpProxy {
    /// Where the replica connects: the apiserver's IP (loopback, or the node bridge's) and a free port, plain HTTP.
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    stop: CancellationToken,
    accept: JoinHandle<()>,
}

/// The faults in force, shared by every connection.
#[derive(Default)]
struct Faults {
    /// How late every watch event is delivered, in ms (0: at once).
    watch_lag_ms: AtomicU64,
    /// Answers to hold back or requests to refuse, first match wins.
    holds: Mutex<Vec<Hold>>,
    /// How many answers were held back so far.
    held: AtomicU64,
}

/// The next `left` requests of `method` (any: `None`) whose path and query contain `path_contains` get `effect`.
struct Hold {
    method: Option<Method>,
    path_contains: String,
    effect: Effect,
    left: usize,
}

/// What a [`Hold`] does to a request.
#[derive(Clone, Copy)]
enum Effect {
    /// Its answer comes this late.
    Late(Duration),
    /// It is answered with this status (`503`, `404`, ...) by the proxy and never reaches the apiserver.
    Refused(u16),
}

impl HttpProxy {
    /// A proxy to the apiserver of the test kubeconfig ([`super::kubeconfig_path`]).
    pub async fn to_apiserver() -> HttpProxy {
        let upstream = super::proxy::server_url(&super::kubeconfig_path());
        let host_port = upstream.trim_start_matches("https://").trim_end_matches('/');
        let apiserver: SocketAddr =
            host_port.parse().unwrap_or_else(|e| panic!("server {upstream} is not ip:port: {e}"));
        // On the apiserver's own address (loopback, or the local control plane's bridge with a node): nothing else.
        let listener = TcpListener::bind(SocketAddr::new(apiserver.ip(), 0)).await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        // The local control plane's apiserver is the only peer: its certificate is the control plane's own, and the
        // replica's side of the proxy is what the tests are about.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .http1_only()
            .build()
            .expect("an HTTPS client");
        let faults = Arc::new(Faults::default());
        let stop = CancellationToken::new();
        let upstream = Arc::new(Upstream { base: upstream.trim_end_matches('/').to_string(), client });
        let accept = tokio::spawn(accept_loop(listener, upstream, faults.clone(), stop.clone()));
        HttpProxy { addr, faults, stop, accept }
    }

    /// Deliver every watch event `lag` after the apiserver sent it (zero: at once again; events already held keep
    /// their time, and none overtakes an earlier one). Reads and writes are answered at once meanwhile.
    pub fn lag_watches(&self, lag: Duration) {
        self.faults.watch_lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
    }

    /// Hold back the answers to the next `count` requests (`usize::MAX`: every one, until [`HttpProxy::answer_at_once`])
    /// of `method` (any: `None`) whose path and query contain `path_contains` (watches excepted) by `delay`: each
    /// request reaches the apiserver at once and takes effect; its answer comes `delay` after the apiserver gave it.
    pub fn delay_answers(&self, method: Option<Method>, path_contains: &str, delay: Duration, count: usize) {
        let hold = Hold { method, path_contains: path_contains.to_string(), effect: Effect::Late(delay), left: count };
        self.faults.holds.lock().unwrap().push(hold);
    }

    /// Refuse the next `count` requests (`usize::MAX`: every one, until [`HttpProxy::answer_at_once`]) of `method`
    /// (any: `None`) whose path and query contain `path_contains` (watches excepted): each is answered `503` with a
    /// `Status`, as an apiserver that cannot serve it now would, and never reaches the apiserver.
    pub fn refuse(&self, method: Option<Method>, path_contains: &str, count: usize) {
        self.answer_instead(503, method, path_contains, count);
    }

    /// As [`HttpProxy::refuse`], with `code` instead of `503`. A `404` is answered as an apiserver that has just
    /// started answers for a custom resource it does not serve yet: a bare `404 page not found`, no `Status` (a
    /// 1.20 apiserver does so, checked by hand with `curl` on a path of a group it does not serve).
    pub fn answer_instead(&self, code: u16, method: Option<Method>, path_contains: &str, count: usize) {
        let effect = Effect::Refused(code);
        let hold = Hold { method, path_contains: path_contains.to_string(), effect, left: count };
        self.faults.holds.lock().unwrap().push(hold);
    }

    /// Answer every request at once again (answers already held keep their delay).
    pub fn answer_at_once(&self) {
        self.faults.holds.lock().unwrap().clear();
    }

    /// How many answers were held back or refused so far.
    pub fn held(&self) -> u64 {
        self.faults.held.load(Ordering::Relaxed)
    }

    /// The options of a replica that talks to the apiserver through this proxy, with the test's own credentials (its
    /// kubeconfig written to `<dir>/proxied-<port>.kubeconfig`).
    pub fn options(&self, dir: &Path) -> super::ReplicaOptions {
        let name = format!("proxied-{}.kubeconfig", self.addr.port());
        super::ReplicaOptions {
            kubeconfig: Some(self.kubeconfig(&super::kubeconfig_path(), dir, &name)),
            ..Default::default()
        }
    }

    /// Write `<dir>/<name>`: the kubeconfig at `source` (its credentials) with its server pointing at this proxy.
    pub fn kubeconfig(&self, source: &Path, dir: &Path, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(source).expect("read the kubeconfig");
        let url = super::proxy::server_url(source);
        assert!(text.contains(&url), "the kubeconfig does not spell out {url}");
        let path = dir.join(name);
        std::fs::write(&path, text.replace(&url, &format!("http://{}", self.addr))).expect("write the kubeconfig");
        path
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.stop.cancel();
    }
}

impl Faults {
    /// What this request gets, counting it against its hold.
    fn hold_for(&self, method: &Method, path: &str) -> Option<Effect> {
        let mut holds = self.holds.lock().unwrap();
        let i = holds.iter().position(|h| {
            h.left > 0 && h.method.as_ref().is_none_or(|m| m == method) && path.contains(&h.path_contains)
        })?;
        holds[i].left = holds[i].left.saturating_sub(1);
        self.held.fetch_add(1, Ordering::Relaxed);
        Some(holds[i].effect)
    }

    fn watch_lag(&self) -> Duration {
        Duration::from_millis(self.watch_lag_ms.load(Ordering::Relaxed))
    }
}

/// Where requests go on to.
struct Upstream {
    base: String,
    client: reqwest::Client,
}

async fn accept_loop(listener: TcpListener, upstream: Arc<Upstream>, faults: Arc<Faults>, stop: CancellationToken) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (upstream, faults, stop) = (upstream.clone(), faults.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| forward(request, upstream.clone(), faults.clone()));
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Send one request on and relay its answer, late if a fault says so.
async fn forward(
    request: Request<Incoming>,
    upstream: Arc<Upstream>,
    faults: Arc<Faults>,
) -> Result<Response<ProxyBody>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let watch = is_watch(&path);
    let body = body.collect().await?.to_bytes();
    let mut out = upstream.client.request(parts.method.clone(), format!("{}{path}", upstream.base));
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) && name != HOST && name != CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    let effect = if watch { None } else { faults.hold_for(&parts.method, &path) };
    if let Some(Effect::Refused(code)) = effect {
        return Ok(refusal(code));
    }
    let answer = out.body(body).send().await?;
    if let Some(Effect::Late(delay)) = effect {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !is_hop_by_hop(name) && name != CONTENT_LENGTH {
            response = response.header(name, value);
        }
    }
    let (chunks, body) = mpsc::channel(16);
    tokio::spawn(relay(answer, chunks, watch.then_some(faults)));
    Ok(response.body(StreamBody::new(body))?)
}

/// The answer an apiserver that cannot serve a request now gives: for `404` the bare text of a path it does not
/// serve, for any other `code` a `Status`.
fn refusal(code: u16) -> Response<ProxyBody> {
    let (content_type, body) = match code {
        404 => ("text/plain; charset=utf-8", "404 page not found\n".to_string()),
        _ => {
            let message = "the server is currently unable to handle the request (refused by the test proxy)";
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": "ServiceUnavailable", "code": code});
            ("application/json", status.to_string())
        }
    };
    let (mut chunks, answer) = mpsc::channel(1);
    chunks.try_send(Ok(Frame::data(Bytes::from(body)))).expect("room for the one chunk");
    Response::builder()
        .status(http::StatusCode::from_u16(code).expect("a valid status"))
        .header(http::header::CONTENT_TYPE, content_type)
        .body(StreamBody::new(answer))
        .expect("a valid answer")
}

/// Copy an answer's body to the replica: at once, or for a watch each chunk its lag after it arrived, in order.
async fn relay(mut answer: reqwest::Response, mut to_replica: mpsc::Sender<Chunk>, lag: Option<Arc<Faults>>) {
    let Some(faults) = lag else {
        while let Some(chunk) = next_chunk(&mut answer).await {
            let failed = chunk.is_err();
            if to_replica.send(chunk).await.is_err() || failed {
                return;
            }
        }
        return;
    };
    let (due, mut queued) = mpsc::unbounded::<(Instant, Chunk)>();
    let read = async move {
        while let Some(chunk) = next_chunk(&mut answer).await {
            let failed = chunk.is_err();
            if due.unbounded_send((Instant::now() + faults.watch_lag(), chunk)).is_err() || failed {
                break;
            }
        }
        // The apiserver ended the watch: what is queued still goes out at its time, then the answer ends.
        drop(due);
        std::future::pending::<()>().await
    };
    let deliver = async move {
        while let Some((at, chunk)) = queued.next().await {
            tokio::time::sleep_until(at).await;
            if to_replica.send(chunk).await.is_err() {
                return;
            }
        }
    };
    // Ends when everything queued is delivered, or when the replica hangs up (which closes the upstream watch).
    tokio::select! {
        _ = read => {}
        _ = deliver => {}
    }
}

/// The next chunk of an answer's body, `None` at its end.
async fn next_chunk(answer: &mut reqwest::Response) -> Option<Chunk> {
    answer.chunk().await.map_err(std::io::Error::other).map(|c| c.map(Frame::data)).transpose()
}

fn is_watch(path_and_query: &str) -> bool {
    let query = path_and_query.split_once('?').map_or("", |(_, q)| q);
    query.split('&').any(|pair| pair == "watch=true" || pair == "watch=1")
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION || name == TRANSFER_ENCODING || name.as_str() == "keep-alive" || name.as_str() == "upgrade"
}
