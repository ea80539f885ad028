//! `spotable-bench fit`: which dedupe mode a studio's own server can use, from evidence.
//!
//! The studio's server command runs as replicas (started a second apart, as pods are: a tick
//! that merely coincides at start is not agreement), behind the real proxy, with a recording
//! relay in front of each replica so that `fit` sees what every replica sent every player.
//! Players are built in, replayed from a capture, or the studio's own client. Each mode runs
//! in turn on fresh replicas, one of them SIGKILLed half-way. The `primary` run goes first: its
//! replicas answer every player, which is the evidence: are the answers byte for byte alike
//! (`copies`), numbered alike (`sequence`, with the field), or neither (`primary`)?

pub mod evidence;
pub(crate) mod players;
pub mod relay;
mod servers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use evidence::{Numbering, Outcome, PlayerRun, Recommendation, Session};
use players::{Played, Source};
use relay::Relay;
use spotable_fixtures::process::{ProxyProcess, scrape, spawn_proxy};

/// How far apart the replicas start.
const STAGGER: Duration = Duration::from_secs(1);
/// The proxy's failover window in these runs (its default), quoted in the advice.
const FAILOVER: &str = "50ms";

/// `spotable-bench fit` flags.
#[derive(Debug, Clone, Args)]
pub struct FitArgs {
    /// Replay the players of this capture (tcpdump -w): each client address is one player,
    /// its datagrams to the server sent with their recorded timing.
    #[arg(long, value_name = "FILE.pcap")]
    pub capture: Option<PathBuf>,
    /// Built-in players (without --capture or --client).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub players: u16,
    /// Datagrams a second from each built-in player.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub rate: u32,
    /// The studio's own headless client or bot instead (run with `sh -c`; `{target}` is
    /// replaced by the proxy's address), for handshakes a replay cannot pass.
    #[arg(long, value_name = "CMD", conflicts_with = "capture")]
    pub client: Option<String>,
    /// How many of --client.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub clients: u16,
    /// Seconds each mode runs; a replica is SIGKILLed half-way.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(4..=600))]
    pub secs: u64,
    /// Replicas of the server.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=8))]
    pub replicas: u16,
    /// Print the findings as JSON on stdout (the text goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The server: `{port}` in its arguments becomes the replica's UDP port, which is also in
    /// SERVER_PORT.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// What `fit` found, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `copies`, `sequence` or `primary`.
    pub recommended: &'static str,
    /// The numbering field, when `sequence` is recommended.
    pub sequence: Option<evidence::Field>,
    /// What the players got in each mode's run.
    pub modes: std::collections::BTreeMap<&'static str, ModeReport>,
    /// The evidence.
    pub evidence: Evidence,
    /// The advice, in words.
    pub advice: String,
}

/// One mode's run.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// What the players got.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Sessions the proxy demoted to one replica (its replicas diverged).
    pub sessions_demoted: u64,
    /// Sessions the proxy trusted with a second replica.
    pub sessions_promoted: u64,
}

/// What the replicas' answers showed.
#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    /// Byte for byte alike (`None`: too few answers to tell).
    pub identical: Option<bool>,
    /// Fields that count up, best first.
    pub numberings: Vec<Numbering>,
    /// Players and the answers the evidence rests on.
    pub players: usize,
    /// Answers compared.
    pub answers: usize,
}

/// Runs `fit`, printing the report; the findings are returned too.
pub fn run(args: &FitArgs) -> anyhow::Result<Report> {
    let source = match (&args.capture, &args.client) {
        (Some(path), _) => players::capture(path)?,
        (None, Some(command)) => Source::Client {
            command: command.clone(),
            n: usize::from(args.clients),
        },
        (None, None) => Source::BuiltIn {
            n: usize::from(args.players),
            rate: args.rate,
        },
    };
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let say = |line: String| {
        if args.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    say(format!(
        "fit: {} as {} replicas {}s apart, {} players, {}s per mode, a replica SIGKILLed half-way",
        args.command.join(" "),
        args.replicas,
        STAGGER.as_secs(),
        source.players(),
        args.secs
    ));
    let mut modes = std::collections::BTreeMap::new();
    let primary = mode_run(args, &source, &exe, &["--dedupe", "primary"], None)?;
    let sessions: Vec<Session> = primary
        .players
        .iter()
        .map(|p| before(&p.session, primary.kill))
        .collect();
    let answers: usize = sessions
        .iter()
        .flat_map(|s| &s.replicas)
        .map(Vec::len)
        .sum();
    if primary.players.iter().all(|p| p.delivered.is_empty()) {
        bail!(
            "no replica answered any player in {}s: does the server listen on {{port}} (or \
             SERVER_PORT), and do the players speak its protocol?",
            args.secs
        );
    }
    let identical = evidence::identical(&sessions);
    let numberings = evidence::numberings(&sessions);
    modes.insert("primary", primary.report());
    say(format!("  primary: {}", line(&modes["primary"])));
    let copies = mode_run(args, &source, &exe, &[], None)?;
    modes.insert("copies", copies.report());
    say(format!("  copies: {}", line(&modes["copies"])));
    if let Some(n) = numberings.first() {
        let mut flags = vec!["--dedupe".to_string(), "sequence".to_string()];
        flags.extend(n.field.flags());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let sequence = mode_run(args, &source, &exe, &flags, Some(n.field))?;
        modes.insert("sequence", sequence.report());
        say(format!("  sequence: {}", line(&modes["sequence"])));
    }
    let recommended = Recommendation::from(identical, &numberings);
    let advice = advice(recommended, identical, &numberings, &modes);
    let report = Report {
        recommended: recommended.name(),
        sequence: match recommended {
            Recommendation::Sequence(f) => Some(f),
            _ => None,
        },
        modes,
        evidence: Evidence {
            identical,
            numberings,
            players: sessions.len(),
            answers,
        },
        advice,
    };
    say(String::new());
    say(report.advice.clone());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(report)
}

fn line(m: &ModeReport) -> String {
    let o = &m.outcome;
    format!(
        "{:.2} answers per datagram, {} from a second world, {} lost, {} duplicates, {:.0} ms \
         without news at the kill ({} players on the killed replica), {} sessions demoted",
        o.answers_per_request,
        o.second_world,
        o.lost,
        o.duplicates,
        o.gap_at_kill_ms,
        o.players_affected,
        m.sessions_demoted
    )
}

/// The recommendation in words, with what each kind of evidence said.
fn advice(
    r: Recommendation,
    identical: Option<bool>,
    numberings: &[Numbering],
    modes: &std::collections::BTreeMap<&'static str, ModeReport>,
) -> String {
    let primary = &modes["primary"].outcome;
    let cost = format!(
        "costs each player on a dead replica about {:.0} ms without news and {} \
         answers lost in all (--failover-after {FAILOVER}, then the next replica's first answer)",
        primary.gap_at_kill_ms, primary.lost
    );
    let alike = match identical {
        Some(true) => "answered byte for byte alike".to_string(),
        Some(false) => "answered unlike each other".to_string(),
        None => "answered too little to compare".to_string(),
    };
    let numbers = match (numberings.iter().find(|n| !n.agree), numberings.first()) {
        (_, None) => "no field of the answers counts up".to_string(),
        (Some(n), _) => format!(
            "a field counts up in each replica on its own clock (offset {}, {} bytes, {}): the \
             same number comes {:.0} ms apart, so each replica simulates a world of its own",
            n.field.offset, n.field.width, n.field.endian, n.apart_ms
        ),
        (None, Some(n)) => format!(
            "a field counts up alike in every replica (offset {}, {} bytes, {})",
            n.field.offset, n.field.width, n.field.endian
        ),
    };
    let head = format!("The replicas {alike}; {numbers}.");
    match r {
        Recommendation::Copies => format!(
            "{head}\nRecommended: copies (the default): the fastest replica carries each answer, \
             and a replica's death costs nothing."
        ),
        Recommendation::Sequence(f) => format!(
            "{head}\nRecommended: sequence, --dedupe sequence {}: the first copy of each number \
             from the fastest replica.",
            f.flags().join(" ")
        ),
        Recommendation::Primary => format!(
            "{head}\nRecommended: primary (--dedupe primary); the default copies mode would run \
             these sessions as primary too, after seeing them diverge. Its failover {cost}. A \
             server that admits players by a token of its own (a challenge, a cookie) loses the \
             players a dead replica admitted: redundancy cannot save them."
        ),
    }
}

/// The answers each replica sent before `kill`.
fn before(s: &Session, kill: Duration) -> Session {
    Session {
        replicas: s
            .replicas
            .iter()
            .map(|r| r.iter().filter(|a| a.at < kill).cloned().collect())
            .collect(),
    }
}

/// One mode's run and what it gave.
struct ModeRun {
    players: Vec<PlayerRun>,
    kill: Duration,
    killed: usize,
    end: Duration,
    demoted: f64,
    promoted: f64,
    numbered: Option<evidence::Field>,
}

impl ModeRun {
    fn report(&self) -> ModeReport {
        ModeReport {
            outcome: evidence::outcome(
                &self.players,
                self.numbered,
                self.killed,
                self.kill,
                self.end,
            ),
            sessions_demoted: self.demoted as u64,
            sessions_promoted: self.promoted as u64,
        }
    }
}

/// Fresh replicas, relays, a proxy with `flags`, the players; a replica killed half-way.
fn mode_run(
    args: &FitArgs,
    source: &Source,
    exe: &std::path::Path,
    flags: &[&str],
    numbered: Option<evidence::Field>,
) -> anyhow::Result<ModeRun> {
    let mut servers = Vec::new();
    for i in 0..args.replicas {
        if i > 0 {
            std::thread::sleep(STAGGER);
        }
        servers.push(servers::start(&args.command)?);
    }
    let origin = Instant::now();
    let relays = servers
        .iter()
        .map(|s| Relay::start(s.addr, origin))
        .collect::<std::io::Result<Vec<_>>>()?;
    let proxy = proxy(exe, &relays, flags)?;
    let run = Duration::from_secs(args.secs);
    let until = Instant::now() + run;
    let players = players::start(source, proxy.addr, origin, until)?;
    std::thread::sleep(run / 2);
    // Kill the replica most players hear: the failover is what is measured.
    let victim = heard_most(&players.so_far(), &relays);
    servers[victim].group.kill();
    let kill = origin.elapsed();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let played = players.finish();
    let end = origin.elapsed();
    let admin = proxy.admin.context("proxy admin address")?;
    // The proxy's workers add their counts on their 100 ms tick.
    std::thread::sleep(Duration::from_millis(250));
    let demoted = scrape(admin, "spotable_sessions_demoted_total", &[])?;
    let promoted = scrape(admin, "spotable_sessions_promoted_total", &[])?;
    let logs: Vec<_> = relays.iter().map(Relay::logs).collect();
    let players = played
        .iter()
        .map(|p| PlayerRun {
            requests: p.sent.len() as u64,
            last_request: p.sent.last().map_or(Duration::ZERO, |s| s.at),
            delivered: p.got.clone(),
            session: session_of(p, &logs),
        })
        .collect();
    Ok(ModeRun {
        players,
        kill,
        killed: victim,
        end,
        demoted,
        promoted,
        numbered,
    })
}

fn proxy(exe: &std::path::Path, relays: &[Relay], flags: &[&str]) -> anyhow::Result<ProxyProcess> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--rate-limit",
        "0",
    ]
    .map(String::from)
    .to_vec();
    for r in relays {
        args.extend(["--replica".into(), r.addr.to_string()]);
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let exe = exe.display().to_string();
    // Under setpriv, the proxy dies with us whatever happens.
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if setpriv.exists() {
        spawn_proxy(
            setpriv,
            &["--pdeathsig", "KILL", "--", &exe, "proxy"],
            &args,
            false,
        )
    } else {
        spawn_proxy(std::path::Path::new(&exe), &["proxy"], &args, false)
    }
}

/// The relay peer (the proxy's upstream socket) that carries `p`'s session: the one whose
/// answers hold most of what `p` got, else whose datagrams hold most of what it sent.
fn session_of(
    p: &Played,
    logs: &[std::collections::HashMap<SocketAddr, relay::PeerLog>],
) -> Session {
    let mut score: std::collections::HashMap<SocketAddr, usize> = std::collections::HashMap::new();
    for log in logs {
        for (peer, l) in log {
            let got = p
                .got
                .iter()
                .filter(|g| l.answers.iter().any(|a| a.bytes == g.bytes))
                .count();
            let sent = p
                .sent
                .iter()
                .take(32)
                .filter(|s| l.sent.iter().any(|x| x.bytes == s.bytes))
                .count();
            *score.entry(*peer).or_default() += 1000 * got + sent;
        }
    }
    let best = score
        .into_iter()
        .filter(|(_, s)| *s > 0)
        .max_by_key(|(_, s)| *s)
        .map(|(peer, _)| peer);
    Session {
        replicas: logs
            .iter()
            .map(|log| {
                best.and_then(|b| log.get(&b))
                    .map(|l| l.answers.clone())
                    .unwrap_or_default()
            })
            .collect(),
    }
}

/// The replica whose answers most players got last.
fn heard_most(played: &[Played], relays: &[Relay]) -> usize {
    let logs: Vec<_> = relays.iter().map(Relay::logs).collect();
    let mut votes = vec![0usize; relays.len()];
    for p in played {
        let Some(last) = p.got.last() else { continue };
        if let Some(i) = logs.iter().position(|log| {
            log.values().any(|l| {
                l.answers
                    .iter()
                    .rev()
                    .take(64)
                    .any(|a| a.bytes == last.bytes)
            })
        }) {
            votes[i] += 1;
        }
    }
    votes
        .iter()
        .enumerate()
        .max_by_key(|(i, v)| (**v, std::cmp::Reverse(*i)))
        .map_or(0, |(i, _)| i)
}
