//! Connecting to the cluster, with kubectl's kubeconfig resolution (`KUBECONFIG`, `~/.kube/config`, in-cluster).

use kube::Client;

use crate::error::{Error, Result};

/// A client for the current kubeconfig context (or the in-cluster ServiceAccount).
pub async fn connect() -> Result<Client> {
    Client::try_default().await.map_err(|e| Error::Config(e.to_string()))
}
