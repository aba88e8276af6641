//! The queue engine against the local control plane, with operator replicas as separate processes.
//!
//! Guarantees under test: no job lost, no job run twice at the same time, FIFO dispatch, bounded concurrency, and
//! that crashes (`kill -9`), pauses (`SIGSTOP`) and shutdowns (`SIGTERM`) keep them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bgjobs::api::Phase;
use common::{TestEnv, all_in, executions, max_overlap, now_ms};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Executions per job name.
fn starts_per_job(env: &TestEnv) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in executions(&env.invocations()) {
        *m.entry(e.job.rsplit('/').next().unwrap().to_string()).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_drain_500_jobs_with_no_duplicate_no_loss_and_capped_concurrency() {
    let env = TestEnv::new("drain").await;
    let cap = 4;
    let _replicas: Vec<_> =
        (0..3).map(|i| env.replica(&format!("r{i}"), &["--max-concurrent-jobs-per-instance", "4"])).collect();
    futures::stream::iter(0..500)
        .map(|i| {
            let env = &env;
            async move { env.create(&format!("job-{i:03}"), json!({"jobName": "sleep", "args": {"seconds": 0.05}})).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    let jobs = env
        .wait_until(4 * MINUTE, "all 500 jobs Succeeded", |jobs| jobs.len() == 500 && all_in(jobs, Phase::Succeeded))
        .await;
    assert!(jobs.iter().all(|j| j.attempts() == 1), "a healthy run needs no second attempt");

    let execs = executions(&env.invocations());
    let per_job = starts_per_job(&env);
    assert_eq!(per_job.len(), 500, "every job's handler invocation is recorded");
    let twice: Vec<_> = per_job.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    for job in per_job.keys() {
        let of_job: Vec<_> = execs.iter().filter(|e| e.job.ends_with(&format!("/{job}"))).collect();
        assert!(max_overlap(of_job, now_ms()) <= 1, "{job} ran twice at the same time");
    }
    let mut per_worker: HashMap<&str, usize> = HashMap::new();
    for w in ["r0", "r1", "r2"] {
        let mine: Vec<_> = execs.iter().filter(|e| e.worker == w).collect();
        per_worker.insert(w, mine.len());
        let peak = max_overlap(mine, now_ms());
        assert!(peak <= cap, "{w} ran {peak} jobs at once, above its cap of {cap}");
    }
    eprintln!("jobs per replica: {per_worker:?}");
    assert!(per_worker.values().all(|n| *n >= 50), "every replica takes a real share of the work: {per_worker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_starts_jobs_by_priority_then_creation_order_even_within_one_second() {
    let env = TestEnv::new("fifo-one-slot").await;
    let priorities =
        ["Normal", "Low", "High", "Normal", "AboveNormal", "Normal", "Low", "High", "BelowNormal", "Normal"];
    let mut expected = Vec::new();
    // Names run backwards so that name order would give the wrong answer; created one after another, many within
    // the same second.
    for i in 0..30 {
        let name = format!("z{:02}", 99 - i);
        let priority = priorities[i % priorities.len()];
        env.create(&name, json!({"jobName": "noop", "priority": priority})).await;
        expected.push((rank(priority), i, name));
    }
    expected.sort();
    let expected: Vec<String> = expected.into_iter().map(|(_, _, n)| n).collect();

    let _r = env.replica("solo", &["--max-concurrent-jobs-per-instance", "1"]);
    env.wait_until(2 * MINUTE, "all jobs Succeeded", |jobs| jobs.len() == 30 && all_in(jobs, Phase::Succeeded)).await;
    let started: Vec<String> =
        executions(&env.invocations()).into_iter().map(|e| e.job.rsplit('/').next().unwrap().to_string()).collect();
    assert_eq!(started, expected, "start order must be priority (High first), then creation order");
}

fn rank(priority: &str) -> usize {
    ["High", "AboveNormal", "Normal", "BelowNormal", "Low"].iter().position(|p| *p == priority).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_replicas_keep_fifo_within_a_small_bound() {
    let env = TestEnv::new("fifo-replicas").await;
    let n = 120;
    let mut order = HashMap::new();
    for i in 0..n {
        let priority = ["Normal", "High", "Low"][i % 3];
        let name = format!("j{i:03}");
        env.create(&name, json!({"jobName": "sleep", "priority": priority, "args": {"seconds": 0.2}})).await;
        order.insert(name, (rank(priority), i));
    }
    let _replicas: Vec<_> =
        (0..3).map(|i| env.replica(&format!("r{i}"), &["--max-concurrent-jobs-per-instance", "2"])).collect();
    env.wait_until(3 * MINUTE, "all jobs Succeeded", |jobs| jobs.len() == n && all_in(jobs, Phase::Succeeded)).await;

    // An inversion: job `a` should run before `b` but started later. Its size is how much later.
    let starts: Vec<(String, i64)> = executions(&env.invocations())
        .into_iter()
        .map(|e| (e.job.rsplit('/').next().unwrap().to_string(), e.start))
        .collect();
    let mut worst = 0i64;
    let mut inversions = 0;
    for (a, ta) in &starts {
        for (b, tb) in &starts {
            if order[a] < order[b] && ta > tb {
                inversions += 1;
                worst = worst.max(ta - tb);
            }
        }
    }
    eprintln!("FIFO across 3 replicas x 2 slots: {inversions} inverted pairs, worst inversion {worst} ms");
    assert!(worst < 2_500, "a job waited {worst} ms behind a later one: more than the 2.5 s bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_killed_replica_is_retried_by_another_after_its_lease_expires() {
    let env = TestEnv::new("kill9").await;
    let mut a = env.replica("a", &[]);
    env.create("victim", json!({"jobName": "sleep", "args": {"seconds": 3}})).await;
    env.wait_job("victim", MINUTE, "Running on a", |j| {
        j.phase() == Phase::Running && j.status.as_ref().unwrap().worker.as_deref() == Some("a")
    })
    .await;
    let _b = env.replica("b", &[]);
    a.kill9();
    let killed_at = now_ms();
    let job = env.wait_job("victim", MINUTE, "Succeeded", |j| j.phase().is_final()).await;
    let status = job.status.unwrap();
    assert_eq!(job.spec.job_name, "sleep");
    assert_eq!((status.phase, status.attempts, status.worker.as_deref()), (Some(Phase::Succeeded), 2, Some("b")));
    assert!(status.last_error.unwrap_or_default().contains("attempt 1 was lost"), "the lost attempt is explained");
    let execs = executions(&env.invocations());
    let on_b: Vec<_> = execs.iter().filter(|e| e.worker == "b").collect();
    assert_eq!(on_b.len(), 1, "exactly one retry");
    assert!(on_b[0].start >= killed_at + 2_000, "b waited for the lease to expire before taking over");
}

/// The managers `managedFields` names for an object's fields under `top` (`f:status`, `f:spec`...).
fn managers_of(meta: &ObjectMeta, top: &str) -> Vec<String> {
    let entries = meta.managed_fields.iter().flatten();
    let owning = entries.filter(|m| m.fields_v1.as_ref().is_some_and(|f| top.is_empty() || f.0.get(top).is_some()));
    owning.map(|m| m.manager.clone().unwrap_or_default()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_is_named_as_the_manager_of_the_claim_lease_and_the_status_it_writes() {
    let env = TestEnv::new("manager").await;
    let _a = env.replica("a", &[]);
    env.create("named", json!({"jobName": "sleep", "args": {"seconds": 3}})).await;
    let job = env.wait_job("named", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let lease_name = job.status.as_ref().and_then(|s| s.lease.clone()).expect("a running job names its Lease");
    let lease = Api::<Lease>::namespaced(env.client.clone(), &env.ns).get(&lease_name).await.unwrap();
    assert_eq!(managers_of(&lease.metadata, ""), ["bgjobs"], "the claim Lease's writer");
    assert_eq!(managers_of(&job.metadata, "f:status"), ["bgjobs"], "the Running status's writer");
    let job = env.wait_job("named", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(managers_of(&job.metadata, "f:status"), ["bgjobs"], "the Succeeded status's writer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_that_wakes_up_after_its_lease_cannot_overwrite_the_new_attempt() {
    let env = TestEnv::new("sigstop").await;
    let a = env.replica("a", &[]);
    env.create("paused", json!({"jobName": "sleep", "args": {"seconds": 5}})).await;
    env.wait_job("paused", MINUTE, "Running on a", |j| {
        j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a")
    })
    .await;
    let _b = env.replica("b", &[]);
    a.stop();
    // b takes over once it has seen a's lease unchanged for the lease duration.
    env.wait_job("paused", MINUTE, "taken over by b", |j| j.phase() == Phase::Running && j.attempts() == 2).await;
    // Wake a while b's attempt runs: a's sleep is long over by now, so without the lease guard it would report success.
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.resume();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = env.jobs.get("paused").await.unwrap();
    let s = during.status.clone().unwrap();
    assert_eq!(
        (s.phase, s.attempts, s.worker.as_deref()),
        (Some(Phase::Running), 2, Some("b")),
        "a's stale result must not land"
    );
    let done = env.wait_job("paused", MINUTE, "finished", |j| j.phase().is_final()).await;
    let s = done.status.unwrap();
    assert_eq!((s.phase, s.attempts, s.worker.as_deref()), (Some(Phase::Succeeded), 2, Some("b")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = env.jobs.get("paused").await.unwrap();
    assert_eq!(later.resource_version(), done.metadata.resource_version, "nothing wrote the job after b finished it");
    assert!(a.log_text().contains("claim lease lost"), "a noticed it had lost the claim:\n{}", a.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exclusive_strategy_never_runs_jobs_on_two_replicas_at_once() {
    let env = TestEnv::new("exclusive").await;
    let args = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str()];
    let mut replicas: Vec<_> = (0..3).map(|i| env.replica(&format!("r{i}"), &args)).collect();
    for i in 0..24 {
        env.create(&format!("x{i:02}"), json!({"jobName": "sleep", "args": {"seconds": 0.3}})).await;
    }
    // Kill whoever runs jobs first, mid-way: leadership must move without overlap.
    let first =
        env.wait_until(MINUTE, "some job Running", |jobs| jobs.iter().any(|j| j.phase() == Phase::Running)).await;
    let leader = first
        .iter()
        .find_map(|j| j.status.as_ref().filter(|s| s.phase == Some(Phase::Running)).and_then(|s| s.worker.clone()))
        .unwrap();
    let killed_at = now_ms();
    replicas.iter_mut().find(|r| r.identity == leader).unwrap().kill9();
    env.wait_until(2 * MINUTE, "all jobs Succeeded", |jobs| jobs.len() == 24 && all_in(jobs, Phase::Succeeded)).await;

    let execs = executions(&env.invocations());
    let workers: std::collections::BTreeSet<_> = execs.iter().map(|e| e.worker.clone()).collect();
    assert!(workers.len() >= 2, "leadership moved after the kill: {workers:?}");
    for w1 in &workers {
        for w2 in &workers {
            if w1 >= w2 {
                continue;
            }
            for e1 in execs.iter().filter(|e| &e.worker == w1) {
                for e2 in execs.iter().filter(|e| &e.worker == w2) {
                    let end1 = e1.end.unwrap_or(killed_at);
                    let end2 = e2.end.unwrap_or(killed_at);
                    assert!(
                        end1 <= e2.start || end2 <= e1.start,
                        "{w1} and {w2} ran jobs at the same time: {e1:?} {e2:?}"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_exponential_backoff_until_max_attempts_then_fail() {
    let env = TestEnv::new("retry").await;
    let _r = env.replica("r", &[]);
    env.create("flaky", json!({"jobName": "fail", "args": {"message": "dependency down"}, "retry": {"maxAttempts": 3, "backoffSeconds": 1, "backoffFactor": 2.0}})).await;
    let job = env.wait_job("flaky", MINUTE, "Failed", |j| j.phase().is_final()).await;
    let s = job.status.unwrap();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Failed), 3));
    assert!(
        s.last_error.as_deref().unwrap().contains("dependency down (gave up after 3 of 3 attempts)"),
        "{:?}",
        s.last_error
    );
    let starts: Vec<i64> = executions(&env.invocations()).iter().map(|e| e.start).collect();
    assert_eq!(starts.len(), 3);
    assert!(starts[1] - starts[0] >= 1_000, "first retry waits backoffSeconds (1 s): {starts:?}");
    assert!(starts[2] - starts[1] >= 2_000, "second retry waits twice as long: {starts:?}");
}

/// A job that leaves `backoffSeconds` out stores none (tests/api_schema.rs); the operator applies the default
/// (60 s) when it schedules the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_of_a_job_that_stores_no_backoff_is_scheduled_the_default_backoff_later() {
    let env = TestEnv::new("default-backoff").await;
    let _r = env.replica("r", &[]);
    env.create("plain", json!({"jobName": "fail", "retry": {"maxAttempts": 2}})).await;
    // Read untyped: the typed view would fill in the default whether or not it is stored.
    let raw: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &ApiResource::erase::<bgjobs::api::BackgroundJob>(&()));
    let stored = raw.get("plain").await.expect("read the job untyped").data["spec"]["retry"].clone();
    assert_eq!(stored, json!({"maxAttempts": 2}), "the job stores no backoff");
    let job = env
        .wait_job("plain", MINUTE, "a retry scheduled", |j| {
            j.status.as_ref().is_some_and(|s| s.next_attempt_time.is_some())
        })
        .await;
    let status = job.status.unwrap();
    assert_eq!((status.phase, status.attempts), (Some(Phase::Waiting), 1));
    // The `fail` handler fails at once: the attempt's start is its end, to within the bounds below (the start is
    // kept in whole seconds and the retry time rounded up, so the wait reads 60-61 s plus the claim-to-failure time).
    let started = status.start_time.expect("the failed attempt's start").0;
    let next = status.next_attempt_time.unwrap().0;
    let wait = next.duration_since(started).as_secs_f64();
    assert!(
        (59.0..=75.0).contains(&wait),
        "the retry waits the default backoff of {} s after the failed attempt, not {wait} s",
        bgjobs::api::DEFAULT_BACKOFF_SECONDS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_past_their_timeout_are_abandoned_and_kept() {
    let env = TestEnv::new("abandon").await;
    let _r = env.replica("r", &[]);
    // A retry that would start after the timeout gives up at once.
    env.create("late-retry", json!({"jobName": "fail", "timeoutSeconds": 5, "retry": {"backoffSeconds": 30}})).await;
    // A job delayed past its timeout never runs.
    env.create("never-runs", json!({"jobName": "noop", "delaySeconds": 30, "timeoutSeconds": 2})).await;
    let late = env.wait_job("late-retry", MINUTE, "Abandoned", |j| j.phase().is_final()).await;
    assert_eq!((late.phase(), late.attempts()), (Phase::Abandoned, 1));
    assert!(late.status.unwrap().last_error.unwrap().contains("timeout"));
    let never = env.wait_job("never-runs", MINUTE, "Abandoned", |j| j.phase().is_final()).await;
    assert_eq!((never.phase(), never.attempts()), (Phase::Abandoned, 0));
    assert_eq!(starts_per_job(&env).get("never-runs"), None, "an abandoned job never started");
}

/// A waiting job's deadline further away than the replica's full-look period (60 s) gets no timer when the job is
/// judged; a later full look finds it. The looks in between pass the job by (its look would only repeat the last),
/// and the one that comes within a period of the deadline arms its timer: the job is abandoned at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_job_whose_deadline_is_beyond_a_full_look_is_abandoned_at_it() {
    let env = TestEnv::new("far-deadline").await;
    let _tidy = env.replica("tidy", &["--job-execution-enabled=false"]);
    env.create("far", json!({"jobName": "noop", "timeoutSeconds": 150})).await;
    let job = env.wait_job("far", Duration::from_secs(300), "Abandoned", |j| j.phase().is_final()).await;
    let created = job.metadata.creation_timestamp.clone().unwrap().0;
    let status = job.status.unwrap();
    assert_eq!((status.phase, status.attempts), (Some(Phase::Abandoned), 0));
    let ended = status.completion_time.expect("an abandoned job has a completion time").0;
    let after = ended.duration_since(created).as_secs();
    assert!((150..=165).contains(&after), "abandoned {after} s after its creation, its deadline at 150 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_does_not_start_before_its_delay() {
    let env = TestEnv::new("delay").await;
    let _r = env.replica("r", &[]);
    let job = env.create("later", json!({"jobName": "noop", "delaySeconds": 3})).await;
    env.create("now", json!({"jobName": "noop"})).await;
    env.wait_until(MINUTE, "both Succeeded", |jobs| jobs.len() == 2 && all_in(jobs, Phase::Succeeded)).await;
    let created_ms = job.metadata.creation_timestamp.unwrap().0.as_millisecond();
    let execs = executions(&env.invocations());
    let later = execs.iter().find(|e| e.job.ends_with("/later")).unwrap();
    assert!(later.start >= created_ms + 3_000, "started {} ms after creation", later.start - created_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_a_running_job_and_prevents_a_waiting_one() {
    let env = TestEnv::new("cancel").await;
    let _r = env.replica("r", &[]);
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 60}})).await;
    env.create("delayed", json!({"jobName": "noop", "delaySeconds": 60})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let cancel = Patch::Merge(json!({"spec": {"cancel": true}}));
    for name in ["long", "delayed"] {
        env.jobs.patch(name, &PatchParams::default(), &cancel).await.unwrap();
    }
    let long = env.wait_job("long", Duration::from_secs(20), "Cancelled", |j| j.phase().is_final()).await;
    assert_eq!(long.phase(), Phase::Cancelled);
    let delayed = env.wait_job("delayed", Duration::from_secs(20), "Cancelled", |j| j.phase().is_final()).await;
    assert_eq!((delayed.phase(), delayed.attempts()), (Phase::Cancelled, 0));
    let execs = executions(&env.invocations());
    assert!(execs.iter().all(|e| e.end.is_some()), "the cancelled handler stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_job_stops_its_attempt() {
    let env = TestEnv::new("delete").await;
    let _r = env.replica("r", &[]);
    env.create("doomed", json!({"jobName": "sleep", "args": {"seconds": 60}})).await;
    env.wait_job("doomed", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let lease = leases.get("bgj-doomed").await.expect("a running job holds its claim Lease");
    assert_eq!(lease.owner_references().first().map(|o| o.name.as_str()), Some("doomed"));
    env.jobs.delete("doomed", &Default::default()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while executions(&env.invocations()).iter().any(|e| e.end.is_none()) {
        assert!(std::time::Instant::now() < deadline, "the attempt of a deleted job kept running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The claim Lease is owned by the job: kube-controller-manager's garbage collector removes it.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let deadline = std::time::Instant::now() + MINUTE;
    while leases.get_opt("bgj-doomed").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the deleted job's Lease was not garbage-collected");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A deletion that waits (a finalizer of another controller's) cancels the job: a waiting one never starts and gives
/// up its concurrency key's turn, a running one is stopped, each recorded `Cancelled` saying why; neither is deleted
/// again by retention meanwhile (a no-op a second), and the object goes once its finalizer is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_deletion_waits_for_a_finalizer_is_cancelled_not_run() {
    let env = TestEnv::new("deleting").await;
    let hold = |name: &str, spec: serde_json::Value| {
        let mut job = common::fixtures::job(name, spec);
        job.metadata.finalizers = Some(vec![common::HOLD_FINALIZER.into()]);
        job
    };
    let release = common::Held::on(&env, "backgroundjob", &["waiting", "running"]);
    env.jobs
        .create(&Default::default(), &hold("waiting", json!({"jobName": "noop", "concurrencyKey": "k"})))
        .await
        .unwrap();
    env.create("after", json!({"jobName": "noop", "concurrencyKey": "k"})).await;
    env.jobs.delete("waiting", &Default::default()).await.unwrap();
    let long = json!({"jobName": "sleep", "args": {"seconds": 60}, "ttlSecondsAfterFinished": 0});
    env.jobs.create(&Default::default(), &hold("running", long)).await.unwrap();
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let _r = env.replica("r", &["--metrics-addr", &metrics]);
    env.wait_job("running", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    env.jobs.delete("running", &Default::default()).await.unwrap();
    for (name, attempts) in [("running", 1), ("waiting", 0)] {
        let job = env.wait_job(name, Duration::from_secs(30), "final", |j| j.phase().is_final()).await;
        let error = job.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
        assert_eq!((job.phase(), job.attempts()), (Phase::Cancelled, attempts), "{name}: {error}");
        assert!(error.contains("its deletion was requested"), "{name}: {error}");
        assert!(job.metadata.deletion_timestamp.is_some(), "{name}: still held by its finalizer");
    }
    let after = env.wait_job("after", MINUTE, "Succeeded", |j| j.phase().is_final()).await;
    assert_eq!(after.phase(), Phase::Succeeded, "the key's next job ran");
    let execs = executions(&env.invocations());
    let ran = |name: &str| execs.iter().filter(|e| e.job.ends_with(&format!("/{name}"))).count();
    assert_eq!((ran("waiting"), ran("running"), ran("after")), (0, 1, 1), "{execs:?}");
    assert!(execs.iter().all(|e| e.end.is_some()), "the running job's handler was stopped: {execs:?}");
    // "running" is past its TTL of 0: its deletion was asked for already, so retention sends none (or one, at most).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
    let deletes: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("bgjobs_ttl_deletions_total "))
        .map_or(0.0, |v| v.trim().parse().unwrap());
    assert!(deletes <= 1.0, "a job held by its finalizer was deleted again and again: {deletes}");
    drop(release);
    let deadline = std::time::Instant::now() + MINUTE;
    while env.jobs.get_opt("running").await.unwrap().is_some() || env.jobs.get_opt("waiting").await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the jobs did not go once their finalizer was removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_handlers_bad_args_and_attempt_timeouts_end_with_readable_reasons() {
    let env = TestEnv::new("failures").await;
    // An unknown handler is left for a replica that has it for the grace (5 minutes by default), then failed.
    let _r = env.replica("r", &["--unknown-handler-grace", "1s"]);
    env.create("unknown", json!({"jobName": "SendEmail"})).await;
    env.create("bad-args", json!({"jobName": "sleep", "args": {"seconds": "soon"}})).await;
    env.create("too-slow", json!({"jobName": "sleep", "args": {"seconds": 30}, "attemptTimeoutSeconds": 1, "retry": {"maxAttempts": 2, "backoffSeconds": 0}})).await;
    let jobs =
        env.wait_until(MINUTE, "all final", |jobs| jobs.len() == 3 && jobs.iter().all(|j| j.phase().is_final())).await;
    let reason = |name: &str| {
        let j = jobs.iter().find(|j| j.name_any() == name).unwrap();
        assert_eq!(j.phase(), Phase::Failed, "{name}");
        j.status.as_ref().unwrap().last_error.clone().unwrap()
    };
    assert!(reason("unknown").contains("no handler is registered for jobName \"SendEmail\""));
    assert!(reason("bad-args").contains("spec.args do not fit handler \"sleep\""));
    let slow = reason("too-slow");
    assert!(slow.contains("exceeded attemptTimeoutSeconds (1s)") && slow.contains("2 of 2"), "{slow}");
}

/// A job whose spec nears etcd's limit (1.5 MiB a request by default) leaves no room for a long error in its status.
/// The outcome is written again with its error and condition messages cut, and the job ends, once. Refused, the
/// outcome was taken as lost, and the attempt run again until the job's attempts or deadline ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_too_large_to_store_its_outcome_whole_still_records_how_it_ended_once() {
    let env = TestEnv::new("too-large").await;
    let _r = env.replica("r", &[]);
    // The message, the job's args, is also its error: the claim fits (about 1 KB of status), the outcome with a
    // 4 KiB error and a 1 KiB condition message does not (objects of 1,570,000 characters of args were stored here,
    // 1,580,000 refused), the shrunk one does.
    let message = "x".repeat(1_568_000);
    let spec = json!({"jobName": "fail", "args": {"message": message, "permanent": true}, "retry": {"maxAttempts": 3, "backoffSeconds": 0}});
    env.create("big", spec).await;
    let job = env.wait_job("big", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let error = job.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert_eq!((job.phase(), job.attempts()), (Phase::Failed, 1), "{}", &error[..error.len().min(300)]);
    assert!(
        error.starts_with("xxxx") && error.ends_with("too large for etcd to store more)"),
        "{}",
        &error[..error.len().min(300)]
    );
    assert_eq!(starts_per_job(&env).get("big"), Some(&1), "the job ran once");
}

/// Jobs whose spec leaves etcd (1.5 MiB a request by default) less and less room for a status, up to none at all,
/// each end once, or are left alone saying why: a claim, an outcome or a requeue that does not fit is written again
/// with less (down to the bare outcome, no larger than the claim it ends), and a job too large to store even that is
/// failed if that fits, else left as it is with a `TooLarge` Warning, and not tried again for minutes. Before, a job
/// whose claim fitted but whose outcome did not ran again and again ("attempt 6 was lost: worker r stopped renewing
/// its lease"), and one too large to claim was claimed and given back once a second, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_too_large_for_any_status_fail_or_wait_saying_why_and_none_runs_twice() {
    let env = TestEnv::new("too-large-claim").await;
    // Job names of one length, so that one spec size means one object size.
    let spec = |n: usize| json!({"jobName": "fail", "args": {"message": "x".repeat(n), "permanent": true}});
    let fits = largest_storable(&env, spec).await;
    // From no room at all to room for a claim and a cut outcome (a status takes about 1 KB; its messages, cut, 500
    // bytes), 100 bytes apart.
    let names: Vec<String> = (0..=12).map(|i| format!("big-{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        env.create(name, spec(fits - 100 * i)).await;
    }
    // A write of an object this large takes 0.3-0.5 s here, and a status may take three: more than the test's 2 s
    // renew deadline leaves an outcome after a slow claim.
    let _r = env.replica("r", &["--lease-duration", "15s", "--renew-deadline", "10s", "--renew-interval", "2s"]);
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    // Every job final, or Waiting with its warning.
    let settled_jobs = loop {
        let jobs = env.list().await;
        let mut settled = 0;
        for j in &jobs {
            settled +=
                usize::from(j.phase().is_final() || !env.warning_events(&j.name_any(), "TooLarge").await.is_empty());
        }
        if settled == names.len() {
            break jobs;
        }
        assert!(std::time::Instant::now() < deadline, "not all settled: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // Long enough for a job claimed in a loop to be claimed again a few times.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let starts = starts_per_job(&env);
    let (mut ran_once, mut failed_unclaimed, mut left) = (0, 0, 0);
    for j in env.list().await {
        let name = j.name_any();
        let error = j.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
        let shown =
            format!("{name}: {:?} after {} attempts: {}", j.phase(), j.attempts(), &error[..error.len().min(200)]);
        assert!(starts.get(&name).copied().unwrap_or(0) <= 1, "{shown}: ran {:?} times", starts.get(&name));
        match (j.phase(), j.attempts()) {
            (Phase::Failed, 1) => {
                assert_eq!(starts.get(&name), Some(&1), "{shown}");
                ran_once += 1;
            }
            (Phase::Failed, 0) => {
                let warnings = env.warnings_on(&name, "Failed").await;
                assert!(warnings.iter().any(|w| w.contains("too large for etcd")), "{shown}: {warnings:?}");
                failed_unclaimed += 1;
            }
            (Phase::Waiting, 0) => {
                let events = env.warning_events(&name, "TooLarge").await;
                let times: i32 = events.iter().map(|e| e.series.as_ref().map_or(1, |s| s.count)).sum();
                assert_eq!(times, 1, "{shown}: warned {times} times (tried again at once?)");
                left += 1;
            }
            _ => panic!("{shown}"),
        }
    }
    assert!(
        left >= 1 && ran_once >= 1,
        "every kind of job: {ran_once} ran once, {failed_unclaimed} failed \
        unclaimed, {left} left waiting; {}",
        common::summary(&settled_jobs)
    );
}

/// The largest `n` for which etcd stores the job `spec(n)` under a name of six characters, with no status (to 8).
/// Made here by creating (and deleting) probes: etcd's limit is its own flag (`--max-request-bytes`).
async fn largest_storable(env: &TestEnv, spec: impl Fn(usize) -> serde_json::Value) -> usize {
    use kube::api::{DeleteParams, PostParams};
    let (mut fits, mut refused) = (1_000_000usize, 2_000_000usize);
    while refused - fits > 8 {
        let mid = (fits + refused) / 2;
        match env.jobs.create(&PostParams::default(), &common::fixtures::job("big-pp", spec(mid))).await {
            Ok(_) => {
                fits = mid;
                env.jobs.delete("big-pp", &DeleteParams::default()).await.expect("delete the probe");
                env.wait_until(MINUTE, "the probe gone", |jobs| jobs.is_empty()).await;
            }
            Err(kube::Error::Api(s)) if s.code == 413 || s.message.contains("too large") => refused = mid,
            Err(e) => panic!("create a probe of {mid} characters: {e}"),
        }
    }
    fits
}

/// An in-process handler's result that cannot fit beside its job's spec: the attempt is recorded `Succeeded`
/// without it, with a `ResultDropped` Warning, and the handler runs once. Before, the outcome went unrecorded (a
/// result was never dropped, even bare) and the handler ran again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_to_store_beside_its_job_is_dropped_saying_so_and_the_handler_runs_once() {
    let env = TestEnv::new("too-large-result").await;
    let spec =
        |n: usize| json!({"jobName": "record", "args": {"ms": 10, "result_bytes": 20_000, "pad": "x".repeat(n)}});
    // Room for a claim and its outcome (about 1 KB), not for a 20 KB result.
    let pad = largest_storable(&env, spec).await - 3_000;
    env.create("big-rr", spec(pad)).await;
    let options = common::ReplicaOptions { test_worker: true, ..Default::default() };
    let leases = ["--lease-duration", "15s", "--renew-deadline", "10s", "--renew-interval", "2s"];
    let _r = env.replica_with("r", &leases, &options);
    let job = env.wait_job("big-rr", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    // Long enough for an unrecorded attempt to be taken over and run again.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!((job.phase(), job.attempts()), (Phase::Succeeded, 1));
    assert_eq!(job.status.as_ref().and_then(|s| s.result.clone()), None);
    assert_eq!(starts_per_job(&env).get("big-rr"), Some(&1), "the handler ran once");
    let warnings = env.warnings_on("big-rr", "ResultDropped").await;
    assert!(warnings.iter().any(|w| w.contains("result was dropped")), "{warnings:?}");
}

/// A job named near the 253-character limit still gets its Events. kube's recorder names an Event after its object
/// plus 17 characters, and the apiserver refused every Event of a job named over 236.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_named_near_the_limit_still_gets_its_events() {
    let env = TestEnv::new("long-name").await;
    let _r = env.replica("r", &[]);
    let name = format!("long-{}", "a".repeat(245));
    env.create(&name, json!({"jobName": "fail", "args": {"permanent": true}})).await;
    env.wait_job(&name, MINUTE, "final", |j| j.phase().is_final()).await;
    // Events are published in the background, after the outcome.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.warnings_on(&name, "Failed").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no Failed Event on the job");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_a_running_job_back_so_another_replica_starts_it_at_once() {
    let env = TestEnv::new("sigterm").await;
    let mut a = env.replica("a", &["--shutdown-grace", "1s"]);
    // Long enough to be running still when a's 1 s grace ends, some 3 s after it was seen running, on a slow machine.
    env.create("handover", json!({"jobName": "sleep", "args": {"seconds": 10}})).await;
    env.wait_job("handover", MINUTE, "Running on a", |j| {
        j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a")
    })
    .await;
    let _b = env.replica("b", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.terminate(Duration::from_secs(15)), "a exits after its grace period");
    // Said in an Event too (a job too large for its whole status keeps none of lastError), published before a exits.
    let interrupted = env.warnings_on("handover", "Interrupted").await;
    assert!(
        interrupted.iter().any(|note| note.contains("attempt 1 was interrupted: worker a shut down")),
        "an Interrupted Event, published before a exited: {interrupted:?}"
    );
    let job = env
        .wait_job("handover", Duration::from_secs(5), "Running on b", |j| {
            j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("b")
        })
        .await;
    assert_eq!(job.attempts(), 2);
    let job = env.wait_job("handover", MINUTE, "Succeeded", |j| j.phase().is_final()).await;
    assert_eq!(job.phase(), Phase::Succeeded);
    assert!(job.status.unwrap().last_error.unwrap_or_default().contains("interrupted: worker a shut down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_after_their_ttl_and_kept_without_one() {
    let env = TestEnv::new("ttl").await;
    let _r = env.replica("r", &["--ttl-seconds-after-finished", "3600"]);
    env.create("gone-at-once", json!({"jobName": "noop", "ttlSecondsAfterFinished": 0})).await;
    env.create("gone-soon", json!({"jobName": "noop", "ttlSecondsAfterFinished": 2})).await;
    env.create("kept", json!({"jobName": "noop"})).await;
    let jobs = env.wait_until(MINUTE, "only the kept job left", |jobs| jobs.len() == 1).await;
    assert_eq!(jobs[0].name_any(), "kept", "the operator-wide TTL of an hour keeps it");
    assert_eq!(jobs[0].phase(), Phase::Succeeded);
    assert_eq!(starts_per_job(&env).len(), 3, "every job ran before it was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_cap_bounds_running_jobs_across_all_replicas() {
    let env = TestEnv::new("cluster-cap").await;
    let cap = 3;
    let args = [
        "--cluster-max-concurrency",
        "3",
        "--lease-namespace",
        env.ns.as_str(),
        "--max-concurrent-jobs-per-instance",
        "4",
    ];
    let _replicas: Vec<_> = (0..3).map(|i| env.replica(&format!("r{i}"), &args)).collect();
    for i in 0..30 {
        env.create(&format!("c{i:02}"), json!({"jobName": "sleep", "args": {"seconds": 0.4}})).await;
    }
    // Sample the Running count from the API while the replicas drain the queue.
    let mut sampled_max = 0;
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    loop {
        let jobs = env.list().await;
        sampled_max = sampled_max.max(jobs.iter().filter(|j| j.phase() == Phase::Running).count());
        if jobs.len() == 30 && all_in(&jobs, Phase::Succeeded) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "queue not drained: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let execs = executions(&env.invocations());
    let peak = max_overlap(&execs, now_ms());
    let workers: std::collections::BTreeSet<_> = execs.iter().map(|e| e.worker.as_str()).collect();
    eprintln!(
        "cluster cap {cap}: peak {peak} running (audit log), {sampled_max} sampled from the API, workers {workers:?}"
    );
    assert!(peak <= cap && sampled_max <= cap, "peak {peak} / sampled {sampled_max} above the cluster cap of {cap}");
    assert!(peak >= 2, "the cap is a cap, not a lock: several jobs ran at once");
    assert!(workers.len() >= 2, "several replicas shared the capped work: {workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_only_their_queues_and_a_non_executing_replica_only_tidies() {
    let env = TestEnv::new("queues").await;
    let _tidy = env.replica("tidy", &["--job-execution-enabled=false"]);
    env.create("cancelled", json!({"jobName": "noop", "cancel": true})).await;
    env.create("fast-job", json!({"jobName": "noop", "queue": "fast"})).await;
    env.create("slow-job", json!({"jobName": "noop", "queue": "slow"})).await;
    // The non-executing replica settles what needs no execution, and runs nothing.
    env.wait_job("cancelled", MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = env.list().await;
    assert!(
        jobs.iter().filter(|j| j.name_any() != "cancelled").all(|j| j.phase() == Phase::Waiting),
        "{}",
        common::summary(&jobs)
    );

    let _fast = env.replica("fast-only", &["--queues", "fast"]);
    env.wait_job("fast-job", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slow = env.jobs.get("slow-job").await.unwrap();
    assert_eq!(slow.phase(), Phase::Waiting, "a replica never runs jobs of a queue it does not serve");
    assert_eq!(starts_per_job(&env).into_keys().collect::<Vec<_>>(), ["fast-job"]);
}

/// With a cluster cap no larger than what the replicas could run, a freed slot goes to the head of the queue: a
/// replica whose pick is spread over a window (for racing replicas) would take it for a later job (review of the
/// incremental dispatch: 8.6 s inversions before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_cap_scarcer_than_the_replicas_slots_keeps_fifo_within_the_bound() {
    let env = TestEnv::new("fifo-cap").await;
    let n = 16;
    let mut order = HashMap::new();
    for i in 0..n {
        let name = format!("j{i:03}");
        env.create(&name, json!({"jobName": "sleep", "args": {"seconds": 4}})).await;
        order.insert(name, i);
    }
    let cap = [
        "--lease-namespace",
        env.ns.as_str(),
        "--cluster-max-concurrency",
        "2",
        "--max-concurrent-jobs-per-instance",
        "1",
    ];
    let _replicas: Vec<_> = (0..3).map(|i| env.replica(&format!("r{i}"), &cap)).collect();
    env.wait_until(Duration::from_secs(240), "all jobs Succeeded", |jobs| {
        jobs.len() == n && all_in(jobs, Phase::Succeeded)
    })
    .await;
    let starts: Vec<(String, i64)> = executions(&env.invocations())
        .into_iter()
        .map(|e| (e.job.rsplit('/').next().unwrap().to_string(), e.start))
        .collect();
    let mut worst = (0i64, String::new());
    for (a, ta) in &starts {
        for (b, tb) in &starts {
            if order[a] < order[b] && ta > tb && ta - tb > worst.0 {
                worst = (ta - tb, format!("{a} started after {b}"));
            }
        }
    }
    let mut sorted = starts.clone();
    sorted.sort_by_key(|(_, t)| *t);
    eprintln!("dispatch order: {:?}", sorted.iter().map(|(j, _)| j.as_str()).collect::<Vec<_>>());
    eprintln!("worst inversion {} ms ({})", worst.0, worst.1);
    assert!(worst.0 < bgjobs::wire::FIFO_BOUND.as_millis() as i64, "worst inversion {} ms: {}", worst.0, worst.1);
}

/// The free slots go to the head of the queue. Three replicas with a slot each, one kept busy by a long job: each
/// burst of three jobs is run by the other two, the first two first. Each job of a replica's window has an owner
/// among the replicas, who gets a moment to claim it first. Before: the busy replica owned jobs it had no room for,
/// and a free replica took a later job it owned (or ranked higher) meanwhile; and a window wider than the free slots
/// let one free replica own two of its jobs and take one, and the other free replica take the third, its own. Either
/// way an earlier job then waited for a later one to end (a review found these: 5 s inversions). Now only a replica
/// with room owns jobs (`bgjobs.dev/slots` on its member Lease, its `Running` jobs in the cache), a replica takes its
/// own in queue order, and the window is no wider than the replicas' room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_free_slots_go_to_the_head_not_to_later_jobs_their_replicas_own() {
    let env = TestEnv::new("fifo-room").await;
    let one_slot = ["--max-concurrent-jobs-per-instance", "1"];
    let _busy = env.replica("busy", &one_slot);
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 600}})).await;
    env.wait_job("long", MINUTE, "Running on busy", |j| j.phase() == Phase::Running).await;
    let _free: Vec<_> = ["free-1", "free-2"].iter().map(|r| env.replica(r, &one_slot)).collect();
    // Until both are members, the busy replica's long job is all there is.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let bursts = 8;
    let mut queued: Vec<Vec<String>> = Vec::new();
    for i in 0..bursts {
        // Sent at once, so that the replicas see the three in one pass. Their queue order is the order they were
        // stored in: creation second, then revision.
        let names: Vec<String> = ["a", "b", "c"].iter().map(|p| format!("{p}{i}")).collect();
        let spec = json!({"jobName": "sleep", "args": {"seconds": 5}});
        let mut made = futures::future::join_all(names.iter().map(|n| env.create(n, spec.clone()))).await;
        made.sort_by_key(|j| {
            let second = j.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or_default();
            (second, j.resource_version().unwrap_or_default().parse::<u64>().unwrap_or_default())
        });
        queued.push(made.iter().map(|j| j.name_any()).collect());
        env.wait_until(MINUTE, "the burst Succeeded", |jobs| {
            names.iter().all(|n| jobs.iter().any(|j| j.name_any() == *n && j.phase() == Phase::Succeeded))
        })
        .await;
    }
    let late = started_late(&env, &queued);
    assert!(late.is_empty(), "a job waited behind a later one: {late:?}");
}

/// A replica that serves one queue (`--queues x`) beside one that serves every queue, twelve jobs runnable at once
/// on both (one creation second, one delay): four of queue y, then eight of x. Before: the first counted the other's
/// free slots as room for x, so its window was twice its slots; it took the jobs of x it owned and left the others
/// to that replica, which spent its slots on the head of y, and those earlier jobs of x waited a whole run while later
/// ones ran (a review found it: a 20 s inversion). Now a replica counts on the room only of those serving the very
/// same queues: the first takes the head of x in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serving_one_queue_does_not_leave_its_head_to_one_that_serves_every_queue() {
    let env = TestEnv::new("fifo-queues").await;
    let ns = env.ns.as_str();
    let a = env.replica("a", &["--lease-namespace", ns, "--queues", "x", "--max-concurrent-jobs-per-instance", "4"]);
    let b = env.replica("b", &["--lease-namespace", ns, "--max-concurrent-jobs-per-instance", "4"]);
    env.wait_joined(&a, &env.ns).await;
    env.wait_joined(&b, &env.ns).await;
    let names: Vec<(String, &str)> =
        (1..=4).map(|i| (format!("y{i}"), "y")).chain((1..=8).map(|i| (format!("x{i}"), "x"))).collect();
    for round in 0.. {
        assert!(round < 5, "never created the twelve jobs within one second");
        // Right after a second begins, one at a time: their queue order is the order they are stored in.
        tokio::time::sleep(Duration::from_millis(1050 - (now_ms() % 1000) as u64)).await;
        let mut seconds = std::collections::BTreeSet::new();
        for (name, queue) in &names {
            let spec = json!({"jobName": "sleep", "queue": queue, "delaySeconds": 6, "args": {"seconds": 15}});
            let made = env.create(name, spec).await;
            seconds.insert(made.metadata.creation_timestamp.map(|t| t.0.as_second()));
        }
        if seconds.len() == 1 {
            break;
        }
        for (name, _) in &names {
            env.jobs.delete(name, &Default::default()).await.unwrap();
        }
        env.wait_until(MINUTE, "the round's jobs gone", |jobs| jobs.is_empty()).await;
    }
    env.wait_until(3 * MINUTE, "all jobs Succeeded", |jobs| {
        jobs.len() == names.len() && all_in(jobs, Phase::Succeeded)
    })
    .await;
    let late = started_late(&env, &[(1..=8).map(|i| format!("x{i}")).collect()]);
    assert!(late.is_empty(), "a job of x waited behind a later one: {late:?}");
}

/// Each job of `queues` (each in queue order) that started more than the FIFO bound after a later one of its queue.
fn started_late(env: &TestEnv, queues: &[Vec<String>]) -> Vec<String> {
    let starts: HashMap<String, i64> = executions(&env.invocations())
        .into_iter()
        .map(|e| (e.job.rsplit('/').next().unwrap().to_string(), e.start))
        .collect();
    let bound = bgjobs::wire::FIFO_BOUND.as_millis() as i64;
    let mut late = Vec::new();
    for queue in queues {
        for (x, earlier) in queue.iter().enumerate() {
            for later in &queue[x + 1..] {
                let (e, l) = (starts[earlier], starts[later]);
                if e - l > bound {
                    late.push(format!("{earlier} started {} ms after {later}, queued behind it", e - l));
                }
            }
        }
    }
    late
}

/// The apiserver's count of custom-resource lists it read from etcd (each page of a paged list is one).
async fn etcd_custom_resource_lists(env: &TestEnv) -> f64 {
    let text = env.client.request_text(http::Request::get("/metrics").body(Vec::new()).unwrap()).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with(
                "etcd_request_duration_seconds_count{operation=\"list\",type=\"*[]unstructured.Unstructured\"}",
            )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A replica's first list of its jobs is one response from the apiserver's watch cache, read item by item. A paged
/// list reads every page from etcd and, at 100,000 jobs on a busy apiserver, outlasts the watch cache's window, so the
/// replica lists again and again and never runs a job (`list_watch`). Run alone, the apiserver's count of
/// custom-resource lists read from etcd while the replica started was 14 with paged lists and 2 now; beside the rest
/// of the suite that count moves by more than that, so it is printed here, not judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_a_backlog_of_6000_jobs_in_one_list() {
    let env = TestEnv::new("cache-list").await;
    let (ok, _, err) = env.cli(&["enqueue", "noop", "-c", "6000", "--parallel", "8"]);
    assert!(ok, "{err}");
    let before = etcd_custom_resource_lists(&env).await;
    let replica = env.replica("r1", &["--job-execution-enabled=false"]);
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    while !replica.log_text().contains("caches synced") {
        assert!(std::time::Instant::now() < deadline, "the replica never synced:\n{}", replica.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = etcd_custom_resource_lists(&env).await;
    eprintln!("custom-resource lists read from etcd while the replica started: {}", after - before);
    let log = replica.log_text();
    // The definitions are listed the same way: only the jobs' list is counted.
    let lists: Vec<&str> =
        log.lines().filter(|l| l.contains("listed objects=") && l.contains("/backgroundjobs")).collect();
    assert_eq!(lists.len(), 1, "one list of the jobs:\n{log}");
    assert!(lists[0].contains("listed objects=6000 "), "all 6,000 jobs in that one list: {}", lists[0]);
}

/// A job whose handler one replica lacks (the stock `bgjobs` beside a worker built with more handlers: a rolling
/// update that adds one, or deployments built apart) is left by that replica for one that has it. Before, the stock
/// replica claimed such jobs at once and failed them ("no handler is registered"), never run. A job whose handler no
/// replica has is claimed once its `--unknown-handler-grace` has passed, and fails naming the handlers there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_handler_a_replica_lacks_is_left_for_one_that_has_it() {
    let env = TestEnv::new("handler-elsewhere").await;
    let _stock = env.replica("stock", &[]);
    // The stock replica runs what it has a handler for: it is up, and claims.
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    for i in 0..4 {
        env.create(&format!("rec-{i}"), json!({"jobName": "record", "args": {"ms": 10}})).await;
    }
    // The stock replica alone, for longer than a claim takes.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let jobs: Vec<_> = env.list().await.into_iter().filter(|j| j.name_any().starts_with("rec-")).collect();
    assert!(
        jobs.len() == 4 && jobs.iter().all(|j| j.phase() == Phase::Waiting),
        "{:?}",
        jobs.iter().map(|j| j.status.clone()).collect::<Vec<_>>()
    );
    let options = common::ReplicaOptions { test_worker: true, ..Default::default() };
    let _worker = env.replica_with("worker", &[], &options);
    for i in 0..4 {
        let done = env.wait_job(&format!("rec-{i}"), MINUTE, "finished", |j| j.phase().is_final()).await;
        assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
    }
    // No replica has this one: the replica with a short grace fails it, once the grace has passed.
    let _short = env.replica("short", &["--unknown-handler-grace", "2s"]);
    env.create("typo", json!({"jobName": "no-such-handler"})).await;
    let failed = env.wait_job("typo", MINUTE, "finished", |j| j.phase().is_final()).await;
    let why = failed.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert_eq!(failed.phase(), Phase::Failed, "{why}");
    assert!(why.contains(r#"no handler is registered for jobName "no-such-handler" on worker short"#), "{why}");
    let waited = failed.status.as_ref().and_then(|s| s.start_time.clone()).unwrap().0.as_second()
        - failed.metadata.creation_timestamp.clone().unwrap().0.as_second();
    // The grace counts from the end of the creation second: 2 s after it is 3 s after the second's start.
    assert!(waited >= 3, "claimed {waited} s after its creation second began, before the grace had passed");
}

/// A job whose handler only a busy replica has waits for that replica, however long, instead of being failed by a
/// replica that lacks the handler once its `--unknown-handler-grace` has passed; and when the replica that has it
/// goes, the grace counts from when it was last seen, not from when the job may run. Before, the stock replica
/// failed the job waiting behind the busy one as soon as the grace had passed since its creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_handler_only_a_busy_replica_has_waits_for_it_past_the_grace() {
    let env = TestEnv::new("handler-busy").await;
    let stock = env.replica("stock", &["--unknown-handler-grace", "2s"]);
    let options = common::ReplicaOptions { test_worker: true, ..Default::default() };
    let mut worker = env.replica_with("worker", &["--max-concurrent-jobs-per-instance", "1"], &options);
    env.wait_joined(&stock, "default").await;
    env.create("long", json!({"jobName": "record", "args": {"ms": 10_000}})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    env.create("next", json!({"jobName": "record", "args": {"ms": 10}})).await;
    // Waiting behind the busy worker, past the stock replica's grace.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let next = env.jobs.get("next").await.unwrap();
    assert_eq!(next.phase(), Phase::Waiting, "{:?}", next.status);
    for name in ["long", "next"] {
        let done = env.wait_job(name, MINUTE, "finished", |j| j.phase().is_final()).await;
        assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{name}: {:?}", done.status);
        assert_eq!(done.status.as_ref().and_then(|s| s.worker.as_deref()), Some("worker"), "{name}");
    }
    // The worker busy again, a job waiting past the grace behind it, and then the worker gone for good.
    env.create("long-2", json!({"jobName": "record", "args": {"ms": 60_000}})).await;
    env.wait_job("long-2", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    env.create("stranded", json!({"jobName": "record", "args": {"ms": 10}})).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.jobs.get("stranded").await.unwrap().phase(), Phase::Waiting);
    worker.kill9();
    let killed = jiff::Timestamp::now();
    let failed = env.wait_job("stranded", MINUTE, "finished", |j| j.phase().is_final()).await;
    let why = failed.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert_eq!(failed.phase(), Phase::Failed, "{why}");
    assert!(why.contains(r#"no handler is registered for jobName "record" on worker stock"#), "{why}");
    // Its member Lease expires 3 s after its last renewal, and the grace of 2 s counts from then: not at once.
    let started = failed.status.as_ref().and_then(|s| s.start_time.clone()).unwrap().0;
    let after_kill = started.duration_since(killed).as_secs_f64();
    assert!(after_kill >= 2.0, "failed {after_kill:.1} s after the worker was killed, within the grace");
}

/// A replica that starts while the only replica with a job's handler is away (a rollout's gap: the old one stopped,
/// its replacement not up yet) leaves the job for its grace from its own start: it saw nobody go. Before, it knew
/// of no replica with the handler, the job's own grace was long over, and it failed the job at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_starts_while_the_replicas_with_a_jobs_handler_are_away_leaves_the_job_to_them() {
    let env = TestEnv::new("handler-gap").await;
    let options = common::ReplicaOptions { test_worker: true, ..Default::default() };
    let mut worker =
        env.replica_with("worker", &["--max-concurrent-jobs-per-instance", "1", "--shutdown-grace", "1s"], &options);
    env.create("long", json!({"jobName": "record", "args": {"ms": 60_000}})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    env.create("next", json!({"jobName": "record", "args": {"ms": 10}})).await;
    // Longer than the stock replica's grace, waiting behind the busy worker.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(worker.terminate(MINUTE), "the worker stops");
    let _stock = env.replica("stock", &["--unknown-handler-grace", "10s"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Two slots: the long job, handed back by the worker's shutdown, runs again on it too.
    let _worker2 = env.replica_with("worker-2", &["--max-concurrent-jobs-per-instance", "2"], &options);
    let done = env.wait_job("next", MINUTE, "finished", |j| j.phase().is_final()).await;
    let why = done.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert_eq!(done.phase(), Phase::Succeeded, "{why}");
    assert_eq!(done.status.as_ref().and_then(|s| s.worker.as_deref()), Some("worker-2"));
}

/// A job cancelled while its replica shuts down (its attempt let finish in the shutdown grace) is stopped at once and
/// recorded `Cancelled`, and the replica then exits. Before, the replica acted on nothing in the grace: the work ran
/// on until the grace was over, was interrupted by the shutdown and charged, and only then recorded cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_during_its_replicas_shutdown_grace_stops_at_once() {
    let env = TestEnv::new("cancel-in-grace").await;
    let mut r = env.replica("r", &["--shutdown-grace", "60s"]);
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 120}})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    assert!(!r.terminate(Duration::from_millis(200)), "it lets its attempt finish");
    let deadline = std::time::Instant::now() + MINUTE;
    while !r.log_text().contains("shutting down: no new claims") {
        assert!(std::time::Instant::now() < deadline, "no shutdown:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled = std::time::Instant::now();
    env.jobs.patch("long", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}}))).await.unwrap();
    let done = env.wait_job("long", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let why = done.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert_eq!(done.phase(), Phase::Cancelled, "{why}");
    assert!(cancelled.elapsed() < Duration::from_secs(30), "stopped after {:?}, not at once", cancelled.elapsed());
    assert!(!why.contains("shut down"), "{why}");
    assert!(r.exit_within(Duration::from_secs(30)).is_some(), "the replica exits once its attempt stopped");
}

/// Limits raised on a running job (the admission webhook lets `timeoutSeconds` and `retry` through) apply to the
/// attempt already running: a job whose timeout was raised from 20 s to 600 s while it ran finishes its 40 s of work,
/// and one whose `retry.maxAttempts` was raised from 1 to 2 while its first attempt ran is tried again when that
/// attempt times out. Before, an attempt was bound and judged by the spec it was claimed with: the first was
/// `Abandoned` at 20 s ("the job's timeout of 20s since creation passed"), the second `Failed` "after 1 of 1
/// attempts", each against its own spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_raised_on_a_running_job_apply_to_the_attempt_already_running() {
    let env = TestEnv::new("limits-raised").await;
    let _r = env.replica("r", &[]);
    env.create("longer", json!({"jobName": "sleep", "args": {"seconds": 40}, "timeoutSeconds": 20})).await;
    let retried = json!({"jobName": "sleep", "args": {"seconds": 40}, "attemptTimeoutSeconds": 15,
        "retry": {"maxAttempts": 1, "backoffSeconds": 1}});
    env.create("retried", retried).await;
    for name in ["longer", "retried"] {
        env.wait_job(name, MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    }
    let raise = |spec: serde_json::Value| Patch::Merge(json!({ "spec": spec }));
    env.jobs.patch("longer", &PatchParams::default(), &raise(json!({"timeoutSeconds": 600}))).await.unwrap();
    env.jobs.patch("retried", &PatchParams::default(), &raise(json!({"retry": {"maxAttempts": 2}}))).await.unwrap();

    let longer = env.wait_job("longer", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let why = longer.status.clone().and_then(|s| s.last_error).unwrap_or_default();
    assert_eq!((longer.phase(), longer.attempts()), (Phase::Succeeded, 1), "{why}");
    let retried = env.wait_job("retried", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let why = retried.status.clone().and_then(|s| s.last_error).unwrap_or_default();
    assert_eq!((retried.phase(), retried.attempts()), (Phase::Failed, 2), "{why}");
    assert!(
        why.contains("exceeded attemptTimeoutSeconds (15s)") && why.contains("gave up after 2 of 2 attempts"),
        "{why}"
    );
}
