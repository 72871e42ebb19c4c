//! The sockets health probes travel through. A probe whose tunnel has a
//! resolved next hop leaves as a whole Ethernet frame (outer IPv4, GRE,
//! probe) through a packet socket, out of the interface and to the MAC the
//! data plane uses for the tunnel's traffic: the kernel's IP output path
//! (a route lookup and header building per packet) is skipped. Any other
//! probe goes as GRE through a raw IPPROTO_GRE socket bound to the tunnel's
//! local address (the kernel routes it, resolves the neighbour and adds the
//! outer IPv4 header with that source). Answers come back either
//! inside the tunnel (the data plane passes inner ICMP for the node up,
//! still encapsulated, so the same kind of socket receives it) or as plain
//! ICMP over the internet (a raw ICMP socket).

use moat_health::probe::{write_frame, write_gre, Wire, FRAME_MAX, PROBE_LEN};
use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicU32, Ordering},
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
    room_to_send(&fd);
    Ok(fd)
}

fn set_int(fd: &OwnedFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(fd, libc::SOL_SOCKET, option, value)
}

fn set_option(fd: &OwnedFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a c_int option of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
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

/// The packet socket probes leave through when their next hop is known:
/// protocol 0, so it is handed no received packets.
fn link_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    room_to_send(&fd);
    // Straight to the driver, as the data plane transmits the tunnel's
    // traffic (XDP transmit skips the queueing disciplines too). Without
    // it (an old kernel) probes go through the qdisc: no harm.
    let _ = set_option(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
    Ok(fd)
}

/// Send buffer asked for each sending socket: a tick's probes of
/// thousands of tunnels wait there while the interface takes them.
const SEND_BUFFER: libc::c_int = 4 << 20;

fn room_to_send(fd: &OwnedFd) {
    if set_int(fd, libc::SO_SNDBUFFORCE, SEND_BUFFER).is_err() {
        let _ = set_int(fd, libc::SO_SNDBUF, SEND_BUFFER);
    }
}

fn link_address(ifindex: u32, dmac: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = [0u8; 8];
    addr[..6].copy_from_slice(&dmac);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_IP as u16).to_be(),
        sll_ifindex: ifindex as libc::c_int,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr,
    }
}

/// One probe to send.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing {
    /// The tunnel's endpoints and key, and the next hop's MACs when known.
    pub wire: Wire,
    /// The interface towards the next hop, when it is resolved: the whole
    /// frame is then written out of it, as the data plane sends the tunnel's
    /// traffic. Otherwise the probe goes through the kernel's routing.
    pub ifindex: Option<u32>,
    /// The probe's inner packet.
    pub inner: [u8; PROBE_LEN],
}

/// One raw GRE socket per local tunnel address, a packet socket for
/// sending, and the answers' way in.
pub struct ProbeIo {
    gre: BTreeMap<Ipv4Addr, OwnedFd>,
    /// `None` when the kernel refused one: every probe then goes through
    /// the GRE sockets.
    link: Option<OwnedFd>,
    /// Identification of the next outer IPv4 header written here.
    ident: u16,
    answers: Answers,
    out: Outbox,
}

/// Where answers are read.
enum Answers {
    /// A receive ring shared with the kernel; the GRE sockets queue nothing.
    Ring(AnswerRing),
    /// Without a ring: the raw GRE sockets and a raw ICMP socket.
    Sockets { icmp: OwnedFd, batch: Box<Batch> },
}

impl ProbeIo {
    /// Opens the sockets in the calling thread's network namespace: answers
    /// through a receive ring, or raw sockets when the kernel gives no ring.
    pub fn open(locals: impl IntoIterator<Item = Ipv4Addr>) -> io::Result<ProbeIo> {
        ProbeIo::open_with(locals, true)
    }

    /// [`ProbeIo::open`], with the receive ring only if `ring`.
    pub fn open_with(locals: impl IntoIterator<Item = Ipv4Addr>, ring: bool) -> io::Result<ProbeIo> {
        let link = match link_socket() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("health probes: no packet socket ({e}); every probe goes through kernel routing");
                None
            }
        };
        let ring = if ring {
            AnswerRing::open()
        } else {
            Err(io::Error::other("not asked for"))
        };
        let answers = match ring {
            Ok(ring) => Answers::Ring(ring),
            Err(e) => {
                tracing::warn!("health probes: no receive ring ({e}); answers are read from raw sockets");
                Answers::Sockets {
                    icmp: raw_socket(libc::IPPROTO_ICMP)?,
                    batch: Box::new(Batch::new()),
                }
            }
        };
        let mut io = ProbeIo {
            gre: BTreeMap::new(),
            link,
            ident: 0,
            answers,
            out: Outbox::default(),
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
        if matches!(self.answers, Answers::Ring(_)) {
            // Only for sending: the ring sees the answers.
            attach_filter(&fd, &[bpf_stmt(libc::BPF_RET | libc::BPF_K, 0)])?;
        }
        self.gre.insert(local, fd);
        Ok(())
    }

    /// Sends every probe with as few system calls as the kernel takes
    /// (sendmmsg): those with a known next hop as whole frames through the
    /// packet socket, the others as GRE through the raw socket of their
    /// local address. `sent(i, result)` is told the fate of `probes[i]`.
    pub fn send(&mut self, probes: &[Outgoing], mut sent: impl FnMut(usize, io::Result<()>)) {
        let out = &mut self.out;
        out.routed.clear();
        out.clear();
        for (i, p) in probes.iter().enumerate() {
            match (p.ifindex, &self.link) {
                (Some(ifindex), Some(_)) => {
                    self.ident = self.ident.wrapping_add(1);
                    let slot = out.slot(i);
                    out.lens[slot] = write_frame(&mut out.frames[slot], &p.wire, self.ident, &p.inner);
                    out.links.push(link_address(ifindex, p.wire.dmac));
                }
                _ => out.routed.push(i),
            }
        }
        if let Some(link) = &self.link {
            out.flush(link.as_raw_fd(), Kind::Link, &mut sent);
        }

        // The rest, a run per local address.
        let mut routed = std::mem::take(&mut out.routed);
        routed.sort_by_key(|&i| probes[i].wire.local);
        for run in routed.chunk_by(|&a, &b| probes[a].wire.local == probes[b].wire.local) {
            let local = probes[run[0]].wire.local;
            let Some(fd) = self.gre.get(&local) else {
                for &i in run {
                    sent(i, Err(io::Error::other(format!("no GRE socket for {local}"))));
                }
                continue;
            };
            out.clear();
            for &i in run {
                let p = &probes[i];
                let slot = out.slot(i);
                out.lens[slot] = write_gre(&mut out.frames[slot], p.wire.key, &p.inner);
                out.inets.push(sockaddr(p.wire.remote));
            }
            out.flush(fd.as_raw_fd(), Kind::Routed, &mut sent);
        }
        out.routed = routed;
    }

    /// Hands every answer waiting to `each`, without waiting: the whole
    /// IPv4 packet (outer header included), which kind it is, and when it
    /// arrived (the kernel's receive time, `None` if the kernel gave none).
    /// Longer packets than a probe answer can be are cut short, which their
    /// parsing rejects.
    pub fn drain(&mut self, mut each: impl FnMut(Source, &[u8], Option<SystemTime>)) {
        match &mut self.answers {
            Answers::Ring(ring) => ring.drain(|packet, at| {
                let source = if packet.get(9) == Some(&(libc::IPPROTO_GRE as u8)) {
                    Source::Gre
                } else {
                    Source::Icmp
                };
                each(source, packet, at)
            }),
            Answers::Sockets { icmp, batch } => {
                let gre = self.gre.values().map(|fd| (fd.as_raw_fd(), Source::Gre));
                for (fd, source) in gre.chain([(icmp.as_raw_fd(), Source::Icmp)]) {
                    // Bounded per call: a flood cannot hold the thread.
                    for _ in 0..64 {
                        let got = batch.receive(fd);
                        for (packet, at) in batch.packets(got) {
                            each(source, packet, at);
                        }
                        if got < BATCH {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Answers the kernel dropped because the receive ring was full (0
    /// without a ring).
    pub fn ring_drops(&self) -> u64 {
        match &self.answers {
            Answers::Ring(ring) => ring.drops(),
            Answers::Sockets { .. } => 0,
        }
    }
}

fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

fn attach_filter(fd: &OwnedFd, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: setsockopt(2) with a sock_fprog pointing at `program`, alive
    // for the call (the kernel copies it).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The classic BPF filter of the receive ring, over IPv4 packets from their
/// first byte: GRE (answers inside a tunnel; the data plane passes up only
/// what is for the node), and ICMP echo replies, not fragments past the
/// first, whose data starts with the probe magic. Everything else is left
/// to the rest of the stack.
fn answer_filter() -> [libc::sock_filter; 12] {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX, BPF_MSH, BPF_RET, BPF_W,
    };
    let magic = u32::from_be_bytes(moat_health::probe::PAYLOAD_MAGIC);
    [
        // 0: protocol
        bpf_stmt(BPF_LD | BPF_B | BPF_ABS, 9),
        // 1: GRE -> accept (10)
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_GRE as u32, 8, 0),
        // 2: not ICMP -> reject (11)
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_ICMP as u32, 0, 8),
        // 3-4: a fragment past the first -> reject
        bpf_stmt(BPF_LD | BPF_H | BPF_ABS, 6),
        bpf_jump(BPF_JMP | BPF_JSET | BPF_K, 0x1fff, 6, 0),
        // 5: X = header length
        bpf_stmt(BPF_LDX | BPF_B | BPF_MSH, 0),
        // 6-7: ICMP type echo reply, else reject
        bpf_stmt(BPF_LD | BPF_B | BPF_IND, 0),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3),
        // 8-9: the magic after the 8-byte echo header, else reject
        bpf_stmt(BPF_LD | BPF_W | BPF_IND, 8),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, magic, 0, 1),
        // 10: accept the whole packet (the frame size cuts it)
        bpf_stmt(BPF_RET | BPF_K, u32::MAX),
        // 11: reject
        bpf_stmt(BPF_RET | BPF_K, 0),
    ]
}

/// Size of a ring frame: its header, then room for the IPv4 packet (176
/// bytes; a probe answer inside GRE is under 100).
const RING_FRAME: usize = 256;
/// Size of a ring block (frames do not cross blocks).
const RING_BLOCK: usize = 64 << 10;
/// Blocks in the ring: 4 MiB, 16,384 answers, many ticks' worth at the
/// highest rate of thousands of tunnels.
const RING_BLOCKS: usize = 64;

/// A packet socket receiving IPv4 through [`answer_filter`] into a ring
/// (TPACKET_V2) mapped into our memory: answers are read with no system
/// call, and the daemon pays nothing per packet to queue or copy them.
struct AnswerRing {
    fd: OwnedFd,
    ring: *mut u8,
    frames: usize,
    next: usize,
}

// SAFETY: the mapping belongs to this value alone (unmapped on drop); the
// kernel is the only other party and synchronises through each frame's
// status word.
unsafe impl Send for AnswerRing {}

impl AnswerRing {
    fn open() -> io::Result<AnswerRing> {
        // Protocol 0: no packet is taken before the filter and ring are set.
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        attach_filter(&fd, &answer_filter())?;
        let sockopt = |option: libc::c_int, value: *const libc::c_void, len: usize| {
            // SAFETY: setsockopt(2) with a value of the stated size.
            let rc =
                unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, option, value, len as libc::socklen_t) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let version = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        sockopt(
            libc::PACKET_VERSION,
            (&version as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>(),
        )?;
        let frames = RING_BLOCK / RING_FRAME * RING_BLOCKS;
        let req = libc::tpacket_req {
            tp_block_size: RING_BLOCK as libc::c_uint,
            tp_block_nr: RING_BLOCKS as libc::c_uint,
            tp_frame_size: RING_FRAME as libc::c_uint,
            tp_frame_nr: frames as libc::c_uint,
        };
        sockopt(
            libc::PACKET_RX_RING,
            (&req as *const libc::tpacket_req).cast(),
            std::mem::size_of::<libc::tpacket_req>(),
        )?;
        // SAFETY: mmap(2) of the ring just configured, its whole size.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BLOCK * RING_BLOCKS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = AnswerRing {
            fd,
            ring: ring.cast(),
            frames,
            next: 0,
        };
        // Now take IPv4 from every interface.
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: (libc::ETH_P_IP as u16).to_be(),
            sll_ifindex: 0,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: bind(2) with a valid sockaddr_ll of the stated size.
        let rc = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ring)
    }

    /// Hands every packet the kernel has put in the ring to `each`, oldest
    /// first, and gives the frames back.
    fn drain(&mut self, mut each: impl FnMut(&[u8], Option<SystemTime>)) {
        for _ in 0..self.frames {
            // SAFETY: frame `next` lies inside the mapping (frames * RING_FRAME
            // bytes, frames never crossing a block), and starts with a
            // tpacket2_hdr, 16-byte aligned.
            let header = unsafe { self.ring.add(self.next * RING_FRAME) };
            // SAFETY: tp_status is the header's first word, shared with the
            // kernel: accessed atomically only.
            let status = unsafe { AtomicU32::from_ptr(header.cast::<u32>()) };
            if status.load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                break;
            }
            // SAFETY: the frame is ours until its status is given back; the
            // kernel wrote a whole header.
            let h = unsafe { std::ptr::read(header.cast::<libc::tpacket2_hdr>()) };
            let start = usize::from(h.tp_net).min(RING_FRAME);
            let len = (h.tp_snaplen as usize).min(RING_FRAME - start);
            // SAFETY: start..start+len lies inside this frame.
            let packet = unsafe { std::slice::from_raw_parts(header.add(start), len) };
            let at = SystemTime::UNIX_EPOCH + Duration::new(u64::from(h.tp_sec), h.tp_nsec);
            each(packet, Some(at));
            status.store(libc::TP_STATUS_KERNEL, Ordering::Release);
            self.next = (self.next + 1) % self.frames;
        }
    }

    /// Packets dropped for want of a free frame since the last call.
    fn drops(&self) -> u64 {
        let mut stats = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: getsockopt(2) into a tpacket_stats of the stated size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut stats as *mut libc::tpacket_stats).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return 0;
        }
        u64::from(stats.tp_drops)
    }
}

impl Drop for AnswerRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of that size, unmapped once.
        unsafe { libc::munmap(self.ring.cast(), RING_BLOCK * RING_BLOCKS) };
    }
}

/// Which destinations an [`Outbox`] holds.
enum Kind {
    /// Whole frames, to interfaces.
    Link,
    /// GRE packets, to remotes through kernel routing.
    Routed,
}

/// Buffers for one sendmmsg call, kept from call to call.
#[derive(Default)]
struct Outbox {
    /// Message k: `frames[k][..lens[k]]`, for probe `which[k]`.
    frames: Vec<[u8; FRAME_MAX]>,
    lens: Vec<usize>,
    which: Vec<usize>,
    /// Destinations of the messages (one kind per call).
    links: Vec<libc::sockaddr_ll>,
    inets: Vec<libc::sockaddr_in>,
    /// Probes that go through kernel routing.
    routed: Vec<usize>,
    scratch: Scratch,
}

impl Outbox {
    fn clear(&mut self) {
        self.which.clear();
        self.links.clear();
        self.inets.clear();
    }

    /// Sends the messages (to `links` or to `inets`) on `fd`, telling
    /// `sent` the fate of each message's probe.
    fn flush(&mut self, fd: RawFd, kind: Kind, sent: &mut impl FnMut(usize, io::Result<()>)) {
        let Outbox {
            scratch,
            links,
            inets,
            frames,
            lens,
            which,
            ..
        } = self;
        let each = |k: usize, r| sent(which[k], r);
        match kind {
            Kind::Link => send_batch(fd, scratch, links, frames, lens, each),
            Kind::Routed => send_batch(fd, scratch, inets, frames, lens, each),
        }
    }

    /// A message slot for probe `probe`.
    fn slot(&mut self, probe: usize) -> usize {
        let k = self.which.len();
        self.which.push(probe);
        if self.frames.len() <= k {
            self.frames.push([0; FRAME_MAX]);
            self.lens.push(0);
        }
        k
    }
}

/// Message headers for sendmmsg and recvmmsg. They hold raw pointers into
/// other buffers, set by the call that uses them and never read after it
/// returns; between calls they are only reused storage.
#[derive(Default)]
struct Scratch {
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

// SAFETY: the pointers inside are written and handed to the kernel within a
// single call on the owning thread, and never dereferenced afterwards, so
// moving the storage to another thread cannot make any access unsound.
unsafe impl Send for Scratch {}

impl Scratch {
    /// `count` zeroed headers, each with one iovec.
    fn headers(&mut self, count: usize) -> (&mut [libc::mmsghdr], &mut [libc::iovec]) {
        self.iovs.clear();
        self.msgs.clear();
        self.iovs.resize(
            count,
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        self.msgs.resize_with(count, || unsafe { std::mem::zeroed() });
        (&mut self.msgs, &mut self.iovs)
    }
}

/// Sends message k (`frames[k][..lens[k]]` to `names[k]`) for every k of
/// `names` on `fd` with sendmmsg, as few calls as the kernel takes; a
/// message the kernel refuses is reported and skipped.
fn send_batch<A>(
    fd: RawFd,
    scratch: &mut Scratch,
    names: &mut [A],
    frames: &[[u8; FRAME_MAX]],
    lens: &[usize],
    mut sent: impl FnMut(usize, io::Result<()>),
) {
    let (msgs, iovs) = scratch.headers(names.len());
    for (k, ((m, iov), name)) in msgs.iter_mut().zip(iovs.iter_mut()).zip(names.iter_mut()).enumerate() {
        iov.iov_base = frames[k].as_ptr() as *mut libc::c_void;
        iov.iov_len = lens[k];
        m.msg_hdr.msg_name = (name as *mut A).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<A>() as libc::socklen_t;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut i = 0;
    while i < msgs.len() {
        let rest = &mut msgs[i..];
        let count = rest.len().min(1024) as libc::c_uint;
        // SAFETY: sendmmsg(2) over our own headers, which point into
        // `names`, `iovs` and `frames`, all alive and unmoved for the call.
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
    scratch: Scratch,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; BATCH * SLOT],
            // u64 words: control messages must be aligned.
            control: vec![0u64; BATCH * CONTROL / 8],
            lens: [0; BATCH],
            times: [None; BATCH],
            scratch: Scratch::default(),
        }
    }

    /// Reads what is queued on `fd`, up to [`BATCH`] packets, without
    /// waiting; returns how many.
    fn receive(&mut self, fd: RawFd) -> usize {
        let base = self.buf.as_mut_ptr();
        let control = self.control.as_mut_ptr().cast::<u8>();
        let (msgs, iovs) = self.scratch.headers(BATCH);
        for (i, (m, iov)) in msgs.iter_mut().zip(iovs.iter_mut()).enumerate() {
            // SAFETY: slot i lies inside `buf` (BATCH * SLOT bytes).
            iov.iov_base = unsafe { base.add(i * SLOT) }.cast();
            iov.iov_len = SLOT;
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

#[cfg(test)]
mod tests {
    use super::*;
    use moat_health::{probe::ProbePayload, Outstanding, ProbeSpec, ProbeStyle, Received, Trigger};
    use moat_lab::edge::{Edge, ENDPOINT};

    /// The edge topology without a daemon: the site's endpoint answers
    /// reply-style probes (it decapsulates them and routes the inner echo
    /// reply back to the node as plain ICMP). Probes leave through each send
    /// path (whole frames through the packet socket, GRE through kernel
    /// routing) and come back through each receive path (the ring, the raw
    /// sockets); every probe must come back, and match.
    #[test]
    fn every_send_and_receive_path_carries_probes() {
        let edge = Edge::new("pio").expect("topology");
        let site = edge.start_site(0, Some(7)).expect("site endpoint");
        let router = edge.sites[0].router;
        let ifindex = edge.node.ifindex("n-site1");
        let (smac, dmac) = (edge.node.mac("n-site1"), edge.sites[0].ns.mac("s0"));
        let _in = edge.node.enter().expect("enter the node namespace");
        for ring in [true, false] {
            let mut io = ProbeIo::open_with([ENDPOINT], ring).expect("probe sockets");
            assert_eq!(matches!(io.answers, Answers::Ring(_)), ring);
            for link in [true, false] {
                let mut o = Outstanding::new(Duration::from_secs(3), 64);
                o.set_tunnel(
                    1,
                    ProbeSpec {
                        style: ProbeStyle::Reply,
                        ident: 1,
                        node: ENDPOINT,
                        target: router,
                    },
                );
                let start = std::time::Instant::now();
                let probes: Vec<Outgoing> = (0..20)
                    .map(|_| Outgoing {
                        wire: Wire {
                            local: ENDPOINT,
                            remote: router,
                            key: Some(7),
                            smac,
                            dmac,
                        },
                        ifindex: link.then_some(ifindex),
                        inner: o.issue(1, start, Trigger::Scheduled).expect("tracked"),
                    })
                    .collect();
                let mut sent = 0;
                io.send(&probes, |_, r| {
                    r.expect("sent");
                    sent += 1;
                });
                assert_eq!(sent, 20);
                let (mut matched, mut other) = (0, 0);
                while matched < 20 && start.elapsed() < Duration::from_secs(3) {
                    std::thread::sleep(Duration::from_millis(10));
                    io.drain(|source, packet, at| {
                        assert_eq!(source, Source::Icmp, "answers come as plain ICMP");
                        assert!(at.is_some(), "arrival time");
                        match o.classify(std::time::Instant::now(), packet, None) {
                            Received::Match(_) => matched += 1,
                            Received::Rejected(_) => other += 1,
                        }
                    });
                }
                assert_eq!((matched, other), (20, 0), "ring {ring}, link {link}");
                // The payload of what was sent is what the site decapsulated.
                assert!(ProbePayload::decode(&probes[0].inner[PROBE_LEN - 20..]).is_some());
            }
        }
        assert!(site.counters.decapsulated.load(std::sync::atomic::Ordering::Relaxed) >= 80);
    }
}
