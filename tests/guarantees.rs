//! Regression tests for the breaks found in the correctness review: each drives replicas (separate processes) on
//! the local control plane into the situation the review describes and checks the guarantee from the outside
//! (job status, invocation logs, replica logs).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgjobs::api::Phase;
use common::{Open, TestEnv, all_in, executions, max_overlap, now_ms};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MINUTE: Duration = Duration::from_secs(60);

fn last_error(j: &bgjobs::api::BackgroundJob) -> String {
    j.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_job_and_frees_its_slot() {
    let env = TestEnv::new("panic").await;
    let replicas: Vec<_> =
        (0..2).map(|i| env.replica(&format!("r{i}"), &["--max-concurrent-jobs-per-instance", "2"])).collect();
    // As many poison jobs as there are slots in the fleet, twice over: before the fix each one leaked a slot.
    for i in 0..2 {
        env.create(&format!("huge-sleep-{i}"), json!({"jobName": "sleep", "args": {"seconds": 1e20}})).await;
    }
    for i in 0..4 {
        env.create(
            &format!("crash-{i}"),
            json!({"jobName": "fail", "args": {"panic": true, "message": "bad input"}, "retry": {"maxAttempts": 1}}),
        )
        .await;
    }
    let poison = env.wait_until(MINUTE, "every poison job Failed", |jobs| all_in(jobs, Phase::Failed)).await;
    for j in &poison {
        let e = last_error(j);
        if j.name_any().starts_with("crash") {
            assert!(e.contains("the handler crashed (a panic): bad input"), "{}: {e}", j.name_any());
        } else {
            assert!(e.contains("sleep: seconds must be"), "{}: {e}", j.name_any());
        }
    }
    for i in 0..10 {
        env.create(&format!("noop-{i}"), json!({"jobName": "noop"})).await;
    }
    env.wait_until(MINUTE, "the 10 noop jobs Succeeded", |jobs| {
        jobs.iter().filter(|j| j.name_any().starts_with("noop") && j.phase() == Phase::Succeeded).count() == 10
    })
    .await;
    for r in &replicas {
        assert!(!r.log_text().contains("panicked"), "{} logged an uncaught panic:\n{}", r.identity, r.log_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_name_is_longer_than_a_label_value_runs() {
    let env = TestEnv::new("long-name").await;
    let _r = env.replica("r", &[]);
    let name = "a".repeat(71);
    env.create(&name, json!({"jobName": "noop"})).await;
    let done = env.wait_job(&name, MINUTE / 2, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.attempts(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_endpoint_that_never_answers_is_stopped_when_the_jobs_timeout_passes() {
    let env = TestEnv::new("hung-http").await;
    // Accepts connections and never answers (the listener keeps them open for the whole test).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hang", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let _r = env.replica("r", &["--max-concurrent-jobs-per-instance", "1"]);
    env.create("hung", json!({"jobName": "call", "http": {"url": url}, "timeoutSeconds": 10})).await;
    env.wait_job("hung", MINUTE / 2, "Running", |j| j.phase() == Phase::Running).await;
    // Its timeout plus a lease duration and the test's polling: well within 30 s of creation.
    let done = env.wait_job("hung", MINUTE / 2, "Abandoned", |j| j.phase() == Phase::Abandoned).await;
    assert!(last_error(&done).contains("timeout of 10s"), "{}", last_error(&done));
    // Its only slot is free again.
    env.create("after", json!({"jobName": "noop"})).await;
    env.wait_job("after", MINUTE / 2, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_handler_error_is_recorded_cut_to_the_cap() {
    let env = TestEnv::new("huge-error").await;
    let _r = env.replica("r", &[]);
    // 1.2 MB of error in a 1.2 MB job: recorded in full, the status write would pass etcd's 1.5 MiB object limit.
    let message = "x".repeat(1_200_000);
    env.create("loud", json!({"jobName": "fail", "args": {"message": message, "permanent": true}})).await;
    let done = env.wait_job("loud", MINUTE, "Failed", |j| j.phase() == Phase::Failed).await;
    let e = last_error(&done);
    assert!(e.len() <= 4096 + 64 && e.ends_with("characters cut)"), "{}: {}", e.len(), &e[..e.len().min(300)]);
    assert_eq!(done.attempts(), 1, "the outcome was recorded the first time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_waited_longer_than_a_lease_are_never_settled_as_lost_when_another_replica_claims_them() {
    let env = TestEnv::new("no-false-orphans").await;
    // Observers: replicas that serve another queue, so they watch every job below Waiting with no Lease for longer
    // than a lease duration, and then see other replicas claim them (their Lease watch may lag their job watch).
    let args = ["--max-concurrent-jobs-per-instance", "2", "--queues", "later"];
    let _observers: Vec<_> = (0..2).map(|i| env.replica(&format!("o{i}"), &args)).collect();
    for i in 0..120 {
        env.create(
            &format!("once-{i:03}"),
            json!({"jobName": "sleep", "args": {"seconds": 0.1}, "retry": {"maxAttempts": 1}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _replicas: Vec<_> =
        (0..3).map(|i| env.replica(&format!("s{i}"), &["--max-concurrent-jobs-per-instance", "2"])).collect();
    let jobs = env.wait_until(3 * MINUTE, "all 120 jobs final", |jobs| jobs.iter().all(|j| j.phase().is_final())).await;
    let lost: Vec<_> =
        jobs.iter().filter(|j| j.phase() != Phase::Succeeded).map(|j| (j.name_any(), last_error(j))).collect();
    assert!(lost.is_empty(), "jobs settled as lost although they ran: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_deleted_exclusive_lease_never_lets_two_replicas_run_at_once() {
    let env = TestEnv::new("exclusive-delete").await;
    let args =
        ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str(), "--max-concurrent-jobs-per-instance", "2"];
    let _replicas: Vec<_> = (0..2).map(|i| env.replica(&format!("r{i}"), &args)).collect();
    for i in 0..16 {
        env.create(&format!("x{i:02}"), json!({"jobName": "sleep", "args": {"seconds": 2}})).await;
    }
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    env.wait_until(MINUTE, "some job Running", |jobs| jobs.iter().any(|j| j.phase() == Phase::Running)).await;
    // Delete the exclusive Lease by hand right after the leader renewed it, three times: the leader then notices
    // only at its next renewal, seconds later, while the other replica looks for the Lease every second.
    for _ in 0..3 {
        let seen = leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap().and_then(|l| l.resource_version());
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let now = leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap();
            if now.as_ref().is_some_and(|l| l.resource_version() != seen && bgjobs::wire::holder(l).is_some()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = leases.delete(bgjobs::wire::EXCLUSIVE_LEASE, &DeleteParams::default()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    env.wait_until(3 * MINUTE, "all jobs Succeeded", |jobs| jobs.len() == 16 && all_in(jobs, Phase::Succeeded)).await;
    let execs = executions(&env.invocations());
    let both = bgjobs_history::across_replicas(&execs, Open::Until(now_ms()));
    assert!(both.is_empty(), "two replicas ran jobs at the same time: {both:#?}");
}

/// An HTTP endpoint on loopback that works `seconds` per request and counts the requests in flight at once (the
/// most ever), the requests per job (by `Idempotency-Key`), and those that handed out a report URL.
struct SlowEndpoint {
    url: String,
    most_in_flight: Arc<AtomicUsize>,
    per_job: Arc<Mutex<HashMap<String, usize>>>,
    with_report_url: Arc<AtomicUsize>,
}

impl SlowEndpoint {
    async fn start(seconds: u64) -> SlowEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/work", listener.local_addr().unwrap());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let per_job = Arc::new(Mutex::new(HashMap::new()));
        let with_report_url = Arc::new(AtomicUsize::new(0));
        let (most, jobs, reporting) = (most_in_flight.clone(), per_job.clone(), with_report_url.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (in_flight, most, jobs, reporting) =
                    (in_flight.clone(), most.clone(), jobs.clone(), reporting.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let key = String::from_utf8_lossy(&head)
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("idempotency-key:").map(|v| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    *jobs.lock().unwrap().entry(key).or_insert(0) += 1;
                    if String::from_utf8_lossy(&head).to_ascii_lowercase().contains("\r\nx-bgjobs-report-url:") {
                        reporting.fetch_add(1, Ordering::SeqCst);
                    }
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // The work goes on whether or not the caller still listens, as an ordinary endpoint's does.
                    tokio::time::sleep(Duration::from_secs(seconds)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                });
            }
        });
        SlowEndpoint { url, most_in_flight, per_job, with_report_url }
    }

    /// Returns once a request has reached the endpoint (panics after a minute).
    async fn first_request(&self) {
        let deadline = std::time::Instant::now() + MINUTE;
        while self.requests() == 0 {
            assert!(std::time::Instant::now() < deadline, "no request reached the endpoint within a minute");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn in_flight_ever(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.per_job.lock().unwrap().values().sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_in_flight_when_the_exclusive_lease_is_deleted_is_answered_before_any_other_request_is_sent() {
    let env = TestEnv::new("exclusive-http").await;
    // Each request works 6 s, twice the test's 3 s lease: before the fix the leader handed the attempt back as soon as
    // it noticed the deletion, and the next leader sent it again while the endpoint still ran the first request.
    let endpoint = SlowEndpoint::start(6).await;
    let args =
        ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str(), "--max-concurrent-jobs-per-instance", "1"];
    let _replicas: Vec<_> = (0..2).map(|i| env.replica(&format!("r{i}"), &args)).collect();
    for i in 0..3 {
        env.create(&format!("call-{i}"), json!({"jobName": "call", "http": {"url": endpoint.url}})).await;
    }
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    endpoint.first_request().await;
    leases.delete(bgjobs::wire::EXCLUSIVE_LEASE, &DeleteParams::default()).await.unwrap();
    let jobs = env
        .wait_until(2 * MINUTE, "all 3 jobs Succeeded", |jobs| jobs.len() == 3 && all_in(jobs, Phase::Succeeded))
        .await;
    assert_eq!(endpoint.in_flight_ever(), 1, "two requests ran at once at the endpoint");
    let per_job = endpoint.per_job.lock().unwrap().clone();
    assert!(per_job.len() == 3 && per_job.values().all(|&n| n == 1), "requests per job: {per_job:?}");
    assert!(jobs.iter().all(|j| j.attempts() == 1), "every job took one attempt");
}

/// A claim's status write that lands but whose answer comes after the claim's bound (the renew deadline): the
/// replica cannot tell it landed. Before: it gave the claim Lease up and moved on, the job was found orphaned a
/// lease duration later and, on its last attempt, failed as lost without ever running. Now the replica reads the job
/// back and hands a claim that landed back unstarted: the job runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_comes_after_its_bound_is_handed_back_unstarted_not_failed_unrun() {
    let env = TestEnv::new("late-claim-answer").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    // The next status write's answer (the claim's) comes 12 s late; the tests' renew deadline is 2 s.
    proxy.delay_answers(Some(http::Method::PUT), "/status", Duration::from_secs(12), 1);
    env.create("once", json!({"jobName": "noop", "retry": {"maxAttempts": 1}})).await;
    assert_ran_once(&env, &proxy, &r, "the claim's answer").await;
}

/// As above, and the apiserver then turns down the replica's first two reads of the job (as one restarting does,
/// whose restart cut off the claim's answer): the read that tells whether the claim landed is sent again within the
/// bound. Before: one read was sent, and when it failed the claim was left to be found orphaned and charged: the job
/// failed without ever running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_was_lost_is_handed_back_unstarted_even_if_the_first_read_back_fails() {
    let env = TestEnv::new("late-claim-reads").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    proxy.delay_answers(Some(http::Method::PUT), "/status", Duration::from_secs(12), 1);
    // Reads of the job by name (the caches list and watch: their paths end in `/backgroundjobs?`).
    proxy.refuse(Some(http::Method::GET), "/backgroundjobs/once", 2);
    env.create("once", json!({"jobName": "noop", "retry": {"maxAttempts": 1}})).await;
    assert_ran_once_holding(&env, &proxy, &r, 3, "the claim's answer and two reads").await;
    assert!(r.log_text().contains("a claim's status write landed after its bound: handed back unstarted"));
}

/// The job `once` ends `Succeeded` having run once, the one answer held back by `proxy` being `held`'s.
async fn assert_ran_once(env: &TestEnv, proxy: &common::http_proxy::HttpProxy, r: &common::Replica, held: &str) {
    assert_ran_once_holding(env, proxy, r, 1, held).await;
}

/// The job `once` ends `Succeeded` having run once, `count` answers held back or refused by `proxy` (`held`'s).
async fn assert_ran_once_holding(
    env: &TestEnv,
    proxy: &common::http_proxy::HttpProxy,
    r: &common::Replica,
    count: u64,
    held: &str,
) {
    let done = env.wait_job("once", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let runs = executions(&env.invocations()).into_iter().filter(|e| e.job.ends_with("/once")).count();
    assert_eq!(
        (done.phase(), runs),
        (Phase::Succeeded, 1),
        "{}: {:?}\nr's log:\n{}",
        last_error(&done),
        done.status,
        r.log_text()
    );
    assert_eq!(proxy.held(), count, "{held} was held back");
}

/// A claim takes its concurrency key's Lease before its own, and the key's create is answered 2.5 s late (past the
/// tests' 2 s renew deadline). Before: the claim's status write was bounded by its own Lease's age only, and landed;
/// the attempt then found the key Lease past its renew deadline as it started, did not run, and left the job to be
/// found orphaned and charged a lost attempt: on its last attempt it failed without ever running. Now the status
/// write is bounded by the oldest Lease the claim holds: none is sent, the Leases go back, and the job runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_key_lease_aged_past_the_renew_deadline_is_given_back_not_failed_unrun() {
    let env = TestEnv::new("late-key-answer").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    // The next Lease create is the key's: a claim takes its key before its own Lease.
    proxy.delay_answers(Some(http::Method::POST), "/leases", Duration::from_millis(2500), 1);
    env.create("once", json!({"jobName": "noop", "concurrencyKey": "k", "retry": {"maxAttempts": 1}})).await;
    assert_ran_once(&env, &proxy, &r, "the key Lease's answer").await;
}

/// A claim's status write lands, its answer held back 1 s, and meanwhile its replica's member Lease is deleted by hand:
/// the replica learns within a renew interval that its tenure is over, before the answer comes, so the attempt finds
/// its claim stale as it is about to start. Before: it did not run, and its claim was left to be found orphaned and
/// charged a lost attempt: on its last attempt the job failed without ever running. Now the attempt is handed back
/// unstarted (a write fenced on the claim) and the job runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_tenure_ended_before_its_status_write_was_answered_is_handed_back_unstarted() {
    let env = TestEnv::new("stale-at-start").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &["--lease-namespace", &env.ns], &proxy.options(&env.dir));
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    proxy.delay_answers(Some(http::Method::PUT), "/backgroundjobs/once/status", Duration::from_secs(1), 1);
    env.create("once", json!({"jobName": "noop", "retry": {"maxAttempts": 1}})).await;
    // The claim's status write has landed (read at once: its answer is on its way back, 1 s late), and the member
    // Lease goes, so that r's next renewal (within 500 ms) finds its tenure over before the answer comes.
    let deadline = std::time::Instant::now() + MINUTE;
    while env.jobs.get("once").await.unwrap().phase() != Phase::Running {
        assert!(std::time::Instant::now() < deadline, "never claimed:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases.delete(&bgjobs::wire::member_lease_name("r", &env.ns), &Default::default()).await.unwrap();
    assert_ran_once(&env, &proxy, &r, "the claim's status write's answer").await;
    let done = env.jobs.get("once").await.unwrap();
    assert_eq!(done.status.map(|s| s.unstarted_attempts), Some(1), "the stale claim was handed back unstarted");
    // By this path, not by the claim's own bound on its write (a later answer is handed back there).
    assert!(r.log_text().contains("the claim was stale before the attempt could start"), "{}", r.log_text());
}

/// A new exclusive leader whose watches lag (15 s, its reads answered at once) is elected on a current read of the
/// exclusive Lease, while its caches show the cluster as it was before the old leader's last claim: a request the old
/// leader sent just before it was killed still works at the endpoint, and neither that job nor its claim Lease is in
/// the new leader's caches yet. It must start nothing new until its caches show what a fresh read of the claim Leases
/// shows. Before: it sent a waiting job's request beside the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_exclusive_leader_whose_watches_lag_starts_nothing_beside_the_old_leaders_last_job() {
    let env = TestEnv::new("exclusive-lag").await;
    let endpoint = SlowEndpoint::start(20).await;
    let args =
        ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str(), "--max-concurrent-jobs-per-instance", "1"];
    let mut a = env.replica("a", &args);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = std::time::Instant::now() + MINUTE;
    let holder = |l: Option<Lease>| l.and_then(|l| bgjobs::wire::holder(&l).map(str::to_string));
    while holder(leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap()).as_deref() != Some("a") {
        assert!(std::time::Instant::now() < deadline, "a never led:\n{}", a.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let l = env.replica_with("l", &args, &proxy.options(&env.dir));
    env.wait_joined(&l, &env.ns).await;
    proxy.lag_watches(Duration::from_secs(15));
    let t0 = std::time::Instant::now();
    // Waiting in l's caches from t0 + 15 s, runnable from t0 + 17 s.
    env.create("waiting", json!({"jobName": "call", "http": {"url": endpoint.url}, "delaySeconds": 17})).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed())).await;
    // In l's caches from t0 + 25 s: its request is at the endpoint (20 s of work) when a is killed.
    env.create("last", json!({"jobName": "call", "http": {"url": endpoint.url}})).await;
    endpoint.first_request().await;
    a.kill9();
    // l leads about 4 s after the kill; "waiting" is runnable in its view from t0 + 17 s, "last" unseen until 25 s.
    tokio::time::sleep(Duration::from_secs(23).saturating_sub(t0.elapsed())).await;
    let led = holder(leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap());
    assert_eq!(led.as_deref(), Some("l"), "l leads by now: the test showed nothing\n{}", l.log_text());
    let waiting = env.jobs.get("waiting").await.unwrap();
    assert_eq!(
        (waiting.attempts(), endpoint.in_flight_ever()),
        (0, 1),
        "l started a job beside the old leader's last one, still at the endpoint:\n{}",
        l.log_text()
    );
    proxy.lag_watches(Duration::ZERO);
    let done = env.wait_job("waiting", 3 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.attempts(), 1);
}

/// Create two HTTP jobs of one concurrency key calling `endpoint`, and cancel the one running once its request has
/// reached the endpoint; returns it as it was before the cancel.
async fn cancel_the_running_one_of_two_calls_of_one_key(
    env: &TestEnv,
    endpoint: &SlowEndpoint,
) -> bgjobs::api::BackgroundJob {
    for i in 0..2 {
        let spec = json!({"jobName": "call", "http": {"url": endpoint.url}, "concurrencyKey": "k"});
        env.create(&format!("call-{i}"), spec).await;
    }
    endpoint.first_request().await;
    let running = env.wait_until(MINUTE, "one job running", |jobs| jobs.iter().any(|j| j.phase() == Phase::Running));
    let first = running.await.into_iter().find(|j| j.phase() == Phase::Running).unwrap();
    bgjobs::jobs::cancel(&env.jobs, &first.name_any()).await.unwrap();
    first
}

/// Also with reports on (the chart's default): each request then hands out a report URL, and before, a cancel cut such
/// a request off whatever its endpoint did, as if it would answer `202` and report; this one works 6 s and answers
/// `200`, and the next job of the key ran beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_http_job_keeps_its_concurrency_key_until_its_request_is_answered() {
    for reports in [false, true] {
        cancelled_http_job_keeps_its_key(reports).await;
    }
}

async fn cancelled_http_job_keeps_its_key(reports: bool) {
    let env = TestEnv::new(if reports { "cancel-http-reports" } else { "cancel-http" }).await;
    // Each request works 6 s. Before the fix a cancel closed the connection, recorded the job Cancelled and gave its
    // key to the next job at once, whose request then ran at the endpoint beside the first one, still working.
    let endpoint = SlowEndpoint::start(6).await;
    let port = common::free_port();
    let (addr, url) = (format!("127.0.0.1:{port}"), format!("http://127.0.0.1:{port}"));
    let flags: &[&str] = if reports { &["--report-addr", &addr, "--report-url", &url] } else { &[] };
    let _r = env.replica("r", flags);
    let first = cancel_the_running_one_of_two_calls_of_one_key(&env, &endpoint).await;
    let jobs =
        env.wait_until(MINUTE, "both final", |jobs| jobs.len() == 2 && jobs.iter().all(|j| j.phase().is_final()));
    let jobs = jobs.await;
    assert_eq!(
        endpoint.in_flight_ever(),
        1,
        "the next job of the key was sent while the cancelled one still ran (reports {reports})"
    );
    let per_job = endpoint.per_job.lock().unwrap().clone();
    assert!(per_job.len() == 2 && per_job.values().all(|&n| n == 1), "requests per job: {per_job:?}");
    let handed_out = endpoint.with_report_url.load(Ordering::SeqCst);
    assert_eq!(handed_out, if reports { 2 } else { 0 }, "requests that handed out a report URL");
    // The cancelled job's request was answered 200: the work is done, and it is recorded as done.
    let cancelled = jobs.iter().find(|j| j.name_any() == first.name_any()).unwrap();
    assert_eq!((cancelled.phase(), cancelled.attempts()), (Phase::Succeeded, 1));
    assert!(jobs.iter().all(|j| j.phase() == Phase::Succeeded && j.attempts() == 1), "{}", common::summary(&jobs));
}

/// A `Skip` job created while the one job of its key is being cancelled (its request still out, 6 s) is not skipped in
/// favour of work that was asked to stop: it waits for the key, and runs once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skip_job_created_while_its_keys_job_is_being_cancelled_waits_for_the_key_and_runs() {
    let env = TestEnv::new("skip-cancelled").await;
    let endpoint = SlowEndpoint::start(6).await;
    let _r = env.replica("r", &[]);
    let call = |policy: &str| json!({"jobName": "call", "http": {"url": endpoint.url}, "concurrencyKey": "k", "concurrencyPolicy": policy});
    env.create("first", call("Wait")).await;
    endpoint.first_request().await;
    bgjobs::jobs::cancel(&env.jobs, "first").await.unwrap();
    env.create("second", call("Skip")).await;
    let jobs =
        env.wait_until(MINUTE, "both final", |jobs| jobs.len() == 2 && jobs.iter().all(|j| j.phase().is_final()));
    let jobs = jobs.await;
    let second = jobs.iter().find(|j| j.name_any() == "second").unwrap();
    assert_eq!((second.phase(), second.attempts()), (Phase::Succeeded, 1), "{}", common::summary(&jobs));
    assert_eq!(endpoint.in_flight_ever(), 1, "the Skip job was sent while the cancelled one's request still ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_http_job_whose_replica_shuts_down_before_the_answer_is_handed_over_not_recorded() {
    let env = TestEnv::new("cancel-http-term").await;
    // Each request works 20 s, leases last 20 s. The job is cancelled while its request is out, and its replica a is
    // told to stop 1 s later with a 1 s grace: the request is cut off unanswered about 3 s into its 20. Recording
    // the cancel then gave the key to the next job as soon as replica b looked, beside the request still running at
    // the endpoint. Handed over like any shutdown, the key is taken only once it has aged a lease duration (past the
    // request's end here), and b records the cancel.
    let endpoint = SlowEndpoint::start(20).await;
    let leases = ["--lease-duration", "20s", "--renew-deadline", "12s", "--renew-interval", "2s"];
    let mut a = env.replica("a", &[&leases[..], &["--shutdown-grace", "1s"]].concat());
    let first = cancel_the_running_one_of_two_calls_of_one_key(&env, &endpoint).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.terminate(Duration::from_secs(20)), "replica a did not exit");
    let _b = env.replica("b", &leases);
    let jobs =
        env.wait_until(2 * MINUTE, "both final", |jobs| jobs.len() == 2 && jobs.iter().all(|j| j.phase().is_final()));
    let jobs = jobs.await;
    assert_eq!(endpoint.in_flight_ever(), 1, "the next job of the key was sent while the cut-off request still ran");
    let cancelled = jobs.iter().find(|j| j.name_any() == first.name_any()).unwrap();
    assert_eq!(cancelled.phase(), Phase::Cancelled, "{}", common::summary(&jobs));
    let why = cancelled.status.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
    assert!(why.contains("left unwatched"), "recorded by the replica that took it over, as run: {why}");
    let other = jobs.iter().find(|j| j.name_any() != first.name_any()).unwrap();
    assert_eq!((other.phase(), other.attempts()), (Phase::Succeeded, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_lease_of_a_deleted_job_is_reowned_by_the_new_job_of_the_same_name() {
    let env = TestEnv::new("reowned").await;
    // A leftover claim Lease, owned by a job that no longer exists (as after a delete the GC has not caught up
    // with): the new job of that name takes it over, and the Lease must then belong to the new job alone.
    let _r = env.replica("r", &[]);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let mut old = Lease::default();
    old.metadata.name = Some("bgj-same".into());
    old.metadata.annotations = Some([(bgjobs::wire::JOB_UID_ANNOTATION.to_string(), "gone".to_string())].into());
    old.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "bgjobs.dev/v1".into(),
        kind: "BackgroundJob".into(),
        name: "same".into(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..Default::default()
    }]);
    old.spec = Some(Default::default());
    leases.create(&PostParams::default(), &old).await.unwrap();
    let job = env.create("same", json!({"jobName": "sleep", "args": {"seconds": 30}})).await;
    env.wait_job("same", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let lease = leases.get("bgj-same").await.unwrap();
    let owners: Vec<_> = lease.owner_references().iter().map(|o| o.uid.clone()).collect();
    assert_eq!(owners, vec![job.uid().unwrap()], "the Lease names only the new job as its owner");
}

/// A job deleted and made again under its name while replica b's watches lag (6 s): b still sees the first job
/// waiting when the second already runs on a, and b's claim of the first finds the name's claim Lease, which names
/// the second job. Before: a Lease naming another job counted as an earlier job's leftover and was taken over; with
/// the claim's status write answered late, b kept it (disowned), a, a healthy holder, stopped the attempt when it
/// found its Lease taken, and the job, on its one attempt, failed as lost. Now b reads the name first, finds the
/// second job there, and leaves the Lease to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_never_takes_the_claim_of_a_job_made_again_under_the_name_of_one_it_still_sees() {
    let env = TestEnv::new("namesake-claim").await;
    let _a = env.replica("a", &["--queues", "later"]);
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let options = proxy.options(&env.dir);
    let b = env.replica_with("b", &["--queues", "default"], &options);
    env.wait_joined(&b, "default").await;
    proxy.lag_watches(Duration::from_secs(6));
    // b's claim of the first job writes its status (refused: the job is gone) and hears so only after its bound: the
    // claim can no longer release a Lease it took over, it disowns it, and the Lease stays b's.
    proxy.delay_answers(Some(http::Method::PUT), "/same/status", Duration::from_secs(5), 1);
    let first = env.create("same", json!({"jobName": "noop"})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.jobs.delete("same", &DeleteParams::default()).await.unwrap();
    while env.jobs.get_opt("same").await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = json!({"jobName": "sleep", "args": {"seconds": 12}, "queue": "later", "retry": {"maxAttempts": 1}});
    let second = env.create("same", spec).await;
    let on_a = |j: &bgjobs::api::BackgroundJob| j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a");
    env.wait_job("same", MINUTE, "Running on a", |j| j.phase() == Phase::Running && on_a(j)).await;
    let done = env.wait_job("same", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    proxy.lag_watches(Duration::ZERO);
    assert_eq!(done.uid(), second.uid());
    assert_eq!(
        (done.phase(), done.attempts(), on_a(&done)),
        (Phase::Succeeded, 1, true),
        "{}\nb's log:\n{}",
        last_error(&done),
        b.log_text()
    );
    // b did go for the first job (it saw it waiting for 2 s after it was gone) and met the second's claim.
    assert!(
        b.log_text().contains("belongs to a job made under its name since"),
        "b never met the second job's claim while claiming the first ({:?}): the test showed nothing\n{}",
        first.uid(),
        b.log_text()
    );
}

/// A job named past 249 characters has its claim Lease named by its UID (`bgj-<uid>`), the name a job named like that
/// UID has too. Before: the second job's claim found the Lease naming another job and took it as an earlier job's
/// leftover; the first job, running, lost its attempt (on its one attempt: failed as lost). Now a Lease of a job of
/// another name is that job's claim: the second job waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_named_like_another_jobs_uid_waits_for_that_jobs_claim_instead_of_taking_it() {
    let env = TestEnv::new("uid-named").await;
    let _r = env.replica("r", &[]);
    let long = format!("long-{}", "x".repeat(245));
    let first =
        env.create(&long, json!({"jobName": "sleep", "args": {"seconds": 8}, "retry": {"maxAttempts": 1}})).await;
    env.wait_job(&long, MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let uid = first.uid().unwrap();
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    assert!(leases.get_opt(&format!("bgj-{uid}")).await.unwrap().is_some(), "the long name's Lease is named by UID");
    env.create(&uid, json!({"jobName": "noop"})).await;
    let done = env.wait_job(&long, MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{}", last_error(&done));
    env.wait_job(&uid, MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let runs = executions(&env.invocations());
    let long_runs = runs.iter().filter(|e| e.job.ends_with(&format!("/{long}"))).count();
    assert_eq!(long_runs, 1, "the long-named job ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_learns_of_its_claim_only_after_the_lease_expired_never_runs_the_attempt() {
    let env = TestEnv::new("late-claim").await;
    // a reaches the apiserver through a proxy that delivers responses at 32 KB/s: the answer to its status write of
    // a 240 KB job arrives about 7 s after the write landed, long after its 3 s lease expired unrenewed.
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let options = common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let _a = env.replica_with("a", &[], &options);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.throttle_downstream(32 * 1024);
    let job = common::fixtures::JobBuilder::new("slow", json!({"jobName": "sleep", "args": {"seconds": 10}}))
        .annotation("padding", &"p".repeat(240_000))
        .build();
    env.jobs.create(&PostParams::default(), &job).await.unwrap();
    // b starts once a has claimed: it sees a's claim Lease never renewed and takes over after a lease duration.
    env.wait_job("slow", MINUTE, "claimed by a", |j| j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a"))
        .await;
    let _b = env.replica("b", &[]);
    env.wait_job("slow", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let execs = executions(&env.invocations());
    assert_eq!(max_overlap(&execs, now_ms()), 1, "a ran the attempt it learnt of too late: {execs:#?}");
}

/// Resumes a SIGSTOPped process when dropped, whatever happens to the test.
struct Paused(u32);

impl Paused {
    fn stop(pid: u32) -> Paused {
        assert!(std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_frozen_apiserver_never_settles_a_job_that_is_alive_elsewhere() {
    let env = TestEnv::new("stale-view").await;
    // b talks to a second kube-apiserver on the same etcd; freezing that apiserver freezes b's view of the
    // cluster (its watches) while a renews its Lease through the first one.
    let second = common::SecondApiserver::start();
    let pid = second.pid;

    let _a = env.replica("a", &[]);
    // Long enough to run on through b's start, a second and the freeze, on a slow machine.
    env.create("once", json!({"jobName": "sleep", "args": {"seconds": 22}, "retry": {"maxAttempts": 1}})).await;
    env.wait_job("once", MINUTE, "Running on a", |j| j.phase() == Phase::Running).await;
    let options = common::ReplicaOptions { kubeconfig: Some(second.kubeconfig.clone()), ..Default::default() };
    let b = env.replica_with("b", &[], &options);
    // Once b has joined it judges Leases, and a freeze shows it a stale view (before, it would judge nothing, and
    // show nothing).
    env.wait_joined(&b, "default").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    {
        let _frozen = Paused::stop(pid);
        // Past a lease duration: b's last view shows a's Lease unchanged, as if a were gone.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let job = env.jobs.get("once").await.unwrap();
    assert_ne!(job.phase(), Phase::Succeeded, "the job ended before the freeze did: the test showed nothing");
    let done = env.wait_job("once", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!(
        (done.phase(), done.attempts()),
        (Phase::Succeeded, 1),
        "b settled a live attempt from a stale view: {}\nb's log:\n{}",
        last_error(&done),
        b.log_text()
    );
}

/// A replica whose watches lag well past the lease duration, while its reads and writes are answered at once (a
/// request-reading proxy holds back each watch event 8 s): its caches show jobs Pending that the other replica runs,
/// claim Leases absent that are held, and the other's member Lease unrenewed for seconds. Every claim, takeover and
/// settle it tries on that view must be fenced by what the apiserver holds: while a lives, each job runs once, on
/// one replica; once a is paused past the lease, b takes its jobs over only after revoking its tenure, and a, woken,
/// lands none of their results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watches_lag_past_the_lease_takes_no_live_job_and_takes_over_only_a_revoked_tenure() {
    let env = TestEnv::new("watch-lag").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let a = env.replica("a", &["--max-concurrent-jobs-per-instance", "1"]);
    let options = proxy.options(&env.dir);
    let b = env.replica_with("b", &["--max-concurrent-jobs-per-instance", "3"], &options);
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    env.wait_joined(&b, "default").await;
    proxy.lag_watches(Duration::from_secs(8));
    // Bursts that a (one slot) cannot keep up with: b sees each 8 s late, most of it already claimed or run.
    let mut names = Vec::new();
    for burst in 0..3 {
        for i in 0..5 {
            let name = format!("b{burst}-{i}");
            env.create(&name, json!({"jobName": "sleep", "args": {"seconds": 4}})).await;
            names.push(name);
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let jobs = env
        .wait_until(3 * MINUTE, "every burst job final", |jobs| {
            names.iter().all(|n| jobs.iter().any(|j| &j.name_any() == n && j.phase().is_final()))
        })
        .await;
    let execs = executions(&env.invocations());
    for name in &names {
        let job = jobs.iter().find(|j| &j.name_any() == name).unwrap();
        let runs: Vec<_> = execs.iter().filter(|e| e.job.ends_with(&format!("/{name}"))).collect();
        assert_eq!(
            (job.phase(), job.attempts(), runs.len()),
            (Phase::Succeeded, 1, 1),
            "{name} ran once, never taken from a live replica: {runs:?}\nb's log:\n{}",
            b.log_text()
        );
    }
    let on_b = execs.iter().filter(|e| e.worker == "b" && names.iter().any(|n| e.job.ends_with(&format!("/{n}"))));
    assert!(on_b.count() > 0, "b, lagging, ran none of the bursts: the test showed nothing\n{}", b.log_text());
    // b acted on its stale view: claims of jobs a had taken, refused by the apiserver.
    assert!(b.log_text().contains("claim lost to another replica"), "b never tried a stale claim:\n{}", b.log_text());

    // a paused past the lease while it runs long jobs: b (still lagging) sees a's member Lease stop changing 8 s late.
    // (Those b owns wait for b to see them: its lag holds them back, as a pause would.)
    for i in 0..4 {
        env.create(&format!("long{i}"), json!({"jobName": "sleep", "args": {"seconds": 10}})).await;
    }
    let on_a = |j: &bgjobs::api::BackgroundJob| {
        j.phase() == Phase::Running && j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a")
    };
    let running = env
        .wait_until(MINUTE, "a long job Running on a", |jobs| {
            jobs.iter().any(|j| j.name_any().starts_with("long") && on_a(j))
        })
        .await;
    let taken: Vec<String> =
        running.iter().filter(|j| j.name_any().starts_with("long") && on_a(j)).map(|j| j.name_any()).collect();
    a.stop();
    let stopped_at = now_ms();
    for name in &taken {
        env.wait_job(name, 2 * MINUTE, "taken over by b", |j| {
            j.attempts() == 2 && j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("b")
        })
        .await;
    }
    let a_member = members.get(&bgjobs::wire::member_lease_name("a", &env.ns)).await.unwrap();
    assert!(
        bgjobs::wire::annotation(&a_member, bgjobs::wire::REVOKED_ANNOTATION).is_some(),
        "b revoked a's tenure before taking over: {:?}",
        a_member.metadata.annotations
    );
    a.resume();
    for i in 0..4 {
        let name = format!("long{i}");
        let done = env.wait_job(&name, 2 * MINUTE, "final", |j| j.phase().is_final()).await;
        assert_eq!(done.phase(), Phase::Succeeded, "{name}: {}", last_error(&done));
        if taken.contains(&name) {
            assert_eq!(done.status.unwrap().worker.as_deref(), Some("b"), "{name}: a's result landed after it woke");
            let b_runs = executions(&env.invocations())
                .into_iter()
                .filter(|e| e.job.ends_with(&format!("/{name}")) && e.worker == "b")
                .collect::<Vec<_>>();
            assert!(b_runs.iter().all(|e| e.start >= stopped_at), "b started {name} only after a stopped: {b_runs:?}");
        }
    }
}

/// FIFO with a replica whose watches lag: the queue's head is shared among the replicas with room, each job left to
/// its owner for a first turn. An owner whose watches lag does not see its job, and a replica with a free slot spends
/// it on its own later job meanwhile: the head then waits for the owner's lag or for a slot. A replica that finds
/// its own member watch lagging says so on its member Lease, and the others leave it no share of the head. Before,
/// about half the bursts started a later job first (the head left to b, 5 s behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watches_lag_owns_none_of_the_queues_head_so_each_bursts_head_starts_first() {
    let env = TestEnv::new("lag-fifo").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let _a = env.replica("a", &["--max-concurrent-jobs-per-instance", "1"]);
    let options = proxy.options(&env.dir);
    let b = env.replica_with("b", &["--max-concurrent-jobs-per-instance", "2"], &options);
    env.wait_joined(&b, "default").await;
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let b_member = bgjobs::wire::member_lease_name("b", &env.ns);
    let says_it_lags = |l: &Lease| bgjobs::wire::annotation(l, bgjobs::wire::WATCH_LAG_ANNOTATION) == Some("true");
    proxy.lag_watches(Duration::from_secs(8));
    // b's renewals (every 500 ms) show up in its member watch 8 s late: it says so from a renewal soon after. Not
    // asserted here, so that a version without it goes on to show what the bursts do.
    for _ in 0..300 {
        if members.get(&b_member).await.is_ok_and(|l| says_it_lags(&l)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Bursts of four, each job 3 s: a (one slot) sees them at once, b 8 s late. A head job owned by b would wait
    // while a spent its slot on a later one.
    let mut starts = Vec::new();
    for burst in 0..6 {
        let names: Vec<String> = (0..4).map(|i| format!("p{burst}-{i}")).collect();
        for name in &names {
            env.create(name, json!({"jobName": "sleep", "args": {"seconds": 3}})).await;
        }
        env.wait_until(MINUTE, "every job of the burst final", |jobs| {
            names.iter().all(|n| jobs.iter().any(|j| &j.name_any() == n && j.phase().is_final()))
        })
        .await;
        let execs = executions(&env.invocations());
        let start_of = |name: &String| {
            let runs: Vec<_> = execs.iter().filter(|e| e.job.ends_with(&format!("/{name}"))).collect();
            assert_eq!(runs.len(), 1, "{name} ran once: {runs:?}");
            (runs[0].start, runs[0].worker.clone())
        };
        starts.push(names.iter().map(start_of).collect::<Vec<_>>());
    }
    eprintln!("per burst, (start ms, replica) of each job, head first: {starts:?}");
    for (burst, jobs) in starts.iter().enumerate() {
        let (head, on) = &jobs[0];
        let first_behind = jobs[1..].iter().min().unwrap();
        assert!(
            head <= &first_behind.0,
            "burst {burst}: the head job started on {on} {} ms after a job behind it (on {}): {starts:?}\nb's log:\n{}",
            head - first_behind.0,
            first_behind.1,
            b.log_text()
        );
    }
    let b_lease = members.get(&b_member).await.unwrap();
    assert!(says_it_lags(&b_lease), "b never said its watches lag: {:?}", b_lease.metadata.annotations);
    // Caught up, it says so again, and owns its share from then on.
    proxy.lag_watches(Duration::ZERO);
    let deadline = std::time::Instant::now() + MINUTE;
    while members.get(&b_member).await.is_ok_and(|l| says_it_lags(&l)) {
        assert!(std::time::Instant::now() < deadline, "b still says its watches lag a minute after they caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_answer_is_lost_after_it_landed_does_not_lose_the_attempt() {
    let env = TestEnv::new("lost-answer").await;
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let options = common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    // Leases long enough that a slow machine's reconnect after each reset (a TLS handshake through the proxy, then a
    // read-back) fits in the renew deadline; renewals as often as the tests' short leases have them.
    let leases = ["--lease-duration", "8s", "--renew-deadline", "6s", "--renew-interval", "500ms"];
    let _a = env.replica_with("a", &leases, &options);
    env.create("once", json!({"jobName": "sleep", "args": {"seconds": 25}, "retry": {"maxAttempts": 1}})).await;
    env.wait_job("once", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // Five times: hold the apiserver's answers for 0.8 s (requests still land: a renewal, sent every 500 ms, takes
    // effect), then reset the connections, so the answers to writes that happened are lost. Then let it recover.
    for _ in 0..5 {
        proxy.hold_downstream();
        tokio::time::sleep(Duration::from_millis(800)).await;
        proxy.reset_all();
        proxy.release_downstream();
        tokio::time::sleep(Duration::from_millis(2_000)).await;
    }
    let job = env.jobs.get("once").await.unwrap();
    assert_ne!(job.phase(), Phase::Succeeded, "the job ended before the last round: the rounds showed too little");
    let done = env.wait_job("once", MINUTE, "final", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{}", last_error(&done));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lease_held_for_a_job_this_replica_has_not_seen_is_waited_out_not_taken() {
    let env = TestEnv::new("unseen-key-owner").await;
    // A live key Lease whose job has not reached this replica's cache (a lagging job watch looks exactly like
    // this): it is renewed, so it must hold the key, whoever it names.
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let name = bgjobs::wire::key_lease_name("tenant-1");
    leases
        .create(&PostParams::default(), &held_elsewhere(&name, bgjobs::wire::KEY_LABEL, "not-yet-seen"))
        .await
        .unwrap();
    let _r = env.replica("r", &[]);
    env.create("keyed", json!({"jobName": "noop", "concurrencyKey": "tenant-1"})).await;
    // Keep the Lease alive for 6 s, as its holder would.
    let holder = Holder::until(&leases, &name, Duration::from_secs(6));
    while holder.renew().await {
        let job = env.jobs.get("keyed").await.unwrap();
        assert_eq!(job.phase(), Phase::Waiting, "the job ran while another holder kept its key: {:?}", job.status);
    }
    // Once nobody renews it, the key Lease expires and the job runs.
    env.wait_job("keyed", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_leader_starts_nothing_while_another_replica_holds_a_live_claim_on_a_waiting_job() {
    let env = TestEnv::new("exclusive-claimed").await;
    // A live claim Lease on a job cached as Waiting: what an old leader's claim looks like to a new leader whose job
    // watch has not shown the job Running yet (review F3). The leader must start nothing beside it.
    let first = env.create("first", json!({"jobName": "noop"})).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let name = bgjobs::wire::claim_lease_name(&first);
    let ghost = held_elsewhere(&name, bgjobs::wire::JOB_LABEL, first.uid().as_deref().unwrap());
    leases.create(&PostParams::default(), &ghost).await.unwrap();
    env.create("second", json!({"jobName": "noop"})).await;
    // Renewed from before the replica starts (its first look at the Lease starts its clock) until 8 s after it leads.
    let mut holder = Holder::until(&leases, &name, MINUTE);
    let args =
        ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str(), "--max-concurrent-jobs-per-instance", "1"];
    let _r = env.replica("r", &args);
    nothing_starts_while_renewed(&env, &leases, &mut holder).await;
    // Once its holder stops renewing, the claim expires: both jobs run, one at a time, the first one first.
    let jobs =
        env.wait_until(MINUTE, "both jobs Succeeded", |jobs| jobs.len() == 2 && all_in(jobs, Phase::Succeeded)).await;
    let started = |n: &str| jobs.iter().find(|j| j.name_any() == n).and_then(|j| j.status.as_ref()?.start_time.clone());
    assert!(started("first") <= started("second"), "FIFO: {:?} then {:?}", started("first"), started("second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_leader_starts_nothing_while_a_live_claim_names_a_job_it_has_not_seen() {
    let env = TestEnv::new("exclusive-unseen").await;
    // A live claim Lease whose job has not reached the new leader's cache at all: the old leader claimed a job
    // moments after it was created, and the new leader's job watch (the apiserver's watch cache) lags its Lease
    // watch (read from etcd). It was counted as nothing: the leader started jobs beside it (review C3).
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let name = "bgj-not-yet-seen";
    leases
        .create(&PostParams::default(), &held_elsewhere(name, bgjobs::wire::JOB_LABEL, "not-yet-seen"))
        .await
        .unwrap();
    env.create("first", json!({"jobName": "noop"})).await;
    env.create("second", json!({"jobName": "noop"})).await;
    let mut holder = Holder::until(&leases, name, MINUTE);
    let args = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str()];
    let _r = env.replica("r", &args);
    nothing_starts_while_renewed(&env, &leases, &mut holder).await;
    // Once its holder stops renewing, the claim expires and the jobs run.
    env.wait_until(MINUTE, "both jobs Succeeded", |jobs| jobs.len() == 2 && all_in(jobs, Phase::Succeeded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lease_another_replica_left_behind_for_a_gone_job_does_not_hold_the_leader_back() {
    let env = TestEnv::new("exclusive-leftover").await;
    // A claim Lease of a live replica's tenure whose job is gone and which no attempt holds: what a give-back that
    // failed leaves when the job is deleted meanwhile with `--cascade=orphan`, once its replica no longer leads (or
    // what anyone who may write Leases in the namespace can forge). The leader must wait for such a Lease for as long
    // as the tenure lives; only its holder knows nothing acts under it, and it did not say so: nothing started.
    let args = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str()];
    let leader = env.replica("leader", &args);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = std::time::Instant::now() + MINUTE;
    while leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap().as_ref().and_then(bgjobs::wire::holder)
        != Some(leader.identity.as_str())
    {
        assert!(std::time::Instant::now() < deadline, "the first replica did not lead:\n{}", leader.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = env.replica("other", &args);
    env.wait_joined(&other, &env.ns).await;
    let member = leases.get(&bgjobs::wire::member_lease_name(&other.identity, &env.ns)).await.unwrap();
    let tenure = bgjobs::wire::tenure_id(&member).expect("a joined replica's member Lease names its tenure");
    let mut left = held_elsewhere("bgj-gone", bgjobs::wire::JOB_LABEL, "a-job-deleted-meanwhile");
    left.spec.as_mut().unwrap().holder_identity = Some(other.identity.clone());
    left.metadata.annotations.as_mut().unwrap().insert(bgjobs::wire::TENURE_ANNOTATION.into(), tenure);
    leases.create(&PostParams::default(), &left).await.unwrap();
    env.create("next", json!({"jobName": "noop"})).await;
    let done = env.wait_job("next", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.status.as_ref().and_then(|s| s.worker.as_deref()), Some(leader.identity.as_str()));
}

/// Renew `holder`'s Lease until the exclusive replica leads (within a minute), then for 8 s more, asserting that no
/// job starts meanwhile.
async fn nothing_starts_while_renewed(env: &TestEnv, leases: &Api<Lease>, holder: &mut Holder<'_>) {
    loop {
        assert!(holder.renew().await, "the replica did not lead within a minute");
        let exclusive = leases.get_opt(bgjobs::wire::EXCLUSIVE_LEASE).await.unwrap();
        if exclusive.as_ref().and_then(|l| bgjobs::wire::holder(l)).is_some() {
            break;
        }
    }
    holder.until = std::time::Instant::now() + Duration::from_secs(8);
    while holder.renew().await {
        let jobs = env.jobs.list(&Default::default()).await.unwrap().items;
        assert!(
            jobs.iter().all(|j| j.phase() == Phase::Waiting),
            "a job started while another replica held a live claim: {:?}",
            jobs.iter().map(|j| (j.name_any(), j.phase())).collect::<Vec<_>>()
        );
    }
}

/// A Lease held by a replica the test plays ("elsewhere") for the job or key `uid` names, labelled `label`.
fn held_elsewhere(name: &str, label: &str, uid: &str) -> Lease {
    let mut ghost = Lease::default();
    ghost.metadata.name = Some(name.to_string());
    ghost.metadata.labels = Some(
        [
            (bgjobs::wire::MANAGED_BY_LABEL.to_string(), bgjobs::wire::MANAGED_BY.to_string()),
            (label.to_string(), "true".to_string()),
        ]
        .into(),
    );
    ghost.metadata.annotations = Some(
        [
            (bgjobs::wire::JOB_UID_ANNOTATION.to_string(), uid.to_string()),
            (bgjobs::wire::ATTEMPT_ANNOTATION.to_string(), "1".to_string()),
        ]
        .into(),
    );
    ghost.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
        holder_identity: Some("elsewhere".into()),
        lease_duration_seconds: Some(3),
        ..Default::default()
    });
    ghost
}

/// The replica the test plays: renews a Lease of "elsewhere" until a time, as that holder would.
struct Holder<'a> {
    leases: &'a Api<Lease>,
    name: &'a str,
    until: std::time::Instant,
}

impl<'a> Holder<'a> {
    fn until(leases: &'a Api<Lease>, name: &'a str, span: Duration) -> Self {
        Holder { leases, name, until: std::time::Instant::now() + span }
    }

    /// Renew once (checking nobody took the Lease), then wait 500 ms; false once the time is up.
    async fn renew(&self) -> bool {
        if std::time::Instant::now() >= self.until {
            return false;
        }
        let l = self.leases.get_opt(self.name).await.unwrap();
        let held_by = l.as_ref().and_then(|l| bgjobs::wire::holder(l)).map(str::to_string);
        assert_eq!(held_by.as_deref(), Some("elsewhere"), "the Lease {} was taken from its live holder", self.name);
        let mut l = l.unwrap();
        l.spec.as_mut().unwrap().renew_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(jiff::Timestamp::now()));
        let _ = self.leases.replace(self.name, &PostParams::default(), &l).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_definition_with_a_long_name_makes_jobs_that_run() {
    let env = TestEnv::new("long-definition").await;
    let _r = env.replica("r", &[]);
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    for name in ["x".repeat(53), "y".repeat(70)] {
        let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
            "apiVersion": "bgjobs.dev/v1", "kind": "RecurringBackgroundJob", "metadata": {"name": name},
            "spec": {"schedule": "* * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}
        }))
        .unwrap();
        defs.create(&PostParams::default(), &def).await.unwrap();
    }
    env.wait_until(MINUTE, "a job of each definition Succeeded", |jobs| {
        ["x", "y"].iter().all(|p| jobs.iter().any(|j| j.name_any().starts_with(p) && j.phase() == Phase::Succeeded))
    })
    .await;
}

/// Create an object of kind `K` as written, past the operator's types: what `kubectl apply` can store and they cannot
/// hold (a Pod template the schema leaves open).
async fn create_as_written<K: kube::Resource<DynamicType = ()>>(env: &TestEnv, object: serde_json::Value) {
    use kube::api::{ApiResource, DynamicObject};
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &env.ns, &ApiResource::erase::<K>(&()));
    // Sent and answered as text: the answer may be nested deeper than serde_json decodes.
    let body = serde_json::to_vec(&object).unwrap();
    let request = kube::core::Request::new(api.resource_url()).create(&PostParams::default(), body).unwrap();
    env.client.request_text(request).await.expect("the apiserver stores it");
}

/// A job whose Pod template's `containers` is a string: the schema lets it through, the operator's types cannot
/// hold it.
fn unreadable_job(name: &str) -> serde_json::Value {
    json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob", "metadata": {"name": name},
           "spec": {"jobName": "noop", "template": {"spec": {"containers": "not a list"}}}})
}

/// A job whose `args` hold `depth` arrays nested in one another: the apiserver stores it, serde_json decodes no value
/// nested deeper than 128.
fn nested_job(name: &str, depth: usize) -> serde_json::Value {
    let args = json!({"deep": (0..depth).fold(json!([]), |inner, _| json!([inner]))});
    json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob", "metadata": {"name": name},
           "spec": {"jobName": "noop", "args": args}})
}

/// Poll the job `name` as written (not through the operator's types) until `done` holds for its status, which is
/// returned, or panic.
async fn wait_raw_status(
    env: &TestEnv,
    name: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    use kube::api::{ApiResource, DynamicObject};
    let raw: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &ApiResource::erase::<bgjobs::api::BackgroundJob>(&()));
    // Only the status is decoded: the rest may be nested deeper than serde_json decodes.
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        status: serde_json::Value,
    }
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let request = kube::core::Request::new(raw.resource_url()).get(name, &Default::default()).unwrap();
        let text = env.client.request_text(request).await.unwrap();
        let status = serde_json::from_str::<Status>(&text).unwrap().status;
        if done(&status) {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "{name}: never {what}; status: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the readable job `name` Succeeded (read by name: a list would meet the unreadable ones).
async fn wait_succeeded(env: &TestEnv, name: &str) {
    let deadline = std::time::Instant::now() + MINUTE;
    while env.jobs.get(name).await.unwrap().phase() != Phase::Succeeded {
        assert!(std::time::Instant::now() < deadline, "{name} never Succeeded; logs in {}", env.dir.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_operator_cannot_read_fails_with_the_reason_and_the_queue_runs_on_across_a_restart() {
    use bgjobs::api::BackgroundJob;
    let env = TestEnv::new("unreadable-job").await;
    let mut r = env.replica("r", &[]);
    env.create("before", json!({"jobName": "noop"})).await;
    wait_succeeded(&env, "before").await;
    let failed_with_why = |s: &serde_json::Value| {
        s["phase"] == "Failed"
            && s["lastError"].as_str().is_some_and(|e| e.contains("cannot read this job") && e.contains("invalid type"))
    };
    // Seen first by the watch of a running replica (before the fix its event was dropped: Waiting forever).
    create_as_written::<BackgroundJob>(&env, unreadable_job("unreadable-watched")).await;
    env.create("after", json!({"jobName": "noop"})).await;
    wait_raw_status(&env, "unreadable-watched", "Failed, with why", failed_with_why).await;
    wait_succeeded(&env, "after").await;
    // Arguments nested deeper than a value is read, seen first by the watch (before, its event failed: Waiting
    // forever; then it was failed as unreadable). Arguments are read as text now: the job is read, and its handler
    // says they do not fit (`noop` takes none).
    create_as_written::<BackgroundJob>(&env, nested_job("deep-args", 200)).await;
    let not_fitting = |s: &serde_json::Value| {
        s["phase"] == "Failed" && s["lastError"].as_str().is_some_and(|e| e.contains("do not fit handler \"noop\""))
    };
    wait_raw_status(&env, "deep-args", "Failed, its args not fitting its handler", not_fitting).await;
    // Seen first by a list (before the fix every list failed on it: the replica never saw its queue again).
    assert!(r.terminate(Duration::from_secs(20)), "the replica stops");
    create_as_written::<BackgroundJob>(&env, unreadable_job("unreadable-listed")).await;
    env.create("after-restart", json!({"jobName": "noop"})).await;
    let _r2 = env.replica("r2", &[]);
    wait_raw_status(&env, "unreadable-listed", "Failed, with why", failed_with_why).await;
    wait_succeeded(&env, "after-restart").await;
    let listed = env.list().await;
    let stand_ins = listed.iter().filter(|j| j.annotations().contains_key(bgjobs::wire::UNREADABLE_ANNOTATION));
    assert_eq!(stand_ins.count(), 2, "`jobs::list` reads both as stand-ins: {}", common::summary(&listed));
    assert!(listed.iter().any(|j| j.name_any() == "deep-args"), "and the job with deep args as itself");
}

/// A job whose `managedFields` a client wrote nested 200 deep: the apiserver keeps what a client sends there, and no
/// schema covers metadata. Nothing in the operator reads them, yet every read of the whole job failed on them: the
/// claim's status write landed but its answer could not be read, so the job was found orphaned a lease duration
/// later, at each attempt, and failed as lost with its handler never started; a replica that started while it
/// existed exited at once; `bgjobs list` failed for the whole namespace, and `bgjobs cancel` of it said it failed
/// when it had landed. Now they are passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_managed_fields_are_nested_too_deep_to_read_runs_once_and_its_namespace_still_lists() {
    use bgjobs::api::BackgroundJob;
    let env = TestEnv::new("deep-managed-fields").await;
    let fields = (0..200).fold(json!({}), |inner, _| json!({ "f:a": inner }));
    let entry = json!({"manager": "tenant", "operation": "Update", "apiVersion": "bgjobs.dev/v1alpha1",
                       "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields});
    let job = json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
                     "metadata": {"name": "deep", "managedFields": [entry]},
                     "spec": {"jobName": "noop", "retry": {"maxAttempts": 2}}});
    create_as_written::<BackgroundJob>(&env, job).await;
    // Started after it: the start-up check that the CRD is installed lists one job (before, it decoded it, failed, and
    // the replica exited: every replica of the namespace, at every restart).
    let _r = env.replica("r", &[]);
    let is_final = |s: &serde_json::Value| matches!(s["phase"].as_str(), Some("Succeeded" | "Failed" | "Abandoned"));
    let status = wait_raw_status(&env, "deep", "final", is_final).await;
    let request = kube::core::Request::new(env.jobs.resource_url()).get("deep", &Default::default()).unwrap();
    let stored = env.client.request_text(request).await.unwrap();
    let typed = serde_json::from_str::<BackgroundJob>(&stored).map(|_| ()).map_err(|e| e.to_string());
    assert!(
        stored.contains(r#""manager":"tenant""#) && typed.is_err_and(|e| e.contains("recursion limit")),
        "the apiserver kept the managed fields, too deep to read: or the test showed nothing"
    );
    assert_eq!((status["phase"].as_str(), status["attempts"].as_i64()), (Some("Succeeded"), Some(1)), "{status}");
    let runs = executions(&env.invocations()).into_iter().filter(|e| e.job.ends_with("/deep")).count();
    assert_eq!(runs, 1, "the handler ran once");
    let listed = env.list().await;
    let deep = listed.iter().find(|j| j.name_any() == "deep").expect("listed");
    assert!(!deep.annotations().contains_key(bgjobs::wire::UNREADABLE_ANNOTATION), "read as itself, not a stand-in");
    // A patch's answer is read the same way (`bgjobs cancel` failed on it, although the cancel landed).
    let cancelled = bgjobs::jobs::cancel(&env.jobs, "deep").await.expect("the cancel's answer reads");
    assert!(cancelled.spec.cancel);
}

/// A tenant may store about 1.3 MB of `args` in a job, under etcd's limit. As numbers in an array, decoded into
/// JSON values (32 bytes each) they took about 20 times that, and a replica holds a running job several times over
/// (its claim's answer, the attempt's copy, its reporting handle's, the executor's arguments): sixteen such jobs
/// running on one replica took it past the chart's 512 Mi limit, OOM-killed, and its jobs taken over by the next
/// replica in turn. Now arguments are kept as their text and decoded only into the handler's own type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_jobs_with_the_largest_args_a_tenant_can_store_run_on_one_replica_within_half_the_charts_memory_limit()
{
    const JOBS: usize = 16;
    let env = TestEnv::new("large-args").await;
    // The chart's leases: each status write sends and stores the whole job, which takes this apiserver a second or
    // more at this size (beyond the tests' usual 2 s renew deadline once sixteen claims queue up).
    let flags = ["--max-concurrent-jobs-per-instance", "16", "--lease-duration", "15s", "--renew-deadline", "10s"];
    let r = env.replica_with("r", &flags, &common::ReplicaOptions { test_worker: true, ..Default::default() });
    let pad = vec![0u8; 650_000];
    for i in 0..JOBS {
        // `record` ignores what it does not know: the padding is read only by the operator. A minute each, so that
        // all sixteen run at once although each claim takes a second or more.
        env.create(&format!("large-{i}"), json!({"jobName": "record", "args": {"ms": 60_000, "pad": pad}})).await;
    }
    env.wait_until(4 * MINUTE, "all succeeded", |jobs| jobs.len() == JOBS && all_in(jobs, Phase::Succeeded)).await;
    // The most it held at any time (read while it still runs).
    let peak = peak_rss_mib(r.pid());
    eprintln!("the replica peaked at {peak} MiB");
    let runs = executions(&env.invocations());
    assert_eq!(runs.len(), JOBS, "each ran once: {runs:?}");
    assert_eq!(max_overlap(&runs, now_ms()), JOBS, "all ran at once, or the test showed nothing: {runs:?}");
    assert!(peak > 0 && peak <= 256, "the replica peaked at {peak} MiB running {JOBS} jobs with 1.3 MB of args each");
}

/// The most memory process `pid` has held (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_edited_into_a_shape_the_operator_cannot_read_still_gets_its_outcome() {
    use kube::api::{ApiResource, DynamicObject};
    let env = TestEnv::new("unreadable-running").await;
    let _r = env.replica("r", &[]);
    env.create("edited", json!({"jobName": "sleep", "args": {"seconds": 4}, "retry": {"maxAttempts": 1}})).await;
    env.wait_job("edited", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // What the admission webhook would refuse, done without it: the spec edited under the running attempt.
    let raw: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &ApiResource::erase::<bgjobs::api::BackgroundJob>(&()));
    let bad = Patch::Merge(json!({"spec": {"template": {"spec": {"containers": "not a list"}}}}));
    raw.patch("edited", &PatchParams::default(), &bad).await.expect("the apiserver stores it");
    // Before, the outcome's write met a 409, the strict re-read failed, and the job ended Failed as lost.
    wait_raw_status(&env, "edited", "Succeeded, the outcome of its attempt", |s| s["phase"] == "Succeeded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_definition_the_operator_cannot_read_is_reported_invalid_and_the_others_still_tick() {
    use bgjobs::api::RecurringBackgroundJob;
    let env = TestEnv::new("unreadable-definition").await;
    let broken = |name: &str| {
        json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": name},
               "spec": {"schedule": "* * * * * *",
                        "jobTemplate": {"spec": {"jobName": "noop", "template": {"spec": {"containers": "x"}}}}}})
    };
    // One met by the replica's first list of definitions (before the fix that list failed, forever), one by its
    // watch.
    create_as_written::<RecurringBackgroundJob>(&env, broken("broken")).await;
    let _r = env.replica("r", &[]);
    create_as_written::<RecurringBackgroundJob>(&env, broken("broken-later")).await;
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    defs.create(
        &PostParams::default(),
        &common::fixtures::recurring(
            "fine",
            json!({
                "schedule": "* * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}
            }),
        ),
    )
    .await
    .unwrap();
    env.wait_until(MINUTE, "a job of `fine` Succeeded", |jobs| {
        jobs.iter().any(|j| j.name_any().starts_with("fine-") && j.phase() == Phase::Succeeded)
    })
    .await;
    // The broken one is read as written (the test's own reads do not go through the operator's types).
    use kube::api::{ApiResource, DynamicObject};
    let raw: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &env.ns, &ApiResource::erase::<RecurringBackgroundJob>(&()));
    for name in ["broken", "broken-later"] {
        let deadline = std::time::Instant::now() + MINUTE;
        let condition = loop {
            let broken = raw.get(name).await.unwrap();
            let valid = broken.data["status"]["conditions"].as_array().and_then(|c| {
                c.iter()
                    .find(|c| c["type"] == "Valid" && c["status"] == "False" && c["reason"] == "Unreadable")
                    .cloned()
            });
            if let Some(c) = valid {
                break c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never reported Unreadable: {:?}",
                broken.data["status"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let message = condition["message"].as_str().unwrap_or_default();
        assert!(message.contains("cannot read this definition"), "{name}: {condition}");
    }
    let jobs = env.list().await;
    assert!(
        jobs.iter().all(|j| !j.name_any().starts_with("broken")),
        "a definition that cannot be read makes no job: {}",
        common::summary(&jobs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_a_handler_moved_to_a_thread_stops_when_its_lease_is_lost_or_its_attempt_times_out() {
    let env = TestEnv::new("cancel-threads").await;
    let options = common::ReplicaOptions { test_worker: true, ..Default::default() };
    let _replicas: Vec<_> = (0..2).map(|i| env.replica_with(&format!("r{i}"), &[], &options)).collect();
    // Lease lost: the claim Lease is taken by hand while the thread works; another replica takes over.
    env.create("lease-lost", json!({"jobName": "record-thread", "args": {"ms": 8000}})).await;
    // Attempt timeout: the first attempt is stopped after 1 s and retried at once.
    env.create(
        "timed-out",
        json!({"jobName": "record-thread", "args": {"ms": 3000, "fail_until_attempt": 0},
               "attemptTimeoutSeconds": 1, "retry": {"maxAttempts": 2, "backoffSeconds": 0}}),
    )
    .await;
    let running = env.wait_job("lease-lost", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let name = running.status.unwrap().lease.unwrap();
    let mut taken = leases.get(&name).await.unwrap();
    taken.spec.as_mut().unwrap().holder_identity = Some("intruder".into());
    leases.replace(&name, &PostParams::default(), &taken).await.unwrap();
    env.wait_job("lease-lost", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    env.wait_job("timed-out", 2 * MINUTE, "final", |j| j.phase().is_final()).await;
    let history = bgjobs_history::History::read(&env.dir).unwrap();
    let lines = |job: &str| history.exec.iter().filter(|l| l.job.ends_with(job)).count();
    assert!(lines("/lease-lost") > 0 && lines("/timed-out") > 0, "the test worker recorded its executions");
    let report = bgjobs_history::check(&history, &bgjobs_history::Limits::default());
    assert_eq!(report.overlaps, 0, "a thread outlived its attempt: {:?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_clocks_disagree_still_run_each_recurring_tick_once_and_never_early() {
    clocks_disagree("skewed-ticks", "*/2 * * * * *", "0", 5, 7).await;
}

/// The same with ticks claimed 10 s ahead (the default, long enough that the claiming replica creates the job from
/// its claim without reading the definition again): the claim and the wait for the tick go by the apiserver's clock
/// too (a job created when its tick was claimed would be 10 s early, past the 2.5 s the whole-second clocks allow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_clocks_disagree_claim_ticks_ahead_yet_run_each_once_and_never_early() {
    clocks_disagree("skewed-ahead", "*/24 * * * * *", "10s", 3, 30).await;
}

/// A definition on `schedule`, owned in turn by replicas whose clocks are right and 20 s ahead (three rounds of
/// `round_secs`), claiming ticks `claim_ahead` early; at least `min_ticks` ticks run.
async fn clocks_disagree(ns: &str, schedule: &str, claim_ahead: &str, min_ticks: usize, round_secs: u64) {
    let env = TestEnv::new(ns).await;
    let _recorder = common::Recorder::start(&env);
    // One replica's clock runs 20 s ahead (libfaketime); replicas start, stop and start again, so the definition
    // changes hands between them.
    let skewed = common::ReplicaOptions { env: common::faked_clock(&[("FAKETIME", "+20")]), ..Default::default() };
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
        "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": "ticking"},
        "spec": {"schedule": schedule, "successfulJobsHistoryLimit": 0,
                 "jobTemplate": {"spec": {"jobName": "noop"}}}
    }))
    .unwrap();
    defs.create(&PostParams::default(), &def).await.unwrap();
    let flags = ["--recurring-claim-ahead", claim_ahead];
    for round in 0..3 {
        let a = env.replica(&format!("true-{round}"), &flags);
        let b = env.replica_with(&format!("ahead-{round}"), &flags, &skewed);
        tokio::time::sleep(Duration::from_secs(round_secs)).await;
        drop((a, b));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let history = bgjobs_history::History::read(&env.dir).unwrap();
    let mut ticks: std::collections::BTreeMap<i64, std::collections::BTreeSet<String>> = Default::default();
    for s in &history.status {
        if let Some(tick) = s.tick_ms {
            ticks.entry(tick).or_default().insert(s.uid.clone());
            assert!(s.created_ms >= tick - 2_500, "{} was created {} ms before its tick", s.job, tick - s.created_ms);
        }
    }
    assert!(ticks.len() >= min_ticks, "ticks ran: {}", ticks.len());
    let twice: Vec<_> = ticks.iter().filter(|(_, uids)| uids.len() > 1).collect();
    assert!(twice.is_empty(), "ticks with more than one job: {twice:?}");
}

/// A replica whose clock runs 20 s ahead and that cannot read the apiserver's yet (its answers arrive 5 s late, too
/// late to say when they were stamped) does nothing: it holds no member Lease, so a replica with a right clock runs
/// every definition's ticks, on time; once its answers come quickly it reads the clock, joins and runs jobs, and no
/// tick is started early or twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_has_not_read_the_apiservers_clock_yet_leaves_every_tick_to_the_others() {
    let env = TestEnv::new("unread-clock").await;
    let _recorder = common::Recorder::start(&env);
    let proxy = common::proxy::Proxy::to_apiserver().await;
    proxy.delay_downstream(Duration::from_secs(5));
    let skewed = common::ReplicaOptions {
        kubeconfig: Some(proxy.kubeconfig(&env.dir)),
        env: common::faked_clock(&[("FAKETIME", "+20")]),
        ..Default::default()
    };
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
    for name in &names {
        let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
            "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": name},
            "spec": {"schedule": "*/5 * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}
        }))
        .unwrap();
        defs.create(&PostParams::default(), &def).await.unwrap();
    }
    // Leases long enough to be kept through 5 s answers: only the clock holds the skewed replica back.
    let flags = ["--recurring-claim-ahead", "0", "--lease-duration", "30s", "--renew-deadline", "20s"];
    let flags = [&flags[..], &["--renew-interval", "5s"]].concat();
    let ahead = env.replica_with("ahead", &flags, &skewed);
    let _right = env.replica("right", &flags);
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let ahead_member = bgjobs::wire::member_lease_name("ahead", &env.ns);
    // Long enough for it to sync its caches and, by its own clock, see several ticks due.
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(ahead.log_text().contains("waiting for a first reading"), "it never got as far as the clock");
    assert!(members.get_opt(&ahead_member).await.unwrap().is_none(), "it joined before reading the clock");
    let ran = |jobs: &[bgjobs::api::BackgroundJob], name: &str| {
        jobs.iter().filter(|j| j.name_any().starts_with(&format!("{name}-"))).count()
    };
    let jobs = env.list().await;
    for name in &names {
        assert!(ran(&jobs, name) >= 3, "{name} ran {} ticks while one replica waited", ran(&jobs, name));
    }
    proxy.delay_downstream(Duration::ZERO);
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    while members.get_opt(&ahead_member).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "it never joined once its answers came quickly");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let history = bgjobs_history::History::read(&env.dir).unwrap();
    let by_ahead = history.status.iter().filter(|s| s.worker.as_deref() == Some("ahead")).count();
    assert!(by_ahead > 0, "it ran no job after joining");
    for s in history.status.iter().filter(|s| s.tick_ms.is_some()) {
        let tick = s.tick_ms.unwrap();
        assert!(s.created_ms >= tick - 2_500, "{} was created {} ms before its tick", s.job, tick - s.created_ms);
    }
    let report = bgjobs_history::check(&history, &Default::default());
    assert_eq!(report.duplicate_ticks, 0, "{:?}", report.violations);
}

/// A replica that has read the apiserver's clock, whose machine clock is then set 20 s ahead (libfaketime reading
/// its offset from a file), counts on from its reading: the ticks after the step start on time, not 20 s early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_machine_clock_is_set_ahead_after_reading_the_apiservers_starts_no_tick_early() {
    let env = TestEnv::new("stepped-clock").await;
    let _recorder = common::Recorder::start(&env);
    let offset_file = env.dir.join("faketime");
    std::fs::write(&offset_file, "+0\n").unwrap();
    let stepping = common::ReplicaOptions {
        env: common::faked_clock(&[
            ("FAKETIME_TIMESTAMP_FILE", &offset_file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1"),
        ]),
        ..Default::default()
    };
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
        "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": "ticking"},
        "spec": {"schedule": "*/5 * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}
    }))
    .unwrap();
    defs.create(&PostParams::default(), &def).await.unwrap();
    let r = env.replica_with("stepping", &["--recurring-claim-ahead", "0"], &stepping);
    env.wait_until(MINUTE, "two ticks ran", |jobs| jobs.len() >= 2).await;
    // Just after a tick: the replica's next look at the definition is almost 5 s away.
    while now_ms() % 5_000 > 300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&offset_file, "+20\n").unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The step took: the replica's log, stamped by its wall clock, runs ahead of this test's.
    let last_stamp = r.log_text().lines().filter_map(|l| l.split(' ').next()?.parse::<jiff::Timestamp>().ok()).max();
    let ahead_ms = last_stamp.map_or(0, |t| t.as_millisecond() - now_ms());
    assert!(ahead_ms > 10_000, "the replica's clock was not set ahead: its last log line is {ahead_ms} ms ahead");
    // The jump asked for a reading of the apiserver's clock at once (what puts a paused machine's estimate right), and
    // that reading did not move the estimate: the monotonic clock had counted every second.
    let log = r.log_text();
    let jumped = log.lines().position(|l| l.contains("wall clock jumped ahead of its monotonic clock"));
    let jumped = jumped.unwrap_or_else(|| panic!("the replica did not notice its wall clock jump:\n{log}"));
    let reading = log.lines().skip(jumped).find(|l| l.contains("read the apiserver's clock;"));
    let reading = reading.unwrap_or_else(|| panic!("no reading followed the jump:\n{log}"));
    let moved_ms: i64 = reading.split("moved_ms=").nth(1).and_then(|v| v.split(' ').next()?.parse().ok()).unwrap();
    assert!(moved_ms.abs() < 1_000, "the reading after the jump moved the estimate {moved_ms} ms: {reading}");
    let history = bgjobs_history::History::read(&env.dir).unwrap();
    let ticks = history.status.iter().filter(|s| s.tick_ms.is_some()).count();
    assert!(ticks >= 4, "ticks ran: {ticks}");
    for s in history.status.iter().filter(|s| s.tick_ms.is_some()) {
        let tick = s.tick_ms.unwrap();
        assert!(s.created_ms >= tick - 2_500, "{} was created {} ms before its tick", s.job, tick - s.created_ms);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_are_shared_only_among_replicas_that_run_the_recurring_controller() {
    let env = TestEnv::new("recurring-off").await;
    let _on = env.replica("on", &[]);
    let _off = env.replica("off", &["--recurring-enabled=false"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    for i in 0..10 {
        let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
            "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": format!("d{i}")},
            "spec": {"schedule": "*/2 * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}
        }))
        .unwrap();
        defs.create(&PostParams::default(), &def).await.unwrap();
    }
    env.wait_until(MINUTE, "every definition made a job", |jobs| {
        (0..10).all(|i| jobs.iter().any(|j| j.name_any().starts_with(&format!("d{i}-"))))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_exclusive_strategy_a_replica_that_runs_no_jobs_never_holds_the_lease() {
    let env = TestEnv::new("exclusive-tidy").await;
    let args = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str()];
    let mut tidy_args = args.to_vec();
    tidy_args.extend(["--job-execution-enabled", "false"]);
    let _tidy = env.replica("tidy", &tidy_args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _worker = env.replica("worker", &args);
    for i in 0..5 {
        env.create(&format!("n{i}"), json!({"jobName": "noop"})).await;
    }
    env.wait_until(MINUTE, "all 5 jobs Succeeded", |jobs| jobs.len() == 5 && all_in(jobs, Phase::Succeeded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slots_are_never_deleted_by_lost_claims() {
    let env = TestEnv::new("slots-kept").await;
    let cap = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "4"];
    let _replicas: Vec<_> = (0..4).map(|i| env.replica(&format!("r{i}"), &cap)).collect();
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    // Watch the slot Leases for deletions while 4 replicas race for 200 jobs (lost claims are common).
    let deletions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watch = {
        let (leases, deletions) = (leases.clone(), deletions.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            let stream = kube::runtime::watcher(
                leases,
                kube::runtime::watcher::Config::default().labels(bgjobs::wire::SLOT_LABEL),
            );
            futures::pin_mut!(stream);
            while let Some(e) = stream.next().await {
                if let Ok(kube::runtime::watcher::Event::Delete(_)) = e {
                    deletions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    for i in 0..200 {
        env.create(&format!("j{i:03}"), json!({"jobName": "noop"})).await;
    }
    env.wait_until(2 * MINUTE, "all 200 Succeeded", |jobs| jobs.len() == 200 && all_in(jobs, Phase::Succeeded)).await;
    watch.abort();
    assert_eq!(deletions.load(std::sync::atomic::Ordering::Relaxed), 0, "slot Leases were deleted");
}

/// A slot deleted by hand while its holder is paused, and a replica that starts meanwhile (a rollout, a scale-up, a
/// crash loop): every replica makes the slots at start-up, and made this one again, vacant, so free at once, and
/// took it for another job beside the attempt that held it (review C1). A slot made before is now left absent at
/// start-up: it is waited out a lease duration, and its holder puts it back before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_deleted_by_hand_under_a_paused_holder_is_not_made_free_by_a_replica_that_starts() {
    let env = TestEnv::new("slot-restarted").await;
    let flags = [
        "--lease-namespace",
        env.ns.as_str(),
        "--cluster-max-concurrency",
        "1",
        "--lease-duration",
        "30s",
        "--renew-deadline",
        "20s",
        "--renew-interval",
        "5s",
    ];
    let a = env.replica("a", &flags);
    env.create("first", json!({"jobName": "sleep", "args": {"seconds": 30}})).await;
    env.wait_job("first", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // Paused well within its renew deadline: its attempt holds slot-0 all along.
    a.stop();
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    leases.delete(&bgjobs::wire::slot_name(0), &Default::default()).await.unwrap();
    let _b = env.replica("b", &flags);
    env.create("next", json!({"jobName": "sleep", "args": {"seconds": 3}, "priority": "High"})).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    a.resume();
    env.wait_until(2 * MINUTE, "both jobs Succeeded", |jobs| jobs.len() == 2 && all_in(jobs, Phase::Succeeded)).await;
    let execs = common::executions(&env.invocations());
    assert!(execs.len() >= 2, "{execs:?}");
    assert_eq!(common::max_overlap(&execs, common::now_ms()), 1, "two jobs ran at once under a cap of 1: {execs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurring_owner_paused_between_claiming_a_tick_and_creating_its_job_never_runs_the_tick_again() {
    let env = TestEnv::new("paused-tick-owner").await;
    let _recorder = common::Recorder::start(&env);
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let options = common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let a = env.replica_with("a", &[], &options);
    let _b = env.replica("b", &[]);
    // A definition owned by a (rendezvous over both members): its jobs are deleted as soon as they finish.
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let mut name = String::new();
    for i in 0.. {
        name = format!("tick-{i}");
        let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
            "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": name},
            "spec": {"schedule": "*/10 * * * * *", "successfulJobsHistoryLimit": 0, "suspend": true,
                     "jobTemplate": {"spec": {"jobName": "noop", "ttlSecondsAfterFinished": 0}}}
        }))
        .unwrap();
        let created = defs.create(&PostParams::default(), &def).await.unwrap();
        if bgjobs::wire::member_owner(&["a".to_string(), "b".to_string()], &created.uid().unwrap()) == Some("a") {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // a's answers now arrive a second late: time to freeze it between its claim and its create.
    proxy.delay_downstream(Duration::from_secs(1));
    let resume = Patch::Merge(json!({"spec": {"suspend": false}}));
    defs.patch(&name, &PatchParams::default(), &resume).await.unwrap();
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let d = defs.get(&name).await.unwrap();
        if d.status.as_ref().and_then(|s| s.pending_job.as_ref()).is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a never claimed a tick");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.stop();
    // b takes the definition over, creates the tick's job, which runs and is deleted.
    tokio::time::sleep(Duration::from_secs(12)).await;
    proxy.delay_downstream(Duration::ZERO);
    a.resume();
    tokio::time::sleep(Duration::from_secs(6)).await;
    defs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = bgjobs_history::check(&bgjobs_history::History::read(&env.dir).unwrap(), &Default::default());
    assert_eq!(report.duplicate_ticks, 0, "{:?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_ticks_job_outlives_its_ttl_until_a_later_tick_is_claimed_and_never_runs_twice() {
    let env = TestEnv::new("kept-tick").await;
    // The state an owner leaves when it dies right after creating a tick's job: the status names the job as pending
    // (no write confirms a creation), and the job exists, with `ttlSecondsAfterFinished: 0`.
    let defs: Api<bgjobs::api::RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let def: bgjobs::api::RecurringBackgroundJob = serde_json::from_value(json!({
        "apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob", "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 0 * * *", "jobTemplate": {"spec": {"jobName": "noop", "ttlSecondsAfterFinished": 0}}}
    }))
    .unwrap();
    let def = defs.create(&PostParams::default(), &def).await.unwrap();
    let tick = jiff::Timestamp::now().as_second() - 5;
    let name = bgjobs::wire::recurring_job_name("nightly", jiff::Timestamp::from_second(tick).unwrap());
    let mut status = def.clone();
    status.status = Some(bgjobs::api::RecurringBackgroundJobStatus {
        last_schedule_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(tick).unwrap(),
        )),
        pending_job: Some(name.clone()),
        ..Default::default()
    });
    defs.replace_status("nightly", &PostParams::default(), &status).await.unwrap();
    let child = bgjobs::wire::recurring_child(&def, &name, jiff::Timestamp::from_second(tick).unwrap());
    env.jobs.create(&PostParams::default(), &child).await.unwrap();
    let runs_of_it = || executions(&env.invocations()).iter().filter(|e| e.job.ends_with(&format!("/{name}"))).count();
    // First a replica that runs jobs but not the recurring controller: it runs the job, whose TTL is due at once.
    let _worker = env.replica("worker", &["--recurring-enabled=false"]);
    env.wait_until(MINUTE, "the tick's job ran", |_| runs_of_it() > 0).await;
    // Then the definition's next owner, which did not create the job: the job itself tells it the tick is done.
    let _owner = env.replica("owner", &[]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(env.jobs.get_opt(&name).await.unwrap().is_some(), "deleted past its TTL while it is the latest tick's");
    // A later tick's claim lets it go, once no create of it can land any more: 76 s after the first later tick's
    // job was made.
    defs.patch("nightly", &PatchParams::default(), &Patch::Merge(json!({"spec": {"schedule": "* * * * * *"}})))
        .await
        .unwrap();
    env.wait_until(2 * MINUTE, "the old tick's job deleted after its TTL", |jobs| {
        !jobs.iter().any(|j| j.name_any() == name)
    })
    .await;
    defs.patch("nightly", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await.unwrap();
    assert_eq!(runs_of_it(), 1, "the tick's job ran {} times", runs_of_it());
}
