//! The HTTP executor's egress policy: may a job of namespace `ns` POST to `url`, reached at these addresses?
//!
//! The decision is taken on the addresses the connection will actually use: the executor resolves the host once,
//! asks [`EgressPolicy::check`] about every address it got, and connects only to those (a DNS answer that changes
//! between the check and the connect cannot move the request; see `executor::http`). Redirects are not followed.
//!
//! In order, each address is refused when it is
//! 1. the unspecified address (`0.0.0.0`, `::`: "this host");
//! 2. a cloud metadata or credentials address (`169.254.169.254`, `169.254.170.2`, `fd00:ec2::254`, `fd20:ce::254`,
//!    `100.100.100.200`, `168.63.129.16`, `169.254.0.23`, `169.254.170.23`, `fd00:ec2::23`): always;
//! 3. link-local (`169.254.0.0/16`, `fe80::/10`) unless `--egress-allow-link-local`;
//! 4. a local address (loopback or one of this host's) at a port the operator itself serves on (metrics, health);
//! 5. any other local address unless `--egress-allow-loopback`: the operator Pod's sidecars listen there (a service
//!    mesh proxy's admin port, which can shut it down or show its configuration), and no job's endpoint is in the
//!    operator's own Pod;
//! 6. outside `--egress-allow`, when that list is set, or outside the job's namespace's list in
//!    `--egress-allow-by-namespace`, when it has one (both apply: a namespace list narrows the global one).
//!
//! IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`, and the local-use `64:ff9b:1::/48` with the IPv4
//! address in the last 32 bits, as a /96 inside it embeds it) IPv6 addresses are judged as the IPv4 address they
//! carry, so `::ffff:169.254.169.254` is the metadata address too. A local-use NAT64 prefix shorter than /96 (RFC
//! 6052 spreads the IPv4 address around bits 64-71 there) is read every way it may be for rules 2 to 5, so its
//! metadata, link-local and local addresses are refused too; the allowlists see only the /96 reading: list such a
//! prefix in no allowlist.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;
use url::Url;

/// Addresses of cloud instance metadata services: never reachable from a job, whatever the flags say.
const METADATA: [IpAddr; 9] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), // AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),   // AWS ECS task metadata and credentials
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), // AWS IMDS over IPv6
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254)), // GCP metadata over IPv6 (a ULA, not link-local)
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), // Alibaba Cloud
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),   // Azure WireServer (VM agent, extensions' settings)
    IpAddr::V4(Ipv4Addr::new(169, 254, 0, 23)),    // Tencent Cloud (link-local, refused even when that is allowed)
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23)),  // AWS EKS Pod Identity agent (hands out credentials)
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)), // the same over IPv6 (a ULA, not link-local)
];

/// One entry of an allowlist: a host name (`api.example.com`, or `*.example.com` for its subdomains), an address or
/// CIDR (`10.0.0.0/8`, `127.0.0.1`), or a URL prefix (`https://hooks.example.com/bgjobs/`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Entry {
    /// Exactly this host name (lower case, no trailing dot).
    Host(String),
    /// Any host name ending in this suffix (which starts with a dot).
    Subdomains(String),
    /// Any address in this network.
    Cidr(IpNet),
    /// URLs with this scheme, host and port whose path starts with this one at a segment boundary.
    Prefix(Url),
}

impl FromStr for Entry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.contains("://") {
            let url = Url::parse(s).map_err(|e| format!("egress entry {s:?} is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(format!("egress entry {s:?}: a URL prefix needs http(s) and a host"));
            }
            return Ok(Entry::Prefix(url));
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Entry::Cidr(net.trunc()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Entry::Cidr(IpNet::from(canonical(ip))));
        }
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let valid = !name.is_empty()
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        if !valid {
            return Err(format!(
                "egress entry {s:?} is neither a host name (api.example.com, *.example.com), an address or CIDR \
                 (10.0.0.0/8), nor a URL prefix (https://api.example.com/hooks/)"
            ));
        }
        Ok(if wildcard { Entry::Subdomains(format!(".{name}")) } else { Entry::Host(name) })
    }
}

impl TryFrom<String> for Entry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Host(h) => write!(f, "{h}"),
            Entry::Subdomains(s) => write!(f, "*{s}"),
            Entry::Cidr(n) => write!(f, "{n}"),
            Entry::Prefix(u) => write!(f, "{u}"),
        }
    }
}

impl Entry {
    /// Whether a request to `url`, connected to `addr`, is covered by this entry.
    fn allows(&self, url: &Url, addr: IpAddr) -> bool {
        let host = url.host_str().map(|h| h.trim_end_matches('.').to_ascii_lowercase());
        match self {
            Entry::Host(h) => host.as_deref() == Some(h),
            Entry::Subdomains(suffix) => host.is_some_and(|h| h.ends_with(suffix.as_str())),
            Entry::Cidr(net) => net.contains(&canonical(addr)),
            Entry::Prefix(p) => {
                p.scheme() == url.scheme()
                    && p.host() == url.host()
                    && p.port_or_known_default() == url.port_or_known_default()
                    && path_within(p.path(), url.path())
            }
        }
    }
}

/// `path` equals `prefix` or lies below it: `/hooks` covers `/hooks` and `/hooks/x`, not `/hooks-admin`.
fn path_within(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// The address a packet to `ip` really goes to: the IPv4 address inside an IPv4-mapped or NAT64 IPv6 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // The well-known NAT64 prefix (64:ff9b::/96) and the local-use one (64:ff9b:1::/48, RFC 8215), the
            // latter as a /96 inside it: the IPv4 address is the last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            v6.to_canonical()
        }
        v4 => v4,
    }
}

/// Every IPv4 address a local-use NAT64 address (`64:ff9b:1::/48`, RFC 8215) may carry, one per prefix length a
/// network may give it inside that /48 (RFC 6052: /48, /56 and /64 split the IPv4 address around bits 64-71, a /96
/// puts it last). Which one a network uses is not known here, so the metadata and link-local rules are applied to
/// each; [`canonical`] (the /96 reading) is what the other rules and allowlists see.
fn local_use_nat64_readings(ip: IpAddr) -> Vec<IpAddr> {
    let IpAddr::V6(v6) = ip else { return Vec::new() };
    if v6.segments()[..3] != [0x64, 0xff9b, 1] {
        return Vec::new();
    }
    let o = v6.octets();
    [[o[6], o[7], o[9], o[10]], [o[7], o[9], o[10], o[11]], [o[9], o[10], o[11], o[12]], [o[12], o[13], o[14], o[15]]]
        .into_iter()
        .map(|[a, b, c, d]| IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
        .collect()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Which allowlist refused an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum List {
    /// `--egress-allow`.
    Global,
    /// The job's namespace's entry in `--egress-allow-by-namespace`.
    Namespace(String),
}

impl fmt::Display for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            List::Global => write!(f, "--egress-allow"),
            List::Namespace(ns) => write!(f, "the allowlist of namespace {ns} (--egress-allow-by-namespace)"),
        }
    }
}

/// Why a request may not be sent; its text names the rule and says how to relax it where that is possible.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The host resolved to nothing: there is no address to check.
    #[error("rule `resolved`: the host resolved to no address")]
    NoAddress,
    /// Not http or https.
    #[error("rule `scheme`: only http and https URLs are sent, not {0}")]
    Scheme(String),
    /// `0.0.0.0` or `::`.
    #[error("rule `unspecified`: {0} is the unspecified address, which reaches this host")]
    Unspecified(IpAddr),
    /// A cloud metadata address.
    #[error(
        "rule `metadata`: {0} is a cloud instance metadata address (it hands out the node's credentials); no job \
         may reach it"
    )]
    Metadata(IpAddr),
    /// A link-local address.
    #[error(
        "rule `link-local`: {0} is link-local (169.254.0.0/16, fe80::/10), where metadata and node-local services \
         listen; the operator allows it only with --egress-allow-link-local"
    )]
    LinkLocal(IpAddr),
    /// Loopback, or one of this host's own addresses.
    #[error(
        "rule `loopback`: {0} is loopback or the operator Pod's own address, where its sidecars listen (a service \
         mesh's admin port); the operator allows it only with --egress-allow-loopback"
    )]
    Loopback(IpAddr),
    /// A port the operator serves on, at a local address.
    #[error(
        "rule `operator-port`: {addr} port {port} is served by the operator itself (metrics, health, admission, reports)"
    )]
    OperatorPort {
        /// The local address.
        addr: IpAddr,
        /// The operator's port.
        port: u16,
    },
    /// Outside an allowlist.
    #[error("rule `allowlist`: {addr} matches no entry of {list}")]
    NotAllowed {
        /// The refused address.
        addr: IpAddr,
        /// The list that refused it.
        list: List,
    },
}

/// Where the HTTP executor may send. The default refuses only what is refused by default (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct EgressPolicy {
    /// `--egress-allow`: when not empty, every request must match one of these.
    pub allow: Vec<Entry>,
    /// `--egress-allow-by-namespace`: a namespace's list narrows `allow` further for its jobs.
    pub allow_by_namespace: BTreeMap<String, Vec<Entry>>,
    /// `--egress-allow-link-local`.
    pub allow_link_local: bool,
    /// `--egress-allow-loopback`.
    pub allow_loopback: bool,
    /// Ports the operator serves on (its metrics address).
    pub operator_ports: Vec<u16>,
    /// This host's own addresses besides loopback (where a port bound to `0.0.0.0` is reachable too).
    pub local_addrs: Vec<IpAddr>,
}

impl EgressPolicy {
    /// May a job of `namespace` POST to `url` over a connection to any of `addrs` (what its host resolved to, or the
    /// address the URL names)? Every address must pass: the connection may use any of them.
    pub fn check(&self, namespace: &str, url: &Url, addrs: &[IpAddr]) -> Result<(), Denial> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Denial::Scheme(url.scheme().to_string()));
        }
        if addrs.is_empty() {
            return Err(Denial::NoAddress);
        }
        let port = url.port_or_known_default().unwrap_or(80);
        for &addr in addrs {
            self.check_address(namespace, url, addr, port)?;
        }
        Ok(())
    }

    fn check_address(&self, namespace: &str, url: &Url, addr: IpAddr, port: u16) -> Result<(), Denial> {
        let ip = canonical(addr);
        if ip.is_unspecified() {
            return Err(Denial::Unspecified(addr));
        }
        // Every way the address may be read (a local-use NAT64 address under a short prefix: several).
        let readings: Vec<IpAddr> = std::iter::once(ip).chain(local_use_nat64_readings(addr)).collect();
        for &read in &readings {
            if METADATA.contains(&read) {
                return Err(Denial::Metadata(addr));
            }
            if is_link_local(read) && !self.allow_link_local {
                return Err(Denial::LinkLocal(addr));
            }
        }
        let local =
            readings.iter().any(|read| read.is_loopback() || self.local_addrs.iter().any(|a| canonical(*a) == *read));
        if local && self.operator_ports.contains(&port) {
            return Err(Denial::OperatorPort { addr, port });
        }
        if local && !self.allow_loopback {
            return Err(Denial::Loopback(addr));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|e| e.allows(url, addr)) {
            return Err(Denial::NotAllowed { addr, list: List::Global });
        }
        if let Some(entries) = self.allow_by_namespace.get(namespace)
            && !entries.iter().any(|e| e.allows(url, addr))
        {
            return Err(Denial::NotAllowed { addr, list: List::Namespace(namespace.to_string()) });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn entries(list: &[&str]) -> Vec<Entry> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn check(p: &EgressPolicy, u: &str, addrs: &[&str]) -> Result<(), Denial> {
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
        p.check("team-a", &url(u), &addrs)
    }

    #[test]
    fn by_default_ordinary_addresses_are_allowed() {
        let p = EgressPolicy::default();
        assert_eq!(check(&p, "https://hooks.example.com/x", &["203.0.113.7", "2001:db8::7"]), Ok(()));
        assert_eq!(check(&p, "http://svc.team-a.svc:8080/", &["10.96.4.2", "fd12::4"]), Ok(()), "private ranges");
    }

    /// A sidecar of the operator's Pod (a mesh proxy's admin port, a Dapr runtime) listens on loopback or on the
    /// Pod's own address: no job reaches either unless the operator is told to let them.
    #[test]
    fn loopback_and_this_hosts_own_addresses_are_refused_unless_the_operator_allows_them() {
        let p = EgressPolicy { local_addrs: vec![ip("10.244.1.7")], ..Default::default() };
        // The last: this Pod's 10.244.1.7 under a local-use NAT64 /64 prefix (RFC 6052 puts it in bits 72-103).
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "10.244.1.7",
            "64:ff9b:1:0:a:f401:700:0",
        ] {
            assert_eq!(check(&p, "http://h:15000/quitquitquit", &[a]), Err(Denial::Loopback(ip(a))), "{a}");
        }
        let text = check(&p, "http://localhost:15000/", &["127.0.0.1"]).unwrap_err().to_string();
        assert!(text.contains("rule `loopback`") && text.contains("--egress-allow-loopback"), "{text}");
        assert_eq!(check(&p, "http://h:15000/", &["10.244.1.8"]), Ok(()), "another Pod's address");
        let relaxed = EgressPolicy { allow_loopback: true, ..p };
        assert_eq!(check(&relaxed, "http://127.0.0.1:8080/ok", &["127.0.0.1", "::1", "10.244.1.7"]), Ok(()));
    }

    #[test]
    fn the_metadata_address_is_refused_in_every_spelling_even_with_link_local_allowed() {
        let p = EgressPolicy { allow_link_local: true, ..Default::default() };
        for a in ["169.254.169.254", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "fd00:ec2::254", "169.254.170.2"] {
            assert_eq!(check(&p, "http://metadata.internal/", &[a]), Err(Denial::Metadata(ip(a))), "{a}");
        }
        let text = check(&p, "http://169.254.169.254/latest/", &["169.254.169.254"]).unwrap_err().to_string();
        assert!(text.contains("rule `metadata`"), "{text}");
    }

    #[test]
    fn link_local_is_refused_unless_the_operator_allows_it() {
        let p = EgressPolicy::default();
        for a in ["169.254.10.1", "fe80::1", "febf::1", "::ffff:169.254.0.1"] {
            assert_eq!(check(&p, "http://x/", &[a]), Err(Denial::LinkLocal(ip(a))), "{a}");
        }
        assert_eq!(check(&p, "http://x/", &["fec0::1"]), Ok(()), "fec0::/10 is not link-local");
        let relaxed = EgressPolicy { allow_link_local: true, ..Default::default() };
        assert_eq!(check(&relaxed, "http://x/", &["169.254.10.1", "fe80::1"]), Ok(()));
    }

    #[test]
    fn the_unspecified_address_is_refused() {
        let p = EgressPolicy::default();
        assert_eq!(check(&p, "http://0.0.0.0:9000/", &["0.0.0.0"]), Err(Denial::Unspecified(ip("0.0.0.0"))));
        assert_eq!(check(&p, "http://[::]:9000/", &["::"]), Err(Denial::Unspecified(ip("::"))));
    }

    #[test]
    fn the_operators_own_ports_are_refused_on_every_local_address_and_no_other() {
        let p = EgressPolicy {
            operator_ports: vec![8080],
            local_addrs: vec![ip("10.1.2.3")],
            allow_loopback: true,
            ..Default::default()
        };
        for a in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1", "10.1.2.3"] {
            assert_eq!(
                check(&p, "http://h:8080/metrics", &[a]),
                Err(Denial::OperatorPort { addr: ip(a), port: 8080 }),
                "{a}"
            );
        }
        assert_eq!(check(&p, "http://h:8081/", &["127.0.0.1"]), Ok(()), "another port");
        assert_eq!(check(&p, "http://h:8080/", &["10.9.9.9"]), Ok(()), "another host's 8080");
        let default_port = EgressPolicy { operator_ports: vec![80], ..Default::default() };
        assert!(check(&default_port, "http://localhost/", &["127.0.0.1"]).is_err(), "the scheme's port counts");
    }

    #[test]
    fn every_resolved_address_must_pass() {
        let p = EgressPolicy::default();
        assert_eq!(
            check(&p, "http://rebind.example/", &["203.0.113.7", "169.254.169.254"]),
            Err(Denial::Metadata(ip("169.254.169.254")))
        );
        assert_eq!(check(&p, "http://nothing.example/", &[]), Err(Denial::NoAddress));
    }

    #[test]
    fn an_allowlist_of_cidrs_hosts_and_prefixes_admits_only_what_it_names() {
        let p = EgressPolicy {
            allow: entries(&[
                "10.0.0.0/8",
                "127.0.0.1",
                "api.example.com",
                "*.hooks.example.com",
                "https://x.example/in/",
            ]),
            allow_loopback: true,
            ..Default::default()
        };
        assert_eq!(check(&p, "http://svc/", &["10.3.4.5"]), Ok(()));
        assert_eq!(check(&p, "http://svc/", &["::ffff:10.3.4.5"]), Ok(()), "a mapped address is its IPv4");
        assert_eq!(check(&p, "http://127.0.0.1:9/", &["127.0.0.1"]), Ok(()));
        assert_eq!(
            check(&p, "http://127.0.0.3:9/", &["127.0.0.3"]),
            Err(Denial::NotAllowed { addr: ip("127.0.0.3"), list: List::Global })
        );
        assert_eq!(check(&p, "https://API.example.com./v1", &["203.0.113.1"]), Ok(()), "names ignore case, dot");
        assert_eq!(check(&p, "https://a.b.hooks.example.com/", &["203.0.113.1"]), Ok(()));
        assert!(check(&p, "https://hooks.example.com/", &["203.0.113.1"]).is_err(), "*. means subdomains");
        assert!(check(&p, "https://evilapi.example.com/", &["203.0.113.1"]).is_err());
        assert_eq!(check(&p, "https://x.example/in/job?a=1", &["203.0.113.2"]), Ok(()));
        assert_eq!(check(&p, "https://x.example:443/in/", &["203.0.113.2"]), Ok(()), "the scheme's port");
        for refused in [
            "https://x.example/inside",
            "https://x.example/in/../admin",
            "https://x.example/in/%2e%2e/admin",
            "http://x.example/in/",
            "https://x.example:8443/in/",
            "https://x.example.evil.com/in/",
            "https://x.example@evil.com/in/",
        ] {
            assert!(check(&p, refused, &["203.0.113.2"]).is_err(), "{refused}");
        }
    }

    #[test]
    fn the_allowlist_does_not_lift_the_fixed_refusals() {
        let p =
            EgressPolicy { allow: entries(&["0.0.0.0/0", "::/0"]), operator_ports: vec![8080], ..Default::default() };
        assert!(matches!(check(&p, "http://x/", &["169.254.169.254"]), Err(Denial::Metadata(_))));
        assert!(matches!(check(&p, "http://x/", &["169.254.1.1"]), Err(Denial::LinkLocal(_))));
        assert!(matches!(check(&p, "http://x:8080/", &["127.0.0.1"]), Err(Denial::OperatorPort { .. })));
        assert!(matches!(check(&p, "http://x:15000/", &["127.0.0.1"]), Err(Denial::Loopback(_))));
    }

    #[test]
    fn a_namespace_allowlist_narrows_the_global_one_for_that_namespace_only() {
        let p = EgressPolicy {
            allow: entries(&["127.0.0.0/8"]),
            allow_by_namespace: [("team-a".to_string(), entries(&["http://127.0.0.1:9000/team-a/"]))].into(),
            allow_loopback: true,
            ..Default::default()
        };
        assert_eq!(check(&p, "http://127.0.0.1:9000/team-a/x", &["127.0.0.1"]), Ok(()));
        let refused = check(&p, "http://127.0.0.1:9000/team-b/x", &["127.0.0.1"]).unwrap_err();
        assert_eq!(refused, Denial::NotAllowed { addr: ip("127.0.0.1"), list: List::Namespace("team-a".into()) });
        assert!(refused.to_string().contains("namespace team-a (--egress-allow-by-namespace)"), "{refused}");
        assert_eq!(p.check("team-b", &url("http://127.0.0.1:9000/team-b/x"), &[ip("127.0.0.1")]), Ok(()));
        assert!(p.check("team-b", &url("http://10.0.0.1/"), &[ip("10.0.0.1")]).is_err(), "the global list holds");
    }

    #[test]
    fn only_http_and_https_are_sent() {
        assert_eq!(
            check(&EgressPolicy::default(), "file:///etc/passwd", &["127.0.0.1"]),
            Err(Denial::Scheme("file".into()))
        );
    }

    /// A host-name entry admits whatever its name resolves to (its DNS owner decides: an `ExternalName` Service can
    /// point anywhere); a global list of CIDRs still fences where a namespace's names may lead.
    #[test]
    fn limit_a_name_entry_follows_its_dns_and_only_a_global_cidr_list_fences_where_it_leads() {
        let names_only = EgressPolicy {
            allow_by_namespace: [("team-a".to_string(), entries(&["*.team-a.svc.cluster.local"]))].into(),
            ..Default::default()
        };
        let u = "http://x.team-a.svc.cluster.local:15000/";
        assert_eq!(check(&names_only, u, &["10.96.0.1"]), Ok(()), "another team's Service, or the apiserver");
        assert!(matches!(check(&names_only, u, &["127.0.0.1"]), Err(Denial::Loopback(_))), "not loopback");
        let with_loopback = EgressPolicy { allow_loopback: true, ..names_only.clone() };
        assert_eq!(check(&with_loopback, u, &["127.0.0.1"]), Ok(()), "loopback, once allowed, through a name");
        let fenced = EgressPolicy { allow: entries(&["10.96.0.0/12"]), ..with_loopback };
        assert_eq!(check(&fenced, u, &["10.96.0.1"]), Ok(()));
        assert!(matches!(check(&fenced, u, &["127.0.0.1"]), Err(Denial::NotAllowed { list: List::Global, .. })));
    }

    #[test]
    fn entries_parse_or_say_what_they_expect() {
        assert_eq!("10.0.0.0/8".parse(), Ok(Entry::Cidr("10.0.0.0/8".parse().unwrap())));
        assert_eq!("10.1.2.3/8".parse(), Ok(Entry::Cidr("10.0.0.0/8".parse().unwrap())), "host bits dropped");
        assert_eq!("::ffff:10.0.0.1".parse(), Ok(Entry::Cidr("10.0.0.1/32".parse().unwrap())));
        assert_eq!(" API.Example.com. ".parse(), Ok(Entry::Host("api.example.com".into())));
        assert_eq!("*.example.com".parse(), Ok(Entry::Subdomains(".example.com".into())));
        for bad in ["", "ftp://x/", "a b", "*.", "http://", "10.0.0.0/33"] {
            assert!(bad.parse::<Entry>().is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod more_metadata_and_known_limits {
    //! Metadata addresses added after a security review, and known limits (docs/security.md): the tests named
    //! `limit_*` assert what the policy does not refuse.
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn gcp_v6_azure_wireserver_tencent_eks_pod_identity_and_local_use_nat64_metadata_are_refused_even_with_link_local_allowed()
     {
        let relaxed = EgressPolicy { allow_link_local: true, ..Default::default() };
        let u = Url::parse("http://x/").unwrap();
        for a in [
            "fd20:ce::254",
            "169.254.170.23",
            "fd00:ec2::23",
            "168.63.129.16",
            "169.254.0.23",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:abcd::a9fe:a9fe",
            "64:ff9b:1::a83f:8110",
            // 169.254.169.254 under a /48 and a /64 local-use prefix (RFC 6052 layouts): 10.0.0.1 and 254.0.0.0 read
            // as a /96.
            "64:ff9b:1:a9fe:a9:fe00:a00:1",
            "64:ff9b:1:0:a9:fea9:fe00:0",
        ] {
            for p in [&EgressPolicy::default(), &relaxed] {
                assert!(
                    matches!(p.check("ns", &u, &[ip(a)]), Err(Denial::Metadata(_))),
                    "{a}: {:?}",
                    p.check("ns", &u, &[ip(a)])
                );
            }
        }
        assert_eq!(canonical(ip("64:ff9b:1::a00:1")), ip("10.0.0.1"));
        // An ordinary address under a /96 local-use prefix is not refused by its other readings.
        assert_eq!(EgressPolicy::default().check("ns", &u, &[ip("64:ff9b:1::a00:1")]), Ok(()));
    }

    #[test]
    fn limit_operator_ports_are_judged_only_on_local_addresses() {
        // Another replica's Pod IP, or the webhook/metrics Service ClusterIP (443 -> 9443), is not local.
        let p = EgressPolicy { operator_ports: vec![8080, 9443], ..Default::default() };
        let u = Url::parse("https://bgjobs-webhook.bgjobs.svc:443/mutate").unwrap();
        assert_eq!(p.check("ns", &u, &[ip("10.96.0.20")]), Ok(()));
        let u = Url::parse("http://10.244.1.7:8080/metrics").unwrap();
        assert_eq!(p.check("ns", &u, &[ip("10.244.1.7")]), Ok(()));
    }

    #[test]
    fn limit_a_metrics_port_of_zero_protects_no_port() {
        // --metrics-addr 127.0.0.1:0 binds a random port; the policy is built from the flag (port 0).
        let p = EgressPolicy { operator_ports: vec![0], allow_loopback: true, ..Default::default() };
        let u = Url::parse("http://127.0.0.1:41234/metrics").unwrap();
        assert_eq!(p.check("ns", &u, &[ip("127.0.0.1")]), Ok(()));
    }
}

#[cfg(test)]
mod known_limits_of_prefix_and_host_entries {
    //! docs/security.md: what a URL prefix or host entry admits depends on the receiver.
    use super::*;

    #[test]
    fn limit_prefix_entries_admit_segments_that_receivers_may_resolve_upwards_and_host_entries_every_port() {
        let p = EgressPolicy { allow: vec!["https://x.example/team-a/".parse().unwrap()], ..Default::default() };
        let a: IpAddr = "203.0.113.2".parse().unwrap();
        // Tomcat/Jetty treat `..;` as `..`; many gateways decode %2f before normalizing.
        for u in [
            "https://x.example/team-a/..;/admin",
            "https://x.example/team-a/..%2fadmin",
            "https://x.example/team-a/%2e%2e%2fadmin",
        ] {
            assert_eq!(p.check("ns", &Url::parse(u).unwrap(), &[a]), Ok(()), "{u}");
        }
        // A host or CIDR entry admits every port and both schemes.
        let h = EgressPolicy { allow: vec!["api.example.com".parse().unwrap()], ..Default::default() };
        assert_eq!(h.check("ns", &Url::parse("http://api.example.com:6379/").unwrap(), &[a]), Ok(()));
    }
}
