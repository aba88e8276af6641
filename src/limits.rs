//! The cluster-wide concurrency cap: `--cluster-max-concurrency N` means N slot Leases (`bgjobs-slot-0` …
//! `bgjobs-slot-<N-1>` in `--lease-namespace`). A replica must hold a slot, next to the job's own claim Lease, for as
//! long as an attempt runs, so at most N attempts run across all replicas however many there are. Slots are
//! acquired and renewed with the same conditional writes as claims, and free up when released or when their holder
//! stopped renewing for a full lease duration.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use crate::lease::{LeaseTiming, Observer};

/// The largest `--cluster-max-concurrency`: each slot is a Lease every replica caches, and every pass looks through
/// them; a cap larger than the jobs that could ever run at once limits nothing.
pub const MAX_CLUSTER_SLOTS: u32 = 10_000;

/// Label that marks slot Leases.
pub const SLOT_LABEL: &str = "bgjobs.dev/slot";

/// Name of slot `i`.
pub fn slot_name(i: u32) -> String {
    format!("bgjobs-slot-{i}")
}

/// A slot that looks free: its name and the Lease as seen (absent, or expired and to be taken over).
#[derive(Clone, Debug)]
pub struct FreeSlot {
    /// Lease name.
    pub name: String,
    /// The stale Lease to take over, or `None` to create it.
    pub seen: Option<Arc<Lease>>,
    /// The tenure vouching for `seen`, when it is free because that tenure stopped (it must end first).
    pub expired_tenure: Option<crate::lease::tenure::Vouch>,
}

/// The Lease that records how many slots were ever made (annotation [`SLOTS_MADE`]): a slot below that number that
/// is absent was deleted by hand, maybe under a running attempt, and is not made again at start-up.
pub const SLOTS_RECORD: &str = "bgjobs-slots";
/// The annotation of [`SLOTS_RECORD`] with the number of slots made.
pub const SLOTS_MADE: &str = "bgjobs.dev/slots-made";

/// How many slot Leases one step of [`ensure_slots`] makes before it records them made: a step that runs out of
/// patience, or a replica that restarts, resumes after the last step recorded instead of from slot 0.
pub const SLOTS_PER_STEP: u32 = 256;
/// How many slot Leases are created at once.
const SLOT_CREATES_AT_ONCE: usize = 16;

/// One step of making the slot Leases of `capacity`: create, vacant, the next [`SLOTS_PER_STEP`] never made before,
/// then raise the record. Returns how many slots the record says are made (`capacity` or more: all of them). Every
/// replica does this at start-up, step after step, so that an absent slot afterwards means one deleted by hand,
/// waited out like an expired one (its holder, if alive, puts it back within a renew interval), never a new one. A
/// slot made before and absent now is left absent: made vacant at a replica's start, it was free at once, and taken
/// for another job beside the attempt that held it.
pub async fn ensure_slots(client: &kube::Client, namespace: &str, capacity: u32) -> crate::Result<u32> {
    use futures::{StreamExt, TryStreamExt};
    let api: kube::Api<Lease> = kube::Api::namespaced(client.clone(), namespace);
    let labels = || {
        Some(
            [
                (crate::lease::MANAGED_BY_LABEL.to_string(), crate::lease::MANAGED_BY.to_string()),
                (SLOT_LABEL.to_string(), "true".to_string()),
            ]
            .into(),
        )
    };
    // Made before the record existed (an older release), the slots count as never made: as that release did.
    let made = |record: &Option<Lease>| {
        record.as_ref().and_then(|r| crate::lease::annotation(r, SLOTS_MADE)?.parse::<u32>().ok()).unwrap_or(0)
    };
    let mut record = crate::unreadable::get_opt(&api, SLOTS_RECORD).await?;
    let from = made(&record);
    if from >= capacity {
        return Ok(from);
    }
    let to = from.saturating_add(SLOTS_PER_STEP).min(capacity);
    let create = |i: u32| {
        let (api, lease) = (
            api.clone(),
            Lease {
                metadata: kube::api::ObjectMeta { name: Some(slot_name(i)), labels: labels(), ..Default::default() },
                spec: Some(Default::default()),
            },
        );
        async move {
            match api.create(&Default::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(e) if crate::error::api_code(&e) == Some(409) => Ok(()),
                Err(e) => Err(crate::Error::from(e)),
            }
        }
    };
    futures::stream::iter(from..to).map(create).buffer_unordered(SLOT_CREATES_AT_ONCE).try_collect::<()>().await?;
    // Then the record, raised to `to` under the version read (another replica may raise it meanwhile; never lowered).
    loop {
        if made(&record) >= to {
            return Ok(made(&record));
        }
        let mut next = record.clone().unwrap_or_else(|| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(SLOTS_RECORD.to_string()),
                labels: Some(
                    [(crate::lease::MANAGED_BY_LABEL.to_string(), crate::lease::MANAGED_BY.to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(Default::default()),
        });
        next.annotations_mut().insert(SLOTS_MADE.to_string(), to.to_string());
        let written = match &record {
            None => api.create(&Default::default(), &next).await,
            Some(_) => api.replace(SLOTS_RECORD, &Default::default(), &next).await,
        };
        match written {
            Ok(_) => return Ok(to),
            Err(e) if crate::error::api_code(&e) == Some(409) => {
                record = crate::unreadable::get_opt(&api, SLOTS_RECORD).await?
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The slots still held for a Pod attempt that runs on without a replica watching it (handed over on shutdown, or
/// its replica died): by job UID. Such a slot names (in its annotations) a job that is Running in Pod mode at the
/// slot's attempt. It is not free for anyone but that attempt's adopter, who takes the same slot over, so the Pod
/// is counted against the cap for its whole life.
pub fn held_for_adoption<'a>(
    slots: impl IntoIterator<Item = &'a Arc<Lease>>,
    job: impl Fn(&str) -> Option<&'a crate::api::BackgroundJob>,
) -> HashMap<String, Arc<Lease>> {
    let mut out = HashMap::new();
    for slot in slots {
        let Some(uid) = crate::lease::annotation(slot, crate::lease::JOB_UID_ANNOTATION) else { continue };
        let attempt = crate::lease::annotation(slot, crate::lease::ATTEMPT_ANNOTATION).and_then(|a| a.parse().ok());
        let Some(j) = job(uid) else { continue };
        if crate::claim::adopts(j) && attempt == Some(j.attempts()) && crate::lease::holder(slot).is_some() {
            out.insert(uid.to_string(), slot.clone());
        }
    }
    out
}

/// The jobs among `running` whose work runs on without a replica watching it ([`crate::claim::adopts`]: a Pod, a
/// worker that reports) that no slot in `slots` names at their current attempt: their slot was deleted by hand once
/// their holder had died (nobody makes it again: [`SLOTS_RECORD`]), or they started before the cap was set. Each
/// still takes a place under the cap, and is adopted before anything new starts; found by job UID. (A job whose
/// slot this replica's Lease cache does not show yet counts too, for that moment: fewer starts, never more.)
pub fn slotless<'a>(
    running: impl IntoIterator<Item = &'a crate::api::BackgroundJob>,
    slots: &HashMap<String, Arc<Lease>>,
) -> Vec<String> {
    let named: std::collections::HashSet<(&str, i32)> = slots
        .values()
        .filter_map(|l| {
            Some((crate::lease::annotation(l, crate::lease::JOB_UID_ANNOTATION)?, crate::lease::attempt(l)))
        })
        .collect();
    running
        .into_iter()
        .filter(|j| crate::claim::adopts(j))
        .filter_map(|j| j.metadata.uid.as_deref().map(|uid| (uid, j.attempts())))
        .filter(|named_at| !named.contains(named_at))
        .map(|(uid, _)| uid.to_string())
        .collect()
}

/// Whether a running job that no slot names ([`slotless`]) takes a place under this deployment's cap, by where its
/// claim is vouched for (`claimed_in`: the namespace of the member Lease its claim Lease names, [`crate::lease::tenure::vouched_in`])
/// against this deployment's `lease_namespace` (a disowned claim says where it was vouched for:
/// [`crate::lease::tenure::claimed_in`]). A claim that does not say (an older replica's, not cached) counts when a
/// replica here serves its queue (`served_here`): one of them may adopt it, into one of these slots. A claim of
/// another lease namespace belongs to another deployment, whose cap keeps its own slots: counted here, it would
/// shrink this cap for as long as it runs (for ever, if that deployment is gone and nobody adopts it).
pub fn takes_a_place_here(claimed_in: Option<&str>, lease_namespace: &str, served_here: bool) -> bool {
    claimed_in.map_or(served_here, |ns| ns == lease_namespace)
}

/// The slots free to this replica now, the surest first: vacant ones (given back), then absent ones, then held ones
/// whose holder looks gone (its renewal may still come, and the claim that needs the slot is then lost). Claims take
/// them in queue order, so the head of the queue gets the slot it is least likely to lose to a later job. Within each
/// kind the slots are rotated by this replica's identity, so replicas try different slots first.
/// `reserved` are slots this replica is acquiring or holding already. `vouched` turns how long a slot has been
/// seen unchanged into how long to treat it as unchanged (see [`crate::lease::Tenures::vouched_unchanged`]).
#[allow(clippy::too_many_arguments)]
pub fn free_slots(
    capacity: u32,
    leases: &HashMap<String, Arc<Lease>>,
    reserved: &[String],
    observer: &mut Observer,
    mut vouched: impl FnMut(Option<&Lease>, Duration) -> Duration,
    now: Instant,
    timing: &LeaseTiming,
    me: &str,
) -> Vec<FreeSlot> {
    // By kind, the surest first: vacant, absent, held by a holder that looks gone.
    let mut kinds: [Vec<FreeSlot>; 3] = Default::default();
    for i in 0..capacity {
        let name = slot_name(i);
        let seen = leases.get(&name).cloned();
        let own =
            observer.observe(&format!("slot/{name}"), seen.as_ref().and_then(|l| l.resource_version()).as_deref(), now);
        let unchanged = vouched(seen.as_deref(), own);
        // Vacant (given back by its holder): free at once. Held, or absent (never created, or deleted by hand under
        // a running attempt): free once seen unchanged for a lease duration.
        let vacant = seen.as_ref().is_some_and(|l| crate::lease::holder(l).is_none());
        if reserved.contains(&name) || (!vacant && !timing.expired(unchanged)) {
            continue;
        }
        let expired_tenure = seen.as_deref().filter(|_| !vacant).and_then(crate::lease::tenure::vouch);
        let kind = if vacant {
            0
        } else if seen.is_none() {
            1
        } else {
            2
        };
        kinds[kind].push(FreeSlot { name, seen, expired_tenure });
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    me.hash(&mut h);
    let hash = h.finish();
    let mut free = Vec::new();
    for mut kind in kinds {
        if !kind.is_empty() {
            let shift = (hash % kind.len() as u64) as usize;
            kind.rotate_left(shift);
        }
        free.extend(kind);
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;
    use std::time::Duration;

    fn held(name: &str, rv: &str) -> (String, Arc<Lease>) {
        let l = Lease {
            metadata: ObjectMeta { name: Some(name.into()), resource_version: Some(rv.into()), ..Default::default() },
            spec: Some(LeaseSpec { holder_identity: Some("w".into()), ..Default::default() }),
        };
        (name.to_string(), Arc::new(l))
    }

    const T: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        renew_interval: Duration::from_millis(500),
    };

    #[test]
    fn held_slots_are_not_free_until_seen_unchanged_for_a_lease_duration() {
        let leases: HashMap<_, _> = [held("bgjobs-slot-0", "1"), held("bgjobs-slot-1", "5")].into();
        let mut o = Observer::default();
        let t0 = Instant::now();
        let names = |v: Vec<FreeSlot>| {
            let mut n: Vec<String> = v.into_iter().map(|s| s.name).collect();
            n.sort();
            n
        };
        assert!(free_slots(3, &leases, &[], &mut o, |_, d| d, t0, &T, "me").is_empty());
        let later = free_slots(3, &leases, &[], &mut o, |_, d| d, t0 + Duration::from_secs(3), &T, "me");
        assert_eq!(names(later), ["bgjobs-slot-0", "bgjobs-slot-1", "bgjobs-slot-2"]);
    }

    #[test]
    fn a_slot_of_a_running_pod_attempt_is_held_for_its_adopter_only() {
        use crate::api::{BackgroundJob, BackgroundJobStatus, Phase};
        let mut pod_job: BackgroundJob = BackgroundJob::new(
            "p",
            serde_json::from_value(serde_json::json!({"jobName": "x", "template": {}})).unwrap(),
        );
        pod_job.status =
            Some(Box::new(BackgroundJobStatus { phase: Some(Phase::Running), attempts: 2, ..Default::default() }));
        let slot = |attempt: &str| {
            let (_, l) = held("bgjobs-slot-0", "1");
            let mut l = (*l).clone();
            l.metadata.annotations = Some(
                [
                    (crate::lease::JOB_UID_ANNOTATION.to_string(), "u".to_string()),
                    (crate::lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
                ]
                .into(),
            );
            Arc::new(l)
        };
        let lookup = |uid: &str| (uid == "u").then_some(&pod_job);
        let (current, older) = (slot("2"), slot("1"));
        assert_eq!(held_for_adoption([&current], lookup).len(), 1);
        assert!(held_for_adoption([&older], lookup).is_empty(), "a slot of an older attempt is a leftover");
        let mut in_process = pod_job.clone();
        in_process.spec.template = None;
        assert!(held_for_adoption([&current], |_| Some(&in_process)).is_empty(), "an in-process attempt died");
    }

    /// A slot deleted by hand after its holder died: the Pod job it held, still running, is named by no slot, and
    /// takes a place under the cap until it is adopted with a slot of its own (review: a later job of higher
    /// priority took the slot, and the orphaned Pod ran beside it).
    #[test]
    fn a_running_pod_job_no_slot_names_at_its_attempt_still_takes_a_place_under_the_cap() {
        use crate::api::{BackgroundJob, BackgroundJobStatus, Phase};
        let job = |uid: &str, template: bool, phase: Phase| {
            let spec = if template {
                serde_json::json!({"jobName": "x", "template": {}})
            } else {
                serde_json::json!({"jobName": "x"})
            };
            let mut j = BackgroundJob::new(uid, serde_json::from_value(spec).unwrap());
            j.metadata.uid = Some(uid.into());
            j.status = Some(Box::new(BackgroundJobStatus { phase: Some(phase), attempts: 2, ..Default::default() }));
            j
        };
        let naming = |name: &str, uid: &str, attempt: &str| {
            let (n, l) = held(name, "1");
            let mut l = (*l).clone();
            l.metadata.annotations = Some(
                [
                    (crate::lease::JOB_UID_ANNOTATION.to_string(), uid.to_string()),
                    (crate::lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
                ]
                .into(),
            );
            (n, Arc::new(l))
        };
        let jobs = [
            job("held", true, Phase::Running),
            job("orphan", true, Phase::Running),
            job("older-slot", true, Phase::Running),
            job("in-process", false, Phase::Running),
            job("done", true, Phase::Succeeded),
        ];
        let slots: HashMap<_, _> =
            [naming("bgjobs-slot-0", "held", "2"), naming("bgjobs-slot-1", "older-slot", "1")].into();
        assert_eq!(slotless(&jobs, &slots), ["orphan", "older-slot"]);
        assert!(slotless(&jobs[..1], &slots).is_empty());
    }

    #[test]
    fn only_a_running_job_this_deployment_claimed_or_may_adopt_takes_a_place_under_its_cap() {
        assert!(takes_a_place_here(Some("ops"), "ops", false), "claimed here");
        assert!(!takes_a_place_here(Some("other"), "ops", true), "another deployment's claim");
        assert!(takes_a_place_here(None, "ops", true), "handed over: may be adopted here");
        assert!(!takes_a_place_here(None, "ops", false), "handed over, of a queue nobody here serves");
    }

    fn vacant(name: &str) -> (String, Arc<Lease>) {
        let (n, l) = held(name, "7");
        let mut l = (*l).clone();
        l.spec.as_mut().unwrap().holder_identity = None;
        (n, Arc::new(l))
    }

    #[test]
    fn reserved_slots_are_skipped() {
        let mut o = Observer::default();
        let leases: HashMap<_, _> = [vacant("bgjobs-slot-0"), vacant("bgjobs-slot-1")].into();
        let free = free_slots(2, &leases, &["bgjobs-slot-1".into()], &mut o, |_, d| d, Instant::now(), &T, "me");
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].name, "bgjobs-slot-0");
    }

    #[test]
    fn a_vacant_slot_is_free_at_once_and_an_absent_one_only_after_a_lease_duration() {
        let leases: HashMap<_, _> = [vacant("bgjobs-slot-0")].into();
        let mut o = Observer::default();
        let t0 = Instant::now();
        let free = free_slots(2, &leases, &[], &mut o, |_, d| d, t0, &T, "me");
        assert_eq!(free.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["bgjobs-slot-0"]);
        let free = free_slots(2, &leases, &[], &mut o, |_, d| d, t0 + Duration::from_secs(3), &T, "me");
        assert_eq!(free.len(), 2, "a slot deleted by hand may still be in use until its holder's renewal fails");
    }

    #[test]
    fn the_surest_slots_come_first_vacant_then_absent_then_those_whose_holder_looks_gone() {
        let leases: HashMap<_, _> =
            [held("bgjobs-slot-0", "1"), held("bgjobs-slot-2", "2"), vacant("bgjobs-slot-3"), vacant("bgjobs-slot-5")]
                .into();
        let mut o = Observer::default();
        let t0 = Instant::now();
        free_slots(6, &leases, &[], &mut o, |_, d| d, t0, &T, "me");
        for me in ["me", "another", "a third"] {
            let free = free_slots(6, &leases, &[], &mut o, |_, d| d, t0 + Duration::from_secs(3), &T, me);
            let mut kinds: Vec<(u8, &str)> = free
                .iter()
                .map(|s| match &s.seen {
                    Some(l) if crate::lease::holder(l).is_none() => (0, s.name.as_str()),
                    None => (1, s.name.as_str()),
                    Some(_) => (2, s.name.as_str()),
                })
                .collect();
            assert!(kinds.is_sorted_by_key(|(kind, _)| *kind), "{me}: {kinds:?}");
            kinds.sort();
            let names: Vec<&str> = kinds.iter().map(|(_, n)| *n).collect();
            assert_eq!(
                names,
                ["bgjobs-slot-3", "bgjobs-slot-5", "bgjobs-slot-1", "bgjobs-slot-4", "bgjobs-slot-0", "bgjobs-slot-2"]
            );
        }
    }
}
