//! Starting and stopping the data plane: front sockets, worker threads, shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};
use spotable_edge::fds;
use tokio::sync::watch;

use crate::replicas::{Notify, ReplicaSet};
use crate::session::{Admission, SessionTable, Settings};
use crate::worker::{Front, Sockets, Worker};

/// What the data plane needs to run.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Front addresses players send to.
    pub listen: Vec<SocketAddr>,
    /// Data-plane threads, each with its own socket per listener.
    pub workers: usize,
    /// Sessions allowed across all workers.
    pub max_sessions: usize,
    /// Front socket buffer size (`SO_RCVBUF` / `SO_SNDBUF`), best effort.
    pub socket_buffer: usize,
    /// Time datagrams from the kernel's receive timestamps (`--kernel-timestamps`).
    pub kernel_timestamps: bool,
    /// Session behaviour.
    pub settings: Settings,
}

/// Why the proxy could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A front address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A worker could not set up its event loop.
    #[error("cannot start worker {index}: {source}")]
    Worker {
        /// Which worker.
        index: usize,
        /// The OS error.
        source: io::Error,
    },
    /// A worker thread panicked.
    #[error("worker {0} panicked")]
    Panicked(usize),
    /// More listeners than the data plane can address.
    #[error("too many listen addresses ({0}); at most {max}", max = u16::MAX)]
    TooManyListeners(usize),
}

/// State every worker shares with the control plane. Read on wake-ups, never per packet.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) replicas: ReplicaSet,
    pub(crate) shutdown: AtomicBool,
    pub(crate) health: Arc<Health>,
    /// Per-replica counts, added by each worker on its tick.
    pub(crate) replica_stats: Arc<crate::replica_stats::Registry>,
    /// Time in the proxy, added by each worker on its tick.
    pub(crate) transit: Arc<crate::transit::Registry>,
}

/// Session settings for unit tests: `copies` (2 s window, no agreement), fan-out 3, late joins, 1500-byte
/// datagrams, no rate limit, no token, no header.
#[cfg(test)]
pub(crate) fn settings_for_tests() -> Settings {
    Settings {
        mode: crate::dedupe::Mode::Copies {
            window: std::time::Duration::from_secs(2),
            max_entries: 1024,
        },
        // The worker's tests are about moving datagrams; agreement is the core's, tested there.
        agreement: crate::dedupe::Agreement::Off,
        session_timeout: std::time::Duration::from_secs(30),
        rate: None,
        max_datagram: 1500,
        fanout: 3,
        late_join: true,
        replica_header: None,
        max_sessions: None,
        max_pps: None,
        token: None,
    }
}

#[cfg(test)]
impl Shared {
    /// What a worker under test reads: a replica set the test publishes to.
    pub(crate) fn for_tests() -> Arc<Self> {
        Arc::new(Self {
            replicas: ReplicaSet::new(),
            shutdown: AtomicBool::new(false),
            health: Arc::new(Health::new()),
            replica_stats: Arc::default(),
            transit: Arc::default(),
        })
    }
}

/// Whether the data plane is whole. A worker that stops for any reason but shutdown (its
/// event loop failed, it panicked) marks the proxy failed: its clients would otherwise be
/// rehashed to other workers and reach the game as strangers, silently.
#[derive(Debug)]
pub struct Health {
    failure: watch::Sender<Option<String>>,
    workers_up: AtomicUsize,
}

impl Health {
    fn new() -> Self {
        Self {
            failure: watch::Sender::new(None),
            workers_up: AtomicUsize::new(0),
        }
    }

    /// Why the data plane failed, once it has.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Waits until the data plane fails; returns why.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The sender lives in `self`: it cannot be gone while we borrow it.
            Err(_) => std::future::pending().await,
        }
    }

    /// Workers running now.
    pub fn workers_up(&self) -> usize {
        self.workers_up.load(Ordering::Acquire)
    }

    fn fail(&self, why: String) {
        self.failure.send_if_modified(|f| {
            let first = f.is_none();
            if first {
                *f = Some(why);
            }
            first
        });
    }
}

struct WakeWorker(Arc<mio::Waker>);

impl Notify for WakeWorker {
    fn notify(&self) {
        if let Err(e) = self.0.wake() {
            tracing::warn!(error = %e, "cannot wake worker");
        }
    }
}

/// A running proxy. Dropping it stops the workers.
#[derive(Debug)]
pub struct Proxy {
    local_addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    admission: Admission,
    session_limit: usize,
    front_inodes: Vec<u64>,
    wakers: Vec<Arc<mio::Waker>>,
    /// Each worker's applied replica-set version.
    applied: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Binds the listeners and starts the workers. Replicas come from `replicas`, which any
    /// discovery source may keep publishing to while the proxy runs.
    pub fn start(config: ProxyConfig, replicas: ReplicaSet) -> Result<Self, ServerError> {
        if config.listen.len() > usize::from(u16::MAX) {
            return Err(ServerError::TooManyListeners(config.listen.len()));
        }
        let workers = config.workers.max(1);
        // per_worker[w][l]: worker w's socket for listener l.
        let mut per_worker: Vec<Vec<std::net::UdpSocket>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        let mut front_inodes = Vec::new();
        for &addr in &config.listen {
            let group = bind_group(addr, workers, config.socket_buffer)
                .map_err(|source| ServerError::Bind { addr, source })?;
            local_addrs.push(group.0);
            for (w, s) in group.1.into_iter().enumerate() {
                front_inodes.extend(crate::kernel::socket_inode(&s));
                per_worker[w].push(s);
            }
        }
        let session_limit = fit_sessions(config.max_sessions, workers, config.listen.len());
        let shared = Arc::new(Shared {
            replicas: replicas.clone(),
            shutdown: AtomicBool::new(false),
            health: Arc::new(Health::new()),
            replica_stats: Arc::default(),
            transit: Arc::default(),
        });
        let admission = Admission::new(session_limit);
        let settings = Arc::new(config.settings);
        let fault = crate::worker::injected_fault();
        let mut proxy = Proxy {
            local_addrs,
            shared: shared.clone(),
            admission: admission.clone(),
            session_limit,
            front_inodes,
            wakers: Vec::new(),
            applied: Vec::new(),
            threads: Vec::new(),
        };
        for (index, sockets) in per_worker.into_iter().enumerate() {
            let (ready_tx, ready_rx) = mpsc::channel();
            let shared = shared.clone();
            let settings = settings.clone();
            let admission = admission.clone();
            let seed = seed();
            let applied = Arc::new(AtomicU64::new(0));
            proxy.applied.push(applied.clone());
            let kernel_timestamps = config.kernel_timestamps;
            let thread = std::thread::Builder::new()
                .name(format!("spotable-w{index}"))
                .spawn(move || {
                    let built = (|| {
                        let fronts = sockets
                            .into_iter()
                            .map(|s| Front::new(s, kernel_timestamps))
                            .collect::<io::Result<Vec<_>>>()?;
                        let table = SessionTable::new(
                            settings.clone(),
                            admission,
                            shared.replicas.snapshot(),
                            seed,
                        );
                        let (net, waker) = Sockets::new(fronts, kernel_timestamps)?;
                        let now = Instant::now();
                        let fault_at = fault.filter(|_| index == 0).map(|d| now + d);
                        let worker = Worker::new(
                            net,
                            table,
                            settings.max_datagram,
                            shared.clone(),
                            applied,
                            fault_at,
                            now,
                        );
                        Ok((worker, waker))
                    })();
                    match built {
                        Ok((worker, waker)) => {
                            let _ = ready_tx.send(Ok(waker));
                            run_worker(index, worker, &shared);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|source| ServerError::Worker { index, source })?;
            proxy.threads.push(thread);
            let waker = ready_rx
                .recv()
                .map_err(|_| ServerError::Panicked(index))?
                .map_err(|source| ServerError::Worker { index, source })?;
            // Subscribe first, then wake: a snapshot published in between is not missed.
            replicas.subscribe(Arc::new(WakeWorker(waker.clone())));
            let _ = waker.wake();
            proxy.wakers.push(waker);
        }
        for addr in &proxy.local_addrs {
            tracing::info!(%addr, workers, "listening");
        }
        Ok(proxy)
    }

    /// The bound front addresses (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The replica set the proxy follows.
    pub fn replicas(&self) -> &ReplicaSet {
        &self.shared.replicas
    }

    /// The replica-set version every worker has applied (the oldest of them): a change
    /// published as version N has reached the whole data path once this is N or more.
    pub fn replicas_applied(&self) -> u64 {
        self.applied
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// The counters of the implicit game (without token routing), shared by the workers.
    pub fn implicit_game(&self) -> Arc<crate::replicas::GameCounters> {
        self.admission.implicit_game()
    }

    /// Sessions open across all workers.
    pub fn sessions(&self) -> usize {
        self.admission.in_use()
    }

    /// The live session counter, for metrics.
    pub fn session_counter(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.admission.counter()
    }

    /// Sessions allowed at once: `max_sessions`, capped by the descriptor limit.
    pub fn session_limit(&self) -> usize {
        self.session_limit
    }

    /// Whether the data plane is whole.
    pub fn health(&self) -> Arc<Health> {
        self.shared.health.clone()
    }

    /// Per-replica counts, for the admin endpoint.
    pub fn replica_stats(&self) -> Arc<crate::replica_stats::Registry> {
        self.shared.replica_stats.clone()
    }

    /// Time-in-proxy histograms, for the admin endpoint.
    pub fn transit(&self) -> Arc<crate::transit::Registry> {
        self.shared.transit.clone()
    }

    /// Inodes of the front sockets, to find their kernel counters.
    pub fn front_inodes(&self) -> &[u64] {
        &self.front_inodes
    }

    /// Stops the workers and waits for them.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServerError> {
        self.shared.shutdown.store(true, Ordering::Release);
        for w in &self.wakers {
            let _ = w.wake();
        }
        let mut result = Ok(());
        for (i, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                result = Err(ServerError::Panicked(i));
            }
        }
        result
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs one worker to its end and reports an end that was not asked for. A panic is caught
/// here (the default hook has already printed it) so that it becomes a failure of the proxy
/// rather than a thread that quietly vanished.
fn run_worker(index: usize, worker: Worker<Sockets>, shared: &Shared) {
    shared.health.workers_up.fetch_add(1, Ordering::AcqRel);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
    shared.health.workers_up.fetch_sub(1, Ordering::AcqRel);
    let why = match outcome {
        Ok(Ok(())) if shared.shutdown.load(Ordering::Acquire) => return,
        Ok(Ok(())) => format!("worker {index} stopped"),
        Ok(Err(e)) => format!("worker {index}: event loop failed: {e}"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".into());
            format!("worker {index} panicked: {msg}")
        }
    };
    tracing::error!("{why}; the proxy is unhealthy and will exit");
    shared.health.fail(why);
}

/// The session limit that fits the process's descriptor limit, warning when it had to be cut.
fn fit_sessions(max_sessions: usize, workers: usize, listeners: usize) -> usize {
    let Some((soft, _)) = fds::limits() else {
        return max_sessions;
    };
    // Per worker: epoll, its waker, one front socket per listener.
    let fixed = fds::FD_RESERVE + (workers * (listeners + 2)) as u64;
    let fits = fds::budget(max_sessions, soft, fixed);
    if fits < max_sessions {
        tracing::warn!(
            max_sessions,
            fd_limit = soft,
            reserved = fixed,
            session_limit = fits,
            "max_sessions does not fit the open-file limit; sessions capped (raise the hard \
             limit, e.g. `ulimit -Hn` or the container runtime's nofile, to allow more)"
        );
    }
    fits
}

/// Binds `count` sockets to `addr` in one `SO_REUSEPORT` group. A probe bind without
/// `SO_REUSEPORT` comes first: it resolves port 0 and fails with "address in use" when anyone
/// else holds the port — without it, a second proxy on the same port would silently share
/// our traffic.
fn bind_group(
    addr: SocketAddr,
    count: usize,
    buffer: usize,
) -> io::Result<(SocketAddr, Vec<std::net::UdpSocket>)> {
    let probe = std::net::UdpSocket::bind(addr)?;
    let addr = probe.local_addr()?;
    drop(probe);
    let sockets = (0..count)
        .map(|_| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_port(true)?;
            if addr.is_ipv6() && addr.ip().is_unspecified() {
                s.set_only_v6(false)?;
            }
            if buffer > 0 {
                // Best effort: the kernel caps these at net.core.{r,w}mem_max.
                let _ = s.set_recv_buffer_size(buffer);
                let _ = s.set_send_buffer_size(buffer);
            }
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            Ok(s.into())
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((addr, sockets))
}

/// Per-worker secret for content hashes, so clients cannot aim for collisions.
fn seed() -> u64 {
    fastrand::u64(..)
}
