//! The holder's side of [`super::tenure`]: the Leases this replica holds under its tenure, confirmed in one list.
//!
//! Nobody renews a vouched-for Lease, so nobody would notice it deleted by hand, and others take an absent Lease
//! after seeing it absent for a lease duration. Every renew interval the replica lists the Leases labelled as held
//! by it ([`super::tenure::HELD_BY_LABEL`]; one read, whatever the number of attempts) and, for each it holds:
//! - present in the same tenure: confirmed as of the list's send time;
//! - absent: re-created at once, as held (others wait out an absence for a lease duration);
//! - taken by someone else (or re-created by someone else first): lost.
//!
//! An attempt acts only while its tenure (the member Lease's [`Keeper`]) is current and each of its Leases was
//! confirmed (or written) less than a renew deadline ago: the same rule as a renewed Lease, with the list standing
//! in for the renewal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Acquire, Claim, Held, Keeper, LeaseTiming, create, holder, release_if_current, same_tenure, vacate};

/// Where a held Lease lives.
type Key = (String, String);

fn key_of(lease: &Lease) -> Key {
    (lease.namespace().unwrap_or_default(), lease.name_any())
}

#[derive(Debug)]
struct Entry {
    /// Which hold registered it (a key Lease given back by one attempt may be taken by the next before the first
    /// hold is dropped).
    hold: u64,
    lease: Lease,
    /// Send time of the last write or list that showed it ours.
    confirmed_at: Instant,
    /// When this replica learnt that its write of the Lease landed (the answer came in). Only a list sent after
    /// that is sure to show the write: one sent between the write's send and its answer may be served before the
    /// write, and show the version it replaced (perhaps another tenure's, or disowned): not a takeover.
    landed_at: Instant,
    lost: bool,
}

/// The Leases this replica holds under its tenure, shared by its attempts and its confirming loop.
#[derive(Debug, Default)]
pub struct HeldLeases {
    entries: Mutex<HashMap<Key, Entry>>,
    holds: std::sync::atomic::AtomicU64,
}

/// What one list says about one held Lease (the pure part of the confirmation).
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Still ours.
    Ours,
    /// Gone: re-create it.
    Absent,
    /// Someone else's now.
    Taken,
}

/// Judge a held Lease against what the list found under its name.
pub fn check(held: &Lease, found: Option<&Lease>) -> Check {
    match found {
        None => Check::Absent,
        Some(f) if same_tenure(held, f) && holder(f).is_some() => Check::Ours,
        Some(_) => Check::Taken,
    }
}

impl HeldLeases {
    /// Start holding `leases` for one attempt, under `tenure` (the member Lease's Keeper the claim was made under).
    pub fn hold(self: &Arc<Self>, client: Client, leases: Vec<Held>, tenure: Arc<Keeper>, timing: LeaseTiming) -> Hold {
        let id = self.holds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap();
        let keys = leases
            .into_iter()
            .map(|h| {
                let key = key_of(&h.lease);
                let entry = Entry {
                    hold: id,
                    lease: h.lease,
                    confirmed_at: h.written_at,
                    landed_at: Instant::now(),
                    lost: false,
                };
                entries.insert(key.clone(), entry);
                key
            })
            .collect();
        Hold { registry: self.clone(), client, id, keys, tenure, timing }
    }

    /// Confirm every Lease held before `sent` against `found` (a list sent at `sent`); re-create the absent ones.
    async fn confirm(&self, found: &HashMap<Key, Lease>, sent: Instant, client: &Client, timing: &LeaseTiming) {
        for (key, lease) in self.judge(found, sent) {
            let api: Api<Lease> = Api::namespaced(client.clone(), &key.0);
            let claim = Claim {
                holder: holder(&lease).unwrap_or_default().to_string(),
                annotations: lease.metadata.annotations.clone().unwrap_or_default(),
                labels: lease.metadata.labels.clone().unwrap_or_default(),
                owner: lease.metadata.owner_references.as_ref().and_then(|o| o.first().cloned()),
            };
            let outcome = tokio::time::timeout(timing.renew_deadline, create(&api, &key.1, &claim, timing)).await;
            let mut entries = self.entries.lock().unwrap();
            let Some(e) = entries.get_mut(&key) else { continue };
            match outcome {
                Ok(Ok(Acquire::Acquired(h))) => {
                    warn!(lease = %key.1, namespace = %key.0, "a held lease was deleted under its holder; re-created");
                    e.lease = h.lease;
                    e.confirmed_at = h.written_at;
                    e.landed_at = Instant::now();
                }
                // Not gone after all: the list was served before our own create (a claim in flight) landed.
                Ok(Ok(Acquire::Lost(Some(now)))) if check(&lease, Some(&now)) == Check::Ours => e.lease = now,
                Ok(Ok(Acquire::Lost(_))) => e.lost = true,
                Ok(Err(err)) => warn!(lease = %key.1, error = %err, "could not re-create a held lease; retrying"),
                Err(_) => warn!(lease = %key.1, "re-creating a held lease timed out; retrying"),
            }
        }
    }

    /// Judge the held Leases against `found` (a list sent at `sent`): confirm ours, mark the taken ones lost, and
    /// return the absent ones (to re-create). Only a list sent after a write's answer came in may say it was taken
    /// or is gone.
    fn judge(&self, found: &HashMap<Key, Lease>, sent: Instant) -> Vec<(Key, Lease)> {
        let mut entries = self.entries.lock().unwrap();
        let mut absent = Vec::new();
        for (key, e) in entries.iter_mut().filter(|(_, e)| !e.lost && e.confirmed_at <= sent) {
            match check(&e.lease, found.get(key)) {
                // Our very tenure in a list sent after our write was: proof enough, whenever the answer came.
                Check::Ours => {
                    e.lease = found[key].clone();
                    e.confirmed_at = sent;
                }
                // Anything else says nothing of a write whose answer came in after the list was sent.
                _ if e.landed_at > sent => {}
                Check::Taken => {
                    warn!(lease = %key.1, namespace = %key.0, "a held lease was taken by someone else");
                    e.lost = true;
                }
                Check::Absent => absent.push((key.clone(), e.lease.clone())),
            }
        }
        absent
    }

    /// How many Leases are held.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// List the Leases held by `member` (in `namespaces`, or everywhere with `None`) every renew interval and confirm
/// them, until `stop`.
pub async fn confirm_loop(
    client: Client,
    registry: Arc<HeldLeases>,
    member: String,
    namespaces: Option<Vec<String>>,
    timing: LeaseTiming,
    stop: CancellationToken,
) {
    let selector = format!("{}={member}", super::tenure::HELD_BY_LABEL);
    let apis: Vec<Api<Lease>> = match &namespaces {
        None => vec![Api::all(client.clone())],
        Some(nss) => nss.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(timing.renew_interval) => {}
            _ = stop.cancelled() => return,
        }
        if registry.is_empty() {
            continue;
        }
        let sent = Instant::now();
        let listed = async {
            let mut found = HashMap::new();
            for api in &apis {
                for l in crate::unreadable::list_selected(api, ListParams::default().labels(&selector)).await? {
                    found.insert(key_of(&l), l);
                }
            }
            Ok::<_, crate::Error>(found)
        };
        match tokio::time::timeout(timing.renew_deadline, listed).await {
            Ok(Ok(found)) => registry.confirm(&found, sent, &client, &timing).await,
            Ok(Err(e)) => warn!(error = %e, "could not list the held leases; retrying"),
            Err(_) => warn!("listing the held leases timed out; retrying"),
        }
    }
}

/// One attempt's Leases, held under one tenure.
pub struct Hold {
    registry: Arc<HeldLeases>,
    client: Client,
    id: u64,
    keys: Vec<Key>,
    tenure: Arc<Keeper>,
    timing: LeaseTiming,
}

impl Hold {
    /// How long the attempt may still act: until its tenure or any of its Leases' confirmations runs out.
    pub fn time_left(&self) -> Duration {
        let entries = self.registry.entries.lock().unwrap();
        self.keys.iter().fold(self.tenure.time_left(), |left, k| match entries.get(k) {
            Some(e) if !e.lost && e.hold == self.id => {
                left.min(self.timing.renew_deadline.saturating_sub(e.confirmed_at.elapsed()))
            }
            _ => Duration::ZERO,
        })
    }

    /// Whether the attempt may still act.
    pub fn is_current(&self) -> bool {
        self.tenure.is_current() && !self.time_left().is_zero()
    }

    /// Resolves once the attempt may no longer act.
    pub async fn lost(&self) {
        while self.is_current() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The Leases as last confirmed, in the order given to [`HeldLeases::hold`].
    pub fn leases(&self) -> Vec<Lease> {
        let entries = self.registry.entries.lock().unwrap();
        self.keys.iter().filter_map(|k| entries.get(k).filter(|e| e.hold == self.id).map(|e| e.lease.clone())).collect()
    }

    /// Stop holding: give back each Lease by `give_back` (delete, vacate or disown; see [`Give`]), only if it is
    /// still exactly as last confirmed. Call only after the work they guard has stopped.
    pub async fn give_back(self, how: impl Fn(&Lease) -> Give) {
        let leases = self.leases();
        // Out of the confirming list first, or it could find a released Lease gone and put it back.
        self.forget();
        for lease in leases {
            let api: Api<Lease> = Api::namespaced(self.client.clone(), &lease.namespace().unwrap_or_default());
            give(&api, &lease, how(&lease), &self.timing).await;
        }
    }

    /// The tenure the attempt acts under.
    pub fn tenure(&self) -> &Arc<Keeper> {
        &self.tenure
    }
}

/// How a Lease is given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Give {
    /// Delete it.
    Release,
    /// Keep it, with no holder: free at once.
    Vacate,
    /// Keep it as it is, vouched for by no tenure: others wait it out a lease duration (a slot whose Pod runs on).
    Disown,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.forget();
    }
}

impl Hold {
    fn forget(&self) {
        let mut entries = self.registry.entries.lock().unwrap();
        for k in &self.keys {
            if entries.get(k).is_some_and(|e| e.hold == self.id) {
                entries.remove(k);
            }
        }
    }
}

/// Give back one Lease `how`, through `api`, only if it is still exactly `lease`.
pub async fn give(api: &Api<Lease>, lease: &Lease, how: Give, timing: &LeaseTiming) {
    let name = lease.name_any();
    let giving = async {
        match how {
            Give::Release => release_if_current(api, lease).await.map(|_| ()),
            Give::Vacate => vacate(api, lease).await,
            Give::Disown => super::disown(api, lease).await,
        }
    };
    match tokio::time::timeout(timing.renew_deadline, giving).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, lease = %name, "could not give back a lease; it expires"),
        Err(_) => warn!(lease = %name, "giving back a lease timed out; it expires on its own"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn lease(uid: &str, holder: Option<&str>, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta { uid: Some(uid.into()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_held_lease_is_ours_while_the_list_shows_the_same_tenure() {
        let held = lease("u1", Some("a"), 0);
        let mut relabelled = held.clone();
        relabelled.metadata.resource_version = Some("7".into());
        assert_eq!(check(&held, Some(&relabelled)), Check::Ours);
        assert_eq!(check(&held, None), Check::Absent, "deleted by hand: put it back");
        assert_eq!(check(&held, Some(&lease("u1", Some("b"), 1))), Check::Taken);
        assert_eq!(check(&held, Some(&lease("u2", Some("a"), 0))), Check::Taken, "re-created by someone else");
        assert_eq!(check(&held, Some(&lease("u1", None, 0))), Check::Taken, "vacated by someone else");
    }

    /// A registry holding `key` in namespace `ns`, written (sent) before `list_sent` and answered after it.
    fn answered_after_a_list_was_sent() -> (HeldLeases, Lease, Key, Instant) {
        let registry = HeldLeases::default();
        let mut ours = lease("u1", Some("a"), 0);
        ours.metadata.name = Some("key".into());
        ours.metadata.namespace = Some("ns".into());
        let key = key_of(&ours);
        let written_at = Instant::now();
        let list_sent = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let entry =
            Entry { hold: 1, lease: ours.clone(), confirmed_at: written_at, landed_at: Instant::now(), lost: false };
        registry.entries.lock().unwrap().insert(key.clone(), entry);
        (registry, ours, key, list_sent)
    }

    /// Seen in chaos-free CI (concurrency keys): a replica took over its own disowned key Lease for the key's next
    /// job, and its confirming list, sent after the takeover's write was sent but served before it landed, showed
    /// the disowned version: the attempt was judged taken over, stopped after its work, and run again.
    #[test]
    fn a_list_sent_before_a_takeovers_answer_came_in_does_not_judge_it_taken() {
        let (registry, ours, key, list_sent) = answered_after_a_list_was_sent();
        // The list shows the version the takeover replaced: held by no tenure.
        let mut replaced = ours;
        replaced.metadata.annotations = None;
        replaced.spec.as_mut().unwrap().holder_identity = None;
        let found: HashMap<Key, Lease> = [(key.clone(), replaced)].into_iter().collect();
        assert!(registry.judge(&found, list_sent).is_empty());
        assert!(!registry.entries.lock().unwrap()[&key].lost, "a list older than the write says nothing of it");
        // A list sent after the answer came in does.
        assert!(registry.judge(&found, Instant::now()).is_empty());
        assert!(registry.entries.lock().unwrap()[&key].lost);
    }

    /// The other side of the rule above (review of the fix): a list sent before the answer came in that shows our
    /// own tenure confirms the Lease, or the attempt's renew deadline would run a list's latency short.
    #[test]
    fn a_list_sent_before_the_answer_came_in_that_shows_our_tenure_confirms_the_lease() {
        let (registry, ours, key, list_sent) = answered_after_a_list_was_sent();
        let found: HashMap<Key, Lease> = [(key.clone(), ours)].into_iter().collect();
        registry.judge(&found, list_sent);
        let e = &registry.entries.lock().unwrap()[&key];
        assert!(!e.lost && e.confirmed_at == list_sent);
    }
}
