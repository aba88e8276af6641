//! `bgjobs-history check DIR [--cluster-cap N] [--per-replica-cap N] [--lease-ms MS] [--catch-up-ms MS]
//! [--fifo-bound-ms MS] [--exclusive]`: check a run folder, print one line of figures, then every violation; exit 1
//! on any.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use bgjobs_history::{History, Limits, check};

fn main() -> std::process::ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!(
                "bgjobs-history: {e}\nusage: bgjobs-history check DIR [--cluster-cap N] [--per-replica-cap N] \
                       [--lease-ms MS] [--catch-up-ms MS] [--fifo-bound-ms MS] [--exclusive]"
            );
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<bool, String> {
    let mut args = args.into_iter();
    if args.next().as_deref() != Some("check") {
        return Err("the only command is `check`".into());
    }
    let dir = PathBuf::from(args.next().ok_or("missing DIR")?);
    let mut limits = Limits::default();
    while let Some(flag) = args.next() {
        if flag == "--exclusive" {
            limits.exclusive = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: i64 = value.parse().map_err(|e| format!("{flag} {value}: {e}"))?;
        match flag.as_str() {
            "--cluster-cap" => limits.cluster_cap = Some(n as usize),
            "--per-replica-cap" => limits.per_replica_cap = Some(n as usize),
            "--lease-ms" => limits.lease_ms = n,
            "--catch-up-ms" => limits.catch_up_ms = Some(n),
            "--fifo-bound-ms" => limits.fifo_bound_ms = Some(n),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let history = History::read(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let report = check(&history, &limits);
    println!("{report}");
    for v in &report.violations {
        println!("VIOLATION {v}");
    }
    Ok(report.ok())
}
