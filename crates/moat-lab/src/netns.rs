//! Throw-away network namespaces and veth pairs, removed on drop (also when
//! a test panics). Names carry a recognisable prefix and the process id.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Every namespace this crate creates starts with this.
pub const PREFIX: &str = "moat-t";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// `ip ARGS...` (panics with the error: for tests and scenario setup).
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `moat-t-<tag>-<pid>-<seq>`.
    pub fn new(tag: &str) -> io::Result<NetNs> {
        let name = format!(
            "{PREFIX}-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs a program inside the namespace (a new process).
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// Sockets opened and interfaces looked up meanwhile are the namespace's.
    pub fn enter(&self) -> io::Result<Entered> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(format!("/run/netns/{}", self.name))?;
        setns(&target)?;
        Ok(Entered { original })
    }

    /// Interface index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let _in = self.enter().expect("enter namespace");
        let c = std::ffi::CString::new(dev).expect("interface name");
        // SAFETY: `c` is a valid NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(i, 0, "no interface {dev} in {}", self.name);
        i
    }

    /// MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> [u8; 6] {
        let out = self
            .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
            .unwrap_or_else(|e| panic!("{e}"));
        parse_mac(String::from_utf8_lossy(&out.stdout).trim())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an open namespace file descriptor.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread is inside a namespace; dropping returns it.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns(&self.original).expect("returning to the original network namespace");
    }
}

/// "aa:bb:cc:dd:ee:ff" -> bytes.
pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16).unwrap_or_else(|_| panic!("bad MAC {s}"));
    }
    m
}

/// Creates a veth pair `a` in `ns_a` and `b` in `ns_b`, both up.
pub fn veth(ns_a: &NetNs, a: &str, ns_b: &NetNs, b: &str) {
    ns_a.ip(&[
        "link",
        "add",
        a,
        "type",
        "veth",
        "peer",
        "name",
        b,
        "netns",
        ns_b.name(),
    ]);
    ns_a.ip(&["link", "set", a, "up"]);
    ns_b.ip(&["link", "set", b, "up"]);
}

/// Like [`veth`], with `queues` transmit and receive queues on each end
/// (one per CPU: a sender's frames land on its CPU's queue).
pub fn veth_queues(ns_a: &NetNs, a: &str, ns_b: &NetNs, b: &str, queues: usize) {
    let q = queues.to_string();
    let counts = ["numtxqueues", &q, "numrxqueues", &q];
    let mut args = vec!["link", "add", a];
    args.extend(counts);
    args.extend(["type", "veth", "peer", "name", b]);
    args.extend(counts);
    args.extend(["netns", ns_b.name()]);
    ns_a.ip(&args);
    ns_a.ip(&["link", "set", a, "up"]);
    ns_b.ip(&["link", "set", b, "up"]);
}
