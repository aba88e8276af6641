//! The replica's view of the queue: watch-fed caches of BackgroundJobs, of bgjobs' claim Leases, and (with a
//! cluster-wide cap) of the slot Leases, plus the list of what changed since the dispatcher last looked.
//!
//! All caches are kube-runtime reflectors. Every change is noted in [`Changes`] and wakes the dispatcher through a
//! [`Notify`]; the dispatcher then looks at the changed jobs only (see `dispatch::backlog`). Caches may lag the
//! replica's own writes, which the dispatcher accounts for.
//!
//! Cached jobs are slimmed ([`slim`]): only what dispatch decides on is kept, so a waiting job costs a replica a
//! small, fixed amount of memory whatever its arguments or Pod template. The claim's status write answers with the
//! whole object, and the attempt runs from that answer.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::api::{BackgroundJob, RecurringBackgroundJob};
use crate::keys::KEY_LABEL;
use crate::lease::{JOB_UID_ANNOTATION, MANAGED_BY, MANAGED_BY_LABEL};
use crate::limits::SLOT_LABEL;
use crate::members::MEMBER_LABEL;

/// What changed in the caches since the dispatcher last took the list.
#[derive(Debug, Default)]
pub struct Changes {
    /// Jobs touched: where the cache keeps them, and the UID the event carried.
    pub jobs: Vec<(ObjectRef<BackgroundJob>, String)>,
    /// Jobs named (by UID) by a claim or slot Lease that was touched.
    pub named_by_leases: HashSet<String>,
    /// Concurrency-key Leases touched (namespace, name).
    pub key_leases: HashSet<(String, String)>,
    /// A watch of jobs or Leases listed everything again: every job must be looked at.
    pub relisted: bool,
}

impl Changes {
    /// Take everything noted so far.
    pub fn take(shared: &Mutex<Changes>) -> Changes {
        std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Watch-fed caches.
#[derive(Clone)]
pub struct QueueView {
    /// Every BackgroundJob in scope, slimmed.
    pub jobs: Store<BackgroundJob>,
    /// Every claim Lease bgjobs made in scope.
    pub leases: Store<Lease>,
    /// The cluster-wide slot Leases, when a cap is configured.
    pub slots: Option<Store<Lease>>,
    /// Member Leases of the live replicas (see [`crate::members`]).
    pub members: Store<Lease>,
    /// RecurringBackgroundJob definitions.
    pub definitions: Store<RecurringBackgroundJob>,
    /// What changed since the dispatcher last looked.
    pub changes: Arc<Mutex<Changes>>,
    /// Notified on every change of the caches the dispatcher reads.
    pub changed: Arc<Notify>,
    /// Notified on every change of the caches the recurring controller reads.
    pub recurring_changed: Arc<Notify>,
    /// The definitions' jobs, by definition, fed by the job watch.
    pub children: Arc<crate::recurring::Children>,
}

impl QueueView {
    /// Start watching: jobs, claim Leases and definitions in all namespaces (or `namespace`); member Leases and,
    /// with `slots`, the cluster slot Leases in `lease_namespace`. The watches run until the process ends,
    /// retrying with backoff on errors.
    pub fn start(client: Client, namespace: Option<&str>, lease_namespace: &str, slots: bool) -> QueueView {
        let changed = Arc::new(Notify::new());
        let recurring_changed = Arc::new(Notify::new());
        let changes = Arc::new(Mutex::new(Changes::default()));
        let managed = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");

        let (noted, dispatch) = (changes.clone(), changed.clone());
        // Jobs are listed from the apiserver's watch cache and slimmed as the list arrives (`list_watch`).
        // The recurring controller's index of its definitions' jobs (`recurring::Children`) is fed by this one watch
        // too, and only its definitions' jobs wake it. (It once had a label-selected watch of its own: a second list
        // of every job, which on a busy apiserver with 100,000 jobs timed out a minute at a time, for as long as
        // the backlog lasted, each try scanning every job again.)
        let children = crate::recurring::Children::new();
        let index = children.clone();
        let jobs = reflect(
            crate::list_watch::list_watch(scoped::<BackgroundJob>(&client, namespace), None, slim),
            "BackgroundJob",
            move |event| {
                note(&noted, event, |c, job: &BackgroundJob| {
                    c.jobs.push((ObjectRef::from_obj(job), job.uid().unwrap_or_default()));
                });
                dispatch.notify_one();
                index.apply(event);
            },
        );
        let lease_note = |noted: Arc<Mutex<Changes>>, notify: Vec<Arc<Notify>>| {
            move |event: &watcher::Event<Lease>| {
                note(&noted, event, |c, lease: &Lease| {
                    if lease.labels().contains_key(KEY_LABEL) {
                        c.key_leases.insert((lease.namespace().unwrap_or_default(), lease.name_any()));
                    } else if let Some(uid) = crate::lease::annotation(lease, JOB_UID_ANNOTATION) {
                        c.named_by_leases.insert(uid.to_string());
                    }
                });
                notify.iter().for_each(|n| n.notify_one());
            }
        };
        let leases = reflect(
            leases_with(scoped::<Lease>(&client, namespace), &managed),
            "Lease",
            lease_note(changes.clone(), vec![changed.clone()]),
        );
        let in_lease_ns = || Api::<Lease>::namespaced(client.clone(), lease_namespace);
        let slots = slots.then(|| {
            reflect(
                leases_with(in_lease_ns(), SLOT_LABEL),
                "slot Lease",
                lease_note(changes.clone(), vec![changed.clone()]),
            )
        });
        let both = [changed.clone(), recurring_changed.clone()];
        let members = reflect(leases_with(in_lease_ns(), MEMBER_LABEL), "member Lease", move |_| {
            both.iter().for_each(|n| n.notify_one())
        });
        let recurring = recurring_changed.clone();
        // Definitions too come through `list_watch`: one the operator cannot read is kept as its stand-in (reported
        // invalid) instead of failing every list of them.
        let definitions = reflect(
            crate::list_watch::list_watch(scoped::<RecurringBackgroundJob>(&client, namespace), None, slim_definition),
            "RecurringBackgroundJob",
            move |_| recurring.notify_one(),
        );
        QueueView { jobs, leases, slots, members, definitions, changes, changed, recurring_changed, children }
    }

    /// Wait until every cache holds a full initial list.
    pub async fn ready(&self) {
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.leases.wait_until_ready().await;
        let _ = self.members.wait_until_ready().await;
        let _ = self.definitions.wait_until_ready().await;
        if let Some(slots) = &self.slots {
            let _ = slots.wait_until_ready().await;
        }
    }
}

/// Note one watch event in `shared`: objects through `each`; a finished (re-)list as `relisted`.
fn note<K>(shared: &Mutex<Changes>, event: &watcher::Event<K>, mut each: impl FnMut(&mut Changes, &K)) {
    let mut changes = shared.lock().unwrap_or_else(|e| e.into_inner());
    match event {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => each(&mut changes, o),
        // A re-list replaces the cache when it is done, dropping objects deleted meanwhile without a Delete event.
        watcher::Event::InitDone => changes.relisted = true,
        watcher::Event::Init | watcher::Event::InitApply(_) => {}
    }
}

/// The labels a cached job keeps: those read from the cache (a bulk call's, a schedule's).
const KEPT_LABELS: [&str; 2] = [crate::jobs::BATCH_LABEL, crate::recurring::RECURRING_LABEL];
/// The annotations a cached job keeps: those read from the cache (a bulk call's index, a schedule's tick), and the
/// marks of a job the operator cannot read.
const KEPT_ANNOTATIONS: [&str; 4] = [
    crate::jobs::BATCH_INDEX_ANNOTATION,
    crate::recurring::SCHEDULED_TIME_ANNOTATION,
    crate::unreadable::MARKS[0],
    crate::unreadable::MARKS[1],
];

/// Drop from a cached job what dispatch never reads: managed fields, every label and annotation but the few it reads
/// ([`KEPT_LABELS`], [`KEPT_ANNOTATIONS`]; a tenant may write hundreds of thousands of small ones within an object's
/// 1.5 MB, each a map entry of its own in memory), the arguments and an HTTP job's headers, a finished job's result,
/// error, conditions and claim record, and the Pod template (whose presence is kept: it decides how an orphaned
/// attempt is handled). An attempt runs from the job as its claim's write returns it, whole.
pub fn slim(job: &mut BackgroundJob) {
    job.metadata.managed_fields = None;
    // Of its owners, only a schedule's is read (`recurring::definition_of`); finalizers are not read at all.
    let schedule = crate::recurring::definition_of(job).cloned();
    job.metadata.owner_references = schedule.map(|o| vec![o]);
    job.metadata.finalizers = None;
    if let Some(labels) = job.metadata.labels.as_mut() {
        labels.retain(|k, _| KEPT_LABELS.contains(&k.as_str()));
    }
    if let Some(annotations) = job.metadata.annotations.as_mut() {
        annotations.retain(|k, _| KEPT_ANNOTATIONS.contains(&k.as_str()));
    }
    job.spec.args = None;
    if let Some(http) = job.spec.http.as_mut() {
        http.headers = Default::default();
    }
    // A finished job is read only for its retention and its recurring history (phase, times, labels), and never
    // written from the cache: its result (up to 32 KiB), error, conditions and claim record go. An unfinished
    // job's status is kept whole, because status writes made from the cache (a claim, a settle) write it back.
    if job.phase().is_final()
        && let Some(s) = job.status.as_mut()
    {
        s.result = None;
        s.last_error = None;
        s.conditions = Vec::new();
        s.worker = None;
        s.lease = None;
        s.report_key = None;
    }
    if job.spec.template.is_some() {
        job.spec.template = Some(Default::default());
    }
}

/// Drop from a cached definition what its scheduling never reads: managed fields, its labels, annotations (but the
/// unreadable marks), owners and finalizers, and its job template's metadata (what `recurring::template_problem`
/// finds in it is kept, as an in-memory mark), arguments and Pod template (whose presence is kept). A job is made
/// only from the definition as read from the apiserver (`recurring`), never from this copy. Arguments decoded take
/// many times their text (a number in an array, 32 bytes), and a definition may hold 1.5 MB of them, or of small
/// labels.
pub fn slim_definition(def: &mut RecurringBackgroundJob) {
    def.metadata.managed_fields = None;
    // At most as long as the condition that reports it (a bad label value may be long).
    let problem = crate::recurring::template_problem(def)
        .map(|p| p.chars().take(crate::status::MAX_CONDITION_MESSAGE).collect::<String>());
    def.metadata.labels = None;
    if let Some(annotations) = def.metadata.annotations.as_mut() {
        annotations.retain(|k, _| crate::unreadable::MARKS.contains(&k.as_str()));
    }
    if let Some(problem) = problem {
        let annotations = def.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(crate::unreadable::TEMPLATE_PROBLEM_ANNOTATION.to_string(), problem);
    }
    def.metadata.owner_references = None;
    def.metadata.finalizers = None;
    def.spec.job_template.metadata = Default::default();
    let spec = &mut def.spec.job_template.spec;
    spec.args = None;
    if spec.template.is_some() {
        spec.template = Some(Default::default());
    }
    if let Some(http) = spec.http.as_mut() {
        http.headers = Default::default();
    }
}

/// `api`'s Leases with `labels`, watched as the jobs are ([`crate::list_watch`]): a watch that ends as soon as it was
/// opened is opened again after a pause, not in a loop (kube's `watcher`, which these caches used, asks again at once,
/// and yields nothing while it does). The first list is read from etcd, as kube's was: decisions such as the
/// exclusive leader's "does anything run elsewhere" read a job's claim from this cache beside the job cache, and
/// must not find both behind.
fn leases_with(
    api: Api<Lease>,
    labels: &str,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<Lease>>> + Send + use<> {
    crate::list_watch::list_watch_latest(api, Some(labels.to_string()))
}

pub fn scoped<K: Resource<Scope = k8s_openapi::NamespaceResourceScope>>(
    client: &Client,
    namespace: Option<&str>,
) -> Api<K>
where
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector over `events` (a [`crate::list_watch`] stream): each event, once cached, goes to `on_event`.
fn reflect<K>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    what: &'static str,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    tokio::spawn(async move {
        let stream = events.default_backoff().reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => on_event(&event),
                Err(e) => tracing::warn!(error = %e, "{what} watch error; retrying"),
            }
        }
    });
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slimmed_job_keeps_what_dispatch_reads_and_drops_the_rest() {
        let mut job: BackgroundJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgjobs.dev/v1", "kind": "BackgroundJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": {"jobName": "send", "args": {"body": "x".repeat(10_000)}, "priority": "High",
                "concurrencyKey": "k", "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}
        }))
        .unwrap();
        let before = job.clone();
        slim(&mut job);
        assert!(job.metadata.managed_fields.is_none());
        assert!(job.annotations().is_empty(), "only the annotations dispatch reads stay: {:?}", job.annotations());
        assert!(job.spec.args.is_none());
        assert!(job.spec.template.is_some(), "a Pod job stays a Pod job");
        assert!(serde_json::to_string(&job).unwrap().len() < 1_000);
        assert_eq!(crate::ordering::QueueKey::of(&job), crate::ordering::QueueKey::of(&before));
        assert_eq!(
            (job.spec.concurrency_key.clone(), job.uid(), job.resource_version()),
            (before.spec.concurrency_key.clone(), before.uid(), before.resource_version())
        );
    }

    /// What a tenant writes beyond what dispatch reads costs no memory in the cache: labels, annotations and HTTP
    /// headers by the thousand (within an object's 1.5 MB, each a map entry of its own once decoded), a
    /// definition's job arguments (a number in an array decodes to 32 bytes) and Pod template.
    #[test]
    fn a_slimmed_job_or_definition_keeps_nothing_a_tenant_can_make_large() {
        let many: serde_json::Map<String, serde_json::Value> =
            (0..1000).map(|i| (format!("a{i}"), "".into())).collect();
        let mut labels = many.clone();
        labels.insert("bgjobs.dev/recurring".into(), "d".into());
        labels.insert("bgjobs.dev/batch".into(), "b".into());
        let mut annotations = many.clone();
        annotations.insert("bgjobs.dev/scheduled-time".into(), "2026-12-01T00:00:00Z".into());
        annotations.insert("bgjobs.dev/batch-index".into(), "3".into());
        let owner = |kind: &str, i: usize| serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": kind, "name": format!("o{i}"), "uid": format!("u{i}")});
        let mut owners: Vec<_> = (0..1000).map(|i| owner("BackgroundJob", i)).collect();
        owners.push(owner("RecurringBackgroundJob", 1000));
        let finalizers: Vec<_> = (0..1000).map(|i| format!("example.com/f{i}")).collect();
        let mut job: BackgroundJob = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "j", "labels": labels, "annotations": annotations, "ownerReferences": owners,
                         "finalizers": finalizers},
            "spec": {"jobName": "send", "http": {"url": "http://127.0.0.1:1/x", "headers": many}}
        }))
        .unwrap();
        slim(&mut job);
        let owners: Vec<_> = job.owner_references().iter().map(|o| o.name.as_str()).collect();
        assert_eq!(owners, ["o1000"], "the schedule's, which `recurring` reads");
        assert!(job.finalizers().is_empty());
        let kept = |m: &std::collections::BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(kept(job.labels()), ["bgjobs.dev/batch", "bgjobs.dev/recurring"]);
        assert_eq!(kept(job.annotations()), ["bgjobs.dev/batch-index", "bgjobs.dev/scheduled-time"]);
        let http = job.spec.http.as_ref().unwrap();
        assert!(http.headers.is_empty() && http.url == "http://127.0.0.1:1/x");

        let args: Vec<u8> = vec![0; 10_000];
        let mut def: RecurringBackgroundJob = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
            "spec": {"schedule": "* * * * *", "jobTemplate": {"metadata": {"labels": {"team": "a"}},
                "spec": {"jobName": "send", "args": {"a": args},
                         "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}}
        }))
        .unwrap();
        def.metadata.labels = Some(many.iter().map(|(k, _)| (k.clone(), String::new())).collect());
        slim_definition(&mut def);
        let spec = &def.spec.job_template.spec;
        assert!(spec.args.is_none() && spec.template == Some(Default::default()), "a Pod template, as nothing");
        assert!(def.annotations().is_empty() && def.labels().is_empty());
        assert!(def.spec.job_template.metadata.labels.is_empty());
        assert!(serde_json::to_string(&def).unwrap().len() < 1_000);
        // What `recurring` finds wrong in the template's metadata is kept, not the metadata.
        let mut bad = def.clone();
        bad.spec.job_template.metadata.labels = many.keys().map(|k| (k.clone(), "not a label value!".into())).collect();
        let found = crate::recurring::template_problem(&bad).expect("a label value Kubernetes refuses");
        slim_definition(&mut bad);
        assert_eq!(crate::recurring::template_problem(&bad), Some(found));
        assert!(serde_json::to_string(&bad).unwrap().len() < 1_000);
        // The mark is no longer than the condition that reports it.
        let mut long = def.clone();
        long.spec.job_template.metadata.labels = [("a".to_string(), "!".repeat(100_000))].into();
        slim_definition(&mut long);
        assert!(serde_json::to_string(&long).unwrap().len() < 2_000);
    }

    #[test]
    fn a_slimmed_finished_job_keeps_what_retention_and_history_read_and_nothing_else_of_its_status() {
        let mut job: BackgroundJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "bgjobs.dev/v1", "kind": "BackgroundJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "labels": {"bgjobs.dev/recurring": "d"}},
            "spec": {"jobName": "send"},
            "status": {"phase": "Failed", "attempts": 3, "completionTime": "2026-12-01T00:00:00Z",
                "startTime": "2026-11-30T23:59:00Z", "lastError": "boom", "worker": "w", "lease": "bgj-j",
                "reportKey": "secret", "result": {"x": 1},
                "conditions": [{"type": "Finished", "status": "True", "reason": "Failed", "message": "m",
                    "lastTransitionTime": "2026-12-01T00:00:00Z"}]}
        }))
        .unwrap();
        let before = job.clone();
        slim(&mut job);
        let (s, b) = (job.status.as_ref().unwrap(), before.status.as_ref().unwrap());
        assert_eq!(
            (s.phase, s.attempts, &s.completion_time, &s.start_time),
            (b.phase, b.attempts, &b.completion_time, &b.start_time)
        );
        assert_eq!(job.labels(), before.labels());
        assert!(s.conditions.is_empty() && s.last_error.is_none() && s.worker.is_none() && s.lease.is_none());
        assert!(s.report_key.is_none() && s.result.is_none());
    }

    /// The Lease caches are listed (first from etcd) and watched by their labels, and a Lease watch that ends as soon
    /// as it was opened (something in between ends every watch) is opened again only after a pause. kube's `watcher`,
    /// which these caches used, asked again at once, in a loop that yielded nothing. The stream is read for 2.5 s in a
    /// task of its own: three watches with the pause (two on a slow machine), thousands without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_caches_watch_by_label_and_a_watch_that_ends_at_once_is_opened_again_only_after_a_pause() {
        let lease = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "slot-0", "namespace": "ns", "resourceVersion": "7", "labels": {SLOT_LABEL: "0"}}});
        let list = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
            "metadata": {"resourceVersion": "10"}, "items": [lease]});
        let (api, asked) = crate::testing::scripted_watch_apiserver::<Lease>(vec![list], vec![]);
        let items = Arc::new(Mutex::new(Vec::new()));
        let seen = items.clone();
        let reader = tokio::spawn(async move {
            let mut stream = leases_with(api, SLOT_LABEL).boxed();
            while let Some(item) = stream.next().await {
                seen.lock().unwrap().push(match item {
                    Ok(watcher::Event::InitApply(l)) => format!("init-apply {}", l.name_any()),
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("error {e}"),
                });
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
        reader.abort();
        let asked: Vec<String> = asked.lock().unwrap().iter().map(|(_, uri)| uri.clone()).collect();
        let query = |uri: &String| uri.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default();
        assert_eq!(query(&asked[0]), "labelSelector=bgjobs.dev%2Fslot", "the first list is the latest, from etcd");
        let watches = asked.iter().filter(|uri| uri.contains("watch=true")).count();
        assert!(
            (2..=4).contains(&watches),
            "{watches} watches in 2.5 s; the first: {:?}",
            &asked[..asked.len().min(4)]
        );
        let selector = "labelSelector=bgjobs.dev%2Fslot";
        assert!(asked.iter().all(|uri| uri.contains(selector)), "{asked:?}");
        assert_eq!(*items.lock().unwrap(), ["Init", "init-apply slot-0", "InitDone"]);
    }

    /// Every cached job costs a replica this much inline, whatever it holds: the Pod template (1.7 KB inline) is
    /// boxed so that jobs without one do not pay for it.
    #[test]
    fn a_cached_job_is_small_inline() {
        let inline = std::mem::size_of::<BackgroundJob>();
        assert!(inline <= 1024, "a BackgroundJob takes {inline} bytes inline");
    }
}
