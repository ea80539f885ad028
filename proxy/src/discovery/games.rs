//! From labelled Kubernetes objects to games: pure, deterministic, unit-tested.
//!
//! A game is every object (Service or Agones GameServer) labelled `spotable.io/game` with its
//! name. Its tokens are the union of the objects' `spotable.io/tokens` annotations; its
//! replicas the union of theirs. Every proxy sees the same objects and must route the same
//! way, so conflicts are settled by a rule that needs no memory: games are taken in name
//! order and a game claiming a token an earlier game owns is left out whole (and reported)
//! until the conflict is fixed.

use std::collections::{BTreeMap, HashMap};

use crate::config::{AgreementName, DedupeKind, GameConfig, GameTemplate, ReplicaHeaderName};
use crate::replicas::{GameSpec, Replica};

/// The label naming an object's game.
pub const GAME_LABEL: &str = "spotable.io/game";
/// Annotation: the game's tokens, comma-separated (`base64:` prefix for raw bytes).
pub const TOKENS: &str = "spotable.io/tokens";
/// Annotation: the game's dedupe mode (`copies`, `sequence`, `primary`).
pub const DEDUPE: &str = "spotable.io/dedupe";
/// Annotation: the game's fan-out (replicas per session).
pub const FANOUT: &str = "spotable.io/fanout";
/// Annotation: the game's replica header (`none`, `proxy-v2`).
pub const REPLICA_HEADER: &str = "spotable.io/replica-header";
/// Annotation: the game's agreement before trust (`on` or `off`).
pub const AGREEMENT: &str = "spotable.io/agreement";
/// Annotation: most sessions of the game at once (0: no limit of its own).
pub const MAX_SESSIONS: &str = "spotable.io/max-sessions";
/// Annotation: the game's packet budget, datagrams per second (0: none).
pub const MAX_PPS: &str = "spotable.io/max-pps";

/// One object's share of a game.
#[derive(Debug, Clone)]
pub struct Member<'a> {
    /// `Service/name` or `GameServer/name`, for messages.
    pub object: String,
    /// The value of its [`GAME_LABEL`].
    pub game: &'a str,
    /// Its annotations.
    pub annotations: Option<&'a BTreeMap<String, String>>,
}

/// Why a game (or one object's part of it) is left out: worth a warning, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GameProblem {
    /// An annotation could not be read; the game is left out until it is fixed.
    #[error("{object}: annotation {annotation}: {reason}; game {game} left out")]
    Annotation {
        /// The object.
        object: String,
        /// The game.
        game: String,
        /// The annotation.
        annotation: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The game's settings do not hold together (a token of the wrong length, say).
    #[error("{0}; the game is left out")]
    Invalid(String),
    /// A token is claimed by an earlier game (in name order).
    #[error("game {game} left out: token {token} already belongs to game {owner}")]
    TokenTaken {
        /// The game left out.
        game: String,
        /// The token, redacted.
        token: String,
        /// The game keeping it.
        owner: String,
    },
}

/// The games `members` (each with its replicas) describe, built on `template`. The result
/// depends on the members, not on their order.
pub fn games<'a>(
    members: impl IntoIterator<Item = (Member<'a>, Vec<Replica>)>,
    template: &GameTemplate,
) -> (Vec<GameSpec>, Vec<GameProblem>) {
    let mut problems = Vec::new();
    let mut grouped: BTreeMap<&str, Vec<(Member<'a>, Vec<Replica>)>> = BTreeMap::new();
    for (m, replicas) in members {
        grouped.entry(m.game).or_default().push((m, replicas));
    }
    let mut owners: HashMap<Vec<u8>, String> = HashMap::new();
    let mut out = Vec::new();
    'games: for (name, mut parts) in grouped {
        parts.sort_by(|a, b| a.0.object.cmp(&b.0.object));
        let mut table = GameConfig {
            name: name.to_string(),
            ..GameConfig::default()
        };
        let mut replicas = Vec::new();
        for (m, r) in parts {
            replicas.extend(r);
            if let Err(p) = read_annotations(&m, &mut table) {
                problems.push(p);
                continue 'games;
            }
        }
        if table.tokens.is_empty() {
            problems.push(GameProblem::Invalid(format!(
                "game {name}: no token: annotate its objects with {TOKENS}"
            )));
            continue;
        }
        table.tokens.sort();
        table.tokens.dedup();
        let game = match template.game(&table, replicas) {
            Ok(g) => g,
            Err(e) => {
                problems.push(GameProblem::Invalid(e.to_string()));
                continue;
            }
        };
        if let Some((token, owner)) = game
            .tokens
            .iter()
            .find_map(|t| owners.get(t).map(|o| (t, o)))
        {
            problems.push(GameProblem::TokenTaken {
                game: name.to_string(),
                token: crate::token::redacted(token),
                owner: owner.clone(),
            });
            continue;
        }
        for t in &game.tokens {
            owners.insert(t.clone(), name.to_string());
        }
        out.push(game);
    }
    (out, problems)
}

/// Adds one member's annotations to its game's table. Tokens add up; a setting given by two
/// members must agree.
fn read_annotations(m: &Member<'_>, table: &mut GameConfig) -> Result<(), GameProblem> {
    let problem = |annotation: &'static str, reason: String| GameProblem::Annotation {
        object: m.object.clone(),
        game: m.game.to_string(),
        annotation,
        reason,
    };
    let Some(a) = m.annotations else {
        return Ok(());
    };
    if let Some(tokens) = a.get(TOKENS) {
        table.tokens.extend(
            tokens
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
    }
    if let Some(v) = a.get(DEDUPE) {
        let kind = match v.trim() {
            "copies" => DedupeKind::Copies,
            "sequence" => DedupeKind::Sequence,
            "primary" => DedupeKind::Primary,
            other => {
                return Err(problem(
                    DEDUPE,
                    format!("{other:?} is not one of copies, sequence, primary"),
                ));
            }
        };
        if table.dedupe.is_some_and(|k| k != kind) {
            return Err(problem(DEDUPE, "differs from another object's".into()));
        }
        table.dedupe = Some(kind);
    }
    if let Some(v) = a.get(REPLICA_HEADER) {
        let header = match v.trim() {
            "none" => ReplicaHeaderName::None,
            "proxy-v2" => ReplicaHeaderName::ProxyV2,
            other => {
                return Err(problem(
                    REPLICA_HEADER,
                    format!("{other:?} is not one of none, proxy-v2"),
                ));
            }
        };
        if table.replica_header.is_some_and(|h| h != header) {
            return Err(problem(
                REPLICA_HEADER,
                "differs from another object's".into(),
            ));
        }
        table.replica_header = Some(header);
    }
    if let Some(v) = a.get(AGREEMENT) {
        let agreement = match v.trim() {
            "on" => AgreementName::On,
            "off" => AgreementName::Off,
            other => {
                return Err(problem(
                    AGREEMENT,
                    format!("{other:?} is not one of on, off"),
                ));
            }
        };
        if table.agreement.is_some_and(|x| x != agreement) {
            return Err(problem(AGREEMENT, "differs from another object's".into()));
        }
        table.agreement = Some(agreement);
    }
    number(a, MAX_SESSIONS, &mut table.max_sessions).map_err(|r| problem(MAX_SESSIONS, r))?;
    number(a, MAX_PPS, &mut table.max_pps).map_err(|r| problem(MAX_PPS, r))?;
    number(a, FANOUT, &mut table.fanout).map_err(|r| problem(FANOUT, r))?;
    Ok(())
}

/// Reads the number under `annotation` into `into`, which another object of the game may have
/// set already: then they must agree.
fn number<T: std::str::FromStr + PartialEq>(
    annotations: &BTreeMap<String, String>,
    annotation: &str,
    into: &mut Option<T>,
) -> Result<(), String> {
    let Some(v) = annotations.get(annotation) else {
        return Ok(());
    };
    let n = v
        .trim()
        .parse::<T>()
        .map_err(|_| format!("{v:?} is not a number"))?;
    if into.as_ref().is_some_and(|m| *m != n) {
        return Err("differs from another object's".into());
    }
    *into = Some(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Args, Config, ReplicaSource};
    use crate::dedupe::Mode;
    use crate::replicas::ReplicaState;
    use clap::Parser;

    fn template() -> GameTemplate {
        let args = Args::parse_from([
            "p",
            "--listen",
            "0.0.0.0:7777",
            "--token-bytes",
            "4",
            "--kubernetes-games",
            "--fanout",
            "3",
        ]);
        match Config::resolve(args).unwrap().replicas {
            ReplicaSource::KubernetesGames(w) => w.template,
            other => panic!("{other:?}"),
        }
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ready(last: u8) -> Replica {
        Replica::ready(format!("10.0.0.{last}:7000").parse().unwrap())
    }

    #[test]
    fn members_group_into_games_with_their_settings() {
        let a1 = annotations(&[(TOKENS, "aaaa, bbbb"), (DEDUPE, "primary")]);
        let a2 = annotations(&[(TOKENS, "bbbb,base64:AAECAw==")]);
        let b = annotations(&[(TOKENS, "cccc"), (FANOUT, "1")]);
        let members = vec![
            (
                Member {
                    object: "Service/b".into(),
                    game: "beta",
                    annotations: Some(&b),
                },
                vec![ready(3)],
            ),
            (
                Member {
                    object: "Service/a2".into(),
                    game: "alpha",
                    annotations: Some(&a2),
                },
                vec![ready(2)],
            ),
            (
                Member {
                    object: "Service/a1".into(),
                    game: "alpha",
                    annotations: Some(&a1),
                },
                vec![ready(1)],
            ),
        ];
        let (games, problems) = games(members, &template());
        assert_eq!(problems, vec![]);
        assert_eq!(games.len(), 2);
        let alpha = &games[0];
        assert_eq!(&*alpha.name, "alpha");
        let set: std::collections::BTreeSet<_> = alpha.tokens.iter().cloned().collect();
        assert_eq!(
            set,
            [b"aaaa".to_vec(), b"bbbb".to_vec(), vec![0, 1, 2, 3]]
                .into_iter()
                .collect()
        );
        assert_eq!(alpha.replicas, vec![ready(1), ready(2)], "in object order");
        assert!(matches!(alpha.settings.mode, Mode::Primary { .. }));
        assert_eq!(alpha.settings.fanout, 3, "inherited");
        let beta = &games[1];
        assert!(matches!(beta.settings.mode, Mode::Copies { .. }));
        assert_eq!(beta.settings.fanout, 1);
        assert_eq!(beta.replicas[0].state, ReplicaState::Ready);
    }

    #[test]
    fn limits_come_from_annotations_or_the_proxys_defaults() {
        let own = annotations(&[(TOKENS, "aaaa"), (MAX_SESSIONS, "300"), (MAX_PPS, "9000")]);
        let off = annotations(&[(TOKENS, "bbbb"), (MAX_SESSIONS, "0"), (MAX_PPS, " 0 ")]);
        let plain = annotations(&[(TOKENS, "cccc")]);
        let bad = annotations(&[(TOKENS, "dddd"), (MAX_PPS, "lots")]);
        let member = |object: &str, game, a| Member {
            object: object.into(),
            game,
            annotations: Some(a),
        };
        let (games, problems) = games(
            vec![
                (member("Service/a", "a", &own), vec![]),
                (member("Service/b", "b", &off), vec![]),
                (member("Service/c", "c", &plain), vec![]),
                (member("Service/d", "d", &bad), vec![]),
            ],
            &template(),
        );
        let limits: Vec<_> = games
            .iter()
            .map(|g| {
                let pps = g.settings.max_pps.map(|r| (r.per_second, r.burst));
                (&*g.name, g.settings.max_sessions, pps)
            })
            .collect();
        assert_eq!(
            limits,
            [
                ("a", Some(300), Some((9000, 1800))),
                ("b", None, None),
                ("c", Some(1000), Some((100_000, 20_000))),
            ]
        );
        assert_eq!(
            problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "Service/d: annotation spotable.io/max-pps: \"lots\" is not a number; game d left out"
            ]
        );
    }

    #[test]
    fn bad_annotations_leave_out_only_their_game() {
        let bad = annotations(&[(TOKENS, "aaaa"), (DEDUPE, "fastest")]);
        let short = annotations(&[(TOKENS, "bb")]);
        let none = annotations(&[]);
        let fine = annotations(&[(TOKENS, "dddd"), (FANOUT, "2")]);
        let clash = annotations(&[(FANOUT, "3")]);
        let member = |object: &str, game, a| Member {
            object: object.into(),
            game,
            annotations: Some(a),
        };
        let (games, problems) = games(
            vec![
                (member("Service/a", "a", &bad), vec![]),
                (member("Service/b", "b", &short), vec![]),
                (member("Service/c", "c", &none), vec![]),
                (member("Service/d", "d", &fine), vec![]),
                (member("Service/e1", "e", &fine), vec![]),
                (member("Service/e2", "e", &clash), vec![]),
            ],
            &template(),
        );
        let names: Vec<_> = games.iter().map(|g| &*g.name).collect();
        assert_eq!(names, ["d"], "{problems:?}");
        let text: Vec<_> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "Service/a: annotation spotable.io/dedupe: \"fastest\" is not one of copies, \
                 sequence, primary; game a left out",
                "game b: tokens: token bb… (2 bytes) is 2 bytes; every token must be 4 \
                 (--token-bytes); the game is left out",
                "game c: no token: annotate its objects with spotable.io/tokens; the game is \
                 left out",
                "Service/e2: annotation spotable.io/fanout: differs from another object's; \
                 game e left out",
            ]
        );
    }

    #[test]
    fn a_token_claimed_twice_stays_with_the_first_game_by_name() {
        let a = annotations(&[(TOKENS, "aaaa")]);
        let b = annotations(&[(TOKENS, "bbbb,aaaa")]);
        let run = |order: bool| {
            let mut members = vec![
                (
                    Member {
                        object: "Service/zeta".into(),
                        game: "zeta",
                        annotations: Some(&a),
                    },
                    vec![ready(1)],
                ),
                (
                    Member {
                        object: "Service/alpha".into(),
                        game: "alpha",
                        annotations: Some(&b),
                    },
                    vec![ready(2)],
                ),
            ];
            if order {
                members.reverse();
            }
            games(members, &template())
        };
        let (first, problems) = run(false);
        assert_eq!(run(true).0, first, "order-free");
        assert_eq!(first.len(), 1);
        assert_eq!(&*first[0].name, "alpha");
        assert_eq!(
            problems[0].to_string(),
            "game zeta left out: token aa… (4 bytes) already belongs to game alpha"
        );
    }
}
