//! `bgjobs-test-worker`: the adversarial tier's instrumented parts.
//!
//! - `operator`: a bgjobs replica (every flag of `bgjobs operator`) whose `record` handler writes a line to the
//!   shared execution log when it starts, every 50 ms while it really runs, and when it returns
//!   (see `bgjobs_history::model`). A paused or killed process writes nothing, so the log shows what really ran.
//!   `record-thread` does its work on an OS thread, the way handlers run blocking work: the thread stops only when
//!   `ctx.cancel` fires, so the log shows whether it does.
//! - `pod`: the same recording from inside a Pod of a Pod-mode job (reads the job from `BGJOBS_*`).
//! - `record-history`: watch every BackgroundJob in a namespace and append each change to `status.jsonl`, and, when
//!   asked, every Lease of the Lease namespace to `leases.jsonl`.
#![forbid(unsafe_code)]

mod exec_log;
mod recorder;

use std::path::PathBuf;
use std::time::Duration;

use bgjobs::config::OperatorConfig;
use bgjobs::executor::{JobContext, JobError, Registry};
use clap::{Parser, Subcommand};
use serde::Deserialize;

use exec_log::ExecLog;

#[derive(Parser)]
#[command(name = "bgjobs-test-worker", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an operator replica with the recording handlers.
    #[command(args_override_self = true)]
    Operator {
        /// Shared execution log (appended to).
        #[arg(long, env = "BGJOBS_EXEC_LOG")]
        exec_log: PathBuf,
        #[command(flatten)]
        config: Box<OperatorConfig>,
    },
    /// Record one Pod-mode execution from inside its Pod.
    Pod {
        /// Shared execution log (appended to).
        #[arg(long, env = "BGJOBS_EXEC_LOG")]
        exec_log: PathBuf,
        /// How long the work takes.
        #[arg(long, default_value_t = 500)]
        ms: u64,
    },
    /// Append every BackgroundJob change in `namespace` to `<dir>/status.jsonl`, and every Lease change in
    /// `lease_namespace` (if given) to `<dir>/leases.jsonl`, until interrupted.
    RecordHistory {
        /// Namespace to watch.
        #[arg(long)]
        namespace: String,
        /// Also record the Leases of this namespace (the replicas' `--lease-namespace`). Default: no Leases.
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Run folder.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Args of `record`: work for `ms` milliseconds; fail (retryably) while the attempt is below `fail_until_attempt`;
/// succeed with a result of `result_bytes` characters, if set. Other fields are ignored (a test may pad the job).
#[derive(Deserialize)]
struct RecordArgs {
    #[serde(default = "default_ms")]
    ms: u64,
    #[serde(default)]
    fail_until_attempt: i32,
    #[serde(default)]
    result_bytes: usize,
}

fn default_ms() -> u64 {
    300
}

// As the `bgjobs` binary does, so that the benchmarks' CPU and memory figures are the product's.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: bgjobs::allocator::Jemalloc = bgjobs::allocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Operator { exec_log, config } => operator(exec_log, *config).await,
        Command::Pod { exec_log, ms } => pod(exec_log, ms).await,
        Command::RecordHistory { namespace, lease_namespace, dir } => {
            recorder::run(&namespace, lease_namespace.as_deref(), &dir).await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bgjobs-test-worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn operator(exec_log: PathBuf, config: OperatorConfig) -> Result<(), String> {
    bgjobs::cli::init_tracing(config.log_format);
    let log = ExecLog::open(&exec_log).map_err(|e| format!("{}: {e}", exec_log.display()))?;
    let mut registry = Registry::with_builtins();
    let record_log = log.clone();
    registry.register("record", move |ctx: JobContext, args: RecordArgs| {
        let log = record_log.clone();
        async move {
            let run = exec_log::Run::from_ctx(&ctx);
            work(&log, &run, args.ms).await;
            if ctx.attempt < args.fail_until_attempt {
                return Err(JobError::Retryable(format!("record: failing attempt {} as asked", ctx.attempt)));
            }
            if args.result_bytes > 0 {
                ctx.report.set_result(serde_json::json!({"blob": "r".repeat(args.result_bytes)}))?;
            }
            Ok(())
        }
    });
    registry.register("record-thread", move |ctx: JobContext, args: RecordArgs| {
        let log = log.clone();
        async move {
            let run = exec_log::Run::from_ctx(&ctx);
            let cancel = ctx.cancel.clone();
            let ms = args.ms;
            let thread = std::thread::spawn(move || {
                log.write(&run, "start");
                let end = std::time::Instant::now() + Duration::from_millis(ms);
                while std::time::Instant::now() < end {
                    if cancel.is_cancelled() {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    log.write(&run, "tick");
                }
                log.write(&run, "finish");
                true
            });
            // Wait for the thread without blocking the runtime; dropping this future leaves the thread running.
            while !thread.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match thread.join() {
                Ok(true) => Ok(()),
                _ => Err(JobError::Retryable("record-thread: cancelled".into())),
            }
        }
    });
    bgjobs::operator::run(config, registry).await.map_err(|e| e.to_string())
}

/// Log `start`, a `tick` every 50 ms for `ms`, then `finish`. Dropped mid-way (lease lost, stopped), it writes
/// nothing more: the ticks show exactly how long the handler really ran.
async fn work(log: &ExecLog, run: &exec_log::Run, ms: u64) {
    log.write(run, "start");
    let end = tokio::time::Instant::now() + Duration::from_millis(ms);
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50).min(end - tokio::time::Instant::now())).await;
        log.write(run, "tick");
    }
    log.write(run, "finish");
}

async fn pod(exec_log: PathBuf, ms: u64) -> Result<(), String> {
    let log = ExecLog::open(&exec_log).map_err(|e| format!("{}: {e}", exec_log.display()))?;
    let run = exec_log::Run::from_pod_env()?;
    work(&log, &run, ms).await;
    Ok(())
}
