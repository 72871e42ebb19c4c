//! Health checks in the daemon: one thread probes every tunnel through
//! the tunnel itself (moat-health decides when and what), matches the
//! answers, keeps each tunnel's state, and wakes the main loop when a
//! tunnel changes state so that route penalties are applied at once.
//!
//! A tunnel keeps its health across reloads while its identity (local,
//! remote, key) is unchanged.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use moat_config::{Config, Direction, ProbeKind};
use moat_dataplane::nexthop::Resolution;
use moat_health::probe::{ProbePayload, PAYLOAD_LEN, PROBE_LEN};
use moat_health::{
    probe::{gre_decap, Wire},
    HealthSnapshot, HealthState, Outcome, Outstanding, ProbeSpec, ProbeStyle, ReceiveCounts, Received as Classified,
    Schedule, TunnelHealth,
};
use rustc_hash::FxHashMap;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use crate::probe_io::{Outgoing, ProbeIo, Source};

/// (local, remote, key): what identifies a tunnel on the wire.
type Identity = (Ipv4Addr, Ipv4Addr, Option<u32>);

/// Probes a tunnel may have in flight.
const MAX_IN_FLIGHT: usize = 8;
/// Longest wait for an answer.
const MAX_TIMEOUT: Duration = Duration::from_secs(1);
/// Wait for an answer when some tunnel is probed at the high rate.
const HIGH_RATE_TIMEOUT: Duration = Duration::from_millis(250);

struct Tunnel {
    /// (customer, tunnel) names, for logs (out of line: the probe path
    /// does not read them).
    names: Box<(String, String)>,
    identity: Identity,
    interval: Duration,
    health: TunnelHealth,
}

/// The health of every configured tunnel, shared by the probe thread and
/// the daemon.
pub struct Table {
    tunnels: FxHashMap<u32, Tunnel>,
    by_identity: FxHashMap<Identity, u32>,
    by_name: HashMap<(String, String), u32>,
    next_id: u32,
    schedule: Schedule,
    outstanding: Outstanding,
    locals: Vec<Ipv4Addr>,
    /// (ifindex, interface MAC, next hop MAC) per tunnel remote whose next
    /// hop is resolved.
    next_hops: FxHashMap<Ipv4Addr, (u32, [u8; 6], [u8; 6])>,
    /// The probe thread's tick: [`FAST_TICK`] while some tunnel is probed at
    /// the high rate, else [`TICK`].
    tick: Duration,
}

impl Table {
    /// The route penalty of tunnel `tunnel` of `customer` (0 if unknown).
    pub fn penalty(&self, customer: &str, tunnel: &str) -> u32 {
        self.by_name
            .get(&(customer.to_string(), tunnel.to_string()))
            .and_then(|id| self.tunnels.get(id))
            .map_or(0, |t| t.health.penalty())
    }

    /// Tunnels that are not healthy, by identity (for the next daemon).
    pub fn export(&self) -> BTreeMap<String, String> {
        self.tunnels
            .values()
            .filter(|t| t.health.state() != HealthState::Healthy)
            .map(|t| (identity_key(t.identity), t.health.state().to_string()))
            .collect()
    }

    /// Takes over states a previous daemon saved (see [`Table::export`]).
    pub fn resume(&mut self, saved: &BTreeMap<String, String>, now: Instant) {
        for t in self.tunnels.values_mut() {
            let state = match saved.get(&identity_key(t.identity)).map(String::as_str) {
                Some("degraded") => HealthState::Degraded,
                Some("down") => HealthState::Down,
                _ => continue,
            };
            t.health = TunnelHealth::resumed(now, t.health.is_enabled(), state);
            info!(customer = %t.names.0, tunnel = %t.names.1, %state, "health kept across the restart");
        }
    }

    /// A snapshot of one tunnel's health.
    pub fn snapshot(&self, customer: &str, tunnel: &str, now: Instant) -> Option<HealthSnapshot> {
        let id = self.by_name.get(&(customer.to_string(), tunnel.to_string()))?;
        Some(self.tunnels.get(id)?.health.snapshot(now))
    }

    pub fn counts(&self) -> ReceiveCounts {
        self.outstanding.counts()
    }

    /// Takes the next hops the data plane uses: probes to a remote with a
    /// resolved one leave the way the tunnel's traffic does.
    pub fn set_next_hops(&mut self, hops: &BTreeMap<Ipv4Addr, Resolution>) {
        self.next_hops = hops
            .iter()
            .filter_map(|(remote, r)| r.next_hop().map(|h| (*remote, (h.ifindex, h.smac, h.dmac))))
            .collect();
    }

    /// How a probe of `identity` goes out: its wire and the interface, when
    /// the remote's next hop is known.
    fn outgoing(&self, (local, remote, key): Identity, inner: [u8; PROBE_LEN]) -> Outgoing {
        let hop = self.next_hops.get(&remote);
        let (smac, dmac) = hop.map_or(([0; 6], [0; 6]), |h| (h.1, h.2));
        Outgoing {
            wire: Wire {
                local,
                remote,
                key,
                smac,
                dmac,
            },
            ifindex: hop.map(|h| h.0),
            inner,
        }
    }

    /// Makes the table follow `config`: new tunnels start healthy, tunnels
    /// whose identity is unchanged keep their health, others go.
    pub fn configure(&mut self, config: &Config, now: Instant) {
        let mut keep: FxHashMap<Identity, u32> = FxHashMap::default();
        let mut by_name = HashMap::new();
        let mut locals = Vec::new();
        for c in &config.customers {
            for t in &c.tunnels {
                let identity = (t.local, t.remote, t.key);
                let hc = &t.health_check;
                // Bidirectional answers come back inside the tunnel, to our
                // side of its interface address; unidirectional ones to the
                // tunnel endpoint, over the internet.
                let node_side = match hc.direction {
                    Direction::Bidirectional => t.our_address().unwrap_or(t.local),
                    Direction::Unidirectional => t.local,
                };
                let id = match self.by_identity.get(&identity) {
                    Some(&id) => id,
                    None => {
                        self.next_id += 1;
                        self.next_id
                    }
                };
                let interval = hc.rate.interval();
                let spec = ProbeSpec {
                    style: match hc.kind {
                        ProbeKind::Reply => ProbeStyle::Reply,
                        ProbeKind::Request => ProbeStyle::Request,
                    },
                    ident: id as u16,
                    node: node_side,
                    target: hc.target,
                };
                self.outstanding.set_tunnel(id, spec);
                match self.tunnels.get_mut(&id) {
                    Some(existing) => {
                        *existing.names = (c.name.clone(), t.name.clone());
                        if existing.health.is_enabled() != hc.enabled {
                            existing.health.set_enabled(now, hc.enabled);
                        }
                        if existing.interval != interval {
                            existing.interval = interval;
                            self.schedule.set_interval(id, interval, now);
                        }
                    }
                    None => {
                        self.tunnels.insert(
                            id,
                            Tunnel {
                                names: Box::new((c.name.clone(), t.name.clone())),
                                identity,
                                interval,
                                health: TunnelHealth::new(now, hc.enabled),
                            },
                        );
                    }
                }
                if hc.enabled && !self.schedule.contains(id) {
                    // A new or restarted check probes at once (within its
                    // interval or a second, spread over that span).
                    self.schedule.start(id, interval, now);
                } else if !hc.enabled {
                    self.schedule.remove(id);
                }
                keep.insert(identity, id);
                by_name.insert((c.name.clone(), t.name.clone()), id);
                locals.push(t.local);
            }
        }
        let gone: Vec<u32> = self
            .tunnels
            .iter()
            .filter(|(_, t)| !keep.contains_key(&t.identity))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.tunnels.remove(&id);
            self.schedule.remove(id);
            self.outstanding.remove_tunnel(id);
        }
        locals.sort();
        locals.dedup();
        // Answers are awaited for up to 1 s, or 250 ms while some tunnel is
        // probed at the high rate (so that it fails over within its rate).
        let high = config
            .customers
            .iter()
            .flat_map(|c| &c.tunnels)
            .any(|t| t.health_check.enabled && t.health_check.rate.interval() < Duration::from_secs(1));
        self.outstanding
            .set_timeout(if high { HIGH_RATE_TIMEOUT } else { MAX_TIMEOUT });
        self.tick = if high { FAST_TICK } else { TICK };
        self.by_identity = keep;
        self.by_name = by_name;
        self.locals = locals;
    }

    fn result(&mut self, id: u32, now: Instant, trigger: moat_health::Trigger, outcome: Outcome) -> bool {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return false;
        };
        let effect = t.health.on_result(now, trigger, outcome);
        if effect.extra_probes > 0 {
            self.schedule.probe_now(id, effect.extra_probes);
        }
        if let Some(change) = effect.change {
            info!(
                customer = %t.names.0,
                tunnel = %t.names.1,
                from = %change.from,
                to = %change.to,
                penalty = t.health.penalty(),
                "tunnel health changed: {}",
                change.reason
            );
            return true;
        }
        false
    }
}

/// The running probe thread; stops on drop.
pub struct Health {
    pub table: Arc<Mutex<Table>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Health {
    /// Starts probing the tunnels of `config`; `changed` is told whenever a
    /// tunnel changes state.
    pub fn start(config: &Config, changed: UnboundedSender<()>) -> anyhow::Result<Health> {
        let now = Instant::now();
        let mut table = Table {
            tunnels: FxHashMap::default(),
            by_identity: FxHashMap::default(),
            by_name: HashMap::new(),
            next_id: 0,
            schedule: Schedule::new(now),
            outstanding: Outstanding::new(MAX_TIMEOUT, MAX_IN_FLIGHT),
            locals: Vec::new(),
            next_hops: FxHashMap::default(),
            tick: TICK,
        };
        table.configure(config, now);
        let mut io = ProbeIo::open(table.locals.iter().copied())?;
        let table = Arc::new(Mutex::new(table));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (table.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("moat-health".into())
            .spawn(move || run(&t, &s, &mut io, &changed))?;
        Ok(Health {
            table,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn identity_key((local, remote, key): Identity) -> String {
    format!("{local} {remote} {}", key.map_or("-".to_string(), |k| k.to_string()))
}

/// Parses a packet from the GRE socket: (identity, inner packet).
fn open_gre(packet: &[u8]) -> Option<(Identity, &[u8])> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet.len() < ihl || ihl < 20 || packet[9] != 47 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let (key, inner) = gre_decap(&packet[ihl..])?;
    Some(((dst, src, key), inner))
}

/// Whether a send failed for want of room in the node's own queues
/// (transient), not because the destination cannot be reached.
fn no_room(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// How often due probes are sent and lost ones collected: probes leave
/// within this of their slot, and a lost probe is noticed within this of
/// its timeout. Each tick costs a wakeup and a send call, so the tick is
/// as long as the rates allow: 20 ms for 1 s and 10 s intervals (2% of
/// the interval; 50 batches a second), 5 ms while some tunnel is probed
/// every 100 ms.
const TICK: Duration = Duration::from_millis(20);
/// The tick while some tunnel is probed at the high rate.
const FAST_TICK: Duration = Duration::from_millis(5);

fn run(table: &Mutex<Table>, stop: &AtomicBool, io: &mut ProbeIo, changed: &UnboundedSender<()>) {
    let mut next_tick = Instant::now();
    // Probes of one tick, and the tunnel of each (kept from tick to tick).
    let mut outgoing: Vec<Outgoing> = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut retry: Vec<(u32, moat_health::Trigger)> = Vec::new();
    let mut retried: Vec<bool> = Vec::new();
    let mut due: Vec<(u32, moat_health::Trigger)> = Vec::new();
    let mut lost: Vec<moat_health::probe::Lost> = Vec::new();
    let mut next_drop_check = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // The thread wakes once per tick, whatever the traffic: answers wait
        // in the receive ring (or socket buffers) and are matched by their
        // arrival time.
        let wait = next_tick.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut any_change = false;
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *t;
        next_tick = now + t.tick;

        // Answers first, so that one that arrived in time is not taken for lost.
        io.drain(|source, packet, arrived| {
            // The arrival as an Instant (now, if the kernel gave no time).
            let at = arrived
                .and_then(|a| wall.duration_since(a).ok())
                .and_then(|ago| now.checked_sub(ago))
                .unwrap_or(now);
            let (inner, arrived_on) = match source {
                Source::Gre => match open_gre(packet) {
                    Some((identity, inner)) => (inner, t.by_identity.get(&identity).copied()),
                    None => return,
                },
                Source::Icmp => (packet, None),
            };
            if let Classified::Match(m) = t.outstanding.classify(at, inner, arrived_on) {
                any_change |= t.result(m.tunnel, at, m.trigger, Outcome::Success { rtt: m.rtt });
            }
        });
        t.outstanding.expire_into(now, &mut lost);
        for l in lost.drain(..) {
            any_change |= t.result(l.tunnel, now, l.trigger, Outcome::Lost);
        }

        for &local in &t.locals {
            if let Err(e) = io.add_local(local) {
                warn!(%local, "health probes: {e}");
            }
        }
        outgoing.clear();
        ids.clear();
        retried.clear();
        // Probes the node had no room for last tick go first, as they were,
        // once: a node that stays out of room cannot check its tunnels, and
        // their probes then count as lost.
        let again = retry.len();
        due.clear();
        due.append(&mut retry);
        t.schedule.due_into(now, &mut due);
        for (k, &(id, trigger)) in due.iter().enumerate() {
            let Some(identity) = t.tunnels.get(&id).map(|x| x.identity) else {
                continue;
            };
            let Some(inner) = t.outstanding.issue(id, now, trigger) else {
                continue;
            };
            outgoing.push(t.outgoing(identity, inner));
            ids.push(id);
            retried.push(k < again);
        }
        let mut failed: Option<(usize, Ipv4Addr, std::io::Error)> = None;
        io.send(&outgoing, |i, result| match result {
            Ok(()) => {
                if let Some(x) = t.tunnels.get_mut(&ids[i]) {
                    x.health.on_probe_sent(now);
                }
            }
            Err(e) if no_room(&e) && !retried[i] => {
                // The node's own queue is full: not the tunnel's failure.
                // The probe is taken back and sent next tick.
                let seq = ProbePayload::decode(&outgoing[i].inner[PROBE_LEN - PAYLOAD_LEN..]).map(|p| p.seq);
                if let Some(trigger) = seq.and_then(|seq| t.outstanding.withdraw(ids[i], seq)) {
                    retry.push((ids[i], trigger));
                }
            }
            Err(e) => match &mut failed {
                Some((n, ..)) => *n += 1,
                None => failed = Some((1, outgoing[i].wire.remote, e)),
            },
        });
        if let Some((n, remote, e)) = failed {
            // One line per tick, however many tunnels share the cause; those
            // probes are lost, as the tunnel cannot be reached.
            warn!(%remote, failed = n, "sending health probes: {e}");
        }
        if now >= next_drop_check {
            next_drop_check = now + Duration::from_secs(1);
            let dropped = io.ring_drops();
            if dropped > 0 {
                warn!(dropped, "health probes: answers dropped, the receive ring was full");
            }
        }
        if any_change {
            let _ = changed.send(());
        }
    }
}
