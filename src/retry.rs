//! What happens after an attempt: retry with exponential backoff, or give up.
//!
//! Attempt `n` (1-based) that failed is followed by attempt `n + 1` after `backoffSeconds * backoffFactor^(n-1)`
//! seconds, unless `retry.maxAttempts` attempts have been started (→ `Failed`) or the retry would start after
//! `creationTimestamp + timeoutSeconds` (→ `Abandoned`: there is no point in waiting for a retry that may not run).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::api::{BackgroundJobSpec, RetryPolicy};

/// The longest single backoff bgjobs will compute; keeps huge factors from overflowing.
const MAX_BACKOFF: Duration = Duration::from_secs(365 * 24 * 3600);

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptResult {
    /// The work is done.
    Succeeded,
    /// A failure another attempt may fix (HTTP 5xx, a timeout, a handler's retryable error, a lost worker).
    Retryable(String),
    /// A failure no retry can fix (unknown jobName, malformed args, HTTP 4xx, a handler's permanent error).
    Permanent(String),
    /// The attempt's worker reported its outcome (to any replica), which wrote it already: nothing is left to
    /// record ([`crate::report`]).
    Reported,
    /// Nothing ran, and it was not the job's fault (a full ResourceQuota left no room for its Pod): the attempt is
    /// handed back to the queue unstarted, not counted against `retry.maxAttempts`, to be claimed again after
    /// [`room_wait`].
    NotStarted(String),
}

/// What to record after an attempt (or a lost attempt) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Phase `Succeeded`.
    Succeed,
    /// Back to `Waiting`; not before `at`.
    RetryAt {
        /// Earliest start of the next attempt.
        at: Timestamp,
        /// Why the attempt failed.
        reason: String,
    },
    /// Phase `Failed`.
    Fail(String),
    /// Phase `Abandoned`.
    Abandon(String),
}

/// The wait before the attempt that follows failed attempt number `failed_attempt` (1-based).
pub fn backoff(policy: &RetryPolicy, failed_attempt: i32) -> Duration {
    // No base, no wait, whatever the factor: from attempt 1,025 on, 2^exponent is infinite, and 0 × ∞ is not a number.
    if policy.backoff_seconds <= 0 {
        return Duration::ZERO;
    }
    let exponent = (failed_attempt.max(1) - 1) as f64;
    let secs = policy.backoff_seconds as f64 * policy.backoff_factor.max(1.0).powf(exponent);
    if !secs.is_finite() || secs >= MAX_BACKOFF.as_secs_f64() { MAX_BACKOFF } else { Duration::from_secs_f64(secs) }
}

/// The pause after the `nth` failure in a row (1-based; 0 counts as 1): `first`, doubled at each, at most `most`.
/// The one rule of the pauses that grow while something keeps failing for the same reason (refused claims and
/// deletes, a recurring definition's refused writes, a Pod that found no room).
pub fn doubling(first: Duration, nth: u32, most: Duration) -> Duration {
    first.saturating_mul(1 << nth.saturating_sub(1).min(20)).min(most)
}

/// How long a job whose Pod found no room in its namespace's ResourceQuota waits before it is claimed again, its
/// attempts handed back that way so far (`unstartedAttempts`, which counts other hand-backs too, rarer) being
/// `handed_back`: 5 s, doubled each time, at most 5 minutes. Waiting off the replica's slots: a Pod that never fits (a
/// quota of 0, a request over the quota's hard limit) held them, and the jobs behind it waited in every namespace.
pub fn room_wait(handed_back: i32) -> Duration {
    let nth = u32::try_from(handed_back).unwrap_or(0).saturating_add(1);
    doubling(Duration::from_secs(5), nth, Duration::from_secs(300))
}

/// The time an attempt may start `wait` after `now`, in the whole seconds the status keeps ([`ceil_to_second`]).
pub fn not_before(now: Timestamp, wait: Duration) -> Timestamp {
    let wait = SignedDuration::try_from(wait).unwrap_or(SignedDuration::MAX);
    ceil_to_second(now.checked_add(wait).unwrap_or(Timestamp::MAX))
}

/// When the job gives up: `creationTimestamp + timeoutSeconds`.
pub fn deadline(spec: &BackgroundJobSpec, created: Timestamp) -> Timestamp {
    created.checked_add(SignedDuration::from_secs(spec.timeout_seconds.max(1))).unwrap_or(Timestamp::MAX)
}

/// Decide what follows attempt number `attempt` that ended with `result`.
pub fn verdict(
    spec: &BackgroundJobSpec,
    created: Timestamp,
    attempt: i32,
    result: AttemptResult,
    now: Timestamp,
) -> Verdict {
    let reason = match result {
        // The attempt runner records nothing for a reported outcome; should one get here, it changes nothing.
        AttemptResult::Succeeded | AttemptResult::Reported => return Verdict::Succeed,
        AttemptResult::Permanent(reason) => return Verdict::Fail(reason),
        // The attempt runner hands such an attempt back unstarted; should one get here, it is retried.
        AttemptResult::Retryable(reason) | AttemptResult::NotStarted(reason) => reason,
    };
    if let Some(max) = spec.retry.max_attempts
        && attempt >= max
    {
        return Verdict::Fail(format!("{reason} (gave up after {attempt} of {max} attempts)"));
    }
    let at = not_before(now, backoff(&spec.retry, attempt));
    let give_up = deadline(spec, created);
    if at >= give_up {
        return Verdict::Abandon(format!(
            "{reason} (the next attempt would start after the job's timeout of {}s since creation)",
            spec.timeout_seconds
        ));
    }
    Verdict::RetryAt { at, reason }
}

/// Kubernetes `Time` fields keep whole seconds only: a retry time is rounded up, never down, so that a retry
/// never starts before its backoff has passed (by the replicas' reading of the cluster's clock, which agree within
/// `clock::REPLICAS_AGREE_WITHIN`: docs/usage.md's notes say what that costs).
pub fn ceil_to_second(t: Timestamp) -> Timestamp {
    if t.subsec_nanosecond() == 0 { t } else { Timestamp::from_second(t.as_second() + 1).unwrap_or(t) }
}

/// Whether a job may still start an attempt now: not past its deadline, not out of attempts.
pub fn may_start(
    spec: &BackgroundJobSpec,
    created: Timestamp,
    attempts_started: i32,
    now: Timestamp,
) -> Result<(), Verdict> {
    let timeout = spec.timeout_seconds;
    if attempts_started == 0
        && let Some(delay) = spec.delay_seconds.filter(|d| *d >= timeout)
    {
        // Known at creation: said at once, not when the timeout comes.
        return Err(Verdict::Abandon(format!(
            "it could never start: its delaySeconds ({delay}) end at or after its timeout of {timeout}s since creation"
        )));
    }
    if now >= deadline(spec, created) {
        // A job that never started was not taken from its queue in time: say which, and what can hold a job back.
        let never = if attempts_started == 0 {
            format!(
                "; it never started: no replica took it from queue {:?} (does a replica serve that queue, see \
                 --queues? were all slots, the cluster cap or its concurrency key taken?)",
                spec.queue
            )
        } else {
            String::new()
        };
        return Err(Verdict::Abandon(format!(
            "not finished within the job's timeout of {timeout}s since creation{never}"
        )));
    }
    if let Some(max) = spec.retry.max_attempts
        && attempts_started >= max
    {
        return Err(Verdict::Fail(format!("all {max} attempts were used up")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_that_found_no_room_waits_five_seconds_then_twice_as_long_up_to_five_minutes() {
        let waits: Vec<u64> = (0..8).map(|n| room_wait(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!((room_wait(-1).as_secs(), room_wait(i32::MAX).as_secs()), (5, 300));
    }

    fn spec(json: serde_json::Value) -> BackgroundJobSpec {
        serde_json::from_value(json).unwrap()
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn default_backoff_is_one_minute_then_doubles() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=4).map(|n| backoff(&p, n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480]);
    }

    #[test]
    fn huge_factors_saturate_instead_of_overflowing() {
        let p = RetryPolicy { max_attempts: None, backoff_seconds: 60, backoff_factor: 1e9 };
        assert_eq!(backoff(&p, 1000), MAX_BACKOFF);
    }

    /// "Retry at once until the timeout": no wait at any attempt, so the job is retried, not abandoned, at attempt
    /// 1,025 (where 2^1024 is infinite, 0 × ∞ was not a number, and the wait became the longest one).
    #[test]
    fn no_backoff_is_no_wait_at_every_attempt_and_a_late_attempt_is_retried_not_abandoned() {
        let p = RetryPolicy { max_attempts: None, backoff_seconds: 0, backoff_factor: 2.0 };
        for n in [1, 2, 1024, 1025, 5000, i32::MAX] {
            assert_eq!(backoff(&p, n), Duration::ZERO, "attempt {n}");
        }
        let s = spec(serde_json::json!({"jobName": "x", "retry": {"backoffSeconds": 0}}));
        let v = verdict(&s, t(0), 1025, AttemptResult::Retryable("boom".into()), t(1_000));
        assert!(matches!(v, Verdict::RetryAt { at, .. } if at == t(1_000)), "{v:?}");
    }

    #[test]
    fn a_retryable_failure_is_retried_after_the_backoff() {
        let s = spec(serde_json::json!({"jobName": "x", "retry": {"backoffSeconds": 10, "backoffFactor": 3.0}}));
        let v = verdict(&s, t(0), 2, AttemptResult::Retryable("boom".into()), t(100));
        assert_eq!(v, Verdict::RetryAt { at: t(130), reason: "boom".into() });
    }

    #[test]
    fn retry_times_round_up_to_whole_seconds_because_status_times_keep_only_seconds() {
        let s = spec(serde_json::json!({"jobName": "x", "retry": {"backoffSeconds": 1}}));
        let now = Timestamp::from_millisecond(100_400).unwrap();
        let v = verdict(&s, t(0), 1, AttemptResult::Retryable("boom".into()), now);
        assert_eq!(v, Verdict::RetryAt { at: t(102), reason: "boom".into() });
        assert_eq!(ceil_to_second(t(7)), t(7));
    }

    #[test]
    fn the_last_allowed_attempt_fails_the_job() {
        let s = spec(serde_json::json!({"jobName": "x", "retry": {"maxAttempts": 3}}));
        assert!(
            matches!(verdict(&s, t(0), 3, AttemptResult::Retryable("boom".into()), t(1)), Verdict::Fail(r) if r.contains("3 of 3"))
        );
        assert!(matches!(verdict(&s, t(0), 2, AttemptResult::Retryable("boom".into()), t(1)), Verdict::RetryAt { .. }));
    }

    #[test]
    fn a_permanent_failure_is_never_retried() {
        let s = spec(serde_json::json!({"jobName": "x"}));
        assert_eq!(
            verdict(&s, t(0), 1, AttemptResult::Permanent("bad args".into()), t(1)),
            Verdict::Fail("bad args".into())
        );
    }

    /// Bad input only the operator can see (the schema cannot compare two fields on 1.20): a delay that ends at or
    /// after the timeout is said at once; a job that never started says in which queue it waited.
    #[test]
    fn a_job_that_could_never_start_or_never_started_says_why_when_it_is_abandoned() {
        let late = spec(serde_json::json!({"jobName": "x", "delaySeconds": 120, "timeoutSeconds": 60}));
        match may_start(&late, t(0), 0, t(1)) {
            Err(Verdict::Abandon(r)) => {
                assert!(r.contains("could never start") && r.contains("delaySeconds (120)"), "{r}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(may_start(&late, t(0), 1, t(1)), Ok(()), "a job that started once is judged by its deadline only");
        let unserved = spec(serde_json::json!({"jobName": "x", "queue": "mail", "timeoutSeconds": 60}));
        assert_eq!(may_start(&unserved, t(0), 0, t(59)), Ok(()));
        match may_start(&unserved, t(0), 0, t(60)) {
            Err(Verdict::Abandon(r)) => assert!(r.contains("never started") && r.contains("\"mail\""), "{r}"),
            other => panic!("{other:?}"),
        }
        match may_start(&unserved, t(0), 2, t(60)) {
            Err(Verdict::Abandon(r)) => assert!(!r.contains("never started"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retry_past_the_timeout_abandons_the_job() {
        let s = spec(serde_json::json!({"jobName": "x", "timeoutSeconds": 100}));
        assert!(matches!(verdict(&s, t(0), 1, AttemptResult::Retryable("boom".into()), t(50)), Verdict::Abandon(_)));
    }

    #[test]
    fn may_start_checks_deadline_then_attempts() {
        let s = spec(serde_json::json!({"jobName": "x", "timeoutSeconds": 100, "retry": {"maxAttempts": 2}}));
        assert!(may_start(&s, t(0), 1, t(10)).is_ok());
        assert!(matches!(may_start(&s, t(0), 2, t(10)), Err(Verdict::Fail(_))));
        assert!(matches!(may_start(&s, t(0), 0, t(100)), Err(Verdict::Abandon(_))));
    }
}
