//! The HTTP executor: POST the job's args as JSON; the status code says how it went.
//!
//! 2xx → success; 4xx → permanent failure (the request itself is wrong, retrying will not help; 408 and 429 are
//! the exceptions and are retried); 5xx, a timeout or a connection error → retryable failure.
//! The job's UID goes in `Idempotency-Key` so the receiver can deduplicate retries; `X-BGJobs-Attempt` is the
//! fencing token (a receiver that remembers the highest attempt it saw per key can refuse a stale one) and
//! `X-BGJobs-Worker` names the replica that sent it.

use std::time::Duration;

use super::JobContext;
use crate::api::HttpTarget;
use crate::retry::AttemptResult;

/// Longest part of a response body quoted in `lastError`.
const BODY_EXCERPT: usize = 300;

/// POST `args` to `target.url` for the attempt described by `ctx`.
pub async fn post(
    client: &reqwest::Client,
    target: &HttpTarget,
    ctx: &JobContext,
    args: &serde_json::Value,
    attempt_timeout_seconds: Option<i64>,
) -> AttemptResult {
    let mut req = client
        .post(&target.url)
        .json(args)
        .header("Idempotency-Key", &ctx.uid)
        .header("X-BGJobs-Job", format!("{}/{}", ctx.namespace, ctx.name))
        .header("X-BGJobs-Attempt", ctx.attempt.to_string())
        .header("X-BGJobs-Worker", &ctx.worker);
    for (k, v) in &target.headers {
        req = req.header(k, v);
    }
    if let Some(secs) = target.timeout_seconds.or(attempt_timeout_seconds) {
        req = req.timeout(Duration::from_secs(secs.max(1) as u64));
    }
    let response = tokio::select! {
        r = req.send() => r,
        _ = ctx.cancel.cancelled() => return AttemptResult::Retryable(format!("POST {} was cancelled", target.url)),
    };
    match response {
        Err(e) if e.is_timeout() => AttemptResult::Retryable(format!("POST {} timed out", target.url)),
        Err(e) => AttemptResult::Retryable(format!("POST {} failed: {e}", target.url)),
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                return AttemptResult::Succeeded;
            }
            let body = resp.text().await.unwrap_or_default();
            let excerpt: String = body.chars().take(BODY_EXCERPT).collect();
            let msg = format!("POST {} answered {status}: {excerpt}", target.url);
            let retry_anyway = status.as_u16() == 408 || status.as_u16() == 429;
            if status.is_client_error() && !retry_anyway {
                AttemptResult::Permanent(msg)
            } else {
                AttemptResult::Retryable(msg)
            }
        }
    }
}
