//! Recurring jobs on the local control plane, with several replicas. Schedules use the 6-field form (seconds
//! first) so that a test sees many ticks in a few seconds.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bgjobs::api::{BackgroundJob, Phase, RecurringBackgroundJob};
use bgjobs::wire::{RECURRING_LABEL, SCHEDULED_TIME_ANNOTATION};
use common::silent_webhook::{Creates, SilentWebhook};
use common::{ReplicaOptions, TestEnv};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

async fn define(env: &TestEnv, name: &str, spec: serde_json::Value) -> RecurringBackgroundJob {
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let def = common::fixtures::recurring(name, spec);
    api.create(&PostParams::default(), &def).await.expect("create recurring job")
}

/// Jobs created by the definition, by tick (Unix seconds).
async fn ticks(env: &TestEnv) -> BTreeMap<i64, Vec<String>> {
    let mut out: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for j in env.list().await {
        if let Some(t) = j.annotations().get(SCHEDULED_TIME_ANNOTATION) {
            out.entry(t.parse::<jiff::Timestamp>().unwrap().as_second()).or_default().push(j.name_any());
        }
    }
    out
}

/// Sample the number of unfinished jobs every 100 ms for `d`; returns the largest.
async fn max_active_during(env: &TestEnv, d: Duration) -> usize {
    let end = Instant::now() + d;
    let mut max = 0;
    while Instant::now() < end {
        max = max.max(env.list().await.iter().filter(|j| !j.phase().is_final()).count());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tick_is_lost_while_replicas_are_killed_and_restarted() {
    let env = TestEnv::new("rec-ticks").await;
    let mut replicas: Vec<_> = (0..3).map(|i| env.replica(&format!("r{i}"), &[])).collect();
    // Every 5 s: longer than a failover (3 s leases), so no tick is merged into a catch-up.
    define(
        &env,
        "every5",
        json!({"schedule": "*/5 * * * * *", "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    replicas[0].kill9();
    replicas[1].kill9();
    tokio::time::sleep(Duration::from_secs(6)).await;
    replicas.push(env.replica("r3", &[]));
    tokio::time::sleep(Duration::from_secs(12)).await;
    drop(replicas);

    let seconds: Vec<i64> = ticks(&env).await.keys().copied().collect();
    eprintln!("ticks with jobs: {seconds:?}");
    assert!(seconds.len() >= 4, "about five ticks in 25 s: {seconds:?}");
    assert!(seconds.iter().all(|s| s % 5 == 0), "jobs only for schedule ticks: {seconds:?}");
    assert!(seconds.windows(2).all(|w| w[1] - w[0] == 5), "no tick missed across the kills: {seconds:?}");
}

/// One job of a definition, as listed: its name and when the API server created it (Unix seconds, truncated).
struct Made {
    name: String,
    created: i64,
}

/// Jobs by definition (the `bgjobs.dev/recurring` label), then by tick (Unix seconds).
fn by_definition(jobs: &[BackgroundJob]) -> BTreeMap<String, BTreeMap<i64, Vec<Made>>> {
    let mut out: BTreeMap<String, BTreeMap<i64, Vec<Made>>> = BTreeMap::new();
    for j in jobs {
        let (Some(def), Some(tick)) = (j.labels().get(RECURRING_LABEL), j.annotations().get(SCHEDULED_TIME_ANNOTATION))
        else {
            continue;
        };
        let tick = tick.parse::<jiff::Timestamp>().unwrap().as_second();
        let created = j.metadata.creation_timestamp.as_ref().expect("created").0.as_second();
        out.entry(def.clone()).or_default().entry(tick).or_default().push(Made { name: j.name_any(), created });
    }
    out
}

/// The Unix time now, in seconds.
fn unix_now() -> f64 {
    jiff::Timestamp::now().as_nanosecond() as f64 / 1e9
}

/// Sleep until the Unix time `at` (seconds).
async fn sleep_until_unix(at: f64) {
    tokio::time::sleep(Duration::from_secs_f64((at - unix_now()).max(0.0))).await;
}

/// Period of the shared schedule, in seconds.
const PERIOD: i64 = 3;
/// Lease duration of the kill -9 test, in seconds: longer than the tests' usual 3 s, so that two or three ticks come
/// due while a dead replica's share waits to move, and the catch-up rule (only the latest of them gets a job) shows.
/// Renew deadline and interval stay the tests' 2 s and 500 ms.
const LEASE: f64 = 8.0;
/// The tests' renew deadline: a replica whose renewals fail stops acting this long after its last one, so the last
/// renewal of a replica killed at K was no earlier than K minus this, and its share cannot move before
/// K + LEASE - RENEW_DEADLINE.
const RENEW_DEADLINE: f64 = 2.0;
/// How soon after a kill -9 the dead replica's definitions must have jobs again: one lease duration (after which the
/// others see its member Lease expired) plus a generous margin for a loaded two-core machine (scans, the claim and
/// the create on a busy apiserver).
const HANDOVER_BOUND: f64 = LEASE + 7.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tick_of_thirty_shared_definitions_has_one_job_or_is_caught_up_after_a_kill9_of_a_replica() {
    thirty_shared_definitions_and_a_kill9("rec-share", 0.0).await;
}

/// The same with each tick claimed a second ahead: the kill comes between the victim's claims and their creates,
/// and the new owner creates the claimed tick's job (late, once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_claimed_ahead_have_one_job_each_or_are_caught_up_after_a_kill9_of_a_replica() {
    thirty_shared_definitions_and_a_kill9("rec-ahead", 1.0).await;
}

/// 30 definitions every PERIOD seconds on three replicas claiming ticks `claim_ahead` seconds early; one killed -9
/// as soon as it has claimed the fourth tick for one of its definitions.
async fn thirty_shared_definitions_and_a_kill9(ns: &str, claim_ahead: f64) {
    let env = TestEnv::new(ns).await;
    let identities = ["r0", "r1", "r2"].map(String::from);
    // The replicas only create jobs: running them is not what is checked here, and would only load the machine.
    let (lease, ahead) = (format!("{LEASE}s"), format!("{claim_ahead}s"));
    let flags = [
        "--job-execution-enabled",
        "false",
        "--lease-duration",
        lease.as_str(),
        "--recurring-claim-ahead",
        ahead.as_str(),
    ];
    let mut replicas: Vec<_> = identities.iter().map(|id| env.replica(id, &flags)).collect();
    let schedule = format!("*/{PERIOD} * * * * *");
    // Which replica owns each definition while all three live: the replicas' own rendezvous rule.
    let mut owner_of: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..30 {
        let name = format!("tenant-{i:02}");
        let def = define(
            &env,
            &name,
            json!({"schedule": schedule, "successfulJobsHistoryLimit": 100, "failedJobsHistoryLimit": 100,
            "jobTemplate": {"spec": {"jobName": "noop"}}}),
        )
        .await;
        let owner = bgjobs::wire::member_owner(&identities, &def.uid().unwrap()).unwrap();
        owner_of.insert(name, owner.to_string());
    }
    for id in &identities {
        // 30 definitions over 3 replicas: that one owns none happens about once in 60,000 runs.
        assert!(owner_of.values().any(|o| o == id), "{id} owns no definition: {owner_of:?}");
    }
    let victim = identities[0].as_str();
    let orphaned: Vec<&str> = owner_of.iter().filter(|(_, o)| *o == victim).map(|(d, _)| d.as_str()).collect();

    // All three replicas at work: every definition has a job. Ticks are checked from the next one on.
    let deadline = Instant::now() + Duration::from_secs(60);
    while by_definition(&env.list().await).len() < owner_of.len() {
        assert!(Instant::now() < deadline, "not every definition has a job after 60 s");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let now = jiff::Timestamp::now().as_second();
    let start = now - now.rem_euclid(PERIOD) + PERIOD;
    // Three ticks, then the kill in the fourth as soon as the victim has claimed it for one of its definitions:
    // while it claims and creates the others (or 2.5 s into the tick, before the next, if no claim shows).
    let fourth = start + 3 * PERIOD;
    sleep_until_unix(fourth as f64 - claim_ahead).await;
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let listed = defs.list(&ListParams::default()).await.expect("list definitions").items;
        let claimed = |d: &RecurringBackgroundJob| {
            let last = d.status.as_ref().and_then(|s| s.last_schedule_time.as_ref());
            orphaned.contains(&d.name_any().as_str()) && last.is_some_and(|t| t.0.as_second() == fourth)
        };
        if listed.iter().any(claimed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replicas[0].kill9();
    let killed = unix_now();
    // Five ticks after the hand-over's bound; wait until every definition has reached it (a definition's ticks are
    // claimed in order, so every earlier tick is then decided), on a loaded machine a little later. One that never
    // does shows below as ticks without a job.
    let end = ((killed + HANDOVER_BOUND) as i64 / PERIOD + 5) * PERIOD;
    let deadline = Instant::now() + Duration::from_secs((end as f64 - killed) as u64 + 60);
    let jobs = loop {
        let jobs = env.list().await;
        let reached = by_definition(&jobs).values().filter(|ticks| ticks.keys().any(|t| *t >= end)).count();
        if reached == owner_of.len() || Instant::now() > deadline {
            break jobs;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    drop(replicas);

    // The rule (README, "Missed ticks"): ticks missed while no replica looks at a definition create at most one
    // job, for the latest of them. So, per definition, from `start` to `end`:
    // - no tick has two jobs, and no job is for a second that is not a tick;
    // - a definition of a survivor has a job for every tick;
    // - a definition of the victim has its first job for a tick after the kill (made by its new owner) within
    //   HANDOVER_BOUND of the kill; the only ticks without a job came due between the last tick before the kill
    //   (which the victim may not have reached) and that job;
    // - and it has none for a tick that came due after the kill and was followed by another before its share could
    //   move (before K + LEASE - RENEW_DEADLINE): of the ticks missed, only the latest gets a job.
    let by_def = by_definition(&jobs);
    let earliest_move = killed + LEASE - RENEW_DEADLINE;
    let none = BTreeMap::new();
    let mut wrong = Vec::new();
    let (mut moved, mut missed) = (Vec::new(), 0);
    for (def, owner) in &owner_of {
        let ticks = by_def.get(def).unwrap_or(&none);
        for (tick, made) in ticks {
            if made.len() > 1 {
                wrong.push(format!("{def}: tick {tick} has {} jobs: {:?}", made.len(), names(made)));
            }
            if tick % PERIOD != 0 {
                wrong.push(format!("{def}: job {:?} for {tick}, not a tick", names(made)));
            }
        }
        let missing: Vec<i64> = (start..=end).step_by(PERIOD as usize).filter(|t| !ticks.contains_key(t)).collect();
        if owner != victim {
            if !missing.is_empty() {
                wrong.push(format!("{def} (owned by {owner}, alive): no job for ticks {missing:?}"));
            }
            continue;
        }
        // Only a new owner makes a job for a tick after the kill: the first one marks the hand-over.
        let after_kill = ticks.iter().filter(|(t, _)| **t as f64 > killed);
        let Some(handed) = after_kill.flat_map(|(_, made)| made.iter().map(|m| m.created)).min() else {
            wrong.push(format!("{def} (owned by {victim}, killed): no job after the kill"));
            continue;
        };
        moved.push(handed as f64 - killed);
        if handed as f64 > killed + HANDOVER_BOUND {
            wrong.push(format!("{def}: first job after the kill {:.1} s after it", handed as f64 - killed));
        }
        let outside: Vec<&i64> =
            missing.iter().filter(|t| **t as f64 <= killed - PERIOD as f64 || **t > handed).collect();
        if !outside.is_empty() {
            let when = format!("killed at {killed:.1}, first job after at {handed}");
            wrong.push(format!("{def}: no job for ticks {outside:?}, outside the hand-over ({when})"));
        }
        missed += missing.len();
        // A tick it had claimed before it died (up to `claim_ahead` before the tick) is carried out by the new owner.
        let after = killed + claim_ahead;
        let superseded = ticks.keys().filter(|t| **t as f64 > after && (**t + PERIOD) as f64 <= earliest_move);
        for tick in superseded {
            wrong.push(format!("{def}: a job for tick {tick}, missed and followed by another before the hand-over"));
        }
    }
    eprintln!(
        "ticks {start}..={end}, {victim} killed at {killed:.1}; its {} definitions had jobs again after {moved:.1?} s; \
         ticks they missed (caught up by the next): {missed}",
        orphaned.len()
    );
    assert!(wrong.is_empty(), "{} violations:\n{}\nlogs in {}", wrong.len(), wrong.join("\n"), env.dir.display());
}

fn names(made: &[Made]) -> Vec<&str> {
    made.iter().map(|m| m.name.as_str()).collect()
}

/// Merge-patch an annotation onto the definition every `every` until `until`, as a user's or a GitOps tool's
/// re-apply would: each patch moves its resourceVersion, so a status write based on an older read gets a 409.
async fn annotate_until<K>(api: Api<K>, name: String, every: Duration, until: Instant) -> u64
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut patches = 0;
    while Instant::now() < until {
        let patch = json!({"metadata": {"annotations": {"test.bgjobs.dev/bump": patches.to_string()}}});
        if api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.is_ok() {
            patches += 1;
        }
        tokio::time::sleep(every).await;
    }
    patches
}

/// Delete every finished job of `ns` as soon as it is seen finished (every 100 ms, each by its UID), until `until`;
/// how many were deleted.
async fn delete_finished_until(client: kube::Client, ns: String, until: Instant) -> usize {
    let jobs: Api<BackgroundJob> = Api::namespaced(client, &ns);
    let mut deleted = 0;
    while Instant::now() < until {
        for j in jobs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            if j.phase().is_final() {
                let preconditions = kube::api::Preconditions { uid: j.uid(), resource_version: None };
                let params = kube::api::DeleteParams { preconditions: Some(preconditions), ..Default::default() };
                deleted += usize::from(jobs.delete(&j.name_any(), &params).await.is_ok());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    deleted
}

/// Start lines in the invocation logs, by job name.
fn starts_by_job(env: &TestEnv) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in env.invocations().into_iter().filter(|l| l.ev == "start") {
        let name = line.job.rsplit('/').next().unwrap().to_string();
        out.entry(name).or_default().push(format!("uid {} attempt {}", line.uid, line.attempt));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_runs_once_although_its_job_is_deleted_at_once_and_status_writes_conflict() {
    let env = TestEnv::new("rec-conflict").await;
    let _r = env.replica("r", &[]);
    // Jobs vanish as soon as they finish: nothing but the definition's status remembers a tick. (bgjobs itself keeps
    // a finished tick's job about a minute, for creates of it that may still land, whatever its TTL and history
    // limit say: here they are deleted by hand.)
    define(
        &env,
        "busy",
        json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 0, "failedJobsHistoryLimit": 0,
        "jobTemplate": {"spec": {"jobName": "noop", "ttlSecondsAfterFinished": 0}}}),
    )
    .await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let until = Instant::now() + Duration::from_secs(20);
    let deleter = tokio::spawn(delete_finished_until(env.client.clone(), env.ns.clone(), until));
    let patches = annotate_until(api, "busy".into(), Duration::from_millis(20), until).await;
    let deleted = deleter.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let starts = starts_by_job(&env);
    let twice: Vec<_> = starts.iter().filter(|(_, s)| s.len() > 1).collect();
    eprintln!("{patches} annotation patches; {deleted} jobs deleted; {} ticks ran; twice: {twice:?}", starts.len());
    assert!(deleted >= 5, "finished jobs were deleted: {deleted}");
    assert!(twice.is_empty(), "each tick's job runs at most once: {twice:?}");
    assert!(starts.len() >= 5, "the schedule still makes progress under conflicts: {starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_claimed_just_before_a_crash_gets_its_job_once_even_if_suspended_since() {
    let env = TestEnv::new("rec-pending").await;
    define(
        &env,
        "claimed",
        json!({"schedule": "* * * * * *", "suspend": true, "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    // What a replica killed between its claim and the create leaves behind: the tick recorded, its job pending.
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let tick = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 10).unwrap();
    let job = bgjobs::wire::recurring_job_name("claimed", tick);
    let status = json!({"status": {"lastScheduleTime": tick.to_string(), "pendingJob": job}});
    api.patch_status("claimed", &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch status");
    let r = env.replica("r", &[]);

    env.wait_job(&job, Duration::from_secs(30), "the pending job created and run", |j| j.phase() == Phase::Succeeded)
        .await;
    // No write confirms the creation: the job stays pending (no later tick is claimed while suspended), and a new
    // owner, which did not create it, knows from the job itself that its tick is done.
    drop(r);
    let pending = api.get("claimed").await.unwrap().status.and_then(|s| s.pending_job);
    assert_eq!(pending.as_deref(), Some(job.as_str()), "the claim stays until a later tick's replaces it");
    let _r2 = env.replica("r2", &[]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let starts = starts_by_job(&env);
    assert_eq!(starts.keys().collect::<Vec<_>>(), [&job], "only the claimed tick, and nothing while suspended");
    assert_eq!(starts[&job].len(), 1, "it ran once: {starts:?}");
}

/// A tick's job the apiserver refuses (a ResourceQuota full of BackgroundJobs) is tried again less and less often,
/// not once a second for as long as the refusal lasts, nor at every change of the definition's earlier job (a running
/// job's status writes), and is made once the quota frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticks_job_a_quota_refuses_is_tried_again_less_and_less_often_and_made_once_the_quota_frees() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let env = TestEnv::new("rec-quota").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(env.client.clone(), &env.ns);
    let quota = json!({"metadata": {"name": "one-job"}, "spec": {"hard": {"count/backgroundjobs.bgjobs.dev": "1"}}});
    quotas.create(&PostParams::default(), &serde_json::from_value(quota).unwrap()).await.expect("create the quota");
    // Admission counts against the quota only once its controller has written the status.
    let deadline = Instant::now() + Duration::from_secs(60);
    while quotas.get("one-job").await.unwrap().status.and_then(|s| s.hard).is_none() {
        assert!(Instant::now() < deadline, "the ResourceQuota controller never filled in the quota's status");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let _r = env.replica("r", &["--metrics-addr", &metrics]);
    define(&env, "refused", json!({"schedule": "* * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}})).await;
    let tries = || async {
        let text = match reqwest::get(format!("http://{metrics}/metrics")).await {
            Ok(answer) => answer.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let line = text.lines().find(|l| l.contains(r#"reason="JobNotCreated""#)).map(str::to_string);
        line.and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    // The first tick's job takes the quota's one place; the next tick's is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tries().await == 0 {
        assert!(Instant::now() < deadline, "no create was refused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = env.list().await;
    assert_eq!(first.len(), 1, "{}", common::summary(&first));
    // Its earlier job changes twice a second meanwhile, as a running job's status writes would.
    let until = Instant::now() + Duration::from_secs(24);
    let changes = annotate_until(env.jobs.clone(), first[0].name_any(), Duration::from_millis(500), until).await;
    assert!(changes >= 20, "the earlier job changed {changes} times");
    // Once a second, or at each change, would be 25 or more; pauses of 1, 2, 4, 8 and 16 s make 5 or 6.
    let tried = tries().await;
    assert!(tried <= 8, "the refused create was tried {tried} times in 24 s");
    assert_eq!(env.list().await.len(), 1);
    quotas.delete("one-job", &Default::default()).await.expect("delete the quota");
    env.wait_until(Duration::from_secs(60), "the tick's job made", |jobs| jobs.len() >= 2).await;
}

/// A tick's create answered `404` (an apiserver that has just started and does not serve BackgroundJobs yet) is
/// tried again: the definition is not taken for deleted, and its ticks go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticks_create_answered_not_found_by_a_starting_apiserver_is_tried_again_and_the_ticks_go_on() {
    let env = TestEnv::new("rec-create-404").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let options = proxy.options(&env.dir);
    let ticker = env.replica_with("ticker", &[], &options);
    env.wait_joined(&ticker, "default").await;
    // The first create of a job is answered 404; the definition's own requests go through.
    proxy.answer_instead(404, Some(http::Method::POST), "/backgroundjobs", 1);
    let def =
        define(&env, "every5", json!({"schedule": "*/5 * * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}))
            .await;
    env.wait_until(Duration::from_secs(30), "ticks' jobs after a create answered 404", |jobs| jobs.len() >= 2).await;
    assert_eq!(proxy.held(), 1, "the first create was answered 404");
    // Every tick from the first after the definition was made has its job, the refused one's too.
    let made = def.creation_timestamp().expect("a creation time").0.as_second();
    let first = (made / 5 + 1) * 5;
    let by_tick = ticks(&env).await;
    let expected: Vec<i64> = (0..by_tick.len() as i64).map(|i| first + 5 * i).collect();
    assert_eq!(by_tick.keys().copied().collect::<Vec<_>>(), expected, "{by_tick:?}");
    assert!(by_tick.values().all(|jobs| jobs.len() == 1), "{by_tick:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_permission_to_record_a_tick_no_job_is_created_and_the_refusal_is_reported() {
    let env = TestEnv::new("rec-rbac").await;
    let kubeconfig = account_without_recurring_status_update(&env).await;
    let options = ReplicaOptions { kubeconfig: Some(kubeconfig), ..Default::default() };
    // Member Leases in the test's namespace, where the Role grants them.
    let r = env.replica_with("r", &["--lease-namespace", env.ns.as_str()], &options);
    define(
        &env,
        "unrecorded",
        json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 0,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reported: Option<Instant> = None;
    // Watch for 5 s after the refusal is first reported (several ticks), or fail at the first job.
    while reported.is_none_or(|at| at.elapsed() < Duration::from_secs(5)) {
        let jobs = env.list().await;
        assert!(jobs.is_empty(), "a tick the status could not record created jobs: {}", common::summary(&jobs));
        if reported.is_none() && !env.warnings_on("unrecorded", "TickNotClaimed").await.is_empty() {
            reported = Some(Instant::now());
        }
        assert!(Instant::now() < deadline, "no TickNotClaimed Warning in 30 s; log:\n{}", r.log_text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(starts_by_job(&env).is_empty(), "nothing ran");
    let notes = env.warnings_on("unrecorded", "TickNotClaimed").await;
    assert!(notes.iter().any(|n| n.contains("403") || n.contains("forbidden")), "the Event says why: {notes:?}");
}

/// A ServiceAccount with the chart's rules minus one verb: `update` on `recurringbackgroundjobs/status`. Returns a
/// kubeconfig that authenticates as it.
async fn account_without_recurring_status_update(env: &TestEnv) -> std::path::PathBuf {
    common::operator_account(env, "bgjobs-no-status", &[("recurringbackgroundjobs/status", "update")]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_two_days_suspended_an_every_second_schedule_catches_up_only_the_latest_tick() {
    let env = TestEnv::new("rec-48h").await;
    let _r = env.replica("r", &[]);
    define(
        &env,
        "resumed",
        json!({"schedule": "* * * * * *", "suspend": true, "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    // 172,800 ticks missed: more than any walk forward from the last recorded tick would take in one step.
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let two_days_ago = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 48 * 3600).unwrap();
    let status = json!({"status": {"lastScheduleTime": two_days_ago.to_string()}});
    api.patch_status("resumed", &PatchParams::default(), &Patch::Merge(&status)).await.expect("patch status");
    let recorded = api.get("resumed").await.unwrap().status.and_then(|s| s.last_schedule_time).map(|t| t.0);
    assert_eq!(recorded, Some(two_days_ago), "the status patch took");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let resumed_at = jiff::Timestamp::now();
    let resume = json!({"spec": {"suspend": false}});
    api.patch("resumed", &PatchParams::default(), &Patch::Merge(&resume)).await.expect("un-suspend");
    tokio::time::sleep(Duration::from_secs(5)).await;

    let by_tick = ticks(&env).await;
    let oldest = *by_tick.keys().next().expect("jobs after un-suspending");
    let lag = resumed_at.as_second() - oldest;
    eprintln!("resumed at {resumed_at}; ticks with jobs: {:?}", by_tick.keys().collect::<Vec<_>>());
    assert!(lag <= 3, "the catch-up job is for the latest missed tick, not one {lag} s before the un-suspend");
}

/// A definition whose deletion waits for another controller's finalizer makes no more jobs (as if suspended), and
/// goes once the finalizer is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_whose_deletion_waits_for_a_finalizer_makes_no_more_jobs() {
    let env = TestEnv::new("rec-deleting").await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let spec = json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}});
    let mut def = common::fixtures::recurring("held", spec);
    def.metadata.finalizers = Some(vec![common::HOLD_FINALIZER.into()]);
    api.create(&PostParams::default(), &def).await.unwrap();
    let release = common::Held::on(&env, "recurringbackgroundjob", &["held"]);
    let _r = env.replica("r", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ticks(&env).await.len() < 2 {
        assert!(Instant::now() < deadline, "the definition never ticked");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    api.delete("held", &Default::default()).await.unwrap();
    // Every tick is claimed at or after it comes, and a claim is written under the definition's resourceVersion: no
    // job may be made for a tick after the deletion (whole seconds, as the deletion's time is kept).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let held = api.get("held").await.unwrap();
    let deleted = held.metadata.deletion_timestamp.expect("still held by its finalizer").0.as_second();
    let after = ticks(&env).await;
    assert!(after.keys().all(|t| *t <= deleted), "ticks went on after the deletion at {deleted}: {after:?}");
    drop(release);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get_opt("held").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the definition did not go once its finalizer was removed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbid_skips_ticks_while_the_previous_job_runs() {
    let env = TestEnv::new("rec-forbid").await;
    let _r = env.replica("r", &[]);
    define(
        &env,
        "slow",
        json!({"schedule": "*/2 * * * * *", "concurrencyPolicy": "Forbid",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 5}}}}),
    )
    .await;
    let max = max_active_during(&env, Duration::from_secs(12)).await;
    assert_eq!(max, 1, "never two unfinished jobs under Forbid");
    let n = ticks(&env).await.len();
    assert!((2..=4).contains(&n), "ticks were skipped while a job ran: {n} jobs in 12 s of 2 s ticks");
}

/// A replica that makes ticks' jobs and runs none, talking to the apiserver through `proxy` (with `extra` flags),
/// and one that runs them and makes none; once the first has joined.
async fn ticker_and_runner(
    env: &TestEnv,
    proxy: &common::http_proxy::HttpProxy,
    extra: &[&str],
) -> (common::Replica, common::Replica) {
    let options = proxy.options(&env.dir);
    let flags: Vec<&str> = ["--job-execution-enabled", "false"].iter().chain(extra).copied().collect();
    let ticker = env.replica_with("ticker", &flags, &options);
    let runner = env.replica("runner", &["--recurring-enabled", "false"]);
    env.wait_joined(&ticker, "default").await;
    (ticker, runner)
}

/// `Forbid` and `Replace` decided by a replica whose watches lag past a tick's period (every event 6 s late, its
/// reads answered at once): its cache shows the previous tick's job not yet made, or still waiting, long after
/// another replica started it. Under `Forbid` no two of the definition's jobs run at once, and ticks still get their
/// jobs; under `Replace` each job is cancelled by a later tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbid_and_replace_decided_by_a_replica_whose_watches_lag_still_hold() {
    let env = TestEnv::new("rec-forbid-lag").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    // Only the lagging replica makes ticks' jobs; only the other runs them.
    let (ticker, _runner) = ticker_and_runner(&env, &proxy, &[]).await;
    proxy.lag_watches(Duration::from_secs(6));
    define(
        &env,
        "slow",
        json!({"schedule": "*/2 * * * * *", "concurrencyPolicy": "Forbid",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 5}}}}),
    )
    .await;
    define(
        &env,
        "replaced",
        json!({"schedule": "*/3 * * * * *", "concurrencyPolicy": "Replace",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 60}}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(24)).await;
    let mut replaced: Vec<BackgroundJob> =
        env.list().await.into_iter().filter(|j| j.name_any().starts_with("replaced-")).collect();
    replaced.sort_by_key(|j| j.name_any());
    assert!(replaced.len() >= 3, "Replace ticks got jobs: {}", common::summary(&replaced));
    // The newest may be running, and the one before it may be being cancelled right now.
    for j in &replaced[..replaced.len() - 2] {
        assert_eq!(
            j.phase(),
            Phase::Cancelled,
            "a later tick cancels it under Replace: {}",
            common::summary(&replaced)
        );
    }
    // Each is cancelled when the next is made, not a tick later, when the lagging cache first shows it: a run
    // overlaps the next for no longer than the cancel takes to reach the runner.
    let mut replacing: Vec<_> =
        common::executions(&env.invocations()).into_iter().filter(|e| e.job.contains("/replaced-")).collect();
    replacing.sort_by_key(|e| e.start);
    for pair in replacing.windows(2) {
        let overlap = pair[0].end.unwrap_or(i64::MAX).saturating_sub(pair[1].start);
        assert!(overlap < 2_000, "a replaced job ran {overlap} ms beside the next: {pair:?}");
    }
    proxy.lag_watches(Duration::ZERO);
    let done = env
        .wait_until(Duration::from_secs(60), "every Forbid job final", |jobs| {
            jobs.iter().filter(|j| j.name_any().starts_with("slow-")).all(|j| j.phase().is_final())
        })
        .await;
    let execs = common::executions(&env.invocations());
    let mut runs: Vec<_> = execs.iter().filter(|e| e.job.contains("/slow-")).collect();
    runs.sort_by_key(|e| e.start);
    assert!(runs.len() >= 2, "ticks got jobs: {}", common::summary(&done));
    for pair in runs.windows(2) {
        assert!(
            pair[0].end.is_some_and(|end| pair[1].start >= end),
            "two of the definition's jobs ran at once under Forbid: {pair:?}\nticker's log:\n{}",
            ticker.log_text()
        );
    }
}

/// `Forbid` decided by a replica whose watches lag (every event 8 s late, its reads answered at once): at each tick its
/// cache shows the previous tick's job unfinished, though that job (5 s long, ticks 10 s apart) has ended. The tick
/// was skipped on the cache's word ("job ... is unfinished"), every other tick lost; the jobs the cache shows
/// unfinished are read before a tick is skipped for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbid_tick_is_not_skipped_for_a_job_a_lagging_watch_still_shows_running() {
    let env = TestEnv::new("rec-forbid-stale").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    let (ticker, _runner) = ticker_and_runner(&env, &proxy, &[]).await;
    proxy.lag_watches(Duration::from_secs(8));
    define(
        &env,
        "stale",
        json!({"schedule": "*/10 * * * * *", "concurrencyPolicy": "Forbid",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 5}}}}),
    )
    .await;
    // The definition reaches the ticker 8 s late too: its first tick is caught up then, and that job may still run
    // at the next tick (a skip the policy asks for). Counted from the first tick due once that job has ended.
    let made = loop {
        if let Some(job) = env.list().await.into_iter().next() {
            break job.metadata.creation_timestamp.map(|t| t.0.as_second()).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first = (made + 6 + 9) / 10 * 10;
    // Three ticks, and time for the last one's job to be made.
    let last = first + 20;
    while jiff::Timestamp::now().as_second() < last + 3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let made = ticks(&env).await;
    let missing: Vec<i64> = (0..=2).map(|i| first + 10 * i).filter(|t| !made.contains_key(t)).collect();
    assert!(
        missing.is_empty(),
        "ticks without a job: {missing:?} (made: {:?})\nticker's log:\n{}",
        made.keys().collect::<Vec<_>>(),
        ticker.log_text()
    );
    let jobs = env.list().await;
    assert!(
        jobs.iter().filter(|j| !j.phase().is_final()).count() <= 1,
        "never two unfinished jobs under Forbid: {}",
        common::summary(&jobs)
    );
}

/// Under `Replace`, a cancel refused at the tick (an apiserver restarting: the proxy answers every cancel the ticking
/// replica sends with a `503` for a while, past the next tick's claim ahead of time) is asked again once it can be:
/// the replaced job stops soon after, not a whole period later at the next tick, and the tick's job runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_cancel_refused_at_the_tick_is_asked_again_and_the_replaced_job_stops_before_the_next_tick() {
    let env = TestEnv::new("rec-replace-refused").await;
    let proxy = common::http_proxy::HttpProxy::to_apiserver().await;
    // Only the proxied replica makes ticks' jobs (and so cancels them); only the other runs them. Ticks claimed 15 s
    // ahead (half the period), so the refusals outlast the next tick's claim.
    let (_ticker, _runner) = ticker_and_runner(&env, &proxy, &["--recurring-claim-ahead", "15s"]).await;
    proxy.refuse(Some(http::Method::PATCH), "/backgroundjobs/replaced-", usize::MAX);
    define(
        &env,
        "replaced",
        json!({"schedule": "*/30 * * * * *", "concurrencyPolicy": "Replace",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 300}}}}),
    )
    .await;
    let of_definition = |jobs: &[BackgroundJob]| {
        let mut mine: Vec<BackgroundJob> =
            jobs.iter().filter(|j| j.name_any().starts_with("replaced-")).cloned().collect();
        mine.sort_by_key(|j| j.name_any());
        mine
    };
    let jobs = env
        .wait_until(Duration::from_secs(80), "two ticks' jobs, the first running", |jobs| {
            let mine = of_definition(jobs);
            mine.len() >= 2 && mine[0].phase() == Phase::Running
        })
        .await;
    let mine = of_definition(&jobs);
    assert_eq!(mine.len(), 2, "{}", common::summary(&mine));
    let (first, second) = (&mine[0], &mine[1]);
    assert!(proxy.held() >= 1, "the tick's cancel of {} was refused", first.name_any());
    assert!(!first.spec.cancel, "refused, so not asked yet: {}", common::summary(&mine));
    // The next tick comes 30 s after the second's, and is claimed 15 s before it: its job is named in `lastJob`
    // then, not made yet.
    let next_tick = tick_of(second) + 30.0;
    let definitions: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let claimed = |d: &RecurringBackgroundJob| {
        let last = d.status.as_ref().and_then(|s| s.last_schedule_time.as_ref());
        last.is_some_and(|t| t.0.as_second() as f64 >= next_tick)
    };
    while !claimed(&definitions.get("replaced").await.unwrap()) {
        assert!(unix_now() < next_tick - 5.0, "the next tick was not claimed ahead of time");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.answer_at_once();
    let until_next_tick = Duration::from_secs_f64((next_tick - unix_now() - 1.0).max(1.0));
    let first_name = first.name_any();
    let jobs = env
        .wait_until(until_next_tick, "the replaced job cancelled before the next tick", |jobs| {
            jobs.iter().any(|j| j.name_any() == first_name && j.phase() == Phase::Cancelled)
        })
        .await;
    let second = jobs.iter().find(|j| j.name_any() == second.name_any()).expect("the tick's job");
    assert_eq!((second.phase(), second.spec.cancel), (Phase::Running, false), "the tick's job runs on");
}

/// The tick a job of a definition was made for, in Unix seconds.
fn tick_of(job: &BackgroundJob) -> f64 {
    let at = job.annotations().get(SCHEDULED_TIME_ANNOTATION).expect("a tick's job names its tick");
    at.parse::<jiff::Timestamp>().expect("an RFC 3339 tick").as_millisecond() as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_cancels_the_unfinished_job_and_allow_lets_them_overlap() {
    let env = TestEnv::new("rec-replace").await;
    let _r = env.replica("r", &[]);
    define(&env, "replace", json!({"schedule": "*/3 * * * * *", "concurrencyPolicy": "Replace",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 60}}, "metadata": {"labels": {"policy": "replace"}}}})).await;
    define(&env, "allow", json!({"schedule": "*/3 * * * * *",
        "jobTemplate": {"spec": {"jobName": "sleep", "args": {"seconds": 60}}, "metadata": {"labels": {"policy": "allow"}}}})).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let jobs = env.list().await;
    let of = |policy: &str| {
        jobs.iter().filter(|j| j.labels().get("policy").map(String::as_str) == Some(policy)).collect::<Vec<_>>()
    };
    let replace = of("replace");
    assert!(replace.len() >= 2, "{}", common::summary(&jobs));
    assert_eq!(replace.iter().filter(|j| !j.phase().is_final()).count(), 1, "Replace keeps one unfinished job");
    assert!(
        replace.iter().filter(|j| j.phase().is_final()).all(|j| j.phase() == Phase::Cancelled),
        "replaced jobs are Cancelled"
    );
    let allow = of("allow");
    assert!(
        allow.iter().filter(|j| !j.phase().is_final()).count() >= 2,
        "Allow lets jobs overlap: {}",
        common::summary(&jobs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_downtime_longer_than_a_period_at_most_one_catch_up_job_runs() {
    let env = TestEnv::new("rec-catchup").await;
    let mut r = env.replica("r", &[]);
    define(
        &env,
        "catchup",
        json!({"schedule": "*/2 * * * * *", "startingDeadlineSeconds": 60, "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    env.wait_until(Duration::from_secs(30), "a first job", |jobs| !jobs.is_empty()).await;
    r.kill9();
    let down_at = jiff::Timestamp::now().as_second();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let up_at = jiff::Timestamp::now().as_second();
    let _r2 = env.replica("r2", &[]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let by_tick = ticks(&env).await;
    let during: Vec<i64> = by_tick.keys().copied().filter(|t| *t > down_at && *t <= up_at).collect();
    eprintln!("down {down_at}..{up_at}, ticks with jobs: {:?}", by_tick.keys().collect::<Vec<_>>());
    assert!(during.len() <= 1, "three ticks were missed; at most one catch-up job: {during:?}");
    // The replacement catches up the latest tick missed when it takes over: one of the downtime's ticks, or, when
    // the definition hashes to the dead replica, the tick due once the replacement has seen that replica's member
    // Lease unchanged for a lease duration (3 s here, counted from its own start): within that plus a period.
    assert!(by_tick.keys().any(|t| *t > down_at && *t <= up_at + 3 + 2 + 1), "the schedule resumed at once");
    assert!(by_tick.keys().any(|t| *t > up_at), "and the schedule goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_schedules_are_rejected_by_schema_or_reported_in_a_condition() {
    let env = TestEnv::new("rec-invalid").await;
    let _r = env.replica("r", &[]);
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let three_fields =
        serde_json::from_value(json!({"schedule": "* * *", "jobTemplate": {"spec": {"jobName": "noop"}}})).unwrap();
    let err =
        api.create(&PostParams::default(), &RecurringBackgroundJob::new("three", three_fields)).await.unwrap_err();
    assert!(err.to_string().contains("spec.schedule"), "{err}");
    define(&env, "bad-minute", json!({"schedule": "99 * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}})).await;
    define(
        &env,
        "bad-zone",
        json!({"schedule": "* * * * *", "timeZone": "Mars/Olympus", "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    // Every job of this one would be refused by the apiserver: its definition said Valid=True and tried once a second.
    let bad_label = json!({"metadata": {"labels": {"team": "payments/eu"}}, "spec": {"jobName": "noop"}});
    define(&env, "bad-label", json!({"schedule": "* * * * * *", "jobTemplate": bad_label})).await;
    for (name, reason, expected) in [
        ("bad-minute", "InvalidSchedule", "minute: 99 is out of range 0-59"),
        ("bad-zone", "InvalidSchedule", "unknown time zone \"Mars/Olympus\""),
        ("bad-label", "InvalidTemplate", "gives \"team\" the value \"payments/eu\""),
    ] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let def = api.get(name).await.unwrap();
            let cond = def.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Valid").cloned());
            if let Some(c) = cond {
                assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason));
                assert!(c.message.contains(expected), "{}", c.message);
                break;
            }
            assert!(Instant::now() < deadline, "no Valid condition on {name}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert!(env.list().await.is_empty(), "invalid definitions create no jobs");
}

/// Anyone may create a BackgroundJob by a tick's name before the tick: its definition then has no job for that tick,
/// and says so in a `TickSkipped` Warning. It took the name as its own job, made earlier, and said nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_whose_name_a_job_of_someone_else_holds_is_reported_skipped() {
    let env = TestEnv::new("rec-squat").await;
    let _r = env.replica("r", &[]);
    let spec = json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}});
    define(&env, "squat", spec).await;
    // The squatters come once the replica makes the definition's jobs (its start may include a build).
    env.wait_until(Duration::from_secs(120), "a first tick's job", |jobs| !jobs.is_empty()).await;
    let now = unix_now().ceil() as i64;
    let squatted = now + 4..now + 9;
    for t in squatted.clone() {
        env.create(&format!("squat-{t}"), json!({"jobName": "noop"})).await;
    }
    sleep_until_unix((squatted.end + 3) as f64).await;
    // One Event, its series counting the ticks (kube's recorder folds Events of one reason on one object).
    let reported = || async {
        let held = |n: &str| n.contains("held by a job this definition did not make");
        let events = env.warning_events("squat", "TickSkipped").await;
        let events = events.iter().filter(|e| e.note.as_deref().is_some_and(held));
        events.map(|e| e.series.as_ref().map_or(1, |s| s.count)).sum::<i32>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reported().await < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let count = reported().await;
    assert!(count >= 3, "the squatted ticks {squatted:?} were reported {count} times");
    let ticks = ticks(&env).await;
    assert!(
        squatted.clone().all(|t| !ticks.contains_key(&t)),
        "no job of the definition for a squatted tick: {ticks:?}"
    );
    assert!(ticks.keys().any(|t| *t > squatted.end), "and the schedule goes on: {ticks:?}");
}

/// A job `bgjobs recurring trigger` made is no tick's: its TTL deletes it, even on a suspended definition whose
/// latest claim is older than it (it was kept forever, as if it were the latest tick's job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_job_of_a_suspended_definition_is_deleted_by_its_ttl() {
    let env = TestEnv::new("rec-manual").await;
    let _r = env.replica("r", &[]);
    define(
        &env,
        "held",
        json!({"schedule": "0 0 1 1 *", "suspend": true,
        "jobTemplate": {"spec": {"jobName": "noop", "ttlSecondsAfterFinished": 1}}}),
    )
    .await;
    for _ in 0..2 {
        let out = common::without_ambient_settings(&mut std::process::Command::new(common::bgjobs_bin()))
            .args(["recurring", "trigger", "held", "-n", &env.ns])
            .env("KUBECONFIG", common::kubeconfig_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::executions(&env.invocations()).len() < 2 {
        assert!(Instant::now() < deadline, "the triggered jobs did not run: {}", common::summary(&env.list().await));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    env.wait_until(Duration::from_secs(30), "the triggered jobs deleted by their TTL", |jobs| jobs.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_limits_keep_the_latest_finished_jobs_and_trigger_runs_one_now() {
    let env = TestEnv::new("rec-history").await;
    let _r = env.replica("r", &[]);
    define(
        &env,
        "hist",
        json!({"schedule": "* * * * * *", "successfulJobsHistoryLimit": 2,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    // Wait for several ticks to have run (not a fixed time: a loaded machine runs them later), then for the trim.
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::executions(&env.invocations()).len() < 4 {
        assert!(Instant::now() < deadline, "fewer than 4 ticks ran in 60 s: {}", common::summary(&env.list().await));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A tick's job beyond the limit is kept until no create of it can land: about a minute after the next tick's
    // job was made. Suspended, the schedule makes no more, and the history comes down to 2.
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    defs.patch("hist", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}}))).await.unwrap();
    env.wait_until(Duration::from_secs(120), "history trimmed to 2", |jobs| {
        jobs.iter().filter(|j| j.phase() == Phase::Succeeded).count() <= 2
    })
    .await;
    // And not below (the pending job and one more), also once the later of them could have gone too.
    for _ in 0..2 {
        let jobs = env.list().await;
        let kept = jobs.iter().filter(|j| j.phase() == Phase::Succeeded).count();
        assert_eq!(kept, 2, "history limit 2: {}", common::summary(&jobs));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    let out = common::without_ambient_settings(&mut std::process::Command::new(common::bgjobs_bin()))
        .args(["recurring", "trigger", "hist", "-n", &env.ns])
        .env("KUBECONFIG", common::kubeconfig_path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hist-manual-"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manual = stdout.trim().rsplit('/').next().unwrap().trim_end_matches(" created").to_string();
    // It runs now, suspended or not; once finished it is history like any tick's job, and may be trimmed at once
    // (it is no tick's, so no create of it can come late): look for its execution, not for the object.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::executions(&env.invocations()).iter().any(|e| e.job.ends_with(&format!("/{manual}"))) {
        assert!(Instant::now() < deadline, "{manual} did not run within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_claimed_ahead_is_recorded_before_it_is_due_and_gets_its_one_job_then_unless_suspended_before() {
    const EVERY: i64 = 10;
    let env = TestEnv::new("rec-early").await;
    let _r = env.replica("r", &["--job-execution-enabled", "false", "--recurring-claim-ahead", "4s"]);
    define(
        &env,
        "early",
        json!({"schedule": format!("*/{EVERY} * * * * *"), "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    // Watch the claims land: for each tick, whether the status named it while the clock was still before it.
    let claimed_at = |d: &RecurringBackgroundJob| {
        d.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0.as_second())
    };
    let mut early: Vec<i64> = Vec::new();
    let first = {
        let now = jiff::Timestamp::now().as_second();
        now - now.rem_euclid(EVERY) + 2 * EVERY
    };
    let (last, deadline) = (first + 3 * EVERY, Instant::now() + Duration::from_secs(90));
    // Three ticks watched, then the fourth (or a later one, on a slow machine): suspended as soon as its claim
    // shows, well before it is due (a claim seen in its last 3 s is let run, and the next one waited for).
    let suspended_tick = loop {
        assert!(Instant::now() < deadline, "no claim of a tick from {last} on showed 3 s before it was due");
        let def = api.get("early").await.expect("get definition");
        if let Some(tick) = claimed_at(&def).filter(|t| *t as f64 > unix_now() && *t >= first) {
            if !early.contains(&tick) {
                early.push(tick);
            }
            if tick >= last && unix_now() < tick as f64 - 3.0 {
                api.patch("early", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}})))
                    .await
                    .expect("suspend");
                let landed = unix_now();
                assert!(landed < tick as f64 - 2.5, "the suspend landed only at {landed:.2}, tick {tick}");
                break tick;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sleep_until_unix((suspended_tick + 2 * EVERY) as f64 + 1.0).await;

    let jobs = by_definition(&env.list().await).remove("early").unwrap_or_default();
    let ticks: Vec<i64> = jobs.keys().copied().filter(|t| *t >= first).collect();
    eprintln!(
        "claimed before due: {early:?}; ticks with jobs from {first}: {ticks:?}; suspended before {suspended_tick}"
    );
    assert!(early.len() >= 3, "ticks from {first} on were claimed ahead, seen before due: {early:?}");
    let expected: Vec<i64> = (first..suspended_tick).step_by(EVERY as usize).collect();
    assert_eq!(
        ticks, expected,
        "one job per tick before the suspend; the claim it came after taken back, so none from it on"
    );
    for (tick, made) in &jobs {
        assert_eq!(made.len(), 1, "tick {tick}: {:?}", names(made));
        assert!(
            made[0].created >= *tick,
            "tick {tick}: job created at {} (seconds), before it was due",
            made[0].created
        );
    }
    let status = api.get("early").await.expect("get definition").status.unwrap_or_default();
    assert_eq!(status.pending_job, None, "the claim was taken back: {status:?}");
    assert!(
        status.last_schedule_time.as_ref().is_some_and(|t| t.0.as_second() < suspended_tick),
        "the latest tick handled is from before the suspend: {status:?}"
    );
}

/// A tick is claimed ahead no sooner than halfway from the tick before it, whatever `--recurring-claim-ahead` says:
/// the replica that claimed that one may create its job from the claim as written until up to half their gap after
/// it, less what replicas' clocks may disagree, whatever lead it ran with (`recurring::claim_at` says why). Ticks at :00,
/// :10 and :30 of each minute, claimed 10 s ahead: :10 (10 s after :00) halfway, at :05; :30 (20 s after :10) the
/// whole 10 s ahead. Before, :10 was claimed as soon as :00's job was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_soon_after_the_one_before_is_claimed_no_sooner_than_halfway_from_it() {
    let env = TestEnv::new("rec-halfway").await;
    let _r = env.replica("r", &["--job-execution-enabled", "false", "--recurring-claim-ahead", "10s"]);
    define(
        &env,
        "uneven",
        json!({"schedule": "0,10,30 * * * * *", "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    // When each claim was first seen (Unix seconds), by tick; only ticks whose claim the replica, started by now,
    // and this watch can have seen made.
    let watched_from = unix_now() + 10.0;
    let mut seen: BTreeMap<i64, f64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(160);
    let complete = |seen: &BTreeMap<i64, f64>, second: i64| seen.keys().any(|t| t.rem_euclid(60) == second);
    while !(complete(&seen, 10) && complete(&seen, 30)) {
        assert!(Instant::now() < deadline, "no claim of a :10 and a :30 tick seen: {seen:?}");
        let def = api.get("uneven").await.expect("get definition");
        let tick = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0.as_second());
        let now = unix_now();
        if let Some(tick) = tick.filter(|t| *t as f64 - 10.0 > watched_from) {
            seen.entry(tick).or_insert(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "claims seen (tick: seconds before it): {:?}",
        seen.iter().map(|(t, at)| (t, *t as f64 - at)).collect::<Vec<_>>()
    );
    for (tick, at) in &seen {
        let ahead = *tick as f64 - at;
        match tick.rem_euclid(60) {
            10 => assert!(
                (2.5..=5.5).contains(&ahead),
                "tick {tick}, 10 s after the one before: claimed {ahead:.2} s ahead, not about 5"
            ),
            30 => assert!(ahead >= 5.0, "tick {tick}, 20 s after the one before: claimed only {ahead:.2} s ahead"),
            _ => {}
        }
    }
    sleep_until_unix(*seen.keys().max().unwrap() as f64 + 2.0).await;
    let jobs = by_definition(&env.list().await).remove("uneven").unwrap_or_default();
    for tick in seen.keys() {
        let made = jobs.get(tick).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(made.len(), 1, "tick {tick}: {:?}", names(made));
        assert!(made[0].created >= *tick, "tick {tick}: job created at {}, before it was due", made[0].created);
    }
}

/// A larger `jitterSeconds` set after a tick was claimed ahead takes the claim back, and moves the definition's clock
/// back past ticks that already ran: none of them runs again (every 10 s, claimed 4 s ahead, then a jitter whose
/// offset is 20 to 30 s, history 0 so that their jobs are gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_jitter_set_after_a_tick_was_claimed_ahead_runs_no_earlier_tick_again() {
    let env = TestEnv::new("rec-jitter").await;
    let _r = env.replica("r", &["--recurring-claim-ahead", "4s"]);
    let jitter = (31..86_400)
        .find(|j| (20..=30).contains(&bgjobs::wire::jitter_offset(&env.ns, "shift", *j).as_secs()))
        .expect("a jitter whose offset is 20 to 30 s");
    let offset = bgjobs::wire::jitter_offset(&env.ns, "shift", jitter).as_secs_f64();
    define(
        &env,
        "shift",
        json!({"schedule": "*/10 * * * * *", "successfulJobsHistoryLimit": 0,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Two ticks run first, then the edit as soon as a claim shows 2 s or more ahead of its tick.
    let claimed = loop {
        assert!(Instant::now() < deadline, "no claim showed 2 s before its tick after two ticks ran");
        let def = api.get("shift").await.expect("get definition");
        let tick = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0.as_second());
        if let Some(tick) = tick.filter(|t| unix_now() < *t as f64 - 2.0)
            && starts_by_job(&env).len() >= 2
        {
            api.patch("shift", &PatchParams::default(), &Patch::Merge(json!({"spec": {"jitterSeconds": jitter}})))
                .await
                .expect("set the jitter");
            let landed = unix_now();
            assert!(landed < tick as f64 - 1.5, "the jitter landed only at {landed:.2}, tick {tick}");
            break tick;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Until the claimed tick is due on the new clock, and a tick more: ticks that ran before the edit would be due
    // again from about then on, had the claim been taken back behind them.
    sleep_until_unix(claimed as f64 + offset + 12.0).await;
    let starts = starts_by_job(&env);
    eprintln!("jitter {jitter} (offset {offset:.1} s), claimed {claimed}; starts: {starts:?}");
    let twice: Vec<_> = starts.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "a tick ran again: {twice:?}");
    let claimed_job = bgjobs::wire::recurring_job_name("shift", jiff::Timestamp::from_second(claimed).unwrap());
    assert!(starts.contains_key(&claimed_job), "the claimed tick ran: {starts:?}");
    // The claim was taken back, so the tick ran at its new time, not at the one it was claimed for.
    let started =
        env.invocations().into_iter().find(|l| l.ev == "start" && l.job.ends_with(&format!("/{claimed_job}")));
    let started = started.expect("its start").t_ms as f64 / 1000.0;
    assert!(started >= claimed as f64 + offset - 1.0, "tick {claimed} ran at {started:.2}, offset {offset:.1}");
}

/// The claim of a tick ahead was made for the schedule as it was: an edit that brings ticks before it applies at once,
/// as it would have had that tick not been claimed yet (every 30 s, claimed 10 s ahead, then every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_made_denser_after_a_tick_was_claimed_ahead_runs_its_ticks_before_that_one() {
    let env = TestEnv::new("rec-dense").await;
    let _r = env.replica("r", &["--job-execution-enabled", "false", "--recurring-claim-ahead", "10s"]);
    define(
        &env,
        "dense",
        json!({"schedule": "*/30 * * * * *", "successfulJobsHistoryLimit": 100,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let api: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(90);
    // A claim of a tick at least 6 s ahead, then the edit.
    let (claimed, edited_at) = loop {
        assert!(Instant::now() < deadline, "no claim showed 6 s before its tick");
        let def = api.get("dense").await.expect("get definition");
        let tick = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0.as_second());
        if let Some(tick) = tick.filter(|t| unix_now() < *t as f64 - 6.0) {
            api.patch("dense", &PatchParams::default(), &Patch::Merge(json!({"spec": {"schedule": "*/2 * * * * *"}})))
                .await
                .expect("edit the schedule");
            break (tick, unix_now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sleep_until_unix(claimed as f64 + 3.0).await;

    let jobs = by_definition(&env.list().await).remove("dense").unwrap_or_default();
    eprintln!("claimed {claimed}, edited at {edited_at:.2}; ticks with jobs: {:?}", jobs.keys().collect::<Vec<_>>());
    // The new schedule's ticks after the edit and before the claimed one have jobs (each due within a second or two
    // of its tick; one late on a busy machine is caught up, or not, by the missed-tick rule), the claimed one too,
    // and only ticks of the new schedule.
    let before: Vec<i64> = jobs.keys().copied().filter(|t| *t as f64 > edited_at && *t < claimed).collect();
    assert!(before.len() >= 2, "ticks of the new schedule before the claimed one ran: {before:?}");
    assert!(before.iter().all(|t| t % 2 == 0), "only ticks of the new schedule: {before:?}");
    assert!(jobs.contains_key(&claimed), "and the claimed tick, a tick of both schedules: {:?}", jobs.keys());
    for (tick, made) in &jobs {
        assert_eq!(made.len(), 1, "tick {tick}: {:?}", names(made));
        assert!(made[0].created >= *tick, "tick {tick}: created at {}, before it was due", made[0].created);
    }
}

/// The claiming replica's create of a tick's job is held 25 s on its way when the replica is killed; the new owner
/// creates the missing pending job, which runs and is replaced as pending by the next tick's claim. With history
/// limit 0 it was trimmed at once, the held create then made it again, and the tick ran twice (staged on 2026-12-04:
/// `tick-…130` ran twice). Now the job is kept until no create sent before that claim can land: the held create
/// meets it, the tick runs once, and the job is trimmed after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_create_of_a_dead_replica_meets_its_ticks_job_kept_for_it_and_the_tick_runs_once() {
    let env = TestEnv::new("rec-late-create").await;
    let hook = SilentWebhook::register_for(&env, Creates::Jobs, 25).await;
    let proxy = common::proxy::Proxy::to_apiserver().await;
    proxy.lose_closes(true);
    let options = ReplicaOptions { kubeconfig: Some(proxy.kubeconfig(&env.dir)), ..Default::default() };
    let mut a = env.replica_with("a", &["--recurring-claim-ahead", "0"], &options);
    define(
        &env,
        "tick",
        json!({"schedule": "*/10 * * * * *", "successfulJobsHistoryLimit": 0,
        "jobTemplate": {"spec": {"jobName": "noop"}}}),
    )
    .await;
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(env.client.clone(), &env.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    let pending = loop {
        let d = defs.get("tick").await.unwrap();
        if let Some(p) = d.status.and_then(|s| s.pending_job) {
            break p;
        }
        assert!(Instant::now() < deadline, "no tick was claimed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The create, sent just after the claim, has passed the proxy and waits on the webhook.
    let (claimed, claimed_unix) = (Instant::now(), unix_now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    hook.set_timeout(&env, 1).await;
    let b = env.replica("b", &["--recurring-claim-ahead", "0"]);
    // b made the tick's job, well before the held create could land (25 s after it was sent).
    let deadline = Instant::now() + Duration::from_secs(20);
    let made_by_b =
        |log: String| log.lines().any(|l| l.contains("tick: job created") && l.contains(&format!("job={pending} ")));
    while !made_by_b(b.log_text()) {
        assert!(Instant::now() < deadline, "b did not create {pending}; its log:\n{}", b.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let made = env.list().await.into_iter().find(|j| j.name_any() == pending).expect("the tick's job");
    let made_at = made.creation_timestamp().expect("creationTimestamp").0.as_second() as f64;
    assert!(made_at < claimed_unix + 20.0, "{pending} made at {made_at}, claimed at {claimed_unix:.1}: not by b");
    tokio::time::sleep(Duration::from_secs(45).saturating_sub(claimed.elapsed())).await;
    // The held create has landed by now (25 s after it was sent), on the job b made, which ran and was replaced as
    // pending by later ticks' claims.
    let starts = starts_by_job(&env);
    let ran = starts.get(&pending).cloned().unwrap_or_default();
    assert_eq!(ran.len(), 1, "tick {pending} ran once: {starts:?}\nb's log:\n{}", b.log_text());
    let later = starts.keys().filter(|job| **job > pending).count();
    assert!(later >= 2, "later ticks ran, so {pending} was pending no more: {starts:?}");
    let jobs = env.list().await;
    let kept = jobs.iter().find(|j| j.name_any() == pending).map(|j| j.uid().unwrap_or_default());
    assert!(
        kept.as_ref().is_some_and(|uid| ran[0].contains(uid.as_str())),
        "{pending} is kept (history limit 0), the job that ran: {kept:?}, {ran:?}"
    );
    // And trimmed once no create can land: a minute and a bit after the next tick's job was made.
    let deadline = Instant::now() + Duration::from_secs(90);
    while env.list().await.iter().any(|j| j.name_any() == pending) {
        assert!(Instant::now() < deadline, "{pending} was never trimmed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let starts = starts_by_job(&env);
    assert_eq!(starts.get(&pending).map_or(0, Vec::len), 1, "tick {pending} ran once: {starts:?}");
}
