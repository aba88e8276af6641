//! What the operator's own HTTPS and HTTP servers (the admission webhook, the report endpoint) spend on a peer
//! before they know who it is.
//!
//! Both take requests from anyone who can reach their port (the webhook's callers cannot be narrowed to the
//! apiserver's address), and a body is held in memory while it arrives. So each server keeps a budget of bytes for
//! the bodies it is reading at once, charged what a request says it will send (its largest when it does not say),
//! waits for room only briefly, and gives a body a time limit to arrive; and it keeps a bound on its open
//! connections. Peers that declare large bodies and stall, or open connections and send nothing, then cost bounded
//! memory and hold nothing for long: the replica is not OOM-killed, and requests that do arrive are served once the
//! stalled ones time out.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::Request;
use hyper::body::Bytes;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A server's bounds.
#[derive(Clone)]
pub struct Bounds {
    bytes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    /// The largest body read.
    pub largest: usize,
    /// How long a body may take to arrive, once there is room for it.
    pub arrive_within: Duration,
    /// How long a request waits for room in the budget before it is answered 503.
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

impl Bounds {
    /// `budget` bytes of bodies at once, none over `largest`, at most `connections` open.
    pub fn new(budget: usize, largest: usize, connections: usize) -> Self {
        assert!(largest <= budget && largest <= u32::MAX as usize, "a body at its largest must fit the budget");
        Bounds {
            bytes: Arc::new(Semaphore::new(budget)),
            connections: Arc::new(Semaphore::new(connections)),
            largest,
            arrive_within: Duration::from_secs(10),
            wait_for_room: Duration::from_secs(5),
        }
    }

    /// Room for one more connection, held until it closes; `None`: the server is at its bound, close this one now.
    pub fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Read `req`'s body within the bounds.
    pub async fn read(&self, req: Request<Incoming>) -> Result<Bytes, Unread> {
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let charge = match declared {
            Some(n) if n > self.largest as u64 => return Err(self.too_large()),
            Some(n) => n as u32,
            None => self.largest as u32,
        };
        let Ok(Ok(_room)) = tokio::time::timeout(self.wait_for_room, self.bytes.acquire_many(charge)).await else {
            return Err(Unread {
                code: 503,
                message: "too many request bodies arriving at once on this replica; try again".into(),
            });
        };
        match tokio::time::timeout(self.arrive_within, Limited::new(req.into_body(), charge as usize).collect()).await {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(self.too_large()),
            Ok(Err(e)) => Err(Unread { code: 400, message: format!("cannot read the request: {e}") }),
            Err(_) => Err(Unread {
                code: 408,
                message: format!("the request's body did not arrive within {:?}", self.arrive_within),
            }),
        }
    }

    fn too_large(&self) -> Unread {
        Unread { code: 413, message: format!("the request's body is over {} bytes", self.largest) }
    }
}
