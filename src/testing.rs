//! Unit-test support: a client whose apiserver is a function, for the few I/O paths whose requests are the thing to
//! check (what a give-back or a delete asks for), without a control plane.

use std::sync::{Arc, Mutex};

/// One request the scripted apiserver was sent.
#[derive(Clone, Debug)]
pub struct Sent {
    /// `GET`, `PUT`, `DELETE`, …
    pub method: String,
    /// The request's path (no query).
    pub path: String,
    /// Its body, as JSON (`Null` if empty or not JSON).
    pub body: serde_json::Value,
}

/// A client whose every request is answered by `answer` (a status code and a JSON body, from the request), and the
/// requests it was sent, in order.
pub fn scripted_client(
    answer: impl Fn(&Sent) -> (u16, serde_json::Value) + Clone + Send + Sync + 'static,
) -> (kube::Client, Arc<Mutex<Vec<Sent>>>) {
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let log = sent.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let (log, answer) = (log.clone(), answer.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap();
            let request = Sent {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                body: serde_json::from_slice(&body).unwrap_or_default(),
            };
            let (code, reply) = answer(&request);
            log.lock().unwrap().push(request);
            let mut response = http::Response::new(kube::client::Body::from(serde_json::to_vec(&reply).unwrap()));
            *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    (kube::Client::new(service, "ns"), sent)
}
