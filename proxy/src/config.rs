//! Configuration: command-line flags over an optional TOML file.
//!
//! Every setting has one name, spelled `--kebab-case` as a flag and `snake_case` in the file.
//! A flag given on the command line wins over the file. Errors are one line naming the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::dedupe::{Agreement, Endian, MAX_SLOTS, Mode, SequenceSpec, Width};
use crate::ratelimit::Rate;
pub use crate::replica_stats::LagHistogram;
use crate::replicas::{GameSpec, Replica};
use crate::server::ProxyConfig;
use crate::session::Settings;
use crate::token::{TokenAt, TokenSpec};
use crate::udp::MAX_UDP_PAYLOAD;
pub use spotable_edge::LogFormat;

/// Dedupe algorithm names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeKind {
    /// Content-addressed; never drops a legitimate repeat (default).
    Copies,
    /// First copy of each sequence number found in the payload.
    Sequence,
    /// Only the primary replica's answers.
    Primary,
}

/// Whether `copies` and `sequence` sessions wait for agreement before trusting a second
/// replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgreementName {
    /// One replica's answers until another is seen to agree; back to one on a desync
    /// (default).
    On,
    /// Trust the mode's assumption from the first answer (replicas known to be alike).
    Off,
}

/// What goes before every datagram sent to replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
pub enum ReplicaHeaderName {
    /// Nothing: replicas see the proxy's address.
    #[value(name = "none")]
    #[serde(rename = "none")]
    None,
    /// A PROXY protocol v2 header (binary, DGRAM) naming the player and the listener.
    #[value(name = "proxy-v2")]
    #[serde(rename = "proxy-v2")]
    ProxyV2,
}

impl ReplicaHeaderName {
    fn header(self) -> Option<crate::proxy_header::ReplicaHeader> {
        match self {
            ReplicaHeaderName::None => None,
            ReplicaHeaderName::ProxyV2 => Some(crate::proxy_header::ReplicaHeader::ProxyV2),
        }
    }
}

/// Byte order names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndianName {
    /// Big-endian (network order).
    Be,
    /// Little-endian.
    Le,
}

/// Defaults, each declared once: resolution reads them here, and a test checks that every
/// `[default: …]` in `--help` says the same.
pub mod defaults {
    use std::time::Duration;

    /// `--dedupe-window`.
    pub const DEDUPE_WINDOW: Duration = Duration::from_secs(2);
    /// `--dedupe-max-entries`.
    pub const DEDUPE_MAX_ENTRIES: usize = 4096;
    /// `--sequence-width`.
    pub const SEQUENCE_WIDTH: u64 = 4;
    /// `--sequence-resync-after`.
    pub const SEQUENCE_RESYNC_AFTER: u32 = 2;
    /// `--failover-after`.
    pub const FAILOVER_AFTER: Duration = Duration::from_millis(50);
    /// `--session-timeout`.
    pub const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
    /// `--max-sessions`.
    pub const MAX_SESSIONS: usize = 10_000;
    /// `--rate-limit`.
    pub const RATE_LIMIT: u32 = 1000;
    /// `--game-max-sessions`: a tenth of the default table, so that no one game's players
    /// (or one player on many ports) can fill it.
    pub const GAME_MAX_SESSIONS: usize = 1000;
    /// `--game-max-pps`: the default quota's players at 100 datagrams/s each.
    pub const GAME_MAX_PPS: u32 = 100_000;
    /// `--max-datagram`.
    pub const MAX_DATAGRAM: usize = crate::udp::MAX_UDP_PAYLOAD;
    /// `--socket-buffer`.
    pub const SOCKET_BUFFER: usize = 1 << 20;
    /// `--drain-delay`.
    pub const DRAIN_DELAY: Duration = Duration::ZERO;
    /// `--log-level`.
    pub const LOG_LEVEL: &str = "info";
}

/// Token position names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenAtName {
    /// The last bytes of each datagram (default).
    Suffix,
    /// The first bytes.
    Prefix,
}

/// One `[[game]]` table of the config file: a game behind a token-routing proxy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GameConfig {
    /// Its name, unique among the games.
    pub name: String,
    /// Tokens routing to it: UTF-8 text, or `base64:…` for raw bytes; each `token_bytes` long.
    pub tokens: Vec<String>,
    /// Its replicas.
    pub replicas: Vec<SocketAddr>,
    /// Its own dedupe mode; else the global one.
    pub dedupe: Option<DedupeKind>,
    /// Its own fan-out; else the global one.
    pub fanout: Option<usize>,
    /// Its own replica header; else the global one.
    pub replica_header: Option<ReplicaHeaderName>,
    /// Its own agreement setting; else the global one.
    pub agreement: Option<AgreementName>,
    /// `sequence`: as the global setting (inherited when the modes match).
    pub sequence_offset: Option<usize>,
    /// `sequence`: as the global setting (inherited when the modes match).
    pub sequence_width: Option<u64>,
    /// `sequence`: as the global setting (inherited when the modes match).
    pub sequence_endian: Option<EndianName>,
    /// `sequence`: as the global setting (inherited when the modes match).
    pub sequence_resync_after: Option<u32>,
    /// `primary`: as the global setting (inherited when the modes match).
    #[serde(default, with = "humantime_serde")]
    pub failover_after: Option<Duration>,
    /// As the global setting (inherited).
    #[serde(default, with = "humantime_serde")]
    pub dedupe_window: Option<Duration>,
    /// As the global setting (inherited).
    pub dedupe_max_entries: Option<usize>,
    /// Most sessions of this game at once, over every worker; 0 for no limit of its own.
    /// Else `game_max_sessions`.
    pub max_sessions: Option<usize>,
    /// Its players' datagrams per second together; 0 for no budget. Else `game_max_pps`.
    pub max_pps: Option<u32>,
}

/// Every setting of `spotable-proxy`, declared once: clap reads it from flags
/// (`--kebab-case`), serde from the `--config` TOML file (`snake_case`), and flags given on the
/// command line replace the file's values ([`Args::parse_layers`]). Fields are unset unless
/// given; defaults are applied in [`Config`] from [`defaults`].
#[derive(Debug, Default, Parser, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    name = "spotable-proxy",
    version,
    about = "UDP front end for game servers on spot capacity: fans every client datagram out to \
             N replicas and delivers their answers deduplicated.",
    after_help = "Durations take units: 50ms, 2s, 1m. Every flag may also be set in the --config \
                  file under its snake_case name (max_sessions = 5000), lists as arrays \
                  (listen = [...], replicas = [...] for --replica); flags win."
)]
pub struct Args {
    /// TOML file with any of the settings below.
    #[arg(long, value_name = "FILE", env = "SPOTABLE_PROXY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// UDP address players send to (repeatable).
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Static replica address (repeatable).
    #[arg(long = "replica", value_name = "ADDR")]
    #[serde(default)]
    pub replicas: Vec<SocketAddr>,
    /// Discover replicas from this Kubernetes Service's EndpointSlices instead.
    #[arg(long, value_name = "SERVICE")]
    pub kubernetes_service: Option<String>,
    /// Namespace of the Service [default: the pod's own, or the kubeconfig context's].
    #[arg(long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// Service port to use, by name [default: the only (UDP) port].
    #[arg(long, value_name = "NAME")]
    pub port_name: Option<String>,
    /// Route by a token of this many bytes (1 to 64) that every client datagram carries; the
    /// games and their tokens come from `[[game]]` tables in the --config file. The token is
    /// cut off before fan-out.
    #[arg(long, value_name = "N")]
    pub token_bytes: Option<usize>,
    /// Where the token sits in each datagram [default: suffix].
    #[arg(long, value_enum)]
    pub token_at: Option<TokenAtName>,
    /// Games from the Services in --namespace labelled `spotable.io/game` (value: the game's
    /// name), tokens from their `spotable.io/tokens` annotation, replicas from their
    /// EndpointSlices; needs --token-bytes.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub kubernetes_games: Option<bool>,
    /// Games from the Agones GameServers in --namespace labelled `spotable.io/game`, address
    /// and port from their status, tokens from their `spotable.io/tokens` annotation; needs
    /// --token-bytes.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub agones_games: Option<bool>,
    /// Games behind a token-routing proxy: `[[game]]` tables, config file only.
    #[arg(skip)]
    #[serde(default, rename = "game")]
    pub games: Vec<GameConfig>,
    /// Replicas per session, chosen per client by rendezvous hashing so every proxy picks the
    /// same ones [default: all, at most 16].
    #[arg(long, value_name = "N")]
    pub fanout: Option<usize>,
    /// How answers are deduplicated [default: copies].
    #[arg(long, value_enum)]
    pub dedupe: Option<DedupeKind>,
    /// `sequence` mode: byte offset of the sequence number.
    #[arg(long, value_name = "N")]
    pub sequence_offset: Option<usize>,
    /// `sequence` mode: width of the sequence number in bytes [default: 4].
    #[arg(long, value_name = "2|4|8", value_parser = parse_width)]
    pub sequence_width: Option<u64>,
    /// `sequence` mode: byte order of the sequence number [default: be].
    #[arg(long, value_enum)]
    pub sequence_endian: Option<EndianName>,
    /// `sequence` mode: consecutive answers agreeing on a restarted numbering (a restarted
    /// replica, a new player on a reused address) before it is accepted; 0 never [default: 2].
    #[arg(long, value_name = "K")]
    pub sequence_resync_after: Option<u32>,
    /// `copies` and `sequence` modes: deliver one replica's answers until another has matched
    /// them for a run, and fall back to one at once when replicas stop agreeing (replicas in
    /// two worlds never reach a player together); `off` trusts the mode from the first
    /// answer [default: on].
    #[arg(long, value_enum, value_name = "on|off")]
    pub agreement: Option<AgreementName>,
    /// Silence of the one replica a session delivers (while another answers) before it fails
    /// over: `primary` mode, and sessions not yet in agreement [default: 50ms].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub failover_after: Option<Duration>,
    /// `copies` mode: how long a payload is remembered after its last copy [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub dedupe_window: Option<Duration>,
    /// `copies` mode: most payloads remembered per session [default: 4096].
    #[arg(long, value_name = "N")]
    pub dedupe_max_entries: Option<usize>,
    /// Close a session after this long without a client datagram [default: 1m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub session_timeout: Option<Duration>,
    /// Most sessions (clients) at once; further clients are dropped [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<usize>,
    /// Token routing: most sessions of one game at once, for games that set no `max_sessions`
    /// (a `[[game]]` table's, or the `spotable.io/max-sessions` annotation); 0 for no
    /// per-game limit [default: 1000].
    #[arg(long, value_name = "N")]
    pub game_max_sessions: Option<usize>,
    /// Token routing: datagrams per second that all players of one game may send together,
    /// for games that set no `max_pps` (or `spotable.io/max-pps`); over it they are dropped
    /// before any session is looked up. 0 for no budget [default: 100000].
    #[arg(long, value_name = "N")]
    pub game_max_pps: Option<u32>,
    /// Per-client datagrams per second; 0 disables the limit [default: 1000].
    #[arg(long, value_name = "PPS")]
    pub rate_limit: Option<u32>,
    /// Per-client burst above the rate [default: the rate].
    #[arg(long, value_name = "N")]
    pub rate_burst: Option<u32>,
    /// Largest client datagram accepted, in bytes [default: 65507].
    #[arg(long, value_name = "BYTES")]
    pub max_datagram: Option<usize>,
    /// Replicas that appear later also join running sessions (stateless or state-syncing
    /// games).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub late_join: Option<bool>,
    /// Put a header before every datagram sent to replicas: `proxy-v2` names the player
    /// (PROXY protocol v2), so a game (or the wrapper's anchor) knows it whichever proxy
    /// carries it [default: none].
    #[arg(long, value_enum, value_name = "none|proxy-v2")]
    pub replica_header: Option<ReplicaHeaderName>,
    /// Data-plane threads [default: number of CPUs].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Front socket buffer size in bytes; smaller drops early under overload instead of
    /// queueing late (capped by net.core.rmem_max) [default: 1048576].
    #[arg(long, value_name = "BYTES")]
    pub socket_buffer: Option<usize>,
    /// Time each datagram in the proxy from the kernel's receive timestamp (SO_TIMESTAMPNS),
    /// so time queued in a socket counts, at a cost in throughput (4–5 % measured
    /// here); without it, from the start of the worker's turn that read it.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub kernel_timestamps: Option<bool>,
    /// After SIGTERM/SIGINT, keep forwarding this long with /readyz failing, so load balancers
    /// stop sending before the proxy stops answering; a second signal ends it early
    /// [default: 0s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Option<Duration>,
    /// HTTP address for /metrics, /healthz and /readyz [default: off].
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// `spotable_replica_lag_seconds` per replica (18 series each), one per game, or none:
    /// with hundreds of games, per replica puts tens of thousands of series in every scrape
    /// [default: replica].
    #[arg(long, value_enum)]
    pub lag_histogram: Option<LagHistogram>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing `EnvFilter` syntax; RUST_LOG wins when set) [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// `--sequence-width`: 2, 4 or 8 (bytes).
fn parse_width(s: &str) -> Result<u64, String> {
    match s {
        "2" | "4" | "8" => s.parse().map_err(|_| "must be 2, 4 or 8".to_string()),
        _ => Err("must be 2, 4 or 8".to_string()),
    }
}

/// Why the command line could not be read: clap's own error, or the `--config` file's.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad flags, `--help` or `--version` (clap prints and exits these).
    #[error(transparent)]
    Flags(clap::Error),
    /// The file.
    #[error(transparent)]
    Config(ConfigError),
}

impl Args {
    /// Reads the command line, then the `--config` file it names (if any), and lays the flags
    /// given on the command line over the file's values.
    pub fn parse_layers(
        argv: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Result<Self, LoadError> {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command()
            .try_get_matches_from(argv)
            .map_err(LoadError::Flags)?;
        let flags = Self::from_arg_matches(&matches).map_err(LoadError::Flags)?;
        let Some(path) = flags.config.clone() else {
            return Ok(flags);
        };
        let mut layered = read_file(&path).map_err(LoadError::Config)?;
        layered.config = Some(path);
        // Only the arguments present in `matches` (given on the command line, or through
        // their environment variable) replace the file's values.
        layered
            .update_from_arg_matches(&matches)
            .map_err(LoadError::Flags)?;
        Ok(layered)
    }
}

/// A configuration problem, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad or unknown field.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong, with the field name.
        message: String,
    },
    /// One `[[game]]` table is wrong.
    #[error("game {name}: {source}")]
    Game {
        /// The game's name (or its position when it has none).
        name: String,
        /// What is wrong.
        source: Box<ConfigError>,
    },
    /// A setting is missing or out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// Setting name, as in the file.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Where replicas come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaSource {
    /// A fixed list.
    Static(Vec<SocketAddr>),
    /// A Kubernetes Service's EndpointSlices.
    Kubernetes(crate::discovery::kubernetes::Source),
    /// Games routed by token, from labelled Services and their EndpointSlices.
    KubernetesGames(GameWatch),
    /// Games routed by token, from labelled Agones GameServers.
    AgonesGames(GameWatch),
    /// Games routed by token, from `[[game]]` tables.
    Games {
        /// The token every datagram carries.
        spec: TokenSpec,
        /// The games.
        games: Vec<GameSpec>,
    },
}

/// Where to watch for games, and what they inherit.
#[derive(Debug, Clone)]
pub struct GameWatch {
    /// Namespace of the labelled objects; `None` for the client's default.
    pub namespace: Option<String>,
    /// Port to use, by name; `None` for the only (UDP) port.
    pub port_name: Option<String>,
    /// What every game inherits.
    pub template: GameTemplate,
}

impl PartialEq for GameWatch {
    fn eq(&self, other: &Self) -> bool {
        self.namespace == other.namespace
            && self.port_name == other.port_name
            && self.template.spec == other.template.spec
    }
}

impl Eq for GameWatch {}

/// Where games come from, when the proxy routes by token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GameOrigin {
    Tables,
    Services,
    GameServers,
}

/// Everything the binary needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The data plane.
    pub proxy: ProxyConfig,
    /// Where replicas come from.
    pub replicas: ReplicaSource,
    /// Time to keep forwarding after a stop signal.
    pub drain_delay: Duration,
    /// Admin HTTP address.
    pub admin: Option<SocketAddr>,
    /// How finely the lag histogram is broken down.
    pub lag_histogram: LagHistogram,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

impl Config {
    /// Validates the layered settings and applies the defaults.
    pub fn resolve(a: Args) -> Result<Self, ConfigError> {
        let listen = a.listen;
        if listen.is_empty() {
            return Err(invalid(
                "listen",
                "at least one address is required (--listen or listen = [...] in the config file)",
            ));
        }
        let replicas = a.replicas;
        let service = a.kubernetes_service;
        let namespace = a.namespace;
        let port_name = a.port_name;
        let token = match (a.token_bytes, a.token_at) {
            (None, None) => None,
            (None, Some(_)) => return Err(invalid("token_at", "needs token_bytes")),
            (Some(n), at) => {
                let at = match at.unwrap_or(TokenAtName::Suffix) {
                    TokenAtName::Suffix => TokenAt::Suffix,
                    TokenAtName::Prefix => TokenAt::Prefix,
                };
                Some(TokenSpec::new(n, at).map_err(|e| invalid("token_bytes", e.to_string()))?)
            }
        };
        let origins: Vec<GameOrigin> = [
            (!a.games.is_empty(), GameOrigin::Tables),
            (a.kubernetes_games == Some(true), GameOrigin::Services),
            (a.agones_games == Some(true), GameOrigin::GameServers),
        ]
        .into_iter()
        .filter_map(|(on, o)| on.then_some(o))
        .collect();
        let origin = match (token.is_some(), origins.as_slice()) {
            (true, []) => {
                return Err(invalid(
                    "token_bytes",
                    "routing by token needs games: [[game]] tables in the config file, \
                     --kubernetes-games or --agones-games",
                ));
            }
            (false, [GameOrigin::Tables, ..]) => {
                return Err(invalid("game", "[[game]] tables need token_bytes"));
            }
            (false, [GameOrigin::Services, ..]) => {
                return Err(invalid("kubernetes_games", "needs token_bytes"));
            }
            (false, [GameOrigin::GameServers, ..]) => {
                return Err(invalid("agones_games", "needs token_bytes"));
            }
            (true, [_, _, ..]) => {
                return Err(invalid(
                    "game",
                    "[[game]] tables, kubernetes_games and agones_games exclude each other",
                ));
            }
            (true, [one]) => Some(*one),
            (false, []) => None,
        };
        if origin.is_some() && (!replicas.is_empty() || service.is_some()) {
            return Err(match origin {
                Some(GameOrigin::Services) => invalid(
                    "kubernetes_games",
                    "excludes replicas and kubernetes_service",
                ),
                Some(GameOrigin::GameServers) => {
                    invalid("agones_games", "excludes replicas and kubernetes_service")
                }
                _ => invalid(
                    "game",
                    "[[game]] tables exclude replicas and kubernetes_service",
                ),
            });
        }
        let watching = matches!(origin, Some(GameOrigin::Services | GameOrigin::GameServers));
        for (field, value) in [
            ("namespace", namespace.as_ref()),
            ("port_name", port_name.as_ref()),
        ] {
            if value.is_some_and(|v| !is_dns_label(v)) {
                return Err(invalid(
                    field,
                    "must be a DNS label (lowercase letters, digits, '-')",
                ));
            }
        }
        let replicas = match (replicas.is_empty(), service) {
            // Filled in below, once the global settings the games inherit are known.
            (true, None) if token.is_some() => {
                if !watching && (namespace.is_some() || port_name.is_some()) {
                    return Err(invalid(
                        "namespace",
                        "namespace and port_name need kubernetes_service, kubernetes_games or \
                         agones_games",
                    ));
                }
                ReplicaSource::Static(Vec::new())
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "replicas",
                    "static replicas and kubernetes_service exclude each other",
                ));
            }
            (true, None) => {
                return Err(invalid(
                    "replicas",
                    "at least one replica is required (--replica or replicas = [...] in the \
                     config file), or --kubernetes-service for discovery",
                ));
            }
            (false, None) => {
                if namespace.is_some() || port_name.is_some() {
                    return Err(invalid(
                        "namespace",
                        "namespace and port_name need kubernetes_service, kubernetes_games or \
                         agones_games",
                    ));
                }
                if let Some(r) = replicas
                    .iter()
                    .find(|r| listen.iter().any(|l| is_self(**r, *l)))
                {
                    return Err(invalid(
                        "replicas",
                        format!("{r} is the proxy's own listen address: it would send to itself"),
                    ));
                }
                ReplicaSource::Static(replicas)
            }
            (true, Some(service)) => {
                if !is_dns_label(&service) {
                    return Err(invalid(
                        "kubernetes_service",
                        "must be a DNS label (lowercase letters, digits, '-')",
                    ));
                }
                ReplicaSource::Kubernetes(crate::discovery::kubernetes::Source {
                    namespace: namespace.clone(),
                    service,
                    port_name: port_name.clone(),
                })
            }
        };
        let fanout = a.fanout.unwrap_or(MAX_SLOTS);
        if !(1..=MAX_SLOTS).contains(&fanout) {
            return Err(invalid(
                "fanout",
                format!("must be between 1 and {MAX_SLOTS}"),
            ));
        }

        let global = Dedupe {
            kind: a.dedupe,
            offset: a.sequence_offset,
            width: a.sequence_width,
            endian: a.sequence_endian,
            resync_after: a.sequence_resync_after,
            failover_after: a.failover_after,
            window: a.dedupe_window,
            max_entries: a.dedupe_max_entries,
            agreement: a.agreement,
        };
        let mode = global.mode()?;
        let agreement = global.agreement()?;

        let session_timeout = a.session_timeout.unwrap_or(defaults::SESSION_TIMEOUT);
        if session_timeout.is_zero() {
            return Err(invalid("session_timeout", "must be greater than zero"));
        }
        let max_sessions = a.max_sessions.unwrap_or(defaults::MAX_SESSIONS);
        if max_sessions == 0 {
            return Err(invalid("max_sessions", "must be at least 1"));
        }
        let per_second = a.rate_limit.unwrap_or(defaults::RATE_LIMIT);
        let burst = a.rate_burst;
        let rate = match (per_second, burst) {
            (0, Some(_)) => return Err(invalid("rate_burst", "needs a rate_limit above 0")),
            (0, None) => None,
            (_, Some(0)) => return Err(invalid("rate_burst", "must be at least 1")),
            (per_second, burst) => Some(Rate {
                per_second,
                burst: burst.unwrap_or(per_second),
            }),
        };
        let max_datagram = a.max_datagram.unwrap_or(defaults::MAX_DATAGRAM);
        if !(1..=MAX_UDP_PAYLOAD).contains(&max_datagram) {
            return Err(invalid(
                "max_datagram",
                format!("must be between 1 and {MAX_UDP_PAYLOAD}"),
            ));
        }
        let workers = match a.workers {
            Some(0) => return Err(invalid("workers", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };

        let settings = Settings {
            mode,
            agreement,
            session_timeout,
            rate,
            max_datagram,
            fanout,
            late_join: a.late_join.unwrap_or(false),
            token,
            replica_header: a.replica_header.and_then(ReplicaHeaderName::header),
            // The implicit game has the proxy's own limits; routed games get theirs below.
            max_sessions: None,
            max_pps: None,
        };
        let replicas = match token {
            Some(spec) => {
                let template = GameTemplate {
                    spec,
                    settings: settings.clone(),
                    max_sessions: a.game_max_sessions.unwrap_or(defaults::GAME_MAX_SESSIONS),
                    max_pps: a.game_max_pps.unwrap_or(defaults::GAME_MAX_PPS),
                    dedupe: global,
                    listen: listen.clone(),
                };
                let watch = || GameWatch {
                    namespace: namespace.clone(),
                    port_name: port_name.clone(),
                    template: template.clone(),
                };
                match origin {
                    Some(GameOrigin::Services) => ReplicaSource::KubernetesGames(watch()),
                    Some(GameOrigin::GameServers) => ReplicaSource::AgonesGames(watch()),
                    _ => ReplicaSource::Games {
                        spec,
                        games: games(a.games, &template)?,
                    },
                }
            }
            None => replicas,
        };

        Ok(Config {
            proxy: ProxyConfig {
                listen,
                workers,
                max_sessions,
                socket_buffer: a.socket_buffer.unwrap_or(defaults::SOCKET_BUFFER),
                kernel_timestamps: a.kernel_timestamps.unwrap_or(false),
                settings,
            },
            replicas,
            drain_delay: a.drain_delay.unwrap_or(defaults::DRAIN_DELAY),
            admin: a.admin,
            lag_histogram: a.lag_histogram.unwrap_or_default(),
            log_format: a.log_format.unwrap_or_default(),
            log_level: a.log_level.unwrap_or_else(|| defaults::LOG_LEVEL.into()),
        })
    }
}

/// The dedupe settings of the proxy, or of one game.
#[derive(Debug, Clone, Copy, Default)]
struct Dedupe {
    kind: Option<DedupeKind>,
    offset: Option<usize>,
    width: Option<u64>,
    endian: Option<EndianName>,
    resync_after: Option<u32>,
    failover_after: Option<Duration>,
    window: Option<Duration>,
    max_entries: Option<usize>,
    agreement: Option<AgreementName>,
}

impl Dedupe {
    /// Agreement before trust as these settings give it, defaults applied.
    fn agreement(&self) -> Result<Agreement, ConfigError> {
        let failover_after = self.failover_after()?;
        Ok(match self.agreement.unwrap_or(AgreementName::On) {
            AgreementName::On => Agreement::On { failover_after },
            AgreementName::Off => Agreement::Off,
        })
    }

    fn failover_after(&self) -> Result<Duration, ConfigError> {
        let failover_after = self.failover_after.unwrap_or(defaults::FAILOVER_AFTER);
        if failover_after.is_zero() {
            return Err(invalid("failover_after", "must be greater than zero"));
        }
        Ok(failover_after)
    }

    /// The mode these settings describe, defaults applied.
    fn mode(&self) -> Result<Mode, ConfigError> {
        let window = self.window.unwrap_or(defaults::DEDUPE_WINDOW);
        if window.is_zero() {
            return Err(invalid("dedupe_window", "must be greater than zero"));
        }
        let max_entries = self.max_entries.unwrap_or(defaults::DEDUPE_MAX_ENTRIES);
        if max_entries == 0 {
            return Err(invalid("dedupe_max_entries", "must be at least 1"));
        }
        let kind = self.kind.unwrap_or(DedupeKind::Copies);
        let mode = match kind {
            DedupeKind::Copies => Mode::Copies {
                window,
                max_entries,
            },
            DedupeKind::Sequence => {
                let offset = self.offset.ok_or_else(|| {
                    invalid("sequence_offset", "required when dedupe is sequence")
                })?;
                let width = Width::from_bytes(self.width.unwrap_or(defaults::SEQUENCE_WIDTH))
                    .ok_or_else(|| invalid("sequence_width", "must be 2, 4 or 8"))?;
                let endian = match self.endian.unwrap_or(EndianName::Be) {
                    EndianName::Be => Endian::Big,
                    EndianName::Le => Endian::Little,
                };
                Mode::Sequence {
                    spec: SequenceSpec {
                        offset,
                        width,
                        endian,
                    },
                    window,
                    max_entries,
                    resync_after: self.resync_after.unwrap_or(defaults::SEQUENCE_RESYNC_AFTER),
                }
            }
            DedupeKind::Primary => Mode::Primary {
                failover_after: self.failover_after()?,
            },
        };
        let sequence_set = self.offset.is_some()
            || self.width.is_some()
            || self.endian.is_some()
            || self.resync_after.is_some();
        if kind != DedupeKind::Sequence && sequence_set {
            return Err(invalid(
                "sequence_offset",
                "sequence settings need dedupe = sequence",
            ));
        }
        Ok(mode)
    }

    /// A game's settings over these (the proxy's): the game's own values win; the
    /// proxy's mode-specific values are inherited only when both use the same mode.
    fn under(&self, g: &GameConfig) -> Self {
        let kind = g.dedupe.or(self.kind);
        let same = kind.unwrap_or(DedupeKind::Copies) == self.kind.unwrap_or(DedupeKind::Copies);
        Self {
            kind,
            offset: g.sequence_offset.or(if same { self.offset } else { None }),
            width: g.sequence_width.or(if same { self.width } else { None }),
            endian: g.sequence_endian.or(if same { self.endian } else { None }),
            resync_after: g
                .sequence_resync_after
                .or(if same { self.resync_after } else { None }),
            // Every mode fails over now (sessions not yet in agreement, too).
            failover_after: g.failover_after.or(self.failover_after),
            window: g.dedupe_window.or(self.window),
            max_entries: g.dedupe_max_entries.or(self.max_entries),
            agreement: g.agreement.or(self.agreement),
        }
    }
}

/// What every game inherits from the proxy's own settings. Static `[[game]]` tables and
/// games discovered at run time (Services, GameServers) are checked and built by the same rules.
#[derive(Debug, Clone)]
pub struct GameTemplate {
    /// The token every datagram carries.
    pub spec: TokenSpec,
    settings: Settings,
    /// `game_max_sessions`, `game_max_pps`: each game's unless it sets its own.
    max_sessions: usize,
    max_pps: u32,
    dedupe: Dedupe,
    listen: Vec<SocketAddr>,
}

impl GameTemplate {
    /// One game: its own settings over the proxy's, its tokens parsed and of the proxy's
    /// length. `replicas` may be empty (a discovered game whose replicas are not up yet).
    pub fn game(&self, g: &GameConfig, replicas: Vec<Replica>) -> Result<GameSpec, ConfigError> {
        let in_game = |e: ConfigError| ConfigError::Game {
            name: if g.name.is_empty() {
                "<unnamed>".into()
            } else {
                g.name.clone()
            },
            source: Box::new(e),
        };
        if g.name.is_empty() {
            return Err(in_game(invalid("name", "is required")));
        }
        if g.tokens.is_empty() {
            return Err(in_game(invalid("tokens", "at least one is required")));
        }
        if let Some(r) = replicas
            .iter()
            .find(|r| self.listen.iter().any(|l| is_self(r.addr, *l)))
        {
            return Err(in_game(invalid(
                "replicas",
                format!(
                    "{} is the proxy's own listen address: it would send to itself",
                    r.addr
                ),
            )));
        }
        let tokens = g
            .tokens
            .iter()
            .map(|t| crate::token::parse_token(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| in_game(invalid("tokens", e.to_string())))?;
        // Lengths, with the game's name in the message.
        crate::token::TokenRouter::new(self.spec, [(Name(&g.name), &tokens[..])])
            .map_err(|e| in_game(invalid("tokens", e.to_string())))?;
        let fanout = g.fanout.unwrap_or(self.settings.fanout);
        if !(1..=MAX_SLOTS).contains(&fanout) {
            return Err(in_game(invalid(
                "fanout",
                format!("must be between 1 and {MAX_SLOTS}"),
            )));
        }
        let dedupe = self.dedupe.under(g);
        let mode = dedupe.mode().map_err(in_game)?;
        let agreement = dedupe.agreement().map_err(in_game)?;
        let replica_header = match g.replica_header {
            Some(h) => h.header(),
            None => self.settings.replica_header,
        };
        Ok(GameSpec {
            name: g.name.as_str().into(),
            tokens,
            replicas,
            settings: std::sync::Arc::new(Settings {
                mode,
                agreement,
                fanout,
                replica_header,
                max_sessions: Some(g.max_sessions.unwrap_or(self.max_sessions)).filter(|&n| n > 0),
                max_pps: game_budget(g.max_pps.unwrap_or(self.max_pps)),
                ..self.settings.clone()
            }),
        })
    }
}

/// A game's packet budget of `per_second` (0: none). Its burst is a fifth of a second's:
/// enough for a tick's datagrams to bunch up, too little for a flood to crowd the workers.
fn game_budget(per_second: u32) -> Option<Rate> {
    (per_second > 0).then(|| Rate {
        per_second,
        burst: (per_second / 5).max(1),
    })
}

/// The `[[game]]` tables as games to publish, each with the proxy's settings under its own.
fn games(tables: Vec<GameConfig>, template: &GameTemplate) -> Result<Vec<GameSpec>, ConfigError> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(tables.len());
    for (i, g) in tables.into_iter().enumerate() {
        if g.name.is_empty() {
            return Err(ConfigError::Game {
                name: format!("#{}", i + 1),
                source: Box::new(invalid("name", "is required")),
            });
        }
        let in_game = |e: ConfigError| ConfigError::Game {
            name: g.name.clone(),
            source: Box::new(e),
        };
        if !names.insert(g.name.clone()) {
            return Err(in_game(invalid("name", "is taken by another game")));
        }
        if g.replicas.is_empty() {
            return Err(in_game(invalid("replicas", "at least one is required")));
        }
        let replicas = g.replicas.iter().copied().map(Replica::ready).collect();
        out.push(template.game(&g, replicas)?);
    }
    // Sharing, with the games' names in the message.
    let named: Vec<(&str, &[Vec<u8>])> = out.iter().map(|g| (&*g.name, &g.tokens[..])).collect();
    crate::token::TokenRouter::new(template.spec, named.iter().map(|(n, t)| (Name(n), *t)))
        .map_err(|e| invalid("tokens", e.to_string()))?;
    Ok(out)
}

/// A game's name where the token router shows one.
#[derive(Debug, Clone, Copy)]
struct Name<'a>(&'a str);

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Whether a datagram sent to `replica` would reach the listener bound to `listen`.
fn is_self(replica: SocketAddr, listen: SocketAddr) -> bool {
    replica.port() == listen.port()
        && (replica.ip() == listen.ip()
            || (listen.ip().is_unspecified() && replica.ip().is_loopback()))
}

/// RFC 1123 label, as Kubernetes names of services, namespaces and ports are.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn read_file(path: &Path) -> Result<Args, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<Args, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text[..start].matches('\n').count() + 1;
        let message = e.message().trim().replace('\n', " ");
        // toml names unknown fields itself; for bad values, name the key on that line.
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim().trim_matches('"'))
            .filter(|k| !k.is_empty() && !message.contains("unknown field"));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            message: match key {
                Some(k) => format!("{k}: {message}"),
                None => message,
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's settings with the flags laid over them, as `parse_layers` does.
    fn load(list: &[&str], file: &str) -> Result<Config, ConfigError> {
        use clap::{CommandFactory, FromArgMatches};
        let mut layered = parse_file(Path::new("proxy.toml"), file)?;
        let mut argv = vec!["spotable-proxy"];
        argv.extend_from_slice(list);
        let matches = Args::command()
            .try_get_matches_from(argv)
            .expect("valid flags");
        layered
            .update_from_arg_matches(&matches)
            .expect("valid flags");
        Config::resolve(layered)
    }

    #[test]
    fn flags_alone() {
        let c = load(
            &[
                "--listen",
                "127.0.0.1:7777",
                "--replica",
                "127.0.0.1:7001",
                "--replica",
                "127.0.0.1:7002",
                "--dedupe",
                "sequence",
                "--sequence-offset",
                "2",
                "--sequence-width",
                "2",
                "--sequence-endian",
                "le",
                "--workers",
                "3",
            ],
            "",
        )
        .unwrap();
        assert!(matches!(&c.replicas, ReplicaSource::Static(r) if r.len() == 2));
        assert_eq!(c.proxy.workers, 3);
        assert_eq!(
            c.proxy.settings.mode,
            Mode::Sequence {
                spec: SequenceSpec {
                    offset: 2,
                    width: Width::Two,
                    endian: Endian::Little
                },
                window: Duration::from_secs(2),
                max_entries: 4096,
                resync_after: 2,
            }
        );
        assert_eq!(
            c.proxy.settings.rate,
            Some(Rate {
                per_second: 1000,
                burst: 1000
            })
        );
    }

    #[test]
    fn file_with_flags_winning() {
        let file = r#"
            listen = ["127.0.0.1:7777"]
            replicas = ["127.0.0.1:7001"]
            dedupe = "primary"
            failover_after = "80ms"
            session_timeout = "30s"
            max_sessions = 5
            rate_limit = 0
        "#;
        let c = load(&["--max-sessions", "9"], file).unwrap();
        assert_eq!(c.proxy.max_sessions, 9);
        assert_eq!(c.proxy.settings.session_timeout, Duration::from_secs(30));
        assert_eq!(c.proxy.settings.rate, None);
        assert_eq!(
            c.proxy.settings.mode,
            Mode::Primary {
                failover_after: Duration::from_millis(80)
            }
        );
    }

    fn error(list: &[&str], file: &str) -> String {
        let e = load(list, file).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn errors_name_the_field() {
        let base = ["--listen", "127.0.0.1:1", "--replica", "127.0.0.1:2"];
        assert_eq!(
            error(&[], ""),
            "listen: at least one address is required (--listen or listen = [...] in the config file)"
        );
        assert!(error(&base[..2], "").starts_with("replicas:"));
        let mut seq = base.to_vec();
        seq.extend(["--dedupe", "sequence"]);
        assert_eq!(
            error(&seq, ""),
            "sequence_offset: required when dedupe is sequence"
        );
        let e = error(
            &base,
            "sequence_width = 3\ndedupe = \"sequence\"\nsequence_offset = 0",
        );
        assert_eq!(e, "sequence_width: must be 2, 4 or 8");
        assert!(error(&base, "max_sessions = 0").starts_with("max_sessions:"));
        assert!(error(&base, "max_datagram = 70000").starts_with("max_datagram:"));
        assert!(error(&base, "workers = 0").starts_with("workers:"));
        assert!(error(&base, "session_timeout = \"0s\"").starts_with("session_timeout:"));
        let e = error(&base, "\nlisten = [\"127.0.0.1:1\"]\nmax_sesions = 3\n");
        assert!(
            e.starts_with("proxy.toml:3: unknown field `max_sesions`"),
            "{e}"
        );
        let e = error(&base, "max_sessions = \"many\"");
        assert!(
            e.starts_with("proxy.toml:1: max_sessions: invalid type"),
            "{e}"
        );
        let e = error(&base, "session_timeout = \"soon\"");
        assert!(e.starts_with("proxy.toml:1: session_timeout:"), "{e}");
        let e = error(&base, "listen = [\"not an address\"]");
        assert!(e.starts_with("proxy.toml:1: listen:"), "{e}");
        let e = error(&base, "= broken");
        assert!(e.starts_with("proxy.toml:1:"), "{e}");
        for own in ["127.0.0.1:7777", "0.0.0.0:7777"] {
            let e = error(&["--listen", own, "--replica", "127.0.0.1:7777"], "");
            assert!(
                e.starts_with("replicas: 127.0.0.1:7777 is the proxy's own"),
                "{e}"
            );
        }
        assert!(
            load(
                &["--listen", "0.0.0.0:7777", "--replica", "10.0.0.5:7777"],
                ""
            )
            .is_ok()
        );
    }

    #[test]
    fn example_file_in_the_repository_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.toml");
        let c = Config::resolve(read_file(&path).unwrap()).unwrap();
        assert!(matches!(&c.replicas, ReplicaSource::Static(r) if r.len() == 2));
        assert_eq!(c.proxy.settings.max_datagram, 1472);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn kubernetes_source() {
        let c = load(
            &[
                "--listen",
                "0.0.0.0:7777",
                "--kubernetes-service",
                "game",
                "--namespace",
                "games",
                "--port-name",
                "game",
                "--fanout",
                "2",
                "--late-join",
            ],
            "",
        )
        .unwrap();
        assert_eq!(
            c.replicas,
            ReplicaSource::Kubernetes(crate::discovery::kubernetes::Source {
                namespace: Some("games".into()),
                service: "game".into(),
                port_name: Some("game".into()),
            })
        );
        assert_eq!(c.proxy.settings.fanout, 2);
        assert!(c.proxy.settings.late_join);
        let base = ["--listen", "0.0.0.0:7777"];
        let mut both = base.to_vec();
        both.extend(["--replica", "127.0.0.1:1", "--kubernetes-service", "game"]);
        assert!(error(&both, "").starts_with("replicas: static replicas and kubernetes_service"));
        let mut ns = base.to_vec();
        ns.extend(["--replica", "127.0.0.1:1", "--namespace", "games"]);
        assert!(error(&ns, "").starts_with("namespace:"));
        let mut bad = base.to_vec();
        bad.extend(["--kubernetes-service", "Game_Server"]);
        assert!(error(&bad, "").starts_with("kubernetes_service: must be a DNS label"));
        let mut fan = base.to_vec();
        fan.extend(["--kubernetes-service", "game", "--fanout", "17"]);
        assert!(error(&fan, "").starts_with("fanout:"));
        let file = "kubernetes_service = \"game\"\nnamespace = \"games\"\nfanout = 3\n";
        let c = load(&base, file).unwrap();
        assert!(matches!(c.replicas, ReplicaSource::Kubernetes(_)));
    }

    #[test]
    fn a_flag_left_out_keeps_the_file_value() {
        let file =
            "listen = [\"127.0.0.1:7777\"]\nreplicas = [\"127.0.0.1:7001\"]\nlate_join = true\n";
        assert!(load(&[], file).unwrap().proxy.settings.late_join);
        let c = load(&["--late-join", "--replica", "127.0.0.1:7002"], "").unwrap_err();
        assert!(c.to_string().starts_with("listen:"), "{c}");
        let c = load(&["--replica", "127.0.0.1:7002"], file).unwrap();
        assert_eq!(
            c.replicas,
            ReplicaSource::Static(vec!["127.0.0.1:7002".parse().unwrap()]),
            "a list given as flags replaces the file's list"
        );
    }

    #[test]
    fn help_states_the_defaults_the_code_applies() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        for (flag, default) in [
            ("--dedupe-window", duration(defaults::DEDUPE_WINDOW)),
            (
                "--dedupe-max-entries",
                defaults::DEDUPE_MAX_ENTRIES.to_string(),
            ),
            ("--sequence-width", defaults::SEQUENCE_WIDTH.to_string()),
            (
                "--sequence-resync-after",
                defaults::SEQUENCE_RESYNC_AFTER.to_string(),
            ),
            ("--failover-after", duration(defaults::FAILOVER_AFTER)),
            ("--session-timeout", duration(defaults::SESSION_TIMEOUT)),
            ("--max-sessions", defaults::MAX_SESSIONS.to_string()),
            ("--rate-limit", defaults::RATE_LIMIT.to_string()),
            ("--max-datagram", defaults::MAX_DATAGRAM.to_string()),
            ("--socket-buffer", defaults::SOCKET_BUFFER.to_string()),
            ("--drain-delay", duration(defaults::DRAIN_DELAY)),
            ("--log-level", defaults::LOG_LEVEL.to_string()),
        ] {
            let at = help
                .find(&format!("{flag} "))
                .unwrap_or_else(|| panic!("{flag}"));
            let text = &help[at..];
            let next = text[2..].find(" --").map_or(text.len(), |n| n + 2);
            assert!(
                text[..next].contains(&format!("[default: {default}]")),
                "{flag} says {:?}, the code applies {default}",
                &text[..next]
            );
        }
    }

    /// The README's flag table: every flag is there, with the default `--help` states.
    #[test]
    fn the_readme_lists_every_flag_with_its_default() {
        use clap::CommandFactory;
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
                .unwrap();
        let cmd = Args::command();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `--{long}")))
                .unwrap_or_else(|| panic!("--{long} is missing from the README's flag table"));
            let default = row.split(" | ").nth(1).unwrap_or_default().trim();
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string());
            let help = help
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if let Some(value) = default.strip_prefix('`').and_then(|d| d.strip_suffix('`')) {
                assert!(
                    help.contains(&format!("[default: {value}]")),
                    "README says --{long} defaults to {value}; --help says: {help}"
                );
            }
        }
    }

    const GAMES: &str = r#"
        [[game]]
        name = "arena-1"
        tokens = ["arena-01"]
        replicas = ["10.0.1.10:7001", "10.0.2.10:7001"]
        dedupe = "copies"

        [[game]]
        name = "arena-2"
        tokens = ["arena-02", "base64:AAECAwQFBgc="]
        replicas = ["10.0.1.11:7001"]
        dedupe = "primary"
        fanout = 1
    "#;

    #[test]
    fn game_limits_come_from_the_tables_or_the_game_flags_and_never_bind_the_implicit_game() {
        let tables = format!("{GAMES}\n        max_sessions = 300\n        max_pps = 0\n");
        let flags = [
            "--listen",
            "0.0.0.0:7777",
            "--token-bytes",
            "8",
            "--game-max-sessions",
            "50",
            "--game-max-pps",
            "2000",
        ];
        let c = load(&flags, &tables).unwrap();
        let ReplicaSource::Games { games, .. } = &c.replicas else {
            panic!("{:?}", c.replicas);
        };
        let limits = |i: usize| {
            let s = &games[i].settings;
            (s.max_sessions, s.max_pps.map(|r| (r.per_second, r.burst)))
        };
        assert_eq!(
            limits(0),
            (Some(50), Some((2000, 400))),
            "the flags' defaults"
        );
        assert_eq!(limits(1), (Some(300), None), "its own, 0 for none");
        assert_eq!(c.proxy.settings.max_sessions, None);
        assert_eq!(c.proxy.settings.max_pps, None);
        let c = load(&["--listen", "0.0.0.0:7777", "--token-bytes", "8"], GAMES).unwrap();
        let ReplicaSource::Games { games, .. } = &c.replicas else {
            panic!("{:?}", c.replicas);
        };
        assert_eq!(
            games[0].settings.max_sessions,
            Some(defaults::GAME_MAX_SESSIONS)
        );
        let typo = GAMES.replace("fanout = 1", "max_session = 1");
        let e = load(&["--listen", "0.0.0.0:7777", "--token-bytes", "8"], &typo);
        assert!(e.unwrap_err().to_string().contains("max_session"));
    }

    #[test]
    fn games_come_from_game_tables_with_their_own_settings() {
        let c = load(
            &[
                "--listen",
                "0.0.0.0:7777",
                "--token-bytes",
                "8",
                "--dedupe-window",
                "3s",
            ],
            GAMES,
        )
        .unwrap();
        let ReplicaSource::Games { spec, games } = &c.replicas else {
            panic!("{:?}", c.replicas);
        };
        assert_eq!(*spec, TokenSpec::new(8, TokenAt::Suffix).unwrap());
        assert_eq!(c.proxy.settings.token, Some(*spec));
        assert_eq!(games.len(), 2);
        assert_eq!(&*games[0].name, "arena-1");
        assert_eq!(games[0].tokens, vec![b"arena-01".to_vec()]);
        assert_eq!(games[0].replicas.len(), 2);
        assert_eq!(
            games[0].settings.mode,
            Mode::Copies {
                window: Duration::from_secs(3),
                max_entries: defaults::DEDUPE_MAX_ENTRIES,
            },
            "the global window is inherited"
        );
        assert_eq!(games[1].tokens[1], vec![0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            games[1].settings.mode,
            Mode::Primary {
                failover_after: defaults::FAILOVER_AFTER
            }
        );
        assert_eq!(games[1].settings.fanout, 1);
        assert_eq!(
            games[1].settings.token,
            Some(*spec),
            "each game knows the spec"
        );
        let c = load(
            &[
                "--listen",
                "0.0.0.0:7777",
                "--token-bytes",
                "8",
                "--token-at",
                "prefix",
            ],
            GAMES,
        )
        .unwrap();
        assert_eq!(
            c.proxy.settings.token,
            Some(TokenSpec::new(8, TokenAt::Prefix).unwrap())
        );
    }

    #[test]
    fn game_errors_name_the_game_and_the_field() {
        let listen = ["--listen", "0.0.0.0:7777"];
        let tokens = ["--listen", "0.0.0.0:7777", "--token-bytes", "8"];
        assert!(error(&tokens, "").starts_with("token_bytes: routing by token needs games"));
        assert_eq!(
            error(&listen, GAMES),
            "game: [[game]] tables need token_bytes"
        );
        let mut both = tokens.to_vec();
        both.extend(["--replica", "10.0.0.1:1"]);
        assert!(error(&both, GAMES).starts_with("game: [[game]] tables exclude replicas"));
        let short = GAMES.replace("\"arena-01\"", "\"arena-1\"");
        assert_eq!(
            error(&tokens, &short),
            "game arena-1: tokens: token ar… (7 bytes) is 7 bytes; every token must be 8 \
             (--token-bytes)"
        );
        let shared = GAMES.replace("\"arena-02\"", "\"arena-01\"");
        assert_eq!(
            error(&tokens, &shared),
            "tokens: token ar… (8 bytes) belongs to both arena-1 and arena-2"
        );
        let seq = GAMES.replace("dedupe = \"primary\"", "dedupe = \"sequence\"");
        assert_eq!(
            error(&tokens, &seq),
            "game arena-2: sequence_offset: required when dedupe is sequence"
        );
        let twice = GAMES.replace("arena-2\"", "arena-1\"");
        assert_eq!(
            error(&tokens, &twice),
            "game arena-1: name: is taken by another game"
        );
        let typo = GAMES.replace("fanout = 1", "fan_out = 1");
        assert!(error(&tokens, &typo).contains("unknown field `fan_out`"));
        let own = GAMES.replace("10.0.1.11:7001", "127.0.0.1:7777");
        assert!(
            error(&tokens, &own)
                .starts_with("game arena-2: replicas: 127.0.0.1:7777 is the proxy's own")
        );
        assert!(
            error(&["--listen", "0.0.0.0:1", "--token-at", "prefix"], "").starts_with("token_at:")
        );
        let mut big = listen.to_vec();
        big.extend(["--token-bytes", "65"]);
        assert!(error(&big, GAMES).starts_with("token_bytes: token length 65 is out of range"));
    }

    #[test]
    fn a_game_inherits_sequence_settings_only_in_sequence_mode() {
        let tokens = [
            "--listen",
            "0.0.0.0:7777",
            "--token-bytes",
            "8",
            "--dedupe",
            "sequence",
            "--sequence-offset",
            "4",
        ];
        let file = GAMES.replace("dedupe = \"copies\"\n", "");
        let c = load(&tokens, &file).unwrap();
        let ReplicaSource::Games { games, .. } = &c.replicas else {
            panic!()
        };
        assert!(
            matches!(games[0].settings.mode, Mode::Sequence { spec, .. } if spec.offset == 4),
            "arena-1 names no mode: the proxy's sequence settings"
        );
        assert!(matches!(games[1].settings.mode, Mode::Primary { .. }));
    }

    #[test]
    fn bad_flags_are_rejected_by_the_parser() {
        let base = ["spotable-proxy", "--listen", "127.0.0.1:1"];
        for bad in [
            &["--sequence-width", "3"][..],
            &["--dedupe", "magic"],
            &["--failover-after", "fast"],
            &["--listen", "nowhere"],
            &["--bogus"],
        ] {
            let mut argv = base.to_vec();
            argv.extend_from_slice(bad);
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
