//! The Helm chart through the real Helm v4 engine (`e2e/helm.py`): rendering and reading what it rendered, for the
//! offline chart tests (`tests/chart_render.rs`) and the installs on the local control plane
//! (`tests/chart_install.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

pub const CRD: &str = "backgroundjobs.bgjobs.dev";
pub const MINUTE: Duration = Duration::from_secs(60);

pub fn chart() -> String {
    super::repo_root().join("charts/bgjobs").display().to_string()
}

/// Run `e2e/helm.py ARGS`: stdout, or (exit code, stderr).
pub fn helm(args: &[&str]) -> Result<String, (i32, String)> {
    let out = Command::new("python3")
        .arg(super::repo_root().join("e2e/helm.py"))
        .args(args)
        .env("KUBECONFIG", super::kubeconfig_path())
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

pub fn helm_ok(args: &[&str]) -> Value {
    let out = helm(args).unwrap_or_else(|(code, err)| panic!("e2e/helm.py {args:?} failed ({code}): {err}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("e2e/helm.py {args:?} printed no JSON ({e}): {out}"))
}

/// Every object of a multi-document YAML text.
pub fn objects(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of a render or a release.
pub struct Rendered {
    /// Every rendered object.
    pub objects: Vec<Value>,
    /// NOTES.txt as rendered.
    pub notes: String,
}

pub const RELEASE: &str = "rel";
pub const RELEASE_NS: &str = "bgjobs-system";

pub fn render(values: Value) -> Rendered {
    render_args(&["--values-json", &values.to_string()])
}

pub fn render_args(extra: &[&str]) -> Rendered {
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
pub fn render_error(values: Value) -> String {
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
    pub fn kinds(&self) -> BTreeSet<String> {
        self.objects.iter().map(|o| o["kind"].as_str().unwrap().to_string()).collect()
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    pub fn one(&self, kind: &str) -> &Value {
        let all = self.of_kind(kind);
        assert_eq!(all.len(), 1, "expected one {kind}, got {}: {:?}", all.len(), self.kinds());
        all[0]
    }

    /// The Service whose name ends in `-<suffix>` (`metrics`, `reports`).
    pub fn service(&self, suffix: &str) -> &Value {
        let wanted = format!("-{suffix}");
        let all: Vec<&Value> = self
            .of_kind("Service")
            .into_iter()
            .filter(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(&wanted)))
            .collect();
        assert_eq!(all.len(), 1, "expected one {suffix} Service");
        all[0]
    }

    pub fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    pub fn container(&self) -> &Value {
        let c = &self.deployment()["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], "operator");
        c
    }

    /// The operator container's env entries by name.
    pub fn env(&self) -> BTreeMap<String, Value> {
        self.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
            .collect()
    }

    pub fn env_value(&self, name: &str) -> Option<String> {
        self.env().get(name).and_then(|e| e["value"].as_str().map(str::to_string))
    }

    pub fn args(&self) -> Vec<String> {
        self.container()["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    }

    /// Every RBAC rule, with the kind and namespace of its (Cluster)Role.
    pub fn rules(&self) -> Vec<(String, String, Value)> {
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
    pub fn assert_least_privilege(&self, pods: bool) {
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
            assert!(rule.get("nonResourceURLs").is_none(), "{text}");
            if rule["apiGroups"] == json!(["apiextensions.k8s.io"]) {
                // Reading bgjobs' own CRDs, by name, in a ClusterRole (they are cluster-scoped): nothing else of them.
                let crds = json!(["backgroundjobs.bgjobs.dev", "recurringbackgroundjobs.bgjobs.dev"]);
                assert_eq!(kind, "ClusterRole", "{text}");
                assert_eq!(rule["resources"], json!(["customresourcedefinitions"]), "{text}");
                assert_eq!((&rule["resourceNames"], &rule["verbs"]), (&crds, &json!(["get"])), "{text}");
                continue;
            }
            assert!(rule.get("resourceNames").is_none(), "{text}");
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
pub fn verbs(rules: &[(String, String, Value)], group: &str, resource: &str) -> BTreeSet<String> {
    rules
        .iter()
        .filter(|(_, _, r)| {
            r["apiGroups"].as_array().unwrap().iter().any(|g| g == group)
                && r["resources"].as_array().unwrap().iter().any(|x| x == resource)
        })
        .flat_map(|(_, _, r)| r["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()))
        .collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The rules of the jobs' (Cluster)Role: `recurring` is operator.recurringEnabled, `pods` podMode.enabled.
pub fn assert_job_rules(rules: &[(String, String, Value)], recurring: bool, pods: bool) {
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

/// The operator container's environment as the kubelet would set it: downward API values for the Pod's name and
/// namespace, and `$(VAR)` references to earlier variables expanded.
pub fn container_env(r: &Rendered, pod: &str, namespace: &str) -> Vec<(String, String)> {
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
