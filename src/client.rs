//! Connecting to the cluster, with kubectl's kubeconfig resolution (`KUBECONFIG`, `~/.kube/config`, in-cluster).

use http::header::{HeaderValue, USER_AGENT};
use kube::Client;

use crate::error::{Error, Result};

/// A client for the current kubeconfig context (or the in-cluster ServiceAccount).
///
/// kube's built-in retry of 429/503/504 answers is off: a write whose answer was a 504 may have landed, and a blind
/// resend then meets a 409 that looks like a lost race. bgjobs decides itself what a failed write means (it reads
/// back Leases, re-reads jobs, and retries on its next pass).
///
/// Every request names bgjobs ([`USER_AGENT_VALUE`]): the apiserver takes a write's field manager from it, so the
/// fields bgjobs owns read `manager: bgjobs` in `managedFields` (not `unknown`), and audit logs and the apiserver's
/// per-client metrics say who wrote.
pub async fn connect() -> Result<Client> {
    let mut config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    config.default_retry = false;
    config.headers.push((USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE)));
    Client::try_from(config).map_err(|e| Error::Config(e.to_string()))
}

/// The `User-Agent` of bgjobs' requests. The apiserver makes the part before the `/` the field manager of a write
/// that names none.
pub const USER_AGENT_VALUE: &str = concat!("bgjobs/", env!("CARGO_PKG_VERSION"));

/// How long after it was sent a create may still be handled, and its object made: the apiserver's default request
/// timeout. A create whose answer never came (a lost connection, a replica that died) may land until then, also
/// after the object it would make was deleted; so a read decides that a create did not land only this long after it
/// was sent, and an object a lost create could bring back is deleted only once that is over.
pub const CREATE_LANDS_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How long after an object was created, by its `creationTimestamp` as this replica reads the cluster's clock, a
/// create of its name sent no later than its creation may still land: [`CREATE_LANDS_WITHIN`], plus a second
/// (`creationTimestamp` is in whole seconds: the object may have been created up to a second after it says), plus
/// half of [`crate::clock::REPLICAS_AGREE_WITHIN`] (how far this replica's reading of the clock may run ahead; a
/// whole one, rounded up, is kept).
pub const LATE_CREATES_KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(
    CREATE_LANDS_WITHIN.as_secs() + 1 + crate::clock::REPLICAS_AGREE_WITHIN.as_secs() + 1,
);

/// Read `name`: `None` when it is gone ([`crate::error::gone`]: a `NotFound` status; the bare 404 an apiserver that
/// has just started gives for resources it does not serve yet is an error). kube's own `Api::get_opt` reads the same
/// (by the `Status` reason); every read of bgjobs that acts on an object's absence goes through here (or
/// [`crate::unreadable::get_opt`] for its own kinds), so that the rule has one home.
pub async fn get_opt<K>(api: &kube::Api<K>, name: &str) -> kube::Result<Option<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(k) => Ok(Some(k)),
        Err(e) if crate::error::gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Run `call`, giving up after `limit`: for calls whose answer may never come (a hung connection) and that must
/// not hold up what waits for them.
pub async fn bounded<T>(limit: std::time::Duration, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or(Err(Error::Timeout(limit)))
}

/// Pauses between tries of a request that may succeed when sent again: from `first`, doubling up to `most`.
pub struct Backoff {
    next: std::time::Duration,
    most: std::time::Duration,
}

impl Backoff {
    pub fn new(first: std::time::Duration, most: std::time::Duration) -> Self {
        Backoff { next: first, most }
    }

    /// The pause that comes next, without waiting it out.
    pub fn next(&self) -> std::time::Duration {
        self.next
    }

    /// Wait out the next pause; the one after is twice as long, up to the most.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.most);
    }
}

/// How long a replica that starts beside a restarting apiserver keeps asking its start-up questions (is the CRD
/// installed and current, are the cluster slots made) before it gives up and exits (its Deployment starts it again,
/// after a growing back-off): an apiserver restart, with its custom resources served only once their CRDs are loaded
/// again, takes seconds to tens of seconds.
pub const START_UP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// The longest one question of [`at_start_up`] (and of the Pod executor's creator check) may take.
pub const START_UP_ASK_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Ask `ask` until it succeeds, fails in a way asking again would not change, or [`START_UP_PATIENCE`] has passed
/// ([`ask_until`]).
pub async fn at_start_up<T, F>(what: &str, ask: impl FnMut() -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    ask_until(what, tokio::time::Instant::now() + START_UP_PATIENCE, START_UP_ASK_LIMIT, ask).await
}

/// Ask `ask` until it succeeds, fails in a way asking again would not change, or `until` passes: a failure that may
/// pass ([`crate::error::is_transient`]: no answer, a 5xx, a 429, a path not served yet, as while the apiserver
/// restarts) is asked again after 1, 2, 4, then every 5 s, with a warning saying `what` was asked. Each try is bounded
/// by `each` (the client sets no read timeout: a hung request is no answer).
pub async fn ask_until<T, F>(
    what: &str,
    until: tokio::time::Instant,
    each: std::time::Duration,
    mut ask: impl FnMut() -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let mut pause = Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(5));
    loop {
        match bounded(each, ask()).await {
            Err(e) if crate::error::is_transient(&e) && tokio::time::Instant::now() + pause.next() < until => {
                tracing::warn!(error = %e, "could not {what} (is the apiserver restarting?); asking again");
                pause.wait().await;
            }
            answer => return answer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Is it gone?" has one home, [`crate::error::gone`]: no read in the crate uses kube's `Api::get_opt` (or its
    /// metadata form), whose rule is kube's to change.
    #[test]
    fn every_read_of_an_absence_goes_through_client_get_opt() {
        fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out)
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path)
                }
            }
        }
        let mut files = Vec::new();
        sources(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        let needles = [[".get", "_opt("].concat(), ["get_metadata", "_opt("].concat()];
        let found: Vec<String> = files
            .iter()
            .flat_map(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                let hits: Vec<String> = text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| needles.iter().any(|n| l.contains(n.as_str())))
                    .map(|(n, l)| format!("{}:{}: {}", f.display(), n + 1, l.trim()))
                    .collect();
                hits
            })
            .collect();
        assert!(found.is_empty(), "use crate::client::get_opt:\n{}", found.join("\n"));
        assert!(files.len() > 20, "the sources were found");
    }

    #[tokio::test]
    async fn get_opt_reads_only_a_not_found_status_as_gone() {
        for (code, body, gone) in [
            (404, crate::testing::status(404), true),
            (404, serde_json::Value::String("404 page not found".into()), false),
            (503, crate::testing::status(503), false),
        ] {
            let (client, _) = crate::testing::scripted_client(move |_| (code, body.clone()));
            let api = kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client, "ns");
            match get_opt(&api, "l").await {
                Ok(None) => assert!(gone, "{code} read as gone"),
                Err(_) => assert!(!gone, "{code} not read as gone"),
                Ok(Some(_)) => panic!("no object was served"),
            }
        }
    }

    fn answer(code: u16) -> Error {
        Error::Kube(kube::Error::Api(kube::core::Status::failure("", "").with_code(code).boxed()))
    }

    /// A replica starting beside a restarting apiserver waits for it; a question it cannot answer stops it at once.
    #[tokio::test(start_paused = true)]
    async fn a_start_up_question_is_asked_again_while_the_answer_may_change_and_for_a_minute_at_most() {
        let asked = std::sync::atomic::AtomicU32::new(0);
        let ask = |fail_first: u32, code: u16| {
            asked.store(0, std::sync::atomic::Ordering::Relaxed);
            let asked = &asked;
            move || async move {
                let n = asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n < fail_first { Err(answer(code)) } else { Ok(n) }
            }
        };
        let t0 = tokio::time::Instant::now();
        assert_eq!(at_start_up("ask", ask(3, 503)).await.unwrap(), 3, "asked until answered");
        assert_eq!(t0.elapsed().as_secs(), 1 + 2 + 4);
        assert!(at_start_up("ask", ask(3, 403)).await.is_err(), "refused: not asked again");
        assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        let t0 = tokio::time::Instant::now();
        assert!(at_start_up("ask", ask(u32::MAX, 503)).await.is_err(), "given up on");
        assert!(
            t0.elapsed() <= START_UP_PATIENCE && t0.elapsed() >= START_UP_PATIENCE - std::time::Duration::from_secs(5)
        );
    }
}
