//! The Helm chart (`charts/bgjobs`) installed on the local control plane through the real Helm v4 engine
//! (`e2e/helm.py`), followed by an operator replica that runs out of cluster with a token of the chart's
//! ServiceAccount: its RBAC must be sufficient (jobs, recurring jobs and, with podMode, Pod-executor jobs succeed) and
//! tight (Secrets, Pods without podMode and everything else forbidden). The offline checks are in
//! `tests/chart_render.rs`.
//!
//! The CRDs are shared by every test (deleting one would delete every test's jobs). Helm 4 server-side applies the
//! chart's crds/ on install: the tests first check by a server-side dry run that this changes nothing (the cluster
//! runs the repository's CRDs), afterwards give up the field ownership Helm took, and check that the CRDs are
//! untouched (same UID and generation) after install, upgrade and uninstall, which never deletes them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase, RecurringBackgroundJob};
use common::chart::*;
use common::fixtures::job;
use common::release::*;
use common::{ReplicaOptions, TestEnv, free_port};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

// --- on the local control plane ------------------------------------------------------------------------------------

/// A nodeSelector no node matches: Pods that must not run (these tests play the kubelet, or run the replica out of
/// cluster) stay Pending, also when the real node of `e2e/cluster.sh up --node` is there.
static OFF_EVERY_NODE: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| json!({"bgjobs.dev/no-such-node": "none"}));

/// Every object of a release exists in the cluster (`kubectl get -f`).
fn assert_all_exist(manifest: &[Value], dir: &Path) {
    let file = dir.join("release-manifest.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": manifest});
    std::fs::write(&file, list.to_string()).unwrap();
    let out = common::kubectl().args(["get", "-f"]).arg(&file).args(["-o", "name"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl get -f: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), manifest.len(), "every object of the release exists:\n{stdout}");
}

/// A kubeconfig for the same apiserver (and CA) as the admin's, authenticated by a token of `sa` in `namespace`.
/// A kubeconfig that authenticates as the ServiceAccount the installed chart's Deployment runs with.
async fn chart_service_account_kubeconfig(admin: &Client, manifest: &[Value], namespace: &str, dir: &Path) -> PathBuf {
    let sa = release_deployment(manifest).deployment()["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("the Deployment names its ServiceAccount")
        .to_string();
    common::service_account_kubeconfig(admin, &sa, namespace, dir).await
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

fn assert_forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden for the chart's ServiceAccount, got {other:?}"),
    }
}

/// The Deployment of a release manifest, as a [`Rendered`].
fn release_deployment(manifest: &[Value]) -> Rendered {
    let objects = manifest.iter().filter(|o| o["kind"] == "Deployment").cloned().collect();
    Rendered { objects, notes: String::new() }
}

/// Start a replica out of cluster the way the chart's Deployment configures it, but authenticated with the
/// ServiceAccount's token, and serving metrics/probes on a free loopback port. Waits until `/readyz` answers 200
/// (caches synced: list and watch are allowed).
async fn chart_replica(
    env: &TestEnv,
    manifest: &[Value],
    identity: &str,
    release_ns: &str,
    kubeconfig: PathBuf,
    all_namespaces: bool,
) -> common::Replica {
    let deployment = release_deployment(manifest);
    let port = free_port();
    let mut vars = container_env(&deployment, identity, release_ns);
    // Free loopback ports for metrics and reports: installs run side by side, each with the chart's fixed ports.
    vars.retain(|(k, _)| k != "BGJOBS_METRICS_ADDR" && k != "BGJOBS_REPORT_ADDR");
    vars.push(("BGJOBS_METRICS_ADDR".into(), format!("127.0.0.1:{port}")));
    vars.push(("BGJOBS_REPORT_ADDR".into(), format!("127.0.0.1:{}", free_port())));
    let args: Vec<String> = deployment.args().into_iter().filter(|a| a != "operator").collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let options = ReplicaOptions { kubeconfig: Some(kubeconfig), env: vars, all_namespaces, ..Default::default() };
    let replica = env.replica_with(identity, &args, &options);
    let deadline = Instant::now() + MINUTE;
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await
            && r.status() == 200
        {
            return replica;
        }
        assert!(Instant::now() < deadline, "replica {identity} never became ready; log:\n{}", replica.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_no_forbidden_in_log(replica: &common::Replica) {
    let log = replica.log_text();
    assert!(!log.to_lowercase().contains("forbidden"), "the replica hit RBAC denials:\n{log}");
}

async fn wait_for_events(client: &Client, ns: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap().items;
        if list.iter().any(|e| e.reporting_controller.as_deref() == Some("bgjobs")) {
            return;
        }
        assert!(Instant::now() < deadline, "no Events from bgjobs in {ns}: can the ServiceAccount create them?");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_mode_install_runs_jobs_with_the_charts_service_account_and_nothing_more() {
    let rel = TestEnv::new("helm-ns-release").await;
    let jobs = TestEnv::new("helm-ns-jobs").await;
    let admin = rel.client.clone();
    let crd_before = crd_identity(&admin).await;
    let queue = format!("helm-{}", common::unique());
    let values = json!({
        "watchNamespace": jobs.ns,
        // Every Event, so that jobs which simply succeed show the ServiceAccount may record Events.
        "operator": {"queues": [queue], "clusterMaxConcurrency": 2, "logFormat": "text", "events": "all"},
        // Objects the apiserver must accept too: HPA on CPU and queue depth (v2beta2 on 1.20), PDB (v1beta1), the
        // NetworkPolicy (nothing here enforces it).
        "autoscaling": {"enabled": true, "queueDepth": {"enabled": true, "selector": {"queue": queue}}},
        "networkPolicy": {"enabled": true, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]},
        // The Deployment's own Pods stay unscheduled: the replica under test runs out of cluster (tests/chart_on_node.rs
        // runs them).
        "nodeSelector": OFF_EVERY_NODE.clone(), "image": {"pullPolicy": "Never"},
    });
    let (release, manifest) = Release::install("bgjobs", &rel.ns, &values, &rel.dir);
    assert_all_exist(&manifest, &rel.dir);
    let kinds: BTreeSet<&str> = manifest.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains("Role") && !kinds.contains("ClusterRole"), "namespace mode: {kinds:?}");
    let api_versions: BTreeSet<&str> = manifest.iter().map(|o| o["apiVersion"].as_str().unwrap()).collect();
    assert!(
        api_versions.contains("autoscaling/v2beta2") && api_versions.contains("policy/v1beta1"),
        "{api_versions:?}"
    );
    release_helm_crd_ownership(&admin).await;
    assert_eq!(crd_identity(&admin).await, crd_before, "installing the chart left the shared CRDs as they were");

    let kubeconfig = chart_service_account_kubeconfig(&admin, &manifest, &rel.ns, &rel.dir).await;
    let replica = chart_replica(&jobs, &manifest, "chart-ns", &rel.ns, kubeconfig.clone(), false).await;

    for i in 0..5 {
        jobs.create(&format!("ok-{i}"), json!({"jobName": "noop", "queue": queue})).await;
    }
    jobs.create("gone", json!({"jobName": "noop", "queue": queue, "ttlSecondsAfterFinished": 0})).await;
    let done = jobs
        .wait_until(MINUTE, "5 jobs Succeeded and the TTL-0 job deleted", |js| {
            js.len() == 5 && js.iter().all(|j| j.phase() == Phase::Succeeded)
        })
        .await;
    for j in &done {
        assert_eq!(j.status.as_ref().unwrap().worker.as_deref(), Some("chart-ns"), "run by the chart's replica");
    }
    wait_for_events(&admin, &jobs.ns).await;
    assert_no_forbidden_in_log(&replica);
    // No cluster-scoped object in namespace mode: the replica says it cannot check the CRDs, and runs.
    assert!(replica.log_text().contains("cannot check that it has every field"), "{}", replica.log_text());

    // Tight: with the same token, nothing beyond the jobs, their Leases and Events.
    let sa_client = client_for(&kubeconfig).await;
    let lp = ListParams::default();
    for ns in [&jobs.ns, &rel.ns] {
        assert_forbidden("list secrets", Api::<Secret>::namespaced(sa_client.clone(), ns).list(&lp).await);
        assert_forbidden("list pods", Api::<Pod>::namespaced(sa_client.clone(), ns).list(&lp).await);
        assert_forbidden("list configmaps", Api::<ConfigMap>::namespaced(sa_client.clone(), ns).list(&lp).await);
    }
    let helm_secret = format!("sh.helm.release.v1.{}.v1", release.name);
    assert_forbidden(
        "read the release Secret",
        Api::<Secret>::namespaced(sa_client.clone(), &rel.ns).get(&helm_secret).await,
    );
    assert_forbidden("list secrets cluster-wide", Api::<Secret>::all(sa_client.clone()).list(&lp).await);
    assert_forbidden("list jobs in every namespace", Api::<BackgroundJob>::all(sa_client.clone()).list(&lp).await);
    assert_forbidden(
        "list jobs outside the watched namespace",
        Api::<BackgroundJob>::namespaced(sa_client.clone(), &rel.ns).list(&lp).await,
    );
    assert_forbidden(
        "list Leases in another namespace",
        Api::<Lease>::namespaced(sa_client.clone(), "default").list(&lp).await,
    );
    let watched: Api<BackgroundJob> = Api::namespaced(sa_client.clone(), &jobs.ns);
    assert_eq!(watched.list(&lp).await.expect("list the watched namespace").items.len(), 5);

    // Recurring schedules (on by default): the replica creates each tick's job and records the schedule's status.
    let schedules: Api<RecurringBackgroundJob> = Api::namespaced(admin.clone(), &jobs.ns);
    let every_2s: RecurringBackgroundJob = serde_json::from_value(json!({
        "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": "tick"},
        "spec": {"schedule": "*/2 * * * * *", "jobTemplate": {"spec": {"jobName": "noop", "queue": queue}}}
    }))
    .unwrap();
    schedules.create(&PostParams::default(), &every_2s).await.expect("create a RecurringBackgroundJob");
    jobs.wait_until(MINUTE, "a recurring job Succeeded", |js| {
        js.iter().any(|j| j.labels().contains_key("bgjobs.dev/recurring") && j.phase() == Phase::Succeeded)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while schedules.get("tick").await.unwrap().status.and_then(|s| s.last_schedule_time).is_none() {
        assert!(Instant::now() < deadline, "the replica never wrote the schedule's status");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    schedules.delete("tick", &Default::default()).await.unwrap();
    assert_no_forbidden_in_log(&replica);
    drop(replica);

    release.uninstall();
    assert_eq!(crd_identity(&admin).await, crd_before, "uninstalling kept the shared CRDs");
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(admin.clone(), &jobs.ns);
    assert!(roles.list(&lp).await.unwrap().items.is_empty(), "uninstall removed the Role");
    let kept = jobs.list().await.into_iter().filter(|j| j.name_any().starts_with("ok-")).count();
    assert_eq!(kept, 5, "uninstalling the chart keeps the jobs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_install_runs_jobs_in_every_namespace_and_pod_mode_is_an_upgrade_away() {
    let rel = TestEnv::new("helm-cluster-release").await;
    let team_a = TestEnv::new("helm-cluster-a").await;
    let team_b = TestEnv::new("helm-cluster-b").await;
    let admin = rel.client.clone();
    let crd_before = crd_identity(&admin).await;
    // This replica sees every test's jobs and schedules: it runs only its own queue, sets no default TTL, and
    // creates no recurring jobs (which also takes create/patch on BackgroundJobs away).
    let queue = format!("helm-{}", common::unique());
    let values = json!({"operator": {"queues": [queue], "recurringEnabled": false, "events": "all"},
                        "nodeSelector": OFF_EVERY_NODE.clone(), "image": {"pullPolicy": "Never"}});
    let (release, manifest) = Release::install("bgjobs", &rel.ns, &values, &rel.dir);
    assert_all_exist(&manifest, &rel.dir);
    let cluster_role = manifest.iter().find(|o| o["kind"] == "ClusterRole").expect("cluster mode: a ClusterRole");
    let cluster_role_name = cluster_role["metadata"]["name"].as_str().unwrap().to_string();
    release_helm_crd_ownership(&admin).await;
    assert_eq!(crd_identity(&admin).await, crd_before, "installing the chart left the shared CRDs as they were");

    let kubeconfig = chart_service_account_kubeconfig(&admin, &manifest, &rel.ns, &rel.dir).await;
    let replica = chart_replica(&rel, &manifest, "chart-cluster", &rel.ns, kubeconfig.clone(), true).await;
    for (env, n) in [(&team_a, 3), (&team_b, 3)] {
        for i in 0..n {
            env.create(&format!("job-{i}"), json!({"jobName": "noop", "queue": queue})).await;
        }
    }
    for env in [&team_a, &team_b] {
        let done = env
            .wait_until(MINUTE, "3 jobs Succeeded", |js| {
                js.len() == 3 && js.iter().all(|j| j.phase() == Phase::Succeeded)
            })
            .await;
        assert!(done.iter().all(|j| j.status.as_ref().unwrap().worker.as_deref() == Some("chart-cluster")));
    }
    wait_for_events(&admin, &team_b.ns).await;
    assert_no_forbidden_in_log(&replica);
    assert!(!replica.log_text().contains("cannot check"), "the ClusterRole lets it read its CRDs");
    drop(replica);

    let sa_client = client_for(&kubeconfig).await;
    let lp = ListParams::default();
    assert_forbidden("list secrets cluster-wide", Api::<Secret>::all(sa_client.clone()).list(&lp).await);
    assert_forbidden("list secrets", Api::<Secret>::namespaced(sa_client.clone(), &team_a.ns).list(&lp).await);
    assert_forbidden("list pods (podMode off)", Api::<Pod>::namespaced(sa_client.clone(), &team_a.ns).list(&lp).await);
    assert_forbidden("list configmaps", Api::<ConfigMap>::all(sa_client.clone()).list(&lp).await);
    assert_forbidden(
        "create a job",
        Api::<BackgroundJob>::namespaced(sa_client.clone(), &team_a.ns)
            .create(&PostParams::default(), &job("sneaky", json!({"jobName": "noop"})))
            .await,
    );
    Api::<BackgroundJob>::all(sa_client.clone()).list(&lp).await.expect("cluster mode lists jobs everywhere");
    // Its own two CRDs, by name, and nothing else of the cluster's CRDs.
    let crds: Api<CustomResourceDefinition> = Api::all(sa_client.clone());
    for name in ["backgroundjobs.bgjobs.dev", "recurringbackgroundjobs.bgjobs.dev"] {
        crds.get(name).await.unwrap_or_else(|e| panic!("the operator reads {name}: {e}"));
    }
    assert_forbidden("list CRDs", crds.list(&lp).await);
    assert_forbidden("read another CRD", crds.get("certificates.cert-manager.io").await);

    // Upgrade: podMode on grants Pods (for the Pod executor), still no Secrets.
    let upgraded = release
        .upgrade(&json!({"operator": {"queues": [queue], "recurringEnabled": false}, "podMode": {"enabled": true}}));
    assert_all_exist(&upgraded, &rel.dir);
    let pods: Api<Pod> = Api::namespaced(sa_client.clone(), &team_a.ns);
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = pods.list(&lp).await {
        assert!(Instant::now() < deadline, "podMode.enabled should allow listing pods: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_forbidden("list secrets after the upgrade", Api::<Secret>::all(sa_client.clone()).list(&lp).await);
    assert_eq!(crd_identity(&admin).await, crd_before, "upgrading kept the shared CRDs");

    // The Pod executor with the upgraded permissions: the replica creates and watches the attempt's Pod, and deletes
    // it on cancellation. The Pods are kept off every node (a nodeSelector no node matches), so the test plays the
    // kubelet and reports one Pod finished.
    let replica = chart_replica(&rel, &upgraded, "chart-pods", &rel.ns, kubeconfig.clone(), true).await;
    let template = json!({"spec": {"nodeSelector": OFF_EVERY_NODE.clone(), "containers": [{
        "name": "main", "image": common::kubelet::JOB_IMAGE, "imagePullPolicy": "Never", "command": ["true"]}]}});
    for name in ["in-a-pod", "cancelled-pod"] {
        team_a.create(name, json!({"jobName": "pod", "queue": queue, "template": template})).await;
    }
    let admin_pods: Api<Pod> = Api::namespaced(admin.clone(), &team_a.ns);
    let deadline = Instant::now() + MINUTE;
    while admin_pods.get_opt("in-a-pod-1").await.unwrap().is_none()
        || admin_pods.get_opt("cancelled-pod-1").await.unwrap().is_none()
    {
        assert!(Instant::now() < deadline, "the replica created no Pods; log:\n{}", replica.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let succeeded = Patch::Merge(json!({"status": {"phase": "Succeeded"}}));
    admin_pods.patch_status("in-a-pod-1", &PatchParams::default(), &succeeded).await.unwrap();
    team_a.wait_job("in-a-pod", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let cancel = Patch::Merge(json!({"spec": {"cancel": true}}));
    team_a.jobs.patch("cancelled-pod", &PatchParams::default(), &cancel).await.unwrap();
    team_a.wait_job("cancelled-pod", MINUTE, "Cancelled", |j| j.phase() == Phase::Cancelled).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin_pods.get_opt("cancelled-pod-1").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the cancelled job's Pod was not deleted; log:\n{}", replica.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_forbidden_in_log(&replica);
    drop(replica);

    release.uninstall();
    assert_eq!(crd_identity(&admin).await, crd_before, "uninstalling kept the shared CRDs");
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(admin.clone());
    assert!(cluster_roles.get_opt(&cluster_role_name).await.unwrap().is_none(), "uninstall removed the ClusterRole");
    assert_eq!(team_a.list().await.len(), 5, "uninstalling the chart keeps the jobs");
}
