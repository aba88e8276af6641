//! Enqueueing and inspecting jobs from Rust (what the CLI uses, and what applications can use).
//!
//! ```no_run
//! # async fn f(client: kube::Client) -> bgjobs::Result<()> {
//! use bgjobs::api::{BackgroundJob, BackgroundJobSpec};
//! let api: kube::Api<BackgroundJob> = kube::Api::default_namespaced(client);
//! let spec = bgjobs::jobs::spec("SendEmail", serde_json::json!({"to": "a@example.com"}));
//! let created = bgjobs::jobs::enqueue(&api, spec).await?;
//! # Ok(()) }
//! ```

use jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, PostParams};
use serde::Serialize;

use crate::api::{BackgroundJob, BackgroundJobSpec, Phase};
use crate::error::Result;

/// A spec with every default, for `job_name` and `args`.
pub fn spec(job_name: &str, args: serde_json::Value) -> BackgroundJobSpec {
    let mut s: BackgroundJobSpec =
        serde_json::from_value(serde_json::json!({ "jobName": job_name })).expect("a minimal spec always parses");
    s.args = Some(args);
    s
}

/// Create one job with a generated name (`<jobname>-xxxxx`). Jobs created one after another start in that order.
pub async fn enqueue(api: &Api<BackgroundJob>, spec: BackgroundJobSpec) -> Result<BackgroundJob> {
    let job = BackgroundJob {
        metadata: ObjectMeta { generate_name: Some(format!("{}-", name_prefix(&spec.job_name))), ..Default::default() },
        spec,
        status: None,
    };
    Ok(api.create(&PostParams::default(), &job).await?)
}

/// A DNS-label-safe name prefix derived from a job name (`SendEmail` → `sendemail`).
pub fn name_prefix(job_name: &str) -> String {
    let mut p: String =
        job_name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    p.truncate(40);
    let p = p.trim_matches('-').to_string();
    if p.is_empty() { "job".into() } else { p }
}

/// All jobs, listed in pages.
pub async fn list(api: &Api<BackgroundJob>) -> Result<Vec<BackgroundJob>> {
    let mut out = Vec::new();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list(&lp).await?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// Job counts by state, like a job dashboard's monitoring API.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Waiting and runnable now.
    pub waiting: usize,
    /// Waiting for a delay or a retry time.
    pub scheduled: usize,
    /// An attempt is running.
    pub running: usize,
    /// Finished successfully.
    pub succeeded: usize,
    /// Finished unsuccessfully.
    pub failed: usize,
    /// Gave up after the timeout.
    pub abandoned: usize,
    /// Cancelled.
    pub cancelled: usize,
    /// Not run: deferred to another job with the same concurrency key.
    pub skipped: usize,
}

/// Count `jobs` by state at `now`.
pub fn counts<'a>(jobs: impl IntoIterator<Item = &'a BackgroundJob>, now: Timestamp) -> Counts {
    let mut c = Counts::default();
    for j in jobs {
        match j.phase() {
            Phase::Waiting if crate::ordering::not_before(j).is_some_and(|t| t > now) => c.scheduled += 1,
            Phase::Waiting => c.waiting += 1,
            Phase::Running => c.running += 1,
            Phase::Succeeded => c.succeeded += 1,
            Phase::Failed => c.failed += 1,
            Phase::Abandoned => c.abandoned += 1,
            Phase::Cancelled => c.cancelled += 1,
            Phase::Skipped => c.skipped += 1,
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_prefixes_are_dns_safe() {
        assert_eq!(name_prefix("SendEmail"), "sendemail");
        assert_eq!(name_prefix("Billing.Export_v2"), "billing-export-v2");
        assert_eq!(name_prefix("__"), "job");
    }

    #[test]
    fn delayed_waiting_jobs_count_as_scheduled() {
        let mut now_job = BackgroundJob::new("a", spec("noop", serde_json::json!({})));
        now_job.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(100).unwrap()));
        let mut later = now_job.clone();
        later.spec.delay_seconds = Some(60);
        let c = counts([&now_job, &later], Timestamp::from_second(110).unwrap());
        assert_eq!((c.waiting, c.scheduled), (1, 1));
    }
}
