//! The Pod executor on the local control plane with a real node (`e2e/cluster.sh up --node`): the kube-scheduler
//! binds the Pods to the kubelet, which runs them in containers (containerd, runc) of the job image built here
//! (`e2e/image.sh job`); operator replicas are separate processes that can be killed.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bgjobs::api::Phase;
use common::control_plane::ControllerManagerPaused;
use common::kubelet::{JOB_IMAGE, on_node, pod_log, shell_job, stubborn_job};
use common::proxy::Proxy;
use common::silent_webhook::SilentWebhook;
use common::{ReplicaOptions, TestEnv, all_in};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// One thing the apiserver said about a Pod.
#[derive(Clone, Debug)]
struct PodEvent {
    /// ADDED, MODIFIED or DELETED.
    kind: &'static str,
    name: String,
    uid: String,
    /// `status.phase` (Pending when unset).
    phase: String,
    /// The container ran (its state was `running`, or it terminated after starting).
    started: bool,
    /// The container's exit code, once it terminated. When the kubelet lost track of a container it was stopping
    /// (it happens on this node under load: the runtime no longer lists it), it reports the container `waiting`
    /// with a last state of `terminated(137, ContainerStatusUnknown)`; that code counts too.
    exit_code: Option<i32>,
    /// The container's state as the kubelet reported it, for the failure messages (read through `Debug` only).
    #[allow(dead_code)]
    state: String,
    /// When this test received the event.
    at: jiff::Timestamp,
    /// `metadata.deletionTimestamp`: when a graceful deletion's grace runs out.
    deletion: Option<jiff::Timestamp>,
}

/// What the apiserver said about the Pods of some jobs, in order. The watch is resumed from the last version it
/// saw whenever it ends (the apiserver ends a watch after a few minutes), so nothing is missed in between.
struct PodHistory {
    seen: Arc<Mutex<Vec<PodEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodHistory {
    /// Watch the Pods of the jobs named `jobs` from now on.
    async fn watch(env: &TestEnv, jobs: &[&str]) -> PodHistory {
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
        let params = WatchParams::default().labels(&format!("bgjobs.dev/job in ({})", jobs.join(",")));
        let first = pods.watch(&params, "0").await.expect("watch Pods").boxed();
        let seen: Arc<Mutex<Vec<PodEvent>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let (mut stream, mut version) = (first, "0".to_string());
            loop {
                while let Ok(Some(event)) = stream.try_next().await {
                    let (kind, pod) = match event {
                        WatchEvent::Added(p) => ("ADDED", p),
                        WatchEvent::Modified(p) => ("MODIFIED", p),
                        WatchEvent::Deleted(p) => ("DELETED", p),
                        WatchEvent::Bookmark(b) => {
                            version = b.metadata.resource_version;
                            continue;
                        }
                        WatchEvent::Error(e) => panic!("the Pod watch failed: {e:?}"),
                    };
                    version = pod.resource_version().unwrap_or(version);
                    record.lock().unwrap().push(pod_event(kind, &pod));
                }
                stream = pods.watch(&params, &version).await.expect("watch Pods again").boxed();
            }
        });
        PodHistory { seen, task }
    }

    fn events(&self) -> Vec<PodEvent> {
        assert!(!self.task.is_finished(), "the Pod watch stopped: the history is incomplete");
        self.seen.lock().unwrap().clone()
    }

    /// Every UID a Pod of this name ever had.
    fn uids(&self, pod: &str) -> BTreeSet<String> {
        self.events().into_iter().filter(|e| e.name == pod).map(|e| e.uid).collect()
    }

    /// Where in the history the first event about `pod` that satisfies `what` is.
    fn first(&self, pod: &str, what: impl Fn(&PodEvent) -> bool) -> Option<usize> {
        self.events().iter().position(|e| e.name == pod && what(e))
    }

    /// Wait until an event about `pod` satisfies `what` (`described` says what it is), for at most `within`.
    async fn wait_for(&self, pod: &str, what: impl Fn(&PodEvent) -> bool, described: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.first(pod, &what).is_none() {
            assert!(Instant::now() < deadline, "{pod}: {described} not within {within:?}: {:?}", self.events());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pod_event(kind: &'static str, pod: &Pod) -> PodEvent {
    let status = pod.status.clone().unwrap_or_default();
    let container = status.container_statuses.unwrap_or_default().into_iter().next();
    let state = container.as_ref().and_then(|c| c.state.clone()).unwrap_or_default();
    let mut described = match (&state.running, &state.terminated, &state.waiting) {
        (_, Some(t), _) => format!("terminated({}, {:?})", t.exit_code, t.reason),
        (Some(_), _, _) => "running".into(),
        (_, _, Some(w)) => format!("waiting({:?})", w.reason),
        _ => "none".into(),
    };
    if let Some(t) = container.as_ref().and_then(|c| c.last_state.as_ref()).and_then(|s| s.terminated.as_ref()) {
        described.push_str(&format!(", last terminated({}, {:?})", t.exit_code, t.reason));
    }
    let lost = container.and_then(|c| c.last_state).and_then(|s| s.terminated);
    let terminated = state.terminated;
    PodEvent {
        kind,
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        phase: status.phase.unwrap_or_else(|| "Pending".into()),
        started: state.running.is_some() || terminated.as_ref().is_some_and(|t| t.started_at.is_some()),
        exit_code: terminated.or(lost).map(|t| t.exit_code),
        state: described,
        at: jiff::Timestamp::now(),
        deletion: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
    }
}

impl Drop for PodHistory {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pods_of(env: &TestEnv, job: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.list(&ListParams::default().labels(&format!("bgjobs.dev/job={job}"))).await.unwrap().items
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Pods of `job` that may still run a container: not yet Succeeded or Failed (Pending ones included: they are about
/// to run).
async fn live_pods(env: &TestEnv, job: &str) -> usize {
    pods_of(env, job).await.iter().filter(|p| !matches!(phase(p), "Succeeded" | "Failed")).count()
}

/// Once `pod` has stopped (its container ended, or it is gone), remove it with no grace period, as
/// `kubectl delete --force --grace-period=0` does: its name is free at once. Tests whose create in flight must find
/// the name free use it: a kubelet may take half a minute more to remove a Pod whose container has stopped (seen on
/// CI), longer than a create can be held.
async fn remove_once_stopped(env: &TestEnv, history: &PodHistory, pod: &str) {
    let stopped = |e: &PodEvent| e.kind == "DELETED" || matches!(e.phase.as_str(), "Succeeded" | "Failed");
    history.wait_for(pod, stopped, "stopped", MINUTE).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    match pods.delete(pod, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("remove {pod}: {e}"),
    }
}

/// Wait until a Pod of `job` is in `wanted` phase.
async fn wait_pod_phase(env: &TestEnv, job: &str, wanted: &str) {
    let deadline = Instant::now() + MINUTE;
    while !pods_of(env, job).await.iter().any(|p| phase(p) == wanted) {
        assert!(Instant::now() < deadline, "no pod of {job} became {wanted}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until no Pod of `job` is left, for up to three minutes: a kubelet may take more than a minute to remove a
/// Pod deleted while its container was being created.
async fn wait_no_pods(env: &TestEnv, job: &str, what: &str) {
    let deadline = Instant::now() + 3 * MINUTE;
    while !pods_of(env, job).await.is_empty() {
        assert!(Instant::now() < deadline, "{what}: pods of {job} still exist");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_jobs_succeed_or_fail_with_the_containers_exit_code_and_are_retried_per_policy() {
    let env = on_node("pod-outcomes").await;
    let _r = env.replica("r", &[]);
    env.create("ok", shell_job("echo \"job=$BGJOBS_JOB attempt=$BGJOBS_ATTEMPT args=$BGJOBS_ARGS\"", json!({}))).await;
    env.create("broken", shell_job("echo oops >&2; exit 3", json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}})))
        .await;
    let jobs = env
        .wait_until(2 * MINUTE, "both final", |jobs| jobs.len() == 2 && jobs.iter().all(|j| j.phase().is_final()))
        .await;
    let get = |n: &str| jobs.iter().find(|j| j.name_any() == n).unwrap().clone();

    assert_eq!((get("ok").phase(), get("ok").attempts()), (Phase::Succeeded, 1));
    let ok_pods = pods_of(&env, "ok").await;
    assert_eq!(ok_pods.len(), 1);
    assert_eq!(ok_pods[0].name_any(), "ok-1", "one deterministic pod per attempt");
    let log = pod_log(&env.client, &env.ns, "ok-1").await;
    assert!(log.contains(&format!("job={}/ok attempt=1 args={{\"greeting\":\"hello\"}}", env.ns)), "{log}");

    let broken = get("broken");
    assert_eq!((broken.phase(), broken.attempts()), (Phase::Failed, 2));
    let reason = broken.status.unwrap().last_error.unwrap();
    assert!(reason.contains("pod broken-2 failed: container main exited with code 3"), "{reason}");
    let mut names: Vec<String> = pods_of(&env, "broken").await.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["broken-1", "broken-2"], "each attempt has its own pod, kept for inspection");
}

/// A Pod that succeeds before its attempt's timeout, seen by a replica whose watches lag past that timeout (its
/// reads answered at once): the attempt times out in the replica's view, and stopping it finds the Pod succeeded.
/// Before: the attempt was recorded as timed out and the job ran again in a second Pod. Now: succeeded, one Pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_succeeded_before_its_attempt_timed_out_unseen_by_a_lagging_watch_is_not_run_again() {
    let env = on_node("pod-lag").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("warm-up", shell_job("true", json!({}))).await;
    env.wait_job("warm-up", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let spec = json!({"attemptTimeoutSeconds": 20, "retry": {"maxAttempts": 2, "backoffSeconds": 0}});
    env.create("quick", shell_job("sleep 2", spec)).await;
    env.wait_job("quick", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // From its claim on, what happens to the Pod reaches r 40 s late; the attempt times out 20 s after the claim.
    proxy.lag_watches(Duration::from_secs(40));
    let done = env.wait_job("quick", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    let pods: Vec<String> = pods_of(&env, "quick").await.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        (done.phase(), done.attempts(), pods.len()),
        (Phase::Succeeded, 1, 1),
        "{:?}; pods {pods:?}\nr's log:\n{}",
        done.status,
        r.log_text()
    );
}

/// A Pod that succeeded while no replica watched it (its replica killed), its job cancelled afterwards: the replica
/// that settles the orphaned attempt finds the Pod succeeded on its own. Before: `Cancelled`, "the pod was deleted",
/// while the Pod had done the work and was left as it was. Now: `Succeeded`, the Pod kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_succeeded_unwatched_before_its_job_was_cancelled_is_recorded_as_succeeded() {
    let env = on_node("pod-unwatched").await;
    let mut a = env.replica("a", &[]);
    env.create("done", shell_job("sleep 8", json!({}))).await;
    wait_pod_phase(&env, "done", "Running").await;
    a.kill9();
    wait_pod_phase(&env, "done", "Succeeded").await;
    assert_eq!(env.jobs.get("done").await.unwrap().phase(), Phase::Running, "a recorded nothing before it was killed");
    bgjobs::jobs::cancel(&env.jobs, "done").await.unwrap();
    let b = env.replica("b", &[]);
    // Settled once no create of the attempt can land any more (about 155 s after it began).
    let job = env.wait_job("done", 4 * MINUTE, "final", |j| j.phase().is_final()).await;
    let pods = pods_of(&env, "done").await;
    let phases: Vec<_> = pods.iter().map(|p| p.status.as_ref().and_then(|s| s.phase.clone())).collect();
    assert_eq!(
        (job.phase(), job.attempts(), phases),
        (Phase::Succeeded, 1, vec![Some("Succeeded".to_string())]),
        "{:?}\nb's log:\n{}",
        job.status,
        b.log_text()
    );
    let finished = job.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Finished").cloned());
    let said = finished.map(|c| c.message).unwrap_or_default();
    assert!(said.contains("while no replica watched it: not Cancelled"), "the Finished condition says why: {said}");
    assert!(b.log_text().contains("while no replica watched it"), "b settled it:\n{}", b.log_text());
}

/// A Pod that cannot start (its image is not on the node, and may not be pulled) says why: a `PodNotStarting`
/// Warning on the job while the attempt waits, and the attempt's timeout names it. Before, nothing said why, and the
/// job ended saying only that its attempt had exceeded its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_cannot_start_says_why_in_a_warning_and_in_its_attempts_timeout() {
    let env = on_node("pod-not-starting").await;
    let _r = env.replica("r", &[]);
    // 40 s for a kubelet, slow on a busy machine, to say why the Pod cannot start: it says so within seconds here.
    let mut spec = shell_job("true", json!({"attemptTimeoutSeconds": 40, "retry": {"maxAttempts": 1}}));
    spec["template"]["spec"]["containers"][0]["image"] = json!("bgjobs-no-such-image:1");
    env.create("typo", spec).await;
    let jobs = env.wait_until(2 * MINUTE, "the job final", |jobs| jobs.len() == 1 && jobs[0].phase().is_final()).await;
    assert_eq!(jobs[0].phase(), Phase::Failed);
    let reason = jobs[0].status.clone().unwrap().last_error.unwrap();
    let why = "its pod had not started: pod typo-1: container main: ErrImageNeverPull";
    assert!(reason.contains("exceeded attemptTimeoutSeconds (40s)") && reason.contains(why), "{reason}");
    let warnings = env.warnings_on("typo", "PodNotStarting").await;
    assert!(warnings.len() == 1 && warnings[0].contains("ErrImageNeverPull"), "{warnings:?}");
}

/// A namespace whose ResourceQuota allows one Pod, full while another job's Pod runs: the next Pod job waits for
/// room (its attempts handed back unstarted, not counted as failed, an `Interrupted` Warning saying why, waiting off
/// the replica's slots, so a job behind it runs meanwhile) and runs once the first Pod ended; and a Pod its LimitRange
/// refuses fails its job at once (it would be refused again). Before, both were taken for "not allowed to create pods
/// (is the chart's podMode enabled?)" and retried per policy: with `maxAttempts: 1`, the first failed without ever
/// running; the second was tried again three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_job_waits_for_room_in_a_full_pod_quota_and_one_its_limit_range_refuses_fails_at_once() {
    use k8s_openapi::api::core::v1::{LimitRange, ResourceQuota};
    let env = on_node("pod-quota").await;
    let ranges: Api<LimitRange> = Api::namespaced(env.client.clone(), &env.ns);
    let range = json!({"metadata": {"name": "cpu"}, "spec": {"limits": [{"type": "Container", "max": {"cpu": "1"},
        "default": {"cpu": "100m"}, "defaultRequest": {"cpu": "10m"}}]}});
    ranges.create(&Default::default(), &serde_json::from_value(range).unwrap()).await.expect("create the LimitRange");
    let quotas: Api<ResourceQuota> = Api::namespaced(env.client.clone(), &env.ns);
    let quota = json!({"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}});
    quotas.create(&Default::default(), &serde_json::from_value(quota).unwrap()).await.expect("create the quota");
    // Admission counts against the quota only once its controller has written the status.
    let deadline = Instant::now() + MINUTE;
    while quotas.get("one-pod").await.unwrap().status.and_then(|s| s.hard).is_none() {
        assert!(Instant::now() < deadline, "the ResourceQuota controller never filled in the quota's status");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "2"]);
    env.create("first", shell_job("sleep 40", json!({}))).await;
    wait_pod_phase(&env, "first", "Running").await;
    env.create("second", shell_job("echo done", json!({"retry": {"maxAttempts": 1}}))).await;
    let mut greedy = shell_job("true", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 0}}));
    greedy["template"]["spec"]["containers"][0]["resources"] = json!({"limits": {"cpu": "2"}});
    env.create("greedy", greedy).await;

    let refused = env.wait_job("greedy", MINUTE, "final", |j| j.phase().is_final()).await;
    let reason = refused.status.clone().unwrap().last_error.unwrap_or_default();
    assert_eq!((refused.phase(), refused.attempts()), (Phase::Failed, 1), "{reason}");
    assert!(reason.contains("the apiserver refused the Pod from spec.template") && reason.contains("cpu"), "{reason}");

    let deadline = Instant::now() + MINUTE;
    let room = |w: &String| w.contains("found no room for pod second-1") && w.contains("exceeded quota");
    while !env.warnings_on("second", "Interrupted").await.iter().any(room) {
        assert!(Instant::now() < deadline, "second never said it waits for room");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The replica's other slot is free for a job behind it while it waits (before: held until the first Pod ended).
    env.create("behind", json!({"jobName": "noop"})).await;
    env.wait_job("behind", Duration::from_secs(25), "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(env.jobs.get("first").await.unwrap().phase(), Phase::Running, "the first Pod still fills the quota");

    let waited = env.wait_job("second", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    let status = waited.status.clone().unwrap();
    assert_eq!(waited.phase(), Phase::Succeeded, "{status:?}");
    assert!(status.unstarted_attempts >= 1, "handed back while it waited: {status:?}");
    assert_eq!(waited.attempts() - status.unstarted_attempts, 1, "no attempt counted as failed: {status:?}");
    let pod = format!("second-{}", waited.attempts());
    assert!(pod_log(&env.client, &env.ns, &pod).await.contains("done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_its_pod_runs_is_replaced_by_one_that_adopts_the_pod() {
    let env = on_node("pod-adopt").await;
    let mut a = env.replica("a", &[]);
    env.create("long", shell_job("sleep 6", json!({}))).await;
    wait_pod_phase(&env, "long", "Running").await;
    let _b = env.replica("b", &[]);
    a.kill9();
    let job = env.wait_job("long", MINUTE, "final", |j| j.phase().is_final()).await;
    let s = job.status.unwrap();
    assert_eq!(
        (s.phase, s.attempts, s.worker.as_deref()),
        (Some(Phase::Succeeded), 1, Some("b")),
        "adopted, not restarted"
    );
    assert!(s.last_error.unwrap_or_default().contains("adopted attempt 1's pod"));
    let pods = pods_of(&env, "long").await;
    assert_eq!(pods.len(), 1, "never two pods for one attempt");
}

/// A keyed Pod job whose replica is killed, then deleted before any replica adopts it, leaves its Pod to the garbage
/// collector, which deletes it; its container ignores SIGTERM and runs on through its grace (15 s). Before, the key's
/// Lease, naming a job that is gone, was taken over a lease duration after the replica died, and the next job of the
/// key ran beside that Pod. Now a claim that would take over an expired Lease naming another job first looks for
/// that job's Pods, and waits until they have stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_jobs_pod_running_on_through_its_grace_still_holds_its_concurrency_key() {
    let env = on_node("pod-gone-key").await;
    let history = PodHistory::watch(&env, &["first", "second"]).await;
    let mut a = env.replica("a", &[]);
    env.create("first", stubborn_job(15, json!({"concurrencyKey": "k"}))).await;
    history.wait_for("first-1", |e| e.started, "running", MINUTE).await;
    a.kill9();
    env.jobs.delete("first", &Default::default()).await.unwrap();
    env.create("second", shell_job("true", json!({"concurrencyKey": "k"}))).await;
    let _b = env.replica("b", &[]);
    second_ran_once_first_had_stopped(&env, &history).await;
}

/// `second` succeeds, and its Pod was created only once the deleted job `first`'s Pod had stopped.
async fn second_ran_once_first_had_stopped(env: &TestEnv, history: &PodHistory) {
    let second = env.wait_job("second", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(second.phase(), Phase::Succeeded, "{:?}", second.status);
    let has_stopped = |e: &PodEvent| e.kind == "DELETED" || matches!(e.phase.as_str(), "Succeeded" | "Failed");
    history.wait_for("first-1", has_stopped, "stopped", MINUTE).await;
    let stopped = history.first("first-1", has_stopped).expect("the deleted job's Pod stopped");
    let next = history.first("second-1", |e| e.kind == "ADDED").expect("the next job's Pod was created");
    assert!(
        stopped < next,
        "the next job of the key had its Pod created while the deleted job's Pod still ran: {:?}",
        history.events()
    );
}

/// A keyed Pod job deleted while it runs: its replica stops its Pod (whose container ignores SIGTERM and runs on
/// through its 20 s grace), holding the key meanwhile; then the key's Lease is deleted by hand. An absent key Lease
/// was free at once, and the next job of the key ran beside that Pod. Now the key's Pods are looked for first (they
/// carry the key in a label), and the next job waits until that Pod has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lease_deleted_by_hand_while_a_deleted_jobs_pod_stops_still_holds_the_key() {
    let env = on_node("pod-key-deleted").await;
    let history = PodHistory::watch(&env, &["first", "second"]).await;
    let _a = env.replica("a", &[]);
    env.create("first", stubborn_job(20, json!({"concurrencyKey": "k"}))).await;
    history.wait_for("first-1", |e| e.started, "running", MINUTE).await;
    env.create("second", shell_job("true", json!({"concurrencyKey": "k"}))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.jobs.delete("first", &Default::default()).await.unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases.delete(&bgjobs::wire::key_lease_name("k"), &Default::default()).await.unwrap();
    second_ran_once_first_had_stopped(&env, &history).await;
}

/// A keyed Pod job failed past its `activeDeadlineSeconds`: its Pod is kept for inspection, `Failed` with its
/// container never shown stopped (1.20), so it "may still run" for as long as it is kept; the key's Lease was deleted
/// when the job ended. The look for the key's Pods under an absent key Lease held the next job of the key back for as
/// long as that finished job was kept (review); a Pod whose job is read finished does not hold the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_keyed_jobs_failed_pod_kept_for_inspection_does_not_hold_its_key() {
    let env = on_node("pod-key-kept").await;
    let history = PodHistory::watch(&env, &["first"]).await;
    let _r = env.replica("r", &[]);
    let script = "trap '' TERM; while true; do sleep 1; done";
    let mut first = shell_job(script, json!({"concurrencyKey": "k", "retry": {"maxAttempts": 1}}));
    first["template"]["spec"]["activeDeadlineSeconds"] = json!(3);
    first["template"]["spec"]["terminationGracePeriodSeconds"] = json!(2);
    env.create("first", first).await;
    let done = env.wait_job("first", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(done.phase(), Phase::Failed, "{:?}", done.status);
    assert!(
        history.first("first-1", |e| e.phase == "Failed" && e.state == "running").is_some(),
        "never shown Failed while running: the test showed nothing: {:?}",
        history.events()
    );
    env.create("second", shell_job("true", json!({"concurrencyKey": "k"}))).await;
    let second = env.wait_job("second", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(second.phase(), Phase::Succeeded, "{:?}", second.status);
    assert_eq!(pods_of(&env, "first").await.len(), 1, "the failed Pod is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_deleting_a_pod_job_removes_its_pod() {
    let env = on_node("pod-cancel").await;
    let _r = env.replica("r", &[]);
    env.create("to-cancel", shell_job("sleep 60", json!({}))).await;
    env.create("to-delete", shell_job("sleep 60", json!({}))).await;
    env.create("too-slow", shell_job("sleep 60", json!({"attemptTimeoutSeconds": 2, "retry": {"maxAttempts": 1}})))
        .await;
    env.wait_until(MINUTE, "all Running", |jobs| jobs.len() == 3 && all_in(jobs, Phase::Running)).await;
    for name in ["to-cancel", "to-delete"] {
        // A job is Running from its claim on; its Pod is created just after.
        wait_pod_phase(&env, name, "Running").await;
        assert_eq!(pods_of(&env, name).await.len(), 1, "{name} has its pod");
    }
    env.jobs
        .patch("to-cancel", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .unwrap();
    env.jobs.delete("to-delete", &Default::default()).await.unwrap();
    assert_eq!(env.wait_job("to-cancel", MINUTE, "final", |j| j.phase().is_final()).await.phase(), Phase::Cancelled);
    wait_no_pods(&env, "to-cancel", "cancelled").await;
    wait_no_pods(&env, "to-delete", "deleted").await;
    let slow = env.wait_job("too-slow", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(slow.phase(), Phase::Failed);
    wait_no_pods(&env, "too-slow", "timed out").await;
}

/// Anyone who may patch Pods can remove the job's UID label from a running attempt's Pod. Before, the Pod was then a
/// stranger: the cancel's stop found no Pod of the job, the job was recorded `Cancelled` at once and its Pod left
/// running (a retry's Pod would have run beside it). Now its controller, the job, still makes it the job's: the stop
/// deletes it and waits for it (its shell ignores SIGTERM: the kubelet kills it at its 5 s grace) before the job is
/// recorded `Cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_attempts_pod_whose_uid_label_was_removed_is_still_stopped_before_its_job_ends() {
    let env = on_node("pod-unlabelled").await;
    let _r = env.replica("r", &[]);
    let mut spec = shell_job("trap '' TERM; sleep 120", json!({}));
    spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(5);
    env.create("unlabelled", spec).await;
    wait_pod_phase(&env, "unlabelled", "Running").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let unlabel = json!({"metadata": {"labels": {"bgjobs.dev/job-uid": null}}});
    pods.patch("unlabelled-1", &PatchParams::default(), &Patch::Merge(unlabel)).await.unwrap();
    env.jobs
        .patch("unlabelled", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .unwrap();
    let done = env.wait_job("unlabelled", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(done.phase(), Phase::Cancelled, "{:?}", done.status);
    if let Some(pod) = pods.get_opt("unlabelled-1").await.unwrap() {
        assert!(
            matches!(phase(&pod), "Succeeded" | "Failed"),
            "the job was recorded Cancelled while its Pod was still {} (being deleted: {:?})",
            phase(&pod),
            pod.metadata.deletion_timestamp
        );
    }
}

/// Anyone who may create Pods in the namespace can make an attempt's Pod (`<job>-<n>`, with the job's UID label)
/// before the attempt does. Before, the attempt's create met it, took it for its own (its label said so) and took its
/// outcome: the job `Succeeded` without its template having run. Now a Pod is the attempt's only if it carries the id
/// the attempt's creates send: the job fails, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_made_ahead_under_an_attempts_name_is_not_taken_for_the_attempts() {
    let env = on_node("pod-forged").await;
    // No replica yet: the job waits while its first attempt's Pod is made by someone else.
    env.create("forged", shell_job("exit 0", json!({}))).await;
    forge_first_pod(&env, "forged").await;
    let _r = env.replica("r", &[]);
    let done = env.wait_job("forged", MINUTE, "final", |j| j.phase().is_final()).await;
    let s = done.status.unwrap();
    let last_error = s.last_error.unwrap_or_default();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Failed), 1), "{last_error}");
    assert!(last_error.contains("no create of the attempt made it"), "{last_error}");
}

/// The same Pod made ahead, met by the attempt's stop instead of its create: the attempt times out while its create
/// waits on a slow admission webhook, and its stop finds the Pod made ahead, `Succeeded`. Before, a Pod that had
/// succeeded when the stop found it counted as the attempt's success (its end unseen by a lagging watch): the job
/// `Succeeded`. Now only a Pod the attempt's creates made does: the job times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_made_ahead_under_an_attempts_name_is_no_success_for_an_attempt_that_timed_out_before_its_create() {
    let env = on_node("pod-forged-stop").await;
    let spec = shell_job("exit 0", json!({"attemptTimeoutSeconds": 3, "retry": {"maxAttempts": 1}}));
    env.create("forged", spec).await;
    forge_first_pod(&env, "forged").await;
    // Registered after the Pod made ahead, so that only the attempt's create waits (10 s, then made anyway: it meets
    // the Pod made ahead).
    let _webhook = SilentWebhook::register(&env, 10).await;
    let _r = env.replica("r", &[]);
    let done = env.wait_job("forged", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    let s = done.status.unwrap();
    let last_error = s.last_error.unwrap_or_default();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Failed), 1), "{last_error}");
    assert!(last_error.contains("exceeded attemptTimeoutSeconds"), "{last_error}");
}

/// Make `<job>-1` as someone other than the operator would: labelled with the job's UID, running `exit 0`; wait until
/// it has succeeded.
async fn forge_first_pod(env: &TestEnv, job: &str) {
    let uid = env.jobs.get(job).await.unwrap().uid().unwrap();
    let mut spec = shell_job("exit 0", json!({}))["template"]["spec"].clone();
    spec["restartPolicy"] = json!("Never");
    let forged: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("{job}-1"), "labels": {"bgjobs.dev/job": job, "bgjobs.dev/job-uid": uid}},
        "spec": spec,
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.create(&Default::default(), &forged).await.unwrap();
    wait_pod_phase(env, job, "Succeeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_replica_cap_counts_pod_jobs() {
    let env = on_node("pod-cap").await;
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "2"]);
    for i in 0..6 {
        env.create(&format!("p{i}"), shell_job("sleep 1", json!({}))).await;
    }
    let deadline = Instant::now() + 2 * MINUTE;
    let mut peak = 0;
    loop {
        let jobs = env.list().await;
        peak = peak.max(jobs.iter().filter(|j| j.phase() == Phase::Running).count());
        if jobs.len() == 6 && all_in(&jobs, Phase::Succeeded) {
            break;
        }
        assert!(Instant::now() < deadline, "{}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!((1..=2).contains(&peak), "peak {peak} running pod jobs with 2 slots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_garbage_collector_removes_the_pods_of_a_deleted_job_without_any_operator() {
    let env = on_node("pod-gc").await;
    let mut r = env.replica("r", &[]);
    env.create("done", shell_job("exit 0", json!({}))).await;
    env.wait_job("done", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(pods_of(&env, "done").await.len(), 1, "the finished attempt's pod is kept for inspection");
    // No operator from here on: only kube-controller-manager's garbage collector can remove the Pod.
    assert!(r.terminate(Duration::from_secs(30)));
    env.jobs.delete("done", &Default::default()).await.unwrap();
    wait_no_pods(&env, "done", "garbage-collected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pod_watch_keeps_watching_the_same_pod_instead_of_starting_another() {
    let env = on_node("pod-watch-reset").await;
    // Every connection of this replica goes through the proxy, so resetting them breaks its Pod watch (as an
    // apiserver restart behind a load balancer would) while the Pod itself runs on.
    let proxy = Proxy::to_apiserver().await;
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let _r = env.replica_with("r", &[], &options);
    env.create("watched", shell_job("sleep 20", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 0}}))).await;
    wait_pod_phase(&env, "watched", "Running").await;

    let (mut peak, mut reset) = (0, 0);
    let started = Instant::now();
    let deadline = started + 2 * MINUTE;
    let job = loop {
        // Three rounds of resets, 2 s apart, while the Pod has well over 10 s left to run.
        let round = started.elapsed().as_secs() / 2;
        if round < 3 && reset <= round as usize {
            assert!(proxy.reset_all() > 0 || reset > 0, "the replica had no connection to reset");
            reset += 1;
        }
        peak = peak.max(live_pods(&env, "watched").await);
        let job = env.jobs.get("watched").await.unwrap();
        if job.phase().is_final() {
            break job;
        }
        assert!(Instant::now() < deadline, "not final: {:?}", job.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<String> = pods_of(&env, "watched").await.iter().map(|p| p.name_any()).collect();
    assert_eq!(peak, 1, "at most one Pod of the job at a time; pods: {names:?}");
    assert_eq!((job.phase(), job.attempts()), (Phase::Succeeded, 1), "{:?}", job.status);
    assert_eq!(names, ["watched-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_pod_that_ignores_sigterm_has_stopped_before_the_next_attempt_starts() {
    let env = on_node("pod-timeout-grace").await;
    // Each attempt times out after 8 s (its container has long started by then) and ignores SIGTERM, so the kubelet
    // kills it with SIGKILL at the Pod's grace: `quick` after 1 s, `stubborn` after 4 s, beyond the claim's renew
    // deadline (2 s in tests).
    let jobs = [("quick", 1), ("stubborn", 4)];
    let history = PodHistory::watch(&env, &jobs.map(|(name, _)| name)).await;
    let _r = env.replica("r", &[]);
    for (name, grace) in jobs {
        let mut spec = shell_job(
            "trap '' TERM; sleep 60",
            json!({"attemptTimeoutSeconds": 8, "retry": {"maxAttempts": 2, "backoffSeconds": 0}}),
        );
        spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(grace);
        env.create(name, spec).await;
    }
    env.wait_until(3 * MINUTE, "both final", |all| all.len() == jobs.len() && all.iter().all(|j| j.phase().is_final()))
        .await;
    for (name, _) in jobs {
        wait_no_pods(&env, name, "timed out").await;
    }
    for (name, _) in jobs {
        let job = env.jobs.get(name).await.unwrap();
        assert_eq!((job.phase(), job.attempts()), (Phase::Failed, 2), "{name}: {:?}", job.status);
        let (first, second) = (format!("{name}-1"), format!("{name}-2"));
        assert_eq!((history.uids(&first).len(), history.uids(&second).len()), (1, 1), "{name}: one Pod per attempt");
        // The first attempt's container ran, ignored SIGTERM and was killed (137 = 128 + SIGKILL) ...
        assert!(history.first(&first, |e| e.started).is_some(), "{name}: the first attempt's container never ran");
        let events = history.events();
        let killed = history.first(&first, |e| e.exit_code.is_some()).map(|i| events[i].exit_code);
        assert_eq!(killed, Some(Some(137)), "{name}: the first attempt's container was not killed: {events:?}");
        // ... at the end of its grace, not before (the timeout's deletion sets when the grace runs out) ...
        let grace_ends = history
            .first(&first, |e| e.deletion.is_some())
            .and_then(|i| events[i].deletion)
            .expect("the timed-out attempt's Pod was deleted");
        // ... and had stopped (its Pod final, as the kubelet reports once the container is dead, or gone) before the
        // second attempt's Pod was created.
        let stopped = history
            .first(&first, |e| e.kind == "DELETED" || matches!(e.phase.as_str(), "Succeeded" | "Failed"))
            .expect("the first attempt's Pod stopped");
        assert!(
            events[stopped].at >= grace_ends,
            "{name}: the first attempt's Pod stopped before its grace ran out at {grace_ends}: {events:?}"
        );
        let next = history.first(&second, |e| e.kind == "ADDED").expect("the second attempt's Pod was created");
        assert!(
            stopped < next,
            "{name}: the next attempt's Pod was created while the last one still ran: {:?}",
            history.events()
        );
    }
}

/// Past its `activeDeadlineSeconds` the kubelet reports a Pod `Failed` first and kills its containers after, within
/// the Pod's grace period (10 s here, the container ignoring SIGTERM), and on 1.20 never reports them stopped.
/// Before: `Failed` ended the attempt at once, and the retry's Pod ran beside the first one's container, still
/// running. Now the attempt ends once that grace has passed, also when the attempt times out meanwhile (`timed`: its
/// stop finds the Pod `Failed`); the Pod is kept, and the two Pods' logs (a timestamp a second) show the first
/// stopped before the second began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_failed_past_its_active_deadline_has_stopped_before_the_next_attempts_pod_runs() {
    let env = on_node("pod-active-deadline").await;
    let jobs = [("deadline", json!({})), ("timed", json!({"attemptTimeoutSeconds": 8}))];
    let history = PodHistory::watch(&env, &jobs.clone().map(|(name, _)| name)).await;
    let _r = env.replica("r", &[]);
    let script = "trap '' TERM; while true; do date +%s; sleep 1; done";
    for (name, extra) in &jobs {
        let mut spec = shell_job(script, json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}}));
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec["template"]["spec"]["activeDeadlineSeconds"] = json!(4);
        spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(10);
        env.create(name, spec).await;
    }
    env.wait_until(3 * MINUTE, "both final", |all| all.len() == jobs.len() && all.iter().all(|j| j.phase().is_final()))
        .await;
    let stamps = |log: String| log.lines().filter_map(|l| l.trim().parse::<i64>().ok()).collect::<Vec<_>>();
    for (name, _) in &jobs {
        let done = env.jobs.get(name).await.unwrap();
        assert_eq!((done.phase(), done.attempts()), (Phase::Failed, 2), "{name}: {:?}", done.status);
        let events = history.events();
        let (first, second) = (format!("{name}-1"), format!("{name}-2"));
        let failed_running = history.first(&first, |e| e.phase == "Failed" && e.state == "running");
        assert!(
            failed_running.is_some(),
            "{name}: never shown Failed while running: the test showed nothing: {events:?}"
        );
        let first = stamps(pod_log(&env.client, &env.ns, &first).await);
        let second = stamps(pod_log(&env.client, &env.ns, &second).await);
        let (Some(last_of_first), Some(first_of_second)) = (first.last(), second.first()) else {
            panic!("{name}: both Pods logged: {first:?} {second:?}");
        };
        assert!(
            last_of_first < first_of_second,
            "{name}: the first attempt's container ran until {last_of_first}, the second's from {first_of_second}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_job_is_not_failed_by_the_pod_its_deleted_namesake_left_behind() {
    let env = on_node("pod-namesake").await;
    let mut a = env.replica("a", &[]);
    env.create("again", shell_job("sleep 60", json!({}))).await;
    wait_pod_phase(&env, "again", "Running").await;
    // Nobody may remove the old job's Pod: not its replica (which would on seeing the job deleted), not the garbage
    // collector. It stays behind, owned by a deleted job, as it does while the GC lags.
    a.kill9();
    let _gc = ControllerManagerPaused::new(2 * MINUTE);
    env.jobs.delete("again", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + MINUTE;
    while env.jobs.get_opt("again").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the old job was not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.create("again", shell_job("exit 0", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 1}}))).await;
    let _b = env.replica("b", &[]);
    let job = env.wait_job("again", MINUTE, "final", |j| j.phase().is_final()).await;
    assert!(pods_of(&env, "again").await.iter().any(|p| p.name_any() == "again-1"), "the old pod was still there");
    let s = job.status.unwrap();
    let last_error = s.last_error.unwrap_or_default();
    assert!(!last_error.contains("does not belong"), "{last_error}");
    assert_eq!((s.phase, s.attempts), (Some(Phase::Succeeded), 2), "{last_error}");
    assert!(last_error.contains("again-1") && last_error.contains("earlier job"), "{last_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopter_does_not_re_create_the_pod_of_an_attempt_that_already_ran() {
    let env = on_node("pod-vanished").await;
    let history = PodHistory::watch(&env, &["once"]).await;
    let mut a = env.replica("a", &[]);
    env.create("once", shell_job("sleep 3", json!({"retry": {"maxAttempts": 1}}))).await;
    wait_pod_phase(&env, "once", "Running").await;
    // The replica dies while the Pod runs; the Pod finishes, then is removed (by hand, or by the terminated-pod
    // garbage collector) before anybody recorded its outcome.
    a.kill9();
    wait_pod_phase(&env, "once", "Succeeded").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.delete("once-1", &DeleteParams::default()).await.unwrap();
    wait_no_pods(&env, "once", "deleted by hand").await;
    let _b = env.replica("b", &[]);
    // The adopter concludes "vanished" only once no create of the attempt can still land (90 s after it began).
    let job = env.wait_job("once", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(history.uids("once-1").len(), 1, "attempt 1 ran once, and was not re-run under its number");
    assert!(pods_of(&env, "once").await.is_empty(), "no Pod was created after the first one");
    let s = job.status.unwrap();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Failed), 1), "{:?}", s.last_error);
    assert!(s.last_error.unwrap_or_default().contains("vanished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_policy_fails_privileged_host_path_and_foreign_service_account_jobs_without_creating_a_pod() {
    let env = on_node("pod-policy").await;
    let _r = env.replica("r", &[]);
    let job = |pod_spec: serde_json::Value| {
        let mut spec = shell_job("echo fine", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 0}}));
        let template = spec["template"]["spec"].as_object_mut().unwrap();
        template.extend(pod_spec.as_object().unwrap().clone());
        spec
    };
    let container = |extra: serde_json::Value| {
        let mut c = json!({"name": "main", "image": JOB_IMAGE, "imagePullPolicy": "Never",
                           "command": ["sh", "-c", "echo fine"]});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"containers": [c]})
    };
    env.create("plain", job(json!({}))).await;
    env.create("privileged", job(container(json!({"securityContext": {"privileged": true}})))).await;
    env.create("host-path", job(json!({"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}))).await;
    env.create("foreign-sa", job(json!({"serviceAccountName": "deployer"}))).await;
    let jobs = env
        .wait_until(2 * MINUTE, "all final", |jobs| jobs.len() == 4 && jobs.iter().all(|j| j.phase().is_final()))
        .await;
    let get = |n: &str| jobs.iter().find(|j| j.name_any() == n).unwrap().clone();

    assert_eq!(get("plain").phase(), Phase::Succeeded, "a plain Pod as the default ServiceAccount still runs");
    for (name, field, rule) in [
        ("privileged", "spec.template.spec.containers[0] (main).securityContext.privileged is true", "`privileged`"),
        ("host-path", "spec.template.spec.volumes[0] (root) is a hostPath volume", "`host-path`"),
        ("foreign-sa", "spec.template.spec.serviceAccountName is \"deployer\"", "`service-account`"),
    ] {
        let j = get(name);
        let error = j.status.clone().and_then(|s| s.last_error).unwrap_or_default();
        assert_eq!((j.phase(), j.attempts()), (Phase::Failed, 1), "{name}: refused for good: {error}");
        assert!(error.contains(field) && error.contains(rule) && error.contains("none was created"), "{name}: {error}");
        assert!(pods_of(&env, name).await.is_empty(), "{name}: no Pod was created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_create_still_in_flight_when_its_attempt_ends_is_waited_for_and_its_pod_stopped() {
    let env = on_node("pod-create-in-flight").await;
    // Every Pod create takes 8 s to land; each attempt ends long before that: `timed-out` by its 2 s attempt
    // timeout, `cancelled` by a cancel sent 2 s after it began. Ending the attempt drops its create, which closes
    // the connection; the network between the replica and the apiserver swallows that close, so the apiserver carries
    // the create out (it would cancel it otherwise).
    let _webhook = SilentWebhook::register(&env, 8).await;
    let jobs = ["timed-out", "cancelled"];
    let history = PodHistory::watch(&env, &jobs).await;
    let proxy = Proxy::to_apiserver().await;
    proxy.lose_closes(true);
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let _r = env.replica_with("r", &[], &options);
    let attempts = json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}});
    let mut timed_out = shell_job("sleep 60", attempts.clone());
    timed_out["attemptTimeoutSeconds"] = json!(2);
    env.create("timed-out", timed_out).await;
    env.create("cancelled", shell_job("sleep 60", attempts)).await;
    env.wait_job("cancelled", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // Its create is sent at its claim; a moment later it has passed the proxy (which holds bytes for its loss window)
    // and waits on the webhook.
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.jobs
        .patch("cancelled", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .unwrap();
    let final_ = |all: &[bgjobs::api::BackgroundJob]| all.len() == 2 && all.iter().all(|j| j.phase().is_final());
    let all = env.wait_until(3 * MINUTE, "both final", final_).await;
    let phase_of = |name: &str| all.iter().find(|j| j.name_any() == name).map(|j| (j.phase(), j.attempts()));
    assert_eq!(phase_of("timed-out"), Some((Phase::Failed, 2)));
    assert_eq!(phase_of("cancelled"), Some((Phase::Cancelled, 1)));
    // Every create the operator sent has landed by now (8 s each); none may leave a Pod running for a job that
    // ended, and the second attempt's Pod never ran beside the first's.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for name in jobs {
        assert_eq!(live_pods(&env, name).await, 0, "{name} ended, yet a Pod of it runs: {:?}", history.events());
    }
    let events = history.events();
    // Each create did land after its attempt ended (or the test showed nothing), and its Pod was stopped.
    for pod in ["timed-out-1", "timed-out-2", "cancelled-1"] {
        assert!(history.first(pod, |e| e.kind == "ADDED").is_some(), "{pod} never landed: {events:?}");
        assert!(history.first(pod, |e| e.deletion.is_some()).is_some(), "{pod} was never deleted: {events:?}");
    }
    let stopped = history
        .first("timed-out-1", |e| e.kind == "DELETED" || matches!(e.phase.as_str(), "Succeeded" | "Failed"))
        .unwrap_or_else(|| panic!("the first attempt's Pod never stopped: {events:?}"));
    let next = history.first("timed-out-2", |e| e.kind == "ADDED").expect("the second attempt's Pod was created");
    assert!(stopped < next, "the second attempt's Pod was created while the first one's ran: {events:?}");
}

/// A Pod job whose first create loses its answer while the apiserver carries it out. Every Pod create of the
/// namespace waits `first` seconds on a silent webhook; 2 s after the job runs, creates sent from then on wait `later`
/// seconds instead; `cut` after it runs, the replica's connections are cut on its side only (the apiserver's side
/// stays open, so the create in flight lands `first` s after it was sent) and the create is sent again. The replica
/// has `leases` long enough that the cut does not cost its claim, so the holder itself must wait for the create (an
/// adopter would adopt the Pod it makes, or wait until 154.5 s after the attempt began, in its stead).
struct LostAnswer {
    history: PodHistory,
    /// When the test saw the job `Running` (its first create was sent just before).
    running: Instant,
    _webhook: SilentWebhook,
    _proxy: Proxy,
    replica: common::Replica,
}

/// Leases long enough that a cut does not cost the claim.
const LONG_LEASES: [&str; 4] = ["--lease-duration", "30s", "--renew-deadline", "20s"];

async fn lose_the_first_creates_answer(
    env: &TestEnv,
    job: &str,
    spec: serde_json::Value,
    first: i32,
    later: i32,
    cut: u64,
    leases: &[&str],
) -> LostAnswer {
    let webhook = SilentWebhook::register(env, first).await;
    let history = PodHistory::watch(env, &[job]).await;
    let proxy = Proxy::to_apiserver().await;
    proxy.lose_closes(true);
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let replica = env.replica_with("r", leases, &options);
    env.create(job, spec).await;
    env.wait_job(job, MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let running = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    webhook.set_timeout(env, later).await;
    tokio::time::sleep(Duration::from_secs(cut).saturating_sub(running.elapsed())).await;
    assert!(proxy.cut_clients() > 0, "the replica had no connection to cut");
    LostAnswer { history, running, _webhook: webhook, _proxy: proxy, replica }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_sent_again_after_its_answer_was_lost_cannot_bring_the_pod_back_after_the_attempt_ends() {
    let env = on_node("pod-create-again").await;
    // The first create lands at 12 s; cut at 9 s, the one sent again at about 40 s. The attempt times out at 20 s,
    // once the first create's Pod runs (a Pod deleted while its container is being created may be killed only when
    // the kubelet next looks, long after), and that Pod is deleted; the second create would make it again once it is
    // gone.
    let mut spec = shell_job("sleep 60", json!({"retry": {"maxAttempts": 1}}));
    spec["attemptTimeoutSeconds"] = json!(20);
    let LostAnswer { history, running, _webhook, _proxy, replica: _replica } =
        lose_the_first_creates_answer(&env, "again", spec, 12, 30, 9, &LONG_LEASES).await;
    // Once the replica has asked for the Pod's deletion and its container has stopped, it is removed at once, so that
    // the create sent again (at about 40 s) finds the name free: the kubelet may leave a stopped Pod for half a
    // minute more.
    history.wait_for("again-1", |e| e.deletion.is_some(), "deleted by the replica", MINUTE).await;
    remove_once_stopped(&env, &history, "again-1").await;
    assert!(running.elapsed() < Duration::from_secs(36), "too late to stage: {:?}", running.elapsed());
    let job = env.wait_job("again", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    let recorded = jiff::Timestamp::now();
    assert_eq!((job.phase(), job.attempts()), (Phase::Failed, 1), "{:?}", job.status);
    // The outcome was recorded only once both creates had landed and their Pods were stopped...
    let events = history.events();
    let uids = history.uids("again-1");
    assert_eq!(uids.len(), 2, "the outcome was recorded before the create sent again landed: {events:?}");
    for uid in &uids {
        let stopped = |e: &PodEvent| &e.uid == uid && e.at < recorded && (e.kind == "DELETED" || e.deletion.is_some());
        assert!(
            history.first("again-1", stopped).is_some(),
            "again-1 ({uid}) was not being stopped when the job failed: {events:?}"
        );
    }
    // ...and none runs later.
    tokio::time::sleep(Duration::from_secs(45).saturating_sub(running.elapsed())).await;
    let events = history.events();
    assert_eq!(live_pods(&env, "again").await, 0, "again failed, yet a Pod of it runs: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_was_lost_cannot_bring_back_a_pod_deleted_by_hand_beside_the_next_attempt() {
    let env = on_node("pod-deleted-create-lands").await;
    // The first create lands at 30 s; cut at 4 s, the one sent again makes the Pod at once. That Pod is deleted by
    // hand; the first create then makes it again.
    let spec = shell_job("sleep 120", json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}}));
    let LostAnswer { history, running, _webhook, _proxy, replica: _replica } =
        lose_the_first_creates_answer(&env, "redo", spec, 30, 1, 4, &LONG_LEASES).await;
    wait_pod_phase(&env, "redo", "Running").await;
    remove_by_hand_before_the_first_create_lands(&env, &history, running).await;
    // The next attempt's Pod is created only once the first create can no longer bring `redo-1` back (and it did).
    second_attempt_after_both_first_pods_stopped(&history, running).await;
}

/// Wait for the Pod of `redo`'s second attempt, then, once every create has landed (40 s after `running`), check
/// that both Pods that held the first attempt's name (the first create made it again once the Pod was removed)
/// stopped before it came; how long after `running` it came.
async fn second_attempt_after_both_first_pods_stopped(history: &PodHistory, running: Instant) -> Duration {
    history.wait_for("redo-2", |e| e.kind == "ADDED", "the second attempt's Pod created", 4 * MINUTE).await;
    let retried = running.elapsed();
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(running.elapsed())).await;
    let events = history.events();
    let uids = history.uids("redo-1");
    assert_eq!(uids.len(), 2, "the first create did not land after the Pod was removed: {events:?}");
    let next = history.first("redo-2", |e| e.kind == "ADDED").unwrap();
    for uid in &uids {
        let stopped = history.first("redo-1", |e| {
            &e.uid == uid && (e.kind == "DELETED" || matches!(e.phase.as_str(), "Succeeded" | "Failed"))
        });
        assert!(
            stopped.is_some_and(|stopped| stopped < next),
            "redo-1 ({uid}) ran on beside the next attempt's Pod: {events:?}"
        );
    }
    retried
}

/// Delete `redo-1` by hand and wait until it is gone, which must be before the first create lands (30 s after
/// `running`), or the test shows nothing.
async fn remove_by_hand_before_the_first_create_lands(env: &TestEnv, history: &PodHistory, running: Instant) {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.delete("redo-1", &DeleteParams::default()).await.unwrap();
    remove_once_stopped(env, history, "redo-1").await;
    history.wait_for("redo-1", |e| e.kind == "DELETED", "removed", MINUTE).await;
    assert!(running.elapsed() < Duration::from_secs(28), "too late to stage: {:?}", running.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_senders_lost_answer_create_cannot_bring_back_an_adopted_pod_deleted_by_hand_beside_the_next_attempt() {
    let env = on_node("pod-adopted-create-lands").await;
    // As above, but the replica that sent both creates is killed once the Pod runs, and another adopts the attempt;
    // the Pod is deleted by hand under the adopter, before the first create lands (30 s). Short leases, so that the
    // adoption comes first; a cut costs no claim that quickly.
    let spec = shell_job("sleep 120", json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}}));
    let leases = ["--lease-duration", "6s", "--renew-deadline", "4s", "--renew-interval", "1s"];
    let LostAnswer { history, running, _webhook, _proxy, mut replica } =
        lose_the_first_creates_answer(&env, "redo", spec, 30, 1, 4, &leases).await;
    wait_pod_phase(&env, "redo", "Running").await;
    replica.kill9();
    let _adopter = env.replica("adopter", &[]);
    let adopted = |j: &bgjobs::api::BackgroundJob| {
        let s = j.status.clone().unwrap_or_default();
        s.worker.as_deref() == Some("adopter")
            && s.last_error.as_deref().is_some_and(|e| e.ends_with("adopted attempt 1's pod"))
    };
    env.wait_job("redo", MINUTE, "adopted", adopted).await;
    remove_by_hand_before_the_first_create_lands(&env, &history, running).await;
    // The next attempt's Pod is created only once the earlier holder's first create can no longer bring `redo-1`
    // back (154.5 s after the attempt began), and it did bring it back.
    let retried = second_attempt_after_both_first_pods_stopped(&history, running).await;
    assert!(retried > Duration::from_secs(140), "retried {retried:?} after the attempt began, not after the bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_pod_that_failed_is_retried_only_once_an_earlier_holders_create_can_no_longer_bring_it_back() {
    let env = on_node("pod-adopted-failed-create-lands").await;
    // As above, but the first attempt's Pod fails by itself (8 s), after its sender was killed and before or as the
    // adopter takes it; it is then removed by hand (as a cleanup tool might), before the first create lands (30 s).
    let script = r#"[ "$BGJOBS_ATTEMPT" = 1 ] && { sleep 8; exit 1; }; sleep 60"#;
    let spec = shell_job(script, json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}}));
    let leases = ["--lease-duration", "6s", "--renew-deadline", "4s", "--renew-interval", "1s"];
    let LostAnswer { history, running, _webhook, _proxy, mut replica } =
        lose_the_first_creates_answer(&env, "redo", spec, 30, 1, 4, &leases).await;
    wait_pod_phase(&env, "redo", "Running").await;
    replica.kill9();
    let adopter = env.replica("adopter", &[]);
    wait_pod_phase(&env, "redo", "Failed").await;
    let deadline = Instant::now() + MINUTE;
    while !adopter.log_text().contains("adopted the attempt's pod") {
        assert!(Instant::now() < deadline, "the attempt was never adopted: {}", adopter.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    remove_by_hand_before_the_first_create_lands(&env, &history, running).await;
    // Whenever the next attempt's Pod comes, no Pod of the first attempt runs beside it: the one the first create
    // brought back was stopped before.
    let retried = second_attempt_after_both_first_pods_stopped(&history, running).await;
    assert!(retried > Duration::from_secs(140), "retried {retried:?} after the attempt began, not after the bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pod_attempts_outcome_waits_until_a_create_whose_answer_was_lost_cannot_bring_the_pod_back() {
    let env = on_node("pod-finished-create-lands").await;
    // As above, but the Pod the create sent again made finishes (3 s), and is then removed by hand once the replica
    // has seen it finish (as the terminated-pod garbage collector or a short ttlSecondsAfterFinished might).
    let spec = shell_job("sleep 3", json!({"retry": {"maxAttempts": 1}}));
    let LostAnswer { history, running, _webhook, _proxy, replica: _replica } =
        lose_the_first_creates_answer(&env, "quick", spec, 30, 1, 4, &LONG_LEASES).await;
    wait_pod_phase(&env, "quick", "Succeeded").await;
    // The replica has seen it finish by then.
    tokio::time::sleep(Duration::from_secs(3)).await;
    remove_once_stopped(&env, &history, "quick-1").await;
    assert!(running.elapsed() < Duration::from_secs(28), "too late to stage: {:?}", running.elapsed());
    let job = env.wait_job("quick", 3 * MINUTE, "final", |j| j.phase().is_final()).await;
    let recorded = jiff::Timestamp::now();
    assert_eq!(job.phase(), Phase::Succeeded, "{:?}", job.status);
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(running.elapsed())).await;
    let events = history.events();
    let uids = history.uids("quick-1");
    assert_eq!(uids.len(), 2, "the first create did not land after the Pod was removed: {events:?}");
    for uid in &uids {
        let stopped = |e: &PodEvent| {
            &e.uid == uid && e.at < recorded && (e.kind == "DELETED" || e.deletion.is_some() || e.phase == "Succeeded")
        };
        assert!(
            history.first("quick-1", stopped).is_some(),
            "quick-1 ({uid}) had not stopped, or not yet come, when the job's outcome was recorded: {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopter_whose_attempt_times_out_waits_for_the_create_its_killed_predecessor_left_in_flight() {
    let env = on_node("pod-adopted-create").await;
    // The Pod create takes 25 s to land. Its sender is killed (its close lost on the way, so the apiserver carries
    // the create out) 2 s in; the adopter takes over and the attempt times out at 12 s, before the Pod exists.
    let _webhook = SilentWebhook::register(&env, 25).await;
    let history = PodHistory::watch(&env, &["orphan"]).await;
    let proxy = Proxy::to_apiserver().await;
    proxy.lose_closes(true);
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let mut sender = env.replica_with("sender", &[], &options);
    let mut spec = shell_job("sleep 60", json!({"retry": {"maxAttempts": 1}}));
    spec["attemptTimeoutSeconds"] = json!(12);
    env.create("orphan", spec).await;
    env.wait_job("orphan", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sender.kill9();
    let created = Instant::now();
    let _adopter = env.replica("adopter", &[]);
    let job = env.wait_job("orphan", 4 * MINUTE, "final", |j| j.phase().is_final()).await;
    let status = job.status.clone().unwrap_or_default();
    assert_eq!((job.phase(), job.attempts()), (Phase::Failed, 1), "{status:?}");
    assert_eq!(status.worker.as_deref(), Some("adopter"), "the adopter recorded the outcome: {status:?}");
    // The create has landed by now; its Pod must not run for a job that failed.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(created.elapsed())).await;
    let events = history.events();
    assert!(history.first("orphan-1", |e| e.kind == "ADDED").is_some(), "the create never landed: {events:?}");
    assert_eq!(live_pods(&env, "orphan").await, 0, "orphan failed, yet its Pod runs: {events:?}");
}
