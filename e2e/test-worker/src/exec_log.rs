//! The shared execution log: one JSON line per event, each written with a single `write` to a file opened with
//! O_APPEND, so lines from many processes never interleave.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bgjobs::executor::JobContext;
use bgjobs_history::ExecLine;

/// What one execution writes on every line.
pub struct Run {
    uid: String,
    job: String,
    attempt: i32,
    worker: String,
    key: Option<String>,
    leases: Vec<String>,
    /// Whose clock writes the lines, when not the worker's (a Pod runs on the host's).
    clock: Option<String>,
}

impl Run {
    /// An in-process execution.
    pub fn from_ctx(ctx: &JobContext) -> Run {
        let key = ctx.leases.iter().find(|l| l.starts_with("bgjobs-key-")).map(|l| format!("{}/{l}", ctx.namespace));
        Run {
            uid: ctx.uid.clone(),
            job: format!("{}/{}", ctx.namespace, ctx.name),
            attempt: ctx.attempt,
            worker: ctx.worker.clone(),
            key,
            leases: ctx.leases.clone(),
            clock: None,
        }
    }

    /// A Pod-mode execution, from the variables bgjobs sets in every container. The "worker" is the attempt's Pod,
    /// whichever replica watches it (an adopted Pod is the same execution).
    pub fn from_pod_env() -> Result<Run, String> {
        let var = |n: &str| std::env::var(n).map_err(|_| format!("{n} is not set: not inside a bgjobs Pod?"));
        let attempt = var("BGJOBS_ATTEMPT")?.parse().map_err(|e| format!("BGJOBS_ATTEMPT: {e}"))?;
        let job = var("BGJOBS_JOB")?;
        Ok(Run {
            uid: var("BGJOBS_JOB_UID")?,
            worker: format!("pod:{job}:{attempt}"),
            job,
            attempt,
            key: None,
            leases: Vec::new(),
            clock: Some("host".into()),
        })
    }
}

/// The log file, shared by every handler of the process.
#[derive(Clone)]
pub struct ExecLog(Arc<Mutex<File>>);

impl ExecLog {
    /// Open (create) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<ExecLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(ExecLog(Arc::new(Mutex::new(file))))
    }

    /// Append one line for `run`.
    pub fn write(&self, run: &Run, ev: &str) {
        let line = ExecLine {
            ev: ev.into(),
            uid: run.uid.clone(),
            job: run.job.clone(),
            attempt: run.attempt,
            worker: run.worker.clone(),
            t_ms: jiff::Timestamp::now().as_millisecond(),
            key: run.key.clone(),
            leases: run.leases.clone(),
            clock: run.clock.clone(),
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        let _ = self.0.lock().unwrap().write_all(text.as_bytes());
    }
}
