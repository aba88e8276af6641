//! The Helm chart (`charts/bgjobs`) through the real Helm v4 engine (`e2e/helm.py`, PyPI helm-python-sdk): lint,
//! render with several values sets, schema and template checks on bad values, every operator flag reachable through
//! values, the CRDs, and installs on the local control plane followed by an operator replica that runs out of
//! cluster with a token of the chart's ServiceAccount: its RBAC must be sufficient (jobs, recurring jobs and, with
//! podMode, Pod-executor jobs succeed) and tight (Secrets, Pods without podMode and everything else forbidden).
//!
//! The CRDs are shared by every test (deleting one would delete every test's jobs). Helm 4 server-side applies the
//! chart's crds/ on install: the tests first check by a server-side dry run that this changes nothing (the cluster
//! runs the repository's CRDs), afterwards give up the field ownership Helm took, and check that the CRDs are
//! untouched (same UID and generation) after install, upgrade and uninstall, which never deletes them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase, RecurringBackgroundJob};
use common::{ReplicaOptions, TestEnv};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

const CRD: &str = "backgroundjobs.bgjobs.dev";
const MINUTE: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> String {
    repo().join("charts/bgjobs").display().to_string()
}

/// Run `e2e/helm.py ARGS`: stdout, or (exit code, stderr).
fn helm(args: &[&str]) -> Result<String, (i32, String)> {
    let out = Command::new("python3")
        .arg(repo().join("e2e/helm.py"))
        .args(args)
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .expect("run python3 e2e/helm.py (python3 must be installed)");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if stderr.contains("helm-python-sdk") && !out.status.success() {
        panic!("{stderr}\n(`make test` installs it; see README.md)");
    }
    match out.status.success() {
        true => Ok(String::from_utf8(out.stdout).unwrap()),
        false => Err((out.status.code().unwrap_or(-1), stderr)),
    }
}

fn helm_ok(args: &[&str]) -> Value {
    let out = helm(args).unwrap_or_else(|(code, err)| panic!("e2e/helm.py {args:?} failed ({code}): {err}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("e2e/helm.py {args:?} printed no JSON ({e}): {out}"))
}

/// Every object of a multi-document YAML text.
fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of a render or a release.
struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

const RELEASE: &str = "rel";
const RELEASE_NS: &str = "bgjobs-system";

fn render(values: Value) -> Rendered {
    render_args(&["--values-json", &values.to_string()])
}

fn render_args(extra: &[&str]) -> Rendered {
    let chart = chart();
    let mut args = vec!["render", chart.as_str(), "--name", RELEASE, "--namespace", RELEASE_NS];
    args.extend_from_slice(extra);
    let out = helm_ok(&args);
    let mut objs = Vec::new();
    let mut notes = String::new();
    for (path, text) in out["manifests"].as_object().expect("manifests") {
        if path.ends_with("NOTES.txt") {
            notes = text.as_str().unwrap().to_string();
        } else {
            objs.extend(objects(text.as_str().unwrap()));
        }
    }
    Rendered { objects: objs, notes }
}

/// The message of a render that must fail.
fn render_error(values: Value) -> String {
    match helm(&[
        "render",
        &chart(),
        "--name",
        RELEASE,
        "--namespace",
        RELEASE_NS,
        "--values-json",
        &values.to_string(),
    ]) {
        Ok(_) => panic!("the chart accepted bad values {values}"),
        Err((code, stderr)) => {
            assert_eq!(code, 2, "bad values exit with 2, not {code}: {stderr}");
            stderr
        }
    }
}

impl Rendered {
    fn kinds(&self) -> BTreeSet<String> {
        self.objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect()
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, got {}: {:?}", all.len(), self.kinds());
        all[0]
    }

    /// The Service whose name ends in `-<suffix>` (`metrics`, `reports`).
    fn service(&self, suffix: &str) -> &Value {
        let wanted = format!("-{suffix}");
        let all: Vec<&Value> = self
            .of_kind("Service")
            .into_iter()
            .filter(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(&wanted)))
            .collect();
        assert_eq!(all.len(), 1, "expected one {suffix} Service");
        all[0]
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn container(&self) -> &Value {
        let c = &self.deployment()["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], "operator");
        c
    }

    /// The operator container's env entries by name.
    fn env(&self) -> BTreeMap<String, Value> {
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
            .collect()
    }

    fn env_value(&self, name: &str) -> Option<String> {
        self.env().get(name).and_then(|e| e["value"].as_str().map(str::to_string))
    }

    fn args(&self) -> Vec<String> {
        self.container()["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    }

    /// Every RBAC rule, with the kind and namespace of its (Cluster)Role.
    fn rules(&self) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for role in self.objects.iter().filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole") {
            let ns = role["metadata"]["namespace"].as_str().unwrap_or("").to_string();
            for rule in role["rules"].as_array().unwrap() {
                out.push((role["kind"].as_str().unwrap().to_string(), ns.clone(), rule.clone()));
            }
        }
        out
    }

    /// Checks that hold for every values set: no Secrets, no wildcards, only the resources the operator uses.
    fn assert_least_privilege(&self, pods: bool) {
        let allowed: &[(&str, &str)] = &[
            ("bgjobs.dev", "backgroundjobs"),
            ("bgjobs.dev", "backgroundjobs/status"),
            ("bgjobs.dev", "recurringbackgroundjobs"),
            ("bgjobs.dev", "recurringbackgroundjobs/status"),
            ("coordination.k8s.io", "leases"),
            ("events.k8s.io", "events"),
            ("", "pods"),
            ("authorization.k8s.io", "localsubjectaccessreviews"),
        ];
        let mut saw_pods = false;
        for (kind, ns, rule) in self.rules() {
            let text = rule.to_string();
            assert!(!text.contains("secrets"), "{kind} {ns} mentions secrets: {text}");
            assert!(!text.contains('*'), "{kind} {ns} has a wildcard: {text}");
            assert!(rule.get("nonResourceURLs").is_none() && rule.get("resourceNames").is_none(), "{text}");
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    let pair = (group.as_str().unwrap(), resource.as_str().unwrap());
                    assert!(allowed.contains(&pair), "{kind} {ns} grants {pair:?}: {text}");
                    saw_pods |= pair.1 == "pods";
                }
            }
        }
        assert_eq!(saw_pods, pods, "pod permissions exactly when podMode.enabled");
    }
}

/// The verbs a rule list grants on `group/resource`.
fn verbs(rules: &[(String, String, Value)], group: &str, resource: &str) -> BTreeSet<String> {
    rules
        .iter()
        .filter(|(_, _, r)| {
            r["apiGroups"].as_array().unwrap().iter().any(|g| g == group)
                && r["resources"].as_array().unwrap().iter().any(|x| x == resource)
        })
        .flat_map(|(_, _, r)| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The rules of the jobs' (Cluster)Role: `recurring` is operator.recurringEnabled, `pods` podMode.enabled.
fn assert_job_rules(rules: &[(String, String, Value)], recurring: bool, pods: bool) {
    let mut job_verbs = set(&["get", "list", "watch", "delete"]);
    if recurring {
        job_verbs.extend(set(&["create", "patch"]));
    }
    assert_eq!(verbs(rules, "bgjobs.dev", "backgroundjobs"), job_verbs);
    assert_eq!(verbs(rules, "bgjobs.dev", "backgroundjobs/status"), set(&["get", "update"]));
    assert_eq!(verbs(rules, "bgjobs.dev", "recurringbackgroundjobs"), set(&["get", "list", "watch"]));
    let status = if recurring { set(&["get", "update"]) } else { BTreeSet::new() };
    assert_eq!(verbs(rules, "bgjobs.dev", "recurringbackgroundjobs/status"), status);
    assert_eq!(
        verbs(rules, "coordination.k8s.io", "leases"),
        set(&["get", "list", "watch", "create", "update", "delete"])
    );
    assert_eq!(verbs(rules, "events.k8s.io", "events"), set(&["create", "patch"]));
    let expected_pods = if pods { set(&["get", "list", "watch", "create", "delete"]) } else { BTreeSet::new() };
    assert_eq!(verbs(rules, "", "pods"), expected_pods);
}

// --- offline: lint, render, schema --------------------------------------------------------------------------------

#[test]
fn the_chart_lints_clean_with_defaults_and_with_every_flag_set() {
    let all_flags = repo().join("charts/bgjobs/ci/all-flags-values.yaml").display().to_string();
    let chart = chart();
    for extra in [vec![], vec!["-f", all_flags.as_str()]] {
        let mut args = vec!["lint", chart.as_str(), "--namespace", RELEASE_NS];
        args.extend(extra);
        let report = helm_ok(&args);
        assert_eq!(report["errors"], json!([]), "{report}");
        let serious: Vec<&Value> =
            report["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64() >= Some(2)).collect();
        assert!(serious.is_empty(), "lint warnings or errors: {serious:?}");
    }
}

#[test]
fn default_values_render_cluster_mode_rbac_and_a_probed_gracefully_terminating_deployment() {
    let r = render(json!({}));
    assert_eq!(
        r.kinds(),
        set(&[
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ])
    );
    r.assert_least_privilege(false);
    assert_job_rules(&r.rules(), true, false);
    assert_lease_role(&r, RELEASE_NS);

    let sa = r.one("ServiceAccount");
    let sa_name = sa["metadata"]["name"].as_str().unwrap();
    assert_eq!(sa["metadata"]["namespace"], RELEASE_NS);
    let crb = r.one("ClusterRoleBinding");
    assert_eq!(crb["subjects"], json!([{"kind": "ServiceAccount", "name": sa_name, "namespace": RELEASE_NS}]));
    assert_eq!(crb["roleRef"]["name"], r.one("ClusterRole")["metadata"]["name"]);
    assert!(
        crb["metadata"]["name"].as_str().unwrap().contains(RELEASE_NS),
        "cluster-scoped names carry the release namespace, so two releases never collide"
    );

    let d = r.deployment();
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(pod["serviceAccountName"], sa_name);
    assert_eq!(pod["terminationGracePeriodSeconds"], 25 + 10 + 5, "shutdownGrace + renewDeadline + 5 s");
    let c = r.container();
    assert_eq!(c["image"], "bgjobs:0.1.0", "the Dockerfile's image, tagged with the chart's appVersion");
    assert_eq!(r.args(), ["operator"]);
    assert_eq!(
        c["ports"],
        json!([
            {"name": "metrics", "containerPort": 8080, "protocol": "TCP"},
            {"name": "reports", "containerPort": 8090, "protocol": "TCP"}
        ])
    );
    // Every replica serves reports, behind one Service whose cluster DNS name is the URL handed to workers.
    let reports = r.service("reports");
    assert_eq!(reports["spec"]["ports"][0]["targetPort"], "reports");
    let reports_name = reports["metadata"]["name"].as_str().unwrap();
    assert_eq!(r.env_value("BGJOBS_REPORT_ADDR").as_deref(), Some("0.0.0.0:8090"));
    assert_eq!(
        r.env_value("BGJOBS_REPORT_URL"),
        Some(format!("http://{reports_name}.{RELEASE_NS}.svc:8090")),
        "the report Service's DNS name"
    );
    assert_eq!(c["livenessProbe"]["httpGet"], json!({"path": "/healthz", "port": "metrics"}));
    assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/readyz", "port": "metrics"}));
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["limits"]["memory"].is_string());
    let env = r.env();
    assert_eq!(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(r.env_value("BGJOBS_METRICS_ADDR").as_deref(), Some("0.0.0.0:8080"));
    assert!(!env.contains_key("BGJOBS_NAMESPACE"), "cluster mode watches every namespace");
    assert!(!env.contains_key("BGJOBS_IDENTITY"), "the identity defaults to POD_NAME");

    let labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&d["spec"]["selector"]["matchLabels"], labels);
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["podAffinityTerm"]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&anti["podAffinityTerm"]["labelSelector"]["matchLabels"], labels);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);

    for (svc, port) in [(r.service("metrics"), "metrics"), (r.service("reports"), "reports")] {
        assert_eq!(&svc["spec"]["selector"], labels);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], port);
    }
    let pdb = r.one("PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    for expected in ["kubectl create", "kind: BackgroundJob", "bgjobs enqueue", "kubectl get bgj", "describe bgj"] {
        assert!(r.notes.contains(expected), "NOTES.txt lacks {expected:?}:\n{}", r.notes);
    }
}

#[test]
fn the_dockerfile_builds_the_default_image_and_runs_as_the_charts_non_root_user() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("a Dockerfile at the repository root");
    let r = render(json!({}));
    let uid = r.deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"].as_i64().unwrap();
    for expected in [
        "FROM rust:".to_string(),
        "FROM debian:bookworm-slim".to_string(),
        "cargo build --release --locked".to_string(),
        format!("USER {uid}:{uid}"),
        r#"ENTRYPOINT ["/usr/local/bin/bgjobs"]"#.to_string(),
    ] {
        assert!(dockerfile.contains(&expected), "Dockerfile lacks {expected:?}");
    }
}

/// The image builds `bgjobs` alone, but cargo reads every workspace member's manifest first: a member the Dockerfile
/// does not copy breaks `docker build` with "failed to load manifest for workspace member".
#[test]
fn the_dockerfile_copies_the_manifest_of_every_workspace_member() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("a Dockerfile at the repository root");
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = std::fs::canonicalize(repo()).unwrap();
    let members: Vec<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["manifest_path"].as_str().unwrap())
        .map(|m| std::path::Path::new(m).strip_prefix(&root).unwrap().display().to_string())
        .filter(|m| m != "Cargo.toml")
        .collect();
    assert!(members.len() >= 3, "the dev-tool members: {members:?}");
    for manifest in members {
        let dir = manifest.trim_end_matches("Cargo.toml");
        assert!(dockerfile.contains(&format!("COPY {manifest} {dir}")), "the Dockerfile does not copy {manifest}");
    }
}

/// The Role (and binding) for the cluster-wide Leases: Leases only, in the lease namespace only.
fn assert_lease_role(r: &Rendered, lease_ns: &str) {
    let roles: Vec<&Value> = r
        .of_kind("Role")
        .into_iter()
        .filter(|o| o["metadata"]["name"].as_str().unwrap().ends_with("-leases"))
        .collect();
    assert_eq!(roles.len(), 1, "one Lease Role: {:?}", r.kinds());
    assert_eq!(roles[0]["metadata"]["namespace"], lease_ns);
    assert_eq!(
        roles[0]["rules"],
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "list", "watch", "create", "update", "delete"]}])
    );
    let binding = r
        .of_kind("RoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"] == roles[0]["metadata"]["name"])
        .expect("a RoleBinding for the Lease Role");
    assert_eq!(binding["metadata"]["namespace"], lease_ns);
    assert_eq!(binding["subjects"][0]["namespace"], RELEASE_NS);
}

#[test]
fn namespace_mode_renders_roles_in_the_watched_namespace_and_no_cluster_role() {
    let r = render(json!({"watchNamespace": "team-a"}));
    assert!(r.of_kind("ClusterRole").is_empty() && r.of_kind("ClusterRoleBinding").is_empty(), "{:?}", r.kinds());
    let roles = r.of_kind("Role");
    let role = roles.iter().find(|o| o["metadata"]["namespace"] == "team-a").expect("a Role in the watched namespace");
    let bindings = r.of_kind("RoleBinding");
    let binding = bindings.iter().find(|b| b["metadata"]["namespace"] == "team-a").expect("a RoleBinding there");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]})
    );
    assert_eq!(binding["subjects"][0]["namespace"], RELEASE_NS, "the ServiceAccount lives in the release namespace");
    assert_eq!(r.env_value("BGJOBS_NAMESPACE").as_deref(), Some("team-a"));
    r.assert_least_privilege(false);
    let job_rules: Vec<_> = r.rules().into_iter().filter(|(_, ns, _)| ns == "team-a").collect();
    assert_job_rules(&job_rules, true, false);
    // Member Leases, the exclusive Lease and cluster slots live in the lease namespace: a Role for Leases there.
    assert_eq!(roles.len(), 2, "the jobs' Role and the Lease Role");
    assert_lease_role(&r, RELEASE_NS);

    let elsewhere = render(json!({"watchNamespace": "team-a", "operator": {"leaseNamespace": "locks"}}));
    assert_lease_role(&elsewhere, "locks");
    assert!(elsewhere.args().contains(&"--lease-namespace=locks".to_string()), "{:?}", elsewhere.args());
}

#[test]
fn recurring_permissions_exist_only_with_recurring_enabled() {
    for watch in ["", "team-a"] {
        let off = render(json!({"watchNamespace": watch, "operator": {"recurringEnabled": false}}));
        off.assert_least_privilege(false);
        assert_job_rules(&off.rules(), false, false);
        assert_eq!(off.env_value("BGJOBS_RECURRING_ENABLED").as_deref(), Some("false"));
        let on = render(json!({"watchNamespace": watch}));
        assert_job_rules(&on.rules(), true, false);
    }
}

#[test]
fn pod_permissions_exist_only_with_pod_mode() {
    for watch in ["", "team-a"] {
        let off = render(json!({"watchNamespace": watch}));
        off.assert_least_privilege(false);
        let on = render(json!({"watchNamespace": watch, "podMode": {"enabled": true}}));
        on.assert_least_privilege(true);
        assert_job_rules(&on.rules(), true, true);
    }
}

#[test]
fn the_admission_webhook_and_the_creator_check_render_only_when_enabled() {
    let off = render(json!({}));
    for kind in ["MutatingWebhookConfiguration", "Secret"] {
        assert!(off.of_kind(kind).is_empty(), "{kind} rendered by default");
    }
    assert_eq!(off.env_value("BGJOBS_POD_CREATOR_CHECK").as_deref(), Some("off"));
    assert!(off.env_value("BGJOBS_ADMISSION_ADDR").is_none());
    assert!(verbs(&off.rules(), "authorization.k8s.io", "localsubjectaccessreviews").is_empty());

    for watch in ["", "team-a"] {
        let on = render(json!({"watchNamespace": watch, "podMode": {"enabled": true},
            "operator": {"podCreatorCheck": "required"}, "admissionWebhook": {"enabled": true}}));
        on.assert_least_privilege(true);
        assert_eq!(verbs(&on.rules(), "authorization.k8s.io", "localsubjectaccessreviews"), set(&["create"]));
        let hook = &on.one("MutatingWebhookConfiguration")["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Fail");
        let service = on.of_kind("Service").into_iter().find(|s| s["spec"]["ports"][0]["name"] == "webhook").unwrap();
        assert_eq!(hook["clientConfig"]["service"]["name"], service["metadata"]["name"]);
        assert_eq!(hook["clientConfig"]["service"]["path"], bgjobs::admission::PATH);
        assert_eq!(hook["rules"][0]["operations"], json!(["CREATE", "UPDATE"]));
        assert_eq!(hook["rules"][0]["resources"], json!(["backgroundjobs", "recurringbackgroundjobs"]));
        // The caBundle is the CA of the generated Secret, which the Deployment mounts where the flag points.
        let secret = on.one("Secret");
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(hook["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
        let pod = &on.deployment()["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["secret"]["secretName"], secret["metadata"]["name"]);
        assert_eq!(
            on.env_value("BGJOBS_ADMISSION_CERT_DIR").as_deref(),
            pod["containers"][0]["volumeMounts"][0]["mountPath"].as_str()
        );
        assert_eq!(on.env_value("BGJOBS_ADMISSION_ADDR").as_deref(), Some("0.0.0.0:9443"));
        let selector = &hook["namespaceSelector"]["matchExpressions"][0];
        match watch {
            "" => assert!(hook.get("namespaceSelector").is_none(), "cluster mode: every namespace"),
            ns => assert_eq!(
                (selector["key"].as_str(), &selector["values"]),
                (Some("kubernetes.io/metadata.name"), &json!([ns]))
            ),
        }
    }

    // A Secret of your own (e.g. cert-manager's): the chart creates none and mounts that one.
    let own = render(json!({"admissionWebhook": {"enabled": true,
        "certificate": {"generate": false, "secretName": "webhook-cert"},
        "annotations": {"cert-manager.io/inject-ca-from": "bgjobs-system/webhook-cert"}}}));
    assert!(own.of_kind("Secret").is_empty());
    assert_eq!(own.deployment()["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"], "webhook-cert");
    assert!(own.one("MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"].get("caBundle").is_none());
}

#[test]
fn autoscaling_renders_an_hpa_on_cpu_by_default_or_on_queue_depth() {
    let r = render(json!({}));
    assert!(r.of_kind("HorizontalPodAutoscaler").is_empty());

    let cpu = render(json!({"autoscaling": {"enabled": true}}));
    let hpa = cpu.one("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], cpu.deployment()["metadata"]["name"]);
    assert_eq!((hpa["spec"]["minReplicas"].clone(), hpa["spec"]["maxReplicas"].clone()), (json!(2), json!(10)));
    assert_eq!(
        hpa["spec"]["metrics"],
        json!([{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}])
    );
    assert!(cpu.deployment()["spec"].get("replicas").is_none(), "the HPA owns the replica count");

    let queue = render(json!({"autoscaling": {"enabled": true, "cpu": {"enabled": false},
        "queueDepth": {"enabled": true, "selector": {"queue": "default"}, "targetAverageValue": 20}}}));
    let hpa = queue.one("HorizontalPodAutoscaler");
    assert_eq!(
        hpa["spec"]["metrics"],
        json!([{"type": "External", "external": {
            "metric": {"name": "bgjobs_queue_depth", "selector": {"matchLabels": {"queue": "default"}}},
            "target": {"type": "AverageValue", "averageValue": "20"}}}])
    );
    let both = render(json!({"autoscaling": {"enabled": true, "queueDepth": {"enabled": true}}}));
    let types: Vec<&Value> =
        both.one("HorizontalPodAutoscaler")["spec"]["metrics"].as_array().unwrap().iter().map(|m| &m["type"]).collect();
    assert_eq!(types, [&json!("Resource"), &json!("External")]);
}

#[test]
fn the_service_monitor_is_optional_and_scrapes_the_metrics_service() {
    assert!(render(json!({})).of_kind("ServiceMonitor").is_empty());
    let r = render(json!({"metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}}}));
    let sm = r.one("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let svc = r.service("metrics");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "the ServiceMonitor selects the metrics Service");
    }
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"], json!([RELEASE_NS]));
    assert_eq!(sm["spec"]["endpoints"][0]["port"], svc["spec"]["ports"][0]["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
}

#[test]
fn the_termination_grace_period_covers_the_shutdown_grace_and_the_hand_back() {
    let grace = |values: Value| {
        render(values).deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap()
    };
    assert_eq!(grace(json!({"operator": {"shutdownGrace": "60s"}})), 60 + 10 + 5);
    assert_eq!(grace(json!({"operator": {"shutdownGrace": "2m", "renewDeadline": "8s"}})), 120 + 8 + 5);
    assert_eq!(
        grace(json!({"operator": {"shutdownGrace": "1500ms", "renewDeadline": "2500ms",
        "renewInterval": "500ms", "leaseDuration": 4}})),
        2 + 3 + 5
    );
    assert_eq!(grace(json!({"terminationGracePeriodSeconds": 300})), 300);
}

#[test]
fn bad_values_fail_with_a_message_that_names_the_value() {
    let cases: Vec<(Value, &[&str])> = vec![
        (json!({"operator": {"strategy": "both"}}), &["/operator/strategy", "parallel", "exclusive"]),
        (
            json!({"operator": {"maxConcurrentJobsPerInstance": 0}}),
            &["/operator/maxConcurrentJobsPerInstance", "minimum"],
        ),
        (json!({"operator": {"clusterMaxConcurrency": -2}}), &["/operator/clusterMaxConcurrency", "minimum"]),
        (json!({"operator": {"leaseDuration": "15 seconds"}}), &["/operator/leaseDuration", "pattern"]),
        (json!({"operator": {"logFormat": "xml"}}), &["/operator/logFormat", "text", "json"]),
        (json!({"operator": {"queues": "a,b"}}), &["/operator/queues", "array"]),
        (json!({"operator": {"jobExecutionEnabled": "yes"}}), &["/operator/jobExecutionEnabled", "boolean"]),
        (json!({"operator": {"maxConcurentJobs": 3}}), &["additional properties", "maxConcurentJobs"]),
        (json!({"replicas": 3}), &["additional properties", "replicas"]),
        (json!({"watchNamespace": "Team_A"}), &["/watchNamespace", "pattern"]),
        (json!({"metrics": {"port": 70000}}), &["/metrics/port", "maximum"]),
        (json!({"image": {"repository": ""}}), &["/image/repository"]),
        (json!({"podAntiAffinity": "sometimes"}), &["/podAntiAffinity", "soft", "hard"]),
        (
            json!({"operator": {"renewDeadline": "20s"}}),
            &["operator.renewDeadline (20s) must be shorter than operator.leaseDuration (15s)"],
        ),
        (
            json!({"operator": {"renewInterval": "10s"}}),
            &["operator.renewInterval (10s) must be shorter than operator.renewDeadline (10s)"],
        ),
        (
            json!({"terminationGracePeriodSeconds": 30}),
            &["terminationGracePeriodSeconds (30)", "shutdownGrace + operator.renewDeadline (35 s)"],
        ),
        (json!({"operator": {"identity": "worker"}}), &["operator.identity \"worker\"", "$(POD_NAME)"]),
        (json!({"autoscaling": {"enabled": true, "cpu": {"enabled": false}}}), &["autoscaling.enabled needs a metric"]),
        (json!({"autoscaling": {"enabled": true}, "resources": {"requests": null}}), &["resources.requests.cpu"]),
        (json!({"podDisruptionBudget": {"minAvailable": 1}}), &["maxUnavailable or minAvailable, not both"]),
        (
            json!({"metrics": {"service": {"enabled": false}, "serviceMonitor": {"enabled": true}}}),
            &["metrics.service.enabled"],
        ),
        (json!({"operator": {"podCreatorCheck": "always"}}), &["/operator/podCreatorCheck", "if-recorded"]),
        (json!({"operator": {"podCreatorCheck": "required"}}), &["needs admissionWebhook.enabled"]),
        (
            json!({"operator": {"podCreatorCheck": "if-recorded"},
                   "admissionWebhook": {"enabled": true, "failurePolicy": "Ignore"}}),
            &["needs admissionWebhook.failurePolicy Fail"],
        ),
        (
            json!({"operator": {"podCreatorCheck": "required"},
                   "admissionWebhook": {"enabled": true, "namespaceSelector": {"matchLabels": {"team": "a"}}}}),
            &["operator.podCreatorCheck \"required\" with admissionWebhook.namespaceSelector", "watchNamespace"],
        ),
        (
            json!({"admissionWebhook": {"enabled": true, "certificate": {"generate": false}}}),
            &["admissionWebhook.certificate.secretName"],
        ),
    ];
    for (values, expected) in cases {
        let message = render_error(values.clone());
        for e in expected {
            assert!(message.contains(e), "values {values}: expected {e:?} in the message: {message}");
        }
    }
}

// --- every flag reachable --------------------------------------------------------------------------------------------

/// `--flag` (without dashes) and its env var, from `bgjobs operator --help`.
fn operator_flags() -> Vec<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_bgjobs")).args(["operator", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        let is_flag = t.starts_with("--") || (t.starts_with('-') && t.get(2..5) == Some(", -"));
        if is_flag && let Some(long) = t.split_whitespace().find(|w| w.starts_with("--")) {
            flags.push((long.trim_start_matches("--").trim_end_matches(',').to_string(), None));
        } else if let Some(rest) = t.strip_prefix("[env: ") {
            let name = rest.split('=').next().unwrap().to_string();
            flags.last_mut().expect("an env line belongs to a flag").1 = Some(name);
        }
    }
    let flags: Vec<(String, String)> = flags
        .into_iter()
        .filter(|(f, _)| f != "help")
        .map(|(f, env)| {
            let env = env.unwrap_or_else(|| panic!("--{f} has no env var: every operator flag needs one"));
            (f, env)
        })
        .collect();
    assert!(flags.len() >= 17, "parsed too few flags from --help: {flags:?}\n{help}");
    flags
}

/// Where a flag lives in values.yaml.
fn value_path(flag: &str) -> String {
    match flag {
        "namespace" => "watchNamespace".into(),
        "metrics-addr" => "metrics.port".into(),
        "admission-addr" => "admissionWebhook.port".into(),
        "admission-cert-dir" => "admissionWebhook.certDir".into(),
        "report-addr" => "reports.port".into(),
        "report-url" => "reports.url".into(),
        f => {
            let mut out = String::from("operator.");
            let mut upper = false;
            for ch in f.chars() {
                match (ch, upper) {
                    ('-', _) => upper = true,
                    (c, true) => {
                        out.extend(c.to_uppercase());
                        upper = false
                    }
                    (c, false) => out.push(c),
                }
            }
            out
        }
    }
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

/// A value as the container sees it.
fn as_flag_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(as_flag_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

#[test]
fn every_operator_flag_is_reachable_through_values_and_documented() {
    let flags = operator_flags();
    let defaults = helm_ok(&["values", &chart()]);
    let ci_file = repo().join("charts/bgjobs/ci/all-flags-values.yaml");
    let all_set: Value = serde_yaml::from_str(&std::fs::read_to_string(&ci_file).unwrap()).unwrap();
    let rendered = render_args(&["-f", &ci_file.display().to_string()]);
    let (env, args) = (rendered.env(), rendered.args());
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let reference = readme
        .split("## Configuration reference")
        .nth(1)
        .expect("README.md has a \"## Configuration reference\" section")
        .split("\n## ")
        .next()
        .unwrap();

    let mut missing = Vec::new();
    for (flag, env_name) in &flags {
        let path = value_path(flag);
        if at(&defaults, &path).is_none() {
            missing.push(format!("--{flag}: no `{path}` in charts/bgjobs/values.yaml"));
            continue;
        }
        let Some(value) = at(&all_set, &path).filter(|v| !v.is_null()) else {
            missing.push(format!("--{flag}: `{path}` is not set in {}", ci_file.display()));
            continue;
        };
        let text = as_flag_text(value);
        let in_env = env.get(env_name).and_then(|e| e["value"].as_str()).is_some_and(|v| v.contains(&text));
        let in_args = args.iter().any(|a| a == &format!("--{flag}={text}"));
        if !in_env && !in_args {
            missing.push(format!("--{flag}: `{path}: {text}` reaches neither {env_name} nor the container's args"));
        }
        for needle in [format!("`--{flag}"), format!("`{env_name}`"), format!("`{path}`")] {
            if !reference.contains(&needle) {
                missing.push(format!("--{flag}: README's Configuration reference does not mention {needle}"));
            }
        }
    }
    // And no value for a flag that does not exist (any more).
    let known: BTreeSet<String> = flags.iter().map(|(f, _)| value_path(f)).collect();
    for key in defaults["operator"].as_object().unwrap().keys() {
        let path = format!("operator.{key}");
        if !key.starts_with("extra") && !known.contains(&path) {
            missing.push(format!("`{path}` in values.yaml matches no flag of `bgjobs operator --help`"));
        }
    }
    assert!(missing.is_empty(), "\n{}\n", missing.join("\n"));

    // The binary accepts what the chart renders: run it as the Pod would (downward API values filled in), with no
    // cluster to reach. A flag the parser rejected would exit 2 with a usage message before trying to connect.
    let scratch = repo().join("target/test-runs").join(format!("all-flags-{}", common::unique()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bgjobs"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("HOME", &scratch);
    cmd.env("KUBECONFIG", scratch.join("no-such-kubeconfig"));
    for (name, value) in container_env(&rendered, "bgjobs-abc12", "bgjobs-system") {
        cmd.env(name, value);
    }
    cmd.args(&args).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the operator should parse every rendered flag and fail to connect: {stderr}"
    );
    assert!(stderr.contains("bgjobs: ") && !stderr.contains("Usage:"), "{stderr}");
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd.spawn().expect("start bgjobs");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("bgjobs did not exit within {timeout:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The operator container's environment as the kubelet would set it: downward API values for the Pod's name and
/// namespace, and `$(VAR)` references to earlier variables expanded.
fn container_env(r: &Rendered, pod: &str, namespace: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in r.container()["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => out.iter().fold(v.to_string(), |v, (k, x)| v.replace(&format!("$({k})"), x)),
            (None, Some("metadata.name")) => pod.to_string(),
            (None, Some("metadata.namespace")) => namespace.to_string(),
            _ => panic!("unexpected env entry {e}"),
        };
        out.push((name, value));
    }
    out
}

#[test]
fn the_charts_crds_are_the_repositorys_crds() {
    let in_chart = helm_ok(&["crds", &chart()]);
    let in_chart: BTreeMap<String, String> = in_chart
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let file = c["name"].as_str().unwrap().trim_start_matches("crds/").to_string();
            (file, c["data"].as_str().unwrap().to_string())
        })
        .collect();
    let mut in_repo = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("crds")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        in_repo.insert(name, std::fs::read_to_string(entry.path()).unwrap());
    }
    assert_eq!(in_chart.keys().collect::<Vec<_>>(), in_repo.keys().collect::<Vec<_>>(), "the same CRD files");
    for (name, data) in &in_repo {
        assert!(&in_chart[name] == data, "charts/bgjobs/crds/{name} differs from crds/{name} (it should be a symlink)");
    }
}

// --- on the local control plane ------------------------------------------------------------------------------------

/// A release that is uninstalled when dropped (the CRD stays: Helm never deletes crds/).
struct Release {
    name: String,
    namespace: String,
}

impl Release {
    fn install(name: &str, namespace: &str, values: &Value, dir: &Path) -> (Release, Vec<Value>) {
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

    fn upgrade(&self, values: &Value) -> Vec<Value> {
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

    fn uninstall(&self) {
        helm_ok(&["uninstall", "--name", &self.name, "--namespace", &self.namespace]);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = helm(&["uninstall", "--name", &self.name, "--namespace", &self.namespace]);
    }
}

/// The names of the chart's CRDs.
fn chart_crd_names() -> Vec<String> {
    helm_ok(&["crds", &chart()])
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| objects(c["data"].as_str().unwrap()))
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Each chart CRD's name, UID and generation (a re-created or changed CRD would differ); all must be Established.
async fn crd_identity(client: &Client) -> Vec<(String, String, i64)> {
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
fn assert_cluster_runs_the_charts_crds(dir: &Path) {
    let docs: Vec<String> = helm_ok(&["crds", &chart()])
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["data"].as_str().unwrap().to_string())
        .collect();
    let file = dir.join("chart-crds.yaml");
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &common::kubeconfig_path().display().to_string()])
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
fn field_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
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
async fn release_helm_crd_ownership(client: &Client) {
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

/// Every object of a release exists in the cluster (`kubectl get -f`).
fn assert_all_exist(manifest: &[Value], dir: &Path) {
    let file = dir.join("release-manifest.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": manifest});
    std::fs::write(&file, list.to_string()).unwrap();
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &common::kubeconfig_path().display().to_string(), "get", "-f"])
        .arg(&file)
        .args(["-o", "name"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubectl get -f: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().count(), manifest.len(), "every object of the release exists:\n{stdout}");
}

/// A kubeconfig for the same apiserver (and CA) as the admin's, authenticated by a token of `sa` in `namespace`.
/// A kubeconfig that authenticates as the ServiceAccount the installed chart's Deployment runs with.
fn chart_service_account_kubeconfig(manifest: &[Value], namespace: &str, dir: &Path) -> PathBuf {
    let sa = release_deployment(manifest).deployment()["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("the Deployment names its ServiceAccount")
        .to_string();
    common::service_account_kubeconfig(&sa, namespace, dir)
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    vars.retain(|(k, _)| k != "BGJOBS_METRICS_ADDR");
    vars.push(("BGJOBS_METRICS_ADDR".into(), format!("127.0.0.1:{port}")));
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

fn job(name: &str, spec: Value) -> BackgroundJob {
    BackgroundJob::new(name, serde_json::from_value(spec).unwrap())
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
        // Objects the apiserver must accept too: HPA on CPU and queue depth (v2beta2 on 1.20), PDB (v1beta1).
        "autoscaling": {"enabled": true, "queueDepth": {"enabled": true, "selector": {"queue": queue}}},
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

    let kubeconfig = chart_service_account_kubeconfig(&manifest, &rel.ns, &rel.dir);
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
    let values = json!({"operator": {"queues": [queue], "recurringEnabled": false, "events": "all"}});
    let (release, manifest) = Release::install("bgjobs", &rel.ns, &values, &rel.dir);
    assert_all_exist(&manifest, &rel.dir);
    let cluster_role = manifest.iter().find(|o| o["kind"] == "ClusterRole").expect("cluster mode: a ClusterRole");
    let cluster_role_name = cluster_role["metadata"]["name"].as_str().unwrap().to_string();
    release_helm_crd_ownership(&admin).await;
    assert_eq!(crd_identity(&admin).await, crd_before, "installing the chart left the shared CRDs as they were");

    let kubeconfig = chart_service_account_kubeconfig(&manifest, &rel.ns, &rel.dir);
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
    // it on cancellation. No kubelet runs Pods here, so the test plays the kubelet and reports one Pod finished.
    let replica = chart_replica(&rel, &upgraded, "chart-pods", &rel.ns, kubeconfig.clone(), true).await;
    let template = json!({"spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}]}});
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
