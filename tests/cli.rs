//! The `bgjobs` CLI against the local control plane: enqueue, list and stats with `--output`, describe with the
//! attempt history, retry, cancel, completions.

mod common;

use std::process::Command;
use std::time::Duration;

use bgjobs::api::{BackgroundJob, Phase};
use common::TestEnv;
use kube::ResourceExt;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_requeues_a_failed_job_with_a_new_budget_and_describe_tells_its_history() {
    let env = TestEnv::new("cli-retry").await;
    let _r = env.replica("r", &[]);
    env.create("flaky", json!({"jobName": "fail", "args": {"message": "still down"}, "retry": {"maxAttempts": 1}}))
        .await;
    let failed = env.wait_job("flaky", MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    assert_finished_shape(&failed);

    // A cancel asked for after the job failed changes nothing, says so, and a retry clears it: the job runs again.
    let (ok, out, err) = env.cli(&["cancel", "flaky"]);
    assert!(ok && out.contains("is Failed already: there is nothing to cancel"), "{out}{err}");
    let (ok, out, err) = env.cli(&["retry", "flaky", "-o", "json"]);
    let requeued: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(ok && requeued["status"]["phase"] == "Waiting", "{out}{err}");
    let job = env.wait_job("flaky", MINUTE, "Failed again", |j| j.phase() == Phase::Failed && j.attempts() == 2).await;
    assert!(!job.spec.cancel, "the retry cleared the cancel");
    assert_eq!(job.spec.retry.max_attempts, Some(2), "another full budget of 1 on top of the attempt made");
    assert_finished_shape(&job);

    let (ok, out, err) = env.cli(&["retry", "flaky"]);
    assert!(ok, "{err}");
    assert!(out.contains("re-queued"), "{out}");
    env.wait_job("flaky", MINUTE, "Failed a third time", |j| j.phase() == Phase::Failed && j.attempts() == 3).await;

    // The history comes from the job's Events: by default (`--events problems`) one Failed per attempt, each its
    // own series (the recorder would fold equal ones), and no Claimed (the happy path).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = env.cli(&["describe", "flaky", "-o", "json"]);
        assert!(ok, "{err}");
        let described: serde_json::Value = serde_json::from_str(&out).expect("describe -o json is JSON");
        let reasons: Vec<&str> =
            described["history"].as_array().unwrap().iter().map(|h| h["reason"].as_str().unwrap()).collect();
        if reasons.iter().filter(|r| **r == "Failed").count() >= 3 {
            assert!(!reasons.contains(&"Claimed"), "{reasons:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "history incomplete: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = env.cli(&["describe", "flaky"]);
    assert!(ok, "{err}");
    assert!(out.contains("Phase:         Failed") && out.contains("Attempts:      3"), "{out}");
    assert!(out.contains("History:") && out.matches("still down").count() >= 3, "{out}");

    let (ok, _, err) = env.cli(&["retry", "missing-job"]);
    assert!(!ok && err.contains("missing-job"), "{err}");
}

/// Two retries of one failed job at once. Retry B reads the job (Failed, its budget spent) and its answer is held on
/// the way; retry A re-queues the job and a replica starts attempt 2. When B goes on, its plan (a new budget, then
/// back to `Waiting`) is for a job that no longer is: it must be refused, and attempt 2 left alone. Before, B's spec
/// patch carried no precondition, and its status write went under the patch's answer: the running job went back to
/// `Waiting`, and attempt 3 was claimed while attempt 2 still ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_read_the_job_before_another_retry_requeued_it_is_refused_and_the_running_attempt_left_alone() {
    let env = TestEnv::new("cli-retry-race").await;
    let _r = env.replica_with("r", &[], &common::ReplicaOptions { test_worker: true, ..Default::default() });
    let args = json!({"ms": 10_000, "fail_until_attempt": 2});
    env.create("flaky", json!({"jobName": "record", "args": args, "retry": {"maxAttempts": 1}})).await;
    env.wait_job("flaky", Duration::from_secs(90), "Failed", |j| j.phase() == Phase::Failed).await;

    // Retry B's client goes through a proxy, its connection open before the proxy holds the answers.
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let kubeconfig = kube::config::Kubeconfig::read_from(proxy.kubeconfig(&env.dir)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let through_proxy: kube::Api<BackgroundJob> =
        kube::Api::namespaced(kube::Client::try_from(config).unwrap(), &env.ns);
    through_proxy.get("flaky").await.unwrap();
    proxy.hold_downstream();
    let retry_b = tokio::spawn(async move { bgjobs::jobs::retry(&through_proxy, "flaky").await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!retry_b.is_finished(), "retry B's read was not held");

    bgjobs::jobs::retry(&env.jobs, "flaky").await.expect("retry A");
    let running =
        env.wait_job("flaky", MINUTE, "attempt 2 running", |j| j.phase() == Phase::Running && j.attempts() == 2).await;
    proxy.release_downstream();
    let b = tokio::time::timeout(MINUTE, retry_b).await.expect("retry B answered").unwrap();
    let err = b.expect_err("retry B re-queued a job that another retry had re-queued and a replica was running");
    assert!(err.to_string().contains("changed while it was being re-queued"), "{err}");

    let now = env.jobs.get("flaky").await.unwrap();
    assert_eq!((now.phase(), now.attempts()), (Phase::Running, 2), "attempt 2 is left running");
    assert_eq!(now.spec.retry.max_attempts, running.spec.retry.max_attempts, "no second budget");
    let done = env.wait_job("flaky", MINUTE, "attempt 2 done", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 2));
    let starts = env.invocations().into_iter().filter(|l| l.ev == "start").count();
    assert_eq!(starts, 2, "one start per attempt");
}

/// A finished job as stored keeps who ran it and a `Finished` condition, not its Lease's name or a `Running`
/// condition (what the apiserver holds for every finished job until retention deletes it).
fn assert_finished_shape(job: &BackgroundJob) {
    assert_only_finished_condition(job);
    let s = job.status.as_ref().expect("a finished job has a status");
    assert!(s.worker.is_some() && s.start_time.is_some() && s.completion_time.is_some(), "{s:?}");
    assert_status_tracked_whole(job);
}

/// The apiserver records the status's writer as one field (`f:status: {}`), not one nested entry per status field:
/// it holds that record in memory for every job (the CRD marks the status an atomic map).
fn assert_status_tracked_whole(job: &BackgroundJob) {
    let entries = job.metadata.managed_fields.as_deref().unwrap_or_default();
    let status: Vec<&serde_json::Value> =
        entries.iter().filter_map(|e| e.fields_v1.as_ref()?.0.get("f:status")).collect();
    assert!(!status.is_empty(), "some writer owns the status: {entries:?}");
    assert!(status.iter().all(|s| *s == &serde_json::json!({})), "{status:?}");
}

/// Whatever way a job ended (an attempt's outcome, or settled while it waited), it keeps only `Finished`.
fn assert_only_finished_condition(job: &BackgroundJob) {
    let s = job.status.as_ref().expect("a finished job has a status");
    let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Finished"], "{s:?}");
    assert_eq!(s.lease, None, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_list_stats_and_cancel_speak_table_json_and_yaml() {
    let env = TestEnv::new("cli-list").await;
    let (ok, out, err) =
        env.cli(&["enqueue", "sleep", "--args", r#"{"seconds": 60}"#, "--priority", "High", "-c", "2"]);
    assert!(ok && out.matches("created").count() == 2, "{out}{err}");
    // The batch id is said before the first create: a call cut off by a signal can still be repeated with it.
    let said = err.lines().find_map(|l| l.strip_prefix("batch "));
    let batch = said.and_then(|rest| rest.split(':').next()).unwrap_or_default();
    assert!(out.contains(&format!("-{batch}-0 created")) && !batch.is_empty(), "{out}{err}");
    let (ok, _, err) = env.cli(&["enqueue", "sleep", "--args", "not json"]);
    assert!(!ok && err.contains("--args is not JSON"), "{err}");

    let (ok, out, _) = env.cli(&["list", "-o", "json"]);
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list -o json is a JSON array");
    assert!(ok && jobs.len() == 2 && jobs.iter().all(|j| j["spec"]["priority"] == "High"));
    let (ok, out, _) = env.cli(&["list"]);
    assert!(ok && out.starts_with("NAME") && out.lines().count() == 3, "{out}");
    let (ok, out, _) = env.cli(&["stats", "-o", "yaml"]);
    assert!(ok && out.contains("waiting: 2"), "{out}");

    let name = jobs[0]["metadata"]["name"].as_str().unwrap().to_string();
    let (ok, out, err) = env.cli(&["cancel", &name]);
    assert!(ok && out.contains("cancellation requested"), "{out}{err}");
    let _r = env.replica("r", &[]);
    let cancelled = env.wait_job(&name, MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    assert_only_finished_condition(&cancelled);
    let (ok, out, _) = env.cli(&["stats", "-o", "json"]);
    let counts: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && counts["cancelled"] == 1, "{out}");
}

#[test]
fn completions_are_generated_for_common_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(common::bgjobs_bin()).args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains("bgjobs") && script.contains("enqueue"), "{shell}: {script}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_enqueue_with_parallel_1_is_dispatched_in_index_order() {
    let env = TestEnv::new("cli-bulk-order").await;
    let (ok, out, err) = env.cli(&["enqueue", "noop", "-c", "25", "--parallel", "1", "--batch", "ordered"]);
    assert!(ok && out.matches("created").count() == 25, "{out}{err}");
    // One replica with one slot starts them one by one, in dispatch order.
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "1"]);
    env.wait_until(MINUTE, "25 jobs Succeeded", |jobs| {
        jobs.len() == 25 && jobs.iter().all(|j| j.phase() == Phase::Succeeded)
    })
    .await;
    let started: Vec<String> = env
        .invocations()
        .into_iter()
        .filter(|l| l.ev == "start")
        .map(|l| l.job.rsplit('/').next().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("noop-ordered-{i:02}")).collect();
    assert_eq!(started, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_bulk_enqueue_creates_each_job_once_and_a_repeat_creates_only_the_missing() {
    let env = TestEnv::new("cli-bulk").await;
    let (n, parallel) = (300usize, 32usize);
    let (ok, out, err) =
        env.cli(&["enqueue", "noop", "-c", &n.to_string(), "--parallel", &parallel.to_string(), "--batch", "b1"]);
    assert!(ok && out.matches("created").count() == n, "{out}{err}");
    let jobs = env.list().await;
    let index = |j: &bgjobs::api::BackgroundJob| -> usize {
        j.annotations()[bgjobs::jobs::BATCH_INDEX_ANNOTATION].parse().unwrap()
    };
    let mut indices: Vec<usize> = jobs.iter().map(index).collect();
    indices.sort();
    assert_eq!(indices, (0..n).collect::<Vec<_>>(), "every index exactly once");
    assert!(jobs.iter().all(|j| j.labels()[bgjobs::jobs::BATCH_LABEL] == "b1"));
    assert!(jobs.iter().all(|j| j.name_any() == format!("noop-b1-{:03}", index(j))));

    // A repeat of the batch (as after a call that stopped part-way) creates what is missing, and nothing twice.
    let api: kube::Api<bgjobs::api::BackgroundJob> = kube::Api::namespaced(env.client.clone(), &env.ns);
    for i in [0, 7, 299] {
        api.delete(&format!("noop-b1-{i:03}"), &Default::default()).await.unwrap();
    }
    let uids: std::collections::BTreeSet<String> = env.list().await.iter().filter_map(|j| j.uid()).collect();
    let (ok, out, err) = env.cli(&["enqueue", "noop", "-c", &n.to_string(), "--batch", "b1"]);
    assert!(ok && out.matches("created").count() == n, "{out}{err}");
    let again = env.list().await;
    assert_eq!(again.len(), n, "no duplicates");
    let new: Vec<String> = again.iter().filter(|j| !uids.contains(&j.uid().unwrap())).map(|j| j.name_any()).collect();
    assert_eq!(new.len(), 3, "only the deleted ones were created again: {new:?}");
}

/// What `enqueue` can tell would go wrong is refused before anything is created: a delay that ends at or after the
/// job's timeout (the job was created, exit 0, and abandoned before it could start), a count of 0 (nothing created,
/// exit 0), a batch id used before for other work (its old jobs were reported "created", the new work never made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_that_could_never_run_or_reuses_a_batch_id_for_other_work_is_refused_and_creates_nothing() {
    let env = TestEnv::new("cli-refused").await;
    for args in [&["enqueue", "noop", "--delay", "3d"][..], &["enqueue", "noop", "--delay", "1h", "--timeout", "30m"]] {
        let (ok, out, err) = env.cli(args);
        assert!(!ok && err.contains("raise timeoutSeconds above the delay"), "{args:?}: {out}{err}");
    }
    let (ok, out, err) = env.cli(&["enqueue", "noop", "-c", "0"]);
    assert!(!ok && err.contains("0"), "{out}{err}");
    assert!(env.list().await.is_empty(), "nothing created");

    let (ok, out, err) = env.cli(&["enqueue", "noop", "--delay", "1h", "--timeout", "2h"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.cli(&["enqueue", "noop", "--delay", "500ms"]);
    assert!(ok, "{out}{err}");
    let mut delays: Vec<(Option<i64>, i64)> =
        env.list().await.iter().map(|j| (j.spec.delay_seconds, j.spec.timeout_seconds)).collect();
    delays.sort();
    assert_eq!(delays, [(Some(1), 172_800), (Some(3600), 7200)], "500ms rounds up to 1 s: not before");

    // Floats, which the apiserver gives back whole (1.0 as 1): a repeat of the same command is still the same work.
    let day = |n: u32| format!(r#"{{"seconds": {n}.0}}"#);
    let (ok, out, err) = env.cli(&["enqueue", "sleep", "--args", &day(1), "-c", "2", "--batch", "nightly"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = env.cli(&["enqueue", "sleep", "--args", &day(2), "-c", "2", "--batch", "nightly"]);
    assert!(!ok && err.contains("with other work") && !out.contains("created"), "{out}{err}");
    // The same work again is a repeat: nothing new, nothing refused.
    let (ok, out, err) = env.cli(&["enqueue", "sleep", "--args", &day(1), "-c", "2", "--batch", "nightly"]);
    assert!(ok && out.matches("created").count() == 2, "{out}{err}");
    assert_eq!(env.list().await.len(), 4);
}

/// Each retry of a job abandoned at its timeout grants the job's original timeout again, counted from the retry.
/// Before, each retry granted the timeout as the last retry had raised it: the time allowed grew with every retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_of_an_abandoned_job_grants_its_original_timeout_again() {
    let env = TestEnv::new("cli-retry-timeout").await;
    let _r = env.replica("r", &[]);
    env.create("hung", json!({"jobName": "sleep", "args": {"seconds": 3600}, "timeoutSeconds": 4})).await;
    for round in 1..=3 {
        env.wait_job("hung", MINUTE, "Abandoned", |j| j.phase() == Phase::Abandoned).await;
        let (ok, out, err) = env.cli(&["retry", "hung"]);
        assert!(ok, "round {round}: {out}{err}");
        let job = env.jobs.get("hung").await.unwrap();
        let created = job.metadata.creation_timestamp.as_ref().unwrap().0;
        let elapsed = jiff::Timestamp::now().duration_since(created).as_secs();
        // The new deadline is about 4 s away (the original timeout), whatever the earlier retries granted.
        let left = job.spec.timeout_seconds - elapsed;
        assert!(
            (2..=7).contains(&left),
            "round {round}: {left} s left ({} s since creation, timeout {})",
            elapsed,
            job.spec.timeout_seconds
        );
    }
}

/// `retry` judges "near the deadline" by the apiserver's clock, as the operator judges deadlines. Run on a machine
/// whose clock is two minutes behind, it granted no time (the deadline looked far off), and the re-queued job was
/// abandoned again at once, without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_from_a_machine_whose_clock_is_behind_still_grants_the_job_time_to_run() {
    let env = TestEnv::new("cli-retry-clock").await;
    let _r = env.replica("r", &[]);
    env.create("late", json!({"jobName": "sleep", "args": {"seconds": 3600}, "timeoutSeconds": 4})).await;
    env.wait_job("late", MINUTE, "Abandoned", |j| j.phase() == Phase::Abandoned).await;
    let out = common::without_ambient_settings(&mut Command::new(common::bgjobs_bin()))
        .args(["retry", "late", "-n", &env.ns])
        .env("KUBECONFIG", common::kubeconfig_path())
        .envs(common::faked_clock(&[("FAKETIME", "-120s")]))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let job = env.wait_job("late", MINUTE, "attempt 2 ran", |j| j.attempts() == 2 || j.phase().is_final()).await;
    assert_eq!(job.attempts(), 2, "abandoned again without running: {:?}", job.status);
}
