//! How long a finished job is kept before the operator deletes it.
//!
//! Finished jobs are objects in etcd and in every replica's cache, so keeping them forever turns a steady job rate
//! into an unbounded object count (50 jobs/s is 4.3 million objects a day). The decision, per finished job, in order:
//! 1. the job's own `spec.ttlSecondsAfterFinished`, if set;
//! 2. a job created by a `RecurringBackgroundJob` is kept: its definition's history limits decide when it goes
//!    (they keep the last N runs, whatever their age: the point of a history). Its template may still set a TTL (1);
//! 3. the operator's `--retention` rule for the job's namespace and outcome, else its cluster-wide rule;
//! 4. the legacy `--ttl-seconds-after-finished`, for every outcome;
//! 5. the defaults: succeeded and skipped jobs 5 minutes ([`SUCCEEDED`]), failed, abandoned and cancelled ones
//!    7 days ([`UNSUCCESSFUL`]).
//!
//! A job of a bulk call (`bgjobs enqueue -c`, `jobs::enqueue_many`) is kept at least about three minutes after its
//! creation ([`kept_at_least_until`]), so that the call's retried creates find it instead of making it again.
//!
//! `never` keeps a job forever. Rules are written `[NAMESPACE/]OUTCOME=DURATION`, comma-separated; the outcome is
//! `succeeded`, `failed`, `abandoned`, `cancelled`, `skipped`, or `finished` for all five; a later rule overrides an
//! earlier one of the same scope: `finished=1d,succeeded=10m,batch/succeeded=0s,audit/finished=never`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use kube::ResourceExt;

use crate::api::{BackgroundJob, Phase};
use crate::config::HumanDuration;

/// Default retention of Succeeded (and Skipped) jobs. At a sustained 50 jobs/s this keeps 15,000 succeeded jobs: the
/// same order as Kubernetes' scalability target for one custom resource (10,000), and a tenth of the 100k backlog
/// the dispatcher is sized for. Long enough for a caller to read a result or `bgjobs describe` a job it was told
/// about; whoever needs an archive keeps jobs longer per namespace, or records outcomes elsewhere.
pub const SUCCEEDED: Duration = Duration::from_secs(5 * 60);

/// Default retention of Failed, Abandoned and Cancelled jobs: a week, so a failure found after a weekend can still be
/// read and retried (`bgjobs retry`). These need a person; their count is the failure rate times a week.
pub const UNSUCCESSFUL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The five final phases, as rules name them.
const OUTCOMES: [(&str, Phase); 5] = [
    ("succeeded", Phase::Succeeded),
    ("failed", Phase::Failed),
    ("abandoned", Phase::Abandoned),
    ("cancelled", Phase::Cancelled),
    ("skipped", Phase::Skipped),
];

/// How long to keep a finished job: `None` keeps it forever.
pub type Keep = Option<Duration>;

/// The operator's retention rules (`--retention`), with the defaults they override.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// `(namespace, phase) -> keep`; namespace `None` is the cluster-wide rule.
    rules: HashMap<(Option<String>, Phase), Keep>,
    /// Every outcome, below the rules: the legacy `--ttl-seconds-after-finished`.
    all_outcomes: Option<Keep>,
}

impl RetentionPolicy {
    /// This policy with `--ttl-seconds-after-finished` (seconds, every outcome, every namespace) under its rules.
    pub fn with_legacy_ttl(mut self, seconds: Option<i64>) -> Self {
        if let Some(s) = seconds {
            self.all_outcomes = Some(Some(Duration::from_secs(s.max(0) as u64)));
        }
        self
    }

    /// How long the operator keeps a job that ended in `phase` in `namespace`, absent a TTL on the job itself.
    pub fn keep(&self, namespace: &str, phase: Phase) -> Keep {
        if let Some(k) = self.rules.get(&(Some(namespace.to_string()), phase)) {
            return *k;
        }
        if let Some(k) = self.rules.get(&(None, phase)) {
            return *k;
        }
        if let Some(k) = self.all_outcomes {
            return k;
        }
        match phase {
            Phase::Succeeded | Phase::Skipped => Some(SUCCEEDED),
            _ => Some(UNSUCCESSFUL),
        }
    }
}

impl FromStr for RetentionPolicy {
    type Err = String;
    /// `[NAMESPACE/]OUTCOME=DURATION,...` (see the module docs); the empty string is the defaults.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut policy = RetentionPolicy::default();
        for rule in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (scope, keep) = rule.split_once('=').ok_or_else(|| {
                format!("retention rule {rule:?}: expected [NAMESPACE/]OUTCOME=DURATION, e.g. succeeded=5m")
            })?;
            let (namespace, outcome) = match scope.trim().split_once('/') {
                Some((ns, o)) if !ns.is_empty() => (Some(ns.to_string()), o),
                Some(_) => return Err(format!("retention rule {rule:?}: empty namespace before '/'")),
                None => (None, scope.trim()),
            };
            let phases: Vec<Phase> = match outcome {
                "finished" => OUTCOMES.iter().map(|(_, p)| *p).collect(),
                o => match OUTCOMES.iter().find(|(name, _)| *name == o) {
                    Some((_, p)) => vec![*p],
                    None => {
                        return Err(format!(
                            "retention rule {rule:?}: unknown outcome {o:?} (succeeded, failed, abandoned, \
                             cancelled, skipped or finished)"
                        ));
                    }
                },
            };
            let keep = match keep.trim() {
                "never" => None,
                d => Some(d.parse::<HumanDuration>().map_err(|e| format!("retention rule {rule:?}: {e} or never"))?.0),
            };
            for p in phases {
                policy.rules.insert((namespace.clone(), p), keep);
            }
        }
        Ok(policy)
    }
}

/// How long after it finished `job` is deleted: `None` while it is not finished, for a job kept forever, and for one
/// whose deletion was asked for already (a finalizer holds it: deleted again, it would be a no-op a second, for ever).
pub fn ttl_for(job: &BackgroundJob, policy: &RetentionPolicy) -> Keep {
    let phase = job.phase();
    if !phase.is_final() || job.deletion_requested() {
        return None;
    }
    if let Some(secs) = job.spec.ttl_seconds_after_finished {
        return Some(Duration::from_secs(secs.max(0) as u64));
    }
    if crate::recurring::definition_of(job).is_some() {
        return None;
    }
    policy.keep(&job.namespace().unwrap_or_default(), phase)
}

/// The earliest the operator may delete `job`, whatever its retention (None: no bound). A job of a bulk call
/// ([`crate::jobs::BATCH_LABEL`]) is kept until no create of it that the call may still send can land: sent within
/// [`crate::jobs::CREATES_SENT_WITHIN`] of the first, which was sent before the job's creation, each lands within
/// [`crate::client::LATE_CREATES_KEPT_FOR`] of the creation it is measured from. Deleted sooner, a create retried
/// after a lost answer would make the job again, and it would run twice.
pub fn kept_at_least_until(job: &BackgroundJob) -> Option<jiff::Timestamp> {
    job.labels().get(crate::jobs::BATCH_LABEL)?;
    let created = job.creation_timestamp()?.0;
    let kept = crate::jobs::CREATES_SENT_WITHIN + crate::client::LATE_CREATES_KEPT_FOR;
    created.checked_add(jiff::SignedDuration::try_from(kept).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackgroundJobStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn job(ns: &str, phase: Phase, ttl: Option<i64>) -> BackgroundJob {
        let mut j = BackgroundJob::new("j", crate::jobs::spec("noop", serde_json::json!({})));
        j.metadata.namespace = Some(ns.into());
        j.spec.ttl_seconds_after_finished = ttl;
        j.status = Some(Box::new(BackgroundJobStatus { phase: Some(phase), ..Default::default() }));
        j
    }

    fn policy(s: &str) -> RetentionPolicy {
        s.parse().unwrap()
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn by_default_successes_go_after_minutes_and_failures_stay_a_week() {
        let p = RetentionPolicy::default();
        assert_eq!(ttl_for(&job("a", Phase::Succeeded, None), &p), Some(5 * MIN));
        assert_eq!(ttl_for(&job("a", Phase::Skipped, None), &p), Some(5 * MIN));
        for phase in [Phase::Failed, Phase::Abandoned, Phase::Cancelled] {
            assert_eq!(ttl_for(&job("a", phase, None), &p), Some(7 * 24 * 60 * MIN), "{phase}");
        }
        for phase in [Phase::Waiting, Phase::Running] {
            assert_eq!(ttl_for(&job("a", phase, Some(0)), &p), None, "{phase} is not finished: never deleted");
        }
        let mut deleting = job("a", Phase::Cancelled, Some(0));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(ttl_for(&deleting, &p), None, "a job whose deletion waits is not deleted again");
    }

    /// A bulk call's job has a floor past every create the call may still send for it (`expire_finished` keeps the
    /// job to it whatever its TTL); no other job has such a floor.
    #[test]
    fn a_bulk_calls_job_is_kept_until_its_retried_creates_cannot_land() {
        let created = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let mut j = job("a", Phase::Succeeded, Some(0));
        j.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
        assert_eq!(kept_at_least_until(&j), None, "not a bulk call's job");
        j.metadata.labels = Some([(crate::jobs::BATCH_LABEL.to_string(), "abc".to_string())].into());
        let until = kept_at_least_until(&j).expect("a bulk call's job");
        let floor = crate::jobs::CREATES_SENT_WITHIN + crate::client::CREATE_LANDS_WITHIN;
        assert!(until.duration_since(created).unsigned_abs() > floor, "{until}");
        assert_eq!(until.duration_since(created).as_secs(), 186);
    }

    #[test]
    fn the_jobs_own_ttl_wins_over_every_rule() {
        let p = policy("finished=never,a/finished=never").with_legacy_ttl(Some(10));
        assert_eq!(ttl_for(&job("a", Phase::Succeeded, Some(0)), &p), Some(Duration::ZERO));
        assert_eq!(ttl_for(&job("a", Phase::Failed, Some(30)), &p), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_namespace_rule_wins_over_the_cluster_rule_which_wins_over_the_legacy_flag() {
        let p = policy("succeeded=1h, team-a/succeeded=30s, team-a/failed=never").with_legacy_ttl(Some(600));
        assert_eq!(ttl_for(&job("team-a", Phase::Succeeded, None), &p), Some(Duration::from_secs(30)));
        assert_eq!(ttl_for(&job("team-a", Phase::Failed, None), &p), None, "never: kept forever");
        assert_eq!(ttl_for(&job("team-b", Phase::Succeeded, None), &p), Some(60 * MIN));
        assert_eq!(ttl_for(&job("team-b", Phase::Failed, None), &p), Some(10 * MIN), "legacy flag, every outcome");
        assert_eq!(ttl_for(&job("team-b", Phase::Failed, None), &policy("")), Some(UNSUCCESSFUL));
    }

    #[test]
    fn finished_names_every_outcome_and_later_rules_override_earlier_ones() {
        let p = policy("finished=1d,succeeded=10m,x/finished=never,x/cancelled=2h");
        assert_eq!(p.keep("y", Phase::Succeeded), Some(10 * MIN));
        assert_eq!(p.keep("y", Phase::Abandoned), Some(24 * 60 * MIN));
        assert_eq!(p.keep("x", Phase::Succeeded), None);
        assert_eq!(p.keep("x", Phase::Cancelled), Some(120 * MIN));
        assert_eq!(policy("succeeded=1m,succeeded=2m").keep("y", Phase::Succeeded), Some(2 * MIN));
        assert_eq!(policy("succeeded=90").keep("y", Phase::Succeeded), Some(Duration::from_secs(90)), "bare seconds");
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let err = |s: &str| s.parse::<RetentionPolicy>().unwrap_err();
        assert!(err("succeeded").contains("expected [NAMESPACE/]OUTCOME=DURATION"), "{}", err("succeeded"));
        assert!(err("done=1h").contains("unknown outcome \"done\""), "{}", err("done=1h"));
        assert!(err("/failed=1h").contains("empty namespace"), "{}", err("/failed=1h"));
        assert!(err("failed=soon").contains("or never"), "{}", err("failed=soon"));
        assert_eq!(policy(""), RetentionPolicy::default());
    }

    #[test]
    fn recurring_jobs_are_left_to_their_definitions_history_limits_unless_their_template_sets_a_ttl() {
        let p = policy("succeeded=0s,failed=0s");
        let mut kid = job("a", Phase::Succeeded, None);
        kid.metadata.owner_references = Some(vec![OwnerReference {
            kind: "RecurringBackgroundJob".into(),
            name: "nightly".into(),
            ..Default::default()
        }]);
        assert_eq!(ttl_for(&kid, &p), None, "kept until the history limit trims it");
        kid.spec.ttl_seconds_after_finished = Some(60);
        assert_eq!(ttl_for(&kid, &p), Some(MIN), "a TTL from the template still applies");
    }
}
