//! The offline checker of bgjobs' guarantees.
//!
//! A run (a test, `make chaos`, a benchmark) records what every handler did, what every BackgroundJob looked like
//! and which faults were injected ([`model`]); [`check`] reads that history afterwards and counts every violation
//! of the guarantees: lost or stuck jobs, overlapping executions of one job or one concurrency key, cap
//! violations, executions on two replicas at once under the exclusive strategy, stale status writes,
//! re-executions nobody faulted, duplicate recurring ticks and FIFO inversions beyond the stated bound that no
//! fault explains.
//! Deciding offline, from what was recorded, keeps the checker independent of the code under test.
//!
//! [`executions`] is the exactly-once oracle every other consumer shares: the integration tests, the demo and the
//! benchmarks (`bgjobs-history audit`) judge duplicates with the same code, and the same definition, as [`check`].
#![forbid(unsafe_code)]

pub mod check;
pub mod executions;
pub mod model;

pub use check::{Limits, Report, check};
pub use executions::{Audit, Execution, Open, across_replicas, audit, duplicates, max_overlap, pair};
pub use model::{ExecLine, FaultLine, History, LeaseLine, StatusLine, read_audit_trail};
