//! Sending a report (`bgjobs report ...`, or any Rust worker): one POST to the report URL.

use std::time::Duration;

use super::decide::Report;
use crate::error::{Error, Result};

/// How long [`send`] keeps sending a report the endpoint answers `503` (send again: the apiserver could not be
/// reached, or the replica is busy), or that does not reach it (a replica killed or stopped behind the reports
/// Service, until the Service stops sending to it).
const SENT_AGAIN_FOR: Duration = Duration::from_secs(30);

/// How long one send waits for its answer: short enough that a send to a replica that stopped answering (paused, or
/// its address dropping packets) is sent again within [`SENT_AGAIN_FOR`].
const ONE_SEND_WAITS: Duration = Duration::from_secs(8);

/// POST `report` for the attempt `token` names to the report endpoint at `url` (the `--report-url` the operator
/// handed out: `X-BGJobs-Report-Url`, `BGJOBS_REPORT_URL`), sent again on `503`, a refused or reset connection or no
/// answer, for up to [`SENT_AGAIN_FOR`]: a report sent again is safe (a `complete` or `fail` already recorded is
/// answered as recorded; a heartbeat is written again). The endpoint's JSON answer; a refusal is an error that carries
/// its status and message.
pub async fn send(url: &str, token: &str, report: &Report) -> Result<serde_json::Value> {
    let until = tokio::time::Instant::now() + SENT_AGAIN_FOR;
    let mut pause = Duration::from_millis(250);
    loop {
        match send_once(url, token, report).await {
            Err(Unsent::Again(e)) if tokio::time::Instant::now() + pause < until => {
                tracing::debug!(error = %e, ?pause, "report not taken for now: sending it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            Err(Unsent::Again(e) | Unsent::Refused(e)) => return Err(e),
            Ok(answer) => return Ok(answer),
        }
    }
}

/// Why one send of a report did not go through.
enum Unsent {
    /// It may go through if sent again: `503`, or the endpoint not reached or not answering.
    Again(Error),
    /// Refused for good (or the client could not be built).
    Refused(Error),
}

async fn send_once(url: &str, token: &str, report: &Report) -> std::result::Result<serde_json::Value, Unsent> {
    let endpoint = format!("{}/v1/{}", url.trim_end_matches('/'), report.kind());
    let body = match report {
        Report::Complete { result } => serde_json::json!({"result": result}),
        Report::Fail { message, retryable } => serde_json::json!({"message": message, "retryable": retryable}),
        Report::Heartbeat { percent, message } => serde_json::json!({"percent": percent, "message": message}),
    };
    let client = reqwest::Client::builder()
        .user_agent("bgjobs")
        .timeout(ONE_SEND_WAITS)
        .build()
        .map_err(|e| Unsent::Refused(Error::Report(format!("cannot build the HTTP client: {e}"))))?;
    let resp = client.post(&endpoint).bearer_auth(token).json(&body).send().await.map_err(|e| {
        let failed = Error::Report(format!("POST {endpoint} failed: {e}"));
        if e.is_connect() || e.is_timeout() || e.is_request() { Unsent::Again(failed) } else { Unsent::Refused(failed) }
    })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"error": text}));
    if status.is_success() {
        return Ok(answer);
    }
    let why = answer.get("error").and_then(|e| e.as_str()).unwrap_or(text.as_str()).to_string();
    let refused = Error::Report(format!("{} {why}", status.as_u16()));
    Err(if status.as_u16() == 503 { Unsent::Again(refused) } else { Unsent::Refused(refused) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Read one request on `conn` and answer it `status` with the JSON `body`.
    async fn answer(mut conn: TcpStream, status: &str, body: &str) {
        let mut request = vec![0; 4096];
        let _ = conn.read(&mut request).await.unwrap();
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        conn.write_all(answer.as_bytes()).await.unwrap();
    }

    async fn send_to(port: u16, report: Report) -> Result<serde_json::Value> {
        send(&format!("http://127.0.0.1:{port}"), "token", &report).await
    }

    const RECORDED: &str = "{\"recorded\":true}";

    /// A report endpoint that refuses connections at first (its replica killed, or not listening yet) and listens
    /// a second later: the report is sent again and lands. Before: the first refused connection was the answer.
    #[tokio::test]
    async fn a_report_whose_connection_is_refused_is_sent_again_until_the_endpoint_listens() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let serve = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            answer(listener.accept().await.unwrap().0, "200 OK", RECORDED).await;
        });
        let sent = send_to(port, Report::Heartbeat { percent: Some(50), message: None }).await;
        assert_eq!(sent.unwrap(), serde_json::json!({"recorded": true}));
        serve.await.unwrap();
    }

    /// A replica that takes the connection and never answers (paused): the send is given up after
    /// [`ONE_SEND_WAITS`] and sent again, to the one that answers. Before: one send waited 30 s, the whole budget.
    #[tokio::test]
    async fn a_report_left_unanswered_is_sent_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = tokio::spawn(async move {
            let (_silent, _) = listener.accept().await.unwrap();
            answer(listener.accept().await.unwrap().0, "200 OK", RECORDED).await;
        });
        let sent = send_to(port, Report::Complete { result: None }).await;
        assert_eq!(sent.unwrap(), serde_json::json!({"recorded": true}));
        serve.await.unwrap();
    }

    /// A refusal other than `503` is the answer: sent once.
    #[tokio::test]
    async fn a_report_refused_for_good_is_not_sent_again() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = tokio::spawn(async move {
            let body = "{\"error\":\"the attempt is no longer current\"}";
            answer(listener.accept().await.unwrap().0, "409 Conflict", body).await;
            // A second connection would be a second send.
            tokio::time::timeout(Duration::from_secs(2), listener.accept()).await.is_ok()
        });
        let refused = send_to(port, Report::Heartbeat { percent: None, message: None }).await.unwrap_err();
        assert!(refused.to_string().contains("409 the attempt is no longer current"), "{refused}");
        assert!(!serve.await.unwrap(), "sent again");
    }
}
