//! The `bgjobs` command line: the operator itself, and a client for enqueueing and inspecting jobs.

use std::time::Duration;

use clap::{Parser, Subcommand};
use kube::Api;

use crate::api::{BackgroundJob, Priority, RecurringBackgroundJob};
use crate::client::connect;
use crate::commands::{self, Output};
use crate::config::{HumanDuration, LogFormat, OperatorConfig};
use crate::error::{Error, Result};

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
    /// Run one operator replica (run several for throughput and availability). A flag given twice takes its last
    /// value, so wrappers can append overrides.
    #[command(args_override_self = true)]
    Operator(Box<OperatorConfig>),
    /// Create jobs.
    Enqueue(EnqueueArgs),
    /// List jobs in queue order.
    List(ScopeArgs),
    /// Count jobs by state: waiting, scheduled, running, succeeded, failed, abandoned, cancelled, skipped.
    Stats {
        /// Which jobs.
        #[command(flatten)]
        scope: ScopeArgs,
        /// Refresh until interrupted.
        #[arg(long, short = 'w')]
        watch: bool,
        /// Refresh interval with --watch (at least 200ms).
        #[arg(long, default_value = "2s")]
        interval: HumanDuration,
    },
    /// Show one job: spec, status, conditions and its attempt history (from its Events).
    Describe(NamedArgs),
    /// Re-queue a Failed or Abandoned job. Attempts keep counting (they fence stale workers), so a used-up
    /// `maxAttempts` is raised by another full budget and a passed timeout restarts from now.
    Retry(NamedArgs),
    /// Cancel a job: a waiting job never starts, a running attempt is stopped (`spec.cancel: true`).
    Cancel(NamedArgs),
    /// Report for an attempt that runs outside the operator (an HTTP endpoint answered 202, or a Pod): its outcome,
    /// or a heartbeat with progress. The token and URL come from the request's `X-BGJobs-Report-Token` and
    /// `X-BGJobs-Report-Url` headers, or a Pod's environment. A report answered 503 (the apiserver could not be
    /// reached, the replica is busy), or whose connection is refused or unanswered (a replica that died behind the
    /// reports Service), is sent again for up to 30 s: a complete or fail sent twice is recorded once.
    Report(ReportArgs),
    /// Print a shell completion script: `bgjobs completions bash > /etc/bash_completion.d/bgjobs`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// RecurringBackgroundJobs: list them, or run one now.
    #[command(subcommand)]
    Recurring(RecurringCommand),
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

/// Which jobs a read command looks at, and how it prints them.
#[derive(clap::Args, Debug)]
pub struct ScopeArgs {
    /// Namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(long, short = 'A', conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// table, json or yaml.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// One job by name.
#[derive(clap::Args, Debug)]
pub struct NamedArgs {
    /// The BackgroundJob.
    pub name: String,
    /// Namespace (default: the kubeconfig context's).
    #[arg(long, short = 'n', env = "BGJOBS_NAMESPACE")]
    pub namespace: Option<String>,
    /// table, json or yaml.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// `bgjobs report ...`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// What to report.
    #[command(subcommand)]
    pub kind: ReportKind,
    /// The attempt's report token.
    #[arg(long, env = "BGJOBS_REPORT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The report endpoint.
    #[arg(long, env = "BGJOBS_REPORT_URL", global = true)]
    pub url: Option<String>,
}

/// The kinds of report.
#[derive(Subcommand, Debug)]
pub enum ReportKind {
    /// The work is done (the job succeeds), optionally with a JSON result (at most 32 KiB).
    Complete {
        /// The result, any JSON (e.g. '{"rows": 42}').
        #[arg(long)]
        result: Option<String>,
    },
    /// The work failed: retried per the job's retry policy, or with --permanent, the job fails.
    Fail {
        /// Why, in words a user can act on.
        #[arg(long)]
        message: String,
        /// No retry can fix it.
        #[arg(long)]
        permanent: bool,
    },
    /// The worker is alive (resets the job's heartbeatTimeoutSeconds), optionally with progress.
    Heartbeat {
        /// Percent done, 0 to 100.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=100))]
        percent: Option<i32>,
        /// A short note on what the worker is doing.
        #[arg(long)]
        message: Option<String>,
    },
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
    /// Do not start before this long after creation (e.g. 30s, 5m; rounded up to whole seconds). It must end before
    /// the job's timeout.
    #[arg(long)]
    pub delay: Option<HumanDuration>,
    /// Give up on the job (Abandoned) this long after its creation, whatever its attempts (default 2d).
    #[arg(long)]
    pub timeout: Option<HumanDuration>,
    /// Queue name.
    #[arg(long, default_value = "default")]
    pub queue: String,
    /// Total attempts before the job fails (default: retry until its timeout).
    #[arg(long)]
    pub max_attempts: Option<i32>,
    /// POST the args to this URL instead of running an in-process handler.
    #[arg(long)]
    pub http_url: Option<String>,
    /// How many identical jobs to create, named `<jobname>-<batch>-<index>` and labelled `bgjobs.dev/batch=<batch>`.
    #[arg(short = 'c', long = "count", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Creates in flight at once. Jobs are dispatched in the order the apiserver created them: with `--parallel 1`
    /// that is index order; with more, the order among this call's jobs is close to index order but not promised
    /// (a slow or retried create is overtaken by later ones).
    #[arg(long, default_value_t = crate::jobs::DEFAULT_PARALLEL as u32, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Batch id (1-16 lowercase letters and digits; default: a new random one). Repeating a command that stopped
    /// part-way with the batch id it printed creates the jobs of the batch that do not exist, none twice (a job
    /// already finished and deleted by retention does not exist any more: it is created again). A batch id used
    /// before for other work (another job name or args) is refused.
    #[arg(long)]
    pub batch: Option<String>,
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
            crate::operator::run(*config, crate::executor::Registry::with_builtins()).await
        }
        Command::Enqueue(args) => enqueue(args).await,
        Command::List(scope) => {
            let api = commands::scoped(connect().await?, scope.namespace.as_deref(), scope.all_namespaces);
            commands::list(&api, scope.output).await
        }
        Command::Stats { scope, watch, interval } => {
            let api = commands::scoped(connect().await?, scope.namespace.as_deref(), scope.all_namespaces);
            commands::stats(&api, scope.output, watch, interval.0.max(Duration::from_millis(200))).await
        }
        Command::Describe(a) => {
            let client = connect().await?;
            let api = commands::scoped(client.clone(), a.namespace.as_deref(), false);
            commands::describe(&client, &api, &a.name, a.output).await
        }
        Command::Retry(a) => {
            let api: Api<BackgroundJob> = commands::scoped(connect().await?, a.namespace.as_deref(), false);
            let job = crate::jobs::retry(&api, &a.name).await?;
            let line = format!("backgroundjob.bgjobs.dev/{} re-queued (attempts so far: {})", a.name, job.attempts());
            commands::print_changed(&job, line, a.output)
        }
        Command::Cancel(a) => {
            let api: Api<BackgroundJob> = commands::scoped(connect().await?, a.namespace.as_deref(), false);
            let job = crate::jobs::cancel(&api, &a.name).await?;
            let line = match job.phase() {
                phase if phase.is_final() => {
                    format!("backgroundjob.bgjobs.dev/{} is {phase} already: there is nothing to cancel", a.name)
                }
                _ => format!("backgroundjob.bgjobs.dev/{} cancellation requested", a.name),
            };
            commands::print_changed(&job, line, a.output)
        }
        Command::Report(a) => report(a).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "bgjobs",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Recurring(RecurringCommand::List(scope)) => {
            let api: Api<RecurringBackgroundJob> =
                commands::scoped(connect().await?, scope.namespace.as_deref(), scope.all_namespaces);
            commands::recurring_list(&api, scope.output).await
        }
        Command::Recurring(RecurringCommand::Trigger { name, namespace }) => {
            let client = connect().await?;
            let api: Api<RecurringBackgroundJob> = commands::scoped(client.clone(), namespace.as_deref(), false);
            commands::recurring_trigger(&client, &api, &name).await
        }
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
    // A panic is an error like any other: one log line in the replica's format (JSON included), with where it
    // happened. Handler panics are caught and fail their attempt (see `attempt`); this records them.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info.location().map(|l| l.to_string()).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        tracing::error!(%thread, %location, "a panic unwound: {message}");
    }));
}

async fn report(a: ReportArgs) -> Result<()> {
    let token = a.token.ok_or_else(|| Error::Invalid("no token: pass --token or set BGJOBS_REPORT_TOKEN".into()))?;
    let url = a.url.ok_or_else(|| Error::Invalid("no report URL: pass --url or set BGJOBS_REPORT_URL".into()))?;
    let report = match a.kind {
        ReportKind::Complete { result } => {
            let result = result
                .map(|r| serde_json::from_str(&r).map_err(|e| Error::Invalid(format!("--result is not JSON: {e}"))))
                .transpose()?;
            crate::report::Report::Complete { result }
        }
        ReportKind::Fail { message, permanent } => crate::report::Report::Fail { message, retryable: !permanent },
        ReportKind::Heartbeat { percent, message } => crate::report::Report::Heartbeat { percent, message },
    };
    let answer = crate::report::client::send(&url, &token, &report).await?;
    println!("{}", answer.get("message").and_then(|m| m.as_str()).unwrap_or("recorded"));
    Ok(())
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
    spec.delay_seconds = a.delay.map(|d| whole_seconds(d.0)).transpose()?;
    if let Some(t) = a.timeout {
        spec.timeout_seconds = whole_seconds(t.0)?;
    }
    spec.retry.max_attempts = a.max_attempts;
    spec.http =
        a.http_url.map(|url| crate::api::HttpTarget { url, headers: Default::default(), timeout_seconds: None });
    let api: Api<BackgroundJob> = commands::scoped(connect().await?, a.namespace.as_deref(), false);
    if a.count == 1 && a.batch.is_none() {
        let job = crate::jobs::enqueue(&api, spec).await?;
        println!("backgroundjob.bgjobs.dev/{} created", kube::ResourceExt::name_any(&job));
        return Ok(());
    }
    let batch = a.batch.unwrap_or_else(crate::jobs::new_batch_id);
    let total = a.count as usize;
    // Said before the first create: a call cut off by a signal (Ctrl-C, a CI step's timeout) says nothing after,
    // and repeated under a new batch id it would make every job it had made already a second time.
    eprintln!(
        "batch {batch}: if this call stops part-way, the same command with --batch {batch} creates only the missing jobs"
    );
    let progress = Progress::new(total);
    let specs = vec![spec; total];
    let created = crate::jobs::enqueue_batch(&api, &batch, specs, a.parallel as usize, |n| progress.show(n)).await;
    progress.end();
    for job in created? {
        println!("backgroundjob.bgjobs.dev/{} created", kube::ResourceExt::name_any(&job));
    }
    Ok(())
}

/// A duration given on the command line in whole seconds, rounded up (`500ms` is 1 s: "not before" stays true).
fn whole_seconds(d: std::time::Duration) -> Result<i64> {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).map_err(|_| Error::Invalid(format!("{d:?} is too long")))
}

/// One updating line on stderr (`12000/50000 created, 410/s`), only when stderr is a terminal.
struct Progress {
    total: usize,
    started: std::time::Instant,
    /// When the line was last drawn, and the count it showed.
    last: std::sync::Mutex<Option<(std::time::Instant, usize)>>,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress { total, started: std::time::Instant::now(), last: Default::default(), tty }
    }

    fn show(&self, done: usize) {
        let mut last = self.last.lock().unwrap();
        let now = std::time::Instant::now();
        let due = last.is_none_or(|(t, _)| now.duration_since(t) >= Duration::from_millis(100)) || done == self.total;
        if self.tty && due {
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            eprint!("\r{done}/{} created, {rate:.0}/s  ", self.total);
            *last = Some((now, done));
        }
    }

    fn end(&self) {
        if self.tty && self.last.lock().unwrap().is_some() {
            eprintln!();
        }
    }
}
