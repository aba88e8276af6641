//! What keeps the number of jobs bounded: retention of finished jobs (`--retention`, `src/retention.rs`) and a
//! namespace's ResourceQuota as backpressure on enqueue, against the local control plane.

mod common;

use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase, RecurringBackgroundJob};
use common::TestEnv;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

fn finished_for(job: &BackgroundJob) -> Option<Duration> {
    let done = job.status.as_ref()?.completion_time.as_ref()?.0;
    Some(jiff::Timestamp::now().duration_since(done).unsigned_abs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaces_retention_deletes_its_successes_and_keeps_its_failures() {
    let env = TestEnv::new("retention").await;
    // Another namespace's rule must not apply here; this namespace's rule overrides the 5-minute default.
    let rules = format!("{}/succeeded=2s,elsewhere/failed=1s", env.ns);
    let _r = env.replica("r", &["--retention", &rules]);
    env.create("ok", json!({"jobName": "noop"})).await;
    env.create("broken", json!({"jobName": "fail", "args": {"permanent": true}})).await;
    let left = env.wait_until(MINUTE, "the succeeded job deleted", |jobs| jobs.len() == 1).await;
    assert_eq!(left[0].name_any(), "broken");
    assert_eq!(left[0].phase(), Phase::Failed);
    let ran: Vec<String> = env.invocations().into_iter().filter(|l| l.ev == "start").map(|l| l.job).collect();
    assert!(ran.iter().any(|j| j.ends_with("/ok")), "the deleted job ran first: {ran:?}");
    // Well past the succeeded job's retention, the failed one is still there (its default is 7 days).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let jobs = env.list().await;
    assert_eq!(jobs.len(), 1, "{}", common::summary(&jobs));
    assert!(finished_for(&jobs[0]).unwrap() > Duration::from_secs(3), "finished long enough ago to have gone");
}

/// A policy refuses the deletes of 20 finished jobs (403), for good: each is tried again less and less often, and says
/// why in a `DeleteRefused` Warning, while other jobs' retention goes on; once the policy is lifted they are deleted.
/// Before, a refused delete held its job back a second, like any write just made: each was sent again about once a
/// second, for ever, taking the replica's delete pace from every other job's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_a_policy_refuses_are_tried_less_and_less_often_and_done_once_it_is_lifted() {
    let env = TestEnv::new("ret-refused").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    proxy.answer_instead(403, Some(http::Method::DELETE), "/backgroundjobs/keep-", usize::MAX);
    for i in 0..20 {
        env.create(&format!("keep-{i:02}"), json!({"jobName": "noop"})).await;
    }
    let _r = env.replica_with("r", &["--retention", "finished=0s"], &proxy.options(&env.dir));
    let deadline = Instant::now() + 2 * MINUTE;
    while proxy.held() < 20 {
        assert!(Instant::now() < deadline, "only {} deletes were refused", proxy.held());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Jobs that finish meanwhile are deleted as ever.
    env.create("other", json!({"jobName": "noop"})).await;
    let before = proxy.held();
    let deadline = Instant::now() + MINUTE;
    while env.jobs.get_opt("other").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "another finished job was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    let refused = proxy.held() - before;
    assert!(
        refused < 100,
        "{refused} deletes of 20 refused jobs sent again in about 20 s (before: about one a second each)"
    );
    let said = env.warnings_on("keep-00", "DeleteRefused").await;
    assert!(said.iter().any(|n| n.contains("turned down this replica's delete") && n.contains("403")), "{said:?}");
    proxy.answer_at_once();
    let deadline = Instant::now() + 3 * MINUTE;
    loop {
        let left = env.list().await;
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not deleted once the policy was lifted: {}", common::summary(&left));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_recurring_definition_follow_its_history_limit_not_the_operators_retention() {
    let env = TestEnv::new("retention-rec").await;
    let _r = env.replica("r", &["--retention", "finished=0s"]);
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let def = json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 2,
                     "jobTemplate": {"spec": {"jobName": "noop"}}});
    let def = common::fixtures::recurring("tick", def);
    defs.create(&PostParams::default(), &def).await.expect("create recurring job");
    env.create("one-off", json!({"jobName": "noop"})).await;

    // Retention 0 s deletes the one-off job at once; the definition's jobs stay until its history limit trims them.
    let deadline = Instant::now() + MINUTE;
    loop {
        let jobs = env.list().await;
        let kids: Vec<&BackgroundJob> = jobs.iter().filter(|j| j.name_any().starts_with("tick-")).collect();
        let succeeded: Vec<&&BackgroundJob> = kids.iter().filter(|j| j.phase() == Phase::Succeeded).collect();
        let ticks_run = env.invocations().iter().filter(|l| l.ev == "start" && l.job.contains("/tick-")).count();
        let old = succeeded.iter().filter(|j| finished_for(j).is_some_and(|d| d > Duration::from_secs(2))).count();
        if ticks_run >= 6 && old >= 1 && !jobs.iter().any(|j| j.name_any() == "one-off") {
            break;
        }
        assert!(Instant::now() < deadline, "{ticks_run} ticks ran, {old} kept for 2 s: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The history limit trims them, each once no create of it can land (about a minute after the next tick's job
    // was made): suspended, the definition makes no more, and 2 stay.
    let suspend = kube::api::Patch::Merge(json!({"spec": {"suspend": true}}));
    defs.patch("tick", &Default::default(), &suspend).await.expect("suspend the definition");
    let deadline = Instant::now() + 2 * MINUTE;
    loop {
        let jobs = env.list().await;
        let kept = jobs.iter().filter(|j| j.name_any().starts_with("tick-") && j.phase() == Phase::Succeeded).count();
        if kept <= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "history limit 2, {kept} kept: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // And not below: retention 0 s does not apply to them (it would leave only the pending job).
    for _ in 0..2 {
        let jobs = env.list().await;
        let kept = jobs.iter().filter(|j| j.name_any().starts_with("tick-") && j.phase() == Phase::Succeeded).count();
        assert_eq!(kept, 2, "history limit 2, not retention: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    defs.delete("tick", &Default::default()).await.expect("delete the definition");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_quota_refuses_enqueue_beyond_its_count_until_retention_deletes_finished_jobs() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let env = TestEnv::new("quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(env.client.clone(), &env.ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "jobs"},
        "spec": {"hard": {"count/backgroundjobs.bgjobs.dev": "3"}}
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.expect("create quota");
    // Admission counts against the quota only once its controller has written the status.
    let deadline = Instant::now() + MINUTE;
    while quotas.get("jobs").await.unwrap().status.and_then(|s| s.hard).is_none() {
        assert!(Instant::now() < deadline, "the ResourceQuota controller never filled in the quota's status");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (ok, out, err) = env.cli(&["enqueue", "noop", "-c", "5", "--parallel", "1", "--batch", "q1"]);
    let made = Instant::now();
    assert!(!ok, "a 4th job is refused: {out}{err}");
    assert!(err.contains("ResourceQuota refuses more BackgroundJobs") && err.contains("exceeded quota"), "{err}");
    assert!(err.contains("3 of 5 jobs of batch \"q1\" were created") && err.contains("--batch q1"), "{err}");
    let bulk = env.list().await;
    assert_eq!(bulk.len(), 3);
    // The oldest of the bulk call's jobs, by the apiserver's clock (this machine's: the control plane is local).
    let first_made = bulk.iter().filter_map(|j| j.creation_timestamp()).map(|t| t.0).min().unwrap();
    let one = serde_json::from_value(json!({"jobName": "noop"})).unwrap();
    let refused = bgjobs::jobs::enqueue(&env.jobs, one).await.expect_err("the library is refused too");
    assert!(matches!(refused, bgjobs::Error::QuotaExceeded(_)), "{refused}");

    // Jobs run, retention deletes them, the quota's usage drops, and enqueue works again.
    let rule = format!("{}/succeeded=1s", env.ns);
    let _r = env.replica("r", &["--retention", &rule]);
    // One job per call: a bulk call may get some of its jobs in as room frees up, and the count below must be exact.
    // A bulk call's jobs are kept 186 s after their creation whatever the retention (`retention::kept_at_least_until`),
    // so that its retried creates cannot make them again: room frees up only then (within a few seconds of clocks).
    let deadline = made + 4 * MINUTE;
    let mut enqueued = 0;
    while enqueued < 3 {
        let (ok, out, err) = env.cli(&["enqueue", "noop"]);
        if ok {
            assert_eq!(out.matches("created").count(), 1, "{out}");
            // Deleted no sooner than 186 s after its creation, less a second of whole-second timestamps and the
            // operator's clock reading (within 2.25 s of the apiserver's).
            let kept = jiff::Timestamp::now().duration_since(first_made).unsigned_abs();
            assert!(enqueued > 0 || kept > Duration::from_secs(182), "a bulk call's job deleted after only {kept:?}");
            enqueued += 1;
            continue;
        }
        assert!(err.contains("ResourceQuota"), "only the quota may refuse: {err}");
        assert!(Instant::now() < deadline, "enqueue still refused after the jobs finished: {err}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    env.wait_until(MINUTE, "every job ran and was deleted", |jobs| jobs.is_empty()).await;
    let started: Vec<String> = env.invocations().into_iter().filter(|l| l.ev == "start").map(|l| l.job).collect();
    let distinct: std::collections::BTreeSet<&String> = started.iter().collect();
    assert_eq!(distinct.len(), started.len(), "no job started twice: {started:?}");
    assert_eq!(started.len(), 6, "the 3 refused-over jobs and the 3 enqueued once there was room: {started:?}");
}

/// A bulk create whose answer is lost is sent again after 30 s. Meanwhile the job it made ran and, under
/// `succeeded=0s`, was deleted: the retried create made it again (201, a new UID) and the work ran twice. A bulk
/// call's job is now kept until the call's retried creates cannot land, so the retry finds it (409, same batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_create_retried_after_a_lost_answer_finds_its_finished_job_instead_of_running_it_again() {
    let env = TestEnv::new("retention-bulk").await;
    let _r = env.replica("r", &["--retention", &format!("{}/finished=0s", env.ns)]);
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let kubeconfig = kube::config::Kubeconfig::read_from(proxy.kubeconfig(&env.dir)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let through_proxy: Api<BackgroundJob> = Api::namespaced(kube::Client::try_from(config).unwrap(), &env.ns);
    through_proxy.list(&Default::default()).await.unwrap();
    // The create goes through and takes effect; its answer is held until the client gives up on it (30 s).
    proxy.hold_downstream();
    // Two seconds of work, so that the job is seen before it finishes and is deleted.
    let spec = bgjobs::jobs::spec("sleep", json!({"seconds": 2}));
    let sent = Instant::now();
    let call =
        tokio::spawn(async move { bgjobs::jobs::enqueue_batch(&through_proxy, "lost", vec![spec], 1, |_| {}).await });
    let made = env.wait_until(MINUTE, "the job created", |jobs| !jobs.is_empty()).await;
    let first = made[0].uid().unwrap();
    while !env.invocations().iter().any(|l| matches!(l.ev.as_str(), "end" | "finish") && l.uid == first) {
        assert!(sent.elapsed() < Duration::from_secs(25), "the job did not run within 25 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past the client's 30 s: the held answer is dropped with its connection, and the create is sent again.
    tokio::time::sleep(Duration::from_secs(33).saturating_sub(sent.elapsed())).await;
    proxy.release_downstream();
    let created = tokio::time::timeout(MINUTE, call).await.expect("the call answered").unwrap();
    let created = created.expect("the retried create finds the job the first one made");
    assert_eq!(created[0].uid().as_deref(), Some(first.as_str()), "the job the first create made, not a new one");
    // A second job made by the retry would run at once: give it time to.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let starts: Vec<String> = env.invocations().into_iter().filter(|l| l.ev == "start").map(|l| l.uid).collect();
    assert_eq!(starts, [first], "the bulk job ran once");
}
