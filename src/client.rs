//! Connecting to the cluster, with kubectl's kubeconfig resolution (`KUBECONFIG`, `~/.kube/config`, in-cluster).

use http::header::{HeaderValue, USER_AGENT};
use kube::Client;

use crate::error::{Error, Result};

/// A client for the current kubeconfig context (or the in-cluster ServiceAccount).
///
/// kube's built-in retry of 429/503/504 answers is off: a write whose answer was a 504 may have landed, and a blind
/// resend then meets a 409 that looks like a lost race. bgjobs decides itself what a failed write means (it reads
/// back Leases, re-reads jobs, and retries on its next pass).
///
/// Every request names bgjobs ([`USER_AGENT_VALUE`]): the apiserver takes a write's field manager from it, so the
/// fields bgjobs owns read `manager: bgjobs` in `managedFields` (not `unknown`), and audit logs and the apiserver's
/// per-client metrics say who wrote.
pub async fn connect() -> Result<Client> {
    let mut config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    config.default_retry = false;
    config.headers.push((USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE)));
    Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}

/// The `User-Agent` of bgjobs' requests. The apiserver makes the part before the `/` the field manager of a write
/// that names none.
pub const USER_AGENT_VALUE: &str = concat!("bgjobs/", env!("CARGO_PKG_VERSION"));

/// How long after it was sent a create may still be handled, and its object made: the apiserver's default request
/// timeout. A create whose answer never came (a lost connection, a replica that died) may land until then, also
/// after the object it would make was deleted; so a read decides that a create did not land only this long after it
/// was sent, and an object a lost create could bring back is deleted only once that is over.
pub const CREATE_LANDS_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How long after an object was created, by its `creationTimestamp` as this replica reads the cluster's clock, a
/// create of its name sent no later than its creation may still land: [`CREATE_LANDS_WITHIN`], plus a second
/// (`creationTimestamp` is in whole seconds: the object may have been created up to a second after it says), plus
/// half of [`crate::clock::REPLICAS_AGREE_WITHIN`] (how far this replica's reading of the clock may run ahead; a
/// whole one, rounded up, is kept).
pub const LATE_CREATES_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(
    CREATE_LANDS_WITHIN.as_secs() + 1 + crate::clock::REPLICAS_AGREE_WITHIN.as_secs() + 1,
);

/// Run `call`, giving up after `limit`: for calls whose answer may never come (a hung connection) and that must
/// not hold up what waits for them.
pub async fn bounded<T>(limit: std::time::Duration, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or(Err(Error::Timeout(limit)))
}
