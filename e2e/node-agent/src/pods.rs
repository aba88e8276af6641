//! The Pods bound to the node: one task per Pod, from its first sighting in the watch to its deletion. A task runs
//! the container (see [`super::process`]), reports each transition through `pods/status`, stops the process when
//! the Pod is deleted, finalizes the deletion, and removes the Pod's scratch directory once the Pod is gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodIP,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::watcher::Event;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::process::{Exit, launch, log_tail, signal_group, spawn, stop_process};
use super::{CONTAINER_ID_PREFIX, LOCALHOST, LOST_EXIT_CODE, MAX_GRACE, container_pid, update_status};
use bgjobs::error::api_code;

/// What the agent shares with every Pod task.
pub(super) struct Shared {
    pub(super) client: Client,
    pub(super) pods_dir: PathBuf,
    pub(super) logs_dir: PathBuf,
    pub(super) keep_dirs: bool,
    /// Bounds Pod status writes and deletions: hundreds of Pods finishing at once queue here instead of opening
    /// hundreds of connections to the apiserver.
    pub(super) writes: Semaphore,
    /// Cancelled when the agent shuts down.
    pub(super) stop: CancellationToken,
}

/// What the watch has told a Pod's task.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Signal {
    /// The Pod exists and is not being deleted.
    Live,
    /// The Pod is being deleted: stop the process within this grace period, then finalize.
    Delete(Duration),
    /// The Pod object is gone.
    Gone,
}

/// How a Pod's task begins, from the Pod as first seen.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Start {
    /// Pending: run its container.
    Run,
    /// Running, but not by this agent run: the process was lost with an earlier run.
    Lost,
    /// Already finished, or being deleted before it ran: nothing to run.
    Idle,
}

/// One task per Pod bound to the node, keyed by Pod UID, for as long as the Pod exists.
pub(super) struct PodTable {
    shared: Arc<Shared>,
    entries: HashMap<String, watch::Sender<Signal>>,
    tasks: JoinSet<()>,
    /// UIDs listed since the watch (re)started its list, to forget Pods deleted while it was not watching.
    relisted: Option<HashSet<String>>,
}

impl PodTable {
    pub(super) fn new(shared: Arc<Shared>) -> PodTable {
        PodTable { shared, entries: HashMap::new(), tasks: JoinSet::new(), relisted: None }
    }

    /// How many Pods the table has a task for.
    pub(super) fn tracked(&self) -> usize {
        self.entries.len()
    }

    /// Stop every task: each kills its process (SIGKILL at most [`MAX_GRACE`] after SIGTERM) and writes one last
    /// status. Waits for them up to `deadline`, then abandons the rest; false if it had to.
    pub(super) async fn stop(&mut self, deadline: Duration) -> bool {
        self.shared.stop.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        let drained = tokio::time::timeout(deadline, drain).await.is_ok();
        if !drained {
            self.tasks.abort_all();
        }
        drained
    }

    /// Apply one watch event.
    pub(super) fn handle(&mut self, event: Event<Pod>) {
        while self.tasks.try_join_next().is_some() {}
        match event {
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(seen), Some(uid)) = (self.relisted.as_mut(), pod.uid()) {
                    seen.insert(uid);
                }
                self.apply(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.take() {
                    let gone: Vec<String> = self.entries.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                    for uid in gone {
                        self.gone(&uid);
                    }
                }
            }
            Event::Apply(pod) => self.apply(pod),
            Event::Delete(pod) => {
                if let Some(uid) = pod.uid() {
                    self.gone(&uid);
                }
            }
        }
    }

    fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.uid() else { return };
        let deleting = pod.metadata.deletion_timestamp.is_some().then(|| grace_period(&pod));
        if let Some(signal) = self.entries.get(&uid) {
            if let Some(grace) = deleting {
                signal.send_if_modified(|s| {
                    let first = *s == Signal::Live;
                    if first {
                        *s = Signal::Delete(grace);
                    }
                    first
                });
            }
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let start = match phase {
            "Succeeded" | "Failed" => Start::Idle,
            _ if deleting.is_some() => Start::Idle,
            "Running" => Start::Lost,
            _ => Start::Run,
        };
        let (tx, rx) = watch::channel(deleting.map_or(Signal::Live, Signal::Delete));
        self.entries.insert(uid, tx);
        let task = PodTask::new(self.shared.clone(), pod, rx);
        self.tasks.spawn(task.run(start));
    }

    fn gone(&mut self, uid: &str) {
        if let Some(signal) = self.entries.remove(uid) {
            let _ = signal.send(Signal::Gone);
        }
    }
}

/// The grace period for stopping a Pod's process: the deletion's, else the Pod's, at most [`MAX_GRACE`].
fn grace_period(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(seconds.max(0) as u64).min(MAX_GRACE)
}

/// One Pod, from the first sight of it to its deletion.
struct PodTask {
    shared: Arc<Shared>,
    /// The Pod as last read or written by this task (the base of the next conditional status write).
    pod: Pod,
    signal: watch::Receiver<Signal>,
    api: Api<Pod>,
    /// `<namespace>/<name>`, for logs.
    key: String,
    /// The scratch directory (the process's working directory) and the log file.
    dir: PathBuf,
    log: PathBuf,
}

impl PodTask {
    fn new(shared: Arc<Shared>, pod: Pod, signal: watch::Receiver<Signal>) -> PodTask {
        let ns = pod.namespace().unwrap_or_default();
        let file = format!("{ns}_{}_{}", pod.name_any(), pod.uid().unwrap_or_default());
        PodTask {
            api: Api::namespaced(shared.client.clone(), &ns),
            key: format!("{ns}/{}", pod.name_any()),
            dir: shared.pods_dir.join(&file),
            log: shared.logs_dir.join(format!("{file}.log")),
            shared,
            pod,
            signal,
        }
    }

    async fn run(mut self, start: Start) {
        match start {
            Start::Run => self.run_container().await,
            Start::Lost => self.report_lost().await,
            Start::Idle => {}
        }
        self.linger().await;
    }

    fn current(&self) -> Signal {
        *self.signal.borrow()
    }

    /// Run the container to its end, or until the Pod is deleted or the agent stops; report every transition.
    async fn run_container(&mut self) {
        if self.current() != Signal::Live {
            return;
        }
        let started = Time(jiff::Timestamp::now());
        let launch = match launch(&self.pod) {
            Ok(launch) => launch,
            Err(message) => {
                warn!(pod = %self.key, %message, "cannot run the Pod");
                self.report_exit(None, &started, Exit::cannot_run(message)).await;
                return;
            }
        };
        for warning in &launch.warnings {
            warn!(pod = %self.key, "{warning}");
        }
        let mut child = match spawn(&launch, &self.pod.name_any(), &self.dir, &self.log) {
            Ok(child) => child,
            Err(e) => {
                let message = format!("cannot start {:?}: {e}", launch.argv[0]);
                warn!(pod = %self.key, %message, "cannot run the Pod");
                self.report_exit(None, &started, Exit::cannot_run(message)).await;
                return;
            }
        };
        // Our child is the leader of a new process group whose id is its pid: signals to the group reach
        // everything it started (`sh -c` and its children) and nothing else.
        let pid = child.id().unwrap_or_default();
        info!(pod = %self.key, pid, argv = ?launch.argv, "started");
        let pod = self.pod.clone();
        if !self.write_status(|s| running_status(s, &pod, pid, &started)).await {
            // Gone before it could even be reported: nobody will read a status; just stop the process.
            let _ = stop_process(&mut child, pid, Duration::ZERO).await;
            signal_group(pid, "KILL").await;
            return;
        }
        let (status, why) = loop {
            tokio::select! {
                status = child.wait() => break (status, None),
                changed = self.signal.changed() => {
                    let signal = if changed.is_ok() { self.current() } else { Signal::Gone };
                    let grace = match signal {
                        Signal::Live => continue,
                        Signal::Delete(grace) => grace,
                        Signal::Gone => grace_period(&self.pod),
                    };
                    let (status, killed) = stop_process(&mut child, pid, grace).await;
                    break (status, Some(stop_reason("the Pod was deleted", grace, killed)));
                }
                _ = self.shared.stop.cancelled() => {
                    let grace = grace_period(&self.pod);
                    let (status, killed) = stop_process(&mut child, pid, grace).await;
                    break (status, Some(stop_reason("the node agent is shutting down", grace, killed)));
                }
            }
        };
        // A container ends with all of its processes: kill whatever the main process left behind in its group.
        // (The group id cannot have been reused while any member lives, and pids are handed out cyclically.)
        signal_group(pid, "KILL").await;
        let mut exit = match status {
            Ok(status) => Exit::of(status),
            Err(e) => Exit { code: -1, signal: None, reason: "Error", message: Some(format!("wait failed: {e}")) },
        };
        if exit.code != 0 && exit.message.is_none() {
            exit.message = log_tail(&self.log);
        }
        if let Some(why) = why {
            exit.message = Some(match exit.message {
                Some(tail) => format!("{why}\n{tail}"),
                None => why,
            });
        }
        info!(pod = %self.key, pid, exit_code = exit.code, "finished");
        if self.current() != Signal::Gone {
            self.report_exit(Some(pid), &started, exit).await;
        }
    }

    /// A Pod Running without a process of ours: its process was lost with an earlier agent run.
    async fn report_lost(&mut self) {
        let earlier = first_container_status(&self.pod).and_then(container_pid);
        let message = format!(
            "the node agent restarted and no longer has this container's process{}; it is not restarted \
             (restartPolicy is treated as Never)",
            earlier.map(|pid| format!(" (pid {pid}, left alone)")).unwrap_or_default()
        );
        warn!(pod = %self.key, "{message}");
        let started = first_container_status(&self.pod)
            .and_then(|s| s.state.as_ref()?.running.as_ref()?.started_at.clone())
            .unwrap_or_else(|| Time(jiff::Timestamp::now()));
        let exit =
            Exit { code: LOST_EXIT_CODE, signal: None, reason: "ContainerStatusUnknown", message: Some(message) };
        self.report_exit(earlier, &started, exit).await;
    }

    async fn report_exit(&mut self, pid: Option<u32>, started: &Time, exit: Exit) {
        let pod = self.pod.clone();
        self.write_status(|s| terminated_status(s, &pod, pid, started, &exit)).await;
    }

    /// Write a status change (see [`update_status`]). False if the Pod is gone.
    async fn write_status(&mut self, apply: impl Fn(&mut PodStatus)) -> bool {
        let result = update_status(&self.api, &self.pod, Some(&self.shared.writes), |pod: &mut Pod| {
            apply(pod.status.get_or_insert_with(Default::default))
        })
        .await;
        match result {
            Ok(Some(pod)) => {
                self.pod = pod;
                true
            }
            Ok(None) => false,
            Err(e) => {
                warn!(pod = %self.key, error = %e, "could not write the Pod status");
                true
            }
        }
    }

    /// After the container: finalize the deletion when the Pod is deleted, clean up when it is gone.
    async fn linger(&mut self) {
        let mut finalized = false;
        loop {
            match self.current() {
                Signal::Delete(_) if !finalized => {
                    finalized = true;
                    self.finalize().await;
                }
                Signal::Gone => break,
                _ => {}
            }
            tokio::select! {
                changed = self.signal.changed() => if changed.is_err() { break },
                _ = self.shared.stop.cancelled() => return,
            }
        }
        if !self.shared.keep_dirs {
            let (dir, log) = (self.dir.clone(), self.log.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(dir);
                let _ = std::fs::remove_file(log);
            })
            .await;
        }
    }

    /// Complete a graceful deletion as a kubelet does once the containers are stopped: delete with grace period 0,
    /// only this Pod (UID precondition), never a new one of the same name.
    async fn finalize(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: self.pod.uid(), resource_version: None }),
            ..Default::default()
        };
        for attempt in 0..5 {
            let result = {
                let _permit = self.shared.writes.acquire().await.expect("the semaphore is never closed");
                self.api.delete(&self.pod.name_any(), &dp).await
            };
            match result {
                Ok(_) => {
                    info!(pod = %self.key, "deletion finalized");
                    return;
                }
                Err(e) if matches!(api_code(&e), Some(404) | Some(409)) => return,
                Err(e) => {
                    warn!(pod = %self.key, error = %e, "could not finalize the deletion; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}

fn stop_reason(why: &str, grace: Duration, killed: bool) -> String {
    if killed {
        format!("stopped by the node agent: {why} (SIGTERM, then SIGKILL after {}s)", grace.as_secs())
    } else {
        format!("stopped by the node agent: {why} (SIGTERM)")
    }
}

fn first_container_status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn container_status(pod: &Pod, pid: Option<u32>, state: ContainerState, running: bool) -> ContainerStatus {
    let container = pod.spec.as_ref().and_then(|s| s.containers.first());
    ContainerStatus {
        name: container.map(|c| c.name.clone()).unwrap_or_default(),
        image: container.and_then(|c| c.image.clone()).unwrap_or_default(),
        image_id: String::new(),
        container_id: pid.map(|pid| format!("{CONTAINER_ID_PREFIX}{pid}")),
        ready: running,
        started: Some(running),
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    }
}

fn set_pod_condition(conditions: &mut Vec<PodCondition>, type_: &str, on: bool, reason: Option<&str>, now: &Time) {
    let status = if on { "True" } else { "False" };
    let i = conditions.iter().position(|c| c.type_ == type_).unwrap_or_else(|| {
        conditions.push(PodCondition { type_: type_.to_string(), ..Default::default() });
        conditions.len() - 1
    });
    let c = &mut conditions[i];
    if c.status != status || c.last_transition_time.is_none() {
        c.last_transition_time = Some(now.clone());
    }
    c.status = status.to_string();
    c.reason = reason.map(str::to_string);
}

/// Fields every status this agent writes carries.
fn common_status(status: &mut PodStatus, now: &Time) {
    status.host_ip = Some(LOCALHOST.into());
    status.pod_ip = Some(LOCALHOST.into());
    status.pod_ips = Some(vec![PodIP { ip: LOCALHOST.into() }]);
    if status.start_time.is_none() {
        status.start_time = Some(now.clone());
    }
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    set_pod_condition(conditions, "PodScheduled", true, None, now);
    set_pod_condition(conditions, "Initialized", true, None, now);
}

fn running_status(status: &mut PodStatus, pod: &Pod, pid: u32, started: &Time) {
    let now = Time(jiff::Timestamp::now());
    common_status(status, &now);
    status.phase = Some("Running".into());
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    set_pod_condition(conditions, "ContainersReady", true, None, &now);
    set_pod_condition(conditions, "Ready", true, None, &now);
    let state = ContainerState {
        running: Some(ContainerStateRunning { started_at: Some(started.clone()) }),
        ..Default::default()
    };
    status.container_statuses = Some(vec![container_status(pod, Some(pid), state, true)]);
}

fn terminated_status(status: &mut PodStatus, pod: &Pod, pid: Option<u32>, started: &Time, exit: &Exit) {
    let now = Time(jiff::Timestamp::now());
    common_status(status, &now);
    status.phase = Some(if exit.code == 0 { "Succeeded" } else { "Failed" }.into());
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    set_pod_condition(conditions, "ContainersReady", false, Some("PodCompleted"), &now);
    set_pod_condition(conditions, "Ready", false, Some("PodCompleted"), &now);
    let state = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: exit.code,
            signal: exit.signal,
            reason: Some(exit.reason.to_string()),
            message: exit.message.clone(),
            started_at: Some(started.clone()),
            finished_at: Some(now.clone()),
            container_id: pid.map(|pid| format!("{CONTAINER_ID_PREFIX}{pid}")),
        }),
        ..Default::default()
    };
    status.container_statuses = Some(vec![container_status(pod, pid, state, false)]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::test_pod as pod;

    #[test]
    fn grace_periods_are_capped() {
        let mut p = pod(json!({"containers": [], "terminationGracePeriodSeconds": 2}));
        assert_eq!(grace_period(&p), Duration::from_secs(2));
        p.spec.as_mut().unwrap().termination_grace_period_seconds = None;
        assert_eq!(grace_period(&p), MAX_GRACE);
        p.metadata.deletion_grace_period_seconds = Some(0);
        assert_eq!(grace_period(&p), Duration::ZERO);
    }

    #[test]
    fn terminal_status_reports_the_exit_and_is_not_ready() {
        let p = pod(json!({"containers": [{"name": "main", "image": "busybox"}]}));
        let mut status = PodStatus::default();
        let t = Time(jiff::Timestamp::now());
        running_status(&mut status, &p, 42, &t);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let exit = Exit { code: 3, signal: None, reason: "Error", message: Some("boom".into()) };
        terminated_status(&mut status, &p, Some(42), &t, &exit);
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        let cs = &status.container_statuses.as_ref().unwrap()[0];
        assert_eq!(container_pid(cs), Some(42));
        let term = cs.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((term.exit_code, term.reason.as_deref()), (3, Some("Error")));
        let ready = status.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "False");
    }
}
