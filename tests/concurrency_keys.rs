//! Concurrency keys on the local control plane: never two jobs of one key at once, across replicas and crashes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bgjobs::api::Phase;
use common::{TestEnv, all_in, executions, max_overlap, now_ms};
use kube::ResourceExt;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_over_five_keys_never_run_two_of_a_key_at_once_and_keep_fifo_per_key() {
    let env = TestEnv::new("keys-200").await;
    let mut key_of = HashMap::new();
    for i in 0..200 {
        let (name, key) = (format!("k{i:03}"), format!("tenant-{}", i % 5));
        env.create(&name, json!({"jobName": "sleep", "args": {"seconds": 0.05}, "concurrencyKey": key})).await;
        key_of.insert(name, key);
    }
    let _replicas: Vec<_> =
        (0..4).map(|i| env.replica(&format!("r{i}"), &["--max-concurrent-jobs-per-instance", "4"])).collect();
    let mut sampled_max = 0;
    let deadline = std::time::Instant::now() + 3 * MINUTE;
    loop {
        let jobs = env.list().await;
        let mut running: HashMap<&str, usize> = HashMap::new();
        for j in jobs.iter().filter(|j| j.phase() == Phase::Running) {
            *running.entry(j.spec.concurrency_key.as_deref().unwrap()).or_default() += 1;
        }
        sampled_max = sampled_max.max(running.values().copied().max().unwrap_or(0));
        if jobs.len() == 200 && all_in(&jobs, Phase::Succeeded) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not drained: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sampled_max <= 1, "sampled {sampled_max} jobs of one key Running at once");

    let execs = executions(&env.invocations());
    assert_eq!(execs.len(), 200, "every job ran exactly once");
    let mut workers = std::collections::BTreeSet::new();
    for k in 0..5 {
        let key = format!("tenant-{k}");
        let of_key: Vec<_> = execs.iter().filter(|e| key_of[e.job.rsplit('/').next().unwrap()] == key).collect();
        assert_eq!(max_overlap(of_key.iter().copied(), now_ms()), 1, "two jobs of {key} overlapped");
        let order: Vec<&str> = of_key.iter().map(|e| e.job.rsplit('/').next().unwrap()).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "jobs of {key} ran out of creation order");
        workers.extend(of_key.iter().map(|e| e.worker.clone()));
    }
    assert!(max_overlap(&execs, now_ms()) > 1, "different keys ran in parallel");
    assert!(workers.len() >= 2, "the keys were shared across replicas: {workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skip_job_defers_to_the_job_already_there_and_names_it() {
    let env = TestEnv::new("keys-skip").await;
    let _r = env.replica("r", &[]);
    env.create("export-1", json!({"jobName": "sleep", "args": {"seconds": 3}, "concurrencyKey": "export"})).await;
    env.wait_job("export-1", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    env.create("export-2", json!({"jobName": "noop", "concurrencyKey": "export", "concurrencyPolicy": "Skip"})).await;
    env.create("other", json!({"jobName": "noop", "concurrencyKey": "import", "concurrencyPolicy": "Skip"})).await;
    let skipped = env.wait_job("export-2", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!((skipped.phase(), skipped.attempts()), (Phase::Skipped, 0));
    assert!(skipped.status.unwrap().last_error.unwrap().contains("job export-1 with concurrencyKey \"export\""));
    assert_eq!(env.wait_job("other", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Succeeded);
    assert_eq!(env.wait_job("export-1", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Succeeded);
    // Once the key is free again, a Skip job runs.
    env.create("export-3", json!({"jobName": "noop", "concurrencyKey": "export", "concurrencyPolicy": "Skip"})).await;
    assert_eq!(env.wait_job("export-3", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_its_retry_keeps_its_keys_turn() {
    let env = TestEnv::new("keys-retry").await;
    let _r = env.replica("r", &[]);
    env.create(
        "flaky",
        json!({"jobName": "fail", "concurrencyKey": "k", "retry": {"maxAttempts": 2, "backoffSeconds": 2}}),
    )
    .await;
    env.create("later", json!({"jobName": "noop", "concurrencyKey": "k"})).await;
    env.create("unrelated", json!({"jobName": "noop"})).await;
    env.wait_until(MINUTE, "all final", |jobs| jobs.len() == 3 && jobs.iter().all(|j| j.phase().is_final())).await;
    let execs = executions(&env.invocations());
    let start = |name: &str, attempt: i32| {
        execs.iter().find(|e| e.job.ends_with(&format!("/{name}")) && e.attempt == attempt).unwrap().start
    };
    let flaky_last_end = execs.iter().filter(|e| e.job.ends_with("/flaky")).filter_map(|e| e.end).max().unwrap();
    assert!(start("later", 1) >= flaky_last_end, "the later job of the key waited for the retried one to finish");
    assert!(start("unrelated", 1) < start("flaky", 2), "unrelated jobs are not held up by the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_job_of_a_killed_replica_is_taken_over_and_its_key_stays_exclusive() {
    let env = TestEnv::new("keys-kill").await;
    let mut a = env.replica("a", &[]);
    env.create("first", json!({"jobName": "sleep", "args": {"seconds": 3}, "concurrencyKey": "k"})).await;
    env.wait_job("first", MINUTE, "Running on a", |j| j.phase() == Phase::Running).await;
    env.create("second", json!({"jobName": "sleep", "args": {"seconds": 1}, "concurrencyKey": "k"})).await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let key_lease =
        leases.get(&bgjobs::wire::key_lease_name("k")).await.expect("the running job holds its key's Lease");
    assert_eq!(key_lease.spec.unwrap().holder_identity.as_deref(), Some("a"));
    let _b = env.replica("b", &[]);
    a.kill9();
    let killed_at = now_ms();
    let jobs = env.wait_until(MINUTE, "both Succeeded", |jobs| jobs.len() == 2 && all_in(jobs, Phase::Succeeded)).await;
    let first = jobs.iter().find(|j| j.name_any() == "first").unwrap();
    assert_eq!(first.attempts(), 2, "the lost attempt counts");
    let execs = executions(&env.invocations());
    assert_eq!(max_overlap(&execs, killed_at), 1, "never two jobs of the key at once, even across the takeover");
    let second = execs.iter().find(|e| e.job.ends_with("/second")).unwrap();
    let first_retry = execs.iter().find(|e| e.job.ends_with("/first") && e.attempt == 2).unwrap();
    assert!(second.start >= first_retry.end.unwrap(), "the taken-over job kept its turn");
}

/// A Lease under the name of a concurrency key's Lease that bgjobs' caches do not show (made by hand, without the
/// `app.kubernetes.io/managed-by=bgjobs` label): the keyed job waits, saying why in a `ForeignLease` Warning, and the
/// replica's slot goes to the jobs behind it; once the Lease is deleted, the job runs. Before, the cache judged the
/// key's Lease absent, every claim's create met it (409) and the job was claimed again at once, pass after pass:
/// with it at the head, the replica's slot was spent on it for good and nothing behind it ever started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_made_by_hand_under_a_keys_name_holds_only_its_key_not_the_replica() {
    use k8s_openapi::api::coordination::v1::Lease;
    let env = TestEnv::new("foreign-key-lease").await;
    let leases: kube::Api<Lease> = kube::Api::namespaced(env.client.clone(), &env.ns);
    let name = bgjobs::wire::key_lease_name("blocked");
    let foreign =
        Lease { metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() }, spec: None };
    leases.create(&Default::default(), &foreign).await.unwrap();
    env.create("keyed", json!({"jobName": "noop", "concurrencyKey": "blocked", "priority": "High"})).await;
    for i in 0..10 {
        env.create(&format!("after-{i}"), json!({"jobName": "noop"})).await;
    }
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "1"]);
    env.wait_until(MINUTE, "the ten behind it Succeeded", |jobs| {
        jobs.iter().filter(|j| j.name_any().starts_with("after-") && j.phase() == Phase::Succeeded).count() == 10
    })
    .await;
    assert_eq!(env.jobs.get("keyed").await.unwrap().phase(), Phase::Waiting);
    let why = env.warnings_on("keyed", "ForeignLease").await;
    assert!(why.iter().any(|w| w.contains(&name) && w.contains("app.kubernetes.io/managed-by=bgjobs")), "{why:?}");
    leases.delete(&name, &Default::default()).await.unwrap();
    let done = env.wait_job("keyed", 2 * MINUTE, "finished", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
}
