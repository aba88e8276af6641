//! The `BackgroundJob` custom resource: the queue itself.
//!
//! A `BackgroundJob` is one unit of work. Users create them (kubectl, the `bgjobs` CLI, the Rust library);
//! operator replicas claim, run and record them. Everything a user may write lives in `spec`; everything the
//! operator records lives in the `status` subresource, so the two never fight over the same fields.
//!
//! Validation is plain OpenAPI (enum, minimum, required, pattern) so that every apiserver from 1.20 on enforces it;
//! what only the operator can detect (an unknown `jobName`, args that do not fit the handler) ends in phase
//! `Failed` with a readable `lastError`.

mod args;
pub mod installed;
mod recurring;

pub use args::Args;
pub use recurring::*;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every bgjobs resource.
pub const GROUP: &str = "bgjobs.dev";
/// Default for `spec.timeoutSeconds`: two days, after which a job that never succeeded is `Abandoned`.
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 172_800;
/// Default for `spec.retry.backoffSeconds`: the first retry waits one minute.
pub const DEFAULT_BACKOFF_SECONDS: i64 = 60;
/// Default for `spec.retry.backoffFactor`: each further retry waits twice as long as the one before.
pub const DEFAULT_BACKOFF_FACTOR: f64 = 2.0;

/// What a user asks for: one background job.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "bgjobs.dev",
    version = "v1alpha1",
    kind = "BackgroundJob",
    plural = "backgroundjobs",
    singular = "backgroundjob",
    shortname = "bgj",
    category = "bgjobs",
    doc = "A background job: one unit of work in the bgjobs queue. See spec and status for every field.",
    namespaced,
    status = "Box<BackgroundJobStatus>",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Queue","type":"string","jsonPath":".spec.queue"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attempts"}"#,
    printcolumn = r#"{"name":"Worker","type":"string","jsonPath":".status.worker"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Job","type":"string","priority":1,"jsonPath":".spec.jobName"}"#,
    printcolumn = r#"{"name":"Next Attempt","type":"string","priority":1,"jsonPath":".status.nextAttemptTime"}"#,
    printcolumn = r#"{"name":"Last Error","type":"string","priority":1,"jsonPath":".status.lastError"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","priority":1,"jsonPath":".status.progress.percent"}"#,
    printcolumn = r#"{"name":"Progress Message","type":"string","priority":1,"jsonPath":".status.progress.message"}"#,
    printcolumn = r#"{"name":"Result","type":"string","priority":1,"jsonPath":".status.result"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackgroundJobSpec {
    /// The kind of work, e.g. `SendEmail`. It selects the in-process handler registered under this name, unless
    /// `http` or `template` says where the job runs instead. Built-in handlers: `noop`, `sleep`, `fail`.
    #[schemars(length(min = 1, max = 253))]
    pub job_name: String,

    /// Arguments handed to the handler: any JSON object. In-process handlers receive it deserialized into their
    /// argument type; the HTTP executor POSTs it as the request body; Pods get it in `BGJOBS_ARGS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub args: Option<Args>,

    /// Dispatch priority: higher priorities start first; within one priority, jobs start in the order they were
    /// enqueued. One of `Low`, `BelowNormal`, `Normal` (default), `AboveNormal`, `High`.
    #[serde(default)]
    pub priority: Priority,

    /// Name of the queue this job belongs to. Operator replicas can be restricted to some queues (`--queues`).
    #[serde(default = "default_queue")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub queue: String,

    /// Do not start the job before `creationTimestamp + delaySeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub delay_seconds: Option<i64>,

    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "RetryPolicy::is_default")]
    #[schemars(transform = applied_by_the_operator)]
    pub retry: RetryPolicy,

    /// Give up this many seconds after creation: a job that has not succeeded by then ends in phase `Abandoned`
    /// and is kept for inspection. Default 172800 (two days).
    #[serde(default = "default_timeout_seconds", skip_serializing_if = "is_default_timeout")]
    #[schemars(range(min = 1), transform = applied_by_the_operator)]
    pub timeout_seconds: i64,

    /// Cancel one attempt that runs longer than this; the attempt counts as failed and is retried per `retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub attempt_timeout_seconds: Option<i64>,

    /// An attempt that waits for its worker's report (its HTTP endpoint answered `202 Accepted`) and has heard
    /// nothing from it for this many seconds (no heartbeat, no outcome) is lost: it fails and is retried per `retry`,
    /// and a late report for it is refused. Unset: only `attemptTimeoutSeconds` and `timeoutSeconds` bound the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub heartbeat_timeout_seconds: Option<i64>,

    /// Run the job by POSTing `args` to an HTTP endpoint instead of an in-process handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTarget>,

    /// Run the job as a Pod made from this template instead of in-process. The Pod spec is validated by the
    /// apiserver when the Pod is created; a template it rejects fails the job with the apiserver's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub template: Option<Box<PodTemplateSpec>>,

    /// Delete the job this many seconds after it finished (Succeeded, Failed, Abandoned, Cancelled, Skipped). `0`
    /// deletes it as soon as it finishes (a job of a bulk call, labelled `bgjobs.dev/batch`, no sooner than 186 s
    /// after its creation). Unset: the operator's `--retention` for its namespace and outcome (by default succeeded
    /// and skipped jobs 5 minutes, the others 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Jobs in one namespace with the same key are "the same work": never two of them run at once, across all
    /// replicas (see `concurrencyPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub concurrency_key: Option<String>,

    /// What a job with a `concurrencyKey` does when another job with that key is waiting or running: `Wait`
    /// (default) waits its turn in queue order; `Skip` does not run and ends in phase `Skipped`, naming the job it
    /// deferred to (jobs asked to stop do not count). Ignored without a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,

    /// Set to `true` to cancel the job: a waiting job never starts, a running attempt is cancelled; the job ends
    /// in phase `Cancelled`. `kubectl patch bgj NAME --type merge -p '{"spec":{"cancel":true}}'` or
    /// `bgjobs cancel NAME`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// What a job does when another job with its `concurrencyKey` is waiting or running.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Wait for its turn; jobs with one key run one at a time, in queue order.
    #[default]
    Wait,
    /// Do not run if an earlier job with the key, not asked to stop, is waiting or running: end in phase `Skipped`.
    Skip,
}

/// Dispatch priority, highest first.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
pub enum Priority {
    /// Runs after every other priority.
    Low,
    /// Runs after `Normal`.
    BelowNormal,
    /// The default.
    #[default]
    Normal,
    /// Runs before `Normal`.
    AboveNormal,
    /// Runs before every other priority.
    High,
}

impl Priority {
    /// Every priority, highest first: the order the queue drains them in.
    pub const HIGHEST_FIRST: [Priority; 5] =
        [Priority::High, Priority::AboveNormal, Priority::Normal, Priority::BelowNormal, Priority::Low];
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::HIGHEST_FIRST
            .into_iter()
            .find(|p| p.to_string().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown priority {s:?}: expected Low, BelowNormal, Normal, AboveNormal or High"))
    }
}

/// How failed attempts are retried: attempt `n + 1` waits `backoffSeconds * backoffFactor^(n-1)` after attempt
/// `n` failed (with the defaults: 1 minute, 2, 4, ...), a year at most.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Total attempts before the job ends in phase `Failed`. Unset: retry until `timeoutSeconds` runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub max_attempts: Option<i32>,

    /// Wait before the first retry, in seconds. Default 60.
    #[serde(default = "default_backoff_seconds", skip_serializing_if = "is_default_backoff_seconds")]
    #[schemars(range(min = 0), transform = applied_by_the_operator)]
    pub backoff_seconds: i64,

    /// Factor by which each further wait grows. Default 2.
    #[serde(default = "default_backoff_factor", skip_serializing_if = "is_default_backoff_factor")]
    #[schemars(range(min = 1), transform = applied_by_the_operator)]
    pub backoff_factor: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: None,
            backoff_seconds: DEFAULT_BACKOFF_SECONDS,
            backoff_factor: DEFAULT_BACKOFF_FACTOR,
        }
    }
}

impl RetryPolicy {
    fn is_default(&self) -> bool {
        *self == RetryPolicy::default()
    }
}

/// Where the HTTP executor sends a job.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpTarget {
    /// URL the job's `args` are POSTed to as JSON. The job's UID is sent as `Idempotency-Key`. A 2xx answer is
    /// success, 4xx a permanent failure, 5xx, a timeout or a connection error a retryable one. `202 Accepted` means
    /// the work goes on elsewhere: the attempt stays `Running` until the worker reports its outcome with the token
    /// sent in `X-BGJobs-Report-Token` to the URL in `X-BGJobs-Report-Url` (when the operator serves reports).
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,

    /// Extra request headers. `Host`, `Content-Length`, `Transfer-Encoding`, `Connection`, `Upgrade`, `TE`,
    /// `Trailer`, `Proxy-*` and `X-BGJobs-*` are refused (the job fails, nothing is sent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,

    /// Give up one request after this many seconds (a retryable failure). Default: the attempt timeout, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<i64>,
}

/// What the operator records about a job. Written only through the status subresource.
// An atomic map: every writer replaces the whole status (`PUT .../status`), so the apiserver may as well track its
// writer as one field rather than one managed-fields entry per status field (see `ATOMIC`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-map-type" = ATOMIC))]
pub struct BackgroundJobStatus {
    /// Where the job stands. Unset until an operator replica first touches the job; read unset as `Waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Attempts claimed so far (the fencing epoch), including one that is running, attempts lost with a crashed
    /// replica, and those handed back before they started (`unstartedAttempts`).
    #[serde(default)]
    pub attempts: i32,

    /// Of `attempts`, those handed back before they started (their replica shut down, or lost the exclusive Lease,
    /// right after claiming, or could not tell in time whether its claim was recorded): nothing ran, so they do not
    /// count against `retry.maxAttempts`.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0))]
    pub unstarted_attempts: i32,

    /// The job is not started again before this time (delay or retry backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,

    /// Identity of the operator replica that holds (or last held) the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,

    /// Name of the `coordination.k8s.io/v1` Lease through which the worker holds the running attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,

    /// When the current (or last) attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// Why the last attempt failed, or why the job ended, in words a user can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// The job's place in enqueue order among jobs created in the same second: the apiserver revision at which
    /// the job was first seen unmodified. Set at the first claim and kept, so a retried job keeps its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueue_sequence: Option<i64>,

    /// Standard conditions: `Running` while an attempt runs, `Finished` once the job reached a final phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` of the spec this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The key that signs this job's report tokens (HTTP and Pod jobs): whoever may read the job may report for it,
    /// nobody else. Set at the first claim and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_key: Option<String>,

    /// The current attempt runs elsewhere and ends with its worker's report: its endpoint answered `202 Accepted`.
    /// A replica that takes the job over keeps waiting for that report instead of starting another attempt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_report: bool,

    /// When the current attempt's worker was last heard from (its `202 Accepted` counts): the start of its
    /// `heartbeatTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,

    /// The current (or last) attempt's progress, as its worker or handler last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// What the job produced: any JSON its worker reported with `complete` (or an in-process handler set), at most
    /// 32 KiB. Cleared when another attempt starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub result: Option<serde_json::Value>,
}

/// An attempt's progress as last reported.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Percent done, 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
    /// A short note on what the attempt is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// Where a job stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Queued: runnable now, or at `nextAttemptTime`.
    #[default]
    Waiting,
    /// An attempt is running on `worker`.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully: a permanent failure, or `retry.maxAttempts` used up.
    Failed,
    /// Gave up `timeoutSeconds` after creation without success.
    Abandoned,
    /// Cancelled by the user.
    Cancelled,
    /// Not run: another job with the same `concurrencyKey` was waiting or running (`concurrencyPolicy: Skip`).
    Skipped,
}

impl Phase {
    /// A final phase changes again only by `bgjobs retry` ([`Phase::can_retry`]).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Abandoned | Phase::Cancelled | Phase::Skipped)
    }

    /// Whether `bgjobs retry` may put a job in this phase back in the queue.
    pub fn can_retry(self) -> bool {
        matches!(self, Phase::Failed | Phase::Abandoned)
    }

    /// Every phase, in the order a job passes through them.
    pub const ALL: [Phase; 7] = [
        Phase::Waiting,
        Phase::Running,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Abandoned,
        Phase::Cancelled,
        Phase::Skipped,
    ];
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// How the record of a job cancelled because its deletion waits (see [`BackgroundJob::deletion_requested`]) begins.
pub const DELETION_REQUESTED: &str = "cancelled: its deletion was requested (something holds the object back)";

/// How the record of a job its user cancelled (`spec.cancel`) begins.
pub const CANCELLED_BY_USER: &str = "cancelled by the user";

impl BackgroundJob {
    /// The instant its delay and its timeout count from: the end of the second its `creationTimestamp` names. The
    /// apiserver keeps whole seconds, so the job was made within the second before: counted from the second's start,
    /// a delay could end up to a second early (the job run before it was due) and so could a timeout. `now` for a
    /// job the apiserver has not stored.
    pub fn counted_from(&self, now: jiff::Timestamp) -> jiff::Timestamp {
        let created = self.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created.map_or(now, |t| t.checked_add(jiff::SignedDuration::from_secs(1)).unwrap_or(t))
    }

    /// The job as a reader that only writes its status keeps it: without its arguments, which may be 1.5 MB. A
    /// status write of it keeps the stored spec.
    pub fn without_args(mut self) -> Self {
        self.spec.args = None;
        self
    }

    /// The job's phase, reading "never touched by an operator" as `Waiting`.
    pub fn phase(&self) -> Phase {
        self.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
    }

    /// Whether the job's deletion was asked for while something holds it back (a finalizer of someone else's, a
    /// foreground deletion waiting for its dependents): it is to run no more, as if cancelled.
    pub fn deletion_requested(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// Whether the job was asked to run no more, and how its record says so: its deletion waits (first: the object is
    /// going whatever its spec says, [`DELETION_REQUESTED`]), or its user cancelled it ([`CANCELLED_BY_USER`]).
    pub fn cancellation(&self) -> Option<&'static str> {
        if self.deletion_requested() {
            Some(DELETION_REQUESTED)
        } else if self.spec.cancel {
            Some(CANCELLED_BY_USER)
        } else {
            None
        }
    }

    /// Attempts started so far.
    pub fn attempts(&self) -> i32 {
        self.status.as_ref().map(|s| s.attempts).unwrap_or(0)
    }

    /// Of attempt number `attempt`, how many count against `retry.maxAttempts` (those that really started).
    pub fn attempts_spent(&self, attempt: i32) -> i32 {
        // Never below none: `unstartedAttempts` is not tied to `attempts` by the schema (a status edited by hand).
        attempt.saturating_sub(self.status.as_ref().map(|s| s.unstarted_attempts).unwrap_or(0)).max(0)
    }
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn default_queue() -> String {
    "default".to_string()
}
fn default_timeout_seconds() -> i64 {
    DEFAULT_TIMEOUT_SECONDS
}
fn default_backoff_seconds() -> i64 {
    DEFAULT_BACKOFF_SECONDS
}
fn default_backoff_factor() -> f64 {
    DEFAULT_BACKOFF_FACTOR
}
fn is_default_timeout(t: &i64) -> bool {
    *t == DEFAULT_TIMEOUT_SECONDS
}
fn is_default_backoff_seconds(s: &i64) -> bool {
    *s == DEFAULT_BACKOFF_SECONDS
}
fn is_default_backoff_factor(f: &f64) -> bool {
    *f == DEFAULT_BACKOFF_FACTOR
}

/// A stored spec (raw JSON) without the fields the operator defaults that hold their default value, and without an
/// emptied `retry`: jobs stored before the operator applied these defaults carry them explicitly, jobs stored since
/// do not, and the two mean the same. For comparing what two specs ask for (the admission webhook's UPDATE check).
/// What counts as a default is what the typed spec leaves out when it is written (its `skip_serializing_if`s).
pub fn without_operator_defaults(spec: &mut serde_json::Value) {
    let Some(spec) = spec.as_object_mut() else { return };
    if spec.get("timeoutSeconds").and_then(|t| t.as_i64()).is_some_and(|t| is_default_timeout(&t)) {
        spec.remove("timeoutSeconds");
    }
    // `retry` holds nothing but what `RetryPolicy` knows (the schema prunes the rest): written back through it,
    // its defaults drop out.
    let typed = spec.get("retry").and_then(|r| serde_json::from_value::<RetryPolicy>(r.clone()).ok());
    if let Some(written) = typed.and_then(|r| serde_json::to_value(r).ok()) {
        if written.as_object().is_some_and(|o| o.is_empty()) {
            spec.remove("retry");
        } else {
            spec.insert("retry".into(), written);
        }
    }
}

/// Whether two JSON values are the same once stored: the apiserver keeps a custom resource's numbers as int64 when
/// they are whole and in range and as float64 otherwise, and writes whole floats back without their decimal, so
/// `1.0` comes back as `1` and `1e3` as `1000`. For telling whether a stored job's `args` or `result` is the one a
/// client sent. An absent value and `null` are the same (the apiserver drops a `null` field).
pub fn same_once_stored(a: Option<&serde_json::Value>, b: Option<&serde_json::Value>) -> bool {
    use serde_json::Value;
    let null = Value::Null;
    match (a.unwrap_or(&null), b.unwrap_or(&null)) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_once_stored(Some(a), Some(b)))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_once_stored(Some(v), Some(w))))
        }
        (x, y) => x == y,
    }
}

/// The schema of a field whose default the operator applies when it reads a job, not the apiserver when it stores
/// one: no `default` in the CRD. Every field the apiserver defaults is stored in every job, twice (the value and
/// its managed-fields entry), and the apiserver holds every job in memory: `retry` and `timeoutSeconds` defaulted
/// on the server about doubled the apiserver's live heap per waiting job (about 6.7 KB with those defaults, 3.5 KB
/// without; docs/benchmarks.md). `priority` and `queue` cost little and stay visible in `kubectl get` columns, so
/// the apiserver still fills those.
fn applied_by_the_operator(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// `x-kubernetes-map-type` of an object the apiserver should track as one field. The apiserver records which
/// client wrote each field of an object (`metadata.managedFields`) and keeps that record, one nested map per field,
/// in memory for every object it holds. For an object only ever written whole, one entry says the same: a finished
/// job with its status tracked as one field holds 5.5 KB of the apiserver's heap instead of 6.6 KB
/// (docs/benchmarks.md). The cost: whoever applies such an object server-side owns all of it.
pub const ATOMIC: &str = "atomic";

/// Schema of a field that holds an arbitrary JSON object the apiserver must keep as it is, and that no one applies
/// in parts (`args`, a Pod `template`; the admission webhook refuses changing them after creation): tracked as one
/// field ([`ATOMIC`]), however many keys it has.
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "x-kubernetes-map-type": ATOMIC
    })
}

/// Schema of a field that holds any JSON value (object, array, string, number, boolean) kept as it is.
fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// The CustomResourceDefinitions bgjobs installs, in the order they should be applied.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![BackgroundJob::crd(), RecurringBackgroundJob::crd()]
}

/// The CRDs as one YAML stream (`bgjobs crd`).
pub fn crd_yaml() -> String {
    crd_files().into_iter().map(|(_, yaml)| yaml).collect::<Vec<_>>().join("---\n")
}

/// One `(file name, YAML)` per CRD, exactly as committed under `crds/` (`bgjobs crd --output-dir crds`).
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            (format!("{name}.yaml"), serde_yaml::to_string(crd).expect("a CRD always serializes"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    #[test]
    fn json_is_compared_as_the_apiserver_stores_it() {
        use serde_json::json;
        let same = |a: serde_json::Value, b: serde_json::Value| same_once_stored(Some(&a), Some(&b));
        assert!(same(json!({"scale": 1.0, "n": [1e3]}), json!({"scale": 1, "n": [1000]})));
        assert!(same(json!({"a": {"b": 0.5}}), json!({"a": {"b": 0.5}})));
        assert!(!same(json!({"scale": 1.5}), json!({"scale": 1})));
        assert!(!same(json!({"day": 1}), json!({"day": 2})));
        assert!(!same(json!({"a": 1}), json!({"a": 1, "b": 2})));
        assert!(!same(json!("1"), json!(1)));
        assert!(same_once_stored(None, Some(&serde_json::Value::Null)));
        assert!(!same_once_stored(None, Some(&json!({}))));
    }
    use kube::CustomResourceExt;

    fn repo_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    /// The committed CRDs drift from the Rust types the moment a field changes without `make crds`; checked here,
    /// with no apiserver, so `make unit` catches it.
    #[test]
    fn crds_directory_matches_the_generated_crd() {
        let files = crd_files();
        assert_eq!(files.len(), 2, "BackgroundJob and RecurringBackgroundJob");
        for (file, generated) in files {
            let path = repo_path(&format!("crds/{file}"));
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("crds/ is out of date: run `make crds` (read {}: {e})", path.display()));
            assert!(
                on_disk == generated,
                "crds/{file} is out of date: run `make crds` ({})",
                first_difference(&on_disk, &generated)
            );
        }
        let on_disk = std::fs::read_dir(repo_path("crds")).unwrap().count();
        assert_eq!(on_disk, 2, "crds/ holds exactly the generated files: run `make crds`");
    }

    /// A job that leaves `retry` and `timeoutSeconds` at their defaults stores neither (the operator applies them
    /// when it reads the job), and reads back with the same defaults; one that sets them keeps what it set.
    #[test]
    fn defaults_the_operator_applies_are_neither_stored_nor_lost() {
        let spec: BackgroundJobSpec = serde_json::from_value(serde_json::json!({"jobName": "x"})).unwrap();
        let stored = serde_json::to_value(&spec).unwrap();
        assert_eq!(stored, serde_json::json!({"jobName": "x", "priority": "Normal", "queue": "default"}));
        let read: BackgroundJobSpec = serde_json::from_value(stored).unwrap();
        assert_eq!(read.timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
        assert_eq!(read.retry, RetryPolicy::default());

        let set = serde_json::json!({"jobName": "x", "priority": "Normal", "queue": "default",
            "timeoutSeconds": 30, "retry": {"maxAttempts": 2, "backoffFactor": 3.0}});
        let spec: BackgroundJobSpec = serde_json::from_value(set.clone()).unwrap();
        assert_eq!(spec.retry.backoff_seconds, DEFAULT_BACKOFF_SECONDS);
        assert_eq!(serde_json::to_value(&spec).unwrap(), set);
    }

    /// Both CRDs (a job and a schedule's job template) leave those defaults to the operator and keep the cheap ones
    /// `kubectl get` shows as columns.
    #[test]
    fn the_crd_defaults_priority_and_queue_but_not_retry_or_timeout() {
        let job = serde_json::to_value(BackgroundJob::crd()).unwrap();
        let recurring = serde_json::to_value(RecurringBackgroundJob::crd()).unwrap();
        let spec_of = |crd: &serde_json::Value| {
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"].clone()
        };
        let template = spec_of(&recurring)["jobTemplate"]["properties"]["spec"]["properties"].clone();
        for spec in [spec_of(&job), template] {
            the_cheap_defaults_only(&spec);
        }
    }

    /// What is only ever written whole is tracked whole: the status (replaced by every write) and the free-form
    /// objects (`args`, `template`) of a job and of a schedule's job template. The spec itself stays granular: a
    /// client that applies a job server-side owns only the fields it set, and `bgjobs cancel` can add `cancel`.
    #[test]
    fn status_args_and_template_are_atomic_maps_and_the_spec_is_not() {
        let job = serde_json::to_value(BackgroundJob::crd()).unwrap();
        let recurring = serde_json::to_value(RecurringBackgroundJob::crd()).unwrap();
        let root = |crd: &serde_json::Value| crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        let template_spec =
            root(&recurring)["properties"]["spec"]["properties"]["jobTemplate"]["properties"]["spec"].clone();
        assert_eq!(root(&job)["properties"]["status"]["x-kubernetes-map-type"], ATOMIC);
        for spec in [root(&job)["properties"]["spec"].clone(), template_spec] {
            // `bgjobs retry` merge-patches `retry.maxAttempts`, `bgjobs cancel` adds `cancel`: per field.
            for granular in [&spec, &spec["properties"]["retry"], &spec["properties"]["http"]] {
                assert!(granular["properties"].is_object(), "an object schema: {granular}");
                assert!(granular.get("x-kubernetes-map-type").is_none(), "{granular}");
            }
            for field in ["args", "template"] {
                assert_eq!(spec["properties"][field]["x-kubernetes-map-type"], ATOMIC, "{field}");
            }
        }
    }

    fn the_cheap_defaults_only(spec: &serde_json::Value) {
        assert_eq!(spec["priority"]["default"], "Normal");
        assert_eq!(spec["queue"]["default"], "default");
        for field in [
            &spec["retry"],
            &spec["retry"]["properties"]["backoffSeconds"],
            &spec["retry"]["properties"]["backoffFactor"],
            &spec["timeoutSeconds"],
        ] {
            assert!(field.is_object() && field.get("default").is_none(), "{field}");
        }
    }

    /// Where two texts first differ, for a readable failure message.
    fn first_difference(file: &str, generated: &str) -> String {
        file.lines()
            .zip(generated.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {}: file has {a:?}, generated has {b:?}", i + 1))
            .unwrap_or_else(|| {
                format!("file has {} lines, generated has {}", file.lines().count(), generated.lines().count())
            })
    }
}
