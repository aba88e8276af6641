//! Faults in the local control plane's own processes (`e2e/cluster.sh` writes their PID files next to the
//! kubeconfig). The control plane is shared by every test and every worktree: keep such faults short.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A process of the local cluster (by its PID file, [`control_plane_pid`]) frozen with SIGSTOP until this is
/// dropped, which sends SIGCONT, also when the test panics. A watchdog process sends SIGCONT after `at_most` in case
/// the test process dies without unwinding (`kill -9`, a harness timeout); it runs in its own process group, so a
/// Ctrl-C of the test run does not kill it.
pub struct Paused {
    pid: u32,
    watchdog: Child,
}

/// kube-controller-manager frozen (no garbage collection, no Job or node controllers).
pub type ControllerManagerPaused = Paused;

impl Paused {
    /// Freeze kube-controller-manager for at most `at_most`.
    pub fn new(at_most: Duration) -> Paused {
        Paused::process("kube-controller-manager", at_most)
    }

    /// Freeze the cluster's process `name` (`kubelet`: a node that stops answering, its containers running on) for
    /// at most `at_most`.
    pub fn process(name: &str, at_most: Duration) -> Paused {
        let pid = control_plane_pid(name);
        let watchdog = Command::new("sh")
            .args(["-c", &format!("sleep {}; kill -CONT {pid}", at_most.as_secs().max(1))])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the SIGCONT watchdog");
        assert!(signal(pid, "-STOP"), "kill -STOP {pid} failed");
        Paused { pid, watchdog }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !signal(self.pid, "-CONT") {
            eprintln!("kill -CONT {} failed: the watchdog will try again", self.pid);
            return;
        }
        // Only the watchdog we started, by its pid (its `sleep` child exits on its own and sends nothing).
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// The PID of a control plane process, from `<kubeconfig dir>/<name>.pid`.
pub fn control_plane_pid(name: &str) -> u32 {
    let file = super::kubeconfig_path().parent().expect("the kubeconfig's directory").join(format!("{name}.pid"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    text.trim().parse().unwrap_or_else(|e| panic!("{}: not a pid: {e}", file.display()))
}

/// Send `sig` to `pid` with the `kill` command; true if it was sent.
fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success())
}
