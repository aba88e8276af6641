//! The node agent (`bgjobs-node-agent`, the process-based stand-in for a kubelet in `e2e/node-agent`) on the local control plane: the real
//! kube-scheduler binds Pods to its Node, the real kube-controller-manager drives Jobs and watches the node's health.
//!
//! Every test runs its own agent with its own Node (labelled and tainted with its name), and places its Pods there
//! with a nodeSelector and a toleration, so parallel tests never run each other's Pods.

mod common;

use std::time::{Duration, Instant};

use bgjobs_node_agent::container_pid;
use common::{NodeAgent, NodeAgentOptions, TestEnv, node_ready, process_group_alive};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Node, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// A Pod on the agent's node running `sh -c <script>`; `spec` is merged into the Pod's spec.
fn pod(name: &str, agent: &NodeAgent, script: &str, spec: serde_json::Value) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}],
        },
    });
    merge(&mut pod["spec"], agent.placement());
    merge(&mut pod["spec"], spec);
    serde_json::from_value(pod).unwrap()
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

async fn create(pods: &Api<Pod>, pod: Pod) -> Pod {
    pods.create(&PostParams::default(), &pod).await.expect("create pod")
}

/// Poll the Pod `name` until `done` holds, or panic after `timeout` with its status and the agent's log.
async fn wait_pod(
    pods: &Api<Pod>,
    agent: &NodeAgent,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Pod) -> bool,
) -> Pod {
    let start = Instant::now();
    loop {
        let pod = pods.get_opt(name).await.expect("get pod");
        if let Some(pod) = pod.as_ref()
            && done(pod)
        {
            return pod.clone();
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for pod {name}: {what}; status: {:?}\nagent log:\n{}",
                pod.and_then(|p| p.status),
                agent.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until Pod `name` is gone, at most `timeout` after `since`; how long after `since` it went.
async fn wait_gone(pods: &Api<Pod>, agent: &NodeAgent, name: &str, since: Instant, timeout: Duration) -> Duration {
    while pods.get_opt(name).await.expect("get pod").is_some() {
        if since.elapsed() > timeout {
            panic!("pod {name} still exists after {timeout:?}\nagent log:\n{}", agent.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    since.elapsed()
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn finished(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

fn terminated(pod: &Pod) -> &ContainerStateTerminated {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .unwrap_or_else(|| panic!("pod {} has no terminated state: {:?}", pod.name_any(), pod.status))
}

/// The pid (= process group id) of a Pod's process, from its container ID.
fn pid(pod: &Pod) -> u32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(container_pid)
        .unwrap_or_else(|| panic!("pod {} has no container pid: {:?}", pod.name_any(), pod.status))
}

#[tokio::test]
async fn a_pod_that_exits_0_succeeds_with_its_env_and_output() {
    let env = TestEnv::new("node_agent_succeeds").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let script = r#"echo hi; echo "$GREETING from $POD_NAME in $POD_NS"; test "$GREETING" = "hello world" && test "$POD_NAME" = hi && test -z "$KUBECONFIG"; exit $?"#;
    let env_vars = json!({"containers": [{
        "name": "main", "image": "busybox", "command": ["sh", "-c", script],
        "env": [
            {"name": "WHO", "value": "world"},
            {"name": "GREETING", "value": "hello $(WHO)"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
    }]});
    create(&pods, pod("hi", &agent, script, env_vars)).await;

    let done = wait_pod(&pods, &agent, "hi", Duration::from_secs(60), "finished", finished).await;
    let status = done.status.as_ref().unwrap();
    assert_eq!(phase(&done), "Succeeded", "{:?}", done.status);
    assert_eq!(done.spec.as_ref().unwrap().node_name.as_deref(), Some(agent.node.as_str()), "bound by the scheduler");
    let t = terminated(&done);
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    assert!(t.started_at.is_some() && t.finished_at.is_some());
    assert!(status.start_time.is_some());
    assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
    let log = agent.work_dir.join(&agent.node).join("logs").join(format!("{}_hi_{}.log", env.ns, done.uid().unwrap()));
    let output = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert_eq!(output, format!("hi\nhello world from hi in {}\n", env.ns));
}

#[tokio::test]
async fn a_pod_that_exits_3_fails_with_exit_code_3_and_its_output() {
    let env = TestEnv::new("node_agent_fails").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    create(&pods, pod("three", &agent, "echo boom >&2; exit 3", json!({}))).await;
    let mut no_such = pod("nocmd", &agent, "", json!({}));
    no_such.spec.as_mut().unwrap().containers[0].command = Some(vec!["/no/such/binary".into()]);
    create(&pods, no_such).await;

    let three = wait_pod(&pods, &agent, "three", Duration::from_secs(60), "finished", finished).await;
    assert_eq!(phase(&three), "Failed");
    let t = terminated(&three);
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert_eq!(t.message.as_deref(), Some("boom"), "the end of the output is the message");

    let nocmd = wait_pod(&pods, &agent, "nocmd", Duration::from_secs(60), "finished", finished).await;
    assert_eq!(phase(&nocmd), "Failed");
    let t = terminated(&nocmd);
    assert_eq!(t.reason.as_deref(), Some("ContainerCannotRun"));
    assert!(t.message.as_deref().unwrap_or_default().contains("/no/such/binary"), "{t:?}");
}

#[tokio::test]
async fn a_deleted_pod_has_its_process_group_killed_and_its_deletion_finalized() {
    let env = TestEnv::new("node_agent_delete").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    // Two processes in the group each: the shell and a background sleep.
    create(&pods, pod("polite", &agent, "sleep 30 & sleep 30; wait", json!({}))).await;
    // Ignores SIGTERM (and so do its children): only SIGKILL after the 2 s grace period stops it.
    let stubborn =
        pod("stubborn", &agent, "trap '' TERM; sleep 30 & sleep 30; wait", json!({"terminationGracePeriodSeconds": 2}));
    create(&pods, stubborn).await;

    let running = |p: &Pod| phase(p) == "Running";
    let polite = wait_pod(&pods, &agent, "polite", Duration::from_secs(60), "Running", running).await;
    let stubborn = wait_pod(&pods, &agent, "stubborn", Duration::from_secs(60), "Running", running).await;
    let (polite_pid, stubborn_pid) = (pid(&polite), pid(&stubborn));
    assert!(process_group_alive(polite_pid) && process_group_alive(stubborn_pid));
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    assert!(ready(&polite), "{:?}", polite.status);

    // A plain delete: the apiserver sets deletionTimestamp (the Pod is bound and running), the agent finalizes.
    pods.delete("polite", &DeleteParams::default()).await.unwrap();
    pods.delete("stubborn", &DeleteParams::default()).await.unwrap();
    // Both from the moment both were deleted (the stubborn one's grace began at most then), not from the end of the
    // wait for the other.
    let deleted = Instant::now();
    let polite_took = wait_gone(&pods, &agent, "polite", deleted, Duration::from_secs(30)).await;
    let stubborn_took = wait_gone(&pods, &agent, "stubborn", deleted, Duration::from_secs(30)).await;
    assert!(!process_group_alive(polite_pid), "the polite Pod's processes are gone");
    assert!(!process_group_alive(stubborn_pid), "the stubborn Pod's processes are gone");
    assert!(polite_took < Duration::from_secs(8), "SIGTERM stops the polite one at once: {polite_took:?}");
    assert!(stubborn_took >= Duration::from_millis(1900), "SIGKILL only after the grace period: {stubborn_took:?}");
    let log = agent.log_text();
    assert!(log.contains("deletion finalized"), "{log}");
}

#[tokio::test]
async fn a_batch_job_completes_on_the_node_driven_by_the_controller_manager() {
    let env = TestEnv::new("node_agent_batch_job").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let jobs: Api<Job> = Api::namespaced(env.client.clone(), &env.ns);
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "containers": [{"name": "work", "image": "busybox", "command": ["sh", "-c", "sleep 1"]}],
    });
    merge(&mut pod_spec, agent.placement());
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "three"},
        "spec": {"completions": 3, "parallelism": 2, "backoffLimit": 0, "template": {"spec": pod_spec}},
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    let start = Instant::now();
    loop {
        let status = jobs.get("three").await.unwrap().status.unwrap_or_default();
        assert_eq!(status.failed.unwrap_or(0), 0, "no Pod fails: {status:?}\n{}", agent.log_text());
        if status.succeeded == Some(3) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "Job not complete: {status:?}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let ran = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(ran.len(), 3, "one Pod per completion");
    assert!(ran.iter().all(|p| phase(p) == "Succeeded" && terminated(p).exit_code == 0));
}

#[tokio::test]
async fn a_hundred_pods_at_once_all_run_and_succeed() {
    let env = TestEnv::new("node_agent_many").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let n = 100;
    let creates = (0..n).map(|i| create(&pods, pod(&format!("p{i}"), &agent, "sleep 1; echo done", json!({}))));
    futures::future::join_all(creates).await;

    let start = Instant::now();
    let all = loop {
        let all = pods.list(&Default::default()).await.unwrap().items;
        if all.iter().filter(|p| finished(p)).count() == n {
            break all;
        }
        if start.elapsed() > Duration::from_secs(180) {
            let phases: Vec<&str> = all.iter().map(phase).collect();
            panic!("not all finished: {phases:?}\n{}", agent.log_text());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(all.iter().all(|p| phase(p) == "Succeeded"), "every Pod succeeds");
    // They ran side by side, not one after another: 100 one-second Pods overlap.
    let mut spans: Vec<(jiff::Timestamp, i32)> = Vec::new();
    for p in &all {
        let t = terminated(p);
        spans.push((t.started_at.clone().unwrap().0, 1));
        spans.push((t.finished_at.clone().unwrap().0, -1));
    }
    spans.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in spans {
        now += d;
        most = most.max(now);
    }
    assert!(most >= 10, "at most {most} Pods ran at once");
}

#[tokio::test]
async fn shutdown_stops_its_processes_and_marks_the_node_not_ready_and_a_restart_adopts_the_node() {
    let env = TestEnv::new("node_agent_restart").await;
    let mut agent = env.node_agent_with(&NodeAgentOptions { keep_node: true, ..Default::default() });
    let first = agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let nodes: Api<Node> = Api::all(env.client.clone());
    create(&pods, pod("long", &agent, "sleep 30 & sleep 30; wait", json!({}))).await;
    let running = wait_pod(&pods, &agent, "long", Duration::from_secs(60), "Running", |p| phase(p) == "Running").await;
    let pgid = pid(&running);

    assert!(agent.terminate(Duration::from_secs(20)), "the agent stops on SIGTERM");
    assert!(!process_group_alive(pgid), "it killed the processes it started");
    let long = pods.get("long").await.unwrap();
    assert_eq!(phase(&long), "Failed");
    assert!(terminated(&long).message.as_deref().unwrap_or_default().contains("shutting down"), "{:?}", long.status);
    let node = nodes.get(&agent.node).await.unwrap();
    assert!(!node_ready(&node), "marked NotReady: {:?}", node.status);

    agent.restart();
    let adopted = agent.ready(&env.client).await;
    assert_eq!(adopted.uid(), first.uid(), "the restarted agent adopts the same Node");
    create(&pods, pod("after", &agent, "exit 0", json!({}))).await;
    let after = wait_pod(&pods, &agent, "after", Duration::from_secs(60), "finished", finished).await;
    assert_eq!(phase(&after), "Succeeded");
}

#[tokio::test]
async fn after_a_crash_a_restarted_agent_reports_the_lost_pod_failed_and_leaves_its_process_alone() {
    let env = TestEnv::new("node_agent_crash").await;
    let mut agent = env.node_agent_with(&NodeAgentOptions { keep_node: true, ..Default::default() });
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    create(&pods, pod("orphan", &agent, "sleep 30", json!({}))).await;
    let running =
        wait_pod(&pods, &agent, "orphan", Duration::from_secs(60), "Running", |p| phase(p) == "Running").await;
    let pgid = pid(&running);

    agent.kill9();
    agent.restart();
    let lost = wait_pod(&pods, &agent, "orphan", Duration::from_secs(60), "finished", finished).await;
    assert_eq!(phase(&lost), "Failed");
    let t = terminated(&lost);
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("ContainerStatusUnknown")), "{t:?}");
    assert!(process_group_alive(pgid), "a process the new agent did not start is not its to stop");
    // It is this test's to stop, though.
    let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
}

#[tokio::test]
async fn status_writes_are_conditional_and_keep_what_others_wrote() {
    let env = TestEnv::new("node_agent_conflict").await;
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    create(&pods, pod("shared", &agent, "sleep 2", json!({}))).await;
    wait_pod(&pods, &agent, "shared", Duration::from_secs(60), "Running", |p| phase(p) == "Running").await;

    // Someone else writes the status while the process runs: the agent's copy is now stale, so its final write
    // meets 409 Conflict, re-reads and re-applies instead of overwriting.
    let extra = json!({"status": {"conditions": [{"type": "example.com/Extra", "status": "True"}]}});
    pods.patch_status("shared", &kube::api::PatchParams::default(), &kube::api::Patch::Strategic(extra)).await.unwrap();

    let done = wait_pod(&pods, &agent, "shared", Duration::from_secs(60), "finished", finished).await;
    assert_eq!(phase(&done), "Succeeded");
    let conditions = done.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    assert!(conditions.iter().any(|c| c.type_ == "example.com/Extra"), "kept: {conditions:?}");
    assert!(!agent.log_text().contains("could not write"), "{}", agent.log_text());
}
