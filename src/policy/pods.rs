//! The Pod executor's policy: which Pods may the operator create from a job's `spec.template`?
//!
//! The operator creates the Pod with its own RBAC, so a user who may create BackgroundJobs but not Pods would
//! otherwise get any Pod they describe. By default the policy refuses what gives a Pod power over its node or over
//! other workloads' identities:
//! - `privileged`: a container with `securityContext.privileged: true`;
//! - `privilege-escalation`: `securityContext.allowPrivilegeEscalation: true`;
//! - `capabilities`: `securityContext.capabilities.add` beyond `--pod-allowed-capabilities` (default: none);
//! - `host-namespaces`: `hostNetwork`, `hostPID`, `hostIPC`, or a container port with a `hostPort`;
//! - `host-path`: a `hostPath` volume;
//! - `service-account`: a `serviceAccountName` outside `--pod-service-accounts` (default: `default`).
//!
//! and, with no flag to relax them (run such a Pod as a batch/v1 Job, created by someone who may):
//! - `node-side-request`: a probe or lifecycle handler with `httpGet.host` or `tcpSocket.host` (the kubelet sends it
//!   from the node's network, to any address: the node's own ports, metadata), and any lifecycle `httpGet` (older
//!   kubelets follow its redirects to any address);
//! - `node-mounted-volume`: any volume but `configMap`, `csi`, `downwardAPI`, `emptyDir`, `ephemeral`, `image`,
//!   `persistentVolumeClaim`, `projected`, `secret` (and `hostPath`, above): `nfs`, `iscsi`, `fc`, `gitRepo`,
//!   `azureFile`, a cloud disk by its ID, ... (the node mounts, attaches or fetches them, as root, with the node's
//!   network or the cluster's cloud credentials), and an `ephemeral` volume whose claim would bind a PersistentVolume made beforehand;
//! - `security-profile`: any `seLinuxOptions` `type`, `user` or `role`, a seccomp or AppArmor profile `Unconfined`, `procMount:
//!   Unmasked`, Pod `sysctls`; and `windowsOptions.hostProcess` counts as `host-namespaces`.
//!
//! Each relaxation is a flag for every namespace, or an entry of `--pod-policy-by-namespace` for one; a namespace's
//! entry adds to the global settings. Pod Security Admission, where the namespace enforces a level, judges the Pod
//! again when it is created (the stricter of the two wins); this check runs first so the job fails with a reason
//! before anything is sent to the apiserver.

use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde::Deserialize;

use super::PerNamespace;

/// What Pods may do beyond the defaults: the global flags, or one namespace's entry in `--pod-policy-by-namespace`
/// (e.g. `{"infra": {"hostPath": true, "serviceAccounts": ["builder"]}}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Relaxations {
    /// Allow privileged containers.
    pub privileged: bool,
    /// Allow `allowPrivilegeEscalation: true`.
    pub privilege_escalation: bool,
    /// Allow `hostNetwork`, `hostPID`, `hostIPC` and `hostPort`.
    pub host_namespaces: bool,
    /// Allow `hostPath` volumes.
    pub host_path: bool,
    /// Capabilities containers may add (`NET_ADMIN`; `ALL` only if listed itself).
    pub capabilities: Vec<String>,
    /// ServiceAccounts Pods may run as.
    pub service_accounts: Vec<String>,
}

/// Which Pods the Pod executor may create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    /// Relaxations for every namespace (the `--pod-allow-*` flags, `--pod-service-accounts`).
    pub global: Relaxations,
    /// More relaxations for single namespaces (`--pod-policy-by-namespace`).
    pub by_namespace: PerNamespace<Relaxations>,
    /// Whether the job's creator must be allowed to create the Pod themselves (`--pod-creator-check`, see
    /// [`super::creator`]).
    pub creator_check: super::creator::CreatorCheck,
}

impl Default for PodPolicy {
    /// The safe configuration: nothing relaxed, Pods run as the namespace's `default` ServiceAccount only.
    fn default() -> Self {
        PodPolicy {
            global: Relaxations { service_accounts: vec!["default".into()], ..Default::default() },
            by_namespace: PerNamespace::default(),
            creator_check: Default::default(),
        }
    }
}

/// Why a Pod may not be created: the field (a path under `spec.template.spec`) and the rule it breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("spec.template.spec.{field} {what}: rule `{rule}` forbids it ({how})")]
pub struct Denial {
    /// Path of the offending field below `spec.template.spec`.
    pub field: String,
    /// What the field says.
    pub what: String,
    /// The rule's name.
    pub rule: &'static str,
    /// How an operator may relax the rule.
    pub how: &'static str,
}

fn normalize_capability(c: &str) -> String {
    let c = c.trim().to_ascii_uppercase();
    c.strip_prefix("CAP_").map(str::to_string).unwrap_or(c)
}

impl PodPolicy {
    /// The relaxations in force for `namespace`: the global ones plus the namespace's own.
    fn effective(&self, namespace: &str) -> Relaxations {
        let mut r = self.global.clone();
        if let Some(ns) = self.by_namespace.0.get(namespace) {
            r.privileged |= ns.privileged;
            r.privilege_escalation |= ns.privilege_escalation;
            r.host_namespaces |= ns.host_namespaces;
            r.host_path |= ns.host_path;
            r.capabilities.extend(ns.capabilities.iter().cloned());
            r.service_accounts.extend(ns.service_accounts.iter().cloned());
        }
        r
    }

    /// May a job of `namespace` run a Pod with `spec`? The first field that breaks a rule, if any.
    pub fn check(&self, namespace: &str, spec: &PodSpec) -> Result<(), Denial> {
        let r = self.effective(namespace);
        let deny = |field: String, what: String, rule, how| Err(Denial { field, what, rule, how });
        const HOST_NS: &str = "relax with --pod-allow-host-namespaces or hostNamespaces in --pod-policy-by-namespace";
        if !r.host_namespaces {
            for (field, on) in
                [("hostNetwork", spec.host_network), ("hostPID", spec.host_pid), ("hostIPC", spec.host_ipc)]
            {
                if on == Some(true) {
                    return deny(field.into(), "is true".into(), "host-namespaces", HOST_NS);
                }
            }
        }
        const FIXED: &str = "not relaxable; run such a Pod as a batch/v1 Job";
        if let Some(psc) = &spec.security_context {
            if psc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) && !r.host_namespaces {
                let field = "securityContext.windowsOptions.hostProcess";
                return deny(field.into(), "is true".into(), "host-namespaces", HOST_NS);
            }
            if let Some((field, value)) = psc.se_linux_options.as_ref().and_then(se_linux_set) {
                let field = format!("securityContext.seLinuxOptions.{field}");
                return deny(field, format!("is {value:?}"), "security-profile", FIXED);
            }
            let unconfined = [
                ("seccompProfile", psc.seccomp_profile.as_ref().map(|p| p.type_.as_str())),
                ("appArmorProfile", psc.app_armor_profile.as_ref().map(|p| p.type_.as_str())),
            ];
            for (field, t) in unconfined {
                if t == Some("Unconfined") {
                    let field = format!("securityContext.{field}.type");
                    return deny(field, "is Unconfined".into(), "security-profile", FIXED);
                }
            }
            if psc.sysctls.as_ref().is_some_and(|s| !s.is_empty()) {
                return deny("securityContext.sysctls".into(), "is set".into(), "security-profile", FIXED);
            }
        }
        for (i, v) in spec.volumes.iter().flatten().enumerate() {
            if let Some(kind) = node_mounted(v) {
                let what = format!("is a {kind} volume");
                return deny(format!("volumes[{i}] ({})", v.name), what, "node-mounted-volume", FIXED);
            }
            if let Some(how) = pre_bound(v) {
                let what = format!(
                    "is an ephemeral volume whose claim {how}: it would bind a volume made beforehand, whatever it \
                     is (a node's path, an NFS export made for someone else)"
                );
                return deny(format!("volumes[{i}] ({})", v.name), what, "node-mounted-volume", FIXED);
            }
            if v.host_path.is_some() && !r.host_path {
                return deny(
                    format!("volumes[{i}] ({})", v.name),
                    "is a hostPath volume".into(),
                    "host-path",
                    "relax with --pod-allow-host-path or hostPath in --pod-policy-by-namespace",
                );
            }
        }
        // Unset means `default`; the deprecated `serviceAccount` stands in for `serviceAccountName` when that is unset.
        let name = spec.service_account_name.as_deref().or(spec.service_account.as_deref()).unwrap_or("default");
        let named = [("serviceAccountName", Some(name)), ("serviceAccount", spec.service_account.as_deref())];
        for (field, sa) in named {
            let Some(sa) = sa else { continue };
            if !r.service_accounts.iter().any(|a| a == sa) {
                return deny(
                    field.into(),
                    format!("is {sa:?}, not one of {:?}", r.service_accounts),
                    "service-account",
                    "add it to --pod-service-accounts or to serviceAccounts in --pod-policy-by-namespace",
                );
            }
        }
        let groups = [("containers", Some(&spec.containers)), ("initContainers", spec.init_containers.as_ref())];
        for (group, containers) in groups {
            for (i, c) in containers.into_iter().flatten().enumerate() {
                check_container(&r, &format!("{group}[{i}] ({})", c.name), c, HOST_NS)?;
            }
        }
        for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
            let as_container = Container {
                name: c.name.clone(),
                security_context: c.security_context.clone(),
                ports: c.ports.clone(),
                ..Default::default()
            };
            check_container(&r, &format!("ephemeralContainers[{i}] ({})", c.name), &as_container, HOST_NS)?;
        }
        Ok(())
    }
}

fn check_container(r: &Relaxations, at: &str, c: &Container, host_ns: &'static str) -> Result<(), Denial> {
    let deny = |field: &str, what: String, rule, how| Err(Denial { field: format!("{at}.{field}"), what, rule, how });
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) && !r.privileged {
        return deny(
            "securityContext.privileged",
            "is true".into(),
            "privileged",
            "relax with --pod-allow-privileged or privileged in --pod-policy-by-namespace",
        );
    }
    if sc.allow_privilege_escalation == Some(true) && !r.privilege_escalation {
        return deny(
            "securityContext.allowPrivilegeEscalation",
            "is true".into(),
            "privilege-escalation",
            "relax with --pod-allow-privilege-escalation or privilegeEscalation in --pod-policy-by-namespace",
        );
    }
    let allowed: Vec<String> = r.capabilities.iter().map(|c| normalize_capability(c)).collect();
    for cap in sc.capabilities.and_then(|c| c.add).unwrap_or_default() {
        if !allowed.contains(&normalize_capability(&cap)) {
            return deny(
                "securityContext.capabilities.add",
                format!("adds {cap}"),
                "capabilities",
                "allow it with --pod-allowed-capabilities or capabilities in --pod-policy-by-namespace",
            );
        }
    }
    const FIXED: &str = "not relaxable; run such a Pod as a batch/v1 Job";
    if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) && !r.host_namespaces {
        return deny("securityContext.windowsOptions.hostProcess", "is true".into(), "host-namespaces", host_ns);
    }
    if let Some((field, value)) = sc.se_linux_options.as_ref().and_then(se_linux_set) {
        let field = format!("securityContext.seLinuxOptions.{field}");
        return deny(&field, format!("is {value:?}"), "security-profile", FIXED);
    }
    let unconfined = [
        ("seccompProfile", sc.seccomp_profile.as_ref().map(|p| p.type_.as_str())),
        ("appArmorProfile", sc.app_armor_profile.as_ref().map(|p| p.type_.as_str())),
    ];
    for (field, t) in unconfined {
        if t == Some("Unconfined") {
            return deny(&format!("securityContext.{field}.type"), "is Unconfined".into(), "security-profile", FIXED);
        }
    }
    if sc.proc_mount.as_deref() == Some("Unmasked") {
        return deny("securityContext.procMount", "is Unmasked".into(), "security-profile", FIXED);
    }
    let handlers = [
        ("livenessProbe", c.liveness_probe.as_ref().map(|p| (&p.http_get, &p.tcp_socket))),
        ("readinessProbe", c.readiness_probe.as_ref().map(|p| (&p.http_get, &p.tcp_socket))),
        ("startupProbe", c.startup_probe.as_ref().map(|p| (&p.http_get, &p.tcp_socket))),
        (
            "lifecycle.postStart",
            c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()).map(|h| (&h.http_get, &h.tcp_socket)),
        ),
        (
            "lifecycle.preStop",
            c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).map(|h| (&h.http_get, &h.tcp_socket)),
        ),
    ];
    for (field, handler) in handlers {
        let Some((http, tcp)) = handler else { continue };
        // A lifecycle handler's GET is sent by the kubelet from the node's network, and kubelets before 1.26 (or with
        // `ConsistentHTTPGetHandlers` off) follow its redirects to any host: a Pod answering its own hook with a
        // redirect reaches the node's loopback or the metadata address. Probes have not followed a redirect to another
        // host since 1.14. `exec` and `sleep` handlers do what a hook needs.
        if field.starts_with("lifecycle.") && http.is_some() {
            let what = "is set (the kubelet sends it from the node and may follow its redirects anywhere)";
            return deny(&format!("{field}.httpGet"), what.into(), "node-side-request", FIXED);
        }
        let hosts = [
            ("httpGet.host", http.as_ref().and_then(|h| h.host.as_ref())),
            ("tcpSocket.host", tcp.as_ref().and_then(|t| t.host.as_ref())),
        ];
        for (sub, host) in hosts {
            if let Some(h) = host.filter(|h| !h.is_empty()) {
                return deny(&format!("{field}.{sub}"), format!("is {h:?}"), "node-side-request", FIXED);
            }
        }
    }
    if !r.host_namespaces {
        for (i, p) in c.ports.iter().flatten().enumerate() {
            if let Some(port) = p.host_port.filter(|p| *p != 0) {
                return deny(&format!("ports[{i}].hostPort"), format!("is {port}"), "host-namespaces", host_ns);
            }
        }
    }
    Ok(())
}

/// Volume types whose contents come from the Pod's own namespace through the apiserver or the Pod itself (Pod
/// Security's `restricted` list), and `image` (an OCI image the node pulls, as it pulls the containers'); `hostPath`
/// is judged on its own.
const VOLUMES_OF_THE_NAMESPACE: [&str; 10] = [
    "image",
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
    "hostPath",
];

/// How an `ephemeral` volume's claim would bind a PersistentVolume made beforehand, if it would: by its name
/// (`volumeName`), by its labels (`selector`), or as one of no class (`storageClassName: ""`). That claim is made by
/// the cluster's ephemeral volume controller, not by the job's author, and such a claim binds any available volume
/// that fits, whatever kind it is (a node's path, an NFS export) and whoever it was made for: the way an `ephemeral`
/// volume reaches beyond the namespace. A claim of a class is provisioned for it.
fn pre_bound(v: &k8s_openapi::api::core::v1::Volume) -> Option<String> {
    let spec = &v.ephemeral.as_ref()?.volume_claim_template.as_ref()?.spec;
    if let Some(name) = spec.volume_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(format!("names the PersistentVolume {name:?} (volumeName)"));
    }
    if spec.selector.is_some() {
        return Some("selects PersistentVolumes by their labels (selector)".into());
    }
    (spec.storage_class_name.as_deref() == Some(""))
        .then(|| "asks for a volume of no class (storageClassName: \"\")".into())
}

/// The first SELinux option `o` sets (`type`, `user` or `role`, which Pod Security's `baseline` refuses; `level`
/// only labels the container's files).
fn se_linux_set(o: &k8s_openapi::api::core::v1::SELinuxOptions) -> Option<(&'static str, &String)> {
    [("type", &o.type_), ("user", &o.user), ("role", &o.role)]
        .into_iter()
        .find_map(|(field, value)| value.as_ref().filter(|v| !v.is_empty()).map(|v| (field, v)))
}

/// The type of `v` if it is none of [`VOLUMES_OF_THE_NAMESPACE`]: a volume the node mounts, attaches or fetches
/// (NFS, iSCSI, Fibre Channel, SMB, a cloud disk by its ID, git), as root, with the node's network or the cluster's
/// cloud credentials. A list of what is allowed, not of what is refused: a type added to Kubernetes later is
/// refused until it is judged.
fn node_mounted(v: &k8s_openapi::api::core::v1::Volume) -> Option<String> {
    let json = serde_json::to_value(v).ok()?;
    json.as_object()?.keys().find(|k| *k != "name" && !VOLUMES_OF_THE_NAMESPACE.contains(&k.as_str())).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    fn with_container(extra: serde_json::Value) -> PodSpec {
        let mut c = json!({"name": "main", "image": "busybox"});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec(json!({"containers": [c]}))
    }

    fn rule(r: Result<(), Denial>) -> &'static str {
        r.expect_err("refused").rule
    }

    #[test]
    fn a_plain_pod_as_the_default_service_account_passes() {
        let p = PodPolicy::default();
        assert_eq!(p.check("ns", &with_container(json!({}))), Ok(()));
        assert_eq!(p.check("ns", &spec(json!({"serviceAccountName": "default", "containers": []}))), Ok(()));
        let hardened = json!({"securityContext": {"privileged": false, "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]}}, "ports": [{"containerPort": 80}]});
        assert_eq!(p.check("ns", &with_container(hardened)), Ok(()));
    }

    #[test]
    fn a_privileged_container_is_refused_naming_the_field() {
        let p = PodPolicy::default();
        let d = p.check("ns", &with_container(json!({"securityContext": {"privileged": true}}))).unwrap_err();
        assert_eq!((d.rule, d.field.as_str()), ("privileged", "containers[0] (main).securityContext.privileged"));
        assert!(
            d.to_string().starts_with("spec.template.spec.containers[0] (main).securityContext.privileged is true")
        );
        let init = spec(json!({"containers": [{"name": "m"}],
            "initContainers": [{"name": "setup", "securityContext": {"privileged": true}}]}));
        assert_eq!(p.check("ns", &init).unwrap_err().field, "initContainers[0] (setup).securityContext.privileged");
    }

    #[test]
    fn privilege_escalation_is_refused() {
        let s = with_container(json!({"securityContext": {"allowPrivilegeEscalation": true}}));
        assert_eq!(rule(PodPolicy::default().check("ns", &s)), "privilege-escalation");
    }

    #[test]
    fn added_capabilities_are_refused_unless_listed() {
        let s = with_container(json!({"securityContext": {"capabilities": {"add": ["cap_net_admin"]}}}));
        assert_eq!(rule(PodPolicy::default().check("ns", &s)), "capabilities");
        let mut p = PodPolicy::default();
        p.global.capabilities = vec!["NET_ADMIN".into()];
        assert_eq!(p.check("ns", &s), Ok(()), "CAP_ prefix and case do not matter");
        let all = with_container(json!({"securityContext": {"capabilities": {"add": ["ALL"]}}}));
        assert_eq!(rule(p.check("ns", &all)), "capabilities", "ALL is not NET_ADMIN");
    }

    #[test]
    fn host_namespaces_and_host_ports_are_refused() {
        let p = PodPolicy::default();
        for field in ["hostNetwork", "hostPID", "hostIPC"] {
            let s = spec(json!({field: true, "containers": [{"name": "m"}]}));
            let d = p.check("ns", &s).unwrap_err();
            assert_eq!((d.rule, d.field.as_str()), ("host-namespaces", field));
        }
        let s = with_container(json!({"ports": [{"containerPort": 80, "hostPort": 80}]}));
        assert_eq!(p.check("ns", &s).unwrap_err().field, "containers[0] (main).ports[0].hostPort");
        assert_eq!(p.check("ns", &spec(json!({"hostNetwork": false, "containers": []}))), Ok(()));
    }

    #[test]
    fn host_path_volumes_are_refused() {
        let s = spec(json!({"containers": [{"name": "m"}],
            "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "root", "hostPath": {"path": "/"}}]}));
        let d = PodPolicy::default().check("ns", &s).unwrap_err();
        assert_eq!((d.rule, d.field.as_str()), ("host-path", "volumes[1] (root)"));
    }

    #[test]
    fn only_listed_service_accounts_are_allowed_in_either_field() {
        let p = PodPolicy::default();
        let s = spec(json!({"serviceAccountName": "deployer", "containers": []}));
        let d = p.check("ns", &s).unwrap_err();
        assert_eq!((d.rule, d.field.as_str()), ("service-account", "serviceAccountName"));
        assert!(d.to_string().contains("\"deployer\""), "{d}");
        let deprecated = spec(json!({"serviceAccountName": "default", "serviceAccount": "deployer", "containers": []}));
        assert_eq!(p.check("ns", &deprecated).unwrap_err().field, "serviceAccount");
        let only_deprecated = spec(json!({"serviceAccount": "deployer", "containers": []}));
        assert_eq!(rule(p.check("ns", &only_deprecated)), "service-account");
    }

    #[test]
    fn a_namespace_entry_relaxes_that_namespace_only() {
        let by_ns: PerNamespace<Relaxations> =
            r#"{"infra": {"privileged": true, "hostPath": true, "serviceAccounts": ["builder"]}}"#.parse().unwrap();
        let p = PodPolicy { by_namespace: by_ns, ..Default::default() };
        let s = spec(json!({"serviceAccountName": "builder", "volumes": [{"name": "r", "hostPath": {"path": "/"}}],
            "containers": [{"name": "m", "securityContext": {"privileged": true}}]}));
        assert_eq!(p.check("infra", &s), Ok(()));
        assert_eq!(p.check("infra", &with_container(json!({}))), Ok(()), "default stays allowed");
        assert!(p.check("apps", &s).is_err());
        assert!("{\"infra\": {\"hostpath\": true}}".parse::<PerNamespace<Relaxations>>().is_err(), "typos fail");
    }

    #[test]
    fn global_flags_relax_every_namespace() {
        let p = PodPolicy {
            global: Relaxations {
                privileged: true,
                privilege_escalation: true,
                host_namespaces: true,
                host_path: true,
                capabilities: vec!["SYS_ADMIN".into()],
                service_accounts: vec!["default".into(), "x".into()],
            },
            ..Default::default()
        };
        let s = spec(json!({"hostNetwork": true, "hostPID": true, "serviceAccountName": "x",
            "volumes": [{"name": "r", "hostPath": {"path": "/"}}],
            "containers": [{"name": "m", "ports": [{"containerPort": 1, "hostPort": 1}], "securityContext":
                {"privileged": true, "allowPrivilegeEscalation": true, "capabilities": {"add": ["SYS_ADMIN"]}}}]}));
        assert_eq!(p.check("any", &s), Ok(()));
    }
}

#[cfg(test)]
mod node_side_and_known_limits {
    //! Node-side requests, node-mounted volumes and security profiles (refused), and known limits
    //! (docs/security.md): the tests named `limit_*` assert what the policy lets through.
    use super::*;
    use serde_json::json;

    fn check(v: &serde_json::Value) -> Result<(), Denial> {
        let s: PodSpec = serde_json::from_value(v.clone()).unwrap();
        PodPolicy::default().check("team-a", &s)
    }

    fn passes(v: serde_json::Value) {
        assert_eq!(check(&v), Ok(()), "{v}");
    }

    fn refused(v: serde_json::Value, rule: &str, field: &str) {
        let d = check(&v).expect_err(&v.to_string());
        assert_eq!((d.rule, d.field.as_str()), (rule, field), "{d}");
        assert!(d.to_string().contains("not relaxable") || rule == "host-namespaces", "{d}");
    }

    #[test]
    fn probes_and_lifecycle_handlers_that_name_a_host_are_refused() {
        let c = |extra: serde_json::Value| {
            let mut c = json!({"name": "m"});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            json!({"containers": [c]})
        };
        let at = "containers[0] (m)";
        refused(
            c(json!({"livenessProbe": {"httpGet": {"host": "169.254.169.254", "path": "/", "port": 80}}})),
            "node-side-request",
            &format!("{at}.livenessProbe.httpGet.host"),
        );
        refused(
            c(json!({"lifecycle": {"postStart": {"httpGet": {"host": "127.0.0.1", "path": "/", "port": 10250}}}})),
            "node-side-request",
            &format!("{at}.lifecycle.postStart.httpGet"),
        );
        refused(
            c(json!({"readinessProbe": {"tcpSocket": {"host": "127.0.0.1", "port": 2379}}})),
            "node-side-request",
            &format!("{at}.readinessProbe.tcpSocket.host"),
        );
        refused(
            c(json!({"lifecycle": {"preStop": {"tcpSocket": {"host": "10.0.0.1", "port": 22}}}})),
            "node-side-request",
            &format!("{at}.lifecycle.preStop.tcpSocket.host"),
        );
        // Without a host the kubelet probes the Pod's own IP, and follows no redirect to another host: allowed.
        passes(c(json!({"livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
            "startupProbe": {"tcpSocket": {"port": 8080}}})));
        // A lifecycle hook's GET is refused even to the Pod's own IP: the Pod may answer it with a redirect that an
        // older kubelet follows from the node, to its loopback or the metadata address.
        for hook in ["postStart", "preStop"] {
            refused(
                c(json!({"lifecycle": {hook: {"httpGet": {"path": "/", "port": 8080}}}})),
                "node-side-request",
                &format!("{at}.lifecycle.{hook}.httpGet"),
            );
        }
        passes(c(json!({"lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "sleep 1"]}},
            "postStart": {"tcpSocket": {"port": 8080}}}})));
    }

    /// An `ephemeral` volume's claim is made by the cluster, not by the job's author; one that names, selects or asks
    /// for no class of PersistentVolume binds one made beforehand, whatever it is (a `hostPath` or `local` volume, an
    /// NFS export) and whoever it was made for.
    #[test]
    fn an_ephemeral_volume_whose_claim_would_bind_a_volume_made_beforehand_is_refused() {
        let pod = |spec: serde_json::Value| {
            json!({"containers": [{"name": "m"}], "volumes": [{"name": "e", "emptyDir": {}},
                {"name": "n", "ephemeral": {"volumeClaimTemplate": {"spec": spec}}}]})
        };
        for claim in [
            json!({"volumeName": "node-local-pv", "storageClassName": "standard", "accessModes": ["ReadWriteOnce"]}),
            json!({"selector": {"matchLabels": {"pv": "node-local"}}, "accessModes": ["ReadWriteOnce"]}),
            json!({"storageClassName": "", "accessModes": ["ReadWriteOnce"]}),
        ] {
            refused(pod(claim), "node-mounted-volume", "volumes[1] (n)");
        }
        passes(pod(json!({"storageClassName": "standard", "accessModes": ["ReadWriteOnce"]})));
        passes(pod(json!({"accessModes": ["ReadWriteOnce"]})));
    }

    #[test]
    fn volumes_the_node_mounts_or_fetches_are_refused() {
        for v in [
            json!({"name": "n", "nfs": {"server": "10.0.0.5", "path": "/exports"}}),
            json!({"name": "n", "iscsi": {"targetPortal": "10.0.0.6:3260", "iqn": "iqn.x:y", "lun": 0}}),
            json!({"name": "n", "gitRepo": {"repository": "https://example.test/r.git"}}),
            json!({"name": "n", "rbd": {"monitors": ["10.0.0.7"], "image": "i"}}),
            json!({"name": "n", "cephfs": {"monitors": ["10.0.0.7"]}}),
            json!({"name": "n", "glusterfs": {"endpoints": "e", "path": "p"}}),
            json!({"name": "n", "flexVolume": {"driver": "vendor/driver"}}),
            json!({"name": "n", "fc": {"targetWWNs": ["50060e801049cfd1"], "lun": 0}}),
            json!({"name": "n", "azureFile": {"secretName": "s", "shareName": "share"}}),
            json!({"name": "n", "awsElasticBlockStore": {"volumeID": "vol-0abc"}}),
            json!({"name": "n", "gcePersistentDisk": {"pdName": "another-teams-disk"}}),
            json!({"name": "n", "azureDisk": {"diskName": "d", "diskURI": "u"}}),
            json!({"name": "n", "cinder": {"volumeID": "v"}}),
            json!({"name": "n", "portworxVolume": {"volumeID": "v"}}),
            json!({"name": "n", "vsphereVolume": {"volumePath": "[ds] v.vmdk"}}),
        ] {
            let pod = json!({"containers": [{"name": "m"}], "volumes": [{"name": "e", "emptyDir": {}}, v]});
            refused(pod, "node-mounted-volume", "volumes[1] (n)");
        }
        // What comes from the namespace itself passes.
        passes(json!({"containers": [{"name": "m"}], "volumes": [
            {"name": "a", "emptyDir": {}}, {"name": "b", "configMap": {"name": "c"}}, {"name": "c", "secret": {"secretName": "s"}},
            {"name": "d", "persistentVolumeClaim": {"claimName": "p"}}, {"name": "e", "downwardAPI": {}},
            {"name": "f", "projected": {"sources": []}}, {"name": "g", "csi": {"driver": "d"}},
            {"name": "h", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
            {"name": "i", "image": {"reference": "registry.example/models/m:1"}}]}));
    }

    #[test]
    fn selinux_types_unconfined_profiles_unmasked_proc_and_sysctls_are_refused() {
        let pod = |psc: serde_json::Value| json!({"securityContext": psc, "containers": [{"name": "m"}]});
        let ctr = |sc: serde_json::Value| json!({"containers": [{"name": "m", "securityContext": sc}]});
        refused(
            pod(json!({"seLinuxOptions": {"type": "spc_t"}})),
            "security-profile",
            "securityContext.seLinuxOptions.type",
        );
        refused(
            pod(json!({"seccompProfile": {"type": "Unconfined"}})),
            "security-profile",
            "securityContext.seccompProfile.type",
        );
        refused(
            pod(json!({"appArmorProfile": {"type": "Unconfined"}})),
            "security-profile",
            "securityContext.appArmorProfile.type",
        );
        refused(
            pod(json!({"sysctls": [{"name": "kernel.msgmax", "value": "1"}]})),
            "security-profile",
            "securityContext.sysctls",
        );
        refused(
            pod(json!({"windowsOptions": {"hostProcess": true}})),
            "host-namespaces",
            "securityContext.windowsOptions.hostProcess",
        );
        let at = "containers[0] (m).securityContext";
        refused(
            ctr(json!({"seLinuxOptions": {"type": "spc_t"}})),
            "security-profile",
            &format!("{at}.seLinuxOptions.type"),
        );
        refused(
            ctr(json!({"seccompProfile": {"type": "Unconfined"}})),
            "security-profile",
            &format!("{at}.seccompProfile.type"),
        );
        refused(
            ctr(json!({"appArmorProfile": {"type": "Unconfined"}})),
            "security-profile",
            &format!("{at}.appArmorProfile.type"),
        );
        refused(ctr(json!({"procMount": "Unmasked"})), "security-profile", &format!("{at}.procMount"));
        refused(
            ctr(json!({"windowsOptions": {"hostProcess": true}})),
            "host-namespaces",
            &format!("{at}.windowsOptions.hostProcess"),
        );
        for option in ["user", "role"] {
            refused(
                pod(json!({"seLinuxOptions": {option: "system_r"}})),
                "security-profile",
                &format!("securityContext.seLinuxOptions.{option}"),
            );
            refused(
                ctr(json!({"seLinuxOptions": {option: "system_r"}})),
                "security-profile",
                &format!("{at}.seLinuxOptions.{option}"),
            );
        }
        // The hardened settings pass.
        passes(
            json!({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "seLinuxOptions": {"level": "s0:c1,c2"}},
            "containers": [{"name": "m", "securityContext": {"procMount": "Default",
                "appArmorProfile": {"type": "RuntimeDefault"}, "seccompProfile": {"type": "RuntimeDefault"}}}]}),
        );
    }

    #[test]
    fn limit_secrets_pvcs_csi_and_tokens_of_the_namespace_reach_the_pod() {
        passes(json!({"containers": [{"name": "m"}],
            "volumes": [{"name": "t", "secret": {"secretName": "deployer-token-abcde"}}]}));
        passes(json!({"containers": [{"name": "m", "env": [{"name": "T", "valueFrom":
            {"secretKeyRef": {"name": "deployer-token-abcde", "key": "token"}}}],
            "envFrom": [{"secretRef": {"name": "db-credentials"}}]}]}));
        passes(json!({"containers": [{"name": "m"}], "volumes": [{"name": "p", "projected": {"sources": [
            {"secret": {"name": "db-credentials"}},
            {"serviceAccountToken": {"audience": "vault", "path": "t", "expirationSeconds": 86400}}]}}]}));
        passes(json!({"containers": [{"name": "m"}], "volumes": [
            {"name": "d", "persistentVolumeClaim": {"claimName": "prod-db-data"}},
            {"name": "c", "csi": {"driver": "secrets-store.csi.k8s.io", "volumeAttributes": {"secretProviderClass": "prod"}}}]}));
        passes(json!({"automountServiceAccountToken": true, "containers": [{"name": "m"}]}));
    }

    #[test]
    fn limit_placement_fields_pass() {
        passes(json!({"nodeName": "control-plane-1", "tolerations": [{"operator": "Exists"}],
            "priorityClassName": "system-node-critical", "runtimeClassName": "runc-unsandboxed",
            "containers": [{"name": "m"}]}));
    }
}
