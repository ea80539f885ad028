//! Shared harness of the integration tests: real replica processes, the real proxy binary,
//! real UDP on loopback.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spotable_fixtures::process::{
    ProxyProcess, ReplicaProcess, http_get, loopback_proxy_args, spawn_proxy, spawn_replica,
};
use spotable_fixtures::wire;

pub fn proxy_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spotable-proxy"))
}

pub fn replica(args: &[&str]) -> ReplicaProcess {
    spawn_replica(&spotable_fixtures::replica::exe(), args).expect("replica starts")
}

pub struct Setup {
    pub replicas: Vec<ReplicaProcess>,
    pub proxy: ProxyProcess,
}

/// Starts one replica per entry of `replica_args` and a proxy in front of them.
pub fn setup(replica_args: &[&[&str]], proxy_args: &[&str]) -> Setup {
    let replicas: Vec<_> = replica_args.iter().map(|a| replica(a)).collect();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let proxy = start_proxy(&addrs, proxy_args);
    Setup { replicas, proxy }
}

/// Starts the proxy binary on an ephemeral port with an admin endpoint.
pub fn start_proxy(replicas: &[SocketAddr], extra: &[&str]) -> ProxyProcess {
    let args = loopback_proxy_args(replicas, 2, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_proxy(&proxy_exe(), &[], &args, true).expect("proxy starts")
}

pub fn metrics(proxy: &ProxyProcess) -> String {
    let (status, body) = http_get(proxy.admin.expect("admin"), "/metrics").expect("scrape");
    assert_eq!(status, 200);
    body
}

pub fn metric(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    spotable_fixtures::process::scrape(proxy.admin.expect("admin"), name, labels).expect("scrape")
}

/// Polls a metric until `ok` holds (workers flush every 100 ms); returns the last value.
pub fn wait_metric(
    proxy: &ProxyProcess,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> f64 {
    spotable_fixtures::process::scrape_until(proxy.admin.expect("admin"), name, labels, ok)
        .expect("scrape")
}

pub fn client(proxy: &ProxyProcess) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s
}

/// Answers with their arrival times.
type Arrivals = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

/// Collects everything a client socket receives until stopped, with arrival times.
pub struct Collector {
    stop: Arc<AtomicBool>,
    got: Arrivals,
    thread: JoinHandle<()>,
}

impl Collector {
    pub fn start(socket: &UdpSocket) -> Self {
        let socket = socket.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let got: Arrivals = Arc::default();
        let (flag, sink) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Acquire) {
                if let Ok(n) = socket.recv(&mut buf) {
                    sink.lock()
                        .unwrap()
                        .push((Instant::now(), buf[..n].to_vec()));
                }
            }
        });
        Self { stop, got, thread }
    }

    /// Calls `send` (every 100 ms) until an answer has arrived (10 s at most); returns the
    /// first answer, leaving it among those collected.
    pub fn first(&self, mut send: impl FnMut()) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((_, a)) = self.got.lock().unwrap().first() {
                return a.clone();
            }
            assert!(Instant::now() < deadline, "no answer within 10 s");
            send();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `expected` answers arrived (10 s at most), then returns them all.
    pub fn finish(self, expected: usize) -> Vec<Vec<u8>> {
        self.finish_when(|got| got.len() >= expected)
            .into_iter()
            .map(|(_, a)| a)
            .collect()
    }

    /// Waits until the answer to stamped datagram `seq` arrived (10 s at most): the last of a
    /// stream, when answers may go missing before it.
    pub fn finish_at_seq(self, seq: u64) -> Vec<(Instant, Vec<u8>)> {
        self.finish_when(|got| got.iter().any(|(_, a)| wire::seq_of(a) == Some(seq)))
    }

    /// Waits until `done` holds for what arrived (10 s at most), then returns it.
    pub fn finish_when(
        self,
        done: impl Fn(&[(Instant, Vec<u8>)]) -> bool,
    ) -> Vec<(Instant, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.got.lock().unwrap()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap();
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// Sends `count` stamped datagrams at `interval`, calling `at(seq)` before each.
pub fn stream(socket: &UdpSocket, count: u64, interval: Duration, at: impl FnMut(u64)) {
    stream_with_suffix(socket, count, interval, &[], at);
}

/// [`stream`], each datagram ending with `suffix` (a routing token).
pub fn stream_with_suffix(
    socket: &UdpSocket,
    count: u64,
    interval: Duration,
    suffix: &[u8],
    mut at: impl FnMut(u64),
) {
    let start = Instant::now();
    let mut buf = Vec::new();
    for seq in 0..count {
        at(seq);
        let due = start + interval * seq as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        wire::stamp(&mut buf, seq, 48);
        buf.extend_from_slice(suffix);
        socket.send(&buf).unwrap();
    }
}

/// How many times each sequence number arrived.
pub fn counts(answers: &[Vec<u8>]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(wire::seq_of(a).expect("stamped answer"))
            .or_insert(0) += 1;
    }
    m
}

/// A config file that is removed with the test.
pub struct TempConfig(pub PathBuf);

impl TempConfig {
    /// Writes `text` to a file of its own (tests run in parallel: `unique`, a replica's port,
    /// tells them apart).
    pub fn write(name: &str, unique: u16, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "spotable-{name}-{}-{unique}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    /// Its path, as a flag takes it.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Replicas' addresses as a TOML array's items.
pub fn toml_list(replicas: &[ReplicaProcess]) -> String {
    replicas
        .iter()
        .map(|r| format!("\"{}\"", r.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sequence numbers of stamped answers, sorted; asserts none arrived twice.
pub fn distinct_seqs(answers: &[(Instant, Vec<u8>)]) -> Vec<u64> {
    let mut seqs: Vec<u64> = answers
        .iter()
        .map(|(_, a)| wire::seq_of(a).expect("stamped answer"))
        .collect();
    let all = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), all, "duplicates delivered");
    seqs
}

/// Asserts that every number in `0..count` arrived exactly `times` times and nothing else did.
pub fn assert_each(answers: &[Vec<u8>], count: u64, times: usize) {
    let c = counts(answers);
    let lost: Vec<_> = (0..count).filter(|s| !c.contains_key(s)).collect();
    let wrong: Vec<_> = c.iter().filter(|(_, n)| **n != times).collect();
    assert!(
        lost.is_empty() && wrong.is_empty() && c.len() as u64 == count,
        "{} lost (first {:?}), {} with wrong counts (e.g. {:?}), {} distinct of {count}",
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>(),
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>(),
        c.len()
    );
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Polls `ok` until it holds or `within` passes; returns whether it held.
pub fn eventually(within: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of the proxy's log that contain `needle`.
pub fn log_count(proxy: &ProxyProcess, needle: &str) -> usize {
    proxy
        .log
        .lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// The fake Kubernetes API server and a kubeconfig pointing at it (namespace `games`),
/// removed with the test.
pub struct Cluster {
    pub api: spotable_fixtures::kube::FakeApi,
    dir: PathBuf,
}

impl Cluster {
    pub fn new() -> Self {
        let api = spotable_fixtures::kube::FakeApi::start().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "spotable-kube-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self { api, dir }
    }

    /// The proxy binary with `args`, its Kubernetes client pointed at the fake.
    pub fn proxy(&self, args: &[&str]) -> ProxyProcess {
        let kubeconfig = self.api.write_kubeconfig(&self.dir, "games").unwrap();
        spotable_fixtures::process::spawn_proxy_env(
            &proxy_exe(),
            &[],
            args,
            true,
            &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
        )
        .expect("proxy starts")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
