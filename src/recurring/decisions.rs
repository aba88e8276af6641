//! What a definition needs next: the pure decisions of the recurring controller ([`super`] carries them out).
//! Each is a function of the definition as stored, the jobs known to exist and the time, so every rule is tested
//! here without an apiserver.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::api::{RecurringBackgroundJob, RecurringBackgroundJobStatus, RecurringConcurrencyPolicy};
use crate::cron::{self, Schedule};
use crate::unreadable::Standing;

use super::Child;

/// Name of the job for tick `t`: `<definition>-<Unix seconds>`, shortened with a hash when too long.
pub fn job_name(definition: &str, t: Timestamp) -> String {
    crate::names::with_suffix(definition, &format!("-{}", t.as_second()), crate::names::MAX_NAME)
}

/// What one definition needs now. Pure: decided from the definition, its children and the clock.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// The schedule, the time zone or the job template is unusable: why (`reason`, the `Valid` condition's), and how.
    Invalid {
        /// `InvalidSchedule` or `InvalidTemplate`.
        reason: &'static str,
        /// What is wrong, for a person.
        message: String,
    },
    /// The definition is bad input the operator cannot read (see [`crate::unreadable`]): it makes no job.
    Unreadable(String),
    /// Nothing due; look again in this long (None: never, e.g. suspended).
    Idle(Option<Duration>),
    /// Tick `tick` is due: record it in the status first, then create its job, unless `skip` says why not.
    Claim {
        /// The tick.
        tick: Timestamp,
        /// Why the tick is skipped instead (`Forbid` with an unfinished job, past the starting deadline).
        skip: Option<String>,
        /// Earlier ticks were missed (operator down, suspended): this one stands in for them.
        catch_up: bool,
    },
    /// A claimed tick's job is not known to exist: cancel `replace`, then create `job` (AlreadyExists: it was).
    Create {
        /// The job's name (`status.pendingJob`).
        job: String,
        /// Unfinished jobs to cancel first (`Replace`).
        replace: Vec<String>,
    },
    /// A tick claimed ahead (see [`lead`]) is not due yet: its job is created in this long, not before.
    Await {
        /// The job's name (`status.pendingJob`).
        job: String,
        /// Until the tick is due.
        wait: Duration,
    },
    /// A tick claimed ahead, not due yet and its job not made, whose spec was edited since the claim (its
    /// `metadata.generation` is newer than the claim's `observedGeneration`): take the claim back, so that the edit
    /// (a schedule, a suspend, a policy) applies from `at` on, as it would have had the tick not been claimed yet.
    Withdraw {
        /// The job's name (`status.pendingJob`).
        job: String,
        /// Now, on the definition's schedule clock: recorded as the latest tick handled.
        at: Timestamp,
    },
    /// A claimed tick's job could not be created before `startingDeadlineSeconds` ran out (e.g. creates were
    /// refused): stop trying, so that later ticks are claimed again.
    Abandon {
        /// The job's name (`status.pendingJob`).
        job: String,
        /// Why.
        reason: String,
    },
}

/// How long after each tick a definition's job is due: `spec.jitterSeconds` spread by a hash of the definition's
/// namespace and name, so that it is the same for every tick and on every replica, and many definitions with the
/// same schedule are due at different moments (millisecond steps) instead of all at once.
pub fn jitter_offset(namespace: &str, name: &str, jitter_seconds: u32) -> Duration {
    if jitter_seconds == 0 {
        return Duration::ZERO;
    }
    let spread = u64::from(jitter_seconds) * 1000;
    Duration::from_millis(crate::members::stable_hash(&["jitter", namespace, name]) % spread)
}

/// `now` moved back by `def`'s jitter offset: a tick `t` is due once `t <= shifted(now)`.
pub(crate) fn shifted(def: &RecurringBackgroundJob, now: Timestamp) -> Timestamp {
    let offset = jitter_offset(
        def.metadata.namespace.as_deref().unwrap_or_default(),
        def.metadata.name.as_deref().unwrap_or_default(),
        def.spec.jitter_seconds.unwrap_or(0),
    );
    now.checked_sub(SignedDuration::try_from(offset).unwrap_or(SignedDuration::ZERO)).unwrap_or(now)
}

/// How long before tick `next` it is claimed, given `ahead` (`--recurring-claim-ahead`): claimed ahead, a tick's
/// one write on its way is its job's create, so a thousand definitions on one schedule get their jobs within the
/// creates' own time after the tick, not the claims' and the creates'. Not ahead when the decision belongs to the
/// tick itself (`Forbid` skips a tick whose predecessor is still unfinished then), nor for ticks less than twice
/// `ahead` apart: so a lead is at most half the gap to the tick after, whatever `ahead` it was given. The claim
/// itself may come later ([`claim_at`]).
pub fn lead(
    def: &RecurringBackgroundJob,
    schedule: &Schedule,
    tz: &jiff::tz::TimeZone,
    next: Timestamp,
    ahead: Duration,
) -> Duration {
    if ahead.is_zero() || def.spec.concurrency_policy == RecurringConcurrencyPolicy::Forbid {
        return Duration::ZERO;
    }
    let gap = schedule.next_after(next, tz).map(|after| after.duration_since(next).unsigned_abs());
    match gap {
        Some(gap) if gap >= ahead * 2 => ahead,
        _ => Duration::ZERO,
    }
}

/// When tick `next` is claimed, given its `lead` and the claim it replaces (`lastScheduleTime`, if any): its lead
/// before it, but never sooner than halfway from that one. The replica that claimed the tick before may create its job
/// from its claim as written until up to half their gap after it, less what clocks may disagree ([`lead`],
/// [`armed_past_tick`]); claimed no sooner than halfway, `next` leaves it that, whatever `--recurring-claim-ahead`
/// each of the two replicas runs with (they may differ, as while a change of the flag rolls out).
pub fn claim_at(next: Timestamp, lead: Duration, replaced: Option<Timestamp>) -> Timestamp {
    let ahead = next.checked_sub(SignedDuration::try_from(lead).unwrap_or(SignedDuration::ZERO)).unwrap_or(next);
    match replaced.filter(|before| *before < next) {
        Some(before) => ahead.max(before.checked_add(next.duration_since(before) / 2).unwrap_or(next)),
        None => ahead,
    }
}

/// The lead of `def`'s claimed tick (`lastScheduleTime`), as [`lead`] gives it; zero if the schedule is unusable.
/// Not shortened by [`claim_at`]: how long a claim carried to its tick may be used depends on when the next tick can
/// be claimed, not on how early this one was.
pub(crate) fn tick_lead(def: &RecurringBackgroundJob, ahead: Duration) -> Duration {
    let tick = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0);
    match (tick, usable_schedule(def)) {
        (Some(tick), Some((schedule, tz))) => lead(def, &schedule, &tz, tick, ahead),
        _ => Duration::ZERO,
    }
}

/// The definition's schedule and time zone, if both are usable ([`plan`] says why when not).
pub(crate) fn usable_schedule(def: &RecurringBackgroundJob) -> Option<(Schedule, jiff::tz::TimeZone)> {
    Some((def.spec.schedule.parse().ok()?, cron::time_zone(def.spec.time_zone.as_deref()).ok()?))
}

/// Decide what `def` needs at `now`, given its unfinished children `active` and which jobs are `known` to have been
/// created; the next tick is claimed up to `ahead` before it is due ([`lead`]). A pending job known to exist needs
/// nothing more: its tick is done, and the next claim replaces it.
pub fn plan(
    def: &RecurringBackgroundJob,
    active: &[String],
    known: impl Fn(&str) -> bool,
    now: Timestamp,
    ahead: Duration,
) -> Plan {
    if let Some(Standing::Fail(why)) = crate::unreadable::standing(def) {
        return Plan::Unreadable(format!("bgjobs cannot read this definition, so it makes no job: {why}"));
    }
    let status = def.status.clone().unwrap_or_default();
    // With a jitter, the schedule is read on a clock that runs late by the definition's offset.
    let now = shifted(def, now);
    let pending = status.pending_job.filter(|job| !known(job));
    let tick = status.last_schedule_time.map(|t| t.0);
    // An edit takes back a tick claimed ahead, whatever the edit says (first: reporting it invalid would record the
    // edit as seen, and the claim would stand).
    if let Some(job) = &pending
        && tick.is_some_and(|t| t > now)
        && status.previous_schedule_time.is_some()
        && edited_since_status(def)
    {
        return Plan::Withdraw { job: job.clone(), at: now };
    }
    // Its jobs would be refused (422) at every try, for ever: a claimed tick's too, until the template is mended.
    if let Some(message) = template_problem(def) {
        return Plan::Invalid { reason: "InvalidTemplate", message };
    }
    if let Some(job) = pending {
        // Being deleted, a definition's tick not yet made is given up: its jobs may already have been removed with
        // it (a foreground deletion), and the pending one made again would run its tick twice.
        if def.deletion_requested() {
            return Plan::Abandon { job, reason: "the definition is being deleted".into() };
        }
        return plan_pending(def, job, tick, active, now);
    }
    let schedule: Schedule = match def.spec.schedule.parse() {
        Ok(s) => s,
        Err(e) => return invalid_schedule(format!("invalid schedule {:?}: {e}", def.spec.schedule)),
    };
    let tz = match cron::time_zone(def.spec.time_zone.as_deref()) {
        Ok(tz) => tz,
        Err(e) => return invalid_schedule(e),
    };
    // A definition being deleted (a finalizer holds it back) ticks no more, as if suspended; a tick claimed ahead of
    // the deletion is taken back as for any edit (the deletion raises `generation`).
    if def.spec.suspend || def.deletion_requested() {
        return Plan::Idle(None);
    }
    let since = handled_until(def).unwrap_or(now);
    let replaced = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref()).map(|t| t.0);
    // Only the latest missed tick matters, however many were missed.
    let Some(tick) = schedule.latest_between(since, now, &tz) else {
        // None due: the next one, claimed once it is within its lead. After `since`, should a tick claimed ahead
        // and done still lie ahead (its job was created early by an operator without claims ahead).
        let Some(next) = schedule.next_after(now.max(since), &tz) else {
            return invalid_schedule(format!(
                "schedule {:?} has no tick in the next eight years: a date that never comes, such as 30 February",
                def.spec.schedule
            ));
        };
        let at = claim_at(next, lead(def, &schedule, &tz, next, ahead), replaced);
        if at <= now {
            return Plan::Claim { tick: next, skip: None, catch_up: false };
        }
        return Plan::Idle(Some(at.duration_since(now).unsigned_abs()));
    };
    let skip = match (missed_by(def, tick, now), def.spec.concurrency_policy) {
        (Some((late, deadline)), _) => {
            Some(format!("missed tick {tick}: {}s late, past startingDeadlineSeconds ({deadline}s)", late.as_secs()))
        }
        (None, RecurringConcurrencyPolicy::Forbid) if !active.is_empty() => {
            Some(format!("skipped tick {tick}: job {} is unfinished (concurrencyPolicy: Forbid)", active.join(", ")))
        }
        _ => None,
    };
    let catch_up = schedule.next_after(since, &tz).is_some_and(|first| first < tick);
    Plan::Claim { tick, skip, catch_up }
}

/// The most an object's annotations, keys and values, may take (bytes).
pub(crate) const MAX_ANNOTATIONS: usize = 256 * 1024;

pub(crate) fn invalid_schedule(message: String) -> Plan {
    Plan::Invalid { reason: "InvalidSchedule", message }
}

/// What in `def`'s job template the apiserver would refuse in every job made from it, and the CRD schema lets
/// through: a label key or value, or an annotation key, that Kubernetes does not allow.
pub fn template_problem(def: &RecurringBackgroundJob) -> Option<String> {
    use crate::names::{is_label_value, is_qualified_name};
    // A cached definition keeps what was found, not the metadata it was found in (`queue::slim_definition`).
    if let Some(found) = def.annotations().get(crate::unreadable::TEMPLATE_PROBLEM_ANNOTATION) {
        return Some(found.clone());
    }
    let metadata = &def.spec.job_template.metadata;
    const KEY: &str = "an optional DNS-subdomain prefix and '/', then at most 63 letters, digits, '-', '_' and '.', \
                       starting and ending with a letter or digit";
    // Annotation keys are checked lowercased, as the apiserver does; label keys as they are.
    let bad_annotation = metadata.annotations.keys().find(|k| !is_qualified_name(&k.to_lowercase()));
    if let Some(key) = metadata.labels.keys().find(|k| !is_qualified_name(k)).or(bad_annotation) {
        return Some(format!("jobTemplate.metadata has the key {key:?}, which Kubernetes does not allow ({KEY})"));
    }
    let annotations: usize = metadata.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if annotations > MAX_ANNOTATIONS {
        return Some(format!(
            "jobTemplate.metadata.annotations take {annotations} bytes, more than Kubernetes allows ({MAX_ANNOTATIONS})"
        ));
    }
    let (key, value) = metadata.labels.iter().find(|(_, v)| !is_label_value(v))?;
    Some(format!(
        "jobTemplate.metadata.labels gives {key:?} the value {value:?}, which Kubernetes does not allow in a label \
         (at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit)"
    ))
}

/// Up to when `def`'s ticks are handled: its latest claim, or its creation before the first (no tick before that runs).
pub(crate) fn handled_until(def: &RecurringBackgroundJob) -> Option<Timestamp> {
    let claimed = def.status.as_ref().and_then(|s| s.last_schedule_time.as_ref());
    claimed.or(def.metadata.creation_timestamp.as_ref()).map(|t| t.0)
}

/// Whether `def`'s spec was edited after its status was last written (for a claim: after the claim).
pub(crate) fn edited_since_status(def: &RecurringBackgroundJob) -> bool {
    let written_for = def.status.as_ref().and_then(|s| s.observed_generation);
    matches!((def.metadata.generation, written_for), (Some(now), Some(then)) if now > then)
}

/// What a claimed tick's job, not known to exist, needs. Once due, it is carried out even if the definition was
/// suspended or changed since (the claim was the decision; an edit before a tick claimed ahead is due takes the claim
/// back instead, see [`Plan::Withdraw`]), at its tick, not before, and only within `startingDeadlineSeconds` of it.
pub(crate) fn plan_pending(
    def: &RecurringBackgroundJob,
    job: String,
    tick: Option<Timestamp>,
    active: &[String],
    now: Timestamp,
) -> Plan {
    if let Some(due) = tick.filter(|t| *t > now) {
        return Plan::Await { job, wait: due.duration_since(now).unsigned_abs() };
    }
    if let Some((late, deadline)) = tick.and_then(|t| missed_by(def, t, now)) {
        let reason = format!(
            "gave up on job {job}: not created {}s after its tick, past startingDeadlineSeconds ({deadline}s)",
            late.as_secs()
        );
        return Plan::Abandon { job, reason };
    }
    let replace = match def.spec.concurrency_policy {
        RecurringConcurrencyPolicy::Replace => active.iter().filter(|a| **a != job).cloned().collect(),
        _ => Vec::new(),
    };
    Plan::Create { job, replace }
}

/// How long until `def`'s claimed tick whose job is not made yet (`pendingJob`) is past `startingDeadlineSeconds`
/// ([`past_starting_deadline`]) at `now`: zero once it is; None without a pending tick or a deadline.
pub fn starting_deadline_left(def: &RecurringBackgroundJob, now: Timestamp) -> Option<Duration> {
    let status = def.status.as_ref()?;
    status.pending_job.as_ref()?;
    let tick = status.last_schedule_time.as_ref()?.0;
    let deadline = def.spec.starting_deadline_seconds?;
    // Past it from the second after `deadline` whole seconds late on.
    let past_at = tick.checked_add(SignedDuration::from_secs(deadline.saturating_add(1))).ok()?;
    Some(past_at.duration_since(shifted(def, now)).try_into().unwrap_or(Duration::ZERO))
}

/// How late `tick` is at `now`, read on the schedule's clock ([`shifted`]), and `def`'s `startingDeadlineSeconds`,
/// when that is past it ([`past_starting_deadline`]): the one rule for a tick missed whatever runs.
fn missed_by(def: &RecurringBackgroundJob, tick: Timestamp, now: Timestamp) -> Option<(SignedDuration, i64)> {
    let deadline = def.spec.starting_deadline_seconds?;
    let late = now.duration_since(tick);
    past_starting_deadline(late, deadline).then_some((late, deadline))
}

/// Whether a tick `late` after it is due is past `startingDeadlineSeconds`, `deadline`. In whole seconds, as the
/// field is: a tick handled within its second is never late, so a deadline of 0 means "on time", not "never" (a
/// job is always created some milliseconds after its tick).
pub(crate) fn past_starting_deadline(late: SignedDuration, deadline: i64) -> bool {
    late.as_secs() > deadline
}

/// When the first tick after `now` and after `claimed` (the latest tick claimed, perhaps ahead) is due (for
/// `nextScheduleTime`: the tick plus the jitter offset), if the schedule is usable. The claim and the idle look after
/// it compute the same instant, so that look writes nothing.
pub(crate) fn next_due(def: &RecurringBackgroundJob, now: Timestamp, claimed: Option<Timestamp>) -> Option<Timestamp> {
    let (schedule, tz) = usable_schedule(def)?;
    let shifted = shifted(def, now);
    let next = schedule.next_after(claimed.map_or(shifted, |c| c.max(shifted)), &tz)?;
    now.checked_add(next.duration_since(shifted)).ok()
}

/// The claim of tick `tick`: recorded as handled, its job (None: skipped) pending until known to exist.
pub fn claim(s: &mut RecurringBackgroundJobStatus, tick: Timestamp, job: Option<&str>, next: Option<Timestamp>) {
    s.previous_schedule_time = s.last_schedule_time.replace(Time(tick));
    s.next_schedule_time = next.map(Time);
    s.pending_job = job.map(str::to_string);
    if job.is_some() {
        s.last_job = job.map(str::to_string);
    }
}

/// Taking back the claim of a tick not yet due, pending `job`, never made: the latest tick handled becomes `at` (now,
/// on the definition's clock as edited), but never earlier than the `lastScheduleTime` the claim replaced, so no tick
/// handled before runs again (a larger jitter moves that clock back, and replicas' clocks disagree a little); nothing
/// is pending, so the next tick is decided anew from the spec as it is now. A claim recorded without what it replaced
/// (by an operator or a CRD from before `previousScheduleTime`) is not taken back ([`plan`]).
pub fn withdraw(s: &mut RecurringBackgroundJobStatus, job: &str, at: Timestamp) {
    let Some(floor) = s.previous_schedule_time.take().map(|t| t.0) else { return };
    if s.pending_job.as_deref() != Some(job) {
        return;
    }
    s.pending_job = None;
    s.last_schedule_time = Some(Time(at.max(floor)));
    s.next_schedule_time = None;
    if s.last_job.as_deref() == Some(job) {
        s.last_job = None;
    }
}

/// Giving up on a pending `job` that could not be created in time: no longer pending, so later ticks are claimed.
pub fn give_up(s: &mut RecurringBackgroundJobStatus, job: &str, active: &[String]) {
    if s.pending_job.as_deref() == Some(job) {
        s.pending_job = None;
    }
    set_active(s, active);
}

pub(crate) fn set_active(s: &mut RecurringBackgroundJobStatus, active: &[String]) {
    s.active_count = active.len() as i32;
    s.active = active.to_vec();
}

/// Whether `job` is known to exist, or to have existed: seen among the definition's children, or created by this
/// process. A pending job that is neither was never created, unless it was deleted by hand (see docs/usage.md,
/// "Recurring jobs").
pub(crate) fn known_created(job: &str, kids: &[Child], created_here: Option<&str>) -> bool {
    kids.iter().any(|k| k.name == job) || created_here == Some(job)
}

/// The jobs a `Replace` definition's latest tick replaced that are unfinished, as cached, and not asked to stop,
/// while that tick's job runs: every other unfinished job of the definition made for an earlier tick, or created
/// before it (by `bgjobs recurring trigger`). The latest tick's job is the newest that exists, not `lastJob` (a
/// later tick claimed ahead names its job there before it is made). The tick cancels these before its job is made
/// ([`Plan::Create`]); a cancel that failed there (an apiserver restarting), or a job the job watch showed only
/// later, would leave one running beside the tick's job until the next tick, so every look asks again. Nothing once
/// the latest job has finished: an earlier job run again then (`bgjobs retry`) runs alone.
pub(crate) fn replaced_still_running<'a>(def: &RecurringBackgroundJob, kids: &'a [Child]) -> Vec<&'a Child> {
    if def.spec.concurrency_policy != RecurringConcurrencyPolicy::Replace {
        return Vec::new();
    }
    let Some(latest) = kids.iter().filter(|k| k.tick.is_some()).max_by_key(|k| k.tick) else { return Vec::new() };
    if latest.phase.is_final() {
        return Vec::new();
    }
    let earlier = |k: &Child| match (k.tick, latest.tick) {
        (Some(tick), Some(latest_tick)) => tick < latest_tick,
        _ => matches!((k.created, latest.created), (Some(c), Some(latest_c)) if c < latest_c),
    };
    kids.iter().filter(|k| k.name != latest.name && !k.phase.is_final() && !k.cancel && earlier(k)).collect()
}

/// Whether `decided` rests on which of `def`'s jobs are unfinished, and the job it would make: a `Forbid` tick about
/// to start a job; a `Replace` tick's claim (which records the jobs to cancel in `status.active`) or its job about to
/// be created (and its predecessors cancelled).
pub(crate) fn judges_unfinished(def: &RecurringBackgroundJob, decided: &Plan) -> Option<String> {
    use RecurringConcurrencyPolicy::{Forbid, Replace};
    match (def.spec.concurrency_policy, decided) {
        (Forbid, Plan::Claim { skip: None, tick, .. }) | (Replace, Plan::Claim { tick, .. }) => {
            Some(job_name(&def.name_any(), *tick))
        }
        (Replace, Plan::Create { job, .. }) => Some(job.clone()),
        _ => None,
    }
}

/// Whether `decided` skips a tick because `def`'s jobs in `active`, as its cached children show them, are unfinished
/// (`Forbid`; not a tick past its starting deadline, skipped whatever runs). A skip is final, and the job watch may
/// lag: a job that finished, or was deleted to unblock the schedule, moments before the tick made it skip a tick that
/// should run. Each is read afresh first.
pub(crate) fn skips_for_unfinished(
    def: &RecurringBackgroundJob,
    decided: &Plan,
    active: &[String],
    now: Timestamp,
) -> bool {
    let Plan::Claim { tick, skip: Some(_), .. } = decided else { return false };
    // Read on the schedule's clock, as `plan` read it: with a jitter, the wall clock runs the offset ahead of it.
    let missed = missed_by(def, *tick, shifted(def, now)).is_some();
    def.spec.concurrency_policy == RecurringConcurrencyPolicy::Forbid && !active.is_empty() && !missed
}

/// The jobs of `def` that may be unfinished although its cached children, `kids`, do not show them so: those its
/// status names (`active`, `pendingJob`, `lastJob`: the latest tick's job however many ticks were skipped since),
/// but `creating`, the job about to be made; of these, the ones the cache does not show at all, or shows in a phase
/// `bgjobs retry` may have put back in the queue since. The job watch may lag behind (the API server's watch cache,
/// a replica that took the definition over moments ago): a job it had not shown counted as finished, and `Forbid`
/// started a job beside it, `Replace` cancelled nothing. Only these few are asked of the API server, and only before
/// such a decision. A job `bgjobs recurring trigger` made is among them only once a status write has listed it.
pub(crate) fn unseen_maybe_unfinished(
    def: &RecurringBackgroundJob,
    kids: &[Child],
    creating: Option<&str>,
) -> Vec<String> {
    let Some(status) = def.status.as_ref() else { return Vec::new() };
    let named = [&status.pending_job, &status.last_job].into_iter().flatten();
    // Unfinished as cached: already in `active`. Finished for good as cached: settled.
    let needs_a_look = |job: &String| match kids.iter().find(|k| k.name == *job) {
        None => true,
        Some(kid) => kid.phase.can_retry(),
    };
    let mut unseen: Vec<String> = (status.active.iter().chain(named))
        .filter(|job| Some(job.as_str()) != creating && needs_a_look(job))
        .cloned()
        .collect();
    unseen.sort();
    unseen.dedup();
    unseen
}

/// A CRD older than the operator has no `status.pendingJob`, and the API server drops it from the claim as written.
/// Put it back in the copy the next step decides from, so the job is still created (just not crash-safe). True if
/// it was dropped.
pub(crate) fn restore_dropped_pending(claimed: &mut RecurringBackgroundJob, job: &str) -> bool {
    let status = claimed.status.get_or_insert_with(Default::default);
    let dropped = status.pending_job.is_none();
    if dropped {
        status.pending_job = Some(job.to_string());
    }
    dropped
}

/// How long after its tick a claim carried to it ([`super::Armed`]) may still be used, given the tick's `lead`; None: not
/// at all (the definition is read at the tick). The next tick is at least two leads after this one ([`lead`]) and is
/// claimed no sooner than halfway to it ([`claim_at`]), whatever lead the replica that owns the definition then runs
/// with: so no sooner than a lead after this tick by that replica's clock, which may be
/// [`crate::clock::REPLICAS_AGREE_WITHIN`] ahead of this one's. The claim carried here must be used before. At most
/// half the lead, as a 10 s lead has always had; a lead of 4.5 s or less leaves nothing, and its tick's job is
/// created after a read. The window is checked when the create is sent: a create still on its way when the next owner
/// may claim (0.5 s later at the default lead) lands on the job if it was made, which is then kept until no such
/// create can land ([`history::late_creates_land_by`]: a minute after the next tick's job was made).
pub fn armed_past_tick(lead: Duration) -> Option<Duration> {
    let past = (lead / 2).min(lead.saturating_sub(crate::clock::REPLICAS_AGREE_WITHIN));
    (!past.is_zero()).then_some(past)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::api::RecurringBackgroundJobSpec;

    pub(crate) fn def(schedule: &str, extra: serde_json::Value) -> RecurringBackgroundJob {
        let mut spec = serde_json::json!({"schedule": schedule, "jobTemplate": {"spec": {"jobName": "noop"}}});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let spec: RecurringBackgroundJobSpec = serde_json::from_value(spec).unwrap();
        let mut d = RecurringBackgroundJob::new("report", spec);
        d.metadata.namespace = Some("ns".into());
        d.metadata.creation_timestamp = Some(Time(t(0)));
        d
    }

    /// [`super::plan`] with every tick claimed when due.
    fn plan(def: &RecurringBackgroundJob, active: &[String], known: impl Fn(&str) -> bool, now: Timestamp) -> Plan {
        super::plan(def, active, known, now, Duration::ZERO)
    }

    /// No job is known to exist.
    fn none(_: &str) -> bool {
        false
    }

    pub(crate) fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    pub(crate) fn with_last(mut d: RecurringBackgroundJob, last: i64) -> RecurringBackgroundJob {
        d.status = Some(RecurringBackgroundJobStatus { last_schedule_time: Some(Time(t(last))), ..Default::default() });
        d
    }

    #[test]
    fn only_a_forbid_skip_for_unfinished_jobs_reads_them_not_one_past_its_starting_deadline() {
        let forbid = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 5}));
        let skip = |tick| Plan::Claim { tick: t(tick), skip: Some("skipped".into()), catch_up: false };
        let active = ["report-1800000000".to_string()];
        assert!(skips_for_unfinished(&forbid, &skip(60), &active, t(62)));
        assert!(!skips_for_unfinished(&forbid, &skip(60), &active, t(70)), "past its deadline: skipped whatever runs");
        assert!(!skips_for_unfinished(&forbid, &skip(60), &[], t(62)));
        let runs = Plan::Claim { tick: t(60), skip: None, catch_up: false };
        assert!(!skips_for_unfinished(&forbid, &runs, &active, t(62)));
        let allow = def("* * * * *", serde_json::json!({}));
        assert!(!skips_for_unfinished(&allow, &skip(60), &active, t(62)));
    }

    /// With a jitter, a tick is due its offset late, and its deadline counts from then ([`plan`]). The skip for
    /// unfinished jobs counted it from the tick itself: with an offset past the deadline, every Forbid skip looked
    /// like a missed tick, and the jobs were never read (review).
    #[test]
    fn a_forbid_skip_of_a_jittered_tick_reads_the_unfinished_jobs_while_plan_counts_it_in_time() {
        let d = def(
            "* * * * *",
            serde_json::json!({"concurrencyPolicy": "Forbid", "jitterSeconds": 30,
            "startingDeadlineSeconds": 2}),
        );
        let d = with_last(d, 0);
        let offset = SignedDuration::try_from(jitter_offset("ns", "report", 30)).unwrap();
        assert!(offset > SignedDuration::from_secs(3), "the test needs an offset past the deadline: {offset:?}");
        let due = t(60).checked_add(offset).unwrap();
        let active = ["report-1800000000".to_string()];
        let decided = plan(&d, &active, none, due);
        assert!(matches!(decided, Plan::Claim { skip: Some(_), .. }), "{decided:?}");
        assert!(skips_for_unfinished(&d, &decided, &active, due), "in time: the unfinished jobs are read first");
        let late = due.checked_add(SignedDuration::from_secs(3)).unwrap();
        assert!(!skips_for_unfinished(&d, &plan(&d, &active, none, late), &active, late), "past its deadline");
    }

    #[test]
    fn nothing_is_due_between_ticks() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert!(matches!(plan(&d, &[], none, t(30)), Plan::Idle(Some(_))));
    }

    #[test]
    fn after_an_outage_only_the_latest_missed_tick_runs() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(plan(&d, &[], none, t(60 * 5 + 10)), Plan::Claim { tick: t(300), skip: None, catch_up: true });
    }

    #[test]
    fn a_tick_past_the_starting_deadline_is_skipped() {
        let d = with_last(def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 5})), 0);
        match plan(&d, &[], none, t(70)) {
            Plan::Claim { tick, skip: Some(reason), .. } => {
                assert_eq!(tick, t(60));
                assert!(reason.contains("past startingDeadlineSeconds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forbid_skips_while_a_job_is_unfinished_and_replace_cancels_it_after_the_claim() {
        let active = vec!["report-1800000000".to_string()];
        let forbid = with_last(def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid"})), 0);
        assert!(matches!(plan(&forbid, &active, none, t(61)), Plan::Claim { skip: Some(_), .. }));
        let replace = with_last(def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"})), 0);
        assert_eq!(plan(&replace, &active, none, t(61)), Plan::Claim { tick: t(60), skip: None, catch_up: false });
        let claimed = with_pending(replace, 60, "report-1800000060");
        let create = Plan::Create { job: "report-1800000060".into(), replace: active.clone() };
        assert_eq!(plan(&claimed, &active, none, t(61)), create);
        let allow = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(plan(&allow, &active, none, t(61)), Plan::Claim { tick: t(60), skip: None, catch_up: false });
        let claimed = with_pending(allow, 60, "report-1800000060");
        assert_eq!(
            plan(&claimed, &active, none, t(61)),
            Plan::Create { job: "report-1800000060".into(), replace: vec![] }
        );
    }

    pub(crate) fn with_pending(d: RecurringBackgroundJob, tick: i64, job: &str) -> RecurringBackgroundJob {
        let mut d = with_last(d, tick);
        d.status.as_mut().unwrap().pending_job = Some(job.into());
        d
    }

    #[test]
    fn two_days_of_missed_seconds_claim_the_latest_second() {
        let d = with_last(def("* * * * * *", serde_json::json!({})), 0);
        let now = t(48 * 3600).checked_add(SignedDuration::from_millis(400)).unwrap();
        assert_eq!(plan(&d, &[], none, now), Plan::Claim { tick: t(48 * 3600), skip: None, catch_up: true });
    }

    #[test]
    fn a_claimed_tick_is_created_before_any_later_tick_is_claimed() {
        let d = with_pending(def("* * * * *", serde_json::json!({})), 60, "report-1800000060");
        let create = Plan::Create { job: "report-1800000060".into(), replace: vec![] };
        assert_eq!(plan(&d, &[], none, t(60 * 5)), create, "tick 300 waits until the job of tick 60 is created");
    }

    #[test]
    fn a_pending_job_known_to_exist_needs_no_write_and_the_next_tick_is_claimed_over_it() {
        let d = with_pending(def("* * * * *", serde_json::json!({})), 60, "report-1800000060");
        let known = |job: &str| job == "report-1800000060";
        assert!(matches!(plan(&d, &[], known, t(61)), Plan::Idle(Some(_))), "its tick is done");
        assert_eq!(plan(&d, &[], known, t(121)), Plan::Claim { tick: t(120), skip: None, catch_up: false });
        let other = |job: &str| job == "report-1800000000";
        assert!(matches!(plan(&d, &[], other, t(121)), Plan::Create { .. }), "another job's existence proves nothing");
    }

    #[test]
    fn a_claimed_tick_is_carried_out_even_if_suspended_or_made_invalid_since() {
        let create = Plan::Create { job: "report-1800000060".into(), replace: vec![] };
        let suspended = with_pending(def("* * * * *", serde_json::json!({"suspend": true})), 60, "report-1800000060");
        assert_eq!(plan(&suspended, &[], none, t(61)), create);
        let invalid = with_pending(def("99 * * * *", serde_json::json!({})), 60, "report-1800000060");
        assert_eq!(plan(&invalid, &[], none, t(61)), create);
    }

    /// A job is always created some milliseconds after its tick: with `startingDeadlineSeconds: 0` every tick was
    /// skipped, or its job given up. The deadline counts whole seconds, as the field does.
    #[test]
    fn a_starting_deadline_of_zero_lets_a_tick_handled_within_its_second_through() {
        let ms = |n: i64| t(60).checked_add(SignedDuration::from_millis(n)).unwrap();
        let d = with_last(def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 0})), 0);
        assert_eq!(plan(&d, &[], none, ms(300)), Plan::Claim { tick: t(60), skip: None, catch_up: false });
        assert!(matches!(plan(&d, &[], none, ms(1_000)), Plan::Claim { skip: Some(_), .. }));
        let pending = with_pending(def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 0})), 60, "r");
        assert!(matches!(plan(&pending, &[], none, ms(300)), Plan::Create { .. }));
        assert!(matches!(plan(&pending, &[], none, ms(1_000)), Plan::Abandon { .. }));
    }

    #[test]
    fn a_claimed_job_not_created_within_the_starting_deadline_is_given_up() {
        let d = def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 30}));
        let d = with_pending(d, 60, "report-1800000060");
        assert!(matches!(plan(&d, &[], none, t(90)), Plan::Create { .. }));
        match plan(&d, &[], none, t(91)) {
            Plan::Abandon { job, reason } => {
                assert_eq!(job, "report-1800000060");
                assert!(reason.contains("past startingDeadlineSeconds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_claim_records_the_tick_and_its_pending_job_and_a_skip_records_only_the_tick() {
        let mut s = RecurringBackgroundJobStatus { last_job: Some("report-1800000000".into()), ..Default::default() };
        claim(&mut s, t(60), Some("report-1800000060"), Some(t(120)));
        assert_eq!(s.last_schedule_time, Some(Time(t(60))));
        assert_eq!(s.next_schedule_time, Some(Time(t(120))));
        assert_eq!(s.pending_job.as_deref(), Some("report-1800000060"));
        assert_eq!(s.last_job.as_deref(), Some("report-1800000060"));
        claim(&mut s, t(120), None, Some(t(180)));
        assert_eq!(s.last_schedule_time, Some(Time(t(120))));
        assert_eq!((s.pending_job, s.last_job.as_deref()), (None, Some("report-1800000060")));
    }

    #[test]
    fn a_replace_tick_leaves_its_job_to_run_alone_until_every_job_made_before_it_was_asked_to_stop() {
        let running = |name: &str, tick: Option<i64>, created: i64| Child {
            tick: tick.map(t),
            created: Some(t(created)),
            completed: None,
            ..finished(name, Phase::Running, 0)
        };
        let kids = vec![
            running("report-1800000000", Some(0), 0),
            Child { phase: Phase::Succeeded, ..running("report-1799999940", Some(-60), -60) },
            Child { cancel: true, ..running("report-1799999880", Some(-120), -120) },
            running("report-manual-before", None, 59),
            running("report-1800000060", Some(60), 60),
            running("report-manual-after", None, 60),
        ];
        // The next tick claimed ahead: `lastJob` names a job not made yet.
        let replace = with_pending(
            def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"})),
            120,
            "report-1800000120",
        );
        let names = |d: &RecurringBackgroundJob, kids: &[Child]| {
            replaced_still_running(d, kids).iter().map(|k| k.name.clone()).collect::<Vec<_>>()
        };
        // Not the finished one, nor the one asked already, nor a job triggered in the tick's own second or after.
        assert_eq!(names(&replace, &kids), ["report-1800000000", "report-manual-before"]);
        // Before the tick-60 job exists, the tick-0 job is the latest, and the job triggered after it runs beside it.
        assert_eq!(names(&replace, &kids[..4]), Vec::<String>::new());
        // Once the latest has finished, an earlier job run again by hand runs alone.
        let mut done = kids.clone();
        done[4].phase = Phase::Succeeded;
        assert_eq!(names(&replace, &done), Vec::<String>::new());
        let mut allow = replace.clone();
        allow.spec.concurrency_policy = RecurringConcurrencyPolicy::Allow;
        assert_eq!(names(&allow, &kids), Vec::<String>::new(), "only under Replace");
    }

    #[test]
    fn a_pending_ticks_starting_deadline_is_counted_from_its_tick() {
        let d = def("* * * * *", serde_json::json!({"startingDeadlineSeconds": 10}));
        let pending = with_pending(d.clone(), 60, "report-1800000060");
        assert_eq!(starting_deadline_left(&pending, t(65)), Some(Duration::from_secs(6)));
        assert_eq!(starting_deadline_left(&pending, t(80)), Some(Duration::ZERO), "past it");
        assert_eq!(starting_deadline_left(&with_last(d, 60), t(65)), None, "nothing pending");
        let no_deadline = with_pending(def("* * * * *", serde_json::json!({})), 60, "report-1800000060");
        assert_eq!(starting_deadline_left(&no_deadline, t(65)), None);
    }

    #[test]
    fn giving_up_clears_only_its_own_pending_job() {
        let mut s =
            RecurringBackgroundJobStatus { pending_job: Some("report-1800000120".into()), ..Default::default() };
        give_up(&mut s, "report-1800000060", &["report-1800000060".to_string()]);
        assert_eq!(s.pending_job.as_deref(), Some("report-1800000120"), "a later claim stays pending");
        give_up(&mut s, "report-1800000120", &["report-1800000060".to_string()]);
        assert_eq!((s.pending_job, s.active_count), (None, 1));
    }

    pub(crate) fn finished(name: &str, phase: Phase, completed: i64) -> Child {
        let uid = format!("uid-{name}");
        let resource_version = "1".to_string();
        Child {
            name: name.into(),
            uid,
            resource_version,
            phase,
            completed: Some(t(completed)),
            tick: None,
            created: None,
            cancel: false,
            deleting: false,
        }
    }

    #[test]
    fn a_pending_job_dropped_by_an_older_crd_is_put_back_for_the_next_step() {
        let mut claimed = with_pending(def("* * * * *", serde_json::json!({})), 60, "report-1800000060");
        assert!(!restore_dropped_pending(&mut claimed, "report-1800000060"), "kept by a current CRD");
        let mut dropped = with_last(def("* * * * *", serde_json::json!({})), 60);
        assert!(restore_dropped_pending(&mut dropped, "report-1800000060"));
        assert!(matches!(plan(&dropped, &[], none, t(61)), Plan::Create { job, .. } if job == "report-1800000060"));
    }

    #[test]
    fn a_job_is_known_created_if_cached_or_created_by_this_process() {
        let kids = vec![finished("report-1", Phase::Succeeded, 1)];
        assert!(known_created("report-1", &kids, None));
        assert!(!known_created("report-2", &kids, None));
        assert!(known_created("report-2", &kids, Some("report-2")));
        assert!(!known_created("report-2", &kids, Some("report-1")));
    }

    #[test]
    fn a_first_tick_is_no_catch_up_and_one_after_missed_ticks_is() {
        assert_eq!(
            plan(&def("* * * * *", serde_json::json!({})), &[], none, t(61)),
            Plan::Claim { tick: t(60), skip: None, catch_up: false }
        );
        let d = with_last(def("* * * * *", serde_json::json!({})), 60);
        assert_eq!(plan(&d, &[], none, t(121)), Plan::Claim { tick: t(120), skip: None, catch_up: false });
        assert_eq!(plan(&d, &[], none, t(181)), Plan::Claim { tick: t(180), skip: None, catch_up: true });
    }

    #[test]
    fn a_jitter_offset_is_stable_within_bounds_and_spreads_definitions() {
        assert_eq!(jitter_offset("ns", "a", 0), Duration::ZERO, "no jitter: due on the tick");
        assert_eq!(jitter_offset("ns", "a", 30), jitter_offset("ns", "a", 30), "the same on every replica");
        let offsets: Vec<Duration> = (0..5000).map(|i| jitter_offset("ns", &format!("tenant-{i}"), 60)).collect();
        assert!(offsets.iter().all(|o| *o < Duration::from_secs(60)));
        // 5,000 definitions over 60 s: every 10 s window gets about a sixth of them.
        let mut per_window = [0; 6];
        offsets.iter().for_each(|o| per_window[o.as_secs() as usize / 10] += 1);
        assert!(per_window.iter().all(|n| (700..967).contains(n)), "{per_window:?}");
        assert_ne!(jitter_offset("ns", "a", 60), jitter_offset("other", "a", 60), "namespaces differ");
    }

    #[test]
    fn with_a_jitter_a_tick_is_due_its_offset_late_and_its_deadline_counts_from_then() {
        let d = def("* * * * *", serde_json::json!({"jitterSeconds": 30, "startingDeadlineSeconds": 5}));
        let d = with_last(d, 0);
        let offset = SignedDuration::try_from(jitter_offset("ns", "report", 30)).unwrap();
        let due = t(60).checked_add(offset).unwrap();
        let just_before = due.checked_sub(SignedDuration::from_millis(1)).unwrap();
        assert_eq!(plan(&d, &[], none, just_before), Plan::Idle(Some(Duration::from_millis(1))), "not early");
        assert_eq!(plan(&d, &[], none, due), Plan::Claim { tick: t(60), skip: None, catch_up: false });
        let within = due.checked_add(SignedDuration::from_secs(5)).unwrap();
        assert!(matches!(plan(&d, &[], none, within), Plan::Claim { skip: None, .. }), "5 s after due: in time");
        let mut claimed = d.clone();
        claimed.status.as_mut().unwrap().last_schedule_time = Some(Time(t(60)));
        claimed.status.as_mut().unwrap().pending_job = Some("report-1800000060".into());
        assert!(matches!(plan(&claimed, &[], none, within), Plan::Create { .. }), "a pending job's deadline too");
        assert_eq!(next_due(&d, t(61), None), Some(due), "tick 60 is due after 61 still");
        assert_eq!(next_due(&d, due, None), Some(t(120).checked_add(offset).unwrap()));
    }

    #[test]
    fn a_definition_the_operator_cannot_read_is_invalid_with_the_reason_even_with_a_tick_pending() {
        let mut d = with_pending(def("* * * * *", serde_json::json!({})), 60, "report-1800000060");
        d.metadata.annotations =
            Some([(crate::unreadable::UNREADABLE_ANNOTATION.to_string(), "invalid type: string".to_string())].into());
        match plan(&d, &[], none, t(61)) {
            Plan::Unreadable(reason) => {
                assert!(reason.contains("cannot read") && reason.contains("invalid type"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    const AHEAD: Duration = Duration::from_secs(10);

    #[test]
    fn a_tick_is_claimed_its_lead_ahead_and_its_job_waits_for_the_tick() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(super::plan(&d, &[], none, t(49), AHEAD), Plan::Idle(Some(Duration::from_secs(1))));
        assert_eq!(super::plan(&d, &[], none, t(50), AHEAD), Plan::Claim { tick: t(60), skip: None, catch_up: false });
        let claimed = with_pending(d, 60, "report-1800000060");
        let job = "report-1800000060".to_string();
        assert_eq!(
            super::plan(&claimed, &[], none, t(55), AHEAD),
            Plan::Await { job: job.clone(), wait: Duration::from_secs(5) },
            "not created before its tick"
        );
        assert_eq!(super::plan(&claimed, &[], none, t(60), AHEAD), Plan::Create { job: job.clone(), replace: vec![] });
        let known = |j: &str| j == job;
        assert_eq!(super::plan(&claimed, &[], known, t(61), AHEAD), Plan::Idle(Some(Duration::from_secs(49))));
        assert_eq!(
            next_due(&claimed, t(50), Some(t(60))),
            Some(t(120)),
            "the claim's nextScheduleTime: the tick after"
        );
        assert_eq!(next_due(&claimed, t(61), Some(t(60))), Some(t(120)), "and the idle look's, so it writes nothing");
    }

    #[test]
    fn forbid_and_ticks_closer_than_twice_the_lead_are_claimed_when_due() {
        let forbid = with_last(def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid"})), 0);
        assert_eq!(super::plan(&forbid, &[], none, t(55), AHEAD), Plan::Idle(Some(Duration::from_secs(5))));
        let close = with_last(def("*/15 * * * * *", serde_json::json!({})), 0);
        assert_eq!(super::plan(&close, &[], none, t(10), AHEAD), Plan::Idle(Some(Duration::from_secs(5))));
        let spaced = with_last(def("*/20 * * * * *", serde_json::json!({})), 0);
        assert_eq!(
            super::plan(&spaced, &[], none, t(10), AHEAD),
            Plan::Claim { tick: t(20), skip: None, catch_up: false }
        );
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        assert_eq!(
            super::plan(&d, &[], none, t(55), Duration::ZERO),
            Plan::Idle(Some(Duration::from_secs(5))),
            "0: off"
        );
    }

    /// When `plan` first claims the next tick of `d` (every job known to exist), looking from `from` on: the tick,
    /// and the instant it is claimed (`from` if it is due to be claimed already).
    fn next_claim(d: &RecurringBackgroundJob, from: Timestamp, ahead: Duration) -> (Timestamp, Timestamp) {
        let known = |_: &str| true;
        match super::plan(d, &[], known, from, ahead) {
            Plan::Claim { tick, .. } => (tick, from),
            Plan::Idle(Some(wait)) => {
                let at = from.checked_add(wait).unwrap();
                match super::plan(d, &[], known, at, ahead) {
                    Plan::Claim { tick, .. } => (tick, at),
                    other => panic!("not claimed once the wait is over: {other:?}"),
                }
            }
            other => panic!("neither claimed nor waiting: {other:?}"),
        }
    }

    /// `d` with `tick` claimed, as [`Pass::claim_tick`] writes it.
    fn claimed(d: &RecurringBackgroundJob, tick: Timestamp) -> RecurringBackgroundJob {
        let mut c = d.clone();
        let mut status = c.status.clone().unwrap_or_default();
        claim(&mut status, tick, Some(&job_name("report", tick)), None);
        status.previous_schedule_time = handled_until(d).map(Time);
        c.status = Some(status);
        c
    }

    #[test]
    fn the_next_tick_is_claimed_after_the_claim_carried_to_the_tick_before_expires_whatever_lead_each_replica_runs_with()
     {
        use crate::clock::REPLICAS_AGREE_WITHIN as AGREE;
        // One replica claims a tick with its lead; the one that owns the definition next claims the tick after it with
        // another (a rolling change of --recurring-claim-ahead). Either may carry the claim of the first tick to it:
        // the one that claimed it, or the other after reading the claim. Irregular schedules make the gap before a
        // tick shorter than the one after it; definitions are created on a tick and between ticks.
        let schedules = ["0,10 * * * * *", "0,5,30 * * * * *", "*/20 * * * * *", "0 0,1 * * * *", "0 9,10 * * *"];
        let aheads = [1, 5, 9, 10, 30, 60, 600, 1800, 3600].map(Duration::from_secs);
        for (schedule, created) in schedules.into_iter().flat_map(|s| [(s, 0), (s, 3), (s, 7)]) {
            for (first, second) in aheads.iter().flat_map(|a| aheads.iter().map(move |b| (*a, *b))) {
                let mut d = def(schedule, serde_json::json!({}));
                d.metadata.creation_timestamp = Some(Time(t(created)));
                let mut from = t(created);
                for _ in 0..6 {
                    let (tick, _) = next_claim(&d, from, first);
                    let now_claimed = claimed(&d, tick);
                    let carried = [first, second].map(|ahead| armed_past_tick(tick_lead(&now_claimed, ahead)));
                    if let Some(past) = carried.into_iter().flatten().max() {
                        let usable_until = tick.checked_add(past).unwrap();
                        let (after, next_at) = next_claim(&now_claimed, tick, second);
                        assert!(
                            next_at > usable_until && next_at.duration_since(usable_until).unsigned_abs() >= AGREE,
                            "{schedule}, leads {first:?} then {second:?}: tick {tick} was usable until {usable_until}, \
                             yet tick {after} was claimed at {next_at}"
                        );
                    }
                    (d, from) = (now_claimed, tick);
                }
            }
        }
    }

    #[test]
    fn a_tick_is_claimed_its_whole_lead_ahead_unless_that_is_more_than_halfway_back_to_the_claim_it_replaces() {
        let every_minute = def("* * * * *", serde_json::json!({}));
        // A first claim replaces none: the whole lead, however soon after the definition was made.
        let mut fresh = every_minute.clone();
        fresh.metadata.creation_timestamp = Some(Time(t(55)));
        assert_eq!(
            super::plan(&fresh, &[], none, t(55), AHEAD),
            Plan::Claim { tick: t(60), skip: None, catch_up: false }
        );
        // Ticks a minute apart: the whole 10 s.
        let d = with_last(every_minute.clone(), 0);
        assert_eq!(super::plan(&d, &[], none, t(49), AHEAD), Plan::Idle(Some(Duration::from_secs(1))));
        // Ticks at :00 and :10 (then 50 s to the next): :10 is claimed halfway from :00, at :05, not 10 s ahead.
        let uneven = with_last(def("0,10 * * * * *", serde_json::json!({})), 0);
        assert_eq!(super::plan(&uneven, &[], none, t(1), AHEAD), Plan::Idle(Some(Duration::from_secs(4))));
        assert_eq!(
            super::plan(&uneven, &[], none, t(5), AHEAD),
            Plan::Claim { tick: t(10), skip: None, catch_up: false }
        );
        // Its claim may still be carried to it: how long depends on when the next tick can be claimed.
        assert_eq!(tick_lead(&claimed(&uneven, t(10)), AHEAD), AHEAD);
    }

    #[test]
    fn a_claim_carried_to_its_tick_expires_before_another_replica_may_claim_the_next_one() {
        use crate::clock::REPLICAS_AGREE_WITHIN as AGREE;
        // Ticks claimed ahead are at least two leads apart, so the next owner claims the next tick no sooner than a
        // lead after this one by its clock, which may be AGREE ahead of this replica's.
        for secs in [1, 3, 4, 5, 8, 9, 10, 30, 3600] {
            let lead = Duration::from_secs(secs);
            if let Some(past) = armed_past_tick(lead) {
                assert!(
                    past + AGREE <= lead,
                    "a {secs} s lead: used {past:?} past the tick, within {AGREE:?} of {lead:?}"
                );
                assert!(past <= lead / 2, "a {secs} s lead: more than half of it");
            }
        }
        assert_eq!(armed_past_tick(Duration::from_secs(10)), Some(Duration::from_secs(5)), "the default: as before");
        assert_eq!(armed_past_tick(Duration::from_secs(4)), None, "too short to carry: read at the tick");
        assert_eq!(armed_past_tick(Duration::ZERO), None, "0: not claimed ahead");
    }

    #[test]
    fn a_missed_tick_is_claimed_before_one_ahead_and_a_jittered_tick_its_lead_before_it_is_due() {
        let d = with_last(def("* * * * *", serde_json::json!({})), 0);
        let late = super::plan(&d, &[], none, t(60 * 5 + 55), AHEAD);
        assert_eq!(late, Plan::Claim { tick: t(300), skip: None, catch_up: true }, "the missed tick, not 360 ahead");
        let d = with_last(def("* * * * *", serde_json::json!({"jitterSeconds": 30})), 0);
        let offset = SignedDuration::try_from(jitter_offset("ns", "report", 30)).unwrap();
        let claim_at = t(50).checked_add(offset).unwrap();
        let before = claim_at.checked_sub(SignedDuration::from_millis(1)).unwrap();
        assert_eq!(super::plan(&d, &[], none, before, AHEAD), Plan::Idle(Some(Duration::from_millis(1))));
        assert_eq!(
            super::plan(&d, &[], none, claim_at, AHEAD),
            Plan::Claim { tick: t(60), skip: None, catch_up: false }
        );
        let claimed = with_pending(d, 60, "report-1800000060");
        let wait = super::plan(&claimed, &[], none, claim_at, AHEAD);
        assert_eq!(
            wait,
            Plan::Await { job: "report-1800000060".into(), wait: AHEAD },
            "due at the tick plus the offset"
        );
    }

    #[test]
    fn an_edit_before_a_tick_claimed_ahead_is_due_takes_the_claim_back_and_one_after_it_is_due_does_not() {
        let job = "report-1800000060";
        // The claim was written for generation 1.
        let claimed = |spec: serde_json::Value, generation: i64| {
            let mut d = with_last(def("* * * * *", spec), 0);
            claim(d.status.as_mut().unwrap(), t(60), Some(job), None);
            d.metadata.generation = Some(generation);
            d.status.as_mut().unwrap().observed_generation = Some(1);
            d
        };
        let unchanged = claimed(serde_json::json!({}), 1);
        assert!(matches!(super::plan(&unchanged, &[], none, t(55), AHEAD), Plan::Await { .. }));
        // An edit that also breaks the template takes the claim back too: reported invalid first, the edit would be
        // recorded as seen, and the claim would stand, made once the template is mended, however late.
        let broken = claimed(
            serde_json::json!({"suspend": true, "jobTemplate":
            {"metadata": {"labels": {"team": "payments/eu"}}, "spec": {"jobName": "noop"}}}),
            2,
        );
        assert_eq!(super::plan(&broken, &[], none, t(55), AHEAD), Plan::Withdraw { job: job.into(), at: t(55) });
        // A deletion (which raises the generation) before the tick takes the claim back too.
        let mut deleting = claimed(serde_json::json!({}), 2);
        deleting.metadata.deletion_timestamp = Some(Time(t(50)));
        assert_eq!(super::plan(&deleting, &[], none, t(55), AHEAD), Plan::Withdraw { job: job.into(), at: t(55) });
        // Suspended, or made denser, after the claim and before the tick: the claim goes, and the edit applies from now.
        for spec in [serde_json::json!({"suspend": true}), serde_json::json!({"schedule": "*/2 * * * * *"})] {
            let edited = claimed(spec, 2);
            assert_eq!(super::plan(&edited, &[], none, t(55), AHEAD), Plan::Withdraw { job: job.into(), at: t(55) });
            let mut taken_back = edited.clone();
            withdraw(taken_back.status.as_mut().unwrap(), job, t(55));
            taken_back.status.as_mut().unwrap().observed_generation = Some(2);
            let s = taken_back.status.as_ref().unwrap();
            assert_eq!((s.pending_job.as_deref(), s.last_schedule_time.as_ref().map(|t| t.0)), (None, Some(t(55))));
            let next = super::plan(&taken_back, &[], none, t(55), AHEAD);
            if edited.spec.suspend {
                assert_eq!(next, Plan::Idle(None), "suspended: no job");
            } else {
                // Every 2 s is less than two leads apart: claimed when due, from 56 on.
                assert_eq!(next, Plan::Idle(Some(Duration::from_secs(1))));
                assert!(
                    matches!(super::plan(&taken_back, &[], none, t(56), AHEAD), Plan::Claim { tick, .. } if tick == t(56))
                );
            }
            // Once the tick is due, the claim stands whatever the edit: its job may be on its way.
            assert!(matches!(super::plan(&edited, &[], none, t(60), AHEAD), Plan::Create { .. }));
        }
        // A larger jitter moves the definition's clock back, past the tick the claim replaced: taken back no further
        // than that tick, so it does not run again (nor any before it), and the claimed tick comes at its new time.
        let jittered = claimed(serde_json::json!({"jitterSeconds": 86400}), 2);
        let Plan::Withdraw { at, .. } = super::plan(&jittered, &[], none, t(55), AHEAD) else { panic!("withdrawn") };
        assert!(at < t(0), "the clock went back by the new offset: {at}");
        let mut taken_back = jittered.clone();
        withdraw(taken_back.status.as_mut().unwrap(), job, at);
        taken_back.status.as_mut().unwrap().observed_generation = Some(2);
        assert_eq!(taken_back.status.as_ref().unwrap().last_schedule_time, Some(Time(t(0))));
        assert!(matches!(super::plan(&taken_back, &[], none, t(55), AHEAD), Plan::Idle(Some(_))));
        // A claim written by an operator that records no generation, or not what it replaced, is carried out.
        let mut unknown = claimed(serde_json::json!({"suspend": true}), 2);
        unknown.status.as_mut().unwrap().observed_generation = None;
        assert!(matches!(super::plan(&unknown, &[], none, t(55), AHEAD), Plan::Await { .. }));
        let mut first = claimed(serde_json::json!({"suspend": true}), 2);
        first.status.as_mut().unwrap().previous_schedule_time = None;
        assert!(matches!(super::plan(&first, &[], none, t(55), AHEAD), Plan::Await { .. }));
    }

    #[test]
    fn suspended_being_deleted_and_invalid_definitions_create_nothing() {
        let suspended = def("* * * * *", serde_json::json!({"suspend": true}));
        assert_eq!(plan(&suspended, &[], none, t(600)), Plan::Idle(None));
        // Its deletion asked for while a finalizer holds it back.
        let mut deleting = def("* * * * *", serde_json::json!({}));
        assert_ne!(plan(&deleting, &[], none, t(600)), Plan::Idle(None));
        deleting.metadata.deletion_timestamp = Some(Time(t(590)));
        assert_eq!(plan(&deleting, &[], none, t(600)), Plan::Idle(None));
        // Its due tick's job not known to exist (perhaps made, then removed with it by a foreground deletion) is given
        // up, not made (again); one known to exist needs nothing.
        let pending = with_pending(deleting, 540, "report-1800000540");
        assert!(matches!(plan(&pending, &[], none, t(600)), Plan::Abandon { .. }));
        assert_eq!(plan(&pending, &[], |_| true, t(600)), Plan::Idle(None));
        let out_of_range = plan(&def("99 * * * *", serde_json::json!({})), &[], none, t(60));
        assert!(
            matches!(out_of_range, Plan::Invalid { reason: "InvalidSchedule", message } if message.contains("out of range"))
        );
        let bad_tz = def("* * * * *", serde_json::json!({"timeZone": "Mars/Olympus"}));
        let bad_tz = plan(&bad_tz, &[], none, t(60));
        assert!(
            matches!(bad_tz, Plan::Invalid { reason: "InvalidSchedule", message } if message.contains("unknown time zone"))
        );
    }

    #[test]
    fn a_schedule_that_never_fires_is_invalid_not_valid_and_idle() {
        let never = plan(&def("0 0 30 2 *", serde_json::json!({})), &[], none, t(60));
        assert!(
            matches!(never, Plan::Invalid { reason: "InvalidSchedule", message } if message.contains("30 February"))
        );
        let leap_day = plan(&def("0 0 29 2 *", serde_json::json!({})), &[], none, t(60));
        assert!(matches!(leap_day, Plan::Idle(Some(_))), "29 February comes every four years: {leap_day:?}");
    }

    /// A label or annotation the apiserver refuses in every job made from the template: the definition says so
    /// (`Valid=False`) and claims no tick, and a tick claimed before the edit waits for the template to be mended.
    /// Before, the definition claimed the tick, said `Valid=True`, and its job's create was refused once a second,
    /// for ever.
    #[test]
    fn a_template_with_a_label_kubernetes_refuses_is_invalid_and_claims_nothing() {
        let labelled = |labels: serde_json::Value| {
            def(
                "* * * * *",
                serde_json::json!({"jobTemplate": {"metadata": {"labels": labels}, "spec": {"jobName": "x"}}}),
            )
        };
        for (labels, says) in [
            (serde_json::json!({"team": "payments/eu"}), "the value \"payments/eu\""),
            (serde_json::json!({"team/a/b": "x"}), "the key \"team/a/b\""),
            (serde_json::json!({"team": "x".repeat(64)}), "the value"),
        ] {
            let p = plan(&labelled(labels), &[], none, t(600));
            assert!(
                matches!(&p, Plan::Invalid { reason: "InvalidTemplate", message } if message.contains(says)),
                "{p:?}"
            );
        }
        let annotated = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata":
            {"annotations": {"not a key": "any value / is fine"}}, "spec": {"jobName": "x"}}}),
        );
        assert!(matches!(plan(&annotated, &[], none, t(600)), Plan::Invalid { reason: "InvalidTemplate", .. }));
        let big = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata":
            {"annotations": {"a": "x".repeat(256 * 1024)}}, "spec": {"jobName": "x"}}}),
        );
        assert!(matches!(plan(&big, &[], none, t(600)), Plan::Invalid { reason: "InvalidTemplate", .. }));
        // The apiserver checks annotation keys lowercased: a capital in the prefix is fine there, not in a label.
        let capital = def(
            "* * * * *",
            serde_json::json!({"jobTemplate": {"metadata":
            {"annotations": {"Example.com/owner": "x"}}, "spec": {"jobName": "x"}}}),
        );
        assert!(matches!(plan(&capital, &[], none, t(600)), Plan::Claim { .. }));
        let capital_label = labelled(serde_json::json!({"Example.com/owner": "x"}));
        assert!(matches!(plan(&capital_label, &[], none, t(600)), Plan::Invalid { reason: "InvalidTemplate", .. }));
        let fine = labelled(serde_json::json!({"team": "payments.eu", "app.kubernetes.io/part-of": "billing"}));
        assert!(matches!(plan(&fine, &[], none, t(600)), Plan::Claim { .. }));
        let mut pending = labelled(serde_json::json!({"team": "payments/eu"}));
        pending.status = Some(
            serde_json::from_value(
                serde_json::json!({"pendingJob": "r-1", "lastScheduleTime": "2027-01-15T08:00:00Z"}),
            )
            .unwrap(),
        );
        assert!(matches!(plan(&pending, &[], none, t(600)), Plan::Invalid { reason: "InvalidTemplate", .. }));
    }

    /// The jobs a lagging job watch may hide: those the status names, but not those the cache shows unfinished (in
    /// `active` already) or finished for good, nor the one about to be made.
    #[test]
    fn the_jobs_asked_past_the_cache_are_the_ones_it_does_not_show_or_shows_retryable() {
        let mut d = with_pending(def("* * * * *", serde_json::json!({})), 120, "report-1800000120");
        let status = d.status.as_mut().unwrap();
        status.last_job = Some("report-1800000120".into());
        status.active = vec!["report-manual-x".into(), "report-1800000060".into()];
        let creating = || Some("report-1800000120");
        let both = ["report-1800000060", "report-manual-x"];
        assert_eq!(unseen_maybe_unfinished(&d, &[], creating()), both);
        let shown = |phase| vec![finished("report-1800000060", phase, 1)];
        assert_eq!(unseen_maybe_unfinished(&d, &shown(Phase::Succeeded), creating()), ["report-manual-x"]);
        assert_eq!(unseen_maybe_unfinished(&d, &shown(Phase::Running), creating()), ["report-manual-x"], "in active");
        assert_eq!(
            unseen_maybe_unfinished(&d, &shown(Phase::Failed), creating()),
            both,
            "bgjobs retry may re-queue it"
        );
        let all = ["report-1800000060", "report-1800000120", "report-manual-x"];
        assert_eq!(unseen_maybe_unfinished(&d, &[], None), all);
        assert!(unseen_maybe_unfinished(&def("* * * * *", serde_json::json!({})), &[], None).is_empty());
    }

    #[test]
    fn forbid_and_replace_judge_what_is_unfinished_before_a_job_is_made_and_allow_never() {
        let claim = |skip: Option<&str>| Plan::Claim { tick: t(60), skip: skip.map(String::from), catch_up: false };
        let create = Plan::Create { job: "report-1800000060".into(), replace: vec![] };
        let making = Some("report-1800000060".to_string());
        let forbid = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Forbid"}));
        assert_eq!(judges_unfinished(&forbid, &claim(None)), making);
        assert_eq!(judges_unfinished(&forbid, &claim(Some("skipped"))), None);
        assert_eq!(judges_unfinished(&forbid, &create), None, "decided at the claim");
        let replace = def("* * * * *", serde_json::json!({"concurrencyPolicy": "Replace"}));
        assert_eq!(judges_unfinished(&replace, &claim(None)), making, "the claim records what to cancel");
        assert_eq!(judges_unfinished(&replace, &create), making);
        let allow = def("* * * * *", serde_json::json!({}));
        assert_eq!((judges_unfinished(&allow, &claim(None)), judges_unfinished(&allow, &create)), (None, None));
    }
}
