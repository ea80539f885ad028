//! A small deterministic game server, run as a real process by the demo and the tests.
//!
//! It answers every datagram with the same bytes (so all replicas answer identically, as a
//! deterministic game server would), optionally several times (legitimate repeats, like a
//! reliable-UDP resend or a keepalive) and optionally tagged with its own name (replicas whose
//! answers differ, for the `sequence` and `primary` modes).

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};

use clap::Args;

/// `spotable-bench replica` flags.
#[derive(Debug, Clone, Args)]
pub struct ReplicaArgs {
    /// Address to listen on; port 0 picks one (printed on stdout as `listening ADDR`).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Answers sent per datagram received.
    #[arg(long, default_value_t = 1)]
    pub copies: u32,
    /// Append this tag to every answer, making this replica's answers unlike the others'.
    #[arg(long)]
    pub tag: Option<String>,
}

/// Serves until killed.
pub fn run(args: &ReplicaArgs) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(args.listen)?;
    let addr = socket.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
    }
    let mut buf = vec![0u8; 65_536];
    let mut answer = Vec::with_capacity(65_536);
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        answer.clear();
        answer.extend_from_slice(&buf[..n]);
        if let Some(tag) = &args.tag {
            answer.extend_from_slice(tag.as_bytes());
        }
        for _ in 0..args.copies {
            // A full socket buffer or a vanished client is the client's problem, as in UDP.
            let _ = socket.send_to(&answer, from);
        }
    }
}
