//! Objects the operator cannot read: bad input that the CRD schema lets through, and what becomes of it.
//!
//! The schema leaves some of a job open (a Pod `template` is any object until a Pod is made from it), so the
//! apiserver can store a BackgroundJob or a RecurringBackgroundJob that the operator's types cannot hold: a template
//! whose `containers` is a string. Failing to decode it must not fail the list it is in (every later list would fail
//! too, and the replica would never see its queue again), nor drop it from the cache (a running job would look
//! deleted, a new one would be lost without a word). So every read of these kinds (`list_watch`, [`list`],
//! [`get_opt`]) keeps such an object as a stand-in, built from what can be read of it: its metadata, each field of
//! its spec that can be read on its own, its status, and why, in annotations of the copy in memory ([`standing`]).
//! Then:
//! - **bad input** (a field the schema leaves open, in a shape the type cannot hold): a job nobody holds (waiting, or
//!   orphaned) is never claimed and ends `Failed` with the error as its reason (`dispatch::triage`); a definition is
//!   reported `Valid=False` with reason `Unreadable`, makes no job and trims no history (`recurring`);
//! - **perhaps a newer operator's object** (a value of an enum this version does not know, which only a newer CRD
//!   allows; or a status this version cannot read): left alone, for the replicas that can read it (a rolling
//!   upgrade).
//!
//! Status writes to a stand-in ([`replace_status`]) change only its status (`PUT .../status` keeps the rest as
//! stored) and do not read the answer, which the types cannot hold either. The marks never reach the cluster, and
//! an object read whole is stripped of them, so a user cannot set them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::PostParams;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{BackgroundJob, RecurringBackgroundJob};

/// Annotation on the copy in memory of an object the operator could not read: why. Never on the cluster.
pub const UNREADABLE_ANNOTATION: &str = "bgjobs.dev/unreadable";
/// Annotation on the copy in memory of such an object that may be a newer operator's: leave it alone.
const NEWER_ANNOTATION: &str = "bgjobs.dev/unreadable-perhaps-newer";

/// A kind whose objects may be stored in a shape its type cannot hold.
pub trait Unreadable: Sized {
    /// The stand-in for `object`, which failed to decode; None when not even its metadata can be read (then
    /// nothing can be done with it but report it). `metadata` is the object's, already marked.
    fn stand_in(object: &serde_json::Value, metadata: ObjectMeta) -> Option<Self>;
}

/// What may be done with a stand-in.
#[derive(Debug, PartialEq)]
pub enum Standing<'a> {
    /// Bad input: fail it, with this reason.
    Fail(&'a str),
    /// Perhaps a newer operator's (this is why): leave it to the replicas that can read it.
    Leave(&'a str),
}

/// Whether `obj` is a stand-in, and what may be done with it.
pub fn standing<K: Resource>(obj: &K) -> Option<Standing<'_>> {
    let annotations = obj.meta().annotations.as_ref()?;
    let why = annotations.get(UNREADABLE_ANNOTATION)?.as_str();
    Some(if annotations.contains_key(NEWER_ANNOTATION) { Standing::Leave(why) } else { Standing::Fail(why) })
}

/// Decode `object`, or make its stand-in. Err: not even a stand-in could be made.
pub fn decode<K: Resource + DeserializeOwned + Unreadable>(object: serde_json::Value) -> Result<K, serde_json::Error> {
    match K::deserialize(&object) {
        Ok(mut k) => {
            unmark(&mut k);
            Ok(k)
        }
        Err(e) => {
            let name = |key: &str| object.pointer(&format!("/metadata/{key}")).and_then(|v| v.as_str()).unwrap_or("?");
            tracing::warn!(kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or("?"),
                namespace = name("namespace"), name = name("name"), error = %e,
                "an object the operator cannot read: kept as a stand-in");
            let metadata = marked_metadata(&object, &e).ok_or_else(|| clone_error(&e))?;
            K::stand_in(&object, metadata).ok_or(e)
        }
    }
}

/// The text of one listed object, decoded or made a stand-in (`list_watch` reads a large list item by item so).
pub fn decode_text<K: Resource + DeserializeOwned + Unreadable>(text: &str) -> Result<K, serde_json::Error> {
    match serde_json::from_str::<K>(text) {
        Ok(mut k) => {
            unmark(&mut k);
            Ok(k)
        }
        Err(_) => decode(serde_json::from_str(text)?),
    }
}

/// Marks that came with an object read whole were set by someone: they mean nothing.
fn unmark<K: Resource>(k: &mut K) {
    if let Some(a) = k.meta_mut().annotations.as_mut()
        && a.contains_key(UNREADABLE_ANNOTATION)
    {
        a.remove(UNREADABLE_ANNOTATION);
        a.remove(NEWER_ANNOTATION);
    }
}

fn clone_error(e: &serde_json::Error) -> serde_json::Error {
    serde::de::Error::custom(e.to_string())
}

/// An object as read from an answer of the apiserver (a watch event, a page of a list): decoded, or its stand-in.
#[derive(Clone, Debug)]
pub struct Readable<K>(pub K);

impl<'de, K: Resource + DeserializeOwned + Unreadable> serde::Deserialize<'de> for Readable<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a Value, from which it is decoded again if the type cannot hold it. (A list of 100,000 jobs reads
        // each item's text instead, see `list_watch`: cheaper than a Value per item.)
        let value = serde_json::Value::deserialize(deserializer)?;
        decode(value).map(Readable).map_err(serde::de::Error::custom)
    }
}

/// Every object of `api`, listed in pages of 500, each decoded or made a stand-in.
pub async fn list<K>(api: &kube::Api<K>) -> kube::Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + Unreadable + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = kube::api::ListParams::default().limit(500);
    loop {
        let request = kube::core::Request::new(api.resource_url()).list(&params).map_err(kube::Error::BuildRequest)?;
        let page: kube::core::ObjectList<Readable<K>> = api.clone().into_client().request(request).await?;
        out.extend(page.items.into_iter().map(|Readable(k)| k));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(out),
        }
    }
}

/// The object `name` of `api`, decoded or made a stand-in; None if it does not exist.
pub async fn get_opt<K>(api: &kube::Api<K>, name: &str) -> kube::Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + Unreadable + std::fmt::Debug,
{
    let request = kube::core::Request::new(api.resource_url()).get(name, &Default::default());
    let request = request.map_err(kube::Error::BuildRequest)?;
    match api.clone().into_client().request::<Readable<K>>(request).await {
        Ok(Readable(k)) => Ok(Some(k)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replace the status of `obj` (`PUT .../status`, under its resourceVersion) and return the object as written. For
/// a stand-in the answer is not read (the types cannot hold it either): `obj` itself is returned, with the
/// resourceVersion it was written under.
pub async fn replace_status<K>(api: &kube::Api<K>, obj: &K) -> kube::Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Unreadable + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    if standing(obj).is_none() {
        return api.replace_status(&name, &PostParams::default(), obj).await;
    }
    let mut written = obj.clone();
    unmark(&mut written); // what is sent: the marks are kept away from the cluster all the same
    let body = serde_json::to_vec(&written).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(api.resource_url())
        .replace_subresource("status", &name, &PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    api.clone().into_client().request_text(request).await?;
    Ok(obj.clone())
}

/// The stand-in's metadata: the object's own, marked with `error` (and as perhaps a newer operator's, when the error
/// is a value of an enum this version does not know, or the status cannot be read).
fn marked_metadata(object: &serde_json::Value, error: &serde_json::Error) -> Option<ObjectMeta> {
    let mut meta: ObjectMeta = serde_json::from_value(object.get("metadata")?.clone()).ok()?;
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(UNREADABLE_ANNOTATION.to_string(), error.to_string());
    let status_unreadable = |status: &serde_json::Value| match object.get("kind").and_then(|k| k.as_str()) {
        Some("RecurringBackgroundJob") => {
            serde_json::from_value::<crate::api::RecurringBackgroundJobStatus>(status.clone()).is_err()
        }
        _ => serde_json::from_value::<crate::api::BackgroundJobStatus>(status.clone()).is_err(),
    };
    // serde's own wording for a value outside an enum: the schema refuses such values, so a newer CRD allowed it.
    let newer = error.to_string().starts_with("unknown variant") || object.get("status").is_some_and(status_unreadable);
    if newer {
        annotations.insert(NEWER_ANNOTATION.to_string(), "true".to_string());
    }
    Some(meta)
}

/// A field of `object` by its path, decoded as `T` if it can be.
fn field<T: DeserializeOwned>(object: &serde_json::Value, path: &[&str]) -> Option<T> {
    let value = path.iter().try_fold(object, |v, key| v.get(key))?;
    serde_json::from_value(value.clone()).ok()
}

/// The spec as far as it can be read: `base`, plus each field of `spec` (but `skip`) that still decodes with it,
/// one at a time, so that one bad field costs only itself (a cancel, a TTL, a queue stay as the user set them).
fn readable_spec<S: DeserializeOwned>(
    spec: Option<&serde_json::Value>,
    base: serde_json::Value,
    skip: &str,
) -> Option<S> {
    let mut kept = base;
    for (key, value) in spec.and_then(|s| s.as_object()).into_iter().flatten() {
        if key == skip || kept.get(key).is_some() {
            continue;
        }
        let mut candidate = kept.clone();
        candidate[key] = value.clone();
        if serde_json::from_value::<S>(candidate.clone()).is_ok() {
            kept = candidate;
        }
    }
    serde_json::from_value(kept).ok()
}

impl Unreadable for BackgroundJob {
    fn stand_in(object: &serde_json::Value, metadata: ObjectMeta) -> Option<Self> {
        let spec_json = object.get("spec");
        // The handler's name, for `kubectl get` and the Event.
        let job_name: String = field(object, &["spec", "jobName"]).unwrap_or_default();
        let mut spec: crate::api::BackgroundJobSpec =
            readable_spec(spec_json, serde_json::json!({ "jobName": job_name }), "template")?;
        // A Pod job's attempt may have left a Pod: settling the job deletes it by name, not by template.
        if spec_json.and_then(|s| s.get("template")).is_some() {
            spec.template = Some(Default::default());
        }
        // The status is the operator's own writing: kept when it can be read, so that a running job stays running.
        Some(BackgroundJob { metadata, spec, status: field(object, &["status"]) })
    }
}

impl Unreadable for RecurringBackgroundJob {
    fn stand_in(object: &serde_json::Value, metadata: ObjectMeta) -> Option<Self> {
        let base = serde_json::json!({
            "schedule": field::<String>(object, &["spec", "schedule"]).unwrap_or_default(),
            "suspend": true, "jobTemplate": {"spec": {"jobName": ""}}
        });
        let spec = readable_spec(object.get("spec"), base, "jobTemplate")?;
        Some(RecurringBackgroundJob { metadata, spec, status: field(object, &["status"]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use kube::ResourceExt;

    fn bad_template_job(extra_spec: serde_json::Value, status: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({"jobName": "SendEmail", "template": {"spec": {"containers": "not a list"}}});
        spec.as_object_mut().unwrap().extend(extra_spec.as_object().unwrap().clone());
        serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": "bad", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
            "spec": spec, "status": status})
    }

    #[test]
    fn a_job_the_types_cannot_hold_becomes_a_stand_in_to_fail_with_its_metadata_readable_fields_and_status() {
        let extra = serde_json::json!({"cancel": true, "ttlSecondsAfterFinished": 604800, "queue": "mail",
            "concurrencyKey": "tenant-1", "priority": "High"});
        let object = bad_template_job(extra, serde_json::json!({"phase": "Running", "attempts": 2}));
        let job: BackgroundJob = decode(object).unwrap();
        assert_eq!(
            (job.name_any(), job.uid().as_deref(), job.resource_version().as_deref()),
            ("bad".into(), Some("u1"), Some("7"))
        );
        assert_eq!(job.spec.job_name, "SendEmail");
        assert_eq!(job.spec.template, Some(Default::default()), "a Pod job, with nothing of its template");
        assert!(job.spec.cancel, "a cancel is still seen");
        assert_eq!(job.spec.ttl_seconds_after_finished, Some(604800), "and the TTL the user set");
        assert_eq!((job.spec.queue.as_str(), job.spec.concurrency_key.as_deref()), ("mail", Some("tenant-1")));
        assert_eq!((job.phase(), job.attempts()), (Phase::Running, 2), "its status as written");
        match standing(&job) {
            Some(Standing::Fail(why)) => assert!(why.contains("invalid type") && why.contains("sequence"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_value_only_a_newer_crd_allows_or_an_unreadable_status_is_left_to_a_newer_operator() {
        let newer_enum = bad_template_job(serde_json::json!({}), serde_json::json!({"phase": "Paused"}));
        let job: BackgroundJob = decode(newer_enum).unwrap();
        assert!(matches!(standing(&job), Some(Standing::Leave(_))), "{:?}", standing(&job));
        let mut priority =
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"jobName": "noop", "priority": "Urgent"}});
        let job: BackgroundJob = decode(priority.take()).unwrap();
        match standing(&job) {
            Some(Standing::Leave(why)) => assert!(why.starts_with("unknown variant"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_readable_object_is_no_stand_in_even_if_someone_wrote_the_marks_on_it() {
        let marked = serde_json::json!({"metadata": {"name": "ok", "annotations": {UNREADABLE_ANNOTATION: "forged"}},
            "spec": {"jobName": "noop"}});
        let job: BackgroundJob = decode(marked.clone()).unwrap();
        assert!(standing(&job).is_none() && job.annotations().is_empty(), "{:?}", job.annotations());
        let job: BackgroundJob = decode_text(&marked.to_string()).unwrap();
        assert!(standing(&job).is_none());
        let def = serde_json::json!({"metadata": {"name": "d", "annotations": {UNREADABLE_ANNOTATION: "x"}},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}});
        assert!(standing(&decode::<RecurringBackgroundJob>(def).unwrap()).is_none());
    }

    #[test]
    fn without_readable_metadata_there_is_no_stand_in() {
        let object = serde_json::json!({"metadata": {"name": 5}, "spec": {"jobName": 1}});
        assert!(decode::<BackgroundJob>(object.clone()).is_err());
        assert!(decode_text::<BackgroundJob>(&object.to_string()).is_err());
    }

    #[test]
    fn an_unreadable_definition_becomes_a_suspended_stand_in_to_report_with_its_readable_fields() {
        let object = serde_json::json!({"kind": "RecurringBackgroundJob", "metadata": {"name": "nightly", "namespace": "ns"},
            "spec": {"schedule": "0 3 * * *", "successfulJobsHistoryLimit": 20,
                     "jobTemplate": {"spec": {"jobName": "x", "template": {"spec": {"containers": 1}}}}}});
        let def: RecurringBackgroundJob = decode(object).unwrap();
        assert!(def.spec.suspend, "it makes no job");
        assert_eq!((def.spec.schedule.as_str(), def.spec.successful_jobs_history_limit), ("0 3 * * *", 20));
        assert!(matches!(standing(&def), Some(Standing::Fail(_))), "{:?}", standing(&def));
    }
}
