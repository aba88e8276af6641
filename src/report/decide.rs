//! What a report does to a job, and when a waiting attempt's worker counts as gone: pure functions of the job, the
//! report and the cluster's time, tested without a cluster. [`super::apply`] and [`super::wait`] do the I/O.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::token::Claims;
use crate::api::{BackgroundJob, BackgroundJobStatus, Phase, Progress};
use crate::retry::{self, AttemptResult, Verdict};
use crate::status;

/// Largest `result` a report (or an in-process handler) may record, as compact JSON. A job is one etcd object, and
/// etcd refuses requests over 1.5 MiB by default: spec, args and status share that budget. And every replica keeps
/// every job in memory until retention deletes it, so a large result costs memory on each replica. Bigger outputs
/// belong in object storage, with their address in the result.
pub const MAX_RESULT_BYTES: usize = 32 * 1024;
/// Longest progress or failure message kept (characters); longer ones are cut.
pub const MAX_MESSAGE: usize = 1024;
/// Longest time a heartbeat that says nothing new waits to be written after the last one recorded. Each write
/// rewrites the whole job in etcd (its args included), and etcd keeps every revision until the apiserver compacts it
/// (every 5 minutes by default): a worker heartbeating every 100 ms with large args would fill etcd's quota on its own.
pub const HEARTBEAT_WRITE_GAP: Duration = Duration::from_secs(30);
/// Shortest time between two writes of changed progress.
pub const PROGRESS_WRITE_GAP: Duration = Duration::from_secs(1);

/// What a worker reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// The work is done, with an optional result.
    Complete {
        /// Any JSON, at most [`MAX_RESULT_BYTES`].
        result: Option<serde_json::Value>,
    },
    /// The work failed.
    Fail {
        /// Why, in words a user can act on.
        message: String,
        /// Whether another attempt may succeed (retried per the job's policy) or not (the job fails).
        retryable: bool,
    },
    /// The worker is alive, with optional progress.
    Heartbeat {
        /// Percent done, 0 to 100.
        percent: Option<i32>,
        /// A short note.
        message: Option<String>,
    },
}

impl Report {
    /// `complete`, `fail` or `heartbeat`.
    pub fn kind(&self) -> &'static str {
        match self {
            Report::Complete { .. } => "complete",
            Report::Fail { .. } => "fail",
            Report::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// Why a report changes nothing, as an HTTP status and words for the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status: 400 bad report, 401 bad token, 404 unknown job, 409 stale, 413 too large, 503 try again.
    pub code: u16,
    /// What is wrong.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }
}

/// What an accepted report changes.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The attempt ends: the verdict the retry policy gives its outcome, and the result of a success.
    Outcome {
        /// What follows the attempt.
        verdict: Verdict,
        /// The reported result.
        result: Option<serde_json::Value>,
    },
    /// The worker is alive.
    Heartbeat {
        /// Its progress, if it said.
        progress: Option<Progress>,
    },
    /// A Pod job's worker reported its result; the attempt still ends with its Pod.
    Result(serde_json::Value),
    /// A heartbeat that came sooner than [`write_gap`] after the last one recorded: answered, not written.
    Noted {
        /// When the worker was last recorded as heard from.
        recorded: Timestamp,
        /// How often heartbeats are written for this job.
        every: Duration,
    },
}

/// The checks that need no job: a result over the cap (413), a percentage out of range (400).
pub fn check(report: &Report) -> Result<(), Refusal> {
    match report {
        Report::Complete { result: Some(r) } => {
            let size = serde_json::to_vec(r).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_RESULT_BYTES {
                return Err(Refusal::new(
                    413,
                    format!(
                        "the result is {size} bytes of JSON; at most {MAX_RESULT_BYTES} are kept in the job's status \
                         (a job is one etcd object): store large output elsewhere and report its address"
                    ),
                ));
            }
        }
        Report::Heartbeat { percent: Some(p), .. } if !(0..=100).contains(p) => {
            return Err(Refusal::new(400, format!("percent must be between 0 and 100, not {p}")));
        }
        _ => {}
    }
    Ok(())
}

/// Whether `report` repeats what the job already records: a `complete` of the attempt that succeeded, with the
/// result it stored; a `fail` of the attempt that ended (retried later, or failed for good), with the message it
/// recorded. A worker that sent it, lost the answer and sent it again (as a `503` asks, and `bgjobs report` does) is
/// told it was recorded, not that its attempt is no longer current.
pub fn already_recorded(job: &BackgroundJob, claims: &Claims, report: &Report) -> bool {
    let Some(s) = job.status.as_ref() else { return false };
    let this_attempt = s.attempts == claims.attempt;
    match report {
        Report::Complete { result } => {
            let same = crate::api::same_once_stored(result.as_ref(), s.result.as_ref());
            job.phase() == Phase::Succeeded && this_attempt && same
        }
        Report::Fail { message, .. } => {
            let ended = matches!(job.phase(), Phase::Waiting | Phase::Failed | Phase::Abandoned);
            let said = s.last_error.as_deref().is_some_and(|e| e.contains(&failure_reported(message)));
            ended && this_attempt && said
        }
        Report::Heartbeat { .. } => false,
    }
}

/// What a `fail` report with `message` records in `lastError` (within the verdict's words).
fn failure_reported(message: &str) -> String {
    format!("the worker reported failure: {}", cut(message))
}

/// Judge a report against the job as just read: what it changes, or why it changes nothing.
pub fn judge(job: &BackgroundJob, claims: &Claims, report: &Report, now: Timestamp) -> Result<Change, Refusal> {
    check(report)?;
    let phase = job.phase();
    let current = job.attempts();
    let name = format!("{}/{}", claims.namespace, claims.name);
    if phase.is_final() {
        return Err(Refusal::new(
            409,
            format!("job {name} has finished ({phase}); attempt {} is no longer current", claims.attempt),
        ));
    }
    if phase != Phase::Running || current != claims.attempt {
        let now_on = if phase == Phase::Running {
            format!("attempt {current} is running")
        } else {
            format!("it is {phase} after attempt {current}")
        };
        return Err(Refusal::new(
            409,
            format!("attempt {} of job {name} is no longer current: {now_on}", claims.attempt),
        ));
    }
    let pod = job.spec.template.is_some();
    let created = job.counted_from(now);
    match report.clone() {
        Report::Complete { result } if pod => match result {
            Some(r) => Ok(Change::Result(r)),
            None => Ok(heartbeat(job, None, now)),
        },
        Report::Fail { .. } if pod => Err(Refusal::new(
            400,
            format!("job {name} runs as a Pod: its attempt fails when the Pod exits non-zero, not by a report"),
        )),
        Report::Complete { result } => Ok(Change::Outcome { verdict: Verdict::Succeed, result }),
        Report::Fail { message, retryable } => {
            let message = failure_reported(&message);
            let result = if retryable { AttemptResult::Retryable(message) } else { AttemptResult::Permanent(message) };
            Ok(Change::Outcome {
                verdict: retry::verdict(&job.spec, created, job.attempts_spent(claims.attempt), result, now),
                result: None,
            })
        }
        Report::Heartbeat { percent, message } => {
            let progress = (percent.is_some() || message.is_some()).then(|| Progress {
                percent,
                message: message.map(|m| cut(&m)),
                time: Some(Time(now)),
            });
            Ok(heartbeat(job, progress, now))
        }
    }
}

/// A heartbeat, written or only noted, as [`written_after`] says.
fn heartbeat(job: &BackgroundJob, progress: Option<Progress>, now: Timestamp) -> Change {
    match written_after(job, progress.as_ref(), now) {
        Err((recorded, every)) => Change::Noted { recorded, every },
        Ok(()) => Change::Heartbeat { progress },
    }
}

/// How long after the last recorded heartbeat (or progress) another is written; sooner ones are answered unwritten.
/// For a heartbeat that says nothing new, a quarter of the heartbeat timeout, [`HEARTBEAT_WRITE_GAP`] at most: so what
/// is recorded lags a worker that heartbeats more often than that by less than half its timeout, and it is never
/// judged gone for heartbeats that were not written. Changed progress, at most once a [`PROGRESS_WRITE_GAP`].
pub fn write_gap(job: &BackgroundJob, progress_changes: bool) -> Duration {
    let heartbeat = job
        .spec
        .heartbeat_timeout_seconds
        .map_or(HEARTBEAT_WRITE_GAP, |t| Duration::from_secs(t.max(1) as u64) / 4)
        .min(HEARTBEAT_WRITE_GAP);
    if progress_changes { heartbeat.min(PROGRESS_WRITE_GAP) } else { heartbeat }
}

/// Whether a heartbeat (or an in-process handler's progress) carrying `progress` is written now: `Err` says when the
/// worker was last recorded and how often it is. The one rule for both, so a worker that reports in a loop costs at
/// most one status write a [`write_gap`]. A progress that changes is timed from the last heartbeat or progress
/// written only, not from the attempt's start: an in-process handler's first progress is always written (an HTTP
/// worker's first may follow the `202`'s mark within the second, and be noted only).
pub fn written_after(
    job: &BackgroundJob,
    progress: Option<&Progress>,
    now: Timestamp,
) -> std::result::Result<(), (Timestamp, Duration)> {
    let Some(s) = job.status.as_deref() else { return Ok(()) };
    let said = |p: &Progress| (p.percent, p.message.clone());
    let changes = progress.is_some_and(|p| s.progress.as_ref().map(said) != Some(said(p)));
    let progress_time = s.progress.as_ref().and_then(|p| p.time.as_ref()).map(|t| t.0);
    let written = s.last_heartbeat_time.as_ref().map(|t| t.0).max(progress_time);
    let last = if changes { written } else { written.max(last_heard(job)) };
    let Some(last) = last else { return Ok(()) };
    let every = write_gap(job, changes);
    let soon = now >= last && now.duration_since(last).unsigned_abs() < every;
    if soon { Err((last, every)) } else { Ok(()) }
}

/// Write `change` into a status (inside the fenced write that checked the attempt is still current).
pub fn apply(s: &mut BackgroundJobStatus, change: &Change, now: Timestamp) {
    if let Change::Noted { .. } = change {
        return;
    }
    s.last_heartbeat_time = Some(Time(now));
    match change {
        Change::Heartbeat { progress } => {
            if progress.is_some() {
                s.progress = progress.clone();
            }
        }
        Change::Result(r) => s.result = Some(r.clone()),
        Change::Noted { .. } => {}
        Change::Outcome { verdict, result } => match verdict {
            Verdict::Succeed => {
                status::finish(s, Phase::Succeeded, None, now);
                s.result = result.clone();
            }
            Verdict::RetryAt { at, reason } => status::requeue(s, Some(*at), reason.clone(), now),
            Verdict::Fail(reason) => status::finish(s, Phase::Failed, Some(reason.clone()), now),
            Verdict::Abandon(reason) => status::finish(s, Phase::Abandoned, Some(reason.clone()), now),
        },
    }
}

/// Whether an attempt waiting for its worker's report still hears from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Alive; with a heartbeat timeout, it is lost if nothing arrives within `overdue_in`.
    Alive {
        /// How long until the worker counts as gone (`None`: no heartbeat timeout).
        overdue_in: Option<Duration>,
    },
    /// Nothing heard for `heartbeatTimeoutSeconds`: the attempt is lost (the message says so).
    Lost(String),
}

/// Judge a waiting attempt's worker by its last heartbeat (the `202 Accepted` counts as the first one).
/// `readable_again`: when the holder could read the job again after the apiserver failed it. A heartbeat is a status
/// write, refused while the apiserver is away, so the worker is given a full heartbeat timeout from then: it is not
/// charged for the outage (and run again beside itself) because it could not be heard. The apiserver keeps times in
/// whole seconds, so a heartbeat recorded at second S may have come as late as S + 1: the timeout counts from there
/// (else a worker beating ten times a second under a 1 s timeout was judged gone at each second's turn).
pub fn liveness(job: &BackgroundJob, now: Timestamp, readable_again: Option<Timestamp>) -> Liveness {
    let Some(timeout) = job.spec.heartbeat_timeout_seconds else { return Liveness::Alive { overdue_in: None } };
    let heard = last_heard(job);
    let heard_by = heard.map(|h| h.checked_add(jiff::SignedDuration::from_secs(1)).unwrap_or(Timestamp::MAX));
    let Some(last) = heard_by.max(readable_again) else {
        return Liveness::Alive { overdue_in: Some(Duration::from_secs(timeout.max(1) as u64)) };
    };
    let deadline = last.checked_add(jiff::SignedDuration::from_secs(timeout.max(1))).unwrap_or(Timestamp::MAX);
    if now >= deadline {
        let since = match heard {
            Some(heard) if heard_by >= Some(last) => format!("last heard from at {heard}"),
            _ => format!("counted from {last}, when the apiserver could record heartbeats again"),
        };
        return Liveness::Lost(format!(
            "attempt {} was lost: its worker sent no heartbeat or report for {timeout}s (heartbeatTimeoutSeconds; \
             {since})",
            job.attempts()
        ));
    }
    Liveness::Alive { overdue_in: Some(deadline.duration_since(now).unsigned_abs()) }
}

/// When the worker of the current attempt was last heard from: its last heartbeat, else the attempt's start (the
/// `202 Accepted` counts as the first heartbeat).
fn last_heard(job: &BackgroundJob) -> Option<Timestamp> {
    let s = job.status.as_deref()?;
    s.last_heartbeat_time.as_ref().or(s.start_time.as_ref()).map(|t| t.0)
}

/// When the worker's clock restarts after an outage seen from `started` to `now` (the job could not be read, or its
/// watch failed, and so no heartbeat could be recorded): now, unless the worker has had a full heartbeat timeout of
/// time to be heard since the clock last restarted (`previous`) before this outage began, and was not heard. So a
/// dead worker is charged once it was silent for a timeout the apiserver could hear it through, and a live one
/// behind an apiserver that keeps failing is not charged at all (its attempt and job timeouts still bound it).
pub fn after_outage(
    job: &BackgroundJob,
    previous: Option<Timestamp>,
    started: Timestamp,
    now: Timestamp,
) -> Option<Timestamp> {
    let Some(timeout) = job.spec.heartbeat_timeout_seconds else { return previous };
    let heard = last_heard(job);
    // Whole seconds: a heartbeat of the restart's own second is taken as after it.
    let heard_by = heard.and_then(|h| h.checked_add(jiff::SignedDuration::from_secs(1)).ok());
    let had_a_timeout =
        |p: Timestamp| p.checked_add(jiff::SignedDuration::from_secs(timeout.max(1))).is_ok_and(|t| started >= t);
    match previous {
        Some(p) if heard_by.is_none_or(|h| h <= p) && had_a_timeout(p) => Some(p),
        _ => Some(now),
    }
}

/// Whether the job's current attempt waits for a report (and so is adopted, not restarted, by a replica that takes
/// the job over).
pub fn awaits_report(job: &BackgroundJob) -> bool {
    job.phase() == Phase::Running && job.status.as_ref().is_some_and(|s| s.awaiting_report)
}

fn cut(message: &str) -> String {
    message.chars().take(MAX_MESSAGE).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackgroundJobSpec;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn job(spec: serde_json::Value, phase: Phase, attempts: i32) -> BackgroundJob {
        let mut spec = spec;
        spec["jobName"] = "x".into();
        let mut j = BackgroundJob::new("j", serde_json::from_value::<BackgroundJobSpec>(spec).unwrap());
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some("uid-1".into());
        j.metadata.creation_timestamp = Some(Time(at(0)));
        j.status = Some(Box::new(BackgroundJobStatus {
            phase: Some(phase),
            attempts,
            worker: Some("w1".into()),
            awaiting_report: phase == Phase::Running,
            last_heartbeat_time: Some(Time(at(10))),
            ..Default::default()
        }));
        j
    }

    fn claims(attempt: i32) -> Claims {
        Claims { namespace: "ns".into(), name: "j".into(), uid: "uid-1".into(), attempt }
    }

    #[test]
    fn a_complete_sent_again_after_it_was_recorded_is_recognised_and_nothing_else_is() {
        let result = Some(serde_json::json!({"rows": 3}));
        let mut done = job(serde_json::json!({}), Phase::Succeeded, 2);
        done.status.as_mut().unwrap().result = result.clone();
        let again = Report::Complete { result: result.clone() };
        assert!(already_recorded(&done, &claims(2), &again));
        assert!(!already_recorded(&done, &claims(1), &again), "another attempt's");
        assert!(!already_recorded(&done, &claims(2), &Report::Complete { result: None }), "another result");
        let as_sent = Report::Complete { result: Some(serde_json::json!({"rows": 3.0})) };
        assert!(already_recorded(&done, &claims(2), &as_sent), "the stored result is the same once stored");
        let fail = Report::Fail { message: "x".into(), retryable: false };
        assert!(!already_recorded(&done, &claims(2), &fail));
        // A fail recorded (the job waits for its retry, or failed for good) and sent again: recorded; not another
        // attempt's, nor another message.
        for (phase, verdict) in [
            (Phase::Waiting, Verdict::RetryAt { at: at(30), reason: String::new() }),
            (Phase::Failed, Verdict::Fail(String::new())),
        ] {
            let mut ended = job(serde_json::json!({}), Phase::Running, 2);
            let reason = format!("{} (gave up after 2 of 2 attempts)", failure_reported("disk full"));
            let verdict = match verdict {
                Verdict::RetryAt { at, .. } => Verdict::RetryAt { at, reason },
                _ => Verdict::Fail(reason),
            };
            apply(ended.status.as_mut().unwrap(), &Change::Outcome { verdict, result: None }, at(20));
            assert_eq!(ended.phase(), phase);
            let again = Report::Fail { message: "disk full".into(), retryable: true };
            assert!(already_recorded(&ended, &claims(2), &again), "{phase:?}");
            assert!(!already_recorded(&ended, &claims(1), &again), "{phase:?}: another attempt's");
            let other = Report::Fail { message: "disk empty".into(), retryable: true };
            assert!(!already_recorded(&ended, &claims(2), &other), "{phase:?}: another message");
        }
        let running = job(serde_json::json!({}), Phase::Running, 2);
        assert!(!already_recorded(&running, &claims(2), &again), "not recorded yet: judged as any report");
        let failed = job(serde_json::json!({}), Phase::Failed, 2);
        assert!(!already_recorded(&failed, &claims(2), &Report::Complete { result: None }));
    }

    fn complete(result: serde_json::Value) -> Report {
        Report::Complete { result: Some(result) }
    }

    #[test]
    fn a_complete_for_the_current_attempt_succeeds_the_job_with_its_result() {
        let j = job(serde_json::json!({}), Phase::Running, 2);
        let change = judge(&j, &claims(2), &complete(serde_json::json!({"rows": 42})), at(20)).unwrap();
        let mut s = j.status.clone().unwrap();
        apply(&mut s, &change, at(20));
        assert_eq!((s.phase, s.result), (Some(Phase::Succeeded), Some(serde_json::json!({"rows": 42}))));
        assert!(!s.awaiting_report, "a finished attempt waits for nothing");
    }

    #[test]
    fn a_report_for_an_earlier_attempt_is_refused_with_409_naming_both_attempts() {
        let j = job(serde_json::json!({}), Phase::Running, 4);
        let refusal = judge(&j, &claims(3), &complete(serde_json::json!(1)), at(20)).unwrap_err();
        assert_eq!(refusal.code, 409);
        assert!(
            refusal.message.contains("attempt 3 of job ns/j is no longer current: attempt 4 is running"),
            "{refusal:?}"
        );
        let waiting = job(serde_json::json!({}), Phase::Waiting, 3);
        let refusal = judge(&waiting, &claims(3), &Report::Heartbeat { percent: None, message: None }, at(20));
        assert!(refusal.unwrap_err().message.contains("it is Waiting after attempt 3"));
    }

    #[test]
    fn a_report_for_a_finished_job_is_refused() {
        let j = job(serde_json::json!({}), Phase::Succeeded, 1);
        let refusal = judge(&j, &claims(1), &complete(serde_json::json!(1)), at(20)).unwrap_err();
        assert_eq!(refusal.code, 409);
        assert!(refusal.message.contains("has finished (Succeeded)"), "{refusal:?}");
    }

    #[test]
    fn a_result_over_the_cap_is_refused_with_413_before_anything_else() {
        let big = serde_json::json!({"blob": "x".repeat(MAX_RESULT_BYTES)});
        let j = job(serde_json::json!({}), Phase::Running, 1);
        let refusal = judge(&j, &claims(1), &complete(big), at(20)).unwrap_err();
        assert_eq!(refusal.code, 413);
        assert!(refusal.message.contains("at most 32768"), "{refusal:?}");
        let fits = serde_json::json!({"blob": "x".repeat(MAX_RESULT_BYTES - 20)});
        assert!(check(&complete(fits)).is_ok());
    }

    #[test]
    fn a_failure_follows_the_retry_policy_and_a_permanent_one_fails_the_job() {
        let j = job(serde_json::json!({"retry": {"backoffSeconds": 5, "maxAttempts": 3}}), Phase::Running, 1);
        let fail = |retryable| Report::Fail { message: "disk full".into(), retryable };
        match judge(&j, &claims(1), &fail(true), at(20)).unwrap() {
            Change::Outcome { verdict: Verdict::RetryAt { at: t, reason }, .. } => {
                assert_eq!(t, at(25));
                assert_eq!(reason, "the worker reported failure: disk full");
            }
            other => panic!("{other:?}"),
        }
        let change = judge(&j, &claims(1), &fail(false), at(20)).unwrap();
        let mut s = j.status.clone().unwrap();
        apply(&mut s, &change, at(20));
        assert_eq!(s.phase, Some(Phase::Failed));
    }

    /// A worker beating every `period` ms from 10 s to 200 s: how many beats were written, and whether it was ever
    /// judged gone in between.
    fn beat_steadily(spec: serde_json::Value, period: i64) -> (usize, bool) {
        let mut j = job(spec, Phase::Running, 1);
        let (mut written, mut judged_gone) = (0, false);
        for ms in (10_000..=200_000).step_by(period as usize) {
            let now = at(0) + jiff::SignedDuration::from_millis(ms);
            judged_gone |= matches!(liveness(&j, now, None), Liveness::Lost(_));
            let change = judge(&j, &claims(1), &Report::Heartbeat { percent: None, message: None }, now).unwrap();
            if let Change::Heartbeat { .. } = change {
                written += 1;
                // As the apiserver keeps it: whole seconds.
                let stored = Timestamp::from_second(now.as_second()).unwrap();
                apply(j.status.as_deref_mut().unwrap(), &change, stored);
            }
        }
        (written, judged_gone)
    }

    #[test]
    fn heartbeats_sooner_than_a_quarter_of_the_timeout_are_noted_not_written_and_the_worker_is_never_judged_gone() {
        for (timeout, period) in [(20, 1000), (4, 100), (1, 100), (2, 400), (600, 1000)] {
            let (written, gone) = beat_steadily(serde_json::json!({"heartbeatTimeoutSeconds": timeout}), period);
            assert!(!gone, "timeout {timeout}s, a beat every {period} ms: never judged gone");
            // Stored times are whole seconds, up to one before the write: a gap under a few seconds saves less.
            let gap_ms = (timeout * 1000 / 4).min(30_000);
            let (beats, most, least) =
                (190_000 / period, 190_000 / (gap_ms - 1000).max(period) + 2, 190_000 / (gap_ms + period));
            assert!(written <= most as usize, "timeout {timeout}s: {written} writes of {beats} beats (at most {most})");
            assert!(
                written >= least as usize,
                "timeout {timeout}s: {written} writes of {beats} beats (at least {least})"
            );
        }
        let (written, _) = beat_steadily(serde_json::json!({}), 100);
        assert!((6..=8).contains(&written), "no timeout: one write in 30 s, not 1900 ({written})");
    }

    #[test]
    fn changed_progress_is_written_once_a_second_at_most_and_the_first_of_an_attempt_at_once() {
        let mut j = job(serde_json::json!({}), Phase::Running, 1);
        let s = j.status.as_deref_mut().unwrap();
        s.last_heartbeat_time = None;
        s.start_time = Some(Time(at(10)));
        let progress = |percent, time| Progress { percent: Some(percent), message: None, time: Some(Time(time)) };
        let millis = |ms| at(10) + jiff::SignedDuration::from_millis(ms);
        assert_eq!(written_after(&j, Some(&progress(1, millis(100))), millis(100)), Ok(()), "the first, at start");
        assert!(written_after(&j, None, millis(100)).is_err(), "a bare beat right after the start is not");
        j.status.as_deref_mut().unwrap().progress = Some(progress(1, at(10)));
        assert_eq!(
            written_after(&j, Some(&progress(2, millis(600))), millis(600)),
            Err((at(10), Duration::from_secs(1))),
            "changed, but 600 ms after the last"
        );
        assert_eq!(written_after(&j, Some(&progress(2, millis(1000))), millis(1000)), Ok(()));
        assert_eq!(
            written_after(&j, Some(&progress(1, at(20))), at(20)),
            Err((at(10), HEARTBEAT_WRITE_GAP)),
            "the same progress again is a bare beat"
        );
        assert_eq!(written_after(&j, Some(&progress(1, at(9))), at(9)), Ok(()), "a clock that stepped back writes");
        j.status = None;
        assert_eq!(written_after(&j, None, at(9)), Ok(()));
    }

    #[test]
    fn a_heartbeat_records_progress_and_the_time_and_keeps_the_attempt_running() {
        let j = job(serde_json::json!({}), Phase::Running, 1);
        let beat = Report::Heartbeat { percent: Some(40), message: Some("copying".into()) };
        let change = judge(&j, &claims(1), &beat, at(30)).unwrap();
        let mut s = j.status.clone().unwrap();
        apply(&mut s, &change, at(30));
        assert_eq!((s.phase, s.last_heartbeat_time.clone()), (Some(Phase::Running), Some(Time(at(30)))));
        assert_eq!(s.progress.as_ref().and_then(|p| p.percent), Some(40));
        let bare = judge(&j, &claims(1), &Report::Heartbeat { percent: None, message: None }, at(45)).unwrap();
        assert!(matches!(bare, Change::Heartbeat { progress: None }), "35 s after the last: written");
        apply(&mut s, &bare, at(45));
        assert_eq!(s.progress.and_then(|p| p.message).as_deref(), Some("copying"), "a bare heartbeat keeps progress");
        let bad = Report::Heartbeat { percent: Some(140), message: None };
        assert_eq!(judge(&j, &claims(1), &bad, at(31)).unwrap_err().code, 400);
    }

    #[test]
    fn a_pod_jobs_report_records_its_result_but_its_pod_ends_the_attempt() {
        let j = job(serde_json::json!({"template": {}}), Phase::Running, 1);
        let change = judge(&j, &claims(1), &complete(serde_json::json!("done")), at(20)).unwrap();
        assert_eq!(change, Change::Result(serde_json::json!("done")));
        let fail = Report::Fail { message: "x".into(), retryable: true };
        assert_eq!(judge(&j, &claims(1), &fail, at(20)).unwrap_err().code, 400);
    }

    #[test]
    fn a_waiting_attempt_is_lost_once_its_worker_is_silent_for_the_heartbeat_timeout() {
        let j = job(serde_json::json!({"heartbeatTimeoutSeconds": 30}), Phase::Running, 2);
        // Heard at second 10: perhaps as late as 11.
        assert_eq!(liveness(&j, at(25), None), Liveness::Alive { overdue_in: Some(Duration::from_secs(16)) });
        assert_eq!(liveness(&j, at(40), None), Liveness::Alive { overdue_in: Some(Duration::from_secs(1)) });
        match liveness(&j, at(41), None) {
            Liveness::Lost(why) => assert!(why.contains("attempt 2 was lost") && why.contains("30s"), "{why}"),
            other => panic!("{other:?}"),
        }
        let patient = job(serde_json::json!({}), Phase::Running, 2);
        assert_eq!(liveness(&patient, at(100_000), None), Liveness::Alive { overdue_in: None });
    }

    #[test]
    fn a_worker_is_not_charged_for_the_time_the_apiserver_could_not_record_its_heartbeats() {
        // Last heard from at 10; the job could not be read (nor a heartbeat written) until 60.
        let j = job(serde_json::json!({"heartbeatTimeoutSeconds": 30}), Phase::Running, 2);
        assert!(matches!(liveness(&j, at(61), None), Liveness::Lost(_)));
        assert_eq!(liveness(&j, at(61), Some(at(60))), Liveness::Alive { overdue_in: Some(Duration::from_secs(29)) });
        assert!(matches!(liveness(&j, at(90), Some(at(60))), Liveness::Lost(_)), "one full timeout, not more");
        // An outage that ended before the last heartbeat changes nothing.
        assert!(matches!(liveness(&j, at(41), Some(at(5))), Liveness::Lost(_)));
    }

    #[test]
    fn a_worker_is_charged_only_once_it_was_silent_for_a_timeout_the_apiserver_could_hear_it_through() {
        // Timeout 30 s; last heard at 10 (`job`).
        let mut j = job(serde_json::json!({"heartbeatTimeoutSeconds": 30}), Phase::Running, 2);
        assert_eq!(after_outage(&j, None, at(20), at(60)), Some(at(60)), "the first outage since it was heard from");
        // The apiserver back at 60 and readable until 95: a full timeout, nothing heard: no more time.
        assert_eq!(after_outage(&j, Some(at(60)), at(95), at(97)), Some(at(60)), "silent through a timeout");
        // Down again from 61 to 75: it could not have been heard, so its clock restarts again.
        assert_eq!(after_outage(&j, Some(at(60)), at(61), at(75)), Some(at(75)), "a flapping apiserver");
        j.status.as_mut().unwrap().last_heartbeat_time = Some(Time(at(70)));
        assert_eq!(
            after_outage(&j, Some(at(60)), at(95), at(97)),
            Some(at(97)),
            "heard from since: the next outage counts"
        );
    }

    #[test]
    fn only_a_running_attempt_marked_as_waiting_awaits_a_report() {
        assert!(awaits_report(&job(serde_json::json!({}), Phase::Running, 1)));
        let mut j = job(serde_json::json!({}), Phase::Running, 1);
        j.status.as_mut().unwrap().awaiting_report = false;
        assert!(!awaits_report(&j));
        let mut waiting = job(serde_json::json!({}), Phase::Waiting, 1);
        waiting.status.as_mut().unwrap().awaiting_report = true;
        assert!(!awaits_report(&waiting));
    }
}
