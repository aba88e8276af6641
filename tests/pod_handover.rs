//! Pod jobs whose replica goes away while the Pod runs on: the attempt is adopted, not failed, and the Pod keeps
//! counting against the cluster cap until it ends. The Pods run in containers on the real node
//! (`e2e/cluster.sh up --node`).

mod common;

use std::time::{Duration, Instant};

use bgjobs::api::Phase;
use common::kubelet::{on_node, shell_job, stubborn_job};
use common::proxy::Proxy;
use common::silent_webhook::SilentWebhook;
use common::{ReplicaOptions, TestEnv, all_in};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The Pods bgjobs made in the test's namespace that are Running now.
async fn running_pods(env: &TestEnv) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let all = pods.list(&ListParams::default().labels("app.kubernetes.io/managed-by=bgjobs")).await.unwrap().items;
    all.into_iter().filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")).collect()
}

async fn wait_running_pods(env: &TestEnv, n: usize) {
    let deadline = Instant::now() + MINUTE;
    while running_pods(env).await.len() < n {
        assert!(Instant::now() < deadline, "{n} pods never ran at once");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Poll until all `n` jobs Succeeded (or fail after `within`); the most Pods seen Running at once meanwhile.
async fn peak_running_pods_until_all_succeed(env: &TestEnv, n: usize, within: Duration) -> usize {
    let mut most = 0;
    let deadline = Instant::now() + within;
    loop {
        most = most.max(running_pods(env).await.len());
        let jobs = env.list().await;
        if jobs.len() == n && all_in(&jobs, Phase::Succeeded) {
            return most;
        }
        assert!(Instant::now() < deadline, "jobs never all succeeded: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_job_on_its_last_attempt_survives_a_rolling_restart_of_its_replica() {
    let env = on_node("pod-last-attempt").await;
    let mut a = env.replica("a", &["--shutdown-grace", "1s"]);
    env.create("last", shell_job("sleep 8", json!({"retry": {"maxAttempts": 1}}))).await;
    wait_running_pods(&env, 1).await;
    let _b = env.replica("b", &[]);
    assert!(a.terminate(Duration::from_secs(20)), "a shut down within its grace");
    let job = env.wait_job("last", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let s = job.status.clone().unwrap();
    assert_eq!(
        (s.phase, s.attempts, s.worker.as_deref()),
        (Some(Phase::Succeeded), 1, Some("b")),
        "the handed-over attempt was adopted, not failed for a budget it did not use: {:?}",
        s.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_handed_over_on_shutdown_keep_their_cluster_slots() {
    let env = on_node("pod-cap-handover").await;
    let cap = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "2", "--shutdown-grace", "1s"];
    let mut a = env.replica("a", &cap);
    for i in 0..6 {
        env.create(&format!("p{i}"), shell_job("sleep 5", json!({}))).await;
    }
    wait_running_pods(&env, 2).await;
    let _b = env.replica("b", &cap);
    let terminated = tokio::task::spawn_blocking(move || a.terminate(Duration::from_secs(20)));
    let most = peak_running_pods_until_all_succeed(&env, 6, 3 * MINUTE).await;
    assert!(terminated.await.unwrap(), "a shut down");
    assert!(most <= 2, "{most} pods ran at once under a cluster cap of 2");
    let adopted =
        env.list().await.iter().filter(|j| j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("b")).count();
    assert_eq!(adopted, 6, "b adopted a's two pods and ran the rest: {}", common::summary(&env.list().await));
}

/// A Pod job whose replica shuts down hands the running Pod over, its cluster slot kept (disowned); the job deleted
/// before any replica adopts it leaves its Pod to the garbage collector, which deletes it, and its container ignores
/// SIGTERM and runs on through its grace (15 s). Before, the slot, naming a job that is gone, was taken a lease
/// duration after the hand-over, and the next job ran beside that Pod under a cap of one. Now the slot's Lease names
/// the job's namespace too, and a claim that would take it over waits until that job's Pods have stopped (as for a
/// concurrency key whose holder was killed: `pod_executor.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_jobs_pod_running_on_through_its_grace_still_counts_against_the_cluster_cap() {
    let env = on_node("pod-gone-slot").await;
    let cap = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "1", "--shutdown-grace", "1s"];
    let mut a = env.replica("a", &cap);
    env.create("first", stubborn_job(15, json!({}))).await;
    wait_running_pods(&env, 1).await;
    assert!(a.terminate(Duration::from_secs(20)), "a shut down, handing its Pod over");
    env.jobs.delete("first", &Default::default()).await.unwrap();
    env.create("second", shell_job("sleep 2", json!({}))).await;
    let _b = env.replica("b", &cap);
    let most = peak_running_pods_until_all_succeed(&env, 1, 2 * MINUTE).await;
    assert_eq!(most, 1, "{most} pods ran at once under a cluster cap of 1");
}

/// How the exclusive leader running a stubborn Pod job goes away: killed, or shut down (its Pod handed over).
#[derive(Clone, Copy, PartialEq)]
enum LeaderGoes {
    Killed,
    ShutDown,
}

/// Under the exclusive strategy, a Pod job whose leader went away, then deleted before the next leader adopted it,
/// leaves no claim Lease (it goes with the job) but its Pod, which the garbage collector deletes and which runs on
/// through its grace (15 s, SIGTERM ignored): the next job must not start beside it. Killed: the job is deleted
/// before the next leader is elected, and its fresh read finds the Pod. Shut down: the next leader is elected at once
/// (the Lease is given back) and has read the handed-over claim before the job is deleted.
async fn exclusive_leader_after_a_deleted_jobs_leader_went(how: LeaderGoes) {
    let env = on_node(if how == LeaderGoes::Killed { "pod-gone-excl-kill" } else { "pod-gone-excl-term" }).await;
    let flags = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str(), "--shutdown-grace", "1s"];
    let mut a = env.replica("a", &flags);
    env.create("first", stubborn_job(15, json!({}))).await;
    wait_running_pods(&env, 1).await;
    let _b = match how {
        LeaderGoes::Killed => {
            a.kill9();
            env.jobs.delete("first", &Default::default()).await.unwrap();
            env.replica("b", &flags)
        }
        LeaderGoes::ShutDown => {
            let b = env.replica("b", &flags);
            env.wait_joined(&b, &env.ns).await;
            assert!(a.terminate(Duration::from_secs(20)), "a shut down, handing its Pod over");
            let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.ns);
            let deadline = Instant::now() + MINUTE;
            while leases
                .get_opt(bgjobs::wire::EXCLUSIVE_LEASE)
                .await
                .unwrap()
                .and_then(|l| l.spec?.holder_identity)
                .as_deref()
                != Some("b")
            {
                assert!(Instant::now() < deadline, "b never led");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Let the new leader read and catch up with the handed-over claim first.
            tokio::time::sleep(Duration::from_secs(2)).await;
            env.jobs.delete("first", &Default::default()).await.unwrap();
            b
        }
    };
    env.create("second", shell_job("sleep 2", json!({}))).await;
    let most = peak_running_pods_until_all_succeed(&env, 1, 2 * MINUTE).await;
    assert_eq!(most, 1, "{most} pods ran at once under the exclusive strategy");
}

/// Before: the next leader, its fresh read showing no claim, started the next job beside the Pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_exclusive_leader_starts_nothing_beside_the_pod_of_a_job_deleted_while_the_old_leader_was_down() {
    exclusive_leader_after_a_deleted_jobs_leader_went(LeaderGoes::Killed).await;
}

/// Before (the second review): the next leader had caught up with the handed-over claim, which went with the job,
/// and started the next job beside the Pod. Now a job that ran elsewhere and goes makes the leader read afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_leader_starts_nothing_beside_the_handed_over_pod_of_a_job_deleted_after_it_took_over() {
    exclusive_leader_after_a_deleted_jobs_leader_went(LeaderGoes::ShutDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_deleted_by_hand_under_a_running_pod_is_restored_and_the_cap_holds() {
    let env = on_node("pod-slot-deleted").await;
    let cap = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "1"];
    let _a = env.replica("a", &cap);
    let _b = env.replica("b", &cap);
    env.create("first", shell_job("sleep 10", json!({}))).await;
    wait_running_pods(&env, 1).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases.delete(&bgjobs::wire::slot_name(0), &Default::default()).await.unwrap();
    for i in 0..2 {
        env.create(&format!("next-{i}"), shell_job("sleep 2", json!({"priority": "High"}))).await;
    }
    let most = peak_running_pods_until_all_succeed(&env, 3, 2 * MINUTE).await;
    assert_eq!(most, 1, "{most} pods ran at once under a cluster cap of 1");
}

/// A slot deleted by hand once its holder had died: nothing named the orphaned Pod's place under the cap any more,
/// the absent slot was free a lease duration later, a waiting job of higher priority took it, and the orphan's Pod
/// ran beside that job's, unwatched. A Pod job running with no slot naming it keeps its place, and its adoption (with a
/// slot of its own) goes before any new start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_deleted_by_hand_after_its_holder_died_still_counts_the_orphaned_pod_against_the_cap() {
    let env = on_node("pod-slot-orphan").await;
    let cap = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "1"];
    let mut a = env.replica("a", &cap);
    env.create("first", shell_job("sleep 30", json!({}))).await;
    wait_running_pods(&env, 1).await;
    a.kill9();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases.delete(&bgjobs::wire::slot_name(0), &Default::default()).await.unwrap();
    env.create("next", shell_job("sleep 2", json!({"priority": "High"}))).await;
    let _b = env.replica("b", &cap);
    let most = peak_running_pods_until_all_succeed(&env, 2, 3 * MINUTE).await;
    assert_eq!(most, 1, "{most} pods ran at once under a cluster cap of 1");
    let first = env.jobs.get("first").await.unwrap().status.unwrap();
    assert_eq!((first.attempts, first.worker.as_deref()), (1, Some("b")), "adopted, not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_pod_job_is_cancelled_and_its_pod_deleted_even_when_no_replica_has_a_free_slot() {
    let env = on_node("pod-orphan-cancel").await;
    let one = ["--max-concurrent-jobs-per-instance", "1"];
    let mut a = env.replica("a", &one);
    env.create("orphan", shell_job("sleep 120", json!({}))).await;
    wait_running_pods(&env, 1).await;
    a.kill9();
    // b's only slot is busy with another long Pod job: it cannot adopt the orphan.
    let _b = env.replica("b", &one);
    env.create("busy", shell_job("sleep 120", json!({}))).await;
    wait_running_pods(&env, 2).await;
    let cancel = kube::api::Patch::Merge(json!({"spec": {"cancel": true}}));
    env.jobs.patch("orphan", &Default::default(), &cancel).await.unwrap();
    // The Pod is stopped at once, by a replica that has no slot to spare...
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + MINUTE;
    while pods
        .get_opt("orphan-1")
        .await
        .unwrap()
        .is_some_and(|p| p.status.and_then(|s| s.phase).as_deref() == Some("Running"))
    {
        assert!(Instant::now() < deadline, "the orphan's pod still runs a minute after the cancel");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ...and the job is Cancelled at the latest once no create of its dead holder's can land any more (154.5 s
    // after the attempt began: another create of that attempt could still make the Pod again until then).
    let done = env.wait_job("orphan", 4 * MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    assert!(done.status.unwrap().last_error.unwrap_or_default().contains("pod was deleted"));
    assert!(
        pods.get_opt("orphan-1")
            .await
            .unwrap()
            .is_none_or(|p| p.status.and_then(|s| s.phase).as_deref() != Some("Running")),
        "the cancelled orphan's pod runs again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_pod_job_cancelled_while_its_dead_holders_create_is_in_flight_has_that_pod_deleted_too() {
    let env = on_node("pod-orphan-create").await;
    // Every Pod create takes 25 s to land. The holder of `orphan` is killed 2 s into its create (its close is lost on
    // the way, so the apiserver carries the create out); the job is cancelled while no replica can adopt it.
    let _webhook = SilentWebhook::register(&env, 25).await;
    let one = ["--max-concurrent-jobs-per-instance", "1"];
    let proxy = Proxy::to_apiserver().await;
    proxy.lose_closes(true);
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let mut a = env.replica_with("a", &one, &options);
    env.create("orphan", shell_job("sleep 120", json!({}))).await;
    env.wait_job("orphan", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let sent = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.kill9();
    // b's only slot is busy with another job: it cannot adopt the orphan, only settle it.
    let _b = env.replica("b", &one);
    env.create("busy", shell_job("sleep 120", json!({}))).await;
    env.wait_job("busy", MINUTE, "Running on b", |j| j.phase() == Phase::Running).await;
    let cancel = kube::api::Patch::Merge(json!({"spec": {"cancel": true}}));
    env.jobs.patch("orphan", &Default::default(), &cancel).await.unwrap();
    let done = env.wait_job("orphan", 4 * MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    // The create lands 25 s after it was sent (`sent` was taken after that); the Pod it makes is deleted before the
    // job is recorded Cancelled.
    let landed = pods.get_opt("orphan-1").await.unwrap();
    assert!(
        sent.elapsed() >= Duration::from_secs(23) || landed.is_some(),
        "cancelled {:?} after the create was sent, before it could land: {:?}",
        sent.elapsed(),
        done.status
    );
    // Whenever it landed, its Pod does not run for the cancelled job.
    tokio::time::sleep(Duration::from_secs(35).saturating_sub(sent.elapsed())).await;
    let landed = pods.get_opt("orphan-1").await.unwrap();
    let phase = landed.as_ref().and_then(|p| p.status.as_ref()).and_then(|s| s.phase.clone());
    let stopping = landed.as_ref().is_some_and(|p| p.metadata.deletion_timestamp.is_some());
    assert!(
        landed.is_none() || stopping || matches!(phase.as_deref(), Some("Succeeded" | "Failed")),
        "orphan was cancelled, yet its Pod runs: {phase:?}"
    );
}
