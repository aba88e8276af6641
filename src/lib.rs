//! bgjobs: a Kubernetes operator that turns the cluster into a durable, parallel background-job queue.
//!
//! `BackgroundJob` custom resources are the queue. Every operator replica watches them and drains them in FIFO
//! order (priority, then enqueue order), claiming each job with its own Lease plus a fenced status write, so
//! replicas add throughput without a global lock and no job runs twice at the same time.
//!


#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cli;
pub mod error;

pub use error::{Error, Result};
