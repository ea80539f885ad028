//! What the answers of a studio's server say about it, and what each mode gave its players:
//! plain functions over what the relays and players recorded, unit-tested without a process.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

/// One answer as it was seen: when (since the run started) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// When.
    pub at: Duration,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// What each replica sent one player's session, in arrival order (index: replica).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Per replica.
    pub replicas: Vec<Vec<Seen>>,
}

/// Answers a replica must have sent a session for its answers to count as evidence.
const MIN_ANSWERS: usize = 8;
/// Share of one replica's answers the other must have sent byte for byte to be identical.
const IDENTICAL: f64 = 0.95;
/// A number field counts when this share of a replica's steps go up by 1 to [`MAX_STEP`].
const COUNTING: f64 = 0.97;
const MAX_STEP: u64 = 16;
/// Fields are looked for in this many leading bytes.
const MAX_OFFSET: usize = 64;
/// Replicas number alike when the same number arrives from both within this (median), for
/// this share of the numbers one of them sent. Replicas are started at least a second apart,
/// so numbers that merely count from each process's start are a second or more apart.
const AGREE_WITHIN: Duration = Duration::from_millis(250);
const AGREE_OVERLAP: f64 = 0.8;

/// Whether the replicas answered byte for byte alike: `None` when no session had enough
/// answers from two of them to tell.
pub fn identical(sessions: &[Session]) -> Option<bool> {
    let mut compared = false;
    for s in sessions {
        let sent: Vec<&Vec<Seen>> = s
            .replicas
            .iter()
            .filter(|r| r.len() >= MIN_ANSWERS)
            .collect();
        for pair in sent.windows(2) {
            compared = true;
            let (a, b) = (counted(pair[0]), counted(pair[1]));
            let common: usize = a
                .iter()
                .map(|(k, n)| (*n).min(b.get(k).copied().unwrap_or(0)))
                .sum();
            let most = pair[0].len().max(pair[1].len());
            if (common as f64) < IDENTICAL * most as f64 {
                return Some(false);
            }
        }
    }
    compared.then_some(true)
}

fn counted(answers: &[Seen]) -> HashMap<&[u8], usize> {
    let mut m = HashMap::new();
    for a in answers {
        *m.entry(&a.bytes[..]).or_default() += 1;
    }
    m
}

/// Where a number sits in the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Field {
    /// Byte offset.
    pub offset: usize,
    /// Width in bytes: 2, 4 or 8.
    pub width: usize,
    /// Byte order, as `--sequence-endian` spells it.
    pub endian: &'static str,
}

impl Field {
    fn read(&self, bytes: &[u8]) -> Option<u64> {
        let b = bytes.get(self.offset..self.offset + self.width)?;
        let mut v = [0u8; 8];
        Some(if self.endian == "be" {
            v[8 - self.width..].copy_from_slice(b);
            u64::from_be_bytes(v)
        } else {
            v[..self.width].copy_from_slice(b);
            u64::from_le_bytes(v)
        })
    }

    fn mask(&self) -> u64 {
        if self.width == 8 {
            u64::MAX
        } else {
            (1u64 << (8 * self.width)) - 1
        }
    }

    /// The proxy flags that select it.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--sequence-offset".into(),
            self.offset.to_string(),
            "--sequence-width".into(),
            self.width.to_string(),
            "--sequence-endian".into(),
            self.endian.into(),
        ]
    }
}

/// A field in which every replica's answers to every player count up in small steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Numbering {
    /// Where.
    pub field: Field,
    /// The replicas send the same numbers at about the same time.
    pub agree: bool,
    /// Median time between two replicas' copies of one number, ms.
    pub apart_ms: f64,
    /// Share of one replica's numbers the other sent too.
    pub overlap: f64,
}

/// The fields that count up, best first: numberings the replicas agree on, then those that
/// read like a counter (the bytes of it that never change are zero), then aligned ones, then
/// wider, then earlier. A counter also counts in its low bytes, and a constant byte beside it can read as
/// its high byte in the other order: of overlapping fields only the best is kept.
pub fn numberings(sessions: &[Session]) -> Vec<Numbering> {
    let streams: Vec<&Vec<Seen>> = sessions
        .iter()
        .flat_map(|s| s.replicas.iter())
        .filter(|r| r.len() >= MIN_ANSWERS)
        .collect();
    let Some(shortest) = streams
        .iter()
        .map(|r| {
            let mut lens: Vec<usize> = r.iter().map(|a| a.bytes.len()).collect();
            lens.sort_unstable();
            // The length most answers have at least (a few short ones fall back to content).
            lens[lens.len() / 20]
        })
        .min()
    else {
        return Vec::new();
    };
    let mut found: Vec<(usize, Numbering)> = Vec::new();
    for width in [8usize, 4, 2] {
        for offset in 0..=shortest.saturating_sub(width).min(MAX_OFFSET) {
            for endian in ["be", "le"] {
                let field = Field {
                    offset,
                    width,
                    endian,
                };
                if streams.iter().all(|r| counts_up(&field, r)) {
                    let (agree, apart_ms, overlap) = agreement(&field, sessions);
                    let n = Numbering {
                        field,
                        agree,
                        apart_ms,
                        overlap,
                    };
                    found.push((junk(&field, &streams), n));
                }
            }
        }
    }
    found.sort_by_key(|(junk, n)| {
        let f = n.field;
        (
            !n.agree,
            *junk,
            f.offset % f.width != 0,
            usize::MAX - f.width,
            f.offset,
        )
    });
    let mut kept: Vec<Numbering> = Vec::new();
    for (_, n) in found {
        let overlaps = |k: &Numbering| {
            n.field.offset < k.field.offset + k.field.width
                && k.field.offset < n.field.offset + n.field.width
        };
        if !kept.iter().any(overlaps) {
            kept.push(n);
        }
    }
    kept
}

/// Bytes of `field` that never change in any answer and are not zero: a counter's unchanging
/// high bytes are zero, so these say the field reaches into something else.
fn junk(field: &Field, streams: &[&Vec<Seen>]) -> usize {
    let mut first: Option<&[u8]> = None;
    let mut changes = vec![false; field.width];
    for a in streams.iter().flat_map(|r| r.iter()) {
        let Some(b) = a.bytes.get(field.offset..field.offset + field.width) else {
            continue;
        };
        match first {
            None => first = Some(b),
            Some(f) => {
                for (i, c) in changes.iter_mut().enumerate() {
                    *c |= f[i] != b[i];
                }
            }
        }
    }
    first.map_or(0, |f| {
        f.iter()
            .zip(&changes)
            .filter(|(byte, changed)| !**changed && **byte != 0)
            .count()
    })
}

fn counts_up(field: &Field, answers: &[Seen]) -> bool {
    let values: Vec<u64> = answers
        .iter()
        .filter_map(|a| field.read(&a.bytes))
        .collect();
    if values.len() < MIN_ANSWERS || (values.len() as f64) < 0.95 * answers.len() as f64 {
        return false;
    }
    let mask = field.mask();
    let step = |w: &[u64]| w[1].wrapping_sub(w[0]) & mask;
    let up = values
        .windows(2)
        .filter(|w| (1..=MAX_STEP).contains(&step(w)))
        .count();
    // The rest may step back a little (reordering), never jump.
    let back = |s: u64| mask.wrapping_sub(s).wrapping_add(1) & mask;
    let jumps = values
        .windows(2)
        .filter(|w| step(w) > MAX_STEP && back(step(w)) > MAX_STEP)
        .count();
    jumps == 0 && up as f64 >= COUNTING * (values.len() - 1) as f64
}

/// Whether the replicas send the same numbers at about the same time: (agree, median ms
/// apart, overlap).
fn agreement(field: &Field, sessions: &[Session]) -> (bool, f64, f64) {
    let mut apart = Vec::new();
    let (mut common, mut fewest) = (0usize, 0usize);
    for s in sessions {
        let firsts: Vec<HashMap<u64, Duration>> = s
            .replicas
            .iter()
            .filter(|r| r.len() >= MIN_ANSWERS)
            .map(|r| {
                let mut m = HashMap::new();
                for a in r {
                    if let Some(n) = field.read(&a.bytes) {
                        m.entry(n).or_insert(a.at);
                    }
                }
                m
            })
            .collect();
        for pair in firsts.windows(2) {
            fewest += pair[0].len().min(pair[1].len());
            for (n, at) in &pair[0] {
                if let Some(other) = pair[1].get(n) {
                    common += 1;
                    apart.push(at.abs_diff(*other));
                }
            }
        }
    }
    if apart.is_empty() || fewest == 0 {
        return (false, f64::NAN, 0.0);
    }
    apart.sort_unstable();
    let median = apart[apart.len() / 2];
    let overlap = common as f64 / fewest as f64;
    (
        median <= AGREE_WITHIN && overlap >= AGREE_OVERLAP,
        median.as_secs_f64() * 1e3,
        overlap,
    )
}

/// What `fit` recommends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Recommendation {
    /// Answers byte for byte alike: first copy from the fastest replica.
    Copies,
    /// Numbered alike: first copy of each number.
    Sequence(Field),
    /// Neither: one replica per session, failover on its death.
    Primary,
}

impl Recommendation {
    /// From the evidence. A field that counts up in each replica on its own (a tick from the
    /// process's start) shows that each simulates on its own clock: their worlds part, and an
    /// agreeing number beside it (an input acknowledged) does not make them one.
    pub fn from(identical: Option<bool>, numberings: &[Numbering]) -> Self {
        if identical == Some(true) {
            return Recommendation::Copies;
        }
        if numberings.iter().any(|n| !n.agree) {
            return Recommendation::Primary;
        }
        match numberings.first() {
            Some(n) => Recommendation::Sequence(n.field),
            None => Recommendation::Primary,
        }
    }

    /// The mode's name.
    pub fn name(&self) -> &'static str {
        match self {
            Recommendation::Copies => "copies",
            Recommendation::Sequence(_) => "sequence",
            Recommendation::Primary => "primary",
        }
    }
}

/// What one player did and got in a mode's run.
#[derive(Debug, Clone, Default)]
pub struct PlayerRun {
    /// Datagrams it sent.
    pub requests: u64,
    /// When it sent its last (a replayed capture may end before the run).
    pub last_request: Duration,
    /// Answers it got.
    pub delivered: Vec<Seen>,
    /// What each replica sent its session (through the relays).
    pub session: Session,
}

/// What the players got in one mode's run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// Answers received per datagram sent.
    pub answers_per_request: f64,
    /// Answers from a replica other than the one whose world the player was in (while that
    /// one was alive): two worlds interleaved.
    pub second_world: u64,
    /// Answers of the player's world that never reached it.
    pub lost: u64,
    /// Answers received more often than any one replica sent them.
    pub duplicates: u64,
    /// Longest time without an answer around the kill, over the players whose replica died.
    pub gap_at_kill_ms: f64,
    /// Players whose replica died.
    pub players_affected: usize,
}

/// Which replicas sent this session the bytes of `a` around the time it was delivered (a
/// slower replica's copy arrives after the delivered one).
fn sources(session: &Session, a: &Seen) -> Vec<usize> {
    let near = Duration::from_millis(300);
    let (from, to) = (a.at.saturating_sub(near), a.at + near);
    session
        .replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.iter()
                .any(|x| x.bytes == a.bytes && x.at >= from && x.at <= to)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Tallies a mode's run: players' deliveries against what each replica sent them; replica
/// `killed` died at `kill`; the run ended at `end`. With `numbered` (a `sequence` run), answers
/// carrying the same number count as the same answer, as that mode takes them.
pub fn outcome(
    players: &[PlayerRun],
    numbered: Option<Field>,
    killed: usize,
    kill: Duration,
    end: Duration,
) -> Outcome {
    let Some(field) = numbered else {
        return tally(players, killed, kill, end);
    };
    let key = |s: &Seen| Seen {
        at: s.at,
        bytes: field
            .read(&s.bytes)
            .map_or_else(|| s.bytes.clone(), |n| n.to_be_bytes().to_vec()),
    };
    let keyed: Vec<PlayerRun> = players
        .iter()
        .map(|p| PlayerRun {
            requests: p.requests,
            last_request: p.last_request,
            delivered: p.delivered.iter().map(key).collect(),
            session: Session {
                replicas: p
                    .session
                    .replicas
                    .iter()
                    .map(|r| r.iter().map(key).collect())
                    .collect(),
            },
        })
        .collect();
    tally(&keyed, killed, kill, end)
}

fn tally(players: &[PlayerRun], killed: usize, kill: Duration, end: Duration) -> Outcome {
    let settle = Duration::from_millis(300);
    let mut o = Outcome::default();
    let (mut requests, mut answers) = (0u64, 0u64);
    let mut gap = Duration::ZERO;
    for p in players {
        requests += p.requests;
        answers += p.delivered.len() as u64;
        let attributed: Vec<(Duration, Vec<usize>)> = p
            .delivered
            .iter()
            .map(|a| (a.at, sources(&p.session, a)))
            .collect();
        let single = |range: std::ops::Range<Duration>| {
            attributed
                .iter()
                .filter(|(at, s)| range.contains(at) && s.len() == 1)
                .map(|(_, s)| s[0])
                .next()
        };
        // The player's world: the replica of its first answer that only one replica sent
        // (none: the replicas answered alike, one world whoever delivers).
        let before = single(Duration::ZERO..kill);
        let after = match before {
            Some(w) if w == killed => single(kill..end),
            other => other,
        };
        for (at, s) in &attributed {
            let world = if *at < kill { before } else { after };
            if let (Some(w), [only]) = (world, &s[..])
                && *only != w
            {
                o.second_world += 1;
            }
        }
        // Lost: what the world's replica (or, alike, every replica) sent, settled, and the
        // player never got.
        let mut got: HashMap<&[u8], usize> = counted(&p.delivered);
        let segments = [(Duration::ZERO, kill, before), (kill, end, after)];
        for (from, to, world) in segments {
            let mut expected: HashMap<&[u8], usize> = HashMap::new();
            for (i, r) in p.session.replicas.iter().enumerate() {
                if world.is_some_and(|w| w != i) {
                    continue;
                }
                let mut mine: HashMap<&[u8], usize> = HashMap::new();
                for x in r
                    .iter()
                    .filter(|x| x.at >= from && x.at + settle < to.min(end))
                {
                    *mine.entry(&x.bytes[..]).or_default() += 1;
                }
                for (k, n) in mine {
                    let e = expected.entry(k).or_default();
                    *e = (*e).max(n);
                }
            }
            for (k, n) in expected {
                let have = got.entry(k).or_default();
                let taken = (*have).min(n);
                *have -= taken;
                o.lost += (n - taken) as u64;
            }
        }
        // Duplicates: more copies than any one replica sent.
        let mut most: HashMap<&[u8], usize> = HashMap::new();
        for r in &p.session.replicas {
            for (k, n) in counted(r) {
                let e = most.entry(k).or_default();
                *e = (*e).max(n);
            }
        }
        for (k, n) in counted(&p.delivered) {
            o.duplicates += n.saturating_sub(most.get(k).copied().unwrap_or(n)) as u64;
        }
        if before.is_none_or(|w| w == killed) && p.session.replicas.len() > killed {
            o.players_affected += 1;
            // Until the run ends, or the player has gone quiet and so has the game.
            let quiet = p.last_request + Duration::from_millis(500);
            let window = kill.saturating_sub(Duration::from_millis(500))
                ..(kill + Duration::from_secs(3))
                    .min(end.saturating_sub(settle))
                    .min(quiet.max(kill));
            let mut last = window.start;
            for a in p.delivered.iter().filter(|a| window.contains(&a.at)) {
                gap = gap.max(a.at.saturating_sub(last));
                last = a.at;
            }
            gap = gap.max(window.end.saturating_sub(last));
        }
    }
    o.answers_per_request = if requests == 0 {
        0.0
    } else {
        answers as f64 / requests as f64
    };
    o.gap_at_kill_ms = gap.as_secs_f64() * 1e3;
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn seen(ms: u64, bytes: Vec<u8>) -> Seen {
        Seen {
            at: MS * ms as u32,
            bytes,
        }
    }

    /// Tick-server answers: a 4-byte tick at 0, then the world (`world`), 33 ms apart.
    fn ticks(first_tick: u32, world: u8, from_ms: u64, n: u32) -> Vec<Seen> {
        (0..n)
            .map(|i| {
                let mut b = (first_tick + i).to_be_bytes().to_vec();
                b.extend_from_slice(&[world; 12]);
                b.extend_from_slice(&(i * 7919).to_le_bytes());
                seen(from_ms + 33 * u64::from(i), b)
            })
            .collect()
    }

    /// Echo answers: the player's 8-byte number, then `tag`.
    fn echoes(tag: &[u8], lag_ms: u64, n: u64) -> Vec<Seen> {
        (0..n)
            .map(|i| {
                let mut b = (1000 + i).to_be_bytes().to_vec();
                b.extend_from_slice(b"payload-");
                b.extend_from_slice(tag);
                seen(20 * i + lag_ms, b)
            })
            .collect()
    }

    fn session(replicas: Vec<Vec<Seen>>) -> Session {
        Session { replicas }
    }

    #[test]
    fn byte_identical_replicas_recommend_copies() {
        let s = [session(vec![echoes(b"", 1, 50), echoes(b"", 3, 50)])];
        assert_eq!(identical(&s), Some(true));
        assert_eq!(
            Recommendation::from(identical(&s), &numberings(&s)),
            Recommendation::Copies
        );
    }

    #[test]
    fn numbered_alike_but_unlike_bytes_recommend_sequence_on_the_number() {
        let s = [
            session(vec![echoes(b"A", 1, 50), echoes(b"BB", 2, 50)]),
            session(vec![echoes(b"A", 5, 40), echoes(b"BB", 1, 40)]),
        ];
        assert_eq!(identical(&s), Some(false));
        let n = numberings(&s);
        assert!(n[0].agree, "{n:?}");
        let want = Field {
            offset: 0,
            width: 8,
            endian: "be",
        };
        assert_eq!(n[0].field, want, "the widest field, not its low bytes");
        assert!(
            n.iter()
                .all(|f| f.field.offset + f.field.width <= 8 || f.field.offset >= 8)
        );
        assert_eq!(
            Recommendation::from(Some(false), &n),
            Recommendation::Sequence(want)
        );
    }

    #[test]
    fn tick_servers_started_apart_count_but_do_not_agree_so_primary() {
        // Started a second apart: 30 ticks apart at 30 Hz, worlds apart.
        let s = [session(vec![ticks(130, 1, 0, 200), ticks(100, 2, 10, 200)])];
        assert_eq!(identical(&s), Some(false));
        let n = numberings(&s);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            n[0].field,
            Field {
                offset: 0,
                width: 4,
                endian: "be"
            }
        );
        assert!(!n[0].agree);
        assert!(n[0].apart_ms > 900.0, "{}", n[0].apart_ms);
        assert_eq!(
            Recommendation::from(Some(false), &n),
            Recommendation::Primary
        );
    }

    #[test]
    fn an_agreeing_acknowledgement_beside_a_clock_of_its_own_is_still_two_worlds() {
        // Each snapshot: the server's tick (its own clock), then the player's input it
        // applied last, which both replicas acknowledge alike.
        let stream = |tick0: u32, world: u8, lag: u64| -> Vec<Seen> {
            (0..150u32)
                .map(|i| {
                    let mut b = (tick0 + i).to_be_bytes().to_vec();
                    b.extend_from_slice(&u64::from(500 + i).to_be_bytes());
                    b.extend_from_slice(&[world; 8]);
                    seen(lag + 33 * u64::from(i), b)
                })
                .collect()
        };
        let s = [session(vec![stream(130, 1, 0), stream(100, 2, 5)])];
        let n = numberings(&s);
        assert!(
            n.iter().any(|f| f.agree) && n.iter().any(|f| !f.agree),
            "{n:?}"
        );
        assert_eq!(
            Recommendation::from(identical(&s), &n),
            Recommendation::Primary
        );
    }

    #[test]
    fn too_few_answers_tell_nothing() {
        let s = [session(vec![echoes(b"", 1, 3), echoes(b"", 3, 50)])];
        assert_eq!(identical(&s), None);
        assert_eq!(
            Recommendation::from(None, &numberings(&s)),
            Recommendation::Primary
        );
    }

    fn delivered(from: &[Seen], range: std::ops::Range<u64>) -> Vec<Seen> {
        from.iter()
            .filter(|s| range.contains(&(s.at.as_millis() as u64)))
            .map(|s| Seen {
                at: s.at + MS,
                bytes: s.bytes.clone(),
            })
            .collect()
    }

    #[test]
    fn two_worlds_interleaved_are_counted_as_the_second_world() {
        let (a, b) = (ticks(130, 1, 0, 100), ticks(100, 2, 10, 100));
        let mut both = delivered(&a, 0..3300);
        both.extend(delivered(&b, 0..3300));
        both.sort_by_key(|s| s.at);
        let p = PlayerRun {
            requests: 100,
            last_request: MS * 3300,
            delivered: both,
            session: session(vec![a, b]),
        };
        let o = outcome(&[p], None, 0, MS * 1650, MS * 3300);
        assert!(o.second_world >= 45, "{o:?}");
        assert!((o.answers_per_request - 2.0).abs() < 0.05, "{o:?}");
    }

    #[test]
    fn a_failover_in_one_world_then_the_other_costs_the_gap_only() {
        let (a, b) = (ticks(130, 1, 0, 100), ticks(100, 2, 10, 100));
        // The player hears A until it dies at 1650 ms, then B from 1750 ms.
        let mut got = delivered(&a, 0..1650);
        got.extend(delivered(&b, 1750..3300));
        let p = PlayerRun {
            requests: 100,
            last_request: MS * 3300,
            delivered: got,
            session: session(vec![
                a.into_iter().filter(|s| s.at < MS * 1650).collect(),
                b,
            ]),
        };
        let o = outcome(&[p], None, 0, MS * 1650, MS * 3300);
        assert_eq!(o.second_world, 0, "{o:?}");
        assert_eq!(o.duplicates, 0);
        assert!((2..=4).contains(&o.lost), "{o:?}");
        assert_eq!(o.players_affected, 1);
        // A's last before the kill at 1618 ms, B's first after 1750 ms at 1760 ms.
        assert!((140.0..=145.0).contains(&o.gap_at_kill_ms), "{o:?}");
    }

    #[test]
    fn identical_replicas_in_one_world_lose_and_double_nothing() {
        let (a, b) = (echoes(b"", 1, 100), echoes(b"", 3, 100));
        let mut got = delivered(&a, 0..1000);
        got.extend(delivered(&b, 1000..2000));
        let p = PlayerRun {
            requests: 100,
            last_request: MS * 3300,
            delivered: got.clone(),
            session: session(vec![
                a.into_iter().filter(|s| s.at < MS * 1000).collect(),
                b,
            ]),
        };
        let o = outcome(std::slice::from_ref(&p), None, 0, MS * 1000, MS * 2000);
        assert_eq!((o.second_world, o.lost, o.duplicates), (0, 0, 0), "{o:?}");
        // One answer twice is a duplicate.
        let mut doubled = p;
        doubled.delivered.push(got[10].clone());
        let o = outcome(&[doubled], None, 0, MS * 1000, MS * 2000);
        assert_eq!(o.duplicates, 1);
    }
}
