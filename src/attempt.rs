//! Running one claimed attempt: keep its Lease, run the executor, record the outcome under the fence.
//!
//! The executor's future is polled only while the Lease is current: every poll first checks that the last renewal
//! is younger than the renew deadline. A replica that was paused (SIGSTOP, a long GC, a frozen VM) past that
//! deadline therefore never resumes the work: the first thing it does on waking is drop it. The renew deadline is
//! shorter than the lease duration other replicas wait before taking over, so the two never overlap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::poll_fn;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::api::{BackgroundJob, Phase};
use crate::claim::Claimed;
use crate::executor::{self, JobContext};
use crate::lease;
use crate::retry::{self, AttemptResult, Verdict};
use crate::status::{self, Fenced};
use crate::worker::Worker;

/// Why a running attempt was stopped from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The user set `spec.cancel`.
    Cancelled,
    /// The job was deleted.
    Deleted,
    /// This replica is shutting down.
    Shutdown,
    /// This replica lost the exclusive-strategy Lease.
    NotLeader,
}

/// The dispatcher's handle on a running attempt.
#[derive(Debug, Default)]
pub struct AttemptControl {
    token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl AttemptControl {
    /// Stop the attempt; the first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        self.reason.lock().unwrap().get_or_insert(reason);
        self.token.cancel();
    }

    fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap()
    }
}

/// Keeps a claim Lease renewed and says whether it is still current.
struct Keeper {
    lease: Mutex<Lease>,
    last_renewed: Mutex<Instant>,
    lost: AtomicBool,
    renew_deadline: Duration,
}

impl Keeper {
    fn new(lease: Lease, renew_deadline: Duration) -> Self {
        Keeper {
            lease: Mutex::new(lease),
            last_renewed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
            renew_deadline,
        }
    }

    /// Current means: renewed within the renew deadline and never lost. Once lost, always lost.
    fn is_current(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        if self.last_renewed.lock().unwrap().elapsed() >= self.renew_deadline {
            self.lost.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    async fn renew_forever(&self, api: &Api<Lease>, worker: &Worker) {
        let interval = worker.timing.renew_interval;
        let mut wait = interval;
        loop {
            tokio::time::sleep(wait).await;
            if !self.is_current() {
                return;
            }
            let sent = Instant::now();
            let remaining = self.renew_deadline.saturating_sub(self.last_renewed.lock().unwrap().elapsed());
            let held = self.lease.lock().unwrap().clone();
            match tokio::time::timeout(remaining, lease::renew(api, &held)).await {
                Ok(Ok(Some(renewed))) => {
                    *self.lease.lock().unwrap() = renewed;
                    *self.last_renewed.lock().unwrap() = sent;
                    wait = interval;
                }
                Ok(Ok(None)) => {
                    warn!("claim lease was taken by another replica");
                    self.lost.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(Err(e)) => {
                    worker.metrics.renew_failures.inc();
                    warn!(error = %e, "lease renewal failed; retrying");
                    wait = interval.min(Duration::from_millis(500));
                }
                Err(_) => {
                    worker.metrics.renew_failures.inc();
                    warn!("lease renewal timed out");
                    wait = Duration::ZERO;
                }
            }
        }
    }
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
    AttemptTimedOut(i64),
    Stopped(StopReason),
    LeaseLost,
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
    let Claimed { job, lease: held, fence, took_over, extras } = claimed;
    let ns = job.namespace().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(worker.client.clone(), &ns);
    let jobs: Api<BackgroundJob> = Api::namespaced(worker.client.clone(), &ns);
    let keeper = Keeper::new(held, worker.timing.renew_deadline);
    // Extra Leases (cluster slot, concurrency key) are kept like the claim: losing any of them loses the claim.
    let extras: Vec<(Keeper, Api<Lease>)> = extras
        .into_iter()
        .map(|l| {
            let api = Api::namespaced(worker.client.clone(), &l.namespace().unwrap_or_default());
            (Keeper::new(l, worker.timing.renew_deadline), api)
        })
        .collect();
    let current = || keeper.is_current() && extras.iter().all(|(k, _)| k.is_current());
    let outcome =
        run_claimed(&worker, &jobs, &leases, job, fence, took_over, &control, &keeper, &extras, &current).await;
    for (k, api) in &extras {
        let held = k.lease.lock().unwrap().clone();
        if let Err(e) = lease::release(api, &held).await {
            warn!(error = %e, lease = %held.name_any(), "could not give back a lease; it expires on its own");
        }
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn run_claimed(
    worker: &Arc<Worker>,
    jobs: &Api<BackgroundJob>,
    leases: &Api<Lease>,
    job: BackgroundJob,
    fence: status::Fence,
    took_over: bool,
    control: &AttemptControl,
    keeper: &Keeper,
    extras: &[(Keeper, Api<Lease>)],
    current: &impl Fn() -> bool,
) {
    let ns = job.namespace().unwrap_or_default();
    if took_over {
        worker.metrics.takeovers.inc();
        worker.event(
            &job,
            EventType::Warning,
            "TakenOver",
            job.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default(),
        );
    }
    worker.event(
        &job,
        EventType::Normal,
        "Claimed",
        format!("attempt {} claimed by {}", fence.attempt, worker.identity),
    );
    info!("attempt started");

    let ctx = JobContext {
        namespace: ns.clone(),
        name: job.name_any(),
        uid: fence.uid.clone(),
        job_name: job.spec.job_name.clone(),
        attempt: fence.attempt,
        worker: worker.identity.clone(),
        cancel: control.token.child_token(),
    };
    let ending = {
        let _log = worker.invocations.start(&job, fence.attempt, &worker.identity);
        let _timer = RunTimer(Instant::now(), &worker.metrics.run_duration);
        let mut exec = Box::pin(executor::execute(&job, ctx, &worker.registry, &worker.http, &worker.client));
        // The lease guard: the executor is polled only while the claim is current.
        let guarded = poll_fn(|cx| if current() { exec.as_mut().poll(cx).map(Some) } else { Poll::Ready(None) });
        let limit = job.spec.attempt_timeout_seconds.map(|s| Duration::from_secs(s.max(1) as u64));
        let timed = async {
            match limit {
                Some(limit) => tokio::time::timeout(limit, guarded)
                    .await
                    .map_err(|_| job.spec.attempt_timeout_seconds.unwrap_or(0)),
                None => Ok(guarded.await),
            }
        };
        tokio::select! {
            biased;
            _ = control.token.cancelled() => Ending::Stopped(control.reason().unwrap_or(StopReason::Shutdown)),
            r = timed => match r {
                Ok(Some(result)) => Ending::Finished(result),
                Ok(None) => Ending::LeaseLost,
                Err(secs) => Ending::AttemptTimedOut(secs),
            },
            _ = keeper.renew_forever(leases, worker) => Ending::LeaseLost,
            _ = async {
                if extras.is_empty() {
                    std::future::pending::<()>().await;
                }
                let renewals = extras.iter().map(|(k, api)| Box::pin(k.renew_forever(api, worker)));
                futures::future::select_all(renewals).await;
            } => Ending::LeaseLost,
        }
    };
    // A handler that noticed a stop request fails with something like "cancelled"; the stop is the real reason.
    // Only a success that raced the stop is kept: the work is done.
    let ending = match (ending, control.reason()) {
        (Ending::Finished(AttemptResult::Succeeded), _) => Ending::Finished(AttemptResult::Succeeded),
        (Ending::Finished(_) | Ending::AttemptTimedOut(_), Some(reason)) => Ending::Stopped(reason),
        (ending, _) => ending,
    };
    if matches!(ending, Ending::LeaseLost) || !current() {
        worker.metrics.stale_results_discarded.inc();
        warn!("claim lease lost: the attempt was stopped and its outcome is not recorded; another replica takes over");
        return;
    }
    // A Pod outlives our interest in it only when it finished or when the attempt is handed over.
    let pod_must_go = matches!(
        ending,
        Ending::AttemptTimedOut(_) | Ending::Stopped(StopReason::Cancelled) | Ending::Stopped(StopReason::Deleted)
    );
    if job.spec.template.is_some() && pod_must_go {
        executor::pod::delete(&worker.client, &job, fence.attempt).await;
    }
    let record = record(worker, jobs, &job, &fence, ending);
    // Bound the outcome write by what is left of the renew deadline; past it another replica may take over.
    let left = keeper.renew_deadline.saturating_sub(keeper.last_renewed.lock().unwrap().elapsed());
    match tokio::time::timeout(left, record).await {
        Ok(Ok(true)) => {
            let held = keeper.lease.lock().unwrap().clone();
            if let Err(e) = lease::release(leases, &held).await {
                warn!(error = %e, "could not delete the claim lease; it expires on its own");
            }
        }
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "could not record the attempt's outcome; the lease expires and another replica retries")
        }
        Err(_) => warn!("recording the attempt's outcome timed out; the lease expires and another replica retries"),
    }
}

/// Record the outcome. `Ok(true)`: recorded, the Lease can go. `Ok(false)`: nothing to release (job gone, or moved on).
async fn record(
    worker: &Worker,
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    fence: &status::Fence,
    ending: Ending,
) -> crate::Result<bool> {
    let now = Timestamp::now();
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
    let verdict = match ending {
        Ending::Finished(result) => retry::verdict(&job.spec, created, fence.attempt, result, now),
        Ending::AttemptTimedOut(secs) => retry::verdict(
            &job.spec,
            created,
            fence.attempt,
            AttemptResult::Retryable(format!(
                "attempt {} exceeded attemptTimeoutSeconds ({secs}s) and was cancelled",
                fence.attempt
            )),
            now,
        ),
        Ending::Stopped(StopReason::Deleted) => {
            info!("job deleted: attempt stopped");
            return Ok(false);
        }
        Ending::Stopped(StopReason::Cancelled) => {
            let written = status::write_fenced(jobs, job, fence, |s| {
                status::finish(
                    s,
                    Phase::Cancelled,
                    Some(format!("cancelled by the user during attempt {}", fence.attempt)),
                    now,
                )
            })
            .await?;
            worker.metrics.count_outcome(Phase::Cancelled);
            worker.event(job, EventType::Normal, "Cancelled", format!("attempt {} cancelled", fence.attempt));
            return Ok(matches!(written, Fenced::Written(_)));
        }
        Ending::Stopped(StopReason::Shutdown | StopReason::NotLeader) if job.spec.template.is_some() => {
            // The Pod runs on without us: give up the claim but not the attempt. Another replica sees the Lease
            // gone, waits a lease duration, and adopts the attempt's Pod.
            info!("attempt handed over: its pod keeps running and will be adopted");
            return Ok(true);
        }
        Ending::Stopped(reason @ (StopReason::Shutdown | StopReason::NotLeader)) => {
            let why = if reason == StopReason::Shutdown { "shut down" } else { "lost the exclusive lease" };
            let msg = format!("attempt {} was interrupted: worker {} {why}", fence.attempt, worker.identity);
            let written =
                status::write_fenced(jobs, job, fence, |s| status::requeue(s, None, msg.clone(), now)).await?;
            info!("attempt handed back to the queue");
            return Ok(matches!(written, Fenced::Written(_)));
        }
        Ending::LeaseLost => return Ok(false),
    };
    let (written, phase) = match &verdict {
        Verdict::Succeed => (
            status::write_fenced(jobs, job, fence, |s| status::finish(s, Phase::Succeeded, None, now)).await?,
            Phase::Succeeded,
        ),
        Verdict::RetryAt { at, reason } => (
            status::write_fenced(jobs, job, fence, |s| status::requeue(s, Some(*at), reason.clone(), now)).await?,
            Phase::Waiting,
        ),
        Verdict::Fail(reason) => (
            status::write_fenced(jobs, job, fence, |s| status::finish(s, Phase::Failed, Some(reason.clone()), now))
                .await?,
            Phase::Failed,
        ),
        Verdict::Abandon(reason) => (
            status::write_fenced(jobs, job, fence, |s| status::finish(s, Phase::Abandoned, Some(reason.clone()), now))
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
