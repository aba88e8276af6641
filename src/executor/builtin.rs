//! Handlers shipped in the `bgjobs` binary, for demos, tests and benchmarks.
//!
//! - `noop`: succeeds at once.
//! - `sleep` (`{"seconds": 2}`): succeeds after the given time; stops early when cancelled.
//! - `fail` (`{"message": "...", "permanent": false, "panic": false}`): fails, retryably unless `permanent`; with
//!   `panic`, the handler panics instead (to see that a crashing handler fails only its own attempt).

use std::time::Duration;

use serde::Deserialize;

use super::{JobContext, JobError, Registry};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoopArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    seconds: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailArgs {
    #[serde(default = "default_message")]
    message: String,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    panic: bool,
}

fn default_message() -> String {
    "the fail handler failed, as asked".into()
}

/// Register the built-in handlers.
pub fn register(r: &mut Registry) {
    r.register("noop", |_ctx: JobContext, _a: NoopArgs| async { Ok(()) });
    r.register("sleep", |ctx: JobContext, a: SleepArgs| async move {
        let Ok(duration) = Duration::try_from_secs_f64(a.seconds) else {
            return Err(JobError::Permanent(format!(
                "sleep: seconds must be a non-negative number of at most {:e}, got {}",
                Duration::MAX.as_secs_f64(),
                a.seconds
            )));
        };
        tokio::select! {
            _ = tokio::time::sleep(duration) => Ok(()),
            _ = ctx.cancel.cancelled() => Err(JobError::Retryable("sleep was cancelled".into())),
        }
    });
    r.register("fail", |_ctx: JobContext, a: FailArgs| async move {
        if a.panic {
            panic!("{}", a.message);
        }
        Err(if a.permanent { JobError::Permanent(a.message) } else { JobError::Retryable(a.message) })
    });
}
