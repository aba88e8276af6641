//! The decision a dispatch pass makes for one unfinished job nobody on this replica is acting on: a pure function of
//! the job, what this replica has seen of the Leases that guard it (and for how long unchanged), and the time.
//!
//! The loop ([`super::Dispatcher`]) gathers those facts and performs the decision; everything that decides lives
//! here, so every branch is tested without a cluster.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use crate::api::{BackgroundJob, Phase};
use crate::claim::{self, ExtraLease, LeaseState};
use crate::keys::{self, KeyVerdict};
use crate::lease::{LeaseTiming, tenure};
use crate::limits;
use crate::ordering;
use crate::retry::{self, Verdict};
use crate::unreadable::{self, Standing};

/// What this replica knows about an unfinished job.
pub struct Facts<'a> {
    /// The job as cached.
    pub job: &'a BackgroundJob,
    /// Its claim Lease as cached, if any.
    pub lease: Option<&'a Arc<Lease>>,
    /// How long this replica has seen that Lease (or its absence) unchanged, for this phase and attempt.
    pub lease_unchanged: Duration,
    /// Its concurrency key's turn and Lease, when it has a key.
    pub key: Option<KeyFacts<'a>>,
    /// The cluster slot its orphaned Pod attempt holds, and how long this replica has seen that slot unchanged.
    pub adoption_slot: Option<(&'a Arc<Lease>, Duration)>,
    /// Whether this replica serves the job's queue.
    pub serves_queue: bool,
    /// An in-process job whose handler this replica lacks: how long it is left for a replica that has one. None: it
    /// runs here.
    pub missing_handler: Option<MissingHandler>,
    /// The apiserver's time.
    pub now: Timestamp,
}

/// A job whose in-process handler this replica lacks: it is left for `grace` (`--unknown-handler-grace`) after it
/// may run and after another member last offered its handler ([`crate::members::HandlerOffers`]), then claimed here
/// and failed naming the handlers there are.
#[derive(Clone, Copy, Debug)]
pub struct MissingHandler {
    /// `--unknown-handler-grace`.
    pub grace: Duration,
    /// How long ago a member that sees its namespace, serves its queue and has its handler was last seen (zero: one
    /// is live now), at most since this replica began to look ([`crate::members::HandlerOffers::offered_ago`]).
    pub offered_ago: Duration,
}

/// What this replica knows about a job's concurrency key.
pub struct KeyFacts<'a> {
    /// The key.
    pub key: &'a str,
    /// The job's turn among the unfinished jobs of its key (see [`keys::turns`]).
    pub verdict: Option<&'a KeyVerdict>,
    /// Namespace and name of the key's Lease.
    pub lease_namespace: &'a str,
    /// Name of the key's Lease.
    pub lease_name: &'a str,
    /// The key's Lease as cached.
    pub lease: Option<&'a Arc<Lease>>,
    /// The job that Lease names as its holder, if cached.
    pub owner: Option<&'a BackgroundJob>,
    /// How long this replica has seen the key's Lease (or its absence) unchanged.
    pub unchanged: Duration,
}

/// What to do with a job now.
#[derive(Debug)]
pub enum Decision {
    /// Nothing now. Look again after `recheck`; with `None`, only when the job or its Leases change.
    Leave {
        /// When something time-driven may change the decision.
        recheck: Option<Duration>,
    },
    /// Move it to a final phase (nobody holds it; see [`claim::settle`]).
    Settle {
        /// The final phase.
        phase: Phase,
        /// Why, for `status.lastError` and the Event.
        reason: String,
        /// Its claim Lease's state, which the settle write goes through.
        state: LeaseState,
        /// A skip's: the job it defers to, read again before the write ([`keys::still_ahead`]).
        defers_to: Option<keys::Ahead>,
    },
    /// It may run: claim it when its turn in the queue comes.
    Claim {
        /// Its claim Lease's state.
        state: LeaseState,
        /// Leases the claim needs besides its own (a concurrency key's).
        extras: Vec<ExtraLease>,
        /// An adoption's cluster slot: the one its Pod has held all along.
        adopted_slot: Option<ExtraLease>,
        /// When it must be looked at again even if nothing changes (its deadline).
        recheck: Option<Duration>,
    },
}

/// Decide what to do with an unfinished job (see the module docs of [`super`] for the rules).
pub fn triage(f: &Facts<'_>, timing: &LeaseTiming) -> Decision {
    let job = f.job;
    // A job this version cannot read, perhaps a newer operator's: left to the replicas that can (a rolling upgrade).
    if let Some(Standing::Leave(_)) = unreadable::standing(job) {
        return Decision::Leave { recheck: None };
    }
    let phase = job.phase();
    let state = claim::lease_state(job, f.lease.map(|l| l.as_ref()), f.lease_unchanged, timing);
    let orphaned = phase == Phase::Running && state != LeaseState::Live && timing.expired(f.lease_unchanged);
    if (phase == Phase::Running && !orphaned) || state == LeaseState::Live {
        return Decision::Leave { recheck: Some(timing.until_expiry(f.lease_unchanged)) };
    }
    // From here on the job is nobody's: waiting, or orphaned by a replica that stopped renewing.
    let created = job.counted_from(f.now);
    // An orphaned Pod attempt whose Pod may still run is adopted whatever its attempt budget says (that budget was
    // spent on this very attempt); cancelling it or passing its deadline settles it, and the settle deletes its
    // Pod first.
    let adoptable = orphaned && claim::adopts(job);
    if let Some(by) = job.cancellation() {
        let reason = if adoptable && job.spec.template.is_some() {
            format!("{by} while its pod ran unwatched; the pod was deleted")
        } else if adoptable {
            format!("{by} while its attempt waited, unwatched, for its worker's report")
        } else if orphaned {
            format!("{by} while its attempt was left unwatched (its replica stopped or shut down)")
        } else if job.attempts_spent(job.attempts()) > 0 {
            format!("{by} while it waited for attempt {}", job.attempts().saturating_add(1))
        } else {
            format!("{by} before it ran")
        };
        return Decision::Settle { phase: Phase::Cancelled, reason, state, defers_to: None };
    }
    if let Some(Standing::Fail(why)) = unreadable::standing(job) {
        let reason = format!("bgjobs cannot read this job, so it never runs: {why}");
        return Decision::Settle { phase: Phase::Failed, reason, state, defers_to: None };
    }
    match retry::may_start(&job.spec, created, job.attempts_spent(job.attempts()), f.now) {
        Ok(()) => {}
        Err(Verdict::Fail(_)) if adoptable => {}
        Err(verdict) => {
            let (phase, reason) = match verdict {
                Verdict::Fail(r) => (Phase::Failed, r),
                Verdict::Abandon(r) => (Phase::Abandoned, r),
                _ => unreachable!("may_start only fails or abandons"),
            };
            let reason = if orphaned {
                let worker = job.status.as_ref().and_then(|s| s.worker.as_deref()).unwrap_or("?");
                format!("attempt {} was lost (worker {worker} stopped renewing its lease); {reason}", job.attempts())
            } else {
                reason
            };
            return Decision::Settle { phase, reason, state, defers_to: None };
        }
    }
    let recheck = Some(until(retry::deadline(&job.spec, created), f.now));
    if phase == Phase::Waiting
        && let Some(t) = ordering::not_before(job)
        && t > f.now
    {
        return Decision::Leave { recheck: earliest(recheck, Some(until(t, f.now))) };
    }
    let mut extras = Vec::new();
    if let Some(k) = &f.key {
        match k.verdict {
            Some(KeyVerdict::Skip { deferred_to }) => {
                let reason = format!(
                    "skipped: job {} with concurrencyKey {:?} was already waiting or running \
                     (concurrencyPolicy: Skip)",
                    deferred_to.name, k.key
                );
                let defers_to = Some(deferred_to.clone());
                return Decision::Settle { phase: Phase::Skipped, reason, state, defers_to };
            }
            Some(KeyVerdict::Wait { .. }) => return Decision::Leave { recheck },
            _ => {}
        }
        let extra = |seen: Option<&Arc<Lease>>, expired: bool| ExtraLease {
            namespace: k.lease_namespace.to_string(),
            name: k.lease_name.to_string(),
            seen: seen.cloned(),
            label: keys::KEY_LABEL,
            expired_tenure: seen.filter(|_| expired).and_then(|l| tenure::vouch(l)),
            job_may_run: claim::job_may_run(k.owner, k.lease.map(|l| l.as_ref())),
        };
        match keys::key_lease_state(job, k.lease.map(|l| l.as_ref()), k.owner, k.unchanged, timing) {
            LeaseState::Live => {
                return Decision::Leave { recheck: earliest(recheck, Some(timing.until_expiry(k.unchanged))) };
            }
            LeaseState::Absent => extras.push(extra(None, false)),
            state => extras.push(extra(k.lease, state == LeaseState::Expired)),
        }
    }
    if !f.serves_queue {
        return Decision::Leave { recheck };
    }
    if let Some(MissingHandler { grace, offered_ago }) = f.missing_handler {
        let left_after_it_may_run = if orphaned {
            // Unclaimed since its Lease expired.
            grace.saturating_sub(f.lease_unchanged.saturating_sub(timing.duration))
        } else {
            let since = ordering::not_before(job).map_or(created, |t| t.max(created));
            until(since.checked_add(grace).unwrap_or(Timestamp::MAX), f.now)
        };
        let left_after_offered = grace.saturating_sub(offered_ago);
        let left = left_after_it_may_run.max(left_after_offered);
        if !left.is_zero() {
            return Decision::Leave { recheck: earliest(recheck, Some(left)) };
        }
    }
    if !(0..i32::MAX).contains(&job.attempts()) && !adoptable {
        // The attempt number is the fence, and names the attempt's Pod: at the largest there is no next one, and a
        // negative one names no Pod (a status edited by hand; the schema bounds neither, so that a job edited so
        // before still takes this write).
        let n = job.attempts();
        let reason = format!("no attempt can be claimed: status.attempts is {n}, out of 0..{}", i32::MAX);
        return Decision::Settle { phase: Phase::Failed, reason, state, defers_to: None };
    }
    // The slot an orphaned Pod attempt holds is taken over only once this replica has seen *it* unchanged for a
    // lease duration too: the claim Lease comes from another watch, which may be the stale one.
    let adopted_slot = match f.adoption_slot {
        Some((slot, age)) => {
            if !timing.expired(age) {
                return Decision::Leave { recheck: earliest(recheck, Some(timing.until_expiry(age))) };
            }
            Some(ExtraLease {
                namespace: slot.namespace().unwrap_or_default(),
                name: slot.name_any(),
                seen: Some(slot.clone()),
                label: limits::SLOT_LABEL,
                expired_tenure: tenure::vouch(slot),
                job_may_run: false,
            })
        }
        None => None,
    };
    Decision::Claim { state, extras, adopted_slot, recheck }
}

/// How long from `now` until `t` (zero if it has passed).
fn until(t: Timestamp, now: Timestamp) -> Duration {
    let d = t.duration_since(now);
    if d.is_positive() { d.unsigned_abs() } else { Duration::ZERO }
}

/// Whether a job this replica is not acting on is being claimed or run by another replica although it is cached
/// as `Waiting`: its claim Lease for the next attempt is live. That is the job cache lagging the claim (or a claim
/// between its Lease and its status write); the exclusive strategy's leader counts it as running elsewhere.
pub fn claimed_elsewhere(f: &Facts<'_>, timing: &LeaseTiming) -> bool {
    f.job.phase() == Phase::Waiting
        && claim::lease_state(f.job, f.lease.map(|l| l.as_ref()), f.lease_unchanged, timing) == LeaseState::Live
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::api::BackgroundJobStatus;
    use crate::lease;

    const T: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        renew_interval: Duration::from_secs(3),
    };
    const CREATED: i64 = 1_800_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(CREATED + s).unwrap()
    }

    fn job(spec: serde_json::Value, phase: Phase, attempts: i32) -> BackgroundJob {
        let mut spec = spec;
        spec["jobName"] = "noop".into();
        let mut j = BackgroundJob::new("j", serde_json::from_value(spec).unwrap());
        j.metadata.uid = Some("uid-1".into());
        j.metadata.namespace = Some("ns".into());
        j.metadata.creation_timestamp = Some(Time(at(0)));
        j.status = Some(Box::new(BackgroundJobStatus {
            phase: Some(phase),
            attempts,
            worker: Some("w1".into()),
            ..Default::default()
        }));
        j
    }

    fn claim_lease(attempt: i32) -> Arc<Lease> {
        Arc::new(Lease {
            metadata: ObjectMeta {
                name: Some("bgj-j".into()),
                namespace: Some("ns".into()),
                annotations: Some(BTreeMap::from([
                    (lease::JOB_UID_ANNOTATION.to_string(), "uid-1".to_string()),
                    (lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some("w1".into()), ..Default::default() }),
        })
    }

    fn facts<'a>(job: &'a BackgroundJob, lease: Option<&'a Arc<Lease>>, unchanged: u64, now: i64) -> Facts<'a> {
        Facts {
            job,
            lease,
            lease_unchanged: Duration::from_secs(unchanged),
            key: None,
            adoption_slot: None,
            serves_queue: true,
            missing_handler: None,
            now: at(now),
        }
    }

    fn key<'a>(verdict: Option<&'a KeyVerdict>, lease: Option<&'a Arc<Lease>>, unchanged: u64) -> KeyFacts<'a> {
        KeyFacts {
            key: "tenant-a",
            verdict,
            lease_namespace: "ns",
            lease_name: "key-lease",
            lease,
            owner: None,
            unchanged: Duration::from_secs(unchanged),
        }
    }

    /// The sweep's shortcut ([`backlog::repeats_last_look`]) lists triage's inputs by hand: whenever it says a
    /// candidate's look would repeat, triage must judge that candidate as before and want no timer before the next
    /// full look, over deadlines, retry times, judgement times, look times and periods.
    #[test]
    fn a_candidate_the_sweep_passes_by_is_judged_as_before_and_wants_no_timer_before_the_next_full_look() {
        use crate::dispatch::backlog::{self, Candidate};
        let (mut skipped, mut looked) = (0, 0);
        for timeout in [None, Some(30), Some(100), Some(400), Some(1_000)] {
            for retry_at in [None, Some(50)] {
                let mut j = job(serde_json::json!({}), Phase::Waiting, i32::from(retry_at.is_some()));
                if let Some(t) = timeout {
                    j.spec.timeout_seconds = t;
                }
                j.status.as_mut().unwrap().next_attempt_time = retry_at.map(|s| Time(at(s)));
                let j = Arc::new(j);
                for judged in [0, 10, 60, 200] {
                    let Decision::Claim { state, extras, adopted_slot, recheck } =
                        triage(&facts(&j, None, 0, judged), &T)
                    else {
                        continue;
                    };
                    let c = Candidate {
                        job: j.clone(),
                        lease: None,
                        state,
                        extras,
                        adopted_slot,
                        since: std::time::Instant::now(),
                        next_look: backlog::next_look(at(judged), recheck),
                    };
                    for later in [0, 5, 50, 100, 500, 2_000] {
                        for period in [60, 300, 600] {
                            let (now, period) = (judged + later, Duration::from_secs(period));
                            if !backlog::repeats_last_look(&c, false, at(now), period) {
                                looked += 1;
                                continue;
                            }
                            skipped += 1;
                            match triage(&facts(&j, None, 0, now), &T) {
                                Decision::Claim { state: LeaseState::Absent, extras, adopted_slot: None, recheck }
                                    if extras.is_empty() && recheck.is_none_or(|r| r > period) => {}
                                other => panic!("timeout {timeout:?}, judged {judged}, now {now}: {other:?}"),
                            }
                        }
                    }
                }
            }
        }
        assert!(skipped > 50 && looked > 50, "both ways are tried: {skipped} skipped, {looked} looked at");
    }

    #[test]
    fn a_waiting_job_with_no_lease_is_claimed_and_looked_at_again_at_its_deadline() {
        let j = job(serde_json::json!({"timeoutSeconds": 100}), Phase::Waiting, 0);
        match triage(&facts(&j, None, 0, 40), &T) {
            Decision::Claim { state: LeaseState::Absent, extras, adopted_slot: None, recheck } => {
                assert!(extras.is_empty());
                assert_eq!(recheck, Some(Duration::from_secs(61)), "100 s from the end of the creation second");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_running_job_whose_lease_is_renewed_is_left_until_it_could_expire() {
        let (j, l) = (job(serde_json::json!({}), Phase::Running, 1), claim_lease(1));
        match triage(&facts(&j, Some(&l), 4, 10), &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(11))),
            other => panic!("{other:?}"),
        }
    }

    /// The stand-in the job cache holds for a job whose Pod template the types cannot hold.
    fn unreadable(phase: &str, attempts: i32, extra_spec: serde_json::Value, newer: bool) -> BackgroundJob {
        let mut spec = serde_json::json!({"jobName": "noop", "template": {"spec": {"containers": "x"}}});
        spec.as_object_mut().unwrap().extend(extra_spec.as_object().unwrap().clone());
        if newer {
            spec["priority"] = "Urgent".into();
            spec.as_object_mut().unwrap().remove("template");
        }
        let object = serde_json::json!({"metadata": {"name": "j", "namespace": "ns", "uid": "uid-1",
            "creationTimestamp": at(0).to_string()},
            "spec": spec, "status": {"phase": phase, "attempts": attempts, "worker": "w1"}});
        let job: BackgroundJob = crate::unreadable::decode_text(&object.to_string()).unwrap();
        assert!(unreadable::standing(&job).is_some());
        job
    }

    #[test]
    fn a_job_the_operator_cannot_read_is_failed_with_the_reason_when_nobody_holds_it_and_never_claimed() {
        let waiting = unreadable("Waiting", 0, serde_json::json!({}), false);
        match triage(&facts(&waiting, None, 0, 10), &T) {
            Decision::Settle { phase: Phase::Failed, reason, state: LeaseState::Absent, .. } => {
                assert!(reason.contains("cannot read this job") && reason.contains("invalid type"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let (running, l) = (unreadable("Running", 1, serde_json::json!({}), false), claim_lease(1));
        assert!(
            matches!(triage(&facts(&running, Some(&l), 4, 10), &T), Decision::Leave { .. }),
            "its holder is alive: left to it"
        );
        assert!(
            matches!(
                triage(&facts(&running, Some(&l), 15, 10), &T),
                Decision::Settle { phase: Phase::Failed, state: LeaseState::Expired, .. }
            ),
            "orphaned: failed under its Lease, never taken over"
        );
        let cancelled = unreadable("Waiting", 0, serde_json::json!({"cancel": true}), false);
        assert!(
            matches!(triage(&facts(&cancelled, None, 0, 10), &T), Decision::Settle { phase: Phase::Cancelled, .. }),
            "a cancel the user wrote is still read"
        );
    }

    #[test]
    fn a_job_perhaps_of_a_newer_operator_is_left_alone_waiting_or_orphaned() {
        let waiting = unreadable("Waiting", 0, serde_json::json!({}), true);
        assert!(matches!(triage(&facts(&waiting, None, 100, 10), &T), Decision::Leave { recheck: None }));
        let (running, l) = (unreadable("Running", 1, serde_json::json!({}), true), claim_lease(1));
        assert!(matches!(triage(&facts(&running, Some(&l), 100, 10), &T), Decision::Leave { recheck: None }));
    }

    #[test]
    fn a_running_attempt_whose_lease_stood_still_for_a_lease_duration_is_taken_over() {
        let (j, l) = (job(serde_json::json!({}), Phase::Running, 1), claim_lease(1));
        assert!(matches!(triage(&facts(&j, Some(&l), 15, 10), &T), Decision::Claim { state: LeaseState::Expired, .. }));
    }

    #[test]
    fn a_lost_attempt_with_no_attempts_left_fails_and_says_the_worker_stopped_renewing() {
        let (j, l) = (job(serde_json::json!({"retry": {"maxAttempts": 1}}), Phase::Running, 1), claim_lease(1));
        match triage(&facts(&j, Some(&l), 15, 10), &T) {
            Decision::Settle { phase: Phase::Failed, reason, state: LeaseState::Expired, .. } => {
                assert!(reason.contains("attempt 1 was lost (worker w1 stopped renewing"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_orphaned_pod_attempt_with_no_attempts_left_is_adopted_not_failed() {
        let mut j = job(serde_json::json!({"retry": {"maxAttempts": 1}}), Phase::Running, 1);
        j.spec.template = Some(Default::default());
        let l = claim_lease(1);
        assert!(matches!(triage(&facts(&j, Some(&l), 15, 10), &T), Decision::Claim { .. }));
    }

    #[test]
    fn an_orphaned_attempt_waiting_for_its_report_with_no_attempts_left_is_adopted_not_failed() {
        let mut j = job(serde_json::json!({"retry": {"maxAttempts": 1}}), Phase::Running, 1);
        j.status.as_mut().unwrap().awaiting_report = true;
        let l = claim_lease(1);
        assert!(matches!(triage(&facts(&j, Some(&l), 15, 10), &T), Decision::Claim { .. }));
        j.spec.cancel = true;
        match triage(&facts(&j, Some(&l), 15, 10), &T) {
            Decision::Settle { phase: Phase::Cancelled, reason, .. } => assert!(reason.contains("report"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancelled_waiting_job_is_settled_cancelled() {
        let mut j = job(serde_json::json!({}), Phase::Waiting, 0);
        j.spec.cancel = true;
        match triage(&facts(&j, None, 0, 1), &T) {
            Decision::Settle { phase: Phase::Cancelled, reason, .. } => assert!(reason.contains("before it ran")),
            other => panic!("{other:?}"),
        }
        // One that ran and waits for its next attempt (a retry's backoff) did run.
        let mut j = job(serde_json::json!({}), Phase::Waiting, 2);
        j.spec.cancel = true;
        match triage(&facts(&j, None, 0, 1), &T) {
            Decision::Settle { reason, .. } => {
                assert_eq!(reason, "cancelled by the user while it waited for attempt 3")
            }
            other => panic!("{other:?}"),
        }
        // One whose only attempt was handed back before it started did not.
        j.status.as_mut().unwrap().attempts = 1;
        j.status.as_mut().unwrap().unstarted_attempts = 1;
        match triage(&facts(&j, None, 0, 1), &T) {
            Decision::Settle { reason, .. } => assert_eq!(reason, "cancelled by the user before it ran"),
            other => panic!("{other:?}"),
        }
        // An orphaned attempt (an HTTP request cut off by its replica's shutdown, handed over) did run.
        let (mut j, l) = (job(serde_json::json!({}), Phase::Running, 1), claim_lease(1));
        j.spec.cancel = true;
        match triage(&facts(&j, Some(&l), 15, 10), &T) {
            Decision::Settle { phase: Phase::Cancelled, reason, .. } => {
                assert!(reason.contains("while its attempt was left unwatched"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// A job whose deletion waits (a finalizer holds it) is cancelled, never claimed: waiting, or orphaned with its
    /// Pod (which the settle deletes), whatever its attempts and delay say; one held live elsewhere is its holder's.
    #[test]
    fn a_job_whose_deletion_waits_is_settled_cancelled_not_claimed() {
        let deleting = |mut j: BackgroundJob| {
            j.metadata.deletion_timestamp = Some(Time(at(5)));
            j.metadata.finalizers = Some(vec!["example.com/hold".into()]);
            j
        };
        let j = deleting(job(serde_json::json!({"delaySeconds": 50}), Phase::Waiting, 0));
        match triage(&facts(&j, None, 0, 1), &T) {
            Decision::Settle { phase: Phase::Cancelled, reason, .. } => {
                assert!(reason.starts_with(crate::api::DELETION_REQUESTED) && reason.ends_with("before it ran"))
            }
            other => panic!("{other:?}"),
        }
        let mut orphan = job(serde_json::json!({"retry": {"maxAttempts": 1}}), Phase::Running, 1);
        orphan.spec.template = Some(Default::default());
        let (orphan, l) = (deleting(orphan), claim_lease(1));
        match triage(&facts(&orphan, Some(&l), 15, 10), &T) {
            Decision::Settle { phase: Phase::Cancelled, reason, .. } => {
                assert!(reason.contains("deletion was requested") && reason.contains("the pod was deleted"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let live = deleting(job(serde_json::json!({}), Phase::Running, 1));
        assert!(matches!(triage(&facts(&live, Some(&l), 1, 10), &T), Decision::Leave { .. }), "its holder stops it");
    }

    #[test]
    fn a_job_past_its_timeout_is_abandoned() {
        let j = job(serde_json::json!({"timeoutSeconds": 30}), Phase::Waiting, 0);
        assert!(matches!(triage(&facts(&j, None, 0, 30), &T), Decision::Claim { .. }), "made as late as 0.999 s");
        assert!(matches!(triage(&facts(&j, None, 0, 31), &T), Decision::Settle { phase: Phase::Abandoned, .. }));
    }

    #[test]
    fn a_delayed_job_is_left_until_its_delay_has_passed() {
        let j = job(serde_json::json!({"delaySeconds": 50}), Phase::Waiting, 0);
        match triage(&facts(&j, None, 0, 20), &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(31))),
            other => panic!("{other:?}"),
        }
        // Created within second 0, perhaps at 0.999: not due before 51.
        assert!(matches!(triage(&facts(&j, None, 0, 50), &T), Decision::Leave { .. }), "never early");
        assert!(matches!(triage(&facts(&j, None, 0, 51), &T), Decision::Claim { .. }));
    }

    #[test]
    fn a_claim_in_flight_elsewhere_is_left_alone() {
        let (j, l) = (job(serde_json::json!({}), Phase::Waiting, 0), claim_lease(1));
        assert!(matches!(triage(&facts(&j, Some(&l), 2, 1), &T), Decision::Leave { .. }));
    }

    #[test]
    fn an_attempt_handed_back_before_it_started_does_not_use_up_the_budget() {
        let mut j = job(serde_json::json!({"retry": {"maxAttempts": 1}}), Phase::Waiting, 1);
        assert!(matches!(triage(&facts(&j, None, 0, 10), &T), Decision::Settle { phase: Phase::Failed, .. }));
        j.status.as_mut().unwrap().unstarted_attempts = 1;
        assert!(matches!(triage(&facts(&j, None, 0, 10), &T), Decision::Claim { .. }), "nothing of it ran");
    }

    #[test]
    fn a_waiting_job_is_claimed_elsewhere_only_while_a_claim_lease_for_its_next_attempt_is_live() {
        let waiting = job(serde_json::json!({}), Phase::Waiting, 0);
        let (next, earlier) = (claim_lease(1), claim_lease(0));
        assert!(claimed_elsewhere(&facts(&waiting, Some(&next), 2, 1), &T));
        assert!(!claimed_elsewhere(&facts(&waiting, Some(&next), 15, 1), &T), "stood still a lease duration");
        assert!(!claimed_elsewhere(&facts(&waiting, Some(&earlier), 2, 1), &T), "an earlier attempt's Lease");
        assert!(!claimed_elsewhere(&facts(&waiting, None, 0, 1), &T));
        let running = job(serde_json::json!({}), Phase::Running, 1);
        assert!(!claimed_elsewhere(&facts(&running, Some(&next), 2, 1), &T), "running jobs are counted as such");
    }

    #[test]
    fn a_job_behind_another_of_its_key_waits_and_a_skip_job_is_skipped() {
        let j = job(serde_json::json!({"concurrencyKey": "tenant-a"}), Phase::Waiting, 0);
        let wait = KeyVerdict::Wait { behind: "first".into() };
        let mut f = facts(&j, None, 0, 1);
        f.key = Some(key(Some(&wait), None, 0));
        assert!(matches!(triage(&f, &T), Decision::Leave { .. }));
        let first = keys::Ahead { name: "first".into(), uid: "uid-first".into() };
        let skip = KeyVerdict::Skip { deferred_to: first.clone() };
        f.key = Some(key(Some(&skip), None, 0));
        match triage(&f, &T) {
            Decision::Settle { phase: Phase::Skipped, reason, defers_to, .. } => {
                assert!(reason.contains("job first"), "{reason}");
                assert_eq!(defers_to, Some(first), "the job it defers to is read again before the skip is written");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_with_its_keys_turn_claims_the_key_lease_too() {
        let j = job(serde_json::json!({"concurrencyKey": "tenant-a"}), Phase::Waiting, 0);
        let mut f = facts(&j, None, 0, 1);
        f.key = Some(key(Some(&KeyVerdict::Turn), None, 0));
        match triage(&f, &T) {
            Decision::Claim { extras, .. } => {
                assert_eq!(extras.len(), 1);
                assert_eq!((extras[0].name.as_str(), extras[0].label), ("key-lease", keys::KEY_LABEL));
                assert!(extras[0].seen.is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_of_a_queue_this_replica_does_not_serve_is_left() {
        let j = job(serde_json::json!({}), Phase::Waiting, 0);
        let mut f = facts(&j, None, 0, 1);
        f.serves_queue = false;
        assert!(matches!(triage(&f, &T), Decision::Leave { .. }));
    }

    /// A job whose handler this replica lacks is left for one that has it, for the grace, counted from when it may
    /// run (its creation's second, its delay, its retry time) or, orphaned, from when its Lease expired; then
    /// claimed (and failed by its attempt, naming the handlers there are).
    #[test]
    fn a_job_whose_handler_this_replica_lacks_is_left_for_the_grace_then_claimed() {
        let grace = Some(MissingHandler { grace: Duration::from_secs(300), offered_ago: Duration::MAX });
        let j = job(serde_json::json!({}), Phase::Waiting, 0);
        let mut f = facts(&j, None, 0, 100);
        f.missing_handler = grace;
        // Created within second 0: it may run from 1, so it is left until 301.
        match triage(&f, &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(201))),
            other => panic!("{other:?}"),
        }
        f.now = at(301);
        assert!(matches!(triage(&f, &T), Decision::Claim { .. }));
        let mut retried = job(serde_json::json!({}), Phase::Waiting, 1);
        retried.status.as_mut().unwrap().next_attempt_time = Some(Time(at(1000)));
        let mut f = facts(&retried, None, 0, 1200);
        f.missing_handler = grace;
        assert!(matches!(triage(&f, &T), Decision::Leave { .. }), "counted from its retry time");
        // Orphaned: its Lease expired after 15 s unchanged; left until 300 s more have passed.
        let (running, l) = (job(serde_json::json!({}), Phase::Running, 1), claim_lease(1));
        let mut f = facts(&running, Some(&l), 100, 5000);
        f.missing_handler = grace;
        assert!(matches!(triage(&f, &T), Decision::Leave { .. }));
        f.lease_unchanged = Duration::from_secs(315);
        assert!(matches!(triage(&f, &T), Decision::Claim { .. }));
    }

    /// While another member offers the handler, the job is its, however long it waits behind that member's work;
    /// once the last one went, the grace counts from when it was last seen (a replica that restarts is not a gap
    /// the job is failed in).
    #[test]
    fn a_job_whose_handler_another_member_offers_is_left_for_it_and_failed_only_a_grace_after_the_last_went() {
        let j = job(serde_json::json!({}), Phase::Waiting, 0);
        let mut f = facts(&j, None, 0, 5000);
        let offered =
            |ago: u64| Some(MissingHandler { grace: Duration::from_secs(300), offered_ago: Duration::from_secs(ago) });
        f.missing_handler = offered(0);
        match triage(&f, &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(300)), "offered now"),
            other => panic!("{other:?}"),
        }
        f.missing_handler = offered(100);
        match triage(&f, &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(200)), "last seen 100 s ago"),
            other => panic!("{other:?}"),
        }
        f.missing_handler = offered(300);
        assert!(matches!(triage(&f, &T), Decision::Claim { .. }), "gone for the whole grace");
    }

    #[test]
    fn a_job_whose_attempts_were_edited_out_of_range_fails_saying_so_instead_of_reusing_the_fence() {
        let j = job(serde_json::json!({}), Phase::Waiting, i32::MAX);
        match triage(&facts(&j, None, 0, 10), &T) {
            Decision::Settle { phase: Phase::Failed, reason, .. } => {
                assert!(reason.contains("is 2147483647"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let j = job(serde_json::json!({}), Phase::Waiting, -3);
        assert!(matches!(triage(&facts(&j, None, 0, 10), &T), Decision::Settle { phase: Phase::Failed, .. }));
    }

    #[test]
    fn an_adoption_waits_until_its_cluster_slot_too_stood_still_for_a_lease_duration() {
        let mut j = job(serde_json::json!({}), Phase::Running, 1);
        j.spec.template = Some(Default::default());
        let (l, slot) = (claim_lease(1), claim_lease(1));
        let mut f = facts(&j, Some(&l), 15, 10);
        f.adoption_slot = Some((&slot, Duration::from_secs(5)));
        match triage(&f, &T) {
            Decision::Leave { recheck } => assert_eq!(recheck, Some(Duration::from_secs(10))),
            other => panic!("{other:?}"),
        }
        f.adoption_slot = Some((&slot, Duration::from_secs(15)));
        match triage(&f, &T) {
            Decision::Claim { adopted_slot: Some(s), .. } => assert_eq!(s.label, limits::SLOT_LABEL),
            other => panic!("{other:?}"),
        }
    }
}
