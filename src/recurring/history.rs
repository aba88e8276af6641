//! How long a definition's finished jobs are kept: the one rule for every delete bgjobs makes of them (history
//! limits, `ttlSecondsAfterFinished`), [`kept_until`]. A tick's job is the only proof that its tick was created until
//! the next claim ([`keeps_tick`]), and a replaced tick's job must outlive every create of it that may still land
//! ([`late_creates_land_by`]), or that create would make it again and the tick would run twice.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{DeleteParams, Preconditions};
use tracing::warn;

use super::children::Child;
use crate::api::{BackgroundJob, Phase, RecurringBackgroundJob};
// How long after the job of a later tick was created a tick's job is still kept (see [`late_creates_land_by`]).
use crate::client::LATE_CREATES_KEPT_FOR;
use crate::error::api_code;

/// Whether a job of tick `tick` must be kept whatever its history limit or TTL say, judged on `def` as this replica
/// last saw it (None: not seen, or another definition by that name): it may be the latest claimed tick's job, whose
/// existence is the only proof that its tick was created until the next claim. A claim moves `lastScheduleTime`
/// forward, so a definition seen late errs on the side of keeping. Taking back a claim made ahead ([`super::withdraw`]) moves
/// it back, to no earlier than the `lastScheduleTime` that claim replaced: so the jobs of ticks after that one are kept
/// too (seen with the claim, they can only be jobs made since it was taken back; ticks between the two have no job
/// otherwise). Part of [`kept_until`].
pub fn keeps_tick(def: Option<&RecurringBackgroundJob>, tick: Option<Timestamp>) -> bool {
    let Some(tick) = tick else { return false };
    let Some(def) = def else { return true };
    let status = def.status.as_ref();
    let last = status.and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0);
    let replaced = status.and_then(|s| s.previous_schedule_time.as_ref()).map(|t| t.0);
    last.is_none_or(|last| tick >= last) || replaced.is_some_and(|replaced| tick > replaced)
}

/// How long after the first job of a later tick was made a create of a replaced tick's job may still land
/// ([`late_creates_land_by`]): [`LATE_CREATES_KEPT_FOR`] for a create sent no later than that job was made, plus
/// [`super::READ_GOOD_FOR`], how much later the create may be sent. 76 s.
pub const TICK_CREATES_KEPT_FOR: std::time::Duration =
    std::time::Duration::from_secs(LATE_CREATES_KEPT_FOR.as_secs() + super::READ_GOOD_FOR.as_secs());

/// Until when a create of the job of `tick` may still land, by the cluster's clock (None: not a tick's job, nothing
/// to wait for; `Timestamp::MAX`: no bound is known yet). A finished tick's job must not be deleted before (history
/// trimming, `ttlSecondsAfterFinished`): the create would make it again, and the tick would run a second time.
///
/// Such a create was sent by a replica that claimed the tick, or took the definition over before the job was seen,
/// and then died, or lost the answer, while the create was on its way (held by a slow admission webhook, say).
/// Every create of a tick's job is decided from the definition as a request sent at most
/// [`super::READ_GOOD_FOR`] before it read or wrote it, with that job its `pendingJob` (no replica creates any other);
/// so it is sent at most that long after the claim of a later tick replaced it (that claim came after the read was
/// sent); and every later tick's job is created after its own claim. So the earliest creation among the jobs of later
/// ticks, plus [`super::READ_GOOD_FOR`], bounds the sends, and the creates land no later than [`TICK_CREATES_KEPT_FOR`]
/// after it. Without a later tick's job, nothing bounds them: the job is kept until one is made. (A pending job is
/// kept anyway, see [`beyond_history`].)
pub fn late_creates_land_by(tick: Option<Timestamp>, kids: &[Child]) -> Option<Timestamp> {
    let tick = tick?;
    let later = kids.iter().filter(|k| k.tick.is_some_and(|t| t > tick)).filter_map(|k| k.created).min();
    let kept_for = SignedDuration::try_from(TICK_CREATES_KEPT_FOR).unwrap_or(SignedDuration::MAX);
    Some(later.map_or(Timestamp::MAX, |created| created.checked_add(kept_for).unwrap_or(Timestamp::MAX)))
}

/// Until when bgjobs keeps the finished job `name` of tick `tick` (None: not a tick's job) of `def` (None: not seen,
/// or another definition by that name), by the cluster's clock, whatever its history limit or TTL say; None: it may
/// go now. The one rule for every delete of a definition's job that bgjobs makes (history trimming,
/// `ttlSecondsAfterFinished`): the pending job, and one [`keeps_tick`] keeps, until a later claim (`Timestamp::MAX`:
/// no time is known yet); a replaced tick's job until no create of it can land ([`late_creates_land_by`]).
pub fn kept_until(
    def: Option<&RecurringBackgroundJob>,
    name: &str,
    tick: Option<Timestamp>,
    kids: &[Child],
) -> Option<Timestamp> {
    let pending = def.and_then(|d| d.status.as_ref()).and_then(|s| s.pending_job.as_deref());
    if pending == Some(name) || keeps_tick(def, tick) {
        return Some(Timestamp::MAX);
    }
    late_creates_land_by(tick, kids)
}

/// Finished children beyond the history limits, oldest first. Never one [`keeps_tick`] keeps, nor the pending job;
/// those, once finished, count toward their outcome's limit, so that the limit is what stays (as with a CronJob)
/// however soon after its tick's job finishes the history is trimmed.
pub fn beyond_history<'a>(def: &RecurringBackgroundJob, kids: &'a [Child]) -> Vec<&'a Child> {
    let pending = def.status.as_ref().and_then(|s| s.pending_job.as_deref());
    // By outcome (succeeded or not): the finished jobs that may go, and how many are kept anyway.
    let mut finished: BTreeMap<bool, (Vec<&Child>, usize)> = BTreeMap::new();
    // One whose deletion waits (a finalizer) is going already: neither kept nor deleted again.
    for j in kids.iter().filter(|j| j.phase.is_final() && !j.deleting) {
        let (deletable, kept) = finished.entry(j.phase == Phase::Succeeded).or_default();
        if Some(j.name.as_str()) == pending || keeps_tick(Some(def), j.tick) {
            *kept += 1;
        } else {
            deletable.push(j);
        }
    }
    let mut out = Vec::new();
    for (succeeded, (mut list, kept)) in finished {
        let limit = if succeeded { def.spec.successful_jobs_history_limit } else { def.spec.failed_jobs_history_limit };
        list.sort_by_key(|j| std::cmp::Reverse(j.completed));
        out.extend(list.into_iter().skip((limit.max(0) as usize).saturating_sub(kept)));
    }
    out
}

/// The children to delete now: those [`beyond_history`], each once [`kept_until`] lets it go; and how soon the first
/// of those kept for now may go (None: no such time known yet).
pub fn to_trim<'a>(
    def: &RecurringBackgroundJob,
    kids: &'a [Child],
    now: Timestamp,
) -> (Vec<&'a Child>, Option<Duration>) {
    let (mut go, mut again) = (Vec::new(), None::<Duration>);
    for old in beyond_history(def, kids) {
        match kept_until(Some(def), &old.name, old.tick, kids).filter(|by| *by > now) {
            None => go.push(old),
            Some(by) if by == Timestamp::MAX => {}
            Some(by) => {
                let wait = by.duration_since(now).unsigned_abs();
                again = Some(again.map_or(wait, |a| a.min(wait)));
            }
        }
    }
    (go, again)
}

/// Delete the children [`to_trim`] says; returns when to look again for those kept for now. Each delete names the
/// job's UID and resourceVersion as judged, so it never removes a newer job that took the name (a cache that still
/// shows a deleted job must not cost its successor), nor one changed since (a finished job `bgjobs retry` put back in
/// the queue, and maybe running: it is no longer history).
pub(super) async fn trim_history(
    jobs: &Api<BackgroundJob>,
    def: &RecurringBackgroundJob,
    kids: &[Child],
    now: Timestamp,
) -> Option<Duration> {
    let (old_jobs, again) = to_trim(def, kids, now);
    for old in old_jobs {
        let preconditions =
            Preconditions { uid: Some(old.uid.clone()), resource_version: Some(old.resource_version.clone()) };
        let params = DeleteParams { preconditions: Some(preconditions), ..Default::default() };
        if let Err(e) = jobs.delete(&old.name, &params).await
            && !(api_code(&e) == Some(409) || crate::error::gone(&e))
        {
            warn!(job = %old.name, error = %e, "could not delete an old recurring job");
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recurring::claim;
    use crate::recurring::decisions::tests::{def, finished, t, with_last, with_pending};

    #[test]
    fn a_finished_ticks_job_is_kept_until_no_create_sent_soon_after_a_later_tick_was_claimed_can_land() {
        let made = |tick: i64, created: i64| Child {
            tick: Some(t(tick)),
            created: Some(t(created)),
            ..finished(&format!("report-{tick}"), Phase::Succeeded, created + 1)
        };
        // The apiserver's 60 s, a second for creationTimestamp, 5 s for clocks, and the 10 s a create may be sent
        // after a later claim (decided from a read sent before that claim).
        let kept_for = 60 + 1 + 4 + 1 + 10;
        let mut kids = vec![made(10, 12), made(30, 31), made(20, 40)];
        // The earliest creation among later ticks' jobs bounds the sends (tick 20's job was made late, after 30's).
        assert_eq!(late_creates_land_by(Some(t(10)), &kids), Some(t(31 + kept_for)));
        assert_eq!(late_creates_land_by(Some(t(20)), &kids), Some(t(31 + kept_for)));
        assert_eq!(late_creates_land_by(Some(t(30)), &kids), Some(Timestamp::MAX), "no later tick's job: no bound yet");
        assert_eq!(late_creates_land_by(None, &kids), None, "not a tick's job (a triggered one): nothing to wait for");
        // A triggered job is no later tick's: it was never claimed, and may have been made before the claim.
        kids.push(Child { created: Some(t(32)), ..finished("report-triggered", Phase::Succeeded, 33) });
        assert_eq!(late_creates_land_by(Some(t(30)), &kids), Some(Timestamp::MAX));

        // History limit 0, tick 30 claimed last: 10 and 20 are beyond it, and go only at 31 + kept_for.
        let none = with_last(def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 0})), 30);
        let names = |at: i64| {
            let (go, again) = to_trim(&none, &kids, t(at));
            (go.iter().map(|j| j.name.clone()).collect::<Vec<_>>(), again.map(|d| d.as_secs()))
        };
        let triggered = vec!["report-triggered".to_string()];
        assert_eq!(names(40), (triggered.clone(), Some((31 + kept_for - 40) as u64)), "a triggered job goes at once");
        assert_eq!(names(31 + kept_for - 1), (triggered, Some(1)));
        let (go, again) = names(31 + kept_for);
        assert_eq!((go.len(), again), (3, None), "10, 20 and the triggered job: {go:?}");

        // The one rule the TTL path asks too: the pending job and the latest claimed tick's stay until a later claim.
        let pending = with_pending(none.clone(), 30, "report-30");
        assert_eq!(kept_until(Some(&pending), "report-30", Some(t(30)), &kids), Some(Timestamp::MAX));
        assert_eq!(kept_until(Some(&none), "report-30", Some(t(30)), &kids), Some(Timestamp::MAX), "latest tick");
        assert_eq!(kept_until(Some(&none), "report-10", Some(t(10)), &kids), Some(t(31 + kept_for)));
        assert_eq!(kept_until(Some(&none), "report-triggered", None, &kids), None);
    }

    #[test]
    fn a_tick_not_older_than_the_last_claimed_one_is_kept_whatever_the_limits_and_a_stale_definition_keeps_more() {
        let ticked = |n: i64| Child { tick: Some(t(n)), ..finished(&format!("report-{n}"), Phase::Succeeded, n) };
        let kids: Vec<Child> = (1..=4).map(ticked).collect();
        let none = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 0}));
        let names =
            |d: &RecurringBackgroundJob| beyond_history(d, &kids).iter().map(|j| j.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&with_last(none.clone(), 4)),
            ["report-3", "report-2", "report-1"],
            "the latest tick's job stays"
        );
        // A copy of the definition from before the claims of ticks 3 and 4 (a lagging cache): both stay.
        assert_eq!(names(&with_last(none.clone(), 2)), ["report-1"]);
        assert!(keeps_tick(None, Some(t(1))), "definition not seen: kept");
        assert!(keeps_tick(Some(&none), Some(t(1))), "no tick claimed yet: kept");
        assert!(!keeps_tick(Some(&with_last(none.clone(), 2)), Some(t(1))), "an older tick goes");
        assert!(!keeps_tick(None, None), "not a tick's job");
        // Tick 60 claimed over tick 2, then taken back: a copy from before that keeps the jobs of the ticks after 2
        // (made since), not 2's.
        let mut claimed = with_last(none.clone(), 2);
        claim(claimed.status.as_mut().unwrap(), t(60), Some("report-60"), None);
        assert!(keeps_tick(Some(&claimed), Some(t(30))) && keeps_tick(Some(&claimed), Some(t(60))));
        assert!(!keeps_tick(Some(&claimed), Some(t(2))), "the job of the tick it replaced goes, as before");
    }

    /// Each history delete names the job's UID and its resourceVersion as judged: a job re-queued since (`bgjobs
    /// retry`) is no longer history, and the apiserver refuses the delete (409) instead of removing a running job.
    #[tokio::test]
    async fn a_history_delete_is_made_only_of_the_job_as_judged() {
        let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "Precondition failed"});
        let (client, sent) = crate::testing::scripted_client(move |_| (409, conflict.clone()));
        let jobs: Api<BackgroundJob> = Api::namespaced(client, "ns");
        let none = with_last(def("* * * * *", serde_json::json!({"failedJobsHistoryLimit": 0})), 60);
        let kids = vec![Child { resource_version: "41".into(), ..finished("report-1", Phase::Failed, 1) }];
        assert_eq!(trim_history(&jobs, &none, &kids, t(61)).await, None);
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let deleted = (sent[0].method.as_str(), sent[0].path.as_str());
        assert_eq!(deleted, ("DELETE", "/apis/bgjobs.dev/v1alpha1/namespaces/ns/backgroundjobs/report-1"));
        assert_eq!(sent[0].body["preconditions"], serde_json::json!({"uid": "uid-report-1", "resourceVersion": "41"}));
    }

    #[test]
    fn history_keeps_the_latest_finished_jobs_and_never_a_pending_one() {
        let kids = vec![
            finished("report-1", Phase::Succeeded, 1),
            finished("report-2", Phase::Succeeded, 2),
            finished("report-3", Phase::Succeeded, 3),
            finished("report-4", Phase::Failed, 4),
        ];
        let names =
            |d: &RecurringBackgroundJob| beyond_history(d, &kids).iter().map(|j| j.name.clone()).collect::<Vec<_>>();
        let d = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1}));
        assert_eq!(names(&d), ["report-2", "report-1"]);
        let none = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 0, "failedJobsHistoryLimit": 0}));
        let pending = with_pending(none, 3, "report-3");
        assert_eq!(names(&pending), ["report-4", "report-2", "report-1"], "report-3 is pending: kept");
        let two = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 2}));
        assert_eq!(names(&with_pending(two, 3, "report-3")), ["report-1"], "the pending one counts toward the two");
    }

    /// A job whose deletion waits (a finalizer) is going already: it is not deleted again at each look, and it is not
    /// counted as one of the jobs the history keeps.
    #[test]
    fn a_finished_job_whose_deletion_waits_is_neither_history_nor_deleted_again() {
        let kids = vec![
            finished("report-1", Phase::Succeeded, 1),
            Child { deleting: true, ..finished("report-2", Phase::Succeeded, 2) },
        ];
        let one = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 1}));
        assert!(beyond_history(&one, &kids).is_empty(), "report-1 is the one kept");
        let none = def("* * * * *", serde_json::json!({"successfulJobsHistoryLimit": 0}));
        let names: Vec<_> = beyond_history(&none, &kids).iter().map(|j| j.name.clone()).collect();
        assert_eq!(names, ["report-1"]);
    }
}
