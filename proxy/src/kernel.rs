//! The kernel's own UDP counters, read at scrape time: datagrams dropped on the front sockets
//! (`/proc/net/udp*`, by socket inode) and receive-buffer errors of the network namespace
//! (`/proc/net/snmp*`). Nothing here runs per packet.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// The inode that names `socket` in `/proc/net/udp*`.
pub fn socket_inode(socket: &impl AsRawFd) -> Option<u64> {
    let path = format!("/proc/self/fd/{}", socket.as_raw_fd());
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Sum of the `drops` column of the sockets in `inodes`, from a `/proc/net/udp` or
/// `/proc/net/udp6` table.
pub fn drops_of(table: &str, inodes: &[u64]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(9)?.parse().ok()?;
            let drops: u64 = fields.get(12)?.parse().ok()?;
            inodes.contains(&inode).then_some(drops)
        })
        .sum()
}

/// `RcvbufErrors` of the `Udp:` rows of `/proc/net/snmp` plus `Udp6RcvbufErrors` of
/// `/proc/net/snmp6`.
pub fn receive_buffer_errors(snmp: &str, snmp6: &str) -> u64 {
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let v4 = match (rows.next(), rows.next()) {
        (Some(names), Some(values)) => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "RcvbufErrors")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(0),
        _ => 0,
    };
    let v6 = snmp6
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(n, _)| *n == "Udp6RcvbufErrors")
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    v4 + v6
}

/// Reads both counters now: (front socket drops, namespace receive-buffer errors).
pub fn read(front_inodes: &[u64]) -> (u64, u64) {
    let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let front = drops_of(&text("/proc/net/udp"), front_inodes)
        + drops_of(&text("/proc/net/udp6"), front_inodes);
    let rcvbuf = receive_buffer_errors(&text("/proc/net/snmp"), &text("/proc/net/snmp6"));
    (front, rcvbuf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  411: 0100007F:1E61 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5551 2 0000000000000000 17
  412: 0100007F:1E61 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5552 2 0000000000000000 3
  900: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9999 2 0000000000000000 1000
";

    #[test]
    fn front_drops_are_summed_over_our_inodes_only() {
        assert_eq!(drops_of(UDP, &[5551, 5552]), 20);
        assert_eq!(drops_of(UDP, &[]), 0);
        assert_eq!(drops_of("garbage\nmore garbage", &[5551]), 0);
    }

    #[test]
    fn receive_buffer_errors_of_both_families() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 10 0 7 12 5 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let snmp6 = "Udp6InDatagrams                 \t3\nUdp6RcvbufErrors                \t2\n";
        assert_eq!(receive_buffer_errors(snmp, snmp6), 7);
        assert_eq!(receive_buffer_errors("", ""), 0);
    }

    #[test]
    fn a_real_socket_is_found_by_its_inode() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(&s).expect("inode");
        // The kernel prints the table in pieces while other tests open and close sockets, so
        // one read may skip a line: a few reads must find it.
        let found = (0..20).any(|_| {
            let table = std::fs::read_to_string("/proc/net/udp").unwrap();
            table
                .lines()
                .any(|l| l.split_whitespace().nth(9) == Some(&inode.to_string()))
        });
        assert!(found, "inode {inode} not in /proc/net/udp");
        assert_eq!(read(&[inode]).0, 0);
    }
}
