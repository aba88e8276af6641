//! What the client-side CLI commands do against the cluster, and how they print it (`--output table|json|yaml`).

use std::time::Duration;

use clap::ValueEnum;
use jiff::Timestamp;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::api::{BackgroundJob, RecurringBackgroundJob};
use crate::error::{Error, Result};

/// How a command prints what it found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
    /// YAML.
    Yaml,
}

/// Jobs (or definitions) in one namespace, every namespace, or the kubeconfig context's namespace.
pub fn scoped<K>(client: Client, namespace: Option<&str>, all: bool) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match (namespace, all) {
        (_, true) => Api::all(client),
        (Some(ns), _) => Api::namespaced(client, ns),
        (None, _) => Api::default_namespaced(client),
    }
}

fn print_structured<T: Serialize>(value: &T, output: Output) -> Result<()> {
    print!("{}", structured(value, output)?);
    Ok(())
}

/// `value` as JSON or YAML text. A job's `args` are kept as the JSON text the apiserver stored, which JSON output
/// shows as it is (the text its handler gets); YAML is written from a JSON value, or, for arguments nested deeper
/// than a value is read, as the JSON text (JSON is YAML too) rather than fail a command whose change has landed.
fn structured<T: Serialize>(value: &T, output: Output) -> Result<String> {
    let json = || serde_json::to_string_pretty(value).map(|text| text + "\n");
    Ok(match output {
        Output::Json => json()?,
        Output::Yaml => match serde_json::to_value(value) {
            Ok(tree) => serde_yaml::to_string(&tree).map_err(|e| Error::Invalid(e.to_string()))?,
            Err(_) => json()?,
        },
        Output::Table => unreachable!("tables are printed by each command"),
    })
}

/// What a command that changed a job prints: `line` for a table, else the job as it now is.
pub fn print_changed(job: &BackgroundJob, line: String, output: Output) -> Result<()> {
    match output {
        Output::Table => {
            println!("{line}");
            Ok(())
        }
        structured => print_structured(job, structured),
    }
}

/// `bgjobs list`: jobs in queue order.
pub async fn list(api: &Api<BackgroundJob>, output: Output) -> Result<()> {
    let mut jobs = crate::jobs::list(api).await?;
    jobs.sort_by_key(crate::ordering::QueueKey::of);
    if output != Output::Table {
        return print_structured(&jobs, output);
    }
    let now = Timestamp::now();
    println!(
        "{:<40} {:<10} {:<12} {:<10} {:>8}  {:<24} AGE",
        "NAME", "PHASE", "PRIORITY", "QUEUE", "ATTEMPTS", "WORKER"
    );
    for j in &jobs {
        let age =
            j.metadata.creation_timestamp.as_ref().map(|t| now.duration_since(t.0).unsigned_abs()).unwrap_or_default();
        println!(
            "{:<40} {:<10} {:<12} {:<10} {:>8}  {:<24} {}",
            j.name_any(),
            j.phase().to_string(),
            j.spec.priority.to_string(),
            j.spec.queue,
            j.attempts(),
            j.status.as_ref().and_then(|s| s.worker.as_deref()).unwrap_or(""),
            short_age(age)
        );
    }
    Ok(())
}

/// `bgjobs stats`: counts by state; with `watch`, refreshed every `interval` until interrupted.
pub async fn stats(api: &Api<BackgroundJob>, output: Output, watch: bool, interval: Duration) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let jobs = crate::jobs::list(api).await?;
        let c = crate::jobs::counts(&jobs, Timestamp::now());
        if watch && tty && output == Output::Table {
            print!("\x1b[H\x1b[2J"); // home + clear: a refreshing table
        }
        match output {
            Output::Table => {
                for (name, n) in [
                    ("waiting", c.waiting),
                    ("scheduled", c.scheduled),
                    ("running", c.running),
                    ("succeeded", c.succeeded),
                    ("failed", c.failed),
                    ("abandoned", c.abandoned),
                    ("cancelled", c.cancelled),
                    ("skipped", c.skipped),
                ] {
                    println!("{name:<10} {n}");
                }
                if watch {
                    println!("\n(every {}s; Ctrl-C to stop)", interval.as_secs());
                }
            }
            other => print_structured(&c, other)?,
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

/// One line of a job's history, from its Events.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryLine {
    /// When.
    pub time: Option<String>,
    /// Event reason: Claimed, Retrying, Succeeded, Failed, TakenOver, ...
    pub reason: String,
    /// What happened.
    pub note: String,
    /// The replica that reported it.
    pub reporter: String,
    /// How often it happened: an Event's series counts repeats, e.g. a job's retries past its first few attempts.
    pub count: i32,
    /// When it last happened, if more than once.
    pub last_time: Option<String>,
}

/// A job with its history, as `bgjobs describe` shows it.
#[derive(Debug, Serialize)]
pub struct Described {
    /// The job as stored.
    pub job: BackgroundJob,
    /// Its Events, oldest first: how attempts went wrong (retries, failures, takeovers, ...); with the operator's
    /// `--events all` also one `Claimed` per attempt and the success.
    pub history: Vec<HistoryLine>,
}

/// The Events of one job, oldest first (Events expire after the apiserver's event TTL, one hour by default).
pub async fn history(client: &Client, job: &BackgroundJob) -> Result<Vec<HistoryLine>> {
    let events: Api<Event> = Api::namespaced(client.clone(), &job.namespace().unwrap_or_default());
    let uid = job.uid();
    // Only this job's, asked of the apiserver and read in pages: a busy namespace holds hundreds of thousands.
    let mut params = kube::api::ListParams::default().limit(500);
    if let Some(uid) = &uid {
        params = params.fields(&format!("regarding.uid={uid}"));
    }
    let mut found = Vec::new();
    loop {
        let page = events.list(&params).await?;
        found.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(next) => params = params.continue_token(&next),
            None => break,
        }
    }
    let mut lines: Vec<(Option<Timestamp>, HistoryLine)> = found
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.clone()) == uid)
        .map(|e| {
            let t =
                e.event_time.as_ref().map(|t| t.0).or_else(|| e.deprecated_last_timestamp.as_ref().map(|t: &Time| t.0));
            let line = HistoryLine {
                time: t.map(|t| t.to_string()),
                reason: e.reason.unwrap_or_default(),
                note: e.note.unwrap_or_default(),
                reporter: e.reporting_instance.unwrap_or_default(),
                count: e.series.as_ref().map_or(1, |s| s.count),
                last_time: e.series.map(|s| s.last_observed_time.0.to_string()),
            };
            (t, line)
        })
        .collect();
    lines.sort_by_key(|(t, _)| *t);
    Ok(lines.into_iter().map(|(_, l)| l).collect())
}

/// `bgjobs describe NAME`: spec, status, conditions and the attempt history.
pub async fn describe(client: &Client, api: &Api<BackgroundJob>, name: &str, output: Output) -> Result<()> {
    // A job the operator cannot read is shown as its stand-in: its status says why it failed.
    let job = crate::unreadable::get_opt(api, name)
        .await?
        .ok_or_else(|| Error::Invalid(format!("no BackgroundJob {name:?}")))?;
    let described = Described { history: history(client, &job).await?, job };
    if output != Output::Table {
        return print_structured(&described, output);
    }
    let j = &described.job;
    let s = j.status.clone().unwrap_or_default();
    let t = |t: &Option<Time>| t.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| "-".into());
    println!("Name:          {}/{}", j.namespace().unwrap_or_default(), j.name_any());
    println!("Job:           {}", j.spec.job_name);
    println!("Priority:      {}   Queue: {}", j.spec.priority, j.spec.queue);
    if let Some(key) = &j.spec.concurrency_key {
        println!("Concurrency:   key {key:?}, {:?}", j.spec.concurrency_policy.unwrap_or_default());
    }
    let max = j.spec.retry.max_attempts.map_or("until timeout".to_string(), |m| m.to_string());
    println!(
        "Retry:         max attempts {max}, backoff {}s x {}",
        j.spec.retry.backoff_seconds, j.spec.retry.backoff_factor
    );
    println!("Phase:         {}", j.phase());
    println!("Attempts:      {}", s.attempts);
    println!("Worker:        {}", s.worker.as_deref().unwrap_or("-"));
    println!(
        "Started:       {}   Completed: {}   Next attempt: {}",
        t(&s.start_time),
        t(&s.completion_time),
        t(&s.next_attempt_time)
    );
    println!("Last error:    {}", s.last_error.as_deref().unwrap_or("-"));
    if s.awaiting_report || s.last_heartbeat_time.is_some() {
        let waiting = if s.awaiting_report { "waiting for its worker's report" } else { "not waiting" };
        let timeout = j
            .spec
            .heartbeat_timeout_seconds
            .map_or("no heartbeat timeout".to_string(), |t| format!("heartbeat timeout {t}s"));
        println!("Report:        {waiting}; last heard from {} ({timeout})", t(&s.last_heartbeat_time));
    }
    if let Some(p) = &s.progress {
        let percent = p.percent.map(|n| format!("{n}%")).unwrap_or_else(|| "-".into());
        println!("Progress:      {percent} {} (at {})", p.message.as_deref().unwrap_or(""), t(&p.time));
    }
    if let Some(r) = &s.result {
        println!("Result:        {r}");
    }
    for c in &s.conditions {
        println!("Condition:     {}={} ({}): {}", c.type_, c.status, c.reason, c.message);
    }
    println!("History:");
    if described.history.is_empty() {
        println!("  (no events: none yet, or expired)");
    }
    for h in &described.history {
        let repeats = match &h.last_time {
            Some(last) => format!(" [{} times, the last at {last}]", h.count),
            None => String::new(),
        };
        println!("  {:<28} {:<11} {:<20} {}{repeats}", h.time.as_deref().unwrap_or("-"), h.reason, h.reporter, h.note);
    }
    Ok(())
}

/// `bgjobs recurring list`.
pub async fn recurring_list(api: &Api<RecurringBackgroundJob>, output: Output) -> Result<()> {
    // A definition the operator cannot read is listed as its stand-in (its status says why) rather than failing all.
    let defs = crate::unreadable::list(api).await?;
    if output != Output::Table {
        return print_structured(&defs, output);
    }
    println!("{:<32} {:<20} {:<8} {:<22} {:<22} ACTIVE", "NAME", "SCHEDULE", "SUSPEND", "LAST", "NEXT");
    for d in defs {
        let s = d.status.clone().unwrap_or_default();
        let time = |t: Option<Time>| t.map(|t| t.0.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<20} {:<8} {:<22} {:<22} {}",
            d.name_any(),
            d.spec.schedule,
            d.spec.suspend,
            time(s.last_schedule_time),
            time(s.next_schedule_time),
            s.active.len()
        );
    }
    Ok(())
}

/// `bgjobs recurring trigger NAME`.
pub async fn recurring_trigger(client: &Client, api: &Api<RecurringBackgroundJob>, name: &str) -> Result<()> {
    let def = crate::client::get_opt(api, name)
        .await?
        .ok_or_else(|| Error::Invalid(format!("no RecurringBackgroundJob {name:?}")))?;
    if def.deletion_requested() {
        return Err(Error::Invalid(format!(
            "RecurringBackgroundJob {name:?} is being deleted (its deletion waits for a finalizer): it makes no more jobs"
        )));
    }
    let job = crate::recurring::trigger(client, &def).await?;
    println!("backgroundjob.bgjobs.dev/{} created", job.name_any());
    Ok(())
}

fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `describe` asks the apiserver for the job's Events only, in pages: a namespace's every Event, hundreds of
    /// thousands where jobs are busy, was read to keep a few.
    #[tokio::test]
    async fn a_jobs_history_asks_for_its_events_only_and_reads_every_page() {
        let event = |reason: &str, at: &str| {
            serde_json::json!({"metadata": {"name": reason}, "eventTime": at, "regarding": {"uid": "uid-1"},
                "reason": reason, "note": "n", "reportingInstance": "r"})
        };
        let mut folded = event("Retrying", "2026-01-01T00:00:00.000000Z");
        folded["series"] = serde_json::json!({"count": 7, "lastObservedTime": "2026-01-01T00:00:04.000000Z"});
        let first = vec![folded];
        let second = vec![event("Failed", "2026-01-01T00:00:05.000000Z")];
        let (client, sent) = crate::testing::scripted_client(move |s| {
            let later = s.query.contains("continue=");
            let items = if later { second.clone() } else { first.clone() };
            let more = if later { "" } else { "page-2" };
            let list = serde_json::json!({"apiVersion": "events.k8s.io/v1", "kind": "EventList",
                "metadata": {"continue": more}, "items": items});
            (200, list)
        });
        let mut job = BackgroundJob::new("j", crate::jobs::spec("noop", serde_json::json!({})));
        job.metadata.namespace = Some("ns".into());
        job.metadata.uid = Some("uid-1".into());
        let lines = history(&client, &job).await.unwrap();
        let reasons: Vec<(&str, i32)> = lines.iter().map(|l| (l.reason.as_str(), l.count)).collect();
        assert_eq!(reasons, [("Retrying", 7), ("Failed", 1)], "a series counts its repeats");
        assert_eq!(lines[0].last_time.as_deref(), Some("2026-01-01T00:00:04Z"));
        let queries: Vec<String> = sent.lock().unwrap().iter().map(|s| s.query.clone()).collect();
        assert_eq!(queries.len(), 2, "{queries:?}");
        assert!(
            queries.iter().all(|q| q.contains("fieldSelector=regarding.uid%3Duid-1") && q.contains("limit=500")),
            "{queries:?}"
        );
        assert!(queries[1].contains("continue=page-2"), "{queries:?}");
    }

    /// A job's `args`, kept as JSON text, are written as YAML like the rest of the job, and as stored in JSON.
    #[test]
    fn a_jobs_args_are_written_as_yaml_like_the_rest() {
        let job = BackgroundJob::new("j", crate::jobs::spec("noop", serde_json::json!({"a": 1, "b": ["x"]})));
        let yaml = structured(&job, Output::Yaml).unwrap();
        assert!(yaml.contains("args:\n    a: 1\n    b:\n    - x\n"), "{yaml}");
        let json = structured(&job, Output::Json).unwrap();
        assert!(json.contains(r#""args": {"a":1,"b":["x"]},"#), "as stored: {json}");
        let deep = format!(r#"{{"a":{}1{}}}"#, "[".repeat(200), "]".repeat(200));
        let mut deep_job = job.clone();
        deep_job.spec.args = Some(serde_json::from_str(&deep).unwrap());
        let yaml = structured(&deep_job, Output::Yaml).expect("written although too deep for a value");
        assert!(yaml.contains(&deep), "as its JSON text: {yaml}");
    }
}
