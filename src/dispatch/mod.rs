//! The dispatch loop: observe the queue, pick in FIFO order, claim, run, and keep the queue tidy.
//!
//! A pass looks only at the jobs that changed (or whose Leases changed) since the last pass and at those whose
//! timer fired ([`backlog`]), and decides for each one thing:
//! - final: delete it once its retention has passed;
//! - unfinished and nobody's here: the pure [`triage`]: cancel it, give up on it (timeout, attempts used up), wait
//!   for its time, leave it to its live holder, or make it a candidate. A Running job whose Lease this replica has
//!   seen unchanged for a full lease duration is orphaned and becomes a candidate for takeover (a Pod attempt is
//!   adopted; an in-process one that may not run again is settled, under its Lease);
//! - running here: stop it if the user cancelled or deleted it.
//!
//! Candidates wait in queue order and this replica claims as many as it has free slots from the head
//! (see [`ordering::pick`]). Claims, settles and deletes run as tasks; the loop goes on while they do, and a task
//! always reports back, even when it panics, so a slot is never lost.

mod backlog;
mod pace;
mod triage;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Preconditions};
use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::api::{BackgroundJob, Phase};
use crate::attempt::{self, AttemptControl, StopReason};
use crate::claim::{self, ClaimOutcome, ExtraLease, LeaseState, LostAt};
use crate::config::OperatorConfig;
use crate::exclusive;
use crate::keys;
use crate::lease::tenure;
use crate::lease::{Ending, Keeper, Observer, Tenures};
use crate::limits;
use crate::metrics::Health;
use crate::ordering::{self, QueueKey};
use crate::queue::{Changes, QueueView};
use crate::worker::Worker;
use backlog::{Backlog, Candidate, WALK_CHUNK};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use pace::Pace;
use triage::{Decision, Facts, KeyFacts};

/// Longest the loop sleeps without a reason to wake: a safety net against a missed notification.
const IDLE_PASS: Duration = Duration::from_secs(2);
/// How long a claim that found its concurrency key's Lease there, or taken, or just gone ([`LostAt::KeyLease`]) is
/// left alone while the job is unchanged: long enough for the caches to show the Lease (a claim sent again at once
/// would meet it again, pass after pass, while a watch lags), short at a key's handoff.
const KEY_LEASE_HOLD: Duration = Duration::from_millis(250);
/// How long a job this replica just acted on is left alone while the cache still shows the version it acted on.
/// Bounded, because a lost race at the Lease does not always change the job itself.
const SETTLE_HOLD: Duration = Duration::from_secs(1);

/// The first hold of a job whose claim (or retention delete) the apiserver turned down for a reason that lasts (RBAC,
/// a full quota, a policy webhook, a namespace being deleted): doubled at each refusal in a row, up to
/// [`REFUSED_HOLD_MOST`]. Not [`SETTLE_HOLD`]: a refused write changes nothing, so a thousand such jobs at the head
/// were tried again every second on every replica, and the jobs behind them, in every namespace, waited behind the
/// refusals (and refused deletes took the delete pace from every other namespace's).
const REFUSED_HOLD_LEAST: Duration = Duration::from_secs(2);
/// The longest hold of a job whose claims keep being refused (room in a quota may come back sooner).
const REFUSED_HOLD_MOST: Duration = Duration::from_secs(120);
/// How often a job whose claims (or deletes) keep being refused says so again in a Warning.
const REFUSED_EVENT_EVERY: Duration = Duration::from_secs(600);
/// At most this many such Warnings a second per replica, for claims and for deletes each (a namespace's refusals are
/// usually its every job's; the claims', which explain a wait, never wait on the deletes').
const REFUSED_EVENTS_PER_SECOND: f64 = 2.0;

/// How long a job is left alone after its `refusals`-th claim in a row was turned down.
fn refused_hold(refusals: u32) -> Duration {
    crate::retry::doubling(REFUSED_HOLD_LEAST, refusals, REFUSED_HOLD_MOST)
}

/// A write of a job's that the apiserver turned down for a reason that lasts.
struct Refused {
    /// `ClaimRefused` or `DeleteRefused`.
    reason: &'static str,
    /// The apiserver's words.
    why: String,
}

/// Writes of one job turned down in a row, and when it last said so in an Event.
struct Refusals {
    count: u32,
    said_at: Option<Instant>,
}

/// How long a job too large to store any status is left alone before it is tried again (while unchanged).
const TOO_LARGE_HOLD: Duration = Duration::from_secs(300);
/// What its Event says.
const TOO_LARGE_NOTE: &str = "the job is too large for etcd to store any status beside its spec (etcdserver: \
    request is too large): it cannot be claimed or ended, and is tried again in 5 minutes (meanwhile it holds its \
    concurrency key's turn, as any job at the head of its key); delete it and pass large inputs by reference";

/// At most this many settle and delete writes in flight per replica; more wait for a later pass.
const MAX_SIDE_WRITES: usize = 16;
/// How long a settle or delete may take before its write slot is given back (its answer may never come).
const SIDE_WRITE_LIMIT: Duration = Duration::from_secs(30);

/// A task's report back to the loop: a claim (and its attempt), a settle or a delete ended.
struct Done {
    uid: String,
    /// The job's resourceVersion when the task began: the cache may still show it after the task ended, so skip
    /// the job until the cache shows it moved.
    seen_at: Option<String>,
    /// The claim was lost to another replica (or the job moved): someone else may run it now.
    lost_to_another: bool,
    /// A tenure this replica judged expired, found renewed when the task tried to end it (see [`LostAt`]), and its
    /// member Lease as read in it, if this replica never saw it in its member watch.
    alive_tenure: Option<(String, Option<claim::ReadMember>)>,
    /// Leave the job alone until then while the cache shows the version acted on (see [`LostAt::PodToCome`]);
    /// `None`: [`SETTLE_HOLD`].
    hold_until: Option<Instant>,
    /// A cluster slot held by a gone job's Pod ([`LostAt::GoneJobsPod`]): offered to no claim until then.
    blocked_slot: Option<(String, Instant)>,
    /// The write was turned down for a reason that lasts ([`crate::error::refused_by_policy`]).
    refused: Option<Refused>,
}

/// Sends its [`Done`] when dropped: when the task returns, and also when it unwinds from a panic.
struct DoneOnDrop {
    tx: mpsc::UnboundedSender<Done>,
    done: Option<Done>,
}

impl DoneOnDrop {
    /// Not even a bare status fits beside the job's spec, so nothing could be written: say so on the job, and leave
    /// it alone for [`TOO_LARGE_HOLD`] while it is unchanged.
    fn too_large(&mut self, worker: &Worker, job: &BackgroundJob) {
        warn!(job = %job.name_any(), "the job is too large to store any status: left as it is");
        worker.event(job, EventType::Warning, "TooLarge", TOO_LARGE_NOTE.to_string());
        if let Some(d) = self.done.as_mut() {
            d.hold_until = Some(Instant::now() + TOO_LARGE_HOLD);
        }
    }

    /// Carry back that the apiserver turned the write down for a reason that lasts (`reason`: the Event's).
    fn refused(&mut self, reason: &'static str, e: &crate::Error) {
        if let Some(d) = self.done.as_mut() {
            d.refused = Some(Refused { reason, why: e.to_string() });
        }
    }

    /// Carry back what a lost claim or settle learnt: a tenure found renewed behind a lagging member watch.
    fn lost(&mut self, at: LostAt) {
        let Some(d) = self.done.as_mut() else { return };
        match at {
            // Nobody else has it: a create of its Pod may still land, and it is looked at again then.
            LostAt::PodToCome { until, .. } => d.hold_until = Some(until),
            LostAt::TenureRenewed(tenure, read) => {
                d.lost_to_another = true;
                d.alive_tenure = Some((tenure, read));
            }
            LostAt::TenureUnreadable { until } => {
                d.lost_to_another = true;
                d.hold_until = Some(until);
            }
            // Nobody has it: a gone job's Pod holds a slot (left out until then, the job tries another at once) or
            // its key (the job is looked at again then).
            LostAt::GoneJobsPod { lease, slot: true, until, .. } => {
                d.blocked_slot = Some((lease, until));
                d.seen_at = None;
            }
            LostAt::GoneJobsPod { until, .. } => d.hold_until = Some(until),
            // As for a gone job's Pod: a slot nobody may take is left out until then, the job tries another at once.
            LostAt::Foreign { lease, slot: true, until, .. } => {
                d.blocked_slot = Some((lease, until));
                d.seen_at = None;
            }
            LostAt::Foreign { until, .. } => d.hold_until = Some(until),
            // The key's turn is another job's, or its Lease went just now: held a moment, not a whole settle hold.
            LostAt::KeyLease => d.hold_until = Some(Instant::now() + KEY_LEASE_HOLD),
            LostAt::ClaimLease
            | LostAt::JobChanged
            | LostAt::PodRunning
            | LostAt::PodNotStopping(_)
            | LostAt::NoTenure => d.lost_to_another = true,
        }
    }
}

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.tx.send(done);
        }
    }
}

/// What a claim that met a Lease the caches do not show says ([`LostAt::Foreign`]).
fn foreign_lease_note(namespace: &str, lease: &str, slot: bool) -> String {
    let what = if slot { "a cluster slot" } else { "this job's claim or concurrency key" };
    let label = if slot {
        crate::limits::SLOT_LABEL.to_string()
    } else {
        format!("{}={}", crate::lease::MANAGED_BY_LABEL, crate::lease::MANAGED_BY)
    };
    format!(
        "Lease {namespace}/{lease} holds the name of {what} but lacks the label {label} bgjobs watches Leases by (made \
         by hand or by something else, or its labels edited): bgjobs cannot tell who holds it, and tries again every \
         {}s; delete it if nothing uses it",
        claim::FOREIGN_LEASE_LOOK.as_secs()
    )
}

/// What a claim held back by a gone job's Pod says ([`LostAt::GoneJobsPod`]).
fn gone_jobs_pod_note(pod: &str, lease: &str, slot: bool) -> String {
    let what = if slot { "the cluster slot" } else { "the concurrency key" };
    format!(
        "{what} (Lease {lease}) is held by Pod {pod} of another job whose holder is gone (the job deleted while no \
         replica held it, or put back in the queue and claimed since), which may still run: waiting until it has stopped (the garbage collector deletes it; a Pod that does not stop, \
         its node unreachable or the controller-manager down, holds it until it is removed)"
    )
}

/// How often, in the shutdown grace, the jobs of the attempts still running are looked at for a cancel or a
/// deletion.
const SHUTDOWN_LOOK: Duration = Duration::from_millis(500);

/// Retention deletes per second per replica (in bursts of [`DELETE_BURST`]): a day's worth of finished jobs whose
/// retention ends at once (an upgrade that introduces retention, a namespace rule shortened) is deleted at a pace the
/// apiserver and etcd absorb next to the queue's own writes.
const DELETES_PER_SECOND: f64 = 50.0;
/// See [`DELETES_PER_SECOND`].
const DELETE_BURST: f64 = 50.0;

/// Every job is looked at again at least this often, whatever the index says: a safety net against a lost watch
/// event, at the cost of one walk over the cache per period (see [`full_look_period`]); unchanged jobs are looked at
/// a chunk per pass, the head of the queue first (`Backlog::full_look`), so claims are not held up while every job
/// is looked at.
const FULL_LOOK: Duration = Duration::from_secs(60);
/// A full look costs about 13 µs of CPU per cached job, the walk and the sweep together (1.3 s for 100,000 jobs, a
/// quarter of a replica's CPU at that size with a 60 s period); the period grows by this much per job, so that full
/// looks stay near half a percent of a core.
const FULL_LOOK_PER_JOB: Duration = Duration::from_millis(3);
/// The longest period between walks, however many jobs are cached.
const FULL_LOOK_MAX: Duration = Duration::from_secs(600);

/// Between two passes of a full look (see `Backlog::full_look`): the loop takes in watch events and finished attempts
/// in between.
const SWEEP_PAUSE: Duration = Duration::from_millis(1);

/// A dispatch pass that takes this long is logged (one normally takes a few milliseconds).
const SLOW_PASS: Duration = Duration::from_millis(250);
/// A claim whose writes take this long is logged (they normally take milliseconds).
const SLOW_CLAIM: Duration = Duration::from_secs(1);

/// How long until the next walk over `jobs` cached jobs.
fn full_look_period(jobs: usize) -> Duration {
    FULL_LOOK_PER_JOB.saturating_mul(u32::try_from(jobs).unwrap_or(u32::MAX)).clamp(FULL_LOOK, FULL_LOOK_MAX)
}
/// How often a finished recurring job kept past its TTL (see `keeps_tick`) is looked at again: its definition's next
/// claim, and a minute after the next tick's job was made, let it go; a schedule's ticks are seconds to days apart.
const KEPT_TICK_LOOK: Duration = Duration::from_secs(10);

/// The dispatcher of one replica.
pub struct Dispatcher {
    worker: Arc<Worker>,
    config: OperatorConfig,
    view: QueueView,
    /// The jobs in scope, indexed for dispatch.
    backlog: Backlog,
    /// When every job was last looked at.
    last_full_look: Instant,
    /// The period until the next walk over every job ([`full_look_period`] of the cache's size at the last one).
    full_look_every: Duration,
    /// Attempts claimed or running here, by job UID.
    held: HashMap<String, Arc<AttemptControl>>,
    /// Jobs with a settle or delete write in flight here.
    writing: HashSet<String>,
    /// Jobs that needed a write while every write slot was busy: looked at again as slots free up.
    deferred: HashSet<String>,
    /// Finished jobs due for deletion beyond the delete pace: looked at again as the pace allows.
    deferred_deletes: HashSet<String>,
    delete_pace: Pace,
    /// Jobs this replica just acted on: the resourceVersion it acted on, and until when it leaves them alone while
    /// the cache still shows that version.
    settled_at: HashMap<String, (String, Instant)>,
    /// Jobs whose claims or deletes the apiserver keeps turning down (see [`REFUSED_HOLD_LEAST`]).
    refusals: HashMap<String, Refusals>,
    /// The pace of `ClaimRefused` and of `DeleteRefused` Warnings.
    refusal_events: [Pace; 2],
    observer: Observer,
    /// With a cluster-wide cap: slot Leases by name as last seen, and the slot each of our claims uses.
    slot_observer: Observer,
    /// Concurrency-key Leases (`namespace/name`) as last seen.
    key_observer: Observer,
    /// Member Leases as last seen.
    member_observer: Observer,
    /// Claim Leases naming a job the cache does not show (`namespace/name`), as last seen (exclusive leader).
    unseen_observer: Observer,
    /// Claim Leases of this replica's tenure naming a job the cache does not show, as last seen, and when to look
    /// at them next ([`Dispatcher::disown_claims_of_gone_jobs`]).
    gone_observer: Observer,
    next_gone_look: Instant,
    /// How each replica's tenure has aged, as seen here (see [`crate::lease::tenure`]).
    tenures: Tenures,
    /// This replica's tenure: claims are made only while it is current.
    membership: watch::Receiver<Option<Arc<Keeper>>>,
    /// Leases (`namespace/name`) being disowned ([`Dispatcher::disown_if_idle`]).
    disowning: Arc<std::sync::Mutex<HashSet<String>>>,
    slots_in_use: HashMap<String, String>,
    /// Cluster slots a claim found held by a gone job's Pod, offered to no claim until the instant given.
    blocked_slots: HashMap<String, Instant>,
    /// Since when each candidate has been at the head of this replica's view of the queue.
    head_clocks: ordering::HeadClocks,
    /// Who offered the handlers this replica lacks, lately.
    handler_offers: crate::members::HandlerOffers,
    /// The in-process handlers this replica has.
    my_handlers: Arc<std::collections::BTreeSet<String>>,
    /// The [`Backlog::depth_version`] `bgjobs_queue_depth` shows.
    depth_shown: Option<u64>,
    health: Arc<Health>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Exclusive strategy: the cluster-wide Lease this replica holds, if any.
    leader: Option<watch::Receiver<Option<Arc<Keeper>>>>,
    /// Exclusive strategy: unfinished jobs another replica may be running although this replica's job cache does not
    /// show them `Running` (yet): their claim Lease is live in another's hands, or a claim of ours just lost to
    /// one. A new leader whose job watch lags the old leader's claims starts nothing new beside them.
    claimed_elsewhere: HashSet<String>,
    /// Exclusive strategy: whether this leadership's caches have shown a fresh read of the claim Leases yet.
    catch_up: CatchUp,
}

/// A new exclusive leader's wait for its caches to show a fresh read of the claim Leases ([`exclusive::Fresh`]).
#[derive(Default)]
struct CatchUp {
    /// The leadership (the exclusive Lease's keeper) it is for.
    keeper: Option<Arc<Keeper>>,
    /// The caches have shown a read made under this leadership.
    shown: bool,
    /// The reads answered so far (the latest [`MAX_FRESH_READS`]).
    reads: Arc<std::sync::Mutex<Vec<exclusive::Fresh>>>,
    /// When the last read was sent.
    asked: Option<Instant>,
    /// When this leadership began waiting, and whether a long wait was said.
    since: Option<Instant>,
    told: bool,
    /// The Pods of gone jobs last said to hold starts back.
    told_pods: Option<Vec<String>>,
}

/// How long a new exclusive leader waits for its caches before it says so (a warning, once).
const CATCH_UP_TELL_AFTER: Duration = Duration::from_secs(60);

/// The tenure vouching for a claim Lease taken over because it expired (none for one absent or left over).
fn expired_tenure(lease: Option<&Lease>, state: LeaseState) -> Option<tenure::Vouch> {
    lease.filter(|_| state == LeaseState::Expired).and_then(tenure::vouch)
}

/// How long ending `ends` may wait before anything is taken (`claim::end_tenures`): a lease duration if one of them
/// may be found ended by a read or a revocation.
fn ending_waits(ends: &[(String, Ending)], timing: &crate::lease::LeaseTiming) -> Duration {
    let may_wait = ends.iter().any(|(_, e)| matches!(e, Ending::Unknown { .. } | Ending::Revoke(_)));
    if may_wait { timing.duration } else { Duration::ZERO }
}

/// How many of a new exclusive leader's fresh reads it keeps comparing with its caches (one every
/// [`exclusive::FRESH_READ_EVERY`]: a minute of them).
const MAX_FRESH_READS: usize = 30;

/// How long an ended tenure is remembered. A Lease that names one this replica forgot (or never saw) is not lost
/// for that: its tenure is read before the Lease is taken (`claim::end_tenures`), only slower.
const TENURE_MEMORY: Duration = Duration::from_secs(600);

impl Dispatcher {
    /// A dispatcher over `view`, claiming under the tenure `membership` shows. With `leader`, it runs jobs only while
    /// it holds the Lease that receiver shows.
    pub fn new(
        worker: Arc<Worker>,
        config: OperatorConfig,
        view: QueueView,
        membership: watch::Receiver<Option<Arc<Keeper>>>,
        leader: Option<watch::Receiver<Option<Arc<Keeper>>>>,
        health: Arc<Health>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let tenures = Tenures::new(&config.lease_namespace);
        let my_handlers = Arc::new(worker.registry.names().map(str::to_string).collect());
        let mut backlog = Backlog::default();
        // The caches are synced: start from a full look, then follow the changes.
        Changes::take(&view.changes);
        backlog.resync(view.jobs.state());
        Dispatcher {
            worker,
            config,
            view,
            backlog,
            last_full_look: Instant::now(),
            full_look_every: FULL_LOOK,
            held: HashMap::new(),
            writing: HashSet::new(),
            deferred: HashSet::new(),
            deferred_deletes: HashSet::new(),
            delete_pace: Pace::new(DELETES_PER_SECOND, DELETE_BURST, Instant::now()),
            settled_at: HashMap::new(),
            refusals: HashMap::new(),
            refusal_events: [(); 2].map(|_| Pace::new(REFUSED_EVENTS_PER_SECOND, 20.0, Instant::now())),
            observer: Observer::default(),
            slot_observer: Observer::default(),
            key_observer: Observer::default(),
            member_observer: Observer::default(),
            handler_offers: crate::members::HandlerOffers::new(Instant::now()),
            my_handlers,
            unseen_observer: Observer::default(),
            gone_observer: Observer::default(),
            next_gone_look: Instant::now(),
            tenures,
            membership,
            disowning: Default::default(),
            slots_in_use: HashMap::new(),
            blocked_slots: HashMap::new(),
            head_clocks: ordering::HeadClocks::default(),
            depth_shown: None,
            health,
            done_tx,
            done_rx,
            claimed_elsewhere: HashSet::new(),
            catch_up: CatchUp::default(),
            leader,
        }
    }

    /// Run until `shutdown` resolves, then hand running attempts back (see the module docs of `operator`).
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut wait = Duration::ZERO;
        loop {
            let mut leader_changed = false;
            tokio::select! {
                _ = self.view.changed.notified() => {}
                Some(done) = self.done_rx.recv() => self.finish(done),
                _ = tokio::time::sleep(wait) => {}
                Ok(()) = async { match self.leader.as_mut() { Some(l) => l.changed().await, None => std::future::pending().await } } => leader_changed = true,
                Ok(()) = self.membership.changed() => {}
                _ = &mut shutdown => break,
            }
            while let Ok(done) = self.done_rx.try_recv() {
                self.finish(done);
            }
            if leader_changed && !self.is_leader() {
                warn!("lost the exclusive lease: stopping every running attempt");
                for control in self.held.values() {
                    control.leadership_ended();
                }
            }
            let started = Instant::now();
            wait = self.pass().min(IDLE_PASS);
            if started.elapsed() >= SLOW_PASS {
                // No claim goes out during a pass: a long one holds up the queue on this replica.
                info!(took_ms = started.elapsed().as_millis() as u64, "slow dispatch pass");
            }
        }
        self.shut_down().await;
    }

    fn finish(&mut self, mut done: Done) {
        self.held.remove(&done.uid);
        match done.refused.take() {
            Some(refused) => done.hold_until = Some(Instant::now() + self.write_refused(&done.uid, refused)),
            None => {
                self.refusals.remove(&done.uid);
            }
        }
        self.writing.remove(&done.uid);
        self.slots_in_use.remove(&done.uid);
        if let Some((slot, until)) = done.blocked_slot {
            self.blocked_slots.insert(slot, until);
        }
        // Only for a job still known: a deleted one has had its entries cleared (`gone`) and never comes back.
        if done.lost_to_another && self.leader.is_some() && self.backlog.job(&done.uid).is_some() {
            self.claimed_elsewhere.insert(done.uid.clone());
        }
        // A job deleted meanwhile is forgotten, not held: it will never come back to clear its entry.
        if let Some(rv) = done.seen_at.filter(|_| self.backlog.job(&done.uid).is_some()) {
            let until = done.hold_until.unwrap_or_else(|| Instant::now() + SETTLE_HOLD);
            self.settled_at.insert(done.uid.clone(), (rv, until));
        }
        if let Some((tenure, read)) = &done.alive_tenure {
            // The member watch lags (or does not show it: another lease namespace): until it catches up, count this
            // tenure as renewed just now, or every pass would try (and fail) to end it again, and hand its Leases'
            // jobs the blame for the lag. As read, it is revoked if still so when it is next judged expired.
            self.tenures.renewed(tenure, Instant::now());
            if let Some(read) = read {
                self.tenures.read_in(tenure, read.0.clone());
            }
        }
        self.backlog.mark(&done.uid);
        // A write slot is free again: let waiting writes have it.
        let free = MAX_SIDE_WRITES.saturating_sub(self.writing.len());
        let next: Vec<String> = self.deferred.iter().take(free).cloned().collect();
        for uid in next {
            self.deferred.remove(&uid);
            self.backlog.mark(&uid);
        }
    }

    /// This replica's tenure, while current.
    fn tenure(&self) -> Option<Arc<Keeper>> {
        self.membership.borrow().clone().filter(|k| k.is_current())
    }

    fn tenure_id(&self) -> Option<String> {
        self.membership.borrow().as_ref().and_then(|k| tenure::tenure_id(&k.lease()))
    }

    /// How long to treat `lease` as unchanged, given how long this replica has seen it unchanged (`own`): the
    /// younger of that and its tenure's age ([`Tenures::vouched_unchanged`]). Except for a Lease of this replica's
    /// own tenure for a job no attempt here holds: that attempt has ended, nothing acts under the Lease any more,
    /// so its own clock alone counts.
    fn vouched(&mut self, lease: Option<&Lease>, own: Duration, inst: Instant) -> Duration {
        if lease.is_some_and(|l| self.idle_of_mine(l)) {
            return own;
        }
        self.tenures.vouched_unchanged(lease, own, inst)
    }

    fn idle_of_mine(&self, lease: &Lease) -> bool {
        let mine = self.tenure_id();
        tenure::vouched_by(lease).is_some_and(|t| Some(t) == mine.as_deref())
            && !crate::lease::annotation(lease, crate::lease::JOB_UID_ANNOTATION)
                .is_some_and(|uid| self.held.contains_key(uid))
    }

    /// How to end the tenures vouching for expired Leases a claim takes over (this replica's own tenure is never
    /// revoked: a Lease of it that looks expired is one no attempt here holds).
    /// `None` if one of them is no longer expired (renewed since it was judged): then nothing is taken.
    /// Each tenure is judged with where the Lease it vouches for says its member Lease is: one tenure named by two
    /// Leases with two namespaces is read in both.
    fn ends(&mut self, tenures: impl IntoIterator<Item = tenure::Vouch>) -> Option<Vec<(String, Ending)>> {
        let mine = self.tenure_id();
        let mut vouches: Vec<tenure::Vouch> = tenures.into_iter().filter(|(t, _)| Some(t) != mine.as_ref()).collect();
        vouches.sort();
        vouches.dedup();
        let (duration, now) = (self.worker.timing.duration, Instant::now());
        let ending = |(t, namespace): tenure::Vouch, tenures: &mut Tenures| {
            Some((t.clone(), tenures.ending(&t, namespace.as_deref(), duration, now)?))
        };
        let mut ends: Vec<(String, Ending)> =
            vouches.into_iter().map(|v| ending(v, &mut self.tenures)).collect::<Option<_>>()?;
        // A tenure seen in the member watch is ended the same way whatever namespace a Lease names: once (a second
        // revocation under the same version would fail, and read as the tenure renewed).
        ends.dedup_by(|b, a| {
            a.0 == b.0 && !matches!(a.1, Ending::Unknown { .. }) && !matches!(b.1, Ending::Unknown { .. })
        });
        Some(ends)
    }

    fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.borrow().as_ref().is_some_and(|k| k.is_current()))
    }

    /// The exclusive Lease new attempts are claimed under (None without the exclusive strategy).
    fn leadership(&self) -> Option<Arc<Keeper>> {
        self.leader.as_ref().and_then(|l| l.borrow().clone())
    }

    async fn shut_down(mut self) {
        let grace = self.config.shutdown_grace.0;
        info!(running = self.held.len(), ?grace, "shutting down: no new claims; letting running attempts finish");
        let deadline = tokio::time::Instant::now() + grace;
        let mut look = tokio::time::interval(SHUTDOWN_LOOK);
        while !self.held.is_empty() {
            tokio::select! {
                Some(done) = self.done_rx.recv() => self.finish(done),
                _ = look.tick() => self.stop_what_was_asked(),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !self.held.is_empty() {
            info!(running = self.held.len(), "grace period over: handing running attempts back to the queue");
            for control in self.held.values() {
                control.stop(StopReason::Shutdown);
            }
            let deadline = tokio::time::Instant::now() + self.worker.timing.renew_deadline;
            while !self.held.is_empty() {
                tokio::select! {
                    Some(done) = self.done_rx.recv() => self.finish(done),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    }

    /// While running attempts finish in the shutdown grace: a cancel or a deletion still stops them (as a pass
    /// would), so that a cancelled job is recorded `Cancelled`, not interrupted by the shutdown and charged, and a
    /// `Replace` tick's job does not run on beside the next.
    fn stop_what_was_asked(&mut self) {
        self.take_changes(Instant::now());
        for (uid, control) in &self.held {
            if let Some(reason) = self.backlog.job(uid).and_then(|job| crate::attempt::stop_asked(job)) {
                control.stop(reason);
            }
        }
    }

    /// One pass: take in what changed, look at the jobs that changed or are due, claim from the head of the queue.
    /// Returns how long until something becomes due.
    fn pass(&mut self) -> Duration {
        let now = self.worker.clock.now();
        let inst = Instant::now();
        self.health.beat();
        self.take_changes(inst);
        let mut due = IDLE_PASS;
        if !self.deferred_deletes.is_empty() {
            let allowed = self.delete_pace.available(inst);
            let next: Vec<String> = self.deferred_deletes.iter().take(allowed).cloned().collect();
            for uid in next {
                self.deferred_deletes.remove(&uid);
                self.backlog.mark(&uid);
            }
            due = due.min(self.delete_pace.wait().max(Duration::from_millis(20)));
        }
        let me = self.worker.identity.clone();
        let timing = self.worker.timing;
        self.tenures.update(&self.view.members.state(), inst);
        let scope = crate::members::scope(self.config.namespace.as_deref());
        let every_scope =
            crate::members::live_in_every_scope(&self.view.members, &mut self.member_observer, inst, &timing);
        let live = crate::members::of_scope(&every_scope, &scope);
        let members = crate::members::identities(&live, &me, |_| true);
        let me_lags = self.membership.borrow().as_deref().is_some_and(|k| crate::members::says_it_lags(&k.lease()));
        self.worker.metrics.watch_lagging.set(i64::from(me_lags));
        let claimers = crate::members::claimers(&live, &me, me_lags, Some(self.my_handlers.clone()));
        let mine = crate::members::member_lease_name(&me, &scope);
        self.handler_offers.saw(&every_scope, &mine, inst, self.config.unknown_handler_grace.0);
        let slot_leases: Vec<Arc<Lease>> = self.view.slots.as_ref().map(|s| s.state()).unwrap_or_default();
        let adoption_slots = limits::held_for_adoption(&slot_leases, |uid| self.backlog.job(uid).map(|j| j.as_ref()));
        for slot in &slot_leases {
            self.disown_if_idle(slot);
        }
        self.disown_claims_of_gone_jobs(inst);
        let looks = self.backlog.take_dirty(inst);
        for uid in looks.changed {
            self.look_at(&uid, now, inst, &members, &adoption_slots);
        }
        for uid in looks.swept {
            if !self.look_would_repeat(&uid, now, &adoption_slots) {
                self.look_at(&uid, now, inst, &members, &adoption_slots);
            }
        }
        let held_for_adopters: Vec<String> = adoption_slots.values().map(|l| l.name_any()).collect();
        let adoptions: Vec<String> = adoption_slots.into_keys().collect();
        if let Some(wait) = self.claim_some(&claimers, &held_for_adopters, &adoptions) {
            due = due.min(wait);
        }
        if let Some(at) = self.backlog.next_due() {
            due = due.min(at.saturating_duration_since(inst));
        }
        if self.backlog.sweeping() {
            due = due.min(SWEEP_PAUSE);
        }
        if self.depth_shown != Some(self.backlog.depth_version()) {
            self.worker.metrics.set_queue_depth(self.backlog.depth(), self.config.queue_depth_series);
            self.depth_shown = Some(self.backlog.depth_version());
        }
        self.worker.metrics.running.set(self.held.len() as i64);
        due
    }

    /// Bring the index up to date with the caches: the jobs that changed, the jobs whose Leases changed; all of them
    /// after a re-list, and every [`full_look_period`].
    fn take_changes(&mut self, inst: Instant) {
        let changes = Changes::take(&self.view.changes);
        let due = inst.saturating_duration_since(self.last_full_look) >= self.full_look_every;
        let jobs = &self.view.jobs;
        if self.backlog.full_look(changes.relisted || due, || jobs.state()) {
            self.last_full_look = inst;
            self.full_look_every = full_look_period(self.backlog.indexed());
        }
        for (at, uid) in changes.jobs {
            match self.view.jobs.get(&at) {
                Some(job) if job.uid().as_deref() == Some(uid.as_str()) => self.backlog.upsert(job),
                current => {
                    if let Some(job) = self.backlog.remove(&uid) {
                        self.gone(&job);
                    }
                    if let Some(job) = current {
                        self.backlog.upsert(job);
                    }
                }
            }
        }
        for uid in changes.named_by_leases {
            self.backlog.mark(&uid);
        }
        for (ns, name) in changes.key_leases {
            self.backlog.mark_key_lease(&ns, &name);
        }
        // A full look walks a chunk per pass, after the changes (the walk leaves the jobs they touched alone).
        if let Some(removed) = self.backlog.walk(WALK_CHUNK) {
            for job in removed {
                self.gone(&job);
            }
            let backlog = &self.backlog;
            self.settled_at.retain(|uid, _| backlog.job(uid).is_some());
            self.tenures.prune(TENURE_MEMORY, inst);
            let backlog = &self.backlog;
            self.key_observer.retain(|k| k.split_once('/').is_some_and(|(ns, name)| backlog.has_key_lease(ns, name)));
        }
    }

    /// Count one more refused claim or delete of job `uid` (saying why on the job now and then): how long to leave
    /// it alone.
    fn write_refused(&mut self, uid: &str, Refused { reason, why }: Refused) -> Duration {
        let claim = reason == "ClaimRefused";
        if claim {
            self.worker.metrics.claims_refused.inc();
        }
        // A job deleted meanwhile is forgotten, as in `finish`: it never comes back to clear its entry.
        let Some(job) = self.backlog.job(uid) else { return SETTLE_HOLD };
        let refusals = self.refusals.entry(uid.to_string()).or_insert(Refusals { count: 0, said_at: None });
        refusals.count = refusals.count.saturating_add(1);
        let hold = refused_hold(refusals.count);
        let say = refusals.said_at.is_none_or(|at| at.elapsed() >= REFUSED_EVENT_EVERY);
        if say && self.refusal_events[usize::from(!claim)].take(Instant::now()) {
            refusals.said_at = Some(Instant::now());
            let ns = job.namespace().unwrap_or_default();
            let (what, so, check, quota) = if claim {
                (
                    "claim",
                    "it waits",
                    "Leases or status writes",
                    ", a ResourceQuota on count/leases.coordination.k8s.io",
                )
            } else {
                ("delete (its retention passed)", "it is kept", "deletes of BackgroundJobs", "")
            };
            let (count, hold_s, most_s) = (refusals.count, hold.as_secs(), REFUSED_HOLD_MOST.as_secs());
            let note = format!(
                "the apiserver turned down this replica's {what} of the job ({count} in a row), so {so}: {why}; tried \
                 again in {hold_s}s (then less often, up to every {most_s}s). Check what may refuse bgjobs' {check} in \
                 namespace {ns}: the operator's RBAC{quota}, an admission policy, the namespace being deleted"
            );
            self.worker.event(job, EventType::Warning, reason, note);
        }
        hold
    }

    /// A job left the cache (deleted): forget it, and stop its attempt if it runs here. An exclusive leader reads
    /// afresh when a job that ran elsewhere goes (before it adopted it, say at a hand-over, even while its adoption's
    /// claim is on its way): its claim Lease went with it, and its Pod may run on through its grace
    /// ([`exclusive::Fresh`]).
    fn gone(&mut self, job: &BackgroundJob) {
        let uid = job.uid().unwrap_or_default();
        let uid = uid.as_str();
        let ran_elsewhere = (job.phase() == Phase::Running
            && job.status.as_ref().and_then(|s| s.worker.as_deref()) != Some(self.worker.identity.as_str()))
            || self.claimed_elsewhere.contains(uid);
        if ran_elsewhere && self.catch_up.shown && self.leadership().is_some() {
            info!(job = %job.name_any(), "exclusive leader: a job that ran elsewhere was deleted; reading afresh for its Pod");
            let reads = self.catch_up.reads.clone();
            reads.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.catch_up = CatchUp { keeper: self.catch_up.keeper.take(), reads, ..Default::default() };
        }
        self.observer.forget(uid);
        self.settled_at.remove(uid);
        self.refusals.remove(uid);
        self.deferred.remove(uid);
        self.deferred_deletes.remove(uid);
        self.claimed_elsewhere.remove(uid);
        if let Some(control) = self.held.get(uid) {
            control.stop(StopReason::Deleted);
        }
    }

    /// Decide what to do with one job now, and do it (or arm its timer, or queue it as a candidate).
    fn look_at(
        &mut self,
        uid: &str,
        now: Timestamp,
        inst: Instant,
        members: &[String],
        adoption_slots: &HashMap<String, Arc<Lease>>,
    ) {
        let Some(job) = self.backlog.job(uid).cloned() else { return };
        let since = self.backlog.take_runnable(uid).map(|c| c.since).or_else(|| self.backlog.take_since(uid));
        self.backlog.disarm(uid);
        if let Some(control) = self.held.get(uid) {
            control.seen(&job);
            if let Some(reason) = crate::attempt::stop_asked(&job) {
                control.stop(reason);
            }
            return;
        }
        if self.writing.contains(uid) {
            return;
        }
        let rv = job.resource_version().unwrap_or_default();
        match self.settled_at.get(uid) {
            Some((at, until)) if *at == rv && Instant::now() < *until => {
                self.backlog.arm(uid, *until);
                return;
            }
            Some(_) => {
                self.settled_at.remove(uid);
            }
            None => {}
        }
        // Judged afresh below (a lost claim keeps its mark while the job is held back above).
        self.claimed_elsewhere.remove(uid);
        let phase = job.phase();
        if phase.is_final() {
            self.observer.forget(uid);
            let at = self.expire_finished(&job, now, inst, members);
            self.recheck(uid, inst, at.map(|at| at.saturating_duration_since(inst)));
            return;
        }
        let timing = self.worker.timing;
        let ns = job.namespace().unwrap_or_default();
        let lease_name = job
            .status
            .as_ref()
            .and_then(|s| s.lease.clone())
            .filter(|_| phase == Phase::Running)
            .unwrap_or_else(|| claim::lease_name(&job));
        let lease = self.view.leases.get(&ObjectRef::new(&lease_name).within(&ns));
        // No Lease while Waiting is judged without a clock (it is simply free): keep no entry for it.
        let lease_unchanged = if phase == Phase::Waiting && lease.is_none() {
            self.observer.forget(uid);
            Duration::ZERO
        } else {
            let version = claim::observed_version(&job, lease.as_deref());
            let own = self.observer.observe(uid, Some(&version), inst);
            self.vouched(lease.as_deref(), own, inst)
        };
        let key = job.spec.concurrency_key.as_deref().map(|key| {
            let name = keys::lease_name(key);
            let seen = self.view.leases.get(&ObjectRef::new(&name).within(&ns));
            let own = self.key_observer.observe(
                &format!("{ns}/{name}"),
                seen.as_ref().and_then(|l| l.resource_version()).as_deref(),
                inst,
            );
            let unchanged = self.vouched(seen.as_deref(), own, inst);
            (key, name, seen, unchanged)
        });
        if let Some(l) = key.as_ref().and_then(|(_, _, seen, _)| seen.clone()) {
            self.disown_if_idle(&l);
        }
        let owner = key.as_ref().and_then(|(_, _, seen, _)| {
            let owner_uid = crate::lease::annotation(seen.as_ref()?, crate::lease::JOB_UID_ANNOTATION)?;
            self.backlog.job(owner_uid).cloned()
        });
        let adoption_slot = adoption_slots.get(uid).map(|slot| {
            let own = self.slot_observer.observe(
                &format!("slot/{}", slot.name_any()),
                slot.resource_version().as_deref(),
                inst,
            );
            (slot, self.vouched(Some(slot), own, inst))
        });
        let facts = Facts {
            job: &job,
            lease: lease.as_ref(),
            lease_unchanged,
            key: key.as_ref().map(|(key, name, seen, unchanged)| KeyFacts {
                key,
                verdict: self.backlog.turn(uid),
                lease_namespace: &ns,
                lease_name: name,
                lease: seen.as_ref(),
                owner: owner.as_deref(),
                unchanged: *unchanged,
            }),
            adoption_slot,
            serves_queue: self.config.serves_queue(&job.spec.queue),
            // Not under the exclusive strategy: the leader is the only one that runs jobs, so nobody else would.
            missing_handler: crate::executor::handler_needed(&job)
                .filter(|h| self.leader.is_none() && !self.worker.registry.handles(h))
                .map(|h| triage::MissingHandler {
                    grace: self.config.unknown_handler_grace.0,
                    offered_ago: self.handler_offers.offered_ago(
                        job.metadata.namespace.as_deref().unwrap_or_default(),
                        &job.spec.queue,
                        h,
                        inst,
                    ),
                }),
            now,
        };
        let decision = triage::triage(&facts, &timing);
        // An idle Lease of this replica's own tenure is no one's claim: it is disowned, not waited for.
        let idle_own = lease.as_deref().is_some_and(|l| self.idle_of_mine(l));
        if self.leader.is_some() && !idle_own && triage::claimed_elsewhere(&facts, &timing) {
            self.claimed_elsewhere.insert(uid.to_string());
        }
        match decision {
            Decision::Leave { recheck } => self.recheck(uid, inst, recheck),
            Decision::Settle { phase, reason, state, defers_to } => {
                self.spawn_settle(&job, lease, state, (phase, reason), defers_to)
            }
            Decision::Claim { state, extras, adopted_slot, recheck } => {
                self.recheck(uid, inst, recheck);
                if let Some(l) = &lease {
                    self.disown_if_idle(l);
                }
                let since = since.unwrap_or(inst);
                let next_look = backlog::next_look(now, recheck);
                let candidate = Candidate { job, lease, state, extras, adopted_slot, since, next_look };
                self.backlog.set_runnable(uid, candidate);
            }
        }
    }

    /// Whether a job a full look's sweep reached, unchanged, would be judged as its last look judged it, so that
    /// looking at it again can be skipped: a finished job with no retention to keep (its look does nothing), or a
    /// candidate [`backlog::repeats_last_look`] says so of. Never for a job this replica's own records name (held,
    /// being written, just settled, deferred, claimed elsewhere, an adoption): those are looked at as before. At
    /// 100,000 waiting jobs this spares each full look 100,000 looks; what the full look is there for (a change the
    /// index missed) is still found: the walk compares every job's version, and this checks the Lease cache.
    fn look_would_repeat(&self, uid: &str, now: Timestamp, adoption_slots: &HashMap<String, Arc<Lease>>) -> bool {
        let own = self.held.contains_key(uid)
            || self.writing.contains(uid)
            || self.settled_at.contains_key(uid)
            || self.deferred.contains(uid)
            || self.deferred_deletes.contains(uid)
            || self.claimed_elsewhere.contains(uid)
            || adoption_slots.contains_key(uid);
        let Some(job) = self.backlog.job(uid).filter(|_| !own) else { return false };
        if job.phase().is_final() {
            return crate::retention::ttl_for(job, &self.config.retention).is_none();
        }
        let Some(candidate) = self.backlog.runnable_candidate(uid) else { return false };
        let lease = ObjectRef::new(&claim::lease_name(job)).within(&job.namespace().unwrap_or_default());
        let lease_now = self.view.leases.get(&lease).is_some();
        backlog::repeats_last_look(candidate, lease_now, now, self.full_look_every)
    }

    /// Arm a job's timer, unless the next full look comes first (a waiting job's deadline is usually hours away:
    /// a timer for each would cost memory per waiting job for nothing).
    fn recheck(&mut self, uid: &str, inst: Instant, after: Option<Duration>) {
        if let Some(d) = after.filter(|d| *d <= self.full_look_every) {
            self.backlog.arm(uid, inst + d);
        }
    }

    /// Claim what this replica should claim now: adoptions that bring their cluster slot first, then picks from the
    /// head of the queue, shared with the live `claimers` (members that run jobs) that have room for them. Returns
    /// when the picks may change: a waiting head job becomes overdue, or another replica's job in the window was left
    /// to it long enough ([`ordering::OWNER_FIRST_FOR`]).
    fn claim_some(
        &mut self,
        claimers: &[crate::members::Claimer],
        held_for_adopters: &[String],
        adoptions: &[String],
    ) -> Option<Duration> {
        if !self.config.job_execution_enabled || !self.is_leader() || self.tenure().is_none() {
            return None;
        }
        let mut free = (self.config.max_concurrent_jobs_per_instance as usize).saturating_sub(self.held.len());
        for uid in adoptions {
            if free == 0 {
                break;
            }
            let Some(c) = self.backlog.runnable_candidate(uid).filter(|c| c.adopted_slot.is_some()).cloned() else {
                continue;
            };
            self.backlog.take_runnable(uid);
            let slot = c.adopted_slot.clone();
            self.spawn_claim(c, slot);
            free -= 1;
        }
        let me = self.worker.identity.clone();
        // Exclusive: a new leader starts nothing new while jobs run anywhere but in this process's own attempts
        // (another replica's, or a Pod this identity handed over before it led again); it may adopt those Pods.
        // Running as far as the job cache shows, or claimed elsewhere as its Leases and lost claims show: the old
        // leader's claims may reach this replica's job watch later than its Lease watch, or than a claim's refusal.
        let backlog = &self.backlog;
        self.claimed_elsewhere.retain(|uid| backlog.job(uid).is_some_and(|j| !j.phase().is_final()));
        let starts = if self.leader.is_none() {
            exclusive::Starts::Any
        } else if !self.caught_up_as_leader() {
            exclusive::Starts::Adoptions
        } else {
            // An orphan (its holder stopped renewing) is a candidate again; anything else runs under a live claim.
            let (mut orphans, mut live) = (false, !self.claimed_elsewhere.is_empty());
            for j in self.backlog.running() {
                let uid = j.uid().unwrap_or_default();
                let mine = j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some(me.as_str())
                    && self.held.contains_key(&uid);
                match (mine, self.backlog.runnable_candidate(&uid)) {
                    (true, _) => {}
                    (false, Some(_)) => orphans = true,
                    (false, None) => live = true,
                }
            }
            live |= self.claimed_for_unseen_job(Instant::now());
            exclusive::starts(live, orphans)
        };
        let mut only_takeovers = starts != exclusive::Starts::Any;
        let mut slots = Vec::new();
        let mut cluster_free = None;
        // Pod attempts running under the cap with no slot naming them, to adopt before anything new starts.
        let mut slotless_first = None;
        if let (Some(cap), Some(store)) = (self.config.cluster_max_concurrency, &self.view.slots) {
            let seen: HashMap<String, Arc<Lease>> = store.state().into_iter().map(|l| (l.name_any(), l)).collect();
            let inst = Instant::now();
            self.blocked_slots.retain(|_, until| *until > inst);
            let reserved: Vec<String> =
                self.slots_in_use.values().chain(held_for_adopters).chain(self.blocked_slots.keys()).cloned().collect();
            let timing = self.worker.timing;
            let mut observer = std::mem::take(&mut self.slot_observer);
            let vouched = |l: Option<&Lease>, own| self.vouched(l, own, inst);
            slots = limits::free_slots(cap, &seen, &reserved, &mut observer, vouched, inst, &timing, &me);
            self.slot_observer = observer;
            // Each of this deployment's in a place of the cap ([`limits::takes_a_place_here`]): a takeover that may
            // happen now goes first, with a slot of its own; the others keep theirs. (Not this replica's own
            // claims: their slots are reserved already.)
            let served_here = |queue: &str| self.config.serves_queue(queue) || claimers.iter().any(|c| c.serves(queue));
            let ours = |j: &&Arc<BackgroundJob>| {
                let claimed_in = self.claim_vouched_in(j);
                !self.held.contains_key(j.uid().as_deref().unwrap_or_default())
                    && limits::takes_a_place_here(
                        claimed_in.as_deref(),
                        &self.config.lease_namespace,
                        served_here(&j.spec.queue),
                    )
            };
            let slotless = limits::slotless(self.backlog.running().filter(ours).map(|j| &**j), &seen);
            let (adoptable, running_on): (HashSet<String>, HashSet<String>) =
                slotless.into_iter().partition(|uid| self.backlog.runnable_candidate(uid).is_some());
            let room = slots.len().saturating_sub(running_on.len());
            slots.truncate(room);
            if !adoptable.is_empty() {
                only_takeovers = true;
                slotless_first = Some(adoptable);
            }
            cluster_free = Some(room);
            free = free.min(room);
        }
        // How many replicas race for the head (nobody races the exclusive leader, or for scarce cluster slots).
        let leases = self.view.leases.state();
        let mut holders: HashSet<&str> = leases.iter().filter_map(|l| crate::lease::holder(l)).collect();
        holders.insert(&me);
        let racing = ordering::racing(false, claimers.len(), holders.len());
        // With a cluster cap, the free slots are scarce when the replicas racing for them could want more than there
        // are: then whoever wins a slot must use it for the head.
        let slots_scarce = cluster_free.is_some_and(|n| n < free.max(1).saturating_mul(racing));
        let workers = ordering::racing(self.leader.is_some() || slots_scarce, claimers.len(), holders.len());

        let now = Instant::now();
        // Who may own each job: a replica holding as many attempts as it can owns none (its `Running` jobs and claim
        // Leases, as the caches show them; this replica has a slot free). And no more of the head than the replicas
        // can start between them: each job of the window has someone with room for it.
        let running_jobs: Vec<Arc<BackgroundJob>> = self.backlog.running().cloned().collect();
        let workers_of = running_jobs
            .iter()
            .filter_map(|j| Some((j.status.as_ref()?.worker.as_deref()?, j.metadata.uid.as_deref()?)));
        let claims = leases.iter().filter(|l| !l.labels().contains_key(crate::keys::KEY_LABEL)).filter_map(|l| {
            Some((crate::lease::holder(l)?, crate::lease::annotation(l, crate::lease::JOB_UID_ANNOTATION)?))
        });
        let running = crate::members::attempts_by_replica(workers_of, claims);
        let by_running = |identity: &str| running.get(identity).copied().unwrap_or(0);
        let room = crate::members::room(claimers, by_running, &me, &self.config.queues, free).max(free.max(1));
        let window = free.max(1).saturating_mul(workers.max(1)).min(room);
        let workers = window.div_ceil(free.max(1));
        let mut owners_by_queue: HashMap<(String, Option<String>), ordering::Owners> = HashMap::new();
        let mut owners = |job: &BackgroundJob| {
            let (queue, handler) = (job.spec.queue.as_str(), crate::executor::handler_needed(job));
            owners_by_queue
                .entry((queue.to_string(), handler.map(str::to_string)))
                .or_insert_with(|| crate::members::owners_of(claimers, by_running, queue, handler))
                .clone()
        };
        let mut waiting = |key: QueueKey, c: &Candidate| ordering::Waiting {
            key,
            uid: c.job.uid().unwrap_or_default(),
            owner_first: c.job.spec.concurrency_key.is_none(),
            owners: owners(&c.job),
        };
        let head: Vec<ordering::Waiting> = if only_takeovers {
            // Only orphaned running jobs: found through the running set, not by walking every candidate.
            let mut takeovers: Vec<ordering::Waiting> = self
                .backlog
                .running()
                .filter_map(|j| self.backlog.runnable_candidate(&j.uid()?))
                .filter(|c| starts == exclusive::Starts::Orphans || claim::adopts(&c.job))
                .filter(|c| slotless_first.as_ref().is_none_or(|s| c.job.uid().is_some_and(|u| s.contains(&u))))
                .map(|c| waiting(QueueKey::of(&c.job), c))
                .collect();
            takeovers.sort_by(|a, b| a.key.cmp(&b.key));
            takeovers.truncate(window);
            takeovers
        } else {
            self.backlog.runnable().take(window).map(|(k, c)| waiting(k.clone(), c)).collect()
        };
        let (runnable, look_again_in) = self.head_clocks.mark(&head, free, now);
        if free == 0 || runnable.is_empty() {
            return look_again_in;
        }
        let epoch = jiff::Timestamp::now().as_second() as u64;
        let picked: HashSet<QueueKey> =
            ordering::pick(&runnable, free, workers, &me, epoch).into_iter().cloned().collect();
        let mut slots = slots.into_iter();
        let lease_namespace = self.config.lease_namespace.clone();
        for ordering::Waiting { key, uid, .. } in head.iter().filter(|w| picked.contains(&w.key)) {
            let Some(c) = self.backlog.take_runnable(uid) else { continue };
            debug_assert_eq!(&QueueKey::of(&c.job), key);
            let slot = slots.next().map(|s| {
                let named =
                    s.seen.as_deref().and_then(|l| crate::lease::annotation(l, crate::lease::JOB_UID_ANNOTATION));
                ExtraLease {
                    namespace: lease_namespace.clone(),
                    job_may_run: named
                        .is_some_and(|uid| claim::job_may_run(self.backlog.job(uid).map(|j| &**j), s.seen.as_deref())),
                    name: s.name,
                    seen: s.seen,
                    label: limits::SLOT_LABEL,
                    expired_tenure: s.expired_tenure,
                }
            });
            self.spawn_claim(c, slot);
        }
        look_again_in
    }

    /// The lease namespace of the deployment whose claim `job`'s claim Lease is, as cached ([`tenure::claimed_in`]:
    /// disowned ones, handed over, say it too). None if it does not say (an older replica's) or is not cached.
    fn claim_vouched_in(&self, job: &BackgroundJob) -> Option<String> {
        let name = job.status.as_ref().and_then(|s| s.lease.clone()).unwrap_or_else(|| claim::lease_name(job));
        let lease = self.view.leases.get(&ObjectRef::new(&name).within(&job.namespace().unwrap_or_default()))?;
        tenure::claimed_in(&lease).map(str::to_string)
    }

    /// Exclusive: whether this leadership's caches have shown a fresh read of the claim Leases and their jobs
    /// ([`exclusive::Fresh`]); until they have, it reads again every [`exclusive::FRESH_READ_EVERY`].
    fn caught_up_as_leader(&mut self) -> bool {
        let Some(keeper) = self.leadership() else { return false };
        if !self.catch_up.keeper.as_ref().is_some_and(|k| Arc::ptr_eq(k, &keeper)) {
            self.catch_up = CatchUp { keeper: Some(keeper), ..Default::default() };
        }
        if self.catch_up.shown {
            return true;
        }
        let since = *self.catch_up.since.get_or_insert_with(Instant::now);
        if !self.catch_up.told && since.elapsed() >= CATCH_UP_TELL_AFTER {
            self.catch_up.told = true;
            warn!(
                waited_s = since.elapsed().as_secs(),
                "exclusive leader: no fresh read of the claim Leases shown by the caches yet (the reads fail, or the \
                 caches lag); nothing new starts"
            );
        }
        let reads = self.catch_up.reads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let job_version = |uid: &str| self.backlog.job(uid).and_then(|j| j.resource_version());
        let unseen = |r: &exclusive::Fresh| -> Vec<String> {
            r.pods_of_unseen_jobs(job_version).into_iter().map(str::to_string).collect()
        };
        if let Some(pods) = reads.last().map(unseen).filter(|p| !p.is_empty())
            && self.catch_up.told_pods.as_ref() != Some(&pods)
        {
            self.catch_up.told_pods = Some(pods.clone());
            warn!(
                ?pods,
                "exclusive leader: Pods of deleted jobs may still run (their garbage collection waits for them \
                to stop); nothing new starts until they have"
            );
        }
        if !reads.is_empty() {
            let leases: HashMap<String, String> = self
                .view
                .leases
                .state()
                .iter()
                .map(|l| (format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any()), l.resource_version()))
                .filter_map(|(key, version)| Some((key, version?)))
                .collect();
            let backlog = &self.backlog;
            let job_version = |uid: &str| backlog.job(uid).and_then(|j| j.resource_version());
            if let Some(fresh) = reads.iter().find(|r| r.shown_by(|key| leases.get(key).cloned(), job_version)) {
                info!(claims = fresh.leases.len(), "exclusive leader: the caches show the claims the apiserver holds");
                self.catch_up.shown = true;
                return true;
            }
        }
        if self.catch_up.asked.is_none_or(|at| at.elapsed() >= exclusive::FRESH_READ_EVERY) {
            self.catch_up.asked = Some(Instant::now());
            let (client, namespace) = (self.worker.client.clone(), self.config.namespace.clone());
            let (slot, changed) = (self.catch_up.reads.clone(), self.view.changed.clone());
            tokio::spawn(async move {
                let leases = crate::queue::scoped::<Lease>(&client, namespace.as_deref());
                let pods = crate::queue::scoped(&client, namespace.as_deref());
                let read = exclusive::Fresh::read(&leases, &pods, |ns| Api::namespaced(client.clone(), ns));
                match tokio::time::timeout(exclusive::FRESH_READ_EVERY * 5, read).await {
                    Ok(Ok(fresh)) => {
                        let mut reads = slot.lock().unwrap_or_else(|e| e.into_inner());
                        reads.push(fresh);
                        let over = reads.len().saturating_sub(MAX_FRESH_READS);
                        reads.drain(..over);
                    }
                    Ok(Err(e)) => {
                        warn!(error = %e, "exclusive leader: cannot read the claim Leases; nothing new starts")
                    }
                    Err(_) => warn!("exclusive leader: reading the claim Leases timed out; nothing new starts"),
                }
                changed.notify_one();
            });
        }
        false
    }

    /// Whether a live claim Lease names a job this replica's cache does not show at all: its job watch lags its
    /// Lease watch, which reads etcd (a job claimed by the old leader moments after it was created). The exclusive
    /// leader counts that job as running elsewhere, as it counts one cached as `Waiting` under a live claim.
    fn claimed_for_unseen_job(&mut self, inst: Instant) -> bool {
        let mut live = false;
        let mut looked = HashSet::new();
        for lease in self.view.leases.state() {
            let unseen = crate::lease::annotation(&lease, crate::lease::JOB_UID_ANNOTATION)
                .is_some_and(|uid| self.backlog.job(uid).is_none() && !self.held.contains_key(uid));
            if !unseen || !lease.labels().contains_key(claim::JOB_LABEL) || crate::lease::holder(&lease).is_none() {
                continue;
            }
            let key = format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any());
            let own = self.unseen_observer.observe(&key, lease.resource_version().as_deref(), inst);
            // Live for as long as its holder's tenure is: a running attempt's claim is never rewritten, and a job
            // watch may lag for minutes (a silent watch is noticed after `WATCH_SILENCE`, 130 s). A Lease left behind for a
            // job that is gone is disowned by its own replica (`disown_claims_of_gone_jobs`), then expires.
            let unchanged = self.vouched(Some(&lease), own, inst);
            live |= !self.worker.timing.expired(unchanged);
            looked.insert(key);
        }
        self.unseen_observer.retain(|k| looked.contains(k));
        live
    }

    fn spawn_claim(&mut self, c: Candidate, slot: Option<ExtraLease>) {
        let uid = c.job.uid().unwrap_or_default();
        let Some(tenure) = self.tenure() else {
            // The tenure lapsed since this pass began (its renewal is late): the candidate was taken out of the
            // queue already, so look at the job again once there is a tenure, not at the next full look.
            self.backlog.mark(&uid);
            return;
        };
        let expired = expired_tenure(c.lease.as_deref(), c.state)
            .into_iter()
            .chain(slot.iter().chain(&c.extras).filter_map(|e| e.expired_tenure.clone()));
        let Some(ends) = self.ends(expired) else {
            // A tenure it was judged on has been renewed since: look at the job again.
            self.backlog.mark(&uid);
            return;
        };
        // Waiting out a tenure found ended by a read or a revocation (a lease duration) comes before anything is
        // acquired (see `claim::end_tenures`).
        // And a claim write of unknown outcome is read back, and handed back if it landed, before the claim ends.
        let timing = &self.worker.timing;
        let limit = timing.duration + ending_waits(&ends, timing) + claim::hand_back_takes_at_most(timing);
        if let Some(s) = &slot {
            self.slots_in_use.insert(uid.clone(), s.name.clone());
        }
        let control = Arc::new(AttemptControl::under(self.leadership()));
        self.held.insert(uid.clone(), control.clone());
        let since = c.since;
        let worker = self.worker.clone();
        let done = DoneOnDrop {
            tx: self.done_tx.clone(),
            done: Some(Done {
                uid,
                seen_at: c.job.resource_version(),
                alive_tenure: None,
                lost_to_another: false,
                hold_until: None,
                blocked_slot: None,
                refused: None,
            }),
        };
        let Candidate { job, lease, state, extras, .. } = c;
        // The slot first: it is the scarcer resource, and losing it costs no other write.
        let extras: Vec<ExtraLease> = slot.into_iter().chain(extras).collect();
        let cached = self.view.jobs.clone();
        tokio::spawn(async move {
            let mut done = done;
            let claimant = claim::Claimant {
                identity: &worker.identity,
                timing: &worker.timing,
                now: worker.clock.now(),
                tenure: &tenure,
                ends: &ends,
                cached: &cached,
            };
            // However its calls hang, a claim gives its slot back within a lease duration of acquiring it.
            let claiming = claim::claim(&worker.client, &job, lease.as_deref(), state, claimant, &extras);
            let sent = Instant::now();
            let outcome = crate::client::bounded(limit, claiming).await;
            if sent.elapsed() >= SLOW_CLAIM {
                // Its writes took long: the apiserver, not this replica, held the job back (the FIFO bound's
                // enemy; a claim's writes normally take milliseconds).
                info!(job = %job.name_any(), took_ms = sent.elapsed().as_millis() as u64, "slow claim");
            }
            match outcome {
                Ok(ClaimOutcome::Claimed(claimed)) => {
                    worker.metrics.claimed.inc();
                    worker.metrics.claim_latency.observe(since.elapsed().as_secs_f64());
                    attempt::run(worker, *claimed, control).await;
                }
                Ok(ClaimOutcome::Lost(LostAt::GoneJobsPod { pod, lease, slot, until })) => {
                    let note = gone_jobs_pod_note(&pod, &lease, slot);
                    info!(job = %job.name_any(), %pod, %lease, "{note}");
                    if !slot {
                        // Folded into one Event's series while the job waits (the job does not change meanwhile).
                        worker.event(&job, EventType::Warning, "WaitingForPod", note);
                    }
                    done.lost(LostAt::GoneJobsPod { pod, lease, slot, until });
                }
                Ok(ClaimOutcome::Lost(LostAt::Foreign { namespace, lease, slot, until })) => {
                    let note = foreign_lease_note(&namespace, &lease, slot);
                    warn!(job = %job.name_any(), lease = %format!("{namespace}/{lease}"), "{note}");
                    // Folded into one Event's series while the job waits; not for a slot, which the job goes on
                    // without (another one is tried at once).
                    if !slot {
                        worker.event(&job, EventType::Warning, "ForeignLease", note);
                    }
                    done.lost(LostAt::Foreign { namespace, lease, slot, until });
                }
                Ok(ClaimOutcome::Lost(at)) => {
                    worker.metrics.claim_conflicts.inc();
                    debug!(job = %job.name_any(), why = %at, "claim lost to another replica");
                    done.lost(at);
                }
                Ok(ClaimOutcome::Busy) => {
                    worker.metrics.claim_conflicts.inc();
                    debug!(job = %job.name_any(), "a slot Lease was taken first; the job is still free");
                    // Nothing moved the job: it is not held back (with scarce slots, it is the head to go for).
                    if let Some(d) = done.done.as_mut() {
                        d.seen_at = None;
                    }
                }
                Ok(ClaimOutcome::TooLarge(Some(reason))) => {
                    warn!(job = %job.name_any(), %reason, "job failed");
                    worker.metrics.count_outcome(Phase::Failed);
                    worker.event(&job, EventType::Warning, "Failed", reason);
                }
                Ok(ClaimOutcome::TooLarge(None)) => done.too_large(&worker, &job),
                Err(e) if crate::error::refused_by_policy(&e) => {
                    warn!(job = %job.name_any(), error = %e, "claim refused by the apiserver");
                    done.refused("ClaimRefused", &e);
                }
                Err(e) => warn!(job = %job.name_any(), error = %e, "claim failed"),
            }
        });
    }

    /// Start a write that moves a job nobody holds to a final phase (see [`claim::settle`]), unless too many writes
    /// are in flight already (the job is looked at again when a write slot frees up).
    fn spawn_settle(
        &mut self,
        job: &Arc<BackgroundJob>,
        lease: Option<Arc<Lease>>,
        state: LeaseState,
        (phase, reason): (Phase, String),
        defers_to: Option<keys::Ahead>,
    ) {
        let uid = job.uid().unwrap_or_default();
        let Some(tenure) = self.tenure() else {
            // Not a member yet (starting up) or any more: look again shortly.
            self.backlog.arm(&uid, Instant::now() + Duration::from_millis(500));
            return;
        };
        let Some(ends) = self.ends(expired_tenure(lease.as_deref(), state)) else {
            self.backlog.mark(&uid);
            return;
        };
        let Some(done) = self.start_write(job) else { return };
        let (worker, job, cached) = (self.worker.clone(), job.clone(), self.view.jobs.clone());
        tokio::spawn(async move {
            let mut done = done;
            let now = worker.clock.now();
            let claimant = claim::Claimant {
                identity: &worker.identity,
                timing: &worker.timing,
                now,
                tenure: &tenure,
                ends: &ends,
                cached: &cached,
            };
            if let Some(ahead) = &defers_to {
                // Not still ahead (or unreadable): the job is looked at again shortly, once the cache has caught up.
                match crate::client::bounded(SIDE_WRITE_LIMIT, skip_still_stands(&worker.client, &job, ahead)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        info!(job = %job.name_any(), ahead = %ahead.name, "not skipped: the job it deferred to is no longer ahead");
                        return;
                    }
                    Err(e) => {
                        warn!(job = %job.name_any(), ahead = %ahead.name, error = %e, "not skipped: cannot read the job it defers to");
                        return;
                    }
                }
            }
            let settled = claim::settle(&worker.client, &job, lease.as_deref(), state, claimant, (phase, reason));
            match crate::client::bounded(SIDE_WRITE_LIMIT + ending_waits(&ends, &worker.timing), settled).await {
                Ok(Ok((phase, reason))) => {
                    info!(job = %job.name_any(), %phase, %reason, "job settled");
                    worker.metrics.count_outcome(phase);
                    // A Pod that succeeded unwatched (`claim::settle`) is no warning either.
                    let normal = matches!(phase, Phase::Cancelled | Phase::Succeeded);
                    let type_ = if normal { EventType::Normal } else { EventType::Warning };
                    worker.event(&job, type_, &phase.to_string(), reason);
                }
                Ok(Err(at)) => {
                    debug!(job = %job.name_any(), why = %at, "not settled");
                    // Said at every look that finds it so (about every 10 s): the Event's series counts them.
                    if let Some(pod) = at.pod_not_stopping() {
                        warn!(job = %job.name_any(), %pod, "the orphaned attempt's pod was deleted and has not stopped");
                        let note = crate::executor::pod::not_stopping_note(pod);
                        worker.event(&job, EventType::Warning, "PodNotStopping", note);
                    }
                    done.lost(at);
                }
                // Even bare, no final status fits beside the job's spec.
                Err(e) if e.is_too_large_for_etcd() => done.too_large(&worker, &job),
                Err(e) => warn!(job = %job.name_any(), error = %e, "could not settle job"),
            }
        });
    }

    /// Disown a Lease of this replica's tenure that no attempt here holds (see [`crate::lease::disown`]), so that
    /// other replicas judge it by its own age.
    ///
    /// Such a Lease is left behind when a give-back write fails (a claim that lost its race, an attempt's end,
    /// during an apiserver outage): others see this replica's tenure renewed and would wait for as long as it lives,
    /// and only this replica knows nothing acts under the Lease.
    fn disown_if_idle(&mut self, lease: &Arc<Lease>) {
        if crate::lease::holder(lease).is_none() || !self.idle_of_mine(lease) {
            return;
        }
        let key = format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any());
        if !self.disowning.lock().unwrap().insert(key.clone()) {
            return;
        }
        let (worker, lease, disowning) = (self.worker.clone(), lease.clone(), self.disowning.clone());
        tokio::spawn(async move {
            let api: Api<Lease> = Api::namespaced(worker.client.clone(), &lease.namespace().unwrap_or_default());
            crate::lease::give(&api, &lease, crate::lease::Give::Disown, &worker.timing).await;
            disowning.lock().unwrap().remove(&key);
        });
    }

    /// Disown the claim Leases of this replica's tenure that name a job the cache does not show and that no attempt or
    /// settle here holds: a give-back that failed while the job was deleted with `--cascade=orphan` (which keeps the
    /// Lease), or a Lease forged in this tenure's name. Every other replica waits for such a Lease for as long as the
    /// tenure lives (an exclusive leader starts nothing meanwhile), and a job's look disowns only its own job's Lease:
    /// a gone job is never looked at again. A Lease is first seen unchanged for a renew interval: one just given back
    /// may still be in the cache.
    fn disown_claims_of_gone_jobs(&mut self, inst: Instant) {
        let every = self.worker.timing.renew_interval;
        if inst < self.next_gone_look {
            return;
        }
        self.next_gone_look = inst + every;
        let Some(mine) = self.tenure_id() else { return };
        let mut looked = HashSet::new();
        for lease in self.view.leases.state() {
            let Some(uid) = crate::lease::annotation(&lease, crate::lease::JOB_UID_ANNOTATION) else { continue };
            let gone = self.backlog.job(uid).is_none() && !self.writing.contains(uid);
            if !gone || !lease.labels().contains_key(claim::JOB_LABEL) || tenure::vouched_by(&lease) != Some(&mine) {
                continue;
            }
            let key = format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any());
            if self.gone_observer.observe(&key, lease.resource_version().as_deref(), inst) >= every {
                self.disown_if_idle(&lease);
            }
            looked.insert(key);
        }
        self.gone_observer.retain(|k| looked.contains(k));
    }

    /// Reserve a write slot for `job`: the returned guard reports back when the write task ends.
    fn start_write(&mut self, job: &BackgroundJob) -> Option<DoneOnDrop> {
        let uid = job.uid().unwrap_or_default();
        if self.writing.len() >= MAX_SIDE_WRITES {
            self.deferred.insert(uid);
            return None;
        }
        self.writing.insert(uid.clone());
        Some(DoneOnDrop {
            tx: self.done_tx.clone(),
            done: Some(Done {
                uid,
                seen_at: job.resource_version(),
                alive_tenure: None,
                lost_to_another: false,
                hold_until: None,
                blocked_slot: None,
                refused: None,
            }),
        })
    }

    /// Whether `job` is a recurring definition's job that must outlive its TTL ([`crate::recurring::history::kept_until`]).
    fn keeps_tick(&self, job: &BackgroundJob, now: Timestamp) -> bool {
        let Some(owner) = crate::recurring::definition_of(job) else {
            return false;
        };
        let ns = job.namespace().unwrap_or_default();
        let def = self.view.definitions.get(&ObjectRef::new(&owner.name).within(&ns));
        let def = def.filter(|d| d.uid().as_deref() == Some(owner.uid.as_str()));
        let (tick, kids) = (crate::recurring::tick_of(job), self.view.children.of(&owner.uid));
        crate::recurring::history::kept_until(def.as_deref(), &job.name_any(), tick, &kids).is_some_and(|by| by > now)
    }

    /// Delete a finished job whose retention has passed; otherwise return when to look at it again. One replica
    /// deletes each job (its rendezvous owner among the live `members`; the others look again a lease duration
    /// later, in case the owner is gone), under the version seen, so a job re-opened since (`bgjobs retry`) is not
    /// deleted.
    fn expire_finished(
        &mut self,
        job: &Arc<BackgroundJob>,
        now: Timestamp,
        inst: Instant,
        members: &[String],
    ) -> Option<Instant> {
        let ttl = i64::try_from(crate::retention::ttl_for(job, &self.config.retention)?.as_secs()).ok()?;
        let finished = job.status.as_ref()?.completion_time.as_ref()?.0;
        let at = finished.checked_add(jiff::SignedDuration::from_secs(ttl.max(0))).ok()?;
        let at = at.max(crate::retention::kept_at_least_until(job).unwrap_or(at));
        if at > now {
            return Some(inst + at.duration_since(now).unsigned_abs());
        }
        let uid = job.uid().unwrap_or_default();
        if crate::members::owner(members, &uid).is_some_and(|owner| owner != self.worker.identity) {
            return Some(inst + self.worker.timing.duration);
        }
        if self.keeps_tick(job, now) {
            // Maybe its definition's latest tick's job: deleted now, it would look never created, and the
            // definition's next owner would create it again. Kept until a later tick is claimed, and until no
            // create of it can land.
            return Some(inst + KEPT_TICK_LOOK);
        }
        if !self.delete_pace.take(inst) {
            self.deferred_deletes.insert(uid);
            return None;
        }
        let done = self.start_write(job)?;
        let api: Api<BackgroundJob> = Api::namespaced(self.worker.client.clone(), &job.namespace().unwrap_or_default());
        let dp = DeleteParams {
            preconditions: Some(Preconditions { uid: job.uid(), resource_version: job.resource_version() }),
            ..Default::default()
        };
        let name = job.name_any();
        self.worker.metrics.ttl_deletions.inc();
        tokio::spawn(async move {
            let mut done = done;
            match crate::client::bounded(SIDE_WRITE_LIMIT, async { Ok(api.delete(&name, &dp).await?) }).await {
                Ok(_) => debug!(job = %name, "deleted finished job after its TTL"),
                Err(crate::Error::Kube(e)) if crate::error::api_code(&e) == Some(409) || crate::error::gone(&e) => {}
                Err(e) if crate::error::refused_by_policy(&e) => {
                    warn!(job = %name, error = %e, "deleting a finished job refused by the apiserver");
                    done.refused("DeleteRefused", &e);
                }
                Err(e) => warn!(job = %name, error = %e, "could not delete finished job"),
            }
        });
        None
    }
}

/// Whether `job` may still be skipped for `ahead`, the job its verdict deferred to, read afresh: a skip is final, and
/// the cache the verdict was drawn from may show that job after it went (see [`keys::still_ahead`]).
async fn skip_still_stands(client: &kube::Client, job: &BackgroundJob, ahead: &keys::Ahead) -> crate::Result<bool> {
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    // Without its arguments (up to 1.5 MB, not read here), and a stand-in if it cannot be decoded (`unreadable`).
    let read = crate::unreadable::get_opt_without_args(&jobs, &ahead.name).await?;
    Ok(keys::still_ahead(read.as_ref(), ahead, job))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_whose_claims_keep_being_refused_is_held_longer_at_each_refusal_up_to_two_minutes() {
        let holds: Vec<u64> = (1..=8).map(|n| refused_hold(n).as_secs()).collect();
        assert_eq!(holds, [2, 4, 8, 16, 32, 64, 120, 120]);
        assert_eq!(refused_hold(u32::MAX), REFUSED_HOLD_MOST, "no overflow however many");
        assert!(refused_hold(1) > SETTLE_HOLD, "longer than a settle's hold from the first");
    }

    #[tokio::test]
    async fn a_skip_stands_only_while_the_job_it_defers_to_is_read_still_ahead() {
        let job = |name: &str, uid: &str, phase: &str| {
            serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
                "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "5"},
                "spec": {"jobName": "noop", "concurrencyKey": "k"}, "status": {"phase": phase}})
        };
        let mut skipper: BackgroundJob = serde_json::from_value(job("skipper", "uid-skipper", "Waiting")).unwrap();
        skipper.metadata.resource_version = Some("7".into());
        let ahead = keys::Ahead { name: "ahead".into(), uid: "uid-ahead".into() };
        let stands = |answer: (u16, serde_json::Value)| {
            let (skipper, ahead) = (skipper.clone(), ahead.clone());
            async move {
                let (client, sent) = crate::testing::scripted_client(move |_| answer.clone());
                let stands = skip_still_stands(&client, &skipper, &ahead).await;
                let sent = sent.lock().unwrap().clone();
                assert_eq!((sent.len(), sent[0].method.as_str()), (1, "GET"));
                assert_eq!(sent[0].path, "/apis/bgjobs.dev/v1alpha1/namespaces/ns/backgroundjobs/ahead");
                stands
            }
        };
        assert!(stands((200, job("ahead", "uid-ahead", "Running"))).await.unwrap());
        assert!(!stands((404, crate::testing::status(404))).await.unwrap(), "deleted since the verdict");
        assert!(stands((200, job("ahead", "uid-ahead", "Waiting"))).await.unwrap(), "earlier in the queue");
        assert!(!stands((200, job("ahead", "uid-ahead", "Succeeded"))).await.unwrap(), "finished since");
        let unreadable = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": "ahead", "namespace": "ns", "uid": "uid-ahead", "resourceVersion": "5"},
            "spec": {"jobName": "noop", "concurrencyKey": "k", "priority": "high"}, "status": {"phase": "Running"}});
        assert!(stands((200, unreadable)).await.unwrap(), "one this release cannot decode is read as a stand-in");
        assert!(!stands((200, job("ahead", "uid-again", "Waiting"))).await.unwrap(), "re-created under its name");
        assert!(stands((503, crate::testing::status(503))).await.is_err(), "unreadable: not skipped now");
    }

    #[test]
    fn the_walk_over_every_job_comes_less_often_as_the_cache_grows_within_bounds() {
        assert_eq!(full_look_period(0), FULL_LOOK);
        assert_eq!(full_look_period(20_000), FULL_LOOK);
        assert_eq!(full_look_period(100_000), Duration::from_secs(300));
        assert_eq!(full_look_period(usize::MAX), FULL_LOOK_MAX);
    }
}
