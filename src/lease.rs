//! `coordination.k8s.io/v1` Leases: how a replica holds something, and how others tell it stopped holding it.
//!
//! Every write is conditional: a Lease is created only if absent, and renewed, taken over or released only under
//! the resourceVersion the writer last saw, so two replicas can never both believe they acquired it.
//! Expiry is judged like client-go's leader election: by how long *this* process has seen the Lease unchanged on
//! its own monotonic clock, never by comparing `renewTime` with the local wall clock (immune to clock offset).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};

use crate::error::{Error, Result, api_code};

/// Label on every Lease bgjobs creates, so replicas can watch exactly those.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "bgjobs";
/// Annotation naming the UID of the job a claim Lease guards.
pub const JOB_UID_ANNOTATION: &str = "bgjobs.dev/job-uid";
/// Annotation naming the attempt a claim Lease guards (the fencing epoch).
pub const ATTEMPT_ANNOTATION: &str = "bgjobs.dev/attempt";

/// How long Leases last and how they are kept alive. Invariant: `duration > renew_deadline > renew_interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Others may take over a Lease they have seen unchanged this long.
    pub duration: Duration,
    /// A holder that has not renewed for this long stops acting (before anyone else may take over).
    pub renew_deadline: Duration,
    /// How often a holder renews.
    pub renew_interval: Duration,
}

impl LeaseTiming {
    /// Check the invariant that makes the gap between "holder stops" and "others take over" positive.
    pub fn validate(&self) -> Result<()> {
        if self.duration > self.renew_deadline
            && self.renew_deadline > self.renew_interval
            && !self.renew_interval.is_zero()
        {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "lease timing must satisfy lease-duration ({:?}) > renew-deadline ({:?}) > renew-interval ({:?}) > 0",
                self.duration, self.renew_deadline, self.renew_interval
            )))
        }
    }

    /// Whole seconds written into `spec.leaseDurationSeconds` (at least 1).
    pub fn duration_seconds(&self) -> i32 {
        self.duration.as_secs_f64().ceil().max(1.0) as i32
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_interval: Duration::from_secs(3),
        }
    }
}

/// What the holder writes into a Lease it acquires.
#[derive(Clone, Debug)]
pub struct Claim {
    /// Identity of the acquiring replica.
    pub holder: String,
    /// Annotations (job UID, attempt) that tie the Lease to one attempt.
    pub annotations: BTreeMap<String, String>,
    /// Labels to set on creation.
    pub labels: BTreeMap<String, String>,
    /// Owner (the job) so garbage collection removes the Lease with it.
    pub owner: Option<OwnerReference>,
}

/// Outcome of trying to acquire a Lease.
#[derive(Debug)]
pub enum Acquire {
    /// The Lease is ours; here it is as written.
    Acquired(Lease),
    /// Someone else's write came first; here is the Lease as it is now (if it could be read).
    Lost(Option<Lease>),
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// Create the Lease `name`, held by `claim.holder`, only if no Lease of that name exists.
pub async fn create(api: &Api<Lease>, name: &str, claim: &Claim, timing: &LeaseTiming) -> Result<Acquire> {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(claim.labels.clone()),
            annotations: Some(claim.annotations.clone()),
            owner_references: claim.owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(claim.holder.clone()),
            lease_duration_seconds: Some(timing.duration_seconds()),
            acquire_time: Some(now_micro()),
            renew_time: Some(now_micro()),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    };
    match api.create(&PostParams::default(), &lease).await {
        Ok(l) => Ok(Acquire::Acquired(l)),
        Err(e) if api_code(&e) == Some(409) => Ok(Acquire::Lost(api.get_opt(name).await?)),
        Err(e) => Err(e.into()),
    }
}

/// Take over `seen` (the Lease as this replica last saw it) for `claim`: succeeds only if nobody wrote it since.
pub async fn take_over(api: &Api<Lease>, seen: &Lease, claim: &Claim, timing: &LeaseTiming) -> Result<Acquire> {
    let mut lease = seen.clone();
    let annotations = lease.metadata.annotations.get_or_insert_with(Default::default);
    annotations.extend(claim.annotations.clone());
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = Some(claim.holder.clone());
    spec.lease_duration_seconds = Some(timing.duration_seconds());
    spec.acquire_time = Some(now_micro());
    spec.renew_time = Some(now_micro());
    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    replace(api, &lease).await.map(|r| r.map_or(Acquire::Lost(None), Acquire::Acquired))
}

/// Renew a Lease this replica holds. `Ok(None)`: someone else wrote it since, so it is no longer ours.
pub async fn renew(api: &Api<Lease>, held: &Lease) -> Result<Option<Lease>> {
    let mut lease = held.clone();
    lease.spec.get_or_insert_with(Default::default).renew_time = Some(now_micro());
    replace(api, &lease).await
}

async fn replace(api: &Api<Lease>, lease: &Lease) -> Result<Option<Lease>> {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    match api.replace(name, &PostParams::default(), lease).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Delete a Lease this replica holds, only if it is still exactly as last written by us.
pub async fn release(api: &Api<Lease>, held: &Lease) -> Result<()> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: held.metadata.resource_version.clone(),
            uid: held.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    match api.delete(held.metadata.name.as_deref().unwrap_or_default(), &dp).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The holder named in a Lease.
pub fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// An annotation of a Lease.
pub fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Tracks, on this process's monotonic clock, since when each watched thing has been seen unchanged.
///
/// A "thing" is a Lease's resourceVersion, or the absence of a Lease (recorded as `None`). Anything not
/// observed in the latest [`Observer::retain`] is forgotten.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (Option<String>, Instant)>,
}

impl Observer {
    /// Record the current version of `key` at `now`; returns how long it has been seen unchanged.
    pub fn observe(&mut self, key: &str, version: Option<&str>, now: Instant) -> Duration {
        match self.seen.get_mut(key) {
            Some((v, since)) if v.as_deref() == version => now.saturating_duration_since(*since),
            Some(entry) => {
                *entry = (version.map(str::to_string), now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(key.to_string(), (version.map(str::to_string), now));
                Duration::ZERO
            }
        }
    }

    /// Forget every key for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_requires_duration_above_deadline_above_interval() {
        assert!(LeaseTiming::default().validate().is_ok());
        let bad = LeaseTiming {
            duration: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(5),
            renew_interval: Duration::from_secs(1),
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn an_unchanged_lease_ages_on_the_observers_clock_and_a_change_resets_it() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        assert_eq!(o.observe("l", Some("1"), t0), Duration::ZERO);
        assert_eq!(o.observe("l", Some("1"), t0 + Duration::from_secs(7)), Duration::from_secs(7));
        assert_eq!(o.observe("l", Some("2"), t0 + Duration::from_secs(8)), Duration::ZERO);
        assert_eq!(o.observe("l", Some("2"), t0 + Duration::from_secs(10)), Duration::from_secs(2));
    }

    #[test]
    fn absence_is_tracked_like_a_version_and_forgotten_keys_start_over() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        o.observe("l", None, t0);
        assert_eq!(o.observe("l", None, t0 + Duration::from_secs(3)), Duration::from_secs(3));
        o.retain(|_| false);
        assert_eq!(o.observe("l", None, t0 + Duration::from_secs(4)), Duration::ZERO);
    }

    #[test]
    fn lease_duration_rounds_up_to_whole_seconds() {
        let t = LeaseTiming {
            duration: Duration::from_millis(2500),
            renew_deadline: Duration::from_secs(2),
            renew_interval: Duration::from_millis(500),
        };
        assert_eq!(t.duration_seconds(), 3);
    }
}
