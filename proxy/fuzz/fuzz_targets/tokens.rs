//! Routing tokens from arbitrary bytes: the first bytes choose the spec and the tokens of two
//! games, the rest is a datagram. Splitting must never panic, token and body must give back
//! the datagram, and the router must send a datagram to the game whose token it ends (or
//! starts) with, and nowhere else.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spotable_core::token::{TokenAt, TokenRouter, TokenSpec, Unrouted, parse_token};

fuzz_target!(|data: &[u8]| {
    let [len, at, rest @ ..] = data else { return };
    // Spellings of configuration never panic either.
    let _ = parse_token(&String::from_utf8_lossy(rest));
    let at = if at & 1 == 0 { TokenAt::Suffix } else { TokenAt::Prefix };
    let Ok(spec) = TokenSpec::new(usize::from(*len % 66), at) else { return };
    let n = spec.len();
    if rest.len() < 2 * n {
        return;
    }
    let (a, datagram) = rest.split_at(n);
    let (b, _) = datagram.split_at(n);
    let (ta, tb) = (vec![a.to_vec()], vec![b.to_vec()]);
    let router = match TokenRouter::new(spec, [(1u8, &ta[..]), (2u8, &tb[..])]) {
        Ok(r) => r,
        Err(_) => {
            assert_eq!(a, b, "only a shared token is refused");
            return;
        }
    };
    match spec.split(datagram) {
        None => assert!(datagram.len() < n),
        Some(s) => {
            let mut whole = Vec::new();
            match at {
                TokenAt::Prefix => {
                    whole.extend_from_slice(s.token);
                    whole.extend_from_slice(&datagram[s.body.clone()]);
                }
                TokenAt::Suffix => {
                    whole.extend_from_slice(&datagram[s.body.clone()]);
                    whole.extend_from_slice(s.token);
                }
            }
            assert_eq!(whole, datagram);
            let want = if s.token == a {
                Ok((1, s.body.clone()))
            } else if s.token == b {
                Ok((2, s.body.clone()))
            } else {
                Err(Unrouted::UnknownToken)
            };
            assert_eq!(router.route(datagram), want);
        }
    }
});
