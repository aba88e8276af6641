//! The chaos run's workload and its recorders: the jobs it enqueues, the HTTP endpoint that records the HTTP
//! jobs' executions, and the status recorder process.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bgjobs::api::RecurringBackgroundJob;
use bgjobs_history::ExecLine;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{NodeAgent, TestEnv};
use crate::fleet::{Rng, test_worker_bin};

pub use crate::common::Recorder;

/// An HTTP endpoint on loopback whose "work" (300 ms) is recorded like a handler's, under the calling replica's
/// identity (`X-BGJobs-Worker`).
pub struct HttpWorker {
    pub url: String,
}

impl HttpWorker {
    pub async fn start(dir: &Path) -> HttpWorker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/work", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("http.exec")).unwrap(),
        ));
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, log.clone()));
            }
        });
        HttpWorker { url }
    }
}

async fn serve(mut sock: tokio::net::TcpStream, log: Arc<Mutex<std::fs::File>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = sock.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
            .unwrap_or_default()
            .to_string()
    };
    let line = |ev: &str| ExecLine {
        ev: ev.into(),
        uid: header("Idempotency-Key"),
        job: header("X-BGJobs-Job"),
        attempt: header("X-BGJobs-Attempt").parse().unwrap_or(0),
        worker: header("X-BGJobs-Worker"),
        t_ms: jiff::Timestamp::now().as_millisecond(),
        key: None,
        leases: Vec::new(),
        // Written with the test's clock, not the calling replica's (which may be offset).
        clock: Some("test".into()),
    };
    let write = |l: ExecLine| {
        let _ = writeln!(log.lock().unwrap(), "{}", serde_json::to_string(&l).unwrap());
    };
    write(line("start"));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        write(line("tick"));
    }
    write(line("finish"));
    let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
}

/// What the run enqueues.
pub struct Workload {
    jobs: Api<bgjobs::api::BackgroundJob>,
    defs: Api<RecurringBackgroundJob>,
    /// Where Pod-mode jobs go; None: the workload has none.
    placement: Option<serde_json::Value>,
    pod_log: PathBuf,
    http_url: String,
    next: u32,
}

/// The recurring definitions and their schedules. `uneven` (ticks 8 s, then 22 s apart) is the one whose ticks are
/// claimed ahead: :08 and :38 by each member's whole lead (3 to 10 s, `chaos::members`), but no sooner than halfway
/// from the tick before; :00 and :30 only by a member whose lead is at most 4 s.
const DEFINITIONS: [(&str, &str); 3] =
    [("every-3s", "*/3 * * * * *"), ("every-5s", "*/5 * * * * *"), ("uneven", "0,8,30,38 * * * * *")];

impl Workload {
    /// Every kind of job, Pod-mode jobs on `agent`'s node; without an agent, in-process jobs where Pod-mode jobs
    /// would be.
    pub fn new(env: &TestEnv, agent: Option<&NodeAgent>, http_url: &str) -> Workload {
        Workload {
            jobs: env.jobs.clone(),
            defs: Api::namespaced(env.client.clone(), &env.ns),
            placement: agent.map(NodeAgent::placement),
            pod_log: env.dir.join("pods.exec"),
            http_url: http_url.to_string(),
            next: 0,
        }
    }

    /// The recurring definitions ([`DEFINITIONS`]): `record` jobs every few seconds.
    pub async fn define_recurring(&self) {
        for (name, schedule) in DEFINITIONS {
            let def: RecurringBackgroundJob = serde_json::from_value(json!({
                "apiVersion": "bgjobs.dev/v1", "kind": "RecurringBackgroundJob",
                "metadata": {"name": name},
                "spec": {"schedule": schedule, "successfulJobsHistoryLimit": 2,
                         "jobTemplate": {"spec": {"jobName": "record", "args": {"ms": 200}}}}
            }))
            .unwrap();
            self.defs.create(&PostParams::default(), &def).await.expect("create a recurring definition");
        }
    }

    /// Suspend the definitions: no more ticks, so the run can drain.
    pub async fn stop_recurring(&self) {
        for (name, _) in DEFINITIONS {
            let suspend = Patch::Merge(json!({"spec": {"suspend": true}}));
            let _ = self.defs.patch(name, &PatchParams::default(), &suspend).await;
        }
    }

    /// Create `n` jobs of a random mix.
    pub async fn enqueue_batch(&mut self, rng: &mut Rng, n: u32) {
        for _ in 0..n {
            let spec = self.random_spec(rng);
            let name = format!("j{:05}", self.next);
            self.next += 1;
            let mut job = crate::common::fixtures::JobBuilder::new(&name, spec.0);
            if spec.1 {
                job = job.label("chaos.bgjobs.dev/expect-retries", "true");
            }
            let job = job.build();
            // The apiserver may be restarting: a failed create is simply not part of the run.
            let _ = self.jobs.create(&PostParams::default(), &job).await;
        }
    }

    /// A job spec, and whether it is meant to fail and be retried. `CHAOS_POISON=0` leaves poison jobs out (to look
    /// for other breaks on a build where poison jobs wedge everything).
    fn random_spec(&self, rng: &mut Rng) -> (serde_json::Value, bool) {
        let priority = ["Low", "Normal", "Normal", "High"][rng.below(4) as usize];
        let ms = 100 + rng.below(600);
        let poison = std::env::var("CHAOS_POISON").map_or(true, |v| v != "0");
        match rng.below(40) {
            0 if !poison => (json!({"jobName": "record", "args": {"ms": ms}}), false),
            // A poison job: its args make the built-in sleep fail (they used to panic it and leak a slot on every
            // replica that tried it).
            0 => (json!({"jobName": "sleep", "args": {"seconds": 1e20}}), true),
            // At most once: a lost attempt fails the job, and only a fault on its holder may explain that.
            1..=5 => (json!({"jobName": "record", "args": {"ms": ms}, "retry": {"maxAttempts": 1}}), false),
            6..=19 => (json!({"jobName": "record", "priority": priority, "args": {"ms": ms}}), false),
            20..=25 => (
                json!({"jobName": "record", "concurrencyKey": format!("tenant-{}", rng.below(4)), "args": {"ms": ms}}),
                false,
            ),
            26..=29 => (
                json!({"jobName": "record", "args": {"ms": 100, "fail_until_attempt": 2},
                       "retry": {"backoffSeconds": 1}}),
                true,
            ),
            30..=35 => (json!({"jobName": "call", "http": {"url": self.http_url}}), false),
            _ if self.placement.is_none() => (json!({"jobName": "record", "args": {"ms": ms}}), false),
            _ => {
                let mut pod_spec = json!({"containers": [{
                    "name": "work", "image": "busybox",
                    "command": [test_worker_bin().display().to_string(), "pod", "--ms", "400"],
                    "env": [{"name": "BGJOBS_EXEC_LOG", "value": self.pod_log.display().to_string()}],
                }]});
                let placement = self.placement.as_ref().and_then(|p| p.as_object()).cloned().unwrap_or_default();
                pod_spec.as_object_mut().unwrap().extend(placement);
                (json!({"jobName": "pod-work", "template": {"spec": pod_spec}}), false)
            }
        }
    }
}
