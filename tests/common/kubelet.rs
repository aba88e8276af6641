//! The real node of `e2e/cluster.sh up --node` (a kubelet with containerd), for the tests that run Pods in real
//! containers: Pod-mode jobs and the chart's Deployment. `make integration` starts it and imports the images
//! (`e2e/image.sh import`); a test run without it fails with that advice.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::LogParams;
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::{TEST_NODE_LABEL, TestEnv, node_ready};

/// How to get what these tests need.
pub const HOW_TO_START: &str = "start the node and import the images: e2e/cluster.sh up --node && e2e/image.sh import";

/// The job image `e2e/image.sh job` builds from Debian's busybox-static (`sh`, `sleep`, `echo`, ...).
pub const JOB_IMAGE: &str = "localhost/bgjobs/busybox:1";

/// The operator image the chart runs by default (`bgjobs:<appVersion>`), as containerd names it.
pub fn operator_image() -> String {
    let chart = std::fs::read_to_string(super::repo_root().join("charts/bgjobs/Chart.yaml")).unwrap();
    let chart: Value = serde_yaml::from_str(&chart).unwrap();
    format!("docker.io/library/bgjobs:{}", chart["appVersion"].as_str().expect("Chart.yaml has an appVersion"))
}

/// The operator image `e2e/image.sh` built last was built from the sources as they are (its digest of what the
/// Dockerfile copies matches), or panic with how to rebuild it.
pub fn assert_operator_image_is_current() {
    let out = std::process::Command::new(super::repo_root().join("e2e/image.sh"))
        .args(["current", "operator"])
        .output()
        .expect("run e2e/image.sh");
    assert!(out.status.success(), "{}{HOW_TO_START} (make integration does it)", String::from_utf8_lossy(&out.stderr));
}

/// The real node's name (`e2e/node.sh`).
pub const NODE_NAME: &str = "bgjobs-node";

/// The real node, Ready and holding `images` (the kubelet reports its images every 10 s or so: a fresh import may
/// take that long to show). The node agents' Nodes (labelled [`TEST_NODE_LABEL`]) are not it.
pub async fn real_node(client: &Client, images: &[&str]) -> Node {
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let node = nodes.get_opt(NODE_NAME).await.expect("read the Node");
        let node = node.filter(|n| !n.labels().contains_key(TEST_NODE_LABEL) && node_ready(n));
        let present = node.as_ref().and_then(|n| n.status.as_ref()?.images.clone()).unwrap_or_default();
        let missing: Vec<&str> = images
            .iter()
            .copied()
            .filter(|i| !present.iter().any(|p| p.names.iter().flatten().any(|n| n == i)))
            .collect();
        match node {
            Some(node) if missing.is_empty() => return node,
            _ if start.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(500)).await,
            None => panic!("no Ready node {NODE_NAME}: {HOW_TO_START}"),
            Some(_) => panic!("node {NODE_NAME} has no {missing:?}: {HOW_TO_START}"),
        }
    }
}

/// A Pod-mode job spec running `script` with `sh -c` in [`JOB_IMAGE`] (never pulled: it exists only on the node), on
/// the real node, with args `{"greeting": "hello"}` and `extra` fields merged into the spec.
///
/// The Pod's grace period is 1 s: the script is its container's PID 1, which ignores SIGTERM unless it traps it, so
/// a stop waits out the grace and ends with SIGKILL (a test may set another grace).
pub fn shell_job(script: &str, extra: Value) -> Value {
    let mut spec = json!({
        "jobName": "shell",
        "args": {"greeting": "hello"},
        "template": {"spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAME},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": JOB_IMAGE, "imagePullPolicy": "Never", "command": ["sh", "-c", script],
            }],
        }},
    });
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    spec
}

/// A Pod job that outlives whoever stops it: its shell ignores SIGTERM, so once its Pod is deleted it runs on until
/// the kubelet's SIGKILL at the end of its grace, `grace` seconds.
pub fn stubborn_job(grace: i64, extra: Value) -> Value {
    let mut spec = shell_job("trap '' TERM; sleep 600", extra);
    spec["template"]["spec"]["terminationGracePeriodSeconds"] = json!(grace);
    spec
}

/// A fresh test namespace ([`TestEnv::new`]) on a Ready real node that has the job image.
pub async fn on_node(test: &str) -> TestEnv {
    let env = TestEnv::new(test).await;
    real_node(&env.client, &[JOB_IMAGE]).await;
    env
}

/// What the Pod's container wrote, read through the kubelet (`kubectl logs`).
pub async fn pod_log(client: &Client, namespace: &str, pod: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.logs(pod, &LogParams::default()).await.unwrap_or_else(|e| panic!("read the log of Pod {pod}: {e}"))
}
