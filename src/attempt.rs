//! Running one claimed attempt: keep its Lease, run the executor, record the outcome under the fence.
//!
//! The executor's future is polled only while the Lease is current: every poll first checks that the last renewal
//! is younger than the renew deadline ([`crate::lease::Keeper`]). A replica that was paused (SIGSTOP, a long GC, a frozen
//! VM) past that deadline therefore never resumes the work: the first thing it does on waking is drop it. The renew
//! deadline is shorter than the lease duration other replicas wait before taking over, so the two never overlap.
//!
//! Every attempt is bounded whatever its executor does: by `attemptTimeoutSeconds`, by the job's own deadline
//! (`timeoutSeconds` since creation), by its Leases, and by stop requests. A handler that panics fails its attempt.
//! Whatever ends it, `ctx.cancel` fires before the executor's future is dropped, so work the handler moved to
//! threads or tasks learns of it too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::poll_fn;
use jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::api::{BackgroundJob, Phase};
use crate::claim::Claimed;
use crate::executor::{self, JobContext};
use crate::lease::{Give, Hold, Keeper};
use crate::retry::{self, AttemptResult, Verdict};
use crate::status::{self, Fenced};
use crate::worker::Worker;

/// Why a running attempt was stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The job was asked to run no more: its user set `spec.cancel`, or its deletion waits for a finalizer. How its
    /// record begins ([`BackgroundJob::cancellation`]).
    Cancelled(&'static str),
    /// The job was deleted.
    Deleted,
    /// This replica is shutting down.
    Shutdown,
    /// This replica lost the exclusive-strategy Lease.
    NotLeader,
}

/// The dispatcher's handle on a running attempt.
#[derive(Default)]
pub struct AttemptControl {
    token: CancellationToken,
    /// Cancelled once this replica shuts down, whatever stopped the attempt first: an ended Pod attempt that is
    /// still waiting for its Pod to stop hands over instead.
    shutdown: CancellationToken,
    /// One lock over the stop reason and the out-of-reach mark: a lost leadership either stops the attempt before
    /// its work leaves the process or finds it out of reach, never both (see [`AttemptControl::begin`]).
    state: Mutex<ControlState>,
    /// Exclusive strategy: the cluster-wide Lease this replica held when it claimed. The attempt may act only
    /// while that very tenure is current, like its own Lease.
    leader: Option<Arc<Keeper>>,
    /// The job's spec as edited since the claim, as the dispatcher saw it (see [`AttemptControl::seen`]).
    edited: Mutex<Option<Arc<BackgroundJob>>>,
    /// Told when an edit changed the attempt's limits.
    limits_edited: tokio::sync::Notify,
}

#[derive(Default)]
struct ControlState {
    /// Why the attempt was stopped; the first reason given wins.
    reason: Option<StopReason>,
    /// The attempt's work has left this process and cannot be called back (an HTTP request: closing the connection
    /// does not stop the endpoint). From then on a lost leadership no longer stops the attempt: the replica waits
    /// for the answer under its own claim, and the job stays `Running` meanwhile, so a new leader starts nothing
    /// beside it (see `Dispatcher::pass`).
    out_of_reach: bool,
    /// A cancellation waits for the answer of the attempt's work, out of reach, rather than cut it off: an HTTP
    /// request, until it is answered (a `202` hands the work to a worker, which learns of a cancellation from its
    /// next report's 409: [`cancelled_once_handed_out`]).
    stop_awaits_answer: bool,
}

impl AttemptControl {
    /// A handle for an attempt that must also stop when `leader` (the exclusive Lease) stops being current.
    pub fn under(leader: Option<Arc<Keeper>>) -> Self {
        AttemptControl { leader, ..Default::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the leadership the attempt was claimed under (if any) still holds.
    fn leader_current(&self) -> bool {
        self.leader.as_ref().is_none_or(|k| k.is_current())
    }

    /// Whether the leadership the attempt was claimed under (if any) still holds, or no longer matters.
    fn leading(&self) -> bool {
        self.state().out_of_reach || self.leader_current()
    }

    /// Just before the attempt's work starts: `Some(reason)` if it must not start (this replica is shutting down,
    /// or the leadership it was claimed under has ended), else mark it `out_of_reach` if its work leaves the
    /// process, and whether a later cancellation waits for its answer (`stop_awaits_answer`). A cancellation or
    /// deletion is not refused here: the attempt then ends as such at once.
    fn begin(&self, out_of_reach: bool, stop_awaits_answer: bool) -> Option<StopReason> {
        let mut state = self.state();
        if let Some(reason @ (StopReason::Shutdown | StopReason::NotLeader)) = state.reason {
            return Some(reason);
        }
        if !self.leader_current() {
            return Some(StopReason::NotLeader);
        }
        state.out_of_reach = out_of_reach && state.reason.is_none();
        state.stop_awaits_answer = state.out_of_reach && stop_awaits_answer;
        None
    }

    /// The leadership the attempt was claimed under has ended: stop it, unless its work is already out of reach.
    pub fn leadership_ended(&self) {
        let mut state = self.state();
        if !state.out_of_reach {
            state.reason.get_or_insert(StopReason::NotLeader);
            self.token.cancel();
        }
    }

    fn out_of_reach(&self) -> bool {
        self.state().out_of_reach
    }

    /// Resolves once the leadership the attempt was claimed under is gone (never without the exclusive strategy,
    /// nor once the attempt is out of reach).
    async fn leadership_lost(&self) {
        if self.leader.is_none() || self.out_of_reach() {
            return std::future::pending().await;
        }
        while self.leading() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop the attempt; the first reason given wins. A cancellation of an attempt whose work is out of reach and
    /// answers with its outcome (an HTTP request sent) waits for that answer, within the attempt's limit: closing the
    /// connection would not stop the endpoint, and the attempt's cluster slot and concurrency key would go to another
    /// job while it still works. An answer that is a success is kept (the work is done); any other is recorded as
    /// the cancellation. A deletion does not wait (the job's claim Lease goes with it): its attempt ends unrecorded,
    /// and its slot and key are left disowned, taken by others only once they have aged a lease duration.
    pub fn stop(&self, reason: StopReason) {
        let mut state = self.state();
        let first = state.reason.is_none();
        state.reason.get_or_insert(reason);
        if reason == StopReason::Shutdown {
            self.shutdown.cancel();
        }
        if state.stop_awaits_answer && reason.cancels() {
            if first {
                info!(?reason, "the attempt's request is out of reach: waiting for its answer before it ends");
            }
            return;
        }
        self.token.cancel();
    }

    fn reason(&self) -> Option<StopReason> {
        self.state().reason
    }

    /// The job as the dispatcher sees it now. A spec edited since the claim (a newer `metadata.generation`) is the
    /// one the attempt is bound and judged by: `timeoutSeconds`, `attemptTimeoutSeconds` and `retry` raised on a
    /// running job (the admission webhook lets them through) apply to the attempt already running, as they would to
    /// an adopted one, instead of ending it by the limits it was claimed under and saying so in words its spec
    /// contradicts.
    pub fn seen(&self, job: &Arc<BackgroundJob>) {
        let mut edited = self.edited.lock().unwrap_or_else(|e| e.into_inner());
        let newer = edited.as_ref().is_none_or(|e| e.metadata.generation < job.metadata.generation);
        if newer {
            *edited = Some(job.clone());
            self.limits_edited.notify_one();
        }
    }

    /// `claimed` (the job as its claim wrote it) with the spec edited since, if any (see [`AttemptControl::seen`]).
    fn judged(&self, claimed: &BackgroundJob) -> BackgroundJob {
        let edited = self.edited.lock().unwrap_or_else(|e| e.into_inner());
        let mut judged = claimed.clone();
        if let Some(e) = edited.as_ref().filter(|e| e.metadata.generation > claimed.metadata.generation) {
            // Only the limits: the cache's copy is slimmed (`queue::slim`), and the rest is not the webhook's to let
            // through.
            judged.spec.timeout_seconds = e.spec.timeout_seconds;
            judged.spec.attempt_timeout_seconds = e.spec.attempt_timeout_seconds;
            judged.spec.retry = e.spec.retry.clone();
        }
        judged
    }

    /// Resolves when the attempt's limit passes, by the spec as edited since the claim: whether it was the job's
    /// deadline (else `attemptTimeoutSeconds`, as given).
    async fn limit_passed(&self, claimed: &BackgroundJob, now: impl Fn() -> jiff::Timestamp) -> (bool, i64) {
        loop {
            let judged = self.judged(claimed);
            let (left, is_deadline) = attempt_limit(&judged, now());
            tokio::select! {
                _ = tokio::time::sleep(left) => {
                    return (is_deadline, judged.spec.attempt_timeout_seconds.unwrap_or(0));
                }
                _ = self.limits_edited.notified() => {}
            }
        }
    }
}

impl StopReason {
    /// Whether the attempt is to end `Cancelled`: the work is not to be done (see [`AttemptControl::stop`]).
    fn cancels(self) -> bool {
        matches!(self, StopReason::Cancelled(_))
    }
}

/// The `lastError` of an attempt stopped as cancelled, `by` saying who asked ([`BackgroundJob::cancellation`]).
fn cancelled_during(by: &str, attempt: i32) -> String {
    format!("{by} during attempt {attempt}")
}

/// Whether `job`, as last seen, asks its running attempt to stop ([`BackgroundJob::cancellation`]).
pub fn stop_asked(job: &BackgroundJob) -> Option<StopReason> {
    job.cancellation().map(StopReason::Cancelled)
}

/// Observes the execution time into the run-duration histogram when dropped (finished, cancelled or lost).
struct RunTimer<'a>(Instant, &'a prometheus_client::metrics::histogram::Histogram);

impl Drop for RunTimer<'_> {
    fn drop(&mut self) {
        self.1.observe(self.0.elapsed().as_secs_f64());
    }
}

/// How the execution part of an attempt ended.
enum Ending {
    Finished(AttemptResult),
    /// `attemptTimeoutSeconds` passed while the attempt ran; why its Pod had not started, if it had not.
    AttemptTimedOut(i64, Option<String>),
    /// The job's own deadline (`timeoutSeconds` since creation) passed while the attempt ran; why its Pod had not
    /// started, if it had not.
    DeadlineReached(Option<String>),
    Stopped(StopReason),
    /// Stopped (shutdown, or the leadership it was claimed under ended) before it started: nothing ran, no Pod either.
    NotStarted(StopReason),
    LeaseLost,
}

/// Which limit bounds an attempt that starts now: `attemptTimeoutSeconds` or the job's deadline, whichever is first.
fn attempt_limit(job: &BackgroundJob, now: Timestamp) -> (Duration, bool) {
    let created = job.counted_from(now);
    let to_deadline = retry::deadline(&job.spec, created).duration_since(now);
    let to_deadline = Duration::try_from(to_deadline).unwrap_or(Duration::ZERO);
    // An adopted Pod attempt keeps its start time, so its attempt timeout counts from when it really started.
    let started = job.status.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0).unwrap_or(now);
    let to_attempt_timeout = job.spec.attempt_timeout_seconds.map(|s| {
        let end = started.checked_add(jiff::SignedDuration::from_secs(s.max(1))).unwrap_or(Timestamp::MAX);
        Duration::try_from(end.duration_since(now)).unwrap_or(Duration::ZERO)
    });
    match to_attempt_timeout {
        Some(t) if t < to_deadline => (t, false),
        _ => (to_deadline, true),
    }
}

/// For [`AttemptControl::begin`]: whether the attempt's work leaves the process (an HTTP request, sent only by an
/// attempt that runs no Pod), and whether a cancellation waits for its answer: for any request sent, also one that
/// hands out a report URL (an endpoint that works before it answers `200` never reports: before, a cancellation cut
/// such a request off whenever reports were on, the chart's default, and its key went to the next job while the
/// endpoint still worked); not for an adoption that only waits for a worker's report (its worker learns of a
/// cancellation from its next report's 409).
fn reach(job: &BackgroundJob) -> (bool, bool) {
    let http_request = job.spec.http.is_some() && job.spec.template.is_none();
    (http_request, http_request && !crate::report::awaits_report(job))
}

/// Resolves once a cancellation that waited for the request's answer ([`AttemptControl::stop`]) may end the
/// attempt: the answer was a `202`, so the work is now its worker's, which learns of the cancellation from its next
/// report's 409. Never for work that is not an HTTP request.
async fn cancelled_once_handed_out(control: &AttemptControl, report: &crate::report::Reporter) {
    if !control.out_of_reach() {
        return std::future::pending().await;
    }
    while !(report.awaiting() && control.reason().is_some_and(StopReason::cancels)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Words for a caught panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Run a claimed attempt to its end and record the outcome. Never panics on API errors: anything it cannot record
/// is left to the Lease expiring and another replica taking over.
pub async fn run(worker: Arc<Worker>, claimed: Claimed, control: Arc<AttemptControl>) {
    let job = &claimed.job;
    let span = tracing::info_span!("attempt", job = %format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()),
        attempt = claimed.fence.attempt, worker = %worker.identity);
    run_inner(worker, claimed, control).instrument(span).await
}

async fn run_inner(worker: Arc<Worker>, claimed: Claimed, control: Arc<AttemptControl>) {
    let Claimed { job, lease, fence, took_over, extras, tenure } = claimed;
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<BackgroundJob> = Api::namespaced(worker.client.clone(), &ns);
    // The claim and its extra Leases (cluster slot, concurrency key) are vouched for by the replica's tenure and
    // confirmed by its one list per renew interval: losing any of them loses the claim.
    let leases = std::iter::once(lease).chain(extras).collect();
    let hold = worker.held.hold(worker.client.clone(), leases, tenure, worker.timing);
    let ended = run_claimed(&worker, &jobs, job, fence, took_over, &control, &hold).await;
    hold.give_back(|lease| give_back(ended, lease.labels().contains_key(crate::limits::SLOT_LABEL))).await;
}

/// How an attempt's Leases are given back once it has ended.
fn give_back(ended: Handover, slot: bool) -> Give {
    match ended {
        // Recorded: the claim is over. A slot is left vacant rather than deleted: an absent slot is waited out (it
        // may have been deleted by hand under a running attempt), a vacant one is free at once.
        Handover::Recorded if slot => Give::Vacate,
        Handover::Recorded => Give::Release,
        // A Pod that runs on still counts against the cluster cap and its concurrency key: its Leases stay, vouched
        // for by no one, so the adopter takes the same ones over once they have aged a lease duration (see
        // `claim::adopts`).
        Handover::PodRunsOn => Give::Disown,
        // Not recorded (the claim was lost, or the outcome write did not go through): whoever takes over waits the
        // Leases out a lease duration, from now.
        Handover::Unrecorded => Give::Disown,
    }
}

/// What is left once the attempt runner returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Handover {
    /// The outcome is recorded.
    Recorded,
    /// The outcome is not recorded (claim lost, or the write failed); nothing runs.
    Unrecorded,
    /// A Pod attempt (or one waiting for its worker's report) was handed over, or its claim lost, while its work
    /// may go on.
    PodRunsOn,
}

#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    worker: &Arc<Worker>,
    jobs: &Api<BackgroundJob>,
    job: BackgroundJob,
    fence: status::Fence,
    took_over: Option<String>,
    control: &AttemptControl,
    hold: &Hold,
) -> Handover {
    let holds_claim = || hold.is_current();
    let current = || holds_claim() && control.leading();
    let ns = job.namespace().unwrap_or_default();
    if let Some(note) = &took_over {
        worker.metrics.takeovers.inc();
        worker.event(&job, EventType::Warning, "TakenOver", note.clone());
    }
    worker.event(
        &job,
        EventType::Normal,
        "Claimed",
        format!("attempt {} claimed by {}", fence.attempt, worker.identity),
    );
    info!("attempt started");

    if !holds_claim() {
        // The claim was already stale when this replica learnt of it (a pause, or its tenure ended while the claim's
        // write was answered): the handler never starts.
        worker.metrics.stale_results_discarded.inc();
        if crate::claim::adopted(&job, fence.attempt) {
            warn!("the claim was stale before the adoption could start; its work goes on and will be adopted again");
            return Handover::PodRunsOn;
        }
        warn!("the claim was stale before the attempt could start; it does not run and is handed back unstarted");
        return hand_back_stale(worker, jobs, &job, &fence).await;
    }
    if let Some(reason) = stop_asked(&job) {
        control.stop(reason);
    }
    // The handler's token: a child of the stop token, and cancelled on every other ending too (below).
    let cancel = control.token.child_token();
    let report = crate::report::Reporter::for_attempt(worker.clone(), jobs.clone(), &job, &fence);
    let ctx = JobContext {
        namespace: ns.clone(),
        name: job.name_any(),
        uid: fence.uid.clone(),
        job_name: job.spec.job_name.clone(),
        attempt: fence.attempt,
        worker: worker.identity.clone(),
        leases: hold.leases().iter().skip(1).map(|l| l.name_any()).collect(),
        cancel: cancel.clone(),
        report: report.clone(),
    };
    let started = worker.clock.now();
    // A Pod that does not stop once deleted (its node unreachable) keeps this attempt's slots: said once per attempt,
    // whether it was deleted while the attempt ran (an eviction) or after it ended (the stop below).
    let not_stopping = PodNotStopping { worker, job: &job, told: AtomicBool::new(false) };
    let tell_not_stopping = |pod: &str| not_stopping.tell(pod);
    let cluster_now = || worker.clock.now();
    // A Pod that cannot start is said once per attempt, and why is kept for the outcome of an attempt that times out.
    let not_starting = PodNotStarting { worker, job: &job, state: Mutex::default() };
    let tell_not_starting = |pod: &str, why: Option<&str>| not_starting.tell(pod, why);
    let watchers = executor::pod::Watchers {
        after: worker.timing.duration,
        now: &cluster_now,
        not_stopping: &tell_not_stopping,
        not_starting: &tell_not_starting,
    };
    let (out_of_reach, stop_awaits_answer) = reach(&job);
    let ending = if let Some(reason) = control.begin(out_of_reach, stop_awaits_answer) {
        Ending::NotStarted(reason)
    } else {
        let _log = worker.invocations.start(&job, fence.attempt, &worker.identity);
        let _timer = RunTimer(Instant::now(), &worker.metrics.run_duration);
        let exec = executor::execute(&job, ctx, worker, started, &watchers);
        // A panicking handler fails its attempt like any other permanent error; the replica carries on.
        let mut exec = Box::pin(std::panic::AssertUnwindSafe(exec).catch_unwind().map(|r| {
            r.unwrap_or_else(|p| {
                AttemptResult::Permanent(format!("the handler crashed (a panic): {}", panic_message(&*p)))
            })
        }));
        // The lease guard: the executor is polled only while the claim is current.
        let guarded = poll_fn(|cx| if current() { exec.as_mut().poll(cx).map(Some) } else { Poll::Ready(None) });
        let ending = tokio::select! {
            biased;
            _ = control.token.cancelled() => Ending::Stopped(control.reason().unwrap_or(StopReason::Shutdown)),
            r = guarded => match r {
                Some(result) => Ending::Finished(result),
                None if holds_claim() => Ending::Stopped(StopReason::NotLeader),
                None => Ending::LeaseLost,
            },
            (is_deadline, secs) = control.limit_passed(&job, || worker.clock.now()) => {
                if is_deadline {
                    Ending::DeadlineReached(not_starting.why())
                } else {
                    Ending::AttemptTimedOut(secs, not_starting.why())
                }
            }
            _ = hold.lost() => Ending::LeaseLost,
            _ = control.leadership_lost() => Ending::Stopped(StopReason::NotLeader),
            _ = cancelled_once_handed_out(control, &report) => {
                Ending::Stopped(control.reason().unwrap_or(StopReason::Shutdown))
            }
        };
        cancel.cancel();
        ending
    };
    // An HTTP request the stop cut off before its answer came may still run at the endpoint.
    let unanswered = control.out_of_reach() && matches!(ending, Ending::Stopped(_));
    // A cancellation waiting for that answer and cut short by a shutdown is handed over like any shutdown: recording
    // it now would give the attempt's slot and key to others while the request may run on. The replica that takes
    // the job over once its Leases have aged records the cancellation.
    let ending =
        if unanswered && control.shutdown.is_cancelled() { Ending::Stopped(StopReason::Shutdown) } else { ending };
    // A handler that noticed a stop request fails with something like "cancelled"; the stop is the real reason.
    // Only a success that raced the stop is kept: the work is done.
    let mut ending = match (ending, control.reason()) {
        (Ending::Finished(r @ (AttemptResult::Succeeded | AttemptResult::Reported)), _) => Ending::Finished(r),
        (Ending::Finished(_) | Ending::AttemptTimedOut(..) | Ending::DeadlineReached(_), Some(reason)) => {
            Ending::Stopped(reason)
        }
        (ending, _) => ending,
    };
    let is_pod = job.spec.template.is_some();
    // Work that goes on without this replica (a Pod, a worker that will report, an HTTP request left unanswered)
    // is handed over, not lost: the job stays `Running` and whoever takes over waits its Leases out first.
    let runs_on = is_pod || report.awaiting() || unanswered;
    if matches!(ending, Ending::LeaseLost) || !holds_claim() {
        worker.metrics.stale_results_discarded.inc();
        warn!("claim lease lost: the attempt was stopped and its outcome is not recorded; another replica takes over");
        return if runs_on { Handover::PodRunsOn } else { Handover::Unrecorded };
    }
    // A Pod outlives our interest in it only when it finished or when the attempt is handed over.
    let pod_must_go = matches!(
        ending,
        Ending::AttemptTimedOut(..)
            | Ending::DeadlineReached(_)
            | Ending::Stopped(StopReason::Cancelled(_) | StopReason::Deleted)
    );
    if is_pod {
        // An attempt whose Pod finished, or went away (deleted by anyone), may still have a create of unknown outcome
        // in flight that makes the Pod again (see `executor::pod::stop`): this replica's own, and for an adopted
        // attempt an earlier holder's, which can land only while no finished Pod keeps the name. Only a success
        // settles for that: no attempt follows it, and every rolling restart would hold adopted Pods' successes
        // otherwise. Any other ending waits for every create whatever holds the name: a finished Pod removed once
        // the outcome is recorded would let one make the Pod again, beside the retry's.
        let late = worker.pods.late_creates(&job, fence.attempt, worker.clock.now());
        let succeeded = matches!(ending, Ending::Finished(AttemptResult::Succeeded | AttemptResult::Reported));
        let late = if succeeded { late } else { late.whatever_holds_the_name() };
        let may_land = matches!(ending, Ending::Finished(_)) && late.after(tokio::time::Instant::now());
        if pod_must_go || may_land {
            // Stop its Pod while the claim is ours, and any Pod a create still in flight makes (the ending cut it
            // off, a create whose answer was lost was sent again, or an earlier holder's, adopted): no Pod of the
            // attempt may run once its outcome is recorded, nor beside a retry's. A shutdown meanwhile hands the
            // attempt over: its adopter, or a replica settling it, does the same.
            let may_act = || hold.is_current();
            // A Pod of the job's that the attempt cannot have made (made ahead under its name) did not do its work.
            let made = worker.pods.maker(&job, fence.attempt);
            let mut pod_succeeded = false;
            let handed_over = tokio::select! {
                biased;
                _ = hold.lost() => {
                    warn!(
                        "the claim ran out while the attempt's pod was stopping, or a create of it could still land; \
                         the adopter finishes"
                    );
                    true
                }
                _ = control.shutdown.cancelled() => {
                    warn!(
                        "shutting down while the attempt's pod was stopping, or a create of it could still land; \
                         handed over"
                    );
                    true
                }
                succeeded = executor::pod::stop(&worker.client, &job, fence.attempt, late, &may_act, &watchers, &made) => {
                    pod_succeeded = succeeded;
                    false
                }
            };
            if handed_over {
                return Handover::PodRunsOn;
            }
            // The Pod had succeeded before the attempt's time ran out, its end not yet shown by this replica's Pod
            // watch (a lagging one): the work is done, and recording a timeout would run it again.
            if pod_succeeded && matches!(ending, Ending::AttemptTimedOut(..) | Ending::DeadlineReached(_)) {
                info!("the attempt's pod had succeeded before its time ran out: recorded as succeeded");
                ending = Ending::Finished(AttemptResult::Succeeded);
            }
        }
    }
    // A Pod reported while the attempt ran and stopped since, or after the ending: said once for both.
    not_stopping.done();
    // The Pod (or the worker that will report, or the unanswered request) runs on without us: give up the claim but
    // not the attempt. Another replica sees the Lease disowned, waits a lease duration, and adopts the attempt. An
    // adoption stopped before it started has its Pod or its reporting worker at work all the same (which `runs_on`,
    // judged from what this replica started, does not know): handed over too, never requeued, which would start the
    // next attempt beside it.
    let adoption_not_started = matches!(ending, Ending::NotStarted(_)) && crate::claim::adopted(&job, fence.attempt);
    let stopped = matches!(ending, Ending::Stopped(StopReason::Shutdown | StopReason::NotLeader));
    if adoption_not_started {
        info!("adoption stopped before it started: handed over, its work goes on and will be adopted again");
        return Handover::PodRunsOn;
    }
    if runs_on && stopped {
        info!("attempt handed over: its work goes on and will be adopted");
        return Handover::PodRunsOn;
    }
    // Judged by its spec as edited while it ran (a raised `retry.maxAttempts`, say), written as the claim left it.
    let judged = control.judged(&job);
    let record = record(worker, jobs, &judged, &fence, ending, report.take_result());
    // The outcome is written (and sent again while the apiserver cannot take it) for as long as the attempt's claim
    // holds: its tenure and Leases confirmed within the renew deadline, whatever happens to the job's writes. Past
    // that another replica may take over. Not a deadline fixed when the write began: an apiserver that serves Leases
    // again but not yet the job's resource would have the outcome dropped, and the work done twice. A write answered
    // as it lapses counts (`biased`: its Leases are then given back, not left to expire).
    let recorded = tokio::select! {
        biased;
        recorded = record => match recorded {
            Ok(recorded) => recorded,
            Err(e) => {
                warn!(error = %e, "could not record the attempt's outcome; the lease expires and another replica retries");
                false
            }
        },
        _ = hold.lost() => {
            warn!("the attempt's claim lapsed before its outcome was recorded; the lease expires and another replica retries");
            false
        }
        _ = tokio::time::sleep(OUTCOME_PATIENCE) => {
            warn!(patience = ?OUTCOME_PATIENCE, "the attempt's outcome could not be recorded in time; the lease expires and \
                another replica retries");
            false
        }
    };
    if recorded { Handover::Recorded } else { Handover::Unrecorded }
}

/// How long an attempt's outcome is sent again while the apiserver cannot take it (and its claim holds): past an
/// apiserver restart, but not for ever when the failure that looks passing is not (a status webhook answering 500,
/// a CRD version no longer served), which would hold the attempt's slot, key and claim as long as the replica lives.
const OUTCOME_PATIENCE: Duration = Duration::from_secs(60);

/// Record the outcome. `Ok(true)`: recorded, the Lease can go. `Ok(false)`: nothing to release (job gone, or moved on).
async fn record(
    worker: &Worker,
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    fence: &status::Fence,
    ending: Ending,
    result: Option<serde_json::Value>,
) -> crate::Result<bool> {
    let now = worker.clock.now();
    let created = job.counted_from(now);
    let verdict = match ending {
        Ending::Finished(AttemptResult::Reported) => {
            info!("attempt ended by its worker's report");
            return Ok(true);
        }
        Ending::Finished(AttemptResult::NotStarted(why)) => {
            let handed_back = job.status.as_ref().map_or(0, |s| s.unstarted_attempts);
            let at = retry::not_before(now, retry::room_wait(handed_back));
            let why = format!("{why}; tried again at {at}");
            return hand_back_unstarted(worker, jobs, job, fence, &why, Some(at)).await;
        }
        Ending::Finished(result) => retry::verdict(&job.spec, created, job.attempts_spent(fence.attempt), result, now),
        Ending::DeadlineReached(not_started) => Verdict::Abandon(format!(
            "attempt {} was still running when the job's timeout of {}s since creation passed; it was stopped{}",
            fence.attempt,
            job.spec.timeout_seconds,
            had_not_started(not_started)
        )),
        Ending::AttemptTimedOut(secs, not_started) => retry::verdict(
            &job.spec,
            created,
            job.attempts_spent(fence.attempt),
            AttemptResult::Retryable(format!(
                "attempt {} exceeded attemptTimeoutSeconds ({secs}s) and was cancelled{}",
                fence.attempt,
                had_not_started(not_started)
            )),
            now,
        ),
        Ending::Stopped(StopReason::Deleted) => {
            info!("job deleted: attempt stopped");
            return Ok(false);
        }
        Ending::Stopped(StopReason::Cancelled(by)) => {
            let why = cancelled_during(by, fence.attempt);
            let written = status::write_outcome(jobs, job, fence, |s| {
                status::finish(s, Phase::Cancelled, Some(why.clone()), now)
            })
            .await?;
            let written = matches!(written, Fenced::Written(_));
            // Told only when recorded: a job removed meanwhile (its finalizer gone) has no outcome.
            if written {
                worker.metrics.count_outcome(Phase::Cancelled);
                worker.event(job, EventType::Normal, "Cancelled", format!("attempt {} cancelled", fence.attempt));
            }
            return Ok(written);
        }
        Ending::Stopped(reason @ (StopReason::Shutdown | StopReason::NotLeader)) => {
            let why = if reason == StopReason::Shutdown { "shut down" } else { "lost the exclusive lease" };
            let msg = format!("attempt {} was interrupted: worker {} {why}", fence.attempt, worker.identity);
            let written =
                status::write_outcome(jobs, job, fence, |s| status::requeue(s, None, msg.clone(), now)).await?;
            info!("attempt handed back to the queue");
            return Ok(handed_back(worker, job, written, msg));
        }
        Ending::NotStarted(reason) => {
            let why = if reason == StopReason::Shutdown { "shut down" } else { "lost the exclusive lease" };
            let why = format!("{why} right after claiming it");
            return hand_back_unstarted(worker, jobs, job, fence, &why, None).await;
        }
        Ending::LeaseLost => return Ok(false),
    };
    let (written, phase) = match &verdict {
        Verdict::Succeed => {
            let succeed = |result: Option<serde_json::Value>| {
                status::write_outcome(jobs, job, fence, move |s| {
                    status::finish(s, Phase::Succeeded, None, now);
                    if result.is_some() {
                        s.result = result.clone();
                    }
                })
            };
            let written = match succeed(result.clone()).await {
                // A result is kept whatever else gives way, but one that cannot fit beside the job's spec would
                // leave the outcome unrecorded and the handler run again: the run counts, the result goes, and
                // says so.
                Err(e) if e.is_too_large_for_etcd() && result.is_some() => {
                    let written = succeed(None).await?;
                    if matches!(written, Fenced::Written(_)) {
                        let note = format!(
                            "attempt {} succeeded, but its result does not fit beside the job's spec (etcd: request \
                             is too large): the result was dropped",
                            fence.attempt
                        );
                        warn!("{note}");
                        worker.event(job, EventType::Warning, "ResultDropped", note);
                    }
                    written
                }
                written => written?,
            };
            (written, Phase::Succeeded)
        }
        Verdict::RetryAt { at, reason } => (
            status::write_outcome(jobs, job, fence, |s| status::requeue(s, Some(*at), reason.clone(), now)).await?,
            Phase::Waiting,
        ),
        Verdict::Fail(reason) => (
            status::write_outcome(jobs, job, fence, |s| status::finish(s, Phase::Failed, Some(reason.clone()), now))
                .await?,
            Phase::Failed,
        ),
        Verdict::Abandon(reason) => (
            status::write_outcome(jobs, job, fence, |s| status::finish(s, Phase::Abandoned, Some(reason.clone()), now))
                .await?,
            Phase::Abandoned,
        ),
    };
    if matches!(written, Fenced::Stale) {
        worker.metrics.stale_results_discarded.inc();
        warn!("the job moved on (another worker or attempt): this attempt's outcome is discarded");
        return Ok(false);
    }
    worker.metrics.count_outcome(phase);
    match verdict {
        Verdict::Succeed => {
            info!("attempt succeeded");
            worker.event(job, EventType::Normal, "Succeeded", format!("attempt {} succeeded", fence.attempt));
        }
        Verdict::RetryAt { at, reason } => {
            info!(%reason, next = %at, "attempt failed; retry scheduled");
            worker.event(
                job,
                EventType::Warning,
                "Retrying",
                format!("attempt {} failed: {reason}; next attempt at {at}", fence.attempt),
            );
        }
        Verdict::Fail(reason) => {
            warn!(%reason, "job failed");
            worker.event(job, EventType::Warning, "Failed", reason);
        }
        Verdict::Abandon(reason) => {
            warn!(%reason, "job abandoned");
            worker.event(job, EventType::Warning, "Abandoned", reason);
        }
    }
    Ok(true)
}

/// Put an attempt that never started back in the queue, not counted against the job's retries (`unstartedAttempts`).
/// Fenced on the claim, so it writes nothing once the job has moved on (another replica took it over).
async fn hand_back_unstarted(
    worker: &Worker,
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    fence: &status::Fence,
    why: &str,
    at: Option<jiff::Timestamp>,
) -> crate::Result<bool> {
    let msg = status::not_started(fence.attempt, &worker.identity, why);
    let now = worker.clock.now();
    let written =
        status::write_outcome(jobs, job, fence, |s| status::requeue_unstarted(s, msg.clone(), at, now)).await?;
    info!("attempt handed back to the queue before it started");
    Ok(handed_back(worker, job, written, msg))
}

/// An attempt whose claim was stale as it was about to start (it ran nothing) is handed back unstarted, as one stopped
/// by a shutdown is: left as it was, it was found orphaned a lease duration later and charged a lost attempt, and on
/// its last attempt the job failed without ever running. The claim no longer holds, so the write is not bounded by
/// it but by a lease duration (after which another replica takes the job over anyway); the fence keeps it from
/// landing over such a takeover, and this replica does not claim the job again before this returns.
async fn hand_back_stale(
    worker: &Worker,
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    fence: &status::Fence,
) -> Handover {
    let why = "found its claim stale before starting it";
    match tokio::time::timeout(worker.timing.duration, hand_back_unstarted(worker, jobs, job, fence, why, None)).await {
        Ok(Ok(true)) => Handover::Recorded,
        Ok(Ok(false)) => Handover::Unrecorded,
        Ok(Err(e)) => {
            warn!(error = %e, "could not hand the unstarted attempt back; the lease expires and another replica retries");
            Handover::Unrecorded
        }
        Err(_) => {
            warn!("handing the unstarted attempt back timed out; the lease expires and another replica retries");
            Handover::Unrecorded
        }
    }
}

/// Says once per attempt that its Pod, deleted, has not stopped a lease duration past its grace period (a
/// `PodNotStopping` Warning Event, a log line), and counts it in `bgjobs_pods_not_stopping` until the holder is done
/// waiting for its Pods (the attempt's outcome is about to be recorded, or it is handed over).
struct PodNotStopping<'a> {
    worker: &'a Worker,
    job: &'a BackgroundJob,
    told: AtomicBool,
}

impl PodNotStopping<'_> {
    fn tell(&self, pod: &str) {
        if self.told.swap(true, Ordering::Relaxed) {
            return;
        }
        self.worker.metrics.pods_not_stopping.inc();
        warn!(%pod, "the attempt's pod was deleted and has not stopped a lease duration past its grace period");
        let note = executor::pod::not_stopping_note(pod);
        self.worker.event(self.job, EventType::Warning, "PodNotStopping", note);
    }

    /// The wait has ended.
    fn done(&self) {
        if self.told.swap(false, Ordering::Relaxed) {
            self.worker.metrics.pods_not_stopping.dec();
        }
    }
}

/// Tells that an attempt's Pod cannot start (an image that cannot be pulled, a missing Secret, no node): a Warning
/// Event, `PodNotStarting`, once per attempt (the kubelet's reasons alternate while it retries a pull); why, while it
/// holds, goes into the outcome of an attempt that then times out, which would otherwise say only "still running".
struct PodNotStarting<'a> {
    worker: &'a Worker,
    job: &'a BackgroundJob,
    state: Mutex<NotStarting>,
}

impl PodNotStarting<'_> {
    fn tell(&self, pod: &str, why: Option<&str>) {
        let first = self.state.lock().unwrap_or_else(|e| e.into_inner()).note(pod, why);
        if let Some(said) = first {
            warn!(%pod, why = %said, "the attempt's pod cannot start");
            let note = format!("{said}; waiting, until the attempt's timeout");
            self.worker.event(self.job, EventType::Warning, "PodNotStarting", note);
        }
    }

    fn why(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).why.clone()
    }
}

/// What an attempt's Pod last said about starting.
#[derive(Default)]
struct NotStarting {
    /// Why it cannot start; None if it never said, or no longer says (a node was added, a pull worked).
    why: Option<String>,
    /// Whether it was told (once per attempt).
    told: bool,
}

impl NotStarting {
    /// Note what the Pod `pod` says now; returns what to tell, the first time it cannot start.
    fn note(&mut self, pod: &str, why: Option<&str>) -> Option<String> {
        self.why = why.map(|why| format!("pod {pod}: {why}"));
        let first = self.why.is_some() && !self.told;
        self.told |= first;
        if first { self.why.clone() } else { None }
    }
}

/// Whether an interrupted attempt was handed back to the queue, saying so in an `Interrupted` Event: the job's
/// `lastError` says it too, but not when the status had to be stored bare ([`status::Room::Bare`]), whose conditions
/// send the reader to the Events.
fn handed_back(worker: &Worker, job: &BackgroundJob, written: Fenced, why: String) -> bool {
    let written = matches!(written, Fenced::Written(_));
    if written {
        worker.event(job, EventType::Warning, "Interrupted", why);
    }
    written
}

/// The end of an attempt's timeout message: why its Pod had not started, if it had not.
fn had_not_started(why: Option<String>) -> String {
    why.map(|w| format!(" (its pod had not started: {w})")).unwrap_or_default()
}

impl Drop for PodNotStopping<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackgroundJobSpec, BackgroundJobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// A Pod that could not start, then did (a node was added), and timed out running: its outcome does not say it
    /// had not started. Told once per attempt, whatever it says after.
    #[test]
    fn an_attempt_is_judged_by_the_limits_of_a_spec_edited_since_its_claim_and_by_nothing_else_of_it() {
        let job = |generation: i64, timeout: i64, image: &str| {
            let mut j: BackgroundJob = serde_json::from_value(serde_json::json!({
                "apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
                "metadata": {"name": "j", "namespace": "ns", "generation": generation},
                "spec": {"jobName": "x", "timeoutSeconds": timeout, "retry": {"maxAttempts": generation},
                    "template": {"spec": {"containers": [{"name": "main", "image": image}]}}}}))
            .unwrap();
            j.spec.args = Some(crate::api::Args::from(serde_json::json!({"n": generation})));
            Arc::new(j)
        };
        let claimed = job(2, 60, "claimed");
        let control = AttemptControl::default();
        control.seen(&job(1, 30, "older"));
        assert_eq!(
            control.judged(&claimed).spec,
            claimed.spec,
            "an older version the cache still shows changes nothing"
        );
        control.seen(&job(3, 600, "edited"));
        let judged = control.judged(&claimed);
        assert_eq!((judged.spec.timeout_seconds, judged.spec.retry.max_attempts), (600, Some(3)));
        assert_eq!(
            (judged.spec.args.clone(), judged.spec.template.clone()),
            (claimed.spec.args.clone(), claimed.spec.template.clone())
        );
        control.seen(&job(2, 5, "stale"));
        assert_eq!(
            control.judged(&claimed).spec.timeout_seconds,
            600,
            "a later look at an older version undoes nothing"
        );
    }

    #[test]
    fn a_pod_that_could_not_start_then_did_is_not_said_to_have_not_started() {
        let mut state = NotStarting::default();
        assert_eq!(
            state.note("j-1", Some("not scheduled: 0/1 nodes")).as_deref(),
            Some("pod j-1: not scheduled: 0/1 nodes")
        );
        assert_eq!(state.note("j-1", Some("container main: ErrImagePull")), None, "told once per attempt");
        assert_eq!(state.why.as_deref(), Some("pod j-1: container main: ErrImagePull"));
        assert_eq!(state.note("j-1", None), None);
        assert_eq!(had_not_started(state.why.clone()), "", "it started");
        state.note("j-1", Some("container main: ImagePullBackOff"));
        assert_eq!(
            had_not_started(state.why.clone()),
            " (its pod had not started: pod j-1: container main: ImagePullBackOff)"
        );
    }

    fn job(spec: serde_json::Value, created: i64, started: Option<i64>) -> BackgroundJob {
        let mut j = BackgroundJob::new("j", serde_json::from_value::<BackgroundJobSpec>(spec).unwrap());
        j.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        j.status = Some(Box::new(BackgroundJobStatus {
            start_time: started.map(|s| Time(Timestamp::from_second(s).unwrap())),
            ..Default::default()
        }));
        j
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn an_attempt_is_bounded_by_the_jobs_deadline_when_it_has_no_attempt_timeout() {
        // Created within second 1000: its 20 s count from 1001, the latest it may have been made.
        let j = job(serde_json::json!({"jobName": "x", "timeoutSeconds": 20}), 1000, Some(1005));
        assert_eq!(attempt_limit(&j, at(1005)), (Duration::from_secs(16), true));
        assert_eq!(attempt_limit(&j, at(1030)), (Duration::ZERO, true), "already past it: stop at once");
    }

    #[test]
    fn the_attempt_timeout_counts_from_the_attempts_start_and_wins_when_earlier() {
        let j = job(serde_json::json!({"jobName": "x", "attemptTimeoutSeconds": 10}), 1000, Some(1004));
        assert_eq!(attempt_limit(&j, at(1006)), (Duration::from_secs(8), false), "an adopted attempt keeps its start");
    }

    #[test]
    fn a_panic_payload_becomes_words() {
        let p = std::panic::catch_unwind(|| panic!("bad input {}", 3)).unwrap_err();
        assert_eq!(panic_message(&*p), "bad input 3");
    }

    #[test]
    fn a_leadership_lost_before_the_work_starts_stops_it_and_one_lost_after_an_http_request_left_does_not() {
        let before = AttemptControl::default();
        before.leadership_ended();
        assert_eq!(
            before.begin(true, true),
            Some(StopReason::NotLeader),
            "nothing may start once the leadership ended"
        );

        let sent = AttemptControl::default();
        assert_eq!(sent.begin(true, true), None);
        sent.leadership_ended();
        assert!(!sent.token.is_cancelled() && sent.reason().is_none(), "a sent request is waited for");
        assert!(sent.leading());

        let local = AttemptControl::default();
        assert_eq!(local.begin(false, false), None);
        local.leadership_ended();
        assert!(local.token.is_cancelled() && local.reason() == Some(StopReason::NotLeader), "local work is stopped");
    }

    #[test]
    fn a_shutdown_before_the_work_starts_hands_it_back_unstarted_and_a_cancellation_ends_it_unsent() {
        let shutdown = AttemptControl::default();
        shutdown.stop(StopReason::Shutdown);
        assert_eq!(shutdown.begin(true, true), Some(StopReason::Shutdown));

        let cancelled = AttemptControl::default();
        cancelled.stop(StopReason::Cancelled(crate::api::CANCELLED_BY_USER));
        assert_eq!(cancelled.begin(true, true), None, "it ends as cancelled, at once");
        assert!(!cancelled.out_of_reach(), "and nothing was sent that could run on");
    }

    #[test]
    fn an_http_request_sent_is_waited_for_on_a_cancellation_whether_or_not_it_hands_out_a_report_url() {
        let spec = |extra: serde_json::Value| {
            let mut spec = serde_json::json!({"jobName": "j"});
            spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            BackgroundJob::new("j", serde_json::from_value(spec).unwrap())
        };
        let http = spec(serde_json::json!({"http": {"url": "http://127.0.0.1:1/"}}));
        assert_eq!(reach(&http), (true, true), "until its answer (a 202 hands the work to a worker)");
        let mut adopted = http.clone();
        adopted.status = Some(Box::new(crate::api::BackgroundJobStatus {
            phase: Some(crate::api::Phase::Running),
            awaiting_report: true,
            ..Default::default()
        }));
        assert_eq!(reach(&adopted), (true, false), "an adoption that only waits for a report sends nothing");
        let both = spec(serde_json::json!({"http": {"url": "http://127.0.0.1:1/"}, "template": {"spec": {}}}));
        assert_eq!(reach(&both), (false, false), "a Pod runs, not a request");
        assert_eq!(reach(&spec(serde_json::json!({}))), (false, false));
    }

    /// A job whose deletion waits is stopped as cancelled, and its record says why; a deletion outranks a cancel.
    #[test]
    fn a_running_job_is_stopped_when_cancelled_or_when_its_deletion_waits() {
        let mut j = BackgroundJob::new("j", serde_json::from_value(serde_json::json!({"jobName": "noop"})).unwrap());
        assert_eq!(stop_asked(&j), None);
        j.spec.cancel = true;
        assert_eq!(stop_asked(&j), Some(StopReason::Cancelled("cancelled by the user")));
        j.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(stop_asked(&j), Some(StopReason::Cancelled(crate::api::DELETION_REQUESTED)));
        let why = cancelled_during(crate::api::DELETION_REQUESTED, 2);
        assert!(why.starts_with(crate::api::DELETION_REQUESTED) && why.ends_with("during attempt 2"), "{why}");
        assert_eq!(cancelled_during(crate::api::CANCELLED_BY_USER, 2), "cancelled by the user during attempt 2");
    }

    #[test]
    fn a_cancellation_waits_for_a_sent_requests_answer_but_not_for_a_worker_that_reports_nor_a_deletion() {
        let sent = AttemptControl::default();
        assert_eq!(sent.begin(true, true), None);
        sent.stop(StopReason::Cancelled(crate::api::CANCELLED_BY_USER));
        assert!(!sent.token.is_cancelled(), "the request is not cut off, its answer is waited for");
        assert_eq!(
            sent.reason(),
            Some(StopReason::Cancelled(crate::api::CANCELLED_BY_USER)),
            "and the cancellation is what the attempt ends as"
        );
        sent.stop(StopReason::Shutdown);
        assert!(sent.token.is_cancelled() && sent.shutdown.is_cancelled(), "a shutdown meanwhile ends the wait");

        let deleted = AttemptControl::default();
        assert_eq!(deleted.begin(true, true), None);
        deleted.stop(StopReason::Deleted);
        assert!(deleted.token.is_cancelled(), "a deletion does not wait: the job's claim Lease goes with it");

        // A deletion held back by a finalizer cancels: the job and its claim Lease stay until the answer comes.
        let deleting = AttemptControl::default();
        assert_eq!(deleting.begin(true, true), None);
        deleting.stop(StopReason::Cancelled(crate::api::DELETION_REQUESTED));
        assert!(!deleting.token.is_cancelled(), "the request's answer is waited for");

        let by = [crate::api::CANCELLED_BY_USER, crate::api::DELETION_REQUESTED];
        for reason in by.map(StopReason::Cancelled).into_iter().chain([StopReason::Deleted]) {
            // A request handing out a report URL: its worker learns of the stop from its next report (409).
            let reporting = AttemptControl::default();
            assert_eq!(reporting.begin(true, false), None);
            reporting.stop(reason);
            assert!(reporting.token.is_cancelled(), "{reason:?}");

            let local = AttemptControl::default();
            assert_eq!(local.begin(false, true), None);
            local.stop(reason);
            assert!(local.token.is_cancelled(), "{reason:?}: work in this process is stopped at once");
        }
    }
}
