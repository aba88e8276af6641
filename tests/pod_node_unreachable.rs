//! A Pod attempt whose node stops answering: the real node's kubelet frozen with SIGSTOP, so that a deleted Pod keeps
//! running and nothing reports on it, as on a node cut off from the cluster. In a test binary of its own, so that no
//! other test's Pods wait on the frozen node; the freeze is kept short (the node is not marked NotReady).

mod common;

use std::time::{Duration, Instant};

use bgjobs::api::Phase;
use common::control_plane::Paused;
use common::kubelet::{on_node, shell_job};
use common::{TestEnv, free_port};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const REASON: &str = "PodNotStopping";

async fn wait_pod_running(env: &TestEnv, job: &str) {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + MINUTE;
    loop {
        let list = pods.list(&ListParams::default().labels(&format!("bgjobs.dev/job={job}"))).await.unwrap();
        if list.items.iter().any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")) {
            return;
        }
        assert!(Instant::now() < deadline, "no pod of {job} ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Notes of the `PodNotStopping` Warning Events on the job `name`.
async fn not_stopping_on(env: &TestEnv, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    let list = events.list(&ListParams::default()).await.expect("list events").items;
    list.into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(REASON))
        .map(|e| e.note.unwrap_or_default())
        .collect()
}

async fn not_stopping_gauge(metrics: &str) -> String {
    let text = reqwest::get(metrics).await.expect("metrics server answers").text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with("bgjobs_pods_not_stopping "));
    line.expect("bgjobs_pods_not_stopping is exported").to_string()
}

async fn cancel(env: &TestEnv, name: &str) {
    let patch = Patch::Merge(json!({"spec": {"cancel": true}}));
    env.jobs.patch(name, &PatchParams::default(), &patch).await.expect("cancel");
}

/// A Pod job whose node does not answer keeps its slot until its deleted Pod stops (nothing may run beside it): the
/// replica says so, once, in a `PodNotStopping` Warning Event on the job and in `bgjobs_pods_not_stopping`, a lease
/// duration (3 s here) past the Pod's grace period (1 s). Whether the replica deleted the Pod (the job was cancelled)
/// or someone else did (by hand here; an eviction alike). The node answers again: the Pods are killed, the jobs end,
/// the gauge goes back to 0. A Pod that stops in time is not reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_that_does_not_stop_is_reported_and_its_job_ends_once_it_stops() {
    let env = on_node("pod-stuck").await;
    let metrics = format!("http://127.0.0.1:{}/metrics", free_port());
    let _r = env.replica("r", &["--metrics-addr", metrics.trim_start_matches("http://").trim_end_matches("/metrics")]);
    env.create("prompt", shell_job("trap 'exit 0' TERM; sleep 300 & wait", json!({}))).await;
    env.create("stuck", shell_job("sleep 300", json!({}))).await;
    env.create("evicted", shell_job("sleep 300", json!({"retry": {"maxAttempts": 1}}))).await;
    for job in ["prompt", "stuck", "evicted"] {
        wait_pod_running(&env, job).await;
    }

    // A Pod that stops when asked: no report.
    cancel(&env, "prompt").await;
    assert_eq!(env.wait_job("prompt", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);

    let frozen = Paused::process("kubelet", Duration::from_secs(60));
    let cancelled = Instant::now();
    cancel(&env, "stuck").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.delete("evicted-1", &Default::default()).await.expect("delete the pod by hand");
    let deadline = cancelled + Duration::from_secs(30);
    for (job, pod) in [("stuck", "stuck-1"), ("evicted", "evicted-1")] {
        let notes = loop {
            let notes = not_stopping_on(&env, job).await;
            if !notes.is_empty() {
                break notes;
            }
            assert!(Instant::now() < deadline, "no {REASON} Event on {job} 30 s after its pod's deletion");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(notes[0].contains(pod) && notes[0].contains("--force"), "says which pod and what to do: {notes:?}");
    }
    let reported_after = cancelled.elapsed();
    assert_eq!(not_stopping_gauge(&metrics).await, "bgjobs_pods_not_stopping 2");
    for job in ["stuck", "evicted"] {
        let job = env.jobs.get(job).await.unwrap();
        assert_eq!(job.phase(), Phase::Running, "the outcome waits until the pod has stopped");
    }
    drop(frozen);

    let stuck = env.wait_job("stuck", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let evicted = env.wait_job("evicted", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    eprintln!("both reported {reported_after:?} after the deletions; the jobs ended {:?} after", cancelled.elapsed());
    assert_eq!(stuck.phase(), Phase::Cancelled);
    assert_eq!(evicted.phase(), Phase::Failed, "its one attempt's pod was deleted");
    assert_eq!(not_stopping_gauge(&metrics).await, "bgjobs_pods_not_stopping 0", "the waits have ended");
    for job in ["stuck", "evicted"] {
        assert_eq!(not_stopping_on(&env, job).await.len(), 1, "{job}: said once");
    }
    assert!(not_stopping_on(&env, "prompt").await.is_empty(), "a pod that stopped in time is not reported");
}
