//! The exclusive strategy: one cluster-wide Lease, and only its holder runs jobs.
//!
//! This is the behaviour of single-lock job managers, kept for workloads that must never run two jobs at once
//! anywhere. The holder is elected with the same conditional Lease writes as job claims, judged on the observer's
//! clock, and stops running jobs as soon as it cannot renew within the renew deadline.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lease::{self, Acquire, Claim, LeaseTiming, Observer};

/// Name of the cluster-wide Lease.
pub const EXCLUSIVE_LEASE: &str = "bgjobs-exclusive";

/// Keep trying to hold the exclusive Lease until `stop` is cancelled; publish whether we hold it. Releases it on stop.
pub async fn elect(
    client: Client,
    namespace: String,
    identity: String,
    timing: LeaseTiming,
    tx: watch::Sender<bool>,
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
    let mut held: Option<(Lease, Instant)> = None;
    loop {
        let sent = Instant::now();
        held = match held.take() {
            Some((l, renewed)) if renewed.elapsed() < timing.renew_deadline => {
                let left = timing.renew_deadline.saturating_sub(renewed.elapsed());
                match tokio::time::timeout(left, lease::renew(&api, &l)).await {
                    Ok(Ok(Some(l))) => Some((l, sent)),
                    Ok(Ok(None)) => None,
                    _ => Some((l, renewed)),
                }
            }
            Some(_) => None,
            None => match api.get_opt(EXCLUSIVE_LEASE).await {
                Ok(None) => match lease::create(&api, EXCLUSIVE_LEASE, &claim, &timing).await {
                    Ok(Acquire::Acquired(l)) => Some((l, sent)),
                    _ => None,
                },
                Ok(Some(current)) => {
                    let unchanged = observer.observe(EXCLUSIVE_LEASE, current.resource_version().as_deref(), sent);
                    if unchanged >= timing.duration || lease::holder(&current).is_none() {
                        match lease::take_over(&api, &current, &claim, &timing).await {
                            Ok(Acquire::Acquired(l)) => Some((l, sent)),
                            _ => None,
                        }
                    } else {
                        None
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the exclusive lease");
                    None
                }
            },
        };
        let leading = held.as_ref().is_some_and(|(_, renewed)| renewed.elapsed() < timing.renew_deadline);
        if *tx.borrow() != leading {
            info!(leading, "exclusive lease {}", if leading { "acquired" } else { "lost" });
            let _ = tx.send(leading);
        }
        let wait = if leading { timing.renew_interval } else { timing.renew_interval.min(Duration::from_secs(1)) };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
    let _ = tx.send(false);
    if let Some((l, _)) = held {
        let _ = lease::release(&api, &l).await;
    }
}
