//! UDP datagrams out of a capture file, as `tcpdump -w` writes it (the classic pcap format:
//! microsecond or nanosecond timestamps, either byte order), so `spotable-bench fit` can
//! replay a studio's real traffic.
//!
//! Link layers: Ethernet (with 802.1Q/802.1ad tags), raw IP, Linux cooked (SLL and SLL2, what
//! `tcpdump -i any` writes) and BSD loopback. IPv4 and IPv6 (extension headers skipped).
//! Whatever is not a whole, unfragmented UDP datagram is counted and skipped, never a panic:
//! the input comes from outside and is fuzzed (`proxy/fuzz`, target `pcap`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// One UDP datagram of the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// When it was captured (since the Unix epoch).
    pub at: Duration,
    /// Its source.
    pub src: SocketAddr,
    /// Its destination.
    pub dst: SocketAddr,
    /// Its payload.
    pub payload: &'a [u8],
}

/// What a capture held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capture<'a> {
    /// The UDP datagrams, in capture order.
    pub datagrams: Vec<Datagram<'a>>,
    /// Packets that were not UDP over IP (TCP, ARP…).
    pub other: u64,
    /// UDP datagrams cut short by the capture's snapshot length, or IP fragments.
    pub incomplete: u64,
}

/// Why a capture could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PcapError {
    /// Not a pcap file.
    #[error("not a pcap capture (magic {0:#010x}); a pcapng file converts with `editcap -F pcap`")]
    Magic(u32),
    /// A pcapng file.
    #[error(
        "a pcapng capture: write pcap (`tcpdump -w`), or convert with `editcap -F pcap IN OUT`"
    )]
    Pcapng,
    /// Shorter than its header.
    #[error("truncated: {0} bytes, shorter than the pcap header")]
    Truncated(usize),
    /// A link layer this reader does not know.
    #[error("link type {0} is not supported (Ethernet, raw IP, Linux cooked, loopback are)")]
    LinkType(u32),
}

const PCAPNG: u32 = 0x0a0d_0d0a;

/// Reads every UDP datagram of the pcap file in `bytes`. A record cut short at the end of the
/// file (a capture still being written) ends the list.
pub fn read(bytes: &[u8]) -> Result<Capture<'_>, PcapError> {
    let header = bytes.get(..24).ok_or(PcapError::Truncated(bytes.len()))?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let (little, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xd4c3_b2a1 => (false, false),
        0xa1b2_3c4d => (true, true),
        0x4d3c_b2a1 => (false, true),
        PCAPNG => return Err(PcapError::Pcapng),
        other => return Err(PcapError::Magic(other)),
    };
    let u32_at = |b: &[u8], i: usize| {
        let w = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if little {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let link = u32_at(header, 20) & 0x0fff_ffff;
    if !matches!(link, 0 | 1 | 12 | 101 | 113 | 228 | 229 | 276) {
        return Err(PcapError::LinkType(link));
    }
    let mut capture = Capture::default();
    let mut rest = &bytes[24..];
    while let Some(record) = rest.get(..16) {
        let secs = u64::from(u32_at(record, 0));
        let frac = u64::from(u32_at(record, 4));
        let included = u32_at(record, 8) as usize;
        let Some(frame) = rest.get(16..16usize.saturating_add(included)) else {
            break;
        };
        rest = &rest[16 + included..];
        let at = Duration::from_secs(secs)
            + if nanos {
                Duration::from_nanos(frac.min(999_999_999))
            } else {
                Duration::from_micros(frac.min(999_999))
            };
        match ip_of(link, frame).map(udp_of) {
            Some(Ok((src, dst, payload))) => capture.datagrams.push(Datagram {
                at,
                src,
                dst,
                payload,
            }),
            Some(Err(Skip::Incomplete)) => capture.incomplete += 1,
            Some(Err(Skip::Other)) | None => capture.other += 1,
        }
    }
    Ok(capture)
}

enum Skip {
    Other,
    Incomplete,
}

/// The IP packet inside a frame of `link`.
fn ip_of(link: u32, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype, ip) = match link {
        // BSD loopback: a 4-byte address family in the host's order; the version tells.
        0 => return frame.get(4..),
        1 => {
            let mut offset = 12;
            let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
            // 802.1Q and 802.1ad tags, possibly stacked.
            while matches!(ethertype, 0x8100 | 0x88a8) {
                offset += 4;
                ethertype = u16::from_be_bytes([*frame.get(offset)?, *frame.get(offset + 1)?]);
            }
            (ethertype, frame.get(offset + 2..)?)
        }
        12 | 101 | 228 | 229 => return Some(frame),
        113 => (
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        276 => (
            u16::from_be_bytes([*frame.first()?, *frame.get(1)?]),
            frame.get(20..)?,
        ),
        _ => return None,
    };
    matches!(ethertype, 0x0800 | 0x86dd).then_some(ip)
}

/// The UDP datagram inside an IP packet: source, destination, payload.
fn udp_of(ip: &[u8]) -> Result<(SocketAddr, SocketAddr, &[u8]), Skip> {
    let (src, dst, udp) = match ip.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20 || ip.len() < ihl {
                return Err(Skip::Other);
            }
            if ip[9] != 17 {
                return Err(Skip::Other);
            }
            let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
            if flags_offset & 0x3fff != 0 {
                // More fragments, or a fragment past the first.
                return Err(Skip::Incomplete);
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let end = total.clamp(ihl, ip.len());
            let a = |i: usize| IpAddr::V4(Ipv4Addr::new(ip[i], ip[i + 1], ip[i + 2], ip[i + 3]));
            (a(12), a(16), &ip[ihl..end])
        }
        Some(6) => {
            if ip.len() < 40 {
                return Err(Skip::Other);
            }
            let a = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&ip[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            let mut next = ip[6];
            let mut at = 40;
            // Hop-by-hop, routing and destination options; a fragment header is incomplete.
            loop {
                match next {
                    17 => break,
                    0 | 43 | 60 => {
                        let (Some(&n), Some(&len)) = (ip.get(at), ip.get(at + 1)) else {
                            return Err(Skip::Other);
                        };
                        next = n;
                        at += (usize::from(len) + 1) * 8;
                    }
                    44 => return Err(Skip::Incomplete),
                    _ => return Err(Skip::Other),
                }
            }
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let end = (40 + payload_len).min(ip.len());
            (a(8), a(24), ip.get(at..end).ok_or(Skip::Other)?)
        }
        _ => return Err(Skip::Other),
    };
    let header = udp.get(..8).ok_or(Skip::Incomplete)?;
    let port = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let len = usize::from(port(4));
    if len < 8 {
        return Err(Skip::Other);
    }
    let payload = udp.get(8..len).ok_or(Skip::Incomplete)?;
    Ok((
        SocketAddr::new(src, port(0)),
        SocketAddr::new(dst, port(2)),
        payload,
    ))
}

/// Writes a capture of `datagrams` (raw IPv4 link type): what the tests replay, and a way to
/// hand `fit` traffic made by a program rather than captured.
pub fn write(datagrams: &[(Duration, SocketAddr, SocketAddr, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&101u32.to_le_bytes());
    for (at, src, dst, payload) in datagrams {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            continue;
        };
        let total = 28 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&s.octets());
        ip.extend_from_slice(&d.octets());
        ip.extend_from_slice(&src.port().to_be_bytes());
        ip.extend_from_slice(&dst.port().to_be_bytes());
        ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        out.extend_from_slice(&(at.as_secs() as u32).to_le_bytes());
        out.extend_from_slice(&at.subsec_micros().to_le_bytes());
        out.extend_from_slice(&(ip.len() as u32).to_le_bytes());
        out.extend_from_slice(&(ip.len() as u32).to_le_bytes());
        out.extend_from_slice(&ip);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_trip_through_the_writer() {
        let a = addr("10.0.0.2:40000");
        let s = addr("10.0.0.1:7777");
        let file = write(&[
            (Duration::from_millis(1500), a, s, b"hello"),
            (Duration::from_millis(1533), s, a, b""),
        ]);
        let c = read(&file).unwrap();
        assert_eq!(c.datagrams.len(), 2);
        assert_eq!(c.datagrams[0].payload, b"hello");
        assert_eq!((c.datagrams[0].src, c.datagrams[0].dst), (a, s));
        assert_eq!(c.datagrams[1].at, Duration::from_millis(1533));
        assert_eq!(c.datagrams[1].payload, b"");
        // A record cut short at the end is left out; the rest stands.
        let c = read(&file[..file.len() - 3]).unwrap();
        assert_eq!(c.datagrams.len(), 1);
    }

    /// An Ethernet frame (one VLAN tag) around an IPv4 UDP datagram, big-endian, nanoseconds.
    fn ethernet_be_ns(payload: &[u8], flags_offset: u16) -> Vec<u8> {
        let mut f = vec![0xff; 12];
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07, 0x08, 0x00]);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
        ];
        let total = (28 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        ip.extend_from_slice(&[0x9c, 0x40, 0x1e, 0x61]);
        ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(payload);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0; 4]); // Ethernet padding after the IP packet.
        let mut out = vec![0xa1, 0xb2, 0x3c, 0x4d, 0, 2, 0, 4];
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65_535u32.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&7u32.to_be_bytes());
        out.extend_from_slice(&5u32.to_be_bytes());
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(&f);
        out
    }

    #[test]
    fn ethernet_with_a_vlan_tag_big_endian_nanoseconds() {
        let file = ethernet_be_ns(b"input", 0x4000);
        let c = read(&file).unwrap();
        assert_eq!(c.datagrams.len(), 1);
        let d = c.datagrams[0];
        assert_eq!(d.payload, b"input", "the frame's padding is not payload");
        assert_eq!(d.src, addr("10.0.0.2:40000"));
        assert_eq!(d.dst, addr("10.0.0.1:7777"));
        assert_eq!(d.at, Duration::new(7, 5));
        // A first fragment (more to come) is incomplete, not a datagram.
        let fragment = ethernet_be_ns(b"input", 0x2000);
        let c = read(&fragment).unwrap();
        assert_eq!((c.datagrams.len(), c.incomplete), (0, 1));
    }

    #[test]
    fn what_is_not_a_pcap_says_what_it_is() {
        assert_eq!(read(b"short"), Err(PcapError::Truncated(5)));
        let mut ng = vec![0x0a, 0x0d, 0x0d, 0x0a];
        ng.resize(32, 0);
        assert_eq!(read(&ng), Err(PcapError::Pcapng));
        let mut weird = write(&[]);
        weird[20..24].copy_from_slice(&147u32.to_le_bytes());
        assert_eq!(read(&weird), Err(PcapError::LinkType(147)));
        assert!(matches!(read(&[0u8; 24]), Err(PcapError::Magic(0))));
    }
}
