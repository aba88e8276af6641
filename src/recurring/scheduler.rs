//! Which definitions to reconcile, and when: up to `--recurring-concurrency` at once, never two of one definition.
//!
//! A scan looks at every definition this replica owns, but only compares cheap facts (its resourceVersion, whether
//! its children changed, whether its next look is due): a definition is reconciled only when one of them says so.
//! Scans are at least [`MIN_SCAN_GAP`] apart, so the events of a tick (three per definition, and each job's own)
//! cost a few scans per second, not one per event. The reconciles themselves ([`super::reconcile`]) run as tasks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Carried, RETRY, RecurringView, reconcile, starting_deadline_left};
use crate::api::RecurringBackgroundJob;
use crate::lease::{LeaseTiming, Observer};
use crate::members;
use crate::worker::Worker;

/// Scans are at least this far apart.
pub const MIN_SCAN_GAP: Duration = Duration::from_millis(50);
/// Longest a definition goes without a look, changed or not (a safety net; changes are seen at once).
const IDLE: Duration = Duration::from_secs(30);
/// How long running reconciles may finish when the controller stops.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest a definition whose cache is behind its own last reconcile waits for the watch before it is reconciled
/// anyway.
const CATCH_UP: Duration = Duration::from_secs(2);

/// What this replica remembers of a definition it owns.
struct Tracked<R> {
    /// Where the cache keeps it.
    at: R,
    /// The resourceVersions its last reconcile read or wrote, in that order: the cache showing any of them is no
    /// news, and showing one before the last is behind.
    versions: Vec<String>,
    /// When its last reconcile ended.
    done_at: Option<Instant>,
    /// When to look again if nothing changes (None: only on a change).
    next: Option<Instant>,
    /// The scan that last saw it owned here.
    seen: u64,
    /// Its last reconcile's write was refused: until then, news of its children (a running job's status writes) does
    /// not bring a look, only its own change or the end of the pause does ([`Book::refused`]).
    refused_until: Option<Instant>,
}

/// The scheduler's bookkeeping. Pure: fed what the caches show and what reconciles returned.
pub struct Book<R = ObjectRef<RecurringBackgroundJob>> {
    tracked: HashMap<String, Tracked<R>>,
    in_flight: HashSet<String>,
    queue: VecDeque<String>,
    queued: HashSet<String>,
    children_changed: HashSet<String>,
    scan: u64,
}

impl<R> Default for Book<R> {
    fn default() -> Self {
        Book {
            tracked: HashMap::new(),
            in_flight: HashSet::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            children_changed: HashSet::new(),
            scan: 0,
        }
    }
}

impl<R: Clone> Book<R> {
    /// Start a scan; `children_changed` names the definitions whose children changed since the last one.
    pub fn begin_scan(&mut self, children_changed: HashSet<String>) {
        self.scan += 1;
        self.children_changed.extend(children_changed);
    }

    /// One definition this replica owns, as cached (`version`: its resourceVersion). Queued for a reconcile if it
    /// changed since its last one, its children changed, or its next look is due. Returns when it needs a look next
    /// otherwise.
    pub fn consider(&mut self, uid: &str, at: R, version: &str, now: Instant) -> Option<Instant> {
        let tracked = self.tracked.entry(uid.to_string()).or_insert_with(|| Tracked {
            at: at.clone(),
            versions: vec![],
            done_at: None,
            next: Some(now),
            seen: 0,
            refused_until: None,
        });
        tracked.seen = self.scan;
        tracked.at = at;
        // A definition being reconciled is looked at again once its reconcile is done.
        if self.in_flight.contains(uid) || self.queued.contains(uid) {
            return None;
        }
        let changed = !tracked.versions.iter().any(|v| v == version);
        let due = tracked.next.is_some_and(|n| n <= now);
        // The cache still shows a version from before the last reconcile's own last write (the definition's watch
        // lags the job watch that brought the children's news). Decided from it, a tick already claimed looks due
        // again and its claim only meets a 409. Its write is on its way: wait for it, a while at most; the
        // children's news waits too.
        let behind = !changed && tracked.versions.last().is_some_and(|last| last != version);
        if let Some(wait_until) = tracked.done_at.map(|at| at + CATCH_UP).filter(|until| behind && !due && now < *until)
        {
            return Some(tracked.next.map_or(wait_until, |n| n.min(wait_until)));
        }
        let paused = tracked.refused_until.is_some_and(|until| now < until);
        let kids_changed = self.children_changed.remove(uid) && !paused;
        if changed || kids_changed || due {
            self.queue.push_back(uid.to_string());
            self.queued.insert(uid.to_string());
            return None;
        }
        tracked.next
    }

    /// End a scan: forget the definitions it did not see (deleted, or owned by another replica now), so that one
    /// that comes back is reconciled at once.
    pub fn end_scan(&mut self) {
        let (scan, in_flight) = (self.scan, &self.in_flight);
        self.tracked.retain(|uid, t| t.seen == scan || in_flight.contains(uid));
        let tracked = &self.tracked;
        self.children_changed.retain(|uid| tracked.contains_key(uid));
    }

    /// The next queued definition to reconcile; it counts as in flight until [`Book::done`].
    pub fn start_next(&mut self) -> Option<(String, R)> {
        while let Some(uid) = self.queue.pop_front() {
            self.queued.remove(&uid);
            // Forgotten since it was queued (deleted, or owned elsewhere now): nothing to do.
            let Some(at) = self.tracked.get(&uid).map(|t| t.at.clone()) else { continue };
            self.in_flight.insert(uid.clone());
            return Some((uid, at));
        }
        None
    }

    /// A reconcile of `uid` is over (`now`): it read or wrote `versions`, in that order, and asks to be looked at
    /// again `next`.
    pub fn done(&mut self, uid: &str, versions: Vec<String>, next: Option<Instant>, now: Instant) {
        self.in_flight.remove(uid);
        if let Some(t) = self.tracked.get_mut(uid) {
            t.versions = versions;
            t.next = next;
            t.done_at = Some(now);
            t.refused_until = None;
        }
    }

    /// The reconcile of `uid` just [`Book::done`] had a write refused, and its next look is paused until `until`.
    pub fn refused(&mut self, uid: &str, until: Instant) {
        if let Some(t) = self.tracked.get_mut(uid) {
            t.refused_until = Some(until);
        }
    }

    /// Whether `uid` is tracked: owned here as of the last scan, or being reconciled.
    pub fn tracks(&self, uid: &str) -> bool {
        self.tracked.contains_key(uid)
    }

    /// Whether the cache showing `version` of `uid` brings nothing this replica did not know: its last reconcile
    /// read or wrote that version.
    pub fn no_news(&self, uid: &str, version: &str) -> bool {
        self.tracked.get(uid).is_some_and(|t| t.versions.iter().any(|v| v == version))
    }

    /// Reconciles running now.
    pub fn running(&self) -> usize {
        self.in_flight.len()
    }
}

/// What a reconcile task hands back.
struct Outcome {
    versions: Vec<String>,
    next: Option<Instant>,
    carried: Carried,
    /// A write was refused: the next look waits for `next` or a change of the definition.
    refused: bool,
}

/// How the controller works.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Reconciles at once (`--recurring-concurrency`).
    pub concurrency: usize,
    /// How long before a tick it may be claimed (`--recurring-claim-ahead`, see [`super::lead`]).
    pub claim_ahead: Duration,
}

/// Run the controller until `stop`.
pub async fn run(
    worker: Arc<Worker>,
    mut view: RecurringView,
    timing: LeaseTiming,
    settings: Settings,
    stop: CancellationToken,
) {
    let Settings { concurrency, claim_ahead } = settings;
    // Nothing is done for a definition before this replica holds its member Lease (the fence of every tick).
    tokio::select! {
        _ = view.membership.wait_for(|m| m.is_some()) => {}
        _ = stop.cancelled() => return,
    }
    tokio::select! {
        _ = view.children.ready() => {}
        _ = stop.cancelled() => return,
    }
    let mut observer = Observer::default();
    let mut book = Book::default();
    // What this process carries from one reconcile of a definition to the next, by definition UID.
    let mut carried: HashMap<String, Carried> = HashMap::new();
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut spawned: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut scan_wanted = true;
    let mut last_scan = Instant::now() - MIN_SCAN_GAP;
    let mut wake = Instant::now();
    loop {
        tokio::select! {
            _ = view.changed.notified() => scan_wanted = true,
            _ = view.children.notify.notified() => scan_wanted = true,
            _ = tokio::time::sleep_until(wake.into()) => scan_wanted = true,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let (uid, o) = match done {
                    Ok((id, o)) => (spawned.remove(&id).unwrap_or_default(), o),
                    // A reconcile that panicked: try again soon (what it had created stays known; a claim ahead is read
                    // again).
                    Err(e) => {
                        let uid = spawned.remove(&e.id()).unwrap_or_default();
                        warn!(error = %e, "recurring job reconcile panicked");
                        let created_here = carried.get(&uid).and_then(|c| c.created_here.clone());
                        let next = Some(Instant::now() + RETRY);
                        let carried = Carried { created_here, ..Default::default() };
                        let o = Outcome { versions: vec![], next, carried, refused: false };
                        (uid, o)
                    }
                };
                let next = o.next;
                book.done(&uid, o.versions, next, Instant::now());
                if let Some(until) = next.filter(|_| o.refused) {
                    book.refused(&uid, until);
                }
                if o.carried.created_here.is_some() || o.carried.armed.is_some() || o.carried.failures > 0 {
                    carried.insert(uid, o.carried);
                } else {
                    carried.remove(&uid);
                }
                // Its next look is due then: the timer must know.
                if let Some(n) = next {
                    wake = wake.min(n);
                }
            }
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(STOP_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
                return;
            }
        }
        let now = Instant::now();
        let fence = view.membership.borrow().clone().filter(|k| k.is_current());
        if scan_wanted && now >= last_scan + MIN_SCAN_GAP && fence.is_some() {
            scan_wanted = false;
            last_scan = now;
            let live = members::live_where(
                &view.members,
                &view.scope,
                &mut observer,
                now,
                &timing,
                &worker.identity,
                members::runs_recurring,
            );
            book.begin_scan(view.children.take_changed());
            wake = now + IDLE;
            for def in view.definitions.state() {
                let uid = def.uid().unwrap_or_default();
                if members::owner(&live, &uid) != Some(worker.identity.as_str()) {
                    continue;
                }
                let at = ObjectRef::from_obj(&*def);
                if let Some(next) = book.consider(&uid, at, &def.resource_version().unwrap_or_default(), now) {
                    wake = wake.min(next);
                }
            }
            book.end_scan();
            carried.retain(|uid, _| book.tracks(uid));
        } else if scan_wanted {
            wake = wake.min(last_scan + MIN_SCAN_GAP).max(now + Duration::from_millis(1));
            if fence.is_none() {
                wake = now + RETRY;
            }
        }
        let Some(fence) = fence else { continue };
        while book.running() < concurrency
            && let Some((uid, at)) = book.start_next()
        {
            // As cached now: the scan may be a little older.
            let def = view.definitions.get(&at).filter(|d| d.uid().as_deref() == Some(uid.as_str()));
            let Some(def) = def else {
                book.done(&uid, vec![], None, now);
                continue;
            };
            let kids = view.children.of(&uid);
            let mut kept = carried.get(&uid).cloned().unwrap_or_default();
            // A claim made ahead is decided from as written only while it is as good as a read.
            let no_news = book.no_news(&uid, &def.resource_version().unwrap_or_default());
            kept.armed = kept.armed.filter(|a| a.usable(&fence, no_news, Instant::now()));
            let (worker, fence) = (worker.clone(), fence.clone());
            let name = def.name_any();
            let task = tasks.spawn(async move {
                let (mut versions, mut refused) = (Vec::new(), false);
                let started = (worker.clock.now(), Instant::now());
                let outcome =
                    reconcile(&worker, &def, &kids, &mut kept, &mut versions, started, &fence, claim_ahead).await;
                let deadline_left = starting_deadline_left(&def, worker.clock.now());
                let again = kept.pause_after(outcome.as_ref().err(), deadline_left).map(|pause| Instant::now() + pause);
                // Its waits count from its start (a tick claimed ahead is due that long after it), a pause from now.
                let next = match outcome {
                    Ok(next) => next.map(|d| started.1 + d.min(IDLE)).into_iter().chain(again).min(),
                    Err(e) => {
                        warn!(definition = %name, error = %e, "recurring job reconcile failed");
                        kept.armed = None;
                        // A refused definition waits out its pause whatever its children do ([`Book::refused`]).
                        refused = crate::error::lasting_refusal(&e);
                        again
                    }
                };
                Outcome { versions, next, carried: kept, refused }
            });
            spawned.insert(task.id(), uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestBook = Book<&'static str>;

    fn scan(book: &mut TestBook, defs: &[(&'static str, &str)], kids_changed: &[&str], now: Instant) {
        book.begin_scan(kids_changed.iter().map(|s| s.to_string()).collect());
        for (uid, version) in defs {
            book.consider(uid, uid, version, now);
        }
        book.end_scan();
    }

    fn drain(book: &mut TestBook) -> Vec<String> {
        std::iter::from_fn(|| book.start_next().map(|(uid, _)| uid)).collect()
    }

    #[test]
    fn a_definition_is_reconciled_when_new_changed_by_others_its_children_changed_or_due_and_not_otherwise() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1"), ("b", "1")], &[], now);
        assert_eq!(drain(&mut book), ["a", "b"], "new definitions at once");
        let later = now + Duration::from_secs(60);
        // a's reconcile read version 2 (after a 409) and wrote 3 (its claim); b's found nothing to do.
        book.done("a", vec!["1".into(), "2".into(), "3".into()], Some(later), now);
        book.done("b", vec!["1".into()], Some(later), now);
        scan(&mut book, &[("a", "2"), ("b", "1")], &[], now);
        assert!(drain(&mut book).is_empty(), "its own writes, even seen late, are no news");
        scan(&mut book, &[("a", "4"), ("b", "1")], &[], now);
        assert_eq!(drain(&mut book), ["a"], "someone else wrote a");
        book.done("a", vec!["4".into()], Some(later), now);
        scan(&mut book, &[("a", "4"), ("b", "1")], &["b"], now);
        assert_eq!(drain(&mut book), ["b"], "a job of b changed");
        book.done("b", vec!["1".into()], Some(later), now);
        scan(&mut book, &[("a", "4"), ("b", "1")], &[], later);
        assert_eq!(drain(&mut book), ["a", "b"], "both are due");
    }

    #[test]
    fn news_of_children_waits_while_the_cache_is_behind_the_last_reconciles_own_write_a_while_at_most() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1")], &[], now);
        assert_eq!(drain(&mut book), ["a"]);
        // Its reconcile read 1 and claimed a tick (wrote 2); the job it then created is seen before the claim is.
        book.done("a", vec!["1".into(), "2".into()], Some(now + Duration::from_secs(60)), now);
        scan(&mut book, &[("a", "1")], &["a"], now + Duration::from_millis(100));
        assert!(drain(&mut book).is_empty(), "decided from version 1, the claimed tick would look due again");
        scan(&mut book, &[("a", "2")], &[], now + Duration::from_millis(200));
        assert_eq!(drain(&mut book), ["a"], "caught up: the children's news is acted on");
        // A watch that never catches up holds it back for CATCH_UP at most.
        book.done("a", vec!["2".into(), "3".into()], None, now);
        scan(&mut book, &[("a", "2")], &["a"], now + Duration::from_millis(300));
        assert!(drain(&mut book).is_empty());
        scan(&mut book, &[("a", "2")], &[], now + CATCH_UP);
        assert_eq!(drain(&mut book), ["a"], "waited long enough");
    }

    #[test]
    fn a_definition_held_for_its_cache_is_looked_at_again_by_then_and_not_held_past_its_timer_or_someone_elses_write() {
        let now = Instant::now();
        let held = |next: Option<Instant>| {
            let mut book = TestBook::default();
            scan(&mut book, &[("a", "1")], &[], now);
            drain(&mut book);
            book.done("a", vec!["1".into(), "2".into()], next, now);
            book
        };
        let mut book = held(None);
        book.begin_scan(HashSet::from(["a".to_string()]));
        assert_eq!(book.consider("a", "a", "1", now), Some(now + CATCH_UP), "looked at again when the wait ends");
        let soon = now + Duration::from_millis(500);
        let mut book = held(Some(soon));
        book.begin_scan(HashSet::new());
        assert_eq!(book.consider("a", "a", "1", now), Some(soon), "or at its timer, if sooner");
        book.begin_scan(HashSet::new());
        book.consider("a", "a", "1", soon);
        assert_eq!(drain(&mut book), ["a"], "a due timer is never held back");
        let mut book = held(None);
        scan(&mut book, &[("a", "9")], &[], now);
        assert_eq!(drain(&mut book), ["a"], "a version it never saw is someone else's write: at once");
    }

    #[test]
    fn a_definition_whose_write_was_refused_waits_out_its_pause_unless_it_changes_itself() {
        let now = Instant::now();
        let until = now + Duration::from_secs(8);
        let refused = || {
            let mut book = TestBook::default();
            scan(&mut book, &[("a", "1")], &[], now);
            drain(&mut book);
            book.done("a", vec!["1".into()], Some(until), now);
            book.refused("a", until);
            book
        };
        let mut book = refused();
        scan(&mut book, &[("a", "1")], &["a"], now);
        assert!(drain(&mut book).is_empty(), "a child's news (a running job's status) brings no look meanwhile");
        scan(&mut book, &[("a", "1")], &[], until);
        assert_eq!(drain(&mut book), ["a"], "the pause's end does");
        let mut book = refused();
        scan(&mut book, &[("a", "2")], &[], now);
        assert_eq!(drain(&mut book), ["a"], "and so does an edit of the definition");
        book.done("a", vec!["2".into()], None, now);
        scan(&mut book, &[("a", "2")], &["a"], now);
        assert_eq!(drain(&mut book), ["a"], "a look that was not refused ends the pause");
    }

    #[test]
    fn a_definition_is_never_reconciled_twice_at_once_and_a_change_meanwhile_is_seen_after() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1")], &[], now);
        assert_eq!(drain(&mut book), ["a"]);
        scan(&mut book, &[("a", "5")], &["a"], now);
        assert!(drain(&mut book).is_empty(), "in flight");
        assert_eq!(book.running(), 1);
        book.done("a", vec!["1".into(), "2".into()], None, now);
        scan(&mut book, &[("a", "5")], &[], now);
        assert_eq!(drain(&mut book), ["a"], "changed while in flight: again");
    }

    #[test]
    fn a_definition_owned_elsewhere_is_forgotten_and_reconciled_at_once_when_it_comes_back() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1"), ("b", "1")], &[], now);
        drain(&mut book);
        book.done("a", vec!["1".into()], None, now);
        book.done("b", vec!["1".into()], None, now);
        scan(&mut book, &[("b", "1")], &[], now);
        assert!(drain(&mut book).is_empty());
        scan(&mut book, &[("a", "1"), ("b", "1")], &[], now);
        assert_eq!(drain(&mut book), ["a"], "back here: this replica may have missed anything meanwhile");
    }

    #[test]
    fn only_versions_the_last_reconcile_read_or_wrote_are_no_news_and_a_definition_owned_elsewhere_is_not_tracked() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1"), ("b", "1")], &[], now);
        drain(&mut book);
        book.done("a", vec!["1".into(), "2".into()], None, now);
        book.done("b", vec!["1".into()], None, now);
        assert!(book.no_news("a", "1") && book.no_news("a", "2"), "what it read and what it wrote");
        assert!(!book.no_news("a", "3"), "someone else's write");
        assert!(book.tracks("b"));
        scan(&mut book, &[("a", "2")], &[], now);
        assert!(!book.tracks("b") && !book.no_news("b", "1"), "b is owned elsewhere now: forgotten");
    }

    #[test]
    fn a_queued_definition_that_went_away_is_not_started() {
        let (mut book, now) = (TestBook::default(), Instant::now());
        scan(&mut book, &[("a", "1"), ("b", "1")], &[], now);
        assert_eq!(book.start_next().map(|(u, _)| u).as_deref(), Some("a"));
        scan(&mut book, &[("a", "1")], &[], now);
        assert!(book.start_next().is_none(), "b was deleted or moved while queued");
    }
}
