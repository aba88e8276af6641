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

use crate::api::{BackgroundJob, RecurringBackgroundJob};
use crate::lease::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::limits::SLOT_LABEL;
use crate::members::MEMBER_LABEL;

/// Watch-fed caches.
#[derive(Clone)]
pub struct QueueView {
    /// Every BackgroundJob in scope.
    pub jobs: Store<BackgroundJob>,
    /// Every claim Lease bgjobs made in scope.
    pub leases: Store<Lease>,
    /// The cluster-wide slot Leases, when a cap is configured.
    pub slots: Option<Store<Lease>>,
    /// Member Leases of the live replicas (see [`crate::members`]).
    pub members: Store<Lease>,
    /// RecurringBackgroundJob definitions.
    pub definitions: Store<RecurringBackgroundJob>,
    /// Notified on every change of the caches the dispatcher reads.
    pub changed: Arc<Notify>,
    /// Notified on every change of the caches the recurring controller reads.
    pub recurring_changed: Arc<Notify>,
}

impl QueueView {
    /// Start watching: jobs, claim Leases and definitions in all namespaces (or `namespace`); member Leases and,
    /// with `slots`, the cluster slot Leases in `lease_namespace`. The watches run until the process ends,
    /// retrying with backoff on errors.
    pub fn start(client: Client, namespace: Option<&str>, lease_namespace: &str, slots: bool) -> QueueView {
        let changed = Arc::new(Notify::new());
        let recurring_changed = Arc::new(Notify::new());
        let both = [changed.clone(), recurring_changed.clone()];
        let managed = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
        let jobs =
            reflect(scoped::<BackgroundJob>(&client, namespace), watcher::Config::default(), &both, "BackgroundJob");
        let leases = reflect(
            scoped::<Lease>(&client, namespace),
            watcher::Config::default().labels(&managed),
            &both[..1],
            "Lease",
        );
        let in_lease_ns = || Api::<Lease>::namespaced(client.clone(), lease_namespace);
        let slots = slots
            .then(|| reflect(in_lease_ns(), watcher::Config::default().labels(SLOT_LABEL), &both[..1], "slot Lease"));
        let member_selector = format!("{MEMBER_LABEL}={}", crate::members::scope(namespace));
        let members =
            reflect(in_lease_ns(), watcher::Config::default().labels(&member_selector), &both, "member Lease");
        let definitions = reflect(
            scoped::<RecurringBackgroundJob>(&client, namespace),
            watcher::Config::default(),
            &both[1..],
            "RecurringBackgroundJob",
        );
        QueueView { jobs, leases, slots, members, definitions, changed, recurring_changed }
    }

    /// Wait until every cache holds a full initial list.
    pub async fn ready(&self) {
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.leases.wait_until_ready().await;
        let _ = self.members.wait_until_ready().await;
        let _ = self.definitions.wait_until_ready().await;
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

/// A reflector over `api` whose every event notifies each of `notify`.
fn reflect<K>(api: Api<K>, config: watcher::Config, notify: &[Arc<Notify>], what: &'static str) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let notify = notify.to_vec();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff().reflect(writer).touched_objects();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "{what} watch error; retrying");
            }
            for n in &notify {
                n.notify_one();
            }
        }
    });
    store
}
