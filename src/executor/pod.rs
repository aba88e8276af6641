//! The Pod executor: a job with `spec.template` runs as one Pod per attempt.
//!
//! The Pod of attempt `n` is named `<job>-<n>` (deterministic), owned by the job, labelled with the job's name,
//! UID and the attempt, and annotated with an id its creates send ([`CREATE_ID_ANNOTATION`]: a Pod made under its
//! name by anyone else is not the attempt's), so:
//! - a create after a takeover meets AlreadyExists and the new holder adopts the running Pod instead of starting a
//!   twin (a takeover of a Pod job keeps the attempt number: the work was not lost, only its watcher);
//! - deleting the job deletes its Pods (garbage collection);
//! - Pods of finished attempts are kept for inspection (`kubectl logs`) until the job itself is deleted (TTL).
//!
//! An attempt ends on what is known about its Pod, never on a failed call: only the Pod's final phase
//! (`Succeeded`/`Failed`), or its absence confirmed by a GET (a quorum read, not a possibly lagging watch cache),
//! ends the wait. A broken watch (410 Gone, a reset connection, a failed re-list), a failed read and a create whose
//! answer was lost are all tried again with backoff (creates until [`CREATE_PATIENCE`], then a read decides once
//! none can still land); the attempt runner bounds the whole attempt (attempt timeout, job deadline, Leases, stop
//! requests). Ending the attempt on such an error would start the next attempt's Pod beside one that still runs.
//!
//! Edge cases, and why:
//! - **Adoption never creates the Pod.** A holder that adopted the attempt (its claim was a takeover of a running Pod
//!   job: the claim's `lastError` says `… adopted attempt <n>'s pod`) only looks the Pod up. If it is gone (removed by
//!   hand, or by the terminated-pod garbage collector, before anyone recorded its outcome), creating `<job>-<n>` again
//!   would silently redo work that may have finished, under the same attempt number. The attempt ends `Retryable`
//!   ("vanished before its outcome was recorded", concluded only once no create sent during the attempt can still
//!   land) instead, and the retry policy decides whether a new attempt, with
//!   a Pod of its own, runs. The price: if the previous holder died between its claim and its create, the Pod never
//!   existed and that attempt is counted as failed without having run.
//! - **A Pod left by a deleted namesake.** A job re-created under the same name meets `<job>-<n>` of the old job
//!   until the garbage collector removes it. That attempt ends `Retryable`; the next attempt's Pod has another name.
//!   A Pod of that name that belongs to no such job is not going away, and fails the job.
//! - **Stopping waits for the containers to stop.** [`stop`] (cancellation, attempt timeout, deadline, job
//!   deletion) deletes a running Pod and returns only once it is gone or has reached a final phase, so a retry never
//!   starts beside a container still in its termination grace period; when the claim runs out first, the runner
//!   leaves the outcome to the adopter, which waits the same way. A finished Pod is left in place.
//! - **And for a create still in flight.** An attempt that ends (timeout, cancel, deletion) while its create is in
//!   flight (a slow admission webhook) drops the create, but the apiserver may still carry it out; so may it a create
//!   whose answer was lost, sent again, once the Pod the later one made is gone (deleted when the attempt ended, or
//!   by anyone, finished or not). So an attempt that ends while a create may land (also one whose Pod finished or
//!   was deleted) records its outcome only once none can (but see the adopter's finished Pod below): until then its
//!   Pod is looked for and stopped too. The
//!   holder records each create of unknown outcome as it is sent ([`PodExecutor::late_creates`]: 60 s after the
//!   last); an adopter, or a replica settling the job of a holder that is gone, counts 154.5 s from the attempt's
//!   start ([`no_create_lands_after`]). An adopter whose Pod succeeded waits for those only while the name is free
//!   (the Pod is gone or being deleted): a finished Pod left in place keeps any create from landing, no attempt
//!   follows a success, and waiting whatever holds the name would hold every adopted Pod's success on every rolling
//!   restart. Should that Pod be removed once the success is recorded, but before the bound, a create still in
//!   flight could make it again (a second run, alone). Any other outcome waits for them whatever holds the name: a
//!   retry's Pod must not start beside one they make. The bound
//!   assumes a sent request reaches the apiserver promptly; a network that held its bytes for longer could still
//!   land it later.
//!
//! The job's identity and args reach every container as `BGJOBS_JOB` (`namespace/name`), `BGJOBS_JOB_UID`,
//! `BGJOBS_ATTEMPT` and `BGJOBS_ARGS` (JSON); when the operator serves reports, `BGJOBS_REPORT_URL` and
//! `BGJOBS_REPORT_TOKEN` let the Pod report progress and a result ([`crate::report`]; its exit still ends the attempt).
//! Whoever may read the Pod may read its token, as whoever may read the job may compute it. The Pod's
//! `restartPolicy` is forced to `Never`: retries are the job's, with its backoff, not the kubelet's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use jiff::SignedDuration;

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::LocalSubjectAccessReview;
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};

use crate::lease::{MANAGED_BY, MANAGED_BY_LABEL};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::time::Instant;

use super::JobContext;
use crate::api::{BackgroundJob, RecurringBackgroundJob};
use crate::claim;
use crate::client::CREATE_LANDS_WITHIN;
use crate::error::api_code;
use crate::list_watch::watch_one;
use crate::policy::PodPolicy;
use crate::policy::creator::{self, CreatorCheck};
use crate::retry::AttemptResult;

/// Label with the job's UID on every Pod of the job.
pub const JOB_UID_LABEL: &str = "bgjobs.dev/job-uid";
/// Label with the attempt number.
pub const ATTEMPT_LABEL: &str = "bgjobs.dev/attempt";
/// Annotation with an id that every create of one attempt's Pod sends ([`start`], [`PodExecutor::maker`]: derived
/// from a random key of the replica's process): the replica that sends them takes a Pod under the attempt's name for
/// its attempt's only if it carries that id. The job's label and owner do not
/// prove it: anyone who may create Pods in the namespace can write them, and a Pod made ahead of the attempt would
/// have its outcome taken for the attempt's (a job `Succeeded` without its template having run).
pub const CREATE_ID_ANNOTATION: &str = "bgjobs.dev/create-id";

/// Name of the Pod of `attempt` of `job`.
pub fn pod_name(job: &BackgroundJob, attempt: i32) -> String {
    crate::names::with_suffix(&job.name_any(), &format!("-{attempt}"), crate::names::MAX_NAME)
}

/// The Pod for one attempt, built from the job's template.
pub fn pod_for(job: &BackgroundJob, ctx: &JobContext) -> Result<Pod, String> {
    let template = job.spec.template.clone().ok_or("the job has no spec.template")?;
    let mut spec = template.spec.ok_or("spec.template.spec is missing: a Pod needs at least one container")?;
    if spec.containers.is_empty() {
        return Err("spec.template.spec.containers is empty: a Pod needs at least one container".into());
    }
    spec.restart_policy = Some("Never".into());
    // The kubelet's own kills (past `activeDeadlineSeconds`, an eviction) take the Pod's grace period: capped as the
    // operator's deletions are, so that a failed Pod's hold ([`kill_pending`]) covers them.
    if let Some(grace) = spec.termination_grace_period_seconds.as_mut() {
        *grace = (*grace).min(STOP_GRACE_MAX_SECONDS);
    }
    let args = job.spec.args.clone().unwrap_or_default();
    let mut env = vec![
        ("BGJOBS_JOB", format!("{}/{}", ctx.namespace, ctx.name)),
        ("BGJOBS_JOB_UID", ctx.uid.clone()),
        ("BGJOBS_ATTEMPT", ctx.attempt.to_string()),
        ("BGJOBS_ARGS", args.text().to_string()),
    ];
    if let (Some(url), Some(token)) = (ctx.report.url(), ctx.report.token()) {
        env.push(("BGJOBS_REPORT_URL", url.to_string()));
        env.push(("BGJOBS_REPORT_TOKEN", token.to_string()));
    }
    for c in &mut spec.containers {
        let vars = c.env.get_or_insert_with(Vec::new);
        vars.retain(|v| !env.iter().any(|(k, _)| *k == v.name));
        vars.extend(env.iter().map(|(k, v)| EnvVar { name: k.to_string(), value: Some(v.clone()), value_from: None }));
    }
    let meta = template.metadata.unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta.labels.unwrap_or_default();
    // Only a keyed job's Pods say a key: a template's own would hold another job's key outside its turns.
    labels.remove(crate::keys::POD_KEY_LABEL);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert(crate::claim::JOB_LABEL.into(), crate::names::label_value(&ctx.name));
    labels.insert(JOB_UID_LABEL.into(), ctx.uid.clone());
    labels.insert(ATTEMPT_LABEL.into(), ctx.attempt.to_string());
    if let Some(key) = &job.spec.concurrency_key {
        labels.insert(crate::keys::POD_KEY_LABEL.into(), crate::keys::pod_label(key));
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(job, ctx.attempt)),
            namespace: Some(ctx.namespace.clone()),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: job.controller_owner_ref(&()).map(|mut o| {
                o.block_owner_deletion = None;
                vec![o]
            }),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// A replica's Pod executor: what it may create, and the creates it sent whose outcome it does not know.
pub struct PodExecutor {
    /// What the Pod executor may create.
    pub policy: PodPolicy,
    /// Per attempt (job UID, attempt number): when the last create of its Pod whose outcome is unknown was sent (no
    /// answer yet, none ever, or a server error). Such a create may still make the Pod until
    /// [`crate::client::CREATE_LANDS_WITHIN`] after it was sent, also when the attempt ended meanwhile and dropped it.
    unanswered: Mutex<HashMap<(String, i32), Instant>>,
    /// This process's key for the ids its creates send ([`CREATE_ID_ANNOTATION`]): random, so nobody else can write
    /// them; per process, because a replica that restarts takes its attempts over as any adopter does.
    create_ids: ring::hmac::Key,
}

impl PodExecutor {
    /// A Pod executor that creates what `policy` allows, with no create sent yet.
    pub fn new(policy: PodPolicy) -> Self {
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("the system's random source works");
        PodExecutor { policy, unanswered: Mutex::default(), create_ids: key }
    }

    /// Who may have made the Pod of `attempt` of `job`, for this replica: its own creates, if it started the
    /// attempt (their id is the same for every create and stop of the attempt, on this process); else, adopted, an
    /// earlier holder that began the attempt then ([`Maker::elsewhere`]).
    pub fn maker(&self, job: &BackgroundJob, attempt: i32) -> Maker {
        if claim::adopted(job, attempt) {
            return Maker::elsewhere(job);
        }
        let tag = ring::hmac::sign(&self.create_ids, format!("{}/{attempt}", job.uid().unwrap_or_default()).as_bytes());
        Maker::ThisReplica(tag.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Until when a create of this attempt's Pod may still make it, as this replica knows (`now` is the cluster's
    /// time): the last this replica sent whose outcome is unknown ([`LateCreates::until`]), and, for an attempt it
    /// adopted, those its earlier holder may have sent ([`no_create_lands_after`]; [`LateCreates::while_name_free`]).
    pub fn late_creates(&self, job: &BackgroundJob, attempt: i32, now: jiff::Timestamp) -> LateCreates {
        let key = (job.uid().unwrap_or_default(), attempt);
        let unanswered = self.unanswered.lock().unwrap().get(&key).copied();
        let own = unanswered.map_or_else(Instant::now, |sent| sent + CREATE_LANDS_WITHIN);
        let earlier = if claim::adopted(job, attempt) { own.max(no_create_lands_after(job, now)) } else { own };
        LateCreates { until: own, while_name_free: earlier }
    }

    /// Record the attempt's last create of unknown outcome (`None`: none; every create was answered). Entries that
    /// can no longer matter are dropped on the way.
    fn note_unanswered(&self, job_uid: &str, attempt: i32, sent: Option<Instant>) {
        let mut entries = self.unanswered.lock().unwrap();
        entries.retain(|_, sent| sent.elapsed() < CREATE_LANDS_WITHIN);
        let key = (job_uid.to_string(), attempt);
        match sent {
            Some(sent) => entries.insert(key, sent),
            None => entries.remove(&key),
        };
    }
}

/// Until when [`stop`] looks for a Pod of the attempt that a create still in flight makes (again, once the Pod is
/// gone), and stops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LateCreates {
    /// Whatever holds the Pod's name meanwhile: the creates this replica sent, which it knows are few and recent.
    pub until: Instant,
    /// As long as no finished Pod of the attempt keeps the name (a create meets AlreadyExists then): an earlier
    /// holder's creates, for an attempt this replica adopted whose Pod succeeded ([`Self::whatever_holds_the_name`]
    /// for any other ending). Waiting for those whatever holds the name would keep every adopted Pod's success until
    /// 154.5 s after its attempt began, on every rolling restart; a Pod that is gone, or being deleted, frees the
    /// name for them.
    pub while_name_free: Instant,
}

impl LateCreates {
    /// Until `at`, whatever holds the name.
    pub fn until(at: Instant) -> LateCreates {
        LateCreates { until: at, while_name_free: at }
    }

    /// Every create looked for until the last may land, whatever holds the name.
    pub fn whatever_holds_the_name(self) -> LateCreates {
        LateCreates::until(self.until.max(self.while_name_free))
    }

    /// Whether the look may end, with `found` holding the name `now`.
    fn over(&self, found: &Found, now: Instant) -> bool {
        let kept = matches!(found, Found::Ours { kept: true, .. });
        now >= self.until && (now >= self.while_name_free || kept)
    }

    /// Whether a create may land after `now`.
    pub fn after(&self, now: Instant) -> bool {
        self.until.max(self.while_name_free) > now
    }
}

/// Run (or adopt) the Pod of this attempt and wait for it to finish; `now` is the cluster's time. A Pod deleted by
/// someone else (an eviction) that does not stop, or one that cannot start, is told to `watchers`.
pub async fn run(
    client: &Client,
    executor: &PodExecutor,
    job: &BackgroundJob,
    ctx: &JobContext,
    now: jiff::Timestamp,
    watchers: &Watchers<'_>,
) -> AttemptResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ctx.namespace);
    let name = pod_name(job, ctx.attempt);
    let started = if claim::adopted(job, ctx.attempt) {
        adopt(&pods, job, ctx, &name, now).await
    } else {
        start(client, executor, job, ctx, &name, now).await
    };
    let uid = match started {
        Ok(uid) => uid,
        Err(ended) => return ended,
    };
    match until_stopped(&pods, &name, &uid, watchers).await {
        Some(pod) => outcome(&pod),
        None => AttemptResult::Retryable(format!("pod {name} was deleted before it finished")),
    }
}

/// Until how long after its attempt began (`startTime`) a create that keeps failing (no answer, 5xx, 429, 408) is
/// sent again before a read decides. No create of the attempt is sent after it, by any replica.
const CREATE_PATIENCE: Duration = Duration::from_secs(90);

/// The instant, on this machine's monotonic clock, `after` past the start of `job`'s attempt (its `startTime`, by the
/// cluster's clock, as `now` is); `after` from now without one.
fn past_start(job: &BackgroundJob, after: Duration, now: jiff::Timestamp) -> Instant {
    let started = attempt_began(job).unwrap_or(now);
    let at = started.checked_add(SignedDuration::try_from(after).unwrap_or_default()).unwrap_or(started);
    Instant::now() + at.duration_since(now).try_into().unwrap_or(Duration::ZERO)
}

/// The instant after which no create of the current attempt's Pod, sent by whichever replica held it, can still
/// make it, for a replica that did not send them (an adopter, a replica settling an orphaned job): they were sent
/// by [`CREATE_PATIENCE`] after the attempt began, by the holder's clock, which may be
/// [`crate::clock::REPLICAS_AGREE_WITHIN`] ahead of this one's, and land within [`crate::client::CREATE_LANDS_WITHIN`].
///
/// A Running job without a `startTime` (every claim writes one; only a hand-written status lacks it) has no such
/// bound: now, rather than a wait that would start over at every look and never end.
pub fn no_create_lands_after(job: &BackgroundJob, now: jiff::Timestamp) -> Instant {
    if attempt_began(job).is_none() {
        return Instant::now();
    }
    past_start(job, CREATE_PATIENCE + CREATE_LANDS_WITHIN + crate::clock::REPLICAS_AGREE_WITHIN, now)
}

/// Create the attempt's Pod; its UID. A create whose outcome is unknown (connection lost, 5xx, throttled) is sent
/// again: the second either creates the Pod or meets the first one's (AlreadyExists), so there is never a twin, and
/// the attempt does not end while a Pod of it may have been created unseen. When failures (a broken admission
/// webhook, an unreachable apiserver) last until [`CREATE_PATIENCE`] after the attempt began, no create is sent any
/// more and a read decides, once a create whose outcome is unknown can no longer land ([`crate::client::CREATE_LANDS_WITHIN`]), so
/// the error reaches the job's `lastError`. A refusal is decided the same way: an earlier create of unknown outcome
/// may still make the Pod, which is then this attempt's.
///
/// Every create of unknown outcome is recorded in `executor` as it is sent, and kept until it can no longer land,
/// also once another create made the Pod: when the attempt ends while one is in flight (a timeout, a cancel: the
/// create is dropped, the apiserver may still carry it out), or ends after its Pod was made by a later create,
/// [`stop`] waits for the Pod it makes rather than concluding there is none.
///
/// The Pod policy is checked first, then (with `--pod-creator-check`) the job's creator: a Pod either refuses is
/// never sent to the apiserver, and the job fails naming the field or the user, and the rule. An adopted Pod (see
/// [`adopt`]) was checked by the replica that created it.
async fn start(
    client: &Client,
    executor: &PodExecutor,
    job: &BackgroundJob,
    ctx: &JobContext,
    name: &str,
    now: jiff::Timestamp,
) -> Result<String, AttemptResult> {
    let pods: &Api<Pod> = &Api::namespaced(client.clone(), &ctx.namespace);
    let policy = &executor.policy;
    let mut wanted = pod_for(job, ctx).map_err(AttemptResult::Permanent)?;
    let made = executor.maker(job, ctx.attempt);
    if let Maker::ThisReplica(id) = &made {
        wanted.annotations_mut().insert(CREATE_ID_ANNOTATION.into(), id.clone());
    }
    if let Some(spec) = &wanted.spec {
        policy.check(&ctx.namespace, spec).map_err(|denial| {
            AttemptResult::Permanent(format!("the Pod policy refused the job's Pod, none was created: {denial}"))
        })?;
    }
    let patience = past_start(job, CREATE_PATIENCE, now);
    check_creator(client, policy.creator_check, job, &ctx.namespace, patience).await?;
    let mut backoff = backoff();
    // The latest create whose outcome is unknown (see `create_may_have_landed`): it may still be handled.
    let mut unanswered: Option<Instant> = None;
    let mut last_error = String::from("no create was sent in time");
    // The last create was refused by a full quota: if the read below finds no Pod, nothing ran.
    let mut no_room = false;
    let failed = loop {
        if Instant::now() >= patience {
            let why = format!("cannot create pod {name}: {last_error}");
            break if no_room { AttemptResult::NotStarted(why) } else { AttemptResult::Retryable(why) };
        }
        let sent = Instant::now();
        executor.note_unanswered(&ctx.uid, ctx.attempt, Some(sent));
        let e = match pods.create(&PostParams::default(), &wanted).await {
            Ok(p) => {
                // An earlier create whose answer was lost may still be handled: once this Pod is gone, it would
                // make the Pod again.
                executor.note_unanswered(&ctx.uid, ctx.attempt, unanswered);
                tracing::info!(pod = %name, "pod created");
                return Ok(p.uid().unwrap_or_default());
            }
            Err(e) => e,
        };
        if create_may_have_landed(api_code(&e)) {
            unanswered = Some(sent);
        }
        executor.note_unanswered(&ctx.uid, ctx.attempt, unanswered);
        match api_code(&e) {
            // Ours (an earlier create whose answer was lost), or another's; if it went away in between (an earlier
            // namesake's Pod collected), create ours.
            Some(409) => match find(pods, job, &ctx.uid, name, &made).await.0 {
                Found::Ours { uid, .. } => {
                    tracing::info!(pod = %name, "adopted the attempt's pod");
                    return Ok(uid);
                }
                // Another job's Pod holds the name: once it is gone, an earlier create still in flight makes ours.
                Found::Other(ended) => break ended,
                Found::Absent => {}
            },
            Some(400) | Some(422) => {
                break AttemptResult::Permanent(format!("the apiserver rejected the Pod from spec.template: {e}"));
            }
            Some(403) => match forbidden_pod(&e) {
                // Every create was answered, so none can still make the Pod: the attempt is handed back, to wait for
                // room off the replica's slots (`retry::room_wait`; its `Interrupted` Warning says why).
                ForbiddenPod::NoRoom if unanswered.is_none() => {
                    return Err(AttemptResult::NotStarted(format!("found no room for pod {name}: {e}")));
                }
                // A quota refuses before the store would answer AlreadyExists: an earlier create whose answer was
                // lost may have made this attempt's Pod, the very one that fills the quota. Sent again, until a
                // read decides.
                ForbiddenPod::NoRoom => {
                    if let Found::Ours { uid, .. } = find(pods, job, &ctx.uid, name, &made).await.0 {
                        tracing::info!(pod = %name, "adopted the attempt's pod");
                        return Ok(uid);
                    }
                    no_room = true;
                }
                // Passes on its own (a namespace's ServiceAccount or its token not made yet, a quota whose status
                // is not filled in yet): sent again, as a 5xx is.
                ForbiddenPod::NotYet => {}
                ForbiddenPod::NotAllowed => {
                    break AttemptResult::Retryable(format!(
                        "not allowed to create pods (is the chart's podMode enabled?): {e}"
                    ));
                }
                ForbiddenPod::Refused => {
                    break AttemptResult::Permanent(format!("the apiserver refused the Pod from spec.template: {e}"));
                }
            },
            // Any other refusal is an answer: this create made nothing.
            Some(code) if (400..500).contains(&code) && !matches!(code, 408 | 429) => {
                break AttemptResult::Retryable(format!("cannot create pod {name}: {e}"));
            }
            _ => {}
        }
        tracing::warn!(pod = %name, error = %e, "creating the attempt's pod failed; trying again");
        no_room &= crate::error::exceeded_quota(&e);
        last_error = e.to_string();
        backoff.wait().await;
    };
    // No create is sent from here on: a read decides once none can still make the Pod.
    if let Some(sent) = unanswered {
        tokio::time::sleep_until(sent + CREATE_LANDS_WITHIN).await;
    }
    existing(find(pods, job, &ctx.uid, name, &made).await.0, name)?.ok_or(failed)
}

/// Why the apiserver answered a Pod's create `403 Forbidden`.
#[derive(Debug, PartialEq, Eq)]
enum ForbiddenPod {
    /// A ResourceQuota is full (`exceeded quota`): there will be room once other Pods end.
    NoRoom,
    /// RBAC does not let the operator create Pods there (`cannot create resource "pods"`): a setting to fix.
    NotAllowed,
    /// What refuses this Pod as it is, and will again: a LimitRange, PodSecurity (or a PodSecurityPolicy), an
    /// admission webhook's denial, a namespace being deleted.
    Refused,
    /// Anything else, which may pass on its own (the ServiceAccount admission of a namespace just made, a quota
    /// whose status is not filled in yet): sent again, as before.
    NotYet,
}

/// The words of the refusals that hold for the Pod as it is ([`ForbiddenPod::Refused`]): LimitRange, a quota that
/// requires limits or requests, PodSecurity, PodSecurityPolicy, a ValidatingAdmissionPolicy, a webhook's denial
/// (ImagePolicyWebhook's too), OpenShift's security context constraints, a namespace being deleted.
const REFUSED_FOR_GOOD: [&str; 12] = [
    "usage per Container is",
    "usage per Pod is",
    "limit to request ratio",
    "failed quota",
    "violates PodSecurity",
    "unable to validate against any pod security policy",
    "no providers available to validate pod request",
    "denied request",
    "denied the request",
    "denied one or more images",
    "security context constraint",
    "because it is being terminated",
];

/// Why the apiserver answered `e`, a Pod's create, `403 Forbidden`.
fn forbidden_pod(e: &kube::Error) -> ForbiddenPod {
    let message = match e {
        kube::Error::Api(status) => status.message.as_str(),
        _ => "",
    };
    if crate::error::exceeded_quota(e) {
        ForbiddenPod::NoRoom
    } else if message.contains("cannot create resource") {
        ForbiddenPod::NotAllowed
    } else if REFUSED_FOR_GOOD.iter().any(|w| message.contains(w)) {
        ForbiddenPod::Refused
    } else {
        ForbiddenPod::NotYet
    }
}

/// Whether a create that failed with this answer (`None`: none came) may still have made, or yet make, the Pod: no
/// answer, or a server error (the apiserver's own timeout, an etcd timeout after the write, a proxy in front of it
/// that gave up), except 501. Any other answer says the create made nothing.
fn create_may_have_landed(code: Option<u16>) -> bool {
    match code {
        None => true,
        Some(code) => (500..600).contains(&code) && code != 501,
    }
}

/// `--pod-creator-check`: ask the apiserver whether each recorded creator of the job (and of its
/// RecurringBackgroundJob) may create pods in its namespace ([`creator`]). A refusal fails the job; a question the
/// apiserver cannot answer now (it restarts) is asked again until `patience`, as the Pod's create is, then fails the
/// attempt, to be retried.
async fn check_creator(
    client: &Client,
    check: CreatorCheck,
    job: &BackgroundJob,
    namespace: &str,
    patience: Instant,
) -> Result<(), AttemptResult> {
    if check == CreatorCheck::Off {
        return Ok(());
    }
    let refused =
        |e: String| AttemptResult::Permanent(format!("the creator check refused the job's Pod, none was created: {e}"));
    // A job that carries its definition's record is judged by it; only one made before the record was copied
    // looks its definition up.
    let owner = job
        .owner_references()
        .iter()
        .filter(|_| creator::copied_definition(&job.metadata).is_none())
        .find(|o| o.controller == Some(true) && o.kind == RecurringBackgroundJob::kind(&()));
    let definition = match owner {
        Some(o) => {
            let definitions: Api<RecurringBackgroundJob> = Api::namespaced(client.clone(), namespace);
            // Its creator record is metadata: read even from a definition whose template cannot be read.
            let read = || async { Ok(crate::unreadable::get_opt(&definitions, &o.name).await?) };
            let found = crate::client::ask_until(
                "read the job's RecurringBackgroundJob",
                patience,
                crate::client::START_UP_ASK_LIMIT,
                read,
            )
            .await;
            let found = found.map_err(|e| {
                AttemptResult::Retryable(format!(
                    "cannot read RecurringBackgroundJob {} to check its creator: {e}",
                    o.name
                ))
            })?;
            // A definition re-created under the same name is not the one that owns the job.
            Some((o.name.as_str(), found.filter(|d| d.uid().as_deref() == Some(o.uid.as_str())).map(|d| d.metadata)))
        }
        None => None,
    };
    let subjects =
        creator::subjects(check, &job.metadata, definition.as_ref().map(|(n, m)| (*n, m.as_ref()))).map_err(refused)?;
    let reviews: Api<LocalSubjectAccessReview> = Api::namespaced(client.clone(), namespace);
    for subject in &subjects {
        let review = creator::access_review(&subject.creator, namespace);
        let ask = || async { Ok(reviews.create(&PostParams::default(), &review).await?) };
        let answer = crate::client::ask_until(
            "ask whether the job's creator may create pods",
            patience,
            crate::client::START_UP_ASK_LIMIT,
            ask,
        )
        .await
        .map_err(|e| {
            AttemptResult::Retryable(format!(
                "cannot ask whether {} may create pods (the operator needs create on \
                         localsubjectaccessreviews; the chart grants it with operator.podCreatorCheck): {e}",
                subject.creator.username
            ))
        })?;
        creator::verdict(subject, namespace, &answer.status.unwrap_or_default()).map_err(refused)?;
    }
    tracing::debug!(subjects = subjects.len(), "creator check passed");
    Ok(())
}

/// Take over the Pod an earlier holder of this attempt created; its UID. It is never created here: if it is gone
/// (removed by hand or by the terminated-pod garbage collector before its outcome was recorded), running it again
/// would redo work that may have finished, under the same attempt number. The attempt ends instead, and the retry
/// policy decides (a new attempt, with its own Pod).
async fn adopt(
    pods: &Api<Pod>,
    job: &BackgroundJob,
    ctx: &JobContext,
    name: &str,
    now: jiff::Timestamp,
) -> Result<String, AttemptResult> {
    // The earlier holder's create may still be in flight (a slow admission webhook, a frozen apiserver).
    let late = LateCreates::until(no_create_lands_after(job, now));
    let made = Maker::elsewhere(job);
    let found = landed(pods, job, &ctx.uid, name, late, None, &made).await;
    existing(found, name)?.ok_or_else(|| {
        AttemptResult::Retryable(format!(
            "pod {name} of attempt {} vanished before its outcome was recorded; it is not created again (its work may \
             have run), the attempt counts as failed",
            ctx.attempt
        ))
    })
}

/// What an existing Pod of the attempt's name means for the attempt: this job's is adopted (its UID), another ends
/// the attempt; `None` if there is none.
fn existing(found: Found, name: &str) -> Result<Option<String>, AttemptResult> {
    match found {
        Found::Ours { uid, .. } => {
            tracing::info!(pod = %name, "adopted the attempt's pod");
            Ok(Some(uid))
        }
        Found::Other(ended) => Err(ended),
        Found::Absent => Ok(None),
    }
}

/// What holds the name of the attempt's Pod.
enum Found {
    /// This job's Pod, with its UID; `kept`: it finished, and is not being deleted, so it keeps the name until
    /// someone removes it.
    Ours {
        uid: String,
        kept: bool,
    },
    /// Another Pod: how the attempt ends.
    Other(AttemptResult),
    Absent,
}

/// What holds the name of the attempt's Pod once a create of it can no longer land unseen: read every second until
/// this job's Pod is there (other than the one `stopped` already) or `late` creates can land no more
/// ([`LateCreates::over`]: an earlier holder's no longer count once the `stopped` Pod keeps the name, finished and
/// not being deleted). Another Pod holding the name (a deleted namesake's awaiting garbage collection, or the
/// `stopped` one being deleted) does not settle it: once it is gone, a create still in flight makes this job's.
async fn landed(
    pods: &Api<Pod>,
    job: &BackgroundJob,
    job_uid: &str,
    name: &str,
    late: LateCreates,
    stopped: Option<&str>,
    made: &Maker,
) -> Found {
    loop {
        // Judged as of when the read was sent, not when its answer came: a read served before a late create landed
        // and answered after the bound says nothing of that create.
        match find(pods, job, job_uid, name, made).await {
            (Found::Ours { uid, kept }, _) if stopped != Some(uid.as_str()) => return Found::Ours { uid, kept },
            (found, sent) if late.over(&found, sent) => return found,
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Whether this job's Pod of `attempt` is there now and still to be stopped: neither finished nor being deleted
/// (one quorum read).
pub async fn needs_stopping(client: &Client, job: &BackgroundJob, attempt: i32) -> crate::Result<bool> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let found = crate::unreadable::get_opt(&pods, &pod_name(job, attempt)).await?;
    Ok(found.is_some_and(|p| {
        belongs(&p, &job.uid().unwrap_or_default()) && !finished(&p) && p.metadata.deletion_timestamp.is_none()
    }))
}

/// A Pod of the job with UID `job_uid` in `namespace` that may still run: for a Lease that names a job no replica
/// can adopt (deleted, its holder dead), whose Pod the garbage collector deletes but which runs on through its grace
/// period, or for as long as it likes while the controller-manager is down.
pub async fn running_pod_of(client: &Client, namespace: &str, job_uid: &str) -> crate::Result<Option<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(list_may_run(&pods, &format!("{JOB_UID_LABEL}={job_uid}")).await?.into_iter().next().map(|(pod, _)| pod))
}

/// A Pod that may still run of a job of `key` in `namespace` but the one whose UID is `except` (`namespace/name`):
/// one made before that job's key Lease was deleted by hand ([`crate::keys::POD_KEY_LABEL`]). Unless its job is
/// shown finished at that Pod's attempt or later ([`finished_after`]): its Pods stopped before that was recorded (a
/// `Failed` Pod kept for inspection, its kill never shown ended, must not hold the key for as long as its job is
/// kept). The `cached` jobs are asked first; a job read afresh only when they do not show it so (such Pods pile up
/// with their kept jobs: a read each, at every claim of the key, would grow with them).
///
/// The list is served from the apiserver's watch cache (any version): it is sent for nearly every claim of a keyed
/// job, as a key's Lease is deleted when given back, and a quorum list would read every Pod of the namespace from etcd
/// each time. Such a Pod has run since before its key Lease was deleted by hand, so only a watch cache lagging that
/// long would miss it.
pub async fn running_pod_of_key(
    client: &Client,
    namespace: &str,
    key: &str,
    except: &str,
    cached: &kube::runtime::reflector::Store<BackgroundJob>,
) -> crate::Result<Option<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector =
        format!("{MANAGED_BY_LABEL}={MANAGED_BY},{}={}", crate::keys::POD_KEY_LABEL, crate::keys::pod_label(key));
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), namespace);
    for pod in pods_may_run(&pods, ListParams::default().labels(&selector).match_any()).await? {
        let uid = pod.labels().get(JOB_UID_LABEL).map(String::as_str).unwrap_or_default();
        if uid == except {
            continue;
        }
        let attempt = pod.labels().get(ATTEMPT_LABEL).and_then(|a| a.parse().ok()).unwrap_or(i32::MAX);
        let job = pod.owner_references().iter().find(|o| o.controller == Some(true) && o.uid == uid);
        if let Some(owner) = job {
            let shown = cached.get(&kube::runtime::reflector::ObjectRef::new(&owner.name).within(namespace));
            if shown.is_some_and(|j| finished_after(&j, uid, attempt)) {
                continue;
            }
            let read = crate::unreadable::get_opt_without_args(&jobs, &owner.name).await?;
            if read.is_some_and(|j| finished_after(&j, uid, attempt)) {
                continue;
            }
        }
        return Ok(Some(format!("{namespace}/{}", pod.name_any())));
    }
    Ok(None)
}

/// The Pods bgjobs made in `pods`' scope that may still run, as `namespace/name` and the UID of their job: a new
/// exclusive leader starts nothing beside those whose job is gone ([`crate::exclusive::Fresh`]): nobody adopts or
/// stops them, and the garbage collector's delete lets them run through their grace period, or for as long as they
/// like while the controller-manager is down.
pub async fn pods_that_may_run(pods: &Api<Pod>) -> crate::Result<Vec<(String, String)>> {
    list_may_run(pods, &format!("{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_UID_LABEL}")).await
}

/// The Pods `selector` picks in `pods`' scope that may still run ([`may_still_run`]), as `namespace/name` and the UID
/// of their job (one quorum list). None when this replica may not list Pods there: it runs none there either, and
/// nothing is concluded.
async fn list_may_run(pods: &Api<Pod>, selector: &str) -> crate::Result<Vec<(String, String)>> {
    Ok(pods_may_run(pods, ListParams::default().labels(selector))
        .await?
        .into_iter()
        .map(|p| {
            let uid = p.labels().get(JOB_UID_LABEL).cloned().unwrap_or_default();
            (format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()), uid)
        })
        .collect())
}

/// Whether `job` is the one whose UID is `uid`, shown finished at attempt `attempt` or later: a Pod of that attempt
/// stopped before the job's end was recorded ([`crate::claim::job_may_run_at`]). A later attempt's Pod is not (the
/// job was put back in the queue and claimed since, and the copy lags).
fn finished_after(job: &BackgroundJob, uid: &str, attempt: i32) -> bool {
    job.uid().as_deref() == Some(uid) && !crate::claim::job_may_run_at(Some(job), Some(attempt))
}

/// The Pods `params` list in `pods`' scope that may still run ([`may_still_run`]); none when this replica may not list
/// Pods there: it runs none there either, and nothing is concluded.
async fn pods_may_run(pods: &Api<Pod>, params: ListParams) -> crate::Result<Vec<Pod>> {
    match pods.list(&params).await {
        Ok(list) => Ok(list.items.into_iter().filter(may_still_run).collect()),
        Err(e) if crate::error::api_code(&e) == Some(403) => {
            let selector = params.label_selector.unwrap_or_default();
            tracing::debug!(%selector, error = %e, "may not list Pods: Pods of gone jobs are not looked for");
            Ok(Vec::new())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a Pod may still run a container: not finished, or `Failed` with its kill pending ([`kill_pending`]). No
/// time is counted for the latter: nothing in the Pod says when the kubelet began its kill (its conditions may keep
/// the time its container became ready), and a Pod that stays so is removed with its job by the garbage collector.
fn may_still_run(pod: &Pod) -> bool {
    !finished(pod) || kill_pending(pod).is_some()
}

/// Read the Pod named `name` (a quorum read, retried with backoff until it answers): what holds the name, and when
/// the read that answered was sent (it shows nothing that landed after that). A Pod of the job's that `made` refuses
/// ([`Maker::refuses`]) is another's; a stop looks with [`Maker::Unknown`], for whatever runs under the job's name.
async fn find(pods: &Api<Pod>, job: &BackgroundJob, job_uid: &str, name: &str, made: &Maker) -> (Found, Instant) {
    let mut backoff = backoff();
    loop {
        let sent = Instant::now();
        match crate::unreadable::get_opt(pods, name).await {
            Ok(Some(p)) if belongs(&p, job_uid) => match made.refuses(&p) {
                None => return (Found::Ours { uid: p.uid().unwrap_or_default(), kept: keeps_name(&p) }, sent),
                Some(why) => return (Found::Other(AttemptResult::Permanent(why)), sent),
            },
            Ok(Some(p)) => return (Found::Other(not_ours(&p, job)), sent),
            Ok(None) => return (Found::Absent, sent),
            Err(e) => tracing::warn!(pod = %name, error = %e, "cannot read the attempt's pod; trying again"),
        }
        backoff.wait().await;
    }
}

/// Whether the Pod is one of the job's: labelled with its UID, or controlled by it. Either does: a label or an owner
/// removed by hand (anyone who may patch Pods can) must not make a running attempt's Pod a stranger that a stop
/// leaves running beside the retry's.
fn belongs(pod: &Pod, job_uid: &str) -> bool {
    pod.labels().get(JOB_UID_LABEL).map(String::as_str) == Some(job_uid)
        || pod.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == job_uid)
}

/// Who made the attempt's Pod, as far as the replica that looks for it can tell.
pub enum Maker {
    /// This replica's creates of the attempt's Pod, each sending this [`CREATE_ID_ANNOTATION`].
    ThisReplica(String),
    /// Another replica (the attempt was adopted, or is settled by a replica that does not hold it), which began the
    /// attempt then (`status.startTime`, the cluster's clock).
    Began(jiff::Timestamp),
    /// Another replica, at a time not written (a status written by hand), or whoever: any Pod of the job's.
    Unknown,
}

impl Maker {
    /// An attempt of `job` started by another replica.
    pub fn elsewhere(job: &BackgroundJob) -> Maker {
        attempt_began(job).map_or(Maker::Unknown, Maker::Began)
    }

    /// Why a Pod of the job's under the attempt's name cannot be the attempt's, if it cannot: it lacks the id this
    /// replica's creates sent, or it was created before the attempt began (by more than the attempt's start, written
    /// by one replica's estimate of the cluster's clock, and a creation time in whole seconds may be off).
    fn refuses(&self, pod: &Pod) -> Option<String> {
        let name = pod.name_any();
        match self {
            Maker::Unknown => None,
            Maker::ThisReplica(id) => {
                (pod.annotations().get(CREATE_ID_ANNOTATION) != Some(&id.to_string())).then(|| {
                    format!(
                        "pod {name} carries this job's UID, but no create of the attempt made it (it was created by \
                         someone else under the attempt's name); its outcome is not taken for the attempt's"
                    )
                })
            }
            Maker::Began(began) => {
                let created = pod.metadata.creation_timestamp.as_ref()?.0;
                let allowance = SignedDuration::try_from(MADE_BEFORE_ALLOWANCE).unwrap_or_default();
                (created.checked_add(allowance).ok()? < *began).then(|| {
                    format!(
                        "pod {name} carries this job's UID, but was created at {created}, before the attempt began \
                         at {began} (someone else created it under the attempt's name); its outcome is not taken for \
                         the attempt's"
                    )
                })
            }
        }
    }
}

/// How much earlier than its attempt's `startTime` the attempt's own Pod may seem created: the start is one replica's
/// estimate of the cluster's clock, and the creation time comes in whole seconds.
const MADE_BEFORE_ALLOWANCE: Duration =
    Duration::from_millis(crate::clock::REPLICAS_AGREE_WITHIN.as_millis() as u64 + 1000);

/// When the job's current attempt began (`status.startTime`), if its status says.
fn attempt_began(job: &BackgroundJob) -> Option<jiff::Timestamp> {
    job.status.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0)
}

/// How an attempt ends when its Pod's name is taken by a Pod that is not this job's. A Pod left by an earlier job of
/// the same name, deleted but not yet garbage-collected, goes away by itself (and the next attempt's Pod has another
/// name): retry. Anything else stays until someone removes it.
fn not_ours(pod: &Pod, job: &BackgroundJob) -> AttemptResult {
    let name = pod.name_any();
    let namesake = pod
        .owner_references()
        .iter()
        .any(|o| o.kind == BackgroundJob::kind(&()) && o.name == job.name_any() && job.uid().as_ref() != Some(&o.uid));
    if namesake {
        AttemptResult::Retryable(format!(
            "pod {name} belongs to an earlier job of the same name that was deleted; the garbage collector removes \
             it, and the next attempt uses another name"
        ))
    } else {
        AttemptResult::Permanent(format!("a Pod named {name} exists and does not belong to this job"))
    }
}

/// Whether the Pod keeps its name from any create for as long as nobody removes it: finished (a running one is
/// stopped, by deletion), and not being deleted.
fn keeps_name(pod: &Pod) -> bool {
    finished(pod) && pod.metadata.deletion_timestamp.is_none()
}

/// A container's waiting reasons that say it cannot start as things are, rather than that it is on its way: its image
/// cannot be had, or its container cannot be made from its configuration (a missing Secret or ConfigMap key).
const CANNOT_START: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Why `pod` cannot start, if it says so: a container (init or not) waits for one of the [`CANNOT_START`] reasons, or
/// no node can take the Pod (`PodScheduled` false, `Unschedulable`). A Pod on its way (being scheduled, its image
/// being pulled, its containers being made) says nothing.
pub fn not_starting(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let containers = status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    for container in containers {
        let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) else { continue };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if CANNOT_START.contains(&reason) {
            let message = waiting.message.as_deref().filter(|m| !m.is_empty());
            return Some(match message {
                Some(m) => format!("container {}: {reason}: {m}", container.name),
                None => format!("container {}: {reason}", container.name),
            });
        }
    }
    let unscheduled =
        status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
        })?;
    Some(format!("not scheduled: {}", unscheduled.message.as_deref().unwrap_or("no node can run it")))
}

/// Whether the Pod reached a final phase. A `Failed` one may still run for a while: see [`kill_pending`].
fn finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded") | Some("Failed"))
}

/// How long a Pod reported `Failed` may still run. The kubelet reports a Pod past its `activeDeadlineSeconds`
/// (`DeadlineExceeded`), evicted, preempted, or refused when it restarts, `Failed` *before* it kills its containers,
/// within the Pod's grace period (and on 1.20 never reports them stopped). So unless every container of the Pod is
/// shown stopped (terminated, or never started), its attempt ends only once that grace (capped at
/// [`STOP_GRACE_MAX_SECONDS`] when the Pod is made, [`pod_for`]) and [`KILL_MARGIN`] have passed since it was seen
/// `Failed` ([`until_stopped`]). Deleting it would not do: the apiserver removes a `Failed` Pod at once, so its being
/// gone proves nothing. `None` for a Pod that did not fail, or whose containers all stopped.
fn kill_pending(pod: &Pod) -> Option<Duration> {
    let status = pod.status.as_ref().filter(|s| s.phase.as_deref() == Some("Failed"))?;
    let spec = pod.spec.as_ref();
    let shown: Vec<&k8s_openapi::api::core::v1::ContainerStatus> =
        [&status.init_container_statuses, &status.container_statuses, &status.ephemeral_container_statuses]
            .into_iter()
            .flatten()
            .flatten()
            .collect();
    let running = shown.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    // An eviction or a refusal writes no container statuses at all: nothing says the containers stopped.
    let unshown = spec.is_some_and(|s| s.containers.iter().any(|c| !shown.iter().any(|st| st.name == c.name)));
    if !running && !unshown {
        return None;
    }
    Some(Duration::from_secs(grace_of(pod).max(0) as u64) + KILL_MARGIN)
}

/// Allowed past a failed Pod's grace period for the kubelet to begin its kill (it reports `Failed` first) and to
/// finish it (its SIGKILL, the runtime's reaping).
const KILL_MARGIN: Duration = Duration::from_secs(5);

/// Wait until the Pod `uid` named `name` can run nothing any more: `Some` with a final phase, `None` once a GET
/// confirms it is gone (absent, or the name holds another Pod). Nothing else ends the wait: a broken watch (410
/// Gone, a reset connection, a failed re-list) is watched again with backoff, and a watch that says "gone" (it may
/// be served from a lagging cache) is checked with a quorum read. A silently dead watch connection is replaced after
/// 130 s of silence ([`crate::list_watch`]). The attempt runner bounds the whole wait. A Pod seen being deleted
/// that is still not stopped `watchers.after` past its grace period is told to `watchers.not_stopping` (once), and one
/// that cannot start, to `watchers.not_starting` (at each change of why, and once it can).
async fn until_stopped(pods: &Api<Pod>, name: &str, uid: &str, watchers: &Watchers<'_>) -> Option<Pod> {
    let ended = until_final(pods, name, uid, watchers).await;
    // A `Failed` Pod whose containers are not all shown stopped may still run: the kubelet's kill is waited out.
    if let Some(hold) = ended.as_ref().and_then(kill_pending) {
        tracing::info!(pod = %name, ?hold, "the pod failed before its containers were shown stopped: waiting out its \
            grace period for the kubelet's kill");
        tokio::time::sleep(hold).await;
    }
    ended
}

/// [`until_stopped`] up to the Pod's final phase, or its absence.
async fn until_final(pods: &Api<Pod>, name: &str, uid: &str, watchers: &Watchers<'_>) -> Option<Pod> {
    let mut watch = std::pin::pin!(watch_one(pods.clone(), name).default_backoff());
    let mut overdue_at: Option<Instant> = None;
    let mut told = false;
    // Why the Pod cannot start, as last told.
    let mut stuck: Option<String> = None;
    loop {
        let event = tokio::select! {
            biased;
            event = watch.next() => event,
            _ = sleep_until(overdue_at), if !told => {
                // The watch may lag, or its connection be silently dead: ask the apiserver before blaming the node.
                match read(pods, name, uid).await {
                    Some(pod) if !finished(&pod) && overdue_by(&pod, (watchers.now)(), watchers.after) => {
                        told = true;
                        (watchers.not_stopping)(name);
                        continue;
                    }
                    // Not yet, by the clock as read now (its estimate moved since the timer was set).
                    Some(pod) if !finished(&pod) => {
                        overdue_at = due_in(&pod, watchers);
                        continue;
                    }
                    ended => return ended,
                }
            }
        };
        let Some(event) = event else { break };
        match event {
            Ok(Some(pod)) if pod.uid().as_deref() == Some(uid) => {
                if finished(&pod) {
                    return Some(pod);
                }
                let why = not_starting(&pod);
                if why != stuck {
                    (watchers.not_starting)(name, why.as_deref());
                }
                stuck = why;
                // Again at every change: a second deletion with a shorter grace moves `deletionTimestamp` earlier.
                overdue_at = due_in(&pod, watchers);
            }
            Ok(_) => match read(pods, name, uid).await {
                Some(pod) if !finished(&pod) => {}
                ended => return ended,
            },
            Err(e) => tracing::warn!(pod = %name, error = %e, "watching the attempt's pod failed; watching again"),
        }
    }
    // The watcher never ends; should it ever, fall back to reading (no report from here).
    loop {
        match read(pods, name, uid).await {
            Some(pod) if !finished(&pod) => tokio::time::sleep(BACKOFF_MOST).await,
            ended => return ended,
        }
    }
}

/// The longest the operator lets a Pod it stops take to stop ([`stop_params`]), unless its own
/// `terminationGracePeriodSeconds` is shorter. A template's grace is the tenant's to set (ten years is valid), and a
/// stopping attempt holds its slots, its concurrency key and the next attempt back until the Pod has stopped.
pub const STOP_GRACE_MAX_SECONDS: i64 = 600;

/// The Pod's termination grace period (Kubernetes' default 30 s if it sets none), at most
/// [`STOP_GRACE_MAX_SECONDS`]: how long a stop ([`stop_params`]) or a kill the kubelet began ([`kill_pending`]) may
/// take.
fn grace_of(pod: &Pod) -> i64 {
    let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
    grace.min(STOP_GRACE_MAX_SECONDS)
}

/// How the operator deletes a Pod it stops: that Pod only (its UID), within its grace period, at most
/// [`STOP_GRACE_MAX_SECONDS`] and at least 1 s (a grace of 0 removes the Pod at once, before its containers have
/// stopped, and its being gone would prove nothing).
fn stop_params(pod: &Pod) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions { uid: pod.uid(), resource_version: None }),
        grace_period_seconds: Some(grace_of(pod).max(1) as u32),
        ..Default::default()
    }
}

/// How long [`not_stopping`] waits for its read.
const NOT_STOPPING_READ_LIMIT: Duration = Duration::from_secs(5);

/// Whether this job's Pod of `attempt` was deleted and, by the cluster's clock `now`, has not stopped `after` past its
/// grace period (its `deletionTimestamp` is when the grace ends): its name if so. For a replica that does not watch
/// the Pod (a settle), from one read; a read that fails, or takes longer than [`NOT_STOPPING_READ_LIMIT`], says no.
pub async fn not_stopping(
    client: &Client,
    job: &BackgroundJob,
    attempt: i32,
    now: jiff::Timestamp,
    after: Duration,
) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let name = pod_name(job, attempt);
    let pod =
        tokio::time::timeout(NOT_STOPPING_READ_LIMIT, crate::unreadable::get_opt(&pods, &name)).await.ok()?.ok()??;
    let overdue = belongs(&pod, &job.uid().unwrap_or_default()) && !finished(&pod) && overdue_by(&pod, now, after);
    overdue.then_some(name)
}

/// Whether `pod`, being deleted, is still not stopped `after` past its grace period at the cluster's time `now`, as
/// this replica reads it ([`overdue_at`]). The one rule, for the replica that watches the Pod and for one that
/// settles its job.
fn overdue_by(pod: &Pod, now: jiff::Timestamp, after: Duration) -> bool {
    overdue_at(pod, after).is_some_and(|overdue| overdue <= now)
}

/// When `pod`, being deleted, is overdue by the cluster's clock: `after` past its grace period (its
/// `deletionTimestamp`), plus what a replica's reading may be off by: its estimate may run up to half of
/// [`crate::clock::REPLICAS_AGREE_WITHIN`] ahead, and a `deletionTimestamp` comes in whole seconds (up to one early);
/// never sooner. None if it is not being deleted, or never (a grace too long to count).
fn overdue_at(pod: &Pod, after: Duration) -> Option<jiff::Timestamp> {
    let grace_ends = pod.metadata.deletion_timestamp.as_ref()?;
    let allowance = crate::clock::REPLICAS_AGREE_WITHIN / 2 + Duration::from_secs(1);
    let after = SignedDuration::try_from(after.checked_add(allowance)?).ok()?;
    grace_ends.0.checked_add(after).ok()
}

/// The instant, on this machine's monotonic clock, at which `pod` is [`overdue_at`], by `watchers`' clock now.
fn due_in(pod: &Pod, watchers: &Watchers<'_>) -> Option<Instant> {
    let left = overdue_at(pod, watchers.after)?.duration_since((watchers.now)());
    Instant::now().checked_add(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// What a person is told of a Pod that does not stop (the `PodNotStopping` Event), by whichever replica finds it.
pub fn not_stopping_note(pod: &str) -> String {
    format!(
        "pod {pod} was deleted and has not stopped a lease duration past its grace period: its node is most likely \
         unreachable. Its attempt, and the slots held for it, wait until the pod stops or is gone; once the node is \
         known to be down, `kubectl delete pod {pod} --grace-period=0 --force` removes it"
    )
}

/// Sleep until `at`; for ever without it.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The Pod `uid` as a quorum read sees it (retried with backoff until it answers); `None` once it is gone.
async fn read(pods: &Api<Pod>, name: &str, uid: &str) -> Option<Pod> {
    let mut backoff = backoff();
    loop {
        match crate::unreadable::get_opt(pods, name).await {
            Ok(found) => return found.filter(|p| p.uid().as_deref() == Some(uid)),
            Err(e) => tracing::warn!(pod = %name, error = %e, "cannot read the attempt's pod; trying again"),
        }
        backoff.wait().await;
    }
}

/// Growing pauses between tries of a call whose failure says nothing about the Pod: from half a second, doubling up
/// to [`BACKOFF_MOST`].
fn backoff() -> crate::client::Backoff {
    crate::client::Backoff::new(Duration::from_millis(500), BACKOFF_MOST)
}

const BACKOFF_MOST: Duration = Duration::from_secs(10);

/// How a finished Pod went.
pub fn outcome(pod: &Pod) -> AttemptResult {
    let status = pod.status.clone().unwrap_or_default();
    if status.phase.as_deref() == Some("Succeeded") {
        return AttemptResult::Succeeded;
    }
    // An init container that failed leaves the others waiting: look at it too.
    let terminated = status
        .init_container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.container_statuses.unwrap_or_default())
        .filter_map(|c| c.state.and_then(|s| s.terminated).map(|t| (c.name, t)))
        .find(|(_, t)| t.exit_code != 0);
    let detail = match terminated {
        Some((container, t)) => {
            let mut d = format!("container {container} exited with code {}", t.exit_code);
            if let Some(r) = t.reason.filter(|r| !r.is_empty()) {
                d.push_str(&format!(" ({r})"));
            }
            if let Some(m) = t.message.filter(|m| !m.is_empty()) {
                d.push_str(&format!(": {}", m.chars().take(300).collect::<String>()));
            }
            d
        }
        None => status.message.or(status.reason).unwrap_or_else(|| "no container status".into()),
    };
    AttemptResult::Retryable(format!("pod {} failed: {detail}", pod.name_any()))
}

/// Who is told what about an attempt's Pod while it is waited for.
///
/// A Pod deleted (by [`stop`], or by anyone: an eviction) that has not stopped `after` its termination grace period:
/// its node is most likely unreachable (a kubelet that does not answer kills nothing), and the wait, with the
/// attempt's slots, lasts until the node comes back or the Pod is removed by force. Told once per wait, with the
/// Pod's name; the wait goes on.
///
/// A Pod that cannot start ([`not_starting`]: an image that cannot be pulled, a missing Secret, no node to run it):
/// told with the Pod's name and why, each time why changes, and with None once it no longer says so (a node was
/// added, a pull worked). The attempt waits on (a registry may come back), until its timeout.
pub struct Watchers<'a> {
    /// How long past the grace period a deleted Pod is overdue.
    pub after: Duration,
    /// The cluster's time, as this replica reads it (a Pod's `deletionTimestamp` is the cluster's).
    pub now: &'a (dyn Fn() -> jiff::Timestamp + Sync),
    /// Called with the name of a deleted Pod that has not stopped.
    pub not_stopping: &'a (dyn Fn(&str) + Sync),
    /// Called with the name of a Pod that cannot start and why, or None once it no longer says so.
    pub not_starting: &'a (dyn Fn(&str, Option<&str>) + Sync),
}

/// Stop the Pod of `attempt` (cancellation, attempt timeout, deadline, job deletion), and any Pod a create of it
/// still in flight makes, until none can land any more (`late`: see [`PodExecutor::late_creates`] for the replica
/// that sent them, [`no_create_lands_after`] for any other). Returns once no Pod of the job under that name can still
/// run: the Pod is gone or finished, none came, and `late` creates can land no more, or only an earlier holder's
/// while the finished Pod keeps the name.
///
/// A running Pod is deleted, and waited for until its containers have stopped (gone, or a final phase): a retry never
/// starts beside a container still in its termination grace period. A finished one is left for inspection. Once a
/// Pod is gone (deleted here, or by anyone, finished or not), a create sent before it was made (its answer lost, the
/// create sent again) could still make it again: it is looked for until `late.until`, or `late.while_name_free`
/// while no finished Pod keeps the name, and stopped too. Another job's Pod of that name is left alone.
///
/// Unbounded: the caller bounds it by its claim. No deletion is sent while `may_act` says no (the claim is out of
/// date: the Pod may be another holder's to watch by then).
///
/// Returns whether the attempt's Pod had already succeeded when first found: a Pod that finished before the attempt
/// timed out, its end not yet shown by a lagging watch, did the work, and recording a timeout would run it again. Only
/// a Pod the attempt's creates can have made (`made`, [`Maker::refuses`]) did the attempt's work; any Pod of the job's
/// is stopped.
pub async fn stop(
    client: &Client,
    job: &BackgroundJob,
    attempt: i32,
    late: LateCreates,
    may_act: &(dyn Fn() -> bool + Sync),
    watchers: &Watchers<'_>,
    made: &Maker,
) -> bool {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let name = pod_name(job, attempt);
    let job_uid = job.uid().unwrap_or_default();
    if late.after(Instant::now()) {
        let (until, while_name_free) = (late.until - Instant::now(), late.while_name_free - Instant::now());
        tracing::info!(
            pod = %name, ?until, ?while_name_free,
            "a create of the attempt's pod may still land: looking for it until then"
        );
    }
    let mut stopped: Option<String> = None;
    let mut succeeded = None;
    loop {
        let Found::Ours { uid, .. } =
            landed(&pods, job, &job_uid, &name, late, stopped.as_deref(), &Maker::Unknown).await
        else {
            return succeeded.unwrap_or(false);
        };
        if stopped.as_ref() == Some(&uid) {
            // No create can land any more while the stopped Pod still holds the name.
            return succeeded.unwrap_or(false);
        }
        match request_deletion(&pods, &name, &job_uid, may_act, made).await {
            // Being deleted, or finished already: a finished Pod is left for inspection, and may still be removed (by
            // hand, by the terminated-pod garbage collector) before a create can land no more.
            Some((uid, had_succeeded)) => {
                succeeded.get_or_insert(had_succeeded);
                // The attempt has ended: whether its Pod could have started is no longer news.
                let ended = Watchers { not_starting: &|_, _| {}, ..*watchers };
                until_stopped(&pods, &name, &uid, &ended).await;
                stopped = Some(uid);
            }
            // Gone between the two reads (or a delete answered so while the Pod stays): look again in a moment.
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Ask for a graceful deletion of this job's Pod named `name` (only that Pod: UID precondition), unless it has
/// finished; the UID of the Pod to wait for and whether it had succeeded (a Pod `made` by the attempt), or `None` if
/// no Pod of this job has that name any more. Failed calls are tried again. Never sends the delete while `may_act`
/// says no.
async fn request_deletion(
    pods: &Api<Pod>,
    name: &str,
    job_uid: &str,
    may_act: &(dyn Fn() -> bool + Sync),
    made: &Maker,
) -> Option<(String, bool)> {
    let mut backoff = backoff();
    loop {
        match crate::unreadable::get_opt(pods, name).await {
            Ok(Some(p)) if belongs(&p, job_uid) => {
                let uid = p.uid()?;
                if finished(&p) {
                    // Succeeded on its own: not a Pod that exited 0 when a deletion (this attempt's, before its
                    // replica handed it over, or anyone's) stopped it.
                    let succeeded = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
                        && p.metadata.deletion_timestamp.is_none()
                        && made.refuses(&p).is_none();
                    return Some((uid, succeeded));
                }
                // Being deleted already (by anyone): waited for within the grace it was given, not shortened.
                if p.metadata.deletion_timestamp.is_some() {
                    return Some((uid, false));
                }
                // Not while the claim is out of date: it may come back (a late confirmation), or the caller's bound
                // ends this first.
                while !may_act() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                match crate::unreadable::delete(pods, name, &stop_params(&p)).await {
                    Ok(_) => return Some((uid, false)),
                    // Gone already, or the name now holds another Pod (the UID precondition failed).
                    Err(e) if api_code(&e) == Some(409) || crate::error::gone(&e) => return None,
                    Err(e) => {
                        tracing::warn!(pod = %name, error = %e, "could not delete the attempt's pod; trying again")
                    }
                }
            }
            Ok(_) => return None,
            Err(e) => tracing::warn!(pod = %name, error = %e, "cannot read the attempt's pod; trying again"),
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forbidden_pod_waits_for_a_full_quota_is_retried_for_rbac_and_fails_for_the_rest() {
        let forbidden = |message: &str| {
            forbidden_pod(&kube::Error::Api(kube::core::Status::failure(message, "Forbidden").with_code(403).boxed()))
        };
        let quota =
            r#"pods "j-1" is forbidden: exceeded quota: pods, requested: pods=1, used: pods=1, limited: pods=1"#;
        assert_eq!(forbidden(quota), ForbiddenPod::NoRoom);
        let rbac = r#"pods is forbidden: User "system:serviceaccount:bgjobs:bgjobs" cannot create resource "pods" in API group "" in the namespace "x""#;
        assert_eq!(forbidden(rbac), ForbiddenPod::NotAllowed);
        for passing in [
            r#"pods "j-1" is forbidden: error looking up service account ns/default: serviceaccount "default" not found"#,
            r#"pods "j-1" is forbidden: no API token found for service account "default", retry after the token is automatically created and added to the service account"#,
            r#"pods "j-1" is forbidden: status unknown for quota: pods, resources: pods"#,
        ] {
            assert_eq!(forbidden(passing), ForbiddenPod::NotYet, "{passing}");
        }
        for refused in [
            r#"pods "j-1" is forbidden: maximum cpu usage per Container is 100m, but limit is 200m"#,
            r#"pods "j-1" is forbidden: unable to validate against any pod security policy: []"#,
            r#"pods "j-1" is forbidden: failed quota: compute: must specify limits.cpu,requests.cpu"#,
            r#"pods "j-1" is forbidden: PodSecurityPolicy: no providers available to validate pod request"#,
            r#"pods "j-1" is forbidden: ValidatingAdmissionPolicy 'p' with binding 'b' denied request: no"#,
            r#"pods "j-1" is forbidden: unable to validate against any security context constraint: []"#,
            r#"pods "j-1" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false"#,
            r#"admission webhook "deny.example.com" denied the request: no"#,
            r#"pods "j-1" is forbidden: unable to create new content in namespace x because it is being terminated"#,
        ] {
            assert_eq!(forbidden(refused), ForbiddenPod::Refused, "{refused}");
        }
    }
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus};
    use tokio_util::sync::CancellationToken;

    /// A Pod that cannot start says why (an image that cannot be had, a configuration that cannot be made, no node);
    /// one on its way says nothing.
    #[test]
    fn a_pod_that_cannot_start_says_why_and_one_on_its_way_says_nothing() {
        let pod = |status: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "j-1"}, "status": status})).unwrap()
        };
        let waiting = |name: &str, reason: &str, message: &str| {
            serde_json::json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}}})
        };
        let never = pod(serde_json::json!({"phase": "Pending",
            "containerStatuses": [waiting("main", "ErrImageNeverPull", "image \"nope:1\" is not present")]}));
        assert_eq!(
            not_starting(&never).as_deref(),
            Some("container main: ErrImageNeverPull: image \"nope:1\" is not present")
        );
        let secret = pod(serde_json::json!({"phase": "Pending",
            "initContainerStatuses": [waiting("setup", "CreateContainerConfigError", "secret \"s\" not found")]}));
        assert!(not_starting(&secret).is_some_and(|w| w.starts_with("container setup: CreateContainerConfigError")));
        let unschedulable = pod(serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available: 1 Insufficient cpu."}]}));
        assert_eq!(
            not_starting(&unschedulable).as_deref(),
            Some("not scheduled: 0/1 nodes are available: 1 Insufficient cpu.")
        );
        for on_its_way in [
            pod(serde_json::json!({"phase": "Pending"})),
            pod(
                serde_json::json!({"phase": "Pending", "containerStatuses": [waiting("main", "ContainerCreating", "")]}),
            ),
            pod(serde_json::json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]})),
        ] {
            assert_eq!(not_starting(&on_its_way), None, "{:?}", on_its_way.status);
        }
    }

    #[tokio::test]
    async fn a_pod_is_given_up_for_lost_only_once_no_create_of_its_attempt_can_land_counted_by_the_clusters_clock() {
        let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let mut j = job();
        // Began 100 s ago by the cluster's clock, whatever this machine's says.
        let began = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now - jiff::SignedDuration::from_secs(100));
        let status = crate::api::BackgroundJobStatus { start_time: Some(began), ..Default::default() };
        j.status = Some(Box::new(status));
        let left = |after: Duration| past_start(&j, after, now).duration_since(Instant::now());
        // An adopter, or a replica settling the orphaned job: 90 + 60 + 4.5 s after it began, 54.5 s from now.
        let others = no_create_lands_after(&j, now).duration_since(Instant::now());
        assert!(others > Duration::from_millis(54_000) && others <= Duration::from_millis(54_500), "{others:?}");
        assert_eq!(left(CREATE_PATIENCE), Duration::ZERO, "its holder sends no create past 90 s");
        let fresh = job();
        let left = past_start(&fresh, CREATE_PATIENCE, now).duration_since(Instant::now());
        assert!(left > Duration::from_secs(89), "no start time: from now");
    }

    #[test]
    fn a_deleted_pod_is_overdue_by_the_clusters_clock_a_while_after_its_grace_ended_and_one_told_to_take_for_ever_never_is()
     {
        let grace_ends: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let after = Duration::from_secs(15);
        let mut pod = Pod::default();
        let at = |s: i64| grace_ends + jiff::SignedDuration::from_secs(s);
        assert!(!overdue_by(&pod, at(100), after), "not being deleted");
        pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(grace_ends));
        // A lease, then what the replica's clock and the whole-second timestamp may be off by.
        assert!(!overdue_by(&pod, at(18), after), "within a lease and the clocks' allowance of the grace's end");
        assert!(overdue_by(&pod, at(19), after));
        assert_eq!(overdue_at(&pod, after), Some(at(18) + jiff::SignedDuration::from_millis(250)));
        assert!(!overdue_by(&pod, at(100), Duration::MAX), "no overflow: never");
        assert_eq!(overdue_at(&pod, Duration::from_secs(u64::MAX / 4)), None, "beyond any timestamp: never");
        // The replica that watches the Pod sets its timer by the same rule, on the clock it reads.
        let (now, report) = (|| at(10), |_: &str| {});
        let watchers = Watchers { after, now: &now, not_stopping: &report, not_starting: &|_, _| {} };
        let left = due_in(&pod, &watchers).unwrap().duration_since(Instant::now());
        assert!(left > Duration::from_millis(8_000) && left <= Duration::from_millis(8_250), "{left:?}");
        let late = || at(30);
        let watchers = Watchers { after, now: &late, not_stopping: &report, not_starting: &|_, _| {} };
        assert!(due_in(&pod, &watchers).unwrap() <= Instant::now(), "overdue already: now");
        // A Pod told to take for ever: its grace ends at the edge of time, and it is never overdue.
        let for_ever = jiff::Timestamp::MAX - jiff::SignedDuration::from_secs(1);
        pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(for_ever));
        assert_eq!((overdue_at(&pod, after), due_in(&pod, &watchers)), (None, None));
        assert!(!overdue_by(&pod, jiff::Timestamp::MAX, after));
        // One told to take centuries: a timer that far away, set without overflow, and no report before.
        let far: jiff::Timestamp = "9000-01-01T00:00:00Z".parse().unwrap();
        pod.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(far));
        assert!(due_in(&pod, &watchers).is_none_or(|due| due > Instant::now() + Duration::from_secs(86_400 * 365)));
        assert!(!overdue_by(&pod, at(100), after));
    }

    #[test]
    fn an_attempts_pod_is_waited_for_until_its_own_unanswered_creates_and_an_adopted_attempts_predecessors_can_land() {
        let executor = PodExecutor::new(PodPolicy::default());
        let now = jiff::Timestamp::now();
        let (j, mut other) = (job(), job());
        other.metadata.uid = Some("other".into());
        let uid = j.uid().unwrap();
        let settled =
            |job: &BackgroundJob, attempt: i32| !executor.late_creates(job, attempt, now).after(Instant::now());
        assert!(settled(&j, 1), "nothing sent: nothing to wait for");
        let sent = Instant::now();
        executor.note_unanswered(&uid, 1, Some(sent));
        let own = sent + CREATE_LANDS_WITHIN;
        assert_eq!(executor.late_creates(&j, 1, now), LateCreates::until(own), "its own, whatever holds the name");
        assert!(settled(&j, 2), "another attempt of the job");
        assert!(settled(&other, 1), "another job");
        executor.note_unanswered(&uid, 1, None);
        assert!(settled(&j, 1), "every create answered");
        // An attempt this replica adopted: its earlier holder's creates may land until 154.5 s after it began, as
        // long as the name is free.
        let now: jiff::Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let mut adopted = job();
        let began = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now - jiff::SignedDuration::from_secs(10));
        adopted.status = Some(Box::new(crate::api::BackgroundJobStatus {
            start_time: Some(began),
            last_error: Some("worker a stopped renewing its lease; b adopted attempt 1's pod".into()),
            ..Default::default()
        }));
        let late = executor.late_creates(&adopted, 1, now);
        assert!(late.until <= Instant::now(), "an adopter sent none of its own");
        let left = late.while_name_free.duration_since(Instant::now());
        assert!(left > Duration::from_secs(144), "an adopter must wait for its predecessor's: {left:?}");
        assert_eq!(late.whatever_holds_the_name(), LateCreates::until(late.while_name_free));
        let mut no_start = adopted.clone();
        no_start.status.as_mut().unwrap().start_time = None;
        assert!(settled(&no_start, 1), "no startTime: no bound to wait for");
        let long_ago = Instant::now().checked_sub(CREATE_LANDS_WITHIN).unwrap();
        executor.note_unanswered(&uid, 1, Some(long_ago));
        assert!(settled(&j, 1), "sent a minute ago: it would have landed by now");
        // A record that can no longer matter is dropped as others are made: the map does not grow with attempts.
        executor.note_unanswered(&uid, 2, Some(Instant::now()));
        assert_eq!(executor.unanswered.lock().unwrap().len(), 1);
    }

    /// A Pod the operator stops gets its own grace period, at most ten minutes (a tenant may set years, and the
    /// attempt holds its slots until the Pod stops), at least a second (none would remove it before it stopped).
    #[test]
    fn a_stopped_pod_gets_its_own_grace_within_bounds() {
        let grace = |g: Option<i64>| {
            let mut p = Pod::default();
            p.metadata.uid = Some("u".into());
            p.spec =
                Some(k8s_openapi::api::core::v1::PodSpec { termination_grace_period_seconds: g, ..Default::default() });
            let dp = stop_params(&p);
            assert_eq!(dp.preconditions.and_then(|c| c.uid).as_deref(), Some("u"), "that Pod only");
            dp.grace_period_seconds
        };
        assert_eq!(grace(None), Some(30), "Kubernetes' default");
        assert_eq!(grace(Some(10)), Some(10));
        assert_eq!(grace(Some(315_360_000)), Some(600));
        assert_eq!(grace(Some(0)), Some(1));
    }

    /// The kubelet reports `Failed` past `activeDeadlineSeconds`, on eviction, preemption or a refusal, before it kills
    /// the containers: such a Pod (a container shown running, or not shown at all) may run for its grace period after,
    /// at most ten minutes.
    #[test]
    fn a_pod_failed_before_its_containers_were_killed_may_run_for_its_grace_period() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, PodSpec,
        };
        let container = |running: bool| ContainerStatus {
            name: "main".into(),
            state: Some(if running {
                ContainerState { running: Some(ContainerStateRunning::default()), ..Default::default() }
            } else {
                ContainerState { terminated: Some(ContainerStateTerminated::default()), ..Default::default() }
            }),
            ..Default::default()
        };
        let main_container = k8s_openapi::api::core::v1::Container { name: "main".into(), ..Default::default() };
        let pod = |phase: &str, reason: Option<&str>, init: Option<bool>, main: Option<bool>, grace: Option<i64>| Pod {
            spec: Some(PodSpec {
                termination_grace_period_seconds: grace,
                containers: vec![main_container.clone()],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                reason: reason.map(str::to_string),
                init_container_statuses: init.map(|r| vec![container(r)]),
                container_statuses: main.map(|r| vec![container(r)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let secs = |s: u64| Some(Duration::from_secs(s) + KILL_MARGIN);
        assert_eq!(kill_pending(&pod("Failed", Some("DeadlineExceeded"), None, Some(true), Some(10))), secs(10));
        assert_eq!(kill_pending(&pod("Failed", None, Some(true), None, None)), secs(30), "an init container running");
        assert_eq!(kill_pending(&pod("Failed", Some("Evicted"), None, None, Some(10))), secs(10), "statuses dropped");
        assert_eq!(kill_pending(&pod("Failed", Some("Preempting"), None, None, Some(10))), secs(10), "any reason");
        assert_eq!(kill_pending(&pod("Failed", None, None, Some(true), Some(315_360_000))), secs(600));
        assert_eq!(kill_pending(&pod("Failed", None, None, Some(false), Some(10))), None, "its containers stopped");
        assert_eq!(kill_pending(&pod("Succeeded", None, None, Some(false), None)), None);
        assert_eq!(kill_pending(&pod("Running", None, None, Some(true), None)), None, "running, not failed");
        assert!(may_still_run(&pod("Failed", Some("DeadlineExceeded"), None, Some(true), Some(10))), "a kill pending");
        assert!(!may_still_run(&pod("Failed", None, None, Some(false), Some(10))), "its containers stopped");
        assert!(may_still_run(&pod("Running", None, None, Some(true), None)));
        assert!(!may_still_run(&pod("Succeeded", None, None, Some(false), None)));
    }

    /// A Pod is the job's by its UID label or its controller: either one removed by hand leaves it the job's (a stop
    /// still stops it). Another job's owner, or a label naming another UID, does not make it so.
    #[test]
    fn a_pod_is_the_jobs_by_its_uid_label_or_by_its_controller() {
        let pod = pod_for(&job(), &ctx(1)).unwrap();
        assert!(belongs(&pod, "uid-7"), "made for the job");
        let mut unlabelled = pod.clone();
        unlabelled.labels_mut().remove(JOB_UID_LABEL);
        assert!(belongs(&unlabelled, "uid-7"), "its label removed, its controller still says so");
        let mut disowned = pod.clone();
        disowned.metadata.owner_references = None;
        assert!(belongs(&disowned, "uid-7"), "its owner removed, its label still says so");
        let mut neither = unlabelled.clone();
        neither.metadata.owner_references = None;
        assert!(!belongs(&neither, "uid-7"));
        assert!(!belongs(&pod, "uid-8"), "another job's");
        let mut not_controller = unlabelled;
        not_controller.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert!(!belongs(&not_controller, "uid-7"), "an owner that is not the controller");
    }

    /// A Pod of the job's under the attempt's name is the attempt's for the replica that creates it only if it
    /// carries the id its creates sent, and for an adopter only if it was not created before the attempt began.
    #[test]
    fn a_pod_of_the_jobs_is_the_attempts_only_if_its_creates_can_have_made_it() {
        let at = |s: i64| jiff::Timestamp::from_second(s).unwrap();
        let made = |id: Option<&str>, created: i64| {
            let mut p = pod_for(&job(), &ctx(1)).unwrap();
            if let Some(id) = id {
                p.annotations_mut().insert(CREATE_ID_ANNOTATION.into(), id.into());
            }
            p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(created)));
            p
        };
        let this = Maker::ThisReplica("id-1".into());
        assert_eq!(this.refuses(&made(Some("id-1"), 1000)), None, "made by one of its creates");
        let forged = this.refuses(&made(None, 1000)).expect("no create of the attempt made it");
        assert!(forged.contains("no create of the attempt made it"), "{forged}");
        assert!(this.refuses(&made(Some("id-2"), 1000)).is_some(), "another create's id");
        let adopter = Maker::Began(at(1000));
        assert_eq!(adopter.refuses(&made(None, 1002)), None, "created after the attempt began");
        assert_eq!(adopter.refuses(&made(None, 995)), None, "within what the start's estimate may be off by");
        let early = adopter.refuses(&made(Some("any"), 994)).expect("created before the attempt began");
        assert!(early.contains("before the attempt began"), "{early}");
        assert_eq!(Maker::Unknown.refuses(&made(None, 0)), None, "no start written: any Pod of the job's");
    }

    /// The id a replica's creates send is the same for every create and stop of one attempt, another for another
    /// attempt or another process; an adopted attempt's Pod is judged by when the attempt began.
    #[test]
    fn a_replica_knows_its_own_attempts_pods_by_an_id_nobody_else_can_write() {
        let executor = PodExecutor::new(PodPolicy::default());
        let id = |e: &PodExecutor, job: &BackgroundJob, attempt| match e.maker(job, attempt) {
            Maker::ThisReplica(id) => id,
            _ => panic!("this replica's attempt"),
        };
        let first = id(&executor, &job(), 1);
        assert_eq!(first.len(), 32);
        assert_eq!(id(&executor, &job(), 1), first, "every create and stop of the attempt");
        assert_ne!(id(&executor, &job(), 2), first, "another attempt");
        assert_ne!(id(&PodExecutor::new(PodPolicy::default()), &job(), 1), first, "another process");
        let mut adopted = job();
        adopted.status = serde_json::from_value(serde_json::json!({"phase": "Running", "attempts": 1,
            "startTime": "2026-12-06T10:00:00Z",
            "lastError": "worker a stopped renewing its lease; b adopted attempt 1's pod"}))
        .unwrap();
        let began = jiff::Timestamp::from_second(1_796_551_200).unwrap();
        assert!(matches!(executor.maker(&adopted, 1), Maker::Began(t) if t == began), "adopted: by its start");
    }

    #[test]
    fn only_a_finished_pod_that_is_not_being_deleted_keeps_its_name() {
        let pod = |phase: &str, deleted: bool| {
            let mut p = Pod {
                status: Some(PodStatus { phase: Some(phase.into()), ..Default::default() }),
                ..Default::default()
            };
            if deleted {
                p.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
            }
            p
        };
        assert!(keeps_name(&pod("Succeeded", false)) && keeps_name(&pod("Failed", false)));
        assert!(!keeps_name(&pod("Succeeded", true)), "removed once its grace is over");
        assert!(!keeps_name(&pod("Failed", true)));
        assert!(!keeps_name(&pod("Running", false)), "a running Pod is stopped by deleting it");
        assert!(!keeps_name(&pod("Pending", false)));
    }

    #[test]
    fn an_earlier_holders_creates_are_looked_for_only_while_no_finished_pod_keeps_the_name() {
        let now = Instant::now();
        let late = LateCreates { until: now, while_name_free: now + Duration::from_secs(100) };
        let ours = |kept| Found::Ours { uid: "p".into(), kept };
        assert!(late.over(&ours(true), now), "a finished Pod left in place: no create can land");
        assert!(!late.over(&ours(false), now), "a Pod being deleted frees the name");
        assert!(!late.over(&Found::Absent, now), "gone");
        assert!(!late.over(&Found::Other(AttemptResult::Retryable(String::new())), now), "a namesake's, going away");
        assert!(late.over(&Found::Absent, now + Duration::from_secs(100)), "none can land any more");
        let own = LateCreates { until: now + Duration::from_secs(60), while_name_free: now };
        assert!(!late.whatever_holds_the_name().over(&ours(true), now), "ended here: every create, whatever holds it");
        assert!(!own.over(&ours(true), now), "this replica's own, whatever holds the name");
        assert!(own.over(&ours(true), now + Duration::from_secs(60)));
    }

    /// A read served before a late create lands, and answered after the last such create could land, says nothing
    /// of that create: the look judged it by when its answer came, ended with "absent", and the Pod the late create
    /// made ran on beside the next attempt's.
    #[tokio::test(start_paused = true)]
    async fn a_read_answered_after_the_bound_but_sent_before_it_does_not_end_the_look_for_late_creates() {
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = reads.clone();
        let (client, _) = crate::testing::scripted_client_slow(move |_| {
            match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                // Served before the late create landed (absent), answered 45 s later.
                0 => (404, crate::testing::status(404), Duration::from_secs(45)),
                // The late create has landed since.
                _ => (
                    200,
                    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": "render-7-1", "namespace": "ns", "uid": "pod-uid",
                            "labels": {JOB_UID_LABEL: "uid-7"}},
                        "status": {"phase": "Running"}}),
                    Duration::ZERO,
                ),
            }
        });
        let pods: Api<Pod> = Api::namespaced(client, "ns");
        let late = LateCreates::until(Instant::now() + Duration::from_secs(30));
        let found = landed(&pods, &job(), "uid-7", "render-7-1", late, None, &Maker::Unknown).await;
        assert!(
            matches!(&found, Found::Ours { uid, .. } if uid == "pod-uid"),
            "the late create's Pod must be found and stopped, not the look ended as absent"
        );
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A Pod that succeeded before its attempt timed out, its end not yet shown by a lagging Pod watch, is found
    /// finished when the attempt stops it: `stop` says so (the attempt is then recorded as succeeded, not timed out
    /// and run again), and deletes nothing. A Pod still running is deleted, and is no success; nor is one the
    /// attempt's creates cannot have made (someone made it ahead under the attempt's name).
    #[tokio::test(start_paused = true)]
    async fn stopping_an_attempt_whose_pod_already_succeeded_says_so_and_deletes_nothing() {
        // A Pod that exited 0 once a deletion stopped it (an earlier holder's stop, before it handed the attempt
        // over) did not succeed on its own.
        let deleted = Some("2026-12-06T00:00:00Z");
        let (ours, other) = ("id-1", "id-2");
        for (phase, deletion, id, succeeded) in [
            ("Succeeded", None, ours, true),
            ("Failed", None, ours, false),
            ("Succeeded", deleted, ours, false),
            ("Succeeded", None, other, false),
        ] {
            let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "render-7-1", "namespace": "ns", "uid": "pod-uid", "resourceVersion": "5",
                    "labels": {JOB_UID_LABEL: "uid-7"}, "annotations": {CREATE_ID_ANNOTATION: id},
                    "deletionTimestamp": deletion},
                "status": {"phase": phase}});
            let answer = pod.clone();
            let (client, sent) = crate::testing::scripted_client(move |sent| {
                if sent.query.contains("watch") {
                    (200, serde_json::json!({"type": "ADDED", "object": answer.clone()}))
                } else if sent.query.contains("fieldSelector") {
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "5"}, "items": [answer.clone()]});
                    (200, list)
                } else {
                    (200, answer.clone())
                }
            });
            let watchers = Watchers {
                after: Duration::from_secs(3),
                now: &jiff::Timestamp::now,
                not_stopping: &|_| {},
                not_starting: &|_, _| {},
            };
            let late = LateCreates::until(Instant::now());
            let (made, job) = (Maker::ThisReplica(ours.into()), job());
            let stopped = stop(&client, &job, 1, late, &|| true, &watchers, &made);
            let said = tokio::time::timeout(Duration::from_secs(60), stopped)
                .await
                .expect("stop returns once the finished Pod is seen");
            assert_eq!(said, succeeded, "a {phase} Pod, deletion {deletion:?}, create id {id}");
            assert!(sent.lock().unwrap().iter().all(|s| s.method != "DELETE"), "a finished Pod is left for inspection");
        }
    }

    /// A creator check the apiserver cannot answer now (it restarts) is asked again, not charged to the attempt; a
    /// refusal is final.
    #[tokio::test(start_paused = true)]
    async fn a_creator_check_the_apiserver_cannot_answer_now_is_asked_again_and_a_refusal_fails_the_job() {
        let mut recorded = job();
        recorded.metadata.annotations = Some([(creator::CREATED_BY.to_string(), "alice".to_string())].into());
        let review = |allowed: bool| {
            serde_json::json!({"apiVersion": "authorization.k8s.io/v1",
            "kind": "LocalSubjectAccessReview", "spec": {}, "status": {"allowed": allowed}})
        };
        for (allowed, passes) in [(true, true), (false, false)] {
            let answers = std::sync::Arc::new(std::sync::Mutex::new(vec![
                (200, review(allowed)),
                (503, crate::testing::status(503)),
            ]));
            let (client, sent) = crate::testing::scripted_client(move |_| answers.lock().unwrap().pop().unwrap());
            let patience = Instant::now() + Duration::from_secs(90);
            let checked = check_creator(&client, CreatorCheck::Required, &recorded, "ns", patience).await;
            assert_eq!(checked.is_ok(), passes, "{checked:?}");
            if !passes {
                assert!(matches!(checked, Err(AttemptResult::Permanent(_))), "{checked:?}");
            }
            assert_eq!(sent.lock().unwrap().len(), 2, "asked again after the 503");
        }
    }

    fn job() -> BackgroundJob {
        let spec = serde_json::from_value(serde_json::json!({
            "jobName": "render",
            "args": {"page": 3},
            "template": {"metadata": {"labels": {"app": "renderer"}},
                         "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "main", "image": "busybox",
                                  "env": [{"name": "BGJOBS_ATTEMPT", "value": "stale"}, {"name": "KEEP", "value": "1"}]}]}}
        }))
        .unwrap();
        let mut j = BackgroundJob::new("render-7", spec);
        j.metadata.namespace = Some("ns".into());
        j.metadata.uid = Some("uid-7".into());
        j
    }

    /// A kept Pod of a key's job holds the key unless its job is shown finished at that Pod's attempt or later.
    #[test]
    fn a_keys_pod_is_let_go_only_for_its_own_job_shown_finished_at_its_attempt_or_later() {
        use crate::api::{BackgroundJobStatus, Phase};
        let at = |phase: Phase, attempts: i32| {
            let mut j = job();
            j.status = Some(Box::new(BackgroundJobStatus { phase: Some(phase), attempts, ..Default::default() }));
            j
        };
        assert!(finished_after(&at(Phase::Failed, 2), "uid-7", 2), "its Pods stopped before it was recorded");
        assert!(finished_after(&at(Phase::Succeeded, 3), "uid-7", 2));
        assert!(!finished_after(&at(Phase::Failed, 2), "uid-7", 3), "retried and claimed since: the copy lags");
        assert!(!finished_after(&at(Phase::Running, 2), "uid-7", 2));
        assert!(!finished_after(&at(Phase::Failed, 2), "uid-other", 2), "re-created under its name");
    }

    fn ctx(attempt: i32) -> JobContext {
        JobContext {
            namespace: "ns".into(),
            name: "render-7".into(),
            uid: "uid-7".into(),
            job_name: "render".into(),
            attempt,
            worker: "w".into(),
            leases: Vec::new(),
            cancel: CancellationToken::new(),
            report: Default::default(),
        }
    }

    #[test]
    fn the_pod_of_an_attempt_has_a_deterministic_name_owner_labels_and_the_job_in_its_env() {
        let pod = pod_for(&job(), &ctx(2)).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("render-7-2"));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(
            (labels["app"].as_str(), labels[JOB_UID_LABEL].as_str(), labels[ATTEMPT_LABEL].as_str()),
            ("renderer", "uid-7", "2")
        );
        assert!(!labels.contains_key(crate::keys::POD_KEY_LABEL), "no key, no key label");
        let mut forged = job();
        let template_labels = forged.spec.template.as_mut().unwrap().metadata.get_or_insert_default();
        template_labels.labels.get_or_insert_default().insert(crate::keys::POD_KEY_LABEL.into(), "0123".into());
        let forged_labels = pod_for(&forged, &ctx(2)).unwrap().metadata.labels.unwrap();
        assert!(!forged_labels.contains_key(crate::keys::POD_KEY_LABEL), "a template cannot say a key");
        let mut keyed = job();
        keyed.spec.concurrency_key = Some("Tenant 42/exports".into());
        let keyed_labels = pod_for(&keyed, &ctx(2)).unwrap().metadata.labels.unwrap();
        let key_label = &keyed_labels[crate::keys::POD_KEY_LABEL];
        assert_eq!(key_label, &crate::keys::pod_label("Tenant 42/exports"), "a keyed job's Pods say its key");
        assert!(
            crate::names::is_label_value(key_label)
                && crate::keys::lease_name("Tenant 42/exports").ends_with(key_label.as_str())
        );
        assert_eq!(pod.metadata.owner_references.unwrap()[0].uid, "uid-7");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"), "retries belong to the job");
        let env: BTreeMap<String, String> = spec.containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        assert_eq!(env["BGJOBS_ATTEMPT"], "2");
        assert_eq!(env["BGJOBS_JOB"], "ns/render-7");
        assert_eq!(env["BGJOBS_ARGS"], r#"{"page":3}"#);
        assert_eq!(env["KEEP"], "1");
    }

    /// The kubelet's own kills (past the Pod's deadline, an eviction) use the Pod's grace: capped as the operator's
    /// deletions are, so a failed Pod's hold covers them; a grace within the cap, or none, is left as written.
    #[test]
    fn a_pods_grace_period_is_capped_at_ten_minutes() {
        let grace = |g: Option<i64>| {
            let mut j = job();
            j.spec.template.as_mut().unwrap().spec.as_mut().unwrap().termination_grace_period_seconds = g;
            pod_for(&j, &ctx(1)).unwrap().spec.unwrap().termination_grace_period_seconds
        };
        assert_eq!(grace(Some(315_360_000)), Some(STOP_GRACE_MAX_SECONDS));
        assert_eq!((grace(Some(45)), grace(None)), (Some(45), None));
    }

    #[test]
    fn a_template_without_containers_fails_permanently() {
        let mut j = job();
        j.spec.template.as_mut().unwrap().spec.as_mut().unwrap().containers.clear();
        assert!(pod_for(&j, &ctx(1)).unwrap_err().contains("at least one container"));
    }

    #[test]
    fn a_create_without_an_answer_or_with_a_server_error_may_still_make_its_pod_and_any_other_answer_says_it_did_not() {
        for unknown in [None, Some(500), Some(502), Some(503), Some(504)] {
            assert!(create_may_have_landed(unknown), "{unknown:?}");
        }
        for refused in [400, 403, 408, 409, 422, 429, 501] {
            assert!(!create_may_have_landed(Some(refused)), "{refused}");
        }
    }

    #[test]
    fn a_pod_left_by_a_deleted_namesake_is_retried_and_any_other_foreign_pod_fails_the_job() {
        let mut old = job();
        old.metadata.uid = Some("uid-old".into());
        let left_behind = pod_for(&old, &JobContext { uid: "uid-old".into(), ..ctx(1) }).unwrap();
        assert!(matches!(not_ours(&left_behind, &job()), AttemptResult::Retryable(m) if m.contains("earlier job")));
        let mut foreign = left_behind;
        foreign.metadata.owner_references = None;
        assert!(matches!(not_ours(&foreign, &job()), AttemptResult::Permanent(m) if m.contains("does not belong")));
    }

    #[test]
    fn a_failed_pod_reports_the_exit_code_and_reason() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("render-7-1".into());
        pod.status = Some(PodStatus {
            phase: Some("Failed".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "main".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 3,
                        reason: Some("Error".into()),
                        message: Some("disk full".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            outcome(&pod),
            AttemptResult::Retryable(
                "pod render-7-1 failed: container main exited with code 3 (Error): disk full".into()
            )
        );
    }
}
