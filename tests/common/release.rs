//! A chart release on the local control plane, and the shared CRDs it must leave as they were: used by the tests
//! that install the chart (`tests/chart_install.rs`, `tests/chart_on_node.rs`).
//!
//! The CRDs are shared by every test (deleting one would delete every test's jobs). Helm 4 server-side applies the
//! chart's crds/ on install: [`Release::install`] first checks by a server-side dry run that this changes nothing
//! (the cluster runs the repository's CRDs); [`release_helm_crd_ownership`] afterwards gives up the field ownership
//! Helm took.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use super::chart::*;

/// A release that is uninstalled when dropped (the CRD stays: Helm never deletes crds/).
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Release {
    pub fn install(name: &str, namespace: &str, values: &Value, dir: &Path) -> (Release, Vec<Value>) {
        assert_cluster_runs_the_charts_crds(dir);
        let summary = helm_ok(&[
            "install",
            &chart(),
            "--name",
            name,
            "--namespace",
            namespace,
            "--values-json",
            &values.to_string(),
        ]);
        assert_eq!(summary["status"], "deployed", "{summary}");
        let manifest = objects(summary["manifest"].as_str().expect("the release's manifest"));
        (Release { name: name.into(), namespace: namespace.into() }, manifest)
    }

    pub fn upgrade(&self, values: &Value) -> Vec<Value> {
        let summary = helm_ok(&[
            "upgrade",
            &chart(),
            "--name",
            &self.name,
            "--namespace",
            &self.namespace,
            "--values-json",
            &values.to_string(),
        ]);
        assert_eq!(summary["status"], "deployed", "{summary}");
        objects(summary["manifest"].as_str().unwrap())
    }

    pub fn uninstall(&self) {
        helm_ok(&["uninstall", "--name", &self.name, "--namespace", &self.namespace]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", "--name", &self.name, "--namespace", &self.namespace]);
    }
}

/// The names of the chart's CRDs.
pub fn chart_crd_names() -> Vec<String> {
    helm_ok(&["crds", &chart()])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| objects(c["data"].as_str().unwrap()))
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Each chart CRD's name, UID and generation (a re-created or changed CRD would differ); all must be Established.
pub async fn crd_identity(client: &Client) -> Vec<(String, String, i64)> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    for name in chart_crd_names() {
        let crd = crds.get(&name).await.unwrap_or_else(|e| panic!("CRD {name} is installed: {e}"));
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        assert!(established, "the CRD {name} is Established");
        out.push((name, crd.uid().unwrap(), crd.metadata.generation.unwrap()));
    }
    assert!(out.iter().any(|(name, _, _)| name == CRD), "the chart ships {CRD}");
    out
}

/// The shared cluster runs exactly the chart's CRDs as the Helm engine loads them (they are the repository's, and
/// `e2e/cluster.sh up` applies crds/), so Helm's install of crds/ cannot change them: a server-side dry-run apply
/// must find nothing to change.
pub fn assert_cluster_runs_the_charts_crds(dir: &Path) {
    let docs: Vec<String> = helm_ok(&["crds", &chart()])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["data"].as_str().unwrap().to_string())
        .collect();
    let file = dir.join("chart-crds.yaml");
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    let out = super::kubectl()
        .args(["diff", "--server-side", "--force-conflicts", "-f"])
        .arg(&file)
        .output()
        .expect("run kubectl diff");
    match out.status.code() {
        Some(0) => {}
        Some(1) => panic!(
            "the cluster's CRDs differ from charts/bgjobs/crds (= crds/); `e2e/cluster.sh up` applies crds/:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        _ => panic!("kubectl diff failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// Every field path a managed-fields entry names.
pub fn field_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Some(map) = v.as_object() {
        for (k, child) in map {
            let path = format!("{prefix}/{k}");
            out.insert(path.clone());
            field_paths(child, &path, out);
        }
    }
}

/// Helm 4 installs crds/ by server-side apply, which makes its field manager a co-owner of every field of the
/// shared CRDs. Co-ownership would outlive the release: a later apply of crds/ (manager `kubectl`, by
/// `e2e/cluster.sh`) could no longer remove a field. Give up every such ownership whose fields another manager owns
/// too (so nothing is removed), and check the CRDs did not change.
pub async fn release_helm_crd_ownership(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in chart_crd_names() {
        let crd = crds.get(&name).await.unwrap();
        let generation = crd.metadata.generation;
        let entries = crd.metadata.managed_fields.clone().unwrap_or_default();
        let paths = |e: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry| {
            let mut set = BTreeSet::new();
            if let Some(f) = &e.fields_v1 {
                field_paths(&f.0, "", &mut set);
            }
            set
        };
        for entry in entries.iter().filter(|e| e.operation.as_deref() == Some("Apply")) {
            let manager = entry.manager.clone().unwrap_or_default();
            if manager == "kubectl" {
                continue;
            }
            let others: BTreeSet<String> =
                entries.iter().filter(|e| e.manager.as_deref() != Some(&manager)).flat_map(paths).collect();
            if !paths(entry).is_subset(&others) {
                continue; // fields only it owns: releasing them would remove them
            }
            let empty = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                               "metadata": {"name": name}});
            crds.patch(&name, &PatchParams::apply(&manager), &Patch::Apply(&empty))
                .await
                .unwrap_or_else(|e| panic!("release {manager}'s ownership of CRD {name}: {e}"));
        }
        let after = crds.get(&name).await.unwrap();
        assert_eq!(after.metadata.generation, generation, "releasing Helm's field ownership changed CRD {name}");
    }
}
