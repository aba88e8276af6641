//! The report endpoint every replica serves (`--report-addr`): plain HTTP/1.1 (hyper, as the admission webhook),
//! in front of [`super::apply`].
//!
//! `POST /v1/complete`, `/v1/fail` or `/v1/heartbeat` with `Authorization: Bearer <token>` and a JSON body (see
//! docs/usage.md, "Asynchronous jobs" for the contract). Every answer is JSON: `{"job", "attempt", "phase", "message"}`
//! when recorded (200), `{"code", "error"}` otherwise.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;
use tokio::net::TcpListener;
use tracing::{debug, info};

use super::decide::{MAX_RESULT_BYTES, Refusal, Report};
use crate::api::BackgroundJob;
use crate::error::Result;
use crate::worker::Worker;

/// Where reports are POSTed, under the report URL: `/v1/<kind>`.
pub const PATH_PREFIX: &str = "/v1/";
/// The largest request body read: a result at its cap, with room for the rest of the body.
const MAX_BODY: usize = MAX_RESULT_BYTES + 8 * 1024;

/// How many reports one replica applies at once (each costs apiserver reads and writes).
const MAX_IN_FLIGHT: usize = 64;
/// How many of those its cache cannot vouch for ([`super::token::Parsed::vouched_by`]): a job it does not show yet,
/// a finished job's late repeat, or a forgery, which only a read of its job refuses.
const MAX_UNVOUCHED_IN_FLIGHT: usize = 16;
/// Bytes of reports read at once: 400 at their largest; a heartbeat is a hundred bytes.
const BODY_BUDGET: usize = 400 * MAX_BODY;

/// Serve reports on `addr` until the process ends. Returns the bound address.
pub async fn serve(addr: SocketAddr, worker: Arc<Worker>, jobs: Store<BackgroundJob>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(%bound, "serving the report endpoint (POST /v1/complete, /v1/fail, /v1/heartbeat)");
    // Reports in flight are bounded: each costs apiserver reads and writes on the client that also renews this
    // replica's tenure, so a flood (forged or not) must not starve it. Past the bound a report is answered 503. Those
    // the cache cannot vouch for have fewer places of their own: a forged token is refused only once its job is read
    // (seconds, from an overloaded apiserver), and a flood of them must not keep genuine reports out.
    let in_flight = Arc::new(InFlight {
        vouched: tokio::sync::Semaphore::new(MAX_IN_FLIGHT - MAX_UNVOUCHED_IN_FLIGHT),
        unvouched: tokio::sync::Semaphore::new(MAX_UNVOUCHED_IN_FLIGHT),
        jobs,
    });
    // Before a report is applied its token is not checked: what a peer costs until then is bounded (`serving`), and
    // a body still arriving holds no place among the reports in flight.
    // Workers report from their own addresses, unless a proxy or an ingress in front of the endpoint brings them all
    // from its own: a larger share for that.
    let bounds = crate::serving::Bounds::new(BODY_BUDGET, MAX_BODY, 256);
    tokio::spawn(async move {
        loop {
            let (sock, peer, place) = bounds.accept(&listener, "report endpoint").await;
            let (worker, in_flight, bounds) = (worker.clone(), in_flight.clone(), bounds.clone());
            tokio::spawn(async move {
                let _place = place;
                let service = hyper::service::service_fn(move |req| {
                    handle(worker.clone(), in_flight.clone(), bounds.clone(), req)
                });
                let conn =
                    crate::serving::Bounds::http1().serve_connection(hyper_util::rt::TokioIo::new(sock), service);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "report connection ended");
                }
            });
        }
    });
    Ok(bound)
}

/// The places of reports being applied, and the cache that says which kind a report takes.
struct InFlight {
    vouched: tokio::sync::Semaphore,
    unvouched: tokio::sync::Semaphore,
    jobs: Store<BackgroundJob>,
}

impl InFlight {
    /// A place for a report presented with `token`, if one of its kind is free.
    fn acquire(&self, token: &str) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let cached = |c: &super::token::Claims| self.jobs.get(&ObjectRef::new(&c.name).within(&c.namespace));
        let vouched = super::token::parse(token).is_ok_and(|t| t.vouched_by(cached(&t.claims).as_deref()));
        let places = if vouched { &self.vouched } else { &self.unvouched };
        places.try_acquire().ok()
    }
}

async fn handle(
    worker: Arc<Worker>,
    in_flight: Arc<InFlight>,
    bounds: crate::serving::Bounds,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let received = receive(&worker, &in_flight, &bounds, req).await;
    let (code, body) = match received {
        Ok(applied) => (200, serde_json::to_vec(&applied).unwrap_or_default()),
        Err(refusal) => {
            debug!(code = refusal.code, error = %refusal.message, "report refused");
            (
                refusal.code,
                serde_json::to_vec(&serde_json::json!({"code": refusal.code, "error": refusal.message}))
                    .unwrap_or_default(),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

async fn receive(
    worker: &Worker,
    in_flight: &InFlight,
    bounds: &crate::serving::Bounds,
    req: Request<Incoming>,
) -> std::result::Result<super::Applied, Refusal> {
    let kind = req.uri().path().strip_prefix(PATH_PREFIX).unwrap_or_default().to_string();
    if !["complete", "fail", "heartbeat"].contains(&kind.as_str()) {
        return Err(Refusal::new(404, "reports go to POST /v1/complete, /v1/fail or /v1/heartbeat"));
    }
    if req.method() != Method::POST {
        return Err(Refusal::new(405, format!("POST the report to /v1/{kind}")));
    }
    let token = bearer(req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()))?;
    let body = match bounds.read(req).await {
        Ok(b) => b,
        Err(unread) if unread.code == 413 => {
            return Err(Refusal::new(
                413,
                format!(
                    "the report is over {MAX_BODY} bytes; a result may be at most {MAX_RESULT_BYTES} bytes of JSON"
                ),
            ));
        }
        Err(unread) => return Err(Refusal::new(unread.code, unread.message)),
    };
    let report = parse(&kind, &body.bytes)?;
    drop(body);
    let Some(_applying) = in_flight.acquire(&token) else {
        return Err(Refusal::new(503, "too many reports in flight on this replica; try again"));
    };
    super::apply::apply(worker, &token, report).await
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(header: Option<&str>) -> std::result::Result<String, Refusal> {
    header
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Refusal::new(401, "missing token: send it as `Authorization: Bearer <token>`"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    #[serde(default)]
    result: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    message: String,
    #[serde(default = "yes")]
    retryable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    #[serde(default)]
    percent: Option<i32>,
    #[serde(default)]
    message: Option<String>,
}

/// The report a body says, for `kind` (`complete`, `fail`, `heartbeat`). An empty body is `{}`.
pub fn parse(kind: &str, body: &[u8]) -> std::result::Result<Report, Refusal> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let bad = |e: serde_json::Error| Refusal::new(400, format!("malformed {kind} report: {e}"));
    match kind {
        "complete" => {
            let b: CompleteBody = serde_json::from_slice(body).map_err(bad)?;
            // `"result": null` is no result.
            Ok(Report::Complete { result: b.result.filter(|r| !r.is_null()) })
        }
        "fail" => {
            let b: FailBody = serde_json::from_slice(body).map_err(bad)?;
            Ok(Report::Fail { message: b.message, retryable: b.retryable })
        }
        "heartbeat" => {
            let b: HeartbeatBody = serde_json::from_slice(body).map_err(bad)?;
            Ok(Report::Heartbeat { percent: b.percent, message: b.message })
        }
        _ => Err(Refusal::new(404, format!("no report kind {kind:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_read_as_reports_with_their_defaults() {
        assert_eq!(parse("complete", b"").unwrap(), Report::Complete { result: None });
        assert_eq!(
            parse("complete", br#"{"result": {"rows": 3}}"#).unwrap(),
            Report::Complete { result: Some(serde_json::json!({"rows": 3})) }
        );
        assert_eq!(
            parse("fail", br#"{"message": "disk full"}"#).unwrap(),
            Report::Fail { message: "disk full".into(), retryable: true },
            "a failure is retryable unless it says otherwise"
        );
        assert_eq!(
            parse("heartbeat", br#"{"percent": 5}"#).unwrap(),
            Report::Heartbeat { percent: Some(5), message: None }
        );
    }

    #[test]
    fn a_malformed_body_or_a_misspelt_field_is_a_400() {
        assert_eq!(parse("fail", b"{}").unwrap_err().code, 400, "a failure needs a message");
        let typo = parse("heartbeat", br#"{"percentage": 5}"#).unwrap_err();
        assert!(typo.message.contains("unknown field `percentage`"), "{typo:?}");
        assert_eq!(parse("complete", b"not json").unwrap_err().code, 400);
    }

    #[test]
    fn the_token_comes_from_a_bearer_authorization_header() {
        assert_eq!(bearer(Some("Bearer bgj1.a.b")).unwrap(), "bgj1.a.b");
        assert_eq!(bearer(None).unwrap_err().code, 401);
        assert_eq!(bearer(Some("Basic abc")).unwrap_err().code, 401);
        assert_eq!(bearer(Some("Bearer ")).unwrap_err().code, 401);
    }
}
