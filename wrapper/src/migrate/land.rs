//! `spotable-wrapper land`: the landing pad's life. It waits for a game, restores it, then
//! supervises it exactly as the run mode would (PID-1 duty, inventory); if the game's memory
//! stops arriving before it is all here (the source died mid-transfer), the restored copy is
//! killed cleanly and the pad waits again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use spotable_fleet::inventory::{MovedFrom, Status};

use super::criu::Criu;
use super::pad::{Pad, kill_group};
use super::{game, names};
use crate::cli::Common;
use crate::report::{Outbox, ServerInfo};
use crate::supervise::{self, Supervisor};

type BoxError = Box<dyn std::error::Error>;

/// `spotable-wrapper land` flags.
#[derive(Debug, Clone, Args)]
pub struct LandArgs {
    /// The migration port: where wrappers moving a game connect (TCP, on the pod network).
    #[arg(long = "listen", default_value = "0.0.0.0:7100", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// A network whose wrappers may send a game (the game pods' network; repeatable).
    /// Nothing is trusted until this is given.
    #[arg(long = "trust", value_name = "CIDR", required = true)]
    pub trust: Vec<ipnet::IpNet>,
    /// The game's Service: a game that lands here is published as its endpoint, the address
    /// it replaces named (an EndpointSlice the proxies follow). Needs the Kubernetes API
    /// (--kube-api, or the pod's service account), POD_NAME, POD_NAMESPACE and POD_IP.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
}

/// What the pad publishes in Kubernetes.
struct Cluster {
    kube: super::kube::Kube,
    service: String,
    pod: String,
    ip: std::net::IpAddr,
    runtime: tokio::runtime::Handle,
}

impl Cluster {
    fn from_env(common: &Common, service: &str) -> Result<Self, BoxError> {
        let env = |k: &str| {
            std::env::var(k).map_err(|_| format!("--service needs {k} (the downward API)"))
        };
        let kube = super::kube::Kube::new(common.kube_api.as_deref())?;
        Ok(Self {
            kube,
            service: service.to_string(),
            pod: env("POD_NAME")?,
            ip: env("POD_IP")?
                .parse()
                .map_err(|_| "POD_IP is not an IP address".to_string())?,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Publishes the landed game as the Service's endpoint in place of its old address.
    fn announce(&self, hello: &super::wire::Hello) -> Result<(), String> {
        let from = hello
            .address
            .clone()
            .ok_or("the source did not say its address: the proxies could not follow")?;
        let ports: Vec<(String, u16)> = hello
            .ports
            .iter()
            .filter(|(_, p)| p.proto == spotable_fleet::inventory::Proto::Udp)
            .map(|(n, p)| (n.clone(), p.port))
            .collect();
        self.runtime
            .block_on(
                self.kube
                    .publish_move(&self.service, &self.pod, &from, self.ip, &ports),
            )
            .map_err(|e| e.to_string())?;
        let message = format!("took over the game from {from}");
        self.runtime
            .block_on(self.kube.event(&self.pod, "GameLanded", &message, false));
        Ok(())
    }

    /// The pad is free again: no endpoint of the game, its claim released.
    async fn free(&self) {
        if let Err(e) = self.kube.withdraw_move(&self.service, &self.pod).await {
            tracing::warn!(error = %e, "cannot withdraw the moved endpoint");
        }
        let _ = self.kube.release(&self.pod).await;
    }
}

/// How a landing went.
enum Landing {
    /// The game's memory is all here; the game runs on.
    AllHere,
    /// The game ended on its own, its memory all here or no word either way.
    Ended(supervise::Exit),
    /// The source went away first: the game cannot go on (and may have ended already).
    Lost(String, Option<supervise::Exit>),
}

/// Stops renewing the claim when dropped.
struct Renewing(tokio::task::JoinHandle<()>);

impl Drop for Renewing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the pad until a game that landed here ends; its exit code is ours.
pub async fn run(common: Common, args: LandArgs) -> Result<i32, BoxError> {
    let _admin = crate::cli::admin(&common).await?;
    if let Err(e) = supervise::become_subreaper() {
        return Err(format!("a pad must reap the game it restores: {e}").into());
    }
    names::describe();
    let pad = Arc::new(
        Pad::bind(
            args.listen,
            args.trust.clone(),
            Criu {
                binary: common.criu.clone(),
            },
            common.migrate_dir.clone(),
            (!common.anchor_trust.is_empty()).then(|| super::pad::AnchorPolicy {
                trust: common.anchor_trust.clone(),
                idle_timeout: common.anchor_idle_timeout,
                max_players: common.anchor_max_players,
            }),
        )
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?,
    );
    let local = pad.local_addr()?;
    tracing::info!(listen = %local, trust = ?args.trust, "landing pad waiting for a game");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {local}")?;
        out.flush()?;
    }
    let identity = crate::cli::identity(&common).await?;
    let outbox = Outbox::start(common.queue_url.clone()).await;
    let cluster = match &args.service {
        Some(service) => Some(Arc::new(Cluster::from_env(&common, service)?)),
        None => None,
    };
    loop {
        if let Some(c) = &cluster {
            c.free().await;
        }
        let waiting = pad.clone();
        let publishing = cluster.clone();
        let landed = tokio::task::spawn_blocking(move || {
            waiting.land(
                |hello, _| match &publishing {
                    Some(c) => c.announce(hello),
                    None => Ok(()),
                },
                || {
                    if let Some(c) = &publishing {
                        c.runtime.block_on(c.free());
                    }
                },
            )
        })
        .await
        .map_err(|e| format!("the pad panicked: {e}"))??;
        let pid = landed.restored.pid;
        tracing::info!(pid, from = %landed.from, "a game landed");
        metrics::counter!(names::MOVES, "result" => "landed").increment(1);
        let [out, err] = landed.output;
        game::pass_on(out, false);
        game::pass_on(err, true);
        let server = ServerInfo::new(&common, &landed.hello.ports, identity.clone());
        outbox.send(server.message(Status::Ready));
        let mut moved = server.message(Status::Moved);
        moved.moved_from = Some(MovedFrom {
            pod: landed.hello.pod.clone(),
            node: landed.hello.node.clone(),
            address: landed.hello.address.clone(),
        });
        outbox.send(moved);
        // The claim holds while the game runs here (a claim nobody renews lapses).
        let _renewing = cluster.as_ref().map(|c| {
            let c = c.clone();
            Renewing(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(super::kube::CLAIM_FOR / 3).await;
                    if let Err(e) = c.kube.renew(&c.pod).await {
                        tracing::warn!(error = %e, "cannot renew the claim on this pad");
                    }
                }
            }))
        });
        // While a game runs here, other sources are refused at once.
        let busy = Arc::new(AtomicBool::new(true));
        pad.refuse_while(busy.clone());
        let mut restored = landed.restored;
        let lost = Arc::new(AtomicBool::new(false));
        let watching = lost.clone();
        let control = landed.control;
        // The anchor lives as long as the game here.
        let anchor = landed.anchor;
        std::thread::spawn(move || {
            if let Err(why) = super::pad::watch_source(control, &watching) {
                tracing::warn!(
                    why,
                    "the source is gone before the game's memory is all here"
                );
            }
        });
        let stop_pages = lost.clone();
        let mut pages = tokio::task::spawn_blocking(move || restored.pages(&lost));
        let supervisor = Supervisor::new()?;
        let stopping = outbox.clone();
        let on_stop = |signal: &'static str| {
            tracing::info!(signal, "stopping the game");
            let mut m = server.message(Status::Terminating);
            m.reason = Some(signal.into());
            stopping.send(m);
        };
        let game = nix::unistd::Pid::from_raw(pid);
        let supervised = supervisor.run(game, common.grace, on_stop);
        tokio::pin!(supervised);
        let outcome = tokio::select! {
            exit = &mut supervised => {
                // A game that ends before its memory is all here may have died of the
                // missing pages: how the move ended decides what its end was.
                let settle = super::wire::SOURCE_SILENCE + Duration::from_secs(1);
                match tokio::time::timeout(settle, &mut pages).await {
                    Ok(Ok(Err(e))) => Landing::Lost(e.to_string(), Some(exit)),
                    Ok(Err(e)) => return Err(format!("the page watch panicked: {e}").into()),
                    Ok(Ok(Ok(()))) => Landing::Ended(exit),
                    Err(_) => {
                        stop_pages.store(true, Ordering::Release);
                        Landing::Ended(exit)
                    }
                }
            }
            result = &mut pages => match result {
                Ok(Ok(())) => {
                    tracing::info!(pid, "the game's memory is all here");
                    Landing::AllHere
                }
                Ok(Err(e)) => Landing::Lost(e.to_string(), None),
                Err(e) => return Err(format!("the page watch panicked: {e}").into()),
            },
        };
        let exit = match outcome {
            Landing::Ended(exit) => exit,
            Landing::AllHere => supervised.await,
            Landing::Lost(e, exit) => {
                tracing::error!(error = %e, "the game's memory stopped arriving: ending it");
                let exit = match exit {
                    Some(exit) => exit,
                    None => {
                        kill_group(pid);
                        supervised.await
                    }
                };
                metrics::counter!(names::MOVES, "result" => "lost").increment(1);
                let mut m = server.message(Status::Terminated);
                m.exit_code = Some(exit.code());
                m.reason = Some(format!("move failed: {e}"));
                outbox.send(m);
                let _ = std::fs::remove_dir_all(&landed.dir);
                if let Some(a) = anchor {
                    let _ = a.stop();
                }
                if let Some(c) = &cluster {
                    c.kube
                        .event(&c.pod, "GameLost", &format!("move failed: {e}"), true)
                        .await;
                }
                busy.store(false, Ordering::Release);
                tracing::info!("landing pad waiting for a game again");
                continue;
            }
        };
        let _ = std::fs::remove_dir_all(&landed.dir);
        if let Some(a) = anchor {
            let _ = a.stop();
        }
        tracing::info!(exit = ?exit, "game exited");
        let mut m = server.message(Status::Terminated);
        m.exit_code = Some(exit.code());
        m.reason = Some(match exit {
            supervise::Exit::Code(_) => "exit".into(),
            supervise::Exit::Signal(s) => format!("signal {s}"),
        });
        outbox.send(m);
        if let Some(c) = &cluster {
            c.free().await;
        }
        outbox.close(Duration::from_secs(5).min(common.grace)).await;
        return Ok(exit.code());
    }
}
