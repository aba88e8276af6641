//! The exclusive strategy under faults: one cluster-wide Lease, and only its holder runs jobs. A shorter run of its
//! own, in its own namespace: four replicas (the same kinds as the parallel run's) drain a workload without Pods (a
//! Pod's execution outlives its leader by design, see `bgjobs_history::check`), under a per-replica cap and a
//! cluster cap below it, while the faults go for the leader three times in four and Lease deletions take the
//! exclusive Lease itself. The checker holds the run to the usual guarantees and to what exclusive adds: at no
//! instant do two replicas run jobs.

use std::time::{Duration, Instant};

use bgjobs::wire::EXCLUSIVE_LEASE;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::DeleteParams;

use crate::common::{self, TestEnv};
use crate::fleet::{Fleet, Rng};
use crate::{ONE_RUN_AT_A_TIME, OPERATOR_ACCOUNT, workload};

const PER_REPLICA: usize = 4;
/// Below the per-replica cap, so that the leader's attempts also hold slot Leases.
const CLUSTER_CAP: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_exclusive_strategy_a_randomized_fault_schedule_never_lets_two_replicas_run_at_once() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let (seconds, seed) = crate::schedule("exclusive", 0.5);
    let mut rng = Rng::new(seed);
    let env = TestEnv::new("chaos-exclusive").await;
    let proxies = crate::Proxies::start().await;
    let per_replica = PER_REPLICA.to_string();
    let cap = CLUSTER_CAP.to_string();
    let flags = [
        "--strategy",
        "exclusive",
        "--max-concurrent-jobs-per-instance",
        per_replica.as_str(),
        "--cluster-max-concurrency",
        cap.as_str(),
        "--lease-namespace",
        env.ns.as_str(),
        "--shutdown-grace",
        "1s",
    ];
    let account = common::operator_account(&env, OPERATOR_ACCOUNT, &[]).await;
    let second = common::SecondApiserver::start(); // stopped after the fleet, which is dropped first
    let specs = crate::members(&env, account, &proxies, &second);
    let _recorder = workload::Recorder::start(&env);
    let mut fleet = Fleet::start(&env.dir, &env.ns, &flags, specs);
    let http = workload::HttpWorker::start(&env.dir).await;
    let mut load = workload::Workload::new(&env, None, &http.url);
    load.define_recurring().await;

    // One leader runs at most three jobs at once: a smaller backlog than the parallel run's, and smaller batches.
    load.enqueue_batch(&mut rng, 40).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds) {
        load.enqueue_batch(&mut rng, 6).await;
        crate::inject(&mut fleet, &proxies, &env, &mut rng, true).await;
    }
    fleet.heal();
    proxies.heal();
    load.stop_recurring().await;
    let jobs = crate::drain(&env).await;
    let limits = crate::limits(CLUSTER_CAP, PER_REPLICA, true);
    crate::judge(&env, seed, &limits, jobs.len());
}

/// The member that holds the exclusive Lease now, if any.
pub async fn leader(env: &TestEnv, fleet: &Fleet) -> Option<usize> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let lease = leases.get_opt(EXCLUSIVE_LEASE).await.ok()??;
    let holder = bgjobs::wire::holder(&lease)?;
    fleet.members.iter().position(|m| m.identity == holder)
}

/// Delete the exclusive Lease by hand: its holder notices only at its next renewal, while the others look for it
/// every second.
pub async fn delete_the_lease(env: &TestEnv, fleet: &Fleet) {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    fleet.faults.record("lease-delete", EXCLUSIVE_LEASE, "exclusive");
    let _ = leases.delete(EXCLUSIVE_LEASE, &DeleteParams::default()).await;
}
