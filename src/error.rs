//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong in bgjobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),

    /// The kubeconfig or in-cluster configuration could not be loaded.
    #[error(
        "cannot load Kubernetes client configuration: {0}. Set KUBECONFIG (for the local control plane: \
             eval $(e2e/cluster.sh env))"
    )]
    Config(String),

    /// The BackgroundJob CRD is not installed in the cluster.
    #[error(
        "the BackgroundJob CRD is not installed: run `bgjobs crd | kubectl apply -f -` (or install the Helm chart)"
    )]
    CrdMissing,

    /// The installed CRDs lack fields this version writes (the apiserver would prune them): which, per CRD.
    #[error(
        "the installed CRDs are older than this operator: {0}. Apply this release's CRDs first (Helm does not upgrade \
         them): `bgjobs crd | kubectl apply --server-side --force-conflicts -f -`"
    )]
    CrdOutdated(String),

    /// A value given by the user (flag, argument, manifest) is invalid.
    #[error("invalid input: {0}")]
    Invalid(String),

    /// A (de)serialization failed.
    #[error("serialization error: {0}")]
    Serde(#[from] serde_json::Error),

    /// A call made while holding a lease did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),

    /// This replica's claim on what it was about to act for has lapsed (it was paused or cut off): it stops.
    #[error("stale: {0}")]
    Stale(String),

    /// The namespace's ResourceQuota (`count/backgroundjobs.bgjobs.dev`) refuses another job: backpressure.
    #[error(
        "the namespace's ResourceQuota refuses more BackgroundJobs ({0}); wait until finished jobs are deleted \
         (the operator's --retention), or raise the quota"
    )]
    QuotaExceeded(String),

    /// A bulk enqueue stopped part-way (see [`crate::jobs::enqueue_batch`]).
    #[error(
        "{source}\n{created} of {total} jobs of batch {batch:?} were created; the same command with --batch {batch} \
         creates those that do not exist (and again those finished and deleted by retention since: a bulk call's \
         jobs are kept at least 186 s after their creation)"
    )]
    Bulk {
        /// Jobs created (confirmed) before the call stopped.
        created: usize,
        /// Jobs asked for.
        total: usize,
        /// The batch id: repeat the call with it to create the rest.
        batch: String,
        /// Why it stopped (the first error).
        source: Box<Error>,
    },

    /// The report endpoint refused a report (its HTTP status and why), or could not be reached.
    #[error("report not recorded: {0}")]
    Report(String),

    /// An I/O error (metrics server, child processes).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Config(_) => "config",
            Error::CrdMissing => "crd_missing",
            Error::CrdOutdated(_) => "crd_outdated",
            Error::Invalid(_) => "invalid",
            Error::Serde(_) => "serde",
            Error::Timeout(_) => "timeout",
            Error::Stale(_) => "stale",
            Error::QuotaExceeded(_) => "quota_exceeded",
            Error::Bulk { .. } => "bulk",
            Error::Report(_) => "report",
            Error::Io(_) => "io",
        }
    }

    /// True for an HTTP 409 Conflict: someone else moved the object (a lost race, not a fault).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(e) if api_code(e) == Some(409))
    }

    /// True when the apiserver refused a write because the object would be larger than etcd stores.
    pub fn is_too_large_for_etcd(&self) -> bool {
        matches!(self, Error::Kube(e) if crate::status::too_large_for_etcd(e))
    }

    /// True when the apiserver said the object does not exist ([`gone`]).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Kube(e) if gone(e))
    }
}

/// Whether the apiserver said the object asked for does not exist: a 404 with its `Status` (reason `NotFound`). A
/// 404 without one, a bare `404 page not found`, says nothing of the object: it is what a 1.20 apiserver that has
/// just started answers for a custom resource whose definition it has not loaded yet (or a proxy on the way for a
/// path it does not know), and reading it as "gone" would drop an outcome or take a running job for absent.
pub fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound")
}

/// A 404 that is not [`gone`]: the path is not served (yet). It may be served when asked again.
fn not_served(e: &kube::Error) -> bool {
    api_code(e) == Some(404) && !gone(e)
}

/// Whether the apiserver turned a write down before storing anything (authentication, authorization, validation,
/// admission, size, a rate limit, the object gone), so it certainly did not land. A timeout, a 5xx or a broken
/// connection may follow a write that landed.
pub fn refused(e: &Error) -> bool {
    let turned_down = matches!(e, Error::Kube(kube::Error::Api(s))
        if matches!(s.code, 400 | 401 | 403 | 404 | 413 | 415 | 422 | 429));
    // etcd's own size refusal comes as a 500 from older apiservers: etcd stored nothing.
    turned_down || e.is_too_large_for_etcd()
}

/// A [`refused`] write that will be refused again until something changes (a full quota, RBAC, a policy webhook, a
/// rate limit, the object gone): not the bare 404 of a path a restarting apiserver does not serve yet
/// ([`not_served`]), which may be served a moment later.
pub fn lasting_refusal(e: &Error) -> bool {
    refused(e) && !matches!(e, Error::Kube(e) if not_served(e))
}

/// A [`lasting_refusal`] that waits on a person or a policy (RBAC, a full quota, an admission policy, a namespace
/// being deleted), not on load: a `429` of API Priority and Fairness passes as the load does.
pub fn refused_by_policy(e: &Error) -> bool {
    lasting_refusal(e) && !matches!(e, Error::Kube(e) if api_code(e) == Some(429))
}

/// A Kubernetes API error, told apart when it is a ResourceQuota refusing a create (403 "exceeded quota").
pub fn from_create(e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(status) if exceeded_quota(&e) => Error::QuotaExceeded(status.message.clone()),
        _ => Error::Kube(e),
    }
}

/// Whether a create was refused because a ResourceQuota is full: a `403` saying "exceeded quota" (room may come
/// once other objects go), not one whose quota requires what the object lacks ("failed quota").
pub fn exceeded_quota(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 403 && status.message.contains("exceeded quota"))
}

/// Whether a failed call may succeed when made again: no answer (connection, timeout), throttling (429), a
/// server-side failure (5xx, but not etcd's size refusal) or a path not served yet ([`not_served`]).
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::Timeout(_) => true,
        Error::Kube(e) => is_transient_answer(e),
        _ => false,
    }
}

/// [`is_transient`] for a call's own error.
pub fn is_transient_answer(e: &kube::Error) -> bool {
    match e {
        _ if not_served(e) => true,
        kube::Error::Api(status) => {
            matches!(status.code, 429 | 500 | 502 | 503 | 504) && !crate::status::too_large_for_etcd(e)
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// The HTTP status of an API error answer, if the error is one.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// `Result` with the crate's error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status { code, ..Default::default() })))
    }

    /// A restarting 1.20 apiserver answers a bare `404 page not found` for a custom resource it does not serve yet:
    /// that says nothing of the object, and may be served when asked again.
    #[test]
    fn only_a_404_whose_status_says_not_found_means_the_object_is_gone() {
        let object_gone = kube::core::Status::failure("backgroundjobs.bgjobs.dev \"j\" not found", "NotFound");
        let object_gone = kube::Error::Api(object_gone.with_code(404).boxed());
        // What the client makes of a body that is not a `Status`.
        let not_served = kube::core::Status::failure("404 page not found", "Failed to parse error data");
        let not_served = kube::Error::Api(not_served.with_code(404).boxed());
        assert!(gone(&object_gone) && !is_transient_answer(&object_gone));
        assert!(!gone(&not_served) && is_transient_answer(&not_served));
        assert!(Error::Kube(object_gone).is_not_found() && !Error::Kube(not_served).is_not_found());
        let too_large = kube::core::Status::failure("etcdserver: request is too large", "").with_code(500);
        assert!(!is_transient_answer(&kube::Error::Api(too_large.boxed())), "sent again, it is as large");
        assert!(is_transient_answer(&kube::Error::Api(kube::core::Status::failure("", "").with_code(503).boxed())));
    }

    #[test]
    fn a_policy_refusal_is_a_lasting_one_that_is_not_a_rate_limit() {
        for code in [401, 403, 422] {
            assert!(refused_by_policy(&api(code)), "{code}");
        }
        assert!(lasting_refusal(&api(429)) && !refused_by_policy(&api(429)), "a 429 passes with the load");
        assert!(!refused_by_policy(&api(503)) && !refused_by_policy(&api(409)));
    }

    #[test]
    fn only_an_answer_that_turned_the_write_down_counts_as_refused() {
        for code in [400, 401, 403, 404, 422, 429] {
            assert!(refused(&api(code)), "{code}");
        }
        for code in [409, 500, 503, 504] {
            assert!(!refused(&api(code)), "{code}: perhaps it landed (a 409 is a lost race, told apart elsewhere)");
        }
        assert!(!refused(&Error::Timeout(std::time::Duration::from_secs(1))), "no answer: perhaps it landed");
    }
}
