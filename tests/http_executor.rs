//! The HTTP executor against a real HTTP server on loopback, driven by an operator replica process.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgjobs::api::Phase;
use common::TestEnv;
use kube::ResourceExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

/// A tiny HTTP/1.1 server: `/ok` answers 200, `/bad` 400, `/flaky` 503. Records every request.
async fn serve() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, content_length) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_string();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap_or(0))
                            })
                            .unwrap_or(0usize);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + content_length {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.lines();
                let path = lines.next().unwrap_or("").split_whitespace().nth(1).unwrap_or("").to_string();
                let headers = lines
                    .filter_map(|l| {
                        l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    })
                    .collect();
                let body = serde_json::from_slice(&buf[head_end..]).unwrap_or(serde_json::Value::Null);
                log.lock().unwrap().push(Seen { path: path.clone(), headers, body });
                let status = match path.as_str() {
                    "/ok" => "200 OK",
                    "/bad" => "400 Bad Request",
                    _ => "503 Service Unavailable",
                };
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 7\r\nconnection: close\r\n\r\nanswer!");
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (base, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_executor_maps_status_codes_to_outcomes_and_sends_the_uid_as_idempotency_key() {
    let env = TestEnv::new("http").await;
    let (base, seen) = serve().await;
    let _r = env.replica("r", &[]);
    let ok = env.create("ok", json!({"jobName": "Notify", "args": {"to": "ops"}, "http": {"url": format!("{base}/ok"), "headers": {"X-Team": "platform"}}})).await;
    env.create("bad", json!({"jobName": "Notify", "http": {"url": format!("{base}/bad")}})).await;
    env.create("flaky", json!({"jobName": "Notify", "http": {"url": format!("{base}/flaky")}, "retry": {"maxAttempts": 2, "backoffSeconds": 0}})).await;
    env.create("refused", json!({"jobName": "Notify", "http": {"url": "http://127.0.0.1:9/nothing-listens"}, "retry": {"maxAttempts": 1}})).await;
    let jobs = env
        .wait_until(Duration::from_secs(60), "all final", |jobs| {
            jobs.len() == 4 && jobs.iter().all(|j| j.phase().is_final())
        })
        .await;
    let get = |name: &str| jobs.iter().find(|j| j.name_any() == name).unwrap().clone();

    assert_eq!(get("ok").phase(), Phase::Succeeded);
    let bad = get("bad");
    assert_eq!((bad.phase(), bad.attempts()), (Phase::Failed, 1), "4xx is permanent: no retry");
    assert!(bad.status.unwrap().last_error.unwrap().contains("400 Bad Request"));
    let flaky = get("flaky");
    assert_eq!((flaky.phase(), flaky.attempts()), (Phase::Failed, 2), "5xx is retried");
    assert!(flaky.status.unwrap().last_error.unwrap().contains("503"));
    let refused = get("refused");
    assert_eq!(refused.phase(), Phase::Failed);
    assert!(refused.status.unwrap().last_error.unwrap().contains("POST http://127.0.0.1:9/nothing-listens failed"));

    let seen = seen.lock().unwrap().clone();
    let to_ok: Vec<_> = seen.iter().filter(|s| s.path == "/ok").collect();
    assert_eq!(to_ok.len(), 1);
    assert_eq!(to_ok[0].body, json!({"to": "ops"}), "args are the JSON body");
    assert_eq!(to_ok[0].headers.get("idempotency-key"), ok.metadata.uid.as_ref());
    assert_eq!(to_ok[0].headers.get("x-team").map(String::as_str), Some("platform"));
    assert_eq!(to_ok[0].headers.get("x-bgjobs-attempt").map(String::as_str), Some("1"));
    assert_eq!(seen.iter().filter(|s| s.path == "/flaky").count(), 2);
}
