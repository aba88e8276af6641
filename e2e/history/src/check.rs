//! The invariants, checked over a recorded [`History`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::executions::{Execution, Open, across_replicas, duplicates, overlapping, pair, peak};
use crate::model::{FaultLine, History, LeaseLine, StatusLine};

/// What the run promised, against which the history is checked.
#[derive(Clone, Debug)]
pub struct Limits {
    /// `--cluster-max-concurrency`, if set.
    pub cluster_cap: Option<usize>,
    /// `--max-concurrent-jobs-per-instance`.
    pub per_replica_cap: Option<usize>,
    /// The lease duration: a re-execution is explained by a fault at most this long before or after its attempt.
    pub lease_ms: i64,
    /// Recurring: how old a tick may be when its job is created (the catch-up rule); `None`: not checked.
    pub catch_up_ms: Option<i64>,
    /// The stated FIFO bound (bgjobs' `ordering` module): a job is dispatched at most this long after a job queued
    /// behind it, not counting the time a fault held it back (see [`check`]); `None`: only measured.
    pub fifo_bound_ms: Option<i64>,
    /// The exclusive strategy: no two replicas ever run jobs at the same instant.
    pub exclusive: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cluster_cap: None,
            per_replica_cap: None,
            lease_ms: 15_000,
            catch_up_ms: None,
            fifo_bound_ms: None,
            exclusive: false,
        }
    }
}

/// The figures of one run, and a description of every violation.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Jobs seen.
    pub jobs: usize,
    /// Executions (handler runs) seen.
    pub executions: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Jobs that ended without their work done although nothing asked them to fail.
    pub lost: usize,
    /// Jobs not in a final phase at the end.
    pub stuck: usize,
    /// Pairs of executions of one job that overlapped.
    pub overlaps: usize,
    /// Pairs of executions of one concurrency key that overlapped.
    pub key_overlaps: usize,
    /// Exclusive strategy: pairs of executions on two replicas that overlapped.
    pub exclusive_overlaps: usize,
    /// Instants at which a cap was exceeded (cluster or per replica).
    pub cap_violations: usize,
    /// Status changes that went back in attempts or changed hands without a new attempt.
    pub stale_writes: usize,
    /// Re-executions with no fault to explain them.
    pub extra_attempts: usize,
    /// Recurring ticks with more than one job.
    pub duplicate_ticks: usize,
    /// Recurring jobs created for a tick older than the catch-up rule allows.
    pub late_ticks: usize,
    /// Recurring jobs created before their tick (by more than a second, a clock's resolution).
    pub early_ticks: usize,
    /// The longest a job was dispatched after a job queued behind it (ms).
    pub worst_fifo_inversion_ms: i64,
    /// The same, counting only the time no fault explains (ms): what the FIFO bound is checked against.
    pub worst_unexplained_fifo_ms: i64,
    /// Jobs dispatched later than the FIFO bound allows after a job queued behind them.
    pub fifo_violations: usize,
    /// One line per violation.
    pub violations: Vec<String>,
}

impl Report {
    /// No guarantee was broken.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: Vec<String> = self.faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
        write!(
            f,
            "jobs={} executions={} faults=[{}] lost={} stuck={} overlaps={} key_overlaps={} exclusive_overlaps={} \
             cap_violations={} stale_writes={} extra_attempts={} duplicate_ticks={} late_ticks={} early_ticks={} \
             fifo_violations={} worst_fifo_inversion_ms={} worst_unexplained_fifo_ms={}",
            self.jobs,
            self.executions,
            faults.join(" "),
            self.lost,
            self.stuck,
            self.overlaps,
            self.key_overlaps,
            self.exclusive_overlaps,
            self.cap_violations,
            self.stale_writes,
            self.extra_attempts,
            self.duplicate_ticks,
            self.late_ticks,
            self.early_ticks,
            self.fifo_violations,
            self.worst_fifo_inversion_ms,
            self.worst_unexplained_fifo_ms
        )
    }
}

/// How much earlier than its tick a recurring job may appear: what whole-second `Date` headers let replicas agree on.
const EARLY_SLACK_MS: i64 = 2_500;

const FINAL: [&str; 5] = ["Succeeded", "Failed", "Abandoned", "Cancelled", "Skipped"];

/// Check every invariant over `h`.
pub fn check(h: &History, limits: &Limits) -> Report {
    let mut r = Report::default();
    for f in &h.faults {
        *r.faults.entry(f.kind.clone()).or_default() += 1;
    }
    let execs = executions(h);
    r.executions = execs.len();
    let by_uid = status_by_uid(&h.status);
    r.jobs = by_uid.len();
    check_outcomes(h, &by_uid, &execs, limits, &mut r);
    check_overlaps(&execs, &mut r);
    if limits.exclusive {
        check_exclusive(&execs, &mut r);
    }
    check_caps(&execs, limits, &mut r);
    check_status_writes(&by_uid, &mut r);
    check_re_executions(h, &execs, &by_uid, limits, &mut r);
    check_ticks(&by_uid, limits, &mut r);
    check_fifo(h, &execs, &by_uid, limits, &mut r);
    r
}

/// Pair handler lines into executions ([`crate::executions::pair`]); times of a replica running under a clock
/// offset are corrected.
fn executions(h: &History) -> Vec<Execution> {
    let offsets: HashMap<&str, i64> = h
        .faults
        .iter()
        .filter(|f| f.kind == "clock-offset")
        .filter_map(|f| Some((f.target.as_str(), f.detail.trim().parse::<i64>().ok()?)))
        .collect();
    pair(&h.exec, |l| offsets.get(l.clock.as_deref().unwrap_or(&l.worker)).copied().unwrap_or(0))
}

fn status_by_uid(status: &[StatusLine]) -> BTreeMap<String, Vec<&StatusLine>> {
    let mut m: BTreeMap<String, Vec<&StatusLine>> = BTreeMap::new();
    for s in status {
        m.entry(s.uid.clone()).or_default().push(s);
    }
    m
}

/// Faults that may delay a job (FIFO) but never explain an attempt cut short or lost: a replica whose watches lag
/// still reads, writes and renews at once, so a stale view must cost it a refused write, never an attempt.
const CANNOT_CUT_SHORT: [&str; 2] = ["watch-lag", "watch-lag-end"];

/// Whether a fault near `e` (on its worker, or cluster-wide, within a lease duration of its activity) explains
/// why it was cut short.
fn faulted(h: &History, e: &Execution, replicas: &BTreeSet<&str>, lease_ms: i64) -> bool {
    h.faults.iter().filter(|f| !CANNOT_CUT_SHORT.contains(&f.kind.as_str())).any(|f| {
        let near = f.t_ms >= e.start - lease_ms && f.t_ms <= e.last + lease_ms;
        let aimed = f.target == e.worker || !replicas.contains(f.target.as_str());
        near && aimed
    })
}

fn check_outcomes(
    h: &History,
    by_uid: &BTreeMap<String, Vec<&StatusLine>>,
    execs: &[Execution],
    limits: &Limits,
    r: &mut Report,
) {
    let replicas: BTreeSet<&str> = execs.iter().map(|e| e.worker.as_str()).collect();
    for (uid, lines) in by_uid {
        let Some(last) = lines.iter().rev().find(|s| !s.deleted) else { continue };
        if lines.last().is_some_and(|s| s.deleted) && !FINAL.contains(&last.phase.as_str()) {
            continue; // deleted by the run while unfinished: nothing to hold it to
        }
        if !FINAL.contains(&last.phase.as_str()) {
            r.stuck += 1;
            r.violations
                .push(format!("stuck: {} ended the run {:?} (attempt {})", last.job, last.phase, last.attempts));
            continue;
        }
        let worked = execs.iter().any(|e| &e.uid == uid && e.end.is_some());
        let given_up = matches!(last.phase.as_str(), "Failed" | "Abandoned");
        // A job may give up on an attempt its holder really lost (at-most-once jobs, `maxAttempts`): only if a
        // fault explains the loss of its last execution.
        let excused = execs.iter().rfind(|e| &e.uid == uid).is_some_and(|e| faulted(h, e, &replicas, limits.lease_ms));
        if (given_up && !last.expect_retries && !excused) || (last.phase == "Succeeded" && !worked) {
            r.lost += 1;
            r.violations.push(format!(
                "lost: {} ended {} after {} attempts, with {} finished execution(s)",
                last.job,
                last.phase,
                last.attempts,
                execs.iter().filter(|e| &e.uid == uid && e.end.is_some()).count()
            ));
        }
    }
}

fn check_overlaps(execs: &[Execution], r: &mut Report) {
    for (a, b) in duplicates(execs, Open::LastLine) {
        r.overlaps += 1;
        r.violations.push(format!(
            "overlap: {} ran as attempt {} on {} [{}..{}] and attempt {} on {} [{}..{}]",
            a.job, a.attempt, a.worker, a.start, a.last, b.attempt, b.worker, b.start, b.last
        ));
    }
    for (a, b) in overlapping(execs, Open::LastLine, |e| e.key.clone()) {
        if a.uid == b.uid {
            continue;
        }
        r.key_overlaps += 1;
        r.violations.push(format!(
            "key overlap: {} and {} (key {:?}) ran at once [{}..{}] [{}..{}]",
            a.job, b.job, a.key, a.start, a.last, b.start, b.last
        ));
    }
}

fn check_caps(execs: &[Execution], limits: &Limits, r: &mut Report) {
    if let Some(cap) = limits.cluster_cap {
        let (most, at) = peak(execs.iter().filter(|e| e.slot), Open::LastLine);
        if most > cap {
            r.cap_violations += 1;
            r.violations.push(format!("cluster cap: {most} executions at once at {at}, cap {cap}"));
        }
    }
    if let Some(cap) = limits.per_replica_cap {
        let workers: BTreeSet<&str> = execs.iter().map(|e| e.worker.as_str()).collect();
        for w in workers {
            let (most, at) = peak(execs.iter().filter(|e| e.worker == w), Open::LastLine);
            if most > cap {
                r.cap_violations += 1;
                r.violations.push(format!("replica cap: {w} ran {most} executions at once at {at}, cap {cap}"));
            }
        }
    }
}

fn check_status_writes(by_uid: &BTreeMap<String, Vec<&StatusLine>>, r: &mut Report) {
    for lines in by_uid.values() {
        for pair in lines.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.deleted {
                continue;
            }
            let went_back = b.attempts < a.attempts;
            let changed_hands = a.phase == "Running"
                && b.phase == "Running"
                && b.attempts == a.attempts
                && a.worker != b.worker
                && !b.pod;
            if went_back || changed_hands {
                r.stale_writes += 1;
                r.violations.push(format!(
                    "stale write: {} went from {} attempt {} on {:?} to {} attempt {} on {:?}",
                    b.job, a.phase, a.attempts, a.worker, b.phase, b.attempts, b.worker
                ));
            }
        }
    }
}

fn check_re_executions(
    h: &History,
    execs: &[Execution],
    by_uid: &BTreeMap<String, Vec<&StatusLine>>,
    limits: &Limits,
    r: &mut Report,
) {
    let replicas: BTreeSet<&str> = execs.iter().map(|e| e.worker.as_str()).collect();
    let mut of_job: BTreeMap<&str, Vec<&Execution>> = BTreeMap::new();
    for e in execs {
        of_job.entry(e.uid.as_str()).or_default().push(e);
    }
    for (uid, list) in of_job {
        let expect_retries = by_uid.get(uid).and_then(|l| l.first()).is_some_and(|s| s.expect_retries);
        if expect_retries {
            continue;
        }
        // Every execution but the last was cut short; a fault near it must explain why.
        for e in &list[..list.len() - 1] {
            if !faulted(h, e, &replicas, limits.lease_ms) {
                r.extra_attempts += 1;
                r.violations.push(format!(
                    "extra attempt: {} ran attempt {} on {} [{}..{}] and again, with no fault to explain it",
                    e.job, e.attempt, e.worker, e.start, e.last
                ));
            }
        }
    }
}

fn check_ticks(by_uid: &BTreeMap<String, Vec<&StatusLine>>, limits: &Limits, r: &mut Report) {
    let mut per_tick: BTreeMap<(String, i64), BTreeSet<&str>> = BTreeMap::new();
    for (uid, lines) in by_uid {
        let Some(first) = lines.first() else { continue };
        let (Some(def), Some(tick)) = (&first.recurring, first.tick_ms) else { continue };
        per_tick.entry((def.clone(), tick)).or_default().insert(uid.as_str());
        if first.created_ms < tick - EARLY_SLACK_MS {
            r.early_ticks += 1;
            r.violations.push(format!(
                "early tick: {} was created {} ms before its tick",
                first.job,
                tick - first.created_ms
            ));
        }
        if let Some(bound) = limits.catch_up_ms
            && first.created_ms - tick > bound
        {
            r.late_ticks += 1;
            r.violations.push(format!(
                "late tick: {} was created {} ms after its tick, more than the catch-up rule's {bound} ms",
                first.job,
                first.created_ms - tick
            ));
        }
    }
    for ((def, tick), uids) in per_tick {
        if uids.len() > 1 {
            r.duplicate_ticks += 1;
            r.violations.push(format!("duplicate tick: {def} at {tick} made {} jobs", uids.len()));
        }
    }
}

/// Exclusive strategy: at no instant do two replicas run jobs. A Pod's execution belongs to whichever replica
/// watches it (it is adopted across a change of leader), so Pod executions are not judged here.
fn check_exclusive(execs: &[Execution], r: &mut Report) {
    for (o, e) in across_replicas(execs.iter().filter(|e| !e.worker.starts_with("pod:")), Open::LastLine) {
        r.exclusive_overlaps += 1;
        r.violations.push(format!(
            "exclusive overlap: {} ran {} [{}..{}] while {} ran {} [{}..{}]",
            o.worker, o.job, o.start, o.last, e.worker, e.job, e.start, e.last
        ));
    }
}

/// A fault from its injection to the line that ends it (its injection alone for a fault that does not last).
struct Span<'a> {
    fault: &'a FaultLine,
    to: i64,
}

/// Lines that end a lasting fault, by the fault's kind.
const ENDED_BY: [(&str, &str); 6] = [
    ("stop", "cont"),
    ("rbac-remove", "rbac-restore"),
    ("apiserver-restart", "apiserver-up"),
    ("proxy-stall", "proxy-heal"),
    ("watch-lag", "watch-lag-end"),
    ("answer-delay", "answer-delay-end"),
];

/// Faults that can hold a job back: not the lines that end one, nor the conditions of a whole run.
fn spans(faults: &[FaultLine]) -> Vec<Span<'_>> {
    let not_faults = ["start", "clock-offset"];
    faults
        .iter()
        .enumerate()
        .filter(|(_, f)| !not_faults.contains(&f.kind.as_str()) && !ENDED_BY.iter().any(|(_, end)| *end == f.kind))
        .map(|(i, f)| {
            let to = match ENDED_BY.iter().find(|(kind, _)| *kind == f.kind) {
                Some((_, end)) => {
                    faults[i + 1..].iter().find(|g| g.kind == *end && g.target == f.target).map_or(i64::MAX, |g| g.t_ms)
                }
                None => f.t_ms,
            };
            Span { fault: f, to }
        })
        .collect()
}

/// How far a replica's estimate of the apiserver's clock may be off (`src/clock.rs` ignores smaller offsets), so
/// how much earlier than it was a claim time written in a status may look.
const CLAIM_CLOCK_SLACK_MS: i64 = 1_500;

/// FIFO, judged on dispatch (the job first seen Running; for a Pod job, long before its container starts), in the
/// order bgjobs documents: priority, creation second, creation revision, namespace/name.
///
/// For each job `a`, the earliest dispatch of a job queued behind it while `a` was already runnable and still
/// waiting gives its inversion. The time of that inversion covered by a fault that could hold `a` back, from the
/// fault's injection to its end plus a lease duration, is explained; the rest is checked against the bound. A fault
/// holds `a` back when it hits a replica that held one of `a`'s Leases before `a` was dispatched (it claimed `a`
/// and stalled), the exclusive leader of the time, the control plane (target `cluster`), or deletes the exclusive
/// Lease or one of `a`'s own.
fn check_fifo(
    h: &History,
    execs: &[Execution],
    by_uid: &BTreeMap<String, Vec<&StatusLine>>,
    limits: &Limits,
    r: &mut Report,
) {
    // Each unkeyed job that ran, its queue key, when it became runnable and when it was dispatched.
    let mut first_start: HashMap<&str, i64> = HashMap::new();
    for e in execs.iter().filter(|e| e.key.is_none()) {
        let t = first_start.entry(e.uid.as_str()).or_insert(e.start);
        *t = (*t).min(e.start);
    }
    struct Queued<'a> {
        key: (i32, i64, i64, Option<(&'a str, &'a str)>),
        runnable: i64,
        dispatched: i64,
        uid: &'a str,
        job: &'a str,
    }
    let mut jobs: Vec<Queued> = Vec::new();
    for (uid, lines) in by_uid {
        // The earliest of: the first claim recorded, the claim time any status carries, the handler's first start.
        // The recorder misses claims (and whole attempts) while its watch is down: the first Running line it sees
        // may be a later attempt, or a claim made long before the line, and it may see none at all (a Pod job whose
        // whole run fell in an apiserver restart: first seen Succeeded, its container started long after the
        // claim). Every status after a claim carries the claim time of its attempt (`startTime`), never earlier
        // than the first claim. It was written on the claimant's clock, which may run up to CLAIM_CLOCK_SLACK_MS
        // fast: never believed earlier than that allows.
        let seen_running = lines.iter().filter(|s| s.phase == "Running").map(|s| s.t_ms);
        let stated = lines.iter().filter_map(|s| s.started_ms.map(|t| (t + CLAIM_CLOCK_SLACK_MS).min(s.t_ms)));
        let claimed = seen_running.chain(stated).min();
        let started = first_start.get(uid.as_str()).copied();
        let start = claimed.into_iter().chain(started).min();
        let (Some(first), Some(dispatched)) = (lines.first(), start) else { continue };
        if !first_start.contains_key(uid.as_str()) {
            continue; // keyed (its key's turn decides), or never ran
        }
        jobs.push(Queued {
            // The documented order: priority, creation second, creation revision, name. Jobs created around a
            // second's boundary may commit in the other order than their creation seconds say: the second decides.
            key: (-first.priority, first.created_s, first.seq, first.job.split_once('/')),
            runnable: first.created_ms.max(first.not_before_ms.unwrap_or(0)),
            dispatched,
            uid,
            job: first.job.as_str(),
        });
    }
    let spans = spans(&h.faults);
    let exclusive: Vec<&LeaseLine> = h.leases.iter().filter(|l| l.kind == "exclusive").collect();
    let exclusive_names: BTreeSet<&str> = exclusive.iter().map(|l| l.name.as_str()).collect();
    let mut leases_of: HashMap<&str, Vec<&LeaseLine>> = HashMap::new();
    for l in &h.leases {
        if let Some(uid) = l.job_uid.as_deref() {
            leases_of.entry(uid).or_default().push(l);
        }
    }
    let mut worst = 0i64;
    let mut worst_unexplained = 0i64;
    for a in &jobs {
        // The earliest dispatch of a job behind `a` while `a` was runnable and waiting.
        let Some(b) = jobs
            .iter()
            .filter(|b| b.key > a.key && b.dispatched < a.dispatched && a.runnable <= b.dispatched)
            .min_by_key(|b| b.dispatched)
        else {
            continue;
        };
        let (from, to) = (b.dispatched, a.dispatched);
        worst = worst.max(to - from);
        let own = leases_of.get(a.uid).map(Vec::as_slice).unwrap_or_default();
        // Who may have held `a` back: replicas that held its Leases before its dispatch, and the leaders of the time.
        let mut holders: BTreeSet<&str> =
            own.iter().filter(|l| l.t_ms <= to).filter_map(|l| l.holder.as_deref()).collect();
        let leader_then = exclusive.iter().rev().find(|l| l.t_ms <= from);
        let leaders_since = exclusive.iter().filter(|l| l.t_ms > from && l.t_ms <= to);
        holders.extend(leader_then.into_iter().chain(leaders_since).filter_map(|l| l.holder.as_deref()));
        let aimed = |f: &FaultLine| match f.kind.as_str() {
            "lease-delete" => own.iter().any(|l| l.name == f.target) || exclusive_names.contains(f.target.as_str()),
            _ => f.target == "cluster" || holders.contains(f.target.as_str()),
        };
        let mut cover: Vec<(i64, i64)> = spans
            .iter()
            .filter(|s| aimed(s.fault))
            .map(|s| (s.fault.t_ms.max(from), s.to.saturating_add(limits.lease_ms).min(to)))
            .filter(|(s, e)| s < e)
            .collect();
        cover.sort();
        let (mut covered, mut reach) = (0i64, from);
        for (s, e) in cover {
            let s = s.max(reach);
            if e > s {
                covered += e - s;
                reach = e;
            }
        }
        let unexplained = to - from - covered;
        worst_unexplained = worst_unexplained.max(unexplained);
        if let Some(bound) = limits.fifo_bound_ms
            && unexplained > bound
        {
            r.fifo_violations += 1;
            r.violations.push(format!(
                "fifo: {} was dispatched {} ms after {}, which was queued behind it; {unexplained} ms of that no fault \
                 explains (bound {bound} ms)",
                a.job,
                to - from,
                b.job
            ));
        }
    }
    r.worst_fifo_inversion_ms = worst;
    r.worst_unexplained_fifo_ms = worst_unexplained;
}

#[cfg(test)]
mod tests;
