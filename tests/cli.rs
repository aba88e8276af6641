//! The `bgjobs` CLI against the local control plane: enqueue, list and stats with `--output`, describe with the
//! attempt history, retry, cancel, completions.

mod common;

use std::process::Command;
use std::time::Duration;

use bgjobs::api::Phase;
use common::TestEnv;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Run `bgjobs ARGS -n <test namespace>`; returns (success, stdout, stderr).
fn bgjobs(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bgjobs"))
        .args(args)
        .args(["-n", &env.ns])
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("run bgjobs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_requeues_a_failed_job_with_a_new_budget_and_describe_tells_its_history() {
    let env = TestEnv::new("cli-retry").await;
    let _r = env.replica("r", &[]);
    env.create("flaky", json!({"jobName": "fail", "args": {"message": "still down"}, "retry": {"maxAttempts": 1}}))
        .await;
    env.wait_job("flaky", MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;

    let (ok, out, err) = bgjobs(&env, &["retry", "flaky"]);
    assert!(ok && out.contains("re-queued"), "{out}{err}");
    let job = env.wait_job("flaky", MINUTE, "Failed again", |j| j.phase() == Phase::Failed && j.attempts() == 2).await;
    assert_eq!(job.spec.retry.max_attempts, Some(2), "another full budget of 1 on top of the attempt made");

    let (ok, out, err) = bgjobs(&env, &["retry", "flaky"]);
    assert!(ok, "{err}");
    assert!(out.contains("re-queued"), "{out}");
    env.wait_job("flaky", MINUTE, "Failed a third time", |j| j.phase() == Phase::Failed && j.attempts() == 3).await;

    // The history comes from the job's Events: by default (`--events problems`) one Failed per attempt, each its
    // own series (the recorder would fold equal ones), and no Claimed (the happy path).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, err) = bgjobs(&env, &["describe", "flaky", "-o", "json"]);
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
    let (ok, out, err) = bgjobs(&env, &["describe", "flaky"]);
    assert!(ok, "{err}");
    assert!(out.contains("Phase:         Failed") && out.contains("Attempts:      3"), "{out}");
    assert!(out.contains("History:") && out.matches("still down").count() >= 3, "{out}");

    let (ok, _, err) = bgjobs(&env, &["retry", "missing-job"]);
    assert!(!ok && err.contains("missing-job"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_list_stats_and_cancel_speak_table_json_and_yaml() {
    let env = TestEnv::new("cli-list").await;
    let (ok, out, err) =
        bgjobs(&env, &["enqueue", "sleep", "--args", r#"{"seconds": 60}"#, "--priority", "High", "-c", "2"]);
    assert!(ok && out.matches("created").count() == 2, "{out}{err}");
    let (ok, _, err) = bgjobs(&env, &["enqueue", "sleep", "--args", "not json"]);
    assert!(!ok && err.contains("--args is not JSON"), "{err}");

    let (ok, out, _) = bgjobs(&env, &["list", "-o", "json"]);
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("list -o json is a JSON array");
    assert!(ok && jobs.len() == 2 && jobs.iter().all(|j| j["spec"]["priority"] == "High"));
    let (ok, out, _) = bgjobs(&env, &["list"]);
    assert!(ok && out.starts_with("NAME") && out.lines().count() == 3, "{out}");
    let (ok, out, _) = bgjobs(&env, &["stats", "-o", "yaml"]);
    assert!(ok && out.contains("waiting: 2"), "{out}");

    let name = jobs[0]["metadata"]["name"].as_str().unwrap().to_string();
    let (ok, out, err) = bgjobs(&env, &["cancel", &name]);
    assert!(ok && out.contains("cancellation requested"), "{out}{err}");
    let _r = env.replica("r", &[]);
    env.wait_job(&name, MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    let (ok, out, _) = bgjobs(&env, &["stats", "-o", "json"]);
    let counts: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && counts["cancelled"] == 1, "{out}");
}

#[test]
fn completions_are_generated_for_common_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bgjobs")).args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains("bgjobs") && script.contains("enqueue"), "{shell}: {script}");
    }
}
