//! The `bgjobs` command line: the operator itself, and a client for enqueueing and inspecting jobs.

use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::Api;

use crate::api::{BackgroundJob, Priority, RecurringBackgroundJob};
use crate::config::{HumanDuration, LogFormat, OperatorConfig};
use crate::error::{Error, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// bgjobs: a durable, parallel background-job queue made of Kubernetes objects.
///
/// Cluster access follows kubectl: $KUBECONFIG, ~/.kube/config, or the in-cluster ServiceAccount.
#[derive(Parser, Debug)]
#[command(name = "bgjobs", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run one operator replica (run several for throughput and availability).
    Operator(OperatorConfig),
    /// Create jobs.
    Enqueue(EnqueueArgs),
    /// List jobs in queue order.
    List(ScopeArgs),
    /// Count jobs by state: waiting, scheduled, running, succeeded, failed, abandoned, cancelled, skipped.
    Stats(ScopeArgs),
    /// RecurringBackgroundJobs: list them, or run one now.
    #[command(subcommand)]
    Recurring(RecurringCommand),
    /// TEST/DEV TOOLING, NOT FOR PRODUCTION: a local stand-in for a kubelet that runs Pods as local processes.
    ///
    /// For the local control plane, which has no kubelet: registers a Node (and keeps its Lease and Ready condition
    /// fresh), runs the first container's command + args of every Pod the scheduler binds to it as a local child
    /// process (no image, no isolation: it runs on this host as this user), reports Pending → Running →
    /// Succeeded/Failed with exit codes, and kills the process group when the Pod is deleted. restartPolicy is
    /// treated as Never (OnFailure/Always are not implemented). See the module docs of `bgjobs::nodeagent`.
    NodeAgent(crate::nodeagent::NodeAgentConfig),
    /// Print the CustomResourceDefinitions as YAML (`bgjobs crd | kubectl apply --server-side -f -`).
    Crd {
        /// Write one file per CRD into this directory instead (how `crds/` is generated).
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
    },
}

/// `bgjobs recurring ...`.
#[derive(Subcommand, Debug)]
pub enum RecurringCommand {
    /// List recurring jobs with their schedule, last and next tick, and unfinished jobs.
    List(ScopeArgs),
    /// Create a job from a recurring job's template now, outside its schedule.
    Trigger {
        /// The RecurringBackgroundJob.
        name: String,
        /// Namespace (default: the kubeconfig context's).
        #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
        namespace: Option<String>,
    },
}

/// Which jobs a read command looks at.
#[derive(clap::Args, Debug)]
pub struct ScopeArgs {
    /// Namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(long, short = 'A', conflicts_with = "namespace")]
    pub all_namespaces: bool,
}

/// Flags of `bgjobs enqueue`.
#[derive(clap::Args, Debug)]
pub struct EnqueueArgs {
    /// The kind of work (`spec.jobName`): a registered handler, or a built-in: noop, sleep, fail.
    pub job_name: String,
    /// Handler arguments, a JSON object (e.g. '{"seconds": 2}').
    #[arg(long, default_value = "{}")]
    pub args: String,
    /// Low, BelowNormal, Normal, AboveNormal or High.
    #[arg(long, default_value = "Normal")]
    pub priority: Priority,
    /// Do not start before this long after creation (e.g. 30s, 5m).
    #[arg(long)]
    pub delay: Option<HumanDuration>,
    /// Queue name.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Total attempts before the job fails (default: retry until its timeout).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// POST the args to this URL instead of running an in-process handler.
    #[arg(long)]
    pub http_url: Option<String>,
    /// How many identical jobs to create, one after another (they start in that order).
    #[arg(short = 'c', long = "count", default_value_t = 1)]
    pub count: u32,
    /// Namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
    pub namespace: Option<String>,
}

/// Run the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Crd { output_dir: None } => {
            print!("{}", crate::api::crd_yaml());
            Ok(())
        }
        Command::Crd { output_dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for (file, yaml) in crate::api::crd_files() {
                std::fs::write(dir.join(file), yaml)?;
            }
            Ok(())
        }
        Command::Operator(config) => {
            init_tracing(config.log_format);
            crate::operator::run(config, crate::executor::Registry::with_builtins()).await
        }
        Command::NodeAgent(config) => {
            init_tracing(LogFormat::Text);
            crate::nodeagent::run(config).await
        }
        Command::Enqueue(args) => enqueue(args).await,
        Command::List(scope) => list(scope).await,
        Command::Stats(scope) => stats(scope).await,
        Command::Recurring(RecurringCommand::List(scope)) => recurring_list(scope).await,
        Command::Recurring(RecurringCommand::Trigger { name, namespace }) => recurring_trigger(&name, namespace).await,
    }
}

/// Start logging to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn api(namespace: Option<&str>, all: bool) -> Result<Api<BackgroundJob>> {
    let client = crate::client::connect().await?;
    Ok(match (namespace, all) {
        (_, true) => Api::all(client),
        (Some(ns), _) => Api::namespaced(client, ns),
        (None, _) => Api::default_namespaced(client),
    })
}

async fn enqueue(a: EnqueueArgs) -> Result<()> {
    let args: serde_json::Value =
        serde_json::from_str(&a.args).map_err(|e| Error::Invalid(format!("--args is not JSON: {e}")))?;
    if !args.is_object() {
        return Err(Error::Invalid("--args must be a JSON object".into()));
    }
    let mut spec = crate::jobs::spec(&a.job_name, args);
    spec.priority = a.priority;
    spec.queue = a.queue;
    spec.delay_seconds = a.delay.map(|d| d.0.as_secs() as i64);
    spec.retry.max_attempts = a.max_attempts;
    spec.http =
        a.http_url.map(|url| crate::api::HttpTarget { url, headers: Default::default(), timeout_seconds: None });
    let api = api(a.namespace.as_deref(), false).await?;
    for _ in 0..a.count {
        let job = crate::jobs::enqueue(&api, spec.clone()).await?;
        println!("backgroundjob.bgjobs.dev/{} created", kube::ResourceExt::name_any(&job));
    }
    Ok(())
}

async fn list(scope: ScopeArgs) -> Result<()> {
    let api = api(scope.namespace.as_deref(), scope.all_namespaces).await?;
    let mut jobs = crate::jobs::list(&api).await?;
    jobs.sort_by_key(crate::ordering::QueueKey::of);
    let now = jiff::Timestamp::now();
    println!(
        "{:<40} {:<10} {:<12} {:<10} {:>8}  {:<24} AGE",
        "NAME", "PHASE", "PRIORITY", "QUEUE", "ATTEMPTS", "WORKER"
    );
    for j in &jobs {
        let age =
            j.metadata.creation_timestamp.as_ref().map(|t| now.duration_since(t.0).unsigned_abs()).unwrap_or_default();
        println!(
            "{:<40} {:<10} {:<12} {:<10} {:>8}  {:<24} {}",
            kube::ResourceExt::name_any(j),
            j.phase().to_string(),
            j.spec.priority.to_string(),
            j.spec.queue,
            j.attempts(),
            j.status.as_ref().and_then(|s| s.worker.as_deref()).unwrap_or(""),
            short_age(age)
        );
    }
    Ok(())
}

async fn stats(scope: ScopeArgs) -> Result<()> {
    let api = api(scope.namespace.as_deref(), scope.all_namespaces).await?;
    let jobs = crate::jobs::list(&api).await?;
    let c = crate::jobs::counts(&jobs, jiff::Timestamp::now());
    for (name, n) in [
        ("waiting", c.waiting),
        ("scheduled", c.scheduled),
        ("running", c.running),
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("abandoned", c.abandoned),
        ("cancelled", c.cancelled),
        ("skipped", c.skipped),
    ] {
        println!("{name:<10} {n}");
    }
    Ok(())
}

async fn recurring_list(scope: ScopeArgs) -> Result<()> {
    let client = crate::client::connect().await?;
    let api: Api<RecurringBackgroundJob> = match (scope.namespace.as_deref(), scope.all_namespaces) {
        (_, true) => Api::all(client),
        (Some(ns), _) => Api::namespaced(client, ns),
        (None, _) => Api::default_namespaced(client),
    };
    let defs = api.list(&Default::default()).await?.items;
    println!("{:<32} {:<20} {:<8} {:<22} {:<22} ACTIVE", "NAME", "SCHEDULE", "SUSPEND", "LAST", "NEXT");
    for d in defs {
        let s = d.status.clone().unwrap_or_default();
        let time = |t: Option<Time>| t.map(|t| t.0.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<20} {:<8} {:<22} {:<22} {}",
            kube::ResourceExt::name_any(&d),
            d.spec.schedule,
            d.spec.suspend,
            time(s.last_schedule_time),
            time(s.next_schedule_time),
            s.active.len()
        );
    }
    Ok(())
}

async fn recurring_trigger(name: &str, namespace: Option<String>) -> Result<()> {
    let client = crate::client::connect().await?;
    let api: Api<RecurringBackgroundJob> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::default_namespaced(client.clone()),
    };
    let def = api.get_opt(name).await?.ok_or_else(|| Error::Invalid(format!("no RecurringBackgroundJob {name:?}")))?;
    let job = crate::recurring::trigger(&client, &def).await?;
    println!("backgroundjob.bgjobs.dev/{} created", kube::ResourceExt::name_any(&job));
    Ok(())
}

fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}
