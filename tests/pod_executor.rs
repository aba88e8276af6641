//! The Pod executor on the local control plane: the real kube-scheduler binds the Pods to the local node agent,
//! which runs them as processes; operator replicas are separate processes that can be killed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bgjobs::api::Phase;
use bgjobs::nodeagent::container_pid;
use common::control_plane::ControllerManagerPaused;
use common::proxy::Proxy;
use common::{NodeAgent, ReplicaOptions, TestEnv, all_in, process_group_alive};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A Pod job running `script` with `sh -c`, placed on `agent`'s node.
fn pod_job(agent: &NodeAgent, script: &str, extra: serde_json::Value) -> serde_json::Value {
    agent.shell_job(script, extra)
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

/// Wait until a Pod of `job` is in `wanted` phase.
async fn wait_pod_phase(env: &TestEnv, job: &str, wanted: &str) {
    let deadline = Instant::now() + MINUTE;
    while !pods_of(env, job).await.iter().any(|p| phase(p) == wanted) {
        assert!(Instant::now() < deadline, "no pod of {job} became {wanted}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_no_pods(env: &TestEnv, job: &str, what: &str) {
    let deadline = Instant::now() + MINUTE;
    while !pods_of(env, job).await.is_empty() {
        assert!(Instant::now() < deadline, "{what}: pods of {job} still exist");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_jobs_succeed_or_fail_with_the_containers_exit_code_and_are_retried_per_policy() {
    let env = TestEnv::new("pod-outcomes").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let _r = env.replica("r", &[]);
    env.create("ok", pod_job(&agent, "echo \"job=$BGJOBS_JOB attempt=$BGJOBS_ATTEMPT args=$BGJOBS_ARGS\"", json!({})))
        .await;
    env.create(
        "broken",
        pod_job(&agent, "echo oops >&2; exit 3", json!({"retry": {"maxAttempts": 2, "backoffSeconds": 0}})),
    )
    .await;
    let jobs = env
        .wait_until(2 * MINUTE, "both final", |jobs| jobs.len() == 2 && jobs.iter().all(|j| j.phase().is_final()))
        .await;
    let get = |n: &str| jobs.iter().find(|j| j.name_any() == n).unwrap().clone();

    assert_eq!((get("ok").phase(), get("ok").attempts()), (Phase::Succeeded, 1));
    let ok_pods = pods_of(&env, "ok").await;
    assert_eq!(ok_pods.len(), 1);
    assert_eq!(ok_pods[0].name_any(), "ok-1", "one deterministic pod per attempt");
    let log = std::fs::read_dir(agent.work_dir.join(&agent.node).join("logs"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("_ok-1_"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .expect("the pod's output");
    assert!(log.contains(&format!("job={}/ok attempt=1 args={{\"greeting\":\"hello\"}}", env.ns)), "{log}");

    let broken = get("broken");
    assert_eq!((broken.phase(), broken.attempts()), (Phase::Failed, 2));
    let reason = broken.status.unwrap().last_error.unwrap();
    assert!(reason.contains("pod broken-2 failed: container main exited with code 3"), "{reason}");
    let mut names: Vec<String> = pods_of(&env, "broken").await.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["broken-1", "broken-2"], "each attempt has its own pod, kept for inspection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_its_pod_runs_is_replaced_by_one_that_adopts_the_pod() {
    let env = TestEnv::new("pod-adopt").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let mut a = env.replica("a", &[]);
    env.create("long", pod_job(&agent, "sleep 6", json!({}))).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_or_deleting_a_pod_job_removes_its_pod() {
    let env = TestEnv::new("pod-cancel").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let _r = env.replica("r", &[]);
    env.create("to-cancel", pod_job(&agent, "sleep 60", json!({}))).await;
    env.create("to-delete", pod_job(&agent, "sleep 60", json!({}))).await;
    env.create(
        "too-slow",
        pod_job(&agent, "sleep 60", json!({"attemptTimeoutSeconds": 2, "retry": {"maxAttempts": 1}})),
    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_replica_cap_counts_pod_jobs() {
    let env = TestEnv::new("pod-cap").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "2"]);
    for i in 0..6 {
        env.create(&format!("p{i}"), pod_job(&agent, "sleep 1", json!({}))).await;
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
    let env = TestEnv::new("pod-gc").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let mut r = env.replica("r", &[]);
    env.create("done", pod_job(&agent, "exit 0", json!({}))).await;
    env.wait_job("done", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(pods_of(&env, "done").await.len(), 1, "the finished attempt's pod is kept for inspection");
    // No operator from here on: only kube-controller-manager's garbage collector can remove the Pod.
    assert!(r.terminate(Duration::from_secs(30)));
    env.jobs.delete("done", &Default::default()).await.unwrap();
    wait_no_pods(&env, "done", "garbage-collected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pod_watch_keeps_watching_the_same_pod_instead_of_starting_another() {
    let env = TestEnv::new("pod-watch-reset").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    // Every connection of this replica goes through the proxy, so resetting them breaks its Pod watch (as an
    // apiserver restart behind a load balancer would) while the Pod itself runs on.
    let proxy = Proxy::to_apiserver().await;
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let _r = env.replica_with("r", &[], &options);
    env.create("watched", pod_job(&agent, "sleep 20", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 0}}))).await;
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
async fn a_timed_out_pod_that_ignores_sigterm_is_gone_before_the_next_attempt_starts() {
    let env = TestEnv::new("pod-timeout-grace").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let _r = env.replica("r", &[]);
    // `quick` stops within the claim's renew deadline (2 s in tests), `stubborn` outlives it.
    let jobs = [("quick", 1), ("stubborn", 4)];
    for (name, grace) in jobs {
        let mut spec = pod_job(
            &agent,
            "trap '' TERM; sleep 60",
            json!({"attemptTimeoutSeconds": 2, "retry": {"maxAttempts": 2, "backoffSeconds": 0}}),
        );
        spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(grace);
        env.create(name, spec).await;
    }

    // Every process group any Pod of the job ever had, and the most of them alive at once.
    let mut pids: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    let mut peak: BTreeMap<&str, usize> = BTreeMap::new();
    let deadline = Instant::now() + 2 * MINUTE;
    loop {
        for (name, _) in jobs {
            let seen = pids.entry(name).or_default();
            for pod in pods_of(&env, name).await {
                let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
                seen.extend(statuses.iter().filter_map(container_pid));
            }
            let alive = seen.iter().filter(|pid| process_group_alive(**pid)).count();
            let p = peak.entry(name).or_default();
            *p = (*p).max(alive);
        }
        let all = env.list().await;
        if all.len() == jobs.len() && all.iter().all(|j| j.phase().is_final()) {
            break;
        }
        assert!(Instant::now() < deadline, "{}", common::summary(&all));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, _) in jobs {
        let job = env.jobs.get(name).await.unwrap();
        assert_eq!((job.phase(), job.attempts()), (Phase::Failed, 2), "{name}: {:?}", job.status);
        assert_eq!(pids[name].len(), 2, "{name}: one process per attempt");
        assert_eq!(peak[name], 1, "{name}: the next attempt's process started while the last one still ran");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_job_is_not_failed_by_the_pod_its_deleted_namesake_left_behind() {
    let env = TestEnv::new("pod-namesake").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let mut a = env.replica("a", &[]);
    env.create("again", pod_job(&agent, "sleep 60", json!({}))).await;
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
    env.create("again", pod_job(&agent, "exit 0", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 1}}))).await;
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
    let env = TestEnv::new("pod-vanished").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let runs = env.dir.join("runs");
    let mut a = env.replica("a", &[]);
    let script = format!("echo \"$BGJOBS_ATTEMPT\" >> {}; sleep 3", runs.display());
    env.create("once", pod_job(&agent, &script, json!({"retry": {"maxAttempts": 1}}))).await;
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
    let ran = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(ran.lines().collect::<Vec<_>>(), ["1"], "attempt 1 ran once, and was not re-run under its number");
    let s = job.status.unwrap();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Failed), 1), "{:?}", s.last_error);
    assert!(s.last_error.unwrap_or_default().contains("vanished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_policy_fails_privileged_host_path_and_foreign_service_account_jobs_without_creating_a_pod() {
    let env = TestEnv::new("pod-policy").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let _r = env.replica("r", &[]);
    let job = |pod_spec: serde_json::Value| {
        let mut spec = pod_job(&agent, "echo fine", json!({"retry": {"maxAttempts": 3, "backoffSeconds": 0}}));
        let template = spec["template"]["spec"].as_object_mut().unwrap();
        template.extend(pod_spec.as_object().unwrap().clone());
        spec
    };
    let container = |extra: serde_json::Value| {
        let mut c = json!({"name": "main", "image": "busybox", "command": ["sh", "-c", "echo fine"]});
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
