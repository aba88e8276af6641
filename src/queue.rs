//! The replica's view of the queue: watch-fed caches of BackgroundJobs and of bgjobs' claim Leases.
//!
//! Both caches are kube-runtime reflectors. Every change wakes the dispatcher through a [`Notify`], which then
//! re-reads the caches; caches may lag the replica's own writes, which the dispatcher accounts for.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::api::BackgroundJob;
use crate::lease::{MANAGED_BY, MANAGED_BY_LABEL};

/// Watch-fed caches.
#[derive(Clone)]
pub struct QueueView {
    /// Every BackgroundJob in scope.
    pub jobs: Store<BackgroundJob>,
    /// Every claim Lease bgjobs made in scope.
    pub leases: Store<Lease>,
    /// Notified on every change of either cache.
    pub changed: Arc<Notify>,
}

impl QueueView {
    /// Start watching (all namespaces, or `namespace`). The watches run until the process ends, retrying with
    /// backoff on errors.
    pub fn start(client: Client, namespace: Option<&str>) -> QueueView {
        let (jobs_api, leases_api): (Api<BackgroundJob>, Api<Lease>) = match namespace {
            Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
            None => (Api::all(client.clone()), Api::all(client)),
        };
        let changed = Arc::new(Notify::new());
        let (jobs, jobs_writer) = reflector::store();
        let (leases, leases_writer) = reflector::store();
        let notify = changed.clone();
        tokio::spawn(async move {
            let stream =
                watcher(jobs_api, watcher::Config::default()).default_backoff().reflect(jobs_writer).touched_objects();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "BackgroundJob watch error; retrying");
                }
                notify.notify_one();
            }
        });
        let notify = changed.clone();
        let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
        tokio::spawn(async move {
            let stream = watcher(leases_api, watcher::Config::default().labels(&selector))
                .default_backoff()
                .reflect(leases_writer)
                .touched_objects();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "Lease watch error; retrying");
                }
                notify.notify_one();
            }
        });
        QueueView { jobs, leases, changed }
    }

    /// Wait until both caches hold a full initial list.
    pub async fn ready(&self) {
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.leases.wait_until_ready().await;
    }
}
