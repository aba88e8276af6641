//! The dispatch loop: observe the queue, pick in FIFO order, claim, run, and keep the queue tidy.
//!
//! Each pass reads the caches and, for every job, decides one thing:
//! - final: delete it once its TTL has passed;
//! - waiting: cancel it, give up on it (timeout, attempts used up), wait for its time, or make it a candidate;
//! - running elsewhere: leave it while its Lease is renewed; once this replica has seen the Lease (or its absence)
//!   unchanged for a full lease duration, the attempt is orphaned and becomes a candidate for takeover (a Pod
//!   attempt is adopted; an in-process one that may not run again is settled, under its Lease);
//! - running here: stop it if the user cancelled or deleted it.
//!
//! Candidates are sorted by [`QueueKey`] and this replica claims as many as it has free slots
//! (see [`ordering::pick`]). Claims, settles and deletes run as tasks; the loop goes on while they do, and a task
//! always reports back, even when it panics, so a slot is never lost.

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
use crate::claim::{self, ClaimOutcome, ExtraLease, LeaseState};
use crate::config::OperatorConfig;
use crate::keys::{self, KeyVerdict};
use crate::lease::{Keeper, Observer};
use crate::limits;
use crate::metrics::{Health, QueueLabels};
use crate::ordering::{self, QueueKey, Runnable};
use crate::queue::QueueView;
use crate::retry::{self, Verdict};
use crate::status;
use crate::worker::Worker;

/// Longest the loop sleeps without a reason to wake: a safety net against a missed notification.
const IDLE_PASS: Duration = Duration::from_secs(2);
/// How long a job this replica just acted on is left alone while the cache still shows the version it acted on.
/// Bounded, because a lost race at the Lease does not always change the job itself.
const SETTLE_HOLD: Duration = Duration::from_secs(1);

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
}

/// Sends its [`Done`] when dropped: when the task returns, and also when it unwinds from a panic.
struct DoneOnDrop {
    tx: mpsc::UnboundedSender<Done>,
    done: Option<Done>,
}

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.tx.send(done);
        }
    }
}

/// The dispatcher of one replica.
pub struct Dispatcher {
    worker: Arc<Worker>,
    config: OperatorConfig,
    view: QueueView,
    /// Attempts claimed or running here, by job UID.
    held: HashMap<String, Arc<AttemptControl>>,
    /// Jobs with a settle or delete write in flight here.
    writing: HashSet<String>,
    /// Jobs this replica just acted on: the resourceVersion it acted on, and when.
    settled_at: HashMap<String, (String, Instant)>,
    observer: Observer,
    /// With a cluster-wide cap: slot Leases by name as last seen, and the slot each of our claims uses.
    slot_observer: Observer,
    /// Concurrency-key Leases (`namespace/name`) as last seen.
    key_observer: Observer,
    /// Member Leases as last seen.
    member_observer: Observer,
    slots_in_use: HashMap<String, String>,
    /// Since when each candidate has been runnable, as seen here (for the overdue rule of [`ordering::pick`]).
    runnable_since: HashMap<String, Instant>,
    /// Since when each candidate has been at the head of this replica's view of the queue.
    head_since: HashMap<String, Instant>,
    health: Arc<Health>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Exclusive strategy: the cluster-wide Lease this replica holds, if any.
    leader: Option<watch::Receiver<Option<Arc<Keeper>>>>,
}

/// A job worth claiming now.
struct Candidate {
    key: QueueKey,
    job: Arc<BackgroundJob>,
    lease: Option<Arc<Lease>>,
    state: LeaseState,
    /// Leases the claim needs besides its own (the concurrency key's; the cluster slot is added at pick time).
    extras: Vec<ExtraLease>,
    /// An adoption's cluster slot: the one its Pod has held all along.
    adopted_slot: Option<ExtraLease>,
}

impl Dispatcher {
    /// A dispatcher over `view`. With `leader`, it runs jobs only while it holds the Lease the receiver shows.
    pub fn new(
        worker: Arc<Worker>,
        config: OperatorConfig,
        view: QueueView,
        leader: Option<watch::Receiver<Option<Arc<Keeper>>>>,
        health: Arc<Health>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Dispatcher {
            worker,
            config,
            view,
            held: HashMap::new(),
            writing: HashSet::new(),
            settled_at: HashMap::new(),
            observer: Observer::default(),
            slot_observer: Observer::default(),
            key_observer: Observer::default(),
            member_observer: Observer::default(),
            slots_in_use: HashMap::new(),
            runnable_since: HashMap::new(),
            head_since: HashMap::new(),
            health,
            done_tx,
            done_rx,
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
                _ = &mut shutdown => break,
            }
            while let Ok(done) = self.done_rx.try_recv() {
                self.finish(done);
            }
            if leader_changed && !self.is_leader() {
                warn!("lost the exclusive lease: stopping every running attempt");
                for control in self.held.values() {
                    control.stop(StopReason::NotLeader);
                }
            }
            wait = self.pass().await.min(IDLE_PASS);
        }
        self.shut_down().await;
    }

    fn finish(&mut self, done: Done) {
        self.held.remove(&done.uid);
        self.writing.remove(&done.uid);
        self.slots_in_use.remove(&done.uid);
        if let Some(rv) = done.seen_at {
            self.settled_at.insert(done.uid, (rv, Instant::now()));
        }
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
        while !self.held.is_empty() {
            tokio::select! {
                Some(done) = self.done_rx.recv() => self.finish(done),
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

    /// One pass over the caches. Returns how long until something becomes due.
    async fn pass(&mut self) -> Duration {
        let now = self.worker.clock.now();
        let inst = Instant::now();
        let timing = self.worker.timing;
        let mut due = IDLE_PASS;
        let wake_at = |due: &mut Duration, t: Timestamp| {
            let d = t.duration_since(now);
            *due = if d.is_positive() { (*due).min(d.unsigned_abs()) } else { Duration::ZERO };
        };
        let leases: HashMap<(String, String), Arc<Lease>> = self
            .view
            .leases
            .state()
            .into_iter()
            .map(|l| ((l.namespace().unwrap_or_default(), l.name_any()), l))
            .collect();
        let mut present = HashSet::new();
        let mut candidates = Vec::new();
        let mut depth: HashMap<QueueLabels, i64> = HashMap::new();
        self.health.beat();
        let me = self.worker.identity.clone();
        let members = crate::members::live(&self.view.members, &mut self.member_observer, inst, &timing, &me);
        let all = self.view.jobs.state();
        let turns = keys::turns(&all.iter().map(|j| j.as_ref()).collect::<Vec<_>>());
        let by_uid: HashMap<String, Arc<BackgroundJob>> =
            all.iter().map(|j| (j.uid().unwrap_or_default(), j.clone())).collect();
        let mut keys_seen = HashSet::new();
        let slot_leases: Vec<Arc<Lease>> = self.view.slots.as_ref().map(|s| s.state()).unwrap_or_default();
        let adoption_slots = limits::held_for_adoption(&slot_leases, |uid| by_uid.get(uid).map(|j| j.as_ref()));
        // Exclusive: jobs running anywhere but in this process's own attempts (another replica's, or a Pod this
        // identity handed over before it led again).
        let others_running = all.iter().any(|j| {
            j.phase() == Phase::Running
                && (j.status.as_ref().and_then(|s| s.worker.as_deref()) != Some(me.as_str())
                    || !self.held.contains_key(&j.uid().unwrap_or_default()))
        });
        for job in all {
            if job.phase() == Phase::Waiting {
                let labels = QueueLabels {
                    namespace: job.namespace().unwrap_or_default(),
                    queue: job.spec.queue.clone(),
                    priority: job.spec.priority.to_string(),
                };
                *depth.entry(labels).or_default() += 1;
            }
            let uid = job.uid().unwrap_or_default();
            present.insert(uid.clone());
            let rv = job.resource_version().unwrap_or_default();
            if let Some(control) = self.held.get(&uid) {
                if job.spec.cancel {
                    control.stop(StopReason::Cancelled);
                }
                continue;
            }
            if self.writing.contains(&uid) {
                continue;
            }
            match self.settled_at.get(&uid) {
                Some((at, when)) if *at == rv && when.elapsed() < SETTLE_HOLD => {
                    due = due.min(SETTLE_HOLD - when.elapsed());
                    continue;
                }
                Some(_) => {
                    self.settled_at.remove(&uid);
                }
                None => {}
            }
            let phase = job.phase();
            if phase.is_final() {
                if let Some(t) = self.expire_finished(&job, now, &members) {
                    wake_at(&mut due, t);
                }
                continue;
            }
            let ns = job.namespace().unwrap_or_default();
            let lease_name = job
                .status
                .as_ref()
                .and_then(|s| s.lease.clone())
                .filter(|_| phase == Phase::Running)
                .unwrap_or_else(|| claim::lease_name(&job));
            let lease = leases.get(&(ns, lease_name)).cloned();
            let version = claim::observed_version(&job, lease.as_deref());
            let unchanged = self.observer.observe(&uid, Some(&version), inst);
            let state = claim::lease_state(&job, lease.as_deref(), unchanged, &timing);
            let orphaned = phase == Phase::Running && state != LeaseState::Live && timing.expired(unchanged);
            if (phase == Phase::Running && !orphaned) || state == LeaseState::Live {
                due = due.min(timing.until_expiry(unchanged));
                continue;
            }
            // From here on the job is nobody's: waiting, or orphaned by a replica that stopped renewing.
            let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
            // An orphaned Pod attempt is adopted whatever its budget says: its Pod may still be running, and the
            // adopter is the one who deletes it on cancel or timeout (the attempt runner enforces both).
            // An orphaned Pod attempt whose Pod may still run is adopted whatever its attempt budget says (that
            // budget was spent on this very attempt); cancelling it or passing its deadline settles it, and the
            // settle deletes its Pod first.
            let adoptable = orphaned && claim::adopts(&job);
            if job.spec.cancel {
                let reason = if adoptable {
                    "cancelled by the user while its pod ran unwatched; the pod was deleted"
                } else {
                    "cancelled by the user before it ran"
                };
                self.spawn_settle(&job, lease, state, Phase::Cancelled, reason.into());
                continue;
            }
            match retry::may_start(&job.spec, created, job.attempts(), now) {
                Ok(()) => {}
                Err(Verdict::Fail(_)) if adoptable => {}
                Err(verdict) => {
                    let (phase, reason) = match verdict {
                        Verdict::Fail(r) => (Phase::Failed, r),
                        Verdict::Abandon(r) => (Phase::Abandoned, r),
                        _ => unreachable!("may_start only fails or abandons"),
                    };
                    let reason = if orphaned {
                        let worker = job.status.as_ref().and_then(|s| s.worker.as_deref()).unwrap_or("?");
                        format!(
                            "attempt {} was lost (worker {worker} stopped renewing its lease); {reason}",
                            job.attempts()
                        )
                    } else {
                        reason
                    };
                    self.spawn_settle(&job, lease, state, phase, reason);
                    continue;
                }
            }
            wake_at(&mut due, retry::deadline(&job.spec, created));
            if phase == Phase::Waiting
                && let Some(t) = ordering::not_before(&job)
                && t > now
            {
                wake_at(&mut due, t);
                continue;
            }
            let mut extras = Vec::new();
            if let Some(key) = job.spec.concurrency_key.as_deref() {
                match turns.get(&uid) {
                    Some(KeyVerdict::Skip { deferred_to }) => {
                        let reason = format!(
                            "skipped: job {deferred_to} with concurrencyKey {key:?} was already waiting or running \
                             (concurrencyPolicy: Skip)"
                        );
                        self.spawn_settle(&job, lease, state, Phase::Skipped, reason);
                        continue;
                    }
                    Some(KeyVerdict::Wait { .. }) => continue,
                    _ => {}
                }
                let ns = job.namespace().unwrap_or_default();
                let name = keys::lease_name(key);
                let seen = leases.get(&(ns.clone(), name.clone())).cloned();
                let owner = seen
                    .as_ref()
                    .and_then(|l| crate::lease::annotation(l, crate::lease::JOB_UID_ANNOTATION))
                    .and_then(|owner_uid| by_uid.get(owner_uid));
                let observed = format!("{ns}/{name}");
                let unchanged = self.key_observer.observe(
                    &observed,
                    seen.as_ref().and_then(|l| l.resource_version()).as_deref(),
                    inst,
                );
                keys_seen.insert(observed);
                match keys::key_lease_state(&job, seen.as_deref(), owner.map(|o| o.as_ref()), unchanged, &timing) {
                    LeaseState::Live => {
                        due = due.min(timing.until_expiry(unchanged));
                        continue;
                    }
                    LeaseState::Absent => {
                        extras.push(ExtraLease { namespace: ns, name, seen: None, label: keys::KEY_LABEL })
                    }
                    _ => extras.push(ExtraLease { namespace: ns, name, seen, label: keys::KEY_LABEL }),
                }
            }
            if !self.config.serves_queue(&job.spec.queue) {
                continue;
            }
            // The slot an orphaned Pod attempt holds is taken over only once this replica has seen *it* unchanged
            // for a lease duration too: the claim Lease comes from another watch, which may be the stale one.
            let adopted_slot = match adoption_slots.get(&uid) {
                Some(l) => {
                    let key = format!("slot/{}", l.name_any());
                    let age = self.slot_observer.observe(&key, l.resource_version().as_deref(), inst);
                    if !timing.expired(age) {
                        due = due.min(timing.until_expiry(age));
                        continue;
                    }
                    Some(ExtraLease {
                        namespace: self.config.lease_namespace.clone(),
                        name: l.name_any(),
                        seen: Some(l.clone()),
                        label: limits::SLOT_LABEL,
                    })
                }
                None => None,
            };
            self.runnable_since.entry(uid).or_insert(inst);
            candidates.push(Candidate { key: QueueKey::of(&job), job, lease, state, extras, adopted_slot });
        }
        self.key_observer.retain(|k| keys_seen.contains(k));
        self.observer.retain(|uid| present.contains(uid));
        let runnable: HashSet<String> = candidates.iter().map(|c| c.job.uid().unwrap_or_default()).collect();
        self.runnable_since.retain(|uid, _| runnable.contains(uid));
        self.settled_at.retain(|uid, _| present.contains(uid));
        for (uid, control) in &self.held {
            if !present.contains(uid) {
                control.stop(StopReason::Deleted);
            }
        }
        let held_for_adopters: Vec<String> = adoption_slots.values().map(|l| l.name_any()).collect();
        if self.leader.is_some() && others_running {
            // Exclusive: a new leader starts nothing new while jobs of the previous one still run (a handed-over
            // Pod, an attempt that has not noticed the lost leadership yet); it may adopt those Pods.
            candidates.retain(|c| c.job.phase() == Phase::Running);
        }
        if let Some(wait) = self.claim_some(candidates, &leases, &members, &held_for_adopters) {
            due = due.min(wait);
        }
        self.worker.metrics.queue_depth.clear();
        for (labels, n) in depth {
            self.worker.metrics.queue_depth.get_or_create(&labels).set(n);
        }
        self.worker.metrics.running.set(self.held.len() as i64);
        due
    }

    /// Claim what this replica should claim now. Returns when a waiting head job will become overdue.
    fn claim_some(
        &mut self,
        mut candidates: Vec<Candidate>,
        leases: &HashMap<(String, String), Arc<Lease>>,
        members: &[String],
        held_for_adopters: &[String],
    ) -> Option<Duration> {
        if !self.config.job_execution_enabled || !self.is_leader() {
            return None;
        }
        let mut free = (self.config.max_concurrent_jobs_per_instance as usize).saturating_sub(self.held.len());
        // Adoptions that bring their own cluster slot go first: their Pods are running already.
        let (adoptions, mut candidates): (Vec<Candidate>, Vec<Candidate>) =
            candidates.drain(..).partition(|c| c.adopted_slot.is_some());
        for c in adoptions.iter().take(free) {
            self.spawn_claim(c, c.adopted_slot.clone());
            free -= 1;
        }
        let mut slots = Vec::new();
        if let (Some(cap), Some(store)) = (self.config.cluster_max_concurrency, &self.view.slots) {
            let seen: HashMap<String, Arc<Lease>> = store.state().into_iter().map(|l| (l.name_any(), l)).collect();
            let reserved: Vec<String> =
                self.slots_in_use.values().cloned().chain(held_for_adopters.iter().cloned()).collect();
            let (me, timing) = (&self.worker.identity, &self.worker.timing);
            slots = limits::free_slots(cap, &seen, &reserved, &mut self.slot_observer, Instant::now(), timing, me);
            free = free.min(slots.len());
        }
        candidates.sort_by(|a, b| a.key.cmp(&b.key));
        // How many replicas race for the head: the live members (known from the start), or the holders of claim
        // Leases if more are seen (replicas of an older version without member Leases).
        let me = self.worker.identity.clone();
        let mut holders: HashSet<&str> = leases.values().filter_map(|l| crate::lease::holder(l)).collect();
        holders.insert(&me);
        let workers = members.len().max(holders.len());

        // Overdue means "passed over at the very head": among the first `free` jobs (those a strict-FIFO replica
        // would take now) for longer than OVERDUE_AFTER. Time spent deeper in the window or in a backlog does not
        // count, or every replica would go for the same jobs whenever the queue is long.
        let now = Instant::now();
        let head = free.max(1).min(candidates.len());
        let at_head: HashSet<String> = candidates[..head].iter().map(|c| c.job.uid().unwrap_or_default()).collect();
        self.head_since.retain(|uid, _| at_head.contains(uid));
        let mut next_overdue: Option<Duration> = None;
        let runnable: Vec<Runnable> = candidates
            .iter()
            .map(|c| {
                let uid = c.job.uid().unwrap_or_default();
                let overdue = match at_head.contains(&uid) {
                    false => false,
                    true => {
                        let waited = now.saturating_duration_since(*self.head_since.entry(uid).or_insert(now));
                        let left = ordering::OVERDUE_AFTER.saturating_sub(waited);
                        if !left.is_zero() {
                            next_overdue = Some(next_overdue.map_or(left, |n| n.min(left)));
                        }
                        left.is_zero()
                    }
                };
                Runnable { key: c.key.clone(), overdue }
            })
            .collect();
        if free == 0 || candidates.is_empty() {
            return next_overdue;
        }
        let epoch = jiff::Timestamp::now().as_second() as u64;
        let picked: HashSet<&QueueKey> =
            ordering::pick(&runnable, free, workers, &self.worker.identity, epoch).into_iter().collect();
        let mut slots = slots.into_iter();
        let lease_namespace = self.config.lease_namespace.clone();
        for c in candidates.iter().filter(|c| picked.contains(&c.key)) {
            let slot = slots.next().map(|s| ExtraLease {
                namespace: lease_namespace.clone(),
                name: s.name,
                seen: s.seen,
                label: limits::SLOT_LABEL,
            });
            self.spawn_claim(c, slot);
        }
        next_overdue
    }

    fn spawn_claim(&mut self, c: &Candidate, slot: Option<ExtraLease>) {
        let uid = c.job.uid().unwrap_or_default();
        if let Some(s) = &slot {
            self.slots_in_use.insert(uid.clone(), s.name.clone());
        }
        let control = Arc::new(AttemptControl::under(self.leadership()));
        self.held.insert(uid.clone(), control.clone());
        let since = self.runnable_since.get(&uid).copied().unwrap_or_else(Instant::now);
        let worker = self.worker.clone();
        let done = DoneOnDrop { tx: self.done_tx.clone(), done: Some(Done { uid, seen_at: c.job.resource_version() }) };
        let job = c.job.clone();
        let lease = c.lease.clone();
        let state = c.state;
        // The slot first: it is the scarcer resource, and losing it costs no other write.
        let extras: Vec<ExtraLease> = slot.into_iter().chain(c.extras.iter().cloned()).collect();
        tokio::spawn(async move {
            let _done = done;
            let claimant =
                claim::Claimant { identity: &worker.identity, timing: &worker.timing, now: worker.clock.now() };
            // However its calls hang, a claim gives its slot back within a lease duration.
            let claiming = claim::claim(&worker.client, &job, lease.as_deref(), state, claimant, &extras);
            let outcome = crate::client::bounded(worker.timing.duration, claiming).await;
            match outcome {
                Ok(ClaimOutcome::Claimed(claimed)) => {
                    worker.metrics.claimed.inc();
                    worker.metrics.claim_latency.observe(since.elapsed().as_secs_f64());
                    attempt::run(worker, *claimed, control).await;
                }
                Ok(ClaimOutcome::Lost) => {
                    worker.metrics.claim_conflicts.inc();
                    debug!(job = %job.name_any(), "claim lost to another replica");
                }
                Err(e) => warn!(job = %job.name_any(), error = %e, "claim failed"),
            }
        });
    }

    /// Start a write that moves a job nobody holds to a final phase (see [`claim::settle`]), unless too many writes
    /// are in flight already (the job comes up again in a later pass).
    fn spawn_settle(
        &mut self,
        job: &Arc<BackgroundJob>,
        lease: Option<Arc<Lease>>,
        state: LeaseState,
        phase: Phase,
        reason: String,
    ) {
        let Some(done) = self.start_write(job) else { return };
        let (worker, job) = (self.worker.clone(), job.clone());
        tokio::spawn(async move {
            let _done = done;
            let mut s = job.status.clone().unwrap_or_default();
            let now = worker.clock.now();
            status::finish(&mut s, phase, Some(reason.clone()), now);
            let claimant = claim::Claimant { identity: &worker.identity, timing: &worker.timing, now };
            let settled = claim::settle(&worker.client, &job, lease.as_deref(), state, claimant, s);
            match crate::client::bounded(SIDE_WRITE_LIMIT, settled).await {
                Ok(true) => {
                    info!(job = %job.name_any(), %phase, %reason, "job settled");
                    worker.metrics.count_outcome(phase);
                    let type_ = if phase == Phase::Cancelled {
                        kube::runtime::events::EventType::Normal
                    } else {
                        kube::runtime::events::EventType::Warning
                    };
                    worker.event(&job, type_, &phase.to_string(), reason);
                }
                Ok(false) => debug!(job = %job.name_any(), "not settled: someone moved it first"),
                Err(e) => warn!(job = %job.name_any(), error = %e, "could not settle job"),
            }
        });
    }

    /// Reserve a write slot for `job`: the returned guard reports back when the write task ends.
    fn start_write(&mut self, job: &BackgroundJob) -> Option<DoneOnDrop> {
        if self.writing.len() >= MAX_SIDE_WRITES {
            return None;
        }
        let uid = job.uid().unwrap_or_default();
        self.writing.insert(uid.clone());
        Some(DoneOnDrop { tx: self.done_tx.clone(), done: Some(Done { uid, seen_at: job.resource_version() }) })
    }

    /// Whether `job` is the job its recurring definition's status names as created but not yet confirmed.
    fn awaits_confirmation(&self, job: &BackgroundJob) -> bool {
        let Some(owner) = job.owner_references().iter().find(|o| o.kind == "RecurringBackgroundJob") else {
            return false;
        };
        let ns = job.namespace().unwrap_or_default();
        self.view.definitions.state().iter().any(|d| {
            d.uid().as_deref() == Some(owner.uid.as_str())
                && d.namespace().as_deref() == Some(ns.as_str())
                && d.status.as_ref().and_then(|s| s.pending_job.as_deref()) == Some(job.name_any().as_str())
        })
    }

    /// Delete a finished job whose TTL has passed; otherwise return when it will. One replica deletes each job
    /// (its rendezvous owner among the live `members`), under the version seen, so a job re-opened since (`bgjobs
    /// retry`) is not deleted.
    fn expire_finished(&mut self, job: &Arc<BackgroundJob>, now: Timestamp, members: &[String]) -> Option<Timestamp> {
        let ttl = job.spec.ttl_seconds_after_finished.or(self.config.ttl_seconds_after_finished)?;
        let finished = job.status.as_ref()?.completion_time.as_ref()?.0;
        let at = finished.checked_add(jiff::SignedDuration::from_secs(ttl.max(0))).ok()?;
        if at > now {
            return Some(at);
        }
        let uid = job.uid().unwrap_or_default();
        if crate::members::owner(members, &uid).is_some_and(|owner| owner != self.worker.identity) {
            return None;
        }
        if self.awaits_confirmation(job) {
            // Its definition has not confirmed creating it yet: deleted now, it would look never created, and the
            // definition's next owner would create it again. Kept until the confirmation.
            return Some(now.checked_add(jiff::SignedDuration::from_secs(1)).unwrap_or(now));
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
            let _done = done;
            match crate::client::bounded(SIDE_WRITE_LIMIT, async { Ok(api.delete(&name, &dp).await?) }).await {
                Ok(_) => debug!(job = %name, "deleted finished job after its TTL"),
                Err(crate::Error::Kube(e)) if matches!(crate::error::api_code(&e), Some(404) | Some(409)) => {}
                Err(e) => warn!(job = %name, error = %e, "could not delete finished job"),
            }
        });
        None
    }
}
