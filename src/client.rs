//! Connecting to the cluster, with kubectl's kubeconfig resolution (`KUBECONFIG`, `~/.kube/config`, in-cluster).

use kube::Client;

use crate::error::{Error, Result};

/// A client for the current kubeconfig context (or the in-cluster ServiceAccount).
///
/// kube's built-in retry of 429/503/504 answers is off: a write whose answer was a 504 may have landed, and a blind
/// resend then meets a 409 that looks like a lost race. bgjobs decides itself what a failed write means (it reads
/// back Leases, re-reads jobs, and retries on its next pass).
pub async fn connect() -> Result<Client> {
    let mut config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    config.default_retry = false;
    Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}

/// Run `call`, giving up after `limit`: for calls whose answer may never come (a hung connection) and that must
/// not hold up what waits for them.
pub async fn bounded<T>(limit: std::time::Duration, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or(Err(Error::Timeout(limit)))
}
