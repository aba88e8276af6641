//! The chart installed for real: the operator image, built from the repository's Dockerfile (`e2e/image.sh`), runs
//! as the Deployment's Pods on the local node (`e2e/cluster.sh up --node`: kubelet, containerd, a CNI bridge,
//! kube-proxy). The Pods reach the apiserver through the `kubernetes` Service with their ServiceAccount's token, as
//! in any cluster. The test checks what a user of `helm install` relies on: the probes pass, the Pods run jobs, a
//! scale-up adds a replica that takes jobs too, a replica Pod deleted mid-job hands its job back on SIGTERM within
//! the termination grace (another replica then runs it), and uninstall removes the Pods.
//!
//! `make integration` starts the node and imports the images first; run by hand, do the same:
//! `e2e/cluster.sh up --node && e2e/image.sh import`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase};
use common::TestEnv;
use common::chart::MINUTE;
use common::kubelet::{assert_operator_image_is_current, operator_image, real_node};
use common::release::{Release, release_helm_crd_ownership};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const RELEASE: &str = "bgjobs";

fn pod_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn kubectl(args: &[&str]) -> String {
    let out = common::kubectl().args(args).output().expect("run kubectl");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The release's operator Pods that are not being deleted.
async fn operator_pods(pods: &Api<Pod>) -> Vec<Pod> {
    let selector = format!("app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator");
    let list = pods.list(&ListParams::default().labels(&selector)).await.unwrap().items;
    list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

/// Wait until exactly `n` operator Pods run and are Ready (their readiness probe, `/readyz`, passes once the
/// replica's caches are synced); their names.
async fn wait_ready_pods(env: &TestEnv, n: usize, timeout: Duration) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    loop {
        let current = operator_pods(&pods).await;
        if current.len() == n && current.iter().all(pod_ready) {
            return current.iter().map(|p| p.name_any()).collect();
        }
        if start.elapsed() > timeout {
            let logs = kubectl(&["logs", "-n", &env.ns, "-l", "app.kubernetes.io/component=operator", "--tail=30"]);
            panic!(
                "{n} operator Pods were not Ready within {timeout:?}:\n{}\n{}\nlogs:\n{logs}",
                kubectl(&["get", "pods", "-n", &env.ns, "-o", "wide"]),
                kubectl(&["describe", "pods", "-n", &env.ns])
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn workers(jobs: &[BackgroundJob]) -> BTreeSet<String> {
    jobs.iter().filter_map(|j| j.status.as_ref()?.worker.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_pods_run_jobs_take_more_after_a_scale_up_and_hand_a_job_back_when_deleted() {
    let env = TestEnv::new("chart-on-node").await;
    assert_operator_image_is_current();
    let node = real_node(&env.client, &[&operator_image()]).await;
    let values = |replicas: u32| {
        json!({
            "watchNamespace": env.ns,
            "replicaCount": replicas,
            // Short leases and a short shutdown grace keep the test quick: terminationGracePeriodSeconds follows
            // (shutdownGrace + renewDeadline + 5 s = 12 s).
            "operator": {"maxConcurrentJobsPerInstance": 4, "shutdownGrace": "2s", "leaseDuration": "8s",
                         "renewDeadline": "5s", "renewInterval": "1s", "logFormat": "text",
                         "retention": ["finished=never"]},
            // Built and imported by e2e/image.sh: never pulled.
            "image": {"pullPolicy": "Never"},
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
        })
    };
    let (release, manifest) = Release::install(RELEASE, &env.ns, &values(1), &env.dir);
    release_helm_crd_ownership(&env.client).await;
    let deployment = manifest.iter().find(|o| o["kind"] == "Deployment").expect("the release has a Deployment");
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert_eq!(grace, 12, "shutdownGrace 2 s + renewDeadline 5 s + 5 s");

    // Ready Pods, on the real node, that run jobs.
    let first = wait_ready_pods(&env, 1, 3 * MINUTE).await;
    println!("{}", kubectl(&["get", "pods", "-n", &env.ns, "-o", "wide"]));
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    for p in operator_pods(&pods).await {
        assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some(node.name_any().as_str()));
    }
    for i in 0..6 {
        env.create(&format!("first-{i}"), json!({"jobName": "noop"})).await;
    }
    let done = env.wait_until(MINUTE, "6 jobs Succeeded", |js| js.iter().all(|j| j.phase() == Phase::Succeeded)).await;
    assert_eq!(workers(&done), first, "the one replica Pod ran every job (status.worker is the Pod name)");

    // Scale up: the second Pod takes jobs too. 16 jobs of 1.5 s on 4 slots keep the first Pod busy for 6 s alone.
    release.upgrade(&values(2));
    let both = wait_ready_pods(&env, 2, 3 * MINUTE).await;
    assert!(first.is_subset(&both), "the first Pod stayed: {first:?} {both:?}");
    for i in 0..16 {
        env.create(&format!("scaled-{i}"), json!({"jobName": "sleep", "args": {"seconds": 1.5}})).await;
    }
    let done = env
        .wait_until(2 * MINUTE, "22 jobs Succeeded", |js| {
            js.len() == 22 && js.iter().all(|j| j.phase() == Phase::Succeeded)
        })
        .await;
    let scaled: Vec<BackgroundJob> = done.into_iter().filter(|j| j.name_any().starts_with("scaled-")).collect();
    assert_eq!(workers(&scaled), both, "both replica Pods ran some of the 16 jobs");

    // Delete a replica Pod while it runs a job: on SIGTERM it waits shutdownGrace, stops the job and hands it back
    // to the queue, well before the kubelet's SIGKILL at the termination grace; another replica then runs it.
    let watch_params = WatchParams::default().fields("metadata.name=long");
    let mut changes = env.jobs.watch(&watch_params, "0").await.expect("watch the job").boxed();
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 20}})).await;
    let running = env
        .wait_job("long", MINUTE, "Running", |j| {
            j.phase() == Phase::Running && j.status.as_ref().is_some_and(|s| s.worker.is_some())
        })
        .await;
    let victim = running.status.unwrap().worker.unwrap();
    let deleted_at = Instant::now();
    pods.delete(&victim, &DeleteParams::default()).await.expect("delete the replica Pod");
    let shut_down = format!("worker {victim} shut down");
    let mut handed_back_after = None;
    let mut finished = None;
    let deadline = Duration::from_secs(grace) + 2 * MINUTE;
    while finished.is_none() {
        let next = tokio::time::timeout(deadline.saturating_sub(deleted_at.elapsed()), changes.try_next()).await;
        let event = next.expect("the job did not finish after its replica Pod was deleted").expect("watch the job");
        let event = event.expect("the job's watch ended before the job finished");
        let (WatchEvent::Added(job) | WatchEvent::Modified(job)) = event else { continue };
        let status = job.status.clone().unwrap_or_default();
        if handed_back_after.is_none()
            && job.phase() == Phase::Waiting
            && status.last_error.as_deref().is_some_and(|e| e.contains(&shut_down))
        {
            handed_back_after = Some(deleted_at.elapsed());
        }
        if job.phase().is_final() {
            finished = Some(job);
        }
    }
    let handed_back_after = handed_back_after
        .unwrap_or_else(|| panic!("the deleted Pod {victim} never handed the job back ('{shut_down}')"));
    assert!(
        handed_back_after < Duration::from_secs(grace),
        "handed back {handed_back_after:?} after the delete, past the {grace} s termination grace"
    );
    let finished = finished.unwrap();
    let status = finished.status.as_ref().unwrap();
    assert_eq!(finished.phase(), Phase::Succeeded, "{status:?}");
    assert_ne!(status.worker.as_deref(), Some(victim.as_str()), "another replica ran the job to the end");
    assert_eq!(status.attempts, 2, "one interrupted attempt, one that succeeded: {status:?}");
    println!("the deleted Pod handed its job back after {handed_back_after:?}");

    // Uninstall: the Pods go; the jobs stay. The kubelet removes a Pod object only once its containers, volumes and
    // cgroups are gone, which takes it over a minute on this busy 2-core machine at times.
    release.uninstall();
    let start = Instant::now();
    while !pods.list(&ListParams::default()).await.unwrap().items.is_empty() {
        assert!(
            start.elapsed() < 3 * MINUTE,
            "Pods left after uninstall:\n{}",
            kubectl(&["get", "pods", "-n", &env.ns])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("the release's Pods were gone {:?} after uninstall", start.elapsed());
    assert_eq!(env.list().await.len(), 23, "uninstalling keeps the jobs");
}
