//! bgjobs: a Kubernetes operator that turns the cluster into a durable, parallel background-job queue.
//!
//! `BackgroundJob` custom resources are the queue. Every operator replica watches them and drains them in FIFO
//! order (priority, then enqueue order), claiming each job with its own Lease plus a fenced status write, so
//! replicas add throughput without a global lock and no job runs twice at the same time.
//!
//! The flow, one module per step: observe ([`queue`]) → pick ([`ordering`], [`dispatch`]) → claim ([`claim`],
//! [`lease`]) → run ([`attempt`], [`executor`]) → record ([`status`], [`retry`]); work that runs elsewhere
//! reports its outcome back to any replica ([`report`]).
//!
//! Where each guarantee lives: every Lease is written, kept and judged in [`lease`] (one expiry rule, one renew loop);
//! every scheduling decision reads the apiserver's clock ([`clock`]); names derived from user names stay within
//! Kubernetes' limits through [`names`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod api;
pub mod attempt;
pub mod claim;
pub mod cli;
pub mod client;
pub mod clock;
pub mod commands;
pub mod config;
pub mod cron;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod exclusive;
pub mod executor;
pub mod jobs;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod members;
pub mod metrics;
pub mod names;
pub mod nodeagent;
pub mod operator;
pub mod ordering;
pub mod policy;
pub mod queue;
pub mod recurring;
pub mod report;
pub mod retention;
pub mod retry;
pub mod status;
pub mod worker;

pub use error::{Error, Result};
