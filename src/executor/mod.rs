//! Where a claimed attempt runs: an in-process handler ([`registry`]), an HTTP endpoint ([`http`]), or a Pod.
//!
//! Executors only do the work and say how it went ([`AttemptResult`]); claiming, renewing and recording the outcome
//! belong to the attempt runner, so every executor gets the same fencing.

pub mod builtin;
pub mod http;
pub mod pod;
pub mod registry;

pub use registry::{JobContext, JobError, Registry};

use crate::api::BackgroundJob;
use crate::retry::AttemptResult;

/// The in-process handler `job` needs, if it runs in process: a Pod or HTTP job runs on any replica. The executor
/// is chosen as [`execute`] chooses it.
pub fn handler_needed(job: &BackgroundJob) -> Option<&str> {
    (job.spec.template.is_none() && job.spec.http.is_none()).then_some(job.spec.job_name.as_str())
}

/// Run one attempt of `job` with the executor its spec selects, starting at the cluster's time `now`
/// ([`crate::clock`]). The HTTP and Pod executors check their policy ([`crate::policy`]) before they send or create
/// anything. What becomes of a Pod (one that does not stop once deleted, one that cannot start) is told to `watchers`.
pub async fn execute(
    job: &BackgroundJob,
    ctx: JobContext,
    worker: &crate::worker::Worker,
    now: jiff::Timestamp,
    watchers: &pod::Watchers<'_>,
) -> AttemptResult {
    let (registry, http, pods, client) = (&worker.registry, &worker.http, &worker.pods, &worker.client);
    let args = job.spec.args.clone().unwrap_or_default();
    if job.spec.template.is_some() {
        return pod::run(client, pods, job, &ctx, now, watchers).await;
    }
    if let Some(target) = &job.spec.http {
        // An attempt adopted while it waited for its worker's report is not sent again: the worker has it.
        if crate::report::awaits_report(job) && job.attempts() == ctx.attempt {
            return ctx.report.wait_for_report(false).await;
        }
        return http.post(target, &ctx, &args, job.spec.attempt_timeout_seconds).await;
    }
    registry.run(ctx, args).await
}
