//! PROXY v2 headers from arbitrary bytes, as the anchor reads them off the network: decoding
//! never panics and never points past the datagram; a header built from the bytes' addresses
//! decodes back to those addresses, with the payload where it was put.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use spotable_core::proxy_header::{Header, MAX_ENCODED, decode, encode};

fn addr(b: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    Some(match b.get(2)? & 1 {
        0 => SocketAddr::new(Ipv4Addr::from(<[u8; 4]>::try_from(b.get(3..7)?).ok()?).into(), port),
        _ => SocketAddr::new(Ipv6Addr::from(<[u8; 16]>::try_from(b.get(3..19)?).ok()?).into(), port),
    })
}

/// The address as the decoder gives it back: an IPv4-mapped IPv6 address is its IPv4 one.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_, at)) = decode(data) {
        assert!(at <= data.len());
    }
    let (Some(src), Some(dst)) = (addr(data), data.get(19..).and_then(addr)) else {
        return;
    };
    let mut h = [0u8; MAX_ENCODED];
    let n = encode(src, dst, &mut h);
    let mut datagram = h[..n].to_vec();
    datagram.extend_from_slice(data);
    let (header, at) = decode(&datagram).expect("our own header decodes");
    assert_eq!(at, n);
    assert_eq!(
        header,
        Header::Proxy {
            source: canonical(src),
            destination: canonical(dst),
        }
    );
});
