//! The admission webhook: who asked.
//!
//! The apiserver does not tell a controller who created an object (`managedFields` names field managers, not users),
//! but it tells an admission webhook. Registered (by the chart's MutatingWebhookConfiguration) for CREATE and UPDATE
//! of BackgroundJobs and RecurringBackgroundJobs, the operator
//! - on CREATE stamps the requesting user and their groups as annotations ([`CREATED_BY`], [`CREATED_BY_GROUPS`]),
//!   replacing whatever the request carried there, so a record cannot be forged;
//! - on UPDATE refuses any change to those annotations, so a record cannot be altered, removed or added later, nor
//!   to the copy of its definition's record a schedule's job carries ([`DEFINITION_CREATED_BY`]);
//! - on UPDATE refuses a change to what the creator vouched for ([`vouched_change`]): a BackgroundJob's `spec`
//!   beyond `cancel`, `retry.maxAttempts` and `timeoutSeconds` (what `bgjobs cancel` and `bgjobs retry` write),
//!   and a RecurringBackgroundJob's `spec.jobTemplate`. Otherwise a user who may patch jobs but not create Pods
//!   would rewrite the template of a job a Pod-capable user created, and the Pod would run under the creator's
//!   name. A schedule's template is refused rather than re-stamped with its latest editor because jobs already
//!   created from the old template are checked against the definition's record: re-stamping would let a
//!   Pod-capable editor vouch, after the fact, for jobs an earlier editor's template produced. Delete and recreate
//!   a schedule to change what it runs.
//!
//! The Pod executor reads the record back for `--pod-creator-check` ([`crate::policy::creator`]). The decision is
//! [`review`], a pure function; [`serve`] is HTTPS (rustls, HTTP/1.1) around it, with the certificate reloaded from
//! `--admission-cert-dir` when its files change (cert-manager and the kubelet rotate mounted Secrets in place).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::policy::creator::Creator;
pub use crate::policy::creator::{CREATED_BY, CREATED_BY_GROUPS, DEFINITION_CREATED_BY};

/// The path the webhook is served on (the chart's `clientConfig.service.path`).
pub const PATH: &str = "/mutate";

/// An AdmissionReview holds the object and the old object; both are bounded by the apiserver's request limit (3 MiB).
const MAX_BODY: usize = 8 << 20;
/// Bytes of AdmissionReviews read at once: eight at their largest; the apiserver's are rarely over a few KiB.
const BODY_BUDGET: usize = 64 << 20;

/// The decision for one admission request: stamp the creator on CREATE, refuse changes to the stamp on UPDATE,
/// allow anything else.
pub fn review(req: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allow = AdmissionResponse::from(req);
    match req.operation {
        Operation::Create => {
            let creator = Creator {
                username: req.user_info.username.clone().unwrap_or_default(),
                groups: req.user_info.groups.clone().unwrap_or_default(),
            };
            let has_annotations = req.object.as_ref().is_some_and(|o| o.metadata.annotations.is_some());
            match allow.with_patch(stamp(&creator, has_annotations)) {
                Ok(r) => r,
                Err(e) => AdmissionResponse::from(req).deny(format!("cannot write the creator record: {e}")),
            }
        }
        Operation::Update => {
            let record = |o: &Option<DynamicObject>| {
                let annotations = o.as_ref().and_then(|o| o.metadata.annotations.as_ref());
                [CREATED_BY, CREATED_BY_GROUPS, DEFINITION_CREATED_BY]
                    .map(|k| annotations.and_then(|a| a.get(k)).cloned())
            };
            // The status subresource changes neither spec nor metadata (the apiserver keeps the stored ones, whatever
            // the body says, and the operator writes status from its slim cache, without the creator record); the
            // chart does not register it, but a registration that does must not refuse the operator's status writes.
            if req.sub_resource.as_deref() == Some("status") {
                return allow;
            }
            if record(&req.object) != record(&req.old_object) {
                return allow.deny(format!(
                    "the annotations {CREATED_BY} and {CREATED_BY_GROUPS} record who created this object (written by \
                     the bgjobs admission webhook when it was created), and {DEFINITION_CREATED_BY} who created the \
                     RecurringBackgroundJob that made it: they cannot be added, changed or removed"
                ));
            }
            let spec = |o: &Option<DynamicObject>| o.as_ref().and_then(|o| o.data.get("spec")).cloned();
            match vouched_change(&req.kind.kind, spec(&req.object), spec(&req.old_object)) {
                Some(refusal) => allow.deny(refusal),
                None => allow,
            }
        }
        _ => allow,
    }
}

/// The part of a spec the creator record vouches for: what a change would make run under the creator's name. For a
/// BackgroundJob the whole spec except what `bgjobs cancel` and `bgjobs retry` write (`cancel`,
/// `retry.maxAttempts`, `timeoutSeconds`: when and how often the same work runs, not what it is); for a
/// RecurringBackgroundJob its `jobTemplate` (schedule, suspend and history limits stay editable).
fn vouched(kind: &str, spec: Option<serde_json::Value>) -> Option<serde_json::Value> {
    let mut spec = spec?;
    // A default held explicitly (stored before the operator applied it) and one left out ask for the same.
    match kind {
        "BackgroundJob" => {
            if let Some(o) = spec.as_object_mut() {
                o.remove("cancel");
                o.remove("timeoutSeconds");
                if let Some(r) = o.get_mut("retry").and_then(|r| r.as_object_mut()) {
                    r.remove("maxAttempts");
                }
            }
            crate::api::without_operator_defaults(&mut spec);
            Some(spec)
        }
        "RecurringBackgroundJob" => {
            let mut template = spec.get("jobTemplate").cloned()?;
            if let Some(job_spec) = template.get_mut("spec") {
                crate::api::without_operator_defaults(job_spec);
            }
            Some(template)
        }
        _ => None,
    }
}

/// The refusal of an UPDATE that changes what the creator vouched for ([`vouched`]), if it does.
fn vouched_change(kind: &str, new: Option<serde_json::Value>, old: Option<serde_json::Value>) -> Option<String> {
    if vouched(kind, new) == vouched(kind, old) {
        return None;
    }
    Some(match kind {
        "RecurringBackgroundJob" => format!(
            "spec.jobTemplate of a RecurringBackgroundJob cannot be changed: its creator ({CREATED_BY}) vouches for \
             what its jobs run; delete and recreate it to change the template"
        ),
        _ => format!(
            "the spec of a {kind} cannot be changed after creation except spec.cancel, spec.retry.maxAttempts and \
             spec.timeoutSeconds: its creator ({CREATED_BY}) vouches for what it runs; create a new job instead"
        ),
    })
}

/// The JSON patch that writes `creator` into the object's annotations (creating the map if it has none).
fn stamp(creator: &Creator, has_annotations: bool) -> json_patch::Patch {
    let record: serde_json::Map<String, serde_json::Value> =
        creator.annotations().into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    let ops = if has_annotations {
        // `add` on an existing member replaces it: a record sent by the client is overwritten, never kept.
        record
            .into_iter()
            .map(|(k, v)| serde_json::json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(&k)), "value": v}))
            .collect()
    } else {
        vec![serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": record})]
    };
    serde_json::from_value(serde_json::Value::Array(ops)).expect("well-formed patch operations")
}

/// A JSON pointer segment (RFC 6901): `~` and `/` escaped.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Answer one AdmissionReview body.
fn answer(body: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let body = std::str::from_utf8(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let asked: AdmissionReview<DynamicObject> =
        serde_json::from_str(&readable_review(body)).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let req: AdmissionRequest<DynamicObject> = asked.try_into().map_err(|e| format!("{e}"))?;
    let resp = review(&req);
    debug!(uid = %req.uid, operation = ?req.operation, user = ?req.user_info.username, allowed = resp.allowed, "admission review");
    serde_json::to_vec(&resp.into_review()).map_err(|e| e.to_string())
}

/// `body`, an AdmissionReview, as the webhook reads it: its object's and old object's managed fields and status
/// written as null (nothing here reads them), and the parts of their spec the schema leaves open (a job's `args` and
/// Pod `template`, a definition's job template's) written as a digest of their text, which tells a change as well.
/// A client may nest any of them deeper than serde_json reads values, and every write to such an object would be
/// refused ("not an AdmissionReview"), a cancel included, while the replicas read them at any depth.
fn readable_review(body: &str) -> std::borrow::Cow<'_, str> {
    use crate::unreadable::replace_at;
    const OPEN: [&[&str]; 4] = [
        &["spec", "args"],
        &["spec", "template"],
        &["spec", "jobTemplate", "spec", "args"],
        &["spec", "jobTemplate", "spec", "template"],
    ];
    let object = |review: &str, field: &str| {
        replace_at(review, &["request", field], |object| {
            let object = crate::unreadable::without_managed_fields(object).into_owned();
            let object = crate::unreadable::null_at(&object, &["status"]).into_owned();
            OPEN.iter().fold(object, |object, at| replace_at(&object, at, digest).into_owned())
        })
        .into_owned()
    };
    let read = object(&object(body, "object"), "oldObject");
    if read == body { body.into() } else { read.into() }
}

/// A JSON value standing for the value `text`: the same for the same text. The apiserver writes the object and the old
/// object of a review alike (its own encoding, keys sorted), so arguments that did not change have the same text.
fn digest(text: &str) -> String {
    let sum = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({ "sha256": hex }).to_string()
}

/// The serving certificate, reloaded from `tls.crt` and `tls.key` in a directory when either file changes.
struct Certificates {
    dir: PathBuf,
    current: Mutex<(Option<SystemTime>, Arc<ServerConfig>)>,
}

impl Certificates {
    fn load(dir: &Path) -> Result<Certificates> {
        let config = server_config(dir)?;
        Ok(Certificates { dir: dir.to_path_buf(), current: Mutex::new((modified(dir), config)) })
    }

    /// The configuration for a new connection: reloaded if the files changed since; a broken new pair (a rotation
    /// caught between its two writes) keeps the previous one until the next connection.
    fn config(&self) -> Arc<ServerConfig> {
        let mut current = self.current.lock().expect("certificate lock");
        let stamp = modified(&self.dir);
        if stamp != current.0 {
            match server_config(&self.dir) {
                Ok(config) => {
                    info!(dir = %self.dir.display(), "admission webhook certificate reloaded");
                    *current = (stamp, config);
                }
                Err(e) => warn!(error = %e, "cannot reload the admission webhook certificate; keeping the old one"),
            }
        }
        current.1.clone()
    }
}

/// The later modification time of the two files (the kubelet swaps a symlinked directory: both change at once).
fn modified(dir: &Path) -> Option<SystemTime> {
    ["tls.crt", "tls.key"].iter().filter_map(|f| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok()).max()
}

fn server_config(dir: &Path) -> Result<Arc<ServerConfig>> {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        Error::Invalid(format!("admission webhook: cannot read {}: {e} (--admission-cert-dir)", what.display()))
    };
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(&cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| bad(&key, &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| Error::Invalid(format!("admission webhook: unusable certificate in {}: {e}", dir.display())))?;
    Ok(Arc::new(config))
}

/// Serve the webhook on `addr` (HTTPS with the certificate in `cert_dir`) until the process ends. Returns the bound
/// address.
pub async fn serve(addr: SocketAddr, cert_dir: &Path) -> Result<SocketAddr> {
    let certificates = Arc::new(Certificates::load(cert_dir)?);
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, path = PATH, "serving the admission webhook");
    // Anyone who reaches the port may connect: what a peer costs before it is known is bounded (`serving`).
    // The apiserver keeps a few connections alive and opens more under load; 64 from one address is plenty.
    let bounds = crate::serving::Bounds::new(BODY_BUDGET, MAX_BODY, 64);
    // A review parsed into JSON values takes many times its size (an 8 MB array of zeros, over 100 MB): one at a
    // time, which takes milliseconds.
    let parsing = Arc::new(tokio::sync::Semaphore::new(1));
    tokio::spawn(async move {
        loop {
            let (sock, peer, place) = bounds.accept(&listener, "admission webhook").await;
            let acceptor = TlsAcceptor::from(certificates.config());
            let (bounds, parsing) = (bounds.clone(), parsing.clone());
            tokio::spawn(async move {
                let _place = place;
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return debug!(%peer, error = %e, "admission webhook: TLS handshake failed"),
                    Err(_) => return debug!(%peer, "admission webhook: TLS handshake timed out"),
                };
                let service = hyper::service::service_fn(move |req| handle(bounds.clone(), parsing.clone(), req));
                let conn = crate::serving::Bounds::http1().serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "admission webhook connection ended");
                }
            });
        }
    });
    Ok(bound)
}

async fn handle(
    bounds: crate::serving::Bounds,
    parsing: Arc<tokio::sync::Semaphore>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, content_type.parse().expect("a valid header value"));
        Ok(r)
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, TEXT, format!("the webhook is at {PATH}\n").into_bytes());
    }
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, b"POST an AdmissionReview\n".to_vec());
    }
    let body = match bounds.read(req).await {
        Ok(b) => b,
        Err(unread) => {
            let code = StatusCode::from_u16(unread.code).unwrap_or(StatusCode::BAD_REQUEST);
            return reply(code, TEXT, format!("{}\n", unread.message).into_bytes());
        }
    };
    let Ok(_parsing) = parsing.acquire().await else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, b"the webhook is stopping\n".to_vec());
    };
    match answer(&body.bytes) {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        Err(e) => reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n").into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &str, object: serde_json::Value, old: serde_json::Value) -> AdmissionRequest<DynamicObject> {
        request_for("BackgroundJob", operation, object, old)
    }

    fn request_for(
        kind: &str,
        operation: &str,
        object: serde_json::Value,
        old: serde_json::Value,
    ) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "bgjobs.dev", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "bgjobs.dev", "version": "v1alpha1", "resource": "backgroundjobs"},
                "name": "j", "namespace": "ns", "operation": operation,
                "userInfo": {"username": "alice", "groups": ["team-a", "system:authenticated"]},
                "object": object, "oldObject": old, "dryRun": false,
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn job(annotations: serde_json::Value) -> serde_json::Value {
        let mut j = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": "j", "namespace": "ns"}, "spec": {"jobName": "noop"}});
        if !annotations.is_null() {
            j["metadata"]["annotations"] = annotations;
        }
        j
    }

    /// The object after the response's patch.
    fn patched(object: serde_json::Value, resp: &AdmissionResponse) -> serde_json::Value {
        let patch: json_patch::Patch = serde_json::from_slice(resp.patch.as_ref().expect("a patch")).unwrap();
        let mut out = object;
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    #[test]
    fn a_create_is_stamped_with_the_requesting_user_and_groups() {
        let object = job(serde_json::Value::Null);
        let resp = review(&request("CREATE", object.clone(), serde_json::Value::Null));
        assert!(resp.allowed);
        let out = patched(object, &resp);
        assert_eq!(out["metadata"]["annotations"][CREATED_BY], "alice");
        assert_eq!(out["metadata"]["annotations"][CREATED_BY_GROUPS], r#"["team-a","system:authenticated"]"#);
    }

    #[test]
    fn a_record_sent_by_the_client_is_overwritten_and_other_annotations_are_kept() {
        let object =
            job(serde_json::json!({CREATED_BY: "admin", CREATED_BY_GROUPS: "[\"system:masters\"]", "keep": "1"}));
        let out = patched(object.clone(), &review(&request("CREATE", object, serde_json::Value::Null)));
        assert_eq!(out["metadata"]["annotations"][CREATED_BY], "alice");
        assert_eq!(out["metadata"]["annotations"][CREATED_BY_GROUPS], r#"["team-a","system:authenticated"]"#);
        assert_eq!(out["metadata"]["annotations"]["keep"], "1");
    }

    #[test]
    fn an_update_that_keeps_the_record_is_allowed_and_one_that_touches_it_is_refused() {
        let stamped = job(serde_json::json!({CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}));
        let mut cancelled = stamped.clone();
        cancelled["spec"]["cancel"] = true.into();
        let ok = review(&request("UPDATE", cancelled, stamped.clone()));
        assert!(ok.allowed && ok.patch.is_none());

        let forged = job(serde_json::json!({CREATED_BY: "admin", CREATED_BY_GROUPS: "[]"}));
        let removed = job(serde_json::json!({CREATED_BY_GROUPS: "[]"}));
        // A schedule's job, made by the operator, with its definition's record: stripping the copy would leave only
        // the operator's own stamp to check.
        let operators = serde_json::json!({CREATED_BY: "system:serviceaccount:bgjobs:bgjobs", CREATED_BY_GROUPS: "[]"});
        let mut scheduled = operators.clone();
        scheduled[DEFINITION_CREATED_BY] = r#"{"name":"nightly","createdBy":"mallory","createdByGroups":"[]"}"#.into();
        for (what, new, old) in [
            ("changed", forged.clone(), stamped.clone()),
            ("removed", removed, stamped.clone()),
            ("added later", forged, job(serde_json::Value::Null)),
            ("whose definition's copy was removed", job(operators), job(scheduled)),
        ] {
            let resp = review(&request("UPDATE", new, old));
            assert!(!resp.allowed, "a record {what} must be refused");
            assert!(resp.result.message.contains("cannot be added, changed or removed"), "{}", resp.result.message);
        }
    }

    #[test]
    fn a_job_spec_change_other_than_cancel_or_what_bgjobs_retry_writes_is_refused() {
        let mut stamped = job(serde_json::json!({CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}));
        stamped["spec"]["template"] = serde_json::json!({"spec": {"containers": [{"name": "main", "image": "a"}]}});
        stamped["spec"]["retry"] = serde_json::json!({"maxAttempts": 1, "backoffSeconds": 5});
        stamped["spec"]["timeoutSeconds"] = 600.into();

        // `bgjobs cancel` and `bgjobs retry` (budget and deadline extended) still pass.
        let mut retried = stamped.clone();
        retried["spec"]["cancel"] = true.into();
        retried["spec"]["retry"]["maxAttempts"] = 3.into();
        retried["spec"]["timeoutSeconds"] = 1200.into();
        let ok = review(&request("UPDATE", retried, stamped.clone()));
        assert!(ok.allowed, "{}", ok.result.message);

        let mut rewritten = stamped.clone();
        rewritten["spec"]["template"]["spec"]["containers"][0]["image"] = "mallory/tool".into();
        let mut backoff = stamped.clone();
        backoff["spec"]["retry"]["backoffSeconds"] = 1.into();
        let mut renamed = stamped.clone();
        renamed["spec"]["jobName"] = "other".into();
        for (what, new) in [("template", rewritten), ("retry.backoffSeconds", backoff), ("jobName", renamed)] {
            let resp = review(&request("UPDATE", new, stamped.clone()));
            assert!(!resp.allowed, "a change of spec.{what} must be refused");
            assert!(resp.result.message.contains("cannot be changed after creation"), "{}", resp.result.message);
        }
    }

    /// Jobs stored before the operator applied the retry and timeout defaults hold them explicitly; a client that
    /// leaves them out (the Rust types do) writes the same spec. And a job stored without `retry` may still get a
    /// `retry.maxAttempts`.
    #[test]
    fn defaults_held_explicitly_or_left_out_are_the_same_spec() {
        let mut explicit = job(serde_json::json!({CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}));
        explicit["spec"]["retry"] = serde_json::json!({"backoffSeconds": 60, "backoffFactor": 2});
        explicit["spec"]["timeoutSeconds"] = crate::api::DEFAULT_TIMEOUT_SECONDS.into();
        let mut left_out = explicit.clone();
        left_out["spec"].as_object_mut().unwrap().remove("retry");
        left_out["spec"].as_object_mut().unwrap().remove("timeoutSeconds");
        let mut capped = left_out.clone();
        capped["spec"]["retry"] = serde_json::json!({"maxAttempts": 1});
        for (what, new, old) in [
            ("defaults left out", left_out.clone(), explicit.clone()),
            ("defaults written", explicit.clone(), left_out.clone()),
            ("maxAttempts added", capped, left_out.clone()),
        ] {
            let resp = review(&request("UPDATE", new, old));
            assert!(resp.allowed, "{what}: {}", resp.result.message);
        }
        let mut slower = left_out.clone();
        slower["spec"]["retry"] = serde_json::json!({"backoffSeconds": 61});
        assert!(!review(&request("UPDATE", slower, left_out)).allowed, "a backoff other than the default is a change");
        let mut steeper = explicit.clone();
        steeper["spec"]["retry"]["backoffFactor"] = 3.into();
        assert!(!review(&request("UPDATE", steeper, explicit)).allowed, "so is another backoff factor");

        let definition = |template: serde_json::Value| {
            serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob",
                "metadata": {"name": "nightly", "namespace": "ns", "annotations": {CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}},
                "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": template}}})
        };
        let old = definition(serde_json::json!({"jobName": "noop", "timeoutSeconds": 172800,
            "retry": {"backoffSeconds": 60, "backoffFactor": 2.0}}));
        let mut suspended = definition(serde_json::json!({"jobName": "noop"}));
        suspended["spec"]["suspend"] = true.into();
        let ok = review(&request_for("RecurringBackgroundJob", "UPDATE", suspended, old.clone()));
        assert!(ok.allowed, "{}", ok.result.message);
        let shorter = definition(serde_json::json!({"jobName": "noop", "timeoutSeconds": 600}));
        assert!(!review(&request_for("RecurringBackgroundJob", "UPDATE", shorter, old.clone())).allowed);
        let capped = definition(serde_json::json!({"jobName": "noop", "retry": {"maxAttempts": 2}}));
        assert!(
            !review(&request_for("RecurringBackgroundJob", "UPDATE", capped, old)).allowed,
            "a template's retry budget is vouched for"
        );
    }

    #[test]
    fn a_status_subresource_update_is_judged_neither_on_its_spec_nor_on_its_annotations() {
        let stamped = job(serde_json::json!({CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}));
        let mut other = stamped.clone();
        other["spec"]["jobName"] = "other".into();
        let mut req = request("UPDATE", other, stamped.clone());
        req.sub_resource = Some("status".into());
        assert!(review(&req).allowed);
        // The operator writes status from its slim cache, without the creator record; the apiserver keeps the
        // stored metadata of a status write whatever the body says.
        let mut slim = stamped.clone();
        slim["metadata"]["annotations"] = serde_json::json!({});
        let mut req = request("UPDATE", slim.clone(), stamped.clone());
        req.sub_resource = Some("status".into());
        assert!(review(&req).allowed, "{}", review(&req).result.message);
        assert!(!review(&request("UPDATE", slim, stamped)).allowed, "the object itself keeps its record");
    }

    #[test]
    fn a_schedule_template_change_is_refused_and_its_schedule_and_suspend_may_change() {
        let definition = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "RecurringBackgroundJob",
            "metadata": {"name": "nightly", "namespace": "ns", "annotations": {CREATED_BY: "alice", CREATED_BY_GROUPS: "[]"}},
            "spec": {"schedule": "0 3 * * *", "suspend": false, "jobTemplate": {"spec": {"jobName": "noop"}}}});
        let mut rescheduled = definition.clone();
        rescheduled["spec"]["schedule"] = "0 4 * * *".into();
        rescheduled["spec"]["suspend"] = true.into();
        let ok = review(&request_for("RecurringBackgroundJob", "UPDATE", rescheduled, definition.clone()));
        assert!(ok.allowed, "{}", ok.result.message);

        let mut rewritten = definition.clone();
        rewritten["spec"]["jobTemplate"]["spec"]["jobName"] = "shell".into();
        let resp = review(&request_for("RecurringBackgroundJob", "UPDATE", rewritten, definition));
        assert!(!resp.allowed);
        assert!(resp.result.message.contains("spec.jobTemplate"), "{}", resp.result.message);
    }

    #[test]
    fn other_operations_are_allowed_untouched() {
        let resp = review(&request("DELETE", serde_json::Value::Null, job(serde_json::Value::Null)));
        assert!(resp.allowed && resp.patch.is_none());
    }

    #[test]
    fn the_answer_is_an_admission_review_with_the_requests_uid() {
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": {"group": "bgjobs.dev", "version": "v1alpha1", "kind": "BackgroundJob"},
                "resource": {"group": "bgjobs.dev", "version": "v1alpha1", "resource": "backgroundjobs"},
                "operation": "CREATE", "userInfo": {"username": "bob"}, "object": job(serde_json::Value::Null)}
        });
        let out: serde_json::Value = serde_json::from_slice(&answer(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            (out["apiVersion"].as_str(), out["kind"].as_str()),
            (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
        );
        assert_eq!(out["response"]["uid"], "u-1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        assert!(answer(b"{}").is_err(), "a review without a request is an error, not an allow");
    }

    /// A cancel of a job whose managed fields a client nested 200 deep: its object and old object hold them, and the
    /// review was refused as "not an AdmissionReview" (the reader stops at 128). They are passed over.
    #[test]
    fn a_review_of_an_object_with_managed_fields_nested_too_deep_is_answered() {
        let fields = (0..200).fold(serde_json::json!({}), |inner, _| serde_json::json!({ "f:a": inner }));
        let deep = |cancel: bool| {
            let mut j = job(serde_json::Value::Null);
            j["metadata"]["managedFields"] = serde_json::json!([{"manager": "x", "fieldsV1": fields.clone()}]);
            j["spec"]["cancel"] = cancel.into();
            j
        };
        let body = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-2", "kind": {"group": "bgjobs.dev", "version": "v1alpha1", "kind": "BackgroundJob"},
                "resource": {"group": "bgjobs.dev", "version": "v1alpha1", "resource": "backgroundjobs"},
                "operation": "UPDATE", "userInfo": {"username": "bob"}, "object": deep(true), "oldObject": deep(false)}
        })
        .to_string();
        assert!(serde_json::from_str::<AdmissionReview<DynamicObject>>(&body).is_err(), "the case");
        let out: serde_json::Value = serde_json::from_slice(&answer(body.as_bytes()).unwrap()).unwrap();
        assert_eq!((out["response"]["uid"].as_str(), out["response"]["allowed"].as_bool()), (Some("u-2"), Some(true)));
    }

    /// Arguments, a Pod template's unknown fields or a result nested deeper than serde_json reads values (the replicas
    /// read arguments as text and pass over what they do not know): a job with them is admitted, cancelled like any
    /// other, and its arguments and template still cannot be changed; so for a definition's.
    #[test]
    fn a_review_of_an_object_whose_open_parts_are_nested_too_deep_is_answered_and_still_guards_them() {
        let args = |leaf: u8| format!(r#"{{"a":{}{leaf}{}}}"#, "[".repeat(200), "]".repeat(200));
        let job = |leaf: u8, cancel: bool| {
            format!(
                r#"{{"apiVersion":"bgjobs.dev/v1alpha1","kind":"BackgroundJob","metadata":{{"name":"j","namespace":"ns"}},"spec":{{"args":{},"cancel":{cancel},"jobName":"noop"}}}}"#,
                args(leaf)
            )
        };
        let definition = |leaf: u8, suspend: bool| {
            format!(
                r#"{{"apiVersion":"bgjobs.dev/v1alpha1","kind":"RecurringBackgroundJob","metadata":{{"name":"d","namespace":"ns"}},"spec":{{"jobTemplate":{{"spec":{{"args":{},"jobName":"noop"}}}},"schedule":"* * * * *","suspend":{suspend}}}}}"#,
                args(leaf)
            )
        };
        let review = |kind: &str, operation: &str, object: &str, old: &str| {
            let resource = format!("{}s", kind.to_lowercase());
            format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u-3","kind":{{"group":"bgjobs.dev","version":"v1alpha1","kind":"{kind}"}},"resource":{{"group":"bgjobs.dev","version":"v1alpha1","resource":"{resource}"}},"operation":"{operation}","userInfo":{{"username":"bob"}},"object":{object},"oldObject":{old}}}}}"#
            )
        };
        let allowed = |body: String| {
            let out: serde_json::Value = serde_json::from_slice(&answer(body.as_bytes()).unwrap()).unwrap();
            out["response"]["allowed"].as_bool().unwrap()
        };
        let (jobs, definitions) = ("BackgroundJob", "RecurringBackgroundJob");
        let create = review(jobs, "CREATE", &job(1, false), "null");
        assert!(serde_json::from_str::<AdmissionReview<DynamicObject>>(&create).is_err(), "the case");
        assert!(allowed(create), "created");
        assert!(allowed(review(jobs, "UPDATE", &job(1, true), &job(1, false))), "cancelled");
        assert!(!allowed(review(jobs, "UPDATE", &job(2, false), &job(1, false))), "its arguments changed");
        assert!(allowed(review(definitions, "CREATE", &definition(1, false), "null")));
        assert!(allowed(review(definitions, "UPDATE", &definition(1, true), &definition(1, false))), "suspended");
        assert!(!allowed(review(definitions, "UPDATE", &definition(2, false), &definition(1, false))), "changed");
        // So for a Pod template with a field nested as deep (the replicas pass over fields they do not know).
        let templated = |leaf: u8, cancel: bool| {
            format!(
                r#"{{"apiVersion":"bgjobs.dev/v1alpha1","kind":"BackgroundJob","metadata":{{"name":"j","namespace":"ns"}},"spec":{{"cancel":{cancel},"jobName":"noop","template":{{"spec":{{"containers":[{{"image":"x","name":"main"}}]}},"x":{}}}}},"status":{{"result":{}}}}}"#,
                args(leaf),
                args(1)
            )
        };
        assert!(allowed(review(jobs, "CREATE", &templated(1, false), "null")));
        assert!(allowed(review(jobs, "UPDATE", &templated(1, true), &templated(1, false))), "cancelled");
        assert!(!allowed(review(jobs, "UPDATE", &templated(2, false), &templated(1, false))), "its template changed");
    }
}
