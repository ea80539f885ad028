//! Moving the running game off a reclaimed node: the game runs so that it can be moved
//! ([`game`]), and on the eviction's SIGTERM the wrapper checkpoints it with CRIU in lazy
//! (post-copy) mode ([`criu`]) and streams it to a landing pad ([`source`]); the pad
//! (`spotable-wrapper land`, [`pad`]) restores it, its memory following on demand, and
//! supervises it from then on. The two speak [`wire`] over the pad's migration port.
//!
//! Only when no pad takes the game, or the move fails before the pad runs it, does the
//! wrapper fall back to stopping the game (SIGTERM, then the grace period).

pub mod criu;
pub mod game;
pub mod kube;
pub mod land;
pub mod pad;
pub mod source;
pub use spotable_migrate_wire as wire;

/// The wrapper's series about moves.
pub mod names {
    /// Moves by `result`: `moved` (the source's game runs on a pad now), `no_pad`,
    /// `failed` (the game went on here), `landed` (a pad took a game), `lost` (a landed game
    /// whose memory stopped arriving).
    pub const MOVES: &str = "spotable_wrapper_moves_total";
    /// The last move's pause: from the freeze to the pad's word that the game runs.
    pub const PAUSE: &str = "spotable_wrapper_move_pause_seconds";
    /// The last move's image bytes (memory follows on demand, not counted).
    pub const BYTES: &str = "spotable_wrapper_move_bytes";
    /// The last move's time from the freeze until the last page of memory had left.
    pub const LAST_PAGE: &str = "spotable_wrapper_move_last_page_seconds";

    /// Registers the series' help, and the counters at zero.
    pub fn describe() {
        metrics::describe_counter!(
            MOVES,
            "Moves of the game to or from a landing pad, by result"
        );
        metrics::describe_gauge!(
            PAUSE,
            "The last move's pause, from the freeze to the game running on the pad, in seconds"
        );
        metrics::describe_gauge!(
            BYTES,
            "The last move's image bytes (memory follows on demand)"
        );
        metrics::describe_gauge!(
            LAST_PAGE,
            "The last move's time from the freeze until its last page of memory had left, in seconds"
        );
        for result in ["moved", "no_pad", "failed", "landed", "lost"] {
            metrics::counter!(MOVES, "result" => result).absolute(0);
        }
    }
}

/// The identity anchor in front of a movable game: its handle, the named port it holds, and
/// the loopback port the game listens on behind it.
pub(crate) struct AnchorInFront {
    pub(crate) handle: crate::anchor::Handle,
    pub(crate) port_name: String,
    pub(crate) game_port: u16,
}

/// The move the run mode makes of its game `pid` (`pipes`: its output's inodes), from its
/// flags: the pads to try, where to serve memory, CRIU.
pub(crate) fn plan(
    common: &crate::cli::Common,
    ports: &std::collections::BTreeMap<String, spotable_fleet::inventory::Port>,
    server: &crate::report::ServerInfo,
    pid: i32,
    pipes: [Option<u64>; 2],
    anchor: Option<AnchorInFront>,
) -> Result<source::Plan, String> {
    let page_server = match common.page_server {
        Some(a) => a,
        None => {
            let ip = std::env::var("POD_IP").map_err(|_| {
                "--migrate needs --page-server, or POD_IP (the downward API) to serve on"
                    .to_string()
            })?;
            let ip: std::net::IpAddr = ip
                .parse()
                .map_err(|_| format!("POD_IP {ip:?} is not an IP address"))?;
            std::net::SocketAddr::new(ip, DEFAULT_PAGE_SERVER_PORT)
        }
    };
    // The address proxies know the game by: this pod's IP and the game's UDP port.
    let udp = ports
        .get("game")
        .filter(|p| p.proto == spotable_fleet::inventory::Proto::Udp)
        .or_else(|| {
            ports
                .values()
                .find(|p| p.proto == spotable_fleet::inventory::Proto::Udp)
        });
    let base = server.message(spotable_fleet::inventory::Status::Ready);
    let pads = if common.pads.is_empty() {
        let game = common
            .game
            .clone()
            .ok_or("--migrate without --pad finds pads in Kubernetes by --game: give one")?;
        let kube = kube::Kube::new(common.kube_api.as_deref()).map_err(|e| e.to_string())?;
        source::Pads::Kubernetes {
            kube,
            game,
            node: base.node.clone(),
            holder: base
                .pod
                .as_ref()
                .map_or_else(|| format!("pid-{}", std::process::id()), |p| p.name.clone()),
            runtime: tokio::runtime::Handle::current(),
        }
    } else {
        source::Pads::Static(common.pads.clone())
    };
    Ok(source::Plan {
        criu: criu::Criu {
            binary: common.criu.clone(),
        },
        pid,
        pads,
        hello: wire::Hello {
            version: wire::VERSION,
            page_server,
            ports: ports.clone(),
            address: udp.map(|p| std::net::SocketAddr::new(page_server.ip(), p.port).to_string()),
            pod: base.pod,
            node: base.node,
            anchor: anchor.as_ref().map(|a| wire::Anchored {
                port_name: a.port_name.clone(),
                game_port: a.game_port,
                players: Vec::new(),
            }),
            pipes,
        },
        work_dir: common.migrate_dir.clone(),
        within: common.move_within,
        abort: std::sync::Arc::default(),
        anchor: anchor.map(|a| a.handle),
    })
}

/// Where the source serves memory when `--page-server` is not given: `$POD_IP` and this port.
pub const DEFAULT_PAGE_SERVER_PORT: u16 = 7101;

/// Runs the move, counting and logging how it went; `Err` leaves the game running here.
pub(crate) fn carry_out(plan: &source::Plan) -> Result<source::Moved, String> {
    match plan.run() {
        Ok(m) => {
            tracing::info!(
                pad = %m.pad,
                pause_ms = m.pause.as_millis() as u64,
                bytes = m.bytes,
                last_page_ms = m.last_page.as_millis() as u64,
                "the game moved"
            );
            metrics::counter!(names::MOVES, "result" => "moved").increment(1);
            metrics::gauge!(names::PAUSE).set(m.pause.as_secs_f64());
            metrics::gauge!(names::BYTES).set(m.bytes as f64);
            metrics::gauge!(names::LAST_PAGE).set(m.last_page.as_secs_f64());
            if let source::Pads::Kubernetes {
                kube,
                holder,
                runtime,
                ..
            } = &plan.pads
            {
                let message = format!(
                    "the game moved to {} (pause {} ms)",
                    m.pad,
                    m.pause.as_millis()
                );
                runtime.block_on(kube.event(holder, "GameMoved", &message, false));
            }
            Ok(m)
        }
        Err(e) => {
            let result = match e {
                source::MoveError::NoPad(_) => "no_pad",
                _ => "failed",
            };
            metrics::counter!(names::MOVES, "result" => result).increment(1);
            Err(e.to_string())
        }
    }
}
