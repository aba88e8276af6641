//! The `RecurringBackgroundJob` custom resource: a cron schedule that enqueues BackgroundJobs.
//!
//! Every tick creates exactly one BackgroundJob, named after the definition and the tick's Unix time. The tick is
//! claimed in the status (`lastScheduleTime`, `pendingJob`) before its job is created, so it is never handled twice. The jobs are owned by the definition (deleting it
//! deletes them) and labelled `bgjobs.dev/recurring=<name>`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::BackgroundJobSpec;

/// A schedule that enqueues BackgroundJobs.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "bgjobs.dev",
    version = "v1alpha1",
    kind = "RecurringBackgroundJob",
    plural = "recurringbackgroundjobs",
    singular = "recurringbackgroundjob",
    shortname = "rbgj",
    category = "bgjobs",
    doc = "A cron schedule that enqueues one BackgroundJob per tick. See spec and status for every field.",
    namespaced,
    status = "RecurringBackgroundJobStatus",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Last","type":"string","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Time Zone","type":"string","priority":1,"jsonPath":".spec.timeZone"}"#,
    printcolumn = r#"{"name":"Last Job","type":"string","priority":1,"jsonPath":".status.lastJob"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecurringBackgroundJobSpec {
    /// Cron schedule: 5 fields (`minute hour day-of-month month day-of-week`, e.g. `*/15 * * * *`), 6 fields with a
    /// leading seconds field (`*/10 * * * * *`), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^(@[a-z]+|\S+(\s+\S+){4,5})\s*$"))]
    pub schedule: String,

    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`. Default: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,

    /// The BackgroundJob each tick creates.
    pub job_template: JobTemplate,

    /// What a tick does while the previous job is unfinished: `Allow` (default) creates another; `Forbid` skips the
    /// tick; `Replace` cancels the unfinished job and creates the new one.
    #[serde(default)]
    pub concurrency_policy: RecurringConcurrencyPolicy,

    /// How late a missed tick (operator down, suspended) may still start, in whole seconds: past it, the tick is
    /// skipped. 0: only on time (within the tick's second). Unset: no limit. However many ticks were missed, at most
    /// one catch-up job is created: for the latest of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,

    /// Spread the jobs of many definitions with the same schedule: each tick of this definition is due a fixed
    /// offset after it, between 0 and this many seconds, the same for every tick and every replica (derived from the
    /// definition's namespace and name). The job's name and `bgjobs.dev/scheduled-time` still name the tick itself;
    /// `startingDeadlineSeconds` counts from the offset. Unset or 0: due on the tick, as a CronJob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub jitter_seconds: Option<u32>,

    /// `true` stops creating jobs; jobs already created are not affected.
    #[serde(default)]
    pub suspend: bool,

    /// Succeeded jobs to keep (older ones are deleted). Default 3.
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub successful_jobs_history_limit: i32,

    /// Jobs that ended otherwise (Failed, Abandoned, Cancelled, Skipped) to keep. Default 1.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub failed_jobs_history_limit: i32,
}

/// The BackgroundJob each tick creates.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplate {
    /// Labels and annotations for the created jobs.
    #[serde(default)]
    pub metadata: TemplateMetadata,
    /// The created jobs' spec.
    pub spec: BackgroundJobSpec,
}

/// Labels and annotations copied onto created jobs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TemplateMetadata {
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What a tick does while the previous job is unfinished.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RecurringConcurrencyPolicy {
    /// Create the new job anyway.
    #[default]
    Allow,
    /// Skip the tick.
    Forbid,
    /// Cancel the unfinished job, then create the new one.
    Replace,
}

/// What the operator records about a recurring job.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecurringBackgroundJobStatus {
    /// The latest tick claimed: recorded before its job is created (or the tick is skipped by policy or deadline),
    /// so that no tick is ever handled twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The `lastScheduleTime` the latest claim replaced. No tick up to it is run again, even when an edit takes back
    /// a claim made ahead of its tick, and jobs of later ticks are kept from deletion like the pending one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_schedule_time: Option<Time>,
    /// The next tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Name of the job of the latest tick that was not skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<String>,
    /// The job of the latest tick while its creation is not confirmed: set with `lastScheduleTime` when the tick is
    /// claimed, cleared once the job is known to exist. While it is set, the operator creates that job (AlreadyExists
    /// if it was) and claims no further tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_job: Option<String>,
    /// Unfinished jobs created by this definition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// `active.len()`, for the printer column.
    #[serde(default)]
    pub active_count: i32,
    /// `Valid`: False with the reason when the schedule or time zone cannot be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl RecurringBackgroundJob {
    /// Whether the definition's deletion was asked for while something holds it back (a finalizer of another
    /// controller's): it makes no more jobs, as if suspended.
    pub fn deletion_requested(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
}

fn default_successful_history() -> i32 {
    3
}
fn default_failed_history() -> i32 {
    1
}
