//! `coordination.k8s.io/v1` Leases: the one place where bgjobs decides that something is held, kept or given up.
//!
//! Every kind of Lease bgjobs writes (job claims, cluster slots, concurrency keys, the exclusive Lease, member
//! Leases) goes through this module:
//! - writes ([`create`], [`take_over`], [`release`]) are conditional: a Lease is created only if absent, taken over or
//!   released only under the resourceVersion the writer last saw, so two replicas can never both acquire it;
//! - a holder keeps it with a [`Keeper`], whose renew deadline counts from the instant the acquiring write was *sent*
//!   (a holder paused between its write and the answer wakes up already late, never with a fresh deadline);
//! - others judge it with an [`Observer`] and [`LeaseTiming::expired`]: by how long *this* process has seen the
//!   Lease unchanged on its own monotonic clock, like client-go's leader election, never by comparing `renewTime`
//!   with the local wall clock (immune to clock offset).
//!
//! - the Leases an attempt takes (claim, cluster slot, concurrency key) are not renewed one by one: the replica's
//!   member Lease vouches for all of them ([`tenure`]), and the replica confirms them in one list per renew
//!   interval ([`held`]), so an attempt's writes do not grow with its duration.
//!
//! Safety rests on `duration > renew_deadline`: a holder stops acting at the renew deadline, counted from a moment
//! no later than any observer's first sighting of the write, so it has stopped before anyone may take over.

pub mod held;
mod keeper;
mod observer;
pub mod tenure;

pub use held::{Give, HeldLeases, Hold, give};
pub use keeper::Keeper;
pub use observer::Observer;
pub use tenure::{Ending, Tenures};

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};

use crate::error::{Error, Result, api_code, gone};

/// Label on every Lease bgjobs creates, so replicas can watch exactly those.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "bgjobs";
/// Annotation naming the UID of the job a claim Lease guards.
pub const JOB_UID_ANNOTATION: &str = "bgjobs.dev/job-uid";
/// Annotation naming the attempt a claim Lease guards (the fencing epoch).
pub const ATTEMPT_ANNOTATION: &str = "bgjobs.dev/attempt";
/// Annotation naming the job a claim's Leases guard as `<namespace>/<uid>`: a cluster slot lives in the lease
/// namespace, and the Pods of its job, which may outlive the job, in the job's. With the UID, so that one a release
/// without it left beside a newer [`JOB_UID_ANNOTATION`] (a takeover keeps the annotations it does not write) is
/// told apart: [`job_namespace`].
pub const JOB_REF_ANNOTATION: &str = "bgjobs.dev/job-ref";

/// The value of [`JOB_REF_ANNOTATION`] for the job `uid` in `namespace`.
pub fn job_ref(namespace: &str, uid: &str) -> String {
    format!("{namespace}/{uid}")
}

/// The namespace of the job a Lease guards, if its [`JOB_REF_ANNOTATION`] names the job its [`JOB_UID_ANNOTATION`]
/// does.
pub fn job_namespace(lease: &Lease) -> Option<&str> {
    let uid = annotation(lease, JOB_UID_ANNOTATION)?;
    let (namespace, named) = annotation(lease, JOB_REF_ANNOTATION)?.rsplit_once('/')?;
    (named == uid).then_some(namespace)
}

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

    /// The one expiry rule: a Lease (or its absence) seen unchanged for a full lease duration is abandoned.
    pub fn expired(&self, unchanged_for: Duration) -> bool {
        unchanged_for >= self.duration
    }

    /// How long until something seen unchanged for `unchanged_for` expires (at least 100 ms, to bound wake-ups).
    pub fn until_expiry(&self, unchanged_for: Duration) -> Duration {
        self.duration.saturating_sub(unchanged_for).max(Duration::from_millis(100))
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

/// A Lease this replica acquired, and when the acquiring write was sent: the holder's renew deadline counts from
/// then, because an observer may have seen the write as early as that.
#[derive(Clone, Debug)]
pub struct Held {
    /// The Lease as written.
    pub lease: Lease,
    /// Just before the write was sent.
    pub written_at: Instant,
}

/// Outcome of trying to acquire a Lease.
#[derive(Debug)]
pub enum Acquire {
    /// The Lease is ours.
    Acquired(Held),
    /// Someone else's write came first; here is the Lease as it is now (if it could be read).
    Lost(Option<Lease>),
}

/// Now, at the microsecond resolution the apiserver stores, so a written time reads back equal.
fn now_micro() -> MicroTime {
    let us = jiff::Timestamp::now().as_microsecond();
    MicroTime(jiff::Timestamp::from_microsecond(us).unwrap_or_else(|_| jiff::Timestamp::now()))
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
    let written_at = Instant::now();
    match api.create(&PostParams::default(), &lease).await {
        Ok(lease) => Ok(Acquire::Acquired(Held { lease, written_at })),
        Err(e) if api_code(&e) == Some(409) => Ok(Acquire::Lost(crate::unreadable::get_opt(api, name).await?)),
        Err(e) => Err(e.into()),
    }
}

/// Take over `seen` (the Lease as this replica last saw it) for `claim`: succeeds only if nobody wrote it since.
/// The Lease then belongs to the claim alone: its annotations and owner are the claim's, so a leftover of a
/// deleted job is not garbage-collected with that job.
pub async fn take_over(api: &Api<Lease>, seen: &Lease, claim: &Claim, timing: &LeaseTiming) -> Result<Acquire> {
    let transitions = seen.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
    if transitions == i32::MAX {
        // A count edited to the largest the apiserver takes has no successor, and a tenure is named by it
        // (`tenure::id`): counted on, it would wrap to a value the apiserver refuses (the Lease never taken over
        // again); kept, a tenure would take the name of one revoked before. Made anew instead (a new uid names new
        // tenures), deleted only as it was seen.
        if !release_if_current(api, seen).await? {
            return Ok(Acquire::Lost(None));
        }
        return create(api, &kube::ResourceExt::name_any(seen), claim, timing).await;
    }
    let mut lease = seen.clone();
    let annotations = lease.metadata.annotations.get_or_insert_with(Default::default);
    annotations.extend(claim.annotations.clone());
    lease.metadata.owner_references = claim.owner.clone().map(|o| vec![o]);
    // And its labels, so a Lease whose labels were edited becomes visible to every replica's watch again.
    lease.metadata.labels.get_or_insert_with(Default::default).extend(claim.labels.clone());
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = Some(claim.holder.clone());
    spec.lease_duration_seconds = Some(timing.duration_seconds());
    spec.acquire_time = Some(now_micro());
    spec.renew_time = Some(now_micro());
    spec.lease_transitions = Some(transitions + 1);
    let written_at = Instant::now();
    let written = replace(api, &lease).await?;
    Ok(written.map_or(Acquire::Lost(None), |lease| Acquire::Acquired(Held { lease, written_at })))
}

/// Write `lease` under its resourceVersion. `Ok(None)`: someone else wrote (or deleted) it since.
async fn replace(api: &Api<Lease>, lease: &Lease) -> Result<Option<Lease>> {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    match api.replace(name, &PostParams::default(), lease).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if api_code(&e) == Some(409) || gone(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Delete a Lease this replica holds, only if it is still exactly as last written by us.
pub async fn release(api: &Api<Lease>, held: &Lease) -> Result<()> {
    release_if_current(api, held).await.map(|_| ())
}

/// [`release`], saying whether the Lease is gone now (`false`: it changed since `held`, and is still there).
pub async fn release_if_current(api: &Api<Lease>, held: &Lease) -> Result<bool> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: held.metadata.resource_version.clone(),
            uid: held.metadata.uid.clone(),
        }),
        ..Default::default()
    };
    match api.delete(held.metadata.name.as_deref().unwrap_or_default(), &dp).await {
        Ok(_) => Ok(true),
        Err(e) if gone(&e) => Ok(true),
        Err(e) if api_code(&e) == Some(409) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Give up a Lease this replica holds but keep the object, with no holder (client-go's release on cancel): others
/// may take a vacant Lease at once, whereas an absent one is waited out for a lease duration (it may have been
/// deleted under a holder that is still acting). Only if it is still exactly as last written by us.
pub async fn vacate(api: &Api<Lease>, held: &Lease) -> Result<()> {
    let mut lease = held.clone();
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    replace(api, &lease).await.map(|_| ())
}

/// Keep a Lease this replica holds as it is, but vouched for by no tenure (see [`tenure`]): others take it once
/// they have seen it unchanged for a lease duration. For a cluster slot whose Pod runs on after its attempt was
/// handed over: the slot stays counted until the Pod's adopter takes it. Only if it is still exactly as held.
pub async fn disown(api: &Api<Lease>, held: &Lease) -> Result<()> {
    replace(api, &disowned(held)).await.map(|_| ())
}

/// `held` vouched for by no tenure, renewed now, still saying in which lease namespace it was claimed
/// ([`tenure::DISOWNED_IN_ANNOTATION`]): a cluster cap counts a handed-over Pod that no slot names against the slots
/// of that namespace's deployment, and only that one's ([`crate::limits::takes_a_place_here`]).
pub fn disowned(held: &Lease) -> Lease {
    let mut lease = held.clone();
    let claimed_in = tenure::vouched_in(held).map(str::to_string);
    if let Some(a) = lease.metadata.annotations.as_mut() {
        a.remove(tenure::TENURE_ANNOTATION);
        a.remove(tenure::TENURE_MEMBER_ANNOTATION);
        if let Some(namespace) = claimed_in {
            a.insert(tenure::DISOWNED_IN_ANNOTATION.to_string(), namespace);
        }
    }
    if let Some(l) = lease.metadata.labels.as_mut() {
        l.remove(tenure::HELD_BY_LABEL);
    }
    lease.spec.get_or_insert_with(Default::default).renew_time = Some(now_micro());
    lease
}

/// The holder named in a Lease.
pub fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// The attempt a claim, key or slot Lease was written for ([`ATTEMPT_ANNOTATION`]; 0 if it does not say).
pub fn attempt(lease: &Lease) -> i32 {
    annotation(lease, ATTEMPT_ANNOTATION).and_then(|a| a.parse().ok()).unwrap_or(0)
}

/// An annotation of a Lease.
pub fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether `now` is the same tenure as `held`: the same Lease object, the same holder, acquired by the same write.
/// Anything else (a takeover, a re-creation) means the Lease changed hands.
pub fn same_tenure(held: &Lease, now: &Lease) -> bool {
    let spec = |l: &Lease| l.spec.clone().unwrap_or_default();
    let (a, b) = (spec(held), spec(now));
    held.metadata.uid == now.metadata.uid
        && holder(held) == holder(now)
        && a.acquire_time == b.acquire_time
        && a.lease_transitions == b.lease_transitions
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disowned claim still says which lease namespace's deployment claimed it: a handed-over Pod that no slot
    /// names counts against that deployment's cap, and only that one's (review: a replica serving its queue shut
    /// down, the claim said nothing any more, and the others started one over the cap beside that Pod).
    #[test]
    fn a_disowned_lease_is_vouched_for_by_no_tenure_yet_says_where_it_was_claimed() {
        let mut held = Lease::default();
        held.metadata.annotations = Some(
            [
                (tenure::TENURE_ANNOTATION.to_string(), "m/uid/1".to_string()),
                (tenure::TENURE_MEMBER_ANNOTATION.to_string(), tenure::tenure_member("ops", "m/uid/1")),
                (JOB_UID_ANNOTATION.to_string(), "j".to_string()),
            ]
            .into(),
        );
        held.metadata.labels = Some([(tenure::HELD_BY_LABEL.to_string(), "m".to_string())].into());
        assert_eq!(tenure::claimed_in(&held), Some("ops"));
        let gone = disowned(&held);
        assert_eq!((tenure::vouched_by(&gone), tenure::vouched_in(&gone)), (None, None));
        assert!(!kube::ResourceExt::labels(&gone).contains_key(tenure::HELD_BY_LABEL));
        assert_eq!(annotation(&gone, JOB_UID_ANNOTATION), Some("j"));
        assert_eq!(tenure::claimed_in(&gone), Some("ops"));
        assert_eq!(tenure::claimed_in(&Lease::default()), None, "an older replica's says nothing");
    }

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
    fn lease_duration_rounds_up_to_whole_seconds() {
        let t = LeaseTiming {
            duration: Duration::from_millis(2500),
            renew_deadline: Duration::from_secs(2),
            renew_interval: Duration::from_millis(500),
        };
        assert_eq!(t.duration_seconds(), 3);
    }

    /// A Lease names its job's namespace only beside the UID it was written with: a takeover by a release that does
    /// not write it keeps the one an earlier claim left, next to a newer UID.
    #[test]
    fn a_leases_job_namespace_counts_only_beside_the_uid_it_was_written_with() {
        let with = |uid: &str, job_ref: Option<&str>| {
            let mut annotations = std::collections::BTreeMap::from([(JOB_UID_ANNOTATION.to_string(), uid.to_string())]);
            if let Some(r) = job_ref {
                annotations.insert(JOB_REF_ANNOTATION.to_string(), r.to_string());
            }
            Lease { metadata: ObjectMeta { annotations: Some(annotations), ..Default::default() }, spec: None }
        };
        assert_eq!(job_namespace(&with("uid-b", Some(&job_ref("team-b", "uid-b")))), Some("team-b"));
        assert_eq!(job_namespace(&with("uid-b", Some(&job_ref("team-a", "uid-a")))), None, "left by an earlier claim");
        assert_eq!(job_namespace(&with("uid-b", None)), None, "written by an older release");
    }

    #[test]
    fn a_lease_expires_only_once_seen_unchanged_for_a_full_duration() {
        let t = LeaseTiming::default();
        assert!(!t.expired(Duration::from_millis(14_999)));
        assert!(t.expired(Duration::from_secs(15)));
        assert_eq!(t.until_expiry(Duration::from_secs(5)), Duration::from_secs(10));
        assert_eq!(t.until_expiry(Duration::from_secs(50)), Duration::from_millis(100));
    }

    #[test]
    fn a_takeover_or_a_re_creation_is_another_tenure() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        let lease = |uid: &str, holder: &str, transitions: i32| Lease {
            metadata: ObjectMeta { uid: Some(uid.into()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        };
        let mine = lease("u1", "a", 1);
        let mut renewed = mine.clone();
        renewed.metadata.resource_version = Some("9".into());
        assert!(same_tenure(&mine, &renewed), "a renewal keeps the tenure");
        assert!(!same_tenure(&mine, &lease("u1", "b", 2)), "taken over");
        assert!(!same_tenure(&mine, &lease("u1", "a", 2)), "taken over by a process with the same identity");
        assert!(!same_tenure(&mine, &lease("u2", "a", 1)), "deleted and re-created");
    }
}
