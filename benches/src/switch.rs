//! `spotable-bench demo --switch-proxy`: a proxy dies under a player. Two proxies with
//! `--replica-header proxy-v2`, two copies of a stateful game each behind the identity anchor,
//! and a player who streams through proxy A until A is SIGKILLed, then through B, as a load
//! balancer would re-hash it. The game's own count of the player's datagrams and of its peers
//! shows whether the player stayed one peer with its state, or became a stranger.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use spotable_fixtures::process::{ProxyProcess, loopback_proxy_args, spawn_proxy, spawn_replica};
use spotable_fixtures::wire;
use spotable_wrapper::anchor;

use crate::demo::DemoArgs;

/// What the player and the games experienced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchSummary {
    /// Datagrams the player sent.
    pub sent: u64,
    /// Distinct answers received.
    pub received: u64,
    /// Answers received more than once.
    pub duplicates: u64,
    /// Most peers a game reported having seen.
    pub peers: u64,
    /// Answers whose per-peer count went backwards (the game's state for the player reset).
    pub resets: u64,
    /// Datagrams sent to A that never came back: those in flight when it died.
    pub lost: u64,
}

/// A stateful game's answer: sequence number, its count for this peer, its peers.
fn parse(answer: &[u8]) -> Option<(u64, u64, u64)> {
    let seq = wire::seq_of(answer)?;
    let tail = std::str::from_utf8(answer.get(wire::HEADER..)?).ok()?;
    let (count, peers) = tail.rsplit_once('#')?.1.split_once('/')?;
    Some((seq, count.parse().ok()?, peers.parse().ok()?))
}

/// Folds the answers (in arrival order) into a summary.
pub fn summarize(sent: u64, answers: &[(u64, u64, u64)]) -> SwitchSummary {
    let mut seen = vec![0u32; sent as usize];
    let mut last_count = 0;
    let mut s = SwitchSummary {
        sent,
        ..SwitchSummary::default()
    };
    for &(seq, count, peers) in answers {
        if let Some(c) = seen.get_mut(seq as usize) {
            *c += 1;
        }
        s.peers = s.peers.max(peers);
        if count < last_count {
            s.resets += 1;
        }
        last_count = last_count.max(count);
    }
    s.received = seen.iter().filter(|&&c| c > 0).count() as u64;
    s.duplicates = seen.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    s.lost = sent - s.received;
    s
}

fn proxy(exe: &std::path::Path, anchors: &[SocketAddr]) -> anyhow::Result<ProxyProcess> {
    let args = loopback_proxy_args(
        anchors,
        1,
        &["--rate-limit", "0", "--replica-header", "proxy-v2"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_proxy(exe, &["proxy"], &args, false)
}

/// Runs the switch demo; fails when a game saw the player as a second peer, its state reset,
/// or the player got a duplicate.
pub fn run(args: &DemoArgs) -> anyhow::Result<SwitchSummary> {
    if args.kill_at >= args.duration {
        bail!("--kill-at must come before the end of --duration");
    }
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    println!(
        "Spotable demo, a proxy dying under a player: two proxies (PROXY v2 to the games), two \
         copies of a stateful game each behind the identity anchor, a player sending {} \
         datagrams/s for {:?}.",
        args.rate, args.duration
    );
    println!(
        "Proxy A will be SIGKILLed at {:?}; the player then goes on through proxy B.\n",
        args.kill_at
    );
    let games = (0..2)
        .map(|_| spawn_replica(&exe, &["replica", "--stateful"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut anchors = Vec::new();
    for (i, g) in games.iter().enumerate() {
        let a = anchor::spawn(anchor::Config {
            listen: "127.0.0.1:0".parse()?,
            game: g.addr,
            trust: vec!["127.0.0.0/8".parse()?],
            idle_timeout: Duration::from_secs(120),
            max_players: 1000,
            carried: Vec::new(),
        })?;
        println!(
            "  game {} on {} behind its anchor on {}",
            i + 1,
            g.addr,
            a.local
        );
        anchors.push(a);
    }
    let addrs: Vec<SocketAddr> = anchors.iter().map(|a| a.local).collect();
    let mut a = proxy(&exe, &addrs)?;
    let b = proxy(&exe, &addrs)?;
    println!("  proxy A on {}, proxy B on {}\n", a.addr, b.addr);

    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let total = (args.duration.as_secs_f64() * f64::from(args.rate)) as u64;
    let interval = Duration::from_secs(1) / args.rate;
    let start = Instant::now();
    let mut answers = Vec::new();
    let mut buf = Vec::new();
    let mut rx = [0u8; 2048];
    let mut target = a.addr;
    let mut switched_at = None;
    let drain = |answers: &mut Vec<(u64, u64, u64)>, rx: &mut [u8]| {
        while let Ok(n) = socket.recv(rx) {
            if let Some(x) = parse(&rx[..n]) {
                answers.push(x);
            }
        }
    };
    for seq in 0..total {
        let due = start + interval * seq as u32;
        while Instant::now() < due {
            drain(&mut answers, &mut rx);
            std::thread::sleep(Duration::from_micros(200));
        }
        if switched_at.is_none() && start.elapsed() >= args.kill_at {
            a.process.kill()?;
            target = b.addr;
            switched_at = Some(seq);
            println!(
                "  {:>6.2}s  SIGKILL proxy A; the player goes on through proxy B",
                start.elapsed().as_secs_f64()
            );
        }
        wire::stamp(&mut buf, seq, usize::from(args.payload));
        // A send to a dead proxy fails on loopback (ICMP): the datagram is lost, as it would be.
        let _ = socket.send_to(&buf, target);
    }
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        drain(&mut answers, &mut rx);
        std::thread::sleep(Duration::from_millis(1));
    }
    let summary = summarize(total, &answers);
    drop(b);
    for a in anchors {
        a.stop()?;
    }
    drop(games);

    println!("  sent                          {}", summary.sent);
    println!("  received                      {}", summary.received);
    println!("  lost (in flight to A)         {}", summary.lost);
    println!("  duplicates delivered          {}", summary.duplicates);
    println!("  peers each game saw           {}", summary.peers);
    println!("  game state resets             {}", summary.resets);
    if summary.peers != 1 || summary.resets > 0 || summary.duplicates > 0 {
        bail!(
            "the games saw {} peers and {} state resets; the player got {} duplicates",
            summary.peers,
            summary.resets,
            summary.duplicates
        );
    }
    println!(
        "\nProxy A died under the player; each game still saw one peer with its state, and the \
         player lost only what was in flight to A."
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fold_into_peers_resets_and_losses() {
        let mut a = Vec::new();
        wire::stamp(&mut a, 3, 8);
        a.extend_from_slice(b"#4/1");
        assert_eq!(parse(&a), Some((3, 4, 1)));
        assert_eq!(parse(b"short"), None);
        let s = summarize(5, &[(0, 1, 1), (1, 2, 1), (1, 2, 1), (3, 1, 2), (4, 2, 2)]);
        assert_eq!(
            s,
            SwitchSummary {
                sent: 5,
                received: 4,
                duplicates: 1,
                peers: 2,
                resets: 1,
                lost: 1,
            }
        );
    }
}
