//! Where the FIFO order is decided.
//!
//! bgjobs guarantees this dispatch order among runnable jobs: **priority first (High → Low), then enqueue order,
//! then namespace/name**. Enqueue order is `creationTimestamp` (one-second resolution) refined by the apiserver
//! revision at which the job was created, so jobs created within one second still start in creation order.
//! Requests in flight at once around a second's boundary may commit in the other order than their creation seconds:
//! the second decides. No client saw an order between such concurrent requests; one made after another's answer
//! always comes later.
//! A retried job keeps its original place: it is not pushed behind jobs enqueued after it.
//!
//! A job that cannot run yet (delayed, waiting for its retry) is simply not runnable; it never blocks the jobs
//! behind it. Everything here is a plain function over plain data and a clock.
//!
//! The order is kept within a bound, [`FIFO_BOUND`], not strictly: replicas racing for the head spread over a
//! window of jobs ([`pick`]), so a job may be dispatched after jobs queued behind it, but once it has been at the
//! head for [`OVERDUE_AFTER`] every replica with a free slot goes for it. A fault can hold a job back longer: a
//! replica that created its claim Lease and then stopped (killed, paused, cut off, denied its status write) keeps
//! it from everyone until the Lease has been seen unchanged for a lease duration; the same goes for the exclusive
//! leader and for a control plane that restarts. Such a wait counts against the bound only for what lasts beyond
//! the fault plus one lease duration. The adversarial run's checker (`e2e/history`) holds runs to it.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use jiff::Timestamp;

use crate::api::{BackgroundJob, Priority};

/// A job's place in the queue. Smaller keys run first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QueueKey {
    /// Dispatch priority (higher runs first).
    pub priority: Priority,
    /// `creationTimestamp`, in whole seconds.
    pub created: i64,
    /// Creation revision (see [`enqueue_sequence`]); orders jobs created in the same second.
    pub sequence: i64,
    /// Namespace, then name: the last tie-breaker.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl Ord for QueueKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.created.cmp(&other.created))
            .then(self.sequence.cmp(&other.sequence))
            .then_with(|| self.namespace.cmp(&other.namespace))
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for QueueKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl QueueKey {
    /// The key of a job as the operator sees it.
    pub fn of(job: &BackgroundJob) -> QueueKey {
        QueueKey {
            priority: job.spec.priority,
            created: job.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
            sequence: enqueue_sequence(job).unwrap_or(i64::MAX),
            namespace: job.metadata.namespace.clone().unwrap_or_default(),
            name: job.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// The job's creation revision: recorded in `status.enqueueSequence` at its first claim; before that, its
/// `resourceVersion` while the object is still as created (generation 1, no status written yet). Kubernetes calls
/// resourceVersions opaque; on every etcd3-backed apiserver they are the etcd revision, a number that grows with
/// every write, which is exactly the creation order we need. An edit of the metadata only (labels, annotations)
/// leaves the generation at 1, so such a job is placed by that edit's revision, as if created then. Anything else
/// yields `None` and the job falls back to name order within its second.
pub fn enqueue_sequence(job: &BackgroundJob) -> Option<i64> {
    if let Some(seq) = job.status.as_ref().and_then(|s| s.enqueue_sequence) {
        return Some(seq);
    }
    let untouched = job.status.as_ref().is_none_or(|s| s.phase.is_none() && s.attempts == 0);
    if untouched && job.metadata.generation.unwrap_or(1) <= 1 {
        return job.metadata.resource_version.as_deref().and_then(|rv| rv.parse().ok());
    }
    None
}

/// The time before which a waiting job must not start: its retry time, else its creation + delay.
pub fn not_before(job: &BackgroundJob) -> Option<Timestamp> {
    if let Some(t) = job.status.as_ref().and_then(|s| s.next_attempt_time.as_ref()) {
        return Some(t.0);
    }
    let delay = job.spec.delay_seconds.filter(|d| *d > 0)?;
    job.metadata.creation_timestamp.as_ref()?;
    let created = job.counted_from(Timestamp::MAX);
    // A delay past the end of time means never, not now.
    Some(created.checked_add(jiff::SignedDuration::from_secs(delay)).unwrap_or(Timestamp::MAX))
}

/// How long a job may sit at the head of the queue, passed over in favour of later jobs, before every replica goes
/// for it.
pub const OVERDUE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a job that entered a replica's window is left to the replica that owns it (see [`pick`]) before the
/// others may take it. In a busy queue the owner has usually claimed it within this time, and the others' caches
/// show the claim: a replica that went for it sooner would mostly send a claim bound to be refused (with slots to
/// spare, replicas that took others' jobs at once lost 1.4 to 1.7 claims per job they won). A few watch deliveries
/// and a claim's round trip under load; well under [`OVERDUE_AFTER`], so the FIFO bound does not move.
pub const OWNER_FIRST_FOR: std::time::Duration = std::time::Duration::from_millis(300);

/// The FIFO bound: a runnable job is dispatched at most this long after a job queued behind it, not counting the
/// time a fault held it back (see the module docs). [`OVERDUE_AFTER`] at the head, plus two seconds for the passes
/// of the replicas that then go for it, their claim round trips, and a slot to come free.
pub const FIFO_BOUND: std::time::Duration = std::time::Duration::from_secs(3);

/// A runnable job as the picker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Runnable {
    /// Its place in the queue.
    pub key: QueueKey,
    /// At the head of the queue (among the jobs a strict-FIFO replica would take now) for longer than
    /// [`OVERDUE_AFTER`].
    pub overdue: bool,
    /// In this replica's window for at least [`OWNER_FIRST_FOR`]: the replica that owns it had its turn.
    pub owner_had_its_turn: bool,
    /// The live members that may own it ([`Waiting::owners`]).
    pub owners: Owners,
}

/// The identities of the live members that may own a job: those that run jobs, serve its queue and have room for
/// another attempt (see [`crate::members::Claimer`]), this replica among them, sorted. Shared by the jobs of a queue.
pub type Owners = std::sync::Arc<[String]>;

/// A job of the window [`HeadClocks::mark`] is shown, head first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Its place in the queue.
    pub key: QueueKey,
    /// Its UID.
    pub uid: String,
    /// Whether another replica that owns it gets [`OWNER_FIRST_FOR`] to claim it before this one may. Not for a job
    /// with a concurrency key: its key's Lease lets one claim through anyway (a refused claim costs one key Lease
    /// write), and a key's next job would otherwise wait out a turn at every handoff while its owner is busy.
    pub owner_first: bool,
    /// The live members that may own it: one of them, by rendezvous hashing, during each second ([`pick`]).
    pub owners: Owners,
}

/// Since when each job has been at the head of this replica's view of the queue, what makes a job
/// [`Runnable::overdue`], and since when in its window, what gives another replica's job to this one
/// ([`Runnable::owner_had_its_turn`]).
///
/// Overdue means "passed over at the very head": among the first `free` jobs (those a strict-FIFO replica would take
/// now) for longer than [`OVERDUE_AFTER`]. Time spent deeper in the window or in a backlog does not count, or every
/// replica would go for the same jobs whenever the queue is long. A job that leaves the head starts over when it
/// comes back, and no clock outlives its job's place at the head.
#[derive(Debug, Default)]
pub struct HeadClocks {
    since: std::collections::HashMap<String, std::time::Instant>,
    in_window_since: std::collections::HashMap<String, std::time::Instant>,
}

impl HeadClocks {
    /// The `window` (queue key and UID, head first) as the picker sees it, given `free` slots at `now`, and how long
    /// until the picker may decide otherwise: the next job at the head becomes overdue or, with a free slot, a job's
    /// owner has had its turn (none when no job is waiting to).
    pub fn mark(
        &mut self,
        window: &[Waiting],
        free: usize,
        now: std::time::Instant,
    ) -> (Vec<Runnable>, Option<std::time::Duration>) {
        let at_head: std::collections::HashSet<&str> =
            window.iter().take(free.max(1)).map(|w| w.uid.as_str()).collect();
        self.since.retain(|uid, _| at_head.contains(uid.as_str()));
        let in_window: std::collections::HashSet<&str> = window.iter().map(|w| w.uid.as_str()).collect();
        self.in_window_since.retain(|uid, _| in_window.contains(uid.as_str()));
        let mut next: Option<std::time::Duration> = None;
        let mut wake_in = |left: std::time::Duration| {
            if !left.is_zero() {
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        };
        let runnable = window
            .iter()
            .map(|Waiting { key, uid, owner_first, owners }| {
                let overdue = at_head.contains(uid.as_str()) && {
                    let left = OVERDUE_AFTER.saturating_sub(waited(&mut self.since, uid, now));
                    wake_in(left);
                    left.is_zero()
                };
                let turn_left = OWNER_FIRST_FOR.saturating_sub(waited(&mut self.in_window_since, uid, now));
                if free > 0 && *owner_first {
                    wake_in(turn_left);
                }
                Runnable {
                    key: key.clone(),
                    overdue,
                    owner_had_its_turn: !owner_first || turn_left.is_zero(),
                    owners: owners.clone(),
                }
            })
            .collect();
        (runnable, next)
    }

    /// How many jobs have a clock running at the head (for tests: no clock outlives its job's place at the head).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.since.len()
    }

    /// No clock is running.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

/// Which of the runnable jobs (sorted, head first) this replica should try to claim now.
///
/// With one replica the answer is simply the head `free_slots` jobs. With `workers` replicas racing for the same
/// head, each looks at a window of `free_slots * workers` jobs (all of which are about to start anyway). Each job of
/// the window belongs to one of its [`Runnable::owners`] (rendezvous hashing over the job and `epoch`): a replica
/// takes its own jobs first, in queue order, then, with slots left, the others' by a hash of (its identity, the job,
/// `epoch`), but only those whose owner had its turn ([`OWNER_FIRST_FOR`] in this replica's window): until then the
/// owner has most likely claimed it already, unseen here. Replicas that see the same window and members thus go for
/// disjoint jobs, and claim conflicts stay rare. Only a member with room for another attempt owns jobs (the caller
/// counts `workers` and `owners` so): a slot free here is never spent on a later job while an earlier one waits for a
/// replica that cannot take it. A job whose owner is slow or gone is taken by whoever has slots left once its
/// owner's turn is over. Racing nobody (`workers` 1), a replica takes the head whoever owns it.
///
/// A fixed assignment could pass over the same job forever (a job every replica ranks low, with new jobs always
/// entering the window). Two things prevent that: ownership and ranking change with `epoch` (the caller passes the
/// current second), and overdue jobs come first, in queue order, whatever their rank, so no job sits at the head
/// behind later ones for much longer than [`OVERDUE_AFTER`]. The picks are returned in queue order.
pub fn pick<'a>(
    runnable: &'a [Runnable],
    free_slots: usize,
    workers: usize,
    me: &str,
    epoch: u64,
) -> Vec<&'a QueueKey> {
    if free_slots == 0 || runnable.is_empty() {
        return Vec::new();
    }
    let mut chosen: Vec<usize> = (0..runnable.len()).filter(|&i| runnable[i].overdue).take(free_slots).collect();
    let window = runnable.len().min(free_slots.saturating_mul(workers.max(1)));
    let racing = workers > 1;
    let mut ranked: Vec<(bool, u64, usize)> = (0..window)
        .filter(|i| !chosen.contains(i))
        .filter_map(|i| {
            let key = &runnable[i].key;
            let mine = owner_of(&runnable[i].owners, key, epoch).is_none_or(|owner| owner == me);
            // Its own in queue order; the others' spread over the replicas with slots left.
            let rank = if mine { 0 } else { rank(me, key, epoch) };
            (mine || !racing || runnable[i].owner_had_its_turn).then_some((!mine, rank, i))
        })
        .collect();
    if window > free_slots {
        ranked.sort_unstable();
    }
    let left = free_slots - chosen.len();
    chosen.extend(ranked.into_iter().take(left).map(|(_, _, i)| i));
    chosen.sort_unstable();
    chosen.into_iter().map(|i| &runnable[i].key).collect()
}

/// How many replicas race for the head of the queue, the `workers` of [`pick`]: the live `members`, or the `holders`
/// of claim Leases if more are seen (replicas of an older version without member Leases), unless the head must be
/// taken `in_order`:
/// - under the exclusive strategy only the leader claims: nobody races it;
/// - when a cluster-wide cap leaves fewer free slots than the replica has, the slots are the bottleneck, not the
///   replicas. Spreading over a window would let a replica that does not yet see the head as overdue take the one
///   freed slot for a later job, again and again, while the replicas going for the head lose the slot race.
///
/// Taken in order, every replica goes for the head jobs; the claim Leases decide, and the winner runs the head.
pub fn racing(in_order: bool, members: usize, holders: usize) -> usize {
    if in_order { 1 } else { members.max(holders).max(1) }
}

/// The live member that owns the job at `key` during `epoch` ([`pick`]; none without members).
fn owner_of<'a>(members: &'a [String], key: &QueueKey, epoch: u64) -> Option<&'a str> {
    crate::members::owner(members, &format!("{}/{}#{epoch}", key.namespace, key.name))
}

/// How long `uid` has been where `clocks` time it, its clock started at `now` if it had none.
fn waited(
    clocks: &mut std::collections::HashMap<String, std::time::Instant>,
    uid: &str,
    now: std::time::Instant,
) -> std::time::Duration {
    match clocks.get(uid) {
        Some(since) => now.saturating_duration_since(*since),
        None => {
            clocks.insert(uid.to_owned(), now);
            std::time::Duration::ZERO
        }
    }
}

fn rank(me: &str, key: &QueueKey, epoch: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    me.hash(&mut h);
    epoch.hash(&mut h);
    key.namespace.hash(&mut h);
    key.name.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackgroundJobSpec, BackgroundJobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job(name: &str, priority: Priority, created: i64, rv: &str) -> BackgroundJob {
        let mut j = BackgroundJob::new(
            name,
            serde_json::from_value::<BackgroundJobSpec>(serde_json::json!({"jobName": "noop"})).unwrap(),
        );
        j.spec.priority = priority;
        j.metadata.namespace = Some("ns".into());
        j.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        j.metadata.resource_version = Some(rv.into());
        j.metadata.generation = Some(1);
        j
    }

    fn sorted(jobs: &[BackgroundJob]) -> Vec<String> {
        let mut keys: Vec<QueueKey> = jobs.iter().map(QueueKey::of).collect();
        keys.sort();
        keys.into_iter().map(|k| k.name).collect()
    }

    #[test]
    fn a_delay_past_the_end_of_time_means_never() {
        let mut j = BackgroundJob::new(
            "j",
            serde_json::from_value(serde_json::json!({"jobName": "noop", "delaySeconds": 1_000_000_000_000_i64}))
                .unwrap(),
        );
        j.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(1_700_000_000).unwrap()));
        assert_eq!(not_before(&j), Some(Timestamp::MAX));
    }

    #[test]
    fn higher_priority_runs_first_even_when_enqueued_later() {
        let jobs = [
            job("a", Priority::Low, 100, "5"),
            job("b", Priority::High, 200, "9"),
            job("c", Priority::Normal, 150, "7"),
        ];
        assert_eq!(sorted(&jobs), ["b", "c", "a"]);
    }

    #[test]
    fn jobs_created_in_the_same_second_run_in_creation_revision_order_not_name_order() {
        let jobs = [
            job("zeta", Priority::Normal, 100, "11"),
            job("alpha", Priority::Normal, 100, "12"),
            job("mid", Priority::Normal, 100, "10"),
        ];
        assert_eq!(sorted(&jobs), ["mid", "zeta", "alpha"]);
    }

    #[test]
    fn the_creation_second_outranks_the_revision() {
        // Created concurrently around a second's boundary: "late" committed first but was stamped a second later.
        let jobs = [job("late", Priority::Normal, 101, "10"), job("early", Priority::Normal, 100, "11")];
        assert_eq!(sorted(&jobs), ["early", "late"]);
    }

    #[test]
    fn revisions_compare_as_numbers() {
        let jobs = [job("a", Priority::Normal, 100, "100"), job("b", Priority::Normal, 100, "99")];
        assert_eq!(sorted(&jobs), ["b", "a"]);
    }

    #[test]
    fn a_retried_job_keeps_its_recorded_place() {
        let mut retried = job("retried", Priority::Normal, 100, "500");
        retried.status =
            Some(Box::new(BackgroundJobStatus { attempts: 1, enqueue_sequence: Some(10), ..Default::default() }));
        let fresh = job("fresh", Priority::Normal, 100, "20");
        assert_eq!(sorted(&[fresh, retried]), ["retried", "fresh"]);
    }

    #[test]
    fn a_modified_unclaimed_job_does_not_use_its_newer_revision() {
        let mut edited = job("edited", Priority::Normal, 100, "900");
        edited.metadata.generation = Some(2);
        assert_eq!(enqueue_sequence(&edited), None);
        assert_eq!(sorted(&[edited, job("later", Priority::Normal, 101, "50")]), ["edited", "later"]);
    }

    #[test]
    fn delay_counts_from_the_end_of_the_creation_second_and_retry_time_wins() {
        // Created within second 1000 (the apiserver keeps whole seconds), perhaps at 1000.999: never due before 1031.
        let mut j = job("d", Priority::Normal, 1000, "1");
        j.spec.delay_seconds = Some(30);
        assert_eq!(not_before(&j), Some(Timestamp::from_second(1031).unwrap()));
        j.status = Some(Box::new(BackgroundJobStatus {
            next_attempt_time: Some(Time(Timestamp::from_second(5000).unwrap())),
            ..Default::default()
        }));
        assert_eq!(not_before(&j), Some(Timestamp::from_second(5000).unwrap()));
    }

    fn keys(n: usize) -> Vec<Runnable> {
        (0..n)
            .map(|i| Runnable {
                key: QueueKey::of(&job(&format!("j{i:03}"), Priority::Normal, 100, &i.to_string())),
                overdue: false,
                owner_had_its_turn: true,
                owners: Owners::default(),
            })
            .collect()
    }

    /// `runnable`, each job owned by one of `members`.
    fn owned(mut runnable: Vec<Runnable>, members: &[String]) -> Vec<Runnable> {
        let owners: Owners = members.into();
        for r in &mut runnable {
            r.owners = owners.clone();
        }
        runnable
    }

    #[test]
    fn a_single_worker_takes_exactly_the_head() {
        let k = keys(10);
        let names: Vec<_> = pick(&k, 3, 1, "me", 7).into_iter().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["j000", "j001", "j002"]);
    }

    #[test]
    fn several_workers_stay_within_the_window_and_mostly_pick_different_jobs() {
        let workers = 4;
        let k = owned(keys(100), &crew(workers));
        let mut all = Vec::new();
        for w in 0..workers {
            let picks = pick(&k, 4, workers, &format!("worker-{w}"), 7);
            assert_eq!(picks.len(), 4);
            assert!(picks.iter().all(|p| p.sequence < 16), "picks stay within the first 16 jobs");
            assert!(picks.windows(2).all(|w| w[0] < w[1]), "picks come back in queue order");
            all.extend(picks.into_iter().map(|p| p.name.clone()));
        }
        all.sort();
        all.dedup();
        assert!(all.len() >= 14, "4 workers x 4 slots should mostly pick distinct jobs, got {} distinct", all.len());
    }

    fn crew(n: usize) -> Vec<String> {
        (0..n).map(|w| format!("worker-{w}")).collect()
    }

    /// Whom `members` make the owner of each of `runnable`'s jobs at `epoch` (as `pick` decides it).
    fn owners(runnable: &[Runnable], members: &[String], epoch: u64) -> Vec<String> {
        runnable.iter().map(|r| owner_of(members, &r.key, epoch).unwrap().to_string()).collect()
    }

    #[test]
    fn with_slots_to_spare_a_replica_takes_only_its_own_fresh_jobs_and_the_others_once_their_turn_is_over() {
        let members = crew(4);
        let mut fresh = owned(keys(40), &members);
        for r in &mut fresh {
            r.owner_had_its_turn = false;
        }
        for epoch in 0..20 {
            let owner = owners(&fresh, &members, epoch);
            for w in 0..4 {
                let me = format!("worker-{w}");
                // Ten free slots, a window of 40 jobs that just entered it: only this replica's own jobs, even
                // with slots to spare (the others' jobs are most likely claimed already, unseen here).
                let picks = pick(&fresh, 10, 4, &me, epoch);
                let own = owner.iter().filter(|o| **o == me).count();
                assert_eq!(picks.len(), own.min(10), "epoch {epoch}, {me}");
                for p in &picks {
                    let i = fresh.iter().position(|r| &r.key == *p).unwrap();
                    assert_eq!(owner[i], me, "epoch {epoch}: {me} took {}'s fresh job {}", owner[i], p.name);
                }
                // Once the owners had their turn, the slots left go to the others' jobs too.
                let settled = owned(keys(40), &members);
                assert_eq!(pick(&settled, 10, 4, &me, epoch).len(), 10, "epoch {epoch}, {me}");
            }
        }
    }

    #[test]
    fn racing_nobody_a_replica_takes_the_head_whoever_owns_it() {
        let members = crew(4);
        let mut fresh = owned(keys(10), &members);
        for r in &mut fresh {
            r.owner_had_its_turn = false;
        }
        let owner = owners(&fresh[..3], &members, 7);
        // A replica that owns none of the head three (racing, it would take none of them yet).
        let me = members.iter().find(|m| !owner.contains(m)).expect("four members, three jobs");
        assert!(pick(&fresh, 3, 4, me, 7).iter().all(|p| !["j000", "j001", "j002"].contains(&p.name.as_str())));
        let names: Vec<_> = pick(&fresh, 3, 1, me, 7).into_iter().map(|k| k.name.clone()).collect();
        assert_eq!(names, ["j000", "j001", "j002"]);
    }

    #[test]
    fn an_overdue_job_is_taken_before_its_owners_turn_is_over() {
        let mut fresh = owned(keys(40), &crew(4));
        for r in &mut fresh {
            r.owner_had_its_turn = false;
        }
        fresh[0].overdue = true;
        for w in 0..4 {
            let picks = pick(&fresh, 1, 4, &format!("worker-{w}"), 7);
            assert_eq!(picks.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["j000"]);
        }
    }

    #[test]
    fn each_job_of_the_window_has_one_owner_who_takes_it_first() {
        let members = crew(4);
        let k = owned(keys(100), &members);
        for epoch in 0..20 {
            // A window of 40 for 10 slots each: every replica's own jobs come first, and no two own the same job.
            let mut taken = std::collections::HashMap::new();
            for w in 0..4 {
                let me = format!("worker-{w}");
                let own: Vec<String> = (0..40)
                    .filter(|&i| owner_of(&members, &k[i].key, epoch) == Some(me.as_str()))
                    .map(|i| k[i].key.name.clone())
                    .collect();
                let picks: Vec<String> = pick(&k, 10, 4, &me, epoch).into_iter().map(|p| p.name.clone()).collect();
                let own_picked = picks.iter().filter(|p| own.contains(p)).count();
                assert_eq!(own_picked, own.len().min(10), "worker-{w} takes its own jobs first");
                for p in picks.iter().filter(|p| own.contains(p)) {
                    assert!(taken.insert(p.clone(), w).is_none(), "{p} owned twice");
                }
            }
        }
    }

    #[test]
    fn an_overdue_job_is_picked_by_every_replica_whatever_its_rank() {
        let mut k = owned(keys(40), &crew(4));
        k[5].overdue = true;
        for w in 0..4 {
            let picks = pick(&k, 2, 4, &format!("worker-{w}"), 7);
            assert!(picks.iter().any(|p| p.name == "j005"), "worker-{w} must go for the overdue job: {picks:?}");
            assert_eq!(picks.len(), 2);
        }
    }

    #[test]
    fn overdue_jobs_beyond_the_window_still_come_first_in_queue_order() {
        let mut k = keys(40);
        k[30].overdue = true;
        k[20].overdue = true;
        let names: Vec<_> = pick(&k, 2, 2, "me", 7).into_iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["j020", "j030"]);
    }

    #[test]
    fn the_ranking_changes_from_one_epoch_to_the_next() {
        // Jobs of others that had their turn (this replica's own it takes in queue order).
        let k = owned(keys(40), &crew(8));
        let at = |epoch| pick(&k, 2, 8, "me", epoch).into_iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert!((1..6).any(|e| at(e) != at(0)), "a job ranked low now is not ranked low forever");
    }

    /// With one slot free, the replica whose slot it is takes the head: its own jobs in queue order, and no job of a
    /// replica that has no room (the caller leaves those out of a job's owners). It took a later job it owned, or
    /// ranked higher, while the head waited out the turn of an owner that could not take it.
    #[test]
    fn a_replica_takes_its_own_jobs_in_queue_order_and_owns_all_that_no_one_with_room_can() {
        let mut fresh = keys(4);
        for r in &mut fresh {
            r.owner_had_its_turn = false;
        }
        let names = |picked: Vec<&QueueKey>| picked.into_iter().map(|k| k.name.clone()).collect::<Vec<_>>();
        for epoch in 0..50 {
            // The other member runs as many as it can: "me" owns every job.
            let only_me = owned(fresh.clone(), &["me".to_string()]);
            assert_eq!(names(pick(&only_me, 1, 2, "me", epoch)), ["j000"], "epoch {epoch}");
            assert_eq!(names(pick(&only_me, 2, 2, "me", epoch)), ["j000", "j001"], "epoch {epoch}");
        }
    }

    #[test]
    fn no_free_slot_picks_nothing() {
        assert!(pick(&keys(5), 0, 3, "me", 0).is_empty());
    }

    #[test]
    fn under_the_exclusive_strategy_the_leader_takes_the_head_in_order() {
        let runnable: Vec<Runnable> = (0..8)
            .map(|i| Runnable {
                key: QueueKey::of(&job(&format!("j{i}"), Priority::Normal, 0, &i.to_string())),
                overdue: false,
                owner_had_its_turn: true,
                owners: crew(4).into(),
            })
            .collect();
        let names = |picked: Vec<&QueueKey>| picked.into_iter().map(|k| k.name.clone()).collect::<Vec<_>>();
        // Four live members, one free slot: racing replicas spread over a window of four...
        let spread = (0..20)
            .map(|e| names(pick(&runnable, 1, racing(false, 4, 1), "leader", e)))
            .collect::<std::collections::HashSet<_>>();
        assert!(spread.len() > 1, "{spread:?}");
        // ... but the exclusive leader races nobody: the head, every time.
        for e in 0..20 {
            assert_eq!(names(pick(&runnable, 1, racing(true, 4, 1), "leader", e)), ["j0"]);
            assert_eq!(names(pick(&runnable, 2, racing(true, 4, 1), "leader", e)), ["j0", "j1"]);
        }
    }

    fn window(names: &[&str]) -> Vec<Waiting> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| Waiting {
                key: QueueKey::of(&job(n, Priority::Normal, 0, &i.to_string())),
                uid: format!("uid-{n}"),
                owner_first: true,
                owners: Owners::default(),
            })
            .collect()
    }

    fn overdue(runnable: &[Runnable]) -> Vec<&str> {
        runnable.iter().filter(|r| r.overdue).map(|r| r.key.name.as_str()).collect()
    }

    #[test]
    fn a_job_is_overdue_after_a_second_at_the_head_and_the_wait_says_when() {
        let t0 = std::time::Instant::now();
        let mut clocks = HeadClocks::default();
        // Jobs nobody gets a turn for: only their place at the head times the next look.
        let w: Vec<Waiting> =
            window(&["a", "b", "c"]).into_iter().map(|w| Waiting { owner_first: false, ..w }).collect();
        let (r, next) = clocks.mark(&w, 2, t0);
        assert!(overdue(&r).is_empty());
        assert_eq!(next, Some(OVERDUE_AFTER));
        let (r, next) = clocks.mark(&w, 2, t0 + OVERDUE_AFTER / 4);
        assert!(overdue(&r).is_empty());
        assert_eq!(next, Some(OVERDUE_AFTER * 3 / 4));
        let (r, next) = clocks.mark(&w, 2, t0 + OVERDUE_AFTER);
        assert_eq!(overdue(&r), ["a", "b"], "the head two, not c behind them");
        assert_eq!(next, None);
    }

    #[test]
    fn time_deeper_in_the_window_does_not_count() {
        let t0 = std::time::Instant::now();
        let mut clocks = HeadClocks::default();
        // c waits behind a and b, one free slot, for a long time...
        clocks.mark(&window(&["a", "b", "c"]), 1, t0);
        clocks.mark(&window(&["a", "b", "c"]), 1, t0 + OVERDUE_AFTER * 10);
        assert_eq!(clocks.len(), 1, "only the head has a clock");
        // ... then reaches the head: its clock starts now.
        let (r, next) = clocks.mark(&window(&["c"]), 1, t0 + OVERDUE_AFTER * 10);
        assert!(overdue(&r).is_empty());
        assert_eq!(next, Some(OVERDUE_AFTER));
    }

    fn had_their_turn(runnable: &[Runnable]) -> Vec<&str> {
        runnable.iter().filter(|r| r.owner_had_its_turn).map(|r| r.key.name.as_str()).collect()
    }

    #[test]
    fn a_job_entering_the_window_gives_its_owner_a_turn_and_the_wait_says_when_it_ends() {
        let t0 = std::time::Instant::now();
        let mut clocks = HeadClocks::default();
        let (r, next) = clocks.mark(&window(&["a", "b"]), 1, t0);
        assert!(had_their_turn(&r).is_empty());
        assert_eq!(next, Some(OWNER_FIRST_FOR), "with a free slot, the pass comes back when the turn is over");
        // c enters the window later: its owner's turn starts then.
        let later = t0 + OWNER_FIRST_FOR / 2;
        let (r, next) = clocks.mark(&window(&["a", "b", "c"]), 1, later);
        assert!(had_their_turn(&r).is_empty());
        assert_eq!(next, Some(OWNER_FIRST_FOR / 2));
        let (r, next) = clocks.mark(&window(&["a", "b", "c"]), 1, t0 + OWNER_FIRST_FOR);
        assert_eq!(had_their_turn(&r), ["a", "b"]);
        assert_eq!(next, Some(OWNER_FIRST_FOR / 2), "c's turn, before a's overdue clock");
        // Without a free slot the turn still runs out, but nothing wakes the pass for it.
        let mut busy = HeadClocks::default();
        let (_, next) = busy.mark(&window(&["a", "b"]), 0, t0);
        assert_eq!(next, Some(OVERDUE_AFTER));
        // A job that leaves the window starts over when it comes back; the queue empties, no clock is left.
        clocks.mark(&window(&["a"]), 1, t0 + OWNER_FIRST_FOR * 2);
        let (r, _) = clocks.mark(&window(&["a", "b"]), 1, t0 + OWNER_FIRST_FOR * 2);
        assert_eq!(had_their_turn(&r), ["a"]);
        clocks.mark(&[], 1, t0 + OWNER_FIRST_FOR * 3);
        assert!(clocks.in_window_since.is_empty());
    }

    #[test]
    fn a_job_with_a_concurrency_key_is_anyones_at_once() {
        let mut w = window(&["a", "k"]);
        w[1].owner_first = false;
        let (r, next) = HeadClocks::default().mark(&w, 2, std::time::Instant::now());
        assert_eq!(had_their_turn(&r), ["k"]);
        assert_eq!(next, Some(OWNER_FIRST_FOR), "a's turn");
        let (_, next) = HeadClocks::default().mark(&w[1..], 2, std::time::Instant::now());
        assert_eq!(next, Some(OVERDUE_AFTER), "no turn to wait for");
    }

    #[test]
    fn a_job_that_leaves_the_head_starts_over_and_leaves_no_clock_behind() {
        let t0 = std::time::Instant::now();
        let mut clocks = HeadClocks::default();
        clocks.mark(&window(&["a"]), 1, t0);
        // An earlier job (a retry keeps its place) pushes a out of the head for a while.
        clocks.mark(&window(&["x", "a"]), 1, t0 + OVERDUE_AFTER / 2);
        assert_eq!(clocks.len(), 1);
        let (r, _) = clocks.mark(&window(&["a"]), 1, t0 + OVERDUE_AFTER);
        assert!(overdue(&r).is_empty(), "a's wait restarted when it came back");
        // The queue empties: no clock outlives its job.
        clocks.mark(&[], 4, t0 + OVERDUE_AFTER * 2);
        assert!(clocks.is_empty());
    }
}
