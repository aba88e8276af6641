//! [`Reporter`]: what an attempt's executor and handler know about reporting (the token and URL a worker elsewhere
//! needs, progress and a result for in-process handlers), carried in [`crate::executor::JobContext`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, ResourceExt};

use super::decide::{self, MAX_MESSAGE};
use super::token::{self, Claims};
use crate::api::{BackgroundJob, Progress};
use crate::executor::JobError;
use crate::retry::AttemptResult;
use crate::status::{self, Fence, Fenced};
use crate::worker::Worker;

/// An attempt's reporting handle. Detached (the default, e.g. in unit tests) it has no token or URL, keeps a result
/// and ignores progress.
#[derive(Clone, Default)]
pub struct Reporter {
    attempt: Option<Arc<Attempt>>,
    result: Arc<Mutex<Option<serde_json::Value>>>,
}

struct Attempt {
    worker: Arc<Worker>,
    jobs: Api<BackgroundJob>,
    /// The job as this attempt last wrote it (where fenced writes start from).
    job: Mutex<BackgroundJob>,
    fence: Fence,
    token: Option<String>,
    awaiting: AtomicBool,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("url", &self.url())
            .field("token", &self.token().map(|_| "<redacted>"))
            .finish()
    }
}

impl Reporter {
    /// The handle of the attempt `fence` holds on `job` (as claimed), run by `worker`.
    pub fn for_attempt(worker: Arc<Worker>, jobs: Api<BackgroundJob>, job: &BackgroundJob, fence: &Fence) -> Self {
        let key = job.status.as_ref().and_then(|s| s.report_key.clone());
        let claims = Claims {
            namespace: job.namespace().unwrap_or_default(),
            name: job.name_any(),
            uid: fence.uid.clone(),
            attempt: fence.attempt,
        };
        let token = key.and_then(|k| token::issue(&claims, &k));
        let attempt = Attempt {
            worker,
            jobs,
            // Written from, never run from.
            job: Mutex::new(job.clone().without_args()),
            fence: fence.clone(),
            token,
            awaiting: AtomicBool::new(false),
        };
        Reporter { attempt: Some(Arc::new(attempt)), result: Default::default() }
    }

    /// The token a worker elsewhere reports this attempt with (HTTP and Pod jobs).
    pub fn token(&self) -> Option<&str> {
        self.attempt.as_ref()?.token.as_deref()
    }

    /// Where reports go (`--report-url`), if this replica hands work out for reporting.
    pub fn url(&self) -> Option<&str> {
        self.attempt.as_ref()?.worker.report_url.as_deref()
    }

    /// Record `result` as the job's `status.result` if the attempt succeeds. At most
    /// [`decide::MAX_RESULT_BYTES`] of JSON: a larger one is refused (a permanent error: the same output would be
    /// too large again).
    pub fn set_result(&self, result: serde_json::Value) -> Result<(), JobError> {
        decide::check(&decide::Report::Complete { result: Some(result.clone()) })
            .map_err(|r| JobError::Permanent(r.message))?;
        *self.result.lock().unwrap() = Some(result);
        Ok(())
    }

    /// Record progress in `status.progress` (percent 0 to 100, a short message). A write rewrites the whole job in
    /// etcd, so changed progress is written at most once a second and the same progress again at most every 30 s
    /// ([`decide::written_after`], the rule reports from workers follow too); a call sooner returns `Ok` unwritten. An
    /// error means the write did not land (the attempt may have lost its claim).
    pub async fn progress(&self, percent: Option<i32>, message: Option<&str>) -> Result<(), JobError> {
        if let Some(p) = percent.filter(|p| !(0..=100).contains(p)) {
            return Err(JobError::Permanent(format!("progress must be between 0 and 100, not {p}")));
        }
        let Some(a) = &self.attempt else { return Ok(()) };
        let now = a.worker.clock.now();
        let progress = Progress {
            percent,
            message: message.map(|m| m.chars().take(MAX_MESSAGE).collect()),
            time: Some(Time(now)),
        };
        let latest = a.job.lock().unwrap().clone();
        if decide::written_after(&latest, Some(&progress), now).is_err() {
            return Ok(());
        }
        match status::write_fenced(&a.jobs, &latest, &a.fence, |s| s.progress = Some(progress.clone())).await {
            Ok(Fenced::Written(j)) => {
                *a.job.lock().unwrap() = j.without_args();
                Ok(())
            }
            Ok(Fenced::Stale) => Err(JobError::Retryable("the attempt is no longer current".into())),
            Err(e) => Err(JobError::Retryable(format!("could not record progress: {e}"))),
        }
    }

    /// The result set by the handler, taken (for the outcome write).
    pub(crate) fn take_result(&self) -> Option<serde_json::Value> {
        self.result.lock().unwrap().take()
    }

    /// Whether this replica can hand the attempt out for reporting: it has a token and a report URL.
    pub(crate) fn hands_out(&self) -> bool {
        self.token().is_some() && self.url().is_some()
    }

    /// Whether the attempt is known to wait for a report (it then outlives this replica's interest in it, like a
    /// Pod: a replica that takes the job over adopts it).
    pub(crate) fn awaiting(&self) -> bool {
        self.attempt.as_ref().is_some_and(|a| a.awaiting.load(Ordering::SeqCst))
    }

    /// Wait for the attempt's report ([`super::wait`]). `accepted`: the endpoint just answered 202 (else the attempt
    /// was adopted already waiting). Detached, an accepted attempt succeeds (nothing could ever report for it).
    pub(crate) async fn wait_for_report(&self, accepted: bool) -> AttemptResult {
        let Some(a) = &self.attempt else { return AttemptResult::Succeeded };
        let latest = a.job.lock().unwrap().clone();
        super::wait::until_reported(&a.worker, &a.jobs, latest, &a.fence, accepted, || {
            a.awaiting.store(true, Ordering::SeqCst)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handlers_result_is_kept_for_the_outcome_write_and_one_over_the_cap_is_refused() {
        let detached = Reporter::default();
        let big = serde_json::json!("x".repeat(decide::MAX_RESULT_BYTES));
        match detached.set_result(big) {
            Err(JobError::Permanent(why)) => assert!(why.contains("at most 32768"), "{why}"),
            other => panic!("{other:?}"),
        }
        detached.set_result(serde_json::json!({"rows": 3})).unwrap();
        assert_eq!(detached.clone().take_result(), Some(serde_json::json!({"rows": 3})), "clones share the result");
        assert_eq!(detached.take_result(), None, "taken once");
        assert!(!detached.hands_out() && detached.token().is_none(), "a detached handle hands nothing out");
    }
}
