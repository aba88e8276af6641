//! How long this process has seen each watched thing unchanged, on its own monotonic clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Tracks, on this process's monotonic clock, since when each watched thing has been seen unchanged.
///
/// A "thing" is a key (a job, a slot, a key Lease, a member) and its version: a Lease's resourceVersion, or the
/// absence of a Lease (`None`). Callers put into the version everything whose change must restart the clock; a job
/// claim's version also carries the job's phase and attempt, so "no Lease while Waiting" never counts towards
/// "no Lease while Running". Anything not observed in the latest [`Observer::retain`] is forgotten.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (Option<String>, Instant)>,
}

impl Observer {
    /// Record the current version of `key` at `now`; returns how long it has been seen unchanged.
    pub fn observe(&mut self, key: &str, version: Option<&str>, now: Instant) -> Duration {
        match self.seen.get_mut(key) {
            Some((v, since)) if v.as_deref() == version => now.saturating_duration_since(*since),
            Some(entry) => {
                *entry = (version.map(str::to_string), now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(key.to_string(), (version.map(str::to_string), now));
                Duration::ZERO
            }
        }
    }

    /// Forget `key`.
    pub fn forget(&mut self, key: &str) {
        self.seen.remove(key);
    }

    /// Forget every key for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }

    /// Whether nothing is tracked.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_lease_ages_on_the_observers_clock_and_a_change_resets_it() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        assert_eq!(o.observe("l", Some("1"), t0), Duration::ZERO);
        assert_eq!(o.observe("l", Some("1"), t0 + Duration::from_secs(7)), Duration::from_secs(7));
        assert_eq!(o.observe("l", Some("2"), t0 + Duration::from_secs(8)), Duration::ZERO);
        assert_eq!(o.observe("l", Some("2"), t0 + Duration::from_secs(10)), Duration::from_secs(2));
    }

    #[test]
    fn absence_is_tracked_like_a_version_and_forgotten_keys_start_over() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        o.observe("l", None, t0);
        assert_eq!(o.observe("l", None, t0 + Duration::from_secs(3)), Duration::from_secs(3));
        o.retain(|_| false);
        assert!(o.is_empty());
        assert_eq!(o.observe("l", None, t0 + Duration::from_secs(4)), Duration::ZERO);
    }
}
