//! A TCP proxy on loopback that can reset or stall the connections it carries, to put between one operator replica
//! and the apiserver: the replica's requests and watches then fail (connection reset) or hang (a partition) on
//! demand while everybody else's keep working, without iptables.
//!
//! TLS passes through untouched (bytes are copied both ways), and the proxy listens on the apiserver's own IP
//! (127.0.0.1), so the apiserver's certificate still matches the server URL of [`Proxy::kubeconfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kube::config::Kubeconfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The open connections.
type Connections = Arc<Mutex<HashMap<u64, Connection>>>;

/// One open connection: what resets it (both sides), what cuts its client's side only, what silences it for good
/// ([`Proxy::kill_silently`]), and when it opened.
struct Connection {
    reset: CancellationToken,
    cut: CancellationToken,
    alive: watch::Sender<bool>,
    opened: std::time::Instant,
}

/// A running proxy; dropping it resets every connection and stops listening.
pub struct Proxy {
    /// Where clients connect: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub upstream: SocketAddr,
    connections: Connections,
    accepted: Arc<AtomicU64>,
    accept: JoinHandle<()>,
    /// `true` while bytes flow; `false` while stalled.
    open: watch::Sender<bool>,
    /// How bytes from the apiserver to the client are shaped.
    downstream: Shape,
    /// How bytes from the client to the apiserver are shaped.
    upstream_shape: Shape,
}

impl Proxy {
    /// A proxy to the apiserver of the test kubeconfig ([`super::kubeconfig_path`]).
    pub async fn to_apiserver() -> Proxy {
        let url = server_url(&super::kubeconfig_path());
        let host_port = url.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
        let upstream: SocketAddr = host_port.parse().unwrap_or_else(|e| panic!("server {url} is not ip:port: {e}"));
        Proxy::start(upstream).await
    }

    /// A proxy to `upstream`, listening on the same IP (a free port).
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(SocketAddr::new(upstream.ip(), 0)).await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let connections = Connections::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let (open, gate) = watch::channel(true);
        let downstream = Shape::default();
        let upstream_shape = Shape::default();
        let link = Link { gate, downstream: downstream.clone(), upstream: upstream_shape.clone() };
        let accept = tokio::spawn(accept_loop(listener, upstream, connections.clone(), accepted.clone(), link));
        Proxy { addr, upstream, connections, accepted, accept, open, downstream, upstream_shape }
    }

    /// Lose the close of every connection opened from now on (`false`: pass the closes of those opened later on), as when a
    /// partition begins just as the client gives up: the apiserver's side stays open until the proxy is dropped, and
    /// what the client sent in its last [`LOSS_WINDOW`] (its TLS `close_notify`) never arrives. A request the client
    /// abandoned mid-way (a dropped future closes its connection) is then carried out to its end, where the apiserver
    /// would otherwise cancel it. Every byte to the apiserver is delayed by that window meanwhile.
    pub fn lose_closes(&self, lose: bool) {
        self.upstream_shape.lose_close.store(lose, Ordering::Relaxed);
    }

    /// Limit what the apiserver sends back to `bytes_per_second` (0: no limit): large responses then arrive long
    /// after the apiserver acted on their requests, while small ones still come quickly.
    pub fn throttle_downstream(&self, bytes_per_second: u64) {
        self.downstream.rate.store(bytes_per_second, Ordering::Relaxed);
    }

    /// Hold every answer of the apiserver (requests still go through and take effect) until [`Proxy::release_downstream`].
    pub fn hold_downstream(&self) {
        self.downstream.open.send_replace(false);
    }

    /// Deliver the answers held by [`Proxy::hold_downstream`], and every later one, again.
    pub fn release_downstream(&self) {
        self.downstream.open.send_replace(true);
    }

    /// Deliver what the apiserver sends back `latency` late (zero: at once): every answer then arrives well after
    /// the apiserver acted on its request.
    pub fn delay_downstream(&self, latency: std::time::Duration) {
        self.downstream.latency_ms.store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stall every connection, open and new, for `how_long`: bytes are held, not dropped (a partition that heals).
    pub async fn stall(&self, how_long: std::time::Duration) {
        self.open.send_replace(false);
        tokio::time::sleep(how_long).await;
        self.open.send_replace(true);
    }

    /// Let bytes flow again (after a stall that was cut short).
    pub fn heal(&self) {
        self.open.send_replace(true);
    }

    /// Reset (TCP RST, both sides) every connection open now; new connections are accepted as before. Returns how
    /// many were reset.
    pub fn reset_all(&self) -> usize {
        self.reset_older_than(std::time::Duration::ZERO)
    }

    /// Reset the connections open for at least `age` (established ones, not those still in their TLS handshake).
    pub fn reset_older_than(&self, age: std::time::Duration) -> usize {
        let mut connections = self.connections.lock().unwrap();
        let old: Vec<u64> = connections.iter().filter(|(_, c)| c.opened.elapsed() >= age).map(|(id, _)| *id).collect();
        for id in &old {
            if let Some(c) = connections.remove(id) {
                c.reset.cancel();
            }
        }
        old.len()
    }

    /// Reset the client's side of every connection open now, and leave the apiserver's side open: a partition the
    /// client notices (its requests fail, and it may send them again) and the apiserver does not. Of connections
    /// opened under [`Proxy::lose_closes`], a request in flight is then carried out to its end. Returns how many were
    /// cut.
    pub fn cut_clients(&self) -> usize {
        let connections = self.connections.lock().unwrap();
        for c in connections.values() {
            c.cut.cancel();
        }
        connections.len()
    }

    /// Make every connection open now pass nothing more, either way, and never close: a connection that died
    /// without a word (the apiserver's host gone, its FIN or RST lost). New connections work as before. Returns how
    /// many were silenced.
    pub fn kill_silently(&self) -> usize {
        let connections = self.connections.lock().unwrap();
        for c in connections.values() {
            c.alive.send_replace(false);
        }
        connections.len()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Write `<dir>/proxied-kubeconfig`: the test kubeconfig (same credentials and CA) with its server URL pointing
    /// at this proxy. Give it to a replica with `ReplicaOptions { kubeconfig: Some(path), .. }`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let original = super::kubeconfig_path();
        let text = std::fs::read_to_string(&original).expect("read the kubeconfig");
        let url = server_url(&original);
        let proxied = format!("https://{}", self.addr);
        assert!(text.contains(&url), "the kubeconfig does not spell out {url}");
        let path = dir.join("proxied-kubeconfig");
        std::fs::write(&path, text.replace(&url, &proxied)).expect("write the proxied kubeconfig");
        path
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

/// The server URL of the kubeconfig's current context.
pub fn server_url(kubeconfig: &Path) -> String {
    let config = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let context = config.current_context.clone().expect("a current context");
    let cluster = config
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .expect("the current context");
    config
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .expect("the current cluster's server")
}

/// What every connection obeys: the stall gate and the shape of each direction.
#[derive(Clone)]
struct Link {
    gate: watch::Receiver<bool>,
    downstream: Shape,
    upstream: Shape,
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    connections: Connections,
    accepted: Arc<AtomicU64>,
    link: Link,
) {
    let ids = AtomicU64::new(0);
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let (reset, cut) = (CancellationToken::new(), CancellationToken::new());
        let (alive, living) = watch::channel(true);
        let opened = std::time::Instant::now();
        let connection = Connection { reset: reset.clone(), cut: cut.clone(), alive, opened };
        connections.lock().unwrap().insert(id, connection);
        let connections = connections.clone();
        let link = link.clone();
        tokio::spawn(async move {
            pipe(client, upstream, reset, cut, link, living).await;
            connections.lock().unwrap().remove(&id);
        });
    }
}

/// Copy bytes both ways until either side closes, holding them while the gate is shut; on `reset`, close both
/// sockets with a RST (zero linger), as a dropped connection or a restarted load balancer would; on `cut`, the
/// client's only (the apiserver's side then closes as a close from the client would: see [`Proxy::lose_closes`]).
/// Once not `alive`, nothing more passes either way, and neither side is closed.
async fn pipe(
    client: TcpStream,
    upstream: SocketAddr,
    reset: CancellationToken,
    cut: CancellationToken,
    link: Link,
    alive: watch::Receiver<bool>,
) {
    if wait_open(link.gate.clone()).await.is_none() {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    // Closing with zero linger sends a RST: what a reset (dropping both halves mid-copy) should look like.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = async {
            tokio::join!(
                pump(client_read, server_write, link.gate.clone(), alive.clone(), link.upstream.clone(), &cut),
                pump(server_read, client_write, link.gate.clone(), alive.clone(), link.downstream.clone(), &cut)
            )
        } => {}
        _ = reset.cancelled() => {}
    }
}

/// How one direction is shaped: bytes per second (0: unlimited), a fixed latency (ms), a gate of its own (held
/// shut: this direction stalls while the other flows), and whether a close is lost ([`Proxy::lose_closes`]).
#[derive(Clone)]
struct Shape {
    rate: Arc<AtomicU64>,
    latency_ms: Arc<AtomicU64>,
    open: Arc<watch::Sender<bool>>,
    lose_close: Arc<AtomicBool>,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            rate: Arc::default(),
            latency_ms: Arc::default(),
            open: Arc::new(watch::channel(true).0),
            lose_close: Arc::default(),
        }
    }
}

/// What is lost with a lost close: the bytes sent this shortly before it.
pub const LOSS_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Copy one direction: each chunk is read at once, then written no earlier than `latency` after it was read, only
/// while the gate is open, and within `rate`. Dropping the halves on return closes the sockets; a reset drops them
/// mid-copy. A lost close ([`Shape::lose_close`]) never returns: `to` stays open, and what was still held back
/// when `from` closed is dropped. On `cut`, the client's halves are dropped (`from` of the upstream direction, `to`
/// of the downstream one), as if the client had closed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    gate: watch::Receiver<bool>,
    alive: watch::Receiver<bool>,
    shape: Shape,
    cut: &CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let closed = Arc::new(AtomicBool::new(false));
    let lose = shape.lose_close.load(Ordering::Relaxed);
    let read = {
        let closed = closed.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    read = from.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    },
                    _ = cut.cancelled() => break,
                };
                let mut latency = std::time::Duration::from_millis(shape.latency_ms.load(Ordering::Relaxed));
                if lose {
                    latency = latency.max(LOSS_WINDOW);
                }
                if tx.send((tokio::time::Instant::now() + latency, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            closed.store(true, Ordering::Relaxed);
            drop(from);
        }
    };
    let write = async move {
        loop {
            // Cut: towards the client, stop; towards the apiserver, end as when the client closes.
            let next = tokio::select! {
                next = rx.recv() => next,
                _ = cut.cancelled() => None,
            };
            let Some((due, bytes)) = next else { break };
            tokio::time::sleep_until(due).await;
            if lose && closed.load(Ordering::Relaxed) {
                break;
            }
            let limit = shape.rate.load(Ordering::Relaxed);
            let step = if limit == 0 { bytes.len() } else { (limit as usize / 10).max(1) };
            for piece in bytes.chunks(step) {
                if wait_open(gate.clone()).await.is_none()
                    || wait_open(alive.clone()).await.is_none()
                    || wait_open(shape.open.subscribe()).await.is_none()
                    || to.write_all(piece).await.is_err()
                {
                    return;
                }
                if limit > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs_f64(piece.len() as f64 / limit as f64)).await;
                }
            }
        }
        if lose {
            // The close is lost: `to` stays open until the reset (or dropping the proxy) ends it.
            std::future::pending::<()>().await;
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Wait until the gate is open; `None` if the proxy is gone.
async fn wait_open(mut gate: watch::Receiver<bool>) -> Option<()> {
    gate.wait_for(|open| *open).await.ok().map(|_| ())
}
