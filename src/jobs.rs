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
use kube::api::{ObjectMeta, PostParams};
use serde::Serialize;

use crate::api::{BackgroundJob, BackgroundJobSpec, Phase};
use crate::error::Result;

/// Every change to the jobs of `api`, as bgjobs' replicas watch them, for tools that watch many jobs too (a
/// dashboard, a recorder): kube's `watcher` events, the list read from the apiserver's watch cache item by item. A
/// job the operator's types cannot hold comes as its stand-in, marked with [`crate::wire::UNREADABLE_ANNOTATION`].
/// Jobs come without their managed fields (`metadata.managedFields`), which are never decoded.
pub fn watch(
    api: Api<BackgroundJob>,
) -> impl futures::Stream<Item = kube::runtime::watcher::Result<kube::runtime::watcher::Event<BackgroundJob>>> + Send {
    crate::list_watch::list_watch(api, None, |_| {})
}

/// Start a recurring definition's job now, outside its schedule (`bgjobs recurring trigger`).
pub use crate::recurring::trigger as trigger_recurring;

/// A client for the calls of this module, as the CLI's: from the kubeconfig or the Pod's account, resending no write
/// on its own (see [`enqueue`]).
pub use crate::client::connect;

/// A spec with every default, for `job_name` and `args`.
pub fn spec(job_name: &str, args: serde_json::Value) -> BackgroundJobSpec {
    let mut s: BackgroundJobSpec =
        serde_json::from_value(serde_json::json!({ "jobName": job_name })).expect("a minimal spec always parses");
    s.args = Some(args.into());
    s
}

/// Create one job with a generated name (`<jobname>-xxxxx`). Jobs created one after another start in that order.
///
/// The create is sent again only after a 429 (which made nothing): a create whose answer was lost may have landed, and
/// under a generated name a second send makes a second job. So `api`'s client must not resend creates either: kube's
/// [`kube::Client::try_default`] retries 503 and 504 answers (`Config::default_retry`), and a 504 from a proxy or
/// the apiserver's own timeout may follow a create that landed. Use [`connect`] (as the CLI does), or a `Config`
/// with `default_retry = false`; or create through [`enqueue_batch`], whose named creates a resend finds.
pub async fn enqueue(api: &Api<BackgroundJob>, spec: BackgroundJobSpec) -> Result<BackgroundJob> {
    can_run(&spec).map_err(crate::Error::Invalid)?;
    let job = BackgroundJob {
        metadata: ObjectMeta { generate_name: Some(format!("{}-", name_prefix(&spec.job_name))), ..Default::default() },
        spec,
        status: None,
    };
    // Sent again only when it certainly made nothing: the apiserver's flow control turned it away (429). Any other
    // failure may follow a create that landed, and a generated name would make a second job.
    let mut wait = std::time::Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match api.create(&PostParams::default(), &job).await {
            Err(e) if crate::error::api_code(&e) == Some(429) && attempt < CREATE_ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "create throttled; trying again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
                attempt += 1;
            }
            answer => return answer.map_err(crate::error::from_create),
        }
    }
}

/// Refuse a spec that could never run, which the schema cannot tell: a delay that ends at or after its timeout
/// (both counted from creation), so the job would be abandoned before it could start.
pub fn can_run(spec: &BackgroundJobSpec) -> std::result::Result<(), String> {
    let delay = spec.delay_seconds.unwrap_or(0);
    if delay >= spec.timeout_seconds {
        return Err(format!(
            "a delay of {delay}s ends at or after the job's timeout of {}s (both count from its creation): it would \
             be abandoned before it could start; raise timeoutSeconds above the delay",
            spec.timeout_seconds
        ));
    }
    Ok(())
}

/// Default parallelism of [`enqueue_many`] and `bgjobs enqueue -c N`: enough to keep the apiserver busy (its write
/// rate is reached at 16 concurrent clients on the local control plane), few enough not to trip its flow control.
pub const DEFAULT_PARALLEL: usize = 16;

/// Label naming the bulk call a job was created by (`kubectl get bgj -l bgjobs.dev/batch=ID`).
pub const BATCH_LABEL: &str = "bgjobs.dev/batch";
/// Annotation: the job's index in its bulk call.
pub const BATCH_INDEX_ANNOTATION: &str = "bgjobs.dev/batch-index";

/// Attempts per job of a bulk call before a transient error (no answer, 429, 5xx) ends the call.
const CREATE_ATTEMPTS: u32 = 6;
/// A create without an answer for this long is given up and tried again (it may have landed: the retry finds it).
const CREATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long after the first create of a bulk job's name another may be sent (a retry after a lost answer, a timeout,
/// a 5xx); after that, the call fails instead. Such a create lands within [`crate::client::CREATE_LANDS_WITHIN`] of
/// its send, and the operator keeps a finished bulk job until it cannot land any more
/// ([`crate::retention::kept_at_least_until`]): deleted sooner, a create that landed, ran and was deleted would be
/// made again by the retry (a 201 instead of the 409 that finds it), and the job would run twice.
pub const CREATES_SENT_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Create many jobs, `parallel` at a time, under a new batch id; `progress` is told how many are created so far.
/// Returns the jobs in the order of `specs`. See [`enqueue_batch`] for the order they are dispatched in.
pub async fn enqueue_many(
    api: &Api<BackgroundJob>,
    specs: Vec<BackgroundJobSpec>,
    parallel: usize,
    progress: impl Fn(usize),
) -> Result<Vec<BackgroundJob>> {
    enqueue_batch(api, &new_batch_id(), specs, parallel, progress).await
}

/// A fresh batch id: 8 lowercase letters and digits, random per call.
pub fn new_batch_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let mut n = h.finish();
    (0..8)
        .map(|_| {
            let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(n % 36) as usize] as char;
            n /= 36;
            c
        })
        .collect()
}

/// The name of job `index` of batch `batch` among `total`: `<jobname>-<batch>-<index>` (a DNS label), the index
/// zero-padded so that name order is index order.
pub fn batch_name(job_name: &str, batch: &str, index: usize, total: usize) -> String {
    let width = total.saturating_sub(1).max(1).to_string().len();
    let mut prefix = name_prefix(job_name);
    // Room for a 16-character batch and a 13-digit index within a DNS label (63).
    prefix.truncate(32);
    format!("{}-{batch}-{index:0width$}", prefix.trim_end_matches('-'))
}

/// Create the jobs of batch `batch`, `parallel` at a time (at least 1). Idempotent while the jobs exist: job `i` is
/// named after the batch and `i` ([`batch_name`]), so a create retried after a lost answer, or the whole call
/// repeated with the same batch after it stopped part-way, finds the job it made before (409, same batch label and
/// index) instead of making a second one: the operator keeps a finished job of a batch at least
/// [`crate::retention::kept_at_least_until`], whatever its retention, so that a retried create finds it. A job finished
/// and deleted by retention since is created again by a repeated call.
///
/// Dispatch order: jobs are dispatched in enqueue order, the order the apiserver created them. With `parallel = 1`
/// that is the order of `specs`. With more, creates overlap and the order among the jobs of the call is the order
/// their creates landed: close to the order of `specs`, but a create that is slow or retried is overtaken by any
/// number of later ones, so nothing is promised. Jobs of one call still go before jobs enqueued after the call
/// returned (and after those enqueued before it started).
///
/// The first permanent error (a ResourceQuota refusal, invalid spec, RBAC) or a transient one that outlasts its
/// retries stops the call: no new create starts, those in flight finish, and [`crate::Error::Bulk`] says how many
/// were created.
pub async fn enqueue_batch(
    api: &Api<BackgroundJob>,
    batch: &str,
    specs: Vec<BackgroundJobSpec>,
    parallel: usize,
    progress: impl Fn(usize),
) -> Result<Vec<BackgroundJob>> {
    use futures::StreamExt;
    if batch.is_empty() || batch.len() > 16 || !batch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(crate::Error::Invalid(format!("batch id {batch:?}: 1 to 16 lowercase letters and digits")));
    }
    for spec in &specs {
        can_run(spec).map_err(crate::Error::Invalid)?;
    }
    let total = specs.len();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stop = &stop;
    let mut created: Vec<Option<BackgroundJob>> = vec![None; total];
    let mut first_error = None;
    let mut results = futures::stream::iter(specs.into_iter().enumerate())
        .map(|(i, spec)| async move {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return (i, None);
            }
            let name = batch_name(&spec.job_name, batch, i, total);
            let mut job = BackgroundJob::new(&name, spec);
            job.metadata.labels = Some([(BATCH_LABEL.to_string(), batch.to_string())].into());
            job.metadata.annotations = Some([(BATCH_INDEX_ANNOTATION.to_string(), i.to_string())].into());
            let r = create_once(api, &job, batch, i).await;
            if r.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (i, Some(r))
        })
        .buffer_unordered(parallel.max(1));
    let mut done = 0;
    while let Some((i, r)) = results.next().await {
        match r {
            Some(Ok(job)) => {
                created[i] = Some(job);
                done += 1;
                progress(done);
            }
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    match first_error {
        None => Ok(created.into_iter().flatten().collect()),
        Some(e) => Err(crate::Error::Bulk { created: done, total, batch: batch.to_string(), source: Box::new(e) }),
    }
}

/// Create `job` (index `index` of `batch`), retrying transient errors; a 409 is success if the job found under the
/// name is this one, made by an earlier try.
async fn create_once(
    api: &Api<BackgroundJob>,
    job: &BackgroundJob,
    batch: &str,
    index: usize,
) -> Result<BackgroundJob> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let mut wait = std::time::Duration::from_millis(100);
    let mut attempt = 1;
    let first_sent = (tokio::time::Instant::now(), std::time::SystemTime::now());
    // The larger of the monotonic clock and the wall clock: only the wall clock counts the time a suspended machine
    // was away. (A request caught mid-connect by a suspend may still send its bytes after the resume, before its
    // expired timeout is noticed: that is not bounded.)
    let since_first = || first_sent.0.elapsed().max(first_sent.1.elapsed().unwrap_or_default());
    // Less than this left of the window: no attempt is worth starting.
    const LEAST_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(1);
    loop {
        // A create still unanswered at the end of the window is given up: its bytes, if sent, were sent before.
        let left = CREATES_SENT_WITHIN.saturating_sub(since_first());
        let answer = tokio::time::timeout(CREATE_TIMEOUT.min(left), api.create(&PostParams::default(), job)).await;
        let e = match answer {
            Ok(Ok(created)) => return Ok(created),
            Ok(Err(e)) if crate::error::api_code(&e) == Some(409) => {
                // Read as far as it can be: a job of the batch that cannot be read is still known by its labels.
                let Some(existing) = crate::unreadable::get_opt(api, &name).await? else {
                    return Err(crate::Error::Invalid(format!("job {name} existed, and was deleted meanwhile")));
                };
                return match (is_batch_job(&existing, batch, index), same_work(&existing, job)) {
                    (true, true) => Ok(existing),
                    (true, false) => Err(crate::Error::Invalid(format!(
                        "job {name} of batch {batch} exists already with other work (its jobName or args differ): \
                         the batch id was used before; choose a new one"
                    ))),
                    (false, _) => {
                        Err(crate::Error::Invalid(format!("a job named {name} exists already, not of this batch")))
                    }
                };
            }
            Ok(Err(e)) => crate::error::from_create(e),
            Err(_) => crate::Error::Timeout(CREATE_TIMEOUT.min(left)),
        };
        let window_ends = |wait| since_first() + wait + LEAST_ATTEMPT >= CREATES_SENT_WITHIN;
        if attempt >= CREATE_ATTEMPTS || !crate::error::is_transient(&e) || window_ends(wait) {
            return Err(e);
        }
        tracing::debug!(job = %name, error = %e, attempt, "create failed; trying again");
        tokio::time::sleep(wait).await;
        // The sleep may have overrun (a suspended machine).
        if window_ends(std::time::Duration::ZERO) {
            return Err(e);
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(5));
        attempt += 1;
    }
}

/// Whether `job` is job `index` of `batch`.
pub fn is_batch_job(job: &BackgroundJob, batch: &str, index: usize) -> bool {
    let label = job.metadata.labels.as_ref().and_then(|l| l.get(BATCH_LABEL));
    let at = job.metadata.annotations.as_ref().and_then(|a| a.get(BATCH_INDEX_ANNOTATION));
    label.map(String::as_str) == Some(batch) && at.and_then(|a| a.parse::<usize>().ok()) == Some(index)
}

/// Whether `existing`, found under the name of `wanted`, was made for the same work: its jobName and args. A job the
/// operator's types cannot hold (a stand-in) is judged by its batch label and index alone.
fn same_work(existing: &BackgroundJob, wanted: &BackgroundJob) -> bool {
    let stand_in = kube::ResourceExt::annotations(existing).contains_key(crate::wire::UNREADABLE_ANNOTATION);
    let value = |job: &BackgroundJob| job.spec.args.as_ref().map(|a| a.value()).transpose();
    let same_args = match (value(existing), value(wanted)) {
        (Ok(a), Ok(b)) => crate::api::same_once_stored(a.as_ref(), b.as_ref()),
        // Nested deeper than a value is read: judged by the batch label and index alone, as a stand-in is. Their
        // texts cannot be compared: the apiserver writes its own (keys sorted, `<` escaped, `1.0` as `1`), and
        // "other work" would have the caller enqueue the same work again under another batch id.
        _ => true,
    };
    stand_in || (existing.spec.job_name == wanted.spec.job_name && same_args)
}

/// A DNS-label-safe name prefix derived from a job name (`SendEmail` → `sendemail`).
pub fn name_prefix(job_name: &str) -> String {
    let mut p: String =
        job_name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    p.truncate(40);
    let p = p.trim_matches('-').to_string();
    if p.is_empty() { "job".into() } else { p }
}

/// All jobs, listed in pages. A job the operator's types cannot hold comes as its stand-in, marked with
/// [`crate::wire::UNREADABLE_ANNOTATION`] (why), instead of failing the list.
pub async fn list(api: &Api<BackgroundJob>) -> Result<Vec<BackgroundJob>> {
    Ok(crate::unreadable::list(api).await?)
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

/// What `bgjobs retry` must change in a job's spec so that a re-queued job may run again: `status.attempts` only
/// ever grows (it is the fencing epoch), so a used-up budget is extended instead of reset.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Requeue {
    /// New `spec.retry.maxAttempts`, when the old one is used up: another full budget on top of the attempts made.
    pub max_attempts: Option<i32>,
    /// New `spec.timeoutSeconds`, when the deadline is (nearly) past: the original timeout again, counted from now.
    pub timeout_seconds: Option<i64>,
    /// Clear `spec.cancel`, set after the job had finished (a no-op then): a retry asks for the job to run again,
    /// and a re-queued job with `cancel` set would be settled `Cancelled` at once.
    pub clear_cancel: bool,
}

/// Annotation that remembers a job's original `maxAttempts` once `bgjobs retry` has raised it, so every retry grants
/// the same budget.
pub const RETRY_BUDGET_ANNOTATION: &str = "bgjobs.dev/retry-budget";

/// Annotation that remembers a job's original `timeoutSeconds` once `bgjobs retry` has raised it, so every retry
/// grants the same time again (not the raised timeout, which would grow with each retry).
pub const RETRY_TIMEOUT_ANNOTATION: &str = "bgjobs.dev/retry-timeout";

/// The time one retry grants: the job's original `timeoutSeconds`.
fn retry_timeout(job: &BackgroundJob) -> i64 {
    remembered(job, RETRY_TIMEOUT_ANNOTATION).unwrap_or(job.spec.timeout_seconds).max(1)
}

/// A value `bgjobs retry` remembered in the annotation `key` when it first raised it.
fn remembered<T: std::str::FromStr>(job: &BackgroundJob, key: &str) -> Option<T> {
    job.metadata.annotations.as_ref().and_then(|a| a.get(key)).and_then(|v| v.parse().ok())
}

/// The attempts one retry grants: the job's original `maxAttempts`.
fn retry_budget(job: &BackgroundJob, current_max: i32) -> i32 {
    remembered(job, RETRY_BUDGET_ANNOTATION).unwrap_or(current_max).max(1)
}

/// Decide how to re-queue `job` at `now`. Only `Failed` and `Abandoned` jobs can be retried.
pub fn requeue_plan(job: &BackgroundJob, now: Timestamp) -> std::result::Result<Requeue, String> {
    let phase = job.phase();
    if job.deletion_requested() {
        return Err(format!(
            "{} is being deleted (its deletion waits for a finalizer): it is not run again",
            job.metadata.name.as_deref().unwrap_or("?")
        ));
    }
    if !phase.can_retry() {
        return Err(format!(
            "only Failed or Abandoned jobs can be retried; {} is {phase}",
            job.metadata.name.as_deref().unwrap_or("?")
        ));
    }
    // Measured in attempts that count against the budget (not those handed back before they started).
    let spent = job.attempts_spent(job.attempts());
    // Saturating: the remembered values are annotations anyone who may edit the job can set.
    let max_attempts =
        job.spec.retry.max_attempts.filter(|m| spent >= *m).map(|m| spent.saturating_add(retry_budget(job, m)));
    let created = job.counted_from(now);
    let deadline = crate::retry::deadline(&job.spec, created);
    let near = now.checked_add(jiff::SignedDuration::from_secs(60)).unwrap_or(now) >= deadline;
    let timeout_seconds = near.then(|| now.duration_since(created).as_secs().saturating_add(retry_timeout(job)));
    Ok(Requeue { max_attempts, timeout_seconds, clear_cancel: job.spec.cancel })
}

/// Re-queue a Failed or Abandoned job: extend its budget if needed (spec), then put it back to `Waiting` (status).
/// Both writes are made under the resourceVersion of the job as read, so that a job that changed meanwhile (another
/// retry re-queued it, and a replica may be running it) is left alone: the plan was made for the job as read.
pub async fn retry(api: &Api<BackgroundJob>, name: &str) -> Result<BackgroundJob> {
    let changed = || crate::Error::Invalid(format!("{name} changed while it was being re-queued; try again"));
    let job = crate::unreadable::get_opt(api, name)
        .await?
        .ok_or_else(|| crate::Error::Invalid(format!("no BackgroundJob {name:?}")))?;
    // "Near the deadline" by the apiserver's clock, as the operator judges deadlines: a client whose clock runs
    // behind would grant no time and the job be abandoned again at once. This machine's clock if it cannot be read.
    let clock = crate::clock::ServerClock::default();
    if let Err(e) = clock.sample(&api.clone().into_client(), false).await {
        tracing::debug!(error = %e, "could not read the apiserver's clock; using this machine's");
    }
    let now = clock.now();
    let plan = requeue_plan(&job, now).map_err(crate::Error::Invalid)?;
    let mut spec_patch = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    if let Some(m) = plan.max_attempts {
        spec_patch.insert("retry".into(), serde_json::json!({ "maxAttempts": m }));
        let budget = retry_budget(&job, job.spec.retry.max_attempts.unwrap_or(1)).to_string();
        metadata.insert("annotations".into(), serde_json::json!({ RETRY_BUDGET_ANNOTATION: budget }));
    }
    if let Some(t) = plan.timeout_seconds {
        spec_patch.insert("timeoutSeconds".into(), t.into());
        let annotations = metadata.entry("annotations").or_insert_with(|| serde_json::json!({}));
        annotations[RETRY_TIMEOUT_ANNOTATION] = retry_timeout(&job).to_string().into();
    }
    if plan.clear_cancel {
        spec_patch.insert("cancel".into(), false.into());
    }
    let job = if spec_patch.is_empty() {
        job
    } else {
        // A resourceVersion in a merge patch is its precondition: 409 if the job is no longer the one planned for.
        metadata.insert("resourceVersion".into(), job.metadata.resource_version.clone().unwrap_or_default().into());
        let patch = serde_json::json!({ "metadata": metadata, "spec": spec_patch });
        match crate::unreadable::merge_patch(api, name, patch).await {
            Err(e) if crate::error::api_code(&e) == Some(409) => return Err(changed()),
            answer => answer?,
        }
    };
    let was = job.phase();
    let mut s = job.status.as_deref().cloned().unwrap_or_default();
    let old = s.last_error.clone().unwrap_or_default();
    crate::status::reopen(&mut s, format!("re-queued by bgjobs retry (was {was}: {old})"), now);
    crate::status::write_if_unchanged(api, &job, s).await?.ok_or_else(changed)
}

/// Ask for a job's cancellation (`spec.cancel: true`).
pub async fn cancel(api: &Api<BackgroundJob>, name: &str) -> Result<BackgroundJob> {
    Ok(crate::unreadable::merge_patch(api, name, serde_json::json!({ "spec": { "cancel": true } })).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apiserver that never answers: the bulk call sends its creates again after each 30 s, never later than
    /// 120 s after the first (the operator keeps a finished bulk job only until such a create cannot land), and
    /// gives up.
    #[tokio::test(start_paused = true)]
    async fn a_bulk_create_is_sent_again_only_within_its_window() {
        let sent: std::sync::Arc<std::sync::Mutex<Vec<std::time::Duration>>> = Default::default();
        let start = tokio::time::Instant::now();
        let log = sent.clone();
        let silent = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            log.lock().unwrap().push(start.elapsed());
            async {
                std::future::pending::<Result<http::Response<kube::client::Body>, std::convert::Infallible>>().await
            }
        });
        let api: Api<BackgroundJob> = Api::namespaced(kube::Client::new(silent, "ns"), "ns");
        let created = enqueue_batch(&api, "abc", vec![spec("noop", serde_json::json!({}))], 1, |_| {}).await;
        assert!(matches!(created, Err(crate::Error::Bulk { created: 0, .. })), "{created:?}");
        let sent = sent.lock().unwrap();
        assert!(sent.len() >= 4, "sent again after each 30 s: {sent:?}");
        assert!(sent.iter().all(|t| *t < CREATES_SENT_WITHIN), "none sent later than 120 s after the first: {sent:?}");
        assert!(start.elapsed() <= CREATES_SENT_WITHIN, "the last one given up at the end of the window");
    }

    #[test]
    fn batch_names_sort_in_index_order_and_stay_valid() {
        assert_eq!(batch_name("SendEmail", "ab12cd34", 7, 50_000), "sendemail-ab12cd34-00007");
        assert_eq!(batch_name("noop", "x", 0, 1), "noop-x-0");
        assert_eq!(batch_name("noop", "x", 9, 10), "noop-x-9");
        let long = batch_name(&"a".repeat(300), "abcdefghijklmnop", 123_456, 1_000_000_000_000);
        assert!(long.len() <= 63, "a DNS label even for the longest: {long}");
        let id = new_batch_id();
        assert!(id.len() == 8 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{id}");
        assert_ne!(new_batch_id(), new_batch_id());
    }

    #[test]
    fn a_job_found_under_a_batch_name_is_ours_only_with_the_same_batch_and_index() {
        let mut j = BackgroundJob::new("noop-b-1", spec("noop", serde_json::json!({})));
        assert!(!is_batch_job(&j, "b", 1), "no label: someone else's job");
        j.metadata.labels = Some([(BATCH_LABEL.to_string(), "b".to_string())].into());
        j.metadata.annotations = Some([(BATCH_INDEX_ANNOTATION.to_string(), "1".to_string())].into());
        assert!(is_batch_job(&j, "b", 1));
        assert!(!is_batch_job(&j, "b", 2));
        assert!(!is_batch_job(&j, "c", 1));
        // The same batch id used again for other work: not the job this call asked for.
        assert!(same_work(&j, &j.clone()));
        // Its args as the apiserver gave them back: whole floats without their decimal.
        let mut sent = j.clone();
        sent.spec.args = Some(serde_json::json!({"scale": 1.0}).into());
        let mut stored = j.clone();
        stored.spec.args = Some(serde_json::json!({"scale": 1}).into());
        assert!(same_work(&stored, &sent));
        let mut other = j.clone();
        other.spec.args = Some(serde_json::json!({"day": 2}).into());
        assert!(!same_work(&j, &other));
        other.spec = spec("report", serde_json::json!({}));
        assert!(!same_work(&j, &other));
        // Arguments nested deeper than a value is read are not compared: the apiserver writes them in its own way.
        let deep = |text: &str| {
            let mut d = j.clone();
            let text = format!(r#"{{"a":{}{text}{}}}"#, "[".repeat(200), "]".repeat(200));
            d.spec.args = Some(serde_json::from_str(&text).unwrap());
            d
        };
        assert!(same_work(&deep(r#""<1.0>""#), &deep(r#""\u003c1.0\u003e""#)), "sent, and as the apiserver wrote it");
    }

    /// A single enqueue (a generated name) is sent again only after a 429, which certainly made nothing; after a
    /// 500 the job may exist, and another create would make a second one.
    #[tokio::test(start_paused = true)]
    async fn a_single_enqueue_is_sent_again_after_a_429_only() {
        let answers = |codes: Vec<u16>| {
            let left = std::sync::Arc::new(std::sync::Mutex::new(codes));
            crate::testing::scripted_client(move |sent| {
                let code = left.lock().unwrap().remove(0);
                let reply = match code {
                    201 => {
                        let mut job = sent.body.clone();
                        job["metadata"]["name"] = "noop-abcde".into();
                        job
                    }
                    code => serde_json::json!({"kind": "Status", "status": "Failure", "code": code, "message": "no"}),
                };
                (code, reply)
            })
        };
        let (client, sent) = answers(vec![429, 429, 201]);
        let job = enqueue(&Api::namespaced(client, "ns"), spec("noop", serde_json::json!({}))).await.unwrap();
        assert_eq!((job.metadata.name.as_deref(), sent.lock().unwrap().len()), (Some("noop-abcde"), 3));
        let (client, sent) = answers(vec![500, 201]);
        assert!(enqueue(&Api::namespaced(client, "ns"), spec("noop", serde_json::json!({}))).await.is_err());
        assert_eq!(sent.lock().unwrap().len(), 1, "a create that may have landed is not sent again");
    }

    #[test]
    fn a_delay_that_ends_at_or_after_the_timeout_is_refused_before_anything_is_created() {
        let mut s = spec("noop", serde_json::json!({}));
        assert_eq!(can_run(&s), Ok(()));
        s.delay_seconds = Some(s.timeout_seconds - 1);
        assert_eq!(can_run(&s), Ok(()));
        s.delay_seconds = Some(s.timeout_seconds);
        assert!(can_run(&s).unwrap_err().contains("raise timeoutSeconds"), "{:?}", can_run(&s));
    }

    #[test]
    fn name_prefixes_are_dns_safe() {
        assert_eq!(name_prefix("SendEmail"), "sendemail");
        assert_eq!(name_prefix("Billing.Export_v2"), "billing-export-v2");
        assert_eq!(name_prefix("__"), "job");
    }

    fn finished(phase: Phase, attempts: i32, max: Option<i32>, timeout: i64) -> BackgroundJob {
        let mut j = BackgroundJob::new("j", spec("fail", serde_json::json!({})));
        j.spec.retry.max_attempts = max;
        j.spec.timeout_seconds = timeout;
        j.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1000).unwrap()));
        j.status =
            Some(Box::new(crate::api::BackgroundJobStatus { phase: Some(phase), attempts, ..Default::default() }));
        j
    }

    #[test]
    fn a_retry_grants_another_attempt_budget_without_resetting_the_attempt_count() {
        let now = Timestamp::from_second(1100).unwrap();
        let plan = requeue_plan(&finished(Phase::Failed, 3, Some(3), 172_800), now).unwrap();
        assert_eq!(plan, Requeue { max_attempts: Some(6), timeout_seconds: None, clear_cancel: false });
        let mut raised = finished(Phase::Failed, 6, Some(6), 172_800);
        raised.metadata.annotations = Some([(RETRY_BUDGET_ANNOTATION.to_string(), "3".to_string())].into());
        assert_eq!(requeue_plan(&raised, now).unwrap().max_attempts, Some(9), "every retry grants the original 3");
        let unlimited = requeue_plan(&finished(Phase::Failed, 1, None, 172_800), now).unwrap();
        assert_eq!(unlimited, Requeue::default(), "a permanent failure with budget left needs no spec change");
    }

    #[test]
    fn a_retry_of_an_abandoned_job_restarts_its_timeout_from_now() {
        let plan =
            requeue_plan(&finished(Phase::Abandoned, 2, None, 100), Timestamp::from_second(1500).unwrap()).unwrap();
        // Timeouts count from the end of the creation second (1001 here): 100 s from now is 599 s from then.
        assert_eq!(plan.timeout_seconds, Some(599), "499 s since creation + the original 100 s");
        // Retried again once that ran out: the original 100 s again, not the raised 600 (which grew every retry).
        let mut raised = finished(Phase::Abandoned, 3, None, 600);
        raised.metadata.annotations = Some([(RETRY_TIMEOUT_ANNOTATION.to_string(), "100".to_string())].into());
        let plan = requeue_plan(&raised, Timestamp::from_second(1610).unwrap()).unwrap();
        assert_eq!(plan.timeout_seconds, Some(709), "609 s since creation + the original 100 s");
    }

    /// The remembered budget and timeout are annotations: set to the largest values, a retry asks for the largest
    /// the spec holds (before: an overflow, a panic in a debug build and a negative value sent otherwise).
    #[test]
    fn a_retry_with_the_largest_remembered_budget_and_timeout_saturates_instead_of_overflowing() {
        let mut j = finished(Phase::Abandoned, 1, Some(1), 100);
        j.metadata.annotations = Some(
            [
                (RETRY_BUDGET_ANNOTATION.to_string(), i32::MAX.to_string()),
                (RETRY_TIMEOUT_ANNOTATION.to_string(), i64::MAX.to_string()),
            ]
            .into(),
        );
        let plan = requeue_plan(&j, Timestamp::from_second(1500).unwrap()).unwrap();
        assert_eq!((plan.max_attempts, plan.timeout_seconds), (Some(i32::MAX), Some(i64::MAX)));
    }

    #[test]
    fn a_retry_clears_a_cancel_set_after_the_job_finished() {
        let mut j = finished(Phase::Failed, 1, None, 172_800);
        j.spec.cancel = true;
        let plan = requeue_plan(&j, Timestamp::from_second(1100).unwrap()).unwrap();
        assert_eq!(plan, Requeue { clear_cancel: true, ..Default::default() });
    }

    #[test]
    fn only_failed_or_abandoned_jobs_can_be_retried() {
        let err = requeue_plan(&finished(Phase::Succeeded, 1, None, 100), Timestamp::now()).unwrap_err();
        assert!(err.contains("only Failed or Abandoned"), "{err}");
        let mut deleting = finished(Phase::Failed, 1, None, 100);
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        let err = requeue_plan(&deleting, Timestamp::now()).unwrap_err();
        assert!(err.contains("is being deleted"), "a job whose deletion waits is not put back: {err}");
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
