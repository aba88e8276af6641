//! Status writes: what each transition records, and the two ways bgjobs writes status.
//!
//! - [`write_if_unchanged`]: for jobs nobody holds (claiming, cancelling or abandoning a waiting job). Applies only if
//!   the job is still at the resourceVersion the decision was made on; a 409 means another replica moved it first.
//! - [`write_fenced`]: for every write after a claim. Applies only while the job is still this worker's, on this
//!   attempt; a replica that was paused past its lease finds another worker or a higher attempt and writes nothing.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;

use crate::api::{BackgroundJob, BackgroundJobStatus, Phase};
use crate::error::{Result, api_code, gone};

/// Longest `lastError` kept (characters). Handler errors of any size must not make the outcome write itself fail
/// (an oversized object is rejected, and the attempt would be lost and retried for ever).
pub const MAX_LAST_ERROR: usize = 4096;

/// `error` cut to [`MAX_LAST_ERROR`] characters, saying how much was cut.
pub fn capped(error: String) -> String {
    let total = error.chars().count();
    if total <= MAX_LAST_ERROR {
        return error;
    }
    let mut kept: String = error.chars().take(MAX_LAST_ERROR - 40).collect();
    kept.push_str(&format!(" … ({} more characters cut)", total - (MAX_LAST_ERROR - 40)));
    kept
}

/// Who may write after a claim: this worker, on this attempt of this job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The job's UID (a job deleted and re-created under the same name is another job).
    pub uid: String,
    /// The claiming replica.
    pub worker: String,
    /// The attempt number the claim wrote: the fencing epoch.
    pub attempt: i32,
}

impl Fence {
    /// Whether `job` is still held under this fence.
    pub fn holds(&self, job: &BackgroundJob) -> bool {
        let Some(s) = job.status.as_ref() else { return false };
        job.metadata.uid.as_deref() == Some(self.uid.as_str())
            && s.phase == Some(Phase::Running)
            && s.worker.as_deref() == Some(self.worker.as_str())
            && s.attempts == self.attempt
    }
}

/// Result of a fenced write.
#[derive(Debug)]
pub enum Fenced {
    /// Written; the job as stored now.
    Written(Box<BackgroundJob>),
    /// Not written: the job moved on (another worker or attempt, a final phase) or is gone.
    Stale,
}

/// The status a claim writes: phase `Running`, the claimed attempt number, this worker and Lease.
pub fn running(
    job: &BackgroundJob,
    attempt: i32,
    worker: &str,
    lease: &str,
    sequence: Option<i64>,
    lost: Option<String>,
    now: Timestamp,
) -> BackgroundJobStatus {
    let mut s = job.status.as_deref().cloned().unwrap_or_default();
    if attempt != s.attempts {
        // A new attempt: what the previous one reported is not this one's.
        s.awaiting_report = false;
        s.last_heartbeat_time = None;
        s.progress = None;
        s.result = None;
    }
    // Jobs that run outside the operator (HTTP, Pod) can report for themselves: their tokens need the job's key.
    if s.report_key.is_none() && (job.spec.http.is_some() || job.spec.template.is_some()) {
        s.report_key = Some(crate::report::token::new_key());
    }
    s.phase = Some(Phase::Running);
    s.attempts = attempt;
    s.worker = Some(worker.to_string());
    s.lease = Some(lease.to_string());
    s.start_time = Some(Time(now));
    s.next_attempt_time = None;
    s.enqueue_sequence = s.enqueue_sequence.or(sequence);
    s.observed_generation = job.metadata.generation;
    if lost.is_some() {
        s.last_error = lost.map(capped);
    }
    let msg = format!("attempt {} running on {worker}", s.attempts);
    set_condition(&mut s, "Running", "True", "Claimed", &msg, now);
    s
}

/// The `Running` condition's reason when the claim adopted the attempt (see [`crate::claim::adopted`]).
const ADOPTED: &str = "Adopted";

/// Say, in the `Running` condition's reason, that this claim adopted its attempt rather than starting it.
pub fn mark_adopted(s: &mut BackgroundJobStatus) {
    if let Some(c) = s.conditions.iter_mut().find(|c| c.type_ == "Running" && c.status == "True") {
        c.reason = ADOPTED.to_string();
    }
}

/// Whether the current claim adopted its attempt ([`mark_adopted`]).
pub fn adopted(s: &BackgroundJobStatus) -> bool {
    s.conditions.iter().any(|c| c.type_ == "Running" && c.status == "True" && c.reason == ADOPTED)
}

/// Record a final phase.
///
/// A finished job keeps what a person reads (phase, attempts, worker, times, error, the `Finished` condition) and
/// drops what only a live attempt needs: its Lease's name and the `Running` condition (`Finished=True` says no
/// attempt runs, as a batch Job keeps only `Complete`/`Failed`). Finished jobs are most of what a busy cluster
/// holds until retention deletes them: this saves etcd about 180 bytes per finished job (the apiserver's heap per
/// job did not measurably shrink; docs/benchmarks.md, "The apiserver's memory per job").
pub fn finish(s: &mut BackgroundJobStatus, phase: Phase, error: Option<String>, now: Timestamp) {
    debug_assert!(phase.is_final());
    s.phase = Some(phase);
    s.awaiting_report = false;
    s.completion_time = Some(Time(now));
    s.next_attempt_time = None;
    s.lease = None;
    if error.is_some() {
        s.last_error = error.map(capped);
    }
    let msg = s.last_error.clone().filter(|_| phase != Phase::Succeeded).unwrap_or_else(|| format!("job {phase}"));
    s.conditions.retain(|c| c.type_ != "Running");
    set_condition(s, "Finished", "True", &phase.to_string(), &msg, now);
}

/// Re-open a finished job (`bgjobs retry`): back to `Waiting`, runnable at once.
pub fn reopen(s: &mut BackgroundJobStatus, note: String, now: Timestamp) {
    s.phase = Some(Phase::Waiting);
    s.completion_time = None;
    s.next_attempt_time = None;
    s.last_error = Some(note);
    set_condition(s, "Finished", "False", "Requeued", "re-queued by the user", now);
}

/// Put the job back in the queue, not to start before `at` (None: at once).
pub fn requeue(s: &mut BackgroundJobStatus, at: Option<Timestamp>, error: String, now: Timestamp) {
    s.phase = Some(Phase::Waiting);
    s.awaiting_report = false;
    s.next_attempt_time = at.map(Time);
    s.last_error = Some(capped(error));
    set_condition(s, "Running", "False", "Requeued", "waiting for the next attempt", now);
}

/// What an attempt handed back before it started records in `lastError` ([`requeue_unstarted`]): `why` it did not.
pub fn not_started(attempt: i32, worker: &str, why: &str) -> String {
    format!("attempt {attempt} was not started: worker {worker} {why}")
}

/// Put back in the queue an attempt that never started, saying so in `error` ([`not_started`]), to start again at
/// once or not before `at`: it counts in `attempts`, the fencing epoch, and in `unstartedAttempts`, so not against
/// `retry.maxAttempts`.
pub fn requeue_unstarted(s: &mut BackgroundJobStatus, error: String, at: Option<Timestamp>, now: Timestamp) {
    requeue(s, at, error, now);
    s.unstarted_attempts = s.unstarted_attempts.saturating_add(1);
}

fn set_condition(s: &mut BackgroundJobStatus, type_: &str, status: &str, reason: &str, message: &str, now: Timestamp) {
    let generation = s.observed_generation;
    upsert_condition(&mut s.conditions, generation, type_, status, reason, message, now);
}

/// The longest a condition's message is kept (characters).
pub const MAX_CONDITION_MESSAGE: usize = 1024;

/// Set the condition `type_` in `conditions` (standard semantics: `lastTransitionTime` moves only when the status
/// changes; messages are capped at 1024 characters). Shared by every bgjobs resource's status.
pub fn upsert_condition(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let message: String = message.chars().take(MAX_CONDITION_MESSAGE).collect();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != status {
            c.last_transition_time = Time(now);
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message;
        c.observed_generation = generation;
    } else {
        conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(now),
            observed_generation: generation,
        });
    }
}

/// Write `status` over `seen` only if the job is still at `seen`'s resourceVersion, with less of it each time etcd
/// refuses it as too large ([`Room`]). `Ok(None)`: someone else moved it first (or it is gone).
pub async fn write_if_unchanged(
    api: &Api<BackgroundJob>,
    seen: &BackgroundJob,
    status: BackgroundJobStatus,
) -> Result<Option<BackgroundJob>> {
    match replace_fitted(api, seen, status).await {
        Ok(j) => Ok(Some(j)),
        Err(e) if api_code(&e) == Some(409) || gone(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replace `job`'s status with `status` under `job`'s resourceVersion, with less of it each time etcd refuses it as
/// too large ([`Room`]): the one place a status write gives way. Through `unreadable`: a job edited into a shape the
/// types cannot hold still gets its status.
async fn replace_fitted(
    api: &Api<BackgroundJob>,
    job: &BackgroundJob,
    status: BackgroundJobStatus,
) -> std::result::Result<BackgroundJob, kube::Error> {
    let mut obj = job.clone();
    let fitted = |room| {
        let mut s = status.clone();
        fit(&mut s, room);
        Some(Box::new(s))
    };
    for room in [Room::Whole, Room::Cut] {
        obj.status = fitted(room);
        match crate::unreadable::replace_status(api, &obj).await {
            Err(e) if too_large_for_etcd(&e) => {
                tracing::warn!(job = ?job.metadata.name, error = %e, ?room, "the job is too large to store this \
                    status beside its spec; writing it again with less");
            }
            answer => return answer,
        }
    }
    obj.status = fitted(Room::Bare);
    crate::unreadable::replace_status(api, &obj).await
}

/// Whether the apiserver refused a write because the object would be larger than etcd stores (1.5 MiB by default):
/// etcd's "request is too large" (a 500 from older apiservers, a 413 from newer ones).
pub fn too_large_for_etcd(e: &kube::Error) -> bool {
    let etcds = |s: &kube::core::Status| s.code == 500 && s.message.contains("etcdserver: request is too large");
    matches!(e, kube::Error::Api(s) if s.code == 413 || etcds(s))
}

/// Longest error, condition and progress message kept at [`Room::Cut`] (characters).
const SHRUNK_MESSAGE: usize = 200;

/// Every condition's message at [`Room::Bare`].
const BARE_MESSAGE: &str = "see Events";

/// How much of a status gives way when the job's spec nears etcd's limit (1.5 MiB a request by default) and the
/// status does not fit beside it. Refused, an outcome was taken as lost and the attempt run again, for ever; so a
/// write refused as too large is made again with less, down to [`Room::Bare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// All of it.
    Whole,
    /// All but the start of the error and of the condition and progress messages, which only explain the outcome.
    Cut,
    /// The outcome alone (phase, attempts, worker, the conditions' types and reasons, times), no message: its reason
    /// is in the job's Events, and every condition says so. A job not running also drops its start time and Lease
    /// name. No larger than the status its claim stored (a `Running` condition's message, a start time and a Lease
    /// name give way to a completion or next attempt time), so an attempt whose claim fitted can always record how
    /// it ended.
    Bare,
}

/// Make `s` take no more than `room` allows. A result is never dropped: a write that still does not fit fails as
/// before (a worker's report is refused, and the worker knows).
pub fn fit(s: &mut BackgroundJobStatus, room: Room) {
    let cut = |text: &mut String| {
        if text.chars().count() > SHRUNK_MESSAGE {
            *text = text.chars().take(SHRUNK_MESSAGE).collect::<String>()
                + " … (cut: the job is too large for etcd to store more)";
        }
    };
    match room {
        Room::Whole => {}
        Room::Cut => {
            if let Some(error) = s.last_error.as_mut() {
                cut(error);
            }
            if let Some(message) = s.progress.as_mut().and_then(|p| p.message.as_mut()) {
                cut(message);
            }
            s.conditions.iter_mut().for_each(|c| cut(&mut c.message));
        }
        Room::Bare => {
            s.last_error = None;
            if let Some(p) = s.progress.as_mut() {
                p.message = None;
            }
            // Not empty: the apiserver refuses a condition without a message.
            s.conditions.iter_mut().for_each(|c| c.message = BARE_MESSAGE.to_string());
            if s.phase != Some(Phase::Running) {
                s.start_time = None;
                s.lease = None;
            }
        }
    }
}

/// Apply `change` to the job's status and write it, only while `fence` still holds. Starts from `latest` (the job
/// as this worker last wrote or read it) and re-reads on each 409. A status too large to store is written again
/// with less of it ([`Room`]). Any other failure is the caller's to handle (see [`write_outcome`]).
pub async fn write_fenced(
    api: &Api<BackgroundJob>,
    latest: &BackgroundJob,
    fence: &Fence,
    change: impl Fn(&mut BackgroundJobStatus),
) -> Result<Fenced> {
    write_fenced_as(api, latest, fence, change, SendAgain::Never).await
}

/// [`write_fenced`] for how an attempt ended: a write or read that may succeed when sent again (no answer, a 5xx, a
/// 429, the bare 404 of a restarting apiserver that does not serve the resource yet) is sent again after a pause,
/// for as long as the caller lets it (while the attempt's claim holds): an outcome given up on is an attempt run
/// again. `change` must be the same at every send (an outcome's times are when the attempt ended, not when the write
/// landed). Not for heartbeats or progress, whose time is the write's own.
pub async fn write_outcome(
    api: &Api<BackgroundJob>,
    latest: &BackgroundJob,
    fence: &Fence,
    change: impl Fn(&mut BackgroundJobStatus),
) -> Result<Fenced> {
    write_fenced_as(api, latest, fence, change, SendAgain::WhileTransient).await
}

/// Whether `read` is the job as a send of `sent` under `fence` left it: the same job, and its status `sent` as one of
/// [`replace_fitted`]'s sizes stored it (compared as stored: times keep whole seconds, `1.0` comes back `1`).
/// `change` is the same at every send, and an outcome's text and time (the attempt's end) tell another writer's
/// status apart; a worker's own report of success without a result, written in the same second over a heartbeat of
/// that second, looks alike: the success is then counted (and told in an Event) twice, recorded once.
fn shows_sent(read: &BackgroundJob, fence: &Fence, sent: &BackgroundJobStatus) -> bool {
    let (Some(found), Ok(found_json)) = (read.status.as_deref(), serde_json::to_value(&read.status)) else {
        return false;
    };
    read.metadata.uid.as_deref() == Some(fence.uid.as_str())
        && found.phase == sent.phase
        && [Room::Whole, Room::Cut, Room::Bare].into_iter().any(|room| {
            let mut fitted = sent.clone();
            fit(&mut fitted, room);
            serde_json::to_value(Some(&fitted)).is_ok_and(|f| crate::api::same_once_stored(Some(&f), Some(&found_json)))
        })
}

/// Whether [`write_fenced_as`] sends a write (or its re-read) again after a failure that may pass.
#[derive(Clone, Copy, PartialEq)]
enum SendAgain {
    Never,
    WhileTransient,
}

/// The longest one send of [`write_outcome`] (or its re-read) is waited for before it is sent again: the client sets
/// no read timeout, and a send left hanging (a stalled etcd, a dead connection) would use up the caller's whole
/// patience instead.
const OUTCOME_SEND_LIMIT: Duration = Duration::from_secs(15);

impl SendAgain {
    /// Whether a send that failed with `e` is sent again: only while sending again, and only if it may pass.
    fn after(self, e: &kube::Error) -> bool {
        self == SendAgain::WhileTransient && crate::error::is_transient_answer(e)
    }

    /// `send`'s answer; `None` if none came within [`OUTCOME_SEND_LIMIT`] while sending again (a write sent once waits
    /// for its answer, bounded by its caller).
    async fn answer<T>(self, send: impl std::future::Future<Output = T>) -> Option<T> {
        match self {
            SendAgain::Never => Some(send.await),
            SendAgain::WhileTransient => tokio::time::timeout(OUTCOME_SEND_LIMIT, send).await.ok(),
        }
    }
}

async fn write_fenced_as(
    api: &Api<BackgroundJob>,
    latest: &BackgroundJob,
    fence: &Fence,
    change: impl Fn(&mut BackgroundJobStatus),
    again: SendAgain,
) -> Result<Fenced> {
    let name = latest.metadata.name.clone().unwrap_or_default();
    let mut current = latest.clone();
    let mut pause = crate::client::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    // The status of a send that may have landed without its answer reaching this worker (none came in time, or a
    // 5xx: the apiserver may answer so after etcd stored it).
    let mut maybe_landed: Option<BackgroundJobStatus> = None;
    // However often others write the job (labels, annotations, GitOps), the outcome is retried on a fresh read for
    // as long as the fence holds; the caller bounds the whole write (while its claim holds).
    loop {
        if !fence.holds(&current) {
            // Sent again after one that landed unanswered, the write meets a 409, and the fresh read shows the fence
            // gone because of this very write: it is written (its claim is given back, its outcome told).
            if maybe_landed.as_ref().is_some_and(|sent| shows_sent(&current, fence, sent)) {
                return Ok(Fenced::Written(Box::new(current)));
            }
            return Ok(Fenced::Stale);
        }
        let mut status = current.status.as_deref().cloned().unwrap_or_default();
        change(&mut status);
        // No answer in time: perhaps it landed; sent again, a 409 then says so.
        let Some(written) = again.answer(replace_fitted(api, &current, status.clone())).await else {
            maybe_landed = Some(status);
            pause.wait().await;
            continue;
        };
        match written {
            Ok(j) => return Ok(Fenced::Written(Box::new(j))),
            // Someone else wrote it (or an earlier send of this one landed): on a fresh read, whole again (it may fit
            // now).
            Err(e) if api_code(&e) == Some(409) => loop {
                let Some(read) = again.answer(crate::unreadable::get_opt(api, &name)).await else {
                    pause.wait().await;
                    continue;
                };
                match read {
                    Ok(Some(j)) => break current = j,
                    Ok(None) => return Ok(Fenced::Stale),
                    Err(e) if again.after(&e) => pause.wait().await,
                    Err(e) => return Err(e.into()),
                }
            },
            Err(e) if gone(&e) => return Ok(Fenced::Stale),
            Err(e) if again.after(&e) => {
                maybe_landed = Some(status);
                pause.wait().await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackgroundJobSpec;

    fn job() -> BackgroundJob {
        let mut j = BackgroundJob::new(
            "j",
            serde_json::from_value::<BackgroundJobSpec>(serde_json::json!({"jobName": "noop"})).unwrap(),
        );
        j.metadata.uid = Some("uid-1".into());
        j.metadata.generation = Some(1);
        j
    }

    fn job_with(status: BackgroundJobStatus) -> BackgroundJob {
        let mut j = job();
        j.status = Some(Box::new(status));
        j
    }

    #[test]
    fn a_shrunk_status_keeps_the_outcome_its_result_and_the_start_of_its_messages() {
        let now = Timestamp::from_second(100).unwrap();
        let mut s = running(&job(), 1, "w1", "bgj-j", Some(42), None, now);
        s.result = Some(serde_json::json!({"rows": "x".repeat(30_000)}));
        finish(&mut s, Phase::Failed, Some("é".repeat(10_000)), now);
        let before = s.clone();
        fit(&mut s, Room::Cut);
        assert_eq!((s.phase, s.attempts, &s.completion_time), (before.phase, before.attempts, &before.completion_time));
        assert_eq!(s.result, before.result, "a result is never dropped");
        let error = s.last_error.as_deref().unwrap();
        assert!(error.starts_with(&"é".repeat(200)) && error.ends_with("too large for etcd to store more)"), "{error}");
        assert!(s.conditions.iter().all(|c| c.message.chars().count() < 300), "{:?}", s.conditions);
        s.result = None;
        assert!(serde_json::to_string(&s).unwrap().len() < 2_000, "what is left is small");
        s.result = before.result.clone();
        let short = s.clone();
        fit(&mut s, Room::Cut);
        assert_eq!(s, short, "cutting twice changes nothing");
    }

    /// The promise that ends the ladder: an attempt whose claim fitted beside the job's spec can record how it ended
    /// (or its requeue), bare, however long its error; and the requeued job's next claim is no larger either.
    #[test]
    fn a_bare_outcome_or_requeue_is_no_larger_than_the_claim_that_fitted() {
        let size = |s: &BackgroundJobStatus| serde_json::to_string(s).unwrap().len();
        let (claimed_at, ended_at) = (Timestamp::from_second(100).unwrap(), Timestamp::from_second(200).unwrap());
        // The shortest worker name and no takeover note: the claim as small as it can be.
        let claim = running(&job(), 1, "r", "bgj-j", Some(42), None, claimed_at);
        let mut endings: Vec<(&str, BackgroundJobStatus)> = Vec::new();
        for phase in [Phase::Succeeded, Phase::Failed, Phase::Abandoned, Phase::Cancelled] {
            let mut s = claim.clone();
            finish(&mut s, phase, Some("é".repeat(5_000)), ended_at);
            endings.push(("final", s));
        }
        let mut requeued = claim.clone();
        requeue(&mut requeued, Some(ended_at), "é".repeat(5_000), ended_at);
        endings.push(("requeue", requeued.clone()));
        for (what, mut s) in endings {
            fit(&mut s, Room::Bare);
            assert!(size(&s) <= size(&claim), "{what}: {} > {} bytes: {s:?}", size(&s), size(&claim));
            assert!(s.phase.is_some() && s.completion_time.is_some() != (what == "requeue"), "{s:?}");
        }
        fit(&mut requeued, Room::Bare);
        let mut next = running(&job_with(requeued), 2, "r", "bgj-j", Some(42), None, ended_at);
        fit(&mut next, Room::Bare);
        assert!(size(&next) <= size(&claim), "{next:?}");
    }

    /// An outcome given up on is an attempt run again: a write (or its re-read) the apiserver could not take now (a
    /// restarting apiserver's bare 404 for a resource it does not serve yet, a 503, no answer) is sent again; only a
    /// 404 that says the job is gone ends the write as stale. Other writes ([`write_fenced`]) are sent once.
    #[tokio::test(start_paused = true)]
    async fn an_outcome_write_not_taken_now_is_sent_again_and_only_a_gone_job_makes_it_stale() {
        let now = Timestamp::from_second(100).unwrap();
        let claimed = job_with(running(&job(), 1, "w1", "bgj-j", Some(42), None, now));
        let fence = Fence { uid: "uid-1".into(), worker: "w1".into(), attempt: 1 };
        let answers = |script: Vec<(u16, serde_json::Value)>| {
            let script = std::sync::Arc::new(std::sync::Mutex::new(script.into_iter()));
            crate::testing::scripted_client(move |sent| {
                let (code, body) = script.lock().unwrap().next().expect("no request past the script");
                // A write that is taken answers the job as written.
                (code, if body.is_null() { sent.body.clone() } else { body })
            })
        };
        let not_served = serde_json::json!("404 page not found");
        let (client, sent) = answers(vec![
            (404, not_served.clone()),
            (503, crate::testing::status(503)),
            (409, crate::testing::status(409)),
            (404, not_served.clone()),
            (200, serde_json::to_value(&claimed).unwrap()),
            (200, serde_json::Value::Null),
        ]);
        let api = Api::<BackgroundJob>::namespaced(client, "ns");
        let written = write_outcome(&api, &claimed, &fence, |s| finish(s, Phase::Succeeded, None, now)).await.unwrap();
        let Fenced::Written(j) = written else { panic!("not written: {written:?}") };
        assert_eq!(j.status.unwrap().phase, Some(Phase::Succeeded));
        let methods: Vec<String> = sent.lock().unwrap().iter().map(|s| s.method.clone()).collect();
        assert_eq!(methods, ["PUT", "PUT", "PUT", "GET", "GET", "PUT"], "sent until taken, the re-read too");

        let (client, sent) = answers(vec![(503, crate::testing::status(503))]);
        let api = Api::<BackgroundJob>::namespaced(client, "ns");
        let once = write_fenced(&api, &claimed, &fence, |s| s.progress = None).await;
        assert!(once.is_err() && sent.lock().unwrap().len() == 1, "other writes are sent once: {once:?}");

        let (client, sent) = answers(vec![(404, crate::testing::status(404))]);
        let api = Api::<BackgroundJob>::namespaced(client, "ns");
        let written = write_outcome(&api, &claimed, &fence, |s| finish(s, Phase::Succeeded, None, now)).await.unwrap();
        assert!(matches!(written, Fenced::Stale), "{written:?}");
        assert_eq!(sent.lock().unwrap().len(), 1, "a gone job is not written again");
    }

    /// A send of an outcome left without an answer (a stalled etcd, a dead connection) is sent again after
    /// [`OUTCOME_SEND_LIMIT`], not waited for until the caller gives the outcome up.
    #[tokio::test(start_paused = true)]
    async fn an_outcome_write_left_unanswered_is_sent_again() {
        let now = Timestamp::from_second(100).unwrap();
        let claimed = job_with(running(&job(), 1, "w1", "bgj-j", Some(42), None, now));
        let fence = Fence { uid: "uid-1".into(), worker: "w1".into(), attempt: 1 };
        let sends = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = sends.clone();
        let (client, _) = crate::testing::scripted_client_slow(move |sent| {
            let first = counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0;
            let hang = if first { std::time::Duration::from_secs(3600) } else { std::time::Duration::ZERO };
            (200, sent.body.clone(), hang)
        });
        let api = Api::<BackgroundJob>::namespaced(client, "ns");
        let t0 = tokio::time::Instant::now();
        let written = write_outcome(&api, &claimed, &fence, |s| finish(s, Phase::Succeeded, None, now)).await.unwrap();
        assert!(matches!(written, Fenced::Written(_)), "{written:?}");
        assert_eq!(sends.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(t0.elapsed() < OUTCOME_SEND_LIMIT + std::time::Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    /// An outcome send that landed but whose answer was lost is sent again, meets a 409, and the fresh read shows the
    /// job final: its own status there makes it written (its claim given back), another writer's makes it stale.
    #[tokio::test(start_paused = true)]
    async fn an_outcome_that_landed_unanswered_is_known_on_the_fresh_read_by_its_own_status() {
        let now = Timestamp::from_second(100).unwrap();
        let claimed = job_with(running(&job(), 1, "w1", "bgj-j", Some(42), None, now));
        let fence = Fence { uid: "uid-1".into(), worker: "w1".into(), attempt: 1 };
        // The job as someone else left it, final under this same worker and attempt (a settle of the deadline).
        let mut settled = claimed.clone();
        finish(settled.status.as_mut().unwrap(), Phase::Abandoned, Some("past its timeout".into()), now);
        // What the first send leaves stored: itself; itself as the apiserver stores JSON (its result's `1.0` as `1`);
        // someone else's status.
        for (case, first_lands) in [("as sent", true), ("as stored", true), ("another's", false)] {
            let stored = std::sync::Arc::new(std::sync::Mutex::new(None::<serde_json::Value>));
            let kept = stored.clone();
            let other = serde_json::to_value(&settled).unwrap();
            let (client, _) = crate::testing::scripted_client_slow(move |sent| {
                let mut stored = kept.lock().unwrap();
                match (sent.method.as_str(), stored.is_none()) {
                    // The first send lands when it should, and its answer never comes.
                    ("PUT", true) => {
                        let mut landed = if first_lands { sent.body.clone() } else { other.clone() };
                        if case == "as stored" {
                            landed["status"]["result"] = serde_json::json!({"n": 1});
                        }
                        *stored = Some(landed);
                        (200, sent.body.clone(), std::time::Duration::from_secs(3600))
                    }
                    ("PUT", false) => (409, crate::testing::status(409), std::time::Duration::ZERO),
                    _ => (200, stored.clone().unwrap(), std::time::Duration::ZERO),
                }
            });
            let api = Api::<BackgroundJob>::namespaced(client, "ns");
            let written = write_outcome(&api, &claimed, &fence, |s| {
                finish(s, Phase::Succeeded, None, now);
                s.result = Some(serde_json::json!({"n": 1.0}));
            })
            .await
            .unwrap();
            match (first_lands, written) {
                (true, Fenced::Written(j)) => assert_eq!(j.status.unwrap().phase, Some(Phase::Succeeded), "{case}"),
                (false, Fenced::Stale) => {}
                (_, other) => panic!("{case}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_etcds_size_refusal_is_too_large_for_etcd() {
        let status = |code: u16, message: &str| {
            kube::Error::Api(Box::new(kube::core::Status::failure(message, "").with_code(code)))
        };
        assert!(too_large_for_etcd(&status(500, "etcdserver: request is too large")));
        assert!(too_large_for_etcd(&status(413, "Request entity too large: limit is 3145728")));
        assert!(!too_large_for_etcd(&status(500, "etcdserver: leader changed")));
        assert!(!too_large_for_etcd(&status(403, "denied by a webhook: etcdserver: request is too large")));
        assert!(!too_large_for_etcd(&status(409, "the object has been modified")));
    }

    #[test]
    fn a_claim_increments_the_attempt_and_records_worker_lease_and_sequence() {
        let now = Timestamp::from_second(100).unwrap();
        let s = running(&job(), 1, "w1", "bgj-j", Some(42), None, now);
        assert_eq!(
            (s.phase, s.attempts, s.worker.as_deref(), s.lease.as_deref()),
            (Some(Phase::Running), 1, Some("w1"), Some("bgj-j"))
        );
        assert_eq!(s.enqueue_sequence, Some(42));
        assert_eq!(s.conditions[0].type_, "Running");
    }

    #[test]
    fn a_new_attempt_forgets_what_the_last_one_reported_and_an_adoption_keeps_it() {
        let mut j = job();
        j.spec.http = Some(serde_json::from_value(serde_json::json!({"url": "http://127.0.0.1:1/"})).unwrap());
        let now = Timestamp::from_second(100).unwrap();
        let mut first = running(&j, 1, "w1", "l", None, None, now);
        let key = first.report_key.clone().expect("an HTTP job gets a report key");
        first.awaiting_report = true;
        first.progress = Some(crate::api::Progress { percent: Some(50), ..Default::default() });
        j.status = Some(Box::new(first));
        let adopted = running(&j, 1, "w2", "l", None, None, now);
        assert!(adopted.awaiting_report && adopted.progress.is_some(), "the adopter waits for the same report");
        let next = running(&j, 2, "w2", "l", None, None, now);
        assert!(!next.awaiting_report && next.progress.is_none() && next.result.is_none());
        assert_eq!(next.report_key, Some(key), "the key is the job's, kept across attempts");
        assert!(running(&job(), 1, "w", "l", None, None, now).report_key.is_none(), "in-process jobs need none");
    }

    #[test]
    fn the_enqueue_sequence_is_kept_across_attempts() {
        let mut j = job();
        j.status = Some(Box::new(BackgroundJobStatus { attempts: 1, enqueue_sequence: Some(7), ..Default::default() }));
        let s = running(&j, 2, "w2", "l", Some(999), Some("attempt 1 lost".into()), Timestamp::now());
        assert_eq!((s.attempts, s.enqueue_sequence, s.last_error.as_deref()), (2, Some(7), Some("attempt 1 lost")));
    }

    #[test]
    fn the_fence_holds_only_for_the_same_worker_attempt_and_uid_while_running() {
        let mut j = job();
        j.status = Some(Box::new(running(&j, 1, "w1", "l", None, None, Timestamp::now())));
        let fence = Fence { uid: "uid-1".into(), worker: "w1".into(), attempt: 1 };
        assert!(fence.holds(&j));
        assert!(!Fence { worker: "w2".into(), ..fence.clone() }.holds(&j));
        assert!(!Fence { attempt: 2, ..fence.clone() }.holds(&j));
        assert!(!Fence { uid: "other".into(), ..fence.clone() }.holds(&j));
        finish(j.status.as_mut().unwrap(), Phase::Succeeded, None, Timestamp::now());
        assert!(!fence.holds(&j), "a finished job is nobody's any more");
    }

    #[test]
    fn a_huge_error_is_cut_to_the_cap_and_says_so() {
        let mut s = BackgroundJobStatus::default();
        finish(&mut s, Phase::Failed, Some("x".repeat(3_000_000)), Timestamp::now());
        let e = s.last_error.unwrap();
        assert!(e.chars().count() <= MAX_LAST_ERROR + 10, "{}", e.len());
        assert!(e.ends_with("characters cut)"));
        let mut s = BackgroundJobStatus::default();
        requeue(&mut s, None, "short".into(), Timestamp::now());
        assert_eq!(s.last_error.as_deref(), Some("short"));
    }

    #[test]
    fn a_finished_job_keeps_what_a_person_reads_and_drops_the_lease_and_the_running_condition() {
        let mut j = job();
        let start = Timestamp::from_second(100).unwrap();
        j.status = Some(Box::new(running(&j, 2, "w1", "bgj-j", Some(42), None, start)));
        let s = j.status.as_mut().unwrap();
        finish(s, Phase::Succeeded, None, Timestamp::from_second(101).unwrap());
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Finished"]);
        assert_eq!(s.lease, None);
        assert_eq!(
            (s.phase, s.attempts, s.worker.as_deref(), s.enqueue_sequence),
            (Some(Phase::Succeeded), 2, Some("w1"), Some(42)),
            "who ran it, how often, and its place in the queue (a `bgjobs retry` keeps it) stay"
        );
        assert!(s.start_time.is_some() && s.completion_time.is_some());
        reopen(s, "re-queued".into(), Timestamp::from_second(102).unwrap());
        let types: Vec<(&str, &str)> = s.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str())).collect();
        assert_eq!(types, [("Finished", "False")], "re-opened: waiting, no attempt yet");
    }

    #[test]
    fn finishing_sets_completion_and_the_finished_condition() {
        let mut s = BackgroundJobStatus::default();
        finish(&mut s, Phase::Failed, Some("boom".into()), Timestamp::from_second(5).unwrap());
        assert_eq!(s.phase, Some(Phase::Failed));
        assert!(s.completion_time.is_some());
        let finished = s.conditions.iter().find(|c| c.type_ == "Finished").unwrap();
        assert_eq!((finished.reason.as_str(), finished.message.as_str()), ("Failed", "boom"));
    }
}
