//! The replicas of a chaos run: test-worker processes that can be killed, paused, terminated and started again
//! (under the same identity or a new one), each fault written to `faults.jsonl` as it is injected.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bgjobs_history::FaultLine;

use crate::common;

pub use crate::common::test_worker_bin;

/// Appends fault lines to `<dir>/faults.jsonl`.
#[derive(Clone)]
pub struct FaultLog(PathBuf);

impl FaultLog {
    pub fn new(dir: &Path) -> FaultLog {
        FaultLog(dir.join("faults.jsonl"))
    }

    pub fn record(&self, kind: &str, target: &str, detail: impl Into<String>) {
        let line = FaultLine {
            t_ms: jiff::Timestamp::now().as_millisecond(),
            kind: kind.into(),
            target: target.into(),
            detail: detail.into(),
        };
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.0).unwrap();
        writeln!(f, "{}", serde_json::to_string(&line).unwrap()).unwrap();
        eprintln!("chaos: {} {} {}", line.kind, line.target, line.detail);
    }
}

/// How one member of the fleet is started.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    /// Kubeconfig (the admin's, a proxied one, or the second apiserver's).
    pub kubeconfig: PathBuf,
    /// Its clock runs this many ms ahead (libfaketime), 0 for the real clock.
    pub clock_offset_ms: i64,
    /// Its `--recurring-claim-ahead`: members differ, as while a change of it rolls out.
    pub claim_ahead: &'static str,
    /// A word for how it reaches the apiserver, for the run's log.
    pub via: &'static str,
}

/// One replica slot of the fleet; its process comes and goes.
pub struct Member {
    pub spec: MemberSpec,
    pub identity: String,
    generation: u32,
    child: Option<Child>,
    pub paused: bool,
}

/// The fleet.
pub struct Fleet {
    dir: PathBuf,
    ns: String,
    flags: Vec<String>,
    pub members: Vec<Member>,
    pub faults: FaultLog,
}

impl Fleet {
    /// Start one replica per spec with `flags` (besides namespace, identity, logs and fast leases).
    pub fn start(dir: &Path, ns: &str, flags: &[&str], specs: Vec<MemberSpec>) -> Fleet {
        let mut fleet = Fleet {
            dir: dir.to_path_buf(),
            ns: ns.to_string(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            members: Vec::new(),
            faults: FaultLog::new(dir),
        };
        for (i, spec) in specs.into_iter().enumerate() {
            let member = Member { spec, identity: format!("r{i}"), generation: 0, child: None, paused: false };
            fleet.members.push(member);
            fleet.spawn(i);
        }
        fleet
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", m.identity)))
            .unwrap();
        let mut cmd = Command::new(test_worker_bin());
        common::without_ambient_settings(&mut cmd)
            .arg("operator")
            .args(["--namespace", &self.ns, "--identity", &m.identity])
            .args(["--exec-log", &self.dir.join(format!("{}.exec", m.identity)).display().to_string()])
            .args(common::FAST_LEASES)
            .args(common::LOOPBACK_ENDPOINTS)
            // The checker audits every job at the end of the run: none may be deleted by retention before.
            .args(["--retention", "finished=never"])
            .args(["--recurring-claim-ahead", m.spec.claim_ahead])
            .args(&self.flags)
            .env("KUBECONFIG", &m.spec.kubeconfig)
            .env("RUST_LOG", "info,bgjobs=debug,kube=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if m.spec.clock_offset_ms != 0 {
            cmd.env("LD_PRELOAD", crate::common::faketime_lib())
                .env("FAKETIME", format!("{:+}", m.spec.clock_offset_ms / 1000))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
            self.faults.record("clock-offset", &m.identity, m.spec.clock_offset_ms.to_string());
        }
        eprintln!("chaos: {} reaches the cluster through the {}", m.identity, m.spec.via);
        let child = cmd.spawn().expect("start the test worker");
        let m = &mut self.members[i];
        m.child = Some(child);
        m.paused = false;
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.members[i].child {
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
        }
    }

    /// `kill -9` member `i`; it is started again later by [`Fleet::restart`].
    pub fn kill9(&mut self, i: usize) {
        self.signal(i, "-KILL");
        self.faults.record("kill9", &self.members[i].identity.clone(), "");
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM member `i` and wait (bounded) for its graceful exit.
    pub fn terminate(&mut self, i: usize, timeout: Duration) {
        self.signal(i, "-CONT");
        self.signal(i, "-TERM");
        self.faults.record("term", &self.members[i].identity.clone(), "");
        let start = std::time::Instant::now();
        while let Some(c) = self.members[i].child.as_mut() {
            if let Ok(Some(_)) = c.try_wait() {
                self.members[i].child = None;
                return;
            }
            if start.elapsed() > timeout {
                self.kill9(i);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start member `i` again: under its old identity, or a new one.
    pub fn restart(&mut self, i: usize, new_identity: bool) {
        if self.members[i].child.is_some() {
            return;
        }
        if new_identity {
            let m = &mut self.members[i];
            m.generation += 1;
            m.identity = format!("r{i}-g{}", m.generation);
        }
        self.faults.record("start", &self.members[i].identity.clone(), if new_identity { "new identity" } else { "" });
        self.spawn(i);
    }

    /// SIGSTOP member `i`.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.members[i].paused = true;
        self.faults.record("stop", &self.members[i].identity.clone(), "");
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.members[i].paused = false;
        self.faults.record("cont", &self.members[i].identity.clone(), "");
    }

    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Resume every paused member and start every stopped one: the end of the fault schedule.
    pub fn heal(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].paused {
                self.resume(i);
            }
            if !self.running(i) {
                self.restart(i, false);
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A small deterministic random source (xorshift64*): the seed printed by the run reproduces its schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..hi` milliseconds.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}
