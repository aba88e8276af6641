//! What every attempt on a replica shares: the client, identity, executors, counters, events and the audit trail.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;

use crate::api::BackgroundJob;
use crate::events::EventLevel;
use crate::executor::Registry;
use crate::lease::LeaseTiming;
use crate::metrics::Metrics;

/// One operator replica's shared state.
pub struct Worker {
    /// Kubernetes client.
    pub client: Client,
    /// This replica's identity (Lease holder, `status.worker`).
    pub identity: String,
    /// Lease timing for claims.
    pub timing: LeaseTiming,
    /// In-process handlers.
    pub registry: Registry,
    /// The HTTP executor, with its egress policy.
    pub http: crate::executor::http::HttpExecutor,
    /// The Pod executor, with its policy.
    pub pods: crate::executor::pod::PodExecutor,
    /// Metrics (shared with the metrics server).
    pub metrics: Arc<Metrics>,
    /// Audit trail of attempt starts and ends.
    pub invocations: InvocationLog,
    /// The cluster's clock, for every scheduling decision ([`crate::clock`]).
    pub clock: crate::clock::ServerClock,
    /// The Leases this replica's attempts hold under its tenure ([`crate::lease::held`]).
    pub held: Arc<crate::lease::HeldLeases>,
    /// Where workers elsewhere report (`--report-url`); `None`: work is not handed out for reporting.
    pub report_url: Option<String>,
    recorder: Option<Recorder>,
    events: EventLevel,
    /// Events being published, waited for before the replica exits ([`Worker::finish_publishing`]).
    publishing: tokio_util::task::TaskTracker,
}

impl Worker {
    /// Assemble a replica's shared state.
    pub fn new(
        client: Client,
        identity: String,
        timing: LeaseTiming,
        registry: Registry,
        events: EventLevel,
        invocation_log: Option<&Path>,
        policy: crate::policy::Policy,
    ) -> crate::Result<Self> {
        let recorder = (events != EventLevel::Off).then(|| {
            Recorder::new(client.clone(), Reporter { controller: "bgjobs".into(), instance: Some(identity.clone()) })
        });
        Ok(Worker {
            client,
            identity,
            timing,
            registry,
            http: crate::executor::http::HttpExecutor::new(
                policy.egress,
                Arc::new(crate::executor::http::SystemLookup),
            ),
            pods: crate::executor::pod::PodExecutor::new(policy.pods),
            metrics: Arc::new(Metrics::default()),
            invocations: InvocationLog::open(invocation_log)?,
            clock: Default::default(),
            held: Default::default(),
            report_url: None,
            recorder,
            events,
            publishing: Default::default(),
        })
    }

    /// Publish a Kubernetes Event on `job` in the background, if `--events` records its reason (an Event lost to an
    /// API hiccup is only logged).
    ///
    /// The action names the attempt for a job's first attempts, and one action stands for all later ones
    /// ([`crate::events::on_attempt`]): the recorder folds Events of equal reason, action and object into one series.
    /// The object is named without its resourceVersion, which every attempt changes, so that they do fold.
    /// A job named too long for the recorder to name its Events after ([`publish_shortened`]) is not folded: each
    /// attempt keeps an Event of its own.
    pub fn event(&self, job: &BackgroundJob, type_: EventType, reason: &str, note: String) {
        let attempt = job.attempts();
        let folds = job.metadata.name.as_deref().is_some_and(recorder_names);
        let (action, note) =
            if folds { crate::events::on_attempt(attempt, note) } else { (format!("Attempt{attempt}"), note) };
        let mut reference = job.object_ref(&());
        reference.resource_version = None;
        self.publish(reference, type_, reason, action, note)
    }

    /// Publish a Kubernetes Event on any object in the background.
    pub fn event_on<K: Resource<DynamicType = ()>>(&self, object: &K, type_: EventType, reason: &str, note: String) {
        self.publish(object.object_ref(&()), type_, reason, reason.to_string(), note)
    }

    /// Wait, at most `patience`, for the Events still being published: those of a shutdown (an attempt handed back,
    /// a cancel) come last, and the runtime drops whatever is still running when the replica returns.
    pub async fn finish_publishing(&self, patience: std::time::Duration) {
        self.publishing.close();
        if tokio::time::timeout(patience, self.publishing.wait()).await.is_err() {
            tracing::warn!(left = self.publishing.len(), "gave up waiting for Events to be published");
        }
    }

    fn publish(
        &self,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        action: String,
        note: String,
    ) {
        if !crate::events::records(self.events, reason) {
            return;
        }
        let Some(recorder) = self.recorder.clone() else { return };
        self.metrics.count_event(&type_, reason);
        let ev = Event { type_, reason: reason.into(), note: Some(event_note(note)), action, secondary: None };
        let (client, identity, metrics) = (self.client.clone(), self.identity.clone(), self.metrics.clone());
        self.publishing.spawn(async move {
            let published = match &reference.name {
                Some(name) if !recorder_names(name) => publish_shortened(client, identity, &ev, &reference, name).await,
                _ => recorder.publish(&ev, &reference).await,
            };
            if let Err(e) = published {
                metrics.events_not_recorded.inc();
                tracing::warn!(error = %e, reason = ev.reason, "could not publish an Event");
            }
        });
    }
}

/// kube's recorder names an Event `<object's name>.<nanoseconds in hex>`: 17 characters more than the object's name,
/// which may have 253 already.
const EVENT_NAME_SUFFIX: usize = 17;

/// Whether kube's recorder can name the Events of an object named `name` (and so fold them into series); if not, they
/// go through [`publish_shortened`].
fn recorder_names(name: &str) -> bool {
    name.len() + EVENT_NAME_SUFFIX <= crate::names::MAX_NAME
}

/// Publish `ev` on the object `reference` names, `name`, too long for kube's recorder to name the Event after it (the
/// apiserver refused those Events): under its name shortened as every derived name is ([`crate::names`]). Not
/// folded into a series with the like of it, as the recorder's are.
async fn publish_shortened(
    client: Client,
    identity: String,
    ev: &Event,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    name: &str,
) -> kube::Result<()> {
    use k8s_openapi::api::events::v1::Event as Stored;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let now = jiff::Timestamp::now();
    let namespace = reference.namespace.clone().unwrap_or_else(|| "default".into());
    let stored = Stored {
        metadata: kube::api::ObjectMeta {
            name: Some(crate::names::with_suffix(name, &format!(".{:x}", now.as_nanosecond()), crate::names::MAX_NAME)),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        action: Some(ev.action.clone()),
        reason: Some(ev.reason.clone()),
        note: ev.note.clone(),
        event_time: Some(MicroTime(now)),
        regarding: Some(reference.clone()),
        related: ev.secondary.clone(),
        reporting_controller: Some("bgjobs".into()),
        reporting_instance: Some(identity),
        type_: Some(match ev.type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        ..Default::default()
    };
    kube::Api::<Stored>::namespaced(client, &namespace).create(&Default::default(), &stored).await.map(|_| ())
}

/// The apiserver refuses an Event whose note is longer than this many bytes (not characters).
const MAX_EVENT_NOTE_BYTES: usize = 1024;

/// `note` cut to fit an Event, at a character's boundary.
fn event_note(mut note: String) -> String {
    if note.len() > MAX_EVENT_NOTE_BYTES {
        let end = (0..=MAX_EVENT_NOTE_BYTES).rev().find(|&i| note.is_char_boundary(i)).unwrap_or(0);
        note.truncate(end);
    }
    note
}

/// JSON lines `{"event":"start"|"end","uid":..,"job":..,"attempt":..,"worker":..,"t_ms":..}`, one file per replica.
#[derive(Default)]
pub struct InvocationLog {
    file: Option<Mutex<std::fs::File>>,
}

/// Writes the `end` line when the execution it guards is over (returned, cancelled or dropped).
pub struct InvocationGuard<'a> {
    log: &'a InvocationLog,
    line: Option<Line>,
}

#[derive(Serialize, Clone)]
struct Line {
    event: &'static str,
    uid: String,
    job: String,
    attempt: i32,
    worker: String,
    t_ms: i64,
}

impl InvocationLog {
    fn open(path: Option<&Path>) -> crate::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?)),
            None => None,
        };
        Ok(InvocationLog { file })
    }

    /// Log the start of an execution; the returned guard logs its end.
    pub fn start(&self, job: &BackgroundJob, attempt: i32, worker: &str) -> InvocationGuard<'_> {
        let line = self.file.as_ref().map(|_| Line {
            event: "start",
            uid: job.uid().unwrap_or_default(),
            job: format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()),
            attempt,
            worker: worker.to_string(),
            t_ms: jiff::Timestamp::now().as_millisecond(),
        });
        if let Some(l) = &line {
            self.write(l);
        }
        InvocationGuard { log: self, line }
    }

    fn write(&self, line: &Line) {
        if let Some(f) = &self.file {
            let mut text = serde_json::to_string(line).unwrap_or_default();
            text.push('\n');
            let _ = f.lock().unwrap().write_all(text.as_bytes());
        }
    }
}

impl Drop for InvocationGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut l) = self.line.take() {
            l.event = "end";
            l.t_ms = jiff::Timestamp::now().as_millisecond();
            self.log.write(&l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The apiserver counts an Event's note in bytes: 1,000 characters of a language written outside ASCII were
    /// 2,000 bytes or more, and the Event (a Failed, a Retrying) was refused, unseen.
    #[test]
    fn an_event_note_is_cut_to_the_apiservers_limit_in_bytes_at_a_character_boundary() {
        for c in ['é', '日', '🦀'] {
            let note = event_note(c.to_string().repeat(1_000));
            assert!(note.len() <= MAX_EVENT_NOTE_BYTES, "{c}: {} bytes", note.len());
            assert!(note.len() > MAX_EVENT_NOTE_BYTES - c.len_utf8(), "{c}: cut short, {} bytes", note.len());
            assert!(note.chars().all(|n| n == c));
        }
        let ascii = "x".repeat(MAX_EVENT_NOTE_BYTES);
        assert_eq!(event_note(ascii.clone()), ascii, "a note that fits is kept whole");
    }
}
