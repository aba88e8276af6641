//! Operator configuration: every flag has an environment-variable equivalent (`BGJOBS_...`).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::events::EventLevel;
use crate::lease::LeaseTiming;
use crate::policy::pods::Relaxations;
use crate::policy::{EgressPolicy, PerNamespace, PodPolicy, Policy};
use crate::retention::RetentionPolicy;

/// A duration written like `15s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    /// `15s`, `500ms`, `2m`, `1h 30m` (the `humantime` crate's syntax), or a bare number of seconds (`1.5`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parsed = match s.parse::<f64>() {
            Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}")),
            Err(_) => humantime::parse_duration(s)
                .map_err(|e| format!("invalid duration {s:?} ({e}): expected e.g. 15s, 500ms, 2m")),
        };
        parsed.map(HumanDuration)
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl OperatorConfig {
    /// Reject combinations that cannot work.
    pub fn validate(&self) -> crate::Result<()> {
        if self.strategy == Strategy::Exclusive && !self.queues.is_empty() {
            return Err(crate::Error::Invalid(
                "--strategy exclusive runs every job on the one leader: it cannot be combined with --queues (a leader \
                 serving some queues would starve the others)"
                    .into(),
            ));
        }
        if self.recurring_claim_ahead.0 > MAX_CLAIM_AHEAD {
            return Err(crate::Error::Invalid(format!(
                "--recurring-claim-ahead must be at most {}: the claims of thousands of definitions take seconds, and a \
                 longer lead only keeps `lastScheduleTime` ahead of the clock for longer",
                humantime::format_duration(MAX_CLAIM_AHEAD)
            )));
        }
        Ok(())
    }
}

/// The most `--recurring-claim-ahead` may be.
const MAX_CLAIM_AHEAD: Duration = Duration::from_secs(3600);

/// How replicas share the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Every replica claims and runs jobs concurrently, each job under its own Lease (the default).
    Parallel,
    /// One cluster-wide Lease: only its holder runs jobs (the behaviour of single-lock job managers).
    Exclusive,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `bgjobs operator`.
#[derive(Args, Clone, Debug)]
pub struct OperatorConfig {
    /// Watch BackgroundJobs in this namespace only (default: all namespaces).
    #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
    pub namespace: Option<String>,

    /// This replica's identity, written into Leases and `status.worker`. Default: `$POD_NAME`, else
    /// `<hostname>-<pid>`; a restarted process gets a new identity either way (pid / pod UID change).
    #[arg(long, env = "BGJOBS_IDENTITY")]
    pub identity: Option<String>,

    /// `parallel`: every replica runs jobs; `exclusive`: only the holder of one cluster-wide Lease does (only
    /// replicas that run jobs stand for it, and it cannot be combined with `--queues`).
    #[arg(long, value_enum, default_value = "parallel", env = "BGJOBS_STRATEGY")]
    pub strategy: Strategy,

    /// Never run more than this many jobs at once on this replica.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..), env = "BGJOBS_MAX_CONCURRENT_JOBS_PER_INSTANCE")]
    pub max_concurrent_jobs_per_instance: u32,

    /// Never run more than this many jobs at once across all replicas (enforced with N slot Leases in
    /// `--lease-namespace`, at most 10000: every replica caches and looks through them all). Default: no
    /// cluster-wide cap.
    #[arg(
        long,
        value_parser = clap::value_parser!(u32).range(1..=crate::limits::MAX_CLUSTER_SLOTS as i64),
        env = "BGJOBS_CLUSTER_MAX_CONCURRENCY"
    )]
    pub cluster_max_concurrency: Option<u32>,

    /// `false`: this replica watches and keeps the queue tidy (timeouts, cancellations, TTL) but runs no jobs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "BGJOBS_JOB_EXECUTION_ENABLED")]
    pub job_execution_enabled: bool,

    /// Only run jobs of these queues (comma-separated). Default: every queue.
    #[arg(long, value_delimiter = ',', env = "BGJOBS_QUEUES")]
    pub queues: Vec<String>,

    /// An in-process job whose `jobName` has no handler in this binary is left for a replica that has one (a
    /// rolling update that adds a handler, or deployments built with different handlers) while a live replica says
    /// it has the handler, and this long after both the job may run and such a replica was last seen. Then this
    /// replica takes it and fails it, naming the handlers it has.
    #[arg(long, default_value = "5m", env = "BGJOBS_UNKNOWN_HANDLER_GRACE")]
    pub unknown_handler_grace: HumanDuration,

    /// Others take over a claim once they have seen it, and the member Lease that vouches for it, unchanged this long.
    #[arg(long, default_value = "15s", env = "BGJOBS_LEASE_DURATION")]
    pub lease_duration: HumanDuration,

    /// A replica that could not renew its member Lease (or confirm an attempt's Leases) for this long stops those
    /// attempts (must be < lease duration).
    #[arg(long, default_value = "10s", env = "BGJOBS_RENEW_DEADLINE")]
    pub renew_deadline: HumanDuration,

    /// How often each replica renews its member Lease and confirms the Leases its attempts hold (must be < renew
    /// deadline).
    #[arg(long, default_value = "3s", env = "BGJOBS_RENEW_INTERVAL")]
    pub renew_interval: HumanDuration,

    /// Namespace of the cluster-wide Leases (replica membership, exclusive strategy, cluster concurrency slots).
    #[arg(long, default_value = "default", env = "POD_NAMESPACE")]
    pub lease_namespace: String,

    /// On SIGTERM/SIGINT: stop claiming, let running jobs finish for this long, then cancel them and release their
    /// Leases so other replicas pick them up at once (a Pod, or an HTTP request still unanswered, is handed over:
    /// taken over a lease duration later).
    #[arg(long, default_value = "25s", env = "BGJOBS_SHUTDOWN_GRACE")]
    pub shutdown_grace: HumanDuration,

    /// How long finished jobs are kept, per outcome and namespace: comma-separated `[NAMESPACE/]OUTCOME=DURATION`
    /// rules, OUTCOME one of succeeded, failed, abandoned, cancelled, skipped, or finished (all five); DURATION like
    /// 30s, 10m, 7d, or `never`. A namespace's rule beats the cluster-wide one; a later rule beats an earlier one.
    /// A job's own `spec.ttlSecondsAfterFinished` beats every rule; jobs of a RecurringBackgroundJob are kept for
    /// its history limits. Unset outcomes: succeeded and skipped 5m, failed, abandoned and cancelled 7d.
    /// Example: `succeeded=1h,audit/finished=never`.
    #[arg(long, default_value = "", hide_default_value = true, env = "BGJOBS_RETENTION")]
    pub retention: RetentionPolicy,

    /// Legacy: keep every finished job this many seconds, in every namespace (below `--retention`'s rules, above
    /// its defaults). Prefer `--retention finished=DURATION`.
    #[arg(long, env = "BGJOBS_TTL_SECONDS_AFTER_FINISHED")]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Append one JSON line per attempt start and end to this file (an audit trail; tests use it to prove that no
    /// job ran twice at the same time).
    #[arg(long, env = "BGJOBS_INVOCATION_LOG")]
    pub invocation_log: Option<PathBuf>,

    /// Create the jobs of RecurringBackgroundJob schedules (the work is shared among the replicas that have it on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "BGJOBS_RECURRING_ENABLED")]
    pub recurring_enabled: bool,

    /// Reconcile at most this many RecurringBackgroundJobs at once on this replica (each one's ticks stay in
    /// order). A tick costs each definition two API writes, the claim and the create; this many definitions wait on
    /// them together.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024), env = "BGJOBS_RECURRING_CONCURRENCY")]
    pub recurring_concurrency: u32,

    /// Claim a recurring tick (record it in the definition's status) up to this long before it is due, so that the
    /// only API write left when it comes is its job's create: a thousand definitions on one schedule then get their
    /// jobs in about the time of a thousand creates. Applies to schedules whose ticks are at least twice this far
    /// apart, and never sooner than halfway from the tick claimed before. An edit of the definition's spec before
    /// the tick is due takes the claim back, so a suspend or a new schedule applies at once. Not to
    /// `concurrencyPolicy: Forbid` (decided at the tick). Replicas may run with different values (as while a change
    /// of it rolls out); at most 1h. `0` claims each tick when it is due. At 4.5s or less, the definition is read
    /// again at the tick before its job is created (replicas' clocks may disagree by that much): one more read per
    /// tick.
    #[arg(long, default_value = "10s", env = "BGJOBS_RECURRING_CLAIM_AHEAD")]
    pub recurring_claim_ahead: HumanDuration,

    /// Which Kubernetes Events to record on jobs and recurring definitions: `problems` (retries, failures,
    /// give-ups, takeovers, cancellations, skips), `all` (also one `Claimed` per attempt, `Succeeded` and reported
    /// `Progress`), or `off`. `true`/`false` still mean all/off. Every Event recorded is counted in `bgjobs_events_total`.
    #[arg(long, value_enum, default_value = "problems", env = "BGJOBS_EVENTS")]
    pub events: EventLevel,

    /// The most (namespace, queue, priority) series `bgjobs_queue_depth` shows: past it, the deepest, and per
    /// namespace one `queue="_other"` series with the rest of its waiting jobs, so that jobs spread over thousands of
    /// queue names cannot make as many series. 0: no queue-depth series.
    #[arg(long, default_value_t = 100, env = "BGJOBS_QUEUE_DEPTH_SERIES")]
    pub queue_depth_series: usize,

    /// Serve `/metrics` (Prometheus), `/healthz` and `/readyz` on this address, e.g. `0.0.0.0:8080` in a Pod.
    /// Default: not served.
    #[arg(long, env = "BGJOBS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Serve the report endpoint (HTTP: `POST /v1/complete`, `/v1/fail`, `/v1/heartbeat`) on this address, e.g.
    /// `0.0.0.0:8090`: workers of asynchronous jobs report their outcome, heartbeats and progress to any replica.
    /// Default: not served.
    #[arg(long, env = "BGJOBS_REPORT_ADDR")]
    pub report_addr: Option<std::net::SocketAddr>,

    /// The URL workers report to, handed out with each HTTP request (`X-BGJobs-Report-Url`) and Pod
    /// (`BGJOBS_REPORT_URL`): the Service in front of every replica's `--report-addr` (the chart's
    /// `http://<release>-reports.<namespace>.svc:8090`). Unset: nothing is handed out, and a `202 Accepted` is a
    /// success like any 2xx.
    #[arg(long, env = "BGJOBS_REPORT_URL")]
    pub report_url: Option<url::Url>,

    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "BGJOBS_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// HTTP executor: send only to destinations matching one of these (comma-separated): host names
    /// (`api.example.com`, `*.example.com`), addresses or CIDRs (`10.0.0.0/8`), URL prefixes
    /// (`https://hooks.example.com/bgjobs/`). Default: anywhere not refused by the fixed rules (metadata, link-local,
    /// the operator's own ports).
    #[arg(long, value_delimiter = ',', env = "BGJOBS_EGRESS_ALLOW")]
    pub egress_allow: Vec<crate::policy::egress::Entry>,

    /// HTTP executor: allowlists per namespace as JSON, e.g. `{"team-a": ["https://hooks.example.com/"]}`; a
    /// namespace's list narrows `--egress-allow` for its jobs.
    #[arg(long, default_value = "{}", env = "BGJOBS_EGRESS_ALLOW_BY_NAMESPACE")]
    pub egress_allow_by_namespace: PerNamespace<Vec<crate::policy::egress::Entry>>,

    /// HTTP executor: allow link-local destinations (169.254.0.0/16, fe80::/10). Cloud metadata addresses stay
    /// refused.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_EGRESS_ALLOW_LINK_LOCAL")]
    pub egress_allow_link_local: bool,

    /// HTTP executor: allow loopback and the operator Pod's own addresses, where its sidecars listen (a service
    /// mesh's admin port). The operator's own ports stay refused.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_EGRESS_ALLOW_LOOPBACK")]
    pub egress_allow_loopback: bool,

    /// Pod executor: allow privileged containers.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_POD_ALLOW_PRIVILEGED")]
    pub pod_allow_privileged: bool,

    /// Pod executor: allow `allowPrivilegeEscalation: true`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_POD_ALLOW_PRIVILEGE_ESCALATION")]
    pub pod_allow_privilege_escalation: bool,

    /// Pod executor: allow `hostNetwork`, `hostPID`, `hostIPC` and `hostPort`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_POD_ALLOW_HOST_NAMESPACES")]
    pub pod_allow_host_namespaces: bool,

    /// Pod executor: allow `hostPath` volumes.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, env = "BGJOBS_POD_ALLOW_HOST_PATH")]
    pub pod_allow_host_path: bool,

    /// Pod executor: capabilities containers may add (comma-separated, e.g. `NET_ADMIN`). Default: none.
    #[arg(long, value_delimiter = ',', env = "BGJOBS_POD_ALLOWED_CAPABILITIES")]
    pub pod_allowed_capabilities: Vec<String>,

    /// Pod executor: ServiceAccounts a job's Pod may run as (comma-separated), in its own namespace.
    #[arg(long, value_delimiter = ',', default_value = "default", env = "BGJOBS_POD_SERVICE_ACCOUNTS")]
    pub pod_service_accounts: Vec<String>,

    /// Pod executor: relaxations per namespace as JSON, added to the global ones, e.g.
    /// `{"infra": {"hostPath": true, "serviceAccounts": ["builder"]}}` (keys: privileged, privilegeEscalation,
    /// hostNamespaces, hostPath, capabilities, serviceAccounts).
    #[arg(long, default_value = "{}", env = "BGJOBS_POD_POLICY_BY_NAMESPACE")]
    pub pod_policy_by_namespace: PerNamespace<crate::policy::pods::Relaxations>,

    /// Pod executor: before creating a job's Pod, ask the apiserver (a LocalSubjectAccessReview) whether the job's
    /// creator, as the admission webhook recorded them, may create pods in its namespace; fail the job naming the
    /// user if not. `if-recorded`: jobs without a record are not checked; `required`: they fail.
    #[arg(long, value_enum, default_value = "off", env = "BGJOBS_POD_CREATOR_CHECK")]
    pub pod_creator_check: crate::policy::creator::CreatorCheck,

    /// Serve the admission webhook (HTTPS, path `/mutate`) on this address, e.g. `0.0.0.0:9443`: it records who
    /// creates each BackgroundJob and RecurringBackgroundJob and refuses changes to that record. Needs
    /// `--admission-cert-dir`. Default: not served.
    #[arg(long, env = "BGJOBS_ADMISSION_ADDR", requires = "admission_cert_dir")]
    pub admission_addr: Option<std::net::SocketAddr>,

    /// Directory with the webhook's serving certificate and key as `tls.crt` and `tls.key` (a mounted
    /// `kubernetes.io/tls` Secret); reloaded when they change.
    #[arg(long, env = "BGJOBS_ADMISSION_CERT_DIR")]
    pub admission_cert_dir: Option<PathBuf>,
}

impl OperatorConfig {
    /// Lease timing from the flags.
    pub fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            duration: self.lease_duration.0,
            renew_deadline: self.renew_deadline.0,
            renew_interval: self.renew_interval.0,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> String {
        if let Some(id) = &self.identity {
            return id.clone();
        }
        if let Ok(pod) = std::env::var("POD_NAME")
            && !pod.is_empty()
        {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "bgjobs".into());
        format!("{host}-{}", std::process::id())
    }

    /// The egress and Pod policies the flags describe. `local_addrs`: this host's addresses, where the operator's
    /// own ports are refused besides loopback.
    pub fn policy(&self, local_addrs: Vec<std::net::IpAddr>) -> Policy {
        Policy {
            egress: EgressPolicy {
                allow: self.egress_allow.clone(),
                allow_by_namespace: self.egress_allow_by_namespace.0.clone(),
                allow_link_local: self.egress_allow_link_local,
                allow_loopback: self.egress_allow_loopback,
                operator_ports: self
                    .metrics_addr
                    .iter()
                    .chain(&self.admission_addr)
                    .chain(&self.report_addr)
                    .map(|a| a.port())
                    .collect(),
                local_addrs,
            },
            pods: PodPolicy {
                global: Relaxations {
                    privileged: self.pod_allow_privileged,
                    privilege_escalation: self.pod_allow_privilege_escalation,
                    host_namespaces: self.pod_allow_host_namespaces,
                    host_path: self.pod_allow_host_path,
                    capabilities: self.pod_allowed_capabilities.clone(),
                    service_accounts: self.pod_service_accounts.clone(),
                },
                by_namespace: self.pod_policy_by_namespace.clone(),
                creator_check: self.pod_creator_check,
            },
        }
    }

    /// Whether this replica runs jobs of `queue`.
    pub fn serves_queue(&self, queue: &str) -> bool {
        serves(&self.queues, queue)
    }
}

/// Whether a replica that serves `queues` (empty: every queue) runs jobs of `queue`.
pub fn serves(queues: &[String], queue: &str) -> bool {
    queues.is_empty() || queues.iter().any(|q| q == queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_port_is_one_of_the_operators_own_ports_that_jobs_may_not_call() {
        use clap::Parser;
        let args = ["bgjobs", "operator", "--metrics-addr", "0.0.0.0:8080", "--report-addr", "0.0.0.0:8090"];
        let crate::cli::Command::Operator(config) = crate::cli::Cli::try_parse_from(args).unwrap().command else {
            panic!("not the operator command")
        };
        assert_eq!(config.policy(vec![]).egress.operator_ports, [8080, 8090]);
        assert!(!config.policy(vec![]).egress.allow_loopback, "loopback (a sidecar's port) is refused by default");
    }

    #[test]
    fn a_claim_ahead_beyond_an_hour_is_refused_with_the_flag_named() {
        use clap::Parser;
        let config = |ahead: &str| {
            let args = ["bgjobs", "operator", "--recurring-claim-ahead", ahead];
            let crate::cli::Command::Operator(config) = crate::cli::Cli::try_parse_from(args).unwrap().command else {
                panic!("not the operator command")
            };
            config
        };
        assert!(config("1h").validate().is_ok());
        assert!(config("0").validate().is_ok());
        let err = config("10000000h").validate().unwrap_err().to_string();
        assert!(err.contains("--recurring-claim-ahead must be at most 1h"), "{err}");
    }

    #[test]
    fn a_cluster_cap_beyond_the_slots_every_replica_can_cache_is_refused_with_the_flag_named() {
        use clap::Parser;
        let parse =
            |cap: &str| crate::cli::Cli::try_parse_from(["bgjobs", "operator", "--cluster-max-concurrency", cap]);
        assert!(parse("10000").is_ok());
        let err = parse("10001").err().unwrap().to_string();
        assert!(err.contains("--cluster-max-concurrency") && err.contains("1..=10000"), "{err}");
    }

    #[test]
    fn durations_read_like_kubectl_flags() {
        let d = |s: &str| s.parse::<HumanDuration>().map(|h| h.0);
        assert_eq!(d("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(d("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(d("5 parsecs").is_err());
        assert!(d("").is_err());
        assert!(d("-1").is_err());
        assert!(d("1e20").is_err(), "too large for a duration: an error, not a panic");
    }
}
