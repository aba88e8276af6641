//! The BackgroundJob API as the apiserver enforces it (that the committed CRDs match the Rust types is a unit test,
//! `api::tests`, needing no apiserver): the OpenAPI schema rejects bad specs with messages that name the field, fills in defaults, and the samples under
//! `config/samples/` apply as they are and list with the printer columns.
mod common;

use std::path::PathBuf;

use bgjobs::api::BackgroundJob;
use common::TestEnv;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, PostParams};

fn repo_path(relative: &str) -> PathBuf {
    common::repo_root().join(relative)
}

/// Run `kubectl --kubeconfig <local control plane> -n <ns> ARGS`, feeding `stdin` if given; (success, stdout, stderr).
fn kubectl(ns: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    use std::process::Stdio;

    let mut child = common::kubectl()
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes()).expect("write kubectl stdin");
    drop(pipe);
    let out = child.wait_with_output().expect("wait for kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl apply -f -` this YAML in `ns`; (success, stderr).
///
/// Client-side validation is off so that what is checked is the apiserver's answer (kubectl would otherwise
/// catch a missing required field itself, with its own wording).
fn kubectl_apply(ns: &str, yaml: &str) -> (bool, String) {
    let (ok, _, stderr) = kubectl(ns, &["apply", "--validate=false", "-f", "-"], Some(yaml));
    (ok, stderr)
}

/// A BackgroundJob manifest named `probe` with this spec (YAML flow syntax).
fn job_with_spec(spec: &str) -> String {
    format!("apiVersion: bgjobs.dev/v1alpha1\nkind: BackgroundJob\nmetadata:\n  name: probe\nspec: {spec}\n")
}

/// Apply a job with this spec in a fresh namespace, expect the apiserver to refuse it, and return its message.
async fn rejection_of(test: &str, spec: &str) -> String {
    let env = TestEnv::new(test).await;
    let (ok, stderr) = kubectl_apply(&env.ns, &job_with_spec(spec));
    assert!(!ok, "the apiserver accepted `spec: {spec}`; stderr: {stderr}");
    stderr
}

fn assert_mentions(stderr: &str, expected: &[&str]) {
    for e in expected {
        assert!(stderr.contains(e), "expected {e:?} in kubectl's stderr: {stderr}");
    }
}

#[tokio::test]
async fn the_apiserver_rejects_an_unknown_priority_naming_the_field() {
    let stderr = rejection_of("unknown_priority", "{jobName: noop, priority: Urgent}").await;
    assert_mentions(&stderr, &["spec.priority", "Unsupported value"]);
}

#[tokio::test]
async fn the_apiserver_rejects_negative_max_attempts_naming_the_field() {
    let stderr = rejection_of("negative_max_attempts", "{jobName: noop, retry: {maxAttempts: -1}}").await;
    assert_mentions(&stderr, &["spec.retry.maxAttempts", "greater than or equal to 1"]);
}

#[tokio::test]
async fn the_apiserver_rejects_max_attempts_beyond_what_the_operator_can_hold_naming_the_field() {
    // 2^31: the operator's 32-bit field could not hold it, and the job could not be read.
    let stderr = rejection_of("huge_max_attempts", "{jobName: noop, retry: {maxAttempts: 2147483648}}").await;
    assert_mentions(&stderr, &["spec.retry.maxAttempts", "less than or equal to 2147483647"]);
}

#[tokio::test]
async fn the_apiserver_rejects_a_job_without_job_name_naming_the_field() {
    let stderr = rejection_of("missing_job_name", "{args: {seconds: 1}}").await;
    assert_mentions(&stderr, &["spec.jobName", "Required value"]);
}

#[tokio::test]
async fn the_apiserver_rejects_negative_delay_seconds_naming_the_field() {
    let stderr = rejection_of("negative_delay", "{jobName: noop, delaySeconds: -5}").await;
    assert_mentions(&stderr, &["spec.delaySeconds", "greater than or equal to 0"]);
}

#[tokio::test]
async fn the_apiserver_rejects_an_http_url_without_scheme_naming_the_field() {
    let stderr = rejection_of("http_url_without_scheme", "{jobName: SendEmail, http: {url: example.com/jobs}}").await;
    assert_mentions(&stderr, &["spec.http.url", "should match"]);
}

/// The apiserver fills in `priority` and `queue` (shown by `kubectl get`) and nothing else: the operator applies the
/// `retry` and `timeoutSeconds` defaults when it reads a job, so that no job stores them (docs/benchmarks.md, the
/// apiserver's memory per job). Jobs created through the Rust types store no defaults either.
#[tokio::test]
async fn the_apiserver_defaults_priority_and_queue_and_stores_no_other_default() {
    let env = TestEnv::new("schema_defaults").await;
    // Untyped on purpose, both ways: the Rust types fill in the same defaults through serde, so creating or reading
    // a `BackgroundJob` would hide what is stored.
    let resource = ApiResource::erase::<BackgroundJob>(&());
    let jobs: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &resource);
    let minimal = DynamicObject::new("minimal", &resource).data(serde_json::json!({ "spec": { "jobName": "noop" } }));
    jobs.create(&PostParams::default(), &minimal).await.expect("create minimal job");
    let partial = serde_json::json!({ "spec": { "jobName": "noop", "retry": { "maxAttempts": 2 } } });
    jobs.create(&PostParams::default(), &DynamicObject::new("partial", &resource).data(partial))
        .await
        .expect("create a job with a partial retry policy");
    env.create(
        "typed",
        serde_json::json!({ "jobName": "noop", "timeoutSeconds": 172800, "retry": { "backoffSeconds": 60 } }),
    )
    .await;

    let stored = jobs.get("minimal").await.expect("read the job back");
    let spec = &stored.data["spec"];
    assert_eq!(spec, &serde_json::json!({ "jobName": "noop", "priority": "Normal", "queue": "default" }));
    let spec = &jobs.get("partial").await.expect("read the job back").data["spec"];
    assert_eq!(spec["retry"], serde_json::json!({ "maxAttempts": 2 }), "{spec}");
    let spec = &jobs.get("typed").await.expect("read the job back").data["spec"];
    assert_eq!(spec, &serde_json::json!({ "jobName": "noop", "priority": "Normal", "queue": "default" }));

    // The typed view reads the defaults.
    let job = env.jobs.get("minimal").await.expect("read the job back, typed");
    assert_eq!(job.spec.retry, bgjobs::api::RetryPolicy::default());
    assert_eq!(job.spec.timeout_seconds, bgjobs::api::DEFAULT_TIMEOUT_SECONDS);
    let job = env.jobs.get("partial").await.expect("read the job back, typed");
    assert_eq!(job.spec.retry.backoff_seconds, bgjobs::api::DEFAULT_BACKOFF_SECONDS);
}

/// `metadata.name` of every document in every YAML file under `config/samples/`.
/// `metadata.name` of every sample document of `kind`.
fn sample_names(kind: &str) -> Vec<String> {
    use serde::Deserialize;

    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_path("config/samples")).expect("read config/samples") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without metadata.name", path.display()));
            if value["kind"].as_str() == Some(kind) {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    names
}

#[tokio::test]
async fn samples_apply_and_list_with_printer_columns() {
    let env = TestEnv::new("samples").await;
    let samples = repo_path("config/samples");
    let (ok, stdout, stderr) = kubectl(&env.ns, &["apply", "-f", &samples.display().to_string()], None);
    assert!(ok, "kubectl apply -f config/samples/ failed: {stderr}");

    for (kind, resource, short, columns) in [
        (
            "BackgroundJob",
            "backgroundjob",
            "bgj",
            &["NAME", "PHASE", "PRIORITY", "QUEUE", "ATTEMPTS", "WORKER", "AGE"][..],
        ),
        (
            "RecurringBackgroundJob",
            "recurringbackgroundjob",
            "rbgj",
            &["NAME", "SCHEDULE", "SUSPEND", "LAST", "NEXT", "ACTIVE", "AGE"][..],
        ),
    ] {
        let names = sample_names(kind);
        assert!(!names.is_empty(), "no {kind} sample");
        for name in &names {
            assert!(stdout.contains(&format!("{resource}.bgjobs.dev/{name} created")), "{name} not created: {stdout}");
        }
        let (ok, listing, stderr) = kubectl(&env.ns, &["get", short], None);
        assert!(ok, "kubectl get {short} failed: {stderr}");
        let header: Vec<&str> = listing.lines().next().unwrap_or_default().split_whitespace().collect();
        for column in columns {
            assert!(header.contains(column), "no {column} column in kubectl get {short}:\n{listing}");
        }
        let listed: Vec<&str> = listing.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
        for name in &names {
            assert!(listed.contains(&name.as_str()), "{name} missing from kubectl get {short}:\n{listing}");
        }
    }
}
