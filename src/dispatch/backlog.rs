//! The replica's index of the queue, kept up to date from watch events, so that a dispatch pass costs what changed
//! plus what it picks, never a walk over every job in scope.
//!
//! - `jobs`: every job in scope by UID (the watch cache's own objects, shared, not copied);
//! - `runnable`: the jobs that may be claimed now, in queue order ([`QueueKey`]);
//! - `dirty`: jobs to look at in the next pass (they, or a Lease that guards them, changed);
//! - `walk`: a full look in progress: the cache as listed, compared with the index [`WALK_CHUNK`] jobs per pass;
//! - `sweep`: jobs a full look found unchanged, still to be looked at again, [`SWEEP_CHUNK`] per pass, the head of
//!   the queue first, finished jobs last (the dispatcher passes by those whose look would only repeat the last one:
//!   [`repeats_last_look`]);
//! - timers: when to look at a job again although nothing changed (a delay, a backoff, a deadline, a Lease that
//!   may expire), in a heap;
//! - concurrency-key groups and each member's turn, recomputed for a group only when one of its jobs changes;
//! - the queue-depth counts and the set of running jobs, adjusted per change.
//!
//! Finished jobs stay in `jobs` (TTL deletes and recurring history need them) but in no other structure, apart from
//! a timer for their TTL.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use crate::api::{BackgroundJob, Phase};
use crate::claim::{ExtraLease, LeaseState};
use crate::keys::{self, KeyVerdict};
use crate::metrics::QueueLabels;
use crate::ordering::QueueKey;

/// A job that may be claimed now, with what its claim needs.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The job as cached when it was judged.
    pub job: Arc<BackgroundJob>,
    /// Its claim Lease as cached.
    pub lease: Option<Arc<Lease>>,
    /// That Lease's state.
    pub state: LeaseState,
    /// Leases the claim needs besides its own (the concurrency key's; the cluster slot is added at pick time).
    pub extras: Vec<ExtraLease>,
    /// An adoption's cluster slot: the one its Pod has held all along.
    pub adopted_slot: Option<ExtraLease>,
    /// Since when this replica has seen it runnable (for the claim-latency metric).
    pub since: Instant,
    /// When its deadline or delay changes its judgement (the wall clock; `None`: nothing time-driven does).
    pub next_look: Option<Timestamp>,
}

/// When a candidate judged at `now` must be judged again, from its judgement's `recheck` ([`Candidate::next_look`]).
pub fn next_look(now: Timestamp, recheck: Option<Duration>) -> Option<Timestamp> {
    recheck.map(|d| {
        now.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX)
    })
}

/// Whether looking again at a candidate whose job has not changed since it was judged would only repeat that
/// judgement, so that a full look's sweep may pass it by. So it is for a waiting job with no concurrency key and no
/// adoption, whose claim Lease was absent when it was judged and is absent now (`lease_now`), and whose deadline or
/// delay is further away than the next full look (`horizon`): its look would neither change its candidacy nor arm
/// a timer (the next full look comes first). A job whose Lease appeared without the index hearing of it is still
/// looked at, as is every job with a Lease, a key, or a time due before the next full look.
pub fn repeats_last_look(c: &Candidate, lease_now: bool, now: Timestamp, horizon: Duration) -> bool {
    let quiet = c.job.phase() == Phase::Waiting
        && c.job.spec.concurrency_key.is_none()
        && c.lease.is_none()
        && !lease_now
        && c.extras.is_empty()
        && c.adopted_slot.is_none();
    let horizon = jiff::SignedDuration::try_from(horizon).unwrap_or(jiff::SignedDuration::MAX);
    let far = c.next_look.is_none_or(|at| at.duration_since(now) > horizon);
    quiet && far
}

/// The jobs a pass looks at ([`Backlog::take_dirty`]).
#[derive(Debug, Default)]
pub struct Looks {
    /// Jobs that changed (or a Lease that guards them, or their turn at a key did), or whose timer fired.
    pub changed: Vec<String>,
    /// Unchanged jobs a full look's sweep reached, none of them among `changed`: looked at again unless the look
    /// would only repeat the last one ([`repeats_last_look`]).
    pub swept: Vec<String>,
}

#[cfg(test)]
impl Looks {
    /// Every job, changed ones first.
    pub fn all(self) -> Vec<String> {
        let mut all = self.changed;
        all.extend(self.swept);
        all
    }
}

/// A namespace and a concurrency key.
type KeyGroup = (String, String);

/// How many listed jobs a pass compares with the index during a full look ([`Backlog::full_look`]). A replica
/// that compared 100,000 in one pass claimed nothing for 2.4–3.7 s on this project's 2-core machine; each replica's
/// walk came at its own moment, and together they broke the FIFO bound at 100,000 waiting jobs. A comparison costs
/// about 3.4 µs of CPU (0.37 s for 100,000 synthetic jobs, in 40 chunks), so a chunk costs a pass about 10 ms. The
/// pass that ends a walk also checks every indexed job for a deletion the index missed: 35 ms at 100,000.
pub const WALK_CHUNK: usize = 2_500;
/// How many unchanged jobs a pass looks at again after a full look ([`Backlog::full_look`]). Looking at a job costs
/// about 20 µs: looking at 100,000 in one pass held every claim back for 2 s, on every replica at once (their
/// periods start together), which broke the FIFO bound. A chunk costs a pass about 20 ms.
pub const SWEEP_CHUNK: usize = 1_000;
/// How many candidates at the head of the queue a full look looks at again in its first pass, before its walk
/// reaches them: the next claims are judged on fresh looks.
const SWEEP_HEAD: usize = SWEEP_CHUNK / 4;

/// See the module docs.
#[derive(Default)]
pub struct Backlog {
    jobs: HashMap<String, Arc<BackgroundJob>>,
    runnable: BTreeMap<QueueKey, Candidate>,
    dirty: HashSet<String>,
    /// In the order they are looked at: unfinished jobs in queue order, then finished ones.
    sweep: BTreeMap<(bool, QueueKey), String>,
    /// The unchanged jobs of a walk that ended while the last sweep was still under way: swept after it, so that a
    /// sweep is never cut short (the back of the queue is always reached) and a look need not wait for one.
    next_sweep: Option<BTreeMap<(bool, QueueKey), String>>,
    walk: Option<Walk>,
    /// A full look was asked for while one was under way: it begins once that one ends.
    look_wanted: bool,
    /// While a full look walks: the jobs a watch event changed (or removed) since the listing, whose indexed version
    /// is therefore newer than the listed one.
    touched: HashSet<String>,
    timers: BinaryHeap<Reverse<(Instant, String)>>,
    /// The time each job's live timer fires; heap entries that disagree are stale and skipped.
    due: HashMap<String, Instant>,
    groups: HashMap<KeyGroup, HashSet<String>>,
    /// Which group a key Lease (namespace, name) guards.
    key_leases: HashMap<(String, String), String>,
    turns: HashMap<String, KeyVerdict>,
    stale_groups: HashSet<KeyGroup>,
    /// Since when a job withdrawn by a change had been a candidate, until it is looked at again (so the claim
    /// latency counts from when it first became runnable, not from its last change).
    carried_since: HashMap<String, Instant>,
    depth: HashMap<QueueLabels, i64>,
    /// Counts the changes of `depth`, so that its gauge is redrawn only after one.
    depth_version: u64,
    running: HashSet<String>,
}

/// A full look in progress (see [`Backlog::full_look`]).
struct Walk {
    /// Listed jobs still to compare, taken from the end.
    listed: Vec<Arc<BackgroundJob>>,
    /// The UIDs listed so far, hashed by `hasher` (a whole string per job would make ending the walk free 100,000
    /// of them at 100k; a collision only leaves a deletion the index missed to the next full look).
    met: HashSet<u64>,
    hasher: RandomState,
    /// The jobs found unchanged so far, in the sweep's order: it becomes the sweep as it is, so the pass that ends
    /// the walk neither sorts nor copies every job.
    unchanged: BTreeMap<(bool, QueueKey), String>,
}

impl Backlog {
    /// Add or replace a job (as the watch cache now holds it) and mark it for the next pass.
    pub fn upsert(&mut self, job: Arc<BackgroundJob>) {
        let uid = job.uid().unwrap_or_default();
        if self.walk.is_some() {
            self.touched.insert(uid.clone());
        }
        if let Some(old) = self.jobs.remove(&uid) {
            self.forget(&uid, &old);
        }
        self.account(&uid, &job);
        self.jobs.insert(uid.clone(), job);
        self.dirty.insert(uid);
    }

    /// Remove a job that left the cache. Returns it if it was known.
    pub fn remove(&mut self, uid: &str) -> Option<Arc<BackgroundJob>> {
        if self.walk.is_some() {
            self.touched.insert(uid.to_string());
        }
        let old = self.jobs.remove(uid)?;
        self.forget(uid, &old);
        self.due.remove(uid);
        self.dirty.remove(uid);
        self.turns.remove(uid);
        self.carried_since.remove(uid);
        Some(old)
    }

    /// Replace the whole index by `all` at once: [`Backlog::begin_full_look`], walked to its end in one go (for the
    /// first look, before any claim; a sweep under way is replaced).
    pub fn resync(&mut self, all: Vec<Arc<BackgroundJob>>) -> Vec<Arc<BackgroundJob>> {
        self.sweep.clear();
        self.next_sweep = None;
        self.begin_full_look(all);
        self.walk(usize::MAX).unwrap_or_default()
    }

    /// Ask for a full look at the cache (`wanted`: a watch re-listed, or the period ran out). It begins now, with the
    /// listing `list` makes, unless a walk is still under way, or a sweep already waits behind the one under way:
    /// then it begins at the first call after that, with a listing made then. A re-list's look (the only way the
    /// index learns what changed during the watch's gap) thus waits at most for one walk and one sweep, and re-lists
    /// in a row never keep a look from ending (a walk restarted by every re-list would never drop the jobs the
    /// re-lists no longer show; a sweep restarted would never reach the back of the queue). The listing is always
    /// made as the walk begins, never kept from earlier: the changes taken in between would not be among those the
    /// walk leaves alone. Call it before taking in the pass's changes. Returns whether a look began.
    pub fn full_look(&mut self, wanted: bool, list: impl FnOnce() -> Vec<Arc<BackgroundJob>>) -> bool {
        self.look_wanted |= wanted;
        if !self.look_wanted || self.walk.is_some() || self.next_sweep.is_some() {
            return false;
        }
        self.look_wanted = false;
        self.begin_full_look(list());
        true
    }

    /// Begin a full look at `all`, the cache as it is now. [`Backlog::walk`] then compares it with the index a chunk
    /// per pass, so that no pass holds up claims for the whole cache. Watch events keep being taken in meanwhile; a
    /// job they change is newer in the index than in the listing, and the walk leaves it alone. The head of the
    /// queue is looked at again in the next pass, without waiting for the walk to end.
    fn begin_full_look(&mut self, all: Vec<Arc<BackgroundJob>>) {
        self.touched.clear();
        let head: Vec<String> = self.runnable.values().take(SWEEP_HEAD).filter_map(|c| c.job.uid()).collect();
        self.dirty.extend(head);
        let met = HashSet::with_capacity(all.len());
        self.walk = Some(Walk { listed: all, met, hasher: RandomState::new(), unchanged: BTreeMap::new() });
    }

    /// Compare the next `chunk` listed jobs with the index: a changed job (another resourceVersion, none to compare,
    /// or not indexed) is replaced and marked; an unchanged one keeps its candidacy and takes the cache's copy. Once
    /// every listed job is compared, the jobs neither listed nor changed since are removed and returned, and the
    /// unchanged ones are looked at again in the sweep, head of the queue first, finished jobs last. `None` while
    /// the walk goes on, or if none is under way.
    pub fn walk(&mut self, chunk: usize) -> Option<Vec<Arc<BackgroundJob>>> {
        let mut walk = self.walk.take()?;
        let next = walk.listed.len().saturating_sub(chunk);
        // Borrowed, not cloned: a walk meets every cached job, and each string copied is an allocation per job.
        for job in walk.listed.drain(next..) {
            let uid = job.metadata.uid.as_deref().unwrap_or_default();
            walk.met.insert(walk.hasher.hash_one(uid));
            if self.touched.contains(uid) {
                continue;
            }
            match self.jobs.get_mut(uid) {
                Some(indexed) if unchanged(indexed, &job) => {
                    // The same version: its key, counts and group stay; only the copy is the cache's now.
                    let key = QueueKey::of(&job);
                    if let Some(c) = self.runnable.get_mut(&key) {
                        c.job = job.clone();
                    }
                    walk.unchanged.insert((job.phase().is_final(), key), uid.to_string());
                    *indexed = job;
                }
                _ => self.upsert(job),
            }
        }
        if !walk.listed.is_empty() {
            self.walk = Some(walk);
            return None;
        }
        let touched = std::mem::take(&mut self.touched);
        let Walk { met, hasher, unchanged, .. } = walk;
        let gone: Vec<String> = self
            .jobs
            .keys()
            .filter(|uid| !met.contains(&hasher.hash_one(uid)) && !touched.contains(*uid))
            .cloned()
            .collect();
        let removed = gone.iter().filter_map(|uid| self.remove(uid)).collect();
        if self.sweep.is_empty() {
            self.sweep = unchanged;
        } else {
            self.next_sweep = Some(unchanged);
        }
        Some(removed)
    }

    /// Whether a full look is still under way: listed jobs to compare, or unchanged ones to look at again (the next
    /// pass should come soon).
    pub fn sweeping(&self) -> bool {
        self.walk.is_some() || !self.sweep.is_empty() || self.next_sweep.is_some()
    }

    /// Mark a known job for the next pass.
    pub fn mark(&mut self, uid: &str) {
        if self.jobs.contains_key(uid) {
            self.dirty.insert(uid.to_string());
        }
    }

    /// A concurrency key's Lease changed: mark the jobs whose turn it is.
    pub fn mark_key_lease(&mut self, namespace: &str, lease_name: &str) {
        let Some(key) = self.key_leases.get(&(namespace.to_string(), lease_name.to_string())) else { return };
        let group = (namespace.to_string(), key.clone());
        for uid in self.groups.get(&group).into_iter().flatten() {
            if matches!(self.turns.get(uid), Some(KeyVerdict::Turn)) {
                self.dirty.insert(uid.clone());
            }
        }
    }

    /// Look at `uid` again at `at` (or earlier, if a timer set before fires earlier).
    pub fn arm(&mut self, uid: &str, at: Instant) {
        match self.due.get(uid) {
            Some(d) if *d <= at => {}
            _ => {
                self.due.insert(uid.to_string(), at);
                self.timers.push(Reverse((at, uid.to_string())));
            }
        }
    }

    /// Drop the timer of `uid`.
    pub fn disarm(&mut self, uid: &str) {
        self.due.remove(uid);
    }

    /// When the earliest timer fires.
    pub fn next_due(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, uid))) = self.timers.peek() {
            if self.due.get(uid) == Some(at) {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    /// Recompute the turns of the key groups that changed, then hand out every job marked or due by `now`, and the
    /// next [`SWEEP_CHUNK`] of the sweep.
    pub fn take_dirty(&mut self, now: Instant) -> Looks {
        let mut swept = Vec::new();
        for _ in 0..SWEEP_CHUNK {
            if self.sweep.is_empty()
                && let Some(next) = self.next_sweep.take()
            {
                self.sweep = next;
            }
            let Some((_, uid)) = self.sweep.pop_first() else { break };
            swept.push(uid);
        }
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Reverse((at, uid)) = self.timers.pop().expect("peeked");
            if self.due.get(&uid) == Some(&at) {
                self.due.remove(&uid);
                self.dirty.insert(uid);
            }
        }
        self.refresh_turns();
        // Taken, not drained: the set grew to every job at the first list (100,000 at 100k) and a table never
        // shrinks, and a drain scans and refills all of it, on every pass, for the few jobs a pass brings.
        let changed = std::mem::take(&mut self.dirty);
        swept.retain(|uid| !changed.contains(uid));
        Looks { changed: changed.into_iter().collect(), swept }
    }

    /// How many jobs are indexed.
    pub fn indexed(&self) -> usize {
        self.jobs.len()
    }

    /// A job as indexed.
    pub fn job(&self, uid: &str) -> Option<&Arc<BackgroundJob>> {
        self.jobs.get(uid)
    }

    /// A job's turn at its concurrency key.
    pub fn turn(&self, uid: &str) -> Option<&KeyVerdict> {
        self.turns.get(uid)
    }

    /// Make a job a candidate (it must be indexed).
    pub fn set_runnable(&mut self, uid: &str, mut candidate: Candidate) {
        if let Some(previous) = self.take_runnable(uid) {
            candidate.since = previous.since;
        }
        self.runnable.insert(QueueKey::of(&candidate.job), candidate);
    }

    /// Withdraw a job's candidacy; returns it.
    pub fn take_runnable(&mut self, uid: &str) -> Option<Candidate> {
        let job = self.jobs.get(uid)?;
        self.runnable.remove(&QueueKey::of(job))
    }

    /// Since when a job withdrawn by its last change had been a candidate (taken: asked once per look).
    pub fn take_since(&mut self, uid: &str) -> Option<Instant> {
        self.carried_since.remove(uid)
    }

    /// A job's candidacy, if it is a candidate.
    pub fn runnable_candidate(&self, uid: &str) -> Option<&Candidate> {
        self.runnable.get(&QueueKey::of(self.jobs.get(uid)?))
    }

    /// Whether some unfinished job uses the concurrency-key Lease `namespace/name`.
    pub fn has_key_lease(&self, namespace: &str, name: &str) -> bool {
        self.key_leases.contains_key(&(namespace.to_string(), name.to_string()))
    }

    /// The candidates, head of the queue first.
    pub fn runnable(&self) -> impl Iterator<Item = (&QueueKey, &Candidate)> {
        self.runnable.iter()
    }

    /// Waiting jobs per (namespace, queue, priority).
    pub fn depth(&self) -> &HashMap<QueueLabels, i64> {
        &self.depth
    }

    /// Changes with every change of [`Backlog::depth`].
    pub fn depth_version(&self) -> u64 {
        self.depth_version
    }

    /// Jobs in phase Running, anywhere.
    pub fn running(&self) -> impl Iterator<Item = &Arc<BackgroundJob>> {
        self.running.iter().filter_map(|uid| self.jobs.get(uid))
    }

    fn account(&mut self, uid: &str, job: &BackgroundJob) {
        match job.phase() {
            Phase::Waiting => {
                *self.depth.entry(labels(job)).or_default() += 1;
                self.depth_version += 1;
            }
            Phase::Running => {
                self.running.insert(uid.to_string());
            }
            _ => {}
        }
        if let Some(group) = group(job) {
            let lease = (group.0.clone(), keys::lease_name(&group.1));
            self.key_leases.entry(lease).or_insert_with(|| group.1.clone());
            self.groups.entry(group.clone()).or_default().insert(uid.to_string());
            self.stale_groups.insert(group);
        } else {
            self.turns.remove(uid);
        }
    }

    fn forget(&mut self, uid: &str, old: &BackgroundJob) {
        if let Some(c) = self.runnable.remove(&QueueKey::of(old)) {
            self.carried_since.insert(uid.to_string(), c.since);
        }
        match old.phase() {
            Phase::Waiting => {
                self.depth_version += 1;
                let l = labels(old);
                if let Some(n) = self.depth.get_mut(&l) {
                    *n -= 1;
                    if *n <= 0 {
                        self.depth.remove(&l);
                    }
                }
            }
            Phase::Running => {
                self.running.remove(uid);
            }
            _ => {}
        }
        if let Some(group) = group(old) {
            if let Some(members) = self.groups.get_mut(&group) {
                members.remove(uid);
                if members.is_empty() {
                    self.groups.remove(&group);
                    self.key_leases.remove(&(group.0.clone(), keys::lease_name(&group.1)));
                }
            }
            self.stale_groups.insert(group);
        }
    }

    /// Recompute the turns of changed groups; mark the jobs whose turn changed.
    fn refresh_turns(&mut self) {
        for group in std::mem::take(&mut self.stale_groups) {
            let members: Vec<&BackgroundJob> = self
                .groups
                .get(&group)
                .into_iter()
                .flatten()
                .filter_map(|uid| self.jobs.get(uid).map(|j| j.as_ref()))
                .collect();
            for (uid, verdict) in keys::turns(&members) {
                let changed = match (self.turns.get(&uid), &verdict) {
                    (Some(KeyVerdict::Wait { .. }), KeyVerdict::Wait { .. }) => false,
                    (Some(old), new) => old != new,
                    (None, _) => true,
                };
                if changed {
                    self.dirty.insert(uid.clone());
                }
                self.turns.insert(uid, verdict);
            }
        }
    }
}

/// Whether `cached` is the version `indexed` already is (both carry a resourceVersion, and it is the same).
fn unchanged(indexed: &BackgroundJob, cached: &BackgroundJob) -> bool {
    let cached = cached.metadata.resource_version.as_deref();
    indexed.metadata.resource_version.as_deref().is_some_and(|rv| cached == Some(rv))
}

/// The concurrency-key group of an unfinished job with a key.
fn group(job: &BackgroundJob) -> Option<KeyGroup> {
    let key = job.spec.concurrency_key.as_ref().filter(|_| !job.phase().is_final())?;
    Some((job.namespace().unwrap_or_default(), key.clone()))
}

fn labels(job: &BackgroundJob) -> QueueLabels {
    QueueLabels {
        namespace: job.namespace().unwrap_or_default(),
        queue: job.spec.queue.clone(),
        priority: job.spec.priority.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::BackgroundJobStatus;

    fn job(name: &str, created: i64, phase: Phase, key: Option<&str>) -> Arc<BackgroundJob> {
        let mut j = BackgroundJob::new(name, serde_json::from_value(serde_json::json!({"jobName": "noop"})).unwrap());
        j.metadata.uid = Some(format!("uid-{name}"));
        j.metadata.namespace = Some("ns".into());
        j.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(1_800_000_000 + created).unwrap()));
        j.spec.concurrency_key = key.map(str::to_string);
        j.status = Some(Box::new(BackgroundJobStatus { phase: Some(phase), ..Default::default() }));
        Arc::new(j)
    }

    fn candidate(job: &Arc<BackgroundJob>) -> Candidate {
        Candidate {
            job: job.clone(),
            lease: None,
            state: LeaseState::Absent,
            extras: Vec::new(),
            adopted_slot: None,
            since: Instant::now(),
            next_look: None,
        }
    }

    fn names(b: &Backlog) -> Vec<String> {
        b.runnable().map(|(k, _)| k.name.clone()).collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn candidates_come_out_in_queue_order_and_a_change_withdraws_a_candidacy_until_looked_at_again() {
        let mut b = Backlog::default();
        let (late, early) = (job("late", 20, Phase::Waiting, None), job("early", 10, Phase::Waiting, None));
        b.upsert(late.clone());
        b.upsert(early.clone());
        assert_eq!(sorted(b.take_dirty(Instant::now()).all()), ["uid-early", "uid-late"]);
        b.set_runnable("uid-late", candidate(&late));
        b.set_runnable("uid-early", candidate(&early));
        assert_eq!(names(&b), ["early", "late"]);
        assert!(b.take_dirty(Instant::now()).all().is_empty(), "nothing changed");
        let since = b.runnable_candidate("uid-early").unwrap().since;
        b.upsert(job("early", 10, Phase::Running, None));
        assert_eq!(names(&b), ["late"]);
        assert_eq!(b.take_dirty(Instant::now()).all(), ["uid-early"]);
        assert_eq!(b.take_since("uid-early"), Some(since), "runnable since then, for the claim latency");
        assert_eq!(b.take_since("uid-early"), None);
    }

    #[test]
    fn a_pass_after_the_first_list_does_not_keep_the_size_of_that_list() {
        let mut b = Backlog::default();
        for i in 0..10_000 {
            b.upsert(job(&format!("j{i:05}"), i, Phase::Waiting, None));
        }
        assert_eq!(b.take_dirty(Instant::now()).all().len(), 10_000);
        b.upsert(job("j00001", 1, Phase::Running, None));
        assert_eq!(b.take_dirty(Instant::now()).all(), ["uid-j00001"]);
        assert!(b.dirty.capacity() < 100, "the marks of one pass are not a table of every job");
    }

    #[test]
    fn a_timer_fires_once_at_its_earliest_arming_and_a_disarmed_one_never() {
        let mut b = Backlog::default();
        b.upsert(job("a", 1, Phase::Waiting, None));
        b.upsert(job("b", 2, Phase::Waiting, None));
        let t0 = Instant::now();
        b.take_dirty(t0);
        b.arm("uid-a", t0 + Duration::from_secs(10));
        b.arm("uid-a", t0 + Duration::from_secs(5));
        b.arm("uid-a", t0 + Duration::from_secs(20));
        b.arm("uid-b", t0 + Duration::from_secs(1));
        b.disarm("uid-b");
        assert_eq!(b.next_due(), Some(t0 + Duration::from_secs(5)));
        assert!(b.take_dirty(t0 + Duration::from_secs(4)).all().is_empty());
        assert_eq!(b.take_dirty(t0 + Duration::from_secs(5)).all(), ["uid-a"]);
        assert!(b.take_dirty(t0 + Duration::from_secs(30)).all().is_empty(), "stale heap entries are skipped");
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn when_a_keys_turn_holder_finishes_the_next_job_of_that_key_is_looked_at() {
        let mut b = Backlog::default();
        b.upsert(job("first", 1, Phase::Running, Some("k")));
        b.upsert(job("second", 2, Phase::Waiting, Some("k")));
        b.upsert(job("other", 3, Phase::Waiting, None));
        b.take_dirty(Instant::now());
        assert!(matches!(b.turn("uid-second"), Some(KeyVerdict::Wait { .. })));
        b.upsert(job("first", 1, Phase::Succeeded, Some("k")));
        assert_eq!(sorted(b.take_dirty(Instant::now()).all()), ["uid-first", "uid-second"]);
        assert_eq!(b.turn("uid-second"), Some(&KeyVerdict::Turn));
        assert!(b.has_key_lease("ns", &keys::lease_name("k")));
        b.mark_key_lease("ns", &keys::lease_name("k"));
        assert_eq!(b.take_dirty(Instant::now()).all(), ["uid-second"], "a key Lease change concerns the turn holder");
        b.remove("uid-second");
        assert!(!b.has_key_lease("ns", &keys::lease_name("k")));
    }

    #[test]
    fn a_swept_job_that_also_changed_is_handed_out_once_as_changed() {
        let n = SWEEP_HEAD + 50;
        let (mut b, jobs) = indexed_candidates(n);
        b.resync(copies(&jobs));
        let (changed, marked) = (SWEEP_HEAD + 10, SWEEP_HEAD + 20);
        b.upsert(versioned(&jobs[changed], "2"));
        b.mark(&format!("uid-j{marked:05}"));
        let looks = b.take_dirty(Instant::now());
        for i in [changed, marked] {
            let uid = format!("uid-j{i:05}");
            assert!(looks.changed.contains(&uid) && !looks.swept.contains(&uid), "{uid}");
        }
        assert_eq!(looks.changed.len(), SWEEP_HEAD + 2, "the head of the queue, the changed job and the marked one");
        assert_eq!(looks.swept.len(), n - SWEEP_HEAD - 2, "the others, swept");
        assert_eq!(looks.all().into_iter().collect::<HashSet<_>>().len(), n, "every job, once");
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_quiet_waiting_candidate_whose_deadline_is_past_the_next_full_look_need_not_be_looked_at_again() {
        let horizon = Duration::from_secs(300);
        let mut c = candidate(&job("quiet", 0, Phase::Waiting, None));
        assert!(repeats_last_look(&c, false, at(0), horizon), "nothing time-driven");
        c.next_look = Some(at(301));
        assert!(repeats_last_look(&c, false, at(0), horizon), "its deadline comes after the next full look");
        assert!(!repeats_last_look(&c, false, at(1), horizon), "the look would arm its timer (300 s away)");
        assert!(!repeats_last_look(&c, false, at(400), horizon), "past its deadline");
        assert!(!repeats_last_look(&c, true, at(0), horizon), "its Lease appeared unheard of");
    }

    #[test]
    fn a_candidate_with_a_lease_a_key_an_adoption_or_not_waiting_is_looked_at_again() {
        let (now, horizon) = (at(0), Duration::from_secs(300));
        let lease = Arc::new(Lease::default());
        let with_lease = Candidate { lease: Some(lease), ..candidate(&job("leased", 0, Phase::Waiting, None)) };
        assert!(!repeats_last_look(&with_lease, true, now, horizon));
        let keyed = candidate(&job("keyed", 0, Phase::Waiting, Some("k")));
        assert!(!repeats_last_look(&keyed, false, now, horizon));
        let running = candidate(&job("running", 0, Phase::Running, None));
        assert!(!repeats_last_look(&running, false, now, horizon), "a takeover is judged on its Lease's clock");
        let extra = ExtraLease {
            namespace: "ns".into(),
            name: "slot".into(),
            seen: None,
            label: "bgjobs.dev/slot",
            expired_tenure: None,
            job_may_run: false,
        };
        let adopting = Candidate { adopted_slot: Some(extra), ..candidate(&job("adopting", 0, Phase::Waiting, None)) };
        assert!(!repeats_last_look(&adopting, false, now, horizon));
    }

    fn versioned(j: &Arc<BackgroundJob>, rv: &str) -> Arc<BackgroundJob> {
        let mut j = (**j).clone();
        j.metadata.resource_version = Some(rv.into());
        Arc::new(j)
    }

    #[test]
    fn a_full_look_keeps_unchanged_candidates_and_looks_at_them_again_a_chunk_per_pass() {
        let n = SWEEP_CHUNK * 2 + 5;
        let (mut b, jobs) = indexed_candidates(n);
        // The same versions, as new copies (a re-list), and one job that changed.
        let mut listed = copies(&jobs);
        listed[7] = versioned(&job("j00007", 7, Phase::Running, None), "2");
        assert!(b.resync(listed.clone()).is_empty());
        assert_eq!(b.runnable().count(), n - 1, "only the changed job is withdrawn");
        assert!(Arc::ptr_eq(&b.runnable_candidate("uid-j00000").unwrap().job, &listed[0]), "the cache's copy");
        assert!(Arc::ptr_eq(b.job("uid-j00001").unwrap(), &listed[1]));
        let mut looked = HashSet::new();
        let first = b.take_dirty(Instant::now()).all();
        assert!(first.contains(&"uid-j00007".to_string()), "a changed job is looked at in the next pass");
        assert!(first.len() <= SWEEP_CHUNK + 1, "{} looks in one pass", first.len());
        looked.extend(first);
        while b.sweeping() {
            let next = b.take_dirty(Instant::now()).all();
            assert!(!next.is_empty() && next.len() <= SWEEP_CHUNK, "{} looks in one pass", next.len());
            looked.extend(next);
        }
        assert_eq!(looked.len(), n, "every job is looked at again");
        assert_eq!(b.depth().values().sum::<i64>(), (n - 1) as i64);
        assert_eq!(b.running().count(), 1);
    }

    #[test]
    fn a_full_look_walks_a_chunk_per_pass_and_leaves_the_jobs_changed_since_its_listing_alone() {
        let (mut b, jobs) = indexed_candidates(WALK_CHUNK * 2 + 3);
        // The listing, as the cache held it when the look began: every indexed job but one whose deletion the
        // index missed, plus one whose creation it missed.
        let missed_deletion = "uid-j00004";
        let missed_creation = versioned(&job("missed", 9_000, Phase::Waiting, None), "1");
        let mut listed: Vec<_> =
            copies(&jobs).into_iter().filter(|j| j.uid().as_deref() != Some(missed_deletion)).collect();
        listed.push(missed_creation);
        b.begin_full_look(listed.clone());
        // Watch events after the listing, taken while the look walks: they are newer than what it listed.
        let started = versioned(&job("j00002", 2, Phase::Running, None), "2");
        b.upsert(started);
        assert!(b.remove("uid-j00003").is_some(), "deleted after the listing");
        b.upsert(versioned(&job("created", 9_001, Phase::Waiting, None), "3"));
        let steps = listed.len().div_ceil(WALK_CHUNK);
        for step in 1..steps {
            assert!(b.walk(WALK_CHUNK).is_none(), "the walk ended after {step} of {steps} chunks");
            assert!(b.sweeping());
        }
        let removed = b.walk(WALK_CHUNK).expect("the walk ends with its last chunk");
        assert_eq!(removed.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["j00004"], "only the missed deletion");
        assert!(b.walk(WALK_CHUNK).is_none(), "no walk under way any more");
        assert_eq!(b.job("uid-j00002").unwrap().resource_version().as_deref(), Some("2"), "the newer version stays");
        assert!(b.job("uid-j00003").is_none(), "a job deleted since the listing is not brought back");
        assert!(b.job("uid-created").is_some(), "a job created since the listing stays");
        assert!(b.job("uid-missed").is_some(), "a job the index missed is added");
        assert_eq!(b.running().count(), 1);
        assert_eq!(b.depth().values().sum::<i64>(), (jobs.len() - 3 + 2) as i64);
        // Then the sweep looks at every unchanged job again, a chunk per pass.
        let mut looked = HashSet::new();
        while b.sweeping() {
            looked.extend(b.take_dirty(Instant::now()).all());
        }
        assert_eq!(looked.len(), jobs.len() - 2 + 2, "every job present is looked at: {}", looked.len());
    }

    /// Why a skip reads the job it defers to before it is written (`keys::still_ahead`): a re-list's look brings in
    /// a job created during the watch's gap a chunk at a time, and drops the ones deleted in it only as its walk ends.
    #[test]
    fn a_relists_look_can_show_a_skip_job_from_the_gap_deferring_to_a_job_deleted_in_it_until_its_walk_ends() {
        let (mut b, jobs) = indexed_candidates(WALK_CHUNK * 2);
        b.upsert(versioned(&job("ahead", 0, Phase::Running, Some("k")), "1"));
        b.take_dirty(Instant::now());
        // In the gap: "ahead" deleted, a Skip job of its key created (walked first: the walk takes the listing's end).
        let mut skipper = (*job("skipper", 9_000, Phase::Waiting, Some("k"))).clone();
        skipper.spec.concurrency_policy = Some(crate::api::ConcurrencyPolicy::Skip);
        let mut listed = copies(&jobs);
        listed.push(versioned(&Arc::new(skipper), "2"));
        b.begin_full_look(listed);
        assert!(b.walk(WALK_CHUNK).is_none(), "the walk goes on");
        assert!(b.take_dirty(Instant::now()).all().contains(&"uid-skipper".to_string()), "looked at in this pass");
        assert!(
            matches!(b.turn("uid-skipper"), Some(KeyVerdict::Skip { deferred_to }) if deferred_to.name == "ahead"),
            "mid-walk, the index still holds the deleted job: {:?}",
            b.turn("uid-skipper")
        );
        while b.walk(WALK_CHUNK).is_none() {}
        b.take_dirty(Instant::now());
        assert_eq!(b.turn("uid-skipper"), Some(&KeyVerdict::Turn), "once the walk has ended");
    }

    #[test]
    fn re_lists_in_a_row_do_not_keep_a_full_look_from_ending() {
        let (mut b, jobs) = indexed_candidates(WALK_CHUNK * 3);
        let listed: Vec<_> = copies(&jobs).into_iter().filter(|j| j.uid().as_deref() != Some("uid-j00004")).collect();
        let (mut removed, mut begun, mut looked) = (Vec::new(), 0, HashSet::new());
        // A watch re-lists before every pass.
        for pass in 0..40 {
            let busy = b.walk.is_some() || b.next_sweep.is_some();
            let began = b.full_look(true, || listed.clone());
            assert!(!(busy && began), "pass {pass}: a look began while another walked, or a sweep waited");
            begun += usize::from(began);
            removed.extend(b.walk(WALK_CHUNK).unwrap_or_default());
            looked.extend(b.take_dirty(Instant::now()).all());
        }
        assert_eq!(removed.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["j00004"], "the first walk ended");
        assert!(b.job("uid-j00004").is_none());
        assert!(listed.iter().all(|j| looked.contains(&j.uid().unwrap())), "every job was looked at again");
        assert!(begun >= 3, "a look asked for during another begins when that one ends: {begun} begun");
    }

    #[test]
    fn a_re_list_during_a_sweep_is_walked_at_once() {
        let (mut b, jobs) = indexed_candidates(SWEEP_CHUNK * 5);
        assert!(b.full_look(true, || copies(&jobs)));
        while b.walk(WALK_CHUNK).is_none() {}
        b.take_dirty(Instant::now());
        assert!(b.sweeping(), "the first look still sweeps");
        // The watch's gap: j00004 was deleted and j00009 started; only the re-list tells.
        let mut gap: Vec<_> = copies(&jobs).into_iter().filter(|j| j.uid().as_deref() != Some("uid-j00004")).collect();
        gap[8] = versioned(&job("j00009", 9, Phase::Running, None), "2");
        assert!(b.full_look(true, || gap.clone()), "the re-list's look begins at once");
        let mut removed = Vec::new();
        for _ in 0..gap.len().div_ceil(WALK_CHUNK) {
            removed.extend(b.walk(WALK_CHUNK).unwrap_or_default());
            b.take_dirty(Instant::now());
        }
        assert_eq!(removed.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["j00004"]);
        assert_eq!(b.job("uid-j00009").unwrap().resource_version().as_deref(), Some("2"));
        // Both sweeps run to their end: the back of the queue is reached.
        let mut looked = HashSet::new();
        while b.sweeping() {
            looked.extend(b.take_dirty(Instant::now()).all());
        }
        assert!(looked.contains(&format!("uid-j{:05}", jobs.len() - 1)), "the back of the queue is reached");
    }

    #[test]
    fn a_look_asked_for_during_a_walk_begins_once_after_it() {
        let (mut b, jobs) = indexed_candidates(WALK_CHUNK * 2);
        let nothing = || -> Vec<Arc<BackgroundJob>> { unreachable!("no look may begin now") };
        assert!(b.full_look(true, || copies(&jobs)));
        assert!(!b.full_look(true, nothing), "asked for during the walk: it begins later");
        let mut begun = 0;
        for _ in 0..40 {
            begun += usize::from(b.full_look(false, || copies(&jobs)));
            b.walk(WALK_CHUNK);
            b.take_dirty(Instant::now());
        }
        assert_eq!(begun, 1, "the look asked for began once");
        assert!(!b.sweeping(), "and both looks ended");
        assert!(!b.full_look(false, nothing), "nothing more was asked for");
    }

    #[test]
    fn a_full_look_looks_at_the_head_at_once_and_at_changes_between_its_chunks_as_the_index_has_them() {
        let (mut b, jobs) = indexed_candidates(WALK_CHUNK * 2);
        let listed = copies(&jobs);
        assert!(b.full_look(true, || listed.clone()));
        let first = b.take_dirty(Instant::now()).all();
        assert_eq!(first.len(), SWEEP_HEAD, "the head's candidates are looked at in the next pass");
        assert!(first.contains(&"uid-j00000".to_string()));
        assert!(b.walk(WALK_CHUNK).is_none());
        // The listing is walked from its end: the first chunk compared the later half.
        let compared = listed.iter().filter(|j| Arc::ptr_eq(b.job(&j.uid().unwrap()).unwrap(), j)).count();
        assert_eq!(compared, WALK_CHUNK, "one chunk compared");
        // Between chunks: a job already compared is deleted, one not yet reached starts running.
        let (last, early) = (format!("uid-j{:05}", WALK_CHUNK * 2 - 1), "uid-j00001");
        assert!(b.remove(&last).is_some());
        b.upsert(versioned(&job("j00001", 1, Phase::Running, None), "2"));
        assert_eq!(b.walk(WALK_CHUNK).map(|gone| gone.len()), Some(0), "nothing more to drop");
        assert!(b.job(&last).is_none(), "the deleted job stays deleted");
        assert_eq!(b.job(early).unwrap().resource_version().as_deref(), Some("2"), "the newer version stays");
        assert_eq!(b.running().count(), 1);
    }

    /// `n` waiting jobs, one per second of creation, indexed and made candidates, at resourceVersion "1".
    fn indexed_candidates(n: usize) -> (Backlog, Vec<Arc<BackgroundJob>>) {
        let mut b = Backlog::default();
        let jobs: Vec<_> =
            (0..n).map(|i| versioned(&job(&format!("j{i:05}"), i as i64, Phase::Waiting, None), "1")).collect();
        for j in &jobs {
            b.upsert(j.clone());
        }
        for uid in b.take_dirty(Instant::now()).all() {
            let j = b.job(&uid).unwrap().clone();
            b.set_runnable(&uid, candidate(&j));
        }
        (b, jobs)
    }

    fn copies(jobs: &[Arc<BackgroundJob>]) -> Vec<Arc<BackgroundJob>> {
        jobs.iter().map(|j| Arc::new((**j).clone())).collect()
    }

    #[test]
    fn a_full_look_looks_at_the_head_of_the_queue_first_and_finished_jobs_last() {
        let (mut b, mut jobs) = indexed_candidates(SWEEP_CHUNK * 3);
        // The first-created job has finished: it goes behind every unfinished one.
        jobs[0] = versioned(&job("j00000", 0, Phase::Succeeded, None), "1");
        b.upsert(jobs[0].clone());
        b.take_dirty(Instant::now());
        b.resync(copies(&jobs));
        let first = b.take_dirty(Instant::now()).all();
        assert!(first.contains(&"uid-j00001".to_string()), "the head is looked at in the first pass");
        let mut passes = vec![first];
        while b.sweeping() {
            passes.push(b.take_dirty(Instant::now()).all());
        }
        assert_eq!(passes.len(), 3);
        assert!(passes[2].contains(&"uid-j00000".to_string()), "the finished job is looked at last");
        assert!(passes[2].contains(&format!("uid-j{:05}", jobs.len() - 1)));
    }

    #[test]
    fn a_job_not_yet_claimed_keeps_its_candidacy_through_a_full_look() {
        // No status yet: its place comes from its resourceVersion, which a copy of the same version shares.
        let mut b = Backlog::default();
        let mut fresh = (*job("fresh", 1, Phase::Waiting, None)).clone();
        fresh.status = None;
        let fresh = versioned(&Arc::new(fresh), "5");
        assert_eq!(crate::ordering::enqueue_sequence(&fresh), Some(5));
        b.upsert(fresh.clone());
        b.take_dirty(Instant::now());
        b.set_runnable("uid-fresh", candidate(&fresh));
        let copy = Arc::new((*fresh).clone());
        b.resync(vec![copy.clone()]);
        assert!(Arc::ptr_eq(&b.runnable_candidate("uid-fresh").expect("still a candidate").job, &copy));
        assert_eq!(b.take_dirty(Instant::now()).all(), ["uid-fresh"]);
        assert!(!b.sweeping());
    }

    #[test]
    fn depth_and_running_follow_each_change_and_a_resync_drops_jobs_no_longer_listed() {
        let mut b = Backlog::default();
        b.upsert(job("a", 1, Phase::Waiting, None));
        b.upsert(job("b", 2, Phase::Waiting, None));
        assert_eq!(b.depth().values().sum::<i64>(), 2);
        b.upsert(job("a", 1, Phase::Running, None));
        assert_eq!(b.depth().values().sum::<i64>(), 1);
        assert_eq!(b.running().count(), 1);
        let gone = b.resync(vec![job("a", 1, Phase::Succeeded, None)]);
        assert_eq!(gone.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["b"]);
        assert!(b.depth().is_empty());
        assert_eq!((b.running().count(), b.job("uid-a").is_some()), (0, true));
    }
}
