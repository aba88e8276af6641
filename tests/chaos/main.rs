//! The adversarial tier: a mixed workload on a fleet of replicas, under a randomized schedule of faults, checked
//! afterwards against every guarantee by the offline history checker (`e2e/history`). Two runs, one after the
//! other (their apiserver restarts would hit each other): the parallel strategy, then the exclusive one
//! (`exclusive.rs`).
//!
//! Workload: in-process jobs of every priority, jobs that fail and are retried, jobs with concurrency keys, HTTP
//! jobs, Pod-mode jobs and recurring definitions, under a per-replica cap and a cluster-wide cap.
//! Fleet: four replicas; one reaches the apiserver through a TCP proxy that resets and stalls its connections, one
//! through a second kube-apiserver on the same etcd (an HA pair whose watch caches lag each other), one runs with
//! its clock 20 s ahead through a proxy that reads its requests (its watches made to lag, its answers held back).
//! Faults, one every 2–5 s: `kill -9` (restarted under the same or a new identity), SIGSTOP past the lease duration,
//! SIGTERM, an apiserver restart (alone or with etcd), proxy resets and stalls, watches that lag past the lease while
//! reads and writes are answered at once, answers held back after their requests took effect, hand-deleted claim,
//! slot and key Leases, a verb taken from the RBAC Role one replica runs under.
//!
//! `CHAOS_SECONDS` (default 60) sets how long faults are injected into the parallel run (the exclusive run gets
//! half); `CHAOS_SEED` reproduces a schedule (each run prints its seed); `CHAOS_FAULTS` (comma-separated kinds,
//! default all: rbac-remove, kill9, stop, term, apiserver-restart, proxy-reset, proxy-stall, watch-lag, answer-delay,
//! lease-delete) narrows
//! the schedule. A failing run names the broken invariant and keeps its history in `target/test-runs/<ns>/`.

#[path = "../common/mod.rs"]
mod common;
mod exclusive;
mod fleet;
mod workload;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bgjobs::api::Phase;
use bgjobs_history::{History, Limits};
use common::TestEnv;
use fleet::{Fleet, MemberSpec, Rng};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};

const PER_REPLICA: usize = 4;
/// The ServiceAccount (and Role) r0 runs as.
const OPERATOR_ACCOUNT: &str = "chaos-operator";
const CLUSTER_CAP: usize = 6;
/// The tests' lease duration (`common::FAST_LEASES`), plus the renew deadline's slack for the checker's window.
const LEASE_MS: i64 = 3_000 + 2_000;
/// The FIFO bound the dispatch keeps (`bgjobs::wire::FIFO_BOUND`), in ms.
const FIFO_BOUND_MS: i64 = bgjobs::wire::FIFO_BOUND.as_millis() as i64;

/// The runs take turns: an apiserver restart in one would be a fault the other never recorded.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long to inject faults (`CHAOS_SECONDS`, default 60, times `share`) and the seed (`CHAOS_SEED`, else the
/// clock), printed so that the run can be replayed.
fn schedule(run: &str, share: f64) -> (u64, u64) {
    let seconds: u64 = std::env::var("CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seconds = (seconds as f64 * share).round() as u64;
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| jiff::Timestamp::now().as_nanosecond() as u64);
    eprintln!("chaos: {run} run: seed {seed}, {seconds} s of faults (CHAOS_SEED={seed} reproduces it)");
    (seconds, seed)
}

/// The four members of a fleet: r0 as the chart's ServiceAccount (`account`), r1 through `proxies.tcp`, r2 through
/// the `second` apiserver, r3 through `proxies.http` with its clock 20 s ahead.
fn members(
    env: &TestEnv,
    account: std::path::PathBuf,
    proxies: &Proxies,
    second: &common::SecondApiserver,
) -> Vec<MemberSpec> {
    // Each claims recurring ticks ahead by another lead (workload::DEFINITIONS has a schedule that lets them): a
    // tick claimed ahead by one member may have its job made by another, and the next tick claimed by a third.
    let spec =
        |kubeconfig, clock_offset_ms, claim_ahead, via| MemberSpec { kubeconfig, clock_offset_ms, claim_ahead, via };
    vec![
        spec(account, 0, "10s", "apiserver, as the chart's ServiceAccount"),
        spec(proxies.tcp.kubeconfig(&env.dir), 0, "6s", "proxy"),
        spec(second.kubeconfig.clone(), 0, "3s", "second apiserver"),
        spec(
            proxies.http.kubeconfig(&common::kubeconfig_path(), &env.dir, "http-proxied-kubeconfig"),
            20_000,
            "9s",
            "request-reading proxy, clock +20 s",
        ),
    ]
}

/// What stands between two members and the apiserver: r1's byte-copying proxy (resets, stalls) and r3's
/// request-reading one (lagging watches, answers held back).
struct Proxies {
    tcp: common::proxy::Proxy,
    http: common::http_proxy::HttpProxy,
}

impl Proxies {
    async fn start() -> Proxies {
        Proxies {
            tcp: common::proxy::Proxy::to_apiserver().await,
            http: common::http_proxy::HttpProxy::to_apiserver().await,
        }
    }

    /// Every fault of theirs over.
    fn heal(&self) {
        self.tcp.heal();
        self.http.lag_watches(Duration::ZERO);
        self.http.answer_at_once();
    }
}

/// Wait (bounded) for every job to end; whatever does not is reported by the checker as stuck. Until the jobs stay
/// the same a few seconds apart: a tick claimed ahead before the definitions were suspended still makes its job when
/// due, and that job, made after a list that showed every job final, was judged stuck as it started.
async fn drain(env: &TestEnv) -> Vec<bgjobs::api::BackgroundJob> {
    let drained = Instant::now();
    let uids = |jobs: &[bgjobs::api::BackgroundJob]| jobs.iter().filter_map(|j| j.uid()).collect::<BTreeSet<_>>();
    let mut jobs = env.list().await;
    loop {
        while !jobs.iter().all(|j| j.phase().is_final()) && drained.elapsed() < Duration::from_secs(240) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            jobs = env.list().await;
        }
        // The history is read once the recorder has seen every job final too: after an apiserver restart its watch
        // re-lists, which can take longer than the operator's own writes.
        let recorded = Instant::now();
        while !recorded_final(env, &jobs) && recorded.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = env.list().await;
        if uids(&again) == uids(&jobs) || drained.elapsed() >= Duration::from_secs(240) {
            return again;
        }
        jobs = again;
    }
}

/// Whether the recorder's last line for each of `jobs` shows it in a final phase.
fn recorded_final(env: &TestEnv, jobs: &[bgjobs::api::BackgroundJob]) -> bool {
    let Ok(history) = History::read(&env.dir) else { return false };
    let last: std::collections::HashMap<&str, &str> =
        history.status.iter().map(|l| (l.uid.as_str(), l.phase.as_str())).collect();
    jobs.iter().all(|j| {
        let uid = j.uid().unwrap_or_default();
        let phase = last.get(uid.as_str()).and_then(|p| serde_json::from_value::<Phase>(serde_json::json!(p)).ok());
        phase.is_some_and(Phase::is_final)
    })
}

/// Check the run's history against `limits`, print its figures, keep them in `report.txt`, and fail on any
/// violation.
fn judge(env: &TestEnv, seed: u64, limits: &Limits, jobs: usize) {
    let history = History::read(&env.dir).expect("read the run's history");
    let report = bgjobs_history::check(&history, limits);
    eprintln!("chaos: seed {seed}: {report}");
    std::fs::write(env.dir.join("report.txt"), format!("seed {seed}\n{report}\n{}\n", report.violations.join("\n")))
        .unwrap();
    assert!(jobs >= 30, "the workload ran: {jobs} jobs");
    // The checks judge what the recorder saw: one that missed jobs would pass them unjudged.
    let recorded: std::collections::HashSet<&str> = history.status.iter().map(|l| l.uid.as_str()).collect();
    assert!(
        recorded.len() >= jobs,
        "the recorder saw {} of the {jobs} jobs (history in {})",
        recorded.len(),
        env.dir.display()
    );
    assert!(
        report.ok(),
        "seed {seed} broke a guarantee (history in {}):\n{}",
        env.dir.display(),
        report.violations.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_fault_schedule_breaks_no_guarantee() {
    let _turn = ONE_RUN_AT_A_TIME.lock().await;
    let (seconds, seed) = schedule("parallel", 1.0);
    let mut rng = Rng::new(seed);
    let env = TestEnv::new("chaos").await;
    let proxies = Proxies::start().await;
    let lease_ns = env.ns.clone();
    let per_replica = PER_REPLICA.to_string();
    let cap = CLUSTER_CAP.to_string();
    let flags = [
        "--max-concurrent-jobs-per-instance",
        per_replica.as_str(),
        "--cluster-max-concurrency",
        cap.as_str(),
        "--lease-namespace",
        lease_ns.as_str(),
        "--shutdown-grace",
        "1s",
    ];
    // r0 acts as the chart's ServiceAccount would, so verbs can be taken from it mid-run.
    let account = common::operator_account(&env, OPERATOR_ACCOUNT, &[]).await;
    let second = common::SecondApiserver::start(); // stopped after the fleet, which is dropped first
    let specs = members(&env, account, &proxies, &second);
    let _recorder = workload::Recorder::start(&env);
    let mut fleet = Fleet::start(&env.dir, &env.ns, &flags, specs);
    let agent = env.node_agent();
    agent.ready(&env.client).await;
    let http = workload::HttpWorker::start(&env.dir).await;
    let mut load = workload::Workload::new(&env, Some(&agent), &http.url);
    load.define_recurring().await;

    // A backlog first: jobs that wait longer than a lease before anyone claims them.
    load.enqueue_batch(&mut rng, 120).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(seconds) {
        load.enqueue_batch(&mut rng, 12).await;
        inject(&mut fleet, &proxies, &env, &mut rng, false).await;
    }
    fleet.heal();
    proxies.heal();
    load.stop_recurring().await;
    let jobs = drain(&env).await;
    let limits = limits(CLUSTER_CAP, PER_REPLICA, false);
    judge(&env, seed, &limits, jobs.len());
}

/// What a run with these caps is held to; `exclusive` adds that no two replicas ever run jobs at once.
fn limits(cluster_cap: usize, per_replica: usize, exclusive: bool) -> Limits {
    Limits {
        cluster_cap: Some(cluster_cap),
        per_replica_cap: Some(per_replica),
        lease_ms: LEASE_MS,
        // A tick is decided (claimed) on time by a live owner; its job may come later when the owner dies or etcd and
        // the apiserver restart between the claim and the create, but never more than this after its tick.
        catch_up_ms: Some(60_000),
        fifo_bound_ms: Some(FIFO_BOUND_MS),
        exclusive,
    }
}

const FAULT_KINDS: [&str; 12] = [
    "rbac-remove",
    "kill9",
    "stop",
    "term",
    "apiserver-restart",
    "proxy-reset",
    "proxy-stall",
    "lease-delete",
    "lease-delete",
    "lease-delete",
    "watch-lag",
    "answer-delay",
];

/// Wait a random 2–5 s, then inject one fault (one of the kinds `CHAOS_FAULTS` allows). Under the `exclusive`
/// strategy, replica faults go for the leader three times in four, and Lease deletions take the exclusive Lease, a
/// slot or a claim.
async fn inject(fleet: &mut Fleet, proxies: &Proxies, env: &TestEnv, rng: &mut Rng, exclusive: bool) {
    tokio::time::sleep(rng.ms(2_000, 5_000)).await;
    let allowed = std::env::var("CHAOS_FAULTS").unwrap_or_default();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let n = fleet.members.len();
    let mut i = rng.below(n as u64) as usize;
    let kind = rng.below(FAULT_KINDS.len() as u64) as usize;
    if exclusive
        && rng.below(4) != 0
        && let Some(leader) = exclusive::leader(env, fleet).await
    {
        i = leader;
    }
    if !allowed.is_empty() && !allowed.contains(&FAULT_KINDS[kind]) {
        return;
    }
    match kind {
        0 => {
            // A verb taken from r0's Role for a few seconds: its status writes are refused (403) meanwhile.
            let identity = fleet.members[0].identity.clone();
            let pause = rng.ms(2_000, 6_000);
            fleet.faults.record("rbac-remove", &identity, format!("update on backgroundjobs/status for {pause:?}"));
            common::set_operator_rules(env, OPERATOR_ACCOUNT, &[("backgroundjobs/status", "update")]).await;
            tokio::time::sleep(pause).await;
            common::set_operator_rules(env, OPERATOR_ACCOUNT, &[]).await;
            fleet.faults.record("rbac-restore", &identity, "");
        }
        1 => {
            fleet.kill9(i);
            tokio::time::sleep(rng.ms(500, 2_500)).await;
            let new_identity = rng.below(2) == 0;
            fleet.restart(i, new_identity);
        }
        2 => {
            if !fleet.members[i].paused && fleet.running(i) {
                fleet.pause(i);
                tokio::time::sleep(rng.ms(3_500, 6_000)).await;
                fleet.resume(i);
            }
        }
        3 => {
            fleet.terminate(i, Duration::from_secs(10));
            fleet.restart(i, rng.below(2) == 0);
        }
        4 => {
            let what = if rng.below(3) == 0 { "both" } else { "apiserver" };
            fleet.faults.record("apiserver-restart", "cluster", what);
            let root = common::repo_root();
            let ok = tokio::process::Command::new(root.join("e2e/cluster.sh"))
                .args(["restart", what])
                .output()
                .await
                .is_ok_and(|o| o.status.success());
            assert!(ok, "the control plane came back after a restart of {what}");
            fleet.faults.record("apiserver-up", "cluster", what);
        }
        5 => {
            let n = proxies.tcp.reset_all();
            fleet.faults.record("proxy-reset", &fleet.members[1].identity.clone(), format!("{n} connections"));
        }
        6 => {
            let stall = rng.ms(1_000, 6_000);
            fleet.faults.record("proxy-stall", &fleet.members[1].identity.clone(), format!("{stall:?}"));
            proxies.tcp.stall(stall).await;
            fleet.faults.record("proxy-heal", &fleet.members[1].identity.clone(), "");
        }
        10 => {
            // r3's caches fall behind by more than a lease duration while what it reads and writes is current: every
            // decision it takes from them must be fenced by the apiserver.
            let (lag, how_long) = (rng.ms(2_000, 10_000), rng.ms(3_000, 12_000));
            let r3 = fleet.members[3].identity.clone();
            fleet.faults.record("watch-lag", &r3, format!("{lag:?} for {how_long:?}"));
            proxies.http.lag_watches(lag);
            tokio::time::sleep(how_long).await;
            proxies.http.lag_watches(Duration::ZERO);
            // Events already held keep their time: the lag lasts until the last of them is out.
            tokio::time::sleep(lag).await;
            fleet.faults.record("watch-lag-end", &r3, "");
        }
        11 => {
            // r3's requests take effect at once and their answers come late: its reads, or everything it sends.
            let (delay, how_long) = (rng.ms(500, 12_000), rng.ms(3_000, 10_000));
            let method = if rng.below(2) == 0 { Some(http::Method::GET) } else { None };
            let r3 = fleet.members[3].identity.clone();
            let what = method.as_ref().map_or("every answer".to_string(), |m| format!("{m} answers"));
            fleet.faults.record("answer-delay", &r3, format!("{what} {delay:?} late for {how_long:?}"));
            proxies.http.delay_answers(method, "/", delay, usize::MAX);
            tokio::time::sleep(how_long).await;
            proxies.http.answer_at_once();
            tokio::time::sleep(delay).await;
            fleet.faults.record("answer-delay-end", &r3, "");
        }
        7 if exclusive => exclusive::delete_the_lease(env, fleet).await,
        9 if exclusive => delete_a_lease(env, fleet, rng, bgjobs::wire::JOB_LABEL).await,
        7 => delete_a_lease(env, fleet, rng, bgjobs::wire::JOB_LABEL).await,
        8 => delete_a_lease(env, fleet, rng, bgjobs::wire::SLOT_LABEL).await,
        _ => delete_a_lease(env, fleet, rng, bgjobs::wire::KEY_LABEL).await,
    }
}

/// Delete one Lease carrying `label` by hand, as an operator of the cluster might.
async fn delete_a_lease(env: &TestEnv, fleet: &Fleet, rng: &mut Rng, label: &str) {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let Ok(list) = leases.list(&ListParams::default().labels(label)).await else { return };
    let held: Vec<&Lease> = list.items.iter().filter(|l| bgjobs::wire::holder(l).is_some()).collect();
    if held.is_empty() {
        return;
    }
    let victim = held[rng.below(held.len() as u64) as usize].name_any();
    fleet.faults.record("lease-delete", &victim, label);
    let _ = leases.delete(&victim, &DeleteParams::default()).await;
}
