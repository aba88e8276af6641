//! A validating admission webhook that never answers, to make every create of Pods (or of BackgroundJobs) in a
//! test's namespace hang.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::TestEnv;
use super::kubelet::JOB_IMAGE;

/// What a [`SilentWebhook`] holds: the creates of Pods, or of BackgroundJobs.
#[derive(Clone, Copy)]
pub enum Creates {
    Pods,
    Jobs,
}

/// A validating admission webhook for creates of one kind in the test's namespace that never answers: the apiserver
/// waits its `timeoutSeconds` for it on every such create, then (`failurePolicy: Ignore`) makes the object anyway. A
/// create sent by the operator is thus still in flight for that long, and lands after it. The configuration is
/// deleted on drop (also when the test panics), so the shared control plane never keeps waiting on it.
pub struct SilentWebhook {
    name: String,
    _listener: tokio::net::TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl SilentWebhook {
    /// Register it for Pod creates in `env`'s namespace (see [`SilentWebhook::register_for`]).
    pub async fn register(env: &TestEnv, timeout_seconds: i32) -> SilentWebhook {
        Self::register_for(env, Creates::Pods, timeout_seconds).await
    }

    /// Register it for `creates` in `env`'s namespace, with `timeout_seconds` (at most 30), and wait until the
    /// apiserver calls it.
    pub async fn register_for(env: &TestEnv, creates: Creates, timeout_seconds: i32) -> SilentWebhook {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        use k8s_openapi::api::core::v1::Namespace;
        // A listener that accepts nothing, its queue filled by this test's own connections: the apiserver's connect
        // hangs (its SYNs are dropped) until the webhook's timeout. (One that accepted and said nothing would be given
        // up after Go's 10 s TLS handshake timeout.)
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            queued.push(stream);
            assert!(queued.len() < 16, "the listen queue of {addr} never filled");
        }
        let port = addr.port();
        let label = ("test.bgjobs.dev/slow-creates", env.ns.as_str());
        let rule = match creates {
            Creates::Pods => json!({"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}),
            Creates::Jobs => {
                json!({"apiGroups": ["bgjobs.dev"], "apiVersions": ["v1alpha1"], "resources": ["backgroundjobs"]})
            }
        };
        let namespaces: Api<Namespace> = Api::all(env.client.clone());
        let labels = json!({"metadata": {"labels": {label.0: label.1}}});
        namespaces.patch(&env.ns, &PatchParams::default(), &Patch::Merge(&labels)).await.unwrap();
        let name = format!("bgjobs-test-{}", env.ns);
        let config: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "silent.test.bgjobs.dev",
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate")},
                "rules": [{"operations": ["CREATE"], "scope": "Namespaced",
                           "apiGroups": rule["apiGroups"], "apiVersions": rule["apiVersions"],
                           "resources": rule["resources"]}],
                "namespaceSelector": {"matchLabels": {label.0: label.1}},
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": timeout_seconds,
            }]
        }))
        .unwrap();
        let api: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
        api.create(&Default::default(), &config).await.expect("register the webhook");
        let webhook = SilentWebhook { name, _listener: listener, _queued: queued };
        // The apiserver picks the configuration up within a moment: probe with creates that are never stored.
        let dry_run = kube::api::PostParams { dry_run: true, ..Default::default() };
        let probe = || async {
            match creates {
                Creates::Pods => {
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": "probe"},
                        "spec": {"containers": [{"name": "main", "image": JOB_IMAGE}]},
                    }))
                    .unwrap();
                    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
                    pods.create(&dry_run, &pod).await.map(drop)
                }
                Creates::Jobs => {
                    let job = super::fixtures::job("probe", json!({"jobName": "noop"}));
                    env.jobs.create(&dry_run, &job).await.map(drop)
                }
            }
        };
        let start = Instant::now();
        loop {
            let sent = Instant::now();
            probe().await.expect("a dry-run create");
            if sent.elapsed() >= Duration::from_secs(timeout_seconds as u64 - 1) {
                return webhook;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the apiserver never called the webhook");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl SilentWebhook {
    /// Make the creates sent from now on wait `timeout_seconds` (at most 30) instead; those in flight keep theirs.
    /// The apiserver picks the change up within a moment.
    pub async fn set_timeout(&self, env: &TestEnv, timeout_seconds: i32) {
        use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
        let api: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
        let mut config = api.get(&self.name).await.expect("read the webhook");
        for webhook in config.webhooks.iter_mut().flatten() {
            webhook.timeout_seconds = Some(timeout_seconds);
        }
        api.replace(&self.name, &Default::default(), &config).await.expect("change the timeout");
    }
}

impl Drop for SilentWebhook {
    fn drop(&mut self) {
        let status = super::kubectl()
            .args(["delete", "validatingwebhookconfiguration", &self.name, "--ignore-not-found"])
            .stdout(std::process::Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("could not delete validatingwebhookconfiguration {}: delete it by hand", self.name);
        }
    }
}
