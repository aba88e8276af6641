//! bgjobs: a Kubernetes operator that turns the cluster into a durable, parallel background-job queue.
//!
//! `BackgroundJob` custom resources are the queue. Every operator replica watches them and drains them in FIFO
//! order (priority, then enqueue order), claiming each job with its own Lease plus a fenced status write, so
//! replicas add throughput without a global lock and no job runs twice at the same time.
//!
//! What a team building its own worker uses: the resource types ([`api`]), enqueueing and managing jobs ([`jobs`]),
//! the handlers a replica runs ([`executor`]), the operator itself ([`operator::run`] with its [`config`]), the
//! report client for work that finishes elsewhere ([`report`]), the names and labels bgjobs writes on the cluster
//! ([`wire`]), the one error type ([`error`]) and the command line ([`cli`]). Everything else is crate-private.
//!
//! Inside, one module per step: observe (`queue`) → pick (`ordering`, `dispatch`) → claim (`claim`, `lease`) → run
//! (`attempt`, `executor`) → record (`status`, `retry`). Where each guarantee lives: every Lease is written, kept
//! and judged in `lease` (one expiry rule, one renew loop); every scheduling decision reads the apiserver's clock
//! (`clock`); names derived from user names stay within Kubernetes' limits through `names`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admission;
pub mod allocator;
pub mod api;
pub(crate) mod attempt;
pub(crate) mod claim;
pub mod cli;
pub(crate) mod client;
pub(crate) mod clock;
pub(crate) mod commands;
pub mod config;
pub(crate) mod cron;
pub(crate) mod dispatch;
pub mod error;
pub(crate) mod events;
pub(crate) mod exclusive;
pub mod executor;
pub mod jobs;
pub(crate) mod keys;
pub(crate) mod lease;
pub(crate) mod limits;
pub(crate) mod list_watch;
pub(crate) mod members;
pub(crate) mod metrics;
pub(crate) mod names;
pub mod operator;
pub(crate) mod ordering;
pub(crate) mod policy;
pub(crate) mod queue;
pub(crate) mod recurring;
pub mod report;
pub(crate) mod retention;
pub(crate) mod retry;
pub(crate) mod serving;
pub(crate) mod status;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod unreadable;
pub mod wire;
pub(crate) mod worker;

pub use error::{Error, Result};
