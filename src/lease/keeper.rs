//! Keeping a Lease: the one renew loop every kind of Lease uses, and the one answer to "is it still mine?".

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use tracing::warn;

use super::{Held, LeaseTiming, now_micro, release_if_current, replace, same_tenure, vacate};

/// Keeps one acquired Lease renewed and says whether its holder may still act on it.
///
/// Current means: the last renewal known to have landed was *sent* less than the renew deadline ago, and nobody
/// took the Lease since. Once not current, never current again: a holder that missed its deadline may have been
/// taken over already, and it cannot know.
pub struct Keeper {
    api: Api<Lease>,
    timing: LeaseTiming,
    state: Mutex<State>,
    lost: AtomicBool,
}

struct State {
    lease: Lease,
    /// When the last write known to have landed (the acquiring one, or a renewal) was sent.
    renewed_at: Instant,
    /// Set by [`Keeper::annotate`]: written with every renewal (a renewal in flight as they are set would otherwise
    /// bring back the Lease without them).
    annotations: BTreeMap<String, String>,
}

enum Renewal {
    Renewed,
    Lost,
    Unknown(String),
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").field("lease", &self.lease().name_any()).field("current", &self.is_current()).finish()
    }
}

impl Keeper {
    /// Keep `held`, acquired through `api`.
    pub fn new(api: Api<Lease>, held: Held, timing: LeaseTiming) -> Self {
        Keeper {
            api,
            timing,
            state: Mutex::new(State { lease: held.lease, renewed_at: held.written_at, annotations: BTreeMap::new() }),
            lost: AtomicBool::new(false),
        }
    }

    /// Whether the holder may still act: renewed within the renew deadline and never lost.
    pub fn is_current(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        if self.time_left().is_zero() {
            self.lost.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// How long the holder may still act without another renewal landing. Bound every call made on the Lease's
    /// behalf by this.
    pub fn time_left(&self) -> Duration {
        if self.lost.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        self.timing.renew_deadline.saturating_sub(self.state.lock().unwrap().renewed_at.elapsed())
    }

    /// The Lease as last written or read.
    pub fn lease(&self) -> Lease {
        self.state.lock().unwrap().lease.clone()
    }

    /// Set an annotation on the Lease from its next renewal on (within a renew interval): a change of what the
    /// holder says about itself, not of who holds it, so it costs no write of its own.
    pub fn annotate(&self, key: &str, value: &str) {
        self.state.lock().unwrap().annotations.insert(key.to_string(), value.to_string());
    }

    /// Renew every renew interval; return only once the Lease is no longer current (taken, deleted, or not renewed
    /// within the renew deadline). Whoever holds a Lease must stop acting when this returns.
    pub async fn keep(&self, failures: &Counter) {
        let mut wait = self.timing.renew_interval;
        loop {
            tokio::time::sleep(wait).await;
            if !self.is_current() {
                return;
            }
            wait = match self.renew_once().await {
                Renewal::Renewed => self.timing.renew_interval,
                Renewal::Lost => {
                    warn!(lease = %self.lease().name_any(), "lease was taken over or deleted");
                    self.lost.store(true, Ordering::SeqCst);
                    return;
                }
                Renewal::Unknown(why) => {
                    failures.inc();
                    warn!(lease = %self.lease().name_any(), %why, "lease renewal did not go through; retrying");
                    self.timing.renew_interval.min(Duration::from_millis(500))
                }
            };
        }
    }

    /// One renewal. A write that failed or conflicted may still have landed, or may have met a harmless change
    /// (a label edit): the Lease is read back, and only another tenure, or its absence, counts as lost.
    async fn renew_once(&self) -> Renewal {
        let (held, annotations) = {
            let state = self.state.lock().unwrap();
            (state.lease.clone(), state.annotations.clone())
        };
        let sent = Instant::now();
        let stamp = now_micro();
        let mut lease = held.clone();
        lease.spec.get_or_insert_with(Default::default).renew_time = Some(stamp.clone());
        lease.metadata.annotations.get_or_insert_with(Default::default).extend(annotations);
        let why = match tokio::time::timeout(self.time_left(), replace(&self.api, &lease)).await {
            Ok(Ok(Some(renewed))) => {
                self.renewed(renewed, Some(sent));
                return Renewal::Renewed;
            }
            Ok(Ok(None)) => "conflict".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        let name = held.name_any();
        match tokio::time::timeout(self.time_left(), self.api.get_opt(&name)).await {
            Ok(Ok(Some(now))) if same_tenure(&held, &now) => {
                let landed = now.spec.as_ref().and_then(|s| s.renew_time.as_ref()) == Some(&stamp);
                self.renewed(now, landed.then_some(sent));
                if landed { Renewal::Renewed } else { Renewal::Unknown(why) }
            }
            Ok(Ok(_)) => Renewal::Lost,
            Ok(Err(e)) => Renewal::Unknown(format!("{why}; reading it back: {e}")),
            Err(_) => Renewal::Unknown(format!("{why}; reading it back timed out")),
        }
    }

    fn renewed(&self, lease: Lease, sent: Option<Instant>) {
        let mut state = self.state.lock().unwrap();
        state.lease = lease;
        if let Some(sent) = sent {
            state.renewed_at = sent;
        }
    }

    /// Give the Lease back (only if it is still exactly as last written here), so others need not wait for it to
    /// expire. Call only after the work it guards has stopped.
    pub async fn release(&self) {
        let left = self.timing.renew_deadline;
        let giving_back = async {
            // Our copy may be a renewal behind (one that landed while the work ended): on a conflict, read it back
            // and give back the same tenure under its current version.
            for _ in 0..2 {
                let lease = self.lease();
                if release_if_current(&self.api, &lease).await? {
                    return Ok(());
                }
                match self.api.get_opt(&lease.name_any()).await? {
                    Some(now) if same_tenure(&lease, &now) => self.renewed(now, None),
                    _ => return Ok(()),
                }
            }
            Ok::<(), crate::Error>(())
        };
        let name = self.lease().name_any();
        match tokio::time::timeout(left, giving_back).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, lease = %name, "could not give back a lease; it expires"),
            Err(_) => warn!(lease = %name, "giving back a lease timed out; it expires on its own"),
        }
    }

    /// Leave the Lease in place with no holder (see [`vacate`]), so others may take it at once. Call only after the
    /// work it guards has stopped.
    pub async fn vacate(&self) {
        let lease = self.lease();
        match tokio::time::timeout(self.timing.renew_deadline, vacate(&self.api, &lease)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, lease = %lease.name_any(), "could not vacate a lease; it expires"),
            Err(_) => warn!(lease = %lease.name_any(), "vacating a lease timed out; it expires on its own"),
        }
    }

    /// Stop acting on this Lease from now on (e.g. the work it guards was handed over).
    pub fn give_up(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }
}
