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
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The tests of this binary freeze the one node in turn, each from its first Pod on.
static ONE_FREEZE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const REASON: &str = "PodNotStopping";

/// Wait until the Pod `pod` (`<job>-<attempt>`) runs.
async fn wait_pod_running(env: &TestEnv, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + MINUTE;
    loop {
        let found = pods.get_opt(pod).await.unwrap();
        if found.and_then(|p| p.status?.phase).as_deref() == Some("Running") {
            return;
        }
        assert!(Instant::now() < deadline, "pod {pod} did not run");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of the metric line that starts with `name ` (name and labels as exported).
async fn metric(metrics: &str, name: &str) -> String {
    let text = reqwest::get(metrics).await.expect("metrics server answers").text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} ")));
    line.map(|l| l[name.len() + 1..].to_string()).unwrap_or_else(|| "absent".into())
}

const GAUGE: &str = "bgjobs_pods_not_stopping";
const SENT: &str = r#"bgjobs_events_total{type="Warning",reason="PodNotStopping"}"#;

async fn cancel(env: &TestEnv, name: &str) {
    let patch = Patch::Merge(json!({"spec": {"cancel": true}}));
    env.jobs.patch(name, &PatchParams::default(), &patch).await.expect("cancel");
}

/// A Pod job whose node does not answer keeps its attempt, and its slots, until its deleted Pod stops: no retry starts
/// beside it. The replica says so, once per attempt, in a `PodNotStopping` Warning Event on the job and in
/// `bgjobs_pods_not_stopping`, a lease duration (10 s here) past the Pod's grace period (1 s), not before: whether it
/// deleted the Pod (the job was cancelled) or someone else did (by hand here; an eviction alike), and also when a job
/// whose Pod was reported is then cancelled. The node answers again: the Pods are killed, the retry runs, the jobs
/// end, the gauge goes back to 0. A Pod that stops when asked is not reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_that_does_not_stop_holds_its_attempt_is_reported_once_and_its_job_goes_on_once_it_stops() {
    let _turn = ONE_FREEZE_AT_A_TIME.lock().await;
    let env = on_node("pod-stuck").await;
    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("http://{addr}/metrics");
    // Leases longer than the tests' usual 3 s: a kubelet that has just been thawed may take a few seconds to kill a
    // Pod, which is no reason to report it.
    let _r = env.replica("r", &["--metrics-addr", &addr, "--lease-duration", "10s", "--renew-deadline", "7s"]);
    // It stops at once when asked; a long grace leaves no doubt that it was not reported for taking its time.
    let mut prompt = shell_job("trap 'exit 0' TERM; sleep 300 & wait", json!({}));
    prompt["template"]["spec"]["terminationGracePeriodSeconds"] = json!(20);
    env.create("prompt", prompt).await;
    env.create("stuck", shell_job("sleep 300", json!({}))).await;
    let retried = json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}});
    env.create("evicted", shell_job("sleep 300", retried)).await;
    env.create("later", shell_job("sleep 300", json!({}))).await;
    for job in ["prompt", "stuck", "evicted", "later"] {
        wait_pod_running(&env, &format!("{job}-1")).await;
    }

    cancel(&env, "prompt").await;
    assert_eq!(env.wait_job("prompt", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let frozen = Paused::process("kubelet", Duration::from_secs(40));
    let deleted = Instant::now();
    cancel(&env, "stuck").await;
    for pod in ["evicted-1", "later-1"] {
        pods.delete(pod, &Default::default()).await.expect("delete the pod by hand");
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    for job in ["stuck", "evicted", "later"] {
        assert!(env.warnings_on(job, REASON).await.is_empty(), "{job}: reported within its grace period and a lease");
    }
    let deadline = deleted + Duration::from_secs(30);
    for (job, pod) in [("stuck", "stuck-1"), ("evicted", "evicted-1"), ("later", "later-1")] {
        let notes = loop {
            let notes = env.warnings_on(job, REASON).await;
            if !notes.is_empty() {
                break notes;
            }
            assert!(Instant::now() < deadline, "no {REASON} Event on {job} 30 s after its pod's deletion");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(notes[0].contains(pod) && notes[0].contains("--force"), "says which pod and what to do: {notes:?}");
    }
    let reported_after = deleted.elapsed();
    assert_eq!(metric(&metrics, GAUGE).await, "3");
    // A job whose Pod was reported while its attempt ran, cancelled: the attempt still waits for the same Pod, and
    // neither the gauge nor the report starts over (watched for more than a grace period and a lease).
    cancel(&env, "later").await;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(12) {
        assert_eq!(metric(&metrics, GAUGE).await, "3", "every attempt still waits for its pod");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(metric(&metrics, SENT).await, "3", "one report per attempt");
    for job in ["stuck", "evicted", "later"] {
        let job = env.jobs.get(job).await.unwrap();
        assert_eq!(job.phase(), Phase::Running, "{}: the outcome waits until the pod has stopped", job.name_any());
    }
    assert!(pods.get_opt("evicted-2").await.unwrap().is_none(), "no retry beside a pod that has not stopped");
    drop(frozen);

    for job in ["stuck", "later"] {
        assert_eq!(env.wait_job(job, 2 * MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);
    }
    // The evicted attempt ended once its pod stopped: retried.
    wait_pod_running(&env, "evicted-2").await;
    cancel(&env, "evicted").await;
    assert_eq!(env.wait_job("evicted", 2 * MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);
    eprintln!("reported {reported_after:?} after the deletions; all ended {:?} after", deleted.elapsed());
    assert_eq!(metric(&metrics, GAUGE).await, "0", "the waits have ended");
    assert_eq!(metric(&metrics, SENT).await, "3", "and nothing more was reported");
    assert!(env.warnings_on("prompt", REASON).await.is_empty(), "a pod that stopped when asked is not reported");
}

/// An orphaned Pod job (its replica killed -9; the other replica's one slot busy, so nobody adopts it) cancelled while
/// its node does not answer: the replica settling it deletes the Pod, which does not stop, and says so in a
/// `PodNotStopping` Event once the Pod's grace period, a lease and the clocks' allowance have passed, not before; the
/// job stays `Running` (still its dead holder's) until the Pod has stopped, then ends `Cancelled`. Cancelled early,
/// while a create of the attempt could still land (the settle looks every 10 s without taking the Lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_pod_jobs_pod_that_does_not_stop_once_cancelled_is_reported_by_the_replica_settling_it() {
    orphan_cancelled_on_a_frozen_node("pod-stuck-orphan", false).await;
}

/// As above, cancelled once no create of the attempt can land any more (154.5 s after it began): each look of the
/// settle takes the Lease and tries to stop the Pod for a renew deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_pod_jobs_pod_that_does_not_stop_once_cancelled_late_is_reported_by_the_replica_settling_it() {
    orphan_cancelled_on_a_frozen_node("pod-stuck-late", true).await;
}

async fn orphan_cancelled_on_a_frozen_node(test: &str, late: bool) {
    let _turn = ONE_FREEZE_AT_A_TIME.lock().await;
    let env = on_node(test).await;
    let one = ["--max-concurrent-jobs-per-instance", "1"];
    let mut a = env.replica("a", &one);
    env.create("orphan", shell_job("sleep 600", json!({}))).await;
    wait_pod_running(&env, "orphan-1").await;
    a.kill9();
    let _b = env.replica("b", &one);
    env.create("busy", shell_job("sleep 600", json!({}))).await;
    wait_pod_running(&env, "busy-1").await;
    if late {
        let job = env.jobs.get("orphan").await.unwrap();
        let began = job.status.and_then(|s| s.start_time).expect("the orphan's attempt began").0;
        let bound = began + jiff::SignedDuration::from_secs(160);
        let wait = bound.duration_since(jiff::Timestamp::now()).unsigned_abs();
        tokio::time::sleep(wait).await;
    }

    let frozen = Paused::process("kubelet", Duration::from_secs(40));
    let cancelled = Instant::now();
    cancel(&env, "orphan").await;
    // Grace 1 s, lease 3 s, and 3.25 s for the clocks: none within 4 s of the cancel (the deletion comes after it).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(env.warnings_on("orphan", REASON).await.is_empty(), "reported before its grace, a lease and the clocks");
    let deadline = cancelled + Duration::from_secs(30);
    let notes = loop {
        let notes = env.warnings_on("orphan", REASON).await;
        if !notes.is_empty() {
            break notes;
        }
        assert!(Instant::now() < deadline, "no {REASON} Event on the orphan 30 s after its cancel");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let reported_after = cancelled.elapsed();
    assert!(notes[0].contains("orphan-1") && notes[0].contains("--force"), "says which pod and what to do: {notes:?}");
    let job = env.jobs.get("orphan").await.unwrap();
    assert_eq!(job.phase(), Phase::Running, "the outcome waits until the pod has stopped");
    let holder = job.status.and_then(|s| s.worker).unwrap_or_default();
    assert_eq!(holder, "a", "not adopted: it was the settle that reported it");
    drop(frozen);

    let settled = env.wait_job("orphan", 4 * MINUTE, "final", |j| j.phase().is_final()).await;
    eprintln!("reported {reported_after:?} after the cancel; settled {:?} after it", cancelled.elapsed());
    assert_eq!(settled.phase(), Phase::Cancelled);
    cancel(&env, "busy").await;
    assert_eq!(env.wait_job("busy", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);
}
