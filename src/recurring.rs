//! The recurring-job controller: turns `RecurringBackgroundJob` schedules into BackgroundJobs.
//!
//! Each definition is evaluated by one replica, its rendezvous-hash owner among the live members
//! ([`crate::members`]), so thousands of definitions are shared across replicas. One job per tick holds even while
//! ownership moves, the process crashes, other writers change the definition, and jobs are deleted right after they
//! finish:
//! 1. **claim**: the tick `t` is recorded first, as `lastScheduleTime = t` and `pendingJob = <its job>`, written under
//!    the resourceVersion of the definition as read. Every later decision reads that status, so `t` is never claimed
//!    again; a 409 means someone wrote the definition since it was read: re-read and decide again. A status that
//!    cannot be written (e.g. RBAC) creates no job at all, and is reported in a Warning Event;
//! 2. **create**: the job is named `<definition>-<t in Unix seconds>`, so a second create is AlreadyExists;
//! 3. **no confirmation write**: `pendingJob` stays until the next tick's claim replaces it. A pending job known to
//!    exist (seen by the job watch, or created by this process) needs nothing more; one that is not is created (a
//!    crash came between claim and create), and no later tick is claimed before it is. A create is only made from
//!    the definition as stored, never from a cache that may still show a `pendingJob` replaced since.
//!
//! A tick is claimed up to `--recurring-claim-ahead` before it is due ([`lead`]) and its job created when it is due
//! ([`Plan::Await`]), so that the one write left on the tick's way is the create. The claiming process creates it
//! from its claim as written ([`Armed`]) while that is as good as a read ([`armed_past_tick`]: not with a lead of
//! 4.5 s or less, too short to cover how far replicas' clocks may disagree); anyone else reads the definition first.
//! An edit of the spec before a claimed tick is due takes the claim back ([`Plan::Withdraw`]): the claim was made
//! for the spec as it was, and the edit applies from then on, as it would have had the tick not been claimed yet.
//! Reading it at the tick instead was measured: p99 lateness 3.9–4.4 s for 1,000 definitions against 2.0–3.4 s.
//! What that read would still catch (docs/usage.md, "Recurring jobs"): a replica whose watches lag by seconds, so that
//! it misses both a new owner and an edit that brings the next tick closer (a shorter period, a smaller jitter), while
//! the new owner creates this tick's job, runs it, claims the next tick and deletes the job, all before the lagging
//! replica's claim carried to the tick expires: the lagging replica then creates the job a second time.
//!
//! Nothing of bgjobs deletes a pending job (history trimming skips it, and so does `ttlSecondsAfterFinished`, see
//! [`history::keeps_tick`]), so a pending job that existed is still seen by the next owner; nor a replaced tick's job while a
//! create of it sent before it was replaced may still land ([`history::late_creates_land_by`]). One case is left
//! (docs/usage.md, "Recurring jobs"): a pending job deleted by hand while its definition changes owner is created again.
//!
//! Missed ticks (operator down, suspended) create at most one job, for the latest of them, and only within
//! `startingDeadlineSeconds`, like CronJob.
//!
//! The module's parts: [`decisions`] (what a definition needs next, pure: [`plan`] and the status it writes), this
//! file (a reconcile carrying a plan out against the apiserver), [`scheduler`] (which definitions this replica owns,
//! and when each is looked at), [`children`] (each definition's jobs, from the job watch) and [`history`] (which
//! finished jobs are trimmed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::api::{BackgroundJob, RecurringBackgroundJob, RecurringBackgroundJobStatus, RecurringConcurrencyPolicy};
use crate::error::{Error, Result, api_code};
use crate::unreadable::Standing;
use crate::worker::Worker;

pub mod children;
pub mod decisions;
pub mod history;
pub mod scheduler;

pub use children::{Child, Children};
pub use decisions::*;
pub use scheduler::{Settings, run};

/// Label on every job a recurring definition created: the definition's name.
pub const RECURRING_LABEL: &str = "bgjobs.dev/recurring";
/// Annotation with the tick a job was created for (RFC 3339).
pub const SCHEDULED_TIME_ANNOTATION: &str = "bgjobs.dev/scheduled-time";

/// How soon a definition whose reconcile failed is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long after the request that read (or wrote) it was sent a definition counts as stored, for a tick's create: a
/// create of a tick's job may be sent that long after a later claim replaced it (the claim came after the read was
/// sent), and the job is kept after a later tick's job was made until no such create can land
/// ([`history::TICK_CREATES_KEPT_FOR`]). A read whose answer came later (a stalled connection, an apiserver slower than
/// this), or cancels that `Replace` sent after it (an admission webhook holding them), leave it too old: it is read
/// again before a create ([`Pass::step`]). Reads take milliseconds; this is ten seconds, so that an apiserver slow to
/// answer holds ticks back only when slower than that.
pub(crate) const READ_GOOD_FOR: Duration = Duration::from_secs(10);
/// Most steps one reconcile takes. A tick needs three (claim, create, idle); the rest absorb re-reads
/// after 409s from other writers of the definition.
const MAX_STEPS: usize = 16;

/// What the controller watches.
pub struct RecurringView {
    /// The definitions in scope.
    pub definitions: Store<RecurringBackgroundJob>,
    /// The definitions' jobs, by definition.
    pub children: Arc<Children>,
    /// Member Leases.
    pub members: Store<Lease>,
    /// Notified on changes of definitions and member Leases.
    pub changed: Arc<Notify>,
    /// This replica's own member Lease, while held: the controller acts only while it is current, so a replica
    /// that was paused or cut off never finishes a tick another owner has taken over since.
    pub membership: tokio::sync::watch::Receiver<Option<Arc<crate::lease::Keeper>>>,
    /// The replicas' watch scope ([`crate::members::scope`]): ownership is shared among its members.
    pub scope: String,
}

/// What [`Pass::add_unseen`] did, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Looked {
    /// Asked the API server nothing.
    Nothing,
    /// Asked it, and added nothing to `active`.
    Asked,
    /// Added an unfinished job to `active`.
    Added,
}

/// The longest one read of a job that the job watch has not shown may take ([`Pass::add_unseen`]).
const LOOKUP_TAKES_AT_MOST: Duration = Duration::from_secs(5);

/// What this process carries from one reconcile of a definition to the next.
#[derive(Clone, Default)]
pub struct Carried {
    /// The job this process last created for the definition: proof that it was created, even before the job watch
    /// shows it, and after it was deleted (by hand) while its definition still names it pending.
    pub created_here: Option<String>,
    /// This process's own claim of a tick not yet due, as written: at the tick its job is created from it, with no
    /// read on the tick's way. The scheduler hands it back only while it is as good as a read ([`Armed::usable`]).
    pub armed: Option<Armed>,
    /// Looks in a row that failed (a write the apiserver refused, a replaced job's cancel not sent): the next comes
    /// after a pause that doubles with each ([`Carried::pause_after`]).
    pub failures: u32,
    /// The last look could not cancel a job a later `Replace` tick replaced: the pause before the next stays short.
    /// Set by the look, counted by [`Carried::pause_after`].
    pub cancel_owed: bool,
}

/// The longest pause between looks that ask again for a replaced job's cancel that failed: short, as the job runs
/// beside the tick's meanwhile. Also between looks that met a path not served (a restarting apiserver's).
const CANCEL_AGAIN_AT_MOST: Duration = Duration::from_secs(5);

/// The longest pause between looks whose write the apiserver refused (a ResourceQuota full of BackgroundJobs, RBAC,
/// a policy webhook, a rate limit): asked once a second, a thousand definitions would send a thousand refused
/// creates a second, and an Event each, for as long as the refusal lasts. A tick's job is made at most this late
/// after the refusal ends.
pub const REFUSED_AGAIN_AT_MOST: Duration = Duration::from_secs(30);

/// A definition as this process's claim of a tick ahead of time wrote it.
#[derive(Clone)]
pub struct Armed {
    /// The definition as written.
    pub def: RecurringBackgroundJob,
    /// The member Lease it was written under.
    pub fence: Arc<crate::lease::Keeper>,
    /// The latest it may be used, up to the create: the tick plus [`armed_past_tick`] of its lead. The next tick is
    /// claimed no sooner than a lead after this one ([`claim_at`]), so until then the job of this one cannot have been
    /// made, finished and deleted by anyone, even by a replica whose clock is ahead of this one's by as much as
    /// replicas' clocks may disagree.
    pub until: Instant,
}

impl Carried {
    /// Count how a look went (`failed`: the error it ended with; a replaced job's cancel it could not send is in
    /// [`Carried::cancel_owed`]), and return the pause it asks for before the next look (`None`: a look that went
    /// well, whose own next look stands). The one place failed looks are counted:
    /// - a write the apiserver refused ([`crate::error::lasting_refusal`]): 1, 2, 4… s up to [`REFUSED_AGAIN_AT_MOST`],
    ///   never past the claimed tick's starting deadline (`deadline_left`, [`starting_deadline_left`]);
    /// - otherwise, a cancel owed: 1, 2, 4, then every [`CANCEL_AGAIN_AT_MOST`] (also a refusal's cap while it is owed);
    /// - a path not served (a restarting apiserver's bare 404, but also a CRD version no longer served): 1, 2, 4, then
    ///   every [`CANCEL_AGAIN_AT_MOST`], so a lasting one does not cost a write and an Event a second per definition;
    /// - any other failure (no answer, a conflict): [`RETRY`], not counted;
    /// - a look that went well starts the count over.
    pub fn pause_after(&mut self, failed: Option<&Error>, deadline_left: Option<Duration>) -> Option<Duration> {
        match failed {
            Some(e) if crate::error::lasting_refusal(e) => Some(self.refused(deadline_left)),
            Some(e) if crate::error::refused(e) => Some(self.failed(CANCEL_AGAIN_AT_MOST)),
            Some(_) => Some(RETRY),
            None if self.cancel_owed => Some(self.failed(CANCEL_AGAIN_AT_MOST)),
            None => {
                self.failures = 0;
                None
            }
        }
    }

    /// Count a look that failed, and return the pause before the next: [`RETRY`], doubled with each failure in a row,
    /// up to `at_most`.
    fn failed(&mut self, at_most: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        crate::retry::doubling(RETRY, self.failures, at_most)
    }

    /// Count a look whose write the apiserver refused, and return the pause before the next: [`Carried::failed`] up to
    /// [`REFUSED_AGAIN_AT_MOST`] ([`CANCEL_AGAIN_AT_MOST`] while a replaced job's cancel is owed), and never past the
    /// claimed tick's `startingDeadlineSeconds` (`deadline_left`, [`starting_deadline_left`]): one more try comes a
    /// second before it.
    fn refused(&mut self, deadline_left: Option<Duration>) -> Duration {
        let at_most = if self.cancel_owed { CANCEL_AGAIN_AT_MOST } else { REFUSED_AGAIN_AT_MOST };
        let pause = self.failed(at_most);
        deadline_left.map_or(pause, |left| pause.min(left.saturating_sub(RETRY)).max(RETRY))
    }
}

impl Armed {
    /// Whether a reconcile starting `now` under `fence` may decide from the claim as written, as if just read: the
    /// same member Lease, held without a break since the claim; not after [`Armed::until`]; and the definition's cache
    /// shows nothing newer than this process's own writes (`no_news`).
    pub fn usable(&self, fence: &Arc<crate::lease::Keeper>, no_news: bool, now: Instant) -> bool {
        no_news && now <= self.until && Arc::ptr_eq(&self.fence, fence) && fence.is_current()
    }
}

/// Bring one definition up to date: claim and create, each step decided anew from the definition as last written or
/// read, then trim the history. Returns when to look again. `carried` is what this process keeps of the definition
/// between reconciles; `versions` collects the resourceVersions of the definition this reconcile read or wrote (its
/// own writes are no news). `ahead`: how long before a tick it may be claimed ([`lead`]).
#[allow(clippy::too_many_arguments)]
async fn reconcile(
    worker: &Worker,
    def: &RecurringBackgroundJob,
    kids: &[Child],
    carried: &mut Carried,
    versions: &mut Vec<String>,
    (now, started): (Timestamp, Instant),
    fence: &Arc<crate::lease::Keeper>,
    ahead: Duration,
) -> Result<Option<Duration>> {
    let ns = def.namespace().unwrap_or_default();
    let pass = Pass {
        worker,
        defs: Api::namespaced(worker.client.clone(), &ns),
        jobs: Api::namespaced(worker.client.clone(), &ns),
        kids,
        now,
        started,
        fence,
        ahead,
        looked_up: Default::default(),
    };
    // Perhaps a newer operator's definition: not a write, not a trim, for the replicas that can read it.
    versions.extend(def.resource_version());
    carried.cancel_owed = false;
    if let Some(Standing::Leave(why)) = crate::unreadable::standing(def) {
        debug!(definition = %def.name_any(), %why, "a definition this version cannot read: left alone");
        return Ok(None);
    }
    // The scheduler handed the claim back only if it is as good as a read, and it is only until its `until`.
    let mut current = match carried.armed.take() {
        Some(armed) => {
            versions.extend(armed.def.resource_version());
            Current { def: armed.def, stored: Stored::Armed { until: armed.until } }
        }
        None => Current { def: def.clone(), stored: Stored::Cached },
    };
    // A 404 fails the look like any refusal, and it is tried again: the definition may be gone (its watch will say so,
    // and the scheduler forgets it), or an apiserver that has just started may not serve the custom resources yet.
    // Taken for "gone", the look asked for none again, and a claimed tick waited for the definition's next change.
    let decided = pass.decide(&mut current, carried, versions).await;
    // A definition that cannot be read has no history limits to go by; one whose job was just created is trimmed
    // by the next reconcile, which that job's watch event brings, off the way of this tick's other creates.
    let created = decided.as_ref().is_ok_and(|d| d.created);
    let (mut trim_again, mut cancel_failed) = (None, false);
    if !created && crate::unreadable::standing(&current.def).is_none() {
        cancel_failed = pass.cancel_replaced_still_running(&current).await;
        trim_again = history::trim_history(&pass.jobs, &current.def, kids, now).await;
    }
    // Counted, with how the look ended, by the scheduler ([`Carried::pause_after`]).
    carried.cancel_owed = cancel_failed;
    Ok(decided?.next.into_iter().chain(trim_again).min())
}

/// The definition a decision is made from, and where it came from.
struct Current {
    def: RecurringBackgroundJob,
    stored: Stored,
}

/// Where a [`Current`] definition came from, and so until when it may be taken as stored.
#[derive(Clone, Copy)]
enum Stored {
    /// The watch cache, which may lag behind: never.
    Cached,
    /// Read from (or written to) the API server by a request sent at `sent`: for [`READ_GOOD_FOR`] after that. On
    /// tokio's clock (the machine's monotonic one), which unit tests can move.
    Read { sent: tokio::time::Instant },
    /// A claim this process carried to its tick ([`Armed`]): until [`Armed::until`].
    Armed { until: Instant },
}

impl Current {
    /// Whether the definition may be taken as stored now.
    fn is_fresh(&self) -> bool {
        match self.stored {
            Stored::Cached => false,
            Stored::Read { sent } => tokio::time::Instant::now() <= sent + READ_GOOD_FOR,
            Stored::Armed { until } => Instant::now() <= until,
        }
    }

    /// How much longer the definition may be taken as stored (zero: no longer). A create decided from it is sent
    /// within this, or not at all ([`Pass::create_job`]): a request that takes longer to leave (a new connection to a
    /// slow apiserver) could be sent after a later claim by more than the history allows for.
    fn fresh_for(&self) -> Duration {
        match self.stored {
            Stored::Cached => Duration::ZERO,
            Stored::Read { sent } => (sent + READ_GOOD_FOR).saturating_duration_since(tokio::time::Instant::now()),
            Stored::Armed { until } => until.saturating_duration_since(Instant::now()),
        }
    }

    /// The definition as a request sent at `sent` returned it.
    fn read(def: RecurringBackgroundJob, sent: tokio::time::Instant) -> Current {
        Current { def, stored: Stored::Read { sent } }
    }
}

/// How the steps of one reconcile ended.
struct Decided {
    /// When to look again.
    next: Option<Duration>,
    /// A job was created and the rest left to the next reconcile.
    created: bool,
}

/// What a step of [`Pass::decide`] leaves to do.
enum Step {
    /// Decide again on this newer version of the definition, as the API server returned it.
    Again(Box<Current>),
    /// Decide again on the same version.
    Same,
    /// The tick's job was just created and nothing else is due: look again in this long. The rest (the status's
    /// `active`, the history) is left to the next reconcile.
    Created(Option<Duration>),
    /// Done; look again in this long. The definition's resourceVersion as last written.
    Done(Option<Duration>, Option<String>),
}

/// One reconcile of one definition: what each of its steps needs.
struct Pass<'a> {
    worker: &'a Worker,
    defs: Api<RecurringBackgroundJob>,
    jobs: Api<BackgroundJob>,
    /// The definition's children, as cached.
    kids: &'a [Child],
    /// When the reconcile started, on the wall clock and on the monotonic one: waits are counted from then.
    now: Timestamp,
    started: Instant,
    /// This replica's member Lease: a job is created only while it is current.
    fence: &'a Arc<crate::lease::Keeper>,
    /// How long before a tick it may be claimed.
    ahead: Duration,
    /// The jobs this reconcile has asked the API server for, past the cache ([`Pass::add_unseen`]).
    looked_up: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Pass<'_> {
    /// Take [`Pass::step`]s until one is done. A 409 means someone wrote the definition since it was read: read it
    /// again and decide again. Gives up after [`MAX_STEPS`] with the last conflict (the next reconcile tries again).
    async fn decide(
        &self,
        current: &mut Current,
        carried: &mut Carried,
        versions: &mut Vec<String>,
    ) -> Result<Decided> {
        let mut active: Vec<String> =
            self.kids.iter().filter(|j| !j.phase.is_final()).map(|j| j.name.clone()).collect();
        active.sort();
        let mut conflict = None;
        for _ in 0..MAX_STEPS {
            match self.step(current, &mut active, carried).await {
                Ok(Step::Again(newer)) => {
                    versions.extend(newer.def.resource_version());
                    *current = *newer
                }
                Ok(Step::Same) => {}
                Ok(Step::Created(next)) => return Ok(Decided { next, created: true }),
                Ok(Step::Done(next, version)) => {
                    versions.extend(version);
                    return Ok(Decided { next, created: false });
                }
                Err(e) if e.is_conflict() => {
                    debug!(definition = %current.def.name_any(), "definition changed since read (409): reading again");
                    *current = self.read(&current.def.name_any()).await?;
                    versions.extend(current.def.resource_version());
                    conflict = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        conflict.map_or(Ok(Decided { next: Some(RETRY), created: false }), Err)
    }

    /// The cluster's time now, by the clock reading this reconcile started from.
    fn now_at_step(&self) -> Timestamp {
        self.now + SignedDuration::try_from(self.started.elapsed()).unwrap_or(SignedDuration::ZERO)
    }

    /// The definition as stored (a stand-in if it cannot be read); NotFound if it is gone.
    async fn read(&self, name: &str) -> Result<Current> {
        let sent = tokio::time::Instant::now();
        let def = crate::unreadable::get_opt(&self.defs, name).await?.ok_or_else(|| {
            let gone = kube::core::Status::failure(&format!("recurringbackgroundjobs {name:?} not found"), "NotFound");
            Error::Kube(kube::Error::Api(gone.with_code(404).boxed()))
        })?;
        Ok(Current::read(def, sent))
    }

    /// The definition as a status write of `current` sent now returns it (as `current` was, if nothing changed).
    async fn write(
        &self,
        current: &Current,
        change: impl FnOnce(&mut RecurringBackgroundJobStatus),
    ) -> Result<Current> {
        let sent = tokio::time::Instant::now();
        let written = write_status(&self.defs, &current.def, change).await?;
        if written.resource_version() == current.def.resource_version() {
            return Ok(Current { def: written, stored: current.stored });
        }
        Ok(Current::read(written, sent))
    }

    /// Record that `def` makes no job, and why (`Valid=False`).
    async fn report_invalid(&self, def: &RecurringBackgroundJob, reason: &str, message: &str) -> Result<Step> {
        let written = write_status(&self.defs, def, |s| set_valid(s, false, reason, message, self.now)).await?;
        Ok(Step::Done(None, written.resource_version()))
    }

    /// Carry out one decision of [`plan`] for the definition as read.
    async fn step(&self, current: &Current, active: &mut Vec<String>, carried: &mut Carried) -> Result<Step> {
        // Decided at the time of the step: the reads and writes of the steps before may have taken a while.
        let (def, now) = (&current.def, self.now_at_step());
        let again = |newer: Current| Ok(Step::Again(Box::new(newer)));
        let created_here = &mut carried.created_here;
        let known = |job: &str| known_created(job, self.kids, created_here.as_deref());
        let decided = plan(def, active, known, now, self.ahead);
        // A create decided from a cached copy reads the definition first (below), and is judged on that.
        let judged_now = !matches!(decided, Plan::Create { .. }) || current.is_fresh();
        if judged_now && let Some(creating) = judges_unfinished(def, &decided) {
            let unseen = unseen_maybe_unfinished(def, self.kids, Some(&creating));
            match self.add_unseen(def, unseen, active).await? {
                // The reads may have taken long enough for a later tick to be claimed and this one's job made, run
                // and deleted: a create is decided from the definition as read after them. (A claim is written
                // under the resourceVersion it was decided on: a 409 if anyone wrote since.)
                Looked::Asked | Looked::Added if matches!(decided, Plan::Create { .. }) => {
                    return again(self.read(&def.name_any()).await?);
                }
                Looked::Added => return Ok(Step::Same),
                Looked::Asked | Looked::Nothing => {}
            }
        }
        if skips_for_unfinished(def, &decided, active, now) && self.drop_finished(def, active).await {
            return Ok(Step::Same);
        }
        match decided {
            Plan::Invalid { reason, message } => self.report_invalid(def, reason, &message).await,
            Plan::Unreadable(message) => self.report_invalid(def, "Unreadable", &message).await,
            Plan::Idle(next) => {
                let claimed = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0);
                let next_time = next.and_then(|_| next_due(def, now, claimed)).map(Time);
                let written = write_status(&self.defs, def, |s| {
                    s.next_schedule_time = next_time.clone();
                    set_active(s, active);
                    set_valid(s, true, "Scheduled", "schedule and time zone are valid", now);
                })
                .await?;
                Ok(Step::Done(next, written.resource_version()))
            }
            Plan::Claim { tick, skip, catch_up } => {
                again(self.claim_tick(current, tick, skip, catch_up, active).await?)
            }
            Plan::Await { job, wait } => {
                // Claimed ahead. From the claim as written (or just read), its job can be created at the tick
                // without reading the definition again, until `armed_past_tick` after it; from a cache, later, or
                // with a lead too short to leave room for replicas' clocks, the definition is read then (above).
                let lead = tick_lead(def, self.ahead);
                if current.is_fresh()
                    && let Some(past_tick) = armed_past_tick(lead)
                {
                    let until = Instant::now() + wait + past_tick;
                    let until = match current.stored {
                        Stored::Armed { until: armed } => armed.min(until),
                        Stored::Read { .. } | Stored::Cached => until,
                    };
                    carried.armed = Some(Armed { def: def.clone(), fence: self.fence.clone(), until });
                }
                debug!(definition = %def.name_any(), %job, ?wait, "tick claimed ahead: its job is created when due");
                Ok(Step::Done(Some(wait), def.resource_version()))
            }
            // A cached `pendingJob` may have been replaced since, and its job deleted: creating it again would run
            // its tick twice. Decide from the definition as stored.
            Plan::Create { .. } if !current.is_fresh() => again(self.read(&def.name_any()).await?),
            Plan::Create { job, replace } => {
                cancel_replaced(&self.jobs, &replace).await;
                // Cancels slowed down (a slow admission webhook) may have left the definition as read too old: a later
                // tick may have been claimed and this one's job made, run and deleted since (kept only
                // [`history::TICK_CREATES_KEPT_FOR`] after a later tick's job was made). The create is sent only while
                // the job is pending as stored, read within [`READ_GOOD_FOR`].
                let mut read = None;
                let (def, fresh_for) = if current.is_fresh() {
                    (def, current.fresh_for())
                } else {
                    let stored = read.insert(self.read(&def.name_any()).await?);
                    let known = |j: &str| known_created(j, self.kids, carried.created_here.as_deref());
                    let now = self.now_at_step();
                    let still = |p: Plan| matches!(p, Plan::Create { job: j, .. } if j == job);
                    if !stored.is_fresh() || !still(plan(&stored.def, active, known, now, self.ahead)) {
                        return Ok(Step::Again(Box::new(read.take().expect("just read"))));
                    }
                    (&stored.def, stored.fresh_for())
                };
                let created_here = &mut carried.created_here;
                self.create_job(def, &job, fresh_for).await?;
                // Known to exist from now on: `plan` treats the tick as done. No status write confirms it; the next
                // claim replaces `pendingJob`, and until then nothing of bgjobs deletes a pending job.
                *created_here = Some(job.clone());
                if !active.contains(&job) {
                    active.push(job.clone());
                    active.sort();
                }
                // The tick is done. Its status was written with the claim; what a look now would still write (a
                // job of the tick before that the cache showed only since) waits for the next reconcile, so
                // that the one write on the tick's way stays the create.
                let known = |job: &str| known_created(job, self.kids, carried.created_here.as_deref());
                match plan(def, active, known, now, self.ahead) {
                    Plan::Idle(next) => Ok(Step::Created(next)),
                    // Go on from the definition as just read, if it was.
                    _ => match read {
                        Some(stored) => again(stored),
                        None => Ok(Step::Same),
                    },
                }
            }
            Plan::Withdraw { job, at } => {
                // The job watch may not show yet a job made at its tick (by a replica whose clock runs ahead, or while
                // this one's watch lags): asked, so that a tick that ran is never taken back.
                if crate::unreadable::get_opt(&self.jobs, &job).await?.is_some() {
                    *created_here = Some(job);
                    return Ok(Step::Same);
                }
                // Under the resourceVersion the edit is in: from a cache that lags, a 409 and a read.
                let newer = self.write(current, |s| withdraw(s, &job, at)).await?;
                carried.armed = None;
                info!(definition = %def.name_any(), %job, "claim of a tick not yet due taken back: the spec changed since");
                again(newer)
            }
            Plan::Abandon { job, reason } => {
                let newer = self.write(current, |s| give_up(s, &job, active)).await?;
                if !known_created(&job, self.kids, created_here.as_deref()) {
                    warn!(definition = %def.name_any(), %reason, "tick abandoned");
                    self.worker.metrics.recurring_skipped.get_or_create(&reason_label("Abandoned")).inc();
                    self.worker.event_on(def, EventType::Warning, "TickSkipped", reason);
                }
                *created_here = None;
                again(newer)
            }
        }
    }

    /// Add to `active` the jobs of `unseen` ([`unseen_maybe_unfinished`]) that the API server has as unfinished
    /// jobs of `def`, each asked once a reconcile (a job watch may lag by minutes), each read bounded by
    /// [`LOOKUP_TAKES_AT_MOST`]. A read that fails fails the reconcile under `Forbid` (no job is started on a guess);
    /// under `Replace` it is logged and the tick goes on; the job is cancelled once the job watch shows it
    /// ([`cancel_replaced_still_running`]).
    async fn add_unseen(
        &self,
        def: &RecurringBackgroundJob,
        unseen: Vec<String>,
        active: &mut Vec<String>,
    ) -> Result<Looked> {
        let mut looked = Looked::Nothing;
        for name in unseen {
            let Some(read) = self.look_up_once(&name).await else { continue };
            looked = looked.max(Looked::Asked);
            let job = match read {
                Ok(Some(job)) => job,
                Ok(None) => continue,
                Err(e) if def.spec.concurrency_policy == RecurringConcurrencyPolicy::Replace => {
                    warn!(definition = %def.name_any(), job = %name, error = %e, "could not read a job that may have to be cancelled");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if unfinished_of(&job, def) && !active.contains(&name) {
                debug!(definition = %def.name_any(), job = %name, "an unfinished job the job watch has not shown");
                active.push(name);
                looked = Looked::Added;
            }
        }
        active.sort();
        Ok(looked)
    }

    /// Job `name` read afresh (without its arguments: only its owner and phase count), once a reconcile
    /// ([`Self::looked_up`]) and within [`LOOKUP_TAKES_AT_MOST`]; None if it was asked already.
    async fn look_up_once(&self, name: &str) -> Option<Result<Option<BackgroundJob>>> {
        if !self.looked_up.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string()) {
            return None;
        }
        let read = async { Ok(crate::unreadable::get_opt_without_args(&self.jobs, name).await?) };
        Some(crate::client::bounded(LOOKUP_TAKES_AT_MOST, read).await)
    }

    /// Take out of `active` the jobs the API server has as finished, gone, or not `def`'s ([`skips_for_unfinished`]),
    /// each asked once a reconcile and bounded by [`LOOKUP_TAKES_AT_MOST`]; whether any went. A job that cannot be
    /// read stays, as the cache shows it: the tick is skipped as before, rather than held back until the reads work
    /// and then run late, when the policy would have dropped it.
    async fn drop_finished(&self, def: &RecurringBackgroundJob, active: &mut Vec<String>) -> bool {
        let mut dropped = false;
        for name in active.clone() {
            let Some(read) = self.look_up_once(&name).await else { continue };
            match read {
                Ok(read) if !read.as_ref().is_some_and(|job| unfinished_of(job, def)) => {
                    debug!(definition = %def.name_any(), job = %name, "the job watch showed a job unfinished that is not");
                    active.retain(|a| *a != name);
                    dropped = true;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(definition = %def.name_any(), job = %name, error = %e, "could not read a job the tick is skipped for; skipped as the cache shows it")
                }
            }
        }
        dropped
    }

    /// Ask again for the cancel of the jobs the latest `Replace` tick replaced that still run unasked beside its job
    /// ([`replaced_still_running`]). Rare (the tick's own cancel failed, or the job watch showed a job late), so it
    /// is judged from the definition as stored: an edit to another policy that the cache does not show yet stands.
    /// Each patch carries the resourceVersion the job watch showed, so a job changed since (finished, or put back in
    /// the queue) is judged again at the look its change brings; each is bounded by [`LOOKUP_TAKES_AT_MOST`], so a
    /// hung one holds no tick up. Whether a cancel failed.
    async fn cancel_replaced_still_running(&self, current: &Current) -> bool {
        if replaced_still_running(&current.def, self.kids).is_empty() {
            return false;
        }
        let mut stored = None;
        let def = if current.is_fresh() {
            &current.def
        } else {
            match crate::client::bounded(LOOKUP_TAKES_AT_MOST, self.read(&current.def.name_any())).await {
                Ok(read) => &stored.insert(read).def,
                Err(e) if e.is_not_found() => return false,
                Err(e) => {
                    warn!(definition = %current.def.name_any(), error = %e, "could not read a definition whose replaced job runs on");
                    return true;
                }
            }
        };
        let mut failed = false;
        for old in replaced_still_running(def, self.kids) {
            // As a create: only while this replica's membership is current (a paused replica's look is another's now).
            if !self.fence.is_current() {
                return false;
            }
            let patch =
                serde_json::json!({"metadata": {"resourceVersion": old.resource_version}, "spec": {"cancel": true}});
            let cancel = crate::client::bounded(LOOKUP_TAKES_AT_MOST, async {
                Ok(crate::unreadable::merge_patch(&self.jobs, &old.name, patch).await?)
            });
            match cancel.await {
                Ok(_) => {
                    info!(definition = %def.name_any(), job = %old.name, "cancelled a job a later tick replaced");
                    let note = format!(
                        "cancelled job {}, which a later tick's job replaces (concurrencyPolicy: Replace): asked again, \
                         as it was refused at that tick, made before it, or run again by hand",
                        old.name
                    );
                    self.worker.event_on(def, EventType::Normal, "JobReplaced", note);
                }
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => {
                    warn!(definition = %def.name_any(), job = %old.name, error = %e, "could not cancel a job a later tick replaced");
                    failed = true;
                }
            }
        }
        failed
    }

    /// Record tick `tick` in the status, before anything else happens for it, and return the definition as claimed.
    /// A refusal other than a conflict (RBAC, an admission webhook) is reported on the definition: no job is created
    /// for a tick that could not be recorded.
    async fn claim_tick(
        &self,
        current: &Current,
        tick: Timestamp,
        skip: Option<String>,
        catch_up: bool,
        active: &[String],
    ) -> Result<Current> {
        let (def, now) = (&current.def, self.now_at_step());
        let name = def.name_any();
        let job = skip.is_none().then(|| job_name(&name, tick));
        let next = next_due(def, now, Some(tick));
        // `active` as it will be once the job exists, so that the look after the create has nothing to write.
        let mut active = active.to_vec();
        active.extend(job.clone().filter(|j| !active.contains(j)));
        active.sort();
        let claimed = self
            .write(current, |s| {
                claim(s, tick, job.as_deref(), next);
                // What the claim replaced, the definition's creation for a first one: the floor of a withdrawal.
                s.previous_schedule_time = handled_until(def).map(Time);
                set_active(s, &active);
                set_valid(s, true, "Scheduled", "schedule and time zone are valid", now);
            })
            .await;
        let mut claimed = match claimed {
            Err(e) if !e.is_conflict() && !e.is_not_found() => {
                let note = format!("could not record tick {tick} in the status, so no job is created for it: {e}");
                self.worker.event_on(def, EventType::Warning, "TickNotClaimed", note);
                return Err(e);
            }
            other => other?,
        };
        if catch_up {
            self.worker.metrics.recurring_caught_up.inc();
        }
        if let Some(reason) = skip {
            let why = if reason.contains("startingDeadlineSeconds") { "StartingDeadline" } else { "Forbid" };
            self.worker.metrics.recurring_skipped.get_or_create(&reason_label(why)).inc();
            info!(definition = %name, %reason, "tick skipped");
            self.worker.event_on(def, EventType::Normal, "TickSkipped", reason);
        } else if let Some(job) = job
            && restore_dropped_pending(&mut claimed.def, &job)
        {
            warn!(definition = %name, %job, "the API server dropped status.pendingJob: the RecurringBackgroundJob \
                CRD is older than the operator (apply crds/); a crash between this claim and the create (which \
                waits for the tick when claimed ahead) would lose the tick");
        }
        Ok(claimed)
    }

    /// Create the claimed tick's job, sent within `fresh_for` or not at all; AlreadyExists means an earlier attempt
    /// did. A refusal is reported on the definition; the job stays pending and is tried again.
    async fn create_job(&self, def: &RecurringBackgroundJob, name: &str, fresh_for: Duration) -> Result<()> {
        let tick = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map_or(self.now, |t| t.0);
        // The one write not fenced by the definition's resourceVersion: made only while this replica's membership is
        // current (checked after every await before it), and bounded by what is left of it and of the definition as
        // read (`fresh_for`, [`Current::fresh_for`]): no byte of it leaves later.
        if !self.fence.is_current() {
            return Err(Error::Stale(format!("not creating job {name}: this replica's membership lapsed")));
        }
        if fresh_for.is_zero() {
            return Err(Error::Stale(format!("not creating job {name}: the definition as read is too old")));
        }
        let left = self.fence.time_left().min(fresh_for);
        let created = crate::client::bounded(left, async {
            Ok(self.jobs.create(&PostParams::default(), &child(def, name, tick)).await?)
        })
        .await;
        let created = match created {
            Err(Error::Kube(e)) => Err(e),
            Err(other) => return Err(other),
            Ok(job) => Ok(job),
        };
        match created {
            Ok(_) => {
                // Lateness counts from when the tick was due: the tick plus the definition's jitter offset.
                let late = shifted(def, self.worker.clock.now()).duration_since(tick);
                self.worker.metrics.recurring_lateness.observe(late.as_secs_f64().max(0.0));
                self.worker.metrics.recurring_created.inc();
                info!(definition = %def.name_any(), job = %name, late_ms = late.as_millis() as i64, "tick: job created");
                let note = format!("tick {tick}: created job {name}");
                self.worker.event_on(def, EventType::Normal, "JobCreated", note);
                Ok(())
            }
            // Made earlier (a create whose answer was lost, another replica's), unless a job this definition did not
            // make holds the tick's name (anyone may create a BackgroundJob by that name): then the tick has no job,
            // and says so.
            Err(e) if api_code(&e) == Some(409) => {
                if let Ok(Some(holder)) = crate::unreadable::get_opt(&self.jobs, name).await
                    && !made_by(&holder, def)
                {
                    let reason =
                        format!("tick {tick}: no job, its name {name} is held by a job this definition did not make");
                    warn!(definition = %def.name_any(), job = %name, "{reason}");
                    self.worker.metrics.recurring_skipped.get_or_create(&reason_label("NameTaken")).inc();
                    self.worker.event_on(def, EventType::Warning, "TickSkipped", reason);
                }
                Ok(())
            }
            Err(e) => {
                let note = format!(
                    "tick {tick}: could not create job {name} (tried again until startingDeadlineSeconds, if set): {e}"
                );
                self.worker.event_on(def, EventType::Warning, "JobNotCreated", note);
                Err(e.into())
            }
        }
    }
}

/// Cancel the unfinished jobs a `Replace` tick replaces. One that fails is asked again from the next look on
/// ([`cancel_replaced_still_running`]), the tick's job made meanwhile.
async fn cancel_replaced(jobs: &Api<BackgroundJob>, replace: &[String]) {
    for old in replace {
        if let Err(e) = crate::unreadable::merge_patch(jobs, old, serde_json::json!({"spec": {"cancel": true}})).await {
            warn!(job = %old, error = %e, "could not cancel the job being replaced");
        }
    }
}

/// The BackgroundJob for one tick, owned by its definition.
pub fn child(def: &RecurringBackgroundJob, name: &str, tick: Timestamp) -> BackgroundJob {
    let template = &def.spec.job_template;
    let mut labels = template.metadata.labels.clone();
    labels.insert(RECURRING_LABEL.to_string(), crate::names::label_value(&def.name_any()));
    let mut annotations = template.metadata.annotations.clone();
    annotations.insert(SCHEDULED_TIME_ANNOTATION.to_string(), tick.to_string());
    // Whoever wrote the template does not choose this: it is the definition's own record, for the Pod creator check.
    let record = crate::policy::creator::definition_record(&def.name_any(), def.annotations());
    annotations.insert(crate::policy::creator::DEFINITION_CREATED_BY.to_string(), record);
    BackgroundJob {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: def.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: def.controller_owner_ref(&()).map(|mut o| {
                o.block_owner_deletion = None;
                vec![o]
            }),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// The definition that made `job`, if a definition did (its owner reference).
pub fn definition_of(job: &BackgroundJob) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    job.owner_references().iter().find(|o| o.kind == "RecurringBackgroundJob")
}

/// Whether `job` was made by `def` itself (owned by its UID), not by a definition of the same name before it.
fn made_by(job: &BackgroundJob, def: &RecurringBackgroundJob) -> bool {
    definition_of(job).is_some_and(|o| Some(o.uid.as_str()) == def.metadata.uid.as_deref())
}

/// Whether `job` is one of `def`'s own that may still run: what `Forbid` waits for and `Replace` cancels.
fn unfinished_of(job: &BackgroundJob, def: &RecurringBackgroundJob) -> bool {
    made_by(job, def) && !job.phase().is_final()
}

/// The tick a job was made for (its `bgjobs.dev/scheduled-time`), if it is a tick's job: named for that tick by its
/// definition. A job `bgjobs recurring trigger` made carries the time it was made, but is no tick's.
pub fn tick_of(job: &BackgroundJob) -> Option<Timestamp> {
    let tick: Timestamp = job.annotations().get(SCHEDULED_TIME_ANNOTATION)?.parse().ok()?;
    let definition = &definition_of(job)?.name;
    (job.metadata.name.as_deref() == Some(job_name(definition, tick).as_str())).then_some(tick)
}

fn reason_label(reason: &str) -> crate::metrics::ReasonLabel {
    crate::metrics::ReasonLabel { reason: reason.to_string() }
}

fn set_valid(s: &mut RecurringBackgroundJobStatus, valid: bool, reason: &str, message: &str, now: Timestamp) {
    let status = if valid { "True" } else { "False" };
    crate::status::upsert_condition(&mut s.conditions, s.observed_generation, "Valid", status, reason, message, now);
}

/// Write the definition's status, changed by `change`, under the resourceVersion of `seen`, and return the
/// definition as written (`seen` itself if nothing changed). A 409 is returned, never swallowed: the status as read
/// is out of date, and so is every decision made from it.
async fn write_status(
    api: &Api<RecurringBackgroundJob>,
    seen: &RecurringBackgroundJob,
    change: impl FnOnce(&mut RecurringBackgroundJobStatus),
) -> Result<RecurringBackgroundJob> {
    let mut status = seen.status.clone().unwrap_or_default();
    status.observed_generation = seen.metadata.generation;
    change(&mut status);
    if seen.status.as_ref() == Some(&status) {
        return Ok(seen.clone());
    }
    let mut obj = seen.clone();
    obj.status = Some(status);
    Ok(crate::unreadable::replace_status(api, &obj).await?)
}

/// Create a job from `def`'s template now, outside the schedule (`bgjobs recurring trigger`).
pub async fn trigger(client: &Client, def: &RecurringBackgroundJob) -> Result<BackgroundJob> {
    let ns = def.namespace().unwrap_or_default();
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    let mut job = child(def, &format!("{}-manual", def.name_any()), now);
    job.metadata.name = None;
    job.metadata.generate_name = Some(format!("{}-manual-", def.name_any()));
    Ok(jobs.create(&PostParams::default(), &job).await?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::decisions::tests::{def, finished, t, with_last, with_pending};
    use super::*;
    use crate::api::Phase;

    #[test]
    fn a_failed_look_is_tried_again_after_a_pause_that_doubles_up_to_its_cap() {
        let api =
            |code: u16| Error::Kube(kube::Error::Api(kube::core::Status::failure("", "").with_code(code).boxed()));
        let (quota, unanswered) = (api(403), api(503));
        let not_served = kube::core::Status::failure("404 page not found", "Failed to parse error data");
        let not_served = Error::Kube(kube::Error::Api(not_served.with_code(404).boxed()));
        let secs = |pause: Option<Duration>| pause.map(|p| p.as_secs());
        // A replaced job's cancel that failed, look after look.
        let mut carried = Carried { cancel_owed: true, ..Default::default() };
        let pauses: Vec<_> = (0..5).map(|_| secs(carried.pause_after(None, None))).collect();
        assert_eq!(pauses, [Some(1), Some(2), Some(4), Some(5), Some(5)]);
        carried.cancel_owed = false;
        assert_eq!(carried.pause_after(None, None), None, "a look that went well asks for no pause");
        assert_eq!(carried.failures, 0, "and starts the count over");
        // A path not served, look after look.
        let pauses: Vec<_> = (0..5).map(|_| secs(carried.pause_after(Some(&not_served), None))).collect();
        assert_eq!(pauses, [Some(1), Some(2), Some(4), Some(5), Some(5)], "served again any moment, or not for long");
        assert_eq!(carried.pause_after(None, None), None);
        // A refused write, look after look; no answer is tried a second later, uncounted.
        let pauses: Vec<_> = (0..7).map(|_| secs(carried.pause_after(Some(&quota), None))).collect();
        assert_eq!(pauses, [Some(1), Some(2), Some(4), Some(8), Some(16), Some(30), Some(30)]);
        assert_eq!(secs(carried.pause_after(Some(&unanswered), None)), Some(1));
        let near = |left: u64| Some(Duration::from_secs(left));
        assert_eq!(secs(carried.pause_after(Some(&quota), near(12))), Some(11), "a last try before the deadline");
        assert_eq!(secs(carried.pause_after(Some(&quota), near(0))), Some(1), "past it, the look gives the tick up");
        carried.cancel_owed = true;
        assert_eq!(secs(carried.pause_after(Some(&quota), None)), Some(5), "short while a replaced job runs on");
    }

    #[test]
    fn job_names_are_per_tick_and_valid_even_for_long_definitions() {
        assert_eq!(job_name("report", t(0)), "report-1800000000");
        let long = "x".repeat(250);
        let n = job_name(&long, t(0));
        assert!(n.len() <= 253 && n.ends_with("-1800000000"), "{n}");
    }

    #[test]
    fn a_child_is_owned_labelled_and_annotated() {
        let mut d = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata": {"labels": {"team": "a"}}, "spec": {"jobName": "sleep"}}}),
        );
        d.metadata.uid = Some("def-uid".into());
        let c = child(&d, "report-1", t(60));
        assert_eq!(tick_of(&c), None, "named for no tick (as `bgjobs recurring trigger` names its jobs)");
        assert_eq!(tick_of(&child(&d, &job_name("report", t(60)), t(60))), Some(t(60)));
        assert_eq!(c.spec.job_name, "sleep");
        assert_eq!(c.metadata.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(c.metadata.labels.as_ref().unwrap()[RECURRING_LABEL], "report");
        assert_eq!(c.metadata.owner_references.as_ref().unwrap()[0].uid, "def-uid");
    }

    /// The definition's creator record goes with each job it makes, whatever its template says there.
    #[test]
    fn a_child_carries_its_definitions_creator_record_not_its_templates() {
        use crate::policy::creator::{CREATED_BY, CREATED_BY_GROUPS, DEFINITION_CREATED_BY, copied_definition};
        let forged = r#"{"name":"report","createdBy":"admin","createdByGroups":"[\"system:masters\"]"}"#;
        let mut d = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata": {"annotations": {DEFINITION_CREATED_BY: forged}},
                "spec": {"jobName": "sleep"}}}),
        );
        let record = [(CREATED_BY, "mallory"), (CREATED_BY_GROUPS, r#"["team-b"]"#)];
        d.metadata.annotations = Some(record.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        let (name, creator) = copied_definition(&child(&d, "report-1", t(60)).metadata).unwrap().unwrap();
        let creator = creator.unwrap().unwrap();
        assert_eq!(
            (name.as_str(), creator.username.as_str(), creator.groups),
            ("report", "mallory", vec!["team-b".into()])
        );
        d.metadata.annotations = None;
        let (_, creator) = copied_definition(&child(&d, "report-1", t(60)).metadata).unwrap().unwrap();
        assert_eq!(creator, None, "a definition without a record makes jobs that say so");
    }

    type SentLog = std::sync::Arc<std::sync::Mutex<Vec<crate::testing::Sent>>>;

    /// An apiserver that holds `stored` (a status write naming another resourceVersion gets 409) and, if given, job
    /// `report-1800000000` in `phase` (`Unreadable`: its reads fail), owned by the definition of UID `owner`; it answers every other job read with
    /// 404 and every other write with what was sent; and the requests it was sent.
    fn apiserver(stored: &RecurringBackgroundJob, job: Option<(&str, &str)>) -> (Client, SentLog) {
        apiserver_changing(stored, stored, job)
    }

    /// As [`apiserver`], but the definition reads `later` once the job has been read.
    fn apiserver_changing(
        stored: &RecurringBackgroundJob,
        later: &RecurringBackgroundJob,
        job: Option<(&str, &str)>,
    ) -> (Client, SentLog) {
        let version = stored.metadata.resource_version.clone();
        let stored = serde_json::to_value(stored).unwrap();
        let later = serde_json::to_value(later).unwrap();
        let job_read = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Phase "Unreadable": every read of the job fails (500).
        let failing = job.is_some_and(|(phase, _)| phase == "Unreadable");
        let job = job.map(|(phase, owner)| {
            serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
                "metadata": {"name": "report-1800000000", "namespace": "ns", "uid": "uid-job", "resourceVersion": "7",
                    "ownerReferences": [{"apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob",
                    "name": "report", "uid": owner}]},
                "spec": {"jobName": "noop"}, "status": {"phase": phase}})
        });
        crate::testing::scripted_client(move |sent| {
            let jobs = "/apis/bgjobs.dev/v1alpha1/namespaces/ns/backgroundjobs";
            if sent.path == format!("{jobs}/report-1800000000") {
                job_read.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            match sent.method.as_str() {
                "GET" if sent.path.ends_with("/recurringbackgroundjobs/report") => (
                    200,
                    if job_read.load(std::sync::atomic::Ordering::SeqCst) { later.clone() } else { stored.clone() },
                ),
                "GET" if sent.path == format!("{jobs}/report-1800000000") && failing => {
                    (500, crate::testing::status(500))
                }
                "GET" if sent.path == format!("{jobs}/report-1800000000") && job.is_some() => {
                    (200, job.clone().unwrap())
                }
                "GET" => (404, crate::testing::status(404)),
                "PUT" if sent.body["metadata"]["resourceVersion"].as_str() != version.as_deref() => {
                    (409, crate::testing::status(409))
                }
                _ => {
                    let mut echo = sent.body.clone();
                    echo["metadata"]["resourceVersion"] = serde_json::json!("9");
                    (200, echo)
                }
            }
        })
    }

    /// Reconcile `d` at `now` with what this process carried from before, its cache showing `kids`.
    async fn reconcile_at(client: Client, d: &RecurringBackgroundJob, kids: &[Child], carried: Carried, now: i64) {
        try_reconcile_at(client, d, kids, carried, now).await.unwrap();
    }

    async fn try_reconcile_at(
        client: Client,
        d: &RecurringBackgroundJob,
        kids: &[Child],
        mut carried: Carried,
        now: i64,
    ) -> Result<Option<Duration>> {
        let worker = Worker::new(
            client.clone(),
            "r".into(),
            Default::default(),
            crate::executor::registry::Registry::new(),
            crate::events::EventLevel::Off,
            None,
            Default::default(),
        )
        .unwrap();
        let held = crate::lease::Held { lease: Lease::default(), written_at: Instant::now() };
        let fence = Arc::new(crate::lease::Keeper::new(Api::namespaced(client, "ns"), held, Default::default()));
        let started = (t(now), Instant::now());
        reconcile(&worker, d, kids, &mut carried, &mut Vec::new(), started, &fence, Duration::ZERO).await
    }

    /// `d` as stored: named by UID and resourceVersion.
    fn stored(mut d: RecurringBackgroundJob, version: &str) -> RecurringBackgroundJob {
        d.metadata.uid = Some("uid-def".into());
        d.metadata.resource_version = Some(version.into());
        d
    }

    /// A `Forbid` definition whose tick-0 job this replica created (so not pending for it, and the idle looks since
    /// wrote `active` from its cache: empty).
    fn forbid_after_tick_0() -> (RecurringBackgroundJob, Carried) {
        let forbid = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid"}));
        let mut d = stored(with_pending(forbid, 0, "report-1800000000"), "5");
        d.status.as_mut().unwrap().last_job = Some("report-1800000000".into());
        (d, Carried { created_here: Some("report-1800000000".into()), ..Default::default() })
    }

    /// The status the claim of tick 60 wrote, and whether any job was created, from what `sent` shows.
    fn tick_60_claim(sent: &SentLog) -> (serde_json::Value, bool) {
        let sent = sent.lock().unwrap();
        let claims: Vec<_> =
            sent.iter().filter(|s| s.path.ends_with("/recurringbackgroundjobs/report/status")).collect();
        assert_eq!(claims.len(), 1, "{sent:#?}");
        let status = claims[0].body["status"].clone();
        assert_eq!(status["lastScheduleTime"], serde_json::json!(t(60).to_string()), "{status}");
        (status, sent.iter().any(|s| s.method == "POST"))
    }

    /// `Forbid` with the previous tick's job running but not shown by the job watch yet: the tick is skipped, and no
    /// second job is made beside the running one.
    #[tokio::test]
    async fn forbid_skips_a_tick_whose_predecessor_runs_though_the_job_watch_has_not_shown_it() {
        let (d, carried) = forbid_after_tick_0();
        let (client, sent) = apiserver(&d, Some(("Running", "uid-def")));
        reconcile_at(client, &d, &[], carried, 61).await;
        let (status, created) = tick_60_claim(&sent);
        assert_eq!(status["pendingJob"], serde_json::Value::Null, "tick 60 must be skipped: {status}");
        assert_eq!(status["active"], serde_json::json!(["report-1800000000"]), "{status}");
        assert!(!created, "no job may be created beside the running one");
    }

    /// What the API server says counts only for the definition's own unfinished job: one that finished, one of
    /// another definition under that name, or none, does not hold the tick back.
    #[tokio::test]
    async fn forbid_runs_the_tick_when_the_job_asked_for_is_finished_not_its_own_or_gone() {
        for job in [Some(("Succeeded", "uid-def")), Some(("Running", "uid-other")), None] {
            let (d, carried) = forbid_after_tick_0();
            let (client, sent) = apiserver(&d, job);
            reconcile_at(client, &d, &[], carried, 61).await;
            let (status, created) = tick_60_claim(&sent);
            assert_eq!(status["pendingJob"], serde_json::json!("report-1800000060"), "{job:?}: {status}");
            assert!(created, "{job:?}: the tick's job is created");
        }
    }

    /// A cache that shows the previous job finished for good is enough: nothing is asked past it. One that shows it
    /// unfinished is asked for once before the tick is skipped for it (a skip is final, and the watch may lag).
    #[tokio::test]
    async fn a_cache_that_shows_the_previous_job_finished_is_not_second_guessed_and_one_that_shows_it_running_once() {
        for (phase, skipped, asked) in [(Phase::Running, true, 1), (Phase::Succeeded, false, 0)] {
            let (d, carried) = forbid_after_tick_0();
            let (client, sent) = apiserver(&d, Some(("Running", "uid-def")));
            let kids = [finished("report-1800000000", phase, 1)];
            reconcile_at(client, &d, &kids, carried, 61).await;
            let (status, _) = tick_60_claim(&sent);
            assert_eq!(status["pendingJob"].is_null(), skipped, "{phase:?}: {status}");
            let reads = sent
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.method == "GET" && s.path.contains("/backgroundjobs/"))
                .count();
            assert_eq!(reads, asked, "{phase:?}: jobs read past the cache");
        }
    }

    /// `Forbid` whose job watch still shows the previous tick's job running when the tick comes, though it has
    /// finished, was deleted (to unblock the schedule), or is another definition's job under its name: the tick
    /// runs. It was skipped (lost) on the cache's word.
    #[tokio::test]
    async fn forbid_runs_the_tick_when_the_job_the_cache_shows_running_has_finished_or_gone() {
        for job in [Some(("Succeeded", "uid-def")), None, Some(("Running", "uid-other"))] {
            let (d, carried) = forbid_after_tick_0();
            let (client, sent) = apiserver(&d, job);
            let kids = [finished("report-1800000000", Phase::Running, 1)];
            reconcile_at(client, &d, &kids, carried, 61).await;
            let (status, created) = tick_60_claim(&sent);
            assert_eq!(status["pendingJob"], serde_json::json!("report-1800000060"), "{job:?}: {status}");
            assert!(created, "{job:?}: the tick's job is created");
        }
    }

    /// A job the cache shows running that cannot be read (the apiserver answers 500) is taken as the cache shows it:
    /// the tick is skipped, not held back until the reads work and then run late.
    #[tokio::test]
    async fn a_forbid_tick_whose_running_job_cannot_be_read_is_skipped_as_the_cache_shows_it() {
        let (d, carried) = forbid_after_tick_0();
        let (client, sent) = apiserver(&d, Some(("Unreadable", "uid-def")));
        let kids = [finished("report-1800000000", Phase::Running, 1)];
        reconcile_at(client, &d, &kids, carried, 61).await;
        let (status, created) = tick_60_claim(&sent);
        assert_eq!(status["pendingJob"], serde_json::Value::Null, "tick 60 is skipped: {status}");
        assert!(!created);
    }

    /// `Replace` with the previous tick's job running but not shown by the job watch yet: the claim records it, and
    /// it is cancelled before the tick's job is made.
    #[tokio::test]
    async fn replace_cancels_a_predecessor_the_job_watch_has_not_shown() {
        let replace = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"}));
        let mut d = stored(with_last(replace, 0), "5");
        d.status.as_mut().unwrap().last_job = Some("report-1800000000".into());
        let (client, sent) = apiserver(&d, Some(("Running", "uid-def")));
        reconcile_at(client, &d, &[], Carried::default(), 61).await;
        let (status, _) = tick_60_claim(&sent);
        assert_eq!(status["active"], serde_json::json!(["report-1800000000", "report-1800000060"]), "{status}");
        assert_cancelled_then_created(&sent);
    }

    /// As above, from a cached copy older than the stored definition, whose claim of tick 60 (by the replica that
    /// owned the definition before) recorded the running predecessor: the predecessor is asked for once the
    /// definition is read, not judged from the copy.
    #[tokio::test]
    async fn replace_judges_from_the_definition_as_read_not_from_a_cached_copy() {
        let replace = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"}));
        let mut cached = stored(with_pending(replace, 0, "report-1800000000"), "5");
        cached.status.as_mut().unwrap().last_job = Some("report-1800000000".into());
        let mut claimed = cached.clone();
        claim(claimed.status.as_mut().unwrap(), t(60), Some("report-1800000060"), None);
        claimed.status.as_mut().unwrap().active = vec!["report-1800000000".into(), "report-1800000060".into()];
        let (client, sent) = apiserver(&stored(claimed, "6"), Some(("Running", "uid-def")));
        reconcile_at(client, &cached, &[], Carried::default(), 61).await;
        assert_cancelled_then_created(&sent);
    }

    /// `report-1800000000` was cancelled, then `report-1800000060` created.
    fn assert_cancelled_then_created(sent: &SentLog) {
        let sent = sent.lock().unwrap();
        let cancel = sent.iter().position(|s| s.method == "PATCH").expect("the running predecessor is cancelled");
        assert!(sent[cancel].path.ends_with("/backgroundjobs/report-1800000000"), "{:?}", sent[cancel]);
        assert_eq!(sent[cancel].body, serde_json::json!({"spec": {"cancel": true}}));
        let create = sent.iter().position(|s| s.method == "POST").expect("the tick's job is created");
        assert_eq!(sent[create].body["metadata"]["name"], "report-1800000060");
        assert!(cancel < create, "cancelled first: {sent:#?}");
    }

    /// A job that may be unfinished and cannot be read: `Forbid` starts nothing on a guess (the reconcile fails and is
    /// tried again); `Replace` goes on and creates the tick's job, as when a cancel fails.
    #[tokio::test]
    async fn a_lookup_that_fails_holds_a_forbid_tick_back_and_lets_a_replace_tick_go_on() {
        let (d, carried) = forbid_after_tick_0();
        let (client, sent) = apiserver(&d, Some(("Unreadable", "uid-def")));
        let failed = try_reconcile_at(client, &d, &[], carried, 61).await.expect_err("the read's failure");
        assert!(matches!(&failed, Error::Kube(e) if api_code(e) == Some(500)), "{failed}");
        let sent_forbid = sent.lock().unwrap().clone();
        assert!(sent_forbid.iter().all(|s| s.method == "GET"), "nothing written: {sent_forbid:#?}");
        assert!(sent_forbid.iter().any(|s| s.path.ends_with("/backgroundjobs/report-1800000000")), "{sent_forbid:#?}");

        let replace = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"}));
        let mut claimed = stored(with_pending(replace, 60, "report-1800000060"), "5");
        claimed.status.as_mut().unwrap().active = vec!["report-1800000000".into(), "report-1800000060".into()];
        let (client, sent) = apiserver(&claimed, Some(("Unreadable", "uid-def")));
        reconcile_at(client, &claimed, &[], Carried::default(), 61).await;
        let sent = sent.lock().unwrap();
        let create = sent.iter().find(|s| s.method == "POST").expect("the tick's job is created");
        assert!(create.path.ends_with("/backgroundjobs"), "{create:?}");
        assert_eq!(create.body["metadata"]["name"], "report-1800000060");
    }

    /// A create is decided from the definition as read after the jobs were asked for, however long that took: here
    /// the next tick was claimed meanwhile (by a replica that made this tick's job, which ran and was deleted), and
    /// this tick's job is not made again.
    #[tokio::test]
    async fn a_replace_create_reads_the_definition_again_after_asking_for_jobs() {
        let replace = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"}));
        let mut claimed = stored(with_pending(replace, 60, "report-1800000060"), "5");
        claimed.status.as_mut().unwrap().active = vec!["report-1800000000".into(), "report-1800000060".into()];
        let mut next_claimed = claimed.clone();
        claim(next_claimed.status.as_mut().unwrap(), t(120), Some("report-1800000120"), None);
        let (client, sent) = apiserver_changing(&claimed, &stored(next_claimed, "6"), Some(("Running", "uid-def")));
        reconcile_at(client, &claimed, &[], Carried::default(), 61).await;
        let sent = sent.lock().unwrap();
        assert!(sent.iter().any(|s| s.path.ends_with("/backgroundjobs/report-1800000000")), "asked: {sent:#?}");
        assert!(sent.iter().all(|s| s.method != "POST"), "tick 60's job must not be made again: {sent:#?}");
    }

    /// A read of the definition answered late may show a tick's job pending after a later tick was claimed (by
    /// another replica, which took the definition over and made, ran and trimmed that job meanwhile): a create
    /// decided from it made the job again, and the tick ran twice. A read counts as stored only [`READ_GOOD_FOR`]
    /// after it was sent; an older one is read again.
    #[tokio::test(start_paused = true)]
    async fn a_definition_read_answered_late_is_read_again_before_a_create() {
        let allow = def("* * * * *", serde_json::json!({}));
        let pending = stored(with_pending(allow, 60, "report-1800000060"), "5");
        let mut next_claimed = pending.clone();
        claim(next_claimed.status.as_mut().unwrap(), t(120), Some("report-1800000120"), None);
        let next_claimed = stored(next_claimed, "6");
        let (pending_json, next_json) =
            (serde_json::to_value(&pending).unwrap(), serde_json::to_value(&next_claimed).unwrap());
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (client, sent) = crate::testing::scripted_client_slow(move |sent| match sent.method.as_str() {
            "GET" if sent.path.ends_with("/recurringbackgroundjobs/report") => {
                match reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    // Served before the next claim, answered after it.
                    0 => (200, pending_json.clone(), READ_GOOD_FOR + Duration::from_millis(500)),
                    _ => (200, next_json.clone(), Duration::ZERO),
                }
            }
            "GET" => (404, crate::testing::status(404), Duration::ZERO),
            _ => (200, sent.body.clone(), Duration::ZERO),
        });
        // The cache shows tick 60's job pending and no job: a create, decided from a read.
        reconcile_at(client, &pending, &[], Carried::default(), 61).await;
        let sent = sent.lock().unwrap();
        assert!(sent.iter().all(|s| s.method != "POST"), "tick 60's job must not be made again: {sent:#?}");
        let def_reads = sent.iter().filter(|s| s.path.ends_with("/recurringbackgroundjobs/report")).count();
        assert_eq!(def_reads, 2, "read, then read again: {sent:#?}");
    }

    /// An apiserver slow to answer, but within [`READ_GOOD_FOR`], holds no tick back: every read and write answered
    /// 2.5 s after it was sent, the tick's job is still made (with a 2 s bound, it was read again and again, and never
    /// made).
    #[tokio::test(start_paused = true)]
    async fn an_apiserver_slow_to_answer_within_the_bound_still_gets_the_ticks_job_made() {
        let allow = def("* * * * *", serde_json::json!({}));
        let pending = stored(with_pending(allow, 60, "report-1800000060"), "5");
        let pending_json = serde_json::to_value(&pending).unwrap();
        let slow = Duration::from_millis(2500);
        let (client, sent) = crate::testing::scripted_client_slow(move |sent| match sent.method.as_str() {
            "GET" if sent.path.ends_with("/recurringbackgroundjobs/report") => (200, pending_json.clone(), slow),
            "GET" => (404, crate::testing::status(404), slow),
            _ => (201, sent.body.clone(), slow),
        });
        reconcile_at(client, &pending, &[], Carried::default(), 61).await;
        let sent = sent.lock().unwrap();
        let create = sent.iter().find(|s| s.method == "POST").expect("the tick's job is created");
        assert_eq!(create.body["metadata"]["name"], "report-1800000060", "{create:?}");
    }

    /// A create decided from a fresh read, but slow to leave (a new connection to a slow apiserver), is not sent once
    /// the read is [`READ_GOOD_FOR`] old: sent later, it could land after the history let the tick's job go. Here
    /// the read is answered after half of that, and the create would reach the apiserver 80 % of it later still (in
    /// time by this replica's membership, which alone bounded it).
    #[tokio::test(start_paused = true)]
    async fn a_create_slow_to_leave_is_not_sent_once_the_definition_as_read_is_too_old() {
        let allow = def("* * * * *", serde_json::json!({}));
        let pending = stored(with_pending(allow, 60, "report-1800000060"), "5");
        let pending_json = serde_json::to_value(&pending).unwrap();
        let slow_to_leave = |method: &str, _: &str| match method {
            "POST" => READ_GOOD_FOR * 4 / 5,
            _ => Duration::ZERO,
        };
        let (client, sent) =
            crate::testing::scripted_client_arriving(slow_to_leave, move |sent| match sent.method.as_str() {
                "GET" if sent.path.ends_with("/recurringbackgroundjobs/report") => {
                    (200, pending_json.clone(), READ_GOOD_FOR / 2)
                }
                "GET" => (404, crate::testing::status(404), Duration::ZERO),
                _ => (201, sent.body.clone(), Duration::ZERO),
            });
        let done = try_reconcile_at(client, &pending, &[], Carried::default(), 61).await;
        let sent = sent.lock().unwrap();
        assert!(sent.iter().all(|s| s.method != "POST"), "no create may arrive that late: {sent:#?}");
        assert!(done.is_err(), "the reconcile fails, and is tried again");
    }
}
