//! Unit-test support: a client whose apiserver is a function, for the few I/O paths whose requests are the thing to
//! check (what a give-back or a delete asks for, how a watch is listed and opened again), without a control plane.

use std::sync::{Arc, Mutex};

/// One request the scripted apiserver was sent.
#[derive(Clone, Debug)]
pub struct Sent {
    /// `GET`, `PUT`, `DELETE`, …
    pub method: String,
    /// The request's path (no query).
    pub path: String,
    /// Its query, as sent (empty if none).
    pub query: String,
    /// Its body, as JSON (`Null` if empty or not JSON).
    pub body: serde_json::Value,
}

/// A client whose every request is answered by `answer` (a status code and a JSON body, from the request), and the
/// requests it was sent, in order.
pub fn scripted_client(
    answer: impl Fn(&Sent) -> (u16, serde_json::Value) + Clone + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<Sent>>>) {
    scripted_client_slow(move |sent| {
        let (code, reply) = answer(sent);
        (code, reply, std::time::Duration::ZERO)
    })
}

/// As [`scripted_client`], but each answer also says how long after the request it comes (on tokio's clock, so a
/// test with paused time moves on to it at once): a read served at once and answered late.
pub fn scripted_client_slow(
    answer: impl Fn(&Sent) -> (u16, serde_json::Value, std::time::Duration) + Clone + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<Sent>>>) {
    scripted_client_arriving(|_, _| std::time::Duration::ZERO, answer)
}

/// As [`scripted_client_slow`], but each request also reaches the apiserver `arrives_after` (its method and path)
/// after it was made: a request slow to leave (a new connection to a slow apiserver). One dropped meanwhile (a
/// timeout) never arrives, and is not among the requests sent.
pub fn scripted_client_arriving(
    arrives_after: impl Fn(&str, &str) -> std::time::Duration + Clone + Send + Sync + 'static,
    answer: impl Fn(&Sent) -> (u16, serde_json::Value, std::time::Duration) + Clone + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<Sent>>>) {
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let (log, answer, arrives_after) = (log.clone(), answer.clone(), arrives_after.clone());
        async move {
            tokio::time::sleep(arrives_after(request.method().as_str(), request.uri().path())).await;
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap();
            let request = Sent {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                body: serde_json::from_slice(&body).unwrap_or_default(),
            };
            let (code, reply, after) = answer(&request);
            log.lock().unwrap().push(request);
            tokio::time::sleep(after).await;
            let mut response = http::Response::new(kube::client::Body::from(serde_json::to_vec(&reply).unwrap()));
            *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    (kube::Client::new(service, "ns"), sent)
}

/// A `Status` body for a refusal with `code`, its reason as the apiserver gives it (what the client reads it by: a
/// 404 must say `NotFound` for `get_opt`).
pub fn status(code: u16) -> serde_json::Value {
    let reason = match code {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason})
}

/// Every request's URI (with its query), and when it came.
pub type Asked = Arc<Mutex<Vec<(tokio::time::Instant, String)>>>;

/// A scripted apiserver for a list-then-watch stream's requests (`list_watch`): `lists` answer list requests in turn
/// (a `Status` with its code), `watches` answer watch requests in turn (each a body of watch events, one per line;
/// an empty body, a watch that ends at once, once they run out). Records every request's URI, and when it came.
pub fn scripted_watch_apiserver<K>(lists: Vec<serde_json::Value>, watches: Vec<String>) -> (kube::Api<K>, Asked)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    use std::collections::VecDeque;
    let asked: Asked = Arc::default();
    let lists = Arc::new(Mutex::new(VecDeque::from(lists)));
    let watches = Arc::new(Mutex::new(VecDeque::from(watches)));
    let seen = asked.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let uri = request.uri().to_string();
        seen.lock().unwrap().push((tokio::time::Instant::now(), uri.clone()));
        let (code, body) = if uri.contains("watch=true") {
            (200, watches.lock().unwrap().pop_front().unwrap_or_default().into_bytes())
        } else {
            let answer = lists.lock().unwrap().pop_front().expect("a list to answer");
            let code = if answer["kind"] == "Status" { answer["code"].as_u64().unwrap() as u16 } else { 200 };
            (code, serde_json::to_vec(&answer).unwrap())
        };
        let mut response = http::Response::new(kube::client::Body::from(body));
        *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    (kube::Api::namespaced(kube::Client::new(service, "ns"), "ns"), asked)
}
