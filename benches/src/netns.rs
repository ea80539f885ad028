//! Network namespaces joined to the host by veth pairs: one for the load generator, and one per
//! replica for the jitter runs.
//!
//! Quilkin ignores clients with loopback source addresses, so the load must come from a real
//! interface; every scenario then uses the same path, so the baseline stays comparable. A
//! replica in a namespace of its own gets a link of its own, whose delay `tc netem` can vary
//! independently of the others'.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The namespace, removed (with its veth pair) on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// The host's end of the veth pair: what the load generator sends to.
    pub host_ip: Ipv4Addr,
    /// The namespace's end: the load generator's source address.
    pub ns_ip: Ipv4Addr,
    host_if: String,
    ns_if: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates `sb<pid>` with 10.231.x.1 (host) and 10.231.x.2 (namespace) on a /30.
    pub fn create() -> anyhow::Result<Self> {
        Self::make("", 231)
    }

    /// Creates `sb<pid>r<i>` for replica `i` (0…15) with 10.232+i.x.1 (host) and .2 (the
    /// replica) on a /30, and a default route to the host, so that the replica answers
    /// whichever host address a datagram came from.
    pub fn replica(i: u8) -> anyhow::Result<Self> {
        anyhow::ensure!(i < 16, "at most 16 replica namespaces");
        let ns = Self::make(&format!("r{i}"), 232 + i)?;
        ip(&[
            "netns",
            "exec",
            &ns.name,
            "ip",
            "route",
            "add",
            "default",
            "via",
            &ns.host_ip.to_string(),
        ])?;
        Ok(ns)
    }

    fn make(suffix: &str, octet: u8) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let name = format!("sb{pid}{suffix}");
        let host_if = format!("sbh{pid}{suffix}");
        let ns_if = format!("sbn{pid}{suffix}");
        let x = (pid % 60) as u8 * 4;
        let host_ip = Ipv4Addr::new(10, octet, x / 64 + 1, (x % 64) + 1);
        let ns_ip = Ipv4Addr::new(10, octet, x / 64 + 1, (x % 64) + 2);
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name: name.clone(),
            host_ip,
            ns_ip,
            host_if: host_if.clone(),
            ns_if: ns_if.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &name, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        in_ns(&["link", "set", &ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Delays what leaves the namespace (`tc netem` on its end of the veth), e.g.
    /// `["delay", "2ms", "1.5ms", "distribution", "normal"]`.
    pub fn netem(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "tc",
                "qdisc",
                "add",
                "dev",
                &self.ns_if,
            ])
            .args(["root", "netem"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run `tc` (iproute2)")?;
        if !out.status.success() {
            bail!(
                "tc qdisc add … netem {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The arguments that run `program` inside the namespace through `ip netns exec` (which
    /// execs it: the process is the program's).
    pub fn exec_args(&self, program: &std::path::Path) -> Vec<String> {
        vec![
            "netns".into(),
            "exec".into(),
            self.name.clone(),
            program.display().to_string(),
        ]
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

/// Removes namespaces (and so their veth pairs) left by runs that were killed: `sb<pid>`
/// whose process is gone.
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        // sb<pid> or sb<pid>r<i>.
        let Some(rest) = name.strip_prefix("sb") else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["link", "del", &format!("sbh{rest}")]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
