//! The HTTP executor: POST the job's args as JSON; the status code says how it went.
//!
//! 2xx → success; 4xx → permanent failure (the request itself is wrong, retrying will not help; 408 and 429 are
//! the exceptions and are retried); 5xx, a timeout or a connection error → retryable failure; 3xx → permanent
//! failure, because redirects are not followed (the egress policy judged `spec.http.url`, not where it points).
//! The job's UID goes in `Idempotency-Key` so the receiver can deduplicate retries; `X-BGJobs-Attempt` is the
//! fencing token (a receiver that remembers the highest attempt it saw per key can refuse a stale one) and
//! `X-BGJobs-Worker` names the replica that sent it.
//!
//! Asynchronous jobs: when the operator serves reports (`--report-url`), the request also carries
//! `X-BGJobs-Report-Url` and `X-BGJobs-Report-Token`, and a `202 Accepted` answer means the work goes on elsewhere:
//! the attempt stays Running until the worker reports its outcome ([`crate::report`]). Without a report URL nothing
//! could report, so a 202 is a success like any 2xx.
//!
//! Resolve, check, connect: the host is resolved once, every address is checked against the egress policy
//! ([`crate::policy::egress`]), and the request goes out on a client whose resolver answers only that host, with
//! exactly the checked addresses. A second lookup (DNS rebinding: a short-lived answer that changes between check and
//! connect) cannot happen, and the URL still carries the host name, so `Host`, SNI and certificate checks are
//! unchanged. No proxy from the environment is used: a proxy would resolve the host itself.
//!
//! A job's own headers (`spec.http.headers`) cannot replace what the policy checked or what bgjobs sends: `Host`
//! (a shared ingress routes by it, so it would reach another virtual host than the one allowed), the framing and
//! connection headers (`Content-Length`, `Transfer-Encoding`, `Connection`, `Upgrade`, `TE`, `Trailer`), `Proxy-*`,
//! `X-BGJobs-*` and `Idempotency-Key` (the job's UID: a second one would let a job pass for another at a receiver
//! that deduplicates) fail the job before anything is sent ([`reserved_header`]). Any other header replaces the one
//! bgjobs sets under its name (`Content-Type`), never adds a second value.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::JobContext;
use crate::api::{Args, HttpTarget};
use crate::policy::EgressPolicy;
use crate::retry::AttemptResult;

/// Longest part of a response body quoted in `lastError`.
const BODY_EXCERPT: usize = 300;
/// Most of an error answer's body read for that quote: enough for 300 characters of UTF-8.
const BODY_READ_LIMIT: usize = 4 * BODY_EXCERPT;
/// Longest wait for that much of it.
const BODY_READ_TIME: Duration = Duration::from_secs(5);

/// Name resolution for the HTTP executor (a trait so tests can answer with addresses of their choosing).
pub trait Lookup: Send + Sync {
    /// The addresses of `host`.
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo`).
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let mut addrs: Vec<IpAddr> = tokio::net::lookup_host((host, port)).await?.map(|a| a.ip()).collect();
            addrs.dedup();
            Ok(addrs)
        })
    }
}

/// A resolver that knows one host, with the addresses the policy checked, and refuses every other name.
struct Pinned {
    host: String,
    addrs: Vec<IpAddr>,
}

impl Resolve for Pinned {
    fn resolve(&self, name: Name) -> Resolving {
        let answer = if name.as_str().eq_ignore_ascii_case(&self.host) {
            let addrs: Vec<SocketAddr> = self.addrs.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        } else {
            Err(format!("{} was not checked by the egress policy", name.as_str()).into())
        };
        Box::pin(std::future::ready(answer))
    }
}

/// Why a job may not set header `name` itself, if it may not: the headers that pick the receiver (`Host`), frame
/// the request or the connection, address a proxy, or carry bgjobs' own fencing (`X-BGJobs-*`).
pub fn reserved_header(name: &str) -> Option<&'static str> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "host" => Some("it picks the virtual host, which the egress policy checked in spec.http.url"),
        "content-length" | "transfer-encoding" | "connection" | "upgrade" | "te" | "trailer" | "keep-alive" => {
            Some("it frames the request or the connection, which the HTTP client owns")
        }
        _ if name.starts_with("proxy-") => Some("it addresses a proxy, and bgjobs connects directly"),
        _ if name.starts_with("x-bgjobs-") => Some("bgjobs sets the X-BGJobs-* headers itself"),
        "idempotency-key" => Some("bgjobs sets it to the job's UID, which receivers deduplicate on"),
        _ => None,
    }
}

/// Why the job's header `name: value` is not sent, if it is not: a name or a value HTTP does not allow (every attempt
/// would fail the same way, so the job fails at once, saying which), or a reserved name ([`reserved_header`]).
fn refused_header(name: &str, value: &str) -> Option<String> {
    if let Err(e) = reqwest::header::HeaderName::from_bytes(name.as_bytes()) {
        return Some(format!("has {name:?}, which is not an HTTP header name ({e})"));
    }
    if let Err(e) = reqwest::header::HeaderValue::from_str(value) {
        return Some(format!(
            "gives {name:?} a value HTTP does not allow ({e}: no control characters, such as line breaks)"
        ));
    }
    reserved_header(name).map(|why| format!("sets {name:?}, which a job may not set ({why})"))
}

/// The HTTP executor of a replica: its egress policy and resolver.
pub struct HttpExecutor {
    policy: EgressPolicy,
    lookup: Arc<dyn Lookup>,
}

impl HttpExecutor {
    /// An executor that resolves with `lookup` and sends what `policy` allows.
    pub fn new(policy: EgressPolicy, lookup: Arc<dyn Lookup>) -> Self {
        HttpExecutor { policy, lookup }
    }

    /// Resolve the URL's host and check every address: the addresses to connect to, or how the attempt ends.
    async fn checked(&self, url: &Url, namespace: &str) -> Result<Vec<IpAddr>, AttemptResult> {
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = match url.host() {
            Some(Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            Some(Host::Domain(name)) => self
                .lookup
                .lookup(name, port)
                .await
                .map_err(|e| AttemptResult::Retryable(format!("POST {url}: cannot resolve {name}: {e}")))?,
            None => return Err(AttemptResult::Permanent(format!("spec.http.url {url} has no host"))),
        };
        self.policy.check(namespace, url, &addrs).map_err(|denial| {
            let shown: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
            AttemptResult::Permanent(format!(
                "POST {url} refused by the egress policy ({} is {}), nothing was sent: {denial}",
                url.host_str().unwrap_or_default(),
                shown.join(", ")
            ))
        })?;
        Ok(addrs)
    }

    /// POST `args` to `target.url` for the attempt described by `ctx`, if the egress policy allows it.
    pub async fn post(
        &self,
        target: &HttpTarget,
        ctx: &JobContext,
        args: &Args,
        attempt_timeout_seconds: Option<i64>,
    ) -> AttemptResult {
        let url = match Url::parse(&target.url) {
            Ok(u) => u,
            Err(e) => return AttemptResult::Permanent(format!("spec.http.url {:?} is not a URL: {e}", target.url)),
        };
        if let Some(why) = target.headers.iter().find_map(|(name, value)| refused_header(name, value)) {
            return AttemptResult::Permanent(format!("spec.http.headers {why}; nothing was sent"));
        }
        let timeout = target.timeout_seconds.or(attempt_timeout_seconds).map(|s| Duration::from_secs(s.max(1) as u64));
        let checked = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, self.checked(&url, &ctx.namespace))
                    .await
                    .unwrap_or_else(|_| Err(AttemptResult::Retryable(format!("POST {url}: resolving timed out")))),
                None => self.checked(&url, &ctx.namespace).await,
            }
        };
        let addrs = tokio::select! {
            r = checked => r,
            _ = ctx.cancel.cancelled() => return AttemptResult::Retryable(format!("POST {url} was cancelled")),
        };
        let addrs = match addrs {
            Ok(a) => a,
            Err(ended) => return ended,
        };
        let pinned = Pinned { host: url.host_str().unwrap_or_default().to_string(), addrs };
        // One client per request: the resolver is the request's own, so no job can connect to an address checked
        // for another (whose namespace may allow more).
        let client = match reqwest::Client::builder()
            .user_agent("bgjobs")
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(pinned))
            .build()
        {
            Ok(c) => c,
            Err(e) => return AttemptResult::Retryable(format!("POST {url}: cannot build the HTTP client: {e}")),
        };
        let mut req = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(args.text().to_string())
            .header("Idempotency-Key", &ctx.uid)
            .header("X-BGJobs-Job", format!("{}/{}", ctx.namespace, ctx.name))
            .header("X-BGJobs-Attempt", ctx.attempt.to_string())
            .header("X-BGJobs-Worker", &ctx.worker);
        if ctx.report.hands_out() {
            req = req
                .header("X-BGJobs-Report-Url", ctx.report.url().unwrap_or_default())
                .header("X-BGJobs-Report-Token", ctx.report.token().unwrap_or_default());
        }
        // In place of what the request has under the same name (`Content-Type`), never beside it: a second value
        // is read by some receivers and not by others.
        let mut own = reqwest::header::HeaderMap::new();
        for (k, v) in &target.headers {
            // Checked by `refused_header` before anything is built.
            if let (Ok(k), Ok(v)) =
                (reqwest::header::HeaderName::from_bytes(k.as_bytes()), reqwest::header::HeaderValue::from_str(v))
            {
                own.insert(k, v);
            }
        }
        req = req.headers(own);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let response = tokio::select! {
            r = req.send() => r,
            _ = ctx.cancel.cancelled() => return AttemptResult::Retryable(format!("POST {} was cancelled", target.url)),
        };
        match response {
            Err(e) if e.is_timeout() => AttemptResult::Retryable(format!("POST {} timed out", target.url)),
            Err(e) => AttemptResult::Retryable(format!("POST {} failed: {e}", target.url)),
            Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED && ctx.report.hands_out() => {
                drop(resp);
                ctx.report.wait_for_report(true).await
            }
            Ok(resp) => outcome(&target.url, resp).await,
        }
    }
}

async fn outcome(url: &str, resp: reqwest::Response) -> AttemptResult {
    let status = resp.status();
    if status.is_success() {
        return AttemptResult::Succeeded;
    }
    if status.is_redirection() {
        let to = resp.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("?");
        return AttemptResult::Permanent(format!(
            "POST {url} answered {status} (to {to}): redirects are not followed, the egress policy checks only \
             spec.http.url; point the job at the final URL"
        ));
    }
    let msg = format!("POST {url} answered {status}: {}", excerpt(resp).await);
    let retry_anyway = status.as_u16() == 408 || status.as_u16() == 429;
    if status.is_client_error() && !retry_anyway {
        AttemptResult::Permanent(msg)
    } else {
        AttemptResult::Retryable(msg)
    }
}

/// The start of an error answer's body, for `lastError`: at most [`BODY_READ_LIMIT`] bytes of it are read, for at
/// most [`BODY_READ_TIME`], and the rest is dropped unread. The status decides the outcome; the body only explains
/// it, and an endpoint that answers with a body without end (or one that never comes) must not fill the replica's
/// memory or hold the attempt.
async fn excerpt(mut resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let read = async {
        while body.len() < BODY_READ_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(BODY_READ_TIME, read).await;
    body.truncate(BODY_READ_LIMIT);
    String::from_utf8_lossy(&body).chars().take(BODY_EXCERPT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    /// Answers with the next of its scripted answers on each lookup, and counts lookups.
    struct Scripted(Mutex<Vec<Vec<IpAddr>>>, Mutex<usize>);

    impl Lookup for Scripted {
        fn lookup<'a>(&'a self, _host: &'a str, _port: u16) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
            *self.1.lock().unwrap() += 1;
            let mut answers = self.0.lock().unwrap();
            let next = if answers.len() > 1 { answers.remove(0) } else { answers[0].clone() };
            Box::pin(std::future::ready(Ok(next)))
        }
    }

    fn scripted(answers: &[&[&str]]) -> Arc<Scripted> {
        let answers = answers.iter().map(|a| a.iter().map(|s| s.parse().unwrap()).collect()).collect();
        Arc::new(Scripted(Mutex::new(answers), Mutex::new(0)))
    }

    pub(super) fn ctx() -> JobContext {
        JobContext {
            namespace: "team-a".into(),
            name: "j".into(),
            uid: "uid-1".into(),
            job_name: "call".into(),
            attempt: 1,
            worker: "w".into(),
            leases: vec![],
            cancel: CancellationToken::new(),
            report: Default::default(),
        }
    }

    /// The default policy, but for loopback, where these tests' servers listen.
    pub(super) fn loopback_allowed() -> EgressPolicy {
        EgressPolicy { allow_loopback: true, ..Default::default() }
    }

    fn target(url: &str) -> HttpTarget {
        HttpTarget { url: url.into(), headers: Default::default(), timeout_seconds: Some(5) }
    }

    #[tokio::test]
    async fn a_name_resolving_to_the_metadata_address_is_refused_before_any_connection() {
        let lookup = scripted(&[&["169.254.169.254"]]);
        let exec = HttpExecutor::new(EgressPolicy::default(), lookup.clone());
        let r = exec.post(&target("http://metadata.example:80/latest"), &ctx(), &Args::default(), None).await;
        let AttemptResult::Permanent(msg) = r else { panic!("expected a permanent failure, got {r:?}") };
        assert!(msg.contains("refused by the egress policy (metadata.example is 169.254.169.254)"), "{msg}");
        assert!(msg.contains("rule `metadata`") && msg.contains("nothing was sent"), "{msg}");
    }

    /// By default a job cannot call what listens on the operator Pod's loopback (a sidecar's admin port).
    #[tokio::test]
    async fn by_default_a_job_aimed_at_loopback_is_refused_before_any_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let exec = HttpExecutor::new(EgressPolicy::default(), Arc::new(SystemLookup));
        let url = format!("http://localhost:{port}/quitquitquit");
        let r = exec.post(&target(&url), &ctx(), &Args::default(), None).await;
        let AttemptResult::Permanent(msg) = r else { panic!("expected a permanent failure, got {r:?}") };
        assert!(msg.contains("rule `loopback`") && msg.contains("nothing was sent"), "{msg}");
        let accepted = tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "the listener was reached: {accepted:?}");
    }

    #[tokio::test]
    async fn the_request_goes_to_the_checked_address_and_a_rebinding_answer_is_never_asked_for() {
        // A loopback server; the name first resolves to it, then (a rebinding DNS server) to the metadata address.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        let lookup = scripted(&[&["127.0.0.1"], &["169.254.169.254"]]);
        let exec = HttpExecutor::new(loopback_allowed(), lookup.clone());
        let url = format!("http://rebind.example:{port}/hook");
        let r = exec.post(&target(&url), &ctx(), &Args::default(), None).await;
        assert!(matches!(r, AttemptResult::Succeeded), "{r:?}");
        assert_eq!(*lookup.1.lock().unwrap(), 1, "one lookup: the connection used the checked answer");
        let request = server.await.unwrap();
        assert!(request.to_ascii_lowercase().contains(&format!("host: rebind.example:{port}")), "{request}");
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = 0;
            // The first request is answered with a redirect; a second one would be the redirect followed.
            while let Ok(Ok((mut sock, _))) = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
            {
                seen += 1;
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{port}/elsewhere\r\n\
                     content-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            }
            seen
        });
        let exec = HttpExecutor::new(loopback_allowed(), Arc::new(SystemLookup));
        let r = exec.post(&target(&format!("http://127.0.0.1:{port}/")), &ctx(), &Args::default(), None).await;
        let AttemptResult::Permanent(msg) = r else { panic!("expected a permanent failure, got {r:?}") };
        assert!(msg.contains("307") && msg.contains("redirects are not followed"), "{msg}");
        assert_eq!(server.await.unwrap(), 1, "one request: the redirect was not followed");
    }

    /// An error answer's body is only quoted: one without end is read only in part (it would fill the replica's
    /// memory), and one that never comes is waited for only a while (it would hold the attempt for ever, without a
    /// timeout). Neither job has a timeout; both attempts end, retryable, with the status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_error_answers_body_without_end_is_read_only_in_part_and_one_that_never_comes_only_a_while() {
        async fn serve(answer: &'static [u8], endless: bool) -> (u16, tokio::task::JoinHandle<usize>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let mut sent = 0;
                if sock.write_all(answer).await.is_err() {
                    return sent;
                }
                let chunk = [b"10000\r\n".as_slice(), &[b'x'; 0x10000], b"\r\n"].concat();
                while endless && sock.write_all(&chunk).await.is_ok() {
                    sent += chunk.len();
                }
                // A body that never comes: the connection stays open, silent, until the client leaves.
                while !endless && sock.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                sent
            });
            (port, server)
        }
        let no_timeout = |port: u16| HttpTarget {
            url: format!("http://127.0.0.1:{port}/"),
            headers: Default::default(),
            timeout_seconds: None,
        };
        let exec = HttpExecutor::new(loopback_allowed(), Arc::new(SystemLookup));
        let (ctx, args) = (ctx(), Args::default());
        let endless = b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n";
        let (port, server) = serve(endless, true).await;
        let target = no_timeout(port);
        let post = exec.post(&target, &ctx, &args, None);
        let r = tokio::time::timeout(Duration::from_secs(60), post).await.expect("the endless body was read for 60 s");
        let AttemptResult::Retryable(msg) = r else { panic!("expected a retryable failure, got {r:?}") };
        assert!(msg.contains("answered 500 Internal Server Error: xxx"), "{msg}");
        assert!(msg.len() < 400, "the quote is cut: {} bytes", msg.len());
        let sent = server.await.unwrap();
        assert!(sent < 64 << 20, "the body was read on: {sent} bytes sent");

        let silent = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n";
        let (port, server) = serve(silent, false).await;
        let started = tokio::time::Instant::now();
        let target = no_timeout(port);
        let post = exec.post(&target, &ctx, &args, None);
        let r = tokio::time::timeout(Duration::from_secs(60), post).await.expect("the silent body was waited for 60 s");
        let AttemptResult::Retryable(msg) = r else { panic!("expected a retryable failure, got {r:?}") };
        assert!(msg.contains("answered 503 Service Unavailable"), "{msg}");
        assert!(started.elapsed() >= BODY_READ_TIME, "the body was waited for {:?}", started.elapsed());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn the_pinned_resolver_answers_only_its_host() {
        let pinned = Pinned { host: "a.example".into(), addrs: vec!["127.0.0.1".parse().unwrap()] };
        let ok: Vec<SocketAddr> = pinned.resolve("A.example".parse().unwrap()).await.unwrap().collect();
        assert_eq!(ok, ["127.0.0.1:0".parse().unwrap()]);
        assert!(pinned.resolve("b.example".parse().unwrap()).await.is_err());
    }
}

#[cfg(test)]
mod reserved_headers {
    use super::tests::{ctx, loopback_allowed};
    use super::*;
    use tokio::io::AsyncReadExt;

    struct To(IpAddr);
    impl Lookup for To {
        fn lookup<'a>(&'a self, _h: &'a str, _p: u16) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
            let a = self.0;
            Box::pin(async move { Ok(vec![a]) })
        }
    }

    #[test]
    fn host_framing_proxy_and_bgjobs_headers_are_reserved_in_any_case() {
        for h in [
            "Host",
            "HOST",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Upgrade",
            "TE",
            "Trailer",
            "Proxy-Authorization",
            "proxy-connection",
            "X-BGJobs-Attempt",
            "x-bgjobs-anything",
            "Idempotency-Key",
        ] {
            assert!(reserved_header(h).is_some(), "{h} must be reserved");
        }
        for h in ["Authorization", "Content-Type", "X-Original-URL", "X-Request-Id", "Hostname"] {
            assert_eq!(reserved_header(h), None, "{h} is the job's own");
        }
    }

    /// An allowlist by host name or URL prefix pins scheme, host, port and path; a `Host` header from
    /// spec.http.headers would replace the Host the receiver routes by (a shared ingress serves other vhosts).
    #[tokio::test]
    async fn a_job_header_that_would_replace_the_checked_host_fails_the_job_and_nothing_is_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        let policy = EgressPolicy {
            allow: vec![format!("http://hooks.example.test:{port}/team-a/").parse().unwrap()],
            ..loopback_allowed()
        };
        let exec = HttpExecutor::new(policy, Arc::new(To("127.0.0.1".parse().unwrap())));
        let target = HttpTarget {
            url: format!("http://hooks.example.test:{port}/team-a/x"),
            headers: [
                ("Host".to_string(), "admin.internal.test".to_string()),
                ("X-Original-URL".to_string(), "/admin/delete-everything".to_string()),
            ]
            .into(),
            timeout_seconds: Some(5),
        };
        let r = exec.post(&target, &ctx(), &Args::default(), None).await;
        match &r {
            AttemptResult::Permanent(m) => assert!(m.contains("\"Host\"") && m.contains("nothing was sent"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Nothing connected: the listener is still waiting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!server.is_finished(), "a request was sent: {:?}", server.await);
        server.abort();
    }

    /// A job's `Content-Type` replaces the JSON one instead of adding a second value, and its `Idempotency-Key`
    /// (another job's UID, to pass for it at a receiver that deduplicates) fails the job with nothing sent.
    #[tokio::test]
    async fn a_job_header_replaces_the_one_bgjobs_sets_and_the_idempotency_key_is_not_the_jobs_to_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            let _ =
                tokio::io::AsyncWriteExt::write_all(&mut sock, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
            (listener, head)
        });
        let exec = HttpExecutor::new(loopback_allowed(), Arc::new(SystemLookup));
        let target = |name: &str, value: &str| HttpTarget {
            url: format!("http://127.0.0.1:{port}/"),
            headers: [(name.to_string(), value.to_string())].into(),
            timeout_seconds: Some(5),
        };
        let r =
            exec.post(&target("Content-Type", "application/cloudevents+json"), &ctx(), &Args::default(), None).await;
        assert!(matches!(r, AttemptResult::Succeeded), "{r:?}");
        let (listener, head) = server.await.unwrap();
        assert_eq!(head.matches("content-type:").count(), 1, "one Content-Type: {head}");
        assert!(head.contains("content-type: application/cloudevents+json"), "{head}");
        assert_eq!(head.matches("idempotency-key:").count(), 1, "{head}");
        let r = exec.post(&target("idempotency-key", "another-jobs-uid"), &ctx(), &Args::default(), None).await;
        match &r {
            AttemptResult::Permanent(m) => {
                assert!(m.contains("idempotency-key") && m.contains("nothing was sent"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a request was sent");
    }

    /// A header name or value HTTP does not allow fails every attempt the same way: the job fails at once, saying
    /// which header and why, and nothing is sent (it was retried until the job's timeout, as "builder error").
    #[tokio::test]
    async fn a_header_http_does_not_allow_fails_the_job_saying_why_and_nothing_is_sent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let exec = HttpExecutor::new(loopback_allowed(), Arc::new(SystemLookup));
        let cases = [
            ("X Trace", "1", "\"X Trace\", which is not an HTTP header name"),
            ("X-Trace", "a\nb", "\"X-Trace\" a value HTTP does not allow"),
        ];
        for (name, value, expected) in cases {
            let target = HttpTarget {
                url: format!("http://127.0.0.1:{port}/"),
                headers: [(name.to_string(), value.to_string())].into(),
                timeout_seconds: Some(5),
            };
            let r = exec.post(&target, &ctx(), &Args::default(), None).await;
            match &r {
                AttemptResult::Permanent(m) => assert!(m.contains(expected) && m.contains("nothing was sent"), "{m}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a request was sent");
    }
}
