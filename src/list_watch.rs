//! A list-then-watch stream, made for large collections and used for every cache a replica keeps (jobs, definitions,
//! and Leases by label), so that all of them lose a watch and catch up the same way. It feeds a reflector as kube's
//! `watcher` does (the same [`watcher::Event`]s and errors, so `default_backoff` and `reflect` apply), with
//! differences that matter at 100,000 jobs:
//! - **The list comes from the apiserver's watch cache in one response** (`resourceVersion=0`, as client-go's
//!   informers list), not page by page from etcd. Paged, each page is an etcd read decoded and encoded again; a list
//!   of 100,000 jobs took minutes on a busy apiserver, by which time its resourceVersion had left the watch cache's
//!   window (75 s of events), the watch that followed failed as expired, and the replica listed again, forever: two
//!   of four replicas ran no job for 16 minutes. (kube's watcher pages by default, and kube leaves
//!   `resourceVersion=0` out of a list with a limit, so its lists always went to etcd.)
//! - **That response is parsed item by item as it arrives**, each item passed through `modify` (the cache's slimming)
//!   and on to the reflector before the next is read. Neither the response (92 MB for 100,000 jobs) nor the objects
//!   as they came are ever held whole: memory follows the slimmed cache, not the list.
//!
//! The watch is kube's (the request of [`Api::watch`]) from the list's resourceVersion, with bookmarks; a watch that
//! has expired (410) lists again, no older than what it last saw ([`ListFrom`]: with several apiservers, an older
//! list would show a running job as deleted), any other failure watches again from where it was, a watch silent
//! for [`WATCH_SILENCE`] (a connection that died without a word: two bookmarks missed) is replaced, as is one not
//! answered within [`WATCH_OPEN_LIMIT`], and one that ends as soon as it was opened is opened again only after a pause
//! ([`ENDED_AT_ONCE`]). A list is bounded too: its answer must begin within [`WATCH_OPEN_LIMIT`], and it fails (and is
//! asked for again) once it said nothing for [`LIST_SILENCE`] while awaited.
//!
//! Each object, listed or in an event, is decoded once from its text, straight into its type, without its managed
//! fields ([`cached`]): the caches drop them, and they are about 40 % of a stored job's text and a quarter of the time
//! decoding it took.
//!
//! An object of bgjobs' kinds that the operator's types cannot hold, in the list or in an event, is passed on as its
//! stand-in ([`crate::unreadable`]), never as an error: one such object would fail every list, and its events would
//! be dropped. (Kubernetes' own kinds, Leases and Pods, have no stand-in: the apiserver checked every field of them
//! but a Lease's times, which it takes up to the end of year 9999 and which are read as absent past what the types
//! hold.)
//!
//! The price of parsing as it arrives: the apiserver must finish writing a list within its request timeout (60 s by
//! default), so the replica must read it that fast. Parsing and slimming 100,000 jobs takes a few seconds of one
//! core; `IN_FLIGHT` parsed items wait for the reflector, so a busy reflector does not slow the read. Each list
//! logs its size, its duration from the request, and how long the apiserver took to begin its answer.

use std::io::Read;
use std::marker::PhantomData;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kube::api::{WatchEvent, WatchParams};
use kube::core::ListMeta;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::unreadable::{self, Unreadable, without_managed_fields};

/// Items parsed but not yet taken by the reflector: enough that a busy reflector does not hold up the read, few
/// enough to cost little memory (they are slimmed).
const IN_FLIGHT: usize = 1024;

/// A watch silent for this long has most likely lost its connection without an error (an apiserver gone without its
/// FIN or RST reaching the replica): it is replaced, from the last version it gave. The apiserver's watch cache sends
/// each watch that asks for bookmarks one about every minute (measured on 1.20: 60 s apart, in a namespace where
/// nothing changed), once it has seen any change of the kind since it started; so two missed bookmarks and some room.
/// A watch of a kind nothing changed since then is told nothing, and is opened again this often (one request). It
/// was 295 s (past kube's 290 s watch timeout): jobs created meanwhile waited five minutes.
const WATCH_SILENCE: Duration = Duration::from_secs(130);

/// How long a watch may take to be answered (the apiserver answers at once, and gives any request 60 s by default).
/// Unbounded, a watch opened again on a pooled connection that died without a word with the one it replaces (the
/// client keeps an idle connection for 90 s) would wait for the kernel to give that connection up, about 15 minutes.
const WATCH_OPEN_LIMIT: Duration = Duration::from_secs(60);

/// How long a list's answer may say nothing while the replica waits for more of it. The apiserver must end a list
/// within its request timeout (60 s by default), and writes it without a pause once begun; a connection that died
/// without a word (an apiserver's host gone) would otherwise hold the list, and with it the cache (or a starting
/// replica's readiness), until the kernel gave it up: never, on a connection with nothing to send. (The answer
/// itself must begin within [`WATCH_OPEN_LIMIT`], as a watch's.) A reader slowed by the reflector is not silence:
/// only time spent waiting for the network counts ([`Silence`]).
const LIST_SILENCE: Duration = Duration::from_secs(60);

/// A watch that ends this soon after it was opened is opened again only after this long: something between the
/// replica and the apiserver (a proxy, an apiserver shutting down) that ends every watch at once would otherwise have
/// it asked again in a loop, which yields nothing if the watches say nothing (or only bookmarks). A watch that ends
/// normally (its timeout) has run for minutes. A pause, not an error: an error's backoff grows to 30 s, and the
/// replica would not see its jobs change meanwhile.
const ENDED_AT_ONCE: Duration = Duration::from_secs(1);

/// The list request: everything in scope with `labels` and `fields` (selectors; all if None), in one response, as
/// fresh as `from` says (from the watch cache, or a quorum read from etcd).
fn list_query(resource_url: &str, labels: Option<&str>, fields: Option<&str>, from: &ListFrom) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    let from_cache = match from {
        ListFrom::Any => Some("0"),
        ListFrom::NotOlderThan(rv) => Some(rv.as_str()),
        ListFrom::Latest | ListFrom::Quorum(_) => None,
    };
    if let Some(version) = from_cache {
        query.append_pair("resourceVersion", version).append_pair("resourceVersionMatch", "NotOlderThan");
    }
    if let Some(labels) = labels {
        query.append_pair("labelSelector", labels);
    }
    if let Some(fields) = fields {
        query.append_pair("fieldSelector", fields);
    }
    match query.finish() {
        query if query.is_empty() => resource_url.to_string(),
        query => format!("{resource_url}?{query}"),
    }
}

/// How fresh a list must be.
///
/// The first list takes whatever the apiserver's watch cache holds (`resourceVersion=0`), or the latest from etcd for
/// the small collections whose first view must be fresh ([`ListFrom::Latest`]). A list after the stream
/// has seen a version must be at least as new as that one: with several apiservers, whose watch caches may lag each
/// other, "any version" can be older than what was seen, and a job missing from an older list would be taken as
/// deleted (a running attempt stopped). An apiserver whose cache is behind that version waits for it a few seconds,
/// then answers "Too large resource version": the list after that is a quorum read from etcd, as client-go does, and
/// if that fails too (one read of the whole collection may not finish in time on a busy apiserver) the next is from
/// the watch cache again, which has usually caught up by then.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ListFrom {
    /// Any version, from the watch cache: a first list.
    Any,
    /// This version or a newer one, from the watch cache: a list after the stream has seen this version.
    NotOlderThan(String),
    /// The latest version, read from etcd: after an apiserver could not serve a version as new as this one, seen.
    Quorum(String),
    /// The latest version, read from etcd: a first list that must not be older than a read would be (one object's
    /// watch, [`watch_one`]: a Pod just made, missing from a lagging cache, would look gone; the Lease caches,
    /// [`list_watch_latest`]).
    Latest,
}

impl ListFrom {
    /// How to list after a list from here failed with `e`.
    fn after_failure(&self, e: &kube::Error) -> ListFrom {
        match self {
            ListFrom::NotOlderThan(rv) if gone(e) || too_large(e) => ListFrom::Quorum(rv.clone()),
            other => other.retried(),
        }
    }

    /// How to list again after a list from here broke off (the body failed): as before, but a quorum read goes back
    /// to the watch cache.
    fn retried(&self) -> ListFrom {
        match self {
            ListFrom::Quorum(rv) => ListFrom::NotOlderThan(rv.clone()),
            other => other.clone(),
        }
    }
}

/// Events for `api`'s objects with `labels` (a label selector; all if None): a list, then a watch, each object
/// through `modify` before it is passed on. The first list is the watch cache's, whatever its version.
pub fn list_watch<K>(
    api: Api<K>,
    labels: Option<String>,
    modify: impl Fn(&mut K) + Clone + Send + Sync + 'static,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Unreadable + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    stream(Scope { api, labels, fields: None }, ListFrom::Any, modify)
}

/// As [`list_watch`], but the first list is read from etcd: for a small collection whose first view must be at least
/// as new as any other cache's (the claim Leases: a replica that starts must not see a job as claimed by nobody
/// because its Lease cache lags).
pub fn list_watch_latest<K>(api: Api<K>, labels: Option<String>) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Unreadable + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    stream(Scope { api, labels, fields: None }, ListFrom::Latest, |_| {})
}

/// The changes of `api`'s object `name`, as kube's `watch_object` gives them (`Some` as it is now; `None` once it is
/// deleted, or when a list does not have it), through the same list-then-watch as the caches. Its first list is read
/// from etcd, as kube's is: a cache that lags must not show an object just made as gone.
pub fn watch_one<K>(api: Api<K>, name: &str) -> impl Stream<Item = watcher::Result<Option<K>>> + Send + use<K>
where
    K: Unreadable + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let scope = Scope { api, labels: None, fields: Some(format!("metadata.name={name}")) };
    // Whether the object was in the list being read: a list without it says it is gone.
    stream(scope, ListFrom::Latest, |_| {})
        .scan(false, |listed, event| {
            let object = match event {
                Ok(Event::Init) => {
                    *listed = false;
                    None
                }
                Ok(Event::InitApply(o)) => {
                    *listed = true;
                    Some(Ok(Some(o)))
                }
                Ok(Event::InitDone) => (!*listed).then_some(Ok(None)),
                Ok(Event::Apply(o)) => Some(Ok(Some(o))),
                Ok(Event::Delete(_)) => Some(Ok(None)),
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(Some(object))
        })
        .filter_map(futures::future::ready)
}

fn stream<K>(
    scope: Scope<K>,
    first: ListFrom,
    modify: impl Fn(&mut K) + Clone + Send + Sync + 'static,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Unreadable + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    futures::stream::unfold(State::List(first), move |state| {
        let scope = scope.clone();
        let modify = modify.clone();
        async move { Some(step(&scope, &modify, state).await) }
    })
}

/// What a stream lists and watches: `api`'s objects with `labels` and `fields` (selectors; all if None).
#[derive(Clone)]
struct Scope<K> {
    api: Api<K>,
    labels: Option<String>,
    fields: Option<String>,
}

enum State<K> {
    List(ListFrom),
    Listing {
        items: mpsc::Receiver<K>,
        parser: JoinHandle<Result<String, kube::Error>>,
        /// When the list was asked for, and how many seconds later the apiserver began to answer.
        asked: Instant,
        answered: f64,
        count: usize,
        from: ListFrom,
    },
    Watch {
        resource_version: String,
    },
    Watching {
        resource_version: String,
        events: BoxStream<'static, kube::Result<WatchEvent<K>>>,
        /// When the watch was opened.
        opened: Instant,
    },
}

async fn step<K>(
    scope: &Scope<K>,
    modify: &(impl Fn(&mut K) + Clone + Send + Sync + 'static),
    mut state: State<K>,
) -> (watcher::Result<Event<K>>, State<K>)
where
    K: Unreadable + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    loop {
        state = match state {
            State::List(from) => match (Instant::now(), start_list(scope, &from, modify.clone()).await) {
                (asked, Ok((items, parser))) => {
                    let answered = asked.elapsed().as_secs_f64();
                    return (Ok(Event::Init), State::Listing { items, parser, asked, answered, count: 0, from });
                }
                (_, Err(e)) => {
                    let next = State::List(from.after_failure(&e));
                    return (Err(watcher::Error::InitialListFailed(e)), next);
                }
            },
            State::Listing { mut items, parser, asked, answered, count, from } => match items.recv().await {
                Some(item) => {
                    let next = State::Listing { items, parser, asked, answered, count: count + 1, from };
                    return (Ok(Event::InitApply(item)), next);
                }
                None => match parser.await {
                    Ok(Ok(resource_version)) => {
                        // The whole request (the apiserver's 60 s timeout counts from it), and the wait for its answer.
                        // Not for one object's lists (one per Pod attempt): a cache's lists are the ones worth a line.
                        let seconds = asked.elapsed().as_secs_f64();
                        if scope.fields.is_none() {
                            tracing::info!(
                                objects = count,
                                seconds,
                                answered_after = answered,
                                what = scope.api.resource_url(),
                                "listed"
                            );
                        }
                        return (Ok(Event::InitDone), State::Watch { resource_version });
                    }
                    Ok(Err(e)) => return (Err(watcher::Error::InitialListFailed(e)), State::List(from.retried())),
                    Err(join) => {
                        let e = kube::Error::Service(Box::new(join));
                        return (Err(watcher::Error::InitialListFailed(e)), State::List(from.retried()));
                    }
                },
            },
            State::Watch { resource_version } => match opened_in_time(watch(scope, &resource_version)).await {
                Ok(events) => State::Watching { resource_version, events: events.boxed(), opened: Instant::now() },
                Err(e) => {
                    let next = if gone(&e) {
                        State::List(ListFrom::NotOlderThan(resource_version))
                    } else {
                        State::Watch { resource_version }
                    };
                    return (Err(watcher::Error::WatchStartFailed(e)), next);
                }
            },
            State::Watching { resource_version, mut events, opened } => {
                let said = match tokio::time::timeout(WATCH_SILENCE, events.next()).await {
                    Ok(said) => said,
                    Err(_) => {
                        tracing::warn!(
                            what = scope.api.resource_url(),
                            silent_for = ?WATCH_SILENCE,
                            "the watch said nothing, not even a bookmark: its connection is taken for dead and the \
                             watch opened again"
                        );
                        None
                    }
                };
                let watching = |resource_version, events| State::Watching { resource_version, events, opened };
                match said {
                    Some(Ok(WatchEvent::Added(mut o) | WatchEvent::Modified(mut o))) => {
                        let resource_version = o.resource_version().unwrap_or(resource_version);
                        modify(&mut o);
                        return (Ok(Event::Apply(o)), watching(resource_version, events));
                    }
                    Some(Ok(WatchEvent::Deleted(o))) => {
                        let resource_version = o.resource_version().unwrap_or(resource_version);
                        return (Ok(Event::Delete(o)), watching(resource_version, events));
                    }
                    Some(Ok(WatchEvent::Bookmark(b))) => watching(b.metadata.resource_version, events),
                    Some(Ok(WatchEvent::Error(status))) => {
                        // 410 Gone: the watch cache no longer has this resourceVersion; only a new list catches up.
                        let next = if status.code == 410 {
                            State::List(ListFrom::NotOlderThan(resource_version))
                        } else {
                            watching(resource_version, events)
                        };
                        return (Err(watcher::Error::WatchError(status)), next);
                    }
                    Some(Err(e)) => {
                        return (Err(watcher::Error::WatchFailed(e)), watching(resource_version, events));
                    }
                    None => {
                        if opened.elapsed() < ENDED_AT_ONCE {
                            tracing::warn!(
                                what = scope.api.resource_url(),
                                pause = ?ENDED_AT_ONCE,
                                "the watch ended as soon as it was opened; watching again after a pause"
                            );
                            tokio::time::sleep(ENDED_AT_ONCE).await;
                        }
                        State::Watch { resource_version }
                    }
                }
            }
        }
    }
}

/// `request` (a watch, or a list), unless its answer has not begun within [`WATCH_OPEN_LIMIT`]: then an error, and it
/// is asked for again (on another connection: the one it was sent on is dropped with it).
async fn opened_in_time<T>(request: impl std::future::Future<Output = kube::Result<T>>) -> kube::Result<T> {
    tokio::time::timeout(WATCH_OPEN_LIMIT, request).await.unwrap_or_else(|_| {
        let late = std::io::Error::new(std::io::ErrorKind::TimedOut, "the request was not answered in time");
        Err(kube::Error::Service(Box::new(late)))
    })
}

/// A list's answer, read with a limit on silence: a read that waits `limit` for the network fails (and with it the
/// list, which is asked for again). Only the time a read waits counts: a reader that comes back late (the parser
/// held up by a busy reflector) starts a new wait.
struct Silence<R> {
    inner: R,
    limit: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
}

impl<R> Silence<R> {
    fn new(inner: R, limit: Duration) -> Self {
        Silence { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)), waiting: false }
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Silence<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            let limit = this.limit;
            this.deadline.as_mut().reset(Instant::now() + limit);
        }
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(read) => {
                this.waiting = false;
                Poll::Ready(read)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the list's answer said nothing for {:?}", this.limit),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A watch of `scope`'s objects from `resource_version`, each object decoded or made a stand-in.
///
/// Its lines are read here, not by kube's `request_events`, so that each object is taken as text ([`event_of`]):
/// kube's `WatchEvent` is an adjacently tagged enum, which serde buffers (as values) when `object` comes before
/// `type`, and text cannot be taken from a buffer. The apiserver writes `type` first, but anything that writes JSON
/// with sorted keys (a proxy, a recorder) does not, and an event not read is lost for good: the watch goes on past it.
async fn watch<K>(
    scope: &Scope<K>,
    resource_version: &str,
) -> kube::Result<impl Stream<Item = kube::Result<WatchEvent<K>>> + Send + use<K>>
where
    K: Unreadable + Clone + std::fmt::Debug + Send,
{
    let mut params = WatchParams::default();
    if let Some(labels) = &scope.labels {
        params = params.labels(labels);
    }
    if let Some(fields) = &scope.fields {
        params = params.fields(fields);
    }
    let mut request = kube::core::Request::new(scope.api.resource_url())
        .watch(&params, resource_version)
        .map_err(kube::Error::BuildRequest)?;
    request.extensions_mut().insert("watch");
    // One gzip member per event (newer apiservers) is more than the client's decompression reads; as kube asks.
    request.headers_mut().insert(http::header::ACCEPT_ENCODING, http::HeaderValue::from_static("identity"));
    let body = scope.api.clone().into_client().request_stream(request).await?;
    Ok(events(body))
}

/// The events of a watch's answer, `body`, one per line ([`event_of`]). A connection that breaks ends them, with a
/// warning and no error (as kube's own watch does: the watch is resumed from where it was, at once or, if it broke
/// as soon as it was opened, after [`ENDED_AT_ONCE`], not after the backoff an error brings); a line that is not text
/// is an error, and the lines after it are read on.
fn events<K: Unreadable + Send>(
    body: impl futures::AsyncBufRead + Send + 'static,
) -> impl Stream<Item = kube::Result<WatchEvent<K>>> + Send {
    futures::AsyncBufReadExt::lines(body).filter_map(|line| {
        futures::future::ready(match line {
            Ok(line) if line.trim().is_empty() => None,
            Ok(line) => event_of(&line),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Some(Err(kube::Error::ReadEvents(e))),
            Err(e) => {
                // The reader ends after its error: nothing after it is read, and nothing cut short is passed on.
                tracing::warn!(error = %e, "a watch's connection broke; watching again from where it was");
                None
            }
        })
    })
}

/// The watch event on `line`, its object [`cached`]: taken as text whatever the order of the event's keys, and at
/// any depth of nesting (one nested too deep to decode is bad input, with a stand-in of its own). None: a line cut
/// short where the answer ended. Err: not an event (an error the apiserver wrote instead), or an object whose
/// metadata cannot be read.
fn event_of<K: Unreadable>(line: &str) -> Option<kube::Result<WatchEvent<K>>> {
    #[derive(Deserialize)]
    struct Line<'a> {
        #[serde(rename = "type")]
        kind: String,
        #[serde(borrow)]
        object: &'a RawValue,
    }
    let event = match serde_json::from_str::<Line>(line) {
        Ok(event) => event,
        Err(e) if e.is_eof() => return None,
        Err(e) => {
            return Some(Err(match serde_json::from_str::<kube::core::Status>(line) {
                Ok(status) if !status.message.is_empty() || status.code != 0 => kube::Error::Api(Box::new(status)),
                _ => kube::Error::SerdeError(e),
            }));
        }
    };
    let text = event.object.get();
    let object = || cached::<K>(text).map_err(kube::Error::SerdeError);
    Some(match event.kind.as_str() {
        "ADDED" => object().map(WatchEvent::Added),
        "MODIFIED" => object().map(WatchEvent::Modified),
        "DELETED" => object().map(WatchEvent::Deleted),
        "BOOKMARK" => serde_json::from_str(text).map(WatchEvent::Bookmark).map_err(kube::Error::SerdeError),
        "ERROR" => serde_json::from_str(text).map(|s| WatchEvent::Error(Box::new(s))).map_err(kube::Error::SerdeError),
        other => Err(kube::Error::SerdeError(de::Error::custom(format!("a watch event of an unknown type {other:?}")))),
    })
}

/// An object as the cache keeps it: decoded from `text` or made a stand-in ([`unreadable::decode_text`]), without
/// its managed fields, which are never parsed.
fn cached<K: Unreadable>(text: &str) -> Result<K, serde_json::Error> {
    unreadable::decode_text(&without_managed_fields(text))
}

fn gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// An apiserver's answer that its watch cache is not yet as new as the version asked for (it waited 3 s for it).
fn too_large(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 504 && s.message.contains("Too large resource version"))
}

/// Sends the list request and, once the apiserver answers, parses its body on a blocking thread, item by item, into
/// a small channel. The parser's result is the list's resourceVersion.
async fn start_list<K>(
    scope: &Scope<K>,
    from: &ListFrom,
    modify: impl Fn(&mut K) + Send + 'static,
) -> Result<(mpsc::Receiver<K>, JoinHandle<Result<String, kube::Error>>), kube::Error>
where
    K: Unreadable + Clone + Send + 'static,
{
    let request = http::Request::get(list_query(
        scope.api.resource_url(),
        scope.labels.as_deref(),
        scope.fields.as_deref(),
        from,
    ))
    .body(Vec::new())
    .map_err(kube::Error::HttpError)?;
    let body = opened_in_time(scope.api.clone().into_client().request_stream(request)).await?;
    let body = tokio_util::io::SyncIoBridge::new(Silence::new(body.compat(), LIST_SILENCE));
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let parser = tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::with_capacity(64 * 1024, body);
        parse_list(reader, |mut item: K| {
            modify(&mut item);
            tx.blocking_send(item).map_err(|_| "the list's reader is gone".to_string())
        })
        .map_err(kube::Error::SerdeError)
    });
    Ok((rx, parser))
}

/// Parses a list response (`{"items": [...], "metadata": {"resourceVersion": ...}, ...}`, in any key order) from
/// `reader`, handing each item to `each` as soon as it is parsed, and returns the list's resourceVersion.
pub fn parse_list<K: Unreadable>(
    reader: impl Read,
    mut each: impl FnMut(K) -> Result<(), String>,
) -> serde_json::Result<String> {
    let mut de = serde_json::Deserializer::from_reader(reader);
    let resource_version = ListSeed { each: &mut each, item: PhantomData }.deserialize(&mut de)?;
    de.end()?;
    Ok(resource_version)
}

struct ListSeed<'a, K, F> {
    each: &'a mut F,
    item: PhantomData<K>,
}

impl<'de, K: Unreadable, F: FnMut(K) -> Result<(), String>> DeserializeSeed<'de> for ListSeed<'_, K, F> {
    type Value = String;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, K: Unreadable, F: FnMut(K) -> Result<(), String>> Visitor<'de> for ListSeed<'_, K, F> {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes list")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut resource_version = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "items" => map.next_value_seed(ItemsSeed { each: &mut *self.each, item: PhantomData::<K> })?,
                "metadata" => resource_version = map.next_value::<ListMeta>()?.resource_version,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        resource_version
            .filter(|v| !v.is_empty())
            .ok_or_else(|| de::Error::custom("the list has no metadata.resourceVersion"))
    }
}

struct ItemsSeed<'a, K, F> {
    each: &'a mut F,
    item: PhantomData<K>,
}

impl<'de, K: Unreadable, F: FnMut(K) -> Result<(), String>> DeserializeSeed<'de> for ItemsSeed<'_, K, F> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, K: Unreadable, F: FnMut(K) -> Result<(), String>> Visitor<'de> for ItemsSeed<'_, K, F> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list's items")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(()) // "items": null, an empty list
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // Each item's text first, so that one the type cannot hold is read again as its stand-in.
        while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
            let item = cached(raw.get()).map_err(de::Error::custom)?;
            (self.each)(item).map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::api::BackgroundJob;
    use crate::testing::scripted_watch_apiserver;

    fn job(name: &str, rv: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}, "spec": {"jobName": "noop"}})
    }

    #[test]
    fn a_list_is_parsed_item_by_item_in_order_and_its_resource_version_read_after_the_items() {
        // The apiserver writes a custom resource list's keys sorted: items before metadata.
        let body = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1",
            "items": [job("a", "3"), job("b", "4"), job("c", "5")],
            "kind": "BackgroundJobList", "metadata": {"resourceVersion": "9"}});
        let mut seen = Vec::new();
        let rv = parse_list(body.to_string().as_bytes(), |j: BackgroundJob| {
            seen.push(j.name_any());
            Ok(())
        })
        .unwrap();
        assert_eq!((rv.as_str(), seen), ("9", vec!["a".to_string(), "b".into(), "c".into()]));
    }

    #[test]
    fn a_lease_whose_times_lie_past_what_the_types_hold_is_listed_and_watched_without_them() {
        use k8s_openapi::api::coordination::v1::Lease;
        // The apiserver takes any time up to the end of year 9999; the types hold none past 9999-12-30T22:00Z.
        let lease = |name: &str, renew: &str| {
            serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "ns", "resourceVersion": "3"},
                "spec": {"holderIdentity": "x", "leaseDurationSeconds": 15, "renewTime": renew,
                    "acquireTime": "9999-12-31T23:59:59.000000Z"}})
        };
        let body = serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
            "items": [lease("far", "9999-12-31T00:00:00.000000Z"), lease("near", "2026-12-07T10:00:00.000000Z")],
            "metadata": {"resourceVersion": "9"}});
        let mut seen = Vec::new();
        parse_list(body.to_string().as_bytes(), |l: Lease| {
            let spec = l.spec.unwrap();
            seen.push((l.metadata.name.unwrap(), spec.renew_time.is_some(), spec.acquire_time.is_some()));
            Ok(())
        })
        .unwrap();
        let expected = vec![("far".to_string(), false, false), ("near".to_string(), true, false)];
        assert_eq!(seen, expected, "both listed, with only the times that can be read");
        let line = format!(r#"{{"type":"ADDED","object":{}}}"#, lease("far", "9999-12-31T00:00:00.000000Z"));
        let Some(Ok(WatchEvent::Added(l))) = event_of::<Lease>(&line) else { panic!("the event was dropped") };
        let spec = l.spec.unwrap();
        assert_eq!((spec.holder_identity.as_deref(), spec.renew_time), (Some("x"), None));
        assert!(l.metadata.annotations.is_none(), "no stand-in marks: {:?}", l.metadata.annotations);
    }

    #[test]
    fn an_empty_list_and_a_null_item_list_have_no_items_and_a_list_without_a_resource_version_is_an_error() {
        for items in [serde_json::json!([]), serde_json::Value::Null] {
            let body = serde_json::json!({"metadata": {"resourceVersion": "1"}, "items": items});
            let mut n = 0;
            let rv = parse_list(body.to_string().as_bytes(), |_: BackgroundJob| {
                n += 1;
                Ok(())
            });
            assert_eq!((rv.unwrap().as_str(), n), ("1", 0));
        }
        let body = serde_json::json!({"items": [], "metadata": {}});
        assert!(parse_list(body.to_string().as_bytes(), |_: BackgroundJob| Ok(())).is_err());
    }

    #[test]
    fn parsing_stops_with_an_error_when_the_receiver_of_the_items_is_gone() {
        let body = serde_json::json!({"items": [job("a", "3"), job("b", "4")], "metadata": {"resourceVersion": "9"}});
        let mut n = 0;
        let result = parse_list(body.to_string().as_bytes(), |_: BackgroundJob| {
            n += 1;
            Err("gone".to_string())
        });
        assert!(result.is_err());
        assert_eq!(n, 1, "no item after the first refusal");
    }

    fn list(items: Vec<serde_json::Value>, rv: &str) -> serde_json::Value {
        serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "items": items, "kind": "BackgroundJobList",
            "metadata": {"resourceVersion": rv}})
    }

    /// A watch event, written with sorted keys: its object before its type (the apiserver writes the type first;
    /// `deep` below is written that way).
    fn event(kind: &str, object: serde_json::Value) -> String {
        serde_json::json!({"type": kind, "object": object}).to_string() + "\n"
    }

    #[tokio::test]
    async fn a_list_then_a_watch_from_its_version_resumed_from_a_bookmark_and_an_expired_watch_lists_again() {
        let bookmark = serde_json::json!({"apiVersion": "bgjobs.dev/v1alpha1", "kind": "BackgroundJob",
            "metadata": {"resourceVersion": "15"}});
        let expired = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version: 15 (18)", "reason": "Expired", "code": 410});
        let (api, asked) = scripted_watch_apiserver(
            vec![list(vec![job("a", "3")], "10"), list(vec![job("b", "19")], "20")],
            vec![
                // The first watch ends after a bookmark (its timeout); the second resumes from the bookmark.
                event("MODIFIED", job("a", "11")) + &event("BOOKMARK", bookmark),
                event("DELETED", job("a", "16")) + &event("ERROR", expired),
            ],
        );
        let seen: Vec<String> = list_watch(api, None, |j: &mut BackgroundJob| j.spec.args = None)
            .take(9)
            .map(|e| match e {
                Ok(Event::Init) => "init".to_string(),
                Ok(Event::InitApply(j)) => format!("init-apply {}", j.name_any()),
                Ok(Event::InitDone) => "init-done".into(),
                Ok(Event::Apply(j)) => format!("apply {} {}", j.name_any(), j.resource_version().unwrap()),
                Ok(Event::Delete(j)) => format!("delete {}", j.name_any()),
                Err(e) => format!("error {}", if e.to_string().contains("too old") { "expired" } else { "other" }),
            })
            .collect()
            .await;
        let expected = [
            "init",
            "init-apply a",
            "init-done",
            "apply a 11",
            "delete a",
            "error expired",
            "init",
            "init-apply b",
            "init-done",
        ];
        assert_eq!(seen, expected);
        let asked = asked.lock().unwrap();
        let query = |i: usize| asked[i].1.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default();
        assert_eq!(query(0), "resourceVersion=0&resourceVersionMatch=NotOlderThan");
        assert!(query(1).contains("watch=true") && query(1).contains("resourceVersion=10"), "{}", query(1));
        assert!(query(2).contains("watch=true") && query(2).contains("resourceVersion=15"), "{}", query(2));
        // The list after the expired watch is no older than what the stream last saw (the deletion, at 16).
        assert_eq!(query(3), "resourceVersion=16&resourceVersionMatch=NotOlderThan");
    }

    /// With several apiservers, "any version" may be older than what the stream has seen already, and a running job
    /// missing from that list would be taken as deleted. So after the stream has seen version 16, a list must be no
    /// older; an apiserver whose cache cannot serve that says "Too large resource version", and the next list is a
    /// quorum read, and after a quorum read that failed the watch cache is asked again. A list from the watch cache
    /// that failed otherwise (the network) is asked again as it was.
    #[tokio::test]
    async fn a_list_after_a_version_was_seen_is_no_older_than_it_and_a_cache_that_cannot_serve_that_leads_to_a_quorum_read()
     {
        let expired = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version: 15 (18)", "reason": "Expired", "code": 410});
        let too_large = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "Timeout: Too large resource version: 16, current: 14", "reason": "Timeout", "code": 504,
            "details": {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]}});
        let unavailable = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "the server is currently unable to handle the request", "reason": "ServiceUnavailable",
            "code": 503});
        let (api, asked) = scripted_watch_apiserver(
            vec![
                list(vec![job("a", "3")], "10"),
                unavailable.clone(),
                too_large.clone(),
                unavailable,
                too_large,
                list(vec![job("a", "16")], "20"),
            ],
            vec![event("MODIFIED", job("a", "16")) + &event("ERROR", expired)],
        );
        let seen: Vec<String> = list_watch(api, None, |_: &mut BackgroundJob| {})
            .take(11)
            .map(|e| match e {
                Ok(Event::Init) => "init".to_string(),
                Ok(Event::InitApply(j)) => format!("init-apply {} {}", j.name_any(), j.resource_version().unwrap()),
                Ok(Event::InitDone) => "init-done".into(),
                Ok(Event::Apply(j)) => format!("apply {} {}", j.name_any(), j.resource_version().unwrap()),
                Ok(Event::Delete(j)) => format!("delete {}", j.name_any()),
                Err(_) => "error".into(),
            })
            .collect()
            .await;
        let expected = [
            "init",
            "init-apply a 3",
            "init-done",
            "apply a 16",
            "error",
            "error",
            "error",
            "error",
            "error",
            "init",
            "init-apply a 16",
        ];
        assert_eq!(seen, expected);
        let asked = asked.lock().unwrap();
        let lists: Vec<String> = asked
            .iter()
            .map(|(_, u)| u)
            .filter(|u| !u.contains("watch=true"))
            .map(|u| u.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default())
            .collect();
        let no_older = "resourceVersion=16&resourceVersionMatch=NotOlderThan";
        let first = "resourceVersion=0&resourceVersionMatch=NotOlderThan";
        // 503: asked again; 504 too large: a quorum read; that failing, the watch cache again; too large again: quorum.
        assert_eq!(lists, [first, no_older, no_older, "", no_older, ""]);
    }

    /// What a [`watching_apiserver`] was asked, and when.
    type Asked = std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, String)>>>;

    /// An apiserver that lists job `a` at version 10 and answers the `n`-th watch (from 1) with `a` at version
    /// `10 + n`, then stays silent with the watch open; a watch for which `never(n)` holds is never answered.
    fn watching_apiserver(never: fn(usize) -> bool) -> (Api<BackgroundJob>, Asked) {
        let asked: Asked = Default::default();
        let seen = asked.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let uri = request.uri().to_string();
            let watch = uri.contains("watch=true");
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push((tokio::time::Instant::now(), uri.clone()));
                seen.iter().filter(|(_, u)| u.contains("watch=true")).count()
            };
            let chunk = if watch {
                event("MODIFIED", job("a", &(10 + n).to_string()))
            } else {
                list(vec![job("a", "3")], "10").to_string()
            };
            let frames = futures::stream::iter([chunk])
                .map(|c| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(hyper::body::Bytes::from(c))));
            // A list's answer ends; a watch's stays open, silent after its event.
            let body: futures::stream::BoxStream<'static, _> =
                if watch { frames.chain(futures::stream::pending()).boxed() } else { frames.boxed() };
            let unanswered = watch && never(n);
            async move {
                if unanswered {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::StreamBody::new(body)))
            }
        });
        (Api::namespaced(kube::Client::new(service, "ns"), "ns"), asked)
    }

    /// The first two jobs applied from `api`'s list and watches, with when (an hour at most: time is paused).
    async fn two_applied(api: Api<BackgroundJob>) -> Vec<(tokio::time::Instant, String)> {
        let mut stream = list_watch(api, None, |_: &mut BackgroundJob| {}).boxed();
        let mut applied = Vec::new();
        let hour = tokio::time::Instant::now() + Duration::from_secs(3_600);
        while applied.len() < 2 {
            match tokio::time::timeout_at(hour, stream.next()).await {
                Ok(Some(Ok(Event::Apply(j)))) => {
                    applied.push((tokio::time::Instant::now(), j.resource_version().unwrap()))
                }
                Ok(_) => {}
                Err(_) => panic!("the watch was not replaced within an hour: {applied:?}"),
            }
        }
        applied
    }

    /// The watches `asked` shows.
    fn watches(asked: &Asked) -> Vec<(tokio::time::Instant, String)> {
        asked.lock().unwrap().iter().filter(|(_, u)| u.contains("watch=true")).cloned().collect()
    }

    /// A watch whose connection stays open but says nothing more after its first event (it died without a word)
    /// is replaced once it has been silent for [`WATCH_SILENCE`], from the last version it gave; not before. Time is
    /// paused and moves only when everything waits.
    #[tokio::test(start_paused = true)]
    async fn a_watch_silent_for_two_bookmarks_is_replaced_from_its_last_version_and_not_before() {
        let (api, asked) = watching_apiserver(|_| false);
        let applied = two_applied(api).await;
        assert_eq!(applied.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(), ["11", "12"]);
        let watches = watches(&asked);
        assert_eq!(watches.len(), 2, "{watches:?}");
        assert!(watches[1].1.contains("resourceVersion=11"), "replaced from the last version: {}", watches[1].1);
        let silent = watches[1].0 - applied[0].0;
        assert!(silent >= WATCH_SILENCE, "replaced after {silent:?} of silence");
        assert!(silent < WATCH_SILENCE + Duration::from_secs(1), "replaced only after {silent:?}");
    }

    /// A watch opened again that is never answered (sent on a pooled connection that died with the one it replaces)
    /// is given up after [`WATCH_OPEN_LIMIT`] and asked for again, from the same version. Time is paused.
    #[tokio::test(start_paused = true)]
    async fn a_watch_never_answered_is_asked_for_again_after_its_limit() {
        let (api, asked) = watching_apiserver(|n| n == 2);
        let applied = two_applied(api).await;
        assert_eq!(applied.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(), ["11", "13"]);
        let watches = watches(&asked);
        assert_eq!(watches.len(), 3, "{watches:?}");
        assert!(watches[2].1.contains("resourceVersion=11"), "from the same version: {}", watches[2].1);
        let waited = watches[2].0 - watches[1].0;
        assert!(waited >= WATCH_OPEN_LIMIT && waited < WATCH_OPEN_LIMIT + Duration::from_secs(1), "{waited:?}");
    }

    /// A list that is never answered (sent on a connection that died without a word) is given up after
    /// [`WATCH_OPEN_LIMIT`] and asked for again. Time is paused. Before, the cache waited for it for ever.
    #[tokio::test(start_paused = true)]
    async fn a_list_never_answered_is_asked_for_again_after_its_limit() {
        let asked: Asked = Default::default();
        let seen = asked.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let uri = request.uri().to_string();
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push((tokio::time::Instant::now(), uri.clone()));
                seen.len() == 1
            };
            let body =
                if uri.contains("watch=true") { String::new() } else { list(vec![job("a", "3")], "10").to_string() };
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::from(body),
                )))
            }
        });
        let api: Api<BackgroundJob> = Api::namespaced(kube::Client::new(service, "ns"), "ns");
        let mut stream = list_watch(api, None, |_: &mut BackgroundJob| {}).boxed();
        let hour = tokio::time::Instant::now() + Duration::from_secs(3_600);
        loop {
            match tokio::time::timeout_at(hour, stream.next()).await {
                Ok(Some(Ok(Event::InitApply(j)))) => break assert_eq!(j.name_any(), "a"),
                Ok(_) => {}
                Err(_) => panic!("the list was not asked for again within an hour"),
            }
        }
        let asked = asked.lock().unwrap().clone();
        assert!(asked.len() >= 2 && !asked[1].1.contains("watch=true"), "{asked:?}");
        let waited = asked[1].0 - asked[0].0;
        assert!(waited >= WATCH_OPEN_LIMIT && waited < WATCH_OPEN_LIMIT + Duration::from_secs(35), "{waited:?}");
    }

    /// A list's answer that stops while the replica waits for more fails after [`LIST_SILENCE`] of waiting, not
    /// before; time the reader spends away (a busy reflector) is not counted. Time is paused.
    #[tokio::test(start_paused = true)]
    async fn a_list_answer_silent_while_awaited_fails_after_its_limit_and_a_late_reader_is_not_silence() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut apiserver, answer) = tokio::io::duplex(64);
        let mut body = Silence::new(answer, LIST_SILENCE);
        let mut buf = [0u8; 16];
        apiserver.write_all(b"abc").await.unwrap();
        assert_eq!(body.read(&mut buf).await.unwrap(), 3);
        // The reader comes back after twice the limit: the bytes sent meanwhile are read, no error.
        tokio::time::sleep(2 * LIST_SILENCE).await;
        apiserver.write_all(b"de").await.unwrap();
        assert_eq!(body.read(&mut buf).await.unwrap(), 2);
        // Then nothing more comes, the connection still open.
        let waiting = tokio::time::Instant::now();
        let error = body.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        let waited = waiting.elapsed();
        assert!(waited >= LIST_SILENCE && waited < LIST_SILENCE + Duration::from_secs(1), "{waited:?}");
        drop(apiserver);
    }

    /// A watch that ends as soon as it was opened (something in between ends every watch), whether it said
    /// something first or not, is opened again from where it was only after a pause, and is no error (whose backoff
    /// would grow to 30 s); it was asked again at once, in a loop that yielded nothing while the watches said nothing.
    /// The stream is read in a task of its own, and the test waits for four watches at most 30 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_that_ends_as_soon_as_it_was_opened_is_opened_again_after_a_pause_and_is_no_error() {
        let (api, asked) =
            scripted_watch_apiserver(vec![list(vec![job("a", "3")], "10")], vec![event("MODIFIED", job("a", "11"))]);
        let items = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = items.clone();
        let reader = tokio::spawn(async move {
            let mut stream = list_watch(api, None, |_: &mut BackgroundJob| {}).boxed();
            while let Some(item) = stream.next().await {
                seen.lock().unwrap().push(match item {
                    Ok(Event::Init) => "init".to_string(),
                    Ok(Event::InitApply(j)) => format!("init-apply {}", j.name_any()),
                    Ok(Event::InitDone) => "init-done".into(),
                    Ok(Event::Apply(j)) => format!("apply {} {}", j.name_any(), j.resource_version().unwrap()),
                    Ok(Event::Delete(j)) => format!("delete {}", j.name_any()),
                    Err(e) => format!("error {e}"),
                });
            }
        });
        let watches = || -> Vec<(Instant, String)> {
            asked.lock().unwrap().iter().filter(|(_, u)| u.contains("watch=true")).cloned().collect()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while watches().len() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        reader.abort();
        let watches = watches();
        assert!(watches.len() >= 4, "only {} watches in 30 s", watches.len());
        assert_eq!(*items.lock().unwrap(), ["init", "init-apply a", "init-done", "apply a 11"]);
        for pair in watches[..4].windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= ENDED_AT_ONCE, "a watch was opened again {gap:?} after the last one ended at once");
        }
        assert!(watches[1..4].iter().all(|(_, w)| w.contains("resourceVersion=11")), "{watches:?}");
    }

    #[tokio::test]
    async fn an_object_the_types_cannot_hold_comes_as_its_stand_in_in_the_list_and_in_the_watch() {
        let mut bad = job("bad", "4");
        bad["spec"]["template"] = serde_json::json!({"spec": {"containers": "x"}});
        let mut bad_later = job("worse", "12");
        bad_later["spec"]["retry"] = serde_json::json!({"maxAttempts": 3_000_000_000u64});
        // Nested deeper than any reader goes: its text is written by hand (serde_json writes no value that deep).
        let deep = job("deep", "14").to_string().replacen(
            r#""spec":{"#,
            &format!(r#""status":{{"result":{}{}}},"spec":{{"#, "[".repeat(200), "]".repeat(200)),
            1,
        );
        let (api, _) = scripted_watch_apiserver(
            vec![list(vec![job("a", "3"), bad, job("c", "5")], "10")],
            vec![
                event("ADDED", bad_later)
                    + &event("ADDED", job("d", "13"))
                    + &format!("{{\"type\":\"ADDED\",\"object\":{deep}}}\n")
                    + &event("ADDED", job("e", "15")),
            ],
        );
        let seen: Vec<String> = list_watch(api, None, |_: &mut BackgroundJob| {})
            .take(9)
            .map(|e| match e {
                Ok(Event::InitApply(j) | Event::Apply(j)) => {
                    let standing = match crate::unreadable::standing(&j) {
                        Some(crate::unreadable::Standing::Fail(_)) => " (stand-in: fail)",
                        Some(crate::unreadable::Standing::Leave(_)) => " (stand-in: leave)",
                        None => "",
                    };
                    format!("{}{standing}", j.name_any())
                }
                Ok(Event::Init | Event::InitDone) => "-".into(),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("error {e}"),
            })
            .collect()
            .await;
        let expected =
            ["-", "a", "bad (stand-in: fail)", "c", "-", "worse (stand-in: leave)", "d", "deep (stand-in: fail)", "e"];
        assert_eq!(seen, expected);
    }

    fn with_managed_fields(name: &str) -> serde_json::Value {
        let mut j = job(name, "7");
        j["metadata"]["managedFields"] = serde_json::json!([{"apiVersion": "bgjobs.dev/v1alpha1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {".": {}, "f:jobName": {}}}, "manager": "kubectl",
            "operation": "Update", "time": "2026-12-02T10:00:00Z"}]);
        j["metadata"]["labels"] = serde_json::json!({"team": "a"});
        j["spec"]["args"] = serde_json::json!({"managedFields": [1, 2], "note": "\"managedFields\":[3]"});
        j
    }

    #[test]
    fn a_cached_object_is_the_decoded_object_without_its_managed_fields_and_nothing_else_is_touched() {
        let text = with_managed_fields("a").to_string();
        let cached: BackgroundJob = cached(&text).unwrap();
        let mut decoded: BackgroundJob = serde_json::from_str(&text).unwrap();
        assert!(decoded.metadata.managed_fields.is_some());
        decoded.metadata.managed_fields = None;
        assert_eq!(serde_json::to_value(&cached).unwrap(), serde_json::to_value(&decoded).unwrap());
        // Keys of that name elsewhere (the job's own arguments, a string) are the user's.
        let args = cached.spec.args.unwrap();
        assert_eq!(
            args.value().unwrap(),
            serde_json::json!({"managedFields": [1, 2], "note": "\"managedFields\":[3]"})
        );
    }

    #[test]
    fn text_without_managed_fields_or_not_an_object_is_decoded_as_it_is() {
        let plain = job("b", "3").to_string();
        assert!(matches!(without_managed_fields(&plain), Cow::Borrowed(_)));
        for odd in ["[1]", "\"x\"", "{\"metadata\": 5}", "{\"metadata\": {\"managedFields\": null}}", "{", ""] {
            assert!(matches!(without_managed_fields(odd), Cow::Borrowed(t) if t == odd), "{odd}");
        }
        assert!(cached::<BackgroundJob>("{").is_err());
    }

    #[test]
    fn a_stand_in_is_made_without_the_managed_fields_too() {
        let mut bad = with_managed_fields("c");
        bad["spec"]["template"] = serde_json::json!({"spec": {"containers": "x"}});
        let job: BackgroundJob = cached(&bad.to_string()).unwrap();
        assert!(matches!(crate::unreadable::standing(&job), Some(crate::unreadable::Standing::Fail(_))));
        assert_eq!((job.name_any(), job.metadata.managed_fields.is_none()), ("c".to_string(), true));
        assert_eq!(job.labels().get("team").map(String::as_str), Some("a"));
    }

    #[test]
    fn a_watch_line_is_read_whatever_the_order_of_its_keys_and_what_is_not_an_event_says_so() {
        let name = |line: &str| match event_of::<BackgroundJob>(line) {
            Some(Ok(WatchEvent::Modified(j))) => format!("modified {}", j.name_any()),
            Some(Ok(WatchEvent::Bookmark(b))) => format!("bookmark {}", b.metadata.resource_version),
            Some(Ok(WatchEvent::Error(s))) => format!("error event {}", s.code),
            Some(Ok(other)) => format!("{other:?}"),
            Some(Err(kube::Error::Api(s))) => format!("api error {}", s.code),
            Some(Err(e)) => format!("unreadable: {}", e.to_string().contains("unknown type")),
            None => "cut short".into(),
        };
        let object = with_managed_fields("a");
        let type_first = format!(r#"{{"type":"MODIFIED","object":{object}}}"#);
        let object_first = format!(r#"{{"object":{object},"type":"MODIFIED"}}"#);
        assert_eq!(name(&type_first), "modified a");
        assert_eq!(name(&object_first), "modified a");
        let Some(Ok(WatchEvent::Modified(j))) = event_of::<BackgroundJob>(&object_first) else { panic!() };
        assert!(j.metadata.managed_fields.is_none());
        assert_eq!(name(&type_first[..type_first.len() / 2]), "cut short");
        let bookmark =
            r#"{"apiVersion":"bgjobs.dev/v1alpha1","kind":"BackgroundJob","metadata":{"resourceVersion":"15"}}"#;
        assert_eq!(name(&format!(r#"{{"type":"BOOKMARK","object":{bookmark}}}"#)), "bookmark 15");
        let expired = r#"{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old"}}"#;
        assert_eq!(name(expired), "error event 410");
        assert_eq!(name(r#"{"kind":"Status","code":500,"message":"boom"}"#), "api error 500");
        assert_eq!(name(r#"{"type":"RENAMED","object":{}}"#), "unreadable: true");
        // A whole line that is not an event is an error, never taken for one cut short.
        assert_eq!(name(&format!("{type_first} x")), "unreadable: false");
        assert_eq!(name("{}"), "unreadable: false");
    }

    #[tokio::test]
    async fn a_broken_connection_ends_the_events_quietly_and_a_line_that_is_not_text_is_an_error_read_past() {
        let line = |name: &str| format!(r#"{{"type":"MODIFIED","object":{}}}"#, job(name, "11")) + "\n";
        let describe = |e: kube::Result<WatchEvent<BackgroundJob>>| match e {
            Ok(WatchEvent::Modified(j)) => j.name_any(),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("error {}", matches!(e, kube::Error::ReadEvents(_))),
        };
        let chunks: Vec<std::io::Result<Vec<u8>>> = vec![
            Ok(line("a").into_bytes()),
            Ok(b"\xff\xfe\n".to_vec()),
            Ok(line("b").into_bytes()),
            Ok(line("cut").as_bytes()[..20].to_vec()),
            Err(std::io::Error::other("connection reset")),
        ];
        let body = futures::TryStreamExt::into_async_read(futures::stream::iter(chunks));
        let seen: Vec<String> = events(body).map(describe).collect().await;
        assert_eq!(seen, ["a", "error true", "b"]);
    }

    #[test]
    fn the_list_is_asked_of_the_watch_cache_in_one_response() {
        let url = "/apis/bgjobs.dev/v1alpha1/namespaces/ns/backgroundjobs";
        let q = list_query(url, None, None, &ListFrom::Any);
        assert!(q.ends_with("backgroundjobs?resourceVersion=0&resourceVersionMatch=NotOlderThan"), "{q}");
        assert!(!q.contains("limit"));
        let q = list_query(url, None, None, &ListFrom::NotOlderThan("42".into()));
        assert!(q.ends_with("backgroundjobs?resourceVersion=42&resourceVersionMatch=NotOlderThan"), "{q}");
        let quorum = ListFrom::Quorum("42".into());
        assert_eq!(list_query(url, None, None, &quorum), url, "no resourceVersion: the latest, from etcd");
    }

    /// One object's watch: its first list is the latest, from etcd, and both list and watch select it by name; it
    /// says `Some` as the object is and `None` once it is deleted, or when a list does not have it.
    #[tokio::test]
    async fn one_objects_watch_lists_it_from_etcd_by_name_and_says_none_when_it_is_gone() {
        let describe = |e: watcher::Result<Option<BackgroundJob>>| match e {
            Ok(Some(j)) => format!("{} {}", j.name_any(), j.resource_version().unwrap()),
            Ok(None) => "gone".to_string(),
            Err(e) => format!("error {e}"),
        };
        let (api, asked) = scripted_watch_apiserver(
            vec![list(vec![job("a", "3")], "10")],
            vec![event("MODIFIED", job("a", "11")) + &event("DELETED", job("a", "12"))],
        );
        let seen: Vec<String> = watch_one(api, "a").take(3).map(describe).collect().await;
        assert_eq!(seen, ["a 3", "a 11", "gone"]);
        let asked = asked.lock().unwrap().clone();
        let query = |i: usize| asked[i].1.split_once('?').map(|(_, q)| q.to_string()).unwrap_or_default();
        assert_eq!(query(0), "fieldSelector=metadata.name%3Da");
        assert!(
            query(1).contains("watch=true") && query(1).contains("fieldSelector=metadata.name%3Da"),
            "{}",
            query(1)
        );
        assert!(query(1).ends_with("resourceVersion=10"), "{}", query(1));

        let (api, _) = scripted_watch_apiserver::<BackgroundJob>(vec![list(vec![], "10")], vec![]);
        let seen: Vec<String> = watch_one(api, "a").take(1).map(describe).collect().await;
        assert_eq!(seen, ["gone"], "a list without the object says it is gone");

        // An expired watch lists again, no older than what it saw, and a list without the object says it is gone.
        let expired = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version: 11 (18)", "reason": "Expired", "code": 410});
        let (api, asked) = scripted_watch_apiserver(
            vec![list(vec![job("a", "3")], "10"), list(vec![], "20")],
            vec![event("MODIFIED", job("a", "11")) + &event("ERROR", expired)],
        );
        let seen: Vec<String> = watch_one(api, "a").take(4).map(describe).collect().await;
        assert_eq!(seen[..2], ["a 3", "a 11"]);
        assert!(seen[2].starts_with("error") && seen[3] == "gone", "{seen:?}");
        let relist = asked.lock().unwrap()[2].1.clone();
        assert!(
            relist.ends_with("?resourceVersion=11&resourceVersionMatch=NotOlderThan&fieldSelector=metadata.name%3Da"),
            "{relist}"
        );
    }

    #[test]
    fn a_list_by_label_carries_its_selector_encoded() {
        let url = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";
        let labels = Some("app.kubernetes.io/managed-by=bgjobs");
        let encoded = "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dbgjobs";
        let q = list_query(url, labels, None, &ListFrom::Any);
        assert!(q.ends_with(&format!("leases?resourceVersion=0&resourceVersionMatch=NotOlderThan&{encoded}")), "{q}");
        assert_eq!(list_query(url, labels, None, &ListFrom::Quorum("42".into())), format!("{url}?{encoded}"));
    }
}
