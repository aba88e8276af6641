//! Objects the operator cannot read: bad input that the CRD schema lets through, and what becomes of it.
//!
//! The schema leaves some of a job open (a Pod `template` is any object until a Pod is made from it; `args` is any
//! JSON, nested as deep as the user likes), so the apiserver can store a BackgroundJob or a RecurringBackgroundJob
//! that the operator's types cannot hold: a template whose `containers` is a string. Failing to decode it must not
//! fail the list it is in (every later list would fail too, and the replica would never see its queue again), nor
//! drop it from the cache (a running job would look deleted, a new one would be lost without a word). So every read
//! of these kinds (`list_watch`, [`list`], [`get_opt`], [`Readable`]) keeps such an object as a stand-in, built
//! from what can be read of it ([`Shell`]): its metadata, each field of its spec that can be read on its own, its
//! status, and why, in annotations of the copy in memory ([`standing`]). Then:
//! - **bad input** (the object reads once the open part is taken out, or it is nested deeper than any reader goes):
//!   a job nobody holds (waiting, or orphaned) is never claimed and ends `Failed` with the error as its reason
//!   (`dispatch::triage`); a definition is reported `Valid=False` with reason `Unreadable`, makes no job and trims
//!   no history (`recurring`);
//! - **perhaps a newer operator's object** (anything else: a value outside what this version's schema allowed, a
//!   status it cannot read): left alone, for the replicas that can read it (a rolling upgrade).
//!
//! Status writes to a stand-in ([`replace_status`]) change only its status (`PUT .../status` keeps the rest as
//! stored) and read only the answer's resourceVersion. The marks never reach the cluster, and marks an object
//! arrives with are removed, so a user cannot set them.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Resource;
use kube::api::PostParams;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::api::{BackgroundJob, RecurringBackgroundJob};

/// Annotation on the copy in memory of an object the operator could not read: why. Never on the cluster.
pub const UNREADABLE_ANNOTATION: &str = "bgjobs.dev/unreadable";
/// Annotation on the copy in memory of such an object that may be a newer operator's: leave it alone.
const NEWER_ANNOTATION: &str = "bgjobs.dev/unreadable-perhaps-newer";
/// The annotations [`standing`] reads: what a cache that drops annotations must keep.
pub const MARKS: [&str; 2] = [UNREADABLE_ANNOTATION, NEWER_ANNOTATION];
/// Annotation on the copy in memory of a cached definition whose job template's metadata was dropped
/// (`queue::slim_definition`): what `recurring` found wrong in it. Never on the cluster.
pub const TEMPLATE_PROBLEM_ANNOTATION: &str = "bgjobs.dev/template-problem";

/// A kind whose objects may be stored in a shape its type cannot hold.
pub trait Unreadable: Resource + DeserializeOwned {
    /// Where its job arguments are (`api::Args`: read as text at any depth, whatever they hold), if it has any.
    const ARGUMENTS: Option<&'static [&'static str]> = None;
    /// Remove the part of `object` the schema leaves open (a Pod template), whose shape is the user's to get wrong.
    fn without_open_part(object: &mut serde_json::Value);
    /// The stand-in made of what `shell` holds; `metadata` is the object's, already marked. None: not even that.
    fn stand_in(shell: Shell, metadata: ObjectMeta) -> Option<Self>;
    /// Where it holds times that the apiserver stores up to the end of year 9999 but that the types cannot hold past
    /// 9999-12-30T22:00Z: read as absent ([`without_unrepresentable_times`]).
    const TIMES: &'static [&'static [&'static str]] = &[];
}

/// What can be read of any object of these kinds, whatever the shape of its spec: its metadata, and each spec field
/// and its status as text (serde passes over text it does not parse, at any depth).
#[derive(Deserialize)]
pub struct Shell {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: BTreeMap<String, Box<RawValue>>,
    #[serde(default)]
    status: Option<Box<RawValue>>,
}

impl Shell {
    /// The spec field `key`, if it decodes as `T`.
    fn spec_field<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        serde_json::from_str(self.spec.get(key)?.get()).ok()
    }

    /// The status, if it decodes as `T`.
    fn status<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_str(self.status.as_ref()?.get()).ok()
    }

    /// The spec as far as it can be read: `base`, plus each field (but `skip`) that still decodes with the ones kept,
    /// one at a time, so that one bad field costs only itself (a cancel, a TTL, a queue stay as the user set them).
    fn readable_spec<S: DeserializeOwned>(&self, base: serde_json::Value, skip: &str) -> Option<S> {
        let mut kept = base;
        for (key, raw) in &self.spec {
            if key == skip || kept.get(key).is_some() {
                continue;
            }
            let Ok(value) = serde_json::from_str::<serde_json::Value>(raw.get()) else { continue };
            let mut candidate = kept.clone();
            candidate[key] = value;
            if serde_json::from_value::<S>(candidate.clone()).is_ok() {
                kept = candidate;
            }
        }
        serde_json::from_value(kept).ok()
    }
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

/// The text of one object, decoded or made a stand-in. Err: not even its metadata could be read.
pub fn decode_text<K: Unreadable>(text: &str) -> Result<K, serde_json::Error> {
    let unmarked = |mut k: K| {
        unmark(k.meta_mut());
        k
    };
    let error = match serde_json::from_str::<K>(text) {
        Ok(k) => return Ok(unmarked(k)),
        Err(e) => e,
    };
    // Managed fields are the apiserver's record of who wrote which field: nothing here reads them, and a client may
    // write them nested deeper than any reader goes (the apiserver keeps what it is sent). Read without them.
    let text = without_managed_fields(text);
    let error = match &text {
        Cow::Owned(without) => match serde_json::from_str::<K>(without) {
            Ok(k) => return Ok(unmarked(k)),
            Err(e) => e,
        },
        Cow::Borrowed(_) => error,
    };
    let text = text.as_ref();
    if let Cow::Owned(repaired) = without_unrepresentable_times::<K>(text)
        && let Ok(k) = serde_json::from_str::<K>(&repaired)
    {
        let (kind, meta) = (std::any::type_name::<K>(), k.meta());
        let (namespace, name) =
            (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
        tracing::warn!(
            kind,
            namespace,
            name,
            "an object with a time too far in the future to read: read as if it had none"
        );
        return Ok(unmarked(k));
    }
    let shell: Shell = serde_json::from_str(text)?;
    let mut metadata = shell.metadata.clone();
    let (namespace, name) = (metadata.namespace.clone().unwrap_or_default(), metadata.name.clone().unwrap_or_default());
    unmark(&mut metadata);
    let annotations = metadata.annotations.get_or_insert_with(Default::default);
    annotations.insert(UNREADABLE_ANNOTATION.to_string(), error.to_string());
    if !bad_input::<K>(text) {
        annotations.insert(NEWER_ANNOTATION.to_string(), "true".to_string());
    }
    let stand_in = K::stand_in(shell, metadata).ok_or(error)?;
    tracing::warn!(kind = std::any::type_name::<K>(), namespace, name, why = ?standing(&stand_in),
        "an object the operator cannot read: kept as a stand-in");
    Ok(stand_in)
}

/// `text` with each of `K`'s [`Unreadable::TIMES`] that cannot be read as a time written as null. The apiserver takes
/// any time up to 9999-12-31T23:59:59 (a Lease's `renewTime` is checked for nothing else), so anyone who may write a
/// Lease the operator watches could otherwise make every list of them fail, and with it the replica's Lease cache or
/// its confirmation of the Leases it holds. Nothing decides on another process's stamp, and an absent one is what
/// a Lease's first writer may leave.
fn without_unrepresentable_times<K: Unreadable>(text: &str) -> Cow<'_, str> {
    K::TIMES.iter().fold(Cow::Borrowed(text), |text, path| {
        let readable = |t: &str| serde_json::from_str::<Option<MicroTime>>(t).is_ok();
        match value_at(&text, path) {
            Some(found) if !readable(found) => Cow::Owned(null_at(&text, path).into_owned()),
            _ => text,
        }
    })
}

/// Whether what makes the object unreadable is the user's input: it reads without the part the schema leaves open,
/// or it is nested too deep for any reader. Anything else (a value the schema refused when this version was
/// written, a status it cannot read) may be a newer operator's.
fn bad_input<K: Unreadable>(text: &str) -> bool {
    // Arguments are read as text at any depth: they make nothing unreadable, nor too deep to tell why.
    let text = without_arguments::<K>(text);
    let Ok(mut object) = serde_json::from_str::<serde_json::Value>(&text) else { return true };
    K::without_open_part(&mut object);
    serde_json::from_value::<K>(object).is_ok()
}

/// `text`, an object, with `metadata.managedFields` written as null. They are about 40 % of a stored job's text and
/// most of its nesting, and decoding them into values (every key and string its own allocation) took about a quarter
/// of the time a job's decoding took (one sample job, docs/benchmarks.md run 11), for fields the caches drop; and a
/// client may nest them deeper than serde_json's reader goes. `text` as it is if it has none, or is not an object
/// with such metadata (its decoding says what is wrong with it).
pub fn without_managed_fields(text: &str) -> Cow<'_, str> {
    null_at(text, &["metadata", "managedFields"])
}

/// `text`, an object of kind `K`, with its job arguments ([`Unreadable::ARGUMENTS`]) written as null.
fn without_arguments<K: Unreadable>(text: &str) -> Cow<'_, str> {
    K::ARGUMENTS.map_or(Cow::Borrowed(text), |at| null_at(text, at))
}

/// `text`, a JSON object, with the value at `path` written as null ([`replace_at`]).
pub fn null_at<'t>(text: &'t str, path: &[&str]) -> Cow<'t, str> {
    replace_at(text, path, |_| "null".to_string())
}

/// `text`, a JSON object, with the value at `path` (the keys of nested objects) replaced by what `with` makes of
/// its text; `text` as it is if there is none there, or it is already that. One scan per level finds it, without
/// decoding what it passes over (at any depth: serde_json passes over a value it does not decode without a depth
/// limit).
pub fn replace_at<'t>(text: &'t str, path: &[&str], with: impl FnOnce(&str) -> String) -> Cow<'t, str> {
    let Some(found) = value_at(text, path) else { return Cow::Borrowed(text) };
    // A borrowed raw value is a slice of `text` itself: its place in it is where its first byte is.
    let Some(start) = (found.as_ptr() as usize).checked_sub(text.as_ptr() as usize) else {
        return Cow::Borrowed(text);
    };
    let replacement = with(found);
    match (text.get(..start), text.get(start + found.len()..)) {
        (Some(before), Some(after)) if replacement != found => Cow::Owned([before, &replacement, after].concat()),
        _ => Cow::Borrowed(text),
    }
}

/// The text of the value at `path` in `text`, a slice of it.
fn value_at<'t>(text: &'t str, path: &[&str]) -> Option<&'t str> {
    /// One key of an object, every other member passed over.
    struct Member<'k>(&'k str);
    impl<'de> serde::de::DeserializeSeed<'de> for Member<'_> {
        type Value = Option<&'de RawValue>;
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_map(self)
        }
    }
    impl<'de> serde::de::Visitor<'de> for Member<'_> {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == self.0 {
                    found = Some(map.next_value::<&'de RawValue>()?);
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    path.iter().try_fold(text, |within, key| {
        let mut deserializer = serde_json::Deserializer::from_str(within);
        serde::de::DeserializeSeed::deserialize(Member(key), &mut deserializer).ok().flatten().map(RawValue::get)
    })
}

/// Marks that came with an object were set by someone: they mean nothing.
fn unmark(meta: &mut ObjectMeta) {
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(UNREADABLE_ANNOTATION);
        a.remove(NEWER_ANNOTATION);
        a.remove(TEMPLATE_PROBLEM_ANNOTATION);
    }
}

/// An object as read from an answer of the apiserver (a page of a list, a get): decoded, or its stand-in. Its text
/// is taken as it is (serde_json's own deserializer, which every kube answer goes through), so that it can be read
/// twice. Only where serde reads the object from the text itself, not from a buffer (a field of an internally or
/// adjacently tagged enum that comes before its tag is buffered).
#[derive(Clone, Debug)]
pub struct Readable<K>(pub K);

impl<'de, K: Unreadable> Deserialize<'de> for Readable<K> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        decode_text(raw.get()).map(Readable).map_err(serde::de::Error::custom)
    }
}

/// Every object of `api`, listed in pages of 500, each decoded or made a stand-in.
pub async fn list<K>(api: &kube::Api<K>) -> kube::Result<Vec<K>>
where
    K: Unreadable + Clone + std::fmt::Debug,
{
    list_selected(api, kube::api::ListParams::default()).await
}

/// The objects of `api` that `params` select, listed in pages of 500, each decoded or made a stand-in.
pub async fn list_selected<K>(api: &kube::Api<K>, params: kube::api::ListParams) -> kube::Result<Vec<K>>
where
    K: Unreadable + Clone + std::fmt::Debug,
{
    let mut out = Vec::new();
    let mut params = params.limit(500);
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
    K: Unreadable + Clone + std::fmt::Debug,
{
    let request = kube::core::Request::new(api.resource_url()).get(name, &Default::default());
    let request = request.map_err(kube::Error::BuildRequest)?;
    match api.clone().into_client().request::<Readable<K>>(request).await {
        Ok(Readable(k)) => Ok(Some(k)),
        Err(e) if crate::error::gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`get_opt`], without the object's job arguments ([`Unreadable::ARGUMENTS`]), for a reader that only writes its
/// status: a tenant may store 1.5 MB of them, and a report, which anyone who reaches the report endpoint can send,
/// holds what it read for as long as its write takes. A status write of the object read so changes only its status
/// (the apiserver keeps the stored spec).
pub async fn get_opt_without_args<K>(api: &kube::Api<K>, name: &str) -> kube::Result<Option<K>>
where
    K: Unreadable + Clone + std::fmt::Debug,
{
    let request = kube::core::Request::new(api.resource_url()).get(name, &Default::default());
    let request = request.map_err(kube::Error::BuildRequest)?;
    let text = match api.clone().into_client().request_text(request).await {
        Ok(text) => text,
        Err(e) if crate::error::gone(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = without_arguments::<K>(&text);
    decode_text(&text).map(Some).map_err(kube::Error::SerdeError)
}

/// Delete the object `name` of `api` as `params` say; the answer (the object being deleted, or a status) is not read.
pub async fn delete<K>(api: &kube::Api<K>, name: &str, params: &kube::api::DeleteParams) -> kube::Result<()>
where
    K: Unreadable + Clone + std::fmt::Debug,
{
    let request = kube::core::Request::new(api.resource_url()).delete(name, params);
    api.clone().into_client().request_text(request.map_err(kube::Error::BuildRequest)?).await.map(|_| ())
}

/// Merge-patch the object `name` of `api` and return it as written, decoded or made a stand-in (a patch that landed
/// must not read as failed because of a part of the object it did not touch).
pub async fn merge_patch<K>(api: &kube::Api<K>, name: &str, patch: serde_json::Value) -> kube::Result<K>
where
    K: Unreadable + Clone + std::fmt::Debug,
{
    let patch = kube::api::Patch::Merge(patch);
    let request = kube::core::Request::new(api.resource_url()).patch(name, &Default::default(), &patch);
    let answer = api.clone().into_client().request_text(request.map_err(kube::Error::BuildRequest)?).await?;
    decode_text(&answer).map_err(kube::Error::SerdeError)
}

/// Replace the status of `obj` (`PUT .../status`, under its resourceVersion) and return the object as written. For
/// a stand-in only the answer's resourceVersion is read (the types cannot hold the rest either): `obj` itself is
/// returned, with its status and that resourceVersion.
pub async fn replace_status<K>(api: &kube::Api<K>, obj: &K) -> kube::Result<K>
where
    K: Unreadable + Clone + Serialize + std::fmt::Debug,
{
    #[derive(Deserialize)]
    struct Answer {
        metadata: Version,
    }
    #[derive(Deserialize)]
    struct Version {
        #[serde(rename = "resourceVersion")]
        resource_version: Option<String>,
    }
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut sent = obj.clone();
    unmark(sent.meta_mut()); // the marks are kept away from the cluster all the same
    let body = serde_json::to_vec(&sent).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(api.resource_url())
        .replace_subresource("status", &name, &PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    let answer = api.clone().into_client().request_text(request).await?;
    if standing(obj).is_none() {
        // Read as every answer is ([`decode_text`]): a write that landed must not read as failed. An object that was
        // read whole and now reads only as a stand-in (a newer CRD's defaults?) is not to be acted on: an error, of
        // unknown outcome, as the typed read's was.
        let written = decode_text::<K>(&answer).map_err(kube::Error::SerdeError)?;
        if let Some(standing) = standing(&written) {
            let why = format!("the written object reads only in part now: {standing:?}");
            return Err(kube::Error::SerdeError(serde::de::Error::custom(why)));
        }
        return Ok(written);
    }
    let mut written = obj.clone();
    if let Ok(Answer { metadata: Version { resource_version: Some(v) } }) = serde_json::from_str(&answer) {
        written.meta_mut().resource_version = Some(v);
    }
    Ok(written)
}

impl Unreadable for BackgroundJob {
    const ARGUMENTS: Option<&'static [&'static str]> = Some(&["spec", "args"]);

    fn without_open_part(object: &mut serde_json::Value) {
        if let Some(spec) = object.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.remove("template");
        }
    }

    fn stand_in(shell: Shell, metadata: ObjectMeta) -> Option<Self> {
        // The handler's name, for `kubectl get` and the Event.
        let job_name: String = shell.spec_field("jobName").unwrap_or_default();
        let mut spec: crate::api::BackgroundJobSpec =
            shell.readable_spec(serde_json::json!({ "jobName": job_name }), "template")?;
        // A Pod job's attempt may have left a Pod: settling the job deletes it by name, not by template.
        if shell.spec.contains_key("template") {
            spec.template = Some(Default::default());
        }
        // The status is the operator's own writing: kept when it can be read, so that a running job stays running.
        Some(BackgroundJob { metadata, spec, status: shell.status() })
    }
}

/// An attempt's Pod: the apiserver checks its every field, so one the types cannot hold is an error, not a
/// stand-in.
impl Unreadable for k8s_openapi::api::core::v1::Pod {
    fn without_open_part(_: &mut serde_json::Value) {}

    fn stand_in(_: Shell, _: ObjectMeta) -> Option<Self> {
        None
    }
}

/// A Lease: checked by the apiserver but for its times ([`without_unrepresentable_times`]), so there is no stand-in.
impl Unreadable for k8s_openapi::api::coordination::v1::Lease {
    const TIMES: &'static [&'static [&'static str]] = &[&["spec", "renewTime"], &["spec", "acquireTime"]];

    fn without_open_part(_: &mut serde_json::Value) {}

    fn stand_in(_: Shell, _: ObjectMeta) -> Option<Self> {
        None
    }
}

impl Unreadable for RecurringBackgroundJob {
    const ARGUMENTS: Option<&'static [&'static str]> = Some(&["spec", "jobTemplate", "spec", "args"]);

    fn without_open_part(object: &mut serde_json::Value) {
        if let Some(spec) = object.pointer_mut("/spec/jobTemplate/spec").and_then(|s| s.as_object_mut()) {
            spec.remove("template");
        }
    }

    fn stand_in(shell: Shell, metadata: ObjectMeta) -> Option<Self> {
        let base = serde_json::json!({
            "schedule": shell.spec_field::<String>("schedule").unwrap_or_default(),
            "suspend": true, "jobTemplate": {"spec": {"jobName": ""}}
        });
        let spec = shell.readable_spec(base, "jobTemplate")?;
        Some(RecurringBackgroundJob { metadata, spec, status: shell.status() })
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
        let job: BackgroundJob = decode_text(&object.to_string()).unwrap();
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

    /// A client may write `managedFields` nested deeper than serde_json reads (the apiserver keeps them): read past,
    /// the job is itself, not a stand-in. Before, it could not be read at all (not even as a stand-in: its metadata
    /// is where the nesting is), so every read of it and every status write's answer failed.
    #[test]
    fn managed_fields_nested_deeper_than_any_reader_goes_are_passed_over_and_the_job_reads_as_itself() {
        let mut deep = serde_json::json!({});
        for _ in 0..200 {
            deep = serde_json::json!({ "f:a": deep });
        }
        let entry =
            serde_json::json!({"manager": "x", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": deep});
        let object = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": "deep", "namespace": "ns", "uid": "u1", "managedFields": [entry]},
            "spec": {"jobName": "noop", "queue": "mail"}, "status": {"phase": "Running", "attempts": 1}});
        let text = object.to_string();
        let typed = serde_json::from_str::<BackgroundJob>(&text).unwrap_err();
        assert!(typed.to_string().contains("recursion limit"), "the case: {typed}");
        let job: BackgroundJob = decode_text(&text).unwrap();
        assert_eq!(standing(&job), None, "not a stand-in");
        assert_eq!((job.name_any(), job.spec.queue.as_str()), ("deep".to_string(), "mail"));
        assert_eq!((job.phase(), job.attempts(), job.metadata.managed_fields), (Phase::Running, 1, None));
    }

    #[test]
    fn a_value_only_a_newer_crd_allows_or_an_unreadable_status_is_left_to_a_newer_operator() {
        let newer_enum = bad_template_job(serde_json::json!({}), serde_json::json!({"phase": "Paused"}));
        let job: BackgroundJob = decode_text(&newer_enum.to_string()).unwrap();
        assert!(matches!(standing(&job), Some(Standing::Leave(_))), "{:?}", standing(&job));
        let mut priority =
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"jobName": "noop", "priority": "Urgent"}});
        let job: BackgroundJob = decode_text(&priority.take().to_string()).unwrap();
        match standing(&job) {
            Some(Standing::Leave(why)) => assert!(why.starts_with("unknown variant"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_readable_object_is_no_stand_in_even_if_someone_wrote_the_marks_on_it() {
        let marked = serde_json::json!({"metadata": {"name": "ok", "annotations": {UNREADABLE_ANNOTATION: "forged"}},
            "spec": {"jobName": "noop"}});
        let job: BackgroundJob = decode_text(&marked.to_string()).unwrap();
        assert!(standing(&job).is_none() && job.annotations().is_empty(), "{:?}", job.annotations());
        let job: BackgroundJob = decode_text(&marked.to_string()).unwrap();
        assert!(standing(&job).is_none());
        let def = serde_json::json!({"metadata": {"name": "d", "annotations": {UNREADABLE_ANNOTATION: "x"}},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"jobName": "noop"}}}});
        assert!(standing(&decode_text::<RecurringBackgroundJob>(&def.to_string()).unwrap()).is_none());
    }

    #[test]
    fn a_value_nested_deeper_than_any_reader_goes_is_bad_input_and_still_a_stand_in() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let text = format!(
            r#"{{"kind":"BackgroundJob","metadata":{{"name":"deep"}},"spec":{{"jobName":"noop","cancel":true}},"status":{{"phase":"Waiting","result":{deep}}}}}"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err(), "deeper than serde_json's limit");
        let job: BackgroundJob = decode_text(&text).unwrap();
        assert!(matches!(standing(&job), Some(Standing::Fail(_))), "{:?}", standing(&job));
        assert!(job.spec.cancel && job.phase() == Phase::Waiting);
    }

    /// A reader that only writes the status reads the object without its arguments, everything else as it is.
    #[tokio::test]
    async fn an_object_read_for_its_status_comes_without_its_arguments() {
        let stored = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": "j", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"jobName": "noop", "args": {"pad": vec![0; 1000]}, "cancel": true},
            "status": {"phase": "Running", "attempts": 2}});
        let (client, _) = crate::testing::scripted_client(move |_| (200, stored.clone()));
        let api: kube::Api<BackgroundJob> = kube::Api::namespaced(client, "ns");
        let whole = get_opt(&api, "j").await.unwrap().unwrap();
        assert!(whole.spec.args.is_some());
        let lean = get_opt_without_args(&api, "j").await.unwrap().unwrap();
        assert_eq!(lean.spec.args, None);
        assert_eq!(lean.spec, crate::api::BackgroundJobSpec { args: None, ..whole.spec.clone() });
        assert_eq!((lean.metadata, lean.status), (whole.metadata, whole.status));
    }

    /// Arguments are kept as their text ([`crate::api::Args`]), read at any depth: a job whose arguments nest deeper
    /// than a `Value` is read is itself, not a stand-in (the handler that decodes them says they do not fit); and one
    /// that is unreadable for another reason (a value a newer operator may allow) is judged by that reason.
    #[test]
    fn args_nested_deeper_than_a_value_is_read_are_kept_as_their_text() {
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        let text = |retry: &str| {
            format!(
                r#"{{"kind":"BackgroundJob","metadata":{{"name":"deep"}},"spec":{{"jobName":"noop","args":{deep}{retry}}},"status":{{"phase":"Waiting"}}}}"#
            )
        };
        let job: BackgroundJob = decode_text(&text("")).unwrap();
        assert!(standing(&job).is_none());
        assert_eq!(job.spec.args.as_ref().map(|a| a.text()), Some(deep.as_str()));
        let newer: BackgroundJob = decode_text(&text(r#","retry":{"maxAttempts":3000000000}"#)).unwrap();
        assert!(matches!(standing(&newer), Some(Standing::Leave(_))), "{:?}", standing(&newer));
        let definition = format!(
            r#"{{"kind":"RecurringBackgroundJob","metadata":{{"name":"d"}},"spec":{{"schedule":"* * * * *","jobTemplate":{{"spec":{{"jobName":"noop","args":{deep},"retry":{{"maxAttempts":3000000000}}}}}}}}}}"#
        );
        let newer: RecurringBackgroundJob = decode_text(&definition).unwrap();
        assert!(matches!(standing(&newer), Some(Standing::Leave(_))), "{:?}", standing(&newer));
    }

    #[test]
    fn a_user_cannot_turn_bad_input_into_a_newer_operators_object_with_the_marks() {
        let mut object = bad_template_job(serde_json::json!({}), serde_json::json!({"phase": "Waiting"}));
        object["metadata"]["annotations"] =
            serde_json::json!({NEWER_ANNOTATION: "true", UNREADABLE_ANNOTATION: "nothing to see"});
        let job: BackgroundJob = decode_text(&object.to_string()).unwrap();
        match standing(&job) {
            Some(Standing::Fail(why)) => assert!(why.contains("invalid type"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_value_beyond_what_this_version_allows_outside_the_template_is_left_alone_and_a_null_status_is_none() {
        let widened = serde_json::json!({"metadata": {"name": "w"},
            "spec": {"jobName": "noop", "retry": {"maxAttempts": 3_000_000_000u64}}, "status": null});
        let job: BackgroundJob = decode_text(&widened.to_string()).unwrap();
        assert!(
            matches!(standing(&job), Some(Standing::Leave(_))),
            "perhaps a newer CRD widened it: {:?}",
            standing(&job)
        );
        let null_status = serde_json::json!({"metadata": {"name": "n"},
            "spec": {"jobName": "noop", "template": {"spec": {"containers": 5}}}, "status": null});
        let job: BackgroundJob = decode_text(&null_status.to_string()).unwrap();
        assert!(matches!(standing(&job), Some(Standing::Fail(_))), "a null status is no status: {:?}", standing(&job));
    }

    #[test]
    fn without_readable_metadata_there_is_no_stand_in() {
        let object = serde_json::json!({"metadata": {"name": 5}, "spec": {"jobName": 1}});
        assert!(decode_text::<BackgroundJob>(&object.clone().to_string()).is_err());
        assert!(decode_text::<BackgroundJob>(&object.to_string()).is_err());
    }

    #[test]
    fn an_unreadable_definition_becomes_a_suspended_stand_in_to_report_with_its_readable_fields() {
        let object = serde_json::json!({"kind": "RecurringBackgroundJob", "metadata": {"name": "nightly", "namespace": "ns"},
            "spec": {"schedule": "0 3 * * *", "successfulJobsHistoryLimit": 20,
                     "jobTemplate": {"spec": {"jobName": "x", "template": {"spec": {"containers": 1}}}}}});
        let def: RecurringBackgroundJob = decode_text(&object.to_string()).unwrap();
        assert!(def.spec.suspend, "it makes no job");
        assert_eq!((def.spec.schedule.as_str(), def.spec.successful_jobs_history_limit), ("0 3 * * *", 20));
        assert!(matches!(standing(&def), Some(Standing::Fail(_))), "{:?}", standing(&def));
    }
}
