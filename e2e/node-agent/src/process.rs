//! A container as a local process: what to run (the first container's command, args and env, as a kubelet would
//! resolve them), how to stop its process group, and how its end is reported.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::process::{Child, Command};

use super::{CANNOT_RUN_EXIT_CODE, LOCALHOST, MESSAGE_MAX_BYTES, MESSAGE_MAX_LINES};

/// How a container ended, as `state.terminated` reports it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Exit {
    pub(super) code: i32,
    pub(super) signal: Option<i32>,
    pub(super) reason: &'static str,
    pub(super) message: Option<String>,
}

impl Exit {
    /// Exit code as a container runtime reports it: the code, or 128 + the signal that killed the process.
    pub(super) fn of(status: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        let (code, signal) = match (status.code(), status.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            (None, None) => (-1, None),
        };
        Exit { code, signal, reason: if code == 0 { "Completed" } else { "Error" }, message: None }
    }

    pub(super) fn cannot_run(message: String) -> Exit {
        Exit { code: CANNOT_RUN_EXIT_CODE, signal: None, reason: "ContainerCannotRun", message: Some(message) }
    }
}

/// The process a container becomes.
#[derive(Debug, PartialEq)]
pub(super) struct Launch {
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) warnings: Vec<String>,
}

/// Work out what to run for `pod`: the first container's command and args, with its env resolved and expanded.
pub(super) fn launch(pod: &Pod) -> Result<Launch, String> {
    let spec = pod.spec.as_ref().ok_or("the Pod has no spec")?;
    let container = spec.containers.first().ok_or("the Pod has no containers")?;
    let mut warnings = Vec::new();
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        warnings.push("init containers are not run by the node agent".to_string());
    }
    if spec.containers.len() > 1 {
        warnings.push(format!("only the first container ({}) runs; the others are ignored", container.name));
    }
    if let Some(policy) = spec.restart_policy.as_deref().filter(|p| *p != "Never") {
        warnings.push(format!("restartPolicy {policy} is treated as Never: the container is not restarted"));
    }
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        warnings.push("envFrom is not supported by the node agent: skipped".to_string());
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let lookup =
        |env: &[(String, String)], name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => expand(value, |n| lookup(&env, n)),
            (None, Some(source)) => match source.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some(path) => match field_value(pod, path) {
                    Some(value) => value,
                    None => {
                        warnings.push(format!("env {}: fieldRef {path} is not supported: skipped", var.name));
                        continue;
                    }
                },
                None => {
                    warnings.push(format!(
                        "env {}: only plain values and fieldRef are supported (not configMapKeyRef, secretKeyRef \
                         or resourceFieldRef): skipped",
                        var.name
                    ));
                    continue;
                }
            },
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }
    let argv: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, |n| lookup(&env, n)))
        .collect();
    if argv.is_empty() {
        return Err(no_command(container));
    }
    Ok(Launch { argv, env, warnings })
}

fn no_command(container: &Container) -> String {
    format!(
        "container {} has no command: the node agent runs no images (image {:?}), only command + args as a local \
         process",
        container.name,
        container.image.as_deref().unwrap_or_default()
    )
}

/// The value of a `fieldRef` path, for the paths a local process can have a meaningful value for.
fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.map(|s| s.service_account_name.clone().unwrap_or_default()),
        "status.podIP" | "status.hostIP" | "status.podIPs" | "status.hostIPs" => Some(LOCALHOST.to_string()),
        _ => keyed("metadata.labels['", &meta.labels).or_else(|| keyed("metadata.annotations['", &meta.annotations)),
    }
}

/// Expand `$(NAME)` references as the kubelet does: a defined name is replaced by its value, `$$` is an escaped
/// `$`, and anything else (undefined names, unterminated references, a lone `$`) stays as written.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|r| r.split_once(')')) {
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Start `launch` in `dir` as the leader of a new process group (so that signals to the group reach everything it
/// starts, `sh -c` and its children, and nothing else), stdout and stderr appended to `log`. The environment is not
/// inherited: only `PATH`, `HOSTNAME` and `HOME` (the scratch directory) are set before the container's own `env`.
pub(super) fn spawn(launch: &Launch, hostname: &str, dir: &Path, log: &Path) -> std::io::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    Command::new(&launch.argv[0])
        .args(&launch.argv[1..])
        .env_clear()
        .env("PATH", path)
        .env("HOSTNAME", hostname)
        .env("HOME", dir)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        // A backstop only (it kills just the leader): every path of a Pod task waits for its child explicitly.
        .kill_on_drop(true)
        .spawn()
}

/// Send `signal` to the process group `pgid` with the `kill` command (the crate has no unsafe code, so no libc).
pub(super) async fn signal_group(pgid: u32, signal: &str) -> bool {
    // pgid 0 or 1 would mean "our own group" or init's: never.
    if pgid <= 1 {
        return false;
    }
    Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// SIGTERM to the group, SIGKILL if the process outlives `grace`; returns how it ended and whether it needed
/// SIGKILL.
pub(super) async fn stop_process(child: &mut Child, pgid: u32, grace: Duration) -> (std::io::Result<ExitStatus>, bool) {
    signal_group(pgid, "TERM").await;
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => (status, false),
        Err(_) => {
            signal_group(pgid, "KILL").await;
            (child.wait().await, true)
        }
    }
}

/// The last lines of a log file, within the kubelet's limits for a termination message.
pub(super) fn log_tail(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MESSAGE_MAX_BYTES))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(MESSAGE_MAX_LINES)..].join("\n");
    (!tail.trim().is_empty()).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use serde_json::json;

    use crate::test_pod as pod;

    #[test]
    fn expansion_follows_the_kubelet() {
        let vars = |n: &str| match n {
            "A" => Some("1".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand("x$(A)y", vars), "x1y");
        assert_eq!(expand("$(EMPTY)|$(MISSING)", vars), "|$(MISSING)");
        assert_eq!(expand("$$(A) $$ $", vars), "$(A) $ $");
        assert_eq!(expand("$(A", vars), "$(A");
        assert_eq!(expand("cost: $5", vars), "cost: $5");
    }

    #[test]
    fn the_first_containers_command_args_and_env_make_the_process() {
        let p = pod(json!({
            "restartPolicy": "OnFailure",
            "containers": [
                {"name": "main", "image": "busybox", "command": ["sh", "-c"], "args": ["echo $(GREETING) $$HOME"],
                 "env": [
                     {"name": "WHO", "value": "world"},
                     {"name": "GREETING", "value": "hello $(WHO)"},
                     {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                     {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                     {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                     {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                 ]},
                {"name": "sidecar", "image": "x"},
            ],
        }));
        let l = launch(&p).unwrap();
        assert_eq!(l.argv, ["sh", "-c", "echo hello world $HOME"]);
        let env: HashMap<_, _> = l.env.iter().cloned().collect();
        assert_eq!(env["POD"], "p");
        assert_eq!(env["APP"], "a");
        assert_eq!(env["IP"], LOCALHOST);
        assert!(!env.contains_key("SECRET"));
        assert_eq!(l.warnings.len(), 3, "{:?}", l.warnings);
    }

    #[test]
    fn a_container_without_command_cannot_run() {
        let p = pod(json!({"containers": [{"name": "main", "image": "nginx"}]}));
        assert!(launch(&p).unwrap_err().contains("no command"));
    }

    #[test]
    fn exit_codes_are_reported_like_a_container_runtime() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(Exit::of(ExitStatus::from_raw(0)).reason, "Completed");
        let failed = Exit::of(ExitStatus::from_raw(3 << 8));
        assert_eq!((failed.code, failed.reason), (3, "Error"));
        let killed = Exit::of(ExitStatus::from_raw(15));
        assert_eq!((killed.code, killed.signal), (143, Some(15)));
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = std::env::temp_dir().join(format!("bgjobs-nodeagent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path).unwrap();
        assert!(tail.ends_with("line 999"));
        assert!(tail.lines().count() <= MESSAGE_MAX_LINES);
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
