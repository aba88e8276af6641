//! One renewal per replica vouches for every Lease it holds (`src/lease/tenure.rs`): an attempt's API writes do not
//! grow with its duration, a hand-deleted claim Lease is put back by its live holder, and a paused replica's tenure
//! is revoked before anything it holds is taken over. A replica in its shutdown grace keeps vouching but says it claims
//! no more. A replica whose watch connections died without a word replaces them within two bookmarks' time.

mod common;

use std::time::Duration;

use bgjobs::api::Phase;
use common::{TestEnv, executions};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempts_claim_lease_is_written_once_however_long_it_runs() {
    let env = TestEnv::new("writes-per-duration").await;
    // Fast leases: renewed every 500 ms, so 10 s of running would be about 20 renewals of a per-job Lease.
    let _r = env.replica("r", &[]);
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 10}})).await;
    let running = env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let name = running.status.as_ref().and_then(|s| s.lease.clone()).unwrap();
    let member = bgjobs::wire::member_lease_name("r", &env.ns);
    let claimed = leases.get(&name).await.unwrap();
    let (mut member_versions, mut last_member) = (0, None);
    // Every 250 ms until the job has finished: the claim Lease stays exactly as the claim wrote it (or is gone, once
    // given back), while the replica's member Lease keeps being renewed.
    loop {
        let job = env.jobs.get("long").await.unwrap();
        match leases.get_opt(&name).await.unwrap() {
            Some(l) => assert_eq!(
                l.resource_version(),
                claimed.resource_version(),
                "the claim Lease was written while its attempt ran (renewTime {:?})",
                l.spec.as_ref().and_then(|s| s.renew_time.clone())
            ),
            // Given back: the attempt ended, and its outcome was written first. (The job above was read before the
            // Lease, so it may be from before the end: read it again.)
            None => {
                let now = env.jobs.get("long").await.unwrap();
                assert!(now.phase().is_final(), "the claim Lease went before the attempt ended")
            }
        }
        let rv = members.get(&member).await.unwrap().resource_version();
        if rv != last_member {
            member_versions += 1;
            last_member = rv;
        }
        if job.phase().is_final() {
            assert_eq!(job.phase(), Phase::Succeeded);
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(member_versions >= 10, "the replica's one renewal kept going meanwhile: {member_versions} versions seen");
    // Given back when the attempt ended: the claim cost one create and one delete.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while leases.get_opt(&name).await.unwrap().is_some() {
        assert!(std::time::Instant::now() < deadline, "the claim Lease was not given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Lease with a time the apiserver takes (any, up to the end of year 9999) but the operator's types cannot hold
/// (none past 9999-12-30T22:00Z), written by a tenant in a watched namespace, labelled as bgjobs' own and as held by
/// the replica, fails no list: a replica started after it becomes ready and runs a job that outlasts several renew
/// deadlines (each confirmation of its Leases lists that one too) in one attempt. Before, every list that held it
/// failed: the replica's Lease cache never filled, so it never became ready, and no job ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_with_a_time_the_operator_cannot_read_stops_no_replica_and_no_attempt() {
    let env = TestEnv::new("far-lease").await;
    let member = bgjobs::wire::member_lease_name("r", &env.ns);
    let far = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "far", "namespace": env.ns,
            "labels": {"app.kubernetes.io/managed-by": "bgjobs", "bgjobs.dev/held-by": member}},
        "spec": {"holderIdentity": "tenant", "leaseDurationSeconds": 15,
            "renewTime": "9999-12-31T00:00:00.000000Z", "acquireTime": "9999-12-31T00:00:00.000000Z"}});
    let path = env.dir.join("far-lease.json");
    std::fs::write(&path, far.to_string()).unwrap();
    let out = common::kubectl().args(["create", "-f"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let r = env.replica("r", &[]);
    // Fast leases: a 2 s renew deadline, so 8 s of running takes four confirmations in a row.
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 8}})).await;
    let done = env.wait_job("long", 2 * MINUTE, "finished", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}\n{}", done.status, r.log_text());
    let execs = executions(&env.invocations());
    assert_eq!(execs.len(), 1, "one execution: {execs:?}");
    assert!(r.log_text().contains("an object with a time too far in the future to read"), "the Lease was read");
}

/// A replica that lost its member Lease (its renewals refused past the renew deadline) takes it again; the write that
/// takes it lands, but its answer never comes (a connection that died without a word). The write is bounded: the
/// replica tries again and is a member, running jobs, within seconds. Before, it waited for that answer (the
/// kernel's retransmission timeout, about 15 minutes, here 10): it claimed nothing meanwhile, while ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_member_lease_retake_is_never_answered_tries_again_and_runs_jobs() {
    let env = TestEnv::new("member-retake").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("warm-up", json!({"jobName": "noop"})).await;
    env.wait_job("warm-up", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let member = format!("/namespaces/default/leases/{}", bgjobs::wire::member_lease_name("r", &env.ns));
    proxy.refuse(Some(http::Method::PUT), &member, usize::MAX);
    let deadline = std::time::Instant::now() + MINUTE;
    while !r.log_text().contains("member lease lost; re-acquiring") {
        assert!(std::time::Instant::now() < deadline, "the member lease was never lost:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.answer_at_once();
    proxy.delay_answers(Some(http::Method::PUT), &member, Duration::from_secs(600), 1);
    env.create("after", json!({"jobName": "noop"})).await;
    let done = env.wait_job("after", MINUTE, "finished", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
    assert!(
        r.log_text().contains("cannot acquire the member lease"),
        "the held answer was waited out:\n{}",
        r.log_text()
    );
}

/// Under `--strategy exclusive`, the write that takes over the exclusive Lease (its holder gone) lands but is never
/// answered. The write is bounded: the replica tries again and leads, running jobs, within seconds. Before, it
/// waited for that answer (about 15 minutes on a dead connection, here 10), and nothing ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_lease_takeover_never_answered_is_tried_again_and_jobs_run() {
    let env = TestEnv::new("exclusive-retake").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let gone = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "bgjobs-exclusive", "labels": {"app.kubernetes.io/managed-by": "bgjobs"}},
        "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 3}});
    leases.create(&Default::default(), &serde_json::from_value(gone).unwrap()).await.unwrap();
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    proxy.delay_answers(Some(http::Method::PUT), "/leases/bgjobs-exclusive", Duration::from_secs(600), 1);
    let flags = ["--strategy", "exclusive", "--lease-namespace", env.ns.as_str()];
    let r = env.replica_with("r", &flags, &proxy.options(&env.dir));
    env.create("job", json!({"jobName": "noop"})).await;
    let done = env.wait_job("job", MINUTE, "finished", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
    assert_eq!(proxy.held(), 1, "the takeover's answer was held back");
    assert!(r.log_text().contains("cannot acquire the exclusive lease"), "{}", r.log_text());
}

/// A large cluster cap behind a slow apiserver: the replica makes its slot Leases step by step, recording each step
/// made, and then runs jobs. Before, it made every slot one request after another within one minute's patience,
/// recording none until all were made, so a replica whose slots took longer exited, and every restart began again
/// from slot 0: every replica crash-looped, never ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cluster_cap_behind_a_slow_apiserver_is_made_step_by_step_and_jobs_run() {
    let env = TestEnv::new("many-slots").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    // Every Lease created in the test's namespace (the slots among them) answered 150 ms late: 600 slots made one
    // after another take 90 s.
    let creates = format!("/namespaces/{}/leases", env.ns);
    proxy.delay_answers(Some(http::Method::POST), &creates, Duration::from_millis(150), usize::MAX);
    let flags = ["--lease-namespace", env.ns.as_str(), "--cluster-max-concurrency", "600"];
    let mut r = env.replica_with("r", &flags, &proxy.options(&env.dir));
    env.create("job", json!({"jobName": "noop"})).await;
    let done = env.wait_job("job", 2 * MINUTE, "finished", |j| j.phase().is_final()).await;
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
    assert!(r.exit_within(Duration::ZERO).is_none(), "the replica exited:\n{}", r.log_text());
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let slots = leases.list(&kube::api::ListParams::default().labels(bgjobs::wire::SLOT_LABEL)).await.unwrap();
    assert_eq!(slots.items.len(), 600);
    let record = leases.get(bgjobs::wire::SLOTS_RECORD).await.unwrap();
    assert_eq!(record.annotations().get(bgjobs::wire::SLOTS_MADE).map(String::as_str), Some("600"));
}

/// A replica killed without a graceful stop leaves its member Lease behind; a live replica of its scope revokes it
/// once it went unrenewed for 20 lease durations (60 s with the tests' 3 s), deletes it two lease durations later,
/// and keeps its own. Before, such Leases
/// stayed for good: a Deployment names every Pod anew, so each crash left one more in the lease namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_lease_left_by_a_replica_that_died_is_deleted_once_it_went_unrenewed_for_long() {
    let env = TestEnv::new("departed").await;
    let live = env.replica("live", &[]);
    let mut dead = env.replica("dead", &[]);
    env.wait_joined(&live, "default").await;
    env.wait_joined(&dead, "default").await;
    dead.kill9();
    let killed = std::time::Instant::now();
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let (dead_lease, live_lease) =
        (bgjobs::wire::member_lease_name("dead", &env.ns), bgjobs::wire::member_lease_name("live", &env.ns));
    while members.get_opt(&dead_lease).await.unwrap().is_some() {
        assert!(killed.elapsed() < 3 * MINUTE, "never deleted:\n{}", live.log_text());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(killed.elapsed() >= Duration::from_secs(55), "deleted {:?} after the kill", killed.elapsed());
    assert!(members.get_opt(&live_lease).await.unwrap().is_some(), "the live replica's own Lease is kept");
    // Revoked first (what its tenure still vouched for is free at once), deleted two lease durations later.
    assert!(live.log_text().contains("revoked the tenure of a replica gone"), "{}", live.log_text());
    assert!(live.log_text().contains("deleted the member Lease of a replica gone"), "{}", live.log_text());
}

/// A replica that cannot take its member Lease (its create refused, as for a lease namespace it may not write or a
/// quota of Leases used up) claims nothing and says it is not ready, so a rollout does not go on past it; once it
/// holds the Lease it is ready and runs jobs. Before, it was ready as soon as its caches had synced, and stayed so
/// while it ran nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_its_member_lease_is_not_ready_until_it_holds_it() {
    let env = TestEnv::new("ready-member").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    proxy.refuse(Some(http::Method::POST), "/namespaces/default/leases", usize::MAX);
    let addr = format!("127.0.0.1:{}", common::free_port());
    let r = env.replica_with("r", &["--metrics-addr", &addr], &proxy.options(&env.dir));
    let readyz = || async {
        match reqwest::get(format!("http://{addr}/readyz")).await {
            Ok(answer) => answer.status().as_u16(),
            Err(_) => 0,
        }
    };
    env.create("job", json!({"jobName": "noop"})).await;
    let deadline = std::time::Instant::now() + MINUTE;
    while !r.log_text().contains("caches synced; dispatching") {
        assert!(std::time::Instant::now() < deadline, "the caches never synced:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(readyz().await, 503, "ready without a member Lease:\n{}", r.log_text());
    assert_eq!(env.jobs.get("job").await.unwrap().phase(), Phase::Waiting, "nothing is claimed without one");
    proxy.answer_at_once();
    let done = env.wait_job("job", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.attempts(), 1);
    assert_eq!(readyz().await, 200, "ready once it holds its member Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_deleted_claim_lease_is_put_back_by_its_live_holder_and_the_job_runs_once() {
    let env = TestEnv::new("claim-put-back").await;
    let _replicas: Vec<_> = (0..2).map(|i| env.replica(&format!("r{i}"), &[])).collect();
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 8}})).await;
    let running = env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let name = running.status.as_ref().and_then(|s| s.lease.clone()).unwrap();
    let before = leases.get(&name).await.unwrap();
    leases.delete(&name, &DeleteParams::default()).await.unwrap();
    // The holder's next list (every 500 ms here) finds it gone and creates it again, as held.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let back = loop {
        if let Some(l) = leases.get_opt(&name).await.unwrap() {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "the claim Lease was not put back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(back.uid(), before.uid(), "a new object");
    assert_eq!(bgjobs::wire::holder(&back), bgjobs::wire::holder(&before), "held by the same replica");
    let done = env.wait_job("long", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.attempts(), 1, "the live holder kept its attempt");
    let execs = executions(&env.invocations());
    assert_eq!(execs.len(), 1, "one execution: {execs:?}");
}

/// A restarting apiserver turns down the outcome write of a job that has just finished: with the bare 404 it answers
/// for a custom resource it does not serve yet, for about 7 s (past the replica's 2 s renew deadline, while its
/// Leases are served and confirmed), then with a 503. The write is sent again until it lands: the job is recorded
/// once and its work done once. Before, the 404 read as "the job is gone" (and a 503 as a failed write), and the
/// write was given up at the renew deadline counted from its start: the outcome was dropped, and the job ran again
/// once its claim expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_write_a_restarting_apiserver_turns_down_is_sent_again_and_the_job_runs_once() {
    let env = TestEnv::new("outcome-again").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let _r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("job", json!({"jobName": "sleep", "args": {"seconds": 4}})).await;
    env.wait_job("job", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    // The job's next status write is its outcome (a sleep reports nothing while it runs).
    let status = format!("/namespaces/{}/backgroundjobs/job/status", env.ns);
    // Sent again after 0.2, 0.4, 0.8, 1.6, 2 and 2 s.
    proxy.answer_instead(404, Some(http::Method::PUT), &status, 6);
    proxy.refuse(Some(http::Method::PUT), &status, 1);
    let done = env.wait_job("job", 2 * MINUTE, "Succeeded", |j| j.phase().is_final()).await;
    assert_eq!(proxy.held(), 7, "every turn-down met the outcome write: the test showed nothing");
    assert_eq!((done.phase(), done.attempts()), (Phase::Succeeded, 1), "{:?}", done.status);
    let execs = executions(&env.invocations());
    assert_eq!(execs.len(), 1, "one execution: {execs:?}");
}

/// A replica that starts while the apiserver, just restarted, answers BackgroundJobs with a bare 404 (their CRD not
/// loaded yet) asks again and starts once they are served. Before, it exited at once saying the CRD was not
/// installed (a Deployment would restart it after a growing back-off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_the_apiserver_serves_backgroundjobs_again_waits_for_them_and_runs_jobs() {
    let env = TestEnv::new("start-not-served").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    // The start-up check's list of BackgroundJobs (one item: kube spells its query `?&limit=1`), answered as a
    // restarting apiserver does, three times.
    proxy.answer_instead(404, Some(http::Method::GET), "/backgroundjobs?&limit=1", 3);
    let mut r = env.replica_with("r", &[], &proxy.options(&env.dir));
    env.create("job", json!({"jobName": "noop"})).await;
    let deadline = std::time::Instant::now() + MINUTE;
    while !env.list().await.iter().any(|j| j.phase() == Phase::Succeeded) {
        if let Some(status) = r.exit_within(Duration::from_millis(1)) {
            panic!("the replica exited ({status}):\n{}", r.log_text());
        }
        assert!(std::time::Instant::now() < deadline, "the job did not succeed:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(proxy.held(), 3, "the start-up check met every bare 404: the test showed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replicas_tenure_is_revoked_before_its_jobs_move_and_it_acts_on_none_when_it_wakes() {
    let env = TestEnv::new("tenure-revoked").await;
    let a = env.replica("a", &[]);
    for i in 0..3 {
        env.create(&format!("j{i}"), json!({"jobName": "sleep", "args": {"seconds": 6}})).await;
    }
    for i in 0..3 {
        env.wait_job(&format!("j{i}"), MINUTE, "Running on a", |j| {
            j.phase() == Phase::Running && j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a")
        })
        .await;
    }
    let _b = env.replica("b", &[]);
    a.stop();
    for i in 0..3 {
        env.wait_job(&format!("j{i}"), MINUTE, "taken over by b", |j| {
            j.attempts() == 2 && j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("b")
        })
        .await;
    }
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let a_member = bgjobs::wire::member_lease_name("a", &env.ns);
    let revoked = members.get(&a_member).await.unwrap();
    assert!(
        bgjobs::wire::annotation(&revoked, bgjobs::wire::REVOKED_ANNOTATION).is_some(),
        "b revoked a's tenure before taking over: {:?}",
        revoked.metadata.annotations
    );
    // Wake a: its sleeps are long over, but its tenure is gone, so none of its results may land.
    a.resume();
    for i in 0..3 {
        let done = env.wait_job(&format!("j{i}"), MINUTE, "finished", |j| j.phase().is_final()).await;
        let s = done.status.unwrap();
        assert_eq!((s.phase, s.attempts, s.worker.as_deref()), (Some(Phase::Succeeded), 2, Some("b")));
    }
    // (a's executions are logged as ending when it woke up, so their overlap with b's says nothing here: what
    // matters is that none of a's results landed, checked above.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.log_text().contains("member lease lost"), "a learnt its tenure ended:\n{}", a.log_text());
}

/// Replicas of two lease namespaces that see the same jobs (two deployments watching every namespace, or one whose
/// `--lease-namespace` changes in a rolling update): neither takes the other's live claims, and one takes over the
/// claims of another that died once its member Lease, read where it is, has not changed for a lease duration.
/// Before: the replica of the other namespace looked for the holder's member Lease in its own namespace, found
/// none, and took the running job over, a second run beside the first (a review found this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_lease_namespace_leaves_a_live_holders_job_alone_and_takes_over_a_dead_ones() {
    let env = TestEnv::new("tenure-elsewhere").await;
    // a's member Lease in `default` (the tests' lease namespace), b's in the test's own namespace.
    let mut a = env.replica("a", &[]);
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 20}})).await;
    env.wait_job("long", MINUTE, "Running on a", |j| {
        j.phase() == Phase::Running && j.status.as_ref().and_then(|s| s.worker.as_deref()) == Some("a")
    })
    .await;
    let _b = env.replica("b", &["--lease-namespace", &env.ns]);
    // Many lease durations (3 s) of b beside a's live claim.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let job = env.jobs.get("long").await.unwrap();
    let worker = job.status.as_ref().and_then(|s| s.worker.clone());
    assert_eq!((job.attempts(), worker.as_deref()), (1, Some("a")), "b must leave a's live claim alone");
    a.kill9();
    let killed_at = common::now_ms();
    let done = env.wait_job("long", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let s = done.status.unwrap();
    assert_eq!((s.attempts, s.worker.as_deref()), (2, Some("b")), "b takes over once a is gone");
    let execs = executions(&env.invocations());
    let on_b: Vec<_> = execs.iter().filter(|e| e.worker == "b").collect();
    assert_eq!(on_b.len(), 1, "one run on b: {execs:?}");
    assert!(on_b[0].start >= killed_at, "b started only after a was killed: {execs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_status_writes_are_refused_does_not_hold_jobs_back_from_the_others() {
    let env = TestEnv::new("claim-refused").await;
    // r0 may create claim Leases but not write a job's status: each of its claims is refused after its Lease landed.
    let refused = common::operator_account(&env, "bgjobs-no-job-status", &[("backgroundjobs/status", "update")]).await;
    let options = common::ReplicaOptions { kubeconfig: Some(refused), ..Default::default() };
    // Its account may touch Leases in the test's namespace only: both replicas keep their member Leases there.
    let leases_here = ["--lease-namespace", env.ns.as_str()];
    let r0 = env.replica_with("r0", &leases_here, &options);
    env.create("first", json!({"jobName": "noop"})).await;
    let deadline = std::time::Instant::now() + MINUTE;
    // A refusal is a sure answer (the write did not land): the claim Lease is released, not kept to age.
    while !r0.log_text().contains("the status write did not land (refused, or not sent): claim Lease released") {
        assert!(std::time::Instant::now() < deadline, "r0 never had a claim refused:\n{}", r0.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // r1 can write: it runs the job, although r0 lives on and keeps trying.
    let _r1 = env.replica("r1", &leases_here);
    let done = env.wait_job("first", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.status.unwrap().worker.as_deref(), Some("r1"));
}

/// An admission policy refuses the status writes of 300 jobs at the head of the queue (403), for good: each claim of
/// them is turned down. A job behind them runs all the same, the refused ones say why in a `ClaimRefused` Warning,
/// and once the policy is lifted they all run: none lost. Before, a refused claim held its job back a second, like
/// any claim this replica had just acted on, so the replica spent its two slots trying the refused jobs again, round
/// after round, and the job behind them never had a turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_an_admission_policy_refuses_for_good_hold_back_neither_the_queue_nor_their_own_jobs_once_lifted() {
    let env = TestEnv::new("claims-refused").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    proxy.answer_instead(403, Some(http::Method::PUT), "/backgroundjobs/blocked-", usize::MAX);
    let blocked: Vec<String> = (0..300).map(|i| format!("blocked-{i:03}")).collect();
    futures::future::join_all(blocked.chunks(30).map(|names| {
        let env = &env;
        async move {
            for name in names {
                env.create(name, json!({"jobName": "noop"})).await;
            }
        }
    }))
    .await;
    env.create("behind", json!({"jobName": "noop"})).await;
    let _r = env.replica_with("r", &["--max-concurrent-jobs-per-instance", "2"], &proxy.options(&env.dir));
    let ran = env.wait_job("behind", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(ran.attempts(), 1);
    assert!(proxy.held() >= 300, "only {} claims were refused: the test showed nothing", proxy.held());
    let said = env.warnings_on("blocked-000", "ClaimRefused").await;
    assert!(
        said.iter().any(|n| n.contains("turned down this replica's claim") && n.contains("403")),
        "the refused job says why: {said:?}"
    );
    proxy.answer_at_once();
    let deadline = std::time::Instant::now() + 4 * MINUTE;
    loop {
        let jobs = env.list().await;
        if common::all_in(&jobs, Phase::Succeeded) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all ran once the policy was lifted: {}",
            common::summary(&jobs)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(executions(&env.invocations()).len(), 301, "each job ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_in_its_shutdown_grace_keeps_its_member_lease_but_says_it_claims_no_more() {
    let env = TestEnv::new("grace-roles").await;
    let mut r = env.replica("r", &[]);
    // Long enough to run on through the checks below (up to 7.5 s) on a slow machine, short of the 25 s grace.
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 16}})).await;
    env.wait_job("long", MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    let members: Api<Lease> = Api::namespaced(env.client.clone(), "default");
    let name = bgjobs::wire::member_lease_name("r", &env.ns);
    let says = |l: &Lease| bgjobs::wire::annotation(l, bgjobs::wire::JOBS_ANNOTATION).map(str::to_string);
    assert_eq!(says(&members.get(&name).await.unwrap()).as_deref(), Some("true"));
    // SIGTERM: the replica claims nothing more and lets its running attempt finish (its grace is 25 s).
    assert!(!r.terminate(Duration::from_millis(100)), "the replica waits for its running attempt");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let member = members.get_opt(&name).await.unwrap().expect("the member Lease stays while an attempt runs");
        if says(&member).as_deref() == Some("false") {
            assert_eq!(bgjobs::wire::holder(&member), Some("r"));
            // And it is still renewed: it vouches for the running attempt's claim Lease.
            let said_at = member.resource_version();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let later = members.get(&name).await.unwrap();
            assert_ne!(later.resource_version(), said_at, "the member Lease is no longer renewed in the grace");
            assert_eq!(says(&later).as_deref(), Some("false"), "a renewal brought the old roles back");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the member Lease still says the replica claims jobs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = env.jobs.get("long").await.unwrap();
    assert_eq!(job.phase(), Phase::Running, "the attempt runs on through the grace");
    env.wait_job("long", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert!(r.terminate(Duration::from_secs(20)), "the replica exits once its attempt finished");
    assert!(members.get_opt(&name).await.unwrap().is_none(), "and gives its member Lease back");
}

/// A replica cut off from the apiserver past its renew deadline (a partition, an apiserver restart) stops its
/// attempts and loses its tenure; the Leases it could not give back name that tenure. Once it can reach the
/// apiserver again it takes its member Lease back and runs the jobs again within a few lease durations: the Leases
/// of its own ended tenure hold nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_past_its_renew_deadline_runs_its_jobs_again_soon_after() {
    let env = TestEnv::new("cut-off").await;
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let options = common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let r = env.replica_with("r", &[], &options);
    for i in 0..2 {
        env.create(&format!("long{i}"), json!({"jobName": "sleep", "args": {"seconds": 30}})).await;
    }
    for i in 0..2 {
        env.wait_job(&format!("long{i}"), MINUTE, "Running", |j| j.phase() == Phase::Running).await;
    }
    proxy.reset_all();
    proxy.stall(Duration::from_secs(5)).await;
    let healed = std::time::Instant::now();
    for i in 0..2 {
        env.wait_job(&format!("long{i}"), MINUTE, "running again", |j| {
            j.phase() == Phase::Running && j.attempts() == 2
        })
        .await;
    }
    let took = healed.elapsed();
    eprintln!("both jobs running again {took:?} after the partition healed");
    assert!(took < Duration::from_secs(30), "took {took:?} (3 s leases):\n{}", r.log_text());
}

/// An apiserver gone without its FIN or RST reaching the replica (its host lost, a partition that drops the close):
/// the replica's watches hear nothing and nothing tells it so. Its caches stayed blind until a watch had been silent
/// for 295 s, and a job created meanwhile waited five minutes. Now a watch is replaced after 130 s of silence, two of
/// the bookmarks the apiserver sends each watch about every minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watch_connections_died_without_a_word_sees_new_jobs_once_it_replaces_its_silent_watches() {
    let env = TestEnv::new("silent-watches").await;
    let proxy = common::proxy::Proxy::to_apiserver().await;
    let options = common::ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let r = env.replica_with("r", &[], &options);
    env.wait_joined(&r, "default").await;
    env.create("before", json!({"jobName": "noop"})).await;
    env.wait_job("before", MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    // Every connection open now, its watches' among them, passes nothing more; new ones work.
    assert!(proxy.kill_silently() > 0, "the replica's connections were silenced");
    let created = std::time::Instant::now();
    env.create("after", json!({"jobName": "noop"})).await;
    env.wait_job("after", 6 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    let waited = created.elapsed();
    assert!(waited < Duration::from_secs(200), "a job waited {waited:?} for the replica's dead watches to be replaced");
    // Not found another way (or the connections were not silenced, and the test showed nothing).
    assert!(waited > Duration::from_secs(60), "a job ran {waited:?} after the kill: its watch was not dead");
    assert!(r.log_text().contains("its connection is taken for dead"), "the replacement said why");
}
