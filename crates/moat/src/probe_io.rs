//! The sockets health probes travel through. Probes leave as GRE through a
//! raw IPPROTO_GRE socket bound to the tunnel's local address (the kernel
//! adds the outer IPv4 header with that source); answers come back either
//! inside the tunnel (the data plane passes inner ICMP for the node up,
//! still encapsulated, so the same kind of socket receives it) or as plain
//! ICMP over the internet (a raw ICMP socket).

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

fn raw_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// One raw GRE socket per local tunnel address, and one raw ICMP socket.
pub struct ProbeIo {
    gre: BTreeMap<Ipv4Addr, OwnedFd>,
    icmp: OwnedFd,
    buf: Vec<u8>,
}

impl ProbeIo {
    /// Opens the sockets in the calling thread's network namespace.
    pub fn open(locals: impl IntoIterator<Item = Ipv4Addr>) -> io::Result<ProbeIo> {
        let mut io = ProbeIo {
            gre: BTreeMap::new(),
            icmp: raw_socket(libc::IPPROTO_ICMP)?,
            buf: vec![0u8; 65536],
        };
        for local in locals {
            io.add_local(local)?;
        }
        Ok(io)
    }

    /// Adds a GRE socket sending from `local` (no-op if there is one).
    pub fn add_local(&mut self, local: Ipv4Addr) -> io::Result<()> {
        if self.gre.contains_key(&local) {
            return Ok(());
        }
        let fd = raw_socket(libc::IPPROTO_GRE)?;
        let addr = sockaddr(local);
        // SAFETY: bind(2) with a valid sockaddr_in of the stated size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::other(format!(
                "binding a GRE socket to {local}: {}",
                io::Error::last_os_error()
            )));
        }
        self.gre.insert(local, fd);
        Ok(())
    }

    /// Sends GRE (header + inner packet) from `local` to `remote`.
    pub fn send(&self, local: Ipv4Addr, remote: Ipv4Addr, gre: &[u8]) -> io::Result<()> {
        let fd = self
            .gre
            .get(&local)
            .ok_or_else(|| io::Error::other(format!("no GRE socket for {local}")))?;
        let addr = sockaddr(remote);
        // SAFETY: sendto(2) with a valid buffer and sockaddr_in.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                gre.as_ptr().cast(),
                gre.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn fds(&self) -> Vec<RawFd> {
        self.gre
            .values()
            .map(AsRawFd::as_raw_fd)
            .chain([self.icmp.as_raw_fd()])
            .collect()
    }

    /// Waits up to `timeout` for packets and returns every whole IPv4
    /// packet received (outer header included), tagged GRE or plain ICMP.
    pub fn receive(&mut self, timeout: Duration) -> io::Result<Vec<Received>> {
        let fds = self.fds();
        let mut polls: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Rounded up: a wait shorter than a millisecond must not become a
        // busy poll.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: poll(2) over our own vector of pollfds.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let mut out = Vec::new();
        let icmp = self.icmp.as_raw_fd();
        let buf = &mut self.buf;
        for p in polls.iter().filter(|p| p.revents & libc::POLLIN != 0) {
            // Drain what is queued (bounded per wakeup).
            for _ in 0..256 {
                // SAFETY: recv(2) into our own buffer.
                let n = unsafe { libc::recv(p.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if n <= 0 {
                    break;
                }
                let data = buf[..n as usize].to_vec();
                out.push(if p.fd == icmp {
                    Received::Icmp(data)
                } else {
                    Received::Gre(data)
                });
            }
        }
        Ok(out)
    }
}

/// A packet from one of the probe sockets: the whole IPv4 packet.
pub enum Received {
    Gre(Vec<u8>),
    Icmp(Vec<u8>),
}
