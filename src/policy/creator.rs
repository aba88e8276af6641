//! Who asked: may the user who created a job create its Pod themselves?
//!
//! The Pod executor creates Pods with the operator's RBAC, so a user who may create BackgroundJobs but not Pods
//! would get Pods through it (a confused deputy). The apiserver does not tell a controller who created an object;
//! the admission webhook ([`crate::admission`]) records it on every BackgroundJob and RecurringBackgroundJob as
//! annotations ([`CREATED_BY`], [`CREATED_BY_GROUPS`]) nobody can change afterwards. With `--pod-creator-check`,
//! before a Pod is created the operator asks the apiserver (a LocalSubjectAccessReview) whether each recorded
//! creator may `create pods` in the job's namespace, and fails the job naming the user if one may not.
//!
//! Whose permission counts: the job's creator, and, for a job of a RecurringBackgroundJob (its controller owner),
//! also the definition's creator. The operator itself creates a schedule's jobs, so the job's own stamp names the
//! operator; the definition's stamp names the person. Both must pass, so a user cannot borrow a more privileged
//! definition by pointing their own job's ownerReference at it. The operator copies the definition's stamp into the
//! job it makes ([`DEFINITION_CREATED_BY`]), so removing the job's ownerReference (or deleting the definition with
//! `--cascade=orphan`) does not leave only the operator's own stamp to check.

use std::collections::BTreeMap;

use clap::ValueEnum;
use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, ResourceAttributes, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use kube::api::ObjectMeta;

/// Annotation with the username of whoever created the object (set by the admission webhook).
pub const CREATED_BY: &str = "bgjobs.dev/created-by";
/// Annotation with that user's groups, a JSON array (set by the admission webhook).
pub const CREATED_BY_GROUPS: &str = "bgjobs.dev/created-by-groups";

/// Annotation on a job a RecurringBackgroundJob made: the definition's name and its creator record as it was when
/// the job was made, a JSON object `{"name", "createdBy", "createdByGroups"}` (either record field `null` when the
/// definition has none). Written by the operator, never changed afterwards (the webhook refuses it, as the creator
/// record): the check then needs neither the job's ownerReference, which its owner may remove (a patch, or a
/// `--cascade=orphan` delete of the definition), nor the definition, which may be gone.
pub const DEFINITION_CREATED_BY: &str = "bgjobs.dev/definition-created-by";

/// The name of the rule in a refusal.
pub const RULE: &str = "pod-creator";

/// `--pod-creator-check`: whether the Pod executor checks that a job's creator may create Pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CreatorCheck {
    /// No check: granting `create backgroundjobs` with Pod mode on grants the Pods the Pod policy allows.
    /// (`false` too: YAML 1.1 reads an unquoted `off` in a values file as false.)
    #[default]
    #[value(alias = "false")]
    Off,
    /// Check every recorded creator; a job without a record (created before the webhook, or while it was not
    /// called) is not checked.
    IfRecorded,
    /// Check every recorded creator; a job (or its RecurringBackgroundJob) without a record fails.
    Required,
}

/// A user as the admission webhook recorded them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creator {
    /// `userInfo.username`, e.g. `alice` or `system:serviceaccount:team-a:ci`.
    pub username: String,
    /// `userInfo.groups`.
    pub groups: Vec<String>,
}

impl Creator {
    /// The recorded creator in an object's annotations: `None` without a record, an error for a malformed one.
    pub fn recorded(annotations: &BTreeMap<String, String>) -> Option<Result<Creator, String>> {
        let username = annotations.get(CREATED_BY)?;
        let groups = match annotations.get(CREATED_BY_GROUPS) {
            None => Ok(Vec::new()),
            Some(g) => serde_json::from_str::<Vec<String>>(g)
                .map_err(|e| format!("annotation {CREATED_BY_GROUPS} is not a JSON array of strings: {e}")),
        };
        Some(groups.map(|groups| Creator { username: username.clone(), groups }))
    }

    /// The annotations that record this creator.
    pub fn annotations(&self) -> [(&'static str, String); 2] {
        [
            (CREATED_BY, self.username.clone()),
            (CREATED_BY_GROUPS, serde_json::to_string(&self.groups).expect("strings serialize")),
        ]
    }
}

/// The value of [`DEFINITION_CREATED_BY`] for a job made by the definition `name` with `annotations`.
pub fn definition_record(name: &str, annotations: &BTreeMap<String, String>) -> String {
    serde_json::json!({
        "name": name,
        "createdBy": annotations.get(CREATED_BY),
        "createdByGroups": annotations.get(CREATED_BY_GROUPS),
    })
    .to_string()
}

/// The definition's name and creator record a job carries in [`DEFINITION_CREATED_BY`]: `None` for a job made by
/// no definition (or by an operator older than the annotation); an error for a malformed value.
#[allow(clippy::type_complexity)]
pub fn copied_definition(job: &ObjectMeta) -> Option<Result<(String, Option<Result<Creator, String>>), String>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Copied {
        name: String,
        created_by: Option<String>,
        created_by_groups: Option<String>,
    }
    let raw = job.annotations.as_ref()?.get(DEFINITION_CREATED_BY)?;
    Some(
        serde_json::from_str::<Copied>(raw)
            .map_err(|e| format!("annotation {DEFINITION_CREATED_BY} is malformed: {e}"))
            .map(|c| {
                let record: BTreeMap<String, String> =
                    [(CREATED_BY, c.created_by), (CREATED_BY_GROUPS, c.created_by_groups)]
                        .into_iter()
                        .filter_map(|(k, v)| Some((k.to_string(), v?)))
                        .collect();
                (c.name, Creator::recorded(&record))
            }),
    )
}

/// One creator whose permission is checked, and where the record came from (for the job's `lastError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// `the job's creator`, or `the creator of RecurringBackgroundJob nightly`.
    pub whose: String,
    /// The recorded user.
    pub creator: Creator,
}

/// Whose permission the check asks for, before a job's Pod is created: an error (the job fails) when a record the
/// mode requires is missing or malformed. The definition's record comes from the job's [`DEFINITION_CREATED_BY`];
/// for a job without it (made before the annotation), from `definition`: the job's RecurringBackgroundJob (its
/// controller owner), by name, with its metadata if it still exists.
pub fn subjects(
    check: CreatorCheck,
    job: &ObjectMeta,
    definition: Option<(&str, Option<&ObjectMeta>)>,
) -> Result<Vec<Subject>, String> {
    if check == CreatorCheck::Off {
        return Ok(Vec::new());
    }
    let none = BTreeMap::new();
    let recorded = |meta: &ObjectMeta| Creator::recorded(meta.annotations.as_ref().unwrap_or(&none));
    // Per record: `None` when the object is gone, `Some(None)` when it has no record.
    let mut records = vec![("the job's creator".to_string(), Some(recorded(job)))];
    let definitions = |name: &str| format!("the creator of RecurringBackgroundJob {name}");
    match copied_definition(job) {
        Some(Ok((name, record))) => records.push((definitions(&name), Some(record))),
        Some(Err(e)) => return Err(format!("rule `{RULE}`: {e}")),
        None => {
            if let Some((name, meta)) = definition {
                records.push((definitions(name), meta.map(recorded)));
            }
        }
    }
    let mut out = Vec::new();
    for (whose, record) in records {
        let Some(record) = record else {
            if check == CreatorCheck::Required {
                return Err(format!(
                    "rule `{RULE}`: {whose} cannot be checked, the RecurringBackgroundJob is gone (the job's Pod is \
                     created only for a creator who could create it)"
                ));
            }
            continue;
        };
        match record {
            Some(Ok(creator)) => out.push(Subject { whose, creator }),
            Some(Err(e)) => return Err(format!("rule `{RULE}`: {whose} is not readable: {e}")),
            None if check == CreatorCheck::Required => {
                return Err(format!(
                    "rule `{RULE}`: no creator recorded for {whose} (annotation {CREATED_BY}); --pod-creator-check \
                     required needs the admission webhook to record it when the object is created: enable the \
                     admission webhook (chart: admissionWebhook.enabled) and create the job again"
                ));
            }
            None => {}
        }
    }
    Ok(out)
}

/// The question put to the apiserver: may `creator` create pods in `namespace`?
pub fn access_review(creator: &Creator, namespace: &str) -> LocalSubjectAccessReview {
    LocalSubjectAccessReview {
        metadata: ObjectMeta { namespace: Some(namespace.to_string()), ..Default::default() },
        spec: SubjectAccessReviewSpec {
            user: Some(creator.username.clone()),
            groups: Some(creator.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_string()),
                verb: Some("create".into()),
                resource: Some("pods".into()),
                group: Some(String::new()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    }
}

/// The verdict for one subject from the apiserver's answer: an error that names the user and the rule if they may
/// not create the Pod.
pub fn verdict(subject: &Subject, namespace: &str, answer: &SubjectAccessReviewStatus) -> Result<(), String> {
    if answer.allowed && answer.denied != Some(true) {
        return Ok(());
    }
    let mut why = String::new();
    for detail in [answer.reason.as_deref(), answer.evaluation_error.as_deref()].into_iter().flatten() {
        if !detail.is_empty() {
            why.push_str(&format!(" ({detail})"));
        }
    }
    Err(format!(
        "rule `{RULE}`: {} {:?} may not create pods in namespace {namespace}{why}; the operator creates a job's Pod \
         only for a creator who could create it themselves (grant them `create pods`, or turn --pod-creator-check \
         off)",
        subject.whose, subject.creator.username
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    fn alice() -> ObjectMeta {
        meta(&[(CREATED_BY, "alice"), (CREATED_BY_GROUPS, r#"["team-a","system:authenticated"]"#)])
    }

    #[test]
    fn the_recorded_creator_is_read_back_from_the_annotations_it_was_written_to() {
        let c = Creator { username: "alice".into(), groups: vec!["team-a".into()] };
        let annotations: BTreeMap<String, String> = c.annotations().into_iter().map(|(k, v)| (k.into(), v)).collect();
        assert_eq!(Creator::recorded(&annotations), Some(Ok(c)));
        assert_eq!(Creator::recorded(&BTreeMap::new()), None);
        let broken = meta(&[(CREATED_BY, "alice"), (CREATED_BY_GROUPS, "team-a")]).annotations.unwrap();
        assert!(Creator::recorded(&broken).unwrap().is_err());
    }

    #[test]
    fn off_checks_nobody_even_without_a_record() {
        assert_eq!(subjects(CreatorCheck::Off, &ObjectMeta::default(), None), Ok(vec![]));
    }

    #[test]
    fn a_job_without_a_record_fails_only_when_the_check_is_required() {
        let err = subjects(CreatorCheck::Required, &ObjectMeta::default(), None).unwrap_err();
        assert!(err.contains("no creator recorded") && err.contains("enable the admission webhook"), "{err}");
        assert_eq!(subjects(CreatorCheck::IfRecorded, &ObjectMeta::default(), None), Ok(vec![]));
    }

    #[test]
    fn the_creator_of_a_schedules_job_and_of_the_schedule_are_both_checked() {
        let operator = meta(&[(CREATED_BY, "system:serviceaccount:bgjobs:bgjobs"), (CREATED_BY_GROUPS, "[]")]);
        let got = subjects(CreatorCheck::Required, &operator, Some(("nightly", Some(&alice())))).unwrap();
        let names: Vec<(&str, &str)> = got.iter().map(|s| (s.whose.as_str(), s.creator.username.as_str())).collect();
        assert_eq!(
            names,
            [
                ("the job's creator", "system:serviceaccount:bgjobs:bgjobs"),
                ("the creator of RecurringBackgroundJob nightly", "alice")
            ]
        );
        assert_eq!(got[1].creator.groups, ["team-a", "system:authenticated"]);
    }

    #[test]
    fn a_schedule_that_is_gone_or_unrecorded_fails_a_required_check() {
        let gone = subjects(CreatorCheck::Required, &alice(), Some(("nightly", None))).unwrap_err();
        assert!(gone.contains("RecurringBackgroundJob is gone"), "{gone}");
        let bare = ObjectMeta::default();
        let unrecorded = subjects(CreatorCheck::Required, &alice(), Some(("nightly", Some(&bare)))).unwrap_err();
        assert!(unrecorded.contains("RecurringBackgroundJob nightly"), "{unrecorded}");
        assert_eq!(subjects(CreatorCheck::IfRecorded, &alice(), Some(("nightly", None))).unwrap().len(), 1);
    }

    /// The copy a schedule's job carries is what counts: without its ownerReference (removed by a patch, or by a
    /// `--cascade=orphan` delete) and without its definition, the definition's creator is still checked.
    #[test]
    fn a_schedules_job_is_judged_by_the_record_it_carries_without_its_owner_or_definition() {
        let mallory = meta(&[(CREATED_BY, "mallory"), (CREATED_BY_GROUPS, r#"["team-b"]"#)]);
        let mut job = meta(&[(CREATED_BY, "system:serviceaccount:bgjobs:bgjobs"), (CREATED_BY_GROUPS, "[]")]);
        let copy = definition_record("nightly", mallory.annotations.as_ref().unwrap());
        job.annotations.as_mut().unwrap().insert(DEFINITION_CREATED_BY.into(), copy);
        for check in [CreatorCheck::Required, CreatorCheck::IfRecorded] {
            let got = subjects(check, &job, None).unwrap();
            let names: Vec<(&str, &str)> =
                got.iter().map(|s| (s.whose.as_str(), s.creator.username.as_str())).collect();
            assert_eq!(names[1], ("the creator of RecurringBackgroundJob nightly", "mallory"), "{check:?}");
            assert_eq!(got[1].creator.groups, ["team-b"]);
            // Not the definition the job's ownerReference names now: the one that made it.
            assert_eq!(subjects(check, &job, Some(("other", Some(&alice())))).unwrap(), got);
        }
        // A definition without a record: its job carries that too, and a required check fails it.
        let mut unrecorded = job.clone();
        unrecorded
            .annotations
            .as_mut()
            .unwrap()
            .insert(DEFINITION_CREATED_BY.into(), definition_record("old", &BTreeMap::new()));
        let err = subjects(CreatorCheck::Required, &unrecorded, None).unwrap_err();
        assert!(err.contains("RecurringBackgroundJob old"), "{err}");
        let mut broken = job;
        broken.annotations.as_mut().unwrap().insert(DEFINITION_CREATED_BY.into(), "nightly".into());
        assert!(subjects(CreatorCheck::IfRecorded, &broken, None).unwrap_err().contains("malformed"));
    }

    #[test]
    fn the_review_asks_whether_the_user_with_their_groups_may_create_pods_in_the_jobs_namespace() {
        let c = Creator { username: "alice".into(), groups: vec!["team-a".into()] };
        let r = access_review(&c, "ns");
        assert_eq!(r.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(r.spec.user.as_deref(), Some("alice"));
        assert_eq!(r.spec.groups, Some(vec!["team-a".to_string()]));
        let attrs = r.spec.resource_attributes.unwrap();
        assert_eq!(
            (attrs.namespace.as_deref(), attrs.verb.as_deref(), attrs.resource.as_deref(), attrs.group.as_deref()),
            (Some("ns"), Some("create"), Some("pods"), Some(""))
        );
    }

    #[test]
    fn a_denied_review_names_the_user_the_namespace_and_the_rule() {
        let s = Subject {
            whose: "the job's creator".into(),
            creator: Creator { username: "alice".into(), groups: vec![] },
        };
        let allowed = SubjectAccessReviewStatus { allowed: true, ..Default::default() };
        assert_eq!(verdict(&s, "ns", &allowed), Ok(()));
        let denied =
            SubjectAccessReviewStatus { allowed: false, reason: Some("no RBAC rule".into()), ..Default::default() };
        let err = verdict(&s, "ns", &denied).unwrap_err();
        assert!(
            err.starts_with(
                "rule `pod-creator`: the job's creator \"alice\" may not create pods in namespace ns (no RBAC rule)"
            ),
            "{err}"
        );
        let vetoed = SubjectAccessReviewStatus { allowed: true, denied: Some(true), ..Default::default() };
        assert!(verdict(&s, "ns", &vetoed).is_err(), "an explicit denial wins");
    }
}
