//! Routing tokens: bytes a game client puts at the start or the end of every datagram, so
//! that one address can front many games. The proxy reads the token, strips it, and routes
//! the datagram to the game that owns the token. This is the client-side contract Quilkin's
//! TokenRouter uses; Spotable routes to a *group* of redundant replicas.
//!
//! Nothing here allocates per datagram: [`TokenSpec::split`] only slices, and
//! [`TokenRouter::route`] looks a slice up.

use std::collections::HashMap;
use std::ops::Range;

/// The longest token a datagram may carry.
pub const MAX_TOKEN_BYTES: usize = 64;

/// Where the token sits in a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenAt {
    /// The first bytes.
    Prefix,
    /// The last bytes (the default, as Quilkin's clients append).
    #[default]
    Suffix,
}

/// A token's size and place, the same for every game behind one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpec {
    len: usize,
    at: TokenAt,
}

/// A datagram cut into its token and the game's own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<'a> {
    /// The routing token.
    pub token: &'a [u8],
    /// Where the game's bytes lie in the datagram (what the replicas receive).
    pub body: Range<usize>,
}

/// A token or token setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `--token-bytes` out of range.
    #[error("token length {0} is out of range: 1 to {MAX_TOKEN_BYTES} bytes")]
    Length(usize),
    /// A configured token whose length is not the spec's.
    #[error("token {shown} is {len} bytes; every token must be {want} (--token-bytes)")]
    WrongLength {
        /// The token, printable.
        shown: String,
        /// Its length.
        len: usize,
        /// The spec's length.
        want: usize,
    },
    /// `base64:` followed by something that is not base64.
    #[error("token {0:?}: not valid base64 after `base64:`")]
    Base64(String),
    /// Two games claim one token.
    #[error("token {shown} belongs to both {first} and {second}")]
    Shared {
        /// The token, printable.
        shown: String,
        /// One game.
        first: String,
        /// The other.
        second: String,
    },
}

impl TokenSpec {
    /// Tokens of `len` bytes at `at`.
    pub fn new(len: usize, at: TokenAt) -> Result<Self, TokenError> {
        if (1..=MAX_TOKEN_BYTES).contains(&len) {
            Ok(Self { len, at })
        } else {
            Err(TokenError::Length(len))
        }
    }

    /// Bytes per token.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a spec has at least one byte. (For clippy's `len` convention.)
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where tokens sit.
    pub fn at(&self) -> TokenAt {
        self.at
    }

    /// Cuts `datagram` into token and body; `None` when it is too short to carry a token.
    /// The body may be empty (a datagram that is only a token).
    pub fn split<'a>(&self, datagram: &'a [u8]) -> Option<Split<'a>> {
        let rest = datagram.len().checked_sub(self.len)?;
        Some(match self.at {
            TokenAt::Prefix => Split {
                token: &datagram[..self.len],
                body: self.len..datagram.len(),
            },
            TokenAt::Suffix => Split {
                token: &datagram[rest..],
                body: 0..rest,
            },
        })
    }
}

/// A token as configuration spells it: UTF-8 text as its bytes, or `base64:` followed by the
/// raw bytes in standard base64.
pub fn parse_token(spelling: &str) -> Result<Vec<u8>, TokenError> {
    use base64::Engine as _;
    match spelling.strip_prefix("base64:") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| TokenError::Base64(spelling.to_string())),
        None => Ok(spelling.as_bytes().to_vec()),
    }
}

/// A token for logs and the admin view: its first bytes only, so a page of the view does
/// not hand out every game's entry ticket.
pub fn redacted(token: &[u8]) -> String {
    const SHOWN: usize = 2;
    let head: String = token
        .iter()
        .take(SHOWN)
        .map(|b| {
            if b.is_ascii_graphic() {
                char::from(*b).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect();
    format!("{head}… ({} bytes)", token.len())
}

/// Which game owns each token.
#[derive(Debug, Clone)]
pub struct TokenRouter<G> {
    spec: TokenSpec,
    games: HashMap<Box<[u8]>, G, foldhash::fast::RandomState>,
}

impl<G: Copy + std::fmt::Display> TokenRouter<G> {
    /// The router for `games` (each with its tokens). Every token must have the spec's
    /// length and belong to one game.
    pub fn new<'a>(
        spec: TokenSpec,
        games: impl IntoIterator<Item = (G, &'a [Vec<u8>])>,
    ) -> Result<Self, TokenError> {
        let mut map: HashMap<Box<[u8]>, G, _> = HashMap::default();
        for (game, tokens) in games {
            for token in tokens {
                if token.len() != spec.len {
                    return Err(TokenError::WrongLength {
                        shown: redacted(token),
                        len: token.len(),
                        want: spec.len,
                    });
                }
                if let Some(first) = map.insert(token.clone().into_boxed_slice(), game) {
                    return Err(TokenError::Shared {
                        shown: redacted(token),
                        first: first.to_string(),
                        second: game.to_string(),
                    });
                }
            }
        }
        Ok(Self { spec, games: map })
    }

    /// The token spec.
    pub fn spec(&self) -> TokenSpec {
        self.spec
    }

    /// The game owning `datagram`'s token, and where its body lies; `Err` when the datagram
    /// is too short or its token unknown.
    pub fn route(&self, datagram: &[u8]) -> Result<(G, Range<usize>), Unrouted> {
        let split = self.spec.split(datagram).ok_or(Unrouted::TooShort)?;
        let game = self.games.get(split.token).ok_or(Unrouted::UnknownToken)?;
        Ok((*game, split.body))
    }

    /// How many tokens route somewhere.
    pub fn tokens(&self) -> usize {
        self.games.len()
    }
}

/// Why a datagram has no game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrouted {
    /// Shorter than a token.
    TooShort,
    /// Its token belongs to no game.
    UnknownToken,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(len: usize, at: TokenAt) -> TokenSpec {
        TokenSpec::new(len, at).unwrap()
    }

    #[test]
    fn the_length_is_1_to_64_bytes() {
        assert_eq!(
            TokenSpec::new(0, TokenAt::Suffix),
            Err(TokenError::Length(0))
        );
        assert_eq!(
            TokenSpec::new(65, TokenAt::Prefix),
            Err(TokenError::Length(65))
        );
        assert!(TokenSpec::new(1, TokenAt::Prefix).is_ok());
        assert!(TokenSpec::new(64, TokenAt::Suffix).is_ok());
    }

    #[test]
    fn suffix_and_prefix_tokens_are_cut_off_the_right_end() {
        let d = b"move left|arena-01";
        let s = spec(8, TokenAt::Suffix).split(d).unwrap();
        assert_eq!(s.token, b"arena-01");
        assert_eq!(&d[s.body], b"move left|");
        let d = b"arena-01|move left";
        let s = spec(8, TokenAt::Prefix).split(d).unwrap();
        assert_eq!(s.token, b"arena-01");
        assert_eq!(&d[s.body], b"|move left");
    }

    #[test]
    fn a_datagram_shorter_than_a_token_has_none_and_one_that_is_only_a_token_has_no_body() {
        let sfx = spec(8, TokenAt::Suffix);
        assert_eq!(sfx.split(b"short"), None);
        assert_eq!(sfx.split(b""), None);
        let only = sfx.split(b"arena-01").unwrap();
        assert_eq!((only.token, only.body), (&b"arena-01"[..], 0..0));
        let pfx = spec(8, TokenAt::Prefix);
        assert_eq!(pfx.split(b"arena-0"), None);
        assert_eq!(pfx.split(b"arena-01").unwrap().body, 8..8);
    }

    #[test]
    fn tokens_are_text_or_base64() {
        assert_eq!(parse_token("arena-01").unwrap(), b"arena-01");
        assert_eq!(parse_token("base64:AAEC/w==").unwrap(), vec![0, 1, 2, 255]);
        assert!(matches!(
            parse_token("base64:not base64!"),
            Err(TokenError::Base64(_))
        ));
    }

    #[test]
    fn the_router_finds_each_game_and_refuses_strangers() {
        let a = [b"aaaa".to_vec(), b"AAAA".to_vec()];
        let b = [b"bbbb".to_vec()];
        let r =
            TokenRouter::new(spec(4, TokenAt::Suffix), [(1u32, &a[..]), (2u32, &b[..])]).unwrap();
        assert_eq!(r.tokens(), 3);
        assert_eq!(r.route(b"hi!aaaa"), Ok((1, 0..3)));
        assert_eq!(r.route(b"hi!AAAA"), Ok((1, 0..3)));
        assert_eq!(r.route(b"yo!bbbb"), Ok((2, 0..3)));
        assert_eq!(r.route(b"yo!cccc"), Err(Unrouted::UnknownToken));
        assert_eq!(r.route(b"bbb"), Err(Unrouted::TooShort));
        // The token is the end of the datagram, not anywhere in it.
        assert_eq!(r.route(b"bbbbyo!"), Err(Unrouted::UnknownToken));
    }

    #[test]
    fn tokens_of_the_wrong_length_or_shared_by_two_games_are_refused() {
        let a = [b"aaaa".to_vec()];
        let long = [b"aaaaa".to_vec()];
        let e = TokenRouter::new(spec(4, TokenAt::Suffix), [(1u32, &long[..])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "token aa… (5 bytes) is 5 bytes; every token must be 4 (--token-bytes)"
        );
        let e = TokenRouter::new(spec(4, TokenAt::Suffix), [(1u32, &a[..]), (2u32, &a[..])])
            .unwrap_err();
        assert_eq!(e.to_string(), "token aa… (4 bytes) belongs to both 1 and 2");
    }

    #[test]
    fn redaction_shows_two_bytes_and_the_length() {
        assert_eq!(redacted(b"arena-01"), "ar… (8 bytes)");
        assert_eq!(redacted(&[0, 255, 7]), "\\x00\\xff… (3 bytes)");
    }
}
