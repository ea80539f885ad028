//! `spotable-bench`: the demo, the test replica, and the proxy itself for multi-process runs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spotable_bench::{compare, demo, fit, loadgen};
use spotable_fixtures::{replica, tick};

#[derive(Debug, Parser)]
#[command(
    name = "spotable-bench",
    version,
    about = "Spotable demo and benchmark tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Replicas, proxy and a streaming player on loopback; one replica is SIGKILLed mid-stream.
    Demo(demo::DemoArgs),
    /// A deterministic game-server stand-in: answers every datagram with its bytes.
    Replica(replica::ReplicaArgs),
    /// An authoritative multiplayer server stand-in: fixed tick, a snapshot to every player.
    Tick(tick::TickArgs),
    /// Which dedupe mode a server fits, from its own answers: runs COMMAND as replicas behind
    /// the proxy in every mode, a replica SIGKILLed half-way, and recommends one.
    Fit(fit::FitArgs),
    /// Load generator: many flows, open or closed loop, counts lost/duplicate/late answers.
    Loadgen(loadgen::LoadArgs),
    /// The full comparison: direct, Spotable, nginx, Quilkin; writes BENCHMARKS.md and plots.
    Compare(compare::CompareArgs),
    /// What moving a game with CRIU costs on this machine: the pause and the time to the
    /// last page, plain and lazy, for 10 MB, 200 MB and 1 GB resident (root; the section
    /// `compare` writes, printed as Markdown).
    MoveCost {
        /// Moves per size and mode.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The identity anchor (the wrapper's, in-process) in front of one game, trusting loopback;
    /// prints `listening ADDR`, runs until killed.
    Anchor {
        /// Where proxies send.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The game.
        #[arg(long)]
        game: std::net::SocketAddr,
    },
    /// Runs spotable-proxy itself (same code as the spotable-proxy binary); flags follow.
    #[command(disable_help_flag = true)]
    Proxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn run_anchor(listen: std::net::SocketAddr, game: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::Write;
    let running = spotable_wrapper::anchor::spawn(spotable_wrapper::anchor::Config {
        listen,
        game,
        trust: vec!["127.0.0.0/8".parse()?],
        idle_timeout: std::time::Duration::from_secs(600),
        max_players: 100_000,
        carried: Vec::new(),
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", running.local)?;
    out.flush()?;
    drop(out);
    running
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("anchor panicked"))??;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Demo(args) if args.migrate => spotable_bench::migrate_demo::run(&args).map(|_| ()),
        Cmd::Demo(args) if args.switch_proxy => spotable_bench::switch::run(&args).map(|_| ()),
        Cmd::Demo(args) if args.game == demo::DemoGame::Tick => {
            spotable_bench::tick_demo::run(&args).map(|_| ())
        }
        Cmd::Demo(args) => demo::run(&args).map(|_| ()),
        Cmd::Replica(args) => replica::run(&args),
        Cmd::Tick(args) => tick::run(&args),
        Cmd::Fit(args) => fit::run(&args).map(|_| ()),
        Cmd::Loadgen(args) => loadgen::run(&args).and_then(|r| {
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                loadgen::print(&r);
            }
            Ok(())
        }),
        Cmd::Compare(args) => compare::run(&args),
        Cmd::MoveCost { runs } => {
            let m = spotable_bench::move_cost::measure(runs);
            let mut md = String::new();
            spotable_bench::move_cost::markdown(&mut md, &m);
            println!("{md}");
            match m.skipped {
                Some(why) => Err(anyhow::anyhow!("not measured: {why}")),
                None => Ok(()),
            }
        }
        Cmd::Anchor { listen, game } => run_anchor(listen, game),
        Cmd::Proxy { args } => {
            let argv = std::iter::once("spotable-proxy".into()).chain(args);
            return spotable_proxy::cli::main_from(argv);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotable-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
