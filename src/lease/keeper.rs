//! Keeping a Lease: the one renew loop every kind of Lease uses, and the one answer to "is it still mine?".

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
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
    /// Wakes [`Keeper::keep`] for a renewal now ([`Keeper::renew_soon`]).
    soon: tokio::sync::Notify,
}

struct State {
    lease: Lease,
    /// When the last write known to have landed (the acquiring one, or a renewal) was sent.
    renewed_at: Instant,
    /// Set by [`Keeper::annotate`]: written with every renewal (a renewal in flight as they are set would otherwise
    /// bring back the Lease without them).
    annotations: BTreeMap<String, String>,
    /// Renewals sent since the last one known to have landed whose answer never came (nor a read-back saying
    /// whether they landed): their `renewTime` stamps and when they were sent. A later read-back that finds one of
    /// them credits it: the answer to a renewal that landed may be lost, and so may the read-back after it.
    unanswered: Vec<(MicroTime, Instant)>,
}

/// How soon a renewal whose outcome is unknown is tried again, at most.
const RETRY: Duration = Duration::from_millis(500);

/// The `renewTime` of the next renewal: now, but strictly after the Lease's last one as known here and the last
/// unanswered one, so that a stamp a read-back finds names one renewal only, even if the machine's clock stepped
/// back. Never the last one itself: a renewal that writes the Lease as it is stored changes nothing (no new
/// resourceVersion), so the observers would see it stand still while this replica counts it renewed. (A `renewTime`
/// edited to the last microsecond the types hold has no successor: then now.)
fn next_stamp(now: MicroTime, last: Option<&MicroTime>, unanswered: Option<&MicroTime>) -> MicroTime {
    let Some(latest) = last.into_iter().chain(unanswered).map(|t| t.0).max() else { return now };
    if now.0 > latest {
        return now;
    }
    MicroTime(latest.checked_add(jiff::SignedDuration::from_micros(1)).unwrap_or(now.0))
}

/// When the renewal whose stamp `found` shows was sent, among `unanswered` (None: none of them).
fn landed(unanswered: &[(MicroTime, Instant)], found: Option<&MicroTime>) -> Option<Instant> {
    let found = found?;
    unanswered.iter().find(|(stamp, _)| stamp == found).map(|(_, sent)| *sent)
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
            state: Mutex::new(State {
                lease: held.lease,
                renewed_at: held.written_at,
                annotations: BTreeMap::new(),
                unanswered: Vec::new(),
            }),
            lost: AtomicBool::new(false),
            soon: tokio::sync::Notify::new(),
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

    /// The resourceVersion of the Lease as last written or read.
    pub fn resource_version(&self) -> Option<String> {
        self.state.lock().unwrap().lease.metadata.resource_version.clone()
    }

    /// Renew now rather than a renew interval after the last renewal (once; called while a renewal is in flight, right
    /// after it), so that what [`Keeper::annotate`] set is written at once: one write more, for a change the others
    /// must learn soon.
    pub fn renew_soon(&self) {
        self.soon.notify_one();
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
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.soon.notified() => {}
            }
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
                    self.timing.renew_interval.min(RETRY)
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
        let last = held.spec.as_ref().and_then(|s| s.renew_time.as_ref());
        let stamp = next_stamp(now_micro(), last, self.state.lock().unwrap().unanswered.last().map(|(s, _)| s));
        let mut lease = held.clone();
        lease.spec.get_or_insert_with(Default::default).renew_time = Some(stamp.clone());
        lease.metadata.annotations.get_or_insert_with(Default::default).extend(annotations);
        // Why it did not go through, and whether it may have landed all the same (a conflict is a definite "not
        // written").
        let (why, may_have_landed) = match tokio::time::timeout(self.time_left(), replace(&self.api, &lease)).await {
            Ok(Ok(Some(renewed))) => {
                self.renewed(renewed, Some(sent));
                return Renewal::Renewed;
            }
            Ok(Ok(None)) => ("conflict".to_string(), false),
            Ok(Err(e)) => (e.to_string(), true),
            Err(_) => ("timed out".to_string(), true),
        };
        if may_have_landed {
            // As many are kept as can be sent within a renew deadline, retrying every 500 ms at most.
            let most =
                self.timing.renew_deadline.as_millis() / self.timing.renew_interval.min(RETRY).as_millis().max(1);
            let mut state = self.state.lock().unwrap();
            if state.unanswered.len() > most as usize {
                state.unanswered.remove(0);
            }
            state.unanswered.push((stamp.clone(), sent));
        }
        let name = held.name_any();
        match tokio::time::timeout(self.time_left(), crate::unreadable::get_opt(&self.api, &name)).await {
            Ok(Ok(Some(now))) if same_tenure(&held, &now) => {
                let found = now.spec.as_ref().and_then(|s| s.renew_time.as_ref());
                let landed = landed(&self.state.lock().unwrap().unanswered, found);
                self.renewed(now, landed);
                if landed.is_some() { Renewal::Renewed } else { Renewal::Unknown(why) }
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
            // Only ever forward: a read-back may credit a renewal older than one an answer already credited.
            state.renewed_at = state.renewed_at.max(sent);
            state.unanswered.retain(|(_, s)| *s > sent);
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
                match crate::unreadable::get_opt(&self.api, &lease.name_any()).await? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_back_credits_whichever_unanswered_renewal_it_finds_landed() {
        let stamp = |us: i64| MicroTime(jiff::Timestamp::from_microsecond(us).unwrap());
        let t0 = Instant::now();
        let sent = [(stamp(1), t0), (stamp(2), t0 + Duration::from_millis(500))];
        // The second renewal's answer was lost, and so was its read-back; the third's read-back finds it.
        assert_eq!(landed(&sent, Some(&stamp(2))), Some(t0 + Duration::from_millis(500)));
        assert_eq!(landed(&sent, Some(&stamp(1))), Some(t0));
        assert_eq!(landed(&sent, Some(&stamp(3))), None, "a renewTime none of them wrote (the acquiring write's)");
        assert_eq!(landed(&sent, None), None);
    }

    #[test]
    fn each_renewal_is_stamped_after_the_last_known_one_even_if_the_clock_stepped_back() {
        let stamp = |us: i64| MicroTime(jiff::Timestamp::from_microsecond(us).unwrap());
        assert_eq!(next_stamp(stamp(10), Some(&stamp(5)), None), stamp(10));
        assert_eq!(next_stamp(stamp(10), Some(&stamp(10)), None), stamp(11), "the same microsecond");
        assert_eq!(next_stamp(stamp(3), Some(&stamp(5)), Some(&stamp(8))), stamp(9), "the clock stepped back");
        assert_eq!(next_stamp(stamp(3), None, None), stamp(3));
        // Edited by hand to the last microsecond the types hold: not written back as it is.
        let last: MicroTime = serde_json::from_str(r#""9999-12-30T22:00:00.999999Z""#).unwrap();
        assert_eq!(next_stamp(stamp(3), Some(&last), None), stamp(3));
    }
}
