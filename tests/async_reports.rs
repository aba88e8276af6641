//! Asynchronous HTTP jobs on the local control plane: the endpoint answers 202, a worker elsewhere reports the
//! outcome (with heartbeats and progress) to any replica's report endpoint, and only the current attempt's reports
//! count. Every HTTP server and report endpoint listens on 127.0.0.1.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase};
use bgjobs::report::{Report, client, token};
use common::{TestEnv, free_port};
use kube::ResourceExt;
use kube::api::{WatchEvent, WatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MINUTE: Duration = Duration::from_secs(60);

/// `--report-addr` and `--report-url` for a replica serving reports on its own loopback port; and that URL.
fn reporting(port: u16) -> ([String; 4], String) {
    let url = format!("http://127.0.0.1:{port}");
    (["--report-addr".into(), format!("127.0.0.1:{port}"), "--report-url".into(), url.clone()], url)
}

fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// One request an accepting endpoint received.
#[derive(Clone, Debug)]
struct Accepted {
    attempt: i32,
    token: String,
    url: String,
}

/// An endpoint on 127.0.0.1 that answers every POST `202 Accepted` and records the attempt, token and report URL.
async fn accepting_endpoint() -> (String, Arc<Mutex<Vec<Accepted>>>) {
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
                let head = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break String::from_utf8_lossy(&buf[..i]).to_string();
                    }
                };
                let header = |name: &str| {
                    head.lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
                        .map(|(_, v)| v.trim().to_string())
                        .unwrap_or_default()
                };
                log.lock().unwrap().push(Accepted {
                    attempt: header("x-bgjobs-attempt").parse().unwrap_or(0),
                    token: header("x-bgjobs-report-token"),
                    url: header("x-bgjobs-report-url"),
                });
                let _ =
                    sock.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
            });
        }
    });
    (base, seen)
}

/// Wait until the endpoint has accepted attempt `attempt`; its request.
async fn accepted(seen: &Arc<Mutex<Vec<Accepted>>>, attempt: i32) -> Accepted {
    let deadline = Instant::now() + MINUTE;
    loop {
        if let Some(a) = seen.lock().unwrap().iter().find(|a| a.attempt == attempt).cloned() {
            return a;
        }
        assert!(Instant::now() < deadline, "attempt {attempt} was never sent: {:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bgjobs report ARGS` as a separate process with the token and URL in its environment, as a Pod would have them.
fn cli_report(url: &str, token: &str, args: &[&str]) -> (bool, String) {
    let out = common::without_ambient_settings(&mut Command::new(common::bgjobs_bin()))
        .arg("report")
        .args(args)
        .env("BGJOBS_REPORT_URL", url)
        .env("BGJOBS_REPORT_TOKEN", token)
        .output()
        .expect("run bgjobs report");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn wait_waiting_for_report(env: &TestEnv, name: &str) -> BackgroundJob {
    env.wait_job(name, MINUTE, "waiting for its report", |j| {
        j.phase() == Phase::Running && j.status.as_ref().is_some_and(|s| s.awaiting_report)
    })
    .await
}

/// Send one heartbeat with `token` to `url`, once (no retry): its answer's status and text.
async fn heartbeat_once(url: &str, token: &str) -> (u16, String) {
    heartbeat_saying(url, token, json!({"percent": 10})).await
}

/// As [`heartbeat_once`], with `body`.
async fn heartbeat_saying(url: &str, token: &str, body: serde_json::Value) -> (u16, String) {
    let answer =
        reqwest::Client::new().post(format!("{url}/v1/heartbeat")).bearer_auth(token).json(&body).send().await.unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap_or_default())
}

/// Send one genuine heartbeat with `token` to `url` (no retry) and check it was recorded (`200`), `beside` what.
async fn assert_heartbeat_recorded(url: &str, token: &str, beside: &str) {
    let (status, text) = heartbeat_once(url, token).await;
    assert_eq!(status, 200, "a genuine heartbeat beside {beside}: {text}");
}

/// A worker process that runs the README's Python example (`examples/async_worker.py`), stopped on drop.
struct PythonWorker(std::process::Child, String);

impl PythonWorker {
    fn start(env: &TestEnv, args: &[&str]) -> PythonWorker {
        let script = common::repo_root().join("examples/async_worker.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(env.dir.join("python-worker.log")).unwrap())
            .spawn()
            .expect("start python3 examples/async_worker.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("worker said {line:?}"));
        PythonWorker(child, format!("http://{addr}/"))
    }
}

impl Drop for PythonWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_job_is_completed_by_the_python_worker_30_s_later_and_describe_shows_its_result() {
    let usage = common::repo_root().join("docs/usage.md");
    let readme = std::fs::read_to_string(usage).unwrap();
    let example = std::fs::read_to_string(common::repo_root().join("examples/async_worker.py")).unwrap();
    assert!(readme.contains(&example), "docs/usage.md shows examples/async_worker.py as it is");

    let env = TestEnv::new("async-python").await;
    let (flags, _) = reporting(free_port());
    let _r = env.replica("r", &strs(&flags));
    let worker = PythonWorker::start(&env, &["--seconds", "30", "--every", "5"]);
    let started = Instant::now();
    env.create("render", json!({"jobName": "Render", "args": {"page": 7}, "http": {"url": worker.1}})).await;
    let job = env.wait_job("render", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let s = job.status.clone().unwrap();
    assert_eq!((s.phase, s.attempts), (Some(Phase::Succeeded), 1), "{:?}", s.last_error);
    assert!(started.elapsed() >= Duration::from_secs(30), "it waited for the worker: {:?}", started.elapsed());
    assert_eq!(s.result, Some(json!({"echo": {"page": 7}, "seconds": 30})));
    assert!(s.progress.is_some_and(|p| p.percent.is_some()), "heartbeats recorded progress");
    let (ok, out, err) = env.cli(&["describe", "render"]);
    assert!(ok, "{err}");
    assert!(out.contains(r#"Result:        {"echo":{"page":7},"seconds":30}"#), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeating_worker_keeps_its_attempt_well_past_the_lease_duration() {
    let env = TestEnv::new("async-heartbeats").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (flags, _) = reporting(free_port());
    let _r = env.replica("r", &strs(&flags));
    // Leases of 3 s (common::FAST_LEASES); the worker runs 12 s, heartbeating every second, 4 s allowed between.
    env.create("long", json!({"jobName": "Long", "http": {"url": endpoint}, "heartbeatTimeoutSeconds": 4})).await;
    let first = accepted(&seen, 1).await;
    wait_waiting_for_report(&env, "long").await;
    let start = Instant::now();
    let mut percent = 0;
    while start.elapsed() < Duration::from_secs(12) {
        let (ok, out) = cli_report(&first.url, &first.token, &["heartbeat", "--percent", &percent.to_string()]);
        assert!(ok, "heartbeat refused: {out}");
        percent = (percent + 8).min(100);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let running = env.jobs.get("long").await.unwrap();
    assert_eq!((running.phase(), running.attempts()), (Phase::Running, 1), "{:?}", running.status);
    let wide = common::kubectl().args(["get", "bgj", "long", "-n", &env.ns]).args(["-o", "wide"]).output().unwrap();
    let wide = String::from_utf8_lossy(&wide.stdout).to_string();
    let reported = running.status.unwrap().progress.unwrap().percent.unwrap();
    assert!(wide.contains("PROGRESS") && wide.contains(&format!(" {reported} ")), "{wide}");

    let (ok, out) = cli_report(&first.url, &first.token, &["complete", "--result", r#"{"rows": 42}"#]);
    assert!(ok, "{out}");
    let job = env.wait_job("long", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(job.attempts(), 1, "one attempt from start to end");
    assert_eq!(job.status.unwrap().result, Some(json!({"rows": 42})));
    assert_eq!(seen.lock().unwrap().len(), 1, "the endpoint was called once");
    // Sent again, as a worker that lost the answer would: recorded, not "no longer current"; another result is not.
    let (ok, out) = cli_report(&first.url, &first.token, &["complete", "--result", r#"{"rows": 42}"#]);
    assert!(ok && out.contains("already recorded"), "{out}");
    let (ok, out) = cli_report(&first.url, &first.token, &["complete", "--result", r#"{"rows": 43}"#]);
    assert!(!ok && out.contains("409"), "{out}");
}

/// Count the writes to job `name` after resource version `from`, as a watch sees them (abort the task to stop).
fn count_writes(
    env: &TestEnv,
    name: &str,
    from: String,
) -> (Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (jobs, counted, params) =
        (env.jobs.clone(), writes.clone(), WatchParams::default().fields(&format!("metadata.name={name}")));
    let watching = tokio::spawn(async move {
        let mut changes = jobs.watch(&params, &from).await.expect("watch the job").boxed();
        while let Some(change) = changes.next().await {
            if let Ok(WatchEvent::Modified(_)) = change {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (writes, watching)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_heartbeating_ten_times_a_second_costs_a_status_write_every_few_seconds_and_keeps_its_attempt() {
    let env = TestEnv::new("async-beats").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (flags, url) = reporting(free_port());
    let _r = env.replica("r", &strs(&flags));
    // 40 s allowed between heartbeats: bare ones are written every 10 s (a quarter) at most, changed progress every
    // 1 s. (The apiserver itself drops a write that changes nothing, so before, the same progress cost a write a
    // second, the heartbeat's time in whole seconds; changed progress, a write a beat.)
    env.create("chatty", json!({"jobName": "Chatty", "http": {"url": endpoint}, "heartbeatTimeoutSeconds": 40})).await;
    let first = accepted(&seen, 1).await;
    let waiting = wait_waiting_for_report(&env, "chatty").await;
    let (writes, watching) = count_writes(&env, "chatty", waiting.resource_version().unwrap());
    let post = |body: serde_json::Value| {
        let (url, token) = (url.clone(), first.token.clone());
        async move {
            let (status, text) = heartbeat_saying(&url, &token, body).await;
            assert_eq!(status, 200, "a heartbeat was refused: {text}");
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        }
    };
    // 12 s of the same progress, ten beats a second: 120 beats.
    let (start, mut unwritten) = (Instant::now(), 0);
    while start.elapsed() < Duration::from_secs(12) {
        let answer = post(json!({"percent": 10, "message": "copying"})).await;
        if answer["written"] == false {
            unwritten += 1;
            assert!(
                answer["message"].as_str().unwrap_or_default().contains("heartbeat noted, not written"),
                "{answer}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bare = writes.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&bare), "{bare} status writes for 12 s of beats (before: one a second)");
    assert!(unwritten >= 80, "only {unwritten} of the beats were answered unwritten");
    // 4 s of progress that changes at every beat: a write a second at most.
    let start = Instant::now();
    let mut percent = 10;
    while start.elapsed() < Duration::from_secs(4) {
        percent += 1;
        post(json!({"percent": percent})).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let changing = writes.load(std::sync::atomic::Ordering::SeqCst) - bare;
    assert!((2..=8).contains(&changing), "{changing} status writes for 4 s of changing progress (before: one a beat)");
    let job = env.jobs.get("chatty").await.unwrap();
    assert_eq!((job.phase(), job.attempts()), (Phase::Running, 1), "never judged gone: {:?}", job.status);
    let shown = job.status.unwrap().progress.unwrap().percent.unwrap();
    assert!((11..=percent).contains(&shown), "progress {shown} recorded, {percent} the last sent");
    let (ok, out) = cli_report(&first.url, &first.token, &["complete"]);
    assert!(ok, "{out}");
    env.wait_job("chatty", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    watching.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_stops_heartbeating_is_retried_and_its_late_complete_is_refused() {
    let env = TestEnv::new("async-silent").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (flags, _) = reporting(free_port());
    let _r = env.replica("r", &strs(&flags));
    let spec = json!({"jobName": "Silent", "http": {"url": endpoint}, "heartbeatTimeoutSeconds": 3,
        "retry": {"backoffSeconds": 0, "maxAttempts": 3}});
    env.create("silent", spec).await;
    let first = accepted(&seen, 1).await;
    // The first worker never reports: after 3 s its attempt is lost and attempt 2 is sent.
    let second = accepted(&seen, 2).await;
    let (ok, out) = cli_report(&first.url, &first.token, &["complete", "--result", "1"]);
    assert!(!ok, "the late complete of attempt 1 was accepted: {out}");
    assert!(out.contains("409") && out.contains("attempt 1 of job") && out.contains("is no longer current"), "{out}");
    let job = env.jobs.get("silent").await.unwrap();
    assert_eq!((job.phase(), job.attempts()), (Phase::Running, 2), "the late report changed nothing");
    assert!(job.status.unwrap().result.is_none());

    let (ok, out) = cli_report(&second.url, &second.token, &["complete"]);
    assert!(ok, "{out}");
    let job = env.wait_job("silent", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(job.attempts(), 2);
    let why = job.status.unwrap().last_error.unwrap_or_default();
    assert!(why.contains("attempt 1 was lost: its worker sent no heartbeat or report for 3s"), "{why}");
}

/// Job `steady`'s attempt, waiting for its worker's report (4 s allowed between heartbeats), held by replica `r`
/// through `proxy`, which then refuses, for 10 s, every request whose path contains `refused`: the worker's
/// heartbeats, one every 2 s, are answered 503 meanwhile.
struct Outage {
    _proxy: common::http_proxy::HttpProxy,
    r: common::Replica,
    seen: Arc<Mutex<Vec<Accepted>>>,
    first: Accepted,
}

async fn after_an_outage(env: &TestEnv, refused: &str) -> Outage {
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (flags, _) = reporting(free_port());
    let r = env.replica_with("r", &strs(&flags), &proxy.options(&env.dir));
    let spec = json!({"jobName": "Steady", "http": {"url": endpoint}, "heartbeatTimeoutSeconds": 4,
        "retry": {"backoffSeconds": 0, "maxAttempts": 3}});
    env.create("steady", spec).await;
    let first = accepted(&seen, 1).await;
    wait_waiting_for_report(env, "steady").await;
    assert_heartbeat_recorded(&first.url, &first.token, "a reachable apiserver").await;
    proxy.refuse(None, refused, usize::MAX);
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (status, text) = heartbeat_once(&first.url, &first.token).await;
        assert_eq!(status, 503, "a heartbeat during the outage: {text}");
    }
    proxy.answer_at_once();
    Outage { _proxy: proxy, r, seen, first }
}

impl Outage {
    /// The worker's next heartbeat is recorded, its `complete` ends the job in its first attempt, and the endpoint
    /// was called once.
    async fn heard_and_completed_once(&self, env: &TestEnv) {
        let (status, text) = heartbeat_once(&self.first.url, &self.first.token).await;
        assert_eq!(status, 200, "the first heartbeat after the outage: {text}\n{}", self.r.log_text());
        let (ok, out) = cli_report(&self.first.url, &self.first.token, &["complete"]);
        assert!(ok, "{out}");
        let job = env.wait_job("steady", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
        assert_eq!(job.attempts(), 1, "{:?}", job.status);
        assert_eq!(self.seen.lock().unwrap().len(), 1, "the endpoint was called once");
    }
}

/// A worker whose heartbeats the apiserver could not record (every read and write of its job refused, 503, for 10 s,
/// past its 4 s heartbeat timeout) keeps its attempt: it is given a full heartbeat timeout from when the job can be
/// read again, and its next heartbeat, 2 s on, lands. Before, the holder read the job as soon as it could and judged
/// the worker by the last heartbeat recorded before the outage: the attempt was charged as lost and sent again while
/// its worker still worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_heartbeats_an_apiserver_outage_refused_keeps_its_attempt() {
    let env = TestEnv::new("async-outage").await;
    // Its watch goes on: the holder cannot confirm, the worker is not heard.
    let outage = after_an_outage(&env, &format!("/namespaces/{}/backgroundjobs/steady", env.ns)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    outage.heard_and_completed_once(&env).await;
    let log = outage.r.log_text();
    assert!(log.contains("the job can be read again: its worker gets a full heartbeat timeout from now"), "{log}");
}

/// The same, for an outage of every request (its Leases too: the replica's tenure lapses, and its waiting attempt is
/// adopted once the apiserver is back, here by the replica itself under its new tenure). The adopter gives the
/// worker a full heartbeat timeout from the adoption: the worker's first heartbeat after it lands. Before, the
/// adopter judged the worker by its last heartbeat recorded before the outage, charged the attempt as lost at once
/// and sent it again while its worker still worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_attempt_was_adopted_after_a_whole_apiserver_outage_keeps_it() {
    let env = TestEnv::new("async-outage-adopted").await;
    let outage = after_an_outage(&env, "/").await;
    // The worker's next heartbeat comes once the attempt has been adopted.
    let deadline = Instant::now() + MINUTE;
    while !outage.r.log_text().contains("adopted an attempt that waits for its worker's report") {
        assert!(Instant::now() < deadline, "the attempt was not adopted:\n{}", outage.r.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outage.heard_and_completed_once(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_holder_is_killed_while_its_worker_runs_and_the_report_lands_through_another_replica_with_one_execution() {
    let env = TestEnv::new("async-holder-killed").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (a_flags, _) = reporting(free_port());
    let (b_flags, b_url) = reporting(free_port());
    let mut a = env.replica("a", &strs(&a_flags));
    env.create("handed", json!({"jobName": "Handed", "http": {"url": endpoint}})).await;
    let sent = accepted(&seen, 1).await;
    let held = wait_waiting_for_report(&env, "handed").await;
    assert_eq!(held.status.unwrap().worker.as_deref(), Some("a"));
    let _b = env.replica("b", &strs(&b_flags));
    a.kill9();
    // b sees a's Lease stand still and adopts the waiting attempt: the same attempt, nothing sent again.
    let adopted = env
        .wait_job("handed", MINUTE, "adopted by b", |j| {
            j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("b")
        })
        .await;
    let s = adopted.status.unwrap();
    assert_eq!((s.phase, s.attempts, s.awaiting_report), (Some(Phase::Running), 1, true), "{:?}", s.last_error);
    assert!(s.last_error.unwrap_or_default().contains("adopted attempt 1, which waits for its worker's report"));
    tokio::time::sleep(Duration::from_secs(6)).await;

    // The worker's report reaches b (in a cluster: the Service picks any replica).
    let (ok, out) = cli_report(&b_url, &sent.token, &["complete", "--result", r#""done""#]);
    assert!(ok, "{out}");
    let job = env.wait_job("handed", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let s = job.status.unwrap();
    assert_eq!((s.attempts, s.result), (1, Some(json!("done"))));
    assert_eq!(seen.lock().unwrap().len(), 1, "one execution: the endpoint was called once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adoption_stopped_before_it_starts_is_handed_over_and_its_worker_is_not_sent_another_attempt() {
    let env = TestEnv::new("async-adopter-stopped").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (a_flags, _) = reporting(free_port());
    let (b_flags, _) = reporting(free_port());
    let (c_flags, c_url) = reporting(free_port());
    let mut a = env.replica("a", &strs(&a_flags));
    env.create("handed", json!({"jobName": "Handed", "http": {"url": endpoint}})).await;
    let sent = accepted(&seen, 1).await;
    wait_waiting_for_report(&env, "handed").await;
    // b hears every answer a second late, so the test can stop it between its adoption's Lease and its status write
    // (a renew deadline of 9 s covers both writes), and stops at once on SIGTERM: the adoption never starts.
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let slow =
        ["--lease-duration", "12s", "--renew-deadline", "9s", "--renew-interval", "1s", "--shutdown-grace", "0s"];
    let b_args: Vec<&str> = strs(&b_flags).into_iter().chain(slow).collect();
    let mut b = env.replica_with(
        "b",
        &b_args,
        &common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() },
    );
    proxy.delay_downstream(Duration::from_secs(1));
    a.kill9();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + MINUTE;
    while leases.get_opt("bgj-handed").await.unwrap().and_then(|l| l.spec?.holder_identity).as_deref() != Some("b") {
        assert!(Instant::now() < deadline, "b never took the claim Lease over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(tokio::task::spawn_blocking(move || b.terminate(MINUTE)).await.unwrap(), "b exits");
    let log = std::fs::read_to_string(env.dir.join("b.log")).unwrap();
    assert!(log.contains("adoption stopped before it started"), "b's adoption was stopped before it started");
    let job = env.jobs.get("handed").await.unwrap();
    let s = job.status.unwrap();
    assert_eq!(
        (s.phase, s.attempts, s.worker.as_deref()),
        (Some(Phase::Running), 1, Some("b")),
        "b's adoption landed and was handed over, not re-queued: {:?}",
        s.last_error
    );
    // c adopts the same attempt in its turn; its worker is never sent another, and its report counts.
    let _c = env.replica("c", &strs(&c_flags));
    let adopted = env.wait_job("handed", MINUTE, "adopted by c", |j| {
        j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("c")
    });
    assert_eq!(adopted.await.attempts(), 1);
    let (ok, out) = cli_report(&c_url, &sent.token, &["complete"]);
    assert!(ok, "{out}");
    let job = env.wait_job("handed", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(job.attempts(), 1);
    let attempts: Vec<i32> = seen.lock().unwrap().iter().map(|a| a.attempt).collect();
    assert_eq!(attempts, vec![1], "the endpoint was called once, for attempt 1");
}

/// Anyone who reaches the report port may send to it, and a report's token is checked only once its body is in.
/// Eighty connections that send a report's headers and never its body held all 64 places for reports in flight
/// (for 30 s each, and again), so every genuine heartbeat was answered 503, and an attempt whose heartbeats stop
/// is retried beside its worker. A body still arriving now holds no such place, and the bytes it is charged are
/// those that arrived, not those it declares (420 peers declaring the largest report fill a budget charged by
/// declaration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_send_a_reports_body_do_not_keep_genuine_heartbeats_out() {
    let env = TestEnv::new("async-stalled-peers").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let port = free_port();
    let (flags, url) = reporting(port);
    let _a = env.replica("a", &strs(&flags));
    env.create("beating", json!({"jobName": "Beating", "http": {"url": endpoint}})).await;
    let sent = accepted(&seen, 1).await;
    wait_waiting_for_report(&env, "beating").await;
    let mut stalled = Vec::new();
    for i in 0..500 {
        // From addresses of their own (all loopback): one address holds at most 64 connections.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("127.0.3.{}:0", 1 + i / 60).parse().unwrap()).unwrap();
        let mut sock = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
        let declared = if i < 80 { 100 } else { 40_960 };
        let head = format!(
            "POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer forged\r\nContent-Length: {declared}\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        stalled.push(sock);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_heartbeat_recorded(&url, &sent.token, "500 stalled peers").await;
    drop(stalled);
}

/// A report's token is checked against the job as the apiserver has it, so a forged one costs a read before it is
/// refused, and the reports being read were bounded together: whoever could reach the endpoint kept every place
/// taken with forged reports naming any job (here: reads of it answered 5 s late, as by an overloaded apiserver), and
/// genuine heartbeats were answered 503, until the attempt would be retried beside its worker. A report whose token
/// the replica's cache vouches for (signed with the key of the job it caches under that UID) now never waits behind
/// the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_that_keep_the_apiserver_busy_do_not_keep_genuine_heartbeats_out() {
    let env = TestEnv::new("async-forged-flood").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let port = free_port();
    let (flags, url) = reporting(port);
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let _a = env.replica_with("a", &strs(&flags), &proxy.options(&env.dir));
    env.create("beating", json!({"jobName": "Beating", "http": {"url": endpoint}})).await;
    let sent = accepted(&seen, 1).await;
    wait_waiting_for_report(&env, "beating").await;
    let claims = token::parse(&sent.token).unwrap().claims;
    let forged = token::issue(&token::Claims { name: "flood".into(), ..claims }, &token::new_key()).unwrap();
    proxy.delay_answers(Some(http::Method::GET), "/backgroundjobs/flood", Duration::from_secs(5), usize::MAX);
    let flood = reqwest::Client::new();
    let floods: Vec<_> = (0..100)
        .map(|_| {
            let request = flood.post(format!("{url}/v1/complete")).bearer_auth(&forged).json(&json!({}));
            tokio::spawn(async move { request.send().await.map(|a| a.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_heartbeat_recorded(&url, &sent.token, "100 forged reports").await;
    let mut refused = Vec::new();
    for f in floods {
        refused.push(f.await.unwrap().unwrap());
    }
    assert!(refused.iter().all(|c| [404, 503].contains(c)), "forged reports are refused: {refused:?}");
    assert!(proxy.held() > 0, "the forged reports' reads were held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_forged_malformed_and_oversized_reports_are_refused_and_change_nothing() {
    let env = TestEnv::new("async-refused").await;
    let (endpoint, seen) = accepting_endpoint().await;
    let (flags, url) = reporting(free_port());
    let _r = env.replica("r", &strs(&flags));
    env.create("guarded", json!({"jobName": "Guarded", "http": {"url": endpoint}})).await;
    let sent = accepted(&seen, 1).await;
    let before = wait_waiting_for_report(&env, "guarded").await;
    let claims = token::parse(&sent.token).unwrap().claims;
    assert_eq!((claims.name.as_str(), claims.attempt, claims.uid.clone()), ("guarded", 1, before.uid().unwrap()));
    let done = Report::Complete { result: Some(json!("forged")) };

    let refused = |r: bgjobs::Result<serde_json::Value>| match r {
        Ok(answer) => panic!("accepted: {answer}"),
        Err(e) => e.to_string(),
    };
    // Malformed, and missing.
    let e = refused(client::send(&url, "not-a-token", &done).await);
    assert!(e.contains("401") && e.contains("malformed token"), "{e}");
    let raw = reqwest::Client::new().post(format!("{url}/v1/complete")).body("{}").send().await.unwrap();
    assert_eq!(raw.status().as_u16(), 401);
    // Forged: the real token's signature over a payload that claims attempt 2; and a token signed with another key.
    let mac = sent.token.rsplit('.').next().unwrap();
    let next = bgjobs::report::token::Claims { attempt: 2, ..claims.clone() };
    let other_key = token::issue(&next, &token::new_key()).unwrap();
    let payload = other_key.split('.').nth(1).unwrap();
    let e = refused(client::send(&url, &format!("bgj1.{payload}.{mac}"), &done).await);
    assert!(e.contains("401") && e.contains("signature does not match"), "{e}");
    let e = refused(client::send(&url, &token::issue(&claims, &token::new_key()).unwrap(), &done).await);
    assert!(e.contains("401") && e.contains("signature does not match"), "{e}");
    // Unknown: a job that does not exist; and a guessed UID, which without the job's key learns nothing (401, the
    // same answer as any bad signature, not whether the UID matches).
    let unknown = bgjobs::report::token::Claims { name: "no-such-job".into(), ..claims.clone() };
    let e = refused(client::send(&url, &token::issue(&unknown, &token::new_key()).unwrap(), &done).await);
    assert!(e.contains("404") && e.contains("does not exist"), "{e}");
    let guessed = bgjobs::report::token::Claims { uid: "0000".into(), ..claims.clone() };
    let e = refused(client::send(&url, &token::issue(&guessed, &token::new_key()).unwrap(), &done).await);
    assert!(e.contains("401") && e.contains("signature does not match"), "{e}");
    // Stale: whoever reads the job can sign for it, but not for an attempt that is not current.
    let key = before.status.as_ref().unwrap().report_key.clone().unwrap();
    let stale = token::issue(&bgjobs::report::token::Claims { attempt: 0, ..claims.clone() }, &key).unwrap();
    let e = refused(client::send(&url, &stale, &done).await);
    assert!(e.contains("409") && e.contains("attempt 0 of job") && e.contains("no longer current"), "{e}");
    // Oversized.
    let big = Report::Complete { result: Some(json!({"blob": "x".repeat(bgjobs::report::MAX_RESULT_BYTES)})) };
    let e = refused(client::send(&url, &sent.token, &big).await);
    assert!(e.contains("413") && e.contains("at most 32768"), "{e}");

    let after = env.jobs.get("guarded").await.unwrap();
    assert_eq!(after.resource_version(), before.resource_version(), "no refused report wrote anything");

    client::send(&url, &sent.token, &Report::Complete { result: None }).await.unwrap();
    env.wait_job("guarded", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let e = refused(client::send(&url, &sent.token, &Report::Heartbeat { percent: None, message: None }).await);
    assert!(e.contains("409") && e.contains("has finished (Succeeded)"), "{e}");
}
