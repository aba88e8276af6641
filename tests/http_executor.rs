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

/// A tiny HTTP/1.1 server on 127.0.0.1: `/ok` answers 200, `/bad` 400, `/redirect/<host:port>` 302 to
/// `http://<host:port>/landed`, anything else 503. Records every request.
async fn serve() -> (String, Arc<Mutex<Vec<Seen>>>) {
    serve_on("127.0.0.1:0").await
}

/// [`serve`] on another address (a loopback address such as `127.0.0.3:0`).
async fn serve_on(addr: &str) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind(addr).await.unwrap();
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
                let (status, location) = match path.as_str() {
                    "/ok" => ("200 OK", String::new()),
                    "/bad" => ("400 Bad Request", String::new()),
                    p if p.starts_with("/redirect/") => {
                        ("302 Found", format!("location: http://{}/landed\r\n", &p["/redirect/".len()..]))
                    }
                    _ => ("503 Service Unavailable", String::new()),
                };
                let reply =
                    format!("HTTP/1.1 {status}\r\n{location}content-length: 7\r\nconnection: close\r\n\r\nanswer!");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_policy_fails_jobs_aimed_at_loopback_the_operators_port_or_outside_the_allowlist_and_send_nothing() {
    let env = TestEnv::new("egress").await;
    let (base, seen) = serve().await;
    // Outside the allowlist: a server on another loopback address.
    let (outside, outside_seen) = serve_on("127.0.0.3:0").await;
    // The operator serves metrics on 127.0.0.1:<port>; a recording server holds the same port on 127.0.0.2, another
    // local address, where the operator's port is refused too.
    let (same_port, same_port_seen) = serve_on("127.0.0.2:0").await;
    let port = same_port.rsplit(':').next().unwrap().to_string();
    let metrics = format!("127.0.0.1:{port}");
    let by_ns = json!({ env.ns.clone(): [format!("{base}/ok"), format!("{base}/redirect/")] }).to_string();
    let _r = env.replica(
        "r",
        &[
            "--metrics-addr",
            &metrics,
            "--egress-allow",
            "127.0.0.1,127.0.0.2/32",
            "--egress-allow-by-namespace",
            &by_ns,
            "--queues",
            "default",
        ],
    );
    // The default: no loopback (a sidecar's port), even where an allowlist names it. Its own queue keeps its jobs
    // from the replica above.
    let _strict = env
        .replica("strict", &["--egress-allow-loopback", "false", "--egress-allow", "127.0.0.1", "--queues", "strict"]);
    let outside_host = outside.trim_start_matches("http://").to_string();
    let jobs = [
        ("ok", format!("{base}/ok")),
        ("metrics", format!("http://{metrics}/metrics")),
        ("same-port", format!("{same_port}/ok")),
        ("outside", format!("{outside}/ok")),
        ("redirect", format!("{base}/redirect/{outside_host}")),
        ("not-in-namespace-list", format!("{base}/bad")),
        ("loopback", format!("{base}/ok")),
    ];
    for (name, url) in &jobs {
        let queue = if *name == "loopback" { "strict" } else { "default" };
        let spec = json!({"jobName": "Notify", "http": {"url": url}, "retry": {"maxAttempts": 3}, "queue": queue});
        env.create(name, spec).await;
    }
    let done = env
        .wait_until(Duration::from_secs(60), "all final", |js| {
            js.len() == jobs.len() && js.iter().all(|j| j.phase().is_final())
        })
        .await;
    let get = |name: &str| {
        let j = done.iter().find(|j| j.name_any() == name).unwrap().clone();
        let error = j.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
        (j.phase(), j.attempts(), error)
    };
    assert_eq!(get("ok").0, Phase::Succeeded, "an allowed loopback endpoint still works: {:?}", get("ok"));
    for (name, wanted) in [
        ("metrics", "rule `operator-port`: 127.0.0.1 port"),
        ("same-port", "rule `operator-port`: 127.0.0.2 port"),
        ("outside", "rule `allowlist`: 127.0.0.3 matches no entry of --egress-allow"),
        ("not-in-namespace-list", &format!("matches no entry of the allowlist of namespace {}", env.ns)),
        ("redirect", "redirects are not followed"),
        ("loopback", "rule `loopback`: 127.0.0.1"),
    ] {
        let (phase, attempts, error) = get(name);
        assert_eq!((phase, attempts), (Phase::Failed, 1), "{name}: refused for good, not retried: {error}");
        assert!(error.contains(wanted), "{name}: {error}");
    }
    assert!(get("metrics").2.contains("nothing was sent"), "{:?}", get("metrics"));
    assert!(same_port_seen.lock().unwrap().is_empty(), "the refused jobs' target received nothing");
    assert!(outside_seen.lock().unwrap().is_empty(), "nothing reached the address outside the allowlist");
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths.iter().filter(|p| *p == "/ok").count(),
        1,
        "only the allowed job's, not the loopback one's: {paths:?}"
    );
    assert!(!paths.iter().any(|p| p == "/bad"), "the namespace's list refused /bad before sending: {paths:?}");
}
