//! A userspace GRE endpoint: a raw IPPROTO_GRE socket, since this kernel
//! has no GRE netdevice. Receives whole IPv4 packets (outer header
//! included) and sends GRE payloads to which the kernel adds the outer
//! IPv4 header.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// A raw GRE socket in the network namespace of the thread that opened it.
pub struct RawGre {
    fd: OwnedFd,
}

impl RawGre {
    pub fn open() -> io::Result<RawGre> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_GRE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Room for bursts: a packet built from an XDP frame takes a whole
        // page of receive buffer.
        crate::sock::force_receive_buffer(fd.as_fd(), 8 << 20);
        Ok(RawGre { fd })
    }

    /// The socket's descriptor (for polling).
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Sends `gre` (GRE header + payload) to `dst`.
    pub fn send_to(&self, dst: Ipv4Addr, gre: &[u8]) -> io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and address are valid for the lengths passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                gre.as_ptr().cast(),
                gre.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one IPv4 packet (outer header included), waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: the buffer is valid for its length.
        let r = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(r as usize);
        Ok(Some(buf))
    }
}

/// A GRE header (RFC 2784, key per RFC 2890) followed by `inner`.
pub fn encapsulate(key: Option<u32>, inner: &[u8]) -> Vec<u8> {
    let proto: u16 = if inner.first().map(|b| b >> 4) == Some(6) {
        0x86dd
    } else {
        0x0800
    };
    let mut g = Vec::with_capacity(8 + inner.len());
    g.extend_from_slice(&(if key.is_some() { 0x2000u16 } else { 0 }).to_be_bytes());
    g.extend_from_slice(&proto.to_be_bytes());
    if let Some(k) = key {
        g.extend_from_slice(&k.to_be_bytes());
    }
    g.extend_from_slice(inner);
    g
}

/// Splits a received outer IPv4 packet into (outer source, key, inner packet).
pub fn open(packet: &[u8]) -> Option<(Ipv4Addr, Option<u32>, &[u8])> {
    let hl = usize::from(packet.first()? & 0x0f) * 4;
    if packet.len() < hl + 4 || packet[9] != 47 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let g = &packet[hl..];
    let flags = u16::from_be_bytes([g[0], g[1]]);
    let mut at = 4;
    if flags & 0x8000 != 0 {
        at += 4;
    }
    let key = if flags & 0x2000 != 0 {
        let k = g.get(at..at + 4)?;
        at += 4;
        Some(u32::from_be_bytes([k[0], k[1], k[2], k[3]]))
    } else {
        None
    };
    if flags & 0x1000 != 0 {
        at += 4;
    }
    Some((src, key, g.get(at..)?))
}
