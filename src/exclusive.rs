//! The exclusive strategy: one cluster-wide Lease, and only its holder runs jobs.
//!
//! This is the behaviour of single-lock job managers, kept for workloads that must never run two jobs at once
//! anywhere. The holder is elected with the same conditional Lease writes and the same [`Keeper`] as job claims,
//! judged on the observer's clock, and every attempt it claims is guarded by that very tenure of the Lease: when
//! the Keeper stops being current (renew deadline missed, Lease taken or deleted), the attempts stop too.
//! An absent Lease is treated like an expired one: a replica creates it only after seeing it absent for a full
//! lease duration, because a holder whose Lease was deleted keeps acting until its next renewal fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lease::{self, Acquire, Claim, Keeper, LeaseTiming, Observer};

/// What the leader may start, given the jobs that run but not in this process's own attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Starts {
    /// Anything: nothing runs elsewhere.
    Any,
    /// Only orphaned attempts (their holder stopped renewing), in queue order: a new attempt of an in-process job, or
    /// the adoption of a Pod that may still run. Nothing new starts beside them.
    Orphans,
    /// Only adoptions of orphaned Pods (which run anyway): something runs elsewhere under a live claim, so no new
    /// attempt of any job may start beside it.
    Adoptions,
}

/// The leader's rule (see [`Starts`]): `live` if a job runs elsewhere under a live claim (or is claimed elsewhere
/// although this replica's cache still shows it waiting), `orphans` if a job's holder stopped renewing.
pub fn starts(live: bool, orphans: bool) -> Starts {
    match (live, orphans) {
        (true, _) => Starts::Adoptions,
        (false, true) => Starts::Orphans,
        (false, false) => Starts::Any,
    }
}

/// Name of the cluster-wide Lease.
pub const EXCLUSIVE_LEASE: &str = "bgjobs-exclusive";

/// Keep trying to hold the exclusive Lease until `stop` is cancelled; publish the Keeper of each tenure (None while
/// not holding it). Releases it on stop.
pub async fn elect(
    client: Client,
    namespace: String,
    identity: String,
    timing: LeaseTiming,
    tx: watch::Sender<Option<Arc<Keeper>>>,
    failures: Counter,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let claim = Claim {
        holder: identity.clone(),
        annotations: Default::default(),
        labels: [(lease::MANAGED_BY_LABEL.to_string(), lease::MANAGED_BY.to_string())].into(),
        owner: None,
    };
    let mut observer = Observer::default();
    while !stop.is_cancelled() {
        if let Some(held) = try_acquire(&api, &claim, &timing, &mut observer).await {
            let keeper = Arc::new(Keeper::new(api.clone(), held, timing));
            info!("exclusive lease acquired");
            let _ = tx.send(Some(keeper.clone()));
            tokio::select! {
                _ = keeper.keep(&failures) => info!("exclusive lease lost"),
                _ = stop.cancelled() => {}
            }
            keeper.give_up();
            let _ = tx.send(None);
            // What was seen before this tenure says nothing about the Lease now: start every clock afresh.
            observer.retain(|_| false);
            if stop.is_cancelled() {
                // The dispatcher has stopped its attempts before cancelling `stop`.
                keeper.vacate().await;
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.renew_interval.min(Duration::from_secs(1))) => {}
            _ = stop.cancelled() => break,
        }
    }
    let _ = tx.send(None);
}

/// One try: create the Lease once seen absent for a lease duration, or take it over once seen unchanged that long.
async fn try_acquire(
    api: &Api<Lease>,
    claim: &Claim,
    timing: &LeaseTiming,
    observer: &mut Observer,
) -> Option<lease::Held> {
    let current = match api.get_opt(EXCLUSIVE_LEASE).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot read the exclusive lease");
            return None;
        }
    };
    let version = current.as_ref().and_then(|l| l.resource_version());
    let unchanged = observer.observe(EXCLUSIVE_LEASE, version.as_deref(), Instant::now());
    let vacant = current.as_ref().is_some_and(|l| lease::holder(l).is_none());
    if !vacant && !timing.expired(unchanged) {
        return None;
    }
    let acquired = match &current {
        None => lease::create(api, EXCLUSIVE_LEASE, claim, timing).await,
        Some(seen) => lease::take_over(api, seen, claim, timing).await,
    };
    match acquired {
        Ok(Acquire::Acquired(held)) => Some(held),
        Ok(Acquire::Lost(_)) => None,
        Err(e) => {
            warn!(error = %e, lease = %current.map(|l| l.name_any()).unwrap_or_default(), "cannot acquire the exclusive lease");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_starts_no_new_attempt_beside_a_job_that_runs_elsewhere_under_a_live_claim() {
        assert_eq!(starts(false, false), Starts::Any);
        assert_eq!(starts(false, true), Starts::Orphans, "orphans are taken over when nothing else runs");
        assert_eq!(starts(true, true), Starts::Adoptions, "an orphan restarted beside a live job would run two");
        assert_eq!(starts(true, false), Starts::Adoptions);
    }
}
