//! The replica's view of the queue: watch-fed caches of BackgroundJobs, of bgjobs' claim Leases, and (with a
//! cluster-wide cap) of the slot Leases.
//!
//! All caches are kube-runtime reflectors. Every change wakes the dispatcher through a [`Notify`], which then
//! re-reads the caches; caches may lag the replica's own writes, which the dispatcher accounts for.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::api::BackgroundJob;
use crate::lease::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::limits::SLOT_LABEL;

/// Watch-fed caches.
#[derive(Clone)]
pub struct QueueView {
    /// Every BackgroundJob in scope.
    pub jobs: Store<BackgroundJob>,
    /// Every claim Lease bgjobs made in scope.
    pub leases: Store<Lease>,
    /// The cluster-wide slot Leases, when a cap is configured.
    pub slots: Option<Store<Lease>>,
    /// Notified on every change of any cache.
    pub changed: Arc<Notify>,
}

impl QueueView {
    /// Start watching (all namespaces, or `namespace`; slot Leases in `slot_namespace` when given). The watches run
    /// until the process ends, retrying with backoff on errors.
    pub fn start(client: Client, namespace: Option<&str>, slot_namespace: Option<&str>) -> QueueView {
        let changed = Arc::new(Notify::new());
        let managed = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
        let jobs =
            reflect(scoped::<BackgroundJob>(&client, namespace), watcher::Config::default(), &changed, "BackgroundJob");
        let leases = reflect(
            scoped::<Lease>(&client, namespace),
            watcher::Config::default().labels(&managed),
            &changed,
            "Lease",
        );
        let slots = slot_namespace.map(|ns| {
            let config = watcher::Config::default().labels(SLOT_LABEL);
            reflect::<Lease>(Api::namespaced(client.clone(), ns), config, &changed, "slot Lease")
        });
        QueueView { jobs, leases, slots, changed }
    }

    /// Wait until every cache holds a full initial list.
    pub async fn ready(&self) {
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.leases.wait_until_ready().await;
        if let Some(slots) = &self.slots {
            let _ = slots.wait_until_ready().await;
        }
    }
}

fn scoped<K: Resource<Scope = k8s_openapi::NamespaceResourceScope>>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector over `api` whose every event notifies `changed`.
fn reflect<K>(api: Api<K>, config: watcher::Config, changed: &Arc<Notify>, what: &'static str) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let notify = changed.clone();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer).touched_objects();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "{what} watch error; retrying");
            }
            notify.notify_one();
        }
    });
    store
}
