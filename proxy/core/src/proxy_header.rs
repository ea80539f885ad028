//! The PROXY protocol version 2 header (HAProxy's spec, "2.2. Binary header format"), for
//! datagrams: the proxy prepends one to every datagram it sends a replica, naming the player
//! (source) and the listener it reached (destination), so that the game (or the anchor in its
//! pod) knows the player whichever proxy carried it.
//!
//! ```text
//! 12 bytes  signature \r\n\r\n\0\r\nQUIT\n
//!  1 byte   version (2) << 4 | command (0 LOCAL, 1 PROXY)
//!  1 byte   family << 4 | transport (INET 1, INET6 2; STREAM 1, DGRAM 2)
//!  2 bytes  length of what follows, big-endian
//!  INET:    src addr 4, dst addr 4, src port 2, dst port 2
//!  INET6:   src addr 16, dst addr 16, src port 2, dst port 2
//!  TLVs     type 1, length 2, value (skipped)
//! ```
//!
//! Encoding writes into a caller's fixed buffer; decoding borrows the datagram. Neither
//! allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest header [`encode`] writes (IPv6, no TLV).
pub const MAX_ENCODED: usize = 16 + 36;

const VERSION: u8 = 0x20;
const LOCAL: u8 = 0x0;
const PROXY: u8 = 0x1;
const INET: u8 = 0x10;
const INET6: u8 = 0x20;
const UNSPEC: u8 = 0x00;
const DGRAM: u8 = 0x02;

/// What the proxy prepends to every datagram it sends a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaHeader {
    /// A PROXY protocol v2 header naming the player and the listener.
    ProxyV2,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `LOCAL`: sent by the proxy on its own behalf (a health check); no player.
    Local,
    /// `PROXY` with addresses: `source` is the player, `destination` the address it reached.
    Proxy {
        /// The player.
        source: SocketAddr,
        /// The listener the player sent to.
        destination: SocketAddr,
    },
    /// `PROXY` with an unspecified (or UNIX) family: a player the sender could not name.
    Unknown,
}

/// Why a datagram does not start with a usable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than the fixed 16 bytes, or than the length it announces.
    #[error("truncated PROXY header")]
    Truncated,
    /// Not the version 2 signature.
    #[error("no PROXY v2 signature")]
    Signature,
    /// Version other than 2, or a command other than LOCAL and PROXY.
    #[error("unsupported PROXY version or command {0:#04x}")]
    Version(u8),
    /// A family or transport this reader does not take (a stream, say).
    #[error("unsupported PROXY family/transport {0:#04x}")]
    Family(u8),
    /// The length is shorter than the family's addresses.
    #[error("PROXY header length {0} too short for its addresses")]
    Length(usize),
}

impl HeaderError {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderError::Truncated => "truncated",
            HeaderError::Signature => "no_signature",
            HeaderError::Version(_) => "version",
            HeaderError::Family(_) => "family",
            HeaderError::Length(_) => "length",
        }
    }
}

/// Writes a `PROXY` header for a datagram from `source` to `destination` into `out` and
/// returns its length. Mixed families are written as IPv6 with the IPv4 address mapped.
pub fn encode(source: SocketAddr, destination: SocketAddr, out: &mut [u8; MAX_ENCODED]) -> usize {
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION | PROXY;
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[13] = INET | DGRAM;
            out[14..16].copy_from_slice(&12u16.to_be_bytes());
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            out[24..26].copy_from_slice(&source.port().to_be_bytes());
            out[26..28].copy_from_slice(&destination.port().to_be_bytes());
            28
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out[13] = INET6 | DGRAM;
            out[14..16].copy_from_slice(&36u16.to_be_bytes());
            out[16..32].copy_from_slice(&v6(s).octets());
            out[32..48].copy_from_slice(&v6(d).octets());
            out[48..50].copy_from_slice(&source.port().to_be_bytes());
            out[50..52].copy_from_slice(&destination.port().to_be_bytes());
            52
        }
    }
}

/// Reads the header at the start of `datagram`; returns it and where the payload starts
/// (after any TLVs, which are skipped).
pub fn decode(datagram: &[u8]) -> Result<(Header, usize), HeaderError> {
    if datagram.len() < 16 {
        // A datagram that cannot hold the signature is not a header at all.
        return Err(
            if datagram.starts_with(&SIGNATURE[..datagram.len().min(12)]) {
                HeaderError::Truncated
            } else {
                HeaderError::Signature
            },
        );
    }
    if datagram[..12] != SIGNATURE {
        return Err(HeaderError::Signature);
    }
    let vc = datagram[12];
    if vc & 0xF0 != VERSION || !matches!(vc & 0x0F, LOCAL | PROXY) {
        return Err(HeaderError::Version(vc));
    }
    let len = usize::from(u16::from_be_bytes([datagram[14], datagram[15]]));
    let end = 16 + len;
    if datagram.len() < end {
        return Err(HeaderError::Truncated);
    }
    if vc & 0x0F == LOCAL {
        // The receiver must ignore a LOCAL header's addresses, whatever they are.
        return Ok((Header::Local, end));
    }
    let body = &datagram[16..end];
    let ft = datagram[13];
    let header = match ft {
        f if f == INET | DGRAM => {
            if len < 12 {
                return Err(HeaderError::Length(len));
            }
            let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            Header::Proxy {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            }
        }
        f if f == INET6 | DGRAM => {
            if len < 36 {
                return Err(HeaderError::Length(len));
            }
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[at..at + 16]);
                canonical(Ipv6Addr::from(o))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            Header::Proxy {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC, or a UNIX datagram socket: the sender knows no player address.
        f if f >> 4 == UNSPEC >> 4 || f == 0x32 => Header::Unknown,
        other => return Err(HeaderError::Family(other)),
    };
    Ok((header, end))
}

/// An IPv4-mapped address as the IPv4 address it is: one player, one identity.
fn canonical(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn encoded(src: &str, dst: &str) -> Vec<u8> {
        let mut out = [0u8; MAX_ENCODED];
        let n = encode(addr(src), addr(dst), &mut out);
        out[..n].to_vec()
    }

    #[test]
    fn ipv4_matches_the_spec_byte_for_byte() {
        let h = encoded("192.0.2.7:51234", "198.51.100.1:7777");
        let want: Vec<u8> = [
            &SIGNATURE[..],
            &[0x21, 0x12, 0x00, 0x0C],
            &[192, 0, 2, 7, 198, 51, 100, 1],
            &51234u16.to_be_bytes(),
            &7777u16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(h, want);
        let mut datagram = h.clone();
        datagram.extend_from_slice(b"payload");
        assert_eq!(
            decode(&datagram),
            Ok((
                Header::Proxy {
                    source: addr("192.0.2.7:51234"),
                    destination: addr("198.51.100.1:7777"),
                },
                28
            ))
        );
    }

    #[test]
    fn ipv6_and_mixed_families() {
        let h = encoded("[2001:db8::7]:40000", "[2001:db8::1]:7777");
        assert_eq!(&h[12..16], &[0x21, 0x22, 0x00, 0x24]);
        assert_eq!(h.len(), 52);
        assert_eq!(
            decode(&h).unwrap().0,
            Header::Proxy {
                source: addr("[2001:db8::7]:40000"),
                destination: addr("[2001:db8::1]:7777"),
            }
        );
        // An IPv4 player on an IPv6 listener: written mapped, read back as IPv4.
        let h = encoded("192.0.2.7:1", "[2001:db8::1]:7777");
        assert_eq!(h[13], 0x22);
        assert_eq!(
            decode(&h).unwrap().0,
            Header::Proxy {
                source: addr("192.0.2.7:1"),
                destination: addr("[2001:db8::1]:7777"),
            }
        );
    }

    #[test]
    fn tlvs_are_skipped_and_local_carries_no_player() {
        let mut h = encoded("192.0.2.7:1", "198.51.100.1:2");
        // One PP2_TYPE_NOOP TLV of 3 bytes: the length grows by 6.
        h[15] += 6;
        h.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
        h.extend_from_slice(b"game");
        let (header, at) = decode(&h).unwrap();
        assert!(matches!(header, Header::Proxy { .. }));
        assert_eq!(&h[at..], b"game");
        // LOCAL (a health check): addresses ignored, whatever the family says.
        let mut local = encoded("192.0.2.7:1", "198.51.100.1:2");
        local[12] = 0x20;
        local[13] = 0x00;
        assert_eq!(decode(&local), Ok((Header::Local, 28)));
        // PROXY over UNSPEC: no player named.
        let mut unspec = SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(decode(&unspec), Ok((Header::Unknown, 16)));
    }

    #[test]
    fn bad_headers_are_refused_with_a_reason() {
        let good = encoded("192.0.2.7:1", "198.51.100.1:2");
        assert_eq!(decode(&good[..10]), Err(HeaderError::Truncated));
        assert_eq!(decode(&good[..20]), Err(HeaderError::Truncated));
        assert_eq!(decode(b"hello"), Err(HeaderError::Signature));
        assert_eq!(decode(b""), Err(HeaderError::Truncated));
        let mut wrong = good.clone();
        wrong[3] = b'x';
        assert_eq!(decode(&wrong), Err(HeaderError::Signature));
        // Version 1's text form is not version 2.
        assert_eq!(
            decode(b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n"),
            Err(HeaderError::Signature)
        );
        let mut v3 = good.clone();
        v3[12] = 0x31;
        assert_eq!(decode(&v3), Err(HeaderError::Version(0x31)));
        let mut cmd = good.clone();
        cmd[12] = 0x22;
        assert_eq!(decode(&cmd), Err(HeaderError::Version(0x22)));
        let mut stream = good.clone();
        stream[13] = 0x11;
        assert_eq!(decode(&stream), Err(HeaderError::Family(0x11)));
        let mut short = good.clone();
        short[15] = 8;
        assert_eq!(decode(&short), Err(HeaderError::Length(8)));
    }
}
