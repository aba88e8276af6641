//! What the operator's own HTTPS and HTTP servers (the admission webhook, the report endpoint) spend on a peer
//! before they know who it is.
//!
//! Both take requests from anyone who can reach their port (the webhook's callers cannot be narrowed to the
//! apiserver's address), and hold what a peer sends in memory while it arrives. So each server
//! - takes at most a share of connections from one address at once (more are closed at once: one peer cannot fill
//!   the server, nor lock others out), and reads at most [`READ_BUFFER`] of a connection ahead of what it handles;
//! - keeps a budget of bytes for the bodies it is reading at once, charged as the bytes arrive (a peer that
//!   declares a large body and sends nothing costs nothing: what is charged is the buffer the body is copied into),
//!   and held until the request is answered (its parse included); a part of a body waits for room only briefly,
//!   then the request is answered 503;
//! - gives a body a time limit to arrive.
//!
//! Peers that send large bodies and stall then cost bounded memory and hold it for at most the time limit: the
//! replica is not OOM-killed. Keeping the budget full takes sending it again every time limit, from enough
//! addresses; requests meanwhile wait for room and may be answered 503.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::{Bytes, Incoming};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How much of a connection is read ahead of what is handled (hyper's default is about 400 KiB): also the largest
/// part of a body charged at once.
pub const READ_BUFFER: usize = 64 * 1024;

/// A server's bounds.
#[derive(Clone)]
pub struct Bounds {
    bytes: Arc<Semaphore>,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Connections one address may hold open at once.
    per_peer: usize,
    /// The largest body read.
    pub largest: usize,
    /// How long a body may take to arrive.
    pub arrive_within: Duration,
    /// How long a part of a body waits for room in the budget before the request is answered 503.
    pub wait_for_room: Duration,
}

/// Why a body was not read: an HTTP status and what to tell the peer.
#[derive(Debug, PartialEq, Eq)]
pub struct Unread {
    /// 400 (broken), 408 (too slow), 413 (too large), 503 (no room now).
    pub code: u16,
    /// What happened.
    pub message: String,
}

/// A body read within the bounds, and its charge to the budget: keep it until the request is answered.
pub struct Body {
    /// The bytes.
    pub bytes: Bytes,
    _charge: Option<OwnedSemaphorePermit>,
}

/// One of a peer's connections; its place is given back when dropped.
pub struct Connection {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl Bounds {
    /// `budget` bytes of bodies at once, none over `largest`; `per_peer` connections from one address.
    pub fn new(budget: usize, largest: usize, per_peer: usize) -> Self {
        assert!(largest <= budget && budget <= u32::MAX as usize, "a body at its largest must fit the budget");
        Bounds {
            bytes: Arc::new(Semaphore::new(budget)),
            peers: Default::default(),
            per_peer,
            largest,
            arrive_within: Duration::from_secs(10),
            wait_for_room: Duration::from_secs(5),
        }
    }

    /// A place for one more connection from `peer`; `None`: it holds its share already, close this one.
    pub fn connection(&self, peer: IpAddr) -> Option<Connection> {
        let mut peers = self.peers.lock().expect("peers lock");
        let n = peers.entry(peer).or_default();
        if *n >= self.per_peer {
            return None;
        }
        *n += 1;
        Some(Connection { peers: self.peers.clone(), peer })
    }

    /// The next connection from an address that holds less than its share; others are closed at
    /// once. `server` names the server in the log.
    pub async fn accept(&self, listener: &TcpListener, server: &str) -> (TcpStream, SocketAddr, Connection) {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, typically: do not spin.
                    tracing::warn!(error = %e, "{server}: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.connection(peer.ip()) {
                Some(place) => return (sock, peer, place),
                None => {
                    tracing::debug!(%peer, "{server}: this address holds its share of connections; closing this one")
                }
            }
        }
    }

    /// An HTTP/1 connection reading at most [`READ_BUFFER`] ahead, and giving up on headers after 30 s.
    pub fn http1() -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(READ_BUFFER);
        builder
    }

    /// Read `req`'s body within the bounds.
    pub async fn read(&self, req: Request<Incoming>) -> Result<Body, Unread> {
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.largest as u64) {
            return Err(self.too_large());
        }
        let arrived = tokio::time::timeout(self.arrive_within, self.collect(req.into_body())).await;
        arrived.unwrap_or_else(|_| {
            Err(Unread {
                code: 408,
                message: format!("the request's body did not arrive within {:?}", self.arrive_within),
            })
        })
    }

    /// The body, copied part by part into one buffer whose capacity is charged to the budget as it grows. Each part
    /// is dropped once copied: a part is a slice of hyper's read buffer, and kept, it would pin that buffer's whole
    /// block (a peer sending one byte at a time would pin kilobytes per byte charged).
    async fn collect(&self, mut body: Incoming) -> Result<Body, Unread> {
        let mut read: Vec<u8> = Vec::new();
        let mut charge: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Unread { code: 400, message: format!("cannot read the request: {e}") })?;
            let Ok(data) = frame.into_data() else { continue };
            let needed = read.len() + data.len();
            if needed > self.largest {
                return Err(self.too_large());
            }
            if needed > read.capacity() {
                let grown = needed.max(read.capacity().saturating_mul(2)).min(self.largest);
                let room = self.bytes.clone().acquire_many_owned((grown - read.capacity()) as u32);
                let Ok(Ok(room)) = tokio::time::timeout(self.wait_for_room, room).await else {
                    return Err(Unread {
                        code: 503,
                        message: "too many request bodies arriving at once on this replica; try again".into(),
                    });
                };
                match charge.as_mut() {
                    Some(c) => c.merge(room),
                    None => charge = Some(room),
                }
                read.reserve_exact(grown - read.len());
            }
            read.extend_from_slice(&data);
        }
        Ok(Body { bytes: Bytes::from(read), _charge: charge })
    }

    fn too_large(&self) -> Unread {
        Unread { code: 413, message: format!("the request's body is over {} bytes", self.largest) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_share_of_connections_and_gets_them_back() {
        let bounds = Bounds::new(1024, 1024, 64);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<Connection> = (0..64).map(|_| bounds.connection(a).unwrap()).collect();
        assert!(bounds.connection(a).is_none(), "a's share is full");
        assert!(bounds.connection(b).is_some(), "another address is not locked out");
        drop(held);
        assert!(bounds.connection(a).is_some(), "closed connections give their places back");
        assert!(bounds.peers.lock().unwrap().is_empty(), "no address is remembered once its connections closed");
    }
}
