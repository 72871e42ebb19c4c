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
    time::{Duration, SystemTime},
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Every packet carries the time it arrived: answers are read at the next
    // tick, their round trip measured to their arrival.
    set_int(&fd, libc::SO_TIMESTAMPNS, 1)?;
    // Room for a tick's answers from thousands of tunnels: an answer that
    // came through an XDP program may take a whole page of buffer. As root
    // the limit is ours to set; otherwise the system's maximum applies.
    if set_int(&fd, libc::SO_RCVBUFFORCE, RECEIVE_BUFFER).is_err() {
        let _ = set_int(&fd, libc::SO_RCVBUF, RECEIVE_BUFFER);
    }
    Ok(fd)
}

fn set_int(fd: &OwnedFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a c_int option of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receive buffer asked for each probe socket.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

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
    batch: Batch,
}

impl ProbeIo {
    /// Opens the sockets in the calling thread's network namespace.
    pub fn open(locals: impl IntoIterator<Item = Ipv4Addr>) -> io::Result<ProbeIo> {
        let mut io = ProbeIo {
            gre: BTreeMap::new(),
            icmp: raw_socket(libc::IPPROTO_ICMP)?,
            batch: Batch::new(),
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

    /// Sends GRE packets (header + inner packet) from `local`, each to its
    /// remote, with as few system calls as the kernel takes (sendmmsg);
    /// `sent(i, result)` is told the fate of `packets[i]`.
    pub fn send_many(
        &self,
        local: Ipv4Addr,
        packets: &[(Ipv4Addr, Vec<u8>)],
        mut sent: impl FnMut(usize, io::Result<()>),
    ) {
        let Some(fd) = self.gre.get(&local) else {
            for i in 0..packets.len() {
                sent(i, Err(io::Error::other(format!("no GRE socket for {local}"))));
            }
            return;
        };
        let mut addrs: Vec<libc::sockaddr_in> = packets.iter().map(|(remote, _)| sockaddr(*remote)).collect();
        let bufs: Vec<&[u8]> = packets.iter().map(|(_, gre)| gre.as_slice()).collect();
        send_all(fd.as_raw_fd(), &mut addrs, &bufs, sent);
    }

    /// Hands every packet queued on the probe sockets to `each`, without
    /// waiting: the whole IPv4 packet (outer header included), which socket
    /// it came from, and when it arrived (the kernel's receive time, `None`
    /// if the kernel gave none). Packets are read in batches (recvmmsg);
    /// longer ones than a probe answer can be are cut short, which their
    /// parsing rejects.
    pub fn drain(&mut self, mut each: impl FnMut(Source, &[u8], Option<SystemTime>)) {
        let sockets: Vec<(RawFd, Source)> = self
            .gre
            .values()
            .map(|fd| (fd.as_raw_fd(), Source::Gre))
            .chain([(self.icmp.as_raw_fd(), Source::Icmp)])
            .collect();
        for (fd, source) in sockets {
            // Bounded per call: a flood cannot hold the thread.
            for _ in 0..64 {
                let got = self.batch.receive(fd);
                for (packet, at) in self.batch.packets(got) {
                    each(source, packet, at);
                }
                if got < BATCH {
                    break;
                }
            }
        }
    }
}

/// Sends `bufs[i]` to `addrs[i]` on `fd` with sendmmsg, as few calls as
/// the kernel takes; a message the kernel refuses is reported and skipped.
fn send_all<A>(fd: RawFd, addrs: &mut [A], bufs: &[&[u8]], mut sent: impl FnMut(usize, io::Result<()>)) {
    let mut iovs: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = (0..bufs.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
    for ((m, addr), iov) in msgs.iter_mut().zip(addrs.iter_mut()).zip(iovs.iter_mut()) {
        m.msg_hdr.msg_name = (addr as *mut A).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<A>() as libc::socklen_t;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut i = 0;
    while i < msgs.len() {
        let rest = &mut msgs[i..];
        let count = rest.len().min(1024) as libc::c_uint;
        // SAFETY: sendmmsg(2) over our own headers, which point into `addrs`,
        // `iovs` and `bufs`, all alive for the call.
        let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), count, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The first message failed: report it and go on with the next.
            sent(i, Err(e));
            i += 1;
        } else {
            for k in i..i + n as usize {
                sent(k, Ok(()));
            }
            i += n as usize;
        }
    }
}

/// Packets read per recvmmsg call.
const BATCH: usize = 64;
/// Room per packet: a probe answer, tunnelled, is about 100 bytes.
const SLOT: usize = 2048;

/// Room per packet for control messages (a receive timestamp).
const CONTROL: usize = 64;

/// Buffers for reading up to [`BATCH`] packets with one system call.
struct Batch {
    buf: Vec<u8>,
    control: Vec<u64>,
    lens: [usize; BATCH],
    times: [Option<SystemTime>; BATCH],
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; BATCH * SLOT],
            // u64 words: control messages must be aligned.
            control: vec![0u64; BATCH * CONTROL / 8],
            lens: [0; BATCH],
            times: [None; BATCH],
        }
    }

    /// Reads what is queued on `fd`, up to [`BATCH`] packets, without
    /// waiting; returns how many.
    fn receive(&mut self, fd: RawFd) -> usize {
        let base = self.buf.as_mut_ptr();
        let control = self.control.as_mut_ptr().cast::<u8>();
        let mut iovs: Vec<libc::iovec> = (0..BATCH)
            .map(|i| libc::iovec {
                // SAFETY: slot i lies inside `buf` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            })
            .collect();
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, (m, iov)) in msgs.iter_mut().zip(iovs.iter_mut()).enumerate() {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            // SAFETY: control slot i lies inside `control` (BATCH * CONTROL bytes).
            m.msg_hdr.msg_control = unsafe { control.add(i * CONTROL) }.cast();
            m.msg_hdr.msg_controllen = CONTROL;
        }
        // SAFETY: recvmmsg(2) into our own buffers through our own headers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            return 0;
        }
        let n = n as usize;
        for (i, m) in msgs[..n].iter().enumerate() {
            self.lens[i] = (m.msg_len as usize).min(SLOT);
            self.times[i] = arrival(&m.msg_hdr);
        }
        n
    }

    /// The first `n` packets read, with their arrival times.
    fn packets(&self, n: usize) -> impl Iterator<Item = (&[u8], Option<SystemTime>)> {
        (0..n).map(|i| (&self.buf[i * SLOT..i * SLOT + self.lens[i]], self.times[i]))
    }
}

/// The SCM_TIMESTAMPNS control message of a received message, if any.
fn arrival(h: &libc::msghdr) -> Option<SystemTime> {
    // SAFETY: the kernel filled `h`'s control buffer (msg_controllen
    // bytes); the CMSG macros walk it within those bounds.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                let since = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
                return Some(SystemTime::UNIX_EPOCH + since);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Which socket a packet came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The raw GRE socket: the whole packet with its outer header.
    Gre,
    /// The raw ICMP socket: an IPv4 packet carrying ICMP.
    Icmp,
}
