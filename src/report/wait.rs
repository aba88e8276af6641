//! The holder's side of an asynchronous attempt: after `202 Accepted`, mark the attempt as waiting for its report
//! (so a replica that takes the job over adopts it instead of starting another), then watch the job until a report
//! (applied by whichever replica received it) moves it on, or until the worker counts as gone
//! ([`super::decide::liveness`]). The attempt runner bounds the wait like any attempt (attempt timeout, job
//! deadline, Leases, stop requests) and keeps the claim Lease renewed meanwhile.

use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::decide::{self, Liveness};
use crate::api::BackgroundJob;
use crate::list_watch::watch_one;
use crate::retry::AttemptResult;
use crate::status::{self, Fence, Fenced};
use crate::worker::Worker;

/// Wait for the report of the attempt `fence` holds. `mark`: this replica just got the `202` (else it adopted an
/// attempt already marked). `marked` is called once the attempt is known to wait for a report.
pub async fn until_reported(
    worker: &Worker,
    jobs: &Api<BackgroundJob>,
    latest: BackgroundJob,
    fence: &Fence,
    mark: bool,
    marked: impl FnOnce(),
) -> AttemptResult {
    // Written from, never run from: kept without its arguments.
    let mut job = latest.without_args();
    if mark {
        let mut backoff = Duration::from_millis(500);
        loop {
            let now = worker.clock.now();
            let change = |s: &mut crate::api::BackgroundJobStatus| {
                s.awaiting_report = true;
                s.last_heartbeat_time = Some(Time(now));
            };
            match status::write_fenced(jobs, &job, fence, change).await {
                Ok(Fenced::Written(j)) => {
                    job = j.without_args();
                    break;
                }
                // A fast worker's report landed before the mark: the attempt is over already.
                Ok(Fenced::Stale) => return AttemptResult::Reported,
                Err(e) => {
                    warn!(error = %e, "could not mark the attempt as waiting for its report; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        info!("the endpoint accepted the attempt (202): waiting for its worker's report");
    } else {
        info!("adopted an attempt that waits for its worker's report");
    }
    marked();
    let mut watch = pin!(watch_one(jobs.clone(), &job.name_any()).default_backoff());
    // The worker's heartbeats are status writes: while the job cannot be read they were likely refused too. So a
    // read or a watch that fails starts an outage, and the first read or event after it may restart the worker's
    // clock (`decide::liveness`, `decide::after_outage`). An adopted attempt's clock starts at the adoption: its
    // holder's tenure most often lapsed because the apiserver could not be reached, and then neither could the
    // worker's heartbeats.
    let mut outage: Option<jiff::Timestamp> = None;
    let mut readable_again = (!mark).then(|| worker.clock.now());
    loop {
        if !fence.holds(&job) {
            return AttemptResult::Reported;
        }
        let overdue_in = match decide::liveness(&job, worker.clock.now(), readable_again) {
            Liveness::Lost(why) => {
                // The watch may lag: a heartbeat that landed (and was answered 200) must not be overruled by a stale
                // copy. Judge again on the job as it is now.
                match crate::unreadable::get_opt_without_args(jobs, &job.name_any()).await {
                    Ok(Some(fresh)) if fresh.uid() == job.uid() => {
                        let changed = fresh.resource_version() != job.resource_version();
                        job = fresh;
                        if let Some(started) = outage.take() {
                            let again = decide::after_outage(&job, readable_again, started, worker.clock.now());
                            if again != readable_again {
                                readable_again = again;
                                info!("the job can be read again: its worker gets a full heartbeat timeout from now");
                                continue;
                            }
                        }
                        if changed {
                            continue;
                        }
                    }
                    Ok(_) => return AttemptResult::Reported,
                    Err(e) => {
                        outage.get_or_insert_with(|| worker.clock.now());
                        warn!(error = %e, "could not read the job to confirm its worker went silent; reading again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
                warn!(%why, "the worker of this attempt went silent");
                return AttemptResult::Retryable(why);
            }
            Liveness::Alive { overdue_in } => overdue_in,
        };
        let overdue = async {
            match overdue_in {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = watch.next() => match event {
                Some(Ok(Some(seen))) if seen.uid() == job.uid() => {
                    job = seen.without_args();
                    if let Some(started) = outage.take() {
                        readable_again = decide::after_outage(&job, readable_again, started, worker.clock.now());
                    }
                }
                // Deleted, or the name holds another job: this attempt is over (the dispatcher stops it too).
                Some(Ok(_)) => return AttemptResult::Reported,
                Some(Err(e)) => {
                    outage.get_or_insert_with(|| worker.clock.now());
                    warn!(error = %e, "watching the job for its report failed; watching again");
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            },
            _ = overdue => {}
        }
    }
}
