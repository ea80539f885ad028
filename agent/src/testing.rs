//! A stand-in for the EC2 instance metadata service, faithful to its documented token rules:
//! `PUT /latest/api/token` with a TTL header of 1–21600 s returns a token (400 without one);
//! a GET with an unknown or expired token gets 401; a GET without a token works (IMDSv1)
//! unless the fake is told to require tokens; a path with no data is a 404.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::imds::{TOKEN_HEADER, TTL_HEADER};

#[derive(Debug, Default)]
struct Inner {
    data: HashMap<String, String>,
    tokens: HashMap<String, Instant>,
    issued: u64,
    v2_available: bool,
    v2_required: bool,
    token_requests: u64,
    gets_v1: u64,
    gets_v2: u64,
    unauthorized: u64,
    fail_next: u32,
}

/// A running fake IMDS on loopback.
#[derive(Debug, Clone)]
pub struct FakeImds {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl FakeImds {
    /// Starts on an ephemeral port, on the current tokio runtime; IMDSv2 available.
    pub async fn start() -> std::io::Result<Self> {
        let inner = Arc::new(Mutex::new(Inner {
            v2_available: true,
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, inner })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `http://127.0.0.1:PORT`, for `--imds-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `body` at `/latest/<path>` (e.g. `meta-data/spot/instance-action`).
    pub fn set(&self, path: &str, body: &str) {
        self.lock()
            .data
            .insert(path.trim_start_matches('/').into(), body.into());
    }

    /// Makes `/latest/<path>` a 404 again.
    pub fn remove(&self, path: &str) {
        self.lock().data.remove(path.trim_start_matches('/'));
    }

    /// Typical identity data of an instance with a public address.
    pub fn set_identity(&self, instance_id: &str, region: &str, hostname: &str, ipv4: &str) {
        self.set("meta-data/instance-id", instance_id);
        self.set("meta-data/placement/region", region);
        self.set("meta-data/public-hostname", hostname);
        self.set("meta-data/public-ipv4", ipv4);
    }

    /// Token endpoint on (IMDSv2) or off (answers 403, as when v2 is disabled).
    pub fn set_v2_available(&self, on: bool) {
        self.lock().v2_available = on;
    }

    /// Refuse token-less GETs with 401 (`HttpTokens=required`).
    pub fn set_v2_required(&self, on: bool) {
        self.lock().v2_required = on;
    }

    /// Invalidates every token issued so far (as a restart of IMDS would).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// The next `n` requests of any kind get a 500.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// Token PUTs served.
    pub fn token_requests(&self) -> u64 {
        self.lock().token_requests
    }

    /// GETs served (token-less, with a valid token).
    pub fn gets(&self) -> (u64, u64) {
        let i = self.lock();
        (i.gets_v1, i.gets_v2)
    }

    /// 401s answered.
    pub fn unauthorized(&self) -> u64 {
        self.lock().unauthorized
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut i = inner.lock().unwrap_or_else(PoisonError::into_inner);
    if i.fail_next > 0 {
        i.fail_next -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Some(path) = uri.path().strip_prefix("/latest/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if path == "api/token" {
        if method != Method::PUT {
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        i.token_requests += 1;
        if !i.v2_available {
            return StatusCode::FORBIDDEN.into_response();
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|t| (1..=21_600).contains(t));
        let Some(ttl) = ttl else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        i.issued += 1;
        let token = format!("token-{}-{ttl}", i.issued);
        i.tokens
            .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        return ([(TTL_HEADER, ttl.to_string())], token).into_response();
    }
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    match headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        Some(token) => {
            let valid = i.tokens.get(token).is_some_and(|exp| Instant::now() < *exp);
            if !valid {
                i.unauthorized += 1;
                return StatusCode::UNAUTHORIZED.into_response();
            }
            i.gets_v2 += 1;
        }
        None if i.v2_required => {
            i.unauthorized += 1;
            return StatusCode::UNAUTHORIZED.into_response();
        }
        None => i.gets_v1 += 1,
    }
    match i.data.get(path) {
        Some(body) => body.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A local SQS emulator: `moto_server` (PyPI `moto[server]`) as a child process.
#[derive(Debug)]
pub struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Moto {
    /// Starts moto on a free loopback port (or `port`) and waits until it answers.
    ///
    /// Free ports are drawn below the kernel's ephemeral range (32768 and up): a port that a
    /// test frees to restart moto on it later is then never handed to another test's
    /// `bind(0)` in between.
    pub fn start(port: Option<u16>) -> std::io::Result<Self> {
        match port {
            Some(p) => Self::start_on(p),
            None => {
                let mut last = std::io::Error::other("no free port");
                for attempt in 0..20u64 {
                    let p = 20_000 + (salt(attempt) % 12_000) as u16;
                    if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                        continue;
                    }
                    match Self::start_on(p) {
                        Ok(m) => return Ok(m),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn start_on(port: u16) -> std::io::Result<Self> {
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot run moto_server ({e}); install it: pip install 'moto[server]'"),
                )
            })?;
        let mut moto = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if moto.child.try_wait()?.is_some() {
                return Err(std::io::Error::other(format!(
                    "moto_server exited at start (port {port} taken?)"
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "moto_server did not start within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(moto)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for a child process to reach it (credentials are moto's dummies).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Stops it (SIGKILL), as an outage.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number that differs between calls and processes (for spreading test ports).
fn salt(attempt: u64) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), attempt))
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SQS client for `endpoint` with dummy credentials, built without touching the process
/// environment.
pub fn sqs_client_for(endpoint: &str) -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .http_client(crate::inventory::https_client())
        .endpoint_url(endpoint)
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A fresh emulator with one queue `name`: the emulator (kept alive by the caller), a client
/// for it, and the queue URL.
pub async fn moto_with_queue(name: &str) -> (Moto, aws_sdk_sqs::Client, String) {
    let moto = tokio::task::spawn_blocking(|| Moto::start(None))
        .await
        .unwrap_or_else(|e| panic!("moto start task: {e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let client = sqs_client_for(&moto.endpoint());
    let url = create_queue(&client, name).await;
    (moto, client, url)
}

/// Creates a queue (FIFO when the name ends with `.fifo`) and returns its URL.
pub async fn create_queue(client: &aws_sdk_sqs::Client, name: &str) -> String {
    let mut req = client.create_queue().queue_name(name);
    if name.ends_with(".fifo") {
        req = req.attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true");
    }
    req.send()
        .await
        .map(|o| o.queue_url.unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "create_queue {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(e)
            )
        })
}

/// One received message: body, group id, deduplication id.
#[derive(Debug, Clone)]
pub struct Received {
    /// The JSON body.
    pub body: String,
    /// `MessageGroupId`, on FIFO queues.
    pub group_id: Option<String>,
    /// `MessageDeduplicationId`, on FIFO queues.
    pub dedup_id: Option<String>,
    /// When SQS accepted it.
    pub sent_at: Option<SystemTime>,
}

/// Drains the queue (deleting what it reads) until it stays empty for `quiet`.
pub async fn receive_all(
    client: &aws_sdk_sqs::Client,
    url: &str,
    quiet: Duration,
) -> Vec<Received> {
    use aws_sdk_sqs::types::MessageSystemAttributeName as A;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        let r = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .message_system_attribute_names(A::MessageGroupId)
            .message_system_attribute_names(A::MessageDeduplicationId)
            .message_system_attribute_names(A::SentTimestamp)
            .send()
            .await;
        let msgs = r
            .map(|o| o.messages.unwrap_or_default())
            .unwrap_or_default();
        if msgs.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        last = Instant::now();
        for m in msgs {
            let attr = |k: A| m.attributes.as_ref().and_then(|a| a.get(&k).cloned());
            out.push(Received {
                body: m.body.clone().unwrap_or_default(),
                group_id: attr(A::MessageGroupId),
                dedup_id: attr(A::MessageDeduplicationId),
                sent_at: attr(A::SentTimestamp)
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            });
            if let Some(h) = m.receipt_handle {
                let _ = client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(h)
                    .send()
                    .await;
            }
        }
    }
    out
}

/// A stand-in for the two Auto Scaling calls of a lifecycle hook that the SQS/ASG emulator
/// (moto) does not implement: `RecordLifecycleActionHeartbeat` and `CompleteLifecycleAction`,
/// in the AWS Query protocol the SDK speaks (form-encoded POST, XML answer). Every call is
/// recorded with its parameters.
#[cfg(feature = "kubernetes")]
#[derive(Debug, Clone)]
pub struct FakeAutoscaling {
    addr: SocketAddr,
    calls: Calls,
}

/// Recorded calls: when, and the form parameters.
#[cfg(feature = "kubernetes")]
type Calls = Arc<Mutex<Vec<(SystemTime, HashMap<String, String>)>>>;

#[cfg(feature = "kubernetes")]
impl FakeAutoscaling {
    /// Starts on an ephemeral port, on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let calls: Calls = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(autoscaling)
            .with_state(calls.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, calls })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client for it with dummy credentials.
    pub fn client(&self) -> aws_sdk_autoscaling::Client {
        let config = aws_sdk_autoscaling::Config::builder()
            .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
            .http_client(crate::inventory::https_client())
            .endpoint_url(self.endpoint())
            .region(aws_sdk_autoscaling::config::Region::new("us-west-2"))
            .credentials_provider(aws_sdk_autoscaling::config::Credentials::new(
                "testing", "testing", None, None, "fake",
            ))
            .build();
        aws_sdk_autoscaling::Client::from_conf(config)
    }

    /// The calls so far: when, and the form parameters (`Action`, `LifecycleActionToken`, …).
    pub fn calls(&self) -> Vec<(SystemTime, HashMap<String, String>)> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(feature = "kubernetes")]
async fn autoscaling(State(calls): State<Calls>, body: String) -> Response {
    let params: HashMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect();
    let action = params.get("Action").cloned().unwrap_or_default();
    calls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((SystemTime::now(), params));
    if !matches!(
        action.as_str(),
        "RecordLifecycleActionHeartbeat" | "CompleteLifecycleAction"
    ) {
        return (StatusCode::BAD_REQUEST, "unsupported").into_response();
    }
    let xml = format!(
        "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
         <{action}Result/><ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata>\
         </{action}Response>"
    );
    ([("content-type", "text/xml")], xml).into_response()
}

/// `application/x-www-form-urlencoded` decoding.
#[cfg(feature = "kubernetes")]
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
