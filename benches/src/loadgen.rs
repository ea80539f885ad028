//! The load generator: many flows (one UDP socket, so one proxy session, each), stamped
//! payloads, and a count of every answer.
//!
//! Two modes. **Open loop** sends at a fixed total rate and measures each round trip from
//! the datagram's *intended* send time, so a stalled proxy shows as latency instead of
//! quietly slowing the sender (coordinated omission). **Closed loop** keeps a window of
//! datagrams in flight per flow and sends the next on each answer: the most the path will
//! carry.
//!
//! [`Tracker`] is the counting, free of I/O and tested on its own; [`run`] drives sockets.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::UdpSocket as MioSocket;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use spotable_fixtures::wire;

/// How one answer was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// First answer to a datagram, in time.
    Unique,
    /// First answer, but after the late threshold (still counted as received).
    Late,
    /// A second (or later) answer to the same datagram.
    Duplicate,
    /// Not an answer to anything this flow sent.
    Unknown,
}

/// What one flow sent and got back. Sequence numbers are dense from 0, so the state is two
/// vectors indexed by sequence number.
#[derive(Debug)]
pub struct Tracker {
    /// Intended send time of each sequence number, in ns since the run's start.
    sent_at: Vec<u64>,
    /// Answers received per sequence number (saturating).
    answers: Vec<u8>,
    late_after_ns: u64,
    pub unique: u64,
    pub late: u64,
    pub duplicates: u64,
    pub unknown: u64,
}

impl Tracker {
    /// A tracker that calls an answer late after `late_after`.
    pub fn new(late_after: Duration) -> Self {
        Self {
            sent_at: Vec::new(),
            answers: Vec::new(),
            late_after_ns: u64::try_from(late_after.as_nanos()).unwrap_or(u64::MAX),
            unique: 0,
            late: 0,
            duplicates: 0,
            unknown: 0,
        }
    }

    /// Records a datagram meant to leave at `at_ns`; returns its sequence number.
    pub fn sent(&mut self, at_ns: u64) -> u64 {
        self.sent_at.push(at_ns);
        self.answers.push(0);
        (self.sent_at.len() - 1) as u64
    }

    /// Counts an answer to `seq` received at `now_ns`; returns how, and the round trip from
    /// the intended send time for a first answer.
    pub fn answer(&mut self, seq: u64, now_ns: u64) -> (Answer, Option<u64>) {
        let Some(i) = usize::try_from(seq)
            .ok()
            .filter(|&i| i < self.answers.len())
        else {
            self.unknown += 1;
            return (Answer::Unknown, None);
        };
        self.answers[i] = self.answers[i].saturating_add(1);
        if self.answers[i] > 1 {
            self.duplicates += 1;
            return (Answer::Duplicate, None);
        }
        let rtt = now_ns.saturating_sub(self.sent_at[i]);
        if rtt > self.late_after_ns {
            self.late += 1;
            (Answer::Late, Some(rtt))
        } else {
            self.unique += 1;
            (Answer::Unique, Some(rtt))
        }
    }

    /// Datagrams sent.
    pub fn sent_count(&self) -> u64 {
        self.sent_at.len() as u64
    }

    /// Datagrams that got no answer at all.
    pub fn lost(&self) -> u64 {
        self.answers.iter().filter(|&&n| n == 0).count() as u64
    }

    /// Whether `seq` has been answered.
    pub fn answered(&self, seq: u64) -> bool {
        usize::try_from(seq)
            .ok()
            .and_then(|i| self.answers.get(i))
            .is_some_and(|&n| n > 0)
    }
}

/// Load shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fixed total rate; latency from the intended send time.
    Open,
    /// A window per flow; the next datagram leaves on an answer.
    Closed,
}

/// `spotable-bench loadgen` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Where to send (the proxy, or a replica directly).
    #[arg(long)]
    pub target: SocketAddr,
    /// Source address to bind the flows to.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub bind: SocketAddr,
    #[arg(long, value_enum, default_value = "open")]
    pub mode: Mode,
    /// Open loop: datagrams per second, all flows together.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Closed loop: datagrams in flight per flow.
    #[arg(long, default_value_t = 8)]
    pub window: u32,
    /// Flows (players); each is its own socket and so its own proxy session.
    #[arg(long, default_value_t = 64)]
    pub flows: u32,
    /// Payload size in bytes (at least 8).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// How long to send.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Discarded from the figures at the start (sessions opening, caches warming).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// An answer later than this counts as late.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub late_after: Duration,
    /// How long to wait for stragglers after the last send.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Width of the delivery timeline's buckets.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub bucket: Duration,
    /// Append these bytes to every datagram (a routing token; a token-routing proxy cuts
    /// it off, so the answers carry only the stamped payload).
    #[arg(long, value_name = "TOKEN")]
    pub suffix: Option<String>,
    /// Print a JSON report (otherwise a human summary).
    #[arg(long)]
    pub json: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub mode: Option<Mode>,
    pub flows: u32,
    pub payload: usize,
    /// Seconds of measurement (after warm-up).
    pub seconds: f64,
    pub sent: u64,
    /// First answers in time.
    pub unique: u64,
    pub late: u64,
    pub duplicates: u64,
    pub unknown: u64,
    pub lost: u64,
    /// First answers per second (unique + late).
    pub answers_per_sec: f64,
    /// Every answer per second, duplicates included.
    pub received_per_sec: f64,
    /// Round-trip percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub rtt_us: Percentiles,
    /// Round-trip CDF: (microseconds, fraction), for plots.
    pub cdf: Vec<(f64, f64)>,
    /// First answers per bucket since the start (warm-up included), and the bucket width.
    pub timeline: Vec<u32>,
    /// Every answer per bucket, duplicates included.
    pub timeline_all: Vec<u32>,
    pub bucket_ms: f64,
    /// Longest time without a first answer while sending, in ms (after warm-up).
    pub longest_gap_ms: f64,
}

/// Round-trip percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

struct Flow {
    socket: MioSocket,
    tracker: Tracker,
    in_flight: u32,
    /// Last send or first answer: a closed-loop flow without progress for a while has lost
    /// its whole window and is refilled.
    last_progress: Instant,
    /// The first sequence number sent after warm-up; earlier ones are not counted.
    first_counted: u64,
}

impl Flow {
    fn send(
        &mut self,
        intended_ns: u64,
        warmup_ns: u64,
        size: usize,
        suffix: &[u8],
        payload: &mut Vec<u8>,
    ) {
        let seq = self.tracker.sent(intended_ns);
        if intended_ns >= warmup_ns && self.first_counted == u64::MAX {
            self.first_counted = seq;
        }
        wire::stamp(payload, seq, size);
        payload.extend_from_slice(suffix);
        // A full socket buffer loses the datagram, which the counts then show as lost.
        let _ = self.socket.send(payload);
        self.in_flight += 1;
        self.last_progress = Instant::now();
    }
}

/// Counts of answers to datagrams sent after warm-up.
#[derive(Default)]
struct Counted {
    unique: u64,
    late: u64,
    duplicates: u64,
}

/// Runs the load described by `args` and returns what it measured.
pub fn run(args: &LoadArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(args.flows > 0, "--flows must be at least 1");
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(args.window > 0, "--window must be at least 1");
    let mut poll = Poll::new()?;
    let mut flows = Vec::with_capacity(args.flows as usize);
    for i in 0..args.flows {
        let std = UdpSocket::bind(args.bind)?;
        std.connect(args.target)?;
        std.set_nonblocking(true)?;
        let mut socket = MioSocket::from_std(std);
        poll.registry()
            .register(&mut socket, Token(i as usize), Interest::READABLE)?;
        flows.push(Flow {
            socket,
            tracker: Tracker::new(args.late_after),
            in_flight: 0,
            last_progress: Instant::now(),
            first_counted: u64::MAX,
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let bucket_ns = args.bucket.as_nanos().max(1) as u64;
    let total_ns = (args.duration + args.drain).as_nanos() as u64;
    let mut timeline = vec![0u32; (total_ns / bucket_ns + 1) as usize];
    let mut timeline_all = timeline.clone();
    let warmup_ns = args.warmup.as_nanos() as u64;
    let send_ns = args.duration.as_nanos() as u64;
    let size = args.payload.max(wire::HEADER);
    let suffix = args.suffix.as_deref().unwrap_or_default().as_bytes();
    let mut payload = Vec::with_capacity(size + suffix.len());
    let mut buf = vec![0u8; 65_536];
    let mut events = Events::with_capacity(1024);
    let mut counted = Counted::default();
    let start = Instant::now();
    let elapsed_ns = |at: Instant| at.duration_since(start).as_nanos() as u64;
    // Open loop: datagram k is due at k / rate seconds, on flow k mod flows.
    let mut next_k: u64 = 0;
    let interval_ns = 1_000_000_000f64 / args.rate as f64;
    let mut last_answer_ns = warmup_ns;
    let mut longest_gap_ns = 0u64;
    let stuck_after = Duration::from_millis(200);

    // A progress bar for people (hidden when stderr is not a terminal, and under --json,
    // where a parent such as `compare` draws its own).
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total_ns / 1_000_000)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} ms {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut shown_ms = 0;

    if args.mode == Mode::Closed {
        for f in &mut flows {
            for _ in 0..args.window {
                f.send(0, warmup_ns, size, suffix, &mut payload);
            }
        }
    }
    // A turn of this loop that the scheduler delays past the end still owes what fell due
    // before it; those datagrams then get their own drain time rather than being dropped.
    let drain_ns = args.drain.as_nanos() as u64;
    let mut end_ns = total_ns;
    loop {
        let now = Instant::now();
        let now_ns = elapsed_ns(now);
        let sending = now_ns < send_ns;
        if now_ns / 1_000_000 >= shown_ms + 100 {
            shown_ms = now_ns / 1_000_000;
            bar.set_position(shown_ms);
            bar.set_message(format!("{} answers", counted.unique + counted.late));
        }
        let mut timeout = Duration::from_millis(20);
        if args.mode == Mode::Open {
            // Everything due by now goes out, however late.
            let mut late = false;
            loop {
                let due = (next_k as f64 * interval_ns) as u64;
                if due > now_ns || due >= send_ns {
                    break;
                }
                let i = (next_k % flows.len() as u64) as usize;
                flows[i].send(due, warmup_ns, size, suffix, &mut payload);
                next_k += 1;
                late = !sending;
            }
            if late {
                end_ns = end_ns.max(now_ns + drain_ns);
            }
        }
        if now_ns >= end_ns {
            break;
        }
        if args.mode == Mode::Open {
            let due = (next_k as f64 * interval_ns) as u64;
            if due < send_ns {
                timeout = timeout.min(Duration::from_nanos(
                    due.saturating_sub(elapsed_ns(Instant::now())),
                ));
            }
        } else if sending {
            for f in &mut flows {
                if now.duration_since(f.last_progress) > stuck_after {
                    f.in_flight = 0;
                    while f.in_flight < args.window {
                        f.send(now_ns, warmup_ns, size, suffix, &mut payload);
                    }
                }
            }
        }
        // epoll counts in whole milliseconds (mio rounds up), too coarse for pacing: below
        // one, look without waiting and sleep briefly (hrtimer-precise) instead.
        let wait = if timeout >= Duration::from_millis(1) {
            Duration::from_millis(timeout.as_millis() as u64)
        } else {
            Duration::ZERO
        };
        // A signal (SIGCONT after a stop, a profiler's) interrupts the wait: look again.
        match poll.poll(&mut events, Some(wait)) {
            Err(e) if e.kind() == ErrorKind::Interrupted => events.clear(),
            other => other?,
        }
        if wait.is_zero() && events.is_empty() && !timeout.is_zero() {
            std::thread::sleep(timeout.min(Duration::from_micros(100)));
        }
        for ev in &events {
            let f = &mut flows[ev.token().0];
            loop {
                let n = match f.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    // ICMP unreachable from a dead target: the tracker counts the loss.
                    Err(_) => break,
                };
                let at = elapsed_ns(Instant::now());
                let Some(seq) = wire::seq_of(&buf[..n]) else {
                    f.tracker.unknown += 1;
                    continue;
                };
                let in_window = seq >= f.first_counted;
                let (kind, rtt) = f.tracker.answer(seq, at);
                if kind != Answer::Unknown
                    && let Some(slot) = timeline_all.get_mut((at / bucket_ns) as usize)
                {
                    *slot += 1;
                }
                if in_window {
                    match kind {
                        Answer::Unique => counted.unique += 1,
                        Answer::Late => counted.late += 1,
                        Answer::Duplicate => counted.duplicates += 1,
                        Answer::Unknown => {}
                    }
                }
                if !matches!(kind, Answer::Unique | Answer::Late) {
                    continue;
                }
                if let Some(slot) = timeline.get_mut((at / bucket_ns) as usize) {
                    *slot += 1;
                }
                if in_window {
                    if let Some(rtt) = rtt {
                        let _ = hist.record(rtt.max(1));
                    }
                    if at < send_ns {
                        longest_gap_ns = longest_gap_ns.max(at.saturating_sub(last_answer_ns));
                    }
                    last_answer_ns = last_answer_ns.max(at);
                }
                if args.mode == Mode::Closed {
                    f.in_flight = f.in_flight.saturating_sub(1);
                    f.last_progress = Instant::now();
                    if at < send_ns {
                        f.send(at, warmup_ns, size, suffix, &mut payload);
                    }
                }
            }
        }
    }

    bar.finish_and_clear();
    let mut report = Report {
        mode: Some(args.mode),
        flows: args.flows,
        payload: size,
        seconds: (send_ns.saturating_sub(warmup_ns)) as f64 / 1e9,
        unique: counted.unique,
        late: counted.late,
        duplicates: counted.duplicates,
        bucket_ms: bucket_ns as f64 / 1e6,
        longest_gap_ms: longest_gap_ns as f64 / 1e6,
        ..Report::default()
    };
    for f in &flows {
        let t = &f.tracker;
        for seq in f.first_counted.min(t.sent_count())..t.sent_count() {
            report.sent += 1;
            if !t.answered(seq) {
                report.lost += 1;
            }
        }
        report.unknown += t.unknown;
    }
    if report.seconds > 0.0 {
        let firsts = (report.unique + report.late) as f64;
        report.answers_per_sec = firsts / report.seconds;
        report.received_per_sec = (firsts + report.duplicates as f64) / report.seconds;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    if !hist.is_empty() {
        report.rtt_us = Percentiles {
            p50: us(hist.value_at_quantile(0.5)),
            p90: us(hist.value_at_quantile(0.9)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        };
        // Quantiles spaced evenly on a log scale of 1 - q, up to 1 - 1e-4.
        report.cdf = (0..=200)
            .map(|k| {
                let q = 1.0 - 10f64.powf(-(k as f64) / 50.0);
                (us(hist.value_at_quantile(q)), q)
            })
            .collect();
    }
    let keep = ((send_ns + 100_000_000) / bucket_ns) as usize;
    timeline.truncate(keep);
    timeline_all.truncate(keep);
    report.timeline = timeline;
    report.timeline_all = timeline_all;
    Ok(report)
}

/// Prints a report for people.
pub fn print(r: &Report) {
    println!(
        "  sent {}  answered {}  lost {}  late {}  duplicates {}",
        r.sent,
        r.unique + r.late,
        r.lost,
        r.late,
        r.duplicates
    );
    println!(
        "  {:.0} answers/s ({:.0} received/s with duplicates)",
        r.answers_per_sec, r.received_per_sec
    );
    println!(
        "  rtt µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        r.rtt_us.p50, r.rtt_us.p90, r.rtt_us.p99, r.rtt_us.p999, r.rtt_us.max
    );
    println!("  longest gap {:.1} ms", r.longest_gap_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn first_answers_duplicates_late_and_lost_are_told_apart() {
        let mut t = Tracker::new(Duration::from_millis(100));
        let a = t.sent(0);
        let b = t.sent(10 * MS);
        let c = t.sent(20 * MS);
        let _d = t.sent(30 * MS); // never answered
        assert_eq!(t.answer(a, 5 * MS), (Answer::Unique, Some(5 * MS)));
        assert_eq!(t.answer(a, 6 * MS), (Answer::Duplicate, None));
        assert_eq!(t.answer(a, 7 * MS), (Answer::Duplicate, None));
        assert_eq!(t.answer(b, 11 * MS), (Answer::Unique, Some(MS)));
        // From the intended send time: 150 ms after it is late however soon it left.
        assert_eq!(t.answer(c, 170 * MS), (Answer::Late, Some(150 * MS)));
        assert_eq!(t.answer(c, 171 * MS), (Answer::Duplicate, None));
        assert_eq!(t.answer(99, 1), (Answer::Unknown, None));
        assert_eq!(
            (t.unique, t.late, t.duplicates, t.unknown, t.lost()),
            (2, 1, 3, 1, 1)
        );
        assert_eq!(t.sent_count(), 4);
        assert!(t.answered(a) && !t.answered(3) && !t.answered(1000));
    }

    #[test]
    fn a_clock_that_runs_backwards_gives_zero_not_a_wrap() {
        let mut t = Tracker::new(Duration::from_millis(100));
        let s = t.sent(50 * MS);
        assert_eq!(t.answer(s, 40 * MS), (Answer::Unique, Some(0)));
    }

    #[test]
    fn many_duplicates_saturate_without_overflow() {
        let mut t = Tracker::new(Duration::from_secs(1));
        let s = t.sent(0);
        for _ in 0..1000 {
            t.answer(s, 1);
        }
        assert_eq!((t.unique, t.duplicates, t.lost()), (1, 999, 0));
    }
}
