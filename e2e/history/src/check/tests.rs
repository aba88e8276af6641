//! Hand-made histories, one per invariant: each is caught, and a clean run reports none.

use super::*;
use crate::model::{ExecLine, FaultLine, LeaseLine};

fn exec(ev: &str, job: &str, attempt: i32, worker: &str, t_ms: i64) -> ExecLine {
    ExecLine::at(ev, job, attempt, worker, t_ms)
}

/// A handler that ran on `worker` from `from` to `to` (ms), ticking every 50 ms, and returned.
fn ran(job: &str, attempt: i32, worker: &str, from: i64, to: i64) -> Vec<ExecLine> {
    let mut v = vec![exec("start", job, attempt, worker, from)];
    v.extend((from + 50..to).step_by(50).map(|t| exec("tick", job, attempt, worker, t)));
    v.push(exec("finish", job, attempt, worker, to));
    v
}

fn status(job: &str, t_ms: i64, phase: &str, attempts: i32, worker: Option<&str>) -> StatusLine {
    StatusLine {
        t_ms,
        uid: format!("uid-{job}"),
        job: format!("ns/{job}"),
        rv: t_ms.to_string(),
        phase: phase.into(),
        attempts,
        worker: worker.map(str::to_string),
        seq: t_ms,
        created_ms: 0,
        ..Default::default()
    }
}

fn fault(kind: &str, target: &str, t_ms: i64) -> FaultLine {
    FaultLine { t_ms, kind: kind.into(), target: target.into(), detail: String::new() }
}

/// One job that ran once on `a` and succeeded: the clean baseline.
fn clean() -> History {
    History {
        exec: ran("j", 1, "a", 100, 400),
        status: vec![
            status("j", 0, "", 0, None),
            status("j", 90, "Running", 1, Some("a")),
            status("j", 450, "Succeeded", 1, Some("a")),
        ],
        faults: Vec::new(),
        leases: Vec::new(),
    }
}

#[test]
fn a_clean_run_reports_no_violation() {
    let r = check(&clean(), &Limits::default());
    assert!(r.ok(), "{:?}", r.violations);
    assert_eq!((r.jobs, r.executions), (1, 1));
    assert!(r.to_string().starts_with("jobs=1 executions=1 faults=[] lost=0 stuck=0 overlaps=0"), "{r}");
}

#[test]
fn a_job_left_running_is_stuck() {
    let mut h = clean();
    h.status.pop();
    let r = check(&h, &Limits::default());
    assert_eq!(r.stuck, 1, "{:?}", r.violations);
}

#[test]
fn a_job_failed_for_lost_attempts_or_succeeded_without_work_is_lost() {
    let mut h = clean();
    h.status.last_mut().unwrap().phase = "Failed".into();
    assert_eq!(check(&h, &Limits::default()).lost, 1);
    let mut h = clean();
    h.exec.retain(|l| l.ev != "finish");
    assert_eq!(check(&h, &Limits::default()).lost, 1, "Succeeded, yet no handler returned");
    let mut h = clean();
    h.status.last_mut().unwrap().phase = "Failed".into();
    h.status.iter_mut().for_each(|s| s.expect_retries = true);
    assert_eq!(check(&h, &Limits::default()).lost, 0, "a job meant to fail may fail");
    let mut h = clean();
    h.status.last_mut().unwrap().phase = "Failed".into();
    h.exec.retain(|l| l.ev != "finish");
    h.faults.push(fault("kill9", "a", 420));
    assert_eq!(check(&h, &Limits::default()).lost, 0, "an at-most-once job whose holder was killed may fail");
}

#[test]
fn two_executions_of_one_job_at_once_overlap() {
    let mut h = clean();
    h.exec.extend(ran("j", 2, "b", 300, 600));
    h.faults.push(fault("stop", "a", 150));
    let r = check(&h, &Limits::default());
    assert_eq!(r.overlaps, 1, "{:?}", r.violations);
}

#[test]
fn a_paused_holder_that_never_resumed_its_handler_does_not_overlap_its_successor() {
    // a's handler wrote its last tick at 200, then the process was paused; b took over at 300. When a woke up, its
    // guard dropped the handler without another line.
    let mut h = History { exec: ran("j", 2, "b", 300, 600), ..clean() };
    h.exec.extend([exec("start", "j", 1, "a", 100), exec("tick", "j", 1, "a", 150), exec("tick", "j", 1, "a", 200)]);
    h.faults.push(fault("stop", "a", 210));
    let r = check(&h, &Limits::default());
    assert_eq!((r.overlaps, r.extra_attempts), (0, 0), "{:?}", r.violations);
}

#[test]
fn two_jobs_of_one_key_at_once_are_a_key_overlap() {
    let mut h = clean();
    let mut other = ran("k", 1, "b", 200, 500);
    for l in h.exec.iter_mut().chain(other.iter_mut()) {
        l.key = Some("ns/tenant-1".into());
    }
    h.exec.extend(other);
    let r = check(&h, &Limits::default());
    assert_eq!(r.key_overlaps, 1, "{:?}", r.violations);
}

#[test]
fn more_slot_holders_than_the_cluster_cap_or_executions_than_a_replica_may_run_are_cap_violations() {
    let mut h = clean();
    h.exec.extend(ran("k", 1, "a", 200, 500));
    for l in &mut h.exec {
        l.leases = vec!["bgjobs-slot-0".into()];
    }
    let limits = Limits { cluster_cap: Some(1), ..Default::default() };
    assert_eq!(check(&h, &limits).cap_violations, 1);
    let limits = Limits { per_replica_cap: Some(1), ..Default::default() };
    assert_eq!(check(&h, &limits).cap_violations, 1);
    let limits = Limits { cluster_cap: Some(2), per_replica_cap: Some(2), ..Default::default() };
    assert_eq!(check(&h, &limits).cap_violations, 0);
}

#[test]
fn attempts_going_back_or_changing_hands_without_a_new_attempt_are_stale_writes() {
    let mut h = clean();
    h.status.insert(2, status("j", 420, "Running", 0, Some("a")));
    assert_eq!(check(&h, &Limits::default()).stale_writes, 1);
    let mut h = clean();
    h.status.insert(2, status("j", 420, "Running", 1, Some("b")));
    assert_eq!(check(&h, &Limits::default()).stale_writes, 1);
    h.status.iter_mut().for_each(|s| s.pod = true);
    assert_eq!(check(&h, &Limits::default()).stale_writes, 0, "an adopted Pod attempt changes hands");
}

#[test]
fn a_re_execution_needs_a_fault_on_its_holder_to_explain_it() {
    let mut h = clean();
    h.exec = ran("j", 1, "a", 100, 200);
    h.exec.extend(ran("j", 2, "b", 5_000, 5_300));
    let limits = Limits { lease_ms: 3_000, ..Default::default() };
    assert_eq!(check(&h, &limits).extra_attempts, 1);
    h.faults.push(fault("kill9", "a", 210));
    assert_eq!(check(&h, &limits).extra_attempts, 0);
    h.faults[0].target = "c".into();
    h.exec.extend(ran("x", 1, "c", 0, 10));
    assert_eq!(check(&h, &limits).extra_attempts, 1, "a fault on another replica explains nothing");
}

#[test]
fn two_jobs_for_one_tick_or_a_tick_too_old_are_recurring_violations() {
    let mut h = clean();
    for s in &mut h.status {
        (s.recurring, s.tick_ms, s.created_ms) = (Some("ns/daily".into()), Some(0), 10);
    }
    let mut twin = status("j2", 500, "Succeeded", 1, Some("a"));
    (twin.recurring, twin.tick_ms, twin.created_ms) = (Some("ns/daily".into()), Some(0), 500);
    h.status.push(twin);
    let limits = Limits { catch_up_ms: Some(100), ..Default::default() };
    let r = check(&h, &limits);
    assert_eq!((r.duplicate_ticks, r.late_ticks), (1, 1), "{:?}", r.violations);
}

#[test]
fn a_job_made_well_before_its_tick_is_an_early_tick() {
    let mut h = clean();
    for s in &mut h.status {
        (s.recurring, s.tick_ms, s.created_ms) = (Some("ns/daily".into()), Some(20_000), 0);
    }
    assert_eq!(check(&h, &Limits::default()).early_ticks, 1);
    h.status.iter_mut().for_each(|s| s.created_ms = 18_000);
    assert_eq!(check(&h, &Limits::default()).early_ticks, 0, "within a clock's resolution");
}

#[test]
fn a_job_started_long_after_one_queued_behind_it_is_a_fifo_inversion() {
    let mut h = History::default();
    for (job, seq, start) in [("first", 1, 5_000), ("second", 2, 100)] {
        let mut s = status(job, 0, "Succeeded", 1, Some("a"));
        s.seq = seq;
        h.status.push(s);
        h.exec.extend(ran(job, 1, "a", start, start + 100));
    }
    let r = check(&h, &Limits { fifo_bound_ms: Some(1_000), ..Default::default() });
    assert_eq!(r.worst_fifo_inversion_ms, 4_900);
    assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    h.status[0].priority = -1; // "first" is Low: "second" may go first
    assert_eq!(check(&h, &Limits::default()).worst_fifo_inversion_ms, 0);
}

#[test]
fn the_creation_second_orders_before_the_revision_as_the_operator_documents() {
    // "late" committed first (revision 1) but was created in a later second than "early" (revision 2): jobs created
    // around a second's boundary commit out of their seconds' order. The documented order runs "early" first.
    let mut h = History::default();
    for (job, created_s, seq, start) in [("late", 11, 1, 5_000), ("early", 10, 2, 100)] {
        let mut s = status(job, 0, "Succeeded", 1, Some("a"));
        (s.created_s, s.seq) = (created_s, seq);
        h.status.push(s);
        h.exec.extend(ran(job, 1, "a", start, start + 100));
    }
    let limits = Limits { fifo_bound_ms: Some(1_000), ..Default::default() };
    let r = check(&h, &limits);
    assert_eq!((r.worst_fifo_inversion_ms, r.fifo_violations), (0, 0), "{:?}", r.violations);
    h.status[0].created_s = 10; // the same second: now the revision decides, and "late" was held back
    let r = check(&h, &limits);
    assert_eq!((r.worst_fifo_inversion_ms, r.fifo_violations), (4_900, 1), "{:?}", r.violations);
}

#[test]
fn a_job_whose_claim_the_recorder_missed_is_judged_on_its_first_execution_or_the_claim_time_any_status_carries() {
    // The recorder was blind (an apiserver restart) while "first" was claimed and ran attempt 1 at 50; it first saw
    // the job Running for attempt 2, at 5_000, long after "second" (queued behind it) was dispatched at 100.
    let mut h = History::default();
    for (job, seq, t, attempts) in [("first", 1, 5_000, 2), ("second", 2, 100, 1)] {
        for (t, phase) in [(0, ""), (t, "Running"), (t + 400, "Succeeded")] {
            let mut s = status(job, t, phase, attempts, Some("r1"));
            s.seq = seq;
            h.status.push(s);
        }
    }
    h.exec.extend(ran("first", 1, "r1", 50, 80));
    h.exec.extend(ran("first", 2, "r1", 5_020, 5_100));
    h.exec.extend(ran("second", 1, "r1", 120, 200));
    h.status.sort_by_key(|s| s.t_ms);
    let limits = Limits { fifo_bound_ms: Some(1_000), ..Default::default() };
    let r = check(&h, &limits);
    assert_eq!((r.worst_fifo_inversion_ms, r.fifo_violations), (0, 0), "{:?}", r.violations);

    // A Pod job: claimed at 50 unseen, its container started at 6_000; its status, first seen at 5_000, says when
    // it was claimed.
    h.exec.retain(|l| l.job != "ns/first");
    h.exec.extend(ran("first", 2, "pod", 6_000, 6_100));
    let first_running = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Running").unwrap();
    first_running.started_ms = Some(50);
    // Believed no earlier than a claimant's clock error allows (1.5 s): 1_550, so 1.45 s after "second".
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 1_450);
    let first_running = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Running").unwrap();
    first_running.started_ms = None;
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 4_900, "without it, the line's time");
    // Claimed at 2_000 on its clock: 3_500 at the earliest.
    let first_running = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Running").unwrap();
    first_running.started_ms = Some(2_000);
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 3_400);
    let first_running = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Running").unwrap();
    first_running.started_ms = Some(5_500);
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 4_900, "a claim time after the line is not believed");

    // Its whole run unseen (the recorder's watch down through an apiserver restart): first seen Succeeded at 6_500,
    // a status that still carries the claim time.
    h.status.retain(|s| !(s.job == "ns/first" && s.phase == "Running"));
    let first_done = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Succeeded").unwrap();
    first_done.t_ms = 6_500;
    first_done.started_ms = Some(50);
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 1_450);
    let first_done = h.status.iter_mut().find(|s| s.job == "ns/first" && s.phase == "Succeeded").unwrap();
    first_done.started_ms = None;
    assert_eq!(check(&h, &limits).worst_fifo_inversion_ms, 5_900, "without it, the container's start");
}

#[test]
fn a_replica_under_a_clock_offset_is_judged_on_corrected_times() {
    let mut h = clean();
    h.exec = ran("j", 1, "a", 100, 400);
    // b's clock runs 10 s ahead: its lines at 10_500.. are really at 500..
    h.exec.extend(ran("j", 2, "b", 10_500, 10_800));
    h.faults.push(FaultLine { t_ms: 0, kind: "clock-offset".into(), target: "b".into(), detail: "10000".into() });
    h.faults.push(fault("kill9", "a", 400));
    let r = check(&h, &Limits::default());
    assert_eq!(r.overlaps, 0, "{:?}", r.violations);
    h.faults[0].detail = "10300".into(); // corrected, b started at 200, during a's execution
    assert_eq!(check(&h, &Limits::default()).overlaps, 1);
    // Lines another clock wrote for b (an HTTP endpoint's) are not corrected.
    h.faults[0].detail = "10000".into();
    h.exec.retain(|l| l.worker != "b");
    let mut http = ran("j", 2, "b", 500, 800);
    http.iter_mut().for_each(|l| l.clock = Some("endpoint".into()));
    h.exec.extend(http);
    assert_eq!(check(&h, &Limits::default()).overlaps, 0, "{:?}", check(&h, &Limits::default()).violations);
}

#[test]
fn under_the_exclusive_strategy_two_replicas_running_jobs_at_once_is_an_exclusive_overlap() {
    let mut h = History::default();
    for (job, worker, from, to) in [("x", "a", 0, 1_000), ("y", "a", 200, 600), ("z", "b", 1_000, 1_500)] {
        h.status.push(status(job, 0, "Succeeded", 1, Some(worker)));
        h.exec.extend(ran(job, 1, worker, from, to));
    }
    let exclusive = Limits { exclusive: true, ..Default::default() };
    // One replica running two jobs at once, then another taking over once it is done: allowed.
    let r = check(&h, &exclusive);
    assert!(r.ok(), "{:?}", r.violations);
    // The other replica starting while the first still runs a job: caught, but only under the exclusive strategy.
    h.exec.retain(|l| l.job != "ns/z");
    h.exec.extend(ran("z", 1, "b", 900, 1_500));
    let r = check(&h, &exclusive);
    assert_eq!(r.exclusive_overlaps, 1, "{:?}", r.violations);
    assert!(r.violations[0].starts_with("exclusive overlap: a ran ns/x"), "{:?}", r.violations);
    assert_eq!(check(&h, &Limits::default()).exclusive_overlaps, 0);
}

/// "first" (queued first) dispatched at 5_000 by r1, "second" (queued behind it) at 100: a 4.9 s inversion.
fn inverted() -> History {
    let mut h = History::default();
    for (job, seq, claimed) in [("first", 1, 5_000), ("second", 2, 100)] {
        for (t, phase) in [(0, ""), (claimed, "Running"), (claimed + 400, "Succeeded")] {
            let mut s = status(job, t, phase, 1, Some("r1"));
            s.seq = seq;
            h.status.push(s);
        }
        h.exec.extend(ran(job, 1, "r1", claimed + 20, claimed + 300));
    }
    h.status.sort_by_key(|s| s.t_ms);
    h
}

fn lease(name: &str, kind: &str, holder: &str, job_uid: Option<&str>, t_ms: i64) -> LeaseLine {
    LeaseLine {
        t_ms,
        name: name.into(),
        kind: kind.into(),
        holder: Some(holder.into()),
        job_uid: job_uid.map(str::to_string),
        deleted: false,
    }
}

#[test]
fn a_fifo_inversion_beyond_the_bound_counts_only_the_time_no_fault_on_the_jobs_holder_explains() {
    let limits = Limits { fifo_bound_ms: Some(1_000), lease_ms: 3_000, ..Default::default() };
    let r = check(&inverted(), &limits);
    assert_eq!((r.worst_fifo_inversion_ms, r.worst_unexplained_fifo_ms, r.fifo_violations), (4_900, 4_900, 1));
    assert!(r.violations[0].starts_with("fifo: ns/first was dispatched 4900 ms after ns/second"), "{:?}", r.violations);

    // r0 claimed "first" (its Lease) and was paused from 300 to 1_000: the pause and a lease duration after it
    // explain 300..4_000, which leaves 1_200 ms unexplained: still too long.
    let mut h = inverted();
    h.leases.push(lease("bgj-first", "claim", "r0", Some("uid-first"), 250));
    h.faults.extend([fault("stop", "r0", 300), fault("cont", "r0", 1_000)]);
    let r = check(&h, &limits);
    assert_eq!((r.worst_unexplained_fifo_ms, r.fifo_violations), (1_200, 1), "{:?}", r.violations);
    // Paused until 1_500: 700 ms left, within the bound.
    h.faults[1].t_ms = 1_500;
    let r = check(&h, &limits);
    assert_eq!((r.worst_fifo_inversion_ms, r.worst_unexplained_fifo_ms), (4_900, 700));
    assert!(r.ok(), "{:?}", r.violations);

    // The same pause of a replica that never held anything of "first" explains nothing.
    h.leases[0].holder = Some("r2".into());
    assert_eq!(check(&h, &limits).fifo_violations, 1);
    // A restart of the control plane holds every job back, up to a lease after it is back.
    h.faults.extend([fault("apiserver-restart", "cluster", 200), fault("apiserver-up", "cluster", 1_800)]);
    assert!(check(&h, &limits).ok());

    // Under the exclusive strategy the leader of the time dispatches everything: its pause explains the wait...
    let mut h = inverted();
    h.leases.push(lease("bgjobs-exclusive", "exclusive", "r0", None, 50));
    h.faults.extend([fault("stop", "r0", 300), fault("cont", "r0", 1_500)]);
    assert!(check(&h, &limits).ok(), "{:?}", check(&h, &limits).violations);
    // ... and so do hand-deleted exclusive Leases, but not deleted Leases of another job.
    let delete = |target: &str, t_ms| FaultLine { target: target.into(), ..fault("lease-delete", "", t_ms) };
    h.faults = vec![delete("bgjobs-exclusive", 300), delete("bgjobs-exclusive", 1_500)];
    assert!(check(&h, &limits).ok());
    h.faults = vec![delete("bgj-other", 300), delete("bgj-other", 1_500)];
    assert_eq!(check(&h, &limits).fifo_violations, 1);
}
