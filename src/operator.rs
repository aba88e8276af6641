//! `bgjobs operator`: one replica. Run as many as you like; they share the work through per-job claims.
//!
//! Start-up: check that the CRD is installed (exit with a hint if not), start the watches, wait for the caches,
//! then dispatch. Shutdown (SIGTERM/SIGINT): stop claiming, let running attempts finish for `--shutdown-grace`,
//! then stop them, write them back to `Waiting` and delete their Leases so other replicas start them at once
//! (work that goes on without this replica, a Pod or an HTTP request still unanswered, is handed over instead:
//! another replica takes it over a lease duration later); only then give up the exclusive Lease, if held.
//!
//! Teams with their own handlers build their own worker binary around [`run`]:
//! ```no_run
//! # async fn f(config: bgjobs::config::OperatorConfig) -> bgjobs::Result<()> {
//! let mut registry = bgjobs::executor::Registry::with_builtins();
//! registry.register("SendEmail", |_ctx, to: String| async move { println!("mail {to}"); Ok(()) });
//! bgjobs::operator::run(config, registry).await
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::BackgroundJob;
use crate::config::{OperatorConfig, Strategy};
use crate::dispatch::Dispatcher;
use crate::error::{Error, Result};
use crate::executor::Registry;
use crate::metrics::Health;
use crate::queue::QueueView;
use crate::worker::Worker;

/// Run one operator replica until SIGTERM or SIGINT.
pub async fn run(mut config: OperatorConfig, registry: Registry) -> Result<()> {
    let timing = config.lease_timing();
    timing.validate()?;
    config.validate()?;
    config.retention = std::mem::take(&mut config.retention).with_legacy_ttl(config.ttl_seconds_after_finished);
    let client = crate::client::connect().await?;
    ensure_crd(&client, config.namespace.as_deref()).await?;
    crate::api::installed::check(&client, config.recurring_enabled).await?;
    let identity = config.identity();
    let policy = config.policy(local_addresses());
    let worker = Worker::new(
        client.clone(),
        identity.clone(),
        timing,
        registry,
        config.events,
        config.invocation_log.as_deref(),
        policy,
    )?;
    let mut worker = worker;
    worker.report_url = config.report_url.as_ref().map(|u| u.as_str().trim_end_matches('/').to_string());
    let worker = Arc::new(worker);
    info!(%identity, strategy = ?config.strategy, slots = config.max_concurrent_jobs_per_instance,
        namespace = config.namespace.as_deref().unwrap_or("<all>"), execution = config.job_execution_enabled, "bgjobs operator starting");

    let health = Arc::new(Health::default());
    if let Some(addr) = config.metrics_addr {
        crate::metrics::serve(addr, worker.metrics.clone(), health.clone()).await?;
    }
    // Served before the caches sync: the webhook needs no cache, and job creation waits on it (failurePolicy Fail).
    if let (Some(addr), Some(dir)) = (config.admission_addr, config.admission_cert_dir.as_deref()) {
        crate::admission::serve(addr, dir).await?;
    }
    // Listened for from here: the default action (exit at once) is then replaced for good, so a signal that comes
    // while nothing awaits it must be kept for the shutdown below.
    let mut signals = Signals::listen()?;
    let stop_background = CancellationToken::new();
    let clock = {
        let (worker, client, stop) = (worker.clone(), client.clone(), stop_background.clone());
        tokio::spawn(async move { worker.clock.follow(client, stop).await })
    };
    let slots = config.cluster_max_concurrency.is_some();
    let view = QueueView::start(client.clone(), config.namespace.as_deref(), &config.lease_namespace, slots);
    // Every decision in time (a recurring tick, a delay, a heartbeat's deadline, a report's stamp) follows the
    // apiserver's clock, on which replicas agree only once each has read it (`clock::REPLICAS_AGREE_WITHIN`). Until
    // then this replica does nothing: it holds no member Lease, so the others keep its share, and it is not ready.
    let started = async {
        view.ready().await;
        if !worker.clock.is_measured() {
            info!("waiting for a first reading of the apiserver's clock before dispatching");
            worker.clock.measured().await;
        }
    };
    tokio::select! {
        _ = started => {}
        // Nothing is held yet: stop at once.
        _ = signals.received() => {
            stop_background.cancel();
            let _ = clock.await;
            return Ok(());
        }
    }
    // Before it says it is ready: a replica that cannot make them exits (a rollout must not go on past it). Step by
    // step, each with the whole patience: a step that made progress is recorded, so a large cap takes as many steps
    // as it needs, and a restart resumes where the record says.
    if let Some(cap) = config.cluster_max_concurrency {
        let patience = crate::client::START_UP_PATIENCE;
        loop {
            let step = || crate::limits::ensure_slots(&client, &config.lease_namespace, cap);
            let until = tokio::time::Instant::now() + patience;
            let made = crate::client::ask_until("make the cluster slot Leases", until, patience, step).await?;
            if made >= cap {
                break;
            }
            info!(made, cap, "cluster slot Leases made so far");
        }
    }
    info!("caches synced; dispatching");
    if let Some(addr) = config.report_addr {
        crate::report::server::serve(addr, worker.clone(), view.jobs.clone()).await?;
    }

    let (membership_tx, membership) = watch::channel(None);
    let (roles, roles_rx) = watch::channel(crate::members::Roles {
        recurring: config.recurring_enabled,
        jobs: config.job_execution_enabled,
        slots: config.max_concurrent_jobs_per_instance,
        queues: config.queues.clone(),
        handlers: worker.registry.names().map(str::to_string).collect(),
    });
    let heartbeat = tokio::spawn(crate::members::heartbeat(
        client.clone(),
        config.lease_namespace.clone(),
        crate::members::scope(config.namespace.as_deref()),
        identity.clone(),
        timing,
        roles_rx,
        view.members.clone(),
        membership_tx,
        stop_background.clone(),
    ));
    tokio::spawn(crate::members::forget_departed(
        client.clone(),
        config.lease_namespace.clone(),
        crate::members::scope(config.namespace.as_deref()),
        identity.clone(),
        timing,
        view.members.clone(),
        stop_background.clone(),
    ));
    // Ready once it holds its member Lease, not before: a replica that cannot take one (a lease namespace it may not
    // write, a quota of Leases used up) claims nothing, and a rollout must not go on past it. Once ready, it stays so
    // through a lapse: an apiserver outage ends every replica's tenure at once, and the reports Service must keep
    // routing to them meanwhile.
    {
        let (health, mut membership) = (health.clone(), membership.clone());
        tokio::spawn(async move {
            if membership.wait_for(Option::is_some).await.is_ok() {
                health.ready.store(true, Ordering::Relaxed);
                info!("member lease held: ready");
            }
        });
    }
    let recurring = config.recurring_enabled.then(|| {
        let rview = crate::recurring::RecurringView {
            definitions: view.definitions.clone(),
            children: view.children.clone(),
            members: view.members.clone(),
            changed: view.recurring_changed.clone(),
            membership: membership.clone(),
            scope: crate::members::scope(config.namespace.as_deref()),
        };
        let settings = crate::recurring::Settings {
            concurrency: config.recurring_concurrency as usize,
            claim_ahead: config.recurring_claim_ahead.0,
        };
        tokio::spawn(crate::recurring::run(worker.clone(), rview, timing, settings, stop_background.clone()))
    });
    let stop_election = CancellationToken::new();
    let (leader, election) = match config.strategy {
        Strategy::Parallel => (None, None),
        // A replica that runs no jobs must not hold the one Lease that lets jobs run: it never stands.
        Strategy::Exclusive if !config.job_execution_enabled => (Some(watch::channel(None).1), None),
        Strategy::Exclusive => {
            let (tx, rx) = watch::channel(None);
            let task = tokio::spawn(crate::exclusive::elect(
                client.clone(),
                config.lease_namespace.clone(),
                identity.clone(),
                timing,
                tx,
                worker.metrics.renew_failures.clone(),
                stop_election.clone(),
            ));
            (Some(rx), Some(task))
        }
    };
    let stopping = health.clone();
    let shutdown = async move {
        signals.received().await;
        stopping.stopping.store(true, Ordering::Relaxed);
        // No more claims from here on: the member Lease says so with its next renewal, so the others stop leaving
        // this replica's share of the queue's head to it (`ordering::pick`) while its running attempts finish.
        roles.send_modify(|r| r.jobs = false);
    };
    // One list per renew interval confirms every Lease the attempts hold (see `lease::held`).
    let confirming = tokio::spawn(crate::lease::held::confirm_loop(
        client.clone(),
        worker.held.clone(),
        crate::members::member_lease_name(&identity, &crate::members::scope(config.namespace.as_deref())),
        held_lease_namespaces(config.namespace.as_deref(), &config.lease_namespace),
        timing,
        stop_background.clone(),
    ));
    Dispatcher::new(worker.clone(), config, view, membership, leader, health).run(shutdown).await;
    stop_election.cancel();
    if let Some(task) = election {
        let _ = task.await;
    }
    stop_background.cancel();
    let _ = heartbeat.await;
    let _ = confirming.await;
    let _ = clock.await;
    if let Some(task) = recurring {
        let _ = task.await;
    }
    worker.finish_publishing(EVENTS_PATIENCE).await;
    info!(stats = %worker.metrics.summary(), "bgjobs operator stopped");
    Ok(())
}

/// How long a stopping replica waits for its last Events to be published (each is one API request).
const EVENTS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the Leases of this replica's attempts live: its watched namespace (claims, concurrency keys) and the Lease
/// namespace (cluster slots); everywhere when it watches every namespace.
fn held_lease_namespaces(watched: Option<&str>, lease_namespace: &str) -> Option<Vec<String>> {
    let watched = watched?;
    let mut out = vec![watched.to_string(), lease_namespace.to_string()];
    out.dedup();
    Some(out)
}

/// Fail with a hint when the CRD is missing (a list of BackgroundJobs answers 404). An apiserver that has just started
/// answers the same bare 404 until it has loaded the CRDs: where the CRD may be read (cluster mode), its absence
/// fails at once; otherwise the list is asked again for [`crate::client::START_UP_PATIENCE`] first.
async fn ensure_crd(client: &Client, namespace: Option<&str>) -> Result<()> {
    let api: Api<BackgroundJob> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let listed = crate::client::at_start_up("list BackgroundJobs", || async {
        // Only whether the list is answered matters: its one item is not decoded (any job, however written, would
        // otherwise stop every replica at start-up).
        let list = kube::core::Request::new(api.resource_url()).list(&ListParams::default().limit(1));
        match client.request_text(list.map_err(kube::Error::BuildRequest)?).await {
            Ok(_) => Ok(()),
            Err(e) if crate::error::api_code(&e) == Some(404) && crd_absent(client).await => Err(Error::CrdMissing),
            Err(e) => Err(e.into()),
        }
    });
    match listed.await {
        // Any 404 left, the bare `404 page not found` of a path not served above all: no such resource.
        Err(Error::Kube(e)) if crate::error::api_code(&e) == Some(404) => Err(Error::CrdMissing),
        answer => answer,
    }
}

/// Whether the BackgroundJob CRD is certainly not installed (`false` also when it may not be read).
async fn crd_absent(client: &Client) -> bool {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    use kube::Resource;
    let name = format!("{}.{}", BackgroundJob::plural(&()), BackgroundJob::group(&()));
    matches!(crds.get_metadata(&name).await, Err(e) if crate::error::gone(&e))
}

/// This host's addresses (a Pod's: its Pod IPs), where the metrics port, and the Pod's sidecars, are reachable when
/// bound to `0.0.0.0`: the egress policy refuses them there as on loopback.
fn local_addresses() -> Vec<std::net::IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses; the operator's ports and its sidecars are refused on loopback only");
            Vec::new()
        }
    }
}

/// SIGTERM and SIGINT, listened for from when this is made: one that comes before anyone awaits [`Signals::received`]
/// is kept for it.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn received(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM received"),
            _ = self.int.recv() => info!("SIGINT received"),
        }
    }
}
