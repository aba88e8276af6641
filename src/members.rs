//! Replica membership: every replica keeps a member Lease (`bgjobs-member-…` in `--lease-namespace`) renewed, so
//! each replica knows who else is alive. Work that must be done by one replica at a time, but not always the same
//! one (evaluating recurring schedules), is shared by rendezvous hashing over the live members: adding a replica
//! moves only its share, and a replica that stops renewing loses its share one lease duration later.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lease::{self, Acquire, Claim, Keeper, LeaseTiming, Observer};

/// Label that marks member Leases; its value is the replicas' watch scope ([`scope`]), so that deployments
/// watching different namespaces never count each other as members.
pub const MEMBER_LABEL: &str = "bgjobs.dev/member";
/// Annotation on a member Lease: whether that replica runs the recurring controller (`"true"`/`"false"`).
pub const RECURRING_ANNOTATION: &str = "bgjobs.dev/recurring";
/// Annotation on a member Lease: whether that replica claims and runs jobs (`"true"`/`"false"`).
pub const JOBS_ANNOTATION: &str = "bgjobs.dev/jobs";
/// Annotation on a member Lease: how many attempts that replica runs at once at most
/// (`--max-concurrent-jobs-per-instance`).
pub const SLOTS_ANNOTATION: &str = "bgjobs.dev/slots";
/// Annotation on a member Lease: the queues that replica serves, comma-separated (`--queues`; empty: every queue).
pub const QUEUES_ANNOTATION: &str = "bgjobs.dev/queues";
/// Annotation on a member Lease: the in-process handlers that replica has (`jobName`s), a JSON array (a name may
/// hold any character). Absent (a replica of an older version): it counts as having every handler.
pub const HANDLERS_ANNOTATION: &str = "bgjobs.dev/handlers";
/// Annotation on a member Lease: `"true"` while that replica's member watch shows its own renewals later than
/// [`WATCH_LAG_LIMIT`] ([`WatchLag`]). Its caches are that far behind: it would not see in time the jobs of the
/// queue's head it owns, so the others leave it none ([`Claimer::lags`]).
pub const WATCH_LAG_ANNOTATION: &str = "bgjobs.dev/watch-lag";
/// How late a replica's member watch may show its own renewals before it says its watches lag: a job's owner has
/// this long before the job is overdue at the head ([`crate::ordering::OVERDUE_AFTER`]), so an owner that sees
/// its jobs later holds the head back.
pub const WATCH_LAG_LIMIT: Duration = crate::ordering::OVERDUE_AFTER;
/// How long a replica goes on saying its watches lag after it last found them late, at least (and until a renewal
/// has been shown in time since): a lag that comes and goes would otherwise move its share of the head back and
/// forth at every renewal.
const WATCH_LAG_HOLD: Duration = Duration::from_secs(5);
/// How many renewals not yet shown by the member watch are timed at most (a dead watch shows none; the oldest,
/// kept, says how late it is).
const WATCH_LAG_PENDING: usize = 32;
/// How often the member watch is looked at for this replica's renewals: the measured lag is this much coarse.
const WATCH_LAG_EVERY: Duration = Duration::from_millis(100);

/// What a replica does, written on its member Lease so that each kind of work is shared only among the members
/// that do it: a member that runs no jobs owns none of the queue's head ([`crate::ordering::pick`]), or the others
/// would leave its share to it for a moment every time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roles {
    /// Runs the recurring controller (`--recurring`).
    pub recurring: bool,
    /// Claims and runs jobs (not `--no-execute`).
    pub jobs: bool,
    /// Runs this many attempts at once at most: the other replicas leave it none of the queue's head while it runs
    /// as many ([`Claimer`]).
    pub slots: u32,
    /// Serves only these queues (empty: every queue).
    pub queues: Vec<String>,
    /// The in-process handlers it has: the others leave it none of the jobs of other handlers, and fail a job whose
    /// handler they lack only once no member has offered it for the grace ([`HandlerOffers`]).
    pub handlers: Vec<String>,
}

impl Roles {
    fn annotations(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (RECURRING_ANNOTATION.to_string(), self.recurring.to_string()),
            (JOBS_ANNOTATION.to_string(), self.jobs.to_string()),
            (SLOTS_ANNOTATION.to_string(), self.slots.to_string()),
            (QUEUES_ANNOTATION.to_string(), self.queues.join(",")),
            (HANDLERS_ANNOTATION.to_string(), serde_json::to_string(&self.handlers).unwrap_or_default()),
        ])
    }
}

/// A member that claims jobs, as its Lease says: the owner of a share of the queue's head
/// ([`crate::ordering::pick`]), but only of the jobs of the queues it serves, and only while it has room for one
/// more attempt. A share left to a replica that cannot take it waits out its owner's turn, and meanwhile the replica
/// with the free slot spends it on a later job: the head then waits for a slot to free up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimer {
    /// Its identity.
    pub identity: String,
    /// How many attempts it runs at most; `None`: a replica of an older version, which does not say (it counts as
    /// always having room, as all did).
    pub slots: Option<u32>,
    /// The queues it serves; empty: every queue.
    pub queues: Vec<String>,
    /// Says its watches lag ([`WATCH_LAG_ANNOTATION`]): it owns none of the queue's head, and its room is not counted
    /// on, until it says they caught up.
    pub lags: bool,
    /// The in-process handlers it has; `None`: a replica of an older version, which does not say (it counts as
    /// having every one: it runs the job, or fails it itself).
    pub handlers: Option<Arc<std::collections::BTreeSet<String>>>,
}

impl Claimer {
    /// What the member Lease `l` says.
    pub fn of(l: &Lease) -> Option<Claimer> {
        let identity = lease::holder(l)?.to_string();
        let slots = lease::annotation(l, SLOTS_ANNOTATION).and_then(|n| n.parse().ok());
        let queues = lease::annotation(l, QUEUES_ANNOTATION)
            .map(|q| q.split(',').filter(|q| !q.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        let handlers = lease::annotation(l, HANDLERS_ANNOTATION)
            .and_then(|h| serde_json::from_str::<std::collections::BTreeSet<String>>(h).ok())
            .map(Arc::new);
        Some(Claimer { identity, slots, queues, lags: says_it_lags(l), handlers })
    }

    /// Whether it can run a job that needs the in-process `handler` (None: a Pod or HTTP job, which any replica
    /// runs; see [`crate::executor::handler_needed`]).
    pub fn runs(&self, handler: Option<&str>) -> bool {
        handler.is_none_or(|h| self.handlers.as_ref().is_none_or(|hs| hs.contains(h)))
    }

    /// Whether it serves `queue`.
    pub fn serves(&self, queue: &str) -> bool {
        crate::config::serves(&self.queues, queue)
    }

    /// Whether it has room for another attempt, running `running` as far as the job cache shows.
    pub fn has_room(&self, running: usize) -> bool {
        self.slots.is_none_or(|slots| running < slots as usize)
    }
}

/// The watch scope members share: the watched namespace, or `all-namespaces`.
pub fn scope(namespace: Option<&str>) -> String {
    namespace.map_or_else(|| ALL_NAMESPACES.to_string(), str::to_string)
}

/// The scope of replicas that watch every namespace ([`scope`]).
pub const ALL_NAMESPACES: &str = "all-namespaces";

/// Whether replicas of watch scope `scope` see the jobs of `namespace`.
pub fn scope_covers(scope: &str, namespace: &str) -> bool {
    scope == ALL_NAMESPACES || scope == namespace
}

/// A hash that is the same in every process and every build (unlike the standard library's), so that all replicas
/// agree on who owns what: FNV-1a over the parts, then murmur3's finalizer (FNV alone mixes its high bits too
/// little for rendezvous hashing to spread evenly).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Whether a member Lease says its replica's watches lag ([`WATCH_LAG_ANNOTATION`]); for this replica's own, as last
/// written ([`Keeper::lease`]): what the others go by.
pub fn says_it_lags(member: &Lease) -> bool {
    lease::annotation(member, WATCH_LAG_ANNOTATION) == Some("true")
}

/// Whether a member Lease says its replica runs the recurring controller. Leases of older replicas, without the
/// annotation, count as running it (they always did).
pub fn runs_recurring(l: &Lease) -> bool {
    lease::annotation(l, RECURRING_ANNOTATION) != Some("false")
}

/// Whether a member Lease says its replica claims and runs jobs. Leases of older replicas, without the annotation,
/// count as running them.
pub fn runs_jobs(l: &Lease) -> bool {
    lease::annotation(l, JOBS_ANNOTATION) != Some("false")
}

/// Name of a replica's member Lease in watch scope `scope`. The scope is part of the name: replicas of two
/// deployments may share a Lease namespace and a Pod name, and a member Lease is the tenure that vouches for every
/// Lease its replica holds ([`crate::lease::tenure`]), so two replicas must never share one.
pub fn member_lease_name(identity: &str, scope: &str) -> String {
    let readable: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("bgjobs-member-{}-{:08x}", readable.trim_matches('-'), stable_hash(&[identity, scope]) as u32)
}

/// The live member whose rendezvous hash with `key` is highest: the one that does `key`'s work.
pub fn owner<'a>(members: &'a [String], key: &str) -> Option<&'a str> {
    members.iter().max_by_key(|m| stable_hash(&[m.as_str(), key])).map(String::as_str)
}

/// Identities of the members of `scope` ([`scope`]) seen renewing within a lease duration whose Lease `includes`
/// (e.g. those that run the recurring controller), plus `me`, sorted.
pub fn live_where(
    store: &Store<Lease>,
    scope: &str,
    observer: &mut Observer,
    now: Instant,
    timing: &LeaseTiming,
    me: &str,
    includes: impl Fn(&Lease) -> bool,
) -> Vec<String> {
    identities(&live_leases(store, scope, observer, now, timing), me, includes)
}

/// The member Leases of `scope` ([`scope`]) seen renewing within a lease duration, read once for several
/// [`identities`]. Replicas watch the member Leases of every scope (a Lease any of them holds may be vouched for by
/// any tenure; see [`crate::lease::tenure`]), but share work only within their own.
pub fn live_leases(
    store: &Store<Lease>,
    scope: &str,
    observer: &mut Observer,
    now: Instant,
    timing: &LeaseTiming,
) -> Vec<Arc<Lease>> {
    of_scope(&live_in_every_scope(store, observer, now, timing), scope)
}

/// Those of the member Leases `leases` whose replicas share work in `scope`.
pub fn of_scope(leases: &[Arc<Lease>], scope: &str) -> Vec<Arc<Lease>> {
    leases.iter().filter(|l| scope_of(l) == Some(scope)).cloned().collect()
}

/// The member Leases of every scope seen renewing within a lease duration.
pub fn live_in_every_scope(
    store: &Store<Lease>,
    observer: &mut Observer,
    now: Instant,
    timing: &LeaseTiming,
) -> Vec<Arc<Lease>> {
    let leases = store.state();
    let mut live = Vec::new();
    for l in &leases {
        let unchanged = observer.observe(&l.name_any(), l.resource_version().as_deref(), now);
        if !timing.expired(unchanged) && scope_of(l).is_some() {
            live.push(l.clone());
        }
    }
    let names: std::collections::HashSet<String> = leases.iter().map(|l| l.name_any()).collect();
    observer.retain(|k| names.contains(k));
    live
}

/// The watch scope a member Lease's replica shares work in ([`MEMBER_LABEL`]).
pub fn scope_of(member: &Lease) -> Option<&str> {
    member.labels().get(MEMBER_LABEL).map(String::as_str)
}

/// The holders of those of `leases` that `includes`, plus `me`, sorted.
pub fn identities(leases: &[Arc<Lease>], me: &str, includes: impl Fn(&Lease) -> bool) -> Vec<String> {
    let mut out = vec![me.to_string()];
    out.extend(leases.iter().filter(|l| includes(l)).filter_map(|l| lease::holder(l)).map(str::to_string));
    out.sort();
    out.dedup();
    out
}

/// The members that claim jobs among the `live` member Leases ([`runs_jobs`]), and `me`, sorted by identity. This
/// replica counts as having room and serving every queue: it is the one picking, with a slot free, among the jobs it
/// can run; it has `my_handlers` (`None`: every one). While this replica says its own watches lag (`me_lags`), it
/// takes no other's word for theirs: leaving the head to itself alone, from a stale view, would only race the others
/// for it, and when every replica lags, each would.
pub fn claimers(
    live: &[Arc<Lease>],
    me: &str,
    me_lags: bool,
    my_handlers: Option<Arc<std::collections::BTreeSet<String>>>,
) -> Vec<Claimer> {
    let mut out: Vec<Claimer> = live.iter().filter(|l| runs_jobs(l)).filter_map(|l| Claimer::of(l)).collect();
    out.retain(|c| c.identity != me);
    if me_lags {
        out.iter_mut().for_each(|c| c.lags = false);
    }
    out.push(Claimer { identity: me.to_string(), slots: None, queues: Vec::new(), lags: false, handlers: my_handlers });
    out.sort_by(|a, b| a.identity.cmp(&b.identity));
    out.dedup_by(|a, b| a.identity == b.identity);
    out
}

/// How many attempts each replica holds, as this one's caches show them: the jobs `Running` under it as worker, and
/// the jobs whose claim Lease it holds (`claims`: holder and job UID), each job once. A claim's Lease is written
/// before its `Running` status, and the Lease watch shows it first: counted by the status alone, a replica that had
/// just taken its last free slot still looked as if it had room.
pub fn attempts_by_replica<'a>(
    running: impl IntoIterator<Item = (&'a str, &'a str)>,
    claims: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> std::collections::HashMap<&'a str, usize> {
    let mut jobs: std::collections::HashMap<&str, std::collections::HashSet<&str>> = Default::default();
    for (replica, uid) in running.into_iter().chain(claims) {
        jobs.entry(replica).or_default().insert(uid);
    }
    jobs.into_iter().map(|(replica, uids)| (replica, uids.len())).collect()
}

/// The members that may own a job of `queue` that needs `handler` now ([`crate::ordering::Waiting::owners`]): the
/// `claimers` that serve the queue, run the job ([`Claimer::runs`]), whose watches do not lag, and that have room for
/// another attempt, each holding as many as `running` says ([`attempts_by_replica`]). A job left to a replica that
/// lacks its handler would wait out that replica's turn at the head for nothing. A job none of them can run (its
/// grace over, it is claimed to be failed) is shared among all the others, so that one replica fails it, not every
/// replica at once.
pub fn owners_of(
    claimers: &[Claimer],
    running: impl Fn(&str) -> usize,
    queue: &str,
    handler: Option<&str>,
) -> crate::ordering::Owners {
    let may_own = |c: &&Claimer| c.serves(queue) && !c.lags && c.has_room(running(&c.identity));
    let owners: crate::ordering::Owners =
        claimers.iter().filter(may_own).filter(|c| c.runs(handler)).map(|c| c.identity.clone()).collect();
    if !owners.is_empty() {
        return owners;
    }
    claimers.iter().filter(may_own).map(|c| c.identity.clone()).collect()
}

/// The members that claim jobs this replica saw lately, of every scope, and when last: who offers the handlers it
/// lacks. A job whose handler this replica lacks is left for `--unknown-handler-grace` after it may run and after
/// the last member that offered its handler for its namespace and queue was seen ([`HandlerOffers::offered_ago`]): a
/// job waiting behind busy replicas that have its handler is theirs however long it waits, and one whose only such
/// replica restarts is not failed in the gap. Held per member, not per job or handler, so that what it holds is
/// bounded by the replicas of a grace. Members of another lease namespace are not seen (docs/usage.md).
#[derive(Debug)]
pub struct HandlerOffers {
    /// By member Lease name: what it says, its scope, when last seen.
    seen: std::collections::HashMap<String, (Claimer, String, Instant)>,
    /// When this replica began to look: it saw nothing before, so a handler counts as offered until then.
    began: Instant,
}

impl HandlerOffers {
    /// Nothing seen yet, at `now`.
    pub fn new(now: Instant) -> Self {
        HandlerOffers { seen: Default::default(), began: now }
    }

    /// The `live` member Leases (of every scope) of a pass at `now`, this replica's own (`mine`, by name) aside;
    /// those not seen for `forget_after` (the grace: what they offered no longer keeps a job waiting) are forgotten.
    pub fn saw(&mut self, live: &[Arc<Lease>], mine: &str, now: Instant, forget_after: Duration) {
        for l in live.iter().filter(|l| runs_jobs(l) && l.name_any() != mine) {
            if let (Some(claimer), Some(scope)) = (Claimer::of(l), scope_of(l)) {
                self.seen.insert(l.name_any(), (claimer, scope.to_string(), now));
            }
        }
        self.seen.retain(|_, (_, _, at)| now.saturating_duration_since(*at) <= forget_after);
    }

    /// How long ago another member that sees `namespace`, serves `queue` and has `handler` was last seen (zero: one
    /// is live now), and at most since this replica began to look: a replica that starts while the ones that have
    /// the handler are away (a rollout's gap) does not take them for gone.
    pub fn offered_ago(&self, namespace: &str, queue: &str, handler: &str, now: Instant) -> Duration {
        let offers = |(c, scope, _): &&(Claimer, String, Instant)| {
            scope_covers(scope, namespace) && c.serves(queue) && c.runs(Some(handler))
        };
        let looking = now.saturating_duration_since(self.began);
        let seen = self.seen.values().filter(offers).map(|(_, _, at)| now.saturating_duration_since(*at)).min();
        seen.map_or(looking, |ago| ago.min(looking))
    }
}

/// How many attempts the `claimers` can start now between them for the jobs of this replica's `queues` (empty:
/// every queue): this replica's `free` slots, and the room of each other that serves the very same queues (its slots
/// less what it holds, as `running` says; a replica of an older version, which does not say how many it runs at most,
/// counts as having as many free as this one). One that serves only some of them may own and take some of the jobs,
/// but is not counted on for the others; nor is one that serves more: it may spend its room on another queue's head,
/// and the jobs of this window left to it would wait for a slot while later ones of theirs start here (review: a
/// whole run time late). Likewise one whose handlers differ from this replica's (as far as it says): jobs of a
/// handler it lacks would be left to it in the window. One whose watches lag is not counted on at all. The window of
/// the queue's head the replicas share ([`crate::ordering::pick`]) is no longer: a job in it whose owner has no room
/// left for it is then taken by a replica that has some, once its owner's turn is over, not passed over for a later
/// job.
pub fn room(claimers: &[Claimer], running: impl Fn(&str) -> usize, me: &str, queues: &[String], free: usize) -> usize {
    let mine: std::collections::BTreeSet<&String> = queues.iter().collect();
    let same_queues = |c: &Claimer| c.queues.iter().collect::<std::collections::BTreeSet<_>>() == mine;
    let my_handlers = claimers.iter().find(|c| c.identity == me).and_then(|c| c.handlers.as_ref());
    let same_handlers = |c: &Claimer| match (&c.handlers, my_handlers) {
        (Some(theirs), Some(mine)) => theirs == mine,
        _ => true,
    };
    let of = |c: &Claimer| match c.slots {
        _ if c.identity == me => free,
        _ if !same_queues(c) || !same_handlers(c) || c.lags => 0,
        Some(slots) => (slots as usize).saturating_sub(running(&c.identity)),
        None => free,
    };
    claimers.iter().map(of).sum()
}

/// How many of its own lease durations a member Lease of this replica's scope goes unrenewed, as seen here, before
/// this replica ends it: its replica is gone (a Pod that died without a graceful stop leaves its Lease behind, and
/// a Deployment names every Pod anew, so the lease namespace would fill with them), and its holder stopped acting a
/// renew deadline after its last renewal. 20: five minutes with the default 15 s. A Lease with a holder is revoked
/// first ([`crate::lease::tenure::revoke`]): every observer then frees at once what its tenure still vouches for (a
/// deleted one would be aged another lease duration); a Lease without one is deleted after
/// [`DEPARTED_UNHELD_AFTER_LEASE_DURATIONS`]. A replica paused longer that resumes finds its tenure ended, and takes a
/// new one as after a deletion by hand.
pub const DEPARTED_AFTER_LEASE_DURATIONS: u32 = 20;
/// How many lease durations a member Lease without a holder (revoked) goes unchanged before it is deleted.
pub const DEPARTED_UNHELD_AFTER_LEASE_DURATIONS: u32 = 2;

/// The member Leases of `scope` among `leases`, `mine` aside, that `observer` has seen unchanged for
/// [`DEPARTED_AFTER_LEASE_DURATIONS`] (without a holder: [`DEPARTED_UNHELD_AFTER_LEASE_DURATIONS`]) of the longer of
/// their own lease duration and `duration` (replicas of one scope may run with different timings during a rolling
/// change of them).
pub fn departed(
    leases: &[Arc<Lease>],
    scope: &str,
    mine: &str,
    observer: &mut Observer,
    now: Instant,
    duration: Duration,
) -> Vec<Arc<Lease>> {
    let mut out = Vec::new();
    for l in leases {
        let name = l.name_any();
        let unchanged = observer.observe(&name, l.resource_version().as_deref(), now);
        let own = l.spec.as_ref().and_then(|s| s.lease_duration_seconds).map(|s| Duration::from_secs(s.max(0) as u64));
        let times = match lease::holder(l) {
            Some(_) => DEPARTED_AFTER_LEASE_DURATIONS,
            None => DEPARTED_UNHELD_AFTER_LEASE_DURATIONS,
        };
        let after = own.unwrap_or_default().max(duration).saturating_mul(times);
        if name != mine && scope_of(l) == Some(scope) && unchanged >= after {
            out.push(l.clone());
        }
    }
    let names: std::collections::HashSet<String> = leases.iter().map(|l| l.name_any()).collect();
    observer.retain(|k| names.contains(k));
    out
}

/// End, every lease duration, the member Leases of this replica's scope whose replicas are gone ([`departed`]): each
/// by the live member that owns its name ([`owner`]), as seen (a renewal meanwhile keeps it): revoked while it has a
/// holder, deleted once it has none.
pub async fn forget_departed(
    client: Client,
    namespace: String,
    scope: String,
    identity: String,
    timing: LeaseTiming,
    members: Store<Lease>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mine = member_lease_name(&identity, &scope);
    // One observer for both looks: at the same instant it says the same of each Lease.
    let mut seen = Observer::default();
    let mut every = tokio::time::interval(timing.duration);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = Instant::now();
        let live = live_where(&members, &scope, &mut seen, now, &timing, &identity, |_| true);
        for l in departed(&members.state(), &scope, &mine, &mut seen, now, timing.duration) {
            let name = l.name_any();
            if owner(&live, &name) != Some(identity.as_str()) {
                continue;
            }
            let Some(tenure) = lease::tenure::tenure_id(&l) else {
                match crate::client::bounded(timing.renew_deadline, lease::release_if_current(&api, &l)).await {
                    Ok(true) => info!(lease = %name, "deleted the member Lease of a replica gone"),
                    Ok(false) => {}
                    Err(e) => warn!(lease = %name, error = %e, "could not delete the member Lease of a gone replica"),
                }
                continue;
            };
            match crate::client::bounded(timing.renew_deadline, lease::tenure::revoke(&api, &l, &tenure)).await {
                Ok(lease::tenure::Revocation::Ended) => info!(lease = %name, %tenure,
                    "revoked the tenure of a replica gone for {DEPARTED_AFTER_LEASE_DURATIONS} lease durations; its \
                     member Lease is deleted later"),
                Ok(_) => {}
                Err(e) => warn!(lease = %name, error = %e, "could not revoke the tenure of a gone replica"),
            }
        }
    }
}

/// How far behind this replica's member watch runs, timed by its own renewals: each renewal's resourceVersion from
/// when its answer came to when the watch shows it (or a later version). A watch that shows them later than
/// [`WATCH_LAG_LIMIT`] lags; the caches of every other watch on the same connection and apiserver most likely lag as
/// much, the job watch among them. Pure: fed the versions and the instants they were seen.
#[derive(Debug, Default)]
pub struct WatchLag {
    /// Renewals answered and not shown yet: their resourceVersion (an etcd revision) and when the answer was seen,
    /// oldest first.
    unseen: std::collections::VecDeque<(u64, Instant)>,
    /// The newest version answered: each is timed once.
    last_answered: Option<u64>,
    /// When the latest renewal found late (shown, or still unseen, past [`WATCH_LAG_LIMIT`]) was answered.
    late: Option<Instant>,
    /// Said to lag until then at least: [`WATCH_LAG_HOLD`] after a renewal was last found late.
    hold_until: Option<Instant>,
    /// A renewal answered after `late` was shown within the limit: the watch has kept up since.
    on_time_since: bool,
}

impl WatchLag {
    /// A renewal answered `version`, seen at `at`.
    pub fn answered(&mut self, version: &str, at: Instant) {
        let Ok(version) = version.parse::<u64>() else { return };
        match self.last_answered {
            Some(last) if version == last => return,
            // Versions went back (etcd restored from a backup): those waiting would never be shown.
            Some(last) if version < last => self.unseen.clear(),
            _ => {}
        }
        self.last_answered = Some(version);
        if self.unseen.len() < WATCH_LAG_PENDING {
            self.unseen.push_back((version, at));
        }
    }

    /// The member watch shows the Lease at `version` at `at`: every renewal up to it has been shown.
    pub fn shown(&mut self, version: &str, at: Instant) {
        let Ok(version) = version.parse::<u64>() else { return };
        while let Some(&(_, answered_at)) = self.unseen.front().filter(|(v, _)| *v <= version) {
            self.unseen.pop_front();
            if at.saturating_duration_since(answered_at) > WATCH_LAG_LIMIT {
                self.found_late(answered_at, at);
            } else if self.late.is_some_and(|late| answered_at > late) {
                self.on_time_since = true;
            }
        }
    }

    /// Whether the watch lags at `now`: since a renewal was found late, none answered after it has been shown within
    /// [`WATCH_LAG_LIMIT`], or [`WATCH_LAG_HOLD`] has not passed yet. Caught up only on proof, a renewal shown in
    /// time, not on the mere passing of time: renewals may be far apart, or go unanswered.
    pub fn lags(&mut self, now: Instant) -> bool {
        if let Some(&(_, answered_at)) = self.unseen.front()
            && now.saturating_duration_since(answered_at) > WATCH_LAG_LIMIT
        {
            self.found_late(answered_at, now);
        }
        self.late.is_some() && (!self.on_time_since || self.hold_until.is_some_and(|until| now < until))
    }

    /// The renewal answered at `answered_at` was found late at `now`.
    fn found_late(&mut self, answered_at: Instant, now: Instant) {
        self.late = Some(self.late.map_or(answered_at, |late| late.max(answered_at)));
        self.hold_until = Some(now + WATCH_LAG_HOLD);
        self.on_time_since = false;
    }
}

/// Keep this replica's member Lease renewed until `stop`, then delete it. The Lease says what `roles` says, from
/// the next renewal after a change (a replica beginning its shutdown grace stops claiming jobs but keeps vouching
/// for the Leases of the attempts still running), and from the start if it must be acquired again; and whether the
/// replica's watches lag, timed by when `members` (the member watch's cache) shows its renewals ([`WatchLag`]).
#[allow(clippy::too_many_arguments)]
pub async fn heartbeat(
    client: Client,
    namespace: String,
    scope: String,
    identity: String,
    timing: LeaseTiming,
    mut roles: watch::Receiver<Roles>,
    members: Store<Lease>,
    membership: watch::Sender<Option<Arc<Keeper>>>,
    stop: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = member_lease_name(&identity, &scope);
    let in_watch = kube::runtime::reflector::ObjectRef::new(&name).within(&namespace);
    // A member Lease is no guard, only a sign of life: renewed with the same Keeper as every other Lease.
    let failures = prometheus_client::metrics::counter::Counter::default();
    let (mut lag, mut said_lags) = (WatchLag::default(), false);
    while !stop.is_cancelled() {
        let mut annotations = roles.borrow_and_update().annotations();
        annotations.insert(WATCH_LAG_ANNOTATION.to_string(), said_lags.to_string());
        let claim = Claim {
            holder: identity.clone(),
            annotations,
            labels: [
                (lease::MANAGED_BY_LABEL.to_string(), lease::MANAGED_BY.to_string()),
                (MEMBER_LABEL.to_string(), scope.clone()),
            ]
            .into(),
            owner: None,
        };
        // The read and the write each bounded: a connection that died without a word would otherwise keep this
        // replica a non-member (claiming nothing, yet ready) for the kernel's retransmission timeout, about 15
        // minutes. A write that lands after its bound leaves a tenure nobody renews: it expires, and the next try
        // takes the Lease over.
        let acquired = match crate::client::bounded(timing.renew_deadline, async {
            Ok(crate::unreadable::get_opt(&api, &name).await?)
        })
        .await
        {
            Ok(None) => {
                crate::client::bounded(timing.renew_deadline, lease::create(&api, &name, &claim, &timing)).await
            }
            // Our own name, left by an earlier process with the same identity: take it over.
            Ok(Some(old)) => {
                crate::client::bounded(timing.renew_deadline, lease::take_over(&api, &old, &claim, &timing)).await
            }
            Err(e) => Err(e),
        };
        match acquired {
            Ok(Acquire::Acquired(held)) => {
                let keeper = Arc::new(Keeper::new(api.clone(), held, timing));
                membership.send_replace(Some(keeper.clone()));
                let keeping = keeper.keep(&failures);
                tokio::pin!(keeping);
                let mut timing_lag = tokio::time::interval(WATCH_LAG_EVERY);
                timing_lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = timing_lag.tick() => {
                            let now = Instant::now();
                            if let Some(version) = keeper.resource_version() {
                                lag.answered(&version, now);
                            }
                            if let Some(version) = members.get(&in_watch).and_then(|l| l.resource_version()) {
                                lag.shown(&version, now);
                            }
                            let lags = lag.lags(now);
                            if lags != said_lags {
                                if lags {
                                    warn!("this replica's member watch shows its renewals over {WATCH_LAG_LIMIT:?} \
                                        late: its caches lag; it owns none of the queue's head until they catch up");
                                } else {
                                    info!("this replica's member watch caught up: it owns its share of the queue's \
                                        head again");
                                }
                                keeper.annotate(WATCH_LAG_ANNOTATION, &lags.to_string());
                                // Written now, not a renew interval later: the others go by it.
                                keeper.renew_soon();
                                said_lags = lags;
                            }
                        }
                        _ = &mut keeping => {
                            warn!("member lease lost; re-acquiring");
                            break;
                        }
                        Ok(()) = roles.changed() => {
                            for (key, value) in roles.borrow_and_update().annotations() {
                                keeper.annotate(&key, &value);
                            }
                        }
                        _ = stop.cancelled() => {
                            membership.send_replace(None);
                            keeper.release().await;
                            return;
                        }
                    }
                }
                membership.send_replace(None);
            }
            Ok(Acquire::Lost(_)) => {}
            Err(e) => warn!(error = %e, "cannot acquire the member lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(timing.renew_interval.min(Duration::from_secs(5))) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stable_hash_never_changes() {
        assert_eq!(stable_hash(&["a"]), stable_hash(&["a"]));
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]), "parts are delimited");
        // Pinned: replicas of different versions must agree on ownership.
        assert_eq!(stable_hash(&["bgjobs"]), 0x52848acaa82c1ab8);
    }

    #[test]
    fn rendezvous_ownership_spreads_keys_and_moves_little_when_a_member_joins() {
        let three: Vec<String> = ["r0", "r1", "r2"].map(String::from).into();
        let four: Vec<String> = ["r0", "r1", "r2", "r3"].map(String::from).into();
        let keys: Vec<String> = (0..1000).map(|i| format!("ns/def-{i}")).collect();
        let mut per_member = std::collections::HashMap::new();
        let mut moved = 0;
        for k in &keys {
            let before = owner(&three, k).unwrap();
            *per_member.entry(before).or_insert(0) += 1;
            let after = owner(&four, k).unwrap();
            if before != after {
                assert_eq!(after, "r3", "keys only move to the new member");
                moved += 1;
            }
        }
        assert!(per_member.values().all(|n| *n > 250), "{per_member:?}");
        assert!((150..350).contains(&moved), "about a quarter moves: {moved}");
    }

    #[test]
    fn a_member_lease_says_what_its_replica_does_and_an_older_one_counts_as_doing_everything() {
        let lease = |annotations: BTreeMap<String, String>| Lease {
            metadata: kube::api::ObjectMeta { annotations: Some(annotations), ..Default::default() },
            ..Default::default()
        };
        let no_jobs =
            lease(Roles { recurring: true, jobs: false, slots: 4, queues: vec![], handlers: vec![] }.annotations());
        assert!(!runs_jobs(&no_jobs) && runs_recurring(&no_jobs));
        let no_recurring =
            lease(Roles { recurring: false, jobs: true, slots: 4, queues: vec![], handlers: vec![] }.annotations());
        assert!(runs_jobs(&no_recurring) && !runs_recurring(&no_recurring));
        let older = lease(BTreeMap::new());
        assert!(runs_jobs(&older) && runs_recurring(&older));
    }

    fn with_handlers(holder: &str, queues: &[&str], handlers: Option<&[&str]>) -> Arc<Lease> {
        in_scope(holder, "s", queues, handlers)
    }

    fn in_scope(holder: &str, scope: &str, queues: &[&str], handlers: Option<&[&str]>) -> Arc<Lease> {
        let roles = Roles {
            recurring: true,
            jobs: true,
            slots: 4,
            queues: queues.iter().map(|q| q.to_string()).collect(),
            handlers: handlers.unwrap_or_default().iter().map(|h| h.to_string()).collect(),
        };
        let mut annotations = roles.annotations();
        if handlers.is_none() {
            annotations.remove(HANDLERS_ANNOTATION);
        }
        Arc::new(Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(member_lease_name(holder, scope)),
                annotations: Some(annotations),
                labels: Some([(MEMBER_LABEL.to_string(), scope.to_string())].into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(holder.to_string()),
                ..Default::default()
            }),
        })
    }

    /// A member Lease is ended as its replica's departed only once unchanged for 20 of the longer of its own lease
    /// duration and this replica's (2 once it has no holder: revoked, its tenure ended): never this replica's own, nor
    /// another scope's (another deployment, whose timing this one does not know).
    #[test]
    fn a_member_lease_unrenewed_for_twenty_lease_durations_of_its_own_scope_is_departed() {
        let member = |name: &str, scope: &str, version: &str, duration: Option<i32>| {
            let holder = (name != "revoked").then(|| name.to_string());
            Arc::new(Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_string()),
                    resource_version: Some(version.to_string()),
                    labels: Some([(MEMBER_LABEL.to_string(), scope.to_string())].into()),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: holder,
                    lease_duration_seconds: duration,
                    ..Default::default()
                }),
            })
        };
        let t0 = Instant::now();
        let mut observer = Observer::default();
        let d = Duration::from_secs(3);
        let leases = |renewed: &str| {
            vec![
                member("mine", "s", "1", Some(3)),
                member("other-scope", "t", "2", Some(3)),
                member("gone", "s", "3", Some(3)),
                member("slow", "s", "4", Some(15)),
                member("renewing", "s", renewed, Some(3)),
                member("revoked", "s", "9", Some(3)),
            ]
        };
        let names = |v: Vec<Arc<Lease>>| v.iter().map(|l| l.name_any()).collect::<Vec<_>>();
        assert!(departed(&leases("5"), "s", "mine", &mut observer, t0, d).is_empty());
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(departed(&leases("6"), "s", "mine", &mut observer, at(5), d).is_empty());
        assert_eq!(names(departed(&leases("6"), "s", "mine", &mut observer, at(6), d)), ["revoked"]);
        assert_eq!(names(departed(&leases("6"), "s", "mine", &mut observer, at(59), d)), ["revoked"]);
        assert_eq!(names(departed(&leases("7"), "s", "mine", &mut observer, at(60), d)), ["gone", "revoked"]);
        // Its own lease duration is 15 s: 300 s.
        assert_eq!(names(departed(&leases("8"), "s", "mine", &mut observer, at(300), d)), ["gone", "slow", "revoked"]);
    }

    /// A job left to a replica that lacks its handler would wait out that replica's turn at the head for nothing; a
    /// job nobody can run (to be failed) is shared among them all, not raced for by every one.
    #[test]
    fn only_members_that_have_a_jobs_handler_own_it_and_an_older_one_counts_as_having_every_one() {
        let live = [
            with_handlers("mail", &[], Some(&["SendEmail", "odd,name"])),
            with_handlers("stock", &[], Some(&["noop"])),
            with_handlers("older", &[], None),
        ];
        let mine = Some(Arc::new(["noop".to_string()].into()));
        let claimers = claimers(&live, "me", false, mine);
        let mail = claimers.iter().find(|c| c.identity == "mail").unwrap();
        assert!(mail.runs(Some("SendEmail")) && mail.runs(Some("odd,name")) && !mail.runs(Some("odd")));
        assert!(mail.runs(None), "a Pod or HTTP job runs anywhere");
        assert_eq!(&*owners_of(&claimers, |_| 0, "q", Some("SendEmail")), ["mail", "older"]);
        assert_eq!(&*owners_of(&claimers, |_| 0, "q", Some("noop")), ["me", "older", "stock"]);
        assert_eq!(&*owners_of(&claimers, |_| 0, "q", None), ["mail", "me", "older", "stock"]);
        let newer: Vec<Claimer> = claimers.into_iter().filter(|c| c.identity != "older").collect();
        assert_eq!(&*owners_of(&newer, |_| 0, "q", Some("typo")), ["mail", "me", "stock"], "nobody has it");
    }

    /// The room of a replica whose handlers differ is not counted on for this replica's window: the jobs of a
    /// handler it lacks would be left to it there, and later jobs start before them.
    #[test]
    fn the_room_of_a_member_with_other_handlers_is_not_counted_on() {
        let live = [
            with_handlers("twin", &[], Some(&["noop", "record"])),
            with_handlers("stock", &[], Some(&["noop"])),
            with_handlers("older", &[], None),
        ];
        let mine = Some(Arc::new(["noop".to_string(), "record".to_string()].into()));
        let claimers = claimers(&live, "me", false, mine);
        // me 1 (its free slot), twin 4, older 4 (it does not say which handlers it has); not stock.
        assert_eq!(room(&claimers, |_| 0, "me", &[], 1), 9);
    }

    /// A job whose handler this replica lacks waits while another member that sees its namespace and serves its
    /// queue has the handler (of this replica's scope or another), and for the grace after the last such member was
    /// seen, or after this replica began to look: not after this replica's own handlers, nor after a member's that
    /// serves other queues or watches another namespace.
    #[test]
    fn a_handler_counts_as_offered_while_a_member_that_serves_the_job_has_it_and_is_forgotten_after_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(300);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut offers = HandlerOffers::new(t0);
        let everyone = [
            with_handlers("mail", &["mail"], Some(&["SendEmail"])),
            with_handlers("me", &[], Some(&["Report"])),
            with_handlers("stock", &[], Some(&["noop"])),
            in_scope("ns-x", "x", &[], Some(&["Billing"])),
            in_scope("cluster", ALL_NAMESPACES, &[], Some(&["Audit"])),
        ];
        let mine = member_lease_name("me", "s");
        // Just begun to look: nothing seen gone yet.
        offers.saw(&everyone[1..3], &mine, t0, grace);
        assert_eq!(offers.offered_ago("s", "mail", "SendEmail", at(10)), Duration::from_secs(10));
        let later = at(400);
        offers.saw(&everyone, &mine, later, grace);
        assert_eq!(offers.offered_ago("s", "mail", "SendEmail", later), Duration::ZERO);
        assert_eq!(offers.offered_ago("s", "other", "SendEmail", later), Duration::from_secs(400), "another queue");
        assert_eq!(offers.offered_ago("s", "mail", "Report", later), Duration::from_secs(400), "its own");
        assert_eq!(offers.offered_ago("x", "q", "Billing", later), Duration::ZERO, "another scope that sees x");
        assert_eq!(offers.offered_ago("s", "q", "Billing", later), Duration::from_secs(400), "does not see s");
        assert_eq!(offers.offered_ago("s", "q", "Audit", later), Duration::ZERO, "sees every namespace");
        // mail went (its Lease expired): still offered as of when it was last seen, for the grace.
        offers.saw(&everyone[1..], &mine, at(500), grace);
        assert_eq!(offers.offered_ago("s", "mail", "SendEmail", at(500)), Duration::from_secs(100));
        // Seen again (it restarted): offered now.
        offers.saw(&everyone, &mine, at(500), grace);
        assert_eq!(offers.offered_ago("s", "mail", "SendEmail", at(500)), Duration::ZERO);
        let gone = at(801);
        offers.saw(&everyone[1..], &mine, gone, grace);
        assert_eq!(offers.offered_ago("s", "mail", "SendEmail", gone), Duration::from_secs(801), "forgotten");
        assert_eq!(offers.offered_ago("s", "mail", "noop", gone), Duration::ZERO);
    }

    #[test]
    fn a_member_that_says_it_runs_no_jobs_is_no_claimer_but_still_a_member() {
        let member = |holder: &str, roles: Roles| {
            Arc::new(Lease {
                metadata: kube::api::ObjectMeta { annotations: Some(roles.annotations()), ..Default::default() },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(holder.to_string()),
                    ..Default::default()
                }),
            })
        };
        let live = [
            member("b", Roles { recurring: true, jobs: true, slots: 4, queues: vec![], handlers: vec![] }),
            member("c", Roles { recurring: true, jobs: false, slots: 4, queues: vec![], handlers: vec![] }),
            member("a", Roles { recurring: true, jobs: true, slots: 4, queues: vec![], handlers: vec![] }),
        ];
        assert_eq!(identities(&live, "a", |_| true), ["a", "b", "c"], "sorted, this replica once");
        assert_eq!(identities(&live, "a", runs_jobs), ["a", "b"]);
    }

    #[test]
    fn only_members_with_room_that_serve_the_queue_own_its_jobs() {
        let member = |holder: &str, slots: u32, queues: &[&str]| {
            let roles = Roles {
                recurring: true,
                jobs: true,
                slots,
                queues: queues.iter().map(|q| q.to_string()).collect(),
                handlers: vec![],
            };
            Arc::new(Lease {
                metadata: kube::api::ObjectMeta { annotations: Some(roles.annotations()), ..Default::default() },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(holder.to_string()),
                    ..Default::default()
                }),
            })
        };
        let older = Arc::new(Lease {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some("old".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let live = [
            member("full", 2, &[]),
            member("busy", 2, &[]),
            member("only-b", 4, &["b"]),
            older,
            member("me", 1, &["a"]),
        ];
        let claimers = claimers(&live, "me", false, None);
        assert_eq!(
            claimers.iter().map(|c| c.identity.as_str()).collect::<Vec<_>>(),
            ["busy", "full", "me", "old", "only-b"]
        );
        let running = |identity: &str| match identity {
            "full" => 2,
            "busy" | "old" => 1,
            _ => 0,
        };
        // Full: none; an older replica, which does not say how many it runs: as before, always room; this replica:
        // room (it is picking with a slot free) and every queue of its backlog.
        assert_eq!(&*owners_of(&claimers, running, "a", None), ["busy", "me", "old"]);
        assert_eq!(&*owners_of(&claimers, running, "b", None), ["busy", "me", "old", "only-b"]);
        // Room for this replica's queue a: me 3 (its free slots), and none from only-b, which serves b alone, nor
        // from those serving every queue, which may spend theirs on another queue's head.
        assert_eq!(room(&claimers, running, "me", &["a".to_string()], 3), 3);
        // Serving every queue as they do: busy 1, full 0, me 3, old 3 (as many as this one); not only-b.
        assert_eq!(room(&claimers, running, "me", &[], 3), 7);
        let also_a = super::claimers(&[member("also-a", 3, &["a"]), member("me", 1, &["a"])], "me", false, None);
        assert_eq!(room(&also_a, |_| 1, "me", &["a".to_string()], 3), 5, "the same queues: me 3, also-a 3 - 1");
        // A claim's Lease and its Running status count once; a Lease shown before the status counts already.
        let held = attempts_by_replica([("busy", "j1"), ("full", "j2")], [("busy", "j1"), ("full", "j3")]);
        assert_eq!((held["busy"], held["full"]), (1, 2));
    }

    #[test]
    fn a_member_watch_that_shows_this_replicas_renewals_over_the_limit_late_lags_for_a_while_after() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut lag = WatchLag::default();
        // Shown 200 ms after the answer: keeping up.
        lag.answered("10", at(0));
        lag.shown("10", at(200));
        assert!(!lag.lags(at(200)));
        // Not shown yet: keeping up until the limit, lagging after it.
        lag.answered("12", at(500));
        lag.answered("12", at(900));
        assert!(!lag.lags(at(500) + WATCH_LAG_LIMIT));
        assert!(lag.lags(at(501) + WATCH_LAG_LIMIT), "the renewal is over the limit late");
        // A later version shows every renewal before it; still lagging for the hold after the late one was seen.
        lag.answered("15", at(2_000));
        lag.shown("16", at(2_100));
        assert!(lag.lags(at(2_100)));
        assert!(lag.lags(at(2_099) + WATCH_LAG_HOLD));
        assert!(!lag.lags(at(2_100) + WATCH_LAG_HOLD), "caught up: its renewals shown in time since");
        // A version answered again (a read-back) is not timed twice; versions that are not numbers are not timed at
        // all.
        lag.answered("15", at(9_000));
        lag.answered("not-a-number", at(9_000));
        assert!(!lag.lags(at(9_000) + WATCH_LAG_HOLD));
        // Versions that go back (etcd restored) start the timing over: the later ones would never be shown.
        lag.answered("20", at(20_000));
        lag.answered("3", at(20_100));
        lag.shown("3", at(20_200));
        assert!(!lag.lags(at(20_200) + WATCH_LAG_LIMIT * 2));
    }

    #[test]
    fn renewals_far_apart_each_shown_late_keep_the_watch_lagging_between_them() {
        // Renewals every 6 s (a long --renew-interval), each shown 1.5 s late: no renewal is in flight when the hold
        // runs out, which is no proof of catching up.
        let t0 = Instant::now();
        let mut lag = WatchLag::default();
        let mut found = false;
        for step in 0..300u64 {
            let now = t0 + Duration::from_millis(step * 100);
            if step % 60 == 0 {
                lag.answered(&(step / 60 + 1).to_string(), now);
            }
            if step % 60 == 15 {
                lag.shown(&(step / 60 + 1).to_string(), now);
            }
            let lags = lag.lags(now);
            assert!(!found || lags, "said caught up at {} ms though every renewal is shown late", step * 100);
            found |= lags;
        }
        assert!(found);
    }

    #[test]
    fn a_dead_member_watch_keeps_lagging_and_its_pending_renewals_are_bounded() {
        let t0 = Instant::now();
        let mut lag = WatchLag::default();
        for v in 0..1_000u64 {
            lag.answered(&v.to_string(), t0 + Duration::from_millis(v * 100));
        }
        assert_eq!(lag.unseen.len(), WATCH_LAG_PENDING, "the oldest kept");
        assert!(lag.lags(t0 + Duration::from_secs(100)));
        lag.shown("999", t0 + Duration::from_secs(100));
        assert!(lag.unseen.is_empty());
    }

    #[test]
    fn a_member_whose_watches_lag_owns_none_of_the_head_and_its_room_is_not_counted_on() {
        let member = |holder: &str, lags: Option<&str>| {
            let mut annotations =
                Roles { recurring: true, jobs: true, slots: 4, queues: vec![], handlers: vec![] }.annotations();
            annotations.extend(lags.map(|v| (WATCH_LAG_ANNOTATION.to_string(), v.to_string())));
            Arc::new(Lease {
                metadata: kube::api::ObjectMeta { annotations: Some(annotations), ..Default::default() },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(holder.to_string()),
                    ..Default::default()
                }),
            })
        };
        let live = [member("lagging", Some("true")), member("caught-up", Some("false")), member("older", None)];
        let claimers = claimers(&live, "me", false, None);
        assert_eq!(&*owners_of(&claimers, |_| 0, "q", None), ["caught-up", "me", "older"]);
        // caught-up 4, older 4, me 2; lagging none.
        assert_eq!(room(&claimers, |_| 0, "me", &[], 2), 10);
        // A replica that lags itself takes no other's word for it: all of them lagging, each would take the head.
        let claimers = crate::members::claimers(&live, "me", true, None);
        assert_eq!(&*owners_of(&claimers, |_| 0, "q", None), ["caught-up", "lagging", "me", "older"]);
        assert_eq!(room(&claimers, |_| 0, "me", &[], 2), 14);
    }

    #[test]
    fn member_lease_names_are_valid() {
        let n = member_lease_name("Pod_Name.1", "jobs");
        assert!(n.starts_with("bgjobs-member-pod-name-1-"), "{n}");
        assert!(n.len() <= 63, "usable as a label value ({})", crate::lease::tenure::HELD_BY_LABEL);
        assert_ne!(n, member_lease_name("Pod_Name.1", "other-jobs"), "one per scope");
        assert!(member_lease_name(&"x".repeat(100), "s").len() <= 63);
    }
}
