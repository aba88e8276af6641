//! `bgjobs-node-agent`: a process-based stand-in for the kubelet, for fast tests on the local control plane:
//! **test and development tooling, NOT for production, not part of the operator's binary or image.**
//!
//! The real node (`e2e/cluster.sh up --node`: kubelet, containerd, runc) runs Pods in containers; the Pod executor
//! and chart tests use it. This stand-in stays for the adversarial tier (`tests/chaos`), whose Pod-mode work runs the
//! host's test worker binary and writes the execution log the checker reads, and for its own tests
//! (`tests/node_agent.rs`). It does just enough of a kubelet's job to run Pod-mode BackgroundJobs and `batch/v1` Jobs on one
//! machine, with the real kube-scheduler and kube-controller-manager doing their real work around it:
//!
//! - **Node.** It registers a Node (capacity from flags, labels `kubernetes.io/hostname` and `kubernetes.io/os`, no
//!   taints unless asked) and keeps it alive as a kubelet does: its Lease in `kube-node-lease` and its `Ready`
//!   condition are renewed every 10 s, so the node lifecycle controller never marks it NotReady nor evicts its Pods.
//!   A restarted agent adopts the Node it finds.
//! - **Pods.** It watches the Pods bound to the node (`spec.nodeName`) and runs each new Pod's **first container's
//!   `command` + `args`** as a local child process, with the container's `env`, in a scratch directory
//!   `<work-dir>/<node>/pods/<namespace>_<name>_<uid>/`, stdout and stderr appended to
//!   `<work-dir>/<node>/logs/<namespace>_<name>_<uid>.log`. It reports Pending → Running → Succeeded (exit 0) or
//!   Failed (non-zero exit, or the process could not start) through `pods/status`, with the exit code, reason and
//!   message in `containerStatuses[0].state.terminated`. Every status write is conditional on the resourceVersion
//!   it was computed from, and re-read and re-applied on a conflict, so it never overwrites what others wrote.
//! - **Deletion.** When a Pod is being deleted, it sends SIGTERM to the process group, SIGKILL after the Pod's grace
//!   period (at most 10 s), reports the final status and then finalizes the deletion as a kubelet does (delete with
//!   grace period 0 and a UID precondition).
//!
//! Run it beside the local control plane (`eval $(e2e/cluster.sh env); cargo run -p bgjobs-node-agent --`). To keep
//! other Pods off a node, taint it and tolerate the taint in the Pods meant for it
//! (`--node-taint dedicated=mine:NoSchedule --node-label dedicated=mine`, plus a toleration and a nodeSelector): the
//! scheduler spreads Pods over every Ready node, so several agents each get some of every workload otherwise.
//!
//! The container's process id is its container ID, `bgjobs-node-agent://<pid>` (see [`container_pid`]); it is also
//! the id of the process group the container runs in.
//!
//! # What it is not
//!
//! There is no isolation of any kind: commands run on the host as the agent's user. `image`, `workingDir`, volumes,
//! ports, probes, resources, security contexts, init containers and every container after the first are ignored (the
//! last two with a warning). The process gets only `PATH`, `HOSTNAME`, `HOME` (its scratch directory) and the
//! container's `env` — not the agent's environment, so the agent's kubeconfig does not leak into "containers".
//! `env` supports plain values (with the kubelet's `$(VAR)` expansion, also in `command` and `args`) and `fieldRef`
//! for `metadata.name`, `metadata.namespace`, `metadata.uid`, `metadata.labels['…']`, `metadata.annotations['…']`,
//! `spec.nodeName`, `spec.serviceAccountName`, `status.podIP` and `status.hostIP` (both `127.0.0.1`); other sources
//! (`configMapKeyRef`, `secretKeyRef`, `resourceFieldRef`, `envFrom`) are skipped with a warning.
//!
//! **`restartPolicy` is treated as `Never`.** `OnFailure` and `Always` are not implemented: a container is never
//! restarted, and the Pod ends `Succeeded` on exit 0 and `Failed` otherwise. For a `batch/v1` Job with `OnFailure`
//! this means a failed container fails its Pod (and the Job controller counts it against `backoffLimit` and makes a
//! new Pod), where a kubelet would restart the container in place. The bgjobs Pod executor forces `Never`.
//!
//! Processes belong to the agent run that started them. On SIGTERM or SIGINT the agent kills them, reports their Pods
//! Failed, and marks the node NotReady (best effort). If the agent dies without that (`kill -9`), the next run
//! reports the Pods it finds Running as Failed (`ContainerStatusUnknown`, like a kubelet that lost a container) and
//! leaves any such leftover process alone: it only ever signals processes it started itself.

use std::fmt::Debug;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Node, Pod, Taint};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use bgjobs::error::{Error, Result, api_code};

mod node;
mod pods;
mod process;

pub use process::expand;

use node::{NodeIdentity, heartbeat, register};
use pods::{PodTable, Shared};

/// How often the node Lease and the node's `Ready` condition are renewed (a kubelet's default).
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// `leaseDurationSeconds` of the node Lease (a kubelet's default): four missed heartbeats.
pub const NODE_LEASE_SECONDS: i32 = 40;
/// Namespace of node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// The longest a process gets between SIGTERM and SIGKILL, whatever the Pod's grace period says: a dev loop
/// should not wait 30 s for a stubborn process.
pub const MAX_GRACE: Duration = Duration::from_secs(10);
/// The scheme of container IDs: `bgjobs-node-agent://<pid>`.
pub const CONTAINER_ID_PREFIX: &str = "bgjobs-node-agent://";
/// Pod IP, host IP and node address: everything runs on loopback.
pub const LOCALHOST: &str = "127.0.0.1";

/// Status writes that lose this many races (or fail this many times) in a row are given up.
const MAX_WRITE_ATTEMPTS: u32 = 20;
/// Exit code reported when the process could not be started (what containerd reports for a start error).
const CANNOT_RUN_EXIT_CODE: i32 = 128;
/// Exit code reported for a Pod whose process was lost with a previous agent run (a kubelet reports the same).
const LOST_EXIT_CODE: i32 = 137;
/// At most this much of the log's end becomes the message of a failed container (the kubelet's
/// `FallbackToLogsOnError` limits).
const MESSAGE_MAX_BYTES: u64 = 2048;
const MESSAGE_MAX_LINES: usize = 80;

/// Flags of `bgjobs-node-agent`.
#[derive(Args, Clone, Debug)]
pub struct NodeAgentConfig {
    /// Name of the Node to register (also the name of its Lease in kube-node-lease).
    #[arg(long, default_value = "bgjobs-local-node", env = "BGJOBS_NODE_NAME")]
    pub node_name: String,

    /// How many Pods the node takes at once (`status.capacity.pods`; the scheduler respects it).
    #[arg(long, default_value_t = 110, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pods: u32,

    /// CPU capacity to advertise (a Kubernetes quantity; nothing is enforced).
    #[arg(long, default_value = "64")]
    pub cpu: String,

    /// Memory capacity to advertise (a Kubernetes quantity; nothing is enforced).
    #[arg(long, default_value = "256Gi")]
    pub memory: String,

    /// Another node label, KEY=VALUE (repeatable): lets Pods pick this node with a nodeSelector.
    #[arg(long = "node-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,

    /// A node taint, KEY[=VALUE]:EFFECT (repeatable): only Pods that tolerate it are scheduled here.
    #[arg(long = "node-taint", value_name = "KEY[=VALUE]:EFFECT", value_parser = parse_taint)]
    pub node_taints: Vec<Taint>,

    /// Directory for the Pods' scratch directories and logs (`<dir>/<node>/pods/…`, `<dir>/<node>/logs/…`).
    #[arg(long, default_value = "target/nodeagent", env = "BGJOBS_NODE_AGENT_WORK_DIR")]
    pub work_dir: PathBuf,

    /// Keep a Pod's scratch directory and log after the Pod is deleted (by default they go with the Pod).
    #[arg(long)]
    pub keep_pod_dirs: bool,

    /// Delete the Node when the agent stops (by default it stays, marked NotReady, for the next run to adopt).
    #[arg(long)]
    pub delete_node_on_exit: bool,

    /// At most this many Pod status writes and deletions in flight at once (node heartbeats never wait for them).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub api_concurrency: u32,
}

impl NodeAgentConfig {
    /// What `bgjobs-node-agent --node-name <node_name>` runs with: every other flag at its default (or its
    /// environment variable), for running the agent in-process with [`run_until`].
    pub fn new(node_name: &str) -> NodeAgentConfig {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            config: NodeAgentConfig,
        }
        <Flags as clap::Parser>::parse_from(["node-agent", "--node-name", node_name]).config
    }
}

/// Parse `KEY=VALUE`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("invalid label {s:?}: expected KEY=VALUE")),
    }
}

/// Parse `KEY[=VALUE]:EFFECT` (kubectl taint's syntax).
fn parse_taint(s: &str) -> Result<Taint, String> {
    let (kv, effect) = s.rsplit_once(':').ok_or_else(|| format!("invalid taint {s:?}: expected KEY[=VALUE]:EFFECT"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!("invalid taint effect {effect:?}: use NoSchedule, PreferNoSchedule or NoExecute"));
    }
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    if key.is_empty() {
        return Err(format!("invalid taint {s:?}: the key is empty"));
    }
    Ok(Taint { key: key.to_string(), value, effect: effect.to_string(), time_added: None })
}

/// The process id in a container status written by this agent (`containerID: bgjobs-node-agent://<pid>`).
pub fn container_pid(status: &ContainerStatus) -> Option<u32> {
    status.container_id.as_deref()?.strip_prefix(CONTAINER_ID_PREFIX)?.parse().ok()
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(config: NodeAgentConfig) -> Result<()> {
    let client = Client::try_default().await.map_err(|e| Error::Config(e.to_string()))?;
    run_until(client, config, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}

/// Run the agent until `shutdown` completes; then stop the processes it started, report their Pods Failed, and
/// mark the node NotReady (or delete it, with `delete_node_on_exit`).
pub async fn run_until(client: Client, config: NodeAgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let root = std::path::absolute(config.work_dir.join(&config.node_name))?;
    let (pods_dir, logs_dir) = (root.join("pods"), root.join("logs"));
    std::fs::create_dir_all(&pods_dir)?;
    std::fs::create_dir_all(&logs_dir)?;
    let nodes: Api<Node> = Api::all(client.clone());
    let kubelet_version = client.apiserver_version().await?.git_version;
    let identity = NodeIdentity { config: config.clone(), kubelet_version };
    let node = register(&nodes, &identity).await?;
    info!(node = %config.node_name, work_dir = %root.display(), "node registered; running the Pods bound to it");

    let stop_heartbeat = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(client.clone(), identity.clone(), node, stop_heartbeat.clone()));
    let shared = Arc::new(Shared {
        client: client.clone(),
        pods_dir,
        logs_dir,
        keep_dirs: config.keep_pod_dirs,
        writes: Semaphore::new(config.api_concurrency as usize),
        stop: CancellationToken::new(),
    });
    let mut pods = PodTable::new(shared);
    let selector = format!("spec.nodeName={}", config.node_name);
    let mut events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.next() => match event {
                Some(Ok(event)) => pods.handle(event),
                Some(Err(e)) => warn!(error = %e, "Pod watch failed; retrying"),
                None => break,
            },
        }
    }

    info!(pods = pods.tracked(), "stopping: killing the processes this agent started");
    // Past this deadline (every process is dead by MAX_GRACE), give up on the last status writes.
    if !pods.stop(MAX_GRACE + Duration::from_secs(10)).await {
        warn!("some Pods could not be reported before the deadline");
    }
    stop_heartbeat.cancel();
    let node = heartbeat.await.ok().flatten();
    if let Some(node) = node {
        let not_ready = |n: &mut Node| identity.apply_status(n, false);
        match tokio::time::timeout(Duration::from_secs(5), update_status(&nodes, &node, None, not_ready)).await {
            Ok(Ok(_)) => info!("node marked NotReady"),
            Ok(Err(e)) => warn!(error = %e, "could not mark the node NotReady"),
            Err(_) => warn!("timed out marking the node NotReady"),
        }
    }
    if config.delete_node_on_exit {
        match nodes.delete(&config.node_name, &DeleteParams::default()).await {
            Ok(_) => info!("node deleted"),
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => warn!(error = %e, "could not delete the node"),
        }
    }
    Ok(())
}

/// Write `apply(object)` through the status subresource, conditional on the resourceVersion of the object it was
/// computed from. On a conflict, re-read and re-apply; other failures are retried with a short backoff.
/// `Ok(None)`: the object is gone (deleted, or replaced by another of the same name). `permits` bounds concurrency.
async fn update_status<K>(
    api: &Api<K>,
    seen: &K,
    permits: Option<&Semaphore>,
    mut apply: impl FnMut(&mut K),
) -> Result<Option<K>>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = seen.name_any();
    let uid = seen.uid();
    let mut current = seen.clone();
    let mut attempt = 0;
    loop {
        let mut next = current.clone();
        apply(&mut next);
        let written = {
            let _permit = match permits {
                Some(s) => Some(s.acquire().await.expect("the semaphore is never closed")),
                None => None,
            };
            api.replace_status(&name, &PostParams::default(), &next).await
        };
        let failure = match written {
            Ok(object) => return Ok(Some(object)),
            Err(e) if api_code(&e) == Some(404) => return Ok(None),
            // Someone else wrote since: re-read and apply again.
            Err(e) if api_code(&e) == Some(409) => {
                debug!(name, "status write conflict; re-reading");
                e
            }
            Err(e) => {
                debug!(error = %e, name, "status write failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
                e
            }
        };
        attempt += 1;
        if attempt >= MAX_WRITE_ATTEMPTS {
            return Err(failure.into());
        }
        let reread = {
            let _permit = match permits {
                Some(s) => Some(s.acquire().await.expect("the semaphore is never closed")),
                None => None,
            };
            api.get_opt(&name).await
        };
        current = match reread {
            Ok(Some(object)) if object.uid() == uid => object,
            Ok(_) => return Ok(None),
            Err(e) => {
                debug!(error = %e, name, "re-read failed; retrying");
                continue;
            }
        };
    }
}

/// A Pod with `spec` for the unit tests of the node agent's modules.
#[cfg(test)]
pub fn test_pod(spec: serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "a"}},
        "spec": spec,
    }))
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taints_and_labels_parse_like_kubectl() {
        let t = parse_taint("dedicated=test:NoSchedule").unwrap();
        assert_eq!((t.key.as_str(), t.value.as_deref(), t.effect.as_str()), ("dedicated", Some("test"), "NoSchedule"));
        assert_eq!(parse_taint("k:NoExecute").unwrap().value, None);
        assert!(parse_taint("k=v").is_err());
        assert!(parse_taint("k=v:Sometimes").is_err());
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("=b").is_err());
    }

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let c = NodeAgentConfig::new("n1");
        assert_eq!((c.node_name.as_str(), c.max_pods, c.cpu.as_str(), c.memory.as_str()), ("n1", 110, "64", "256Gi"));
        assert!(c.node_taints.is_empty() && !c.delete_node_on_exit);
    }
}
