//! The exactly-once oracle: handler lines paired into executions, and the one definition of a duplicate.
//!
//! Every consumer judges executions here: the integration tests (`tests/common`), the adversarial tier's checker
//! ([`crate::check`]), the demo and the benchmarks (`bgjobs-history audit`, read by `e2e/report.py`).
//!
//! **An execution** is one handler run: the lines of one (job UID, attempt, replica) from a `start` to its
//! `finish` (the test worker's execution log) or `end` (the operator's audit trail, `--invocation-log`).
//!
//! **A duplicate** is a pair of executions of the same job (same UID) whose intervals intersect: the job ran twice
//! at the same time, which is what bgjobs promises never happens. Two things are deliberately *not* duplicates:
//! - a job that ran again after its first execution was cut short (its replica was killed, paused past its lease,
//!   lost the apiserver): a takeover after a lost lease is the at-least-once half of the promise. Such executions are
//!   counted apart as *re-executions*; a run that injected no fault must have none, and the checker demands a fault
//!   to explain each one. Counting them as duplicates (as the demo and the benchmark once did) would call a correct
//!   takeover a failure, and would hide the real question: did the two runs overlap?
//! - two jobs with the same name: a job deleted and created again (by a user, or by a recurring definition) is a
//!   new job with a new UID. Grouping by name would merge them; grouping by attempt would miss an overlap between
//!   attempt 1 and the attempt 2 that took it over, the very case fencing exists for.
//!
//! Back-to-back executions (one ends at the instant the next starts) do not overlap.
//!
//! How long an execution that never finished lasted is [`Open`]'s question: the test worker's handlers write a
//! `tick` every few tens of milliseconds, so their last line bounds the run (a paused or killed process writes
//! nothing more); the operator's audit trail writes only `start` and `end`, so an unfinished execution may have run
//! until any later time, and the caller names that horizon.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::ExecLine;

/// One handler run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    /// Job UID.
    pub uid: String,
    /// `namespace/name`.
    pub job: String,
    /// Attempt number.
    pub attempt: i32,
    /// Replica identity.
    pub worker: String,
    /// Concurrency key (namespaced), if the job has one.
    pub key: Option<String>,
    /// It held a cluster slot Lease.
    pub slot: bool,
    /// First line (ms).
    pub start: i64,
    /// Last line written (ms): the finish line, or the last tick of a run that never finished.
    pub last: i64,
    /// The finish (or `end`) line's time; `None` if the run never wrote one.
    pub end: Option<i64>,
}

/// Where an execution that never finished is taken to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// At its last line: the log ticks while the handler runs (the test worker's execution logs).
    LastLine,
    /// At this time (ms): the log does not tick (the operator's audit trail), so the run may have gone on until then.
    Until(i64),
}

impl Execution {
    /// The end of its interval: its finish, or for a run that never finished, what `open` says.
    pub fn until(&self, open: Open) -> i64 {
        match (self.end, open) {
            (Some(end), _) => end,
            (None, Open::LastLine) => self.last,
            (None, Open::Until(t)) => t.max(self.start),
        }
    }
}

/// Pair lines into executions, in start order. `offset` is subtracted from each line's time (a replica running
/// under a clock offset). A second `start` of the same (uid, attempt, worker) closes the first one unfinished.
pub fn pair(lines: &[ExecLine], offset: impl Fn(&ExecLine) -> i64) -> Vec<Execution> {
    let t = |l: &ExecLine| l.t_ms - offset(l);
    let mut sorted: Vec<&ExecLine> = lines.iter().collect();
    sorted.sort_by_key(|l| t(l));
    let mut open: BTreeMap<(&str, i32, &str), Execution> = BTreeMap::new();
    let mut done = Vec::new();
    for l in sorted {
        let id = (l.uid.as_str(), l.attempt, l.worker.as_str());
        match l.ev.as_str() {
            "start" => {
                let e = Execution {
                    uid: l.uid.clone(),
                    job: l.job.clone(),
                    attempt: l.attempt,
                    worker: l.worker.clone(),
                    key: l.key.clone(),
                    slot: l.leases.iter().any(|n| n.starts_with("bgjobs-slot-")),
                    start: t(l),
                    last: t(l),
                    end: None,
                };
                if let Some(previous) = open.insert(id, e) {
                    done.push(previous);
                }
            }
            ev => {
                if let Some(e) = open.get_mut(&id) {
                    e.last = e.last.max(t(l));
                    if ev == "finish" || ev == "end" {
                        e.end = Some(e.last);
                        done.extend(open.remove(&id));
                    }
                }
            }
        }
    }
    done.extend(open.into_values());
    done.sort_by_key(|e| e.start);
    done
}

/// Pairs of executions that intersect in time, among those `group` puts together (`None`: not grouped).
pub fn overlapping(
    execs: &[Execution],
    open: Open,
    group: impl Fn(&Execution) -> Option<String>,
) -> Vec<(&Execution, &Execution)> {
    let mut groups: BTreeMap<String, Vec<&Execution>> = BTreeMap::new();
    for e in execs {
        if let Some(g) = group(e) {
            groups.entry(g).or_default().push(e);
        }
    }
    let mut out = Vec::new();
    for list in groups.values() {
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if a.start < b.until(open) && b.start < a.until(open) {
                    out.push((*a, *b));
                }
            }
        }
    }
    out
}

/// Duplicates: pairs of executions of one job (one UID) that ran at the same time (see the module docs).
pub fn duplicates(execs: &[Execution], open: Open) -> Vec<(&Execution, &Execution)> {
    overlapping(execs, open, |e| Some(e.uid.clone()))
}

/// Pairs of executions on two different replicas that intersect in time: what the exclusive strategy forbids.
pub fn across_replicas<'a>(
    execs: impl IntoIterator<Item = &'a Execution>,
    open: Open,
) -> Vec<(&'a Execution, &'a Execution)> {
    let mut sorted: Vec<&Execution> = execs.into_iter().collect();
    sorted.sort_by_key(|e| e.start);
    let mut out = Vec::new();
    for (i, a) in sorted.iter().enumerate() {
        for b in sorted[i + 1..].iter().take_while(|b| b.start < a.until(open)) {
            if b.worker != a.worker && a.start < b.until(open) {
                out.push((*a, *b));
            }
        }
    }
    out
}

/// Re-executions: executions beyond the first of each job. Legitimate after a fault (a takeover), a failure
/// without one.
pub fn re_executions(execs: &[Execution]) -> usize {
    let mut per_job: BTreeMap<&str, usize> = BTreeMap::new();
    for e in execs {
        *per_job.entry(e.uid.as_str()).or_default() += 1;
    }
    per_job.values().map(|n| n - 1).sum()
}

/// The most executions running at one instant, and the first instant it was reached.
pub fn peak<'a>(execs: impl IntoIterator<Item = &'a Execution>, open: Open) -> (usize, i64) {
    let mut points: Vec<(i64, i32)> = Vec::new();
    for e in execs {
        points.push((e.start, 1));
        points.push((e.until(open), -1));
    }
    // Ends sort before starts at the same instant: back-to-back executions do not overlap.
    points.sort();
    let (mut cur, mut best, mut at) = (0i32, 0i32, 0i64);
    for (t, d) in points {
        cur += d;
        if cur > best {
            (best, at) = (cur, t);
        }
    }
    (best as usize, at)
}

/// The most executions running at one instant.
pub fn max_overlap<'a>(execs: impl IntoIterator<Item = &'a Execution>, open: Open) -> usize {
    peak(execs, open).0
}

/// What the demo and the benchmarks report of a run's executions (`bgjobs-history audit`, as JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Audit {
    /// Executions seen.
    pub executions: usize,
    /// Jobs (UIDs) that started at least once.
    pub started: usize,
    /// Duplicates: pairs of executions of one job that overlapped (must be 0).
    pub duplicates: usize,
    /// Executions beyond each job's first (must be 0 where no fault was injected).
    pub re_executions: usize,
    /// Executions that never finished.
    pub unended: usize,
    /// First start (ms).
    pub first_start_ms: Option<i64>,
    /// Last finish (ms).
    pub last_end_ms: Option<i64>,
    /// First start to last finish (ms).
    pub makespan_ms: Option<i64>,
    /// Time spent inside handlers, summed over finished executions (ms).
    pub busy_ms: i64,
    /// The longest time between two consecutive starts across the fleet (ms): a pause of every replica's dispatch
    /// at once shows here (a backlog drain should have none longer than a claim's round trip); one replica's pause
    /// while others start jobs does not.
    #[serde(default)]
    pub longest_start_gap_ms: i64,
    /// Executions per replica.
    pub per_worker: BTreeMap<String, usize>,
    /// Each replica's first start (ms).
    pub first_start_by_worker: BTreeMap<String, i64>,
    /// Per job (`namespace/name`): its first start and how many executions it had; filled on request (`--jobs`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jobs: BTreeMap<String, JobRuns>,
    /// One line per duplicate.
    pub duplicate_pairs: Vec<String>,
}

/// One job's executions, in [`Audit::jobs`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRuns {
    /// Job UID.
    pub uid: String,
    /// First start (ms).
    pub first_start_ms: i64,
    /// Executions.
    pub executions: usize,
}

/// Audit `execs`: figures and the duplicates. `per_job` fills [`Audit::jobs`].
pub fn audit(execs: &[Execution], open: Open, per_job: bool) -> Audit {
    let mut a = Audit {
        executions: execs.len(),
        re_executions: re_executions(execs),
        unended: execs.iter().filter(|e| e.end.is_none()).count(),
        first_start_ms: execs.iter().map(|e| e.start).min(),
        last_end_ms: execs.iter().filter_map(|e| e.end).max(),
        busy_ms: execs.iter().filter_map(|e| Some(e.end? - e.start)).sum(),
        ..Audit::default()
    };
    a.started = a.executions - a.re_executions;
    let mut starts: Vec<i64> = execs.iter().map(|e| e.start).collect();
    starts.sort_unstable();
    a.longest_start_gap_ms = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    if let (Some(first), Some(last)) = (a.first_start_ms, a.last_end_ms) {
        a.makespan_ms = Some(last - first);
    }
    for e in execs {
        *a.per_worker.entry(e.worker.clone()).or_default() += 1;
        let first = a.first_start_by_worker.entry(e.worker.clone()).or_insert(e.start);
        *first = (*first).min(e.start);
        if per_job {
            let runs = a.jobs.entry(e.job.clone()).or_insert_with(|| JobRuns {
                uid: e.uid.clone(),
                first_start_ms: e.start,
                executions: 0,
            });
            runs.first_start_ms = runs.first_start_ms.min(e.start);
            runs.executions += 1;
        }
    }
    for (x, y) in duplicates(execs, open) {
        a.duplicate_pairs.push(format!(
            "{} ran as attempt {} on {} [{}..{}] and attempt {} on {} [{}..{}]",
            x.job,
            x.attempt,
            x.worker,
            x.start,
            x.until(open),
            y.attempt,
            y.worker,
            y.start,
            y.until(open)
        ));
    }
    a.duplicates = a.duplicate_pairs.len();
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ev: &str, job: &str, attempt: i32, worker: &str, t_ms: i64) -> ExecLine {
        ExecLine::at(ev, job, attempt, worker, t_ms)
    }

    /// The operator's audit trail for one execution: a start and an end line.
    fn ran(job: &str, attempt: i32, worker: &str, from: i64, to: i64) -> Vec<ExecLine> {
        vec![line("start", job, attempt, worker, from), line("end", job, attempt, worker, to)]
    }

    fn pairs(lines: &[ExecLine]) -> Vec<Execution> {
        pair(lines, |_| 0)
    }

    #[test]
    fn the_operators_audit_trail_line_is_read_as_written() {
        // Exactly what `--invocation-log` writes (src/worker.rs): `event`, not `ev`, and `end`, not `finish`.
        let text = r#"{"event":"start","uid":"u1","job":"ns/a","attempt":1,"worker":"r-1","t_ms":100}
{"event":"end","uid":"u1","job":"ns/a","attempt":1,"worker":"r-1","t_ms":250}"#;
        let lines: Vec<ExecLine> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let execs = pairs(&lines);
        assert_eq!(execs.len(), 1);
        assert_eq!((execs[0].start, execs[0].end, execs[0].worker.as_str()), (100, Some(250), "r-1"));
    }

    #[test]
    fn one_run_per_job_has_no_duplicate_and_no_re_execution() {
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("b", 1, "r2", 50, 150));
        let execs = pairs(&lines);
        let a = audit(&execs, Open::LastLine, false);
        assert_eq!((a.executions, a.started, a.duplicates, a.re_executions, a.unended), (2, 2, 0, 0, 0));
        assert_eq!((a.makespan_ms, a.busy_ms), (Some(150), 200));
    }

    #[test]
    fn two_attempts_of_one_job_at_once_are_a_duplicate() {
        // A stale holder kept running attempt 1 while attempt 2 ran elsewhere: the case fencing exists for.
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("a", 2, "r2", 50, 150));
        let execs = pairs(&lines);
        assert_eq!(duplicates(&execs, Open::LastLine).len(), 1);
        let a = audit(&execs, Open::LastLine, false);
        assert_eq!((a.duplicates, a.re_executions), (1, 1));
        assert!(a.duplicate_pairs[0].starts_with("ns/a ran as attempt 1 on r1"), "{:?}", a.duplicate_pairs);
    }

    #[test]
    fn a_takeover_after_the_first_run_ended_is_a_re_execution_not_a_duplicate() {
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("a", 2, "r2", 200, 300));
        let a = audit(&pairs(&lines), Open::LastLine, false);
        assert_eq!((a.duplicates, a.re_executions, a.started), (0, 1, 1));
    }

    #[test]
    fn back_to_back_runs_of_one_job_do_not_overlap() {
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("a", 2, "r2", 100, 200));
        let execs = pairs(&lines);
        assert!(duplicates(&execs, Open::LastLine).is_empty());
        assert_eq!(max_overlap(&execs, Open::LastLine), 1);
    }

    #[test]
    fn two_jobs_with_one_name_but_different_uids_are_not_duplicates() {
        // Deleted and created again under the same name while the first still ran: two jobs.
        let mut lines = ran("a", 1, "r1", 0, 100);
        let mut again = ran("a", 1, "r2", 50, 150);
        for l in &mut again {
            l.uid = "uid-a-recreated".into();
        }
        lines.extend(again);
        let a = audit(&pairs(&lines), Open::LastLine, true);
        assert_eq!((a.duplicates, a.re_executions, a.started), (0, 0, 2));
    }

    #[test]
    fn an_unfinished_run_in_a_log_that_does_not_tick_lasts_until_the_horizon() {
        // r1 was killed (or paused) after its start line; r2 took over at 500. Without ticks, nothing says r1's
        // handler had stopped by then.
        let mut lines = vec![line("start", "a", 1, "r1", 0)];
        lines.extend(ran("a", 2, "r2", 500, 600));
        let execs = pairs(&lines);
        assert_eq!(duplicates(&execs, Open::Until(1_000)).len(), 1);
        assert!(duplicates(&execs, Open::Until(400)).is_empty(), "a horizon before the takeover sees none");
        assert_eq!(audit(&execs, Open::Until(1_000), false).unended, 1);
    }

    #[test]
    fn an_unfinished_run_in_a_ticking_log_ends_at_its_last_tick() {
        let mut lines = vec![line("start", "a", 1, "r1", 0), line("tick", "a", 1, "r1", 50)];
        lines.extend(ran("a", 2, "r2", 500, 600));
        let execs = pairs(&lines);
        assert!(duplicates(&execs, Open::LastLine).is_empty());
        assert_eq!(execs[0].until(Open::LastLine), 50);
    }

    #[test]
    fn a_second_start_of_one_attempt_on_one_replica_closes_the_first_unfinished() {
        let lines =
            vec![line("start", "a", 1, "r1", 0), line("start", "a", 1, "r1", 100), line("end", "a", 1, "r1", 200)];
        let execs = pairs(&lines);
        assert_eq!(execs.len(), 2);
        assert_eq!((execs[0].end, execs[1].end), (None, Some(200)));
    }

    #[test]
    fn runs_on_two_replicas_at_once_overlap_across_replicas_and_runs_on_one_do_not() {
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("b", 1, "r1", 50, 150)); // same replica: allowed
        lines.extend(ran("c", 1, "r2", 140, 200)); // overlaps b on another replica
        lines.extend(ran("d", 1, "r2", 200, 300)); // back to back with c, after b
        let execs = pairs(&lines);
        let found: Vec<(&str, &str)> =
            across_replicas(&execs, Open::LastLine).iter().map(|(x, y)| (x.job.as_str(), y.job.as_str())).collect();
        assert_eq!(found, vec![("ns/b", "ns/c")]);
    }

    #[test]
    fn the_peak_counts_executions_running_at_one_instant() {
        let mut lines = ran("a", 1, "r1", 0, 100);
        lines.extend(ran("b", 1, "r1", 10, 90));
        lines.extend(ran("c", 1, "r1", 20, 30));
        lines.extend(ran("d", 1, "r1", 100, 200));
        assert_eq!(peak(&pairs(&lines), Open::LastLine), (3, 20));
    }

    #[test]
    fn the_audit_counts_per_replica_and_per_job() {
        let mut lines = ran("a", 1, "r1", 10, 100);
        lines.extend(ran("b", 1, "r2", 40, 90));
        lines.extend(ran("b", 2, "r1", 200, 250));
        let a = audit(&pairs(&lines), Open::LastLine, true);
        assert_eq!(a.per_worker, BTreeMap::from([("r1".into(), 2), ("r2".into(), 1)]));
        assert_eq!(a.first_start_by_worker, BTreeMap::from([("r1".into(), 10), ("r2".into(), 40)]));
        assert_eq!(a.jobs["ns/b"], JobRuns { uid: "uid-b".into(), first_start_ms: 40, executions: 2 });
        assert_eq!((a.first_start_ms, a.last_end_ms, a.makespan_ms), (Some(10), Some(250), Some(240)));
        assert_eq!(a.longest_start_gap_ms, 160, "starts at 10, 40, 200: nothing started between 40 and 200");
    }
}
