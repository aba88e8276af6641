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

/// What a new leader reads from the apiserver, not from its caches, before it starts anything new: the claim Leases
/// in scope, and the job each names. The Lease is won on a current read, but the caches may lag the old leader's
/// last claims by any time (a watch cache behind, a slow watch): judged from them alone, a job the old leader started
/// moments before it stopped is not there yet, and the new leader would start another beside it (an HTTP request or
/// a Pod outlives its replica). Until its caches show at least what such a read showed ([`Fresh::shown_by`]), the
/// leader starts nothing new; it reads again every [`FRESH_READ_EVERY`] until they show one of its reads (each is made
/// after the old leader's last start, so any will do: under a steady lag, later reads may name versions newer than
/// the caches can show yet). Claim Leases exist only while held or handed over (a released one is deleted), so a
/// read costs one list and a read per attempt that may run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fresh {
    /// Each claim Lease (`namespace/name`) and its resourceVersion.
    pub leases: Vec<(String, String)>,
    /// The UID of each job a claim Lease names and its resourceVersion as read, `None` if it is gone (or its name
    /// cannot be told from its Lease's: a job named past 249 characters, whose Lease is named by its UID).
    pub jobs: Vec<(String, Option<String>)>,
    /// The Pods bgjobs made that may still run (`namespace/name`) and their job's UID: a job deleted while the old
    /// leader was down leaves no claim Lease (it goes with the job) but its Pod, which the garbage collector deletes
    /// and which runs on through its grace period. A read is shown only by caches that show every such Pod's job: a
    /// Pod whose job is gone holds every read that lists it back, until one no longer does.
    pub pods: Vec<(String, String)>,
}

/// How often a new leader whose caches have not yet shown its last [`Fresh`] read reads again (a Lease deleted after
/// a read is never shown at that read's version).
pub const FRESH_READ_EVERY: Duration = Duration::from_secs(2);

impl Fresh {
    /// Read the claim Leases through `leases` (the scope's) and the job each names through `jobs_in` (by namespace),
    /// from the apiserver (quorum reads).
    pub async fn read(
        leases: &Api<Lease>,
        pods: &Api<k8s_openapi::api::core::v1::Pod>,
        jobs_in: impl Fn(&str) -> Api<crate::api::BackgroundJob>,
    ) -> crate::error::Result<Fresh> {
        // The claim Leases as the Lease cache selects them (only bgjobs' own), so that every one can be shown there.
        let selector = format!("{}={},{}", lease::MANAGED_BY_LABEL, lease::MANAGED_BY, crate::claim::JOB_LABEL);
        let params = kube::api::ListParams::default().labels(&selector);
        let mut fresh = Fresh::default();
        for l in crate::unreadable::list_selected(leases, params).await? {
            let (namespace, name) = (l.namespace().unwrap_or_default(), l.name_any());
            fresh.leases.push((format!("{namespace}/{name}"), l.resource_version().unwrap_or_default()));
            let Some(uid) = lease::annotation(&l, lease::JOB_UID_ANNOTATION) else { continue };
            let job = match name.strip_prefix("bgj-").filter(|n| *n != uid) {
                // Through the stand-in, as the caches read jobs: one the operator cannot read still has its version.
                Some(job_name) => crate::unreadable::get_opt(&jobs_in(&namespace), job_name).await?,
                None => None,
            };
            let version = job.filter(|j| j.uid().as_deref() == Some(uid)).and_then(|j| j.resource_version());
            fresh.jobs.push((uid.to_string(), version));
        }
        fresh.pods = crate::executor::pod::pods_that_may_run(pods).await?;
        Ok(fresh)
    }

    /// Whether caches that show each Lease (by `namespace/name`) and each job (by UID) at the resourceVersion
    /// `lease_version` and `job_version` say show at least this read: every Lease and every job it found, at that
    /// version or a later one, and the job of every Pod it found that may still run.
    pub fn shown_by(
        &self,
        lease_version: impl Fn(&str) -> Option<String>,
        job_version: impl Fn(&str) -> Option<String>,
    ) -> bool {
        self.pods_of_unseen_jobs(&job_version).is_empty()
            && self.leases.iter().all(|(key, read)| at_least(lease_version(key), read))
            && self.jobs.iter().all(|(uid, read)| read.as_ref().is_none_or(|read| at_least(job_version(uid), read)))
    }

    /// The Pods this read found that may still run (`namespace/name`) whose job caches that show jobs at
    /// `job_version` do not show: deleted (or not cached yet). While there is one, the read is not shown.
    pub fn pods_of_unseen_jobs(&self, job_version: impl Fn(&str) -> Option<String>) -> Vec<&str> {
        self.pods.iter().filter(|(_, uid)| job_version(uid).is_none()).map(|(pod, _)| pod.as_str()).collect()
    }
}

/// Whether a cache that shows an object at `seen` shows it at `read` or later. resourceVersions are etcd revisions
/// on every etcd3-backed apiserver (see [`crate::ordering::enqueue_sequence`]); anything else counts only when equal.
fn at_least(seen: Option<String>, read: &str) -> bool {
    let Some(seen) = seen else { return false };
    seen == read || matches!((seen.parse::<u64>(), read.parse::<u64>()), (Ok(s), Ok(r)) if s >= r)
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
    // Each request bounded: a connection that died without a word would otherwise hold the leadership back for the
    // kernel's retransmission timeout (about 15 minutes), from every replica whose try hangs.
    let read = crate::client::bounded(timing.renew_deadline, async {
        Ok(crate::unreadable::get_opt(api, EXCLUSIVE_LEASE).await?)
    });
    let current = match read.await {
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
    let acquired = crate::client::bounded(timing.renew_deadline, async {
        match &current {
            None => lease::create(api, EXCLUSIVE_LEASE, claim, timing).await,
            Some(seen) => lease::take_over(api, seen, claim, timing).await,
        }
    })
    .await;
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
    fn a_fresh_read_is_shown_once_every_lease_and_every_job_it_found_is_cached_at_its_version_or_later() {
        let fresh = Fresh {
            leases: vec![("ns/bgj-x".into(), "120".into())],
            jobs: vec![("uid-x".into(), Some("118".into())), ("uid-gone".into(), None)],
            pods: vec![],
        };
        let cached = |lease: Option<&str>, job: Option<&str>| {
            let (lease, job) = (lease.map(str::to_string), job.map(str::to_string));
            fresh.shown_by(
                |k| (k == "ns/bgj-x").then(|| lease.clone()).flatten(),
                |u| (u == "uid-x").then(|| job.clone()).flatten(),
            )
        };
        assert!(!cached(None, None), "neither the claim nor its job cached yet");
        assert!(!cached(Some("120"), None), "the claim cached, its job not yet");
        assert!(!cached(Some("119"), Some("118")), "the claim cached at an older version");
        assert!(cached(Some("120"), Some("118")), "both at the versions read; a job gone needs nothing");
        assert!(cached(Some("131"), Some("125")), "later versions show at least as much");
        assert!(Fresh::default().shown_by(|_| None, |_| None), "nothing claimed anywhere: nothing to wait for");
        let pod_left = Fresh { pods: vec![("ns/deleted-1".into(), "uid-gone".into())], ..Fresh::default() };
        assert!(!pod_left.shown_by(|_| None, |_| None), "a deleted job's Pod may still run: not caught up with");
        let running = Fresh { pods: vec![("ns/x-1".into(), "uid-x".into())], ..Fresh::default() };
        assert!(running.shown_by(|_| None, |u| (u == "uid-x").then(|| "118".into())), "its job is cached");
        assert!(!at_least(Some("v2".into()), "v1") && at_least(Some("v1".into()), "v1"), "opaque versions: equal only");
    }

    #[test]
    fn a_leader_starts_no_new_attempt_beside_a_job_that_runs_elsewhere_under_a_live_claim() {
        assert_eq!(starts(false, false), Starts::Any);
        assert_eq!(starts(false, true), Starts::Orphans, "orphans are taken over when nothing else runs");
        assert_eq!(starts(true, true), Starts::Adoptions, "an orphan restarted beside a live job would run two");
        assert_eq!(starts(true, false), Starts::Adoptions);
    }
}
