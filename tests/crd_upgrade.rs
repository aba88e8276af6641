//! An operator upgraded without its CRDs (Helm applies `crds/` on install only) would run against a schema that
//! lacks its newer fields, and the apiserver would silently prune them from every write. Such a replica refuses to
//! start instead, naming what the installed CRD lacks and the command that installs the new ones.
//!
//! This binary changes the shared control plane's CRD, so it holds a single test (test binaries run one after
//! another) and puts the repository's CRDs back when it ends, also when it fails.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bgjobs::api::RecurringBackgroundJob;
use bgjobs::api::installed::missing_fields;
use common::{TestEnv, kubectl, repo_root};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, CustomResourceExt, ResourceExt};

/// Applies the repository's CRDs, as `e2e/cluster.sh` does (server-side, field manager `kubectl`), when dropped.
struct PutBackOnDrop;

impl Drop for PutBackOnDrop {
    fn drop(&mut self) {
        // No panic here (it may run while one unwinds): say it, the next test binaries would fail on it.
        if let Err(e) = try_apply(&repo_root().join("crds")) {
            eprintln!("COULD NOT PUT THE REPOSITORY'S CRDS BACK (run e2e/cluster.sh up): {e}");
        }
    }
}

/// `kubectl apply --server-side --force-conflicts -f <path>`: the field manager that owns the shared CRDs, so a field
/// left out of `path` is removed, and applied back later by the same manager.
fn apply(path: &std::path::Path) {
    try_apply(path).unwrap();
}

fn try_apply(path: &std::path::Path) -> Result<(), String> {
    let out = kubectl().args(["apply", "--server-side", "--force-conflicts", "-f"]).arg(path).output();
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("kubectl apply {path:?}: {}", String::from_utf8_lossy(&out.stderr))),
        Err(e) => Err(format!("kubectl: {e}")),
    }
}

async fn installed(env: &TestEnv) -> CustomResourceDefinition {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    crds.get(&RecurringBackgroundJob::crd().name_any()).await.unwrap()
}

/// Whether the replica got past its start-up checks within 30 s.
async fn starts(replica: &common::Replica) -> bool {
    for _ in 0..300 {
        if replica.log_text().contains("bgjobs operator starting") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_to_start_against_a_crd_older_than_itself_and_says_what_to_apply() {
    let env = TestEnv::new("crd-outdated").await;
    let wanted = RecurringBackgroundJob::crd();
    // The RecurringBackgroundJob CRD of a release from before `status.previousScheduleTime`.
    let mut old = serde_json::to_value(&wanted).unwrap();
    let status = &mut old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    assert!(status.as_object_mut().unwrap().remove("previousScheduleTime").is_some());
    let file = env.dir.join("old-crd.json");
    std::fs::write(&file, serde_json::to_vec(&old).unwrap()).unwrap();
    let _put_back = PutBackOnDrop;
    apply(&file);
    let gone = BTreeSet::from(["v1alpha1: status.previousScheduleTime".to_string()]);
    // Should it not: another field manager co-owns the field (a chart test that failed before giving Helm's
    // ownership up, tests/common/release.rs), so `kubectl` alone cannot remove it.
    assert_eq!(missing_fields(&installed(&env).await, &wanted), gone, "the cluster now runs the old CRD");

    let mut stale = env.replica("stale", &[]);
    let exit = stale.exit_within(Duration::from_secs(60));
    let log = stale.log_text();
    assert!(exit.is_some_and(|s| !s.success()), "the replica did not refuse to start ({exit:?}): {log}");
    assert!(log.contains("recurringbackgroundjobs.bgjobs.dev lacks v1alpha1: status.previousScheduleTime"), "{log}");
    assert!(log.contains("bgjobs crd | kubectl apply --server-side --force-conflicts -f -"), "{log}");
    assert!(!log.contains("bgjobs operator starting"), "{log}");

    // A replica with recurring schedules off needs nothing of that CRD: it starts.
    let mut no_recurring = env.replica("no-recurring", &["--recurring-enabled", "false"]);
    assert!(no_recurring.exit_within(Duration::from_secs(5)).is_none(), "{}", no_recurring.log_text());
    assert!(starts(&no_recurring).await, "{}", no_recurring.log_text());
    drop(no_recurring);

    // Once the release's CRDs are applied, the same replica starts.
    apply(&repo_root().join("crds"));
    assert_eq!(missing_fields(&installed(&env).await, &wanted), BTreeSet::new(), "the CRDs are back");
    let current = env.replica("current", &[]);
    assert!(starts(&current).await, "{}", current.log_text());
}
