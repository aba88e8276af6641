//! Who asked, on the local control plane: the operator's admission webhook records the creator of every job, and
//! `--pod-creator-check required` creates a job's Pod only for a creator who could create it themselves.
//!
//! The control plane is shared: the webhook is registered for this test's namespace only (a namespaceSelector on a
//! label only it carries), and its configuration is deleted when the test ends, panics included.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase, RecurringBackgroundJob};
use bgjobs::wire::{CREATED_BY, CREATED_BY_GROUPS};
use common::kubelet::{JOB_IMAGE, real_node};
use common::{TestEnv, free_port, kubeconfig_path};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A CA, and a serving certificate for 127.0.0.1 it signed, written as `tls.crt` and `tls.key` into `dir`; the
/// CA's PEM.
fn certificates(dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bgjobs admission test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let serving = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tls.crt"), serving.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    ca.pem()
}

/// The MutatingWebhookConfiguration `name`, deleted on drop (also when the test panics), so a shared control plane
/// never keeps calling a webhook that is gone.
struct Registered(String);

impl Drop for Registered {
    fn drop(&mut self) {
        let status = common::kubectl()
            .args(["delete", "mutatingwebhookconfiguration", &self.0, "--ignore-not-found"])
            .stdout(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("could not delete mutatingwebhookconfiguration {}: delete it by hand", self.0);
        }
    }
}

/// Register the operator's webhook at `https://127.0.0.1:<port>/mutate` for CREATE and UPDATE of jobs and
/// recurring jobs in namespaces labelled `label=value` (only the test's), failing requests it cannot answer: as the
/// chart does.
async fn register(client: &Client, name: &str, port: u16, ca_pem: &str, label: (&str, &str)) -> Registered {
    register_for(client, name, port, ca_pem, label, &["backgroundjobs", "recurringbackgroundjobs"]).await
}

/// As [`register`], for `resources` (subresources such as `backgroundjobs/status` too, as an admin may).
async fn register_for(
    client: &Client,
    name: &str,
    port: u16,
    ca_pem: &str,
    label: (&str, &str),
    resources: &[&str],
) -> Registered {
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "creator.bgjobs.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{}", bgjobs::wire::ADMISSION_PATH),
                             "caBundle": k8s_openapi::ByteString(ca_pem.as_bytes().to_vec())},
            "rules": [{"apiGroups": ["bgjobs.dev"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"],
                       "resources": resources, "scope": "Namespaced"}],
            "namespaceSelector": {"matchLabels": {label.0: label.1}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
        }]
    }))
    .unwrap();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    api.create(&PostParams::default(), &config).await.expect("register the webhook");
    Registered(name.to_string())
}

/// A client of the local control plane that acts as `user` (impersonation by the admin).
async fn client_as(user: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap();
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).unwrap()
}

/// A Role with `rules`, bound to `user`, in the test's namespace.
async fn grant(env: &TestEnv, user: &str, role: &str, rules: serde_json::Value) {
    let meta = ObjectMeta { name: Some(format!("{role}-{user}")), ..Default::default() };
    let rules: Vec<PolicyRule> = serde_json::from_value(rules).unwrap();
    let pp = PostParams::default();
    Api::<Role>::namespaced(env.client.clone(), &env.ns)
        .create(&pp, &Role { metadata: meta.clone(), rules: Some(rules) })
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: meta.clone(),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: meta.name.unwrap(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(env.client.clone(), &env.ns).create(&pp, &binding).await.unwrap();
}

fn annotation<'a>(job: &'a impl ResourceExt, key: &str) -> Option<&'a str> {
    job.annotations().get(key).map(String::as_str)
}

async fn pods_of(env: &TestEnv, job: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    pods.list(&ListParams::default().labels(&format!("bgjobs.dev/job={job}"))).await.unwrap().items
}

fn last_error(job: &BackgroundJob) -> String {
    job.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default()
}

/// A Pod-mode job for the real node (`e2e/cluster.sh up --node`).
fn shell_job() -> BackgroundJob {
    common::fixtures::job("placeholder", common::kubelet::shell_job("exit 0", json!({"retry": {"maxAttempts": 1}})))
}

/// A replica `r1` serving the webhook on a free loopback port, with a certificate from a CA of the test's own and
/// `extra` flags, once it accepts connections; its port and the CA's PEM.
async fn webhook_replica(env: &TestEnv, extra: &[&str]) -> (common::Replica, u16, String) {
    let ca = certificates(&env.dir.join("certs"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cert_dir = env.dir.join("certs").display().to_string();
    let mut flags = vec!["--admission-addr", addr.as_str(), "--admission-cert-dir", cert_dir.as_str()];
    flags.extend_from_slice(extra);
    let replica = env.replica("r1", &flags);
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(start.elapsed() < MINUTE, "the operator does not serve the webhook on {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (replica, port, ca)
}

/// Label the test's namespace so that only it is selected by the webhook this test registers.
async fn select_for_webhook(env: &TestEnv) -> (&'static str, &str) {
    let label = ("test.bgjobs.dev/admission", env.ns.as_str());
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let labels = json!({"metadata": {"labels": {label.0: label.1}}});
    namespaces.patch(&env.ns, &PatchParams::default(), &Patch::Merge(&labels)).await.unwrap();
    label
}

/// The webhook registered for the status subresources too (the chart does not, an admin may) lets the operator's
/// status writes through: it writes them from its slim cache, without the creator record, which the apiserver keeps
/// anyway. Jobs run and end, a cancel ends its job, and a schedule's ticks get their jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_registered_for_the_status_subresources_too_lets_the_operators_status_writes_through() {
    let env = TestEnv::new("admission-status").await;
    let label = select_for_webhook(&env).await;
    let (_replica, port, ca) = webhook_replica(&env, &[]).await;
    let resources =
        ["backgroundjobs", "backgroundjobs/status", "recurringbackgroundjobs", "recurringbackgroundjobs/status"];
    let name = format!("bgjobs-status-{}", env.ns);
    let _registered = register_for(&env.client, &name, port, &ca, label, &resources).await;
    env.create("quick", json!({"jobName": "noop"})).await;
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 300}})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let cancel = json!({"spec": {"cancel": true}});
    env.jobs.patch("long", &PatchParams::default(), &Patch::Merge(&cancel)).await.expect("cancel");
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let every_second = common::fixtures::recurring(
        "tick",
        json!({"schedule": "* * * * * *",
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    );
    defs.create(&PostParams::default(), &every_second).await.expect("create a schedule");
    env.wait_until(MINUTE, "the job succeeded, the cancel ended its job, ticks made jobs", |jobs| {
        let phase = |name: &str| jobs.iter().find(|j| j.name_any() == name).map(|j| j.phase());
        phase("quick") == Some(Phase::Succeeded)
            && phase("long") == Some(Phase::Cancelled)
            && jobs.iter().any(|j| j.name_any().starts_with("tick-"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_records_the_creator_and_pod_mode_creates_pods_only_for_creators_who_may_create_them() {
    let env = TestEnv::new("admission").await;
    let label = select_for_webhook(&env).await;

    // Created before the webhook exists: no record, so the required check fails it.
    real_node(&env.client, &[JOB_IMAGE]).await;
    let mut unrecorded = shell_job();
    unrecorded.metadata.name = Some("unrecorded".into());
    env.jobs.create(&PostParams::default(), &unrecorded).await.unwrap();

    let (_replica, port, ca) = webhook_replica(&env, &["--pod-creator-check", "required"]).await;
    let _registered = register(&env.client, &format!("bgjobs-test-{}", env.ns), port, &ca, label).await;

    let (alice, bob) = (format!("alice-{}", env.ns), format!("bob-{}", env.ns));
    let jobs_rule = json!([{"apiGroups": ["bgjobs.dev"], "resources": ["backgroundjobs", "recurringbackgroundjobs"],
                            "verbs": ["get", "list", "create", "update", "patch"]}]);
    let pods_rule = json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]);
    grant(&env, &alice, "jobs", jobs_rule.clone()).await;
    grant(&env, &bob, "jobs", jobs_rule).await;
    grant(&env, &bob, "pods", pods_rule).await;
    let as_alice: Api<BackgroundJob> = Api::namespaced(client_as(&alice).await, &env.ns);
    let as_bob: Api<BackgroundJob> = Api::namespaced(client_as(&bob).await, &env.ns);

    // The apiserver picks the new configuration up within a moment; until then creates are not stamped (probe with
    // jobs that create no Pod).
    let start = Instant::now();
    for probe in 0.. {
        let job = common::fixtures::job(&format!("probe-{probe}"), json!({"jobName": "noop"}));
        let job = as_alice.create(&PostParams::default(), &job).await.expect("alice may create jobs");
        if annotation(&job, CREATED_BY).is_some() {
            break;
        }
        assert!(start.elapsed() < MINUTE, "the webhook was never called");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A record the client sends is not kept: the webhook writes who asked.
    let mut job = shell_job();
    job.metadata.name = Some("by-alice".into());
    job.metadata.annotations = Some([(CREATED_BY.to_string(), bob.clone())].into());
    let by_alice = as_alice.create(&PostParams::default(), &job).await.unwrap();
    assert_eq!(annotation(&by_alice, CREATED_BY), Some(alice.as_str()));
    let groups: Vec<String> = serde_json::from_str(annotation(&by_alice, CREATED_BY_GROUPS).unwrap()).unwrap();
    assert!(groups.contains(&"system:authenticated".to_string()), "{groups:?}");

    // Nobody changes the record afterwards, not even its subject.
    let forge = json!({"metadata": {"annotations": {CREATED_BY: bob}}});
    let refused = as_alice.patch(&by_alice.name_any(), &PatchParams::default(), &Patch::Merge(&forge)).await;
    let message = format!("{:?}", refused.expect_err("changing the record is refused"));
    assert!(message.contains("cannot be added, changed or removed"), "{message}");

    // Alice may create jobs but not pods: her job fails naming her, and no Pod is created.
    let name = by_alice.name_any();
    let failed = env.wait_job(&name, MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    let error = last_error(&failed);
    assert!(
        error.contains("rule `pod-creator`") && error.contains(&format!("{alice:?} may not create pods")),
        "{error}"
    );
    assert!(pods_of(&env, &name).await.is_empty(), "a Pod was created for alice's job");

    // Bob may create pods: his job gets its Pod and runs.
    let mut job = shell_job();
    job.metadata.name = Some("by-bob".into());
    let created = as_bob.create(&PostParams::default(), &job).await.unwrap();
    assert_eq!(annotation(&created, CREATED_BY), Some(bob.as_str()));
    let done = env.wait_job("by-bob", MINUTE, "Succeeded", |j| j.phase().is_final()).await;
    assert_eq!(done.phase(), Phase::Succeeded, "{}", last_error(&done));
    assert_eq!(pods_of(&env, "by-bob").await.len(), 1);

    // The job created before the webhook has no record.
    let failed = env.wait_job("unrecorded", MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    assert!(last_error(&failed).contains("no creator recorded"), "{}", last_error(&failed));
    assert!(pods_of(&env, "unrecorded").await.is_empty());

    // A schedule alice defined: its jobs are created by someone else (here the admin triggers one; on schedule,
    // the operator), and still get no Pod, because the definition's creator is checked too.
    let definitions: Api<RecurringBackgroundJob> = Api::namespaced(client_as(&alice).await, &env.ns);
    let template = serde_json::to_value(&shell_job().spec).unwrap();
    let def: RecurringBackgroundJob = serde_json::from_value(json!({
        "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob",
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *", "suspend": true, "jobTemplate": {"spec": template}}
    }))
    .unwrap();
    let def = definitions.create(&PostParams::default(), &def).await.unwrap();
    assert_eq!(annotation(&def, CREATED_BY), Some(alice.as_str()));
    let triggered = bgjobs::jobs::trigger_recurring(&env.client, &def).await.unwrap();
    assert_ne!(annotation(&triggered, CREATED_BY), Some(alice.as_str()), "the admin created this one");
    let name = triggered.name_any();
    let failed = env.wait_job(&name, MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    let error = last_error(&failed);
    assert!(
        error.contains("the creator of RecurringBackgroundJob nightly") && error.contains(&format!("{alice:?}")),
        "{error}"
    );
    assert!(pods_of(&env, &name).await.is_empty());
}

/// The creator check judges who created a job, and the Pod is built from the spec when the attempt starts: so a user
/// with the application-team Role of docs/security.md (`patch backgroundjobs`, no `create pods`) must not rewrite the template
/// of a job a Pod-capable user created. The webhook refuses the patch, the Pod is built from the creator's template,
/// and `bgjobs cancel` and `bgjobs retry` (which write spec.cancel, spec.retry.maxAttempts) still pass the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_patch_by_another_user_is_refused_and_cancel_and_retry_still_pass_the_webhook() {
    let env = TestEnv::new("vouched").await;
    let label = select_for_webhook(&env).await;

    let (alice, mallory) = (format!("alice-{}", env.ns), format!("mallory-{}", env.ns));
    // docs/security.md's "RBAC for application teams" Role, for both; alice may also create pods.
    let readme_role = json!([
        {"apiGroups": ["bgjobs.dev"], "resources": ["backgroundjobs", "recurringbackgroundjobs"],
         "verbs": ["get", "list", "watch", "create", "delete"]},
        {"apiGroups": ["bgjobs.dev"], "resources": ["backgroundjobs"], "verbs": ["patch"]}]);
    grant(&env, &mallory, "app", readme_role.clone()).await;
    grant(&env, &alice, "app", readme_role).await;
    grant(&env, &alice, "pods", json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}])).await;
    let as_alice: Api<BackgroundJob> = Api::namespaced(client_as(&alice).await, &env.ns);
    let as_mallory: Api<BackgroundJob> = Api::namespaced(client_as(&mallory).await, &env.ns);

    // Pods that can never be scheduled: nothing runs, the Pod object is the evidence.
    let pod_job = |name: &str, script: &str, delay: i64| -> BackgroundJob {
        serde_json::from_value(json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": name}, "spec": {"jobName": "shell", "delaySeconds": delay,
            "retry": {"maxAttempts": 1},
            "template": {"spec": {"nodeSelector": {"vouched.bgjobs.dev/none": "none"},
                "containers": [{"name": "main", "image": JOB_IMAGE, "imagePullPolicy": "Never",
                                "command": ["sh", "-c", script]}]}}}}))
        .unwrap()
    };

    let (_replica, port, ca) = webhook_replica(&env, &["--pod-creator-check", "required"]).await;
    let _registered = register(&env.client, &format!("bgjobs-vouched-{}", env.ns), port, &ca, label).await;
    let start = Instant::now();
    for probe in 0.. {
        let job = common::fixtures::job(&format!("probe-{probe}"), json!({"jobName": "noop"}));
        let job = as_mallory.create(&PostParams::default(), &job).await.unwrap();
        if annotation(&job, CREATED_BY).is_some() {
            break;
        }
        assert!(start.elapsed() < MINUTE, "the webhook was never called");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Alice's delayed job; mallory tries to rewrite its template while it waits.
    let created = as_alice.create(&PostParams::default(), &pod_job("alice-job", "echo alice", 5)).await.unwrap();
    assert_eq!(annotation(&created, CREATED_BY), Some(alice.as_str()));
    let rewrite = json!({"spec": {"template": {"spec": {"nodeSelector": {"vouched.bgjobs.dev/none": "none"},
        "containers": [{"name": "main", "image": "mallory/tool", "imagePullPolicy": "Never",
                        "command": ["sh", "-c", "echo mallory"]}]}}}});
    let refused = as_mallory.patch("alice-job", &PatchParams::default(), &Patch::Merge(&rewrite)).await;
    let message = format!("{:?}", refused.expect_err("rewriting another user's template is refused"));
    assert!(message.contains("cannot be changed after creation"), "{message}");

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let start = Instant::now();
    let alice_pod = loop {
        if let Some(p) = pods.get_opt("alice-job-1").await.unwrap() {
            break p;
        }
        assert!(start.elapsed() < 2 * MINUTE, "no Pod for alice-job");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let container = &alice_pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some(JOB_IMAGE));
    assert_eq!(container.command.as_ref().unwrap()[2], "echo alice");

    // Mallory's own Pod job fails (she may not create pods); `bgjobs retry` (the admin) extends its budget through
    // the webhook, and `bgjobs cancel` (mallory) cancels it.
    as_mallory.create(&PostParams::default(), &pod_job("mallory-job", "echo mallory", 0)).await.unwrap();
    let failed = env.wait_job("mallory-job", MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    assert!(last_error(&failed).contains("rule `pod-creator`"), "{}", last_error(&failed));
    let retried = bgjobs::jobs::retry(&env.jobs, "mallory-job").await.expect("bgjobs retry passes the webhook");
    assert_eq!(retried.spec.retry.max_attempts, Some(2));
    let cancelled = bgjobs::jobs::cancel(&as_mallory, "mallory-job").await.expect("bgjobs cancel passes the webhook");
    assert!(cancelled.spec.cancel);

    // Server-side apply: the webhook's stamp is owned by no field manager, so re-applying keeps it.
    let manifest = json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
        "metadata": {"name": "ssa"}, "spec": {"jobName": "noop", "delaySeconds": 3600, "args": {"a": 1, "b": {"c": 2}}}});
    let pp = PatchParams::apply("alice-ssa");
    let first = as_alice.patch("ssa", &pp, &Patch::Apply(&manifest)).await.unwrap();
    assert_eq!(annotation(&first, CREATED_BY), Some(alice.as_str()));
    let again = as_alice.patch("ssa", &pp, &Patch::Apply(&manifest)).await;
    assert_eq!(annotation(&again.expect("re-apply"), CREATED_BY), Some(alice.as_str()));
    // `args` is an atomic map: its applier owns it as one field, not one per key (the apiserver holds that record
    // for every job). The spec stays per field: `bgjobs cancel` adds `cancel`, and a forced re-apply of the same
    // manifest, as GitOps tools do, keeps it and the arguments.
    bgjobs::jobs::cancel(&as_alice, "ssa").await.expect("bgjobs cancel passes the webhook");
    let forced = as_alice.patch("ssa", &pp.clone().force(), &Patch::Apply(&manifest)).await.expect("forced re-apply");
    assert!(forced.spec.cancel, "a re-apply without `cancel` keeps the cancel another manager wrote");
    assert_eq!(forced.spec.args.map(|a| a.value().unwrap()), Some(json!({"a": 1, "b": {"c": 2}})));
    let entries = forced.metadata.managed_fields.as_deref().unwrap_or_default();
    let applied = entries.iter().find(|e| e.manager.as_deref() == Some("alice-ssa")).expect("the applier's entry");
    let fields = &applied.fields_v1.as_ref().expect("fieldsV1").0;
    assert_eq!(fields["f:spec"]["f:args"], json!({}), "{fields}");
    assert!(fields["f:spec"].get("f:cancel").is_none(), "{fields}");
}

/// VmRSS of process `pid`, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) / 1024
}

/// Anyone who reaches the webhook's port may send to it (the chart's NetworkPolicy lets anyone in: the apiserver's
/// address is not known). Forty peers that each declare an 8 MB AdmissionReview, send all of it but a byte and
/// stall held 320 MB in the replica (each body was collected whole, with no time limit): past the chart's 512 Mi
/// limit with a few more, the replica is OOM-killed and, under `failurePolicy: Fail`, no job can be created. Now
/// the bodies read at once are bounded in bytes and in time, and the webhook admits jobs again once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_stall_large_admission_reviews_cost_bounded_memory_and_the_webhook_serves_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let env = TestEnv::new("admission-flood").await;
    let label = select_for_webhook(&env).await;
    let (mut replica, port, ca) = webhook_replica(&env, &[]).await;
    let addr = format!("127.0.0.1:{port}");
    let before = rss_mib(replica.pid());
    let _registered = register(&env.client, &format!("bgjobs-flood-{}", env.ns), port, &ca, label).await;

    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    const DECLARED: usize = 8_000_000;
    // A peer, from a loopback address of its own (one address holds at most 64 connections; the apiserver calls from
    // 127.0.0.1), that declares an 8 MB review, sends `sends` bytes of it, and then nothing until the replica gives
    // up on it.
    let peer_number = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let stalling_peer = |sends: usize| {
        let (connector, addr) = (connector.clone(), addr.clone());
        let n = peer_number.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("127.0.4.{}:0", 1 + n % 200).parse().unwrap()).unwrap();
            let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let tls = connector.connect(name, tcp).await;
            assert!(tls.is_ok(), "peer {n}: TLS handshake: {tls:?}");
            let mut tls = tls.unwrap();
            let head = format!(
                "POST /mutate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {DECLARED}\r\n\r\n"
            );
            if tls.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 64 * 1024];
            let mut sent = 0;
            while sent < sends {
                let part = &chunk[..chunk.len().min(sends - sent)];
                if tls.write_all(part).await.is_err() {
                    return;
                }
                sent += part.len();
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(40), tls.read_to_end(&mut answer)).await;
        })
    };

    // Forty peers that declare 8 MB each and send nothing of it cost nothing: a genuine review is answered at once
    // meanwhile (charged by what they declared, they filled the budget and every create was refused).
    let idle: Vec<_> = (0..40).map(|_| stalling_peer(0)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    loop {
        // The apiserver may take a moment to call a webhook just registered.
        let during = env.create(&format!("during-{}", start.elapsed().as_millis()), json!({"jobName": "noop"})).await;
        if annotation(&during, CREATED_BY).is_some() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(8), "the webhook was never called beside the idle peers");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for peer in idle {
        peer.abort();
    }

    // Forty peers that send all of 8 MB but a byte and stall: bounded memory.
    let peers: Vec<_> = (0..40).map(|_| stalling_peer(DECLARED - 1)).collect();
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(25);
    while Instant::now() < until {
        peak = peak.max(rss_mib(replica.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("replica RSS: {before} MiB before, peak {peak} MiB under 40 stalled 8 MB reviews");
    assert!(peak > 0, "the replica's RSS was read");
    assert!(peak < before + 200, "peak RSS {peak} MiB ({before} MiB before): the stalled bodies were held");
    for peer in peers {
        peer.abort();
    }

    // The webhook still admits jobs, and records their creator.
    let created = env.create("after", json!({"jobName": "noop"})).await;
    assert!(annotation(&created, CREATED_BY).is_some(), "the webhook stamped the job: {:?}", created.metadata);
    assert!(replica.exit_within(Duration::from_millis(1)).is_none(), "the replica lives");
}

/// A schedule's job is created by the operator, so its own record names the operator: the definition's record is
/// what names the person. Mallory (the application-team Role: create, delete and patch jobs, no `create pods`) made
/// a schedule, then cut its job loose from it, by removing the job's ownerReference (a patch the webhook allowed) or
/// by deleting the schedule with `--cascade=orphan` (the garbage collector removes it): the check then saw only the
/// operator's record, and made the Pod. The job now carries its definition's record, which the webhook keeps as it
/// keeps the creator's: each such job fails naming mallory, and no Pod is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedules_job_cut_loose_from_its_schedule_is_still_checked_against_the_schedules_creator() {
    let env = TestEnv::new("cut-loose").await;
    let label = select_for_webhook(&env).await;
    let mallory = format!("mallory-{}", env.ns);
    grant(
        &env,
        &mallory,
        "app",
        json!([
        {"apiGroups": ["bgjobs.dev"], "resources": ["backgroundjobs", "recurringbackgroundjobs"],
         "verbs": ["get", "list", "watch", "create", "delete"]},
        {"apiGroups": ["bgjobs.dev"], "resources": ["backgroundjobs"], "verbs": ["patch"]}]),
    )
    .await;
    let mallory_client = client_as(&mallory).await;
    let as_mallory: Api<BackgroundJob> = Api::namespaced(mallory_client.clone(), &env.ns);
    let her_definitions: Api<RecurringBackgroundJob> = Api::namespaced(mallory_client, &env.ns);

    let (_replica, port, ca) = webhook_replica(&env, &["--pod-creator-check", "required"]).await;
    let _registered = register(&env.client, &format!("bgjobs-cut-loose-{}", env.ns), port, &ca, label).await;

    // Two schedules of mallory's whose jobs wait 25 s before their Pod (one that is never scheduled) is made.
    let schedule = |name: &str| -> RecurringBackgroundJob {
        serde_json::from_value(json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob",
            "metadata": {"name": name}, "spec": {"schedule": "*/5 * * * * *", "jobTemplate": {"spec": {
                "jobName": "shell", "delaySeconds": 25, "retry": {"maxAttempts": 1},
                "template": {"spec": {"nodeSelector": {"cut-loose.bgjobs.dev/none": "none"},
                    "containers": [{"name": "main", "image": JOB_IMAGE, "imagePullPolicy": "Never",
                                    "command": ["sh", "-c", "echo mallory"]}]}}}}}}))
        .unwrap()
    };
    let start = Instant::now();
    loop {
        // The webhook may take a moment to be called once registered: a definition it did not stamp is refused by
        // the required check for another reason, so make them only once it stamps.
        let probe = common::fixtures::job("probe", json!({"jobName": "noop"}));
        let stamped = as_mallory.create(&PostParams::default(), &probe).await;
        if stamped.is_ok_and(|j| annotation(&j, CREATED_BY).is_some()) {
            break;
        }
        let _ = env.jobs.delete("probe", &Default::default()).await;
        assert!(start.elapsed() < MINUTE, "the webhook was never called");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for name in ["patched", "orphaned"] {
        let made = her_definitions.create(&PostParams::default(), &schedule(name)).await.unwrap();
        assert_eq!(annotation(&made, CREATED_BY), Some(mallory.as_str()));
    }
    // One job of each, then no more ticks.
    let first_of = |def: &'static str| {
        env.wait_until(MINUTE, "a job of each schedule", move |jobs| {
            jobs.iter().any(|j| j.labels().get("bgjobs.dev/recurring").map(String::as_str) == Some(def))
        })
    };
    let patched = first_of("patched").await;
    let orphaned = first_of("orphaned").await;
    let name_of = |jobs: &[BackgroundJob], def: &str| {
        jobs.iter()
            .find(|j| j.labels().get("bgjobs.dev/recurring").map(String::as_str) == Some(def))
            .unwrap()
            .name_any()
    };
    let (patched, orphaned) = (name_of(&patched, "patched"), name_of(&orphaned, "orphaned"));
    let suspend = Patch::Merge(json!({"spec": {"suspend": true}}));
    let definitions: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    definitions.patch("patched", &PatchParams::default(), &suspend).await.unwrap();

    // Cut loose: a patch, and a delete that orphans.
    let strip = Patch::Json::<()>(
        serde_json::from_value(json!([{"op": "remove", "path": "/metadata/ownerReferences"}])).unwrap(),
    );
    as_mallory.patch(&patched, &PatchParams::default(), &strip).await.expect("the webhook lets an ownerReference go");
    her_definitions.delete("orphaned", &kube::api::DeleteParams::orphan()).await.unwrap();
    let start = Instant::now();
    while env.jobs.get(&orphaned).await.unwrap().owner_references().iter().any(|o| o.kind == "RecurringBackgroundJob") {
        assert!(start.elapsed() < MINUTE, "the garbage collector never orphaned {orphaned}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(env.jobs.get(&patched).await.unwrap().owner_references().is_empty());

    for job in [&patched, &orphaned] {
        // Final, or a Pod made (the attempt is Running from its claim on, before the check is asked).
        let start = Instant::now();
        let done = loop {
            let j = env.jobs.get(job).await.unwrap();
            if j.phase().is_final() || !pods_of(&env, job).await.is_empty() {
                break j;
            }
            assert!(start.elapsed() < 2 * MINUTE, "{job} neither ended nor got a Pod: {:?}", j.status);
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert_eq!(done.phase(), Phase::Failed, "{job}: {}", last_error(&done));
        let why = last_error(&done);
        assert!(why.contains("rule `pod-creator`") && why.contains(&mallory), "{job}: {why}");
        assert!(pods_of(&env, job).await.is_empty(), "{job} got a Pod");
    }
}
