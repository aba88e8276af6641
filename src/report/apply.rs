//! A report that reached this replica, applied: its token checked against the job as the apiserver has it (a quorum
//! read, never a cache), judged ([`super::decide`]), and written with the same fenced write as an in-process outcome
//! ([`crate::status::write_fenced`]), whichever replica holds the attempt's claim. The holder learns of it from its
//! watch of the job and gives the claim back ([`super::wait`]).

use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::info;

use super::decide::{self, Change, Refusal, Report};
use super::token;
use crate::api::{BackgroundJob, Phase};
use crate::retry::Verdict;
use crate::status::{self, Fence, Fenced};
use crate::worker::Worker;

/// A report written into its job.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    /// `namespace/name`.
    pub job: String,
    /// The attempt it was for.
    pub attempt: i32,
    /// The job's phase now.
    pub phase: Phase,
    /// What happened, in words.
    pub message: String,
    /// Whether the report was written into the job: `false` for a heartbeat sooner than the job's write gap after
    /// the last one recorded (answered, not written; progress it carried is not kept: report it again later).
    pub written: bool,
}

/// How often a report is judged again when the job moved between the read and the write (a takeover, a holder's
/// own write): each round reads the job afresh.
const ROUNDS: usize = 5;

/// Check, judge and write `report`, presented with `token`.
pub async fn apply(worker: &Worker, token: &str, report: Report) -> Result<Applied, Refusal> {
    decide::check(&report)?;
    let parsed = token::parse(token).map_err(|e| Refusal::new(401, e))?;
    let claims = &parsed.claims;
    // What the token names is not trusted yet: it goes into an apiserver path only once it is a valid name.
    if !crate::names::is_dns1123_subdomain(&claims.namespace) || !crate::names::is_dns1123_subdomain(&claims.name) {
        return Err(Refusal::new(401, "the token does not name a job"));
    }
    let name = format!("{}/{}", claims.namespace, claims.name);
    let jobs: Api<BackgroundJob> = Api::namespaced(worker.client.clone(), &claims.namespace);
    for _ in 0..ROUNDS {
        let job = match crate::unreadable::get_opt_without_args(&jobs, &claims.name).await {
            Ok(Some(j)) => j,
            Ok(None) => return Err(Refusal::new(404, format!("job {name} does not exist (any more)"))),
            Err(e) => {
                tracing::warn!(job = %name, error = %e, "cannot read a reported job");
                return Err(Refusal::new(503, format!("cannot read job {name}; try again")));
            }
        };
        // The signature first: without a valid token, nobody learns whether a guessed UID matches.
        if !parsed.signed_for(&job) {
            return Err(Refusal::new(
                401,
                format!("the token's signature does not match job {name}: it was not issued for this job and attempt"),
            ));
        }
        if job.uid().as_deref() != Some(claims.uid.as_str()) {
            return Err(Refusal::new(
                404,
                format!("the job this token was issued for is gone: {name} is another job created under that name"),
            ));
        }
        if decide::already_recorded(&job, claims, &report) {
            let outcome = if job.phase() == Phase::Succeeded { "succeeded" } else { "failed" };
            let message = format!("already recorded: attempt {} of job {name} {outcome}", claims.attempt);
            return Ok(Applied { job: name, attempt: claims.attempt, phase: job.phase(), message, written: true });
        }
        let now = worker.clock.now();
        let change = decide::judge(&job, claims, &report, now)?;
        if let Change::Noted { recorded, every } = change {
            let message = format!(
                "heartbeat noted, not written: attempt {} was last recorded at {recorded}, and heartbeats are written \
                 every {}s at most (progress that changes, every {}s)",
                claims.attempt,
                every.as_secs_f64(),
                decide::write_gap(&job, true).as_secs_f64()
            );
            tracing::debug!(job = %name, attempt = claims.attempt, "{message}");
            return Ok(Applied { job: name, attempt: claims.attempt, phase: job.phase(), message, written: false });
        }
        let holder = job.status.as_ref().and_then(|s| s.worker.clone()).unwrap_or_default();
        let fence = Fence { uid: claims.uid.clone(), worker: holder, attempt: claims.attempt };
        match status::write_fenced(&jobs, &job, &fence, |s| decide::apply(s, &change, now)).await {
            Ok(Fenced::Written(written)) => return Ok(recorded(worker, &written, claims.attempt, &change, &job)),
            // Moved since the read (taken over, or its attempt ended): judged again on a fresh read.
            Ok(Fenced::Stale) => continue,
            // Not to be tried again: only a smaller report (no result, a shorter message) can fit.
            Err(e) if e.is_too_large_for_etcd() => {
                return Err(Refusal::new(
                    413,
                    format!(
                        "job {name}'s status cannot hold this report beside its spec (etcd: request is too large): a \
                         result or message may be too large (store a result elsewhere and report its address), or \
                         the job's spec leaves no room for reports"
                    ),
                ));
            }
            Err(e) => return Err(Refusal::new(503, format!("cannot write job {name}; try again: {e}"))),
        }
    }
    Err(Refusal::new(503, format!("job {name} kept changing while the report was written; try again")))
}

/// Count, log and publish what a written report did.
fn recorded(worker: &Worker, job: &BackgroundJob, attempt: i32, change: &Change, before: &BackgroundJob) -> Applied {
    let phase = job.phase();
    let message = match change {
        Change::Heartbeat { progress } => {
            let old = before.status.as_ref().and_then(|s| s.progress.clone());
            if let Some(p) = progress
                .as_ref()
                .filter(|p| Some((p.percent, &p.message)) != old.as_ref().map(|o| (o.percent, &o.message)))
            {
                let percent = p.percent.map(|n| format!("{n}% ")).unwrap_or_default();
                let note = format!("attempt {attempt}: {percent}{}", p.message.as_deref().unwrap_or(""));
                worker.event(job, EventType::Normal, "Progress", note.trim_end().to_string());
            }
            format!("heartbeat recorded for attempt {attempt}")
        }
        Change::Noted { .. } => "heartbeat noted".to_string(),
        Change::Result(r) => {
            format!(
                "result recorded for attempt {attempt} ({} bytes); the attempt ends when its Pod exits",
                r.to_string().len()
            )
        }
        Change::Outcome { verdict, result } => {
            worker.metrics.count_outcome(phase);
            match verdict {
                Verdict::Succeed => {
                    let shown = result.as_ref().map(|r| format!("; result: {}", excerpt(r))).unwrap_or_default();
                    worker.event(
                        job,
                        EventType::Normal,
                        "Succeeded",
                        format!("attempt {attempt} succeeded (reported by its worker){shown}"),
                    );
                    format!("attempt {attempt} succeeded")
                }
                Verdict::RetryAt { at, reason } => {
                    worker.event(
                        job,
                        EventType::Warning,
                        "Retrying",
                        format!("attempt {attempt} failed: {reason}; next attempt at {at}"),
                    );
                    format!("attempt {attempt} failed; next attempt at {at}")
                }
                Verdict::Fail(reason) => {
                    worker.event(job, EventType::Warning, "Failed", reason.clone());
                    format!("the job failed: {reason}")
                }
                Verdict::Abandon(reason) => {
                    worker.event(job, EventType::Warning, "Abandoned", reason.clone());
                    format!("the job was abandoned: {reason}")
                }
            }
        }
    };
    let name = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
    info!(job = %name, attempt, %phase, "report applied: {message}");
    Applied { job: name, attempt, phase, message, written: true }
}

/// The start of a result, for an Event's note.
fn excerpt(result: &serde_json::Value) -> String {
    let text = result.to_string();
    if text.chars().count() <= 200 { text } else { format!("{}…", text.chars().take(200).collect::<String>()) }
}
