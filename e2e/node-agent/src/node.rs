//! The agent's Node: registered (or adopted) at start, then kept alive like a kubelet keeps its own: the node Lease
//! in `kube-node-lease` and the `Ready` condition are both renewed every [`HEARTBEAT`], so the node lifecycle
//! controller never marks the node NotReady nor evicts its Pods.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    CONTAINER_ID_PREFIX, HEARTBEAT, LOCALHOST, MAX_WRITE_ATTEMPTS, NODE_LEASE_NAMESPACE, NODE_LEASE_SECONDS,
    NodeAgentConfig, update_status,
};
use bgjobs::error::{Error, Result, api_code};

/// What the agent says about its node.
#[derive(Clone, Debug)]
pub(super) struct NodeIdentity {
    pub(super) config: NodeAgentConfig,
    /// The apiserver's version: components that compare kubelet versions see no skew.
    pub(super) kubelet_version: String,
}

impl NodeIdentity {
    fn name(&self) -> &str {
        &self.config.node_name
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), self.name().to_string()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), arch.to_string()),
        ]);
        labels.extend(self.config.node_labels.iter().cloned());
        labels
    }

    fn node(&self) -> Node {
        let mut node = Node {
            metadata: ObjectMeta {
                name: Some(self.name().to_string()),
                labels: Some(self.labels()),
                annotations: Some(BTreeMap::from([(
                    "bgjobs.dev/node-agent".to_string(),
                    "test/dev tooling: Pods run as local processes".to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!self.config.node_taints.is_empty()).then(|| self.config.node_taints.clone()),
                ..Default::default()
            }),
            status: None,
        };
        // A Node may carry its status on create: the node controller sees it Ready at once.
        self.apply_status(&mut node, true);
        node
    }

    /// Bring an existing Node in line with the flags: our labels set, our taints replacing same-key ones. Taints the
    /// node lifecycle controller put on while the node was down stay; it removes them itself once the node is Ready.
    fn adopt(&self, node: &mut Node) {
        node.metadata.labels.get_or_insert_with(Default::default).extend(self.labels());
        let spec = node.spec.get_or_insert_with(Default::default);
        let mut taints = spec.taints.take().unwrap_or_default();
        taints.retain(|t| !self.config.node_taints.iter().any(|ours| ours.key == t.key));
        taints.extend(self.config.node_taints.iter().cloned());
        spec.taints = (!taints.is_empty()).then_some(taints);
    }

    /// Capacity, addresses, system info, and the conditions with a fresh heartbeat.
    pub(super) fn apply_status(&self, node: &mut Node, ready: bool) {
        let c = &self.config;
        let status = node.status.get_or_insert_with(NodeStatus::default);
        let resources = BTreeMap::from([
            ("cpu".to_string(), Quantity(c.cpu.clone())),
            ("memory".to_string(), Quantity(c.memory.clone())),
            ("pods".to_string(), Quantity(c.max_pods.to_string())),
            ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
        ]);
        status.capacity = Some(resources.clone());
        status.allocatable = Some(resources);
        status.addresses = Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: LOCALHOST.into() },
            NodeAddress { type_: "Hostname".into(), address: self.name().to_string() },
        ]);
        let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
        status.node_info = Some(NodeSystemInfo {
            architecture: self.labels()["kubernetes.io/arch"].clone(),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("{CONTAINER_ID_PREFIX}{}", env!("CARGO_PKG_VERSION")),
            kernel_version: read("/proc/sys/kernel/osrelease"),
            kube_proxy_version: String::new(),
            kubelet_version: self.kubelet_version.clone(),
            machine_id: read("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image: "bgjobs node agent (test/dev tooling: Pods run as local processes)".into(),
            system_uuid: String::new(),
            swap: None,
        });
        let now = Time(jiff::Timestamp::now());
        let conditions = status.conditions.get_or_insert_with(Vec::new);
        let (reason, message) = if ready {
            ("KubeletReady", "the bgjobs node agent is running Pods as local processes")
        } else {
            ("KubeletNotReady", "the bgjobs node agent stopped")
        };
        set_node_condition(conditions, "Ready", ready, reason, message, &now);
        for pressure in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            set_node_condition(conditions, pressure, false, "KubeletHasNoPressure", "not measured", &now);
        }
    }
}

fn set_node_condition(conditions: &mut Vec<NodeCondition>, type_: &str, on: bool, reason: &str, msg: &str, now: &Time) {
    let status = if on { "True" } else { "False" };
    let i = conditions.iter().position(|c| c.type_ == type_).unwrap_or_else(|| {
        conditions.push(NodeCondition { type_: type_.to_string(), ..Default::default() });
        conditions.len() - 1
    });
    let c = &mut conditions[i];
    if c.status != status || c.last_transition_time.is_none() {
        c.last_transition_time = Some(now.clone());
    }
    c.status = status.to_string();
    c.reason = Some(reason.to_string());
    c.message = Some(msg.to_string());
    c.last_heartbeat_time = Some(now.clone());
}

/// Create the Node, or adopt the one of that name (a restarted agent, or a node deleted and re-created).
pub(super) async fn register(api: &Api<Node>, identity: &NodeIdentity) -> Result<Node> {
    match api.create(&PostParams::default(), &identity.node()).await {
        Ok(node) => return Ok(node),
        Err(e) if api_code(&e) == Some(409) => info!(node = identity.name(), "the Node exists: adopting it"),
        Err(e) => return Err(e.into()),
    }
    let mut attempts = 0;
    let node = loop {
        let mut node = api.get(identity.name()).await?;
        identity.adopt(&mut node);
        match api.replace(identity.name(), &PostParams::default(), &node).await {
            Ok(node) => break node,
            Err(e) if api_code(&e) == Some(409) && attempts < MAX_WRITE_ATTEMPTS => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    };
    update_status(api, &node, None, |n| identity.apply_status(n, true))
        .await?
        .ok_or_else(|| Error::Invalid(format!("the Node {} was deleted while being adopted", identity.name())))
}

/// Renew the node Lease and the node status every [`HEARTBEAT`] until `stop`; returns the Node as last written.
/// Neither waits for the Pod status writes' concurrency limit: a backlog of Pod updates must not make the node
/// look dead.
pub(super) async fn heartbeat(
    client: Client,
    identity: NodeIdentity,
    mut node: Node,
    stop: CancellationToken,
) -> Option<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, NODE_LEASE_NAMESPACE);
    let mut lease: Option<Lease> = None;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return Some(node),
        }
        let renewed = renew_lease(&leases, &node, &mut lease);
        // The status was written at registration; from the second tick on it needs a fresh heartbeat.
        let status = async {
            if first {
                return Ok(Some(node.clone()));
            }
            update_status(&nodes, &node, None, |n| identity.apply_status(n, true)).await
        };
        let (renewed, status) = tokio::join!(renewed, status);
        first = false;
        if let Err(e) = renewed {
            warn!(error = %e, "could not renew the node Lease");
        }
        match status {
            Ok(Some(n)) => node = n,
            Ok(None) => {
                warn!(node = identity.name(), "the Node was deleted: registering it again");
                match register(&nodes, &identity).await {
                    Ok(n) => {
                        node = n;
                        lease = None;
                    }
                    Err(e) => warn!(error = %e, "could not register the Node again"),
                }
            }
            Err(e) => warn!(error = %e, "could not update the node status"),
        }
    }
}

/// Create or renew the node Lease, conditional on the version last seen (re-read on a conflict). It is owned by the
/// Node, so deleting the Node deletes it too (garbage collection), as with a kubelet's.
async fn renew_lease(api: &Api<Lease>, node: &Node, held: &mut Option<Lease>) -> Result<()> {
    let name = node.name_any();
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: name.clone(),
        uid: node.uid().unwrap_or_default(),
        ..Default::default()
    };
    for _ in 0..3 {
        let current = match held.take() {
            Some(lease) => Some(lease),
            None => api.get_opt(&name).await?,
        };
        let now = MicroTime(jiff::Timestamp::now());
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: Some(NODE_LEASE_SECONDS),
                        renew_time: Some(now),
                        ..Default::default()
                    }),
                };
                api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                spec.holder_identity = Some(name.clone());
                spec.lease_duration_seconds = Some(NODE_LEASE_SECONDS);
                spec.renew_time = Some(now);
                // A Lease left from an earlier Node of this name would be collected with that Node: re-own it.
                lease.metadata.owner_references = Some(vec![owner.clone()]);
                api.replace(&name, &PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(lease) => {
                *held = Some(lease);
                return Ok(());
            }
            Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
