//! Which Kubernetes Events a replica records.
//!
//! Events are objects in etcd too (kept an hour by the apiserver's default `--event-ttl`): two per successful job at
//! 50 jobs/s keep ~360,000 of them alive, more than the queue itself. So by default only what a person needs when
//! something goes wrong is recorded (retries, failures, give-ups, takeovers, interruptions, cancellations, skips, waits,
//! recurring ticks missed), and the happy path (claimed, succeeded, a recurring job created) is left to metrics and logs.

use clap::ValueEnum;

/// How many Events to record (`--events`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum EventLevel {
    /// Every Event, the happy path included: one `Claimed` per attempt and a `Succeeded` per job (`true` before).
    #[value(alias = "true")]
    All,
    /// What a person needs when something goes wrong: retries, failures, abandonment, takeovers, interruptions,
    /// cancellations, skipped jobs and ticks, recurring jobs not created, jobs waiting for a deleted job's Pod (the
    /// default).
    #[default]
    Problems,
    /// None (`false` before).
    #[value(alias = "false")]
    Off,
}

/// Reasons of the happy path: recorded only with [`EventLevel::All`]. `Progress` is a worker's reported progress
/// (one per change of it).
pub const HAPPY_PATH: [&str; 4] = ["Claimed", "Succeeded", "JobCreated", "Progress"];

/// Whether an Event with `reason` is recorded at `level`.
pub fn records(level: EventLevel, reason: &str) -> bool {
    match level {
        EventLevel::All => true,
        EventLevel::Problems => !HAPPY_PATH.contains(&reason),
        EventLevel::Off => false,
    }
}

/// How many of a job's attempts get Events of their own (an Event per reason and attempt); later attempts' Events of
/// a reason are counted in one Event's series ([`on_attempt`]).
pub const ATTEMPTS_APART: i32 = 5;

/// The action and note of an Event on attempt `attempt` of a job. The first [`ATTEMPTS_APART`] attempts are named
/// apart (`Attempt3`), so each shows in `kubectl describe` and `bgjobs describe`: kube's recorder folds Events of
/// equal reason, action and object into one series. Later attempts share one action (`Attempt6+`), so a job retried
/// with no backoff, a failure a second for as long as its timeout, adds to one Event's count (a write, no new object
/// in etcd) rather than storing an Event per attempt. A series keeps its first note, so that note says so.
pub fn on_attempt(attempt: i32, note: String) -> (String, String) {
    if attempt <= ATTEMPTS_APART {
        return (format!("Attempt{attempt}"), note);
    }
    let folded = format!(
        "{note} (the Event for attempt {} and on: its count says how many; the job's status has the latest)",
        ATTEMPTS_APART + 1
    );
    (format!("Attempt{}+", ATTEMPTS_APART + 1), folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason bgjobs records, on jobs and on recurring definitions.
    const PROBLEMS: [&str; 18] = [
        "Retrying",
        "Failed",
        "Abandoned",
        "TakenOver",
        "Cancelled",
        "Skipped",
        "TickSkipped",
        "TickNotClaimed",
        "JobNotCreated",
        "PodNotStopping",
        "PodNotStarting",
        "TooLarge",
        "ResultDropped",
        "Interrupted",
        "WaitingForPod",
        "ForeignLease",
        "ClaimRefused",
        "DeleteRefused",
    ];

    #[test]
    fn by_default_only_problems_are_recorded() {
        let level = EventLevel::default();
        assert_eq!(level, EventLevel::Problems);
        for reason in PROBLEMS {
            assert!(records(level, reason), "{reason} is recorded by default");
        }
        for reason in HAPPY_PATH {
            assert!(!records(level, reason), "{reason} is the happy path: not recorded by default");
        }
    }

    #[test]
    fn all_records_everything_and_off_nothing() {
        for reason in PROBLEMS.iter().chain(HAPPY_PATH.iter()) {
            assert!(records(EventLevel::All, reason));
            assert!(!records(EventLevel::Off, reason));
        }
    }

    #[test]
    fn a_jobs_first_attempts_have_events_apart_and_later_ones_share_one() {
        let actions: Vec<String> = (1..=8).map(|a| on_attempt(a, "failed".into()).0).collect();
        assert_eq!(
            actions,
            ["Attempt1", "Attempt2", "Attempt3", "Attempt4", "Attempt5", "Attempt6+", "Attempt6+", "Attempt6+"]
        );
        assert_eq!(on_attempt(5, "attempt 5 failed".into()).1, "attempt 5 failed");
        let (_, folded) = on_attempt(6, "attempt 6 failed".into());
        assert!(folded.starts_with("attempt 6 failed") && folded.contains("count"), "{folded}");
    }

    #[test]
    fn the_old_boolean_values_still_parse() {
        let parse = |s: &str| EventLevel::from_str(s, false);
        assert_eq!(parse("true"), Ok(EventLevel::All));
        assert_eq!(parse("false"), Ok(EventLevel::Off));
        assert_eq!(parse("problems"), Ok(EventLevel::Problems));
        assert!(parse("some").is_err());
    }
}
