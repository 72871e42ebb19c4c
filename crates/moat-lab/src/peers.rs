//! What an operator would otherwise use, set up for the benchmark suite
//! inside the suite's own namespaces: xdp-filter (xdp-tools), nftables in a
//! netdev ingress chain (linear rules, or one rule and a set), iptables in
//! the raw table's PREROUTING chain, and the kernel's forwarding path with
//! a policy-routing rule per customer and an nftables forward filter.
//! iptables is the legacy (x_tables) backend: the path of configurators
//! that predate nftables.
//!
//! Every rule set has the shape of moat's benchmark rules: `n` rules of a
//! source /24 and a UDP destination port, of which only the last matches
//! the flood (from 192.0.2.0/24 to port 9999).

use std::{fmt::Write as _, path::PathBuf, process::Command};

use crate::netns::{run, NetNs};

/// The flood's destination port (matched by the last rule of every set).
pub const FLOOD_PORT: u16 = 9999;

/// Source prefix and destination port of rule `i` of `n`.
pub fn rule(i: usize, n: usize) -> (String, u16) {
    if i + 1 == n {
        ("192.0.2.0/24".into(), FLOOD_PORT)
    } else {
        (format!("10.{}.{}.0/24", i / 256, i % 256), 10_000 + i as u16)
    }
}

/// A file of this process's own under the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> std::io::Result<TempFile> {
        let p = std::env::temp_dir().join(format!("moat-suite-{}-{tag}", std::process::id()));
        std::fs::write(&p, text)?;
        Ok(TempFile(p))
    }
    fn path(&self) -> &str {
        self.0.to_str().expect("temporary path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The nftables netdev table for `dev`: `n` linear rules, or (`set`) one
/// rule looking the (source, port) pair up in an interval set of `n`
/// elements. The matching rule counts what it drops.
pub fn nft_ingress(dev: &str, n: usize, set: bool) -> String {
    let mut s = String::from("table netdev moat_bench {\n");
    if set {
        s.push_str("  set blocked {\n    type ipv4_addr . inet_service\n    flags interval\n    elements = {\n");
        for i in 0..n {
            let (src, port) = rule(i, n);
            let _ = writeln!(s, "      {src} . {port},");
        }
        s.push_str("    }\n  }\n");
    }
    let _ = writeln!(
        s,
        "  chain ingress {{\n    type filter hook ingress device \"{dev}\" priority 0; policy accept;"
    );
    if set {
        s.push_str("    ip saddr . udp dport @blocked counter drop\n");
    } else {
        for i in 0..n {
            let (src, port) = rule(i, n);
            let count = if i + 1 == n { "counter " } else { "" };
            let _ = writeln!(s, "    ip saddr {src} udp dport {port} {count}drop");
        }
    }
    s.push_str("  }\n}\n");
    s
}

/// The iptables-restore input: `n` rules in raw PREROUTING.
pub fn iptables_raw(n: usize) -> String {
    let mut s = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..n {
        let (src, port) = rule(i, n);
        let _ = writeln!(s, "-A PREROUTING -s {src} -p udp -m udp --dport {port} -j DROP");
    }
    s.push_str("COMMIT\n");
    s
}

/// An nftables forward filter of `n` rules in an inet table, none of which
/// matches the benchmark's clean traffic (sources 192.0.2.0/24): every
/// packet walks all of them, then the chain's accept policy.
pub fn nft_forward(n: usize) -> String {
    let mut s = String::from(
        "table inet moat_bench {\n  chain forward {\n    type filter hook forward priority 0; policy accept;\n",
    );
    for i in 0..n {
        let _ = writeln!(
            s,
            "    ip saddr 10.{}.{}.0/24 udp dport {} drop",
            i / 256,
            i % 256,
            10_000 + i
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// Loads an nftables ruleset into `ns`.
pub fn nft_load(ns: &NetNs, ruleset: &str) -> std::io::Result<()> {
    let f = TempFile::new("nft", ruleset)?;
    ns.exec("nft", &["-f", f.path()]).map(|_| ())
}

/// Loads an iptables-restore input into `ns`.
pub fn iptables_load(ns: &NetNs, rules: &str) -> std::io::Result<()> {
    let f = TempFile::new("iptables", rules)?;
    ns.exec("iptables-legacy-restore", &[f.path()]).map(|_| ())
}

/// The packets counted by the first `counter` of `ns`'s nftables ruleset.
pub fn nft_counted(ns: &NetNs) -> std::io::Result<u64> {
    let out = ns.exec("nft", &["list", "ruleset"])?;
    first_counter(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| std::io::Error::other("no counter in the nftables ruleset"))
}

/// The packets of the first `counter packets N bytes M` in `nft list` output.
fn first_counter(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace().skip_while(|w| *w != "counter");
    match (words.next(), words.next(), words.next()) {
        (Some("counter"), Some("packets"), Some(n)) => n.parse().ok(),
        _ => None,
    }
}

/// The sum of the packet column of `iptables -L -v -x -n` output.
fn packet_column(text: &str) -> u64 {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// The packets the rules of raw PREROUTING in `ns` matched, in all.
pub fn iptables_counted(ns: &NetNs) -> std::io::Result<u64> {
    let out = ns.exec("iptables-legacy", &["-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n"])?;
    Ok(packet_column(&String::from_utf8_lossy(&out.stdout)))
}

/// xdp-filter on `dev` of `ns` dropping UDP to `n` destination ports (its
/// rule model has no source prefixes, nor prefix-and-port pairs: a port
/// alone is the nearest rule it has), the flood's port among them.
/// Unloaded on drop.
pub struct XdpFilter<'a> {
    ns: &'a NetNs,
    dev: String,
    /// libxdp's directory on the BPF filesystem, when this load made it.
    made_dir: Option<PathBuf>,
}

/// Where libxdp (under xdp-filter) keeps its pins.
const LIBXDP_DIR: &str = "/sys/fs/bpf/xdp";

impl<'a> XdpFilter<'a> {
    pub fn load(ns: &'a NetNs, dev: &str, n: usize) -> std::io::Result<XdpFilter<'a>> {
        // xdp-filter keeps its maps on the host's BPF filesystem: enter
        // only the network namespace (`ip netns exec` would hide /sys/fs/bpf).
        let dir = PathBuf::from(LIBXDP_DIR);
        let f = XdpFilter {
            ns,
            dev: dev.to_string(),
            made_dir: (!dir.exists()).then_some(dir),
        };
        f.cmd(&[
            "load",
            dev,
            "--mode",
            "native",
            "--policy",
            "allow",
            "--features",
            "udp,ipv4",
        ])?;
        for i in 0..n {
            let (_, port) = rule(i, n);
            f.cmd(&["port", &port.to_string(), "--mode", "dst", "--proto", "udp"])?;
        }
        Ok(f)
    }

    fn cmd(&self, args: &[&str]) -> std::io::Result<String> {
        let out = run(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns.name()))
            .arg("xdp-filter")
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `xdp-filter status` (its counters).
    pub fn status(&self) -> std::io::Result<String> {
        self.cmd(&["status"])
    }
}

impl Drop for XdpFilter<'_> {
    fn drop(&mut self) {
        let _ = self.cmd(&["unload", &self.dev.clone()]);
        if let Some(dir) = &self.made_dir {
            // Only if empty: anything else there is not ours.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Version line of a peer tool (`xdp-filter`, `nft`, `iptables-legacy`), or why not.
pub fn version(tool: &str) -> String {
    // xdp-filter answers --version only after a command.
    let args: &[&str] = if tool == "xdp-filter" {
        &["status", "--version"]
    } else {
        &["--version"]
    };
    match Command::new(tool).args(args).output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(if o.stdout.is_empty() { &o.stderr } else { &o.stdout }).into_owned();
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("not available ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_rule_matches_the_flood() {
        for n in [1usize, 100, 1024] {
            let rules: Vec<(String, u16)> = (0..n).map(|i| rule(i, n)).collect();
            let matching: Vec<usize> = rules
                .iter()
                .enumerate()
                .filter(|(_, (src, port))| src == "192.0.2.0/24" && *port == FLOOD_PORT)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(matching, vec![n - 1]);
            let distinct: std::collections::BTreeSet<&(String, u16)> = rules.iter().collect();
            assert_eq!(distinct.len(), n, "rules repeat");
        }
    }

    #[test]
    fn rule_sets_have_n_rules() {
        let linear = nft_ingress("s0", 100, false);
        assert_eq!(linear.matches(" drop\n").count(), 100);
        assert_eq!(linear.matches("counter").count(), 1);
        let set = nft_ingress("s0", 100, true);
        let elements = set
            .lines()
            .filter(|l| l.contains(" . ") && l.trim_end().ends_with(','))
            .count();
        assert_eq!(elements, 100);
        assert_eq!(set.matches("@blocked").count(), 1);
        assert_eq!(iptables_raw(1024).matches("-j DROP").count(), 1024);
        assert_eq!(nft_forward(100).matches(" drop\n").count(), 100);
    }

    #[test]
    fn counters_are_read_from_tool_output() {
        let nft = "table netdev moat_bench {\n chain ingress {\n ip saddr 192.0.2.0/24 udp dport 9999 counter packets 1234 bytes 78976 drop\n }\n}";
        assert_eq!(first_counter(nft), Some(1234));
        assert_eq!(first_counter("table netdev x { }"), None);
        let ipt = "Chain PREROUTING (policy ACCEPT 0 packets, 0 bytes)\n    pkts      bytes target prot opt in out source destination\n       0        0 DROP   17   --  *  *  10.0.0.0/24 0.0.0.0/0 udp dpt:10000\n    4321   276544 DROP   17   --  *  *  192.0.2.0/24 0.0.0.0/0 udp dpt:9999\n";
        assert_eq!(packet_column(ipt), 4321);
    }
}
