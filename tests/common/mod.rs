//! Shared harness for integration tests on the local control plane (`e2e/cluster.sh up`).
//!
//! Each test gets its own namespace (deleted afterwards) and starts operator replicas as separate OS processes
//! (`bgjobs operator --namespace <its namespace>`) so it can `kill -9`, `SIGSTOP` and `SIGCONT` them.
#![allow(dead_code)]

pub mod chart;
pub mod control_plane;
pub mod fixtures;
pub mod http_proxy;
pub mod kubelet;
pub mod proxy;
pub mod release;
pub mod silent_webhook;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase};
pub use bgjobs_history::{ExecLine, Execution, Open};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};

/// The tests' HTTP endpoints listen on loopback, which the egress policy refuses by default (a sidecar's port).
pub const LOOPBACK_ENDPOINTS: [&str; 2] = ["--egress-allow-loopback", "true"];

/// Lease timing for tests: short, so takeovers happen within seconds.
pub const FAST_LEASES: [&str; 6] = ["--lease-duration", "3s", "--renew-deadline", "2s", "--renew-interval", "500ms"];

/// `kubectl --kubeconfig <the local control plane's>`, for the caller to add arguments to and run.
pub fn kubectl() -> Command {
    let mut kubectl = Command::new("kubectl");
    kubectl.arg("--kubeconfig").arg(kubeconfig_path());
    kubectl
}

/// A second kube-apiserver on the control plane's etcd (`e2e/cluster.sh second-apiserver`: an HA pair whose watch
/// caches can lag each other), stopped when dropped if this test started it, so that nothing a test starts outlives
/// it. One already running (another test run on the same control plane) is used and left running.
pub struct SecondApiserver {
    /// Its kubeconfig.
    pub kubeconfig: PathBuf,
    /// Its process, to freeze (`SIGSTOP`).
    pub pid: u32,
    started: bool,
}

impl SecondApiserver {
    pub fn start() -> Self {
        let running = || {
            let pid = std::fs::read_to_string(control_plane_dir().join("kube-apiserver-2.pid")).ok()?;
            let alive = Command::new("kill").args(["-0", pid.trim()]).stderr(Stdio::null()).status().ok()?.success();
            alive.then(|| pid.trim().parse::<u32>().ok()).flatten()
        };
        let started = running().is_none();
        let out = Command::new(repo_root().join("e2e/cluster.sh"))
            .arg("second-apiserver")
            .output()
            .expect("run e2e/cluster.sh second-apiserver");
        if !out.status.success() {
            if started {
                Self::stop();
            }
            panic!("second apiserver: {}", String::from_utf8_lossy(&out.stderr));
        }
        let kubeconfig = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default());
        let pid = running().expect("the second apiserver runs after `e2e/cluster.sh second-apiserver`");
        SecondApiserver { kubeconfig, pid, started }
    }

    fn stop() {
        let stopped = Command::new(repo_root().join("e2e/cluster.sh")).args(["second-apiserver", "stop"]).status();
        if !matches!(stopped, Ok(s) if s.success()) {
            eprintln!("could not stop the second apiserver: {stopped:?}");
        }
    }
}

impl Drop for SecondApiserver {
    fn drop(&mut self) {
        if self.started {
            Self::stop();
        }
    }
}

/// Where `e2e/cluster.sh` keeps the control plane's state (PID files, kubeconfigs, logs).
pub fn control_plane_dir() -> PathBuf {
    std::env::var_os("BGJOBS_CLUSTER_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".cluster"))
}

/// The repository's root (this package, `bgjobs-tests`, is its `tests/` directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lies in the repository").to_path_buf()
}

/// Path of the local control plane's kubeconfig (`$KUBECONFIG` wins).
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".cluster/kubeconfig"))
}

fn not_up(why: impl std::fmt::Display) -> ! {
    panic!(
        "\n\nThe local Kubernetes control plane is not reachable ({why}).\nIntegration tests need it: run `make test` \
         (which starts it), or `e2e/cluster.sh up` and then `eval $(e2e/cluster.sh env)`. See README.md.\n\n"
    )
}

/// A client for the local control plane, or a panic that says how to start it.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kubeconfig =
        Kubeconfig::read_from(&path).unwrap_or_else(|e| not_up(format!("cannot read {}: {e}", path.display())));
    let config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.unwrap_or_else(|e| not_up(e));
    let client = Client::try_from(config).unwrap_or_else(|e| not_up(e));
    if let Err(e) = client.apiserver_version().await {
        not_up(e);
    }
    client
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Wall-clock milliseconds, as the audit trail writes them.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// A free loopback port (for a replica's metrics and probes, a webhook).
///
/// Never the same port twice in one test process: the kernel may hand a port that was just let go to the next
/// `bind(0)`, and two tests running at once then gave their replicas one port (an admission test's webhook
/// configuration reached the other test's webhook, whose certificate its CA had not signed).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A unique suffix for names.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{:x}{:x}{}", std::process::id() % 0xffff, nanos % 0xfffff, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A kubeconfig for the local control plane's apiserver (and CA) that authenticates with a one-hour token of the
/// ServiceAccount `sa` in `namespace`, written to `dir`: a replica started with it has exactly the RBAC bound to `sa`.
/// The token comes from the TokenRequest API (what `kubectl create token` calls; v1.20's kubectl has no such command).
pub async fn service_account_kubeconfig(admin_client: &Client, sa: &str, namespace: &str, dir: &Path) -> PathBuf {
    let admin = kubeconfig_path();
    let request = TokenRequest {
        spec: TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin_client.clone(), namespace)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .expect("a token for the ServiceAccount")
        .status
        .expect("a TokenRequest answered with a status")
        .token;
    let kc = Kubeconfig::read_from(&admin).unwrap();
    let cluster = kc.clusters[0].cluster.clone().expect("a cluster in the admin kubeconfig");
    let ca = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(data), _) => format!("certificate-authority-data: {data}"),
        (None, Some(path)) => format!("certificate-authority: {path}"),
        (None, None) => "insecure-skip-tls-verify: true".into(),
    };
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    {ca}\n\
         users:\n- name: {sa}\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: local, user: {sa}, \
         namespace: {namespace}}}\ncurrent-context: sa\n",
        cluster.server.expect("a server URL")
    );
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Clear what a process of ours would otherwise take from the environment the tests run in: every `BGJOBS_*`
/// setting, and the Pod's name and namespace (set when the tests run in a Pod, and read as the replica's identity
/// and Lease namespace), so that a test's replicas run only with the flags it gives them.
pub fn without_ambient_settings(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("BGJOBS_") || key == "POD_NAME" || key == "POD_NAMESPACE" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `bgjobs-test-worker record-history` for the test's namespace, its jobs and its Leases (tests keep their Leases
/// there), stopped (SIGTERM) on drop.
pub struct Recorder(Child);

impl Recorder {
    pub fn start(env: &TestEnv) -> Recorder {
        let child = without_ambient_settings(&mut Command::new(test_worker_bin()))
            .args(["record-history", "--namespace", &env.ns, "--lease-namespace", &env.ns])
            .args(["--dir", &env.dir.display().to_string()])
            .env("KUBECONFIG", kubeconfig_path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.dir.join("recorder.log")).unwrap())
            .spawn()
            .expect("start the status recorder");
        Recorder(child)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// The rules of the chart's Role (`charts/bgjobs/templates/_helpers.tpl`, `bgjobs.rules`, with recurring jobs and
/// Pod mode on, plus the Lease rules), minus the `(resource, verb)` pairs in `without`.
pub fn operator_rules(without: &[(&str, &str)]) -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
    let rule = |group: &str, resource: &str, verbs: &[&str]| {
        let verbs: Vec<String> =
            verbs.iter().filter(|v| !without.contains(&(resource, **v))).map(|v| v.to_string()).collect();
        k8s_openapi::api::rbac::v1::PolicyRule {
            api_groups: Some(vec![group.to_string()]),
            resources: Some(vec![resource.to_string()]),
            verbs,
            ..Default::default()
        }
    };
    vec![
        rule("bgjobs.dev", "backgroundjobs", &["get", "list", "watch", "delete", "create", "patch"]),
        rule("bgjobs.dev", "backgroundjobs/status", &["get", "update"]),
        rule("bgjobs.dev", "recurringbackgroundjobs", &["get", "list", "watch"]),
        rule("bgjobs.dev", "recurringbackgroundjobs/status", &["get", "update"]),
        rule("coordination.k8s.io", "leases", &["get", "list", "watch", "create", "update", "delete"]),
        rule("events.k8s.io", "events", &["create", "patch"]),
        rule("", "pods", &["get", "list", "watch", "create", "delete"]),
    ]
    .into_iter()
    .filter(|r| !r.verbs.is_empty())
    .collect()
}

/// A ServiceAccount `name` in the test's namespace, bound to a Role `name` with [`operator_rules`] minus `without`;
/// returns a kubeconfig that authenticates as it. Its Leases must live in the test's namespace (`--lease-namespace`).
pub async fn operator_account(env: &TestEnv, name: &str, without: &[(&str, &str)]) -> PathBuf {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding, RoleRef, Subject};
    let meta = || ObjectMeta { name: Some(name.to_string()), ..Default::default() };
    let role = Role { metadata: meta(), rules: Some(operator_rules(without)) };
    let binding = RoleBinding {
        metadata: meta(),
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.into() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.into(),
            namespace: Some(env.ns.clone()),
            ..Default::default()
        }]),
    };
    let pp = PostParams::default();
    let account = ServiceAccount { metadata: meta(), ..Default::default() };
    Api::<ServiceAccount>::namespaced(env.client.clone(), &env.ns).create(&pp, &account).await.unwrap();
    Api::<Role>::namespaced(env.client.clone(), &env.ns).create(&pp, &role).await.unwrap();
    Api::<RoleBinding>::namespaced(env.client.clone(), &env.ns).create(&pp, &binding).await.unwrap();
    service_account_kubeconfig(&env.client, name, &env.ns, &env.dir).await
}

/// Change the Role of [`operator_account`] `name` to [`operator_rules`] minus `without` (a verb taken away, or
/// given back, mid-run).
pub async fn set_operator_rules(env: &TestEnv, name: &str, without: &[(&str, &str)]) {
    use k8s_openapi::api::rbac::v1::Role;
    let roles: Api<Role> = Api::namespaced(env.client.clone(), &env.ns);
    let mut role = roles.get(name).await.unwrap();
    role.rules = Some(operator_rules(without));
    roles.replace(name, &PostParams::default(), &role).await.unwrap();
}

/// What [`TestEnv::replica_with`] changes about a replica.
#[derive(Clone, Debug, Default)]
pub struct ReplicaOptions {
    /// Kubeconfig of the replica (default: [`kubeconfig_path`], the admin's).
    pub kubeconfig: Option<PathBuf>,
    /// More environment variables (set after `KUBECONFIG` and `RUST_LOG`, so they may override them).
    pub env: Vec<(String, String)>,
    /// Watch every namespace (no `--namespace`). Use a queue of the test's own (`--queues`): such a replica also
    /// sees the jobs of every other test.
    pub all_namespaces: bool,
    /// Run the test worker ([`test_worker_bin`]) instead of `bgjobs`: its recording handlers write to
    /// `<dir>/<identity>.exec`, for [`bgjobs_history`].
    pub test_worker: bool,
}

/// libfaketime from Debian's `faketime` package.
pub fn faketime_lib() -> PathBuf {
    for dir in ["/usr/lib/x86_64-linux-gnu/faketime", "/usr/lib/aarch64-linux-gnu/faketime", "/usr/lib/faketime"] {
        let p = Path::new(dir).join("libfaketime.so.1");
        if p.exists() {
            return p;
        }
    }
    panic!("libfaketime is missing: apt-get install faketime (make test installs it)")
}

/// The environment that runs a replica under libfaketime with `settings` (`FAKETIME`, or a
/// `FAKETIME_TIMESTAMP_FILE` to change it while it runs): its wall clock faked, its monotonic clock left true.
pub fn faked_clock(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![("LD_PRELOAD".to_string(), faketime_lib().display().to_string())];
    env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
    env
}

/// The test worker (`e2e/test-worker`), built next to `bgjobs`. Cargo builds a test's own package only, so the
/// worker is brought up to date here, once per test binary: a stale worker would test yesterday's operator.
pub fn test_worker_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    dev_bin("bgjobs-test-worker", &BUILT)
}

/// The process-based kubelet stand-in (`e2e/node-agent`), built on first use.
pub fn node_agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    dev_bin("bgjobs-node-agent", &BUILT)
}

/// The operator's binary, `bgjobs`, built on first use like the dev tools (this package's tests are not its own).
pub fn bgjobs_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    dev_bin("bgjobs", &BUILT)
}

/// The binary of the workspace's package `package` (same name), brought up to date once per test process with
/// `cargo build -p <package>` (in release if the running test was built so), and taken from where cargo says it
/// put it: never a stale copy from another profile or target directory.
fn dev_bin(package: &str, built: &OnceLock<PathBuf>) -> PathBuf {
    built
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test's own path");
            let release = exe.parent().and_then(Path::parent).is_some_and(|profile| profile.ends_with("release"));
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            let out = Command::new(cargo)
                .args(["build", "--quiet", "-p", package, "--message-format=json-render-diagnostics"])
                .args(release.then_some("--release"))
                .current_dir(repo_root())
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("run cargo to build {package}: {e}"));
            assert!(out.status.success(), "building {package} (cargo build -p {package}) failed");
            // Cargo names each artifact it built or found fresh; the package's binary is the one with its name.
            let bin = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == package)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .unwrap_or_else(|| panic!("cargo build -p {package} named no binary {package}"));
            assert!(bin.exists(), "{} is missing after building it", bin.display());
            bin
        })
        .clone()
}

/// One test's namespace, client and scratch directory.
pub struct TestEnv {
    /// Client for the local control plane.
    pub client: Client,
    /// The test's namespace.
    pub ns: String,
    /// BackgroundJobs in the test's namespace.
    pub jobs: Api<BackgroundJob>,
    /// Scratch directory for replica logs and invocation logs.
    pub dir: PathBuf,
}

/// Wait until the controller-manager created the namespace's `default` ServiceAccount: with a real node
/// (`e2e/cluster.sh up --node`) the apiserver's ServiceAccount admission refuses Pods until it exists, as in any
/// cluster. Longer than a test may pause the controller-manager ([`control_plane::ControllerManagerPaused`]).
async fn wait_for_default_service_account(client: &Client, ns: &str) {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    let start = Instant::now();
    while accounts.get_opt("default").await.expect("read the default ServiceAccount").is_none() {
        assert!(start.elapsed() < Duration::from_secs(180), "no default ServiceAccount in {ns} after 3 minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestEnv {
    /// A fresh namespace named after the test.
    pub async fn new(test: &str) -> TestEnv {
        let client = client().await;
        let ns = format!("t-{}-{}", test.replace('_', "-").chars().take(30).collect::<String>(), unique());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta { name: Some(ns.clone()), ..Default::default() },
                    ..Default::default()
                },
            )
            .await
            .expect("create test namespace");
        wait_for_default_service_account(&client, &ns).await;
        let dir = repo_root().join("target/test-runs").join(&ns);
        std::fs::create_dir_all(&dir).unwrap();
        TestEnv { jobs: Api::namespaced(client.clone(), &ns), client, ns, dir }
    }

    /// Start an operator replica in this namespace with fast leases and `extra` flags.
    pub fn replica(&self, identity: &str, extra: &[&str]) -> Replica {
        self.replica_with(identity, extra, &ReplicaOptions::default())
    }

    /// Like [`TestEnv::replica`], with another kubeconfig (e.g. a ServiceAccount token's), more environment
    /// variables, or every namespace in scope.
    pub fn replica_with(&self, identity: &str, extra: &[&str], options: &ReplicaOptions) -> Replica {
        let log = self.dir.join(format!("{identity}.log"));
        let invocations = self.dir.join(format!("{identity}.inv"));
        let mut args: Vec<String> = vec!["operator".into()];
        if !options.all_namespaces {
            args.extend(["--namespace".to_string(), self.ns.clone()]);
        }
        args.extend(["--identity".to_string(), identity.into()]);
        args.extend(["--invocation-log".to_string(), invocations.display().to_string()]);
        args.extend(FAST_LEASES.iter().map(|s| s.to_string()));
        if !extra.contains(&"--egress-allow-loopback") {
            args.extend(LOOPBACK_ENDPOINTS.iter().map(|s| s.to_string()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let program = if options.test_worker {
            args.extend(["--exec-log".to_string(), self.dir.join(format!("{identity}.exec")).display().to_string()]);
            test_worker_bin()
        } else {
            bgjobs_bin()
        };
        let child = without_ambient_settings(&mut Command::new(program))
            .args(&args)
            .env("KUBECONFIG", options.kubeconfig.clone().unwrap_or_else(kubeconfig_path))
            .env("RUST_LOG", "info,bgjobs=debug,kube=warn")
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start bgjobs operator");
        Replica { child: Some(child), identity: identity.into(), log, invocations }
    }

    /// Create a job named `name` from a JSON spec.
    pub async fn create(&self, name: &str, spec: serde_json::Value) -> BackgroundJob {
        self.jobs.create(&PostParams::default(), &fixtures::job(name, spec)).await.expect("create job")
    }

    /// All jobs in the namespace.
    pub async fn list(&self) -> Vec<BackgroundJob> {
        bgjobs::jobs::list(&self.jobs).await.expect("list jobs")
    }

    /// Notes of the Warning Events with `reason` on the object `name` (a job, a definition) in the namespace.
    pub async fn warnings_on(&self, name: &str, reason: &str) -> Vec<String> {
        self.warning_events(name, reason).await.into_iter().map(|e| e.note.unwrap_or_default()).collect()
    }

    /// The Warning Events with `reason` on the object `name` in the namespace (one may stand for a series of them:
    /// kube's recorder folds Events of one reason and action on one object, and counts them in `series`).
    pub async fn warning_events(&self, name: &str, reason: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
        use k8s_openapi::api::events::v1::Event;
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&Default::default()).await.expect("list events").items;
        list.into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter(|e| e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some(reason))
            .collect()
    }

    /// Poll until `done` holds for the job list, or panic after `timeout` with a summary.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[BackgroundJob]) -> bool,
    ) -> Vec<BackgroundJob> {
        let start = Instant::now();
        loop {
            let jobs = self.list().await;
            if done(&jobs) {
                return jobs;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; jobs: {}; logs in {}",
                    summary(&jobs),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait until the job `name` satisfies `done`.
    pub async fn wait_job(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&BackgroundJob) -> bool,
    ) -> BackgroundJob {
        let jobs = self
            .wait_until(timeout, &format!("{name}: {what}"), |jobs| {
                jobs.iter().any(|j| j.name_any() == name && done(j))
            })
            .await;
        jobs.into_iter().find(|j| j.name_any() == name).unwrap()
    }

    /// Wait (a minute at most) until `replica` has joined: its member Lease exists in `lease_namespace`. It writes it
    /// once its caches are synced and it has read the cluster's clock; from then on it judges Leases and claims.
    pub async fn wait_joined(&self, replica: &Replica, lease_namespace: &str) {
        let members: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), lease_namespace);
        let member = bgjobs::wire::member_lease_name(&replica.identity, &self.ns);
        let deadline = Instant::now() + Duration::from_secs(60);
        while members.get_opt(&member).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "{} never joined:\n{}", replica.identity, replica.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every attempt start/end line written by this test's replicas (their audit trail, `*.inv`), in time order.
    pub fn invocations(&self) -> Vec<ExecLine> {
        bgjobs_history::read_audit_trail(&self.dir).expect("read the replicas' audit trail")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = kubectl()
            .args(["delete", "namespace", &self.ns, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A finalizer of the tests' own, which holds an object's deletion back as another controller's would.
pub const HOLD_FINALIZER: &str = "test.bgjobs.dev/hold";

/// Objects a test holds with [`HOLD_FINALIZER`]: the finalizer is removed when this is dropped, so that a failed test
/// leaves no object (nor its namespace) stuck in deletion. With kubectl: a drop cannot await the test's client.
pub struct Held {
    kind: &'static str,
    ns: String,
    names: Vec<String>,
}

impl Held {
    /// The objects `names` of `kind` (as kubectl names it) in the test's namespace.
    pub fn on(env: &TestEnv, kind: &'static str, names: &[&str]) -> Held {
        Held { kind, ns: env.ns.clone(), names: names.iter().map(|n| n.to_string()).collect() }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = kubectl()
                .args(["patch", self.kind, name, "-n", &self.ns, "--type", "merge"])
                .args(["-p", r#"{"metadata":{"finalizers":null}}"#, "--request-timeout", "10s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `name=phase/attempts` for every job, for failure messages.
pub fn summary(jobs: &[BackgroundJob]) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for j in jobs {
        *counts.entry(j.phase().to_string()).or_default() += 1;
    }
    let detail: Vec<String> =
        jobs.iter().take(12).map(|j| format!("{}={}/{}", j.name_any(), j.phase(), j.attempts())).collect();
    format!("{counts:?} e.g. {}", detail.join(" "))
}

/// Phase of every job.
pub fn all_in(jobs: &[BackgroundJob], phase: Phase) -> bool {
    !jobs.is_empty() && jobs.iter().all(|j| j.phase() == phase)
}

/// Pair the operators' audit-trail lines into executions: the shared oracle's pairing
/// ([`bgjobs_history::executions`]), where a duplicate is defined once.
pub fn executions(lines: &[ExecLine]) -> Vec<Execution> {
    bgjobs_history::pair(lines, |_| 0)
}

/// The most executions running at any instant; an execution without an end line counts until `until` (the audit
/// trail does not tick, so nothing says it stopped earlier).
pub fn max_overlap<'a>(execs: impl IntoIterator<Item = &'a Execution>, until: i64) -> usize {
    bgjobs_history::max_overlap(execs, Open::Until(until))
}

/// An operator replica running as a child process.
pub struct Replica {
    child: Option<Child>,
    /// Its identity.
    pub identity: String,
    /// Its stderr.
    pub log: PathBuf,
    /// Its invocation log.
    pub invocations: PathBuf,
}

impl Replica {
    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("replica running").id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().expect("run kill").success();
        assert!(ok, "kill {sig} {} failed", self.pid());
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        self.signal("-KILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// Freeze it (SIGSTOP).
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Thaw it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGTERM, then wait up to `timeout` for it to exit; true if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal("-TERM");
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Wait up to `timeout` for it to exit by itself; its exit status if it did.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// --- node agent ---------------------------------------------------------------------------------------------------

/// Label and NoSchedule taint key on every test node agent's Node; the value is the node name.
pub const TEST_NODE_LABEL: &str = "bgjobs.dev/test-node";

/// What [`TestEnv::node_agent_with`] changes about a node agent.
#[derive(Clone, Debug, Default)]
pub struct NodeAgentOptions {
    /// Node name (default: a unique one).
    pub node: Option<String>,
    /// Leave the Node (marked NotReady) when the agent stops, for a restart to adopt; [`NodeAgent`]'s Drop still
    /// deletes it.
    pub keep_node: bool,
    /// More `bgjobs-node-agent` flags.
    pub extra: Vec<String>,
}

impl TestEnv {
    /// Run `bgjobs ARGS -n <test namespace>`; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = without_ambient_settings(&mut Command::new(bgjobs_bin()))
            .args(args)
            .args(["-n", &self.ns])
            .env("KUBECONFIG", kubeconfig_path())
            .output()
            .expect("run bgjobs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }
}

impl TestEnv {
    /// Start a node agent (the local stand-in for a kubelet) with a Node of its own. Place the test's Pods on it
    /// with [`NodeAgent::placement`] or [`NodeAgent::pin`], and wait for [`NodeAgent::ready`] before timing anything.
    pub fn node_agent(&self) -> NodeAgent {
        self.node_agent_with(&NodeAgentOptions::default())
    }

    /// Like [`TestEnv::node_agent`], with a given node name, a Node kept on exit, or more flags.
    pub fn node_agent_with(&self, options: &NodeAgentOptions) -> NodeAgent {
        NodeAgent::start(&self.dir, options)
    }
}

/// A `bgjobs-node-agent` process (e2e/node-agent) with its own Node, which carries the label and the NoSchedule taint
/// `bgjobs.dev/test-node=<node>`. The scheduler spreads Pods over every Ready node, other tests' too: the taint
/// keeps everybody else's Pods off this node, and [`NodeAgent::placement`] puts this test's Pods on it.
///
/// Drop stops the agent (SIGTERM: it kills the processes it started) and deletes the Node, so stale nodes do not
/// accumulate.
pub struct NodeAgent {
    child: Option<Child>,
    args: Vec<String>,
    /// The Node's name.
    pub node: String,
    /// The agent's stderr (appended to across restarts).
    pub log: PathBuf,
    /// Its `--work-dir`: Pod scratch directories are in `<work_dir>/<node>/pods`, their logs in
    /// `<work_dir>/<node>/logs/<namespace>_<pod>_<uid>.log`.
    pub work_dir: PathBuf,
}

impl NodeAgent {
    /// Start an agent whose log and work directory live in `dir`.
    pub fn start(dir: &Path, options: &NodeAgentOptions) -> NodeAgent {
        let node = options.node.clone().unwrap_or_else(|| format!("t-node-{}", unique()));
        let work_dir = dir.join("nodeagent");
        let label = format!("{TEST_NODE_LABEL}={node}");
        let mut args: Vec<String> = vec!["--node-name".into(), node.clone()];
        args.extend(["--node-label".into(), label.clone(), "--node-taint".into(), format!("{label}:NoSchedule")]);
        args.extend(["--work-dir".into(), work_dir.display().to_string()]);
        if !options.keep_node {
            args.push("--delete-node-on-exit".into());
        }
        args.extend(options.extra.iter().cloned());
        let mut agent =
            NodeAgent { child: None, args, log: dir.join(format!("node-agent-{node}.log")), node, work_dir };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(node_agent_bin())
            .args(&self.args)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info,bgjobs=debug,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start bgjobs-node-agent");
        self.child = Some(child);
    }

    /// Start it again with the same flags (after [`NodeAgent::terminate`] or [`NodeAgent::kill9`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the node agent is still running");
        self.spawn();
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node agent running").id()
    }

    /// `nodeSelector` and `tolerations` that put a Pod on this node: merge into a PodSpec's JSON.
    pub fn placement(&self) -> serde_json::Value {
        serde_json::json!({
            "nodeSelector": {TEST_NODE_LABEL: self.node},
            "tolerations": [{"key": TEST_NODE_LABEL, "operator": "Equal", "value": self.node, "effect": "NoSchedule"}],
        })
    }

    /// A Pod-mode job spec running `script` with `sh -c` on this node (args `{"greeting": "hello"}`), with `extra`
    /// fields merged into the spec.
    pub fn shell_job(&self, script: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "jobName": "shell",
            "args": {"greeting": "hello"},
            "template": {"spec": {"containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]}},
        });
        let pod_spec = spec["template"]["spec"].as_object_mut().unwrap();
        pod_spec.extend(self.placement().as_object().unwrap().clone());
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec
    }

    /// Put a Pod on this node: set its nodeSelector and add the toleration.
    pub fn pin(&self, spec: &mut k8s_openapi::api::core::v1::PodSpec) {
        spec.node_selector.get_or_insert_with(Default::default).insert(TEST_NODE_LABEL.into(), self.node.clone());
        spec.tolerations.get_or_insert_with(Vec::new).push(k8s_openapi::api::core::v1::Toleration {
            key: Some(TEST_NODE_LABEL.into()),
            operator: Some("Equal".into()),
            value: Some(self.node.clone()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        });
    }

    /// Wait until the Node is registered and Ready, or panic after 30 s with the agent's log.
    pub async fn ready(&self, client: &Client) -> k8s_openapi::api::core::v1::Node {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        let start = Instant::now();
        loop {
            if let Ok(Some(node)) = nodes.get_opt(&self.node).await
                && node_ready(&node)
            {
                return node;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("node {} not Ready after 30 s; agent log:\n{}", self.node, self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then wait up to `timeout` for it to exit; true if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else { return true };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// `kill -9` (the processes it started keep running), and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // A graceful stop kills the Pods' processes (it waits at most 10 s per process before SIGKILL).
        if !self.terminate(Duration::from_secs(25)) {
            self.kill9();
        }
        let _ = kubectl()
            .args(["delete", "node", &self.node, "--ignore-not-found", "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// True if the Node's `Ready` condition is `True`.
pub fn node_ready(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// True while some process that is not a zombie is in the process group `pgid` (a node agent's container).
pub fn process_group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else { return false };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { return false };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses, so split after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
    })
}
