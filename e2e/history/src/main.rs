//! `bgjobs-history`: judge a run folder offline.
//!
//! - `check DIR [limits]`: every guarantee over a recorded history (test worker execution logs, status and Lease
//!   histories, faults); prints one line of figures, then every violation; exit 1 on any.
//! - `audit DIR [--jobs] [--until MS]`: the exactly-once oracle over the operators' audit trail (`*.inv`): prints
//!   [`bgjobs_history::Audit`] as JSON, for the demo's and the benchmarks' reports (`e2e/report.py`); exit 1 on a
//!   duplicate.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use bgjobs_history::{History, Limits, Open, audit, check, pair, read_audit_trail};
use clap::{Parser, Subcommand};

/// Judge a bgjobs run folder offline.
#[derive(Parser)]
#[command(name = "bgjobs-history")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every guarantee over a recorded history; exit 1 on any violation.
    Check {
        /// The run folder (`*.exec`, `status.jsonl`, `leases.jsonl`, `faults.jsonl`).
        dir: PathBuf,
        /// `--cluster-max-concurrency` of the run.
        #[arg(long)]
        cluster_cap: Option<usize>,
        /// `--max-concurrent-jobs-per-instance` of the run.
        #[arg(long)]
        per_replica_cap: Option<usize>,
        /// The lease duration (ms): how near a fault must be to explain a re-execution.
        #[arg(long, default_value_t = Limits::default().lease_ms)]
        lease_ms: i64,
        /// Recurring: the oldest a tick may be when its job is created (ms).
        #[arg(long)]
        catch_up_ms: Option<i64>,
        /// The FIFO bound to check (ms).
        #[arg(long)]
        fifo_bound_ms: Option<i64>,
        /// The run used the exclusive strategy.
        #[arg(long)]
        exclusive: bool,
    },
    /// The exactly-once oracle over the operators' audit trail (`*.inv`), as JSON; exit 1 on a duplicate.
    Audit {
        /// The run folder.
        dir: PathBuf,
        /// Also list every job's first start and executions.
        #[arg(long)]
        jobs: bool,
        /// Until when an execution without an end line may have run (ms; default: the trail's last line).
        #[arg(long)]
        until: Option<i64>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bgjobs-history: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<bool, String> {
    match command {
        Command::Check { dir, cluster_cap, per_replica_cap, lease_ms, catch_up_ms, fifo_bound_ms, exclusive } => {
            let limits = Limits { cluster_cap, per_replica_cap, lease_ms, catch_up_ms, fifo_bound_ms, exclusive };
            let history = History::read(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let report = check(&history, &limits);
            println!("{report}");
            for v in &report.violations {
                println!("VIOLATION {v}");
            }
            Ok(report.ok())
        }
        Command::Audit { dir, jobs, until } => {
            let lines = read_audit_trail(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let horizon = until.or_else(|| lines.iter().map(|l| l.t_ms).max()).unwrap_or(0);
            let report = audit(&pair(&lines, |_| 0), Open::Until(horizon), jobs);
            println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
            Ok(report.duplicates == 0)
        }
    }
}
