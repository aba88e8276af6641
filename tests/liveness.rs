//! One renewal per replica vouches for every Lease it holds (`src/lease/tenure.rs`): an attempt's API writes do not
//! grow with its duration, a hand-deleted claim Lease is put back by its live holder, and a paused replica's tenure
//! is revoked before anything it holds is taken over.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgjobs::api::{BackgroundJob, Phase};
use common::{TestEnv, executions};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::DeleteParams;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Counts every write (create, update, delete) to the objects of `api`, by name, as a watch sees them.
fn count_writes<K>(api: Api<K>, name: Option<&str>) -> Arc<Mutex<HashMap<String, usize>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let counts: Arc<Mutex<HashMap<String, usize>>> = Default::default();
    let out = counts.clone();
    let config = match name {
        Some(n) => watcher::Config::default().fields(&format!("metadata.name={n}")),
        None => watcher::Config::default(),
    };
    tokio::spawn(async move {
        let stream = watcher(api, config);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::Delete(o)) => {
                    *out.lock().unwrap().entry(o.name_any()).or_default() += 1;
                }
                Ok(_) => {}
                Err(e) => panic!("the write-counting watch failed: {e}"),
            }
        }
    });
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempt_costs_the_same_api_writes_as_a_short_one() {
    let env = TestEnv::new("writes-per-duration").await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let lease_writes = count_writes(leases, None);
    // Member Leases live in the Lease namespace (`default` for test replicas).
    let member = bgjobs::members::member_lease_name("r", &env.ns);
    let member_writes = count_writes(Api::<Lease>::namespaced(env.client.clone(), "default"), Some(&member));
    let job_writes = count_writes::<BackgroundJob>(env.jobs.clone(), None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Fast leases: renewed every 500 ms, so 10 s of running would be about 20 renewals of a per-job Lease.
    let _r = env.replica("r", &[]);
    env.create("short", json!({"jobName": "sleep", "args": {"seconds": 0}})).await;
    env.create("long", json!({"jobName": "sleep", "args": {"seconds": 10}})).await;
    for name in ["short", "long"] {
        env.wait_job(name, 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leases = lease_writes.lock().unwrap().clone();
    let jobs = job_writes.lock().unwrap().clone();
    let (short, long) = (leases.get("bgj-short").copied(), leases.get("bgj-long").copied());
    assert_eq!(long, short, "the long attempt's claim Lease was written more often than the short one's: {leases:?}");
    assert_eq!(long, Some(2), "a claim Lease is created and given back, nothing in between: {leases:?}");
    assert_eq!(jobs.get("long"), jobs.get("short"), "job writes differ: {jobs:?}");
    let renewals = member_writes.lock().unwrap().get(&member).copied().unwrap_or(0);
    assert!(renewals >= 10, "the replica's one renewal kept going meanwhile: {renewals}");
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
    assert_eq!(bgjobs::lease::holder(&back), bgjobs::lease::holder(&before), "held by the same replica");
    let done = env.wait_job("long", 2 * MINUTE, "Succeeded", |j| j.phase() == Phase::Succeeded).await;
    assert_eq!(done.attempts(), 1, "the live holder kept its attempt");
    let execs = executions(&env.invocations());
    assert_eq!(execs.len(), 1, "one execution: {execs:?}");
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
    let a_member = bgjobs::members::member_lease_name("a", &env.ns);
    let revoked = members.get(&a_member).await.unwrap();
    assert!(
        bgjobs::lease::annotation(&revoked, bgjobs::lease::tenure::REVOKED_ANNOTATION).is_some(),
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
