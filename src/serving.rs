//! What the operator's own HTTPS and HTTP servers (the admission webhook, the report endpoint) spend on a request's
//! body before they know who sent it.
//!
//! Both take requests from anyone who can reach their port (the webhook's callers cannot be narrowed to the
//! apiserver's address), and a body is held in memory while it arrives. So each server keeps a budget of bytes for
//! the bodies it is reading at once, charged as the bytes arrive (not what a request says it will send: a peer that
//! declares a large body and sends nothing costs nothing), waits for room only briefly, and gives a body a time
//! limit to arrive. Peers that send large bodies and stall then cost bounded memory and hold it for at most the
//! time limit: the replica is not OOM-killed. Keeping the budget full takes sending it again every time limit;
//! requests meanwhile wait for room and are answered 503.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Request;
use hyper::body::Bytes;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A server's bounds.
#[derive(Clone)]
pub struct Bounds {
    bytes: Arc<Semaphore>,
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

impl Bounds {
    /// `budget` bytes of bodies at once, none over `largest`.
    pub fn new(budget: usize, largest: usize) -> Self {
        assert!(largest <= budget && budget <= u32::MAX as usize, "a body at its largest must fit the budget");
        Bounds {
            bytes: Arc::new(Semaphore::new(budget)),
            largest,
            arrive_within: Duration::from_secs(10),
            wait_for_room: Duration::from_secs(5),
        }
    }

    /// Read `req`'s body within the bounds.
    pub async fn read(&self, req: Request<Incoming>) -> Result<Bytes, Unread> {
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

    /// The body, each part charged to the budget as it arrives; the charge is given back when the body is dropped.
    async fn collect(&self, mut body: Incoming) -> Result<Bytes, Unread> {
        let mut read = Vec::new();
        let mut charged: Option<OwnedSemaphorePermit> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Unread { code: 400, message: format!("cannot read the request: {e}") })?;
            let Ok(data) = frame.into_data() else { continue };
            if read.len() + data.len() > self.largest {
                return Err(self.too_large());
            }
            let room = self.bytes.clone().acquire_many_owned(data.len() as u32);
            let Ok(Ok(room)) = tokio::time::timeout(self.wait_for_room, room).await else {
                return Err(Unread {
                    code: 503,
                    message: "too many request bodies arriving at once on this replica; try again".into(),
                });
            };
            match charged.as_mut() {
                Some(c) => c.merge(room),
                None => charged = Some(room),
            }
            read.extend_from_slice(&data);
        }
        Ok(Bytes::from(read))
    }

    fn too_large(&self) -> Unread {
        Unread { code: 413, message: format!("the request's body is over {} bytes", self.largest) }
    }
}
