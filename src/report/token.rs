//! Report tokens: what a worker shows to report for one attempt of one job.
//!
//! A token names the job (namespace, name, UID) and the attempt, and carries an HMAC-SHA256 of those under the job's
//! own key (`status.reportKey`, 256 random bits written by the first claim). Any replica checks a token against the
//! job as it reads it from the apiserver: no replica keeps state, and a report may reach any of them.
//!
//! Why the key lives in the job's status and not in a Secret: "whoever may read the job may report for it" is the
//! rule the issue asks for, and it needs no more RBAC than the operator has (a Secret per job would need create, get
//! and delete on Secrets in every namespace, a far wider grant than reading jobs). The key is random rather than
//! derived from the job's UID because the UID is shown in many places that are not the job (Leases, Pods' owner
//! references and labels, Events, the `Idempotency-Key` header).
//!
//! Text form: `bgj1.<payload>.<mac>`, both URL-safe base64 without padding; the payload is
//! `{"namespace":..,"name":..,"uid":..,"attempt":..}`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::api::BackgroundJob;

/// What a token says: the attempt it reports for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Namespace of the job.
    pub namespace: String,
    /// Name of the job.
    pub name: String,
    /// UID of the job (a job re-created under the same name is another job).
    pub uid: String,
    /// The attempt.
    pub attempt: i32,
}

/// A token taken apart, not yet checked against its job's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// What it claims.
    pub claims: Claims,
    payload: String,
    mac: Vec<u8>,
}

const PREFIX: &str = "bgj1";
/// Bound into every MAC, so a key could never sign anything else by accident.
const CONTEXT: &[u8] = b"bgjobs report token v1\n";
/// Longest token accepted (names are at most 253 characters; this leaves room for all of them).
const MAX_TOKEN: usize = 2048;

/// A new random key for a job's tokens.
pub fn new_key() -> String {
    let mut key = [0u8; 32];
    SystemRandom::new().fill(&mut key).expect("the system's random source works");
    URL_SAFE_NO_PAD.encode(key)
}

fn mac_key(key: &str) -> Option<hmac::Key> {
    let bytes = URL_SAFE_NO_PAD.decode(key).ok().filter(|b| b.len() >= 16)?;
    Some(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

fn signed(payload: &str) -> Vec<u8> {
    [CONTEXT, payload.as_bytes()].concat()
}

/// The token for `claims` under `key` (a job's `status.reportKey`). `None` if the key is not one [`new_key`] made.
pub fn issue(claims: &Claims, key: &str) -> Option<String> {
    let key = mac_key(key)?;
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
    let tag = hmac::sign(&key, &signed(&payload));
    Some(format!("{PREFIX}.{payload}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())))
}

/// Take a token apart; `Err` says why it is not one.
pub fn parse(token: &str) -> Result<Parsed, String> {
    let token = token.trim();
    if token.len() > MAX_TOKEN {
        return Err(format!(
            "the token is {} characters long; no bgjobs token is longer than {MAX_TOKEN}",
            token.len()
        ));
    }
    let mut parts = token.split('.');
    let (Some(PREFIX), Some(payload), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed token: expected bgj1.<payload>.<signature>".into());
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|e| format!("malformed token payload: {e}"))?;
    let claims: Claims = serde_json::from_slice(&bytes).map_err(|e| format!("malformed token payload: {e}"))?;
    let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|e| format!("malformed token signature: {e}"))?;
    Ok(Parsed { claims, payload: payload.to_string(), mac })
}

impl Parsed {
    /// Whether the token was signed with `key` (a job's `status.reportKey`), in constant time.
    pub fn signed_with(&self, key: &str) -> bool {
        mac_key(key).is_some_and(|k| hmac::verify(&k, &signed(&self.payload), &self.mac).is_ok())
    }

    /// Whether `cached`, a replica's cached copy of the job this token names, vouches for it: the same UID, and a
    /// key the token is signed with (a job's key never changes once written). This only orders which reports wait
    /// for a place to be applied (`server`): a forged token needs a read of its job to be refused, and must not keep
    /// a genuine one out. Every report is still checked against the job as the apiserver has it.
    pub fn vouched_by(&self, cached: Option<&BackgroundJob>) -> bool {
        cached.is_some_and(|job| job.metadata.uid.as_deref() == Some(self.claims.uid.as_str()) && self.signed_for(job))
    }

    /// Whether the token was signed with `job`'s own key (`status.reportKey`; none yet: not).
    pub fn signed_for(&self, job: &BackgroundJob) -> bool {
        job.status.as_ref().and_then(|s| s.report_key.as_deref()).is_some_and(|k| self.signed_with(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(attempt: i32) -> Claims {
        Claims { namespace: "ns".into(), name: "report".into(), uid: "uid-1".into(), attempt }
    }

    #[test]
    fn a_token_round_trips_and_verifies_only_under_its_own_key() {
        let key = new_key();
        let token = issue(&claims(3), &key).unwrap();
        let parsed = parse(&token).unwrap();
        assert_eq!(parsed.claims, claims(3));
        assert!(parsed.signed_with(&key));
        assert!(!parsed.signed_with(&new_key()), "another job's key");
        assert!(!parsed.signed_with("not base64 !"));
    }

    #[test]
    fn changing_what_a_token_claims_breaks_its_signature() {
        let key = new_key();
        let token = issue(&claims(3), &key).unwrap();
        let mac = token.rsplit('.').next().unwrap();
        // The same signature over a payload that claims the next attempt: what a worker of attempt 3 would try.
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(4)).unwrap());
        let forged = parse(&format!("bgj1.{forged_payload}.{mac}")).unwrap();
        assert_eq!(forged.claims.attempt, 4);
        assert!(!forged.signed_with(&key));
    }

    #[test]
    fn a_cached_job_vouches_only_for_tokens_signed_with_its_key_under_its_uid() {
        let key = new_key();
        let token = parse(&issue(&claims(3), &key).unwrap()).unwrap();
        let cached = |uid: &str, key: Option<&str>| {
            let mut job: BackgroundJob = serde_json::from_value(
                serde_json::json!({"metadata": {"name": "report", "namespace": "ns", "uid": uid},
                    "spec": {"jobName": "noop"}}),
            )
            .unwrap();
            job.status = Some(Box::new(crate::api::BackgroundJobStatus {
                report_key: key.map(str::to_string),
                ..Default::default()
            }));
            job
        };
        assert!(token.vouched_by(Some(&cached("uid-1", Some(&key)))));
        assert!(!token.vouched_by(None), "not cached (yet)");
        assert!(!token.vouched_by(Some(&cached("uid-1", None))), "no key cached (finished, or not claimed yet)");
        assert!(!token.vouched_by(Some(&cached("uid-1", Some(&new_key())))), "signed with another key");
        assert!(!token.vouched_by(Some(&cached("uid-2", Some(&key)))), "another job under the name");
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        assert!(parse("").unwrap_err().contains("malformed token"));
        assert!(parse("bgj1.a.b.c").unwrap_err().contains("malformed token"));
        assert!(parse("bgj2.e30.AA").unwrap_err().contains("malformed token"));
        assert!(parse("bgj1.!!!.AA").unwrap_err().contains("payload"));
        assert!(parse(&"x".repeat(5000)).unwrap_err().contains("no bgjobs token is longer"));
    }

    #[test]
    fn keys_are_random_and_long() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
    }
}
