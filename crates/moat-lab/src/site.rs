//! A customer site's GRE endpoint in userspace: a TUN device carries the
//! site's inner traffic, a raw GRE socket the encapsulated side, and a
//! thread moves packets between them (this kernel has no GRE netdevice).
//! With it, ordinary sockets at the site talk TCP through moat's tunnel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    gre::{self, RawGre},
    netns::NetNs,
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Packets moved by the endpoint, each way.
#[derive(Default)]
pub struct SiteCounters {
    pub encapsulated: AtomicU64,
    pub decapsulated: AtomicU64,
}

/// The running endpoint; stops and joins its thread on drop.
pub struct GreTunEndpoint {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<SiteCounters>,
    /// Tunnel keys whose GRE is currently decapsulated (the others are cut).
    open: Arc<Mutex<BTreeSet<Option<u32>>>>,
    /// Inner UDP source port -> key of the tunnel it last arrived through.
    flows: Arc<Mutex<BTreeMap<u16, Option<u32>>>>,
}

fn open_tun(name: &str) -> std::io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // struct ifreq: 16 bytes of name, then the flags.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF with a valid, large enough ifreq buffer.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

impl GreTunEndpoint {
    /// Creates TUN device `dev` in `site` holding `inner_addr`, routes the
    /// site's inner traffic into it (and only the GRE to `node_endpoint`
    /// out of the underlay), and bridges it to GRE with `key`. `mtu` must
    /// leave room for the outer headers on the underlay (1500 - 24, or - 28
    /// with a key): larger outer packets would be fragmented, and moat drops
    /// fragmented GRE.
    pub fn start(
        site: &NetNs,
        dev: &str,
        inner_addr: Ipv4Addr,
        mtu: u16,
        node_endpoint: Ipv4Addr,
        underlay_gateway: Ipv4Addr,
        key: Option<u32>,
    ) -> std::io::Result<GreTunEndpoint> {
        Self::start_multi(site, dev, inner_addr, mtu, node_endpoint, underlay_gateway, &[key], key)
    }

    /// Like [`GreTunEndpoint::start`] for several tunnels between the node
    /// and this site, told apart by their keys: GRE with any of `keys` is
    /// decapsulated into the TUN device, and the site's traffic goes back
    /// with `return_key`. The site also routes what arrives from the
    /// tunnels (as a customer router does), so health probes in reply
    /// style, whose inner source is the site's own address, are forwarded
    /// back to the node.
    #[allow(clippy::too_many_arguments)]
    pub fn start_multi(
        site: &NetNs,
        dev: &str,
        inner_addr: Ipv4Addr,
        mtu: u16,
        node_endpoint: Ipv4Addr,
        underlay_gateway: Ipv4Addr,
        keys: &[Option<u32>],
        return_key: Option<u32>,
    ) -> std::io::Result<GreTunEndpoint> {
        let key = return_key;
        let open: Arc<Mutex<BTreeSet<Option<u32>>>> = Arc::new(Mutex::new(keys.iter().copied().collect()));
        let (mut tun, sock) = {
            let _in = site.enter()?;
            (open_tun(dev)?, RawGre::open()?)
        };
        let addr = format!("{inner_addr}/32");
        // The site is IPv4 only: no IPv6 link-local chatter into the tunnel.
        site.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1");
        site.ip(&["addr", "add", &addr, "dev", dev]);
        site.ip(&["link", "set", dev, "mtu", &mtu.to_string(), "up"]);
        site.ip(&[
            "route",
            "replace",
            &format!("{node_endpoint}/32"),
            "via",
            &underlay_gateway.to_string(),
        ]);
        site.ip(&["route", "replace", "default", "dev", dev]);
        site.sysctl("net.ipv4.conf.all.forwarding", "1");
        site.sysctl("net.ipv4.conf.all.rp_filter", "0");
        site.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0");
        site.sysctl(&format!("net.ipv4.conf.{dev}.accept_local"), "1");

        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(SiteCounters::default());
        let flows: Arc<Mutex<BTreeMap<u16, Option<u32>>>> = Arc::default();
        let (stop2, counters2, open2, flows2) = (stop.clone(), counters.clone(), open.clone(), flows.clone());
        let mut tun_w = tun.try_clone()?;
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let mut fds = [
                    libc::pollfd {
                        fd: tun.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: sock.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
                if n <= 0 {
                    continue;
                }
                if fds[0].revents & libc::POLLIN != 0 {
                    if let Ok(len) = tun.read(&mut buf) {
                        if sock.send_to(node_endpoint, &gre::encapsulate(key, &buf[..len])).is_ok() {
                            counters2.encapsulated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if fds[1].revents & libc::POLLIN != 0 {
                    if let Ok(Some(pkt)) = sock.recv(Duration::ZERO) {
                        if let Some((src, k, inner)) = gre::open(&pkt) {
                            let accepted = open2.lock().map(|o| o.contains(&k)).unwrap_or(false);
                            if src == node_endpoint && accepted {
                                if let Some(port) = udp_source_port(inner) {
                                    if let Ok(mut f) = flows2.lock() {
                                        f.insert(port, k);
                                    }
                                }
                            }
                            if src == node_endpoint && accepted && tun_w.write_all(inner).is_ok() {
                                counters2.decapsulated.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        });
        Ok(GreTunEndpoint {
            stop,
            thread: Some(thread),
            counters,
            open,
            flows,
        })
    }

    /// Which tunnel (key) each inner UDP flow (by source port) last came
    /// through; `clear` starts a new record.
    pub fn flows(&self, clear: bool) -> BTreeMap<u16, Option<u32>> {
        let Ok(mut f) = self.flows.lock() else {
            return BTreeMap::new();
        };
        if clear {
            std::mem::take(&mut *f)
        } else {
            f.clone()
        }
    }

    /// Cuts the tunnel with `key`: its GRE is dropped from now on.
    pub fn cut(&self, key: Option<u32>) {
        if let Ok(mut o) = self.open.lock() {
            o.remove(&key);
        }
    }

    /// Restores a cut tunnel.
    pub fn restore(&self, key: Option<u32>) {
        if let Ok(mut o) = self.open.lock() {
            o.insert(key);
        }
    }
}

/// The UDP source port of an IPv4/UDP packet.
fn udp_source_port(p: &[u8]) -> Option<u16> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if p.get(9) != Some(&17) || p.len() < ihl + 8 {
        return None;
    }
    Some(u16::from_be_bytes([p[ihl], p[ihl + 1]]))
}

impl Drop for GreTunEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
