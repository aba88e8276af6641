//! The history recorder: every BackgroundJob change a watch delivers, as one [`StatusLine`] in `status.jsonl`, and
//! every Lease change in the Lease namespace, as one [`LeaseLine`] in `leases.jsonl`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bgjobs::api::{BackgroundJob, Priority};
use bgjobs_history::{LeaseLine, StatusLine};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};

/// Label that marks a job whose handler is meant to fail and be retried.
pub const EXPECT_RETRIES_LABEL: &str = "chaos.bgjobs.dev/expect-retries";

/// How soon a watch is tried again after it broke: from 250 ms, doubling up to 2 s, and from 250 ms again once it
/// delivers. The operator's watches back off like client-go (up to 30 s), but what the recorder misses while it
/// waits, the checker must guess from what it sees later: after a 16 s apiserver restart, client-go's backoff kept
/// it blind for another 13–19 s.
struct Reconnect(Duration);

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(250);
    const LONGEST: Duration = Duration::from_secs(2);

    fn new() -> Reconnect {
        Reconnect(Self::FIRST)
    }
}

impl Iterator for Reconnect {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.0;
        self.0 = (wait * 2).min(Self::LONGEST);
        Some(wait)
    }
}

impl Backoff for Reconnect {
    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// Record until interrupted (SIGINT/SIGTERM), flushing every line; the Leases of `lease_namespace` too, if given
/// (a benchmark leaves them out: a watch of every claim Lease would weigh on what it measures).
pub async fn run(namespace: &str, lease_namespace: Option<&str>, dir: &Path) -> Result<(), String> {
    let client = kube::Client::try_default().await.map_err(|e| e.to_string())?;
    let leases = match lease_namespace {
        Some(ns) => record_leases(Api::namespaced(client.clone(), ns), dir.join("leases.jsonl")).boxed(),
        None => std::future::pending().boxed(),
    };
    let jobs = record_jobs(Api::namespaced(client, namespace), dir);
    tokio::select! {
        done = jobs => done,
        done = leases => done,
    }
}

/// Every Lease change, until the process ends. Deletions missed while the watch was down are not made up for: the
/// checker asks only who held which Lease.
async fn record_leases(api: Api<Lease>, path: std::path::PathBuf) -> Result<(), String> {
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let stream = watcher::watcher(api, watcher::Config::default()).backoff(Reconnect::new());
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let (lease, deleted) = match event {
            Ok(Event::Apply(l) | Event::InitApply(l)) => (l, false),
            Ok(Event::Delete(l)) => (l, true),
            Ok(Event::Init | Event::InitDone) | Err(_) => continue,
        };
        let labels = lease.labels();
        let kind = if lease.name_any() == bgjobs::wire::EXCLUSIVE_LEASE {
            "exclusive"
        } else if labels.contains_key(bgjobs::wire::JOB_LABEL) {
            "claim"
        } else if labels.contains_key(bgjobs::wire::SLOT_LABEL) {
            "slot"
        } else if labels.contains_key(bgjobs::wire::KEY_LABEL) {
            "key"
        } else if labels.contains_key(bgjobs::wire::MEMBER_LABEL) {
            "member"
        } else {
            ""
        };
        let line = LeaseLine {
            t_ms: jiff::Timestamp::now().as_millisecond(),
            name: lease.name_any(),
            kind: kind.into(),
            holder: bgjobs::wire::holder(&lease).map(str::to_string),
            job_uid: bgjobs::wire::annotation(&lease, bgjobs::wire::JOB_UID_ANNOTATION).map(str::to_string),
            deleted,
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        out.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn record_jobs(api: Api<BackgroundJob>, dir: &Path) -> Result<(), String> {
    let path = dir.join("status.jsonl");
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // First sighting of each job, in ms: a creation time finer than creationTimestamp's whole seconds.
    let mut first_seen: HashMap<String, i64> = HashMap::new();
    // Lists come from the apiserver's watch cache in one response, as the replicas' do (`bgjobs::jobs::watch` says
    // why): a paged list of 100,000 jobs from etcd outlives the watch cache's window on a busy machine and starts
    // over, again and again, while the queue moves on unrecorded.
    let stream = bgjobs::jobs::watch(api).backoff(Reconnect::new());
    futures::pin_mut!(stream);
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    // The last line of every job believed alive, and the jobs of a re-list in progress: a job deleted while the
    // watch was down (an apiserver restart) shows up only as missing from the re-list, never as a Delete event.
    let mut alive: HashMap<String, StatusLine> = HashMap::new();
    let mut relist: Option<std::collections::HashSet<String>> = None;
    let mut write = |line: &StatusLine| -> Result<(), String> {
        let mut text = serde_json::to_string(line).unwrap_or_default();
        text.push('\n');
        out.write_all(text.as_bytes()).map_err(|e| e.to_string())
    };
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else { return Ok(()) };
        let now = jiff::Timestamp::now().as_millisecond();
        let (job, deleted) = match event {
            Ok(Event::Init) => {
                relist = Some(Default::default());
                continue;
            }
            Ok(Event::InitDone) => {
                let seen = relist.take().unwrap_or_default();
                let gone: Vec<String> = alive.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                for uid in gone {
                    let mut last = alive.remove(&uid).unwrap();
                    (last.t_ms, last.deleted) = (now, true);
                    write(&last)?;
                }
                continue;
            }
            Ok(Event::Apply(j) | Event::InitApply(j)) => (j, false),
            Ok(Event::Delete(j)) => (j, true),
            Err(_) => continue,
        };
        let uid = job.uid().unwrap_or_default();
        if let Some(seen) = relist.as_mut() {
            seen.insert(uid.clone());
        }
        let created_ms = *first_seen.entry(uid.clone()).or_insert(now);
        let line = line(&job, now, created_ms, deleted);
        // A re-list repeats every job; only a version not yet recorded is a change (a benchmark counts the lines as
        // the queue's writes).
        if !deleted && alive.get(&uid).is_some_and(|last| last.rv == line.rv || older(&line.rv, &last.rv)) {
            continue;
        }
        if deleted {
            alive.remove(&uid);
        } else {
            alive.insert(uid, line.clone());
        }
        write(&line)?;
    }
}

/// Whether version `a` is older than `b` (a list served from a watch cache may trail the watch's last event). Compared
/// as numbers, which the apiserver's etcd revisions are; versions that do not parse are never older.
fn older(a: &str, b: &str) -> bool {
    matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a < b)
}

fn line(job: &BackgroundJob, t_ms: i64, created_ms: i64, deleted: bool) -> StatusLine {
    let status = job.status.clone().unwrap_or_default();
    let priority = match job.spec.priority {
        Priority::Low => -2,
        Priority::BelowNormal => -1,
        Priority::Normal => 0,
        Priority::AboveNormal => 1,
        Priority::High => 2,
    };
    let tick_ms = job
        .annotations()
        .get(bgjobs::wire::SCHEDULED_TIME_ANNOTATION)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond());
    let recurring = job
        .owner_references()
        .iter()
        .find(|o| o.kind == "RecurringBackgroundJob")
        .map(|o| format!("{}/{}", job.namespace().unwrap_or_default(), o.name));
    // As the operator counts it (`BackgroundJob::counted_from`): from the end of the second creationTimestamp names.
    let counted_from_ms = job.creation_timestamp().map_or(created_ms, |t| (t.0.as_second() + 1) * 1000);
    let not_before_ms = job.spec.delay_seconds.filter(|d| *d > 0).map(|d| counted_from_ms + d * 1000);
    StatusLine {
        t_ms,
        uid: job.uid().unwrap_or_default(),
        job: format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()),
        rv: job.resource_version().unwrap_or_default(),
        phase: status.phase.map(|p| p.to_string()).unwrap_or_default(),
        attempts: status.attempts,
        worker: status.worker.clone(),
        priority,
        created_s: job.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0),
        seq: bgjobs::wire::enqueue_sequence(job).unwrap_or(i64::MAX),
        created_ms,
        not_before_ms,
        recurring,
        tick_ms,
        expect_retries: job.labels().contains_key(EXPECT_RETRIES_LABEL) || job.spec.job_name == "fail",
        pod: job.spec.template.is_some(),
        deleted,
        started_ms: status.start_time.map(|t| t.0.as_millisecond()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_watch_is_tried_again_within_two_seconds_and_from_a_quarter_second_once_it_delivered() {
        let mut reconnect = Reconnect::new();
        let waits: Vec<u64> = reconnect.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(waits, [250, 500, 1_000, 2_000, 2_000, 2_000]);
        reconnect.reset();
        assert_eq!(reconnect.next(), Some(Duration::from_millis(250)));
    }
}
