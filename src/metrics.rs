//! Prometheus metrics, and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.
//!
//! Every replica exports its own view: counters of what it did, the jobs it runs, and the queue depth it sees (the
//! same for every replica watching the same namespaces; aggregate with `max`, not `sum`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::api::Phase;

/// Labels of the queue-depth gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct QueueLabels {
    /// Namespace of the jobs.
    pub namespace: String,
    /// `spec.queue`.
    pub queue: String,
    /// `spec.priority`.
    pub priority: String,
}

/// Label of the finished-jobs counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// The final phase, or `Retried` for an attempt that failed and was rescheduled.
    pub phase: String,
}

/// Labels of the Events counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `Normal` or `Warning`.
    pub r#type: String,
    /// The Event's reason: `Retrying`, `Failed`, `TakenOver`, ...
    pub reason: String,
}

/// Label of the skipped-ticks counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `Forbid` (the previous job is unfinished), `StartingDeadline` (too late to start), or `Abandoned` (claimed,
    /// but its job could not be created before the starting deadline).
    pub reason: String,
}

/// One replica's metrics.
pub struct Metrics {
    /// Attempts claimed (including takeovers).
    pub claimed: Counter,
    /// Claims lost to another replica (at a slot, the Lease or the status write).
    pub claim_conflicts: Counter,
    /// Claims the apiserver turned down for a reason that lasts (RBAC, a full quota, a policy): the job is held back
    /// longer at each refusal in a row, and says why in a `ClaimRefused` Warning.
    pub claims_refused: Counter,
    /// Orphaned attempts taken over from a replica that stopped renewing.
    pub takeovers: Counter,
    /// Failed or timed-out Lease renewals.
    pub renew_failures: Counter,
    /// Attempt outcomes not recorded because the claim was no longer this replica's.
    pub stale_results_discarded: Counter,
    /// Deletes of finished jobs this replica sent when their TTL passed (each job is deleted by one replica only).
    pub ttl_deletions: Counter,
    /// Jobs finished (or attempts retried) by this replica, by phase.
    pub finished: Family<PhaseLabel, Counter>,
    /// Kubernetes Events this replica recorded (sent to the apiserver), by type and reason.
    pub events: Family<EventLabels, Counter>,
    /// The sum of `events` (a family cannot be summed), for [`Metrics::summary`].
    events_sum: Counter,
    /// Events the apiserver did not take (RBAC without `create` on `events.k8s.io` events, a quota, an outage): each
    /// is also logged. Those that explain a wait (`ForeignLease`, `ClaimRefused`, `PodNotStarting`) go unsaid.
    pub events_not_recorded: Counter,
    /// Waiting jobs, by namespace, queue and priority.
    pub queue_depth: Family<QueueLabels, Gauge>,
    /// Attempts claimed or running on this replica now.
    pub running: Gauge,
    /// Pod attempts whose Pod was deleted (by this replica when the attempt ended, or by anyone while it ran) and had
    /// not stopped a lease duration past its grace period when last looked at (its node most likely unreachable);
    /// each keeps its slots until the Pod stops or is removed.
    pub pods_not_stopping: Gauge,
    /// 1 while this replica's member Lease says its watches lag (`members::WATCH_LAG_ANNOTATION`): the others leave
    /// it no share of the queue's head.
    pub watch_lagging: Gauge,
    /// Seconds from "runnable, as seen here" to "claimed".
    pub claim_latency: Histogram,
    /// Seconds an attempt's execution took.
    pub run_duration: Histogram,
    /// Seconds from a recurring tick being due (its time plus the definition's jitter offset) to its job created.
    pub recurring_lateness: Histogram,
    /// Jobs of recurring ticks this replica created.
    pub recurring_created: Counter,
    /// Recurring ticks claimed after earlier ones were missed (operator down, suspended): the claim stands in for
    /// them (at most one job for the latest, like CronJob).
    pub recurring_caught_up: Counter,
    /// Recurring ticks this replica skipped, by reason.
    pub recurring_skipped: Family<ReasonLabel, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            claimed: Counter::default(),
            claim_conflicts: Counter::default(),
            claims_refused: Counter::default(),
            takeovers: Counter::default(),
            renew_failures: Counter::default(),
            stale_results_discarded: Counter::default(),
            ttl_deletions: Counter::default(),
            finished: Family::default(),
            events: Family::default(),
            events_sum: Counter::default(),
            events_not_recorded: Counter::default(),
            queue_depth: Family::default(),
            running: Gauge::default(),
            pods_not_stopping: Gauge::default(),
            watch_lagging: Gauge::default(),
            claim_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            run_duration: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            recurring_lateness: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            recurring_created: Counter::default(),
            recurring_caught_up: Counter::default(),
            recurring_skipped: Family::default(),
            registry: Registry::with_prefix("bgjobs"),
        };
        let mut r = Registry::with_prefix("bgjobs");
        r.register("claims", "Attempts claimed, including takeovers", m.claimed.clone());
        r.register("claim_conflicts", "Claims lost to another replica", m.claim_conflicts.clone());
        r.register(
            "claims_refused",
            "Claims the apiserver turned down for a reason that lasts (RBAC, a full quota, a policy)",
            m.claims_refused.clone(),
        );
        r.register(
            "takeovers",
            "Orphaned attempts taken over from a replica that stopped renewing",
            m.takeovers.clone(),
        );
        r.register("lease_renew_failures", "Failed or timed-out Lease renewals", m.renew_failures.clone());
        r.register(
            "stale_results_discarded",
            "Attempt outcomes discarded because the claim was no longer this replica's",
            m.stale_results_discarded.clone(),
        );
        r.register(
            "ttl_deletions",
            "Deletes of finished jobs this replica sent when their TTL passed",
            m.ttl_deletions.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs finished by this replica, by phase (Retried: attempt rescheduled)",
            m.finished.clone(),
        );
        r.register("events", "Kubernetes Events recorded, by type and reason (see --events)", m.events.clone());
        r.register(
            "events_not_recorded",
            "Kubernetes Events the apiserver did not take (RBAC on events.k8s.io, a quota, an outage)",
            m.events_not_recorded.clone(),
        );
        r.register("queue_depth", "Waiting jobs, by namespace, queue and priority", m.queue_depth.clone());
        r.register("running_jobs", "Attempts claimed or running on this replica", m.running.clone());
        r.register(
            "watch_lagging",
            "1 while this replica's member watch shows its own renewals over a second late (its caches lag): the \
             others leave it no share of the queue's head",
            m.watch_lagging.clone(),
        );
        r.register(
            "pods_not_stopping",
            "Pod attempts whose deleted Pod has not stopped a lease duration past its grace period (node unreachable?)",
            m.pods_not_stopping.clone(),
        );
        r.register("claim_latency_seconds", "From runnable (as seen here) to claimed", m.claim_latency.clone());
        r.register("run_duration_seconds", "Execution time of an attempt", m.run_duration.clone());
        r.register(
            "recurring_lateness_seconds",
            "From a recurring tick being due (plus its jitter offset) to its job created by this replica",
            m.recurring_lateness.clone(),
        );
        r.register(
            "recurring_jobs_created",
            "Jobs of recurring ticks this replica created",
            m.recurring_created.clone(),
        );
        r.register(
            "recurring_ticks_caught_up",
            "Recurring ticks claimed after earlier ones were missed, standing in for them",
            m.recurring_caught_up.clone(),
        );
        r.register("recurring_ticks_skipped", "Recurring ticks skipped, by reason", m.recurring_skipped.clone());
        Metrics { registry: r, ..m }
    }
}

/// The queue and priority of a namespace's series that sums the queues [`queue_depth_series`] leaves out: no queue or
/// priority can be spelled so (queues are DNS labels, priorities an enum).
pub const OTHER_QUEUES: &str = "_other";

/// The series of `bgjobs_queue_depth` for `depth`: one per (namespace, queue, priority) while they are at most
/// `series`; past that, the `series` deepest and, per namespace, one [`OTHER_QUEUES`] series with the rest of its
/// waiting jobs, so that tenants who spread jobs over thousands of queue names cannot make as many series in every
/// replica and in Prometheus (each costs memory there for hours), while every namespace's sum holds (installations
/// watch namespaces of their own, so sums across them hold too). At most `series` plus one per namespace with more
/// queues than shown; none for 0. Ties go by name, so the same depths give the same series.
pub fn queue_depth_series(depth: &HashMap<QueueLabels, i64>, series: usize) -> Vec<(QueueLabels, i64)> {
    let mut all: Vec<(QueueLabels, i64)> = depth.iter().map(|(l, n)| (l.clone(), *n)).collect();
    if series == 0 {
        return Vec::new();
    }
    if all.len() <= series {
        return all;
    }
    let deepest_first = |a: &(QueueLabels, i64), b: &(QueueLabels, i64)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    all.select_nth_unstable_by(series - 1, deepest_first);
    let rest = all.split_off(series);
    all.sort_unstable_by(deepest_first);
    let mut other: std::collections::BTreeMap<String, i64> = Default::default();
    for (labels, n) in rest {
        *other.entry(labels.namespace).or_default() += n;
    }
    let other_of = |namespace| QueueLabels { namespace, queue: OTHER_QUEUES.into(), priority: OTHER_QUEUES.into() };
    all.extend(other.into_iter().map(|(namespace, n)| (other_of(namespace), n)));
    all
}

impl Metrics {
    /// Count a recorded outcome (`Waiting` counts as `Retried`).
    pub fn count_outcome(&self, phase: Phase) {
        let phase = match phase {
            Phase::Running => return,
            Phase::Waiting => "Retried".to_string(),
            p => p.to_string(),
        };
        self.finished.get_or_create(&PhaseLabel { phase }).inc();
    }

    /// Show `depth` (waiting jobs per namespace, queue and priority) in `bgjobs_queue_depth`, in at most `series`
    /// series ([`queue_depth_series`]).
    pub fn set_queue_depth(&self, depth: &HashMap<QueueLabels, i64>, series: usize) {
        self.queue_depth.clear();
        for (labels, n) in queue_depth_series(depth, series) {
            self.queue_depth.get_or_create(&labels).set(n);
        }
    }

    /// Count an Event sent to the apiserver.
    pub fn count_event(&self, type_: &kube::runtime::events::EventType, reason: &str) {
        let r#type = format!("{type_:?}");
        self.events.get_or_create(&EventLabels { r#type, reason: reason.to_string() }).inc();
        self.events_sum.inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The counters as one JSON object (logged when a replica stops; read by the benchmarks).
    pub fn summary(&self) -> serde_json::Value {
        let finished = |p: &str| self.finished.get_or_create(&PhaseLabel { phase: p.into() }).get();
        let skipped: u64 = ["Forbid", "StartingDeadline", "Abandoned"]
            .map(|r| self.recurring_skipped.get_or_create(&ReasonLabel { reason: r.into() }).get())
            .iter()
            .sum();
        serde_json::json!({
            "claimed": self.claimed.get(),
            "claim_conflicts": self.claim_conflicts.get(),
            "claims_refused": self.claims_refused.get(),
            "takeovers": self.takeovers.get(),
            "renew_failures": self.renew_failures.get(),
            "stale_results_discarded": self.stale_results_discarded.get(),
            "ttl_deletions": self.ttl_deletions.get(),
            "succeeded": finished("Succeeded"),
            "retried": finished("Retried"),
            "failed": finished("Failed"),
            "abandoned": finished("Abandoned"),
            "cancelled": finished("Cancelled"),
            "events": self.events_total(),
            "recurring_jobs_created": self.recurring_created.get(),
            "recurring_ticks_caught_up": self.recurring_caught_up.get(),
            "recurring_ticks_skipped": skipped,
        })
    }

    /// Events recorded, every type and reason together.
    pub fn events_total(&self) -> u64 {
        self.events_sum.get()
    }
}

/// What the probes report.
#[derive(Default)]
pub struct Health {
    /// Caches synced, the CRD present and the apiserver's clock read.
    pub ready: AtomicBool,
    /// Unix seconds of the dispatcher's last pass; a loop stuck for long fails `/healthz`.
    pub last_pass: AtomicI64,
    /// Set while shutting down: `/readyz` fails so a Service stops routing here.
    pub stopping: AtomicBool,
}

impl Health {
    /// Record a dispatcher pass.
    pub fn beat(&self) {
        self.last_pass.store(jiff::Timestamp::now().as_second(), Ordering::Relaxed);
    }

    fn alive(&self, stale_after: Duration) -> bool {
        let last = self.last_pass.load(Ordering::Relaxed);
        last == 0 || jiff::Timestamp::now().as_second() - last <= stale_after.as_secs() as i64
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> crate::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { continue };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = respond(path, &metrics, &health);
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                if let Err(e) = async {
                    sock.write_all(head.as_bytes()).await?;
                    sock.write_all(body.as_bytes()).await
                }
                .await
                {
                    debug!(error = %e, "metrics client went away");
                }
            });
        }
    });
    Ok(bound)
}

fn respond(path: &str, metrics: &Metrics, health: &Health) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render()),
        "/healthz" if health.alive(Duration::from_secs(60)) => ("200 OK", TEXT, "ok\n".into()),
        "/healthz" => ("503 Service Unavailable", TEXT, "dispatcher loop stalled\n".into()),
        "/readyz" if health.stopping.load(Ordering::Relaxed) => {
            ("503 Service Unavailable", TEXT, "shutting down\n".into())
        }
        "/readyz" if health.ready.load(Ordering::Relaxed) => ("200 OK", TEXT, "ready\n".into()),
        "/readyz" => {
            ("503 Service Unavailable", TEXT, "caches not synced, or the apiserver's clock not read, yet\n".into())
        }
        _ => ("404 Not Found", TEXT, "try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_counted_by_type_and_reason_and_in_total() {
        let m = Metrics::default();
        m.count_event(&kube::runtime::events::EventType::Warning, "Retrying");
        m.count_event(&kube::runtime::events::EventType::Warning, "Retrying");
        m.count_event(&kube::runtime::events::EventType::Normal, "Cancelled");
        let text = m.render();
        assert!(text.contains(r#"bgjobs_events_total{type="Warning",reason="Retrying"} 2"#), "{text}");
        assert!(text.contains(r#"bgjobs_events_total{type="Normal",reason="Cancelled"} 1"#), "{text}");
        assert_eq!(m.summary()["events"], 3);
    }

    #[test]
    fn metrics_render_in_prometheus_text_format_with_the_bgjobs_prefix() {
        let m = Metrics::default();
        m.claim_conflicts.inc();
        m.count_outcome(Phase::Succeeded);
        m.queue_depth
            .get_or_create(&QueueLabels { namespace: "ns".into(), queue: "default".into(), priority: "High".into() })
            .set(7);
        let text = m.render();
        assert!(text.contains("bgjobs_claim_conflicts_total 1"), "{text}");
        assert!(text.contains(r#"bgjobs_jobs_finished_total{phase="Succeeded"} 1"#), "{text}");
        assert!(text.contains(r#"bgjobs_queue_depth{namespace="ns",queue="default",priority="High"} 7"#), "{text}");
        assert_eq!(m.summary()["succeeded"], 1);
    }

    #[test]
    fn queue_depth_keeps_the_deepest_queues_and_sums_the_rest_of_each_namespace_past_its_series_limit() {
        let queue =
            |ns: &str, q: &str| QueueLabels { namespace: ns.into(), queue: q.into(), priority: "Normal".into() };
        let other = |ns: &str| QueueLabels { namespace: ns.into(), queue: "_other".into(), priority: "_other".into() };
        let depth: HashMap<QueueLabels, i64> =
            [(queue("a", "big"), 50), (queue("a", "q1"), 3), (queue("b", "q2"), 3), (queue("b", "q3"), 1)].into();
        let mut all = queue_depth_series(&depth, 4);
        all.sort();
        assert_eq!(all.len(), 4, "within the limit, every queue: {all:?}");
        // The three deepest (a tie at 3 goes by name), and the rest of namespace b.
        let shown = [(queue("a", "big"), 50), (queue("a", "q1"), 3), (queue("b", "q2"), 3), (other("b"), 1)];
        assert_eq!(queue_depth_series(&depth, 3), shown);
        let shown = [(queue("a", "big"), 50), (other("a"), 3), (other("b"), 4)];
        assert_eq!(queue_depth_series(&depth, 1), shown, "every namespace's waiting jobs are still counted");
        assert_eq!(queue_depth_series(&depth, 0), [], "none: the gauge is off");
        let m = Metrics::default();
        let many: HashMap<QueueLabels, i64> = (0..20_000).map(|i| (queue("t", &format!("q{i}")), 1)).collect();
        m.set_queue_depth(&many, 100);
        let text = m.render();
        assert_eq!(text.matches("bgjobs_queue_depth{").count(), 101, "the limit, and one for the rest");
        assert!(text.contains(r#"bgjobs_queue_depth{namespace="t",queue="_other",priority="_other"} 19900"#));
    }

    #[test]
    fn readiness_follows_sync_and_shutdown() {
        let (m, h) = (Metrics::default(), Health::default());
        assert_eq!(respond("/readyz", &m, &h).0, "503 Service Unavailable");
        h.ready.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &m, &h).0, "200 OK");
        h.stopping.store(true, Ordering::Relaxed);
        assert_eq!(respond("/readyz", &m, &h).0, "503 Service Unavailable");
        assert_eq!(respond("/healthz", &m, &h).0, "200 OK");
    }
}
