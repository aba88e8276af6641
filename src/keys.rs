//! Concurrency keys: jobs with the same `spec.concurrencyKey` in a namespace are "the same work".
//!
//! Two layers keep them apart:
//! - **Turns** (this module, pure): per key, the turn belongs to the job that is Running, else to the first
//!   unfinished job in queue order. Only the turn holder may be claimed; the others are simply not candidates, so
//!   they never block unrelated jobs. A job waiting for its retry keeps the turn: a later job with the same key
//!   does not overtake it (per-key FIFO, including retries).
//! - **Key Leases** (`bgjobs-key-<key>-<hash>` in the job's namespace): a claim of a keyed job also acquires the
//!   key's Lease and renews it with the claim, so even replicas whose caches disagree about turns never run two
//!   jobs of one key at once. An orphaned key Lease is taken over like a claim Lease.
//!
//! `Skip` jobs: a Skip job with an earlier unfinished job of the same key (or a Running one) ends in phase
//! `Skipped`, naming that job, unless every such job was asked to stop (`spec.cancel`, or a deletion that waits):
//! then it waits its turn, as the work it would defer to is not going to be done.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use crate::api::{BackgroundJob, ConcurrencyPolicy, Phase};
use crate::claim::LeaseState;
use crate::lease::{self, LeaseTiming};
use crate::ordering::QueueKey;

/// Label that marks concurrency-key Leases.
pub const KEY_LABEL: &str = "bgjobs.dev/concurrency-key";
/// Label of a keyed job's Pods: its key, as [`pod_label`] spells it. When the key's Lease is gone (deleted by hand),
/// the Pods are all that says the key may still be held ([`crate::claim`]).
pub const POD_KEY_LABEL: &str = "bgjobs.dev/concurrency-key-hash";

/// The value of [`POD_KEY_LABEL`] for `key`: its stable hash, as in its Lease's name ([`lease_name`]).
pub fn pod_label(key: &str) -> String {
    format!("{:016x}", crate::members::stable_hash(&[key]))
}

/// What the key rules say about one unfinished keyed job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    /// It holds its key's turn: it may run (or is running).
    Turn,
    /// Another job of its key goes first.
    Wait {
        /// The job that holds the turn.
        behind: String,
    },
    /// `Skip` policy and another job of its key was there first.
    Skip {
        /// The job it defers to.
        deferred_to: Ahead,
    },
}

/// The job a `Skip` job defers to: named in its reason, and read again before the skip is written
/// ([`still_ahead`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ahead {
    pub name: String,
    pub uid: String,
}

/// Whether `job` is work a `Skip` job of its key may defer to: unfinished, and not asked to stop.
fn goes_ahead(job: &BackgroundJob) -> bool {
    !job.phase().is_final() && job.cancellation().is_none()
}

/// Whether the job `skipper` deferred to, read afresh (`None`: gone), is still that job, still going ahead, and still
/// ahead of it in its key's order (as [`turns`] sorts: Running first, then queue order). A skip is final, and the
/// caches a verdict was drawn from may show a job that has since finished, been cancelled or gone (a re-list's look
/// brings in jobs created meanwhile before it drops the ones deleted meanwhile), or its place before an edit moved it
/// (two replicas must not each skip one of two `Skip` jobs for the other).
pub fn still_ahead(read: Option<&BackgroundJob>, ahead: &Ahead, skipper: &BackgroundJob) -> bool {
    read.is_some_and(|j| {
        let before = turn_order(j) < turn_order(skipper);
        j.uid().as_deref() == Some(ahead.uid.as_str()) && goes_ahead(j) && before
    })
}

/// A job's place among the unfinished jobs of its key: the Running one first, then queue order.
fn turn_order(job: &BackgroundJob) -> (bool, QueueKey) {
    (job.phase() != Phase::Running, QueueKey::of(job))
}

/// Decide, for every unfinished job with a concurrency key, whether it has its key's turn. Jobs without a key are
/// not in the result. Keys are per namespace.
pub fn turns(jobs: &[&BackgroundJob]) -> HashMap<String, KeyVerdict> {
    let mut by_key: HashMap<(String, &str), Vec<&BackgroundJob>> = HashMap::new();
    for j in jobs.iter().filter(|j| !j.phase().is_final()) {
        if let Some(key) = j.spec.concurrency_key.as_deref() {
            by_key.entry((j.namespace().unwrap_or_default(), key)).or_default().push(j);
        }
    }
    let mut out = HashMap::new();
    for (_, mut group) in by_key {
        // Each key computed once (it clones the namespace and name): a group may hold tens of thousands of jobs.
        group.sort_by_cached_key(|j| turn_order(j));
        let mut holder: Option<String> = None;
        // The first job ahead that was not asked to stop: the work a Skip job defers to.
        let mut going_ahead: Option<Ahead> = None;
        for j in group {
            let uid = j.uid().unwrap_or_default();
            let skip = j.spec.concurrency_policy == Some(ConcurrencyPolicy::Skip);
            let verdict = match (&holder, &going_ahead) {
                (None, _) => {
                    holder = Some(j.name_any());
                    KeyVerdict::Turn
                }
                // A Skip job never waits for work that will be done, and a Running job keeps running whatever its
                // place.
                (Some(_), Some(ahead)) if skip && j.phase() != Phase::Running => {
                    KeyVerdict::Skip { deferred_to: ahead.clone() }
                }
                (Some(first), _) => KeyVerdict::Wait { behind: first.clone() },
            };
            if going_ahead.is_none() && goes_ahead(j) {
                going_ahead = Some(Ahead { name: j.name_any(), uid: uid.clone() });
            }
            out.insert(uid, verdict);
        }
    }
    out
}

/// Name of the Lease that guards `key`: readable where the key allows, always a valid name, and the same on every
/// replica and every version ([`crate::members::stable_hash`], not the standard library's per-process hash).
pub fn lease_name(key: &str) -> String {
    let readable: String = key
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect::<String>()
        .trim_matches('-')
        .to_string();
    let hash = crate::members::stable_hash(&[key]);
    if readable.is_empty() { format!("bgjobs-key-{hash:016x}") } else { format!("bgjobs-key-{readable}-{hash:016x}") }
}

/// Judge a key Lease for `job` (which holds its key's turn). `owner` is the job the Lease names, if still cached.
pub fn key_lease_state(
    job: &BackgroundJob,
    lease: Option<&Lease>,
    owner: Option<&BackgroundJob>,
    unchanged_for: Duration,
    timing: &LeaseTiming,
) -> LeaseState {
    let Some(l) = lease else { return LeaseState::Absent };
    let named_uid = lease::annotation(l, lease::JOB_UID_ANNOTATION);
    if named_uid == job.uid().as_deref() {
        // Our own job's key Lease: the same rules as its claim Lease.
        return crate::claim::lease_state(job, Some(l), unchanged_for, timing);
    }
    let attempt = lease::attempt(l);
    // An owner missing from this replica's cache may be deleted, or may not have reached the cache yet (watch lag):
    // only the time rule can tell, so such a Lease is judged like any other held one. So is a Lease of an attempt
    // later than the owner as cached: the owner was re-queued (`bgjobs retry` of a finished job, a retry of a waiting
    // one) and claimed since, and the cache lags.
    let owner_done = match owner {
        None => false,
        Some(o) => attempt <= o.attempts() && (o.phase().is_final() || o.phase() == Phase::Waiting),
    };
    if owner_done || lease::holder(l).is_none() {
        LeaseState::Leftover
    } else if timing.expired(unchanged_for) {
        LeaseState::Expired
    } else {
        LeaseState::Live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackgroundJobSpec, BackgroundJobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ahead(name: &str) -> Ahead {
        Ahead { name: name.into(), uid: format!("uid-{name}") }
    }

    #[test]
    fn a_skip_defers_only_to_the_same_job_still_unfinished_not_asked_to_stop_and_ahead_as_read_afresh() {
        let skipper = job("skipper", "k", 5, None, true);
        let ahead_of = |read: Option<&BackgroundJob>| still_ahead(read, &ahead("first"), &skipper);
        let first = job("first", "k", 1, Some(Phase::Running), false);
        assert!(ahead_of(Some(&first)));
        assert!(!ahead_of(None), "deleted since the verdict");
        let mut recreated = first.clone();
        recreated.metadata.uid = Some("uid-another".into());
        assert!(!ahead_of(Some(&recreated)), "another job under its name");
        let finished = job("first", "k", 2, Some(Phase::Succeeded), false);
        assert!(!ahead_of(Some(&finished)), "finished since");
        let mut cancelled = first.clone();
        cancelled.spec.cancel = true;
        assert!(!ahead_of(Some(&cancelled)), "asked to stop since");
        let waiting = job("first", "k", 3, Some(Phase::Waiting), false);
        assert!(ahead_of(Some(&waiting)), "waiting for its retry, earlier in the queue: still going ahead");
        let behind = job("first", "k", 9, Some(Phase::Waiting), false);
        assert!(!ahead_of(Some(&behind)), "an edit moved it behind the skipper since");
        let running_behind = job("first", "k", 9, Some(Phase::Running), false);
        assert!(ahead_of(Some(&running_behind)), "a Running job keeps the key whatever its place");
    }

    fn job(name: &str, key: &str, rv: i64, phase: Option<Phase>, skip: bool) -> BackgroundJob {
        let mut spec: BackgroundJobSpec = serde_json::from_value(serde_json::json!({"jobName": "noop"})).unwrap();
        spec.concurrency_key = Some(key.into());
        spec.concurrency_policy = skip.then_some(ConcurrencyPolicy::Skip);
        let mut j = BackgroundJob::new(name, spec);
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some(format!("uid-{name}"));
        j.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(100).unwrap()));
        j.metadata.resource_version = Some(rv.to_string());
        j.metadata.generation = Some(1);
        j.status = phase.map(|p| {
            Box::new(BackgroundJobStatus {
                phase: Some(p),
                attempts: 1,
                enqueue_sequence: Some(rv),
                ..Default::default()
            })
        });
        j
    }

    #[test]
    fn the_first_waiting_job_of_a_key_has_the_turn_and_later_ones_wait_behind_it() {
        let (a, b, c) =
            (job("a", "k", 1, None, false), job("b", "k", 2, None, false), job("other", "x", 3, None, false));
        let t = turns(&[&b, &a, &c]);
        assert_eq!(t["uid-a"], KeyVerdict::Turn);
        assert_eq!(t["uid-b"], KeyVerdict::Wait { behind: "a".into() });
        assert_eq!(t["uid-other"], KeyVerdict::Turn, "other keys are not affected");
    }

    #[test]
    fn a_running_job_keeps_the_turn_even_when_an_earlier_one_is_queued() {
        let early = job("early", "k", 1, Some(Phase::Waiting), false);
        let running = job("running", "k", 5, Some(Phase::Running), false);
        let t = turns(&[&early, &running]);
        assert_eq!(t["uid-running"], KeyVerdict::Turn);
        assert_eq!(t["uid-early"], KeyVerdict::Wait { behind: "running".into() });
    }

    #[test]
    fn a_job_waiting_for_its_retry_keeps_its_turn() {
        let retrying = job("retrying", "k", 1, Some(Phase::Waiting), false);
        let fresh = job("fresh", "k", 9, None, false);
        assert_eq!(turns(&[&fresh, &retrying])["uid-fresh"], KeyVerdict::Wait { behind: "retrying".into() });
    }

    #[test]
    fn a_skip_job_defers_to_an_earlier_job_of_its_key_but_runs_when_first() {
        let first = job("first", "k", 1, None, false);
        let skipper = job("skipper", "k", 2, None, true);
        assert_eq!(turns(&[&first, &skipper])["uid-skipper"], KeyVerdict::Skip { deferred_to: ahead("first") });
        assert_eq!(turns(&[&skipper])["uid-skipper"], KeyVerdict::Turn);
    }

    #[test]
    fn a_skip_job_waits_behind_jobs_of_its_key_that_were_asked_to_stop_and_defers_to_the_first_that_was_not() {
        let mut cancelled = job("cancelled", "k", 1, Some(Phase::Running), false);
        cancelled.spec.cancel = true;
        let skipper = job("skipper", "k", 3, None, true);
        assert_eq!(turns(&[&cancelled, &skipper])["uid-skipper"], KeyVerdict::Wait { behind: "cancelled".into() });
        let waiting = job("waiting", "k", 2, None, false);
        let t = turns(&[&cancelled, &waiting, &skipper]);
        assert_eq!(t["uid-skipper"], KeyVerdict::Skip { deferred_to: ahead("waiting") });
        assert_eq!(t["uid-waiting"], KeyVerdict::Wait { behind: "cancelled".into() });
        // A job whose deletion waits (a finalizer) is as good as cancelled.
        let mut deleting = job("deleting", "k", 1, Some(Phase::Running), false);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(turns(&[&deleting, &skipper])["uid-skipper"], KeyVerdict::Wait { behind: "deleting".into() });
    }

    #[test]
    fn finished_jobs_and_jobs_without_a_key_do_not_take_part() {
        let done = job("done", "k", 1, Some(Phase::Succeeded), false);
        let next = job("next", "k", 2, None, false);
        let mut unkeyed = job("free", "k", 3, None, false);
        unkeyed.spec.concurrency_key = None;
        let t = turns(&[&done, &next, &unkeyed]);
        assert_eq!(t.len(), 1);
        assert_eq!(t["uid-next"], KeyVerdict::Turn);
    }

    #[test]
    fn key_lease_names_are_valid_stable_and_distinct() {
        assert!(lease_name("Export/Tenant 42").starts_with("bgjobs-key-export-tenant-42-"));
        assert_eq!(lease_name("a"), lease_name("a"));
        assert_ne!(lease_name("export-1"), lease_name("export_1"), "keys that read alike still get their own Lease");
        assert!(lease_name(&"x".repeat(300)).len() < 80);
        // FNV-1a of "a" is a known constant: the name never changes between builds.
        assert_eq!(lease_name("a"), format!("bgjobs-key-a-{:016x}", crate::members::stable_hash(&["a"])));
    }

    fn key_lease(owner: &str, attempt: i32) -> Lease {
        let mut l = Lease::default();
        l.metadata.annotations = Some(
            [
                (lease::JOB_UID_ANNOTATION.to_string(), format!("uid-{owner}")),
                (lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
            ]
            .into(),
        );
        l.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("w".into()),
            ..Default::default()
        });
        l
    }

    const T: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        renew_interval: Duration::from_millis(500),
    };

    #[test]
    fn another_jobs_key_lease_is_live_while_that_job_runs_and_free_once_it_finished() {
        let me = job("me", "k", 2, None, false);
        let mut other = job("other", "k", 1, Some(Phase::Running), false);
        let l = key_lease("other", 1);
        assert_eq!(key_lease_state(&me, Some(&l), Some(&other), Duration::ZERO, &T), LeaseState::Live);
        assert_eq!(key_lease_state(&me, Some(&l), Some(&other), Duration::from_secs(3), &T), LeaseState::Expired);
        other.status.as_mut().unwrap().phase = Some(Phase::Succeeded);
        assert_eq!(key_lease_state(&me, Some(&l), Some(&other), Duration::ZERO, &T), LeaseState::Leftover);
    }

    #[test]
    fn a_key_lease_of_a_job_this_replica_has_not_seen_is_waited_out_not_taken() {
        let me = job("me", "k", 2, None, false);
        let l = key_lease("other", 1);
        // Deleted, or not in this replica's cache yet: only the time rule can tell.
        assert_eq!(key_lease_state(&me, Some(&l), None, Duration::ZERO, &T), LeaseState::Live);
        assert_eq!(key_lease_state(&me, Some(&l), None, Duration::from_secs(3), &T), LeaseState::Expired);
    }

    #[test]
    fn a_key_lease_of_an_attempt_later_than_its_finished_owner_as_cached_is_waited_out_not_taken() {
        // `other` failed at attempt 1 as this replica last saw it; `bgjobs retry` re-queued it since, and attempt 2
        // holds the key: this replica's job watch lags its Lease watch.
        let me = job("me", "k", 2, None, false);
        let failed = job("other", "k", 1, Some(Phase::Failed), false);
        let l = key_lease("other", 2);
        assert_eq!(key_lease_state(&me, Some(&l), Some(&failed), Duration::ZERO, &T), LeaseState::Live);
        assert_eq!(key_lease_state(&me, Some(&l), Some(&failed), Duration::from_secs(3), &T), LeaseState::Expired);
        assert_eq!(
            key_lease_state(&me, Some(&key_lease("other", 1)), Some(&failed), Duration::ZERO, &T),
            LeaseState::Leftover,
            "the attempt it finished with: a leftover"
        );
    }

    #[test]
    fn a_key_lease_left_by_an_attempt_that_went_back_to_waiting_is_a_leftover() {
        let me = job("me", "k", 2, None, false);
        let retrying = job("other", "k", 1, Some(Phase::Waiting), false);
        assert_eq!(
            key_lease_state(&me, Some(&key_lease("other", 1)), Some(&retrying), Duration::ZERO, &T),
            LeaseState::Leftover
        );
    }
}
