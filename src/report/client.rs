//! Sending a report (`bgjobs report ...`, or any Rust worker): one POST to the report URL.

use std::time::Duration;

use super::decide::Report;
use crate::error::{Error, Result};

/// How long [`send`] keeps sending a report the endpoint answers `503` (send again: the apiserver could not be
/// reached, or the replica is busy).
const SENT_AGAIN_FOR: Duration = Duration::from_secs(30);

/// POST `report` for the attempt `token` names to the report endpoint at `url` (the `--report-url` the operator
/// handed out: `X-BGJobs-Report-Url`, `BGJOBS_REPORT_URL`), sent again on `503` for up to [`SENT_AGAIN_FOR`]. The
/// endpoint's JSON answer; a refusal is an error that carries its status and message.
pub async fn send(url: &str, token: &str, report: &Report) -> Result<serde_json::Value> {
    let until = tokio::time::Instant::now() + SENT_AGAIN_FOR;
    let mut pause = Duration::from_millis(250);
    loop {
        match send_once(url, token, report).await {
            Err(Error::Report(refused))
                if refused.starts_with("503 ") && tokio::time::Instant::now() + pause < until =>
            {
                tracing::debug!(%refused, ?pause, "report refused for now: sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            answer => return answer,
        }
    }
}

async fn send_once(url: &str, token: &str, report: &Report) -> Result<serde_json::Value> {
    let endpoint = format!("{}/v1/{}", url.trim_end_matches('/'), report.kind());
    let body = match report {
        Report::Complete { result } => serde_json::json!({"result": result}),
        Report::Fail { message, retryable } => serde_json::json!({"message": message, "retryable": retryable}),
        Report::Heartbeat { percent, message } => serde_json::json!({"percent": percent, "message": message}),
    };
    let client = reqwest::Client::builder()
        .user_agent("bgjobs")
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::Report(format!("cannot build the HTTP client: {e}")))?;
    let resp = client
        .post(&endpoint)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::Report(format!("POST {endpoint} failed: {e}")))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"error": text}));
    if status.is_success() {
        return Ok(answer);
    }
    let why = answer.get("error").and_then(|e| e.as_str()).unwrap_or(text.as_str()).to_string();
    Err(Error::Report(format!("{} {why}", status.as_u16())))
}
