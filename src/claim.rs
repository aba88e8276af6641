//! Where a claim is made and fenced.
//!
//! A replica claims attempt `n + 1` of a job in two conditional writes:
//! 1. the job's claim Lease (`bgj-<job name>`, owned by the job): created if absent, or taken over under the
//!    resourceVersion this replica saw when the Lease is a leftover or has expired;
//! 2. the job's status, to `Running` with `attempts = n + 1`, under the resourceVersion the decision was made on.
//!
//! Losing either race means someone else got there first: the replica moves on (and gives back a Lease it won).
//! The attempt number is the fencing epoch: every later write checks it (see [`crate::status::write_fenced`]).

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use std::sync::Arc;

use kube::{Api, Client, Resource, ResourceExt};

use crate::api::BackgroundJobStatus;
use crate::api::{BackgroundJob, Phase};
use crate::error::Error;
use crate::error::Result;
use crate::lease::tenure::{self, Revocation, TENURE_ANNOTATION, TENURE_MEMBER_ANNOTATION};
use crate::lease::{self, Acquire, Claim, Ending, Held, Keeper, LeaseTiming};
use crate::status::{self, Fence};

/// The state of a job's claim Lease, as one replica judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// No Lease: free to create.
    Absent,
    /// A Lease from an earlier attempt or an earlier job of the same name: free to take over now.
    Leftover,
    /// Held for the current or the next attempt and renewed recently, as far as this replica has seen.
    Live,
    /// Held for the current or the next attempt, but seen unchanged for a full lease duration: its holder is gone.
    Expired,
}

/// Judge a job's claim Lease. `unchanged_for` is how long this replica has seen it (or its absence) unchanged.
pub fn lease_state(
    job: &BackgroundJob,
    lease: Option<&Lease>,
    unchanged_for: Duration,
    timing: &LeaseTiming,
) -> LeaseState {
    let Some(lease) = lease else { return LeaseState::Absent };
    let same_job = !names_another_job(lease, job);
    let lease_attempt = lease::attempt(lease);
    // While Running, the current attempt's Lease is the live one; while Waiting, only a claim of the next attempt
    // (a replica between its two writes) is.
    let guarded_attempt = if job.phase() == Phase::Running { job.attempts() } else { job.attempts().saturating_add(1) };
    let by_age = if timing.expired(unchanged_for) { LeaseState::Expired } else { LeaseState::Live };
    if lease::holder(lease).is_none() {
        return LeaseState::Leftover;
    }
    if !same_job {
        // Another job's claim. An earlier job of this name left it (or a later one holds it: `acquire` reads the
        // name before taking it). A job of another name whose Lease has this Lease's name (one named by its UID,
        // `bgj-<uid>`, and one named like that UID) holds it as any claim is held: judged by its age.
        return if of_this_name(lease, job) { LeaseState::Leftover } else { by_age };
    }
    if lease_attempt < guarded_attempt {
        return LeaseState::Leftover;
    }
    by_age
}

/// Whether `lease` was written for a job of `job`'s name (its job label), whichever job of that name.
fn of_this_name(lease: &Lease, job: &BackgroundJob) -> bool {
    let label = lease.metadata.labels.as_ref().and_then(|l| l.get(JOB_LABEL));
    label.is_some_and(|l| *l == crate::names::label_value(&job.name_any()))
}

/// What a replica's [`lease::Observer`] tracks for a job's claim: the Lease's version *and* the job's phase and
/// attempt. A job that moves (Waiting to Running, attempt n to n+1) starts a fresh clock, so time spent with no
/// Lease while Waiting never counts towards "its Running attempt stopped renewing".
pub fn observed_version(job: &BackgroundJob, lease: Option<&Lease>) -> String {
    let rv = lease.and_then(|l| l.metadata.resource_version.as_deref()).unwrap_or("-");
    format!("{rv}/{}/{}", job.phase(), job.attempts())
}

/// Label naming the job on every object bgjobs makes for it (shortened with a hash past 63 characters).
pub const JOB_LABEL: &str = "bgjobs.dev/job";

/// Name of a job's claim Lease.
pub fn lease_name(job: &BackgroundJob) -> String {
    let name = job.name_any();
    if name.len() + 4 <= 253 { format!("bgj-{name}") } else { format!("bgj-{}", job.uid().unwrap_or_default()) }
}

/// Another Lease a claim must hold for as long as its attempt runs: a cluster-wide slot ([`crate::limits`]) or a
/// concurrency key ([`crate::keys`]). Acquired before the job's own Lease, given back if the claim is lost.
#[derive(Clone, Debug)]
pub struct ExtraLease {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// As seen: `None` to create it, else the (leftover or expired) Lease to take over.
    pub seen: Option<Arc<Lease>>,
    /// Label that marks what it is (`bgjobs.dev/slot`, `bgjobs.dev/concurrency-key`).
    pub label: &'static str,
    /// The tenure vouching for `seen`, when it is taken because it expired (that tenure must end first; see
    /// [`crate::lease::tenure`]). `None` for a Lease that is free without that: absent, vacant, or left over.
    pub expired_tenure: Option<tenure::Vouch>,
    /// `seen` names a job this replica's cache does not show as finished (deleted, not seen yet, or shown unfinished by
    /// a cache that lags): its Pods may still run with nobody to stop them, so they are looked for before it is taken
    /// ([`pod_outliving_its_lease`]).
    pub job_may_run: bool,
}

/// A claimed attempt, ready to run.
#[derive(Clone, Debug)]
pub struct Claimed {
    /// The job as the claim wrote it.
    pub job: BackgroundJob,
    /// The claim Lease as acquired (with the instant its write was sent: the renew deadline counts from there).
    pub lease: Held,
    /// Who may write from now on.
    pub fence: Fence,
    /// The attempt replaced (or adopted) one whose worker stopped renewing its Lease: what happened, as the claim
    /// wrote it into `lastError` (which a status too large to store whole may have had to drop).
    pub took_over: Option<String>,
    /// The extra Leases (slot, concurrency key) held for the attempt.
    pub extras: Vec<Held>,
    /// The tenure (this replica's member Lease) the claim was made under: the attempt acts only while it is current.
    pub tenure: Arc<Keeper>,
}

/// Who claims, under which Lease timing and tenure, and the cluster's time of the decision ([`crate::clock`]).
#[derive(Clone, Copy)]
pub struct Claimant<'a> {
    /// The replica's identity.
    pub identity: &'a str,
    /// Its Lease timing.
    pub timing: &'a LeaseTiming,
    /// The cluster's time now.
    pub now: Timestamp,
    /// The replica's tenure (its member Lease's Keeper), which vouches for every Lease the claim writes.
    pub tenure: &'a Arc<Keeper>,
    /// How to end the tenures vouching for the expired Leases the claim takes over (see [`end_tenures`]).
    pub ends: &'a [(String, Ending)],
    /// The replica's job cache: what it shows finished spares a read ([`pod_outliving_its_lease`]).
    pub cached: &'a kube::runtime::reflector::Store<BackgroundJob>,
}

/// Outcome of a claim.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// Ours.
    Claimed(Box<Claimed>),
    /// Another replica got there first: what it had done first is the reason.
    Lost(LostAt),
    /// Another replica took a cluster slot first (or this replica has no tenure yet): the job itself was not touched
    /// and may be claimed again at once (a concurrency key's Lease: [`LostAt::KeyLease`]).
    Busy,
    /// The job is too large for etcd to store the claim's status beside its spec (see [`too_large`]). `Some`: it
    /// was failed instead, for this reason; `None`: not even that fits, and the job was left as it was.
    TooLarge(Option<String>),
}

/// Where a claim found another replica ahead of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostAt {
    /// The tenure vouching for an expired Lease it needed was renewed after all, or may have been: its holder may be
    /// alive, whatever this replica's member watch showed (lagging, or not watching its namespace). Holds that tenure,
    /// and its member Lease as read in it when this replica never saw it in its watch ([`Ending::Unknown`]).
    TenureRenewed(String, Option<ReadMember>),
    /// This replica may not read (or revoke) the member Lease of a tenure vouching for an expired Lease it needed
    /// (another lease namespace, roles of its own only): the job is left alone until `until`. Nothing is concluded
    /// about the tenure itself, which vouches for other Leases too.
    TenureUnreadable { until: std::time::Instant },
    /// The job's claim Lease is held, or was taken between the look and the write.
    ClaimLease,
    /// The job changed since it was read (or is gone): someone else moved it.
    JobChanged,
    /// The attempt's Pod has not stopped yet, or a create of it may still land (a settle waits for both).
    PodRunning,
    /// The attempt's Pod (named here) was deleted and has not stopped a lease duration past its grace period: its
    /// node is most likely unreachable (see `executor::pod::not_stopping`).
    PodNotStopping(String),
    /// The attempt has no Pod to stop (none, or it finished or is being deleted), but a create of it may still land:
    /// look again at `until`. `not_stopping`: the Pod being deleted has not stopped a lease duration past its grace
    /// period (as [`LostAt::PodNotStopping`]).
    PodToCome { until: std::time::Instant, not_stopping: Option<String> },
    /// This replica's own tenure is not current: it may take no Lease.
    NoTenure,
    /// A held Lease it needed (a concurrency key, a cluster slot: `slot`), named `lease`, names a job that is not
    /// this one, whose Pod `pod` may still run: that job was deleted (or is not in this replica's cache), and its
    /// holder is gone. Look again at `until` (a slot: try the others meanwhile).
    GoneJobsPod { pod: String, lease: String, slot: bool, until: std::time::Instant },
    /// The concurrency key's Lease was there, or taken, before this claim's write: the key's turn is another job's
    /// (the caches show it soon), so the job waits a moment instead of being claimed again at once.
    KeyLease,
    /// A Lease this claim needs (`lease`: a cluster slot when `slot`, else the job's claim or its concurrency key)
    /// exists under the name bgjobs gives it but is not one this replica's caches show ([`unseen_by_caches`]: made
    /// by hand or by something else, or its labels edited): judged absent, it would be tried again at every pass.
    /// Left until `until`, and said on the job.
    Foreign { namespace: String, lease: String, slot: bool, until: std::time::Instant },
}

/// How long a claim that met a Lease its replica's caches do not show ([`LostAt::Foreign`]) waits before it tries
/// again (a slot: the others are tried meanwhile).
pub const FOREIGN_LEASE_LOOK: Duration = Duration::from_secs(30);

/// Whether this replica's caches never show `lease`: the job namespaces' Leases are watched by bgjobs' own
/// `app.kubernetes.io/managed-by` label, the cluster slots by their slot label.
pub fn unseen_by_caches(lease: &Lease, slot: bool) -> bool {
    let labels = lease.labels();
    if slot {
        !labels.contains_key(crate::limits::SLOT_LABEL)
    } else {
        labels.get(lease::MANAGED_BY_LABEL).map(String::as_str) != Some(lease::MANAGED_BY)
    }
}

/// The [`LostAt::Foreign`] of a Lease a create met, if the caches do not show it.
fn foreign(existing: Option<&Lease>, slot: bool) -> Option<LostAt> {
    let existing = existing.filter(|l| unseen_by_caches(l, slot))?;
    let (namespace, lease) = (existing.namespace().unwrap_or_default(), existing.name_any());
    Some(LostAt::Foreign { namespace, lease, slot, until: std::time::Instant::now() + FOREIGN_LEASE_LOOK })
}

/// A member Lease as read, compared by UID and resourceVersion.
#[derive(Debug, Clone)]
pub struct ReadMember(pub Arc<Lease>);

impl PartialEq for ReadMember {
    fn eq(&self, other: &Self) -> bool {
        same_version(&self.0, &other.0)
    }
}

/// Whether two reads show the same Lease (UID) at the same version: nothing wrote it between them.
fn same_version(a: &Lease, b: &Lease) -> bool {
    (a.metadata.uid.as_ref(), a.resource_version()) == (b.metadata.uid.as_ref(), b.resource_version())
}

impl Eq for ReadMember {}

impl LostAt {
    /// The attempt's Pod, deleted, that has not stopped a lease duration past its grace period, if this look found
    /// one (its node is most likely unreachable).
    pub fn pod_not_stopping(&self) -> Option<&str> {
        match self {
            LostAt::PodNotStopping(pod) | LostAt::PodToCome { not_stopping: Some(pod), .. } => Some(pod),
            _ => None,
        }
    }
}

impl std::fmt::Display for LostAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostAt::TenureRenewed(..) => "the holder of a Lease it needed renewed its tenure",
            LostAt::TenureUnreadable { .. } => "it may not read the member Lease of a Lease it needed",
            LostAt::ClaimLease => "the claim Lease is held",
            LostAt::JobChanged => "the job changed since it was read",
            LostAt::PodRunning => "the attempt's Pod has not stopped yet, or a create of it may still land",
            LostAt::PodNotStopping(_) => "the attempt's Pod was deleted and has not stopped (its node unreachable?)",
            LostAt::PodToCome { .. } => "a create of the attempt's Pod may still land",
            LostAt::NoTenure => "this replica's tenure is not current",
            LostAt::GoneJobsPod { .. } => "a Lease it needed names another job whose Pod may still run",
            LostAt::KeyLease => "the concurrency key's Lease is held",
            LostAt::Foreign { .. } => "a Lease it needed exists but is not one bgjobs' caches show",
        })
    }
}

/// Claim the next attempt of `job` (as seen at its resourceVersion) for `worker`. `seen_lease` and `state` are the
/// claim Lease as judged by [`lease_state`]; the caller claims only `Absent`, `Leftover` and `Expired` Leases.
/// The `extras` are acquired first, in order, and given back if the claim is lost.
pub async fn claim(
    client: &Client,
    job: &BackgroundJob,
    seen_lease: Option<&Lease>,
    state: LeaseState,
    claimant: Claimant<'_>,
    extras: &[ExtraLease],
) -> Result<ClaimOutcome> {
    let timing = claimant.timing;
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let Some(claim) = claim_for(job, claimant) else { return Ok(ClaimOutcome::Busy) };
    if let Some((pod, extra)) = pod_outliving_its_lease(client, job, extras, claimant.cached).await? {
        let (lease, slot) = (extra.name.clone(), extra.label == crate::limits::SLOT_LABEL);
        let until = std::time::Instant::now() + POD_LOOK;
        return Ok(ClaimOutcome::Lost(LostAt::GoneJobsPod { pod, lease, slot, until }));
    }
    if let Some(lost) = end_tenures(client, claimant.ends, timing).await? {
        return Ok(ClaimOutcome::Lost(lost));
    }
    let mut held: Vec<(Api<Lease>, Held)> = Vec::new();
    for extra in extras {
        let api: Api<Lease> = Api::namespaced(client.clone(), &extra.namespace);
        let mut c = claim.clone();
        // Not the job's label (a slot or a key is not the job's), but the holder's, so its confirming list finds it.
        c.labels.retain(|k, _| k != JOB_LABEL);
        c.labels.insert(extra.label.to_string(), "true".to_string());
        c.owner = None;
        let acquired = match extra.seen.as_deref() {
            None => lease::create(&api, &extra.name, &c, timing).await,
            Some(seen) => lease::take_over(&api, seen, &c, timing).await,
        };
        let slot = extra.label == crate::limits::SLOT_LABEL;
        match acquired {
            Ok(Acquire::Acquired(l)) => held.push((api, l)),
            other => {
                release_all(&held, adopts(job)).await;
                return other.map(|lost| match lost {
                    Acquire::Lost(existing) if let Some(at) = foreign(existing.as_ref(), slot) => {
                        ClaimOutcome::Lost(at)
                    }
                    _ if !slot => ClaimOutcome::Lost(LostAt::KeyLease),
                    _ => ClaimOutcome::Busy,
                });
            }
        }
    }
    let extras_held = held.iter().map(|(_, h)| h.clone()).collect();
    let outcome = claim_job(&jobs, &leases, job, seen_lease, state, &claim, claimant, extras_held).await;
    if !matches!(outcome, Ok(ClaimOutcome::Claimed(_))) {
        release_all(&held, adopts(job)).await;
    }
    outcome
}

/// Whether the job a key or slot Lease (`lease`) names, as this replica caches it (`None`: not cached, deleted or not
/// seen yet), may still have a Pod running ([`ExtraLease::job_may_run`]): unless it is shown finished, its Pods
/// stopped before that was recorded (a `Failed` Pod kept for inspection must not hold the key for as long as its job
/// is kept). Unless the Lease names a later attempt than the cache shows: the job was put back in the queue
/// (`bgjobs retry`) and claimed since, and this replica's cache lags.
pub fn job_may_run(cached: Option<&BackgroundJob>, lease: Option<&Lease>) -> bool {
    job_may_run_at(cached, lease.map(lease::attempt))
}

/// [`job_may_run`] for what names the job at `attempt` (a Lease, a Pod): unless the job is shown finished at that
/// attempt or later.
pub fn job_may_run_at(cached: Option<&BackgroundJob>, attempt: Option<i32>) -> bool {
    cached.is_none_or(|j| !j.phase().is_final() || attempt.is_some_and(|a| a > j.attempts()))
}

/// How soon a claim held back by a gone job's Pod ([`LostAt::GoneJobsPod`]) looks again.
const POD_LOOK: Duration = Duration::from_secs(5);

/// A Pod that may still run, of a job another than `job` whose held Lease (a concurrency key, a cluster slot) the
/// claim would take over, expired or disowned. Such a Lease's job is adopted with it while it exists: it is the
/// key's turn, and takes its slot along. If the job was deleted while its holder was dead, or after its holder
/// handed it over, the Lease is all that is left of it, while the garbage collector deletes its Pod, which runs on
/// through its grace period (a container that ignores SIGTERM, as a shell does, runs all of it), or for as long as
/// it likes while the controller-manager is down. The key and the slot stay taken until that Pod has stopped.
/// Vacant Leases are free without a look (their holder stopped its Pod before it gave them back), and so are those
/// whose job this replica's cache shows finished ([`job_may_run`]). A Lease that does not say its job's namespace (a
/// slot of an older release) is not looked into; a key Lease is in its job's namespace. An absent key Lease was
/// given back (its Pods stopped), never made, or deleted by hand, maybe under a Pod that runs on: the key's Pods are
/// looked for by their label ([`crate::keys::POD_KEY_LABEL`]; a Pod of an older release carries none). An absent slot
/// is waited out instead ([`crate::limits::free_slots`]), and a running job that no slot names keeps its place
/// ([`crate::limits::slotless`]).
async fn pod_outliving_its_lease<'a>(
    client: &Client,
    job: &BackgroundJob,
    extras: &'a [ExtraLease],
    cached: &kube::runtime::reflector::Store<BackgroundJob>,
) -> Result<Option<(String, &'a ExtraLease)>> {
    let uid = job.uid().unwrap_or_default();
    for extra in extras.iter().filter(|e| e.job_may_run) {
        if extra.seen.is_none()
            && extra.label == crate::keys::KEY_LABEL
            && let Some(key) = job.spec.concurrency_key.as_deref()
            && let Some(pod) = crate::executor::pod::running_pod_of_key(
                client,
                &job.namespace().unwrap_or_default(),
                key,
                &uid,
                cached,
            )
            .await?
        {
            return Ok(Some((pod, extra)));
        }
        let Some(seen) = extra.seen.as_deref().filter(|l| lease::holder(l).is_some()) else { continue };
        let Some(uid) = lease::annotation(seen, lease::JOB_UID_ANNOTATION).filter(|u| Some(*u) != job.uid().as_deref())
        else {
            continue;
        };
        let namespace = match lease::job_namespace(seen) {
            Some(ns) => ns.to_string(),
            None if extra.label == crate::keys::KEY_LABEL => extra.namespace.clone(),
            None => continue,
        };
        if let Some(pod) = crate::executor::pod::running_pod_of(client, &namespace, uid).await? {
            return Ok(Some((pod, extra)));
        }
    }
    Ok(None)
}

/// End the tenures vouching for the expired Leases a claim (or settle) takes over, before taking any: revoke those
/// this replica saw unchanged for a lease duration (see [`crate::lease::tenure`]). `Ok(Some(lost))`: nothing is
/// taken, because a tenure was renewed since, or may have been ([`LostAt::TenureRenewed`], with its member Lease as
/// read in it when this replica never saw it in its watch), or this replica may not read or revoke its member Lease
/// ([`LostAt::TenureUnreadable`]).
///
/// A tenure found ended only now (its member Lease gone, or in another tenure, when read or revoked) may have been
/// renewed until the request was served: its holder acts until its renew deadline after its last renewal. A lease
/// duration is waited out from the answer, once for all of them, before anything is taken: longer than any replica's
/// renew deadline, of this deployment or another (docs/install.md, timing), not just this one's.
async fn end_tenures(client: &Client, ends: &[(String, Ending)], timing: &LeaseTiming) -> Result<Option<LostAt>> {
    let mut wait_until: Option<tokio::time::Instant> = None;
    let unreadable = || Some(LostAt::TenureUnreadable { until: std::time::Instant::now() + timing.duration });
    let mut ended_before = |found: tokio::time::Instant| {
        let until = found + timing.duration;
        wait_until = Some(wait_until.map_or(until, |w| w.max(until)));
    };
    let forbidden = |id: &str, e: &kube::Error| {
        let allowed = crate::error::api_code(e) != Some(403);
        if !allowed {
            tracing::warn!(tenure = %id, error = %e, "cannot read or revoke the member Lease of a tenure that \
                vouches for an expired Lease (another lease namespace?): left to the replicas that can");
        }
        !allowed
    };
    for (id, ending) in ends {
        let (api, member) = match ending {
            Ending::Over => continue,
            Ending::Revoke(member) => {
                (Api::<Lease>::namespaced(client.clone(), &member.namespace().unwrap_or_default()), member.clone())
            }
            Ending::Unknown { namespace, last_read } => {
                // Never seen in its member Lease here: read that Lease, where the Lease being taken over says it is.
                // (Whoever may write Leases in that Lease's namespace, so run its jobs, may have named it wrongly: a
                // wrong answer bears on that Lease alone, never on another the same tenure vouches for.)
                let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
                let read = match crate::unreadable::get_opt(&api, tenure::member_of(id)).await {
                    Ok(read) => read,
                    Err(e) if forbidden(id, &e) => return Ok(unreadable()),
                    Err(e) => return Err(e.into()),
                };
                let genuine = |m: &Lease| m.metadata.uid.as_deref() == Some(tenure::uid_of(id));
                let read = match read {
                    Some(m) if tenure::tenure_id(&m).as_deref() == Some(id.as_str()) => m,
                    // Revoked by a replica that saw it unchanged a lease duration: its holder has stopped. Only the
                    // tenure's own member Lease (its UID, which the apiserver assigns) says so.
                    Some(m)
                        if genuine(&m) && lease::annotation(&m, tenure::REVOKED_ANNOTATION) == Some(id.as_str()) =>
                    {
                        continue;
                    }
                    // Gone or in another tenure: ended before this read was answered.
                    _ => {
                        ended_before(tokio::time::Instant::now());
                        continue;
                    }
                };
                // Still in the tenure: its holder may be alive. Unless it is exactly as read when the tenure was last
                // judged expired, a lease duration or more ago: nothing renewed it since, so it is revoked under this
                // version, as one seen in the watch would be (a replica of another lease namespace, which this one
                // does not watch, ends so). Only a member Lease (labelled so) is revoked.
                let unchanged = last_read.as_ref().is_some_and(|prev| same_version(prev, &read));
                let member = read.labels().contains_key(crate::members::MEMBER_LABEL)
                    && read.labels().get(lease::MANAGED_BY_LABEL).map(String::as_str) == Some(lease::MANAGED_BY);
                if !unchanged || !member {
                    return Ok(Some(LostAt::TenureRenewed(id.clone(), Some(ReadMember(Arc::new(read))))));
                }
                (api, Arc::new(read))
            }
        };
        match tenure::revoke(&api, &member, id).await {
            Ok(Revocation::Ended) => {
                tracing::info!(tenure = %id, "revoked the tenure of a replica that stopped renewing")
            }
            Ok(Revocation::Renewed) => return Ok(Some(LostAt::TenureRenewed(id.clone(), None))),
            // Deleted after it was seen: it may have been renewed until just before the answer.
            Ok(Revocation::Gone) => ended_before(tokio::time::Instant::now()),
            Err(Error::Kube(e)) if forbidden(id, &e) => return Ok(unreadable()),
            Err(e) => return Err(e),
        }
    }
    if let Some(until) = wait_until {
        tokio::time::sleep_until(until).await;
    }
    Ok(None)
}

/// Give back the extra Leases of a claim that was lost. A cluster slot is left vacant, never deleted (an absent slot
/// is waited out for a lease duration), and a key Lease deleted. Those of a failed adoption, slot and key alike, are
/// kept but disowned: the attempt's Pod still runs under them, and its next adopter takes them over once they have
/// aged a lease duration.
async fn release_all(held: &[(Api<Lease>, Held)], adoption: bool) {
    for (api, h) in held {
        let slot = h.lease.labels().contains_key(crate::limits::SLOT_LABEL);
        let given_back = match (adoption, slot) {
            (true, _) => lease::disown(api, &h.lease).await,
            (false, true) => lease::vacate(api, &h.lease).await,
            (false, false) => lease::release(api, &h.lease).await,
        };
        if let Err(e) = given_back {
            tracing::warn!(error = %e, lease = %h.lease.name_any(), "could not give back a lease; it expires on its own");
        }
    }
}

/// Whether a claim adopts the job's current attempt instead of starting a new one: a Pod job, or an attempt that
/// waits for its worker's report ([`crate::report`]), taken over from a replica that stopped renewing. The work runs
/// on regardless of the replica that watched it, so it is not lost; the new holder watches the same Pod or waits for
/// the same report. (In-process attempts die with their replica and count as lost.)
pub fn adopts(job: &BackgroundJob) -> bool {
    job.phase() == Phase::Running && (job.spec.template.is_some() || crate::report::awaits_report(job))
}

/// Whether the claim that made `attempt` current adopted it from a replica that stopped renewing, rather than
/// starting it: then its Pod or its reporting worker is already at work, and must not be started again. Said by the
/// `Running` condition's reason, which a status too large to store whole keeps ([`status::Room::Bare`] drops
/// messages, `lastError` with them); a claim written by an older replica says it only in `lastError`'s note.
pub fn adopted(job: &BackgroundJob, attempt: i32) -> bool {
    let Some(s) = job.status.as_ref() else { return false };
    let by_reason = s.attempts == attempt && status::adopted(s);
    let notes = [
        format!(" adopted attempt {attempt}'s pod"),
        format!(" adopted attempt {attempt}, which waits for its worker's report"),
    ];
    let by_note = s.last_error.as_deref().is_some_and(|e| notes.iter().any(|n| e.ends_with(n.as_str())));
    by_reason || by_note
}

/// The attempt number a claim of `job` holds: the next one, or the current one when it [`adopts`].
pub fn next_attempt(job: &BackgroundJob) -> i32 {
    if adopts(job) { job.attempts() } else { job.attempts().saturating_add(1) }
}

/// What a claim of the next attempt of `job` writes into its Lease: the attempt, and the tenure that vouches for
/// it (`None` when the claimant's tenure is not current: it must not claim).
fn claim_for(job: &BackgroundJob, claimant: Claimant<'_>) -> Option<Claim> {
    let attempt = next_attempt(job);
    let member = claimant.tenure.lease();
    let tenure = tenure::tenure_id(&member).filter(|_| claimant.tenure.is_current())?;
    let tenure_member = tenure::tenure_member(&member.namespace().unwrap_or_default(), &tenure);
    Some(Claim {
        holder: claimant.identity.to_string(),
        annotations: BTreeMap::from([
            (lease::JOB_UID_ANNOTATION.to_string(), job.uid().unwrap_or_default()),
            (lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
            (
                lease::JOB_REF_ANNOTATION.to_string(),
                lease::job_ref(&job.namespace().unwrap_or_default(), &job.uid().unwrap_or_default()),
            ),
            (TENURE_ANNOTATION.to_string(), tenure),
            (TENURE_MEMBER_ANNOTATION.to_string(), tenure_member),
        ]),
        labels: BTreeMap::from([
            (lease::MANAGED_BY_LABEL.to_string(), lease::MANAGED_BY.to_string()),
            (JOB_LABEL.to_string(), crate::names::label_value(&job.name_any())),
            (tenure::HELD_BY_LABEL.to_string(), member.name_any()),
        ]),
        owner: job.controller_owner_ref(&()).map(|mut o| {
            // Not the controller, and no blockOwnerDeletion: that would need extra RBAC on the job's finalizers.
            o.controller = Some(false);
            o.block_owner_deletion = None;
            o
        }),
    })
}

/// Acquire the job's claim Lease as judged: create it if absent, take it over under the version seen otherwise.
async fn acquire(
    jobs: &Api<BackgroundJob>,
    leases: &Api<Lease>,
    job: &BackgroundJob,
    seen_lease: Option<&Lease>,
    state: LeaseState,
    claim: &Claim,
    timing: &LeaseTiming,
) -> Result<std::result::Result<Held, LostAt>> {
    let name = lease_name(job);
    let take_over = |seen: Lease| async move {
        if names_another_job(&seen, job) && !still_the_job_of_its_name(jobs, job, timing).await? {
            tracing::debug!(job = %job.name_any(), "its claim Lease belongs to a job made under its name since: left to it");
            return Ok(Err(LostAt::ClaimLease));
        }
        Ok::<_, Error>(match lease::take_over(leases, &seen, claim, timing).await? {
            Acquire::Acquired(h) => Ok(h),
            Acquire::Lost(_) => Err(LostAt::ClaimLease),
        })
    };
    match (state, seen_lease) {
        (LeaseState::Live, Some(_)) => Ok(Err(LostAt::ClaimLease)),
        (LeaseState::Absent, _) | (_, None) => match lease::create(leases, &name, claim, timing).await? {
            Acquire::Acquired(h) => Ok(Ok(h)),
            // Someone created it between our look and our write; it may be a leftover we can reuse at once: also one
            // whose labels were lost, if it is a claim's (names a job), and the take-over writes them back. One that
            // is no claim's is not taken (another program's Lease under our name): judged foreign below.
            Acquire::Lost(Some(existing))
                if lease_state(job, Some(&existing), Duration::ZERO, timing) == LeaseState::Leftover
                    && (!unseen_by_caches(&existing, false)
                        || lease::annotation(&existing, lease::JOB_UID_ANNOTATION).is_some()) =>
            {
                take_over(existing).await
            }
            // Not one the caches show: it would be judged absent, and tried again, at every pass.
            Acquire::Lost(existing) if let Some(at) = foreign(existing.as_ref(), false) => Ok(Err(at)),
            Acquire::Lost(_) => Ok(Err(LostAt::ClaimLease)),
        },
        (LeaseState::Leftover | LeaseState::Expired, Some(seen)) => take_over(seen.clone()).await,
    }
}

/// Whether `lease` is the claim of another job than `job` under the same name: an earlier job's leftover, or the
/// claim of a later job made after `job` was deleted.
fn names_another_job(lease: &Lease, job: &BackgroundJob) -> bool {
    lease::annotation(lease, lease::JOB_UID_ANNOTATION) != job.metadata.uid.as_deref()
}

/// Whether the name of `job` still holds `job`, on a quorum read made after its claim Lease was seen naming another
/// job. Only then is that Lease an earlier job's leftover: with `job` deleted since this replica's cache showed it,
/// the Lease may be the live claim of the job made under its name after it, which a takeover would take from a
/// healthy holder (who would stop its attempt, then find the job orphaned).
///
/// Bounded by half the renew deadline: Leases the claim took before this one (a slot, a key) age meanwhile.
async fn still_the_job_of_its_name(
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    timing: &LeaseTiming,
) -> Result<bool> {
    let read = async { Ok(crate::unreadable::get_opt(jobs, &job.name_any()).await?) };
    let now = crate::client::bounded(timing.renew_deadline / 2, read).await?;
    Ok(now.is_some_and(|now| now.uid() == job.uid()))
}

/// Write `status` over `job` as seen, while `held` and the Leases taken `beside` it (a slot, a key) are still ours:
/// bounded by what is left of the renew deadline of the one written first, because past it another replica may take
/// that one over (and the attempt would find itself stale as it starts: not run, yet charged as lost). `Ok(None)`:
/// someone moved the job first. An error (or the bound) leaves it unknown whether the write landed; a bound spent
/// before the write is sent sends nothing.
async fn write_holding(
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    (held, beside): (&Held, &[Held]),
    claimant: Claimant<'_>,
    status: BackgroundJobStatus,
) -> Result<Option<BackgroundJob>> {
    let oldest = beside.iter().map(|h| h.written_at).fold(held.written_at, std::time::Instant::min);
    let left = claimant.timing.renew_deadline.saturating_sub(oldest.elapsed()).min(claimant.tenure.time_left());
    if left.is_zero() {
        return Err(Error::Stale("a Lease the write needs aged past its renew deadline before it was sent".into()));
    }
    match tokio::time::timeout(left, status::write_if_unchanged(jobs, job, status)).await {
        Ok(written) => written,
        Err(_) => Err(Error::Timeout(left)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn claim_job(
    jobs: &Api<BackgroundJob>,
    leases: &Api<Lease>,
    job: &BackgroundJob,
    seen_lease: Option<&Lease>,
    state: LeaseState,
    claim: &Claim,
    claimant: Claimant<'_>,
    extras: Vec<Held>,
) -> Result<ClaimOutcome> {
    let (worker, timing) = (claim.holder.as_str(), claimant.timing);
    let attempt = next_attempt(job);
    let name = lease_name(job);
    let uid = job.uid().unwrap_or_default();
    let acquired = match acquire(jobs, leases, job, seen_lease, state, claim, timing).await? {
        Ok(acquired) => acquired,
        Err(lost) => return Ok(ClaimOutcome::Lost(lost)),
    };

    let lost_note = (job.phase() == Phase::Running).then(|| {
        let old = job.status.as_ref().and_then(|s| s.worker.as_deref()).unwrap_or("?");
        if adopts(job) && job.spec.template.is_none() {
            format!(
                "worker {old} stopped renewing its lease; {worker} adopted attempt {}, which waits for its worker's \
                 report",
                job.attempts()
            )
        } else if adopts(job) {
            format!("worker {old} stopped renewing its lease; {worker} adopted attempt {}'s pod", job.attempts())
        } else {
            format!("attempt {} was lost: worker {old} stopped renewing its lease", job.attempts())
        }
    });
    let sequence = crate::ordering::enqueue_sequence(job);
    let mut new_status = status::running(job, attempt, worker, &name, sequence, lost_note.clone(), claimant.now);
    if adopts(job) {
        // The adopted attempt keeps the start time it had: its attemptTimeoutSeconds counts from there.
        new_status.start_time = job.status.as_ref().and_then(|s| s.start_time.clone()).or(new_status.start_time);
        status::mark_adopted(&mut new_status);
    }
    match write_holding(jobs, job, (&acquired, &extras), claimant, new_status).await {
        Ok(Some(written)) => Ok(ClaimOutcome::Claimed(Box::new(Claimed {
            job: written,
            lease: acquired,
            fence: Fence { uid, worker: worker.to_string(), attempt },
            took_over: lost_note,
            extras,
            tenure: claimant.tenure.clone(),
        }))),
        Ok(None) => given_back(leases, job, &acquired, ClaimOutcome::Lost(LostAt::JobChanged)).await,
        Err(e) if e.is_too_large_for_etcd() => too_large(jobs, leases, job, &acquired, claimant).await,
        Err(e) => {
            if !not_landed(&e) && !adopts(job) {
                // Within the claim (the dispatcher allows for it, [`hand_back_takes_at_most`]): the job stays held
                // meanwhile, so neither a shutdown nor this replica's next claim of it overtakes the hand-back.
                let fence = Fence { uid, worker: worker.to_string(), attempt };
                hand_back_if_landed(jobs, job, &fence, claimant.now, timing.renew_deadline).await;
            }
            give_back_after_failed_write(leases, &acquired.lease, &e).await;
            Err(e)
        }
    }
}

/// How much longer than its other steps a claim may take: a renew deadline for [`hand_back_if_landed`].
pub fn hand_back_takes_at_most(timing: &LeaseTiming) -> Duration {
    timing.renew_deadline
}

/// After a claim's status write whose outcome is unknown (an error or an answer later than the bound: the write may
/// have landed), read the job and, if the claim landed, hand the attempt back unstarted, as an attempt never begun
/// is: not counted against the job's retries. Left as it was, the claim was found orphaned a lease duration later
/// and charged as a lost attempt, and on the job's last attempt it failed the job, which had never run. Best effort,
/// bounded by `bound`, within the claim; fenced, so it writes nothing if the claim did not land or the job moved on.
/// The read and the write are sent again until answered within the bound: the error that made the outcome unknown
/// (an apiserver restarting, a connection reset) often fails the next request too. (A write held on its way to the
/// apiserver that lands after this read is not seen: that claim is still found orphaned.)
async fn hand_back_if_landed(
    jobs: &Api<BackgroundJob>,
    job: &BackgroundJob,
    fence: &Fence,
    now: jiff::Timestamp,
    bound: Duration,
) {
    let name = job.name_any();
    let message =
        status::not_started(fence.attempt, &fence.worker, "could not tell whether its claim was recorded in time");
    let once = async || {
        let Some(read) = crate::unreadable::get_opt(jobs, &name).await? else { return Ok(false) };
        let written =
            status::write_fenced(jobs, &read, fence, |s| status::requeue_unstarted(s, message.clone(), None, now))
                .await?;
        Ok::<_, Error>(matches!(written, status::Fenced::Written(_)))
    };
    let mut last_error = None;
    let hand_back = async {
        let mut backoff = crate::client::Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        loop {
            match once().await {
                Ok(written) => return written,
                Err(e) => {
                    tracing::debug!(job = %name, error = %e, "could not tell yet whether a claim landed; asking again");
                    last_error = Some(e.to_string());
                }
            }
            backoff.wait().await;
        }
    };
    match tokio::time::timeout(bound, hand_back).await {
        Ok(true) => {
            tracing::info!(job = %name, "a claim's status write landed after its bound: handed back unstarted")
        }
        Ok(false) => {}
        Err(_) => tracing::warn!(job = %name, error = last_error.as_deref().unwrap_or("no answer"),
            "could not tell in time whether a claim landed"),
    }
}

/// Why a job too large to claim was failed (short: it must fit where the claim's status did not).
pub const TOO_LARGE_TO_CLAIM: &str = "no attempt can be recorded: the job is too large for etcd to store an \
    attempt's status beside its spec (etcdserver: request is too large); pass large inputs by reference";

/// Even bare ([`status::Room`]), the claim's status did not fit beside the job's spec. A job that is not adopted is failed, its
/// status kept as small as it can be, so it says why instead of being claimed in a loop for ever. An adopted
/// attempt's Pod or worker runs on: its claim is disowned for its next adopter, and nothing is written.
async fn too_large(
    jobs: &Api<BackgroundJob>,
    leases: &Api<Lease>,
    job: &BackgroundJob,
    acquired: &Held,
    claimant: Claimant<'_>,
) -> Result<ClaimOutcome> {
    if adopts(job) {
        return given_back(leases, job, acquired, ClaimOutcome::TooLarge(None)).await;
    }
    let mut failed = job.status.as_deref().cloned().unwrap_or_default();
    status::finish(&mut failed, Phase::Failed, Some(TOO_LARGE_TO_CLAIM.to_string()), claimant.now);
    let outcome = match write_holding(jobs, job, (acquired, &[]), claimant, failed).await {
        Ok(Some(_)) => ClaimOutcome::TooLarge(Some(TOO_LARGE_TO_CLAIM.to_string())),
        Ok(None) => ClaimOutcome::Lost(LostAt::JobChanged),
        Err(e) if e.is_too_large_for_etcd() => ClaimOutcome::TooLarge(None),
        Err(e) => {
            give_back_after_failed_write(leases, &acquired.lease, &e).await;
            return Err(e);
        }
    };
    given_back(leases, job, acquired, outcome).await
}

/// Give back the claim Lease of a claim that did not go ahead, then report `outcome`. An adopted attempt's Pod or
/// worker runs on: its claim stays, disowned, for its next adopter (as its extras do).
async fn given_back(
    leases: &Api<Lease>,
    job: &BackgroundJob,
    acquired: &Held,
    outcome: ClaimOutcome,
) -> Result<ClaimOutcome> {
    if adopts(job) {
        lease::disown(leases, &acquired.lease).await?;
    } else {
        lease::release(leases, &acquired.lease).await?;
    }
    Ok(outcome)
}

/// How often a settle that waits for an orphaned attempt's Pod to land looks for it (one read).
const POD_TO_COME_RECHECK: Duration = Duration::from_secs(10);

/// Move a job nobody holds to a final phase (`status` is the complete new status), if it is still as seen.
///
/// A Running job whose holder looks gone is settled only under its claim Lease, taken exactly as a claim takes it:
/// a holder that is in fact alive (this replica's view of its Lease was stale) has renewed since, the takeover
/// conflicts, and nothing is written. A Pod attempt's Pod is stopped before the write, and no create of the attempt
/// may land any more (`executor::pod::stop`).
/// `ending`: the final phase and why. A Pod attempt whose Pod had succeeded on its own, unwatched (its replica gone),
/// did the work whatever came since (a cancel, the deadline): the job is recorded `Succeeded` instead.
/// `Ok(Ok(ending))`: settled, as `ending` says. `Ok(Err(at))`: not, and why (someone else moved first, or the Pod
/// has not stopped yet).
pub async fn settle(
    client: &Client,
    job: &BackgroundJob,
    seen_lease: Option<&Lease>,
    state: LeaseState,
    claimant: Claimant<'_>,
    ending: (Phase, String),
) -> Result<std::result::Result<(Phase, String), LostAt>> {
    let (timing, began) = (claimant.timing, std::time::Instant::now());
    let ns = job.namespace().unwrap_or_default();
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), &ns);
    let finished = |(phase, reason): &(Phase, String)| {
        let mut s = job.status.as_deref().cloned().unwrap_or_default();
        let error = (*phase != Phase::Succeeded).then(|| reason.clone());
        status::finish(&mut s, *phase, error, claimant.now);
        if *phase == Phase::Succeeded {
            // Only a Pod found succeeded turns a settle into a success: the `Finished` condition says so (no error
            // to keep, and a successful job's Event is not recorded by default).
            let generation = s.observed_generation;
            let now = claimant.now;
            status::upsert_condition(&mut s.conditions, generation, "Finished", "True", "Succeeded", reason, now);
        }
        s
    };
    let moved =
        |written: Option<BackgroundJob>, ending| if written.is_some() { Ok(ending) } else { Err(LostAt::JobChanged) };
    if job.phase() != Phase::Running {
        // Nobody holds a Waiting job: a claim in flight writes under the job's resourceVersion too, so exactly one
        // of the two writes lands.
        return Ok(moved(status::write_if_unchanged(&jobs, job, finished(&ending)).await?, ending));
    }
    // A Pod attempt with no Pod to stop (none there yet, or it is finished or being deleted): its holder's create
    // may still be in flight, or be sent again, and make the Pod. Until none can land, the job is looked at again now
    // and then, with no write: taking its Lease now would only hold it to wait.
    if job.spec.template.is_some() {
        let settled_by = crate::executor::pod::no_create_lands_after(job, claimant.now);
        let now = tokio::time::Instant::now();
        if now < settled_by && !crate::executor::pod::needs_stopping(client, job, job.attempts()).await? {
            let until = settled_by.min(now + POD_TO_COME_RECHECK).into_std();
            let not_stopping =
                crate::executor::pod::not_stopping(client, job, job.attempts(), claimant.now, timing.duration).await;
            return Ok(Err(LostAt::PodToCome { until, not_stopping }));
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    // Without a current tenure of its own, this replica may not take the job's Lease.
    let Some(claim) = claim_for(job, claimant) else { return Ok(Err(LostAt::NoTenure)) };
    if let Some(lost) = end_tenures(client, claimant.ends, timing).await? {
        return Ok(Err(lost));
    }
    let held = match acquire(&jobs, &leases, job, seen_lease, state, &claim, timing).await? {
        Ok(held) => held,
        Err(lost) => return Ok(Err(lost)),
    };
    let mut ending = ending;
    // A Pod attempt ends only once its Pod has stopped, and no create of it can make it again: stop it first, while
    // the Lease is ours (until its renew deadline: this Lease is not renewed). Not done by then: the Lease goes back,
    // and the job is looked at again.
    if job.spec.template.is_some() {
        let until = held.written_at + timing.renew_deadline;
        let settled_by = crate::executor::pod::no_create_lands_after(job, claimant.now);
        let may_act = || std::time::Instant::now() < until;
        // This look reports nothing (`after` is never): whether the Pod is overdue is judged once the look is over,
        // by the same rule (`not_stopping`).
        let now = || claimant.now + SignedDuration::try_from(began.elapsed()).unwrap_or(SignedDuration::ZERO);
        let watchers = crate::executor::pod::Watchers {
            after: Duration::MAX,
            now: &now,
            not_stopping: &|_| {},
            not_starting: &|_, _| {},
        };
        let late = crate::executor::pod::LateCreates::until(settled_by);
        let made = crate::executor::pod::Maker::elsewhere(job);
        let stop = crate::executor::pod::stop(client, job, job.attempts(), late, &may_act, &watchers, &made);
        let Ok(succeeded) = tokio::time::timeout_at(until.into(), stop).await else {
            lease::release(&leases, &held.lease).await?;
            // Judged now, not when the settle began (a renew deadline ago).
            let not_stopping =
                crate::executor::pod::not_stopping(client, job, job.attempts(), now(), timing.duration).await;
            return Ok(Err(not_stopping.map_or(LostAt::PodRunning, LostAt::PodNotStopping)));
        };
        if succeeded && ending.0 != Phase::Succeeded {
            let attempt = job.attempts();
            let why = format!("attempt {attempt}'s pod succeeded while no replica watched it: not {}", ending.0);
            ending = (Phase::Succeeded, why);
        }
    }
    let written = write_holding(&jobs, job, (&held, &[]), claimant, finished(&ending)).await;
    match &written {
        Ok(_) => lease::release(&leases, &held.lease).await?,
        Err(e) => give_back_after_failed_write(&leases, &held.lease, e).await,
    }
    Ok(moved(written?, ending))
}

/// Give back the claim Lease of a claim or settle whose status write failed; nothing runs here either way. If the
/// apiserver refused the write outright ([`crate::error::refused`]: RBAC, validation, admission), it did not land:
/// the Lease is released, and the job is free at once, in its turn. Otherwise perhaps it landed, perhaps not: the
/// Lease is kept, so nobody starts a twin before it has aged a lease duration, but vouched for by no tenure, or a
/// live replica's tenure would hold the job back from everyone else for as long as it lives.
async fn give_back_after_failed_write(leases: &Api<Lease>, lease: &Lease, e: &Error) {
    if not_landed(e) {
        match lease::release_if_current(leases, lease).await {
            Ok(true) => {
                tracing::info!(lease = %lease.name_any(), error = %e, "the status write did not land (refused, or not sent): claim Lease released");
                return;
            }
            // Changed since: no longer this claim's to give back.
            Ok(false) => return,
            Err(_) => {}
        }
    }
    disown_quietly(leases, lease).await;
}

/// Whether a failed status write certainly did not land: the apiserver refused it ([`crate::error::refused`]), or
/// it was never sent ([`write_holding`]'s bound spent first: [`Error::Stale`]).
fn not_landed(e: &Error) -> bool {
    crate::error::refused(e) || matches!(e, Error::Stale(_))
}

/// [`lease::disown`] a claim Lease whose claim or settle ended in an error (logged, not returned: the caller's error
/// is the one to report; if this fails too, this replica frees the Lease later, see `Dispatcher::idle_of_mine`).
async fn disown_quietly(leases: &Api<Lease>, lease: &Lease) {
    if let Err(e) = lease::disown(leases, lease).await {
        tracing::warn!(error = %e, lease = %lease.name_any(), "could not disown a claim lease after a failed write");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Lease the caches do not show is one a claim meets without ever seeing it: the job namespaces' Leases are
    /// watched by bgjobs' managed-by label, the cluster slots by the slot label.
    #[test]
    fn a_lease_without_the_label_its_cache_watches_by_is_unseen_by_the_caches() {
        let with = |labels: &[(&str, &str)]| Lease {
            metadata: kube::api::ObjectMeta {
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: None,
        };
        let ours = with(&[(lease::MANAGED_BY_LABEL, lease::MANAGED_BY)]);
        assert!(!unseen_by_caches(&ours, false));
        assert!(unseen_by_caches(&with(&[]), false));
        assert!(unseen_by_caches(&with(&[(lease::MANAGED_BY_LABEL, "someone-else")]), false));
        assert!(unseen_by_caches(&ours, true), "a slot is watched by its slot label");
        assert!(!unseen_by_caches(&with(&[(crate::limits::SLOT_LABEL, "true")]), true));
        assert!(foreign(Some(&ours), false).is_none() && foreign(None, false).is_none());
        assert!(matches!(foreign(Some(&with(&[])), false), Some(LostAt::Foreign { slot: false, .. })));
    }

    /// How a scripted apiserver serves the member Lease `bgjobs-member-a` in namespace `theirs`.
    #[derive(Clone, Copy)]
    struct Served {
        /// Its UID (`u1`: the tenure's own Lease).
        uid: &'static str,
        rv: &'static str,
        /// Its holder: in tenure `bgjobs-member-a/u1/0`; none: revoked from it.
        holder: Option<&'static str>,
        /// Labelled as a member Lease.
        labelled: bool,
        /// The answer to a read (200: the Lease) and to a write (200: as sent).
        read: u16,
        write: u16,
        /// How long after it is sent a read is answered.
        answered_after: Duration,
    }

    const IN_TENURE: Served = Served {
        uid: "u1",
        rv: "7",
        holder: Some("a"),
        labelled: true,
        read: 200,
        write: 200,
        answered_after: Duration::ZERO,
    };

    /// A client of an apiserver that serves the member Lease as `served` says, and the requests it was sent.
    fn member_served(served: Served) -> (Client, Arc<std::sync::Mutex<Vec<crate::testing::Sent>>>) {
        crate::testing::scripted_client_slow(move |sent| {
            let labels = if served.labelled {
                serde_json::json!({crate::members::MEMBER_LABEL: "all-namespaces", lease::MANAGED_BY_LABEL: lease::MANAGED_BY})
            } else {
                serde_json::json!({})
            };
            let revoked = if served.holder.is_none() { "bgjobs-member-a/u1/0" } else { "" };
            let member = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "bgjobs-member-a", "namespace": "theirs", "uid": served.uid,
                    "resourceVersion": served.rv, "labels": labels,
                    "annotations": {tenure::REVOKED_ANNOTATION: revoked}},
                "spec": {"holderIdentity": served.holder, "leaseTransitions": 0}});
            let status = crate::testing::status;
            let late = served.answered_after;
            match sent.method.as_str() {
                "GET" if served.read != 200 => (served.read, status(served.read), late),
                "GET" if sent.path == "/apis/coordination.k8s.io/v1/namespaces/theirs/leases/bgjobs-member-a" => {
                    (200, member, late)
                }
                "GET" => (404, status(404), late),
                _ if served.write == 200 => (200, sent.body.clone(), Duration::ZERO),
                _ => (served.write, status(served.write), Duration::ZERO),
            }
        })
    }

    /// The tenure `bgjobs-member-a/u1/0`, never seen here, its member Lease in `theirs` (another lease namespace),
    /// last read at resourceVersion `last_read` (`None`: never read there).
    fn unknown(last_read: Option<&str>) -> [(String, Ending); 1] {
        let last_read = last_read.map(|rv| read_member(rv).0);
        let ending = Ending::Unknown { namespace: "theirs".into(), last_read };
        [("bgjobs-member-a/u1/0".to_string(), ending)]
    }

    fn only_read(sent: &std::sync::Mutex<Vec<crate::testing::Sent>>) -> bool {
        sent.lock().unwrap().iter().all(|s| s.method == "GET")
    }

    fn read_member(rv: &str) -> ReadMember {
        let mut m = Lease::default();
        m.metadata.name = Some("bgjobs-member-a".into());
        m.metadata.uid = Some("u1".into());
        m.metadata.resource_version = Some(rv.into());
        ReadMember(Arc::new(m))
    }

    /// A tenure of another lease namespace is read there: found in the tenure, it is left to its holder (and the
    /// read is carried back); found exactly as read a lease duration before, it is revoked there, under that version.
    #[tokio::test(start_paused = true)]
    async fn a_tenure_never_seen_here_is_read_where_its_member_lease_is_and_revoked_once_unchanged() {
        let id = "bgjobs-member-a/u1/0".to_string();
        let timing = LeaseTiming::default();
        let (client, sent) = member_served(IN_TENURE);
        let alive = end_tenures(&client, &unknown(None), &timing).await.unwrap();
        assert_eq!(
            alive,
            Some(LostAt::TenureRenewed(id.clone(), Some(read_member("7")))),
            "alive as far as anyone can tell"
        );
        assert!(only_read(&sent), "nothing written");
        let (client, sent) = member_served(Served { rv: "8", ..IN_TENURE });
        let alive = end_tenures(&client, &unknown(Some("7")), &timing).await.unwrap();
        assert_eq!(alive, Some(LostAt::TenureRenewed(id.clone(), Some(read_member("8")))), "renewed since");
        assert!(only_read(&sent), "nothing written");
        let (client, sent) = member_served(IN_TENURE);
        let started = tokio::time::Instant::now();
        assert_eq!(end_tenures(&client, &unknown(Some("7")), &timing).await.unwrap(), None, "unchanged: revoked");
        assert!(started.elapsed() < Duration::from_secs(1), "revoked here, so over: no wait");
        let sent = sent.lock().unwrap();
        let revoke = sent.iter().find(|s| s.method == "PUT").expect("the revocation");
        assert_eq!(revoke.path, "/apis/coordination.k8s.io/v1/namespaces/theirs/leases/bgjobs-member-a");
        assert_eq!(revoke.body["metadata"]["resourceVersion"], "7", "under the version read twice");
        assert_eq!(revoke.body["metadata"]["annotations"][tenure::REVOKED_ANNOTATION], id.as_str());
    }

    /// Not allowed to read or revoke the member Lease (another lease namespace, and roles of this one's only): its
    /// holder may be alive; nothing is taken, and the job is left alone for a lease duration (not tried every
    /// second), with nothing concluded about the tenure, which vouches for other Leases too (counting it renewed held
    /// them all back). One revoked by another replica is over at once, with nothing written.
    #[tokio::test(start_paused = true)]
    async fn a_member_lease_that_cannot_be_read_or_revoked_leaves_the_job_alone_and_one_revoked_ends_it() {
        let timing = LeaseTiming::default();
        let left_alone = |lost: Option<LostAt>| match lost {
            Some(LostAt::TenureUnreadable { until }) => until >= std::time::Instant::now() + timing.duration / 2,
            _ => false,
        };
        let (client, sent) = member_served(Served { read: 403, ..IN_TENURE });
        assert!(left_alone(end_tenures(&client, &unknown(Some("7")), &timing).await.unwrap()));
        assert!(only_read(&sent), "nothing written");
        let (client, _) = member_served(Served { write: 403, ..IN_TENURE });
        assert!(left_alone(end_tenures(&client, &unknown(Some("7")), &timing).await.unwrap()));
        let (client, sent) = member_served(Served { rv: "9", holder: None, ..IN_TENURE });
        let started = tokio::time::Instant::now();
        assert_eq!(end_tenures(&client, &unknown(None), &timing).await.unwrap(), None, "revoked by another");
        assert!(started.elapsed() < Duration::from_secs(1), "its revoker waited: {:?}", started.elapsed());
        assert!(only_read(&sent), "nothing written");
    }

    /// Where the Lease being taken over says its tenure's member Lease is can be written by anyone who may write
    /// Leases in that Lease's namespace. Only the tenure's own member Lease (its UID) says the tenure was revoked
    /// (which ends it at once); a Lease of that name with another UID is no member Lease of the tenure: the tenure
    /// ended there (another tenure, or forged), and is waited out a lease duration, as one gone is, from the answer.
    /// An unlabelled Lease in the tenure is not revoked.
    #[tokio::test(start_paused = true)]
    async fn only_the_tenures_own_member_lease_ends_it_at_once_and_one_gone_is_waited_out_from_the_answer() {
        let id = "bgjobs-member-a/u1/0".to_string();
        let timing = LeaseTiming::default();
        let forged = Served { uid: "u2", rv: "9", holder: None, ..IN_TENURE };
        let (client, sent) = member_served(forged);
        let started = tokio::time::Instant::now();
        assert_eq!(end_tenures(&client, &unknown(None), &timing).await.unwrap(), None);
        assert!(started.elapsed() >= timing.duration, "another UID's word is not taken: {:?}", started.elapsed());
        assert!(only_read(&sent));
        let (client, sent) = member_served(Served { labelled: false, ..IN_TENURE });
        let alive = end_tenures(&client, &unknown(Some("7")), &timing).await.unwrap();
        assert_eq!(
            alive,
            Some(LostAt::TenureRenewed(id.clone(), Some(read_member("7")))),
            "not a member Lease: not revoked"
        );
        assert!(only_read(&sent), "nothing written");
        let gone_late = Served { read: 404, answered_after: Duration::from_secs(8), ..IN_TENURE };
        let (client, _) = member_served(gone_late);
        let started = tokio::time::Instant::now();
        assert_eq!(end_tenures(&client, &unknown(None), &timing).await.unwrap(), None, "gone");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(8) + timing.duration, "from the answer: {waited:?}");
    }

    /// A revocation that finds the member Lease gone waits out a lease duration (more than any replica's renew
    /// deadline) from its answer before anything is taken: the member Lease may have been renewed after this replica
    /// last saw it, until it was deleted. It counted as ended at once.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_that_finds_the_member_lease_gone_waits_out_a_lease_duration() {
        let timing = LeaseTiming::default();
        let (client, _) = member_served(Served { write: 404, ..IN_TENURE });
        let mut seen = Lease::default();
        seen.metadata.name = Some("bgjobs-member-a".into());
        seen.metadata.namespace = Some("theirs".into());
        seen.metadata.resource_version = Some("3".into());
        let started = tokio::time::Instant::now();
        let ends = [("bgjobs-member-a/u1/0".to_string(), Ending::Revoke(Arc::new(seen)))];
        assert_eq!(end_tenures(&client, &ends, &timing).await.unwrap(), None);
        assert!(started.elapsed() >= timing.duration, "took over after {:?}", started.elapsed());
    }
    use crate::api::{BackgroundJobSpec, BackgroundJobStatus};

    /// A request to the apiserver: its method, the Lease's name, and the holder the Lease sent names.
    type Asked = (String, String, Option<String>);

    /// What giving back a lost claim's extras asks of the apiserver, by Lease: a replace (vacate or disown, with
    /// its holder as written) or a delete.
    async fn given_back(adoption: bool) -> Vec<Asked> {
        // A replace is answered with the Lease as sent, a delete with a success Status.
        let (client, sent) = crate::testing::scripted_client(|s| match s.body {
            serde_json::Value::Null => (200, serde_json::json!({"kind": "Status", "status": "Success"})),
            ref lease => (200, lease.clone()),
        });
        let api: Api<Lease> = Api::namespaced(client, "ns");
        let lease = |name: &str, label: &str| Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some("7".into()),
                labels: Some([(label.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some("w".into()), ..Default::default() }),
        };
        let held = vec![
            (
                api.clone(),
                Held { lease: lease("slot-0", crate::limits::SLOT_LABEL), written_at: std::time::Instant::now() },
            ),
            (api, Held { lease: lease("key-k", "bgjobs.dev/key"), written_at: std::time::Instant::now() }),
        ];
        release_all(&held, adoption).await;
        let sent = sent.lock().unwrap();
        let holder = |body: &serde_json::Value| body["spec"]["holderIdentity"].as_str().map(str::to_string);
        sent.iter()
            .map(|s| (s.method.clone(), s.path.rsplit('/').next().unwrap().to_string(), holder(&s.body)))
            .collect()
    }

    #[tokio::test]
    async fn a_lost_claims_slot_is_vacated_and_its_key_deleted_but_a_failed_adoption_keeps_both_disowned() {
        let w = Some("w".to_string());
        let lost = given_back(false).await;
        assert_eq!(lost, [("PUT".into(), "slot-0".into(), None), ("DELETE".into(), "key-k".into(), None)]);
        // The adopted attempt's Pod still runs: its next adopter takes both over once they have aged.
        let adoption = given_back(true).await;
        assert_eq!(adoption, [("PUT".into(), "slot-0".into(), w.clone()), ("PUT".into(), "key-k".into(), w)]);
    }
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn job(phase: Option<Phase>, attempts: i32) -> BackgroundJob {
        let mut j = BackgroundJob::new(
            "j",
            serde_json::from_value::<BackgroundJobSpec>(serde_json::json!({"jobName": "noop"})).unwrap(),
        );
        j.metadata.uid = Some("uid-1".into());
        j.status = Some(Box::new(BackgroundJobStatus { phase, attempts, ..Default::default() }));
        j
    }

    fn lease(uid: &str, attempt: i32, holder: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([(JOB_LABEL.to_string(), "j".to_string())])),
                annotations: Some(BTreeMap::from([
                    (lease::JOB_UID_ANNOTATION.to_string(), uid.to_string()),
                    (lease::ATTEMPT_ANNOTATION.to_string(), attempt.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some(holder.into()), ..Default::default() }),
        }
    }

    const T: LeaseTiming = LeaseTiming {
        duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        renew_interval: Duration::from_secs(3),
    };

    #[test]
    fn a_running_jobs_lease_is_live_until_seen_unchanged_for_a_full_duration() {
        let j = job(Some(Phase::Running), 2);
        let l = lease("uid-1", 2, "w1");
        assert_eq!(lease_state(&j, Some(&l), Duration::from_secs(14), &T), LeaseState::Live);
        assert_eq!(lease_state(&j, Some(&l), Duration::from_secs(15), &T), LeaseState::Expired);
    }

    #[test]
    fn a_waiting_jobs_lease_from_its_previous_attempt_is_a_leftover_to_reuse_at_once() {
        let j = job(Some(Phase::Waiting), 2);
        assert_eq!(lease_state(&j, Some(&lease("uid-1", 2, "w1")), Duration::ZERO, &T), LeaseState::Leftover);
    }

    #[test]
    fn a_waiting_jobs_lease_for_its_next_attempt_means_a_claim_in_flight() {
        let j = job(Some(Phase::Waiting), 2);
        assert_eq!(lease_state(&j, Some(&lease("uid-1", 3, "w1")), Duration::ZERO, &T), LeaseState::Live);
        assert_eq!(lease_state(&j, Some(&lease("uid-1", 3, "w1")), Duration::from_secs(20), &T), LeaseState::Expired);
    }

    /// A key or slot Lease's job as this replica caches it decides whether its Pod is looked for before the Lease is
    /// taken over. Cached finished at attempt 2 but named by the Lease at attempt 3, it was put back in the queue and
    /// claimed since (the cache lags): its Pod may run, and taking the key or slot without looking started a second
    /// job of the key (or one over the cap) beside it (review).
    #[test]
    fn a_job_cached_finished_may_still_run_a_pod_when_the_lease_names_a_later_attempt() {
        let failed = job(Some(Phase::Failed), 2);
        assert!(job_may_run(None, None), "not cached: deleted, or not seen yet");
        assert!(!job_may_run(Some(&failed), Some(&lease("uid-1", 2, "w1"))), "its Pods stopped before it finished");
        assert!(job_may_run(Some(&failed), Some(&lease("uid-1", 3, "w1"))), "retried and claimed since");
        assert!(job_may_run(Some(&job(Some(Phase::Running), 2)), Some(&lease("uid-1", 2, "w1"))));
    }

    #[test]
    fn a_lease_of_another_job_with_the_same_name_is_a_leftover() {
        let j = job(Some(Phase::Running), 1);
        assert_eq!(lease_state(&j, Some(&lease("old-uid", 1, "w1")), Duration::ZERO, &T), LeaseState::Leftover);
    }

    /// A job named past 249 characters has its Lease named by its UID (`bgj-<uid>`): a job named like that UID has
    /// the same Lease name. Its Lease is that other job's live claim, not a leftover to take at once (before, the
    /// second job took it, and the first, running, lost its attempt).
    #[test]
    fn a_lease_of_a_job_of_another_name_under_the_same_lease_name_is_judged_by_its_age() {
        let j = job(Some(Phase::Waiting), 0);
        let mut other = lease("uid-long", 1, "w1");
        other.metadata.labels = Some(BTreeMap::from([(JOB_LABEL.to_string(), "a-long-name-hashed".to_string())]));
        assert_eq!(lease_state(&j, Some(&other), Duration::from_secs(14), &T), LeaseState::Live);
        assert_eq!(lease_state(&j, Some(&other), Duration::from_secs(15), &T), LeaseState::Expired);
        other.metadata.labels = None;
        assert_eq!(lease_state(&j, Some(&other), Duration::ZERO, &T), LeaseState::Live, "no label: any job's");
        other.spec = Some(LeaseSpec::default());
        assert_eq!(lease_state(&j, Some(&other), Duration::ZERO, &T), LeaseState::Leftover, "no holder: nobody's");
    }

    #[test]
    fn a_taken_over_pod_job_keeps_its_attempt_and_an_in_process_one_starts_the_next() {
        let mut running = job(Some(Phase::Running), 2);
        assert_eq!(next_attempt(&running), 3, "an in-process attempt died with its replica");
        running.spec.template = Some(Default::default());
        assert!(adopts(&running));
        assert_eq!(next_attempt(&running), 2, "the pod of attempt 2 runs on and is adopted");
        let mut waiting = job(Some(Phase::Waiting), 2);
        waiting.spec.template = Some(Default::default());
        assert_eq!(next_attempt(&waiting), 3, "a retry of a pod job is a new attempt with a new pod");
    }

    /// Counts a status edited by hand may hold (the schema bounds `attempts` below, not above) neither panic nor
    /// wrap: the largest stays the largest, and no more attempts are spent than were started.
    #[test]
    fn counts_edited_to_their_largest_neither_wrap_nor_spend_attempts_never_started() {
        let at_most = job(Some(Phase::Waiting), i32::MAX);
        assert_eq!(next_attempt(&at_most), i32::MAX);
        let mut more_unstarted = job(Some(Phase::Waiting), 2);
        more_unstarted.status.as_mut().unwrap().unstarted_attempts = 5;
        assert_eq!(more_unstarted.attempts_spent(2), 0, "not a negative count that never reaches maxAttempts");
        let mut s = BackgroundJobStatus { unstarted_attempts: i32::MAX, ..Default::default() };
        crate::status::requeue_unstarted(&mut s, "x".into(), None, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(s.unstarted_attempts, i32::MAX);
    }

    #[test]
    fn only_a_claim_that_adopted_this_very_attempt_counts_as_an_adoption() {
        let mut j = job(None, 0);
        let note = |e: &str| Some(crate::api::BackgroundJobStatus { last_error: Some(e.into()), ..Default::default() });
        // Claims written by older replicas say it only in their note.
        j.status = note("worker a stopped renewing its lease; b adopted attempt 2's pod").map(Box::new);
        assert!(adopted(&j, 2));
        assert!(!adopted(&j, 3), "a later attempt is started, not adopted");
        j.status =
            note("worker a stopped renewing its lease; b adopted attempt 2, which waits for its worker's report")
                .map(Box::new);
        assert!(adopted(&j, 2));
        j.status = note("pod render-7-2 failed: container main exited with code 3").map(Box::new);
        assert!(!adopted(&j, 3));
        j.status = None;
        assert!(!adopted(&j, 1));
    }

    /// A job whose spec leaves too little room for a status whole: the adopting claim is stored bare, without its
    /// note, and its attempt is still adopted (its Pod watched, never created again). Before, only the note said so.
    #[test]
    fn an_adoption_stored_bare_is_still_an_adoption_and_a_later_claim_is_not() {
        let now = Timestamp::from_second(100).unwrap();
        let mut j = job(None, 0);
        j.status = Some(Box::new(status::running(&j, 2, "a", "bgj-j", Some(1), None, now)));
        let mut s = status::running(&j, 2, "b", "bgj-j", Some(1), Some("… b adopted attempt 2's pod".into()), now);
        status::mark_adopted(&mut s);
        status::fit(&mut s, status::Room::Bare);
        assert_eq!(s.last_error, None, "bare: the note is gone");
        j.status = Some(Box::new(s.clone()));
        assert!(adopted(&j, 2));
        assert!(!adopted(&j, 3));
        // Requeued, then claimed afresh: attempt 3 is started, not adopted.
        status::requeue(&mut s, None, "pod failed".into(), now);
        j.status = Some(Box::new(s));
        let next = status::running(&j, 3, "b", "bgj-j", Some(1), None, now);
        j.status = Some(Box::new(next));
        assert!(!adopted(&j, 3));
    }

    #[test]
    fn a_taken_over_attempt_that_waits_for_its_report_is_adopted() {
        let mut running = job(Some(Phase::Running), 2);
        running.status.as_mut().unwrap().awaiting_report = true;
        assert!(adopts(&running));
        assert_eq!(next_attempt(&running), 2, "its worker still works on attempt 2 and reports for it");
    }

    #[test]
    fn a_job_that_starts_running_starts_a_fresh_clock_even_with_no_lease_in_sight() {
        let waiting = job(Some(Phase::Waiting), 0);
        let running = job(Some(Phase::Running), 1);
        assert_ne!(observed_version(&waiting, None), observed_version(&running, None));
        assert_ne!(observed_version(&running, None), observed_version(&job(Some(Phase::Running), 2), None));
        assert_eq!(observed_version(&running, None), observed_version(&running.clone(), None));
    }

    #[test]
    fn no_lease_is_absent() {
        assert_eq!(lease_state(&job(None, 0), None, Duration::from_secs(99), &T), LeaseState::Absent);
    }

    #[test]
    fn lease_names_follow_the_job_name_and_fall_back_to_the_uid_when_too_long() {
        let mut j = job(None, 0);
        assert_eq!(lease_name(&j), "bgj-j");
        j.metadata.name = Some("x".repeat(250));
        assert_eq!(lease_name(&j), "bgj-uid-1");
    }
}
