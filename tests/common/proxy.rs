//! A TCP proxy on loopback that can reset the connections it carries, to put between one operator replica and the
//! apiserver: the replica's requests and watches then fail on demand (connection reset) while everybody else's keep
//! working, without iptables.
//!
//! TLS passes through untouched (bytes are copied both ways), and the proxy listens on the apiserver's own IP
//! (127.0.0.1), so the apiserver's certificate still matches the server URL of [`Proxy::kubeconfig`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kube::config::Kubeconfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The open connections, each with the token that resets it.
type Connections = Arc<Mutex<HashMap<u64, CancellationToken>>>;

/// A running proxy; dropping it resets every connection and stops listening.
pub struct Proxy {
    /// Where clients connect: 127.0.0.1 and a free port.
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub upstream: SocketAddr,
    connections: Connections,
    accepted: Arc<AtomicU64>,
    accept: JoinHandle<()>,
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
        let accept = tokio::spawn(accept_loop(listener, upstream, connections.clone(), accepted.clone()));
        Proxy { addr, upstream, connections, accepted, accept }
    }

    /// Reset (TCP RST, both sides) every connection open now; new connections are accepted as before. Returns how
    /// many were reset.
    pub fn reset_all(&self) -> usize {
        let open: Vec<CancellationToken> = self.connections.lock().unwrap().drain().map(|(_, t)| t).collect();
        open.iter().for_each(CancellationToken::cancel);
        open.len()
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
fn server_url(kubeconfig: &Path) -> String {
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

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, connections: Connections, accepted: Arc<AtomicU64>) {
    let ids = AtomicU64::new(0);
    while let Ok((client, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::Relaxed);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let reset = CancellationToken::new();
        connections.lock().unwrap().insert(id, reset.clone());
        let connections = connections.clone();
        tokio::spawn(async move {
            pipe(client, upstream, reset).await;
            connections.lock().unwrap().remove(&id);
        });
    }
}

/// Copy bytes both ways until either side closes, or until `reset`: then close both sockets with a RST (zero
/// linger), as a dropped connection or a restarted load balancer would.
async fn pipe(mut client: TcpStream, upstream: SocketAddr, reset: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = reset.cancelled() => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
    }
}
