//! Asynchronous completion: work that runs outside the operator reports its own outcome.
//!
//! The flow: an HTTP job's endpoint answers `202 Accepted` ([`crate::executor::http`]) → the holder marks the attempt
//! as waiting (`status.awaitingReport`) and watches the job ([`wait`]) while it keeps the claim Lease → the worker,
//! with the token it was sent ([`token`]), POSTs `complete`, `fail` or `heartbeat` to any replica ([`server`]) →
//! that replica checks the token against the job, judges the report ([`decide`]) and writes it under the attempt's
//! fence ([`apply`]) → the holder sees the job move on and gives its claim back.
//!
//! If the holder dies meanwhile, the attempt is adopted like a Pod's ([`crate::claim::adopts`]): the replica that
//! takes over waits for the same report. A report for any other attempt than the current one is refused (409), so a
//! slow or duplicated worker never overwrites a newer attempt's outcome; with `heartbeatTimeoutSeconds`, a worker
//! that goes silent loses its attempt, which is retried per the job's policy.
//!
//! In-process handlers report progress and a result through [`Reporter`] (`ctx.report`); Pod jobs get the token and
//! URL in `BGJOBS_REPORT_TOKEN` and `BGJOBS_REPORT_URL`.

mod apply;
pub mod client;
pub mod decide;
mod handle;
pub mod server;
pub mod token;
mod wait;

pub use apply::{Applied, apply};
pub use decide::{MAX_RESULT_BYTES, Refusal, Report, awaits_report};
pub use handle::Reporter;
