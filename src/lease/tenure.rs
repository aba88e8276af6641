//! Tenures: one renewal per replica vouches for every Lease that replica holds.
//!
//! A replica's member Lease ([`crate::members`]) is the only Lease it renews. Each acquisition of it is a *tenure*
//! (its uid and transition count: a take-over or a re-creation is a new one). Every other Lease the replica takes
//! for an attempt (the job's claim, a cluster slot, a concurrency key) is written once and names that tenure in
//! [`TENURE_ANNOTATION`]; it is not renewed, so an attempt costs the same writes whether it runs a second or an hour.
//!
//! Observers judge such a Lease by the younger of two clocks ([`Tenures::vouched_unchanged`]): how long they have
//! seen the Lease itself unchanged, and how long they have seen its tenure unchanged. A tenure ages from its last
//! renewal this replica saw; once its member Lease shows another tenure (or is gone), it ages from the first sighting
//! of that change and never becomes young again (a tenure can only be renewed under its own resourceVersion).
//!
//! A Lease that names a tenure cannot be taken over under its own resourceVersion as proof that its holder stopped:
//! the holder never writes it. So the taker first *revokes* the tenure ([`revoke`]): a write of the member Lease
//! under the resourceVersion the taker saw unchanged for a lease duration. It lands only if the holder has not
//! renewed since, and the holder stops acting at its renew deadline (counted from the send of that last renewal),
//! before anyone may judge it gone. A revoked tenure is marked ([`REVOKED_ANNOTATION`]), so every other observer
//! treats its Leases as free at once instead of waiting out another lease duration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, ResourceExt};

use super::{annotation, holder, now_micro};
use crate::error::Result;

/// Annotation on a claim, slot or key Lease: the tenure of the member Lease that vouches for it ([`tenure_id`]).
pub const TENURE_ANNOTATION: &str = "bgjobs.dev/tenure";
/// Label on every Lease a tenure vouches for: the holder's member Lease name, so the holder can list what it holds.
pub const HELD_BY_LABEL: &str = "bgjobs.dev/held-by";
/// Annotation on a revoked member Lease: the tenure the revoking replica ended.
pub const REVOKED_ANNOTATION: &str = "bgjobs.dev/revoked-tenure";
/// Annotation on a Lease a tenure vouches for, next to [`TENURE_ANNOTATION`]: where that tenure's member Lease is,
/// `<namespace>/<tenure>`. Replicas of another `--lease-namespace` that see the same jobs never see that member Lease
/// in their member watch: they read it where it is (see [`Ending::Unknown`]). Leases written by older replicas do not
/// say (or say it of another tenure, kept from before an older replica's take-over): theirs is taken to be the
/// reader's own.
pub const TENURE_MEMBER_ANNOTATION: &str = "bgjobs.dev/tenure-member";
/// Annotation on a Lease its holder disowned ([`super::disowned`]): the namespace of the member Lease that vouched
/// for it, which [`TENURE_MEMBER_ANNOTATION`] said until then.
pub const DISOWNED_IN_ANNOTATION: &str = "bgjobs.dev/disowned-in";

/// The lease namespace of the deployment that claimed `lease`: where the member Lease vouching for it is
/// ([`vouched_in`]), or, disowned, was ([`DISOWNED_IN_ANNOTATION`]). None for a Lease that does not say.
pub fn claimed_in(lease: &Lease) -> Option<&str> {
    match vouched_by(lease) {
        Some(_) => vouched_in(lease),
        None => annotation(lease, DISOWNED_IN_ANNOTATION).filter(|ns| !ns.is_empty()),
    }
}

/// The [`TENURE_MEMBER_ANNOTATION`] of a Lease vouched for by `tenure`, whose member Lease is in `namespace`.
pub fn tenure_member(namespace: &str, tenure: &str) -> String {
    format!("{namespace}/{tenure}")
}

/// The tenure a member Lease is in: `<name>/<uid>/<transitions>`, or `None` while it has no holder.
pub fn tenure_id(member: &Lease) -> Option<String> {
    holder(member)?;
    let transitions = member.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
    Some(format!("{}/{}/{transitions}", member.name_any(), member.metadata.uid.as_deref().unwrap_or("-")))
}

/// The member Lease a tenure belongs to.
pub fn member_of(tenure: &str) -> &str {
    tenure.split('/').next().unwrap_or_default()
}

/// The UID of the member Lease a tenure belongs to (assigned by the apiserver: no other Lease has it).
pub fn uid_of(tenure: &str) -> &str {
    tenure.split('/').nth(1).unwrap_or_default()
}

/// The tenure a Lease names, if a tenure vouches for it.
pub fn vouched_by(lease: &Lease) -> Option<&str> {
    annotation(lease, TENURE_ANNOTATION).filter(|t| !t.is_empty())
}

/// The namespace of the member Lease of the tenure that vouches for `lease`, if the Lease says so of that tenure
/// ([`TENURE_MEMBER_ANNOTATION`]).
pub fn vouched_in(lease: &Lease) -> Option<&str> {
    let (namespace, tenure) = annotation(lease, TENURE_MEMBER_ANNOTATION)?.split_once('/')?;
    (!namespace.is_empty() && Some(tenure) == vouched_by(lease)).then_some(namespace)
}

/// The tenure that vouches for a Lease, and where that Lease says its member Lease is (`None`: it does not say; the
/// reader's own lease namespace).
pub type Vouch = (String, Option<String>);

/// The [`Vouch`] of `lease`, if a tenure vouches for it.
pub fn vouch(lease: &Lease) -> Option<Vouch> {
    Some((vouched_by(lease)?.to_string(), vouched_in(lease).map(str::to_string)))
}

/// What an observer knows of one tenure.
#[derive(Debug)]
struct Seen {
    /// The member Lease version last seen in this tenure (None once it left it).
    version: Option<String>,
    /// Since when this tenure has been seen unchanged (renewed, or left).
    since: Instant,
    /// Revoked by some replica: its holder has stopped.
    revoked: bool,
    /// Seen in a member Lease (or its revocation) by this replica, rather than only named by a Lease it vouches for.
    witnessed: bool,
}

/// How this replica has seen each tenure age, on its own monotonic clock (like [`super::Observer`] for Leases).
#[derive(Debug, Default)]
pub struct Tenures {
    /// Namespace of the member Leases.
    namespace: String,
    seen: HashMap<String, Seen>,
    /// The member Leases as last seen, by name, for revocation.
    members: HashMap<String, Arc<Lease>>,
    /// Tenures never seen in the member watch, by namespace read in, and their member Lease as last read in them
    /// there ([`Ending::Unknown`]).
    read: HashMap<(String, String), Arc<Lease>>,
}

/// How a tenure that looks gone must be ended before a Lease it vouches for is taken over.
#[derive(Clone, Debug)]
pub enum Ending {
    /// Its member Lease left it (taken over, re-created, deleted or revoked): nothing to do.
    Over,
    /// Revoke it: write this member Lease (as seen) under its resourceVersion first.
    Revoke(Arc<Lease>),
    /// This replica never saw the tenure in its member Lease (its member watch may lag the Lease watch, or the
    /// member Lease is in another namespace, which it does not watch): read the member Lease, in `namespace` (where
    /// the Lease being taken over says it is; see [`TENURE_MEMBER_ANNOTATION`]). In another tenure or gone: the
    /// tenure ended no later than that read, and its holder stops within a renew deadline of it. Still in the
    /// tenure: its holder may be alive, unless it is exactly as `last_read` (read there in the tenure when the tenure
    /// was last judged expired, a lease duration or more before): then nothing renewed it for that long, and it is
    /// revoked under that version, as a watched one is.
    ///
    /// Where to read comes from the Lease being taken over, never from another Lease: a namespace named wrongly (by
    /// anyone who may write Leases in that Lease's namespace, so its own job's) bears on that Lease alone.
    Unknown { namespace: String, last_read: Option<Arc<Lease>> },
}

impl Tenures {
    /// Tenures of the member Leases in `namespace`.
    pub fn new(namespace: &str) -> Self {
        Tenures { namespace: namespace.to_string(), ..Default::default() }
    }

    /// Take in the member Leases as they are now.
    pub fn update(&mut self, members: &[Arc<Lease>], now: Instant) {
        let mut current: HashMap<String, String> = HashMap::new();
        for m in members {
            if let Some(revoked) = annotation(m, REVOKED_ANNOTATION) {
                self.revoked(revoked, now);
            }
            let Some(id) = tenure_id(m) else { continue };
            let rv = m.resource_version();
            match self.seen.get_mut(&id) {
                Some(s) if s.revoked => {}
                Some(s) if s.version == rv && s.version.is_some() => {}
                Some(s) => *s = Seen { version: rv.clone(), since: now, revoked: false, witnessed: true },
                None => {
                    self.seen
                        .insert(id.clone(), Seen { version: rv.clone(), since: now, revoked: false, witnessed: true });
                }
            }
            current.insert(id, m.name_any());
        }
        // A tenure whose member Lease is elsewhere now has left it: it ages from this first sighting and never again
        // becomes young.
        for (id, s) in &mut self.seen {
            if s.version.is_some() && !current.contains_key(id) {
                s.version = None;
                s.since = now;
            }
        }
        self.members = members.iter().map(|m| (m.name_any(), m.clone())).collect();
    }

    /// How long `tenure` has been seen unchanged. A tenure never seen before starts its clock now.
    pub fn unchanged(&mut self, tenure: &str, now: Instant) -> Duration {
        let s = self.seen.entry(tenure.to_string()).or_insert(Seen {
            version: None,
            since: now,
            revoked: false,
            witnessed: false,
        });
        if s.revoked { Duration::MAX } else { now.saturating_duration_since(s.since) }
    }

    /// How long to treat `lease` as unchanged: the younger of its own clock and its tenure's (a Lease no tenure
    /// vouches for, written by a replica that renews it itself, has only its own).
    pub fn vouched_unchanged(&mut self, lease: Option<&Lease>, own: Duration, now: Instant) -> Duration {
        match lease.and_then(vouched_by) {
            Some(t) => own.min(self.unchanged(t, now)),
            None => own,
        }
    }

    /// What must happen before a Lease vouched for by `tenure` (whose member Lease it says is in `namespace`;
    /// `None`: this replica's own) is taken over, judged now: `None` while the tenure is not expired (it may have been
    /// renewed since a Lease it vouches for was judged expired). A revocation is made under the very version this
    /// replica has seen unchanged for `duration`.
    pub fn ending(
        &mut self,
        tenure: &str,
        namespace: Option<&str>,
        duration: Duration,
        now: Instant,
    ) -> Option<Ending> {
        if self.unchanged(tenure, now) < duration {
            return None;
        }
        let s = self.seen.get(tenure)?;
        if !s.witnessed {
            let namespace = namespace.unwrap_or(&self.namespace).to_string();
            let last_read = self.read.get(&(tenure.to_string(), namespace.clone())).cloned();
            return Some(Ending::Unknown { namespace, last_read });
        }
        Some(match self.members.get(member_of(tenure)) {
            _ if s.revoked || s.version.is_none() => Ending::Over,
            Some(m) if tenure_id(m).as_deref() == Some(tenure) && m.resource_version() == s.version => {
                Ending::Revoke(m.clone())
            }
            _ => Ending::Over,
        })
    }

    /// Record that `tenure` was found renewed by a write or read of its member Lease that this replica's watch has
    /// not shown yet: it is young again from `now` (unless revoked meanwhile). The version to revoke under stays the
    /// one last seen, so a revocation before the watch catches up fails again (once per lease duration, not per pass).
    pub fn renewed(&mut self, tenure: &str, now: Instant) {
        let s = self.seen.entry(tenure.to_string()).or_insert(Seen {
            version: None,
            since: now,
            revoked: false,
            witnessed: false,
        });
        if !s.revoked {
            s.since = now;
        }
    }

    /// Record `member` as read in `tenure` (in its namespace), a tenure never seen in the member watch
    /// ([`Ending::Unknown`]).
    pub fn read_in(&mut self, tenure: &str, member: Arc<Lease>) {
        self.read.insert((tenure.to_string(), member.namespace().unwrap_or_default()), member);
    }

    /// Record that `tenure` was revoked (by this replica or, as its member Lease says, another).
    pub fn revoked(&mut self, tenure: &str, now: Instant) {
        let seen = Seen { version: None, since: now, revoked: true, witnessed: true };
        self.seen.insert(tenure.to_string(), seen);
    }

    /// Forget tenures over for longer than `keep` (nothing names them any more, or if something still does, it is
    /// judged as never seen: conservatively, from scratch).
    pub fn prune(&mut self, keep: Duration, now: Instant) {
        self.seen.retain(|_, s| s.version.is_some() || now.saturating_duration_since(s.since) < keep);
        let seen = &self.seen;
        self.read.retain(|(t, _), _| seen.contains_key(t));
    }
}

/// What a [`revoke`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Written: the holder loses its tenure at its next renewal, and has stopped acting by now (it did not renew for
    /// a lease duration).
    Ended,
    /// The member Lease is gone: nothing can renew it any more, but it may have been renewed until just before it
    /// was deleted (after it was seen), so its holder may act until a renew deadline after that.
    Gone,
    /// Renewed since it was seen: its holder is alive.
    Renewed,
}

/// End `tenure` by writing its member Lease as `seen`, under the resourceVersion seen: the holder loses it at its
/// next renewal.
pub async fn revoke(api: &Api<Lease>, seen: &Lease, tenure: &str) -> Result<Revocation> {
    let mut lease = seen.clone();
    lease.metadata.annotations.get_or_insert_with(Default::default).insert(REVOKED_ANNOTATION.into(), tenure.into());
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    match api.replace(&seen.name_any(), &Default::default(), &lease).await {
        Ok(_) => Ok(Revocation::Ended),
        Err(e) if crate::error::gone(&e) => Ok(Revocation::Gone),
        Err(e) if crate::error::api_code(&e) == Some(409) => Ok(Revocation::Renewed),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn member(uid: &str, transitions: i32, rv: &str, holder: Option<&str>) -> Arc<Lease> {
        Arc::new(Lease {
            metadata: ObjectMeta {
                name: Some("bgjobs-member-a".into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        })
    }

    fn vouched(tenure: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(TENURE_ANNOTATION.to_string(), tenure.to_string())])),
                ..Default::default()
            },
            spec: None,
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_renewed_tenure_stays_young_and_a_silent_one_ages() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        let id = tenure_id(&member("u1", 0, "1", Some("a"))).unwrap();
        t.update(&[member("u1", 0, "1", Some("a"))], t0);
        assert_eq!(t.unchanged(&id, t0 + S(5)), S(5));
        t.update(&[member("u1", 0, "2", Some("a"))], t0 + S(6));
        assert_eq!(t.unchanged(&id, t0 + S(8)), S(2), "a renewal resets the clock");
        t.update(&[member("u1", 0, "2", Some("a"))], t0 + S(30));
        assert_eq!(t.unchanged(&id, t0 + S(30)), S(24), "seen unchanged since the renewal");
        assert!(t.ending(&id, None, S(15), t0 + S(20)).is_none(), "renewed 14 s ago: not expired");
        assert!(
            matches!(t.ending(&id, None, S(15), t0 + S(30)), Some(Ending::Revoke(m)) if m.resource_version().as_deref() == Some("2")),
            "still in the tenure: revoke under the version seen unchanged"
        );
    }

    #[test]
    fn a_tenure_left_behind_ages_from_the_first_sighting_of_the_change_and_never_gets_young() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        let old = tenure_id(&member("u1", 0, "1", Some("a"))).unwrap();
        t.update(&[member("u1", 0, "1", Some("a"))], t0);
        // The replica restarted and took its member Lease over: a new tenure, renewed often.
        t.update(&[member("u1", 1, "5", Some("a"))], t0 + S(2));
        for i in 3..20 {
            t.update(&[member("u1", 1, &format!("{}", 5 + i), Some("a"))], t0 + S(i));
        }
        assert_eq!(t.unchanged(&old, t0 + S(20)), S(18));
        assert!(
            matches!(t.ending(&old, None, S(15), t0 + S(20)), Some(Ending::Over)),
            "nothing to revoke: the tenure is over"
        );
        // A member Lease deleted by hand ends its tenure too.
        let young = tenure_id(&member("u1", 1, "24", Some("a"))).unwrap();
        t.update(&[], t0 + S(21));
        assert_eq!(t.unchanged(&young, t0 + S(25)), S(4));
    }

    #[test]
    fn a_revoked_tenure_is_over_at_once_for_every_observer() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        let id = tenure_id(&member("u1", 0, "1", Some("a"))).unwrap();
        t.update(&[member("u1", 0, "1", Some("a"))], t0);
        let mut revoked = (*member("u1", 0, "2", None)).clone();
        revoked.metadata.annotations = Some(BTreeMap::from([(REVOKED_ANNOTATION.to_string(), id.clone())]));
        t.update(&[Arc::new(revoked)], t0 + S(1));
        assert_eq!(t.unchanged(&id, t0 + S(1)), Duration::MAX);
        assert!(matches!(t.ending(&id, None, S(15), t0 + S(1)), Some(Ending::Over)));
    }

    #[test]
    fn a_lease_is_as_young_as_the_younger_of_its_own_clock_and_its_tenures() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        let id = tenure_id(&member("u1", 0, "1", Some("a"))).unwrap();
        t.update(&[member("u1", 0, "1", Some("a"))], t0);
        let l = vouched(&id);
        assert_eq!(t.vouched_unchanged(Some(&l), S(40), t0 + S(3)), S(3), "the tenure renews for it");
        assert_eq!(t.vouched_unchanged(Some(&l), S(1), t0 + S(30)), S(1), "a fresh write counts too");
        let unvouched = Lease::default();
        assert_eq!(t.vouched_unchanged(Some(&unvouched), S(40), t0 + S(3)), S(40), "renewed by its holder itself");
        assert_eq!(t.vouched_unchanged(None, S(7), t0), S(7));
    }

    #[test]
    fn a_tenure_never_seen_starts_its_clock_at_the_first_question_and_its_end_must_be_read() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        assert_eq!(t.unchanged("bgjobs-member-b/u9/0", t0), Duration::ZERO);
        assert_eq!(t.unchanged("bgjobs-member-b/u9/0", t0 + S(16)), S(16));
        assert!(
            matches!(t.ending("bgjobs-member-b/u9/0", None, S(15), t0 + S(16)), Some(Ending::Unknown { .. })),
            "the member watch may lag"
        );
    }

    /// A Lease vouched for by a tenure of another lease namespace (replicas of another deployment, or of the same
    /// one during a change of `--lease-namespace`, that see the same jobs): its member Lease is never in this
    /// replica's watch. It is read where that Lease says, and revoked only once read unchanged there a lease duration
    /// apart: a read in one namespace never counts for another. It was looked for in this replica's namespace, not
    /// found, and taken over while its holder ran on.
    #[test]
    fn a_tenure_of_another_lease_namespace_is_read_there_and_revoked_only_once_read_unchanged() {
        let (mut t, t0) = (Tenures::new("mine"), Instant::now());
        let id = "bgjobs-member-a/u1/0";
        let mut l = vouched(id);
        l.metadata.annotations.as_mut().unwrap().insert(TENURE_MEMBER_ANNOTATION.into(), tenure_member("theirs", id));
        assert_eq!(vouch(&l), Some((id.to_string(), Some("theirs".to_string()))));
        assert_eq!(t.vouched_unchanged(Some(&l), S(40), t0), Duration::ZERO);
        let unknown = t.ending(id, Some("theirs"), S(15), t0 + S(16));
        assert!(
            matches!(&unknown, Some(Ending::Unknown { namespace, last_read: None }) if namespace == "theirs"),
            "{unknown:?}"
        );
        // Read there, still in the tenure: young again, and remembered as read there.
        t.renewed(id, t0 + S(16));
        let mut read = (*member("u1", 0, "7", Some("a"))).clone();
        read.metadata.namespace = Some("theirs".into());
        t.read_in(id, Arc::new(read));
        assert!(t.ending(id, Some("theirs"), S(15), t0 + S(30)).is_none());
        let again = t.ending(id, Some("theirs"), S(15), t0 + S(31));
        assert!(
            matches!(&again, Some(Ending::Unknown { namespace, last_read: Some(m) })
                if namespace == "theirs" && m.resource_version().as_deref() == Some("7")),
            "{again:?}"
        );
        // Another Lease naming another namespace for it is judged there, without the read made elsewhere.
        let elsewhere = t.ending(id, Some("evil"), S(15), t0 + S(31));
        assert!(
            matches!(&elsewhere, Some(Ending::Unknown { namespace, last_read: None }) if namespace == "evil"),
            "{elsewhere:?}"
        );
        // A Lease that does not say (an older replica's), or says it of another tenure (kept through an older
        // replica's take-over), is taken to be of this replica's namespace.
        let mut taken_over = vouched("bgjobs-member-b/u2/0");
        taken_over
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(TENURE_MEMBER_ANNOTATION.into(), tenure_member("theirs", id));
        assert_eq!(vouch(&taken_over), Some(("bgjobs-member-b/u2/0".to_string(), None)));
        t.unchanged("bgjobs-member-b/u2/0", t0);
        let older = t.ending("bgjobs-member-b/u2/0", None, S(15), t0 + S(16));
        assert!(matches!(&older, Some(Ending::Unknown { namespace, .. }) if namespace == "mine"), "{older:?}");
    }

    #[test]
    fn a_tenure_found_renewed_behind_a_lagging_watch_is_young_again_for_a_lease_duration() {
        let (mut t, t0) = (Tenures::default(), Instant::now());
        let id = tenure_id(&member("u1", 0, "1", Some("a"))).unwrap();
        t.update(&[member("u1", 0, "1", Some("a"))], t0);
        assert!(
            matches!(t.ending(&id, None, S(15), t0 + S(16)), Some(Ending::Revoke(_))),
            "the watch shows no renewal"
        );
        // The revocation failed (409): the holder renewed, the watch has not shown it yet.
        t.renewed(&id, t0 + S(16));
        t.update(&[member("u1", 0, "1", Some("a"))], t0 + S(17));
        assert!(t.ending(&id, None, S(15), t0 + S(30)).is_none(), "not judged expired again within a lease duration");
        assert!(
            matches!(t.ending(&id, None, S(15), t0 + S(31)), Some(Ending::Revoke(m)) if m.resource_version().as_deref() == Some("1")),
            "a lease duration later, still unseen: tried again under the version seen"
        );
        // Never witnessed (only named by a Lease): the read that found it current counts the same way.
        let other = "bgjobs-member-b/u9/0";
        t.unchanged(other, t0 + S(20));
        assert!(matches!(t.ending(other, None, S(15), t0 + S(40)), Some(Ending::Unknown { .. })));
        t.renewed(other, t0 + S(40));
        assert!(t.ending(other, None, S(15), t0 + S(50)).is_none());
        // A revoked tenure stays over, whatever a late answer says.
        t.revoked(other, t0 + S(51));
        t.renewed(other, t0 + S(52));
        assert!(matches!(t.ending(other, None, S(15), t0 + S(52)), Some(Ending::Over)));
    }

    #[test]
    fn a_vacant_member_lease_is_in_no_tenure() {
        assert_eq!(tenure_id(&member("u1", 0, "1", None)), None);
        assert_eq!(tenure_id(&member("u1", 3, "1", Some("a"))).as_deref(), Some("bgjobs-member-a/u1/3"));
        assert_eq!(member_of("bgjobs-member-a/u1/3"), "bgjobs-member-a");
    }
}
