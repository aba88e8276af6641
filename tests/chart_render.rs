//! The Helm chart (`charts/bgjobs`) offline, through the real Helm v4 engine (`e2e/helm.py`, PyPI helm-python-sdk):
//! lint, render with several values sets, schema and template checks on bad values, every operator flag reachable
//! through values and documented, the chart's CRDs against the repository's, and the Dockerfile. No control plane:
//! `make unit` runs these (the installs are in `tests/chart_install.rs`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::chart::*;
use serde_json::{Value, json};

// --- offline: lint, render, schema --------------------------------------------------------------------------------

#[test]
fn the_chart_lints_clean_with_defaults_and_with_every_flag_set() {
    let all_flags = common::repo_root().join("charts/bgjobs/ci/all-flags-values.yaml").display().to_string();
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
    let crds = verbs(&r.rules(), "apiextensions.k8s.io", "customresourcedefinitions");
    assert_eq!(crds, set(&["get"]), "the operator reads its CRDs at start, to refuse older ones");

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
    let dockerfile =
        std::fs::read_to_string(common::repo_root().join("Dockerfile")).expect("a Dockerfile at the repository root");
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
    let dockerfile =
        std::fs::read_to_string(common::repo_root().join("Dockerfile")).expect("a Dockerfile at the repository root");
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(common::repo_root())
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = std::fs::canonicalize(common::repo_root()).unwrap();
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

/// tests/ is a package whose test targets are listed by hand (its root is tests/, so cargo would look for them in
/// tests/tests/): a test file missing from tests/Cargo.toml would never be built, linted or run, and nothing else
/// would say so.
#[test]
fn every_test_file_is_a_test_target_of_the_tests_package() {
    let tests = common::repo_root().join("tests");
    let manifest = std::fs::read_to_string(tests.join("Cargo.toml")).unwrap();
    let listed: BTreeSet<String> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path = \"")?.strip_suffix('"').map(str::to_string))
        .collect();
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(&tests).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".rs") {
            files.insert(name);
        } else if entry.path().join("main.rs").exists() {
            files.insert(format!("{name}/main.rs"));
        }
    }
    assert!(files.len() >= 19, "{files:?}");
    assert_eq!(files, listed, "tests/Cargo.toml must list every test file as a [[test]] (and nothing else)");
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
        // Routed to Ready replicas only: a starting, crash-looping or hung one would refuse the calls routed to it.
        assert!(service["spec"].get("publishNotReadyAddresses").is_none());
        assert_eq!(hook["clientConfig"]["service"]["name"], service["metadata"]["name"]);
        assert_eq!(hook["clientConfig"]["service"]["path"], bgjobs::wire::ADMISSION_PATH);
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
    // Scaled down a replica a minute by default (each hands its running jobs back), unless told otherwise.
    let policies = &cpu.one("HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"]["policies"];
    assert_eq!(policies, &json!([{"type": "Pods", "value": 1, "periodSeconds": 60}]));
    // Helm merges a behavior of one's own into the default: `scaleDown: null` drops the default policy.
    let own = render(json!({"autoscaling": {"enabled": true,
        "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}, "scaleDown": null}}}));
    assert_eq!(
        own.one("HorizontalPodAutoscaler")["spec"]["behavior"],
        json!({"scaleUp": {"stabilizationWindowSeconds": 0}})
    );
}

/// The NetworkPolicy is optional; on, it selects the operator's Pods, lets only their own ports in (metrics and
/// reports each from the peers given for it, the webhook from anyone: the apiserver's address is not known), and
/// restricts egress only when rules are given. Before, one list of peers covered metrics and reports together, so a
/// policy that let Prometheus in shut the workers' reports out.
#[test]
fn the_network_policy_admits_only_the_operators_ports_and_restricts_egress_only_when_asked() {
    assert!(render(json!({})).of_kind("NetworkPolicy").is_empty());
    let peers = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]);
    let egress = json!([{"ports": [{"port": 53, "protocol": "UDP"}]}]);
    let workers = json!([{"namespaceSelector": {"matchLabels": {"bgjobs.dev/jobs": "true"}}}]);
    let r = render(json!({"networkPolicy": {"enabled": true, "ingressFrom": peers, "reportsFrom": workers,
        "egress": egress}, "admissionWebhook": {"enabled": true}}));
    let policy = r.one("NetworkPolicy");
    let pods = &r.deployment()["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policy["spec"]["podSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pods[k], v, "selects the operator's Pods");
    }
    let ports: Vec<String> = r.deployment()["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    let named = |rule: &Value| -> Vec<String> {
        rule["ports"].as_array().unwrap().iter().map(|p| p["port"].as_str().unwrap().to_string()).collect()
    };
    // Apart: metrics are scraped from one place, workers report from the jobs' namespaces.
    assert_eq!((named(&ingress[0]), &ingress[0]["from"]), (vec!["metrics".to_string()], &peers));
    assert_eq!((named(&ingress[1]), &ingress[1]["from"]), (vec!["reports".to_string()], &workers));
    assert_eq!((named(&ingress[2]), ingress[2].get("from")), (vec!["webhook".to_string()], None));
    for rule in ingress {
        assert!(named(rule).iter().all(|p| ports.contains(p)), "a port the container names: {ports:?}");
    }
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(policy["spec"]["egress"], egress);
    let open = render(json!({"networkPolicy": {"enabled": true}}));
    let policy = open.one("NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]), "no egress rules: egress unrestricted");
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "no webhook port without the webhook");
    assert!(ingress.iter().all(|rule| rule.get("from").is_none()), "anyone, when no peers are given");
}

/// Every Service's name is a DNS label (at most 63 characters), and no two come out the same, however long the
/// release's full name: the full name gives way, never the suffix.
#[test]
fn service_names_fit_a_dns_label_and_stay_apart_with_the_longest_full_name() {
    let long = format!("r{}", "e".repeat(62));
    let r = render(json!({"fullnameOverride": long, "admissionWebhook": {"enabled": true}}));
    let names: Vec<String> =
        r.of_kind("Service").iter().map(|s| s["metadata"]["name"].as_str().unwrap().to_string()).collect();
    assert!(names.len() >= 3, "{names:?}");
    for name in &names {
        assert!(name.len() <= 63 && !name.contains("--"), "{name} ({} characters)", name.len());
    }
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), names.len(), "{names:?}");
    for suffix in ["-metrics", "-webhook", "-reports"] {
        assert!(names.iter().any(|n| n.ends_with(suffix)), "no Service ends with {suffix}: {names:?}");
    }
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
    // And only it: not the reports or webhook Services, which carry the release's labels too.
    let with_all =
        render(json!({"metrics": {"serviceMonitor": {"enabled": true}}, "admissionWebhook": {"enabled": true}}));
    let selector = with_all.one("ServiceMonitor")["spec"]["selector"]["matchLabels"].clone();
    let selected: Vec<&Value> = with_all
        .of_kind("Service")
        .into_iter()
        .filter(|s| selector.as_object().unwrap().iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(selected.len(), 1, "{selected:?}");
    assert_eq!(selected[0]["spec"]["ports"][0]["name"], "metrics");
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
    // Leading zeros are decimal, as the operator reads them (Helm's int64 alone reads "0600" as octal 384).
    assert_eq!(grace(json!({"operator": {"shutdownGrace": "0600s", "renewDeadline": "010s"}})), 600 + 10 + 5);
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
        // One replica too: a rollout runs the old and the new Pod side by side.
        (json!({"replicaCount": 1, "operator": {"identity": "worker"}}), &["operator.identity \"worker\"", "rollout"]),
        (
            json!({"operator": {"strategy": "exclusive", "queues": ["fast"]}}),
            &["operator.strategy exclusive", "operator.queues"],
        ),
        (json!({"operator": {"renewInterval": "0s"}}), &["operator.renewInterval (0s) must be longer than 0"]),
        (json!({"serviceAccount": {"create": false}}), &["serviceAccount.name"]),
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
        (
            json!({"admissionWebhook": {"enabled": true, "certificate": {"generate": false, "secretName": "cert"}}}),
            &["admissionWebhook.certificate.caBundle", "cert-manager.io/inject-ca-from"],
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
    let out = Command::new(common::bgjobs_bin()).args(["operator", "--help"]).output().unwrap();
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
    let ci_file = common::repo_root().join("charts/bgjobs/ci/all-flags-values.yaml");
    let all_set: Value = serde_yaml::from_str(&std::fs::read_to_string(&ci_file).unwrap()).unwrap();
    let rendered = render_args(&["-f", &ci_file.display().to_string()]);
    let (env, args) = (rendered.env(), rendered.args());
    let reference =
        std::fs::read_to_string(common::repo_root().join("docs/configuration.md")).expect("docs/configuration.md");

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
                missing.push(format!("--{flag}: docs/configuration.md does not mention {needle}"));
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
    let scratch = common::repo_root().join("target/test-runs").join(format!("all-flags-{}", common::unique()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut cmd = Command::new(common::bgjobs_bin());
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
    // Failing for want of a cluster, not on a combination of values it refuses (which also exits 1).
    assert!(stderr.contains("cannot load Kubernetes client configuration") && !stderr.contains("Usage:"), "{stderr}");

    // The one value the file leaves at its default, because it cannot go with `operator.queues`.
    let exclusive = render(json!({"operator": {"strategy": "exclusive"}}));
    assert_eq!(exclusive.env_value("BGJOBS_STRATEGY").as_deref(), Some("exclusive"));
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
    for entry in std::fs::read_dir(common::repo_root().join("crds")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        in_repo.insert(name, std::fs::read_to_string(entry.path()).unwrap());
    }
    assert_eq!(in_chart.keys().collect::<Vec<_>>(), in_repo.keys().collect::<Vec<_>>(), "the same CRD files");
    for (name, data) in &in_repo {
        assert!(&in_chart[name] == data, "charts/bgjobs/crds/{name} differs from crds/{name} (it should be a symlink)");
    }
}
