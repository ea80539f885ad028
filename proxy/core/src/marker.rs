//! The loop marker: the traffic class a Spotable proxy gives every datagram it sends to a
//! replica, and by which any Spotable proxy knows such a datagram should it come back in as a
//! player's (two proxies named as each other's replica, a Service selecting the proxies' own
//! pods, an address that NATs back to a proxy).
//!
//! It rides in the IP header's DSCP field, which NAT (kube-proxy, IPVS, conntrack, a load
//! balancer's pass-through) carries unchanged while it rewrites addresses and ports, and
//! which costs nothing to set (a socket option, once per session socket) and one control
//! message to read. The code point is 47 (`101111`): in pool 2, which RFC 2474 keeps for
//! experimental and local use, so no standard traffic class (and no QoS profile a player's
//! network might apply) uses it; its class bits (`101`) are EF's, so a network that looks at
//! precedence only treats the proxy's traffic as real-time. The ECN bits are left alone.

/// The DSCP code point of a proxy's datagrams to replicas.
pub const DSCP: u8 = 47;

/// The IPv4 TOS (IPv6 traffic class) byte the proxy's session sockets send with: the DSCP,
/// ECN not-capable.
pub const TOS: u8 = DSCP << 2;

/// Whether a datagram with traffic class `tos` was sent to a replica by a Spotable proxy.
pub fn is_marked(tos: u8) -> bool {
    tos >> 2 == DSCP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_the_dscp_whatever_the_ecn_bits() {
        for ecn in 0..4 {
            assert!(is_marked(TOS | ecn));
        }
        // EF (46), AF41 (34), CS5 (40), best effort: players' own classes are never marked.
        for dscp in [0u8, 46, 34, 40, 48, 63] {
            assert!(!is_marked(dscp << 2), "{dscp}");
        }
        // Pool 2 (xxxx11): experimental and local use only.
        assert_eq!(DSCP & 0b11, 0b11);
    }
}
