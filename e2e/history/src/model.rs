//! What a run records, one JSON object per line, in four kinds of files in one run folder:
//!
//! - `*.exec`: written by the test worker's handlers from inside each execution (in-process or in a Pod): a
//!   `start`, a `tick` every few tens of milliseconds while the handler really runs, and a `finish` when it returns.
//!   A paused or killed process writes nothing, so an execution's activity is known from its own lines.
//! - `status.jsonl`: every BackgroundJob change as a watch delivered it (the recorder).
//! - `leases.jsonl`: every Lease change in the Lease namespace as a watch delivered it (the recorder): who tried to
//!   claim which job, and who led under the exclusive strategy.
//! - `faults.jsonl`: every fault the run injected, with its time and target.
//!
//! Beside them, `*.inv`: the operator's own audit trail (`bgjobs operator --invocation-log`), one `start` and one
//! `end` line per execution and no ticks, read by [`read_audit_trail`]. Under the test worker both exist for the same
//! executions, so they are never mixed.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line written by a handler, or by the operator's audit trail (whose `event` is read as `ev`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExecLine {
    /// `start`, `tick` or `finish` (the audit trail: `start` or `end`).
    #[serde(alias = "event")]
    pub ev: String,
    /// Job UID.
    pub uid: String,
    /// `namespace/name`.
    pub job: String,
    /// Attempt number.
    pub attempt: i32,
    /// Replica identity.
    pub worker: String,
    /// Wall-clock milliseconds of the writing process.
    pub t_ms: i64,
    /// Concurrency key (namespaced), if the job has one.
    #[serde(default)]
    pub key: Option<String>,
    /// Names of the extra Leases held (cluster slot, concurrency key).
    #[serde(default)]
    pub leases: Vec<String>,
    /// Whose clock wrote `t_ms`, when not the worker's own (an HTTP endpoint, a Pod on the host).
    #[serde(default)]
    pub clock: Option<String>,
}

/// One BackgroundJob change as the recorder saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct StatusLine {
    /// When the recorder saw it (wall-clock ms).
    pub t_ms: i64,
    /// Job UID.
    pub uid: String,
    /// `namespace/name`.
    pub job: String,
    /// resourceVersion.
    pub rv: String,
    /// Phase (empty before the first status write).
    pub phase: String,
    /// `status.attempts`.
    pub attempts: i32,
    /// `status.worker`.
    #[serde(default)]
    pub worker: Option<String>,
    /// Priority as a number (higher first).
    #[serde(default)]
    pub priority: i32,
    /// `creationTimestamp` in whole seconds: the enqueue order's first part (bgjobs' `ordering` module), before
    /// `seq`. Histories recorded without it read 0, so their order is `seq` alone.
    #[serde(default)]
    pub created_s: i64,
    /// Enqueue order within a second (the creation revision).
    #[serde(default)]
    pub seq: i64,
    /// Creation time (ms).
    #[serde(default)]
    pub created_ms: i64,
    /// Not runnable before this time (delay), ms.
    #[serde(default)]
    pub not_before_ms: Option<i64>,
    /// Recurring definition that made it, and its tick (ms).
    #[serde(default)]
    pub recurring: Option<String>,
    /// The tick it was made for.
    #[serde(default)]
    pub tick_ms: Option<i64>,
    /// The job's handler is expected to fail and be retried (so re-executions are not suspicious).
    #[serde(default)]
    pub expect_retries: bool,
    /// Pod mode (an adopted attempt keeps its number).
    #[serde(default)]
    pub pod: bool,
    /// This line records a deletion.
    #[serde(default)]
    pub deleted: bool,
    /// `status.startTime` (ms): when the current attempt was claimed, as its claimant wrote it. Dates a claim the
    /// recorder did not see happen (its watch was down).
    #[serde(default)]
    pub started_ms: Option<i64>,
}

/// One Lease change as the recorder saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct LeaseLine {
    /// When the recorder saw it (wall-clock ms).
    pub t_ms: i64,
    /// Lease name.
    pub name: String,
    /// `claim`, `slot`, `key`, `exclusive`, `member`, or empty for a Lease bgjobs does not know.
    pub kind: String,
    /// `spec.holderIdentity` (None while vacant).
    #[serde(default)]
    pub holder: Option<String>,
    /// UID of the job the Lease is held for (claim, slot and key Leases).
    #[serde(default)]
    pub job_uid: Option<String>,
    /// This line records a deletion.
    #[serde(default)]
    pub deleted: bool,
}

/// One injected fault.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FaultLine {
    /// When (wall-clock ms of the runner).
    pub t_ms: i64,
    /// `kill9`, `stop`, `cont`, `term`, `start`, `apiserver-restart`, `apiserver-up`, `proxy-reset`, `proxy-stall`,
    /// `proxy-heal`, `lease-delete`, `clock-offset`, `rbac-remove`, `rbac-restore`, ... A fault that lasts is
    /// closed by its own line: `stop` by `cont`, `rbac-remove` by `rbac-restore`, `apiserver-restart` by
    /// `apiserver-up`, `proxy-stall` by `proxy-heal`.
    pub kind: String,
    /// Replica identity, Lease name, or `cluster`.
    pub target: String,
    /// Free text (e.g. the offset of a clock fault, in ms).
    #[serde(default)]
    pub detail: String,
}

/// Everything one run recorded.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Handler lines, in time order.
    pub exec: Vec<ExecLine>,
    /// Status changes, in time order.
    pub status: Vec<StatusLine>,
    /// Faults, in time order.
    pub faults: Vec<FaultLine>,
    /// Lease changes, in time order.
    pub leases: Vec<LeaseLine>,
}

impl History {
    /// Read a run folder: every `*.exec` file, `status.jsonl`, `faults.jsonl` and `leases.jsonl` (missing files
    /// read as empty).
    pub fn read(dir: &Path) -> std::io::Result<History> {
        let mut h = History::default();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "exec") {
                h.exec.extend(read_lines(&path)?);
            }
        }
        h.status = read_lines(&dir.join("status.jsonl"))?;
        h.faults = read_lines(&dir.join("faults.jsonl"))?;
        h.leases = read_lines(&dir.join("leases.jsonl"))?;
        h.exec.sort_by_key(|l| l.t_ms);
        h.status.sort_by_key(|l| l.t_ms);
        h.faults.sort_by_key(|l| l.t_ms);
        h.leases.sort_by_key(|l| l.t_ms);
        Ok(h)
    }
}

/// Every `*.inv` file in `dir` (the operator's audit trail), in time order.
pub fn read_audit_trail(dir: &Path) -> std::io::Result<Vec<ExecLine>> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "inv") {
            lines.extend(read_lines(&path)?);
        }
    }
    lines.sort_by_key(|l: &ExecLine| l.t_ms);
    Ok(lines)
}

/// Parse a JSON-lines file; a torn last line (a writer killed mid-write) is skipped.
fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Vec<T>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
impl ExecLine {
    /// A hand-made line for tests: event `ev` of `ns/<job>` (UID `uid-<job>`), attempt, worker, time.
    pub(crate) fn at(ev: &str, job: &str, attempt: i32, worker: &str, t_ms: i64) -> ExecLine {
        ExecLine {
            ev: ev.into(),
            uid: format!("uid-{job}"),
            job: format!("ns/{job}"),
            attempt,
            worker: worker.into(),
            t_ms,
            key: None,
            leases: Vec::new(),
            clock: None,
        }
    }
}
