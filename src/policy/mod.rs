//! What a user who may create BackgroundJobs can make the operator do on their behalf.
//!
//! The operator acts with its own network position (HTTP executor) and its own RBAC (Pod executor), so without a
//! policy `create backgroundjobs` would grant far more than it says: POSTs to the cloud metadata address or the
//! operator's own ports, and privileged or host-mounting Pods in a namespace whose users may not create Pods. Both
//! policies are pure decisions over plain data ([`egress`], [`pods`]); each executor calls one function before it
//! sends or creates anything, and a refusal ends the job `Failed` with the rule in `lastError`. Pod mode can also ask
//! whether the job's creator could have created the Pod themselves ([`creator`]).

pub mod creator;
pub mod egress;
pub mod pods;

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::de::DeserializeOwned;

pub use egress::EgressPolicy;
pub use pods::PodPolicy;

/// Settings per namespace, written as a JSON (or YAML) object keyed by namespace, e.g.
/// `{"team-a": ["https://hooks.example.com/"]}`: the form a flag, an environment variable and a chart value share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerNamespace<T>(pub BTreeMap<String, T>);

impl<T> Default for PerNamespace<T> {
    fn default() -> Self {
        PerNamespace(BTreeMap::new())
    }
}

impl<T: DeserializeOwned> FromStr for PerNamespace<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(PerNamespace::default());
        }
        // JSON is YAML: one parser takes what `helm`'s toJson renders and what a person types.
        serde_yaml::from_str::<BTreeMap<String, T>>(s)
            .map(PerNamespace)
            .map_err(|e| format!("expected an object keyed by namespace, e.g. {{\"team-a\": ...}}: {e}"))
    }
}

/// Both policies, as the operator's flags set them.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Where the HTTP executor may send.
    pub egress: EgressPolicy,
    /// Which Pods the Pod executor may create.
    pub pods: PodPolicy,
}
