//! `spotable-bench`: the demo, the test replica, and the proxy itself for multi-process runs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spotable_bench::{compare, demo, loadgen};
use spotable_fixtures::replica;

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
    /// Load generator: many flows, open or closed loop, counts lost/duplicate/late answers.
    Loadgen(loadgen::LoadArgs),
    /// The full comparison: direct, Spotable, nginx, Quilkin; writes BENCHMARKS.md and plots.
    Compare(compare::CompareArgs),
    /// Runs spotable-proxy itself (same code as the spotable-proxy binary); flags follow.
    #[command(disable_help_flag = true)]
    Proxy {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Demo(args) => demo::run(&args).map(|_| ()),
        Cmd::Replica(args) => replica::run(&args),
        Cmd::Loadgen(args) => loadgen::run(&args).and_then(|r| {
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                loadgen::print(&r);
            }
            Ok(())
        }),
        Cmd::Compare(args) => compare::run(&args),
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
