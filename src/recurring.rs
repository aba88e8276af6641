//! The recurring-job controller: turns `RecurringBackgroundJob` schedules into BackgroundJobs.
//!
//! Each definition is evaluated by one replica, its rendezvous-hash owner among the live members
//! ([`crate::members`]), so thousands of definitions are shared across replicas. Exactly one job per tick holds
//! even while ownership moves (a replica killed, a replica added):
//! 1. the job for tick `t` is named `<definition>-<t in Unix seconds>`, so a second create is AlreadyExists;
//! 2. before creating it, the owner re-reads the definition and goes on only if `t` is after the recorded
//!    `lastScheduleTime`, so a replica with a stale cache never recreates a tick whose job history cleanup already
//!    deleted;
//! 3. `lastScheduleTime` is then written under that read's resourceVersion.
//!
//! Missed ticks (operator down, suspended) create at most one job, for the latest of them, and only within
//! `startingDeadlineSeconds`, like CronJob.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{
    BackgroundJob, Phase, RecurringBackgroundJob, RecurringBackgroundJobStatus, RecurringConcurrencyPolicy,
};
use crate::cron::{self, Schedule};
use crate::error::{Result, api_code};
use crate::lease::{LeaseTiming, Observer};
use crate::members;
use crate::worker::Worker;

/// Label on every job a recurring definition created: the definition's name.
pub const RECURRING_LABEL: &str = "bgjobs.dev/recurring";
/// Annotation with the tick a job was created for (RFC 3339).
pub const SCHEDULED_TIME_ANNOTATION: &str = "bgjobs.dev/scheduled-time";

/// Longest the controller sleeps without a reason to wake.
const IDLE: Duration = Duration::from_secs(5);

/// What the controller watches.
pub struct RecurringView {
    /// The definitions in scope.
    pub definitions: Store<RecurringBackgroundJob>,
    /// Every BackgroundJob in scope (to find a definition's children).
    pub jobs: Store<BackgroundJob>,
    /// Member Leases.
    pub members: Store<Lease>,
    /// Notified on changes.
    pub changed: Arc<Notify>,
}

/// Run the controller until `stop`.
pub async fn run(worker: Arc<Worker>, view: RecurringView, timing: LeaseTiming, stop: CancellationToken) {
    let mut observer = Observer::default();
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = view.changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let live = members::live(&view.members, &mut observer, Instant::now(), &timing, &worker.identity);
        let mut children: HashMap<String, Vec<Arc<BackgroundJob>>> = HashMap::new();
        for j in view.jobs.state() {
            if let Some(owner) = j.owner_references().iter().find(|o| o.kind == "RecurringBackgroundJob") {
                children.entry(owner.uid.clone()).or_default().push(j);
            }
        }
        wait = IDLE;
        for def in view.definitions.state() {
            let uid = def.uid().unwrap_or_default();
            if members::owner(&live, &uid) != Some(worker.identity.as_str()) {
                continue;
            }
            let kids = children.remove(&uid).unwrap_or_default();
            match reconcile(&worker, &def, &kids, Timestamp::now()).await {
                Ok(Some(next)) => wait = wait.min(next),
                Ok(None) => {}
                Err(e) => warn!(definition = %def.name_any(), error = %e, "recurring job reconcile failed"),
            }
        }
    }
}

/// Name of the job for tick `t`: `<definition>-<Unix seconds>`, shortened with a hash when too long.
pub fn job_name(definition: &str, t: Timestamp) -> String {
    crate::names::with_suffix(definition, &format!("-{}", t.as_second()), crate::names::MAX_NAME)
}

/// What one definition needs now. Pure: decided from the definition, its children and the clock.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The schedule or time zone is unusable.
    Invalid(String),
    /// Nothing due; look again in this long (None: never, e.g. suspended).
    Idle(Option<Duration>),
    /// Tick `tick` is due: create its job (after cancelling `replace`), unless `skip` says why not.
    Tick {
        /// The tick.
        tick: Timestamp,
        /// Why the tick is skipped instead (`Forbid` with an unfinished job, past the starting deadline).
        skip: Option<String>,
        /// Unfinished jobs to cancel first (`Replace`).
        replace: Vec<String>,
    },
}

/// Decide what `def` needs at `now`.
pub fn plan(def: &RecurringBackgroundJob, active: &[String], now: Timestamp) -> Plan {
    let schedule: Schedule = match def.spec.schedule.parse() {
        Ok(s) => s,
        Err(e) => return Plan::Invalid(format!("invalid schedule {:?}: {e}", def.spec.schedule)),
    };
    let tz = match cron::time_zone(def.spec.time_zone.as_deref()) {
        Ok(tz) => tz,
        Err(e) => return Plan::Invalid(e),
    };
    if def.spec.suspend {
        return Plan::Idle(None);
    }
    let status = def.status.clone().unwrap_or_default();
    let since = status
        .last_schedule_time
        .map(|t| t.0)
        .or_else(|| def.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    // Only the latest missed tick matters, however many were missed.
    let Some(tick) = schedule.latest_between(since, now, &tz) else {
        let next = schedule.next_after(now, &tz);
        return Plan::Idle(next.map(|n| n.duration_since(now).unsigned_abs()));
    };
    let late = now.duration_since(tick);
    let skip = match (def.spec.starting_deadline_seconds, def.spec.concurrency_policy) {
        (Some(deadline), _) if late > SignedDuration::from_secs(deadline) => {
            Some(format!("missed tick {tick}: {}s late, past startingDeadlineSeconds ({deadline}s)", late.as_secs()))
        }
        (_, RecurringConcurrencyPolicy::Forbid) if !active.is_empty() => {
            Some(format!("skipped tick {tick}: job {} is unfinished (concurrencyPolicy: Forbid)", active.join(", ")))
        }
        _ => None,
    };
    let replace = match def.spec.concurrency_policy {
        RecurringConcurrencyPolicy::Replace if skip.is_none() => active.to_vec(),
        _ => Vec::new(),
    };
    Plan::Tick { tick, skip, replace }
}

/// Bring one definition up to date. Returns when to look again.
async fn reconcile(
    worker: &Worker,
    def: &RecurringBackgroundJob,
    kids: &[Arc<BackgroundJob>],
    now: Timestamp,
) -> Result<Option<Duration>> {
    let ns = def.namespace().unwrap_or_default();
    let defs: Api<RecurringBackgroundJob> = Api::namespaced(worker.client.clone(), &ns);
    let jobs: Api<BackgroundJob> = Api::namespaced(worker.client.clone(), &ns);
    let mut active: Vec<String> = kids.iter().filter(|j| !j.phase().is_final()).map(|j| j.name_any()).collect();
    active.sort();
    trim_history(&jobs, def, kids).await;

    let (tick, skip, replace) = match plan(def, &active, now) {
        Plan::Invalid(reason) => {
            write_status(&defs, def, |s| set_valid(s, false, "InvalidSchedule", &reason, now)).await?;
            return Ok(None);
        }
        Plan::Idle(next) => {
            let next_time = next.and_then(|d| now.checked_add(d).ok()).map(Time);
            let changed = def.status.as_ref().is_none_or(|s| s.next_schedule_time != next_time || s.active != active);
            if changed {
                write_status(&defs, def, |s| {
                    s.next_schedule_time = next_time.clone();
                    s.active_count = active.len() as i32;
                    s.active = active.clone();
                    set_valid(s, true, "Scheduled", "schedule and time zone are valid", now);
                })
                .await?;
            }
            return Ok(next);
        }
        Plan::Tick { tick, skip, replace } => (tick, skip, replace),
    };

    // Claim the tick against the definition as stored, not as cached.
    let Some(fresh) = defs.get_opt(&def.name_any()).await? else { return Ok(None) };
    let recorded = fresh.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0);
    if recorded.is_some_and(|r| r >= tick) {
        return Ok(Some(Duration::from_millis(200)));
    }
    let name = job_name(&def.name_any(), tick);
    if let Some(reason) = &skip {
        info!(definition = %def.name_any(), %reason, "tick skipped");
        worker.event_on(def, EventType::Normal, "TickSkipped", reason.clone());
    } else {
        for old in &replace {
            let cancel = Patch::Merge(serde_json::json!({"spec": {"cancel": true}}));
            if let Err(e) = jobs.patch(old, &PatchParams::default(), &cancel).await {
                warn!(job = %old, error = %e, "could not cancel the job being replaced");
            }
        }
        match jobs.create(&PostParams::default(), &child(def, &name, tick)).await {
            Ok(_) => {
                info!(definition = %def.name_any(), job = %name, "tick: job created");
                worker.event_on(def, EventType::Normal, "JobCreated", format!("tick {tick}: created job {name}"));
                active.push(name.clone());
            }
            Err(e) if api_code(&e) == Some(409) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let schedule: Option<Schedule> = def.spec.schedule.parse().ok();
    let tz = cron::time_zone(def.spec.time_zone.as_deref()).ok();
    let next = schedule.zip(tz).and_then(|(s, tz)| s.next_after(now, &tz));
    let created = skip.is_none();
    write_status(&defs, &fresh, |s| {
        s.last_schedule_time = Some(Time(tick));
        s.next_schedule_time = next.map(Time);
        if created {
            s.last_job = Some(name.clone());
        }
        s.active_count = active.len() as i32;
        s.active = active.clone();
        set_valid(s, true, "Scheduled", "schedule and time zone are valid", now);
    })
    .await?;
    Ok(next.map(|n| n.duration_since(now).unsigned_abs()))
}

/// The BackgroundJob for one tick, owned by its definition.
pub fn child(def: &RecurringBackgroundJob, name: &str, tick: Timestamp) -> BackgroundJob {
    let template = &def.spec.job_template;
    let mut labels = template.metadata.labels.clone();
    labels.insert(RECURRING_LABEL.to_string(), crate::names::label_value(&def.name_any()));
    let mut annotations = template.metadata.annotations.clone();
    annotations.insert(SCHEDULED_TIME_ANNOTATION.to_string(), tick.to_string());
    BackgroundJob {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: def.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: def.controller_owner_ref(&()).map(|mut o| {
                o.block_owner_deletion = None;
                vec![o]
            }),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// Delete finished children beyond the history limits, oldest first.
async fn trim_history(jobs: &Api<BackgroundJob>, def: &RecurringBackgroundJob, kids: &[Arc<BackgroundJob>]) {
    let mut finished: BTreeMap<bool, Vec<&Arc<BackgroundJob>>> = BTreeMap::new();
    for j in kids.iter().filter(|j| j.phase().is_final()) {
        finished.entry(j.phase() == Phase::Succeeded).or_default().push(j);
    }
    for (succeeded, mut list) in finished {
        let keep = if succeeded { def.spec.successful_jobs_history_limit } else { def.spec.failed_jobs_history_limit };
        list.sort_by_key(|j| std::cmp::Reverse(j.status.as_ref().and_then(|s| s.completion_time.clone()).map(|t| t.0)));
        for old in list.into_iter().skip(keep.max(0) as usize) {
            if let Err(e) = jobs.delete(&old.name_any(), &Default::default()).await
                && api_code(&e) != Some(404)
            {
                warn!(job = %old.name_any(), error = %e, "could not delete an old recurring job");
            }
        }
    }
}

fn set_valid(s: &mut RecurringBackgroundJobStatus, valid: bool, reason: &str, message: &str, now: Timestamp) {
    let status = if valid { "True" } else { "False" };
    crate::status::upsert_condition(&mut s.conditions, s.observed_generation, "Valid", status, reason, message, now);
}

/// Write the definition's status under the resourceVersion of `seen`; a 409 is left to the next pass.
async fn write_status(
    api: &Api<RecurringBackgroundJob>,
    seen: &RecurringBackgroundJob,
    change: impl FnOnce(&mut RecurringBackgroundJobStatus),
) -> Result<()> {
    let mut obj = seen.clone();
    let mut status = obj.status.take().unwrap_or_default();
    status.observed_generation = seen.metadata.generation;
    change(&mut status);
    if seen.status.as_ref() == Some(&status) {
        return Ok(());
    }
    obj.status = Some(status);
    match api.replace_status(&seen.name_any(), &PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(e) if matches!(api_code(&e), Some(409) | Some(404)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Create a job from `def`'s template now, outside the schedule (`bgjobs recurring trigger`).
pub async fn trigger(client: &Client, def: &RecurringBackgroundJob) -> Result<BackgroundJob> {
    let ns = def.namespace().unwrap_or_default();
    let jobs: Api<BackgroundJob> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    let mut job = child(def, &format!("{}-manual", def.name_any()), now);
    job.metadata.name = None;
    job.metadata.generate_name = Some(format!("{}-manual-", def.name_any()));
    Ok(jobs.create(&PostParams::default(), &job).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RecurringBackgroundJobSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn def(schedule: &str, extra: serde_json::Value) -> RecurringBackgroundJob {
        let mut spec = serde_json::json!({"schedule": schedule, "jobTemplate": {"spec": {"jobName": "noop"}}});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let spec: RecurringBackgroundJobSpec = serde_json::from_value(spec).unwrap();
        let mut d = RecurringBackgroundJob::new("report", spec);
        d.metadata.namespace = Some("ns".into());
        d.metadata.creation_timestamp = Some(Time(t(0)));
        d
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn with_last(mut d: RecurringBackgroundJob, last: i64) -> RecurringBackgroundJob {
        d.status = Some(RecurringBackgroundJobStatus { last_schedule_time: Some(Time(t(last))), ..Default::default() });
        d
    }

    #[test]
    fn nothing_is_due_between_ticks() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert!(matches!(plan(&d, &[], t(30)), Plan::Idle(Some(_))));
    }

    #[test]
    fn after_an_outage_only_the_latest_missed_tick_runs() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(plan(&d, &[], t(60 * 5 + 10)), Plan::Tick { tick: t(300), skip: None, replace: vec![] });
    }

    #[test]
    fn a_tick_past_the_starting_deadline_is_skipped() {
        let d = with_last(def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 5})), 0);
        match plan(&d, &[], t(70)) {
            Plan::Tick { tick, skip: Some(reason), .. } => {
                assert_eq!(tick, t(60));
                assert!(reason.contains("past startingDeadlineSeconds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_days_of_missed_seconds_claim_the_latest_second() {
        let d = with_last(def("* * * * * *", serde_json::json!({})), 0);
        let now = t(48 * 3600).checked_add(SignedDuration::from_millis(400)).unwrap();
        assert_eq!(plan(&d, &[], now), Plan::Tick { tick: t(48 * 3600), skip: None, replace: vec![] });
    }

    #[test]
    fn forbid_skips_while_a_job_is_unfinished_and_replace_cancels_it() {
        let active = vec!["report-1800000000".to_string()];
        let forbid = with_last(def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid"})), 0);
        assert!(matches!(plan(&forbid, &active, t(61)), Plan::Tick { skip: Some(_), .. }));
        let replace = with_last(def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"})), 0);
        assert_eq!(plan(&replace, &active, t(61)), Plan::Tick { tick: t(60), skip: None, replace: active.clone() });
        let allow = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(plan(&allow, &active, t(61)), Plan::Tick { tick: t(60), skip: None, replace: vec![] });
    }

    #[test]
    fn suspended_and_invalid_definitions_create_nothing() {
        let suspended = def("* * * * *", serde_json::json!({"suspend": true}));
        assert_eq!(plan(&suspended, &[], t(600)), Plan::Idle(None));
        assert!(
            matches!(plan(&def("99 * * * *", serde_json::json!({})), &[], t(60)), Plan::Invalid(r) if r.contains("out of range"))
        );
        let bad_tz = def("* * * * *", serde_json::json!({"timeZone": "Mars/Olympus"}));
        assert!(matches!(plan(&bad_tz, &[], t(60)), Plan::Invalid(r) if r.contains("unknown time zone")));
    }

    #[test]
    fn job_names_are_per_tick_and_valid_even_for_long_definitions() {
        assert_eq!(job_name("report", t(0)), "report-1800000000");
        let long = "x".repeat(250);
        let n = job_name(&long, t(0));
        assert!(n.len() <= 253 && n.ends_with("-1800000000"), "{n}");
    }

    #[test]
    fn a_child_is_owned_labelled_and_annotated() {
        let mut d = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata": {"labels": {"team": "a"}}, "spec": {"jobName": "sleep"}}}),
        );
        d.metadata.uid = Some("def-uid".into());
        let c = child(&d, "report-1", t(60));
        assert_eq!(c.spec.job_name, "sleep");
        assert_eq!(c.metadata.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(c.metadata.labels.as_ref().unwrap()[RECURRING_LABEL], "report");
        assert_eq!(c.metadata.owner_references.as_ref().unwrap()[0].uid, "def-uid");
    }
}
