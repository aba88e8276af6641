//! Typed in-process handlers, registered by `jobName`.
//!
//! ```no_run
//! use bgjobs::executor::{JobContext, JobError, Registry};
//! #[derive(serde::Deserialize)]
//! struct Email { to: String }
//! let mut registry = Registry::with_builtins();
//! registry.register("SendEmail", |ctx: JobContext, email: Email| async move {
//!     if ctx.cancel.is_cancelled() { return Err(JobError::Retryable("cancelled".into())); }
//!     println!("attempt {} sends to {}", ctx.attempt, email.to);
//!     Ok(())
//! });
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::api::Args;
use crate::retry::AttemptResult;

/// What a handler knows about the attempt it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    /// Namespace of the BackgroundJob.
    pub namespace: String,
    /// Name of the BackgroundJob.
    pub name: String,
    /// UID of the BackgroundJob: stable across attempts, a good idempotency key.
    pub uid: String,
    /// `spec.jobName`.
    pub job_name: String,
    /// Attempt number, starting at 1.
    pub attempt: i32,
    /// Identity of the replica running the attempt.
    pub worker: String,
    /// Names of the extra Leases held for the attempt (its cluster slot, its concurrency key's Lease).
    pub leases: Vec<String>,
    /// Cancelled when the attempt must stop: job cancelled or deleted, attempt timeout, lease lost, shutdown.
    /// Handlers doing long work should check it; a handler that ignores it is dropped at its next await point.
    pub cancel: CancellationToken,
    /// Progress and a result for the job's status (`ctx.report.progress(Some(40), Some("copying")).await`,
    /// `ctx.report.set_result(json)?`), and the token and URL a worker elsewhere reports this attempt with.
    pub report: crate::report::Reporter,
}

/// A handler's failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// Another attempt may succeed: retried per the job's retry policy.
    Retryable(String),
    /// No attempt can succeed: the job ends in phase `Failed`.
    Permanent(String),
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Retryable(m) | JobError::Permanent(m) => f.write_str(m),
        }
    }
}

type Handler = Arc<dyn Fn(JobContext, Args) -> BoxFuture<'static, AttemptResult> + Send + Sync>;

/// Handlers by `jobName`.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Handler>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in `noop`, `sleep` and `fail` handlers.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        super::builtin::register(&mut r);
        r
    }

    /// Register `handler` for jobs whose `spec.jobName` is `job_name`. Its args are deserialized from `spec.args`;
    /// args that do not fit fail the job permanently with the deserializer's message.
    pub fn register<A, F, Fut>(&mut self, job_name: &str, handler: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(JobContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let name = job_name.to_string();
        let erased: Handler = Arc::new(move |ctx: JobContext, args: Args| {
            let handler = handler.clone();
            let name = name.clone();
            async move {
                let args: A = match args.decode() {
                    Ok(a) => a,
                    Err(e) => return AttemptResult::Permanent(format!("spec.args do not fit handler {name:?}: {e}")),
                };
                match handler(ctx, args).await {
                    Ok(()) => AttemptResult::Succeeded,
                    Err(JobError::Retryable(m)) => AttemptResult::Retryable(m),
                    Err(JobError::Permanent(m)) => AttemptResult::Permanent(m),
                }
            }
            .boxed()
        });
        self.handlers.insert(job_name.to_string(), erased);
        self
    }

    /// Whether a handler is registered for `job_name`.
    pub fn handles(&self, job_name: &str) -> bool {
        self.handlers.contains_key(job_name)
    }

    /// The registered job names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    /// Run the handler for `ctx.job_name`; an unknown name fails the job permanently.
    pub fn run(&self, ctx: JobContext, args: Args) -> BoxFuture<'static, AttemptResult> {
        match self.handlers.get(&ctx.job_name) {
            Some(h) => h(ctx, args),
            None => {
                let known = self.names().collect::<Vec<_>>().join(", ");
                let msg = format!(
                    "no handler is registered for jobName {:?} on worker {} (registered: {known}); fix spec.jobName, \
                     or set spec.http or spec.template",
                    ctx.job_name, ctx.worker
                );
                async move { AttemptResult::Permanent(msg) }.boxed()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(job_name: &str) -> JobContext {
        JobContext {
            namespace: "ns".into(),
            name: "j".into(),
            uid: "u".into(),
            job_name: job_name.into(),
            attempt: 1,
            worker: "w".into(),
            leases: Vec::new(),
            cancel: CancellationToken::new(),
            report: Default::default(),
        }
    }

    #[derive(serde::Deserialize)]
    struct Args {
        n: u32,
    }

    #[tokio::test]
    async fn typed_args_reach_the_handler_and_its_errors_map_to_results() {
        let mut r = Registry::new();
        r.register("even", |_ctx, a: Args| async move {
            if a.n.is_multiple_of(2) { Ok(()) } else { Err(JobError::Retryable(format!("{} is odd", a.n))) }
        });
        assert_eq!(r.run(ctx("even"), serde_json::json!({"n": 2}).into()).await, AttemptResult::Succeeded);
        assert_eq!(
            r.run(ctx("even"), serde_json::json!({"n": 3}).into()).await,
            AttemptResult::Retryable("3 is odd".into())
        );
    }

    #[tokio::test]
    async fn malformed_args_fail_permanently_with_the_reason() {
        let mut r = Registry::new();
        r.register("even", |_ctx, _a: Args| async { Ok(()) });
        match r.run(ctx("even"), serde_json::json!({"n": "two"}).into()).await {
            AttemptResult::Permanent(m) => assert!(m.contains("spec.args do not fit handler \"even\""), "{m}"),
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unknown_job_name_fails_permanently_and_lists_what_is_registered() {
        let r = Registry::with_builtins();
        match r.run(ctx("SendEmail"), serde_json::json!({}).into()).await {
            AttemptResult::Permanent(m) => {
                assert!(m.contains("\"SendEmail\"") && m.contains("registered: fail, noop, sleep"), "{m}")
            }
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }
}
