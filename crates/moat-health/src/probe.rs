//! Probe packets, and the probes in flight.
//!
//! A probe is an inner IPv4 ICMP echo carried in the tunnel's GRE
//! encapsulation:
//! - **reply style** ([`ProbeStyle::Reply`]): an echo *reply* from the target
//!   (customer side) to the node side. The customer router decapsulates it
//!   and routes it back to us; what comes back is the packet we built.
//! - **request style** ([`ProbeStyle::Request`]): an echo *request* from the
//!   node side to the target; the target answers with an echo reply.
//!
//! Either way the answer is an echo reply from the target to the node side,
//! with the request's identifier, sequence number and payload.
//!
//! The echo identifier is the tunnel's probe stream ([`ProbeSpec::ident`],
//! chosen by the daemon); the ICMP sequence number is the low 16 bits of the
//! probe's 32-bit sequence. The payload ([`PAYLOAD_LEN`] bytes, network order)
//! is:
//!
//! | bytes  | field                                   |
//! |--------|-----------------------------------------|
//! | 0..4   | magic `moat`                            |
//! | 4..8   | tunnel id                               |
//! | 8..12  | sequence number                         |
//! | 12..20 | token: 64 random bits drawn per probe   |
//!
//! The inner IPv4 header has TTL 64, DF set and the identification field
//! equal to the ICMP sequence number.
//!
//! [`Outstanding`] keeps the probes in flight of every tunnel (at most
//! `max_in_flight` each; a probe is lost after `timeout`) and classifies each
//! ICMP packet received; see [`Outstanding::classify`] for the order of the
//! checks.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Trigger, TunnelId};

/// Start of every probe payload.
pub const PAYLOAD_MAGIC: [u8; 4] = *b"moat";
/// Length of the probe payload.
pub const PAYLOAD_LEN: usize = 20;
/// Length of a probe's inner packet: IPv4 header, ICMP echo header, payload.
pub const PROBE_LEN: usize = IPV4_HEADER_LEN + ICMP_ECHO_HEADER_LEN + PAYLOAD_LEN;
/// TTL of the inner packet.
pub const PROBE_TTL: u8 = 64;
/// GRE protocol type of an IPv4 payload.
pub const GRE_PROTO_IPV4: u16 = 0x0800;

const IPV4_HEADER_LEN: usize = 20;
const ICMP_ECHO_HEADER_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_GRE: u8 = 47;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const GRE_FLAG_CHECKSUM: u16 = 0x8000;
const GRE_FLAG_KEY: u16 = 0x2000;
const GRE_FLAG_SEQUENCE: u16 = 0x1000;

/// Which echo the node sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeStyle {
    /// An echo reply from the target to the node side, routed back by the customer.
    Reply,
    /// An echo request from the node side to the target, answered by it.
    Request,
}

/// How one tunnel is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbeSpec {
    pub style: ProbeStyle,
    /// Echo identifier of the tunnel's probe stream.
    pub ident: u16,
    /// Our side: the node's address the answer must reach.
    pub node: Ipv4Addr,
    /// The customer side probed (the tunnel's health-check target).
    pub target: Ipv4Addr,
}

/// What a probe's payload carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProbePayload {
    pub tunnel: TunnelId,
    pub seq: u32,
    pub token: u64,
}

impl ProbePayload {
    pub fn encode(&self) -> [u8; PAYLOAD_LEN] {
        let mut b = [0u8; PAYLOAD_LEN];
        b[0..4].copy_from_slice(&PAYLOAD_MAGIC);
        b[4..8].copy_from_slice(&self.tunnel.to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..20].copy_from_slice(&self.token.to_be_bytes());
        b
    }

    /// The payload, when `bytes` is exactly one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let b: &[u8; PAYLOAD_LEN] = bytes.try_into().ok()?;
        if b[0..4] != PAYLOAD_MAGIC {
            return None;
        }
        Some(ProbePayload {
            tunnel: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            seq: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            token: u64::from_be_bytes([b[12], b[13], b[14], b[15], b[16], b[17], b[18], b[19]]),
        })
    }
}

/// The inner packet (IPv4 + ICMP echo) of one probe, checksums filled in.
pub fn build_probe(spec: &ProbeSpec, payload: &ProbePayload) -> [u8; PROBE_LEN] {
    let (icmp_type, src, dst) = match spec.style {
        ProbeStyle::Reply => (ICMP_ECHO_REPLY, spec.target, spec.node),
        ProbeStyle::Request => (ICMP_ECHO_REQUEST, spec.node, spec.target),
    };
    let icmp_seq = (payload.seq as u16).to_be_bytes();
    let mut p = [0u8; PROBE_LEN];
    ipv4_header(
        &mut p[..IPV4_HEADER_LEN],
        PROBE_LEN as u16,
        icmp_seq,
        IPPROTO_ICMP,
        src,
        dst,
    );
    let icmp = &mut p[IPV4_HEADER_LEN..];
    icmp[0] = icmp_type;
    icmp[4..6].copy_from_slice(&spec.ident.to_be_bytes());
    icmp[6..8].copy_from_slice(&icmp_seq);
    icmp[ICMP_ECHO_HEADER_LEN..].copy_from_slice(&payload.encode());
    let icmp_sum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_sum.to_be_bytes());
    p
}

/// Writes a 20-byte IPv4 header (TTL 64, DF set, no options) with its
/// checksum into `h`.
fn ipv4_header(h: &mut [u8], total: u16, ident: [u8; 2], protocol: u8, src: Ipv4Addr, dst: Ipv4Addr) {
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&ident);
    h[6..10].copy_from_slice(&[0x40, 0, PROBE_TTL, protocol]);
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&h[..IPV4_HEADER_LEN]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Length of the GRE header [`gre_encap`] writes.
pub fn gre_header_len(key: Option<u32>) -> usize {
    if key.is_some() {
        8
    } else {
        4
    }
}

/// GRE header (RFC 2784/2890: no checksum, no sequence number, the key when
/// given) followed by `inner`, an IPv4 packet. The kernel of a raw
/// `IPPROTO_GRE` socket adds the outer IPv4 header.
pub fn gre_encap(key: Option<u32>, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; gre_header_len(key) + inner.len()];
    write_gre(&mut p, key, inner);
    p
}

/// Writes the GRE header and `inner` at the start of `out`, which must hold
/// [`gre_header_len`] + `inner.len()` bytes; returns that length.
pub fn write_gre(out: &mut [u8], key: Option<u32>, inner: &[u8]) -> usize {
    let flags = if key.is_some() { GRE_FLAG_KEY } else { 0 };
    out[0..2].copy_from_slice(&flags.to_be_bytes());
    out[2..4].copy_from_slice(&GRE_PROTO_IPV4.to_be_bytes());
    if let Some(key) = key {
        out[4..8].copy_from_slice(&key.to_be_bytes());
    }
    let at = gre_header_len(key);
    out[at..at + inner.len()].copy_from_slice(inner);
    at + inner.len()
}

/// Where an encapsulated probe goes on the wire: the tunnel's endpoints
/// and the Ethernet addresses of the next hop towards the remote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wire {
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub key: Option<u32>,
    /// The egress interface's MAC.
    pub smac: [u8; 6],
    /// The next hop's MAC.
    pub dmac: [u8; 6],
}

/// Longest frame [`write_frame`] writes: Ethernet, outer IPv4, GRE with a
/// key, the probe.
pub const FRAME_MAX: usize = 14 + IPV4_HEADER_LEN + 8 + PROBE_LEN;

/// Writes a whole Ethernet frame carrying `inner` in the tunnel's GRE
/// encapsulation (outer IPv4 from `local` to `remote`, TTL 64, DF set,
/// identification `ident`) at the start of `out` (at least [`FRAME_MAX`]
/// bytes); returns its length.
pub fn write_frame(out: &mut [u8], wire: &Wire, ident: u16, inner: &[u8; PROBE_LEN]) -> usize {
    out[0..6].copy_from_slice(&wire.dmac);
    out[6..12].copy_from_slice(&wire.smac);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let gre_len = gre_header_len(wire.key) + PROBE_LEN;
    let total = (IPV4_HEADER_LEN + gre_len) as u16;
    ipv4_header(
        &mut out[14..14 + IPV4_HEADER_LEN],
        total,
        ident.to_be_bytes(),
        IPPROTO_GRE,
        wire.local,
        wire.remote,
    );
    14 + IPV4_HEADER_LEN + write_gre(&mut out[14 + IPV4_HEADER_LEN..], wire.key, inner)
}

/// Splits a GRE packet (starting at the GRE header, the outer IPv4 header
/// already removed) into its key and its inner IPv4 packet. `None` unless it
/// is version 0 carrying IPv4. Checksum and sequence fields are skipped, not
/// verified.
pub fn gre_decap(gre: &[u8]) -> Option<(Option<u32>, &[u8])> {
    let flags = u16::from_be_bytes([*gre.first()?, *gre.get(1)?]);
    let proto = u16::from_be_bytes([*gre.get(2)?, *gre.get(3)?]);
    if flags & 0x0007 != 0 || proto != GRE_PROTO_IPV4 {
        return None;
    }
    let mut at = 4;
    if flags & GRE_FLAG_CHECKSUM != 0 {
        at += 4;
    }
    let mut key = None;
    if flags & GRE_FLAG_KEY != 0 {
        let k = gre.get(at..at + 4)?;
        key = Some(u32::from_be_bytes([k[0], k[1], k[2], k[3]]));
        at += 4;
    }
    if flags & GRE_FLAG_SEQUENCE != 0 {
        at += 4;
    }
    Some((key, gre.get(at..)?))
}

/// The Internet checksum (RFC 1071) of `data`; over data that includes a
/// correct checksum field it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A received packet that answers one of our probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matched {
    pub tunnel: TunnelId,
    pub seq: u32,
    pub trigger: Trigger,
    pub rtt: Duration,
}

/// Why a received packet answers none of our probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Broken: truncated, bad IPv4 or ICMP checksum, a fragment, or an echo
    /// reply with a moat payload of the wrong length.
    Malformed,
    /// Well-formed ICMP that is not a moat probe answer (another type, or an
    /// echo reply without the moat payload): other traffic the socket sees.
    NotProbe,
    /// A moat answer for a tunnel not tracked, or whose sequence number and
    /// token match no probe we have in flight or remember.
    Unknown,
    /// A moat answer for a known tunnel that came back on another tunnel, or
    /// whose identifier or addresses are not that tunnel's.
    WrongTunnel,
    /// The answer to a probe that had already timed out (and been counted lost).
    Stale,
    /// A second answer to a probe already answered.
    Duplicate,
}

/// What [`Outstanding::classify`] made of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    Match(Matched),
    Rejected(Rejection),
}

/// Received packets by classification, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveCounts {
    pub matched: u64,
    pub malformed: u64,
    pub not_probe: u64,
    pub unknown: u64,
    pub wrong_tunnel: u64,
    pub stale: u64,
    pub duplicate: u64,
}

/// A probe that timed out (or was pushed out by newer ones): feed it to the
/// tunnel's state machine as [`crate::Outcome::Lost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lost {
    pub tunnel: TunnelId,
    pub seq: u32,
    pub trigger: Trigger,
    pub sent: Instant,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    seq: u32,
    token: u64,
    sent: Instant,
    trigger: Trigger,
    /// Its entry in [`Outstanding`]'s queue of issued probes.
    pos: u64,
}

/// An entry of the queue of issued probes, in order of sending.
#[derive(Clone, Copy, Debug)]
struct Issued {
    sent: Instant,
    tunnel: TunnelId,
    /// Answered, pushed out or forgotten: its timeout needs no look at
    /// the tunnel.
    settled: bool,
}

/// Marks the entry at queue position `pos` settled.
fn settle(queue: &mut VecDeque<Issued>, front: u64, pos: u64) {
    if let Some(e) = pos.checked_sub(front).and_then(|i| queue.get_mut(i as usize)) {
        e.settled = true;
    }
}

#[derive(Clone, Copy, Debug)]
struct Resolved {
    seq: u32,
    token: u64,
    answered: bool,
}

#[derive(Clone, Debug)]
struct Stream {
    spec: ProbeSpec,
    next_seq: u32,
    /// Oldest first.
    in_flight: VecDeque<InFlight>,
    /// The last resolved probes (answered or lost), oldest first.
    resolved: VecDeque<Resolved>,
}

/// The probes in flight of every tunnel, and the matcher of their answers.
///
/// Memory is bounded: per tunnel at most `max_in_flight` probes in flight
/// (issuing one more pushes the oldest out as lost) and as many resolved ones
/// remembered to tell stale and duplicate answers.
///
/// Timeouts cost nothing per tunnel: every probe issued also joins one queue
/// in order of sending (so in order of timeout, the timeout being the same
/// for all), and [`Outstanding::expire`] only looks at the head of that
/// queue. A probe that leaves its tunnel's flight (answered, pushed out,
/// forgotten) marks its queue entry settled, so that the entry is dropped at
/// the head without a look at the tunnel's state (with thousands of tunnels
/// that state is out of cache by then).
#[derive(Debug)]
pub struct Outstanding {
    streams: FxHashMap<TunnelId, Stream>,
    timeout: Duration,
    max_in_flight: usize,
    rng: StdRng,
    counts: ReceiveCounts,
    pushed_out: Vec<Lost>,
    /// Every probe issued and not yet past its timeout, oldest first.
    by_sending: VecDeque<Issued>,
    /// Queue position of the front of `by_sending` (entries ever popped).
    front: u64,
}

impl Outstanding {
    /// Probes are lost `timeout` after being sent; at most `max_in_flight`
    /// (at least 1) per tunnel.
    pub fn new(timeout: Duration, max_in_flight: usize) -> Self {
        Outstanding {
            streams: FxHashMap::default(),
            timeout,
            max_in_flight: max_in_flight.max(1),
            rng: StdRng::from_entropy(),
            counts: ReceiveCounts::default(),
            pushed_out: Vec::new(),
            by_sending: VecDeque::new(),
            front: 0,
        }
    }

    /// Changes the timeout of every probe, those in flight included.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Starts tracking a tunnel, or changes how it is probed. A changed spec
    /// forgets the tunnel's probes in flight (they are not reported lost).
    pub fn set_tunnel(&mut self, tunnel: TunnelId, spec: ProbeSpec) {
        match self.streams.get_mut(&tunnel) {
            Some(s) if s.spec == spec => {}
            Some(s) => {
                s.spec = spec;
                for p in s.in_flight.drain(..) {
                    settle(&mut self.by_sending, self.front, p.pos);
                }
                s.resolved.clear();
            }
            None => {
                self.streams.insert(
                    tunnel,
                    Stream {
                        spec,
                        next_seq: self.rng.gen(),
                        in_flight: VecDeque::new(),
                        resolved: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// Stops tracking a tunnel; its probes in flight are forgotten.
    pub fn remove_tunnel(&mut self, tunnel: TunnelId) -> bool {
        self.pushed_out.retain(|l| l.tunnel != tunnel);
        let Some(s) = self.streams.remove(&tunnel) else {
            return false;
        };
        for p in &s.in_flight {
            settle(&mut self.by_sending, self.front, p.pos);
        }
        true
    }

    /// A new probe for `tunnel`, sent at `now`: its inner packet, or `None`
    /// for a tunnel not tracked.
    pub fn issue(&mut self, tunnel: TunnelId, now: Instant, trigger: Trigger) -> Option<[u8; PROBE_LEN]> {
        let stream = self.streams.get_mut(&tunnel)?;
        let seq = stream.next_seq;
        stream.next_seq = seq.wrapping_add(1);
        let token = self.rng.gen();
        if stream.in_flight.len() >= self.max_in_flight {
            if let Some(old) = stream.in_flight.pop_front() {
                settle(&mut self.by_sending, self.front, old.pos);
                remember(&mut stream.resolved, self.max_in_flight, old.seq, old.token, false);
                self.pushed_out.push(Lost {
                    tunnel,
                    seq: old.seq,
                    trigger: old.trigger,
                    sent: old.sent,
                });
            }
        }
        // Callers issue with a clock that does not go back; should one, the
        // entry still goes where its time puts it, and the entries after it
        // (one place further now) are renumbered in their tunnels.
        let at = if self.by_sending.back().is_none_or(|b| b.sent <= now) {
            self.by_sending.len()
        } else {
            self.by_sending.partition_point(|b| b.sent <= now)
        };
        let probe = build_probe(&stream.spec, &ProbePayload { tunnel, seq, token });
        let pos = self.front + at as u64;
        stream.in_flight.push_back(InFlight {
            seq,
            token,
            sent: now,
            trigger,
            pos,
        });
        if at < self.by_sending.len() {
            for (i, e) in self.by_sending.iter().enumerate().skip(at).rev() {
                let old = self.front + i as u64;
                if let Some(p) = self.streams.get_mut(&e.tunnel).and_then(|s| {
                    s.in_flight
                        .iter_mut()
                        .find(|p| p.pos == old && !(p.seq == seq && p.token == token))
                }) {
                    p.pos = old + 1;
                }
            }
        }
        self.by_sending.insert(
            at,
            Issued {
                sent: now,
                tunnel,
                settled: false,
            },
        );
        Some(probe)
    }

    /// The probes lost by `now`: timed out, or pushed out by newer ones.
    pub fn expire(&mut self, now: Instant) -> Vec<Lost> {
        let mut lost = Vec::new();
        self.expire_into(now, &mut lost);
        lost
    }

    /// [`Outstanding::expire`], appended to `lost` (a caller's buffer,
    /// reused from tick to tick).
    pub fn expire_into(&mut self, now: Instant, lost: &mut Vec<Lost>) {
        lost.append(&mut self.pushed_out);
        while let Some(&Issued { sent, tunnel, settled }) = self.by_sending.front() {
            if now.saturating_duration_since(sent) < self.timeout {
                break;
            }
            self.by_sending.pop_front();
            let pos = self.front;
            self.front += 1;
            if settled {
                continue;
            }
            let Some(stream) = self.streams.get_mut(&tunnel) else {
                continue;
            };
            let Some(i) = stream.in_flight.iter().position(|p| p.pos == pos) else {
                continue;
            };
            let p = stream.in_flight.remove(i).expect("index from position");
            remember(&mut stream.resolved, self.max_in_flight, p.seq, p.token, false);
            lost.push(Lost {
                tunnel,
                seq: p.seq,
                trigger: p.trigger,
                sent: p.sent,
            });
        }
    }

    /// When the oldest probe still in flight times out, if any is.
    pub fn next_expiry(&mut self) -> Option<Instant> {
        while let Some(e) = self.by_sending.front() {
            if !e.settled {
                return Some(e.sent + self.timeout);
            }
            self.by_sending.pop_front();
            self.front += 1;
        }
        None
    }

    /// Takes back probe `seq` of `tunnel`, issued but never sent (the node
    /// had no room to send it): it is neither lost nor answerable. Returns
    /// its trigger, for issuing it again.
    pub fn withdraw(&mut self, tunnel: TunnelId, seq: u32) -> Option<Trigger> {
        let stream = self.streams.get_mut(&tunnel)?;
        let i = stream.in_flight.iter().position(|p| p.seq == seq)?;
        let p = stream.in_flight.remove(i)?;
        settle(&mut self.by_sending, self.front, p.pos);
        Some(p.trigger)
    }

    /// Probes of `tunnel` in flight.
    pub fn in_flight(&self, tunnel: TunnelId) -> usize {
        self.streams.get(&tunnel).map_or(0, |s| s.in_flight.len())
    }

    /// Classifies one received ICMP packet, given as its IPv4 packet (the
    /// inner one when it came through a tunnel). `arrived_on` is the tunnel
    /// it was decapsulated from, `None` when it came over the internet.
    ///
    /// Checks, in order: IPv4 and ICMP well-formed with good checksums and
    /// not a fragment (else malformed); an echo reply with the moat magic
    /// (else not-probe); payload length (else malformed); tunnel tracked
    /// (else unknown); arrived on that tunnel when tunnelled, echo identifier,
    /// source = target and destination = node (else wrong-tunnel); ICMP
    /// sequence agreeing with the payload's (else malformed); sequence and
    /// token of a probe in flight (match), of a remembered lost one (stale)
    /// or answered one (duplicate), else unknown.
    pub fn classify(&mut self, now: Instant, packet: &[u8], arrived_on: Option<TunnelId>) -> Received {
        let r = self.classify_inner(now, packet, arrived_on);
        let c = &mut self.counts;
        match r {
            Received::Match(_) => c.matched += 1,
            Received::Rejected(Rejection::Malformed) => c.malformed += 1,
            Received::Rejected(Rejection::NotProbe) => c.not_probe += 1,
            Received::Rejected(Rejection::Unknown) => c.unknown += 1,
            Received::Rejected(Rejection::WrongTunnel) => c.wrong_tunnel += 1,
            Received::Rejected(Rejection::Stale) => c.stale += 1,
            Received::Rejected(Rejection::Duplicate) => c.duplicate += 1,
        }
        r
    }

    /// Received packets by classification.
    pub fn counts(&self) -> ReceiveCounts {
        self.counts
    }

    fn classify_inner(&mut self, now: Instant, packet: &[u8], arrived_on: Option<TunnelId>) -> Received {
        use Rejection::*;
        let reject = Received::Rejected;
        let Some(echo) = parse_echo_reply(packet) else {
            return reject(Malformed);
        };
        let Some(echo) = echo else {
            return reject(NotProbe);
        };
        if echo.data.get(..4) != Some(&PAYLOAD_MAGIC[..]) {
            return reject(NotProbe);
        }
        let Some(payload) = ProbePayload::decode(echo.data) else {
            return reject(Malformed);
        };
        let Some(stream) = self.streams.get_mut(&payload.tunnel) else {
            return reject(Unknown);
        };
        let spec = &stream.spec;
        if arrived_on.is_some_and(|t| t != payload.tunnel)
            || echo.ident != spec.ident
            || echo.src != spec.target
            || echo.dst != spec.node
        {
            return reject(WrongTunnel);
        }
        if echo.seq != payload.seq as u16 {
            return reject(Malformed);
        }
        let same = |seq: u32, token: u64| seq == payload.seq && token == payload.token;
        if let Some(i) = stream.in_flight.iter().position(|p| same(p.seq, p.token)) {
            let p = stream.in_flight.remove(i).expect("index from position");
            settle(&mut self.by_sending, self.front, p.pos);
            remember(&mut stream.resolved, self.max_in_flight, p.seq, p.token, true);
            return Received::Match(Matched {
                tunnel: payload.tunnel,
                seq: p.seq,
                trigger: p.trigger,
                rtt: now.saturating_duration_since(p.sent),
            });
        }
        match stream.resolved.iter().find(|r| same(r.seq, r.token)) {
            Some(r) if r.answered => reject(Duplicate),
            Some(_) => reject(Stale),
            None => reject(Unknown),
        }
    }
}

fn remember(resolved: &mut VecDeque<Resolved>, cap: usize, seq: u32, token: u64, answered: bool) {
    if resolved.len() >= cap {
        resolved.pop_front();
    }
    resolved.push_back(Resolved { seq, token, answered });
}

struct EchoReply<'a> {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &'a [u8],
}

/// `None`: malformed. `Some(None)`: well-formed ICMP, not an echo reply.
fn parse_echo_reply(p: &[u8]) -> Option<Option<EchoReply<'_>>> {
    if p.len() < IPV4_HEADER_LEN || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < IPV4_HEADER_LEN || total < ihl || total > p.len() || internet_checksum(&p[..ihl]) != 0 {
        return None;
    }
    let frag = u16::from_be_bytes([p[6], p[7]]);
    if p[9] != IPPROTO_ICMP || frag & 0x3fff != 0 {
        return None;
    }
    let icmp = &p[ihl..total];
    if icmp.len() < ICMP_ECHO_HEADER_LEN || internet_checksum(icmp) != 0 {
        return None;
    }
    if icmp[0] != ICMP_ECHO_REPLY || icmp[1] != 0 {
        return Some(None);
    }
    Some(Some(EchoReply {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        ident: u16::from_be_bytes([icmp[4], icmp[5]]),
        seq: u16::from_be_bytes([icmp[6], icmp[7]]),
        data: &icmp[ICMP_ECHO_HEADER_LEN..],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder};

    const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const TARGET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    fn spec(style: ProbeStyle) -> ProbeSpec {
        ProbeSpec {
            style,
            ident: 0x1234,
            node: NODE,
            target: TARGET,
        }
    }

    /// Checks `p` with etherparse: IPv4 header and ICMP checksums, fields.
    fn check(p: &[u8], src: Ipv4Addr, dst: Ipv4Addr, echo_type: u8, payload: &ProbePayload) {
        let ip = Ipv4HeaderSlice::from_slice(p).expect("ipv4");
        let header = ip.to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum(), "ipv4 checksum");
        assert_eq!((ip.source_addr(), ip.destination_addr()), (src, dst));
        assert_eq!(usize::from(ip.total_len()), p.len());
        assert_eq!(ip.protocol(), etherparse::IpNumber::ICMP);
        assert_eq!(ip.ttl(), PROBE_TTL);
        assert!(ip.dont_fragment());
        let icmp = Icmpv4Slice::from_slice(&p[IPV4_HEADER_LEN..]).expect("icmp");
        let echo = IcmpEchoHeader {
            id: 0x1234,
            seq: payload.seq as u16,
        };
        let expected = if echo_type == ICMP_ECHO_REPLY {
            Icmpv4Type::EchoReply(echo)
        } else {
            Icmpv4Type::EchoRequest(echo)
        };
        assert_eq!(icmp.icmp_type(), expected);
        let recomputed = Icmpv4Header::with_checksum(icmp.icmp_type(), icmp.payload());
        assert_eq!(icmp.checksum(), recomputed.checksum, "icmp checksum");
        assert_eq!(ProbePayload::decode(icmp.payload()), Some(*payload));
    }

    #[test]
    fn probe_packets_in_both_styles() {
        for seq in [0, 1, 0xffff, 0x1_0000, u32::MAX] {
            let payload = ProbePayload {
                tunnel: 7,
                seq,
                token: 0xdead_beef_0bad_cafe ^ u64::from(seq),
            };
            let p = build_probe(&spec(ProbeStyle::Reply), &payload);
            assert_eq!(p.len(), PROBE_LEN);
            check(&p, TARGET, NODE, ICMP_ECHO_REPLY, &payload);
            let p = build_probe(&spec(ProbeStyle::Request), &payload);
            check(&p, NODE, TARGET, ICMP_ECHO_REQUEST, &payload);
        }
    }

    #[test]
    fn gre_with_and_without_key() {
        let inner = build_probe(
            &spec(ProbeStyle::Reply),
            &ProbePayload {
                tunnel: 1,
                seq: 2,
                token: 3,
            },
        );
        let g = gre_encap(Some(42), &inner);
        assert_eq!(&g[..8], &[0x20, 0, 0x08, 0, 0, 0, 0, 42]);
        assert_eq!(&g[8..], &inner[..]);
        assert_eq!(gre_decap(&g), Some((Some(42), &inner[..])));
        check(
            &g[8..],
            TARGET,
            NODE,
            ICMP_ECHO_REPLY,
            &ProbePayload {
                tunnel: 1,
                seq: 2,
                token: 3,
            },
        );

        let g = gre_encap(None, &inner);
        assert_eq!(&g[..4], &[0, 0, 0x08, 0]);
        assert_eq!(gre_decap(&g), Some((None, &inner[..])));
        // Checksum and sequence fields are skipped.
        let mut g = vec![0xb0, 0, 0x08, 0, 0xaa, 0xaa, 0, 0, 0, 0, 0, 9, 0, 0, 0, 5];
        g.extend_from_slice(&inner);
        assert_eq!(gre_decap(&g), Some((Some(9), &inner[..])));
        assert_eq!(gre_decap(&[0, 0, 0x86, 0xdd]), None, "IPv6 inside");
        assert_eq!(gre_decap(&[0x20, 0, 0x08, 0, 1]), None, "truncated key");
    }

    #[test]
    fn whole_frames_parse_with_an_independent_parser() {
        let payload = ProbePayload {
            tunnel: 9,
            seq: 77,
            token: 0x0123_4567_89ab_cdef,
        };
        let inner = build_probe(&spec(ProbeStyle::Reply), &payload);
        for key in [Some(0xfeed_0001), None] {
            let wire = Wire {
                local: Ipv4Addr::new(198, 51, 100, 7),
                remote: Ipv4Addr::new(203, 0, 113, 9),
                key,
                smac: [2, 0, 0, 0, 0, 1],
                dmac: [2, 0, 0, 0, 0, 2],
            };
            let mut buf = [0xaau8; FRAME_MAX + 4];
            let len = write_frame(&mut buf, &wire, 0x4242, &inner);
            assert_eq!(len, 14 + 20 + gre_header_len(key) + PROBE_LEN);
            assert!(len <= FRAME_MAX);
            let frame = &buf[..len];
            let eth = etherparse::Ethernet2HeaderSlice::from_slice(frame).expect("ethernet");
            assert_eq!(eth.destination(), wire.dmac);
            assert_eq!(eth.source(), wire.smac);
            assert_eq!(eth.ether_type(), etherparse::EtherType::IPV4);
            let ip = Ipv4HeaderSlice::from_slice(&frame[14..]).expect("outer ipv4");
            let header = ip.to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum(), "outer checksum");
            assert_eq!((ip.source_addr(), ip.destination_addr()), (wire.local, wire.remote));
            assert_eq!(usize::from(ip.total_len()), len - 14);
            assert_eq!(ip.protocol(), etherparse::IpNumber::GRE);
            assert_eq!((ip.ttl(), ip.dont_fragment(), ip.identification()), (64, true, 0x4242));
            let (got_key, got_inner) = gre_decap(&frame[34..]).expect("gre");
            assert_eq!(got_key, key);
            check(got_inner, TARGET, NODE, ICMP_ECHO_REPLY, &payload);
        }
    }

    #[test]
    fn checksum_rfc1071_example_and_odd_lengths() {
        // RFC 1071, section 3: the sum of these bytes is 0xddf2.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(internet_checksum(&[]), 0xffff);
        assert_eq!(
            internet_checksum(&[0x12, 0x34, 0x56]),
            internet_checksum(&[0x12, 0x34, 0x56, 0])
        );
    }

    /// Answer to a request-style probe, built by etherparse as the target would.
    fn answer(request: &[u8]) -> Vec<u8> {
        let ip = Ipv4HeaderSlice::from_slice(request).expect("ipv4");
        let icmp = Icmpv4Slice::from_slice(&request[IPV4_HEADER_LEN..]).expect("icmp");
        let Icmpv4Type::EchoRequest(echo) = icmp.icmp_type() else {
            panic!("not a request");
        };
        let b = PacketBuilder::ipv4(ip.destination(), ip.source(), 61).icmpv4_echo_reply(echo.id, echo.seq);
        let mut out = Vec::new();
        b.write(&mut out, icmp.payload()).expect("write");
        out
    }

    fn outstanding() -> (Outstanding, Instant) {
        let mut o = Outstanding::new(Duration::from_secs(1), 4);
        o.set_tunnel(7, spec(ProbeStyle::Reply));
        o.set_tunnel(
            8,
            ProbeSpec {
                ident: 0x0808,
                ..spec(ProbeStyle::Request)
            },
        );
        (o, Instant::now())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn reply_style_probe_matches_itself() {
        let (mut o, t0) = outstanding();
        let p = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        assert_eq!(o.in_flight(7), 1);
        let r = o.classify(t0 + ms(30), &p, Some(7));
        let Received::Match(m) = r else { panic!("{r:?}") };
        assert_eq!((m.tunnel, m.trigger, m.rtt), (7, Trigger::Scheduled, ms(30)));
        assert_eq!(o.in_flight(7), 0);
        assert_eq!(
            o.classify(t0 + ms(31), &p, None),
            Received::Rejected(Rejection::Duplicate)
        );
        assert_eq!(o.counts().matched, 1);
        assert_eq!(o.counts().duplicate, 1);
    }

    #[test]
    fn request_style_answer_matches() {
        let (mut o, t0) = outstanding();
        let p = o.issue(8, t0, Trigger::Extra).expect("tracked");
        let a = answer(&p);
        let r = o.classify(t0 + ms(5), &a, None);
        assert!(
            matches!(
                r,
                Received::Match(Matched {
                    tunnel: 8,
                    trigger: Trigger::Extra,
                    ..
                })
            ),
            "{r:?}"
        );
        // Our own request, looped back, is not an answer.
        assert_eq!(o.classify(t0, &p, None), Received::Rejected(Rejection::NotProbe));
    }

    #[test]
    fn timeouts_and_stale_answers() {
        let (mut o, t0) = outstanding();
        let a = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        let b = o.issue(7, t0 + ms(500), Trigger::Scheduled).expect("tracked");
        assert_eq!(o.next_expiry(), Some(t0 + ms(1000)));
        assert!(o.expire(t0 + ms(999)).is_empty());
        let lost = o.expire(t0 + ms(1000));
        assert_eq!(lost.len(), 1);
        assert_eq!((lost[0].tunnel, lost[0].sent), (7, t0));
        assert_eq!(
            o.classify(t0 + ms(1200), &a, None),
            Received::Rejected(Rejection::Stale)
        );
        assert!(matches!(o.classify(t0 + ms(1200), &b, None), Received::Match(_)));
        assert_eq!(o.next_expiry(), None);
    }

    #[test]
    fn in_flight_is_bounded() {
        let (mut o, t0) = outstanding();
        let first = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        for i in 1..4 {
            o.issue(7, t0 + ms(i), Trigger::Scheduled);
        }
        assert_eq!(o.in_flight(7), 4);
        o.issue(7, t0 + ms(10), Trigger::Extra);
        assert_eq!(o.in_flight(7), 4, "the oldest was pushed out");
        let lost = o.expire(t0 + ms(11));
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].sent, t0);
        assert_eq!(
            o.classify(t0 + ms(12), &first, None),
            Received::Rejected(Rejection::Stale)
        );
        // After many more, the first is forgotten entirely.
        for i in 0..20 {
            o.issue(7, t0 + ms(20 + i), Trigger::Scheduled);
        }
        assert_eq!(
            o.classify(t0 + ms(50), &first, None),
            Received::Rejected(Rejection::Unknown)
        );
    }

    #[test]
    fn rejections() {
        use Rejection::*;
        let (mut o, t0) = outstanding();
        let p = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        let now = t0 + ms(1);

        // Came back on another tunnel.
        assert_eq!(o.classify(now, &p, Some(8)), Received::Rejected(WrongTunnel));
        // Right tunnel id, another tunnel's identifier / addresses.
        let mut other = o.streams[&7].spec;
        other.ident = 0x0808;
        let payload = ProbePayload::decode(&p[28..]).expect("payload");
        assert_eq!(
            o.classify(now, &build_probe(&other, &payload), None),
            Received::Rejected(WrongTunnel)
        );
        other = ProbeSpec {
            target: Ipv4Addr::new(192, 0, 2, 99),
            ..spec(ProbeStyle::Reply)
        };
        assert_eq!(
            o.classify(now, &build_probe(&other, &payload), None),
            Received::Rejected(WrongTunnel)
        );
        // A tunnel not tracked.
        let forged = ProbePayload { tunnel: 99, ..payload };
        assert_eq!(
            o.classify(now, &build_probe(&spec(ProbeStyle::Reply), &forged), None),
            Received::Rejected(Unknown)
        );
        // A guessed token.
        let forged = ProbePayload {
            token: payload.token ^ 1,
            ..payload
        };
        assert_eq!(
            o.classify(now, &build_probe(&spec(ProbeStyle::Reply), &forged), None),
            Received::Rejected(Unknown)
        );
        // Broken packets.
        let mut bad = p;
        bad[30] ^= 1;
        assert_eq!(
            o.classify(now, &bad, None),
            Received::Rejected(Malformed),
            "icmp checksum"
        );
        let mut bad = p;
        bad[8] ^= 1;
        assert_eq!(
            o.classify(now, &bad, None),
            Received::Rejected(Malformed),
            "ipv4 checksum"
        );
        assert_eq!(
            o.classify(now, &p[..40], None),
            Received::Rejected(Malformed),
            "truncated"
        );
        assert_eq!(o.classify(now, &[], None), Received::Rejected(Malformed), "empty");
        // An echo reply with a moat payload one byte short.
        let mut short = Vec::new();
        PacketBuilder::ipv4(TARGET.octets(), NODE.octets(), 64)
            .icmpv4_echo_reply(0x1234, payload.seq as u16)
            .write(&mut short, &p[28..47])
            .expect("write");
        assert_eq!(o.classify(now, &short, None), Received::Rejected(Malformed));
        // Someone else's ping reply.
        let mut ping = Vec::new();
        PacketBuilder::ipv4(TARGET.octets(), NODE.octets(), 64)
            .icmpv4_echo_reply(1, 1)
            .write(&mut ping, b"abcdefghijklmnopqrstuvwx")
            .expect("write");
        assert_eq!(o.classify(now, &ping, None), Received::Rejected(NotProbe));

        let c = o.counts();
        assert_eq!(
            (c.matched, c.wrong_tunnel, c.unknown, c.malformed, c.not_probe),
            (0, 3, 2, 5, 1)
        );
        // The real answer still matches after all that.
        assert!(matches!(o.classify(now, &p, Some(7)), Received::Match(_)));
    }

    #[test]
    fn tokens_differ_and_removal_forgets() {
        let (mut o, t0) = outstanding();
        let a = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        let b = o.issue(7, t0, Trigger::Scheduled).expect("tracked");
        let ta = ProbePayload::decode(&a[28..]).expect("payload");
        let tb = ProbePayload::decode(&b[28..]).expect("payload");
        assert_ne!(ta.token, tb.token);
        assert_eq!(tb.seq, ta.seq.wrapping_add(1));
        assert!(o.remove_tunnel(7));
        assert_eq!(o.issue(7, t0, Trigger::Scheduled), None);
        assert_eq!(o.classify(t0, &a, None), Received::Rejected(Rejection::Unknown));
        assert!(o.expire(t0 + Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn a_withdrawn_probe_is_neither_lost_nor_answered() {
        let (mut o, t0) = outstanding();
        let a = o.issue(7, t0, Trigger::Extra).expect("tracked");
        let b = o.issue(7, t0 + ms(1), Trigger::Scheduled).expect("tracked");
        let seq_a = ProbePayload::decode(&a[28..]).expect("payload").seq;
        assert_eq!(o.withdraw(7, seq_a), Some(Trigger::Extra));
        assert_eq!(o.withdraw(7, seq_a), None, "only once");
        assert_eq!(o.withdraw(8, seq_a), None, "another tunnel's");
        assert_eq!(o.in_flight(7), 1);
        assert_eq!(o.classify(t0 + ms(5), &a, None), Received::Rejected(Rejection::Unknown));
        let lost = o.expire(t0 + ms(1001));
        assert_eq!(lost.len(), 1, "only the probe sent: {lost:?}");
        assert_eq!(lost[0].seq, ProbePayload::decode(&b[28..]).expect("payload").seq);
        assert_eq!(o.next_expiry(), None);
    }

    #[test]
    fn expiry_follows_sending_order_and_skips_resolved_probes() {
        let mut o = Outstanding::new(Duration::from_secs(1), 8);
        let t0 = Instant::now();
        for id in 1..=100 {
            o.set_tunnel(id, spec(ProbeStyle::Reply));
        }
        // Tunnel i sends at t0 + i ms; even tunnels get their answer.
        let mut probes = Vec::new();
        for id in 1..=100u32 {
            probes.push((
                id,
                o.issue(id, t0 + ms(u64::from(id)), Trigger::Scheduled)
                    .expect("tracked"),
            ));
        }
        for (id, p) in &probes {
            if id % 2 == 0 {
                assert!(matches!(o.classify(t0 + ms(200), p, None), Received::Match(_)));
            }
        }
        // A probe issued with an earlier clock still times out on time.
        let late = o.issue(3, t0 + ms(10), Trigger::Extra).expect("tracked");
        assert!(o.remove_tunnel(99));
        assert_eq!(o.next_expiry(), Some(t0 + ms(1001)));
        let lost = o.expire(t0 + ms(1010));
        let ids: Vec<(u32, Instant)> = lost.iter().map(|l| (l.tunnel, l.sent)).collect();
        assert_eq!(
            ids,
            vec![
                (1, t0 + ms(1)),
                (3, t0 + ms(3)),
                (5, t0 + ms(5)),
                (7, t0 + ms(7)),
                (9, t0 + ms(9)),
                (3, t0 + ms(10))
            ]
        );
        assert_eq!(
            o.classify(t0 + ms(1020), &late, None),
            Received::Rejected(Rejection::Stale)
        );
        let rest = o.expire(t0 + ms(5000));
        let expected: Vec<u32> = (11..=97).step_by(2).collect();
        assert_eq!(rest.iter().map(|l| l.tunnel).collect::<Vec<_>>(), expected);
        assert_eq!(o.next_expiry(), None);
        assert!(o.expire(t0 + ms(9000)).is_empty());
    }
}
