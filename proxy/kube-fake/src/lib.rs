//! A stand-in for the Kubernetes API server, faithful to what list/watch clients and simple
//! controllers rely on.
//!
//! - `GET <collection>` lists objects (label selector `k=v,…`, field selector `a.b=v`) with the
//!   current `metadata.resourceVersion`. Cluster-wide lists such as `/api/v1/pods` merge every
//!   namespace's collection.
//! - `GET <collection>?watch=true&resourceVersion=N` streams, chunked, one JSON event per line:
//!   `ADDED` / `MODIFIED` / `DELETED` after N, then live ones, plus `BOOKMARK`s when
//!   `allowWatchBookmarks=true`. A version older than the retained history gets an `ERROR`
//!   event carrying a 410 `Expired` status, as the real server sends it.
//! - Objects: `GET`, `PATCH` (JSON merge patch; a strategic merge patch is treated alike, lists
//!   replaced; a `metadata.resourceVersion` in the patch is a precondition, 409 when stale)
//!   and `DELETE` on `<collection>/<name>`, and the Eviction subresource
//!   `POST <collection>/<name>/eviction`: 201 and the pod is gone, or 429 for pods the test
//!   marks protected, as a PodDisruptionBudget would answer.
//! - `POST <collection>` creates (Kubernetes Events, say), recorded as `CREATE`.
//! - Every change a client makes is recorded in order with its wall-clock time.
//! - Tests can compact history, cut watches abruptly, and stop and restart the server on the
//!   same port (each incarnation has its own runtime, so pooled connections die with it).
//!
//! Objects are plain JSON (`serde_json::Value`), so any resource works; tests build them with
//! `k8s-openapi` types for honest shapes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Chunk = Result<Bytes, io::Error>;

/// A change a client made, as recorded by the fake.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// `PATCH`, `DELETE`, `EVICT` (accepted) or `EVICT-429` (refused).
    pub verb: String,
    /// Object path.
    pub path: String,
    /// The request body (patch, delete options, eviction), as JSON.
    pub body: Value,
    /// When it was served.
    pub at: SystemTime,
}

#[derive(Debug)]
struct Watch {
    collection: String,
    selector: Vec<(String, String)>,
    bookmarks: bool,
    deadline: Instant,
    tx: mpsc::UnboundedSender<Chunk>,
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    /// collection path -> name -> object
    objects: HashMap<String, BTreeMap<String, Value>>,
    /// collection path -> (list kind, apiVersion)
    list_kinds: HashMap<String, (String, String)>,
    history: Vec<Event>,
    /// Watches from versions below this get 410 Gone.
    oldest: u64,
    watches: Vec<Watch>,
    requests: Vec<String>,
    actions: Vec<Action>,
    /// Object paths whose evictions are refused with 429.
    protected: HashSet<String>,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake API server.
#[derive(Debug)]
pub struct FakeApi {
    addr: SocketAddr,
    inner: Shared,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl FakeApi {
    /// Starts on an ephemeral loopback port.
    pub fn start() -> io::Result<Self> {
        let inner = Shared::default();
        let (runtime, addr) = serve(&inner, SocketAddr::from(([127, 0, 0, 1], 0)))?;
        Ok(Self {
            addr,
            inner,
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server, default namespace `namespace`.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> io::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Takes the server down: listener closed, every connection and watch cut.
    pub fn stop(&self) {
        self.drop_watches();
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            rt.shutdown_background();
        }
    }

    /// Brings the server back on the same port.
    pub fn restart(&self) -> io::Result<()> {
        self.stop();
        let (runtime, _) = serve(&self.inner, self.addr)?;
        *self.runtime.lock().unwrap_or_else(PoisonError::into_inner) = Some(runtime);
        Ok(())
    }

    /// Creates or replaces `object` (a Kubernetes object serialised to JSON, with kind,
    /// apiVersion and metadata.name) in `collection` (the API path of its list, e.g.
    /// `/apis/discovery.k8s.io/v1/namespaces/games/endpointslices`). Returns its version.
    pub fn apply(&self, collection: &str, object: Value) -> u64 {
        apply_inner(&self.inner, collection, object)
    }

    /// Deletes `name` from `collection`; false when it did not exist.
    pub fn delete(&self, collection: &str, name: &str) -> bool {
        delete_inner(&self.inner, collection, name)
    }

    /// The object at `collection/name`.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        lock(&self.inner)
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    /// Refuse (429, as a PodDisruptionBudget would) or allow evictions of `collection/name`.
    pub fn protect(&self, collection: &str, name: &str, on: bool) {
        let path = format!("{collection}/{name}");
        let mut inner = lock(&self.inner);
        if on {
            inner.protected.insert(path);
        } else {
            inner.protected.remove(&path);
        }
    }

    /// Changes clients made, in order.
    pub fn actions(&self) -> Vec<Action> {
        lock(&self.inner).actions.clone()
    }

    /// Forgets all history: any watch resuming from an earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut inner = lock(&self.inner);
        inner.history.clear();
        inner.oldest = inner.rv + 1;
    }

    /// Cuts every open watch mid-stream (the connection errors, no clean end).
    pub fn drop_watches(&self) {
        let mut inner = lock(&self.inner);
        for w in inner.watches.drain(..) {
            let _ =
                w.tx.send(Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut")));
        }
    }

    /// Requests served so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner).requests.clone()
    }

    /// Open watch streams.
    pub fn watches(&self) -> usize {
        lock(&self.inner).watches.len()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One incarnation of the server: its own runtime, so shutting it down kills every
/// connection task too.
fn serve(inner: &Shared, addr: SocketAddr) -> io::Result<(tokio::runtime::Runtime, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(addr))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(inner.clone());
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let ticker = inner.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            bookmark_and_expire(&ticker);
        }
    });
    Ok((runtime, local))
}

fn apply_inner(shared: &Shared, collection: &str, mut object: Value) -> u64 {
    let mut inner = lock(shared);
    inner.rv += 1;
    let rv = inner.rv;
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if let (Some(kind), Some(api)) = (object["kind"].as_str(), object["apiVersion"].as_str()) {
        inner
            .list_kinds
            .insert(collection.into(), (format!("{kind}List"), api.into()));
    }
    let existed = inner
        .objects
        .entry(collection.into())
        .or_default()
        .insert(name, object.clone())
        .is_some();
    let kind = if existed { "MODIFIED" } else { "ADDED" };
    publish(&mut inner, collection, kind, object, rv);
    rv
}

fn delete_inner(shared: &Shared, collection: &str, name: &str) -> bool {
    let mut inner = lock(shared);
    let Some(mut object) = inner
        .objects
        .get_mut(collection)
        .and_then(|c| c.remove(name))
    else {
        return false;
    };
    inner.rv += 1;
    let rv = inner.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    publish(&mut inner, collection, "DELETED", object, rv);
    true
}

fn publish(inner: &mut Inner, collection: &str, kind: &'static str, object: Value, rv: u64) {
    let event = Event {
        rv,
        collection: collection.into(),
        kind,
        object,
    };
    inner.watches.retain(|w| {
        if w.collection != event.collection || !matches(&event.object, &w.selector) {
            return true;
        }
        w.tx.send(Ok(line(event.kind, &event.object))).is_ok()
    });
    inner.history.push(event);
}

fn bookmark_and_expire(inner: &Shared) {
    let mut inner = lock(inner);
    let now = Instant::now();
    let rv = inner.rv;
    let lists = inner.list_kinds.clone();
    inner.watches.retain(|w| {
        if now >= w.deadline {
            return false; // dropping the sender ends the stream cleanly
        }
        if !w.bookmarks {
            return true;
        }
        let (list_kind, api) = lists.get(&w.collection).cloned().unwrap_or_default();
        let bookmark = json!({
            "kind": list_kind.trim_end_matches("List"),
            "apiVersion": api,
            "metadata": {"resourceVersion": rv.to_string()},
        });
        w.tx.send(Ok(line("BOOKMARK", &bookmark))).is_ok()
    });
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut text = json!({"type": kind, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

fn parse_selector(s: Option<&String>) -> Vec<(String, String)> {
    s.map(|s| {
        s.split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    })
    .unwrap_or_default()
}

fn matches(object: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v))
}

/// Field selectors of the form `a.b.c=value` against the object's JSON.
fn fields_match(object: &Value, fields: &[(String, String)]) -> bool {
    fields.iter().all(|(path, want)| {
        let mut v = object;
        for part in path.split('.') {
            v = &v[part];
        }
        v.as_str() == Some(want)
    })
}

/// `/api/v1/pods` lists every `/api/v1/namespaces/<ns>/pods`.
fn in_cluster_list(list: &str, collection: &str) -> bool {
    let Some((prefix, resource)) = list.rsplit_once('/') else {
        return false;
    };
    collection
        .strip_prefix(&format!("{prefix}/namespaces/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, r)| r == resource)
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

async fn handle(
    State(inner): State<Shared>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    lock(&inner).requests.push(format!(
        "{method} {}",
        uri.path_and_query().map_or("", |p| p.as_str())
    ));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if method == Method::POST && !path.ends_with("/eviction") {
        return create(&inner, &path, body);
    }
    if let Some(response) = object_request(&inner, &method, &path, body) {
        return response;
    }
    if method != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not here",
        );
    }
    collection_request(&inner, path, &query)
}

/// `POST <collection>`: creates the object (named by `metadata.name`, or `generateName` and a
/// counter), recorded as `CREATE`; 409 when the name is taken.
fn create(inner: &Shared, collection: &str, mut object: Value) -> Response {
    let name = {
        let i = lock(inner);
        match object["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!(
                "{}{}",
                object["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("object-"),
                i.rv + 1
            ),
        }
    };
    object["metadata"]["name"] = json!(name);
    {
        let mut i = lock(inner);
        if i.objects
            .get(collection)
            .is_some_and(|c| c.contains_key(&name))
        {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{name} already exists"),
            );
        }
        i.actions.push(Action {
            verb: "CREATE".into(),
            path: format!("{collection}/{name}"),
            body: object.clone(),
            at: SystemTime::now(),
        });
    }
    let rv = apply_inner(inner, collection, object.clone());
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    json_response(StatusCode::CREATED, object.to_string())
}

/// GET / PATCH / DELETE of one object, and evictions; `None` when `path` is not an object.
fn object_request(inner: &Shared, method: &Method, path: &str, body: Value) -> Option<Response> {
    let mut i = lock(inner);
    let (parent, last) = path.rsplit_once('/')?;
    let (collection, name, eviction) = if i.objects.contains_key(parent) {
        (parent.to_string(), last.to_string(), false)
    } else if last == "eviction" {
        let (collection, name) = parent.rsplit_once('/')?;
        i.objects.contains_key(collection).then_some(())?;
        (collection.to_string(), name.to_string(), true)
    } else {
        return None;
    };
    let Some(current) = i.objects[&collection].get(&name).cloned() else {
        return Some(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{name} not found"),
        ));
    };
    let object_path = format!("{collection}/{name}");
    let protected = i.protected.contains(&object_path);
    let mut record = |verb: &str| {
        i.actions.push(Action {
            verb: verb.into(),
            path: object_path.clone(),
            body: body.clone(),
            at: SystemTime::now(),
        });
    };
    Some(match (method.clone(), eviction) {
        (Method::GET, false) => json_response(StatusCode::OK, current.to_string()),
        (Method::PATCH, false) => {
            // A patch naming a resourceVersion is a precondition, as on a real API server:
            // stale means someone else wrote in between (409, read again and retry).
            let wanted = body["metadata"]["resourceVersion"].as_str();
            if wanted.is_some_and(|v| Some(v) != current["metadata"]["resourceVersion"].as_str()) {
                record("PATCH-409");
                return Some(status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            record("PATCH");
            drop(i);
            let mut patched = current;
            merge(&mut patched, &body);
            let rv = apply_inner(inner, &collection, patched.clone());
            patched["metadata"]["resourceVersion"] = json!(rv.to_string());
            json_response(StatusCode::OK, patched.to_string())
        }
        (Method::DELETE, false) => {
            record("DELETE");
            drop(i);
            delete_inner(inner, &collection, &name);
            json_response(StatusCode::OK, current.to_string())
        }
        (Method::POST, true) => {
            if protected {
                record("EVICT-429");
                return Some(status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                ));
            }
            record("EVICT");
            drop(i);
            delete_inner(inner, &collection, &name);
            let ok = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Success", "code": 201});
            json_response(StatusCode::CREATED, ok.to_string())
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "unsupported verb",
        ),
    })
}

fn collection_request(
    inner: &Shared,
    collection: String,
    query: &HashMap<String, String>,
) -> Response {
    let selector = parse_selector(query.get("labelSelector"));
    let fields = parse_selector(query.get("fieldSelector"));
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut guard = lock(inner);
    let (list_kind, api) = guard
        .list_kinds
        .iter()
        .find(|(c, _)| **c == collection || in_cluster_list(&collection, c))
        .map(|(_, k)| k.clone())
        .unwrap_or_else(|| ("List".into(), "v1".into()));
    if !watch {
        let items: Vec<Value> = guard
            .objects
            .iter()
            .filter(|(c, _)| **c == collection || in_cluster_list(&collection, c))
            .flat_map(|(_, objects)| objects.values())
            .filter(|o| matches(o, &selector) && fields_match(o, &fields))
            .cloned()
            .collect();
        let body = json!({
            "apiVersion": api,
            "kind": list_kind,
            "metadata": {"resourceVersion": guard.rv.to_string()},
            "items": items,
        });
        return json_response(StatusCode::OK, body.to_string());
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(guard.rv);
    let (tx, rx) = mpsc::unbounded_channel();
    if from + 1 < guard.oldest {
        let gone = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", guard.oldest - 1),
            "reason": "Expired", "code": 410,
        });
        let _ = tx.send(Ok(line("ERROR", &gone)));
        drop(tx);
    } else {
        for e in guard
            .history
            .iter()
            .filter(|e| e.rv > from && e.collection == collection)
        {
            if matches(&e.object, &selector) {
                let _ = tx.send(Ok(line(e.kind, &e.object)));
            }
        }
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(1800);
        guard.watches.push(Watch {
            collection,
            selector,
            bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
            deadline: Instant::now() + Duration::from_secs(timeout),
            tx,
        });
    }
    drop(guard);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, body.to_string())
}

fn json_response(code: StatusCode, body: String) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
