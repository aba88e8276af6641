//! The jobs each definition made, by definition: fed by the operator's one job watch ([`crate::queue`]), so that a
//! definition's children are found without looking at every job, and a change to one job wakes only its
//! definition's reconcile (see [`super::scheduler`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::{Notify, watch};

use crate::api::{BackgroundJob, Phase};

/// What the recurring controller reads of a child job.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    /// The job's name.
    pub name: String,
    /// The job's UID (a history delete names it, so it never removes a newer job of the same name).
    pub uid: String,
    /// The job's resourceVersion (a history delete names it too, so it never removes the job changed since it was
    /// judged: re-queued by `bgjobs retry`, say).
    pub resource_version: String,
    /// The job's phase.
    pub phase: Phase,
    /// When it finished, if it did.
    pub completed: Option<Timestamp>,
    /// The tick it was made for.
    pub tick: Option<Timestamp>,
    /// When it was created (`creationTimestamp`, whole seconds).
    pub created: Option<Timestamp>,
    /// Whether it was asked to stop (`spec.cancel`, or its deletion requested).
    pub cancel: bool,
    /// Whether its deletion was asked for already: it is going, and counts as no one's history.
    pub deleting: bool,
}

impl Child {
    /// What is kept of `job`, and the UID of the definition that owns it (None: not a definition's job).
    pub fn of(job: &BackgroundJob) -> Option<(String, Child)> {
        let owner = super::definition_of(job)?.uid.clone();
        let child = Child {
            name: job.name_any(),
            uid: job.uid().unwrap_or_default(),
            resource_version: job.resource_version().unwrap_or_default(),
            phase: job.phase(),
            completed: job.status.as_ref().and_then(|s| s.completion_time.as_ref()).map(|t| t.0),
            tick: super::tick_of(job),
            created: job.creation_timestamp().map(|t| t.0),
            cancel: job.cancellation().is_some(),
            deleting: job.deletion_requested(),
        };
        Some((owner, child))
    }
}

/// Children by definition UID, then by name.
type ByOwner = HashMap<String, BTreeMap<String, Child>>;

#[derive(Default)]
struct State {
    by_owner: ByOwner,
    /// The list being built by a (re-)list, swapped in when it is complete.
    listing: Option<ByOwner>,
    /// Definitions whose children changed since [`Children::take_changed`].
    changed: HashSet<String>,
}

/// The index, shared between its watch and the controller.
pub struct Children {
    state: Mutex<State>,
    /// Notified when a definition's children changed.
    pub notify: Arc<Notify>,
    ready: watch::Sender<bool>,
}

impl Children {
    /// An empty index, fed by [`Children::apply`] with the events of the job watch (see [`crate::queue`]).
    pub fn new() -> Arc<Children> {
        Arc::new(Children { state: Mutex::default(), notify: Arc::new(Notify::new()), ready: watch::channel(false).0 })
    }

    /// Wait until the first list is in.
    pub async fn ready(&self) {
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
    }

    /// Take in one event of the job watch. Only a definition's own jobs (and a completed re-list) wake the
    /// controller: every other job of the scope passes through here too.
    pub fn apply(&self, event: &watcher::Event<BackgroundJob>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(job) => {
                let Some((owner, child)) = Child::of(job) else { return };
                s.by_owner.entry(owner.clone()).or_default().insert(child.name.clone(), child);
                s.changed.insert(owner);
            }
            watcher::Event::Delete(job) => {
                let Some((owner, child)) = Child::of(job) else { return };
                if let Some(kids) = s.by_owner.get_mut(&owner) {
                    kids.remove(&child.name);
                    if kids.is_empty() {
                        s.by_owner.remove(&owner);
                    }
                }
                s.changed.insert(owner);
            }
            watcher::Event::Init => {
                s.listing = Some(ByOwner::new());
                return;
            }
            watcher::Event::InitApply(job) => {
                if let (Some((owner, child)), Some(listing)) = (Child::of(job), s.listing.as_mut()) {
                    listing.entry(owner).or_default().insert(child.name.clone(), child);
                }
                return;
            }
            watcher::Event::InitDone => {
                let listed = s.listing.take().unwrap_or_default();
                let old = std::mem::replace(&mut s.by_owner, listed);
                // Whatever changed while the watch was down is known only now: every definition looks again.
                let owners: Vec<String> = old.into_keys().chain(s.by_owner.keys().cloned()).collect();
                s.changed.extend(owners);
                self.ready.send_replace(true);
            }
        }
        drop(s);
        self.notify.notify_one();
    }

    /// The children of the definition with UID `owner`, by name.
    pub fn of(&self, owner: &str) -> Vec<Child> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.by_owner.get(owner).map(|kids| kids.values().cloned().collect()).unwrap_or_default()
    }

    /// The definitions whose children changed since the last call.
    pub fn take_changed(&self) -> HashSet<String> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn job(name: &str, owner: &str, phase: &str) -> BackgroundJob {
        let mut j = BackgroundJob::new(name, serde_json::from_value(serde_json::json!({"jobName": "noop"})).unwrap());
        j.metadata.uid = Some(format!("uid-{name}"));
        j.metadata.owner_references = Some(vec![OwnerReference {
            kind: "RecurringBackgroundJob".into(),
            uid: owner.into(),
            ..Default::default()
        }]);
        j.status = Some(serde_json::from_value(serde_json::json!({"phase": phase})).unwrap());
        j
    }

    fn index() -> Arc<Children> {
        Children::new()
    }

    #[test]
    fn events_keep_each_definitions_children_and_name_the_definitions_that_changed() {
        let c = index();
        c.apply(&watcher::Event::Init);
        c.apply(&watcher::Event::InitApply(job("a-1", "A", "Succeeded")));
        c.apply(&watcher::Event::InitApply(job("b-1", "B", "Waiting")));
        assert!(c.of("A").is_empty(), "a list is used only once complete");
        c.apply(&watcher::Event::InitDone);
        assert_eq!(c.take_changed(), HashSet::from(["A".to_string(), "B".to_string()]));
        c.apply(&watcher::Event::Apply(job("a-2", "A", "Running")));
        assert_eq!(c.of("A").iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["a-1", "a-2"]);
        assert_eq!(c.take_changed(), HashSet::from(["A".to_string()]), "only A changed");
        c.apply(&watcher::Event::Delete(job("b-1", "B", "Waiting")));
        assert!(c.of("B").is_empty());
        assert_eq!(c.take_changed(), HashSet::from(["B".to_string()]));
        // A re-list drops what was deleted while the watch was down, and every definition looks again.
        c.apply(&watcher::Event::Init);
        c.apply(&watcher::Event::InitApply(job("a-2", "A", "Succeeded")));
        c.apply(&watcher::Event::InitDone);
        assert_eq!(c.of("A").len(), 1);
        assert_eq!(c.of("A")[0].phase, Phase::Succeeded);
        assert!(c.take_changed().contains("A"));
    }

    #[test]
    fn jobs_without_a_definition_are_ignored_and_wake_nobody() {
        use futures::FutureExt;
        let mut j = job("x", "A", "Waiting");
        j.metadata.owner_references = None;
        assert!(Child::of(&j).is_none());
        let c = index();
        c.apply(&watcher::Event::Apply(j.clone()));
        c.apply(&watcher::Event::Delete(j));
        assert!(c.take_changed().is_empty());
        assert!(c.notify.notified().now_or_never().is_none(), "the controller is not woken by other jobs");
        c.apply(&watcher::Event::Apply(job("a-1", "A", "Running")));
        assert!(c.notify.notified().now_or_never().is_some(), "a definition's job wakes it");
    }
}
