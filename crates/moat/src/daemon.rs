//! `moat run`: the daemon. It opens (or adopts) the pinned data plane,
//! applies the configuration as numbered generations, keeps tunnel next
//! hops resolved, and serves the control socket and the metrics endpoint.
//!
//! Life cycle:
//! - start: validate the file (nothing touches the kernel before it is
//!   valid), check it against the node (interfaces, local addresses), mount
//!   bpffs if needed, open the pin directory: adopt a running data plane of
//!   this build or load and pin a new one; apply, then attach.
//! - reload (SIGHUP, `moat reload`): the same checks; an invalid file is
//!   rejected and the generation in force stays untouched.
//! - next hops: rtnetlink announcements (links, addresses, neighbours,
//!   routes) and a periodic timer resolve every tunnel remote again; a
//!   change is applied at once. Unresolved gateways get a managed
//!   neighbour entry so the kernel keeps them resolved.
//! - SIGTERM/SIGINT: exit, leaving the pinned data plane forwarding.
//! - `moat down`: detach, unpin, exit.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::fs::PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use moat_config::{Config, Diagnostic};
use moat_dataplane::{
    compile,
    nexthop::{Monitor, Resolution, Resolver},
    Compiled, Dataplane, Opened, PinDir, XdpMode,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    control::{Command, Request, Response},
    health, metrics,
    status::{self, Status},
};

pub struct Options {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    /// How often the maps are read back and compared with the generation.
    pub verify_interval: Duration,
}

/// How often next hops are resolved again without any announcement.
const REFRESH: Duration = Duration::from_secs(10);
/// How often an unresolved gateway's managed neighbour entry is renewed.
const MANAGED_RETRY: Duration = Duration::from_secs(3);
/// Shortest time between two refreshes triggered by announcements.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// How long announcements are collected before resolving.
const DEBOUNCE: Duration = Duration::from_millis(50);
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn xdp_mode(m: moat_config::XdpMode) -> (XdpMode, &'static str) {
    match m {
        moat_config::XdpMode::Native => (XdpMode::Driver, "native"),
        moat_config::XdpMode::Generic => (XdpMode::Skb, "generic"),
    }
}

/// The daemon's state, behind one lock.
struct State {
    config_path: PathBuf,
    pins: PinDir,
    dp: Dataplane,
    opened: Opened,
    /// The configuration in force (shared: refreshes borrow it cheaply).
    config: Arc<Config>,
    /// What the maps should hold in this generation (with names).
    desired: Compiled,
    generation: u64,
    last_reload: status::Reload,
    resolver: Resolver,
    /// Next hop per tunnel remote, as last resolved.
    next_hops: BTreeMap<Ipv4Addr, Resolution>,
    /// Gateways already given a managed neighbour entry, and when.
    managed: BTreeMap<(u32, Ipv4Addr), Instant>,
    /// Differences found by the last verification (before repairing them).
    last_differences: usize,
    /// Tunnel health (route penalties), kept by the probe thread.
    health: Arc<Mutex<health::Table>>,
    /// Where unhealthy states are saved for a restarted daemon (beside the socket).
    health_file: PathBuf,
}

/// Loads and validates a file: the config or every diagnostic as text.
fn load_config(path: &Path) -> Result<Config, Vec<String>> {
    match moat_config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                warn!("{w}");
            }
            Ok(loaded.config)
        }
        Err(diags) => Err(diags.iter().map(Diagnostic::to_string).collect()),
    }
}

impl State {
    /// Checks a valid config against this node: interfaces exist, tunnel
    /// sources are local addresses.
    fn check_node(&mut self, config: &Config) -> Vec<String> {
        check_node(&mut self.resolver, config)
    }

    /// Keeps `hops` as the next hops in force, and gives them to the probe
    /// thread: probes follow the tunnels' traffic.
    fn set_next_hops(&mut self, hops: BTreeMap<Ipv4Addr, Resolution>) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_next_hops(&hops);
        self.next_hops = hops;
    }

    /// Resolves every tunnel remote; asks the kernel to keep unresolved
    /// gateways resolved.
    fn resolve_all(&mut self, config: &Config) -> BTreeMap<Ipv4Addr, Resolution> {
        let remotes: Vec<Ipv4Addr> = config
            .customers
            .iter()
            .flat_map(|c| c.tunnels.iter().map(|t| t.remote))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let resolved = match self.resolver.resolve_many(&remotes) {
            Ok(r) => r,
            Err(e) => {
                // A failed query says nothing about the next hops: keep the
                // ones in force rather than cutting tunnels off.
                warn!("resolving next hops: {e}; keeping the previous ones");
                remotes
                    .iter()
                    .map(|r| self.next_hops.get(r).copied().unwrap_or(Resolution::NoRoute))
                    .collect()
            }
        };
        let mut out = BTreeMap::new();
        for (remote, r) in remotes.into_iter().zip(resolved) {
            if let Resolution::Unresolved { ifindex, neighbour } = r {
                // Asked again while it stays unresolved (the entry may have
                // been deleted), at most every few seconds: the request
                // itself is announced and wakes the refresh loop.
                let last = self.managed.get(&(ifindex, neighbour));
                if last.is_none_or(|t| t.elapsed() > MANAGED_RETRY) {
                    match self.resolver.ensure_managed(ifindex, neighbour) {
                        Ok(()) if last.is_none() => {
                            info!(%neighbour, ifindex, "asked the kernel to keep the gateway resolved")
                        }
                        Ok(()) => {}
                        Err(e) => warn!(%neighbour, ifindex, "managed neighbour entry: {e}"),
                    }
                    self.managed.insert((ifindex, neighbour), Instant::now());
                }
            }
            out.insert(remote, r);
        }
        out
    }

    /// Compiles `config` with `hops` and applies it; attaches as
    /// configured. On a failure the previous configuration and next hops
    /// are applied again (reading the maps back), so nothing stays half
    /// applied; the error is returned.
    fn apply(&mut self, config: &Config, hops: &BTreeMap<Ipv4Addr, Resolution>) -> Result<String> {
        let result = self.try_apply(config, hops);
        if let Err(e) = &result {
            if self.generation == 0 {
                return result;
            }
            warn!(
                generation = self.generation,
                "apply failed ({e:#}); restoring the generation in force"
            );
            self.dp.resync();
            let (previous, previous_hops) = (self.config.clone(), self.next_hops.clone());
            match self.try_apply(&previous, &previous_hops) {
                Ok(summary) => info!(generation = self.generation, "restored: {summary}"),
                Err(e) => error!(
                    generation = self.generation,
                    "restoring the generation in force failed too ({e:#}); the verification retries"
                ),
            }
        }
        result
    }

    fn try_apply(&mut self, config: &Config, hops: &BTreeMap<Ipv4Addr, Resolution>) -> Result<String> {
        let started = Instant::now();
        let spec = {
            let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
            config.to_spec_with_penalties(|c, t| health.penalty(c, t))
        };
        let compiled = compile(
            &spec,
            &|t| hops.get(&t.remote).and_then(|r| r.next_hop()),
            self.dp.applied(),
        )
        .context("compiling the configuration")?;
        // A running data plane gets its new interfaces before the maps
        // change (they serve the generation in force meanwhile); a fresh
        // one is attached only once its maps are full.
        let fresh = self.generation == 0 && self.opened == Opened::Loaded;
        if !fresh {
            self.attach_configured(config)?;
        }
        let report = self.dp.apply(&compiled).context("writing the data plane")?;
        self.desired = compiled;
        if fresh {
            self.attach_configured(config)?;
        }
        self.detach_unconfigured(config)?;
        Ok(format!(
            "{} added, {} changed, {} removed in {:.1} ms",
            report.added,
            report.changed,
            report.removed,
            started.elapsed().as_secs_f64() * 1e3
        ))
    }

    /// Attaches to every configured interface where our program does not
    /// run in the configured mode (missing, stale after the interface was
    /// re-created, or another mode). An interface the kernel cannot answer
    /// for is left as it is.
    fn attach_configured(&mut self, config: &Config) -> Result<()> {
        let ours = self.dp.program_id()?;
        for iface in &config.node.interfaces {
            let (mode, mode_name) = xdp_mode(iface.xdp_mode);
            let kernel = self
                .resolver
                .interface_xdp(&iface.name)
                .with_context(|| format!("asking the kernel about {}", iface.name))?;
            let Some(kernel) = kernel else {
                bail!("interface {} does not exist", iface.name);
            };
            let pinned = self.dp.pinned_interfaces().any(|i| i == iface.name);
            if pinned && kernel.runs(ours, mode_name) {
                continue;
            }
            if pinned {
                // Native and generic cannot be active at once: a mode change
                // (or a re-created interface) means detaching first.
                warn!(interface = %iface.name, kernel_mode = kernel.mode, mode = mode_name,
                    "attachment stale or in another mode; attaching again");
                self.dp.detach_pinned(&iface.name)?;
            }
            self.dp
                .attach(&iface.name, mode)
                .with_context(|| format!("attaching to {} ({mode_name})", iface.name))?;
            info!(interface = %iface.name, mode = mode_name, "attached");
        }
        Ok(())
    }

    /// Detaches from interfaces no longer configured.
    fn detach_unconfigured(&mut self, config: &Config) -> Result<()> {
        let gone: Vec<String> = self
            .dp
            .pinned_interfaces()
            .filter(|i| !config.node.interfaces.iter().any(|c| c.name == *i))
            .map(str::to_string)
            .collect();
        for i in gone {
            self.dp.detach_pinned(&i)?;
            info!(interface = %i, "detached (no longer configured)");
        }
        Ok(())
    }

    /// Re-reads the config file; an invalid one changes nothing.
    fn reload(&mut self) -> Response {
        let config = match load_config(&self.config_path) {
            Ok(c) => c,
            Err(errors) => return self.reject(errors),
        };
        let problems = self.check_node(&config);
        if !problems.is_empty() {
            return self.reject(problems);
        }
        let hops = self.resolve_all(&config);
        match self.apply(&config, &hops) {
            Ok(mut summary) => {
                if config.node.metrics != self.config.node.metrics {
                    warn!("node.metrics changed: the metrics listener moves at the next start");
                    summary.push_str(" (node.metrics changed: takes effect at the next start)");
                }
                self.generation += 1;
                self.health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .configure(&config, Instant::now());
                self.config = Arc::new(config);
                self.set_next_hops(hops);
                self.last_reload = status::Reload {
                    result: "ok".into(),
                    at: now_secs(),
                    errors: Vec::new(),
                };
                info!(generation = self.generation, "reload applied: {summary}");
                Response {
                    ok: true,
                    message: format!("generation {}: {summary}", self.generation),
                    ..Response::default()
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                error!(generation = self.generation, "reload failed while applying: {msg}");
                self.last_reload = status::Reload {
                    result: "failed".into(),
                    at: now_secs(),
                    errors: vec![msg.clone()],
                };
                Response {
                    ok: false,
                    message: format!(
                        "apply failed; generation {} stays, see `moat status` for differences",
                        self.generation
                    ),
                    errors: vec![msg],
                    ..Response::default()
                }
            }
        }
    }

    fn reject(&mut self, errors: Vec<String>) -> Response {
        for e in &errors {
            warn!("reload rejected: {e}");
        }
        self.last_reload = status::Reload {
            result: "rejected".into(),
            at: now_secs(),
            errors: errors.clone(),
        };
        Response {
            ok: false,
            message: format!(
                "configuration rejected ({} errors); generation {} stays in force",
                errors.len(),
                self.generation
            ),
            errors,
            ..Response::default()
        }
    }

    /// Resolves next hops again and applies any change.
    fn refresh(&mut self) {
        let config = self.config.clone();
        if let Err(e) = self.attach_configured(&config) {
            warn!("checking the attachments: {e:#}");
        }
        let hops = self.resolve_all(&config);
        if hops == self.next_hops {
            return;
        }
        for (remote, new) in &hops {
            let old = self.next_hops.get(remote);
            if old != Some(new) {
                let old = old.map_or("none".to_string(), ToString::to_string);
                info!(%remote, %old, %new, "next hop changed");
            }
        }
        match self.apply(&config, &hops) {
            Ok(summary) => {
                self.set_next_hops(hops);
                info!(generation = self.generation, "next hops applied: {summary}");
            }
            Err(e) => error!("applying next hops: {e:#}"),
        }
    }

    /// Applies the route penalties of the tunnels' current health, and
    /// saves the states for a restarted daemon.
    fn steer(&mut self) {
        let saved = self.health.lock().unwrap_or_else(|p| p.into_inner()).export();
        if let Ok(text) = serde_json::to_string(&saved) {
            if let Err(e) = std::fs::write(&self.health_file, text) {
                warn!("saving health states to {}: {e}", self.health_file.display());
            }
        }
        let (config, hops) = (self.config.clone(), self.next_hops.clone());
        match self.apply(&config, &hops) {
            Ok(summary) => info!(generation = self.generation, "health steering applied: {summary}"),
            Err(e) => error!(generation = self.generation, "applying health steering: {e:#}"),
        }
    }

    /// Reads the maps back; any difference from the generation in force
    /// is logged and repaired by an apply that reads the maps back.
    fn verify(&mut self) {
        let maps = match self.dp.read_back() {
            Ok(m) => m,
            Err(e) => {
                error!("verifying the data plane: reading the maps: {e}");
                return;
            }
        };
        // Spelt out for the comparison only, not kept (it is as large as the maps).
        let want = self.desired.contents();
        let mut differences = status::differences(&maps, &want);
        differences.extend(self.dp.verify_dir(&want));
        match self.dp.verify_rules(&self.desired) {
            Ok(d) => differences.extend(d),
            Err(e) => error!("verifying the data plane: reading the rule maps: {e}"),
        }
        drop(want);
        self.last_differences = differences.len();
        if differences.is_empty() {
            return;
        }
        error!(
            generation = self.generation,
            count = differences.len(),
            first = %differences[0],
            "the maps differ from the generation in force (changed outside moat?); repairing"
        );
        self.dp.resync();
        let (config, hops) = (self.config.clone(), self.next_hops.clone());
        match self.apply(&config, &hops) {
            Ok(summary) => info!(generation = self.generation, "repaired: {summary}"),
            Err(e) => error!(generation = self.generation, "repairing the data plane: {e:#}"),
        }
    }

    fn status(&mut self) -> Result<Status> {
        let maps = self.dp.read_back()?;
        let want = self.desired.contents();
        let mut differences = status::differences(&maps, &want);
        differences.extend(self.dp.verify_dir(&want));
        differences.extend(self.dp.verify_rules(&self.desired)?);
        let customers: BTreeSet<u32> = maps
            .dest4
            .values()
            .chain(maps.dest6.values())
            .map(|v| v.customer)
            .chain(want.customers.keys().copied())
            .collect();
        let counters = self.dp.counters(customers, maps.tunnels.keys().copied())?;
        let (customers, mut tunnels, entries) = status::from_maps(&maps, &want, &counters);
        drop(want);
        {
            let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            for t in &mut tunnels {
                if let Some(h) = health.snapshot(&t.customer, &t.name, now) {
                    t.health = if h.enabled {
                        h.state.to_string()
                    } else {
                        "unchecked (disabled)".into()
                    };
                    t.probes = Some(status::Probes {
                        since_seconds: now.saturating_duration_since(h.since).as_secs(),
                        reason: h.reason.to_string(),
                        penalty: h.penalty,
                        sent: h.sent,
                        succeeded: h.succeeded,
                        failed: h.failed,
                        loss_ratio: h.loss_ratio,
                        rtt_ms: h.smoothed_rtt.map(|r| r.as_secs_f64() * 1e3),
                    });
                }
            }
        }
        let mut interfaces = Vec::new();
        let ours = self.dp.program_id()?;
        for i in &self.config.node.interfaces {
            let mode = xdp_mode(i.xdp_mode).1;
            let k = self.resolver.interface_xdp(&i.name)?;
            let attached = k.as_ref().is_some_and(|k| k.runs(ours, mode));
            if !attached {
                differences.push(format!(
                    "interface {}: our program does not run there in {mode} mode",
                    i.name
                ));
            }
            interfaces.push(status::Interface {
                name: i.name.clone(),
                configured_mode: mode.into(),
                mode: k.as_ref().map_or("missing", |k| k.mode).into(),
                attached,
                program_id: k.and_then(|k| k.program.or(k.native).or(k.generic)),
            });
        }
        let difference_count = differences.len();
        differences.truncate(status::MAX_DIFFERENCES);
        Ok(Status {
            node: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            build: moat_dataplane::build_id(),
            pid: std::process::id(),
            config_file: self.config_path.display().to_string(),
            generation: self.generation,
            last_reload: self.last_reload.clone(),
            data_plane: status::DataPlane {
                opened: match self.opened {
                    Opened::Loaded => "loaded",
                    Opened::Adopted => "adopted",
                }
                .into(),
                program_id: ours,
                pin_dir: self.pins.root().display().to_string(),
                consistent: difference_count == 0,
                difference_count,
                differences,
                entries,
            },
            interfaces,
            customers,
            tunnels,
            reasons: status::reasons(&counters),
            rules: status::rules(&self.dp.rule_counters()?),
        })
    }

    fn metrics(&self) -> Result<String> {
        let names = self.desired.names();
        let counters = self
            .dp
            .counters(names.customers.keys().copied(), names.tunnels.keys().copied())?;
        let mut s = metrics::Snapshot {
            node: self.config.node.name.clone(),
            build: moat_dataplane::build_id(),
            generation: self.generation,
            last_reload_ok: self.last_reload.result == "ok",
            last_reload_at: self.last_reload.at,
            differences: self.last_differences,
            reasons: status::reasons(&counters).into_iter().collect(),
            rules: status::rules(&self.dp.rule_counters()?),
            ..metrics::Snapshot::default()
        };
        for (id, name) in &names.customers {
            let c = counters.customers.get(id).copied().unwrap_or_default();
            for (dir, res, v) in [
                ("in", "received", c.in_received),
                ("in", "forwarded", c.in_forwarded),
                ("in", "dropped", c.in_dropped),
                ("out", "received", c.out_received),
                ("out", "forwarded", c.out_forwarded),
                ("out", "dropped", c.out_dropped),
            ] {
                s.customers.push((name.clone(), dir, res, v.into()));
            }
        }
        for (id, (customer, tunnel, flags)) in &names.tunnels {
            let t = counters.tunnels.get(id).copied().unwrap_or_default();
            s.tunnels.push((customer.clone(), tunnel.clone(), "tx", t.tx.into()));
            s.tunnels.push((customer.clone(), tunnel.clone(), "rx", t.rx.into()));
            let ok = flags & moat_common::TUNNEL_NEXTHOP_VALID != 0;
            s.next_hops.push((customer.clone(), tunnel.clone(), ok));
        }
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for (customer, tunnel, _) in names.tunnels.values() {
            if let Some(h) = health.snapshot(customer, tunnel, now) {
                let st = match h.state {
                    moat_health::HealthState::Healthy => 0,
                    moat_health::HealthState::Degraded => 1,
                    moat_health::HealthState::Down => 2,
                };
                s.health.push((customer.clone(), tunnel.clone(), st, h.sent, h.failed));
            }
        }
        let c = health.counts();
        s.replies = vec![
            ("matched", c.matched),
            ("malformed", c.malformed),
            ("not_probe", c.not_probe),
            ("unknown", c.unknown),
            ("wrong_tunnel", c.wrong_tunnel),
            ("stale", c.stale),
            ("duplicate", c.duplicate),
        ];
        Ok(metrics::encode_snapshot(&s))
    }
}

/// Node facts a config depends on, from the kernel of this network namespace.
fn check_node(resolver: &mut Resolver, config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for i in &config.node.interfaces {
        match resolver.interface_xdp(&i.name) {
            Ok(Some(_)) => {}
            Ok(None) => problems.push(format!(
                "node.interfaces: interface {} does not exist on this node",
                i.name
            )),
            Err(e) => problems.push(format!("node.interfaces: interface {}: {e}", i.name)),
        }
    }
    let local = match resolver.local_ipv4() {
        Ok(l) => l,
        Err(e) => return vec![format!("reading this node's addresses: {e}")],
    };
    if !local.contains(&config.node.tunnel_endpoint) {
        problems.push(format!(
            "node.tunnel_endpoint {} is not an address of this node",
            config.node.tunnel_endpoint
        ));
    }
    for c in &config.customers {
        for t in &c.tunnels {
            if t.local != config.node.tunnel_endpoint && !local.contains(&t.local) {
                problems.push(format!(
                    "customer {} tunnel {}: local {} is not an address of this node",
                    c.name, t.name, t.local
                ));
            }
        }
    }
    problems
}

fn statfs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut s) == 0).then_some(s.f_type as i64)
    }
}

/// Makes sure `pin_dir` lies on bpffs, mounting /sys/fs/bpf if needed.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    if pin_dir
        .components()
        .any(|c| c.as_os_str().to_string_lossy().contains('.'))
    {
        bail!("pin directory {}: bpffs does not allow '.' in names", pin_dir.display());
    }
    let mut existing = pin_dir.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    if statfs_magic(&existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let sysfs_bpf = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(sysfs_bpf) && existing.starts_with("/sys/fs") {
        std::fs::create_dir_all(sysfs_bpf).ok();
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        let opts = c"mode=0700";
        // SAFETY: all arguments are NUL-terminated strings that outlive the call.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, opts.as_ptr().cast()) };
        if rc != 0 {
            bail!("mounting bpffs on /sys/fs/bpf: {}", std::io::Error::last_os_error());
        }
        info!("mounted bpffs on /sys/fs/bpf");
        return Ok(());
    }
    bail!(
        "pin directory {} is not on a bpffs mount (mount one with `mount -t bpf bpf DIR`)",
        pin_dir.display()
    )
}

/// Takes an exclusive lock on the pin directory for the daemon's lifetime.
fn lock_pin_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another moat daemon holds the pin directory {} (use --pin-dir for another node)",
            dir.display()
        );
    }
    Ok(f)
}

async fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "another moat daemon answers on {} (use --socket for another node)",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub fn run(opts: Options) -> Result<()> {
    // Everything that can be checked without the kernel comes first.
    let opts = Options {
        config: std::path::absolute(&opts.config).unwrap_or(opts.config),
        ..opts
    };
    let config = match load_config(&opts.config) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            bail!("{}: configuration rejected; nothing was changed", opts.config.display());
        }
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(opts, config))
}

async fn serve(opts: Options, config: Config) -> Result<()> {
    // Signals first: a SIGHUP during a long start must not kill the daemon.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut resolver = Resolver::new()?;
    let problems = check_node(&mut resolver, &config);
    if !problems.is_empty() {
        for p in &problems {
            error!("{}: {p}", opts.config.display());
        }
        bail!("configuration does not fit this node; nothing was changed");
    }
    ensure_bpffs(&opts.pin_dir)?;
    let _lock = lock_pin_dir(&opts.pin_dir)?;
    let listener = bind_socket(&opts.socket).await?;
    let metrics_listener = match config.node.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };

    let pins = PinDir::new(&opts.pin_dir);
    let (mut dp, opened) = Dataplane::open_pinned(&pins)?;
    if opened == Opened::Adopted {
        let started = Instant::now();
        let report = dp.adopt(&config.to_spec()).context("adopting the pinned data plane")?;
        info!(
            pin_dir = %opts.pin_dir.display(),
            "adopted the running data plane in {:.1} ms: {report:?}",
            started.elapsed().as_secs_f64() * 1e3
        );
    } else {
        info!(pin_dir = %opts.pin_dir.display(), build = %moat_dataplane::build_id(), "loaded and pinned the data plane");
    }
    let (health_tx, mut health_events) = mpsc::unbounded_channel::<()>();
    let health = health::Health::start(&config, health_tx).context("starting health checks")?;
    let health_file = health_file(&opts.socket);
    if opened == Opened::Adopted {
        // Keep the steering the data plane has until new verdicts.
        if let Ok(saved) = std::fs::read_to_string(&health_file)
            .map_err(|_| ())
            .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(&t).map_err(|_| ()))
        {
            health
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .resume(&saved, Instant::now());
        }
    } else {
        let _ = std::fs::remove_file(&health_file);
    }
    let mut state = State {
        health_file,
        health: health.table.clone(),
        config_path: opts.config.clone(),
        pins,
        dp,
        opened,
        config: Arc::new(config),
        desired: Compiled::default(),
        generation: 0,
        last_reload: status::Reload::default(),
        resolver,
        next_hops: BTreeMap::new(),
        managed: BTreeMap::new(),
        last_differences: 0,
    };
    let config = state.config.clone();
    let hops = state.resolve_all(&config);
    let summary = match state.apply(&config, &hops) {
        Ok(s) => s,
        Err(e) => {
            if opened == Opened::Loaded {
                // Nothing was forwarding before this start: leave nothing behind.
                let interfaces: Vec<String> = state.dp.pinned_interfaces().map(str::to_string).collect();
                for i in interfaces {
                    let _ = state.dp.detach_pinned(&i);
                }
                let _ = Dataplane::remove_pinned(&state.pins);
            }
            return Err(e.context("applying the configuration at start"));
        }
    };
    state.generation = 1;
    state.set_next_hops(hops);
    state.last_reload = status::Reload {
        result: "ok".into(),
        at: now_secs(),
        errors: Vec::new(),
    };
    info!(
        generation = 1,
        node = %config.node.name,
        "applied {}: {summary}",
        config.summary().trim_start_matches("ok: ")
    );
    let state = Arc::new(Mutex::new(state));

    // Next-hop announcements from the kernel.
    let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
    let mut monitor = Monitor::new()?;
    std::thread::Builder::new().name("moat-netlink".into()).spawn(move || {
        while monitor.wait().is_ok() {
            if events_tx.send(()).is_err() {
                break;
            }
        }
    })?;

    if let Some(l) = metrics_listener {
        let st = state.clone();
        let addr = l.local_addr()?;
        info!(%addr, "serving metrics on /metrics");
        tokio::spawn(metrics::serve(
            l,
            Arc::new(move || {
                let st = st.lock().unwrap_or_else(|p| p.into_inner());
                st.metrics().unwrap_or_else(|e| format!("# error: {e:#}\n"))
            }),
        ));
    }

    let (down_tx, mut down_rx) = mpsc::unbounded_channel::<()>();
    let mut tick = tokio::time::interval(REFRESH);
    let mut last_refresh = Instant::now();
    let mut verify = tokio::time::interval_at(tokio::time::Instant::now() + opts.verify_interval, opts.verify_interval);
    info!(socket = %opts.socket.display(), "ready");
    let outcome = loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", opts.config.display());
                blocking(&state, |st| {
                    st.reload();
                })
                .await;
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = down_rx.recv() => break "down",
            Some(()) = events.recv() => {
                // Collect a burst of announcements, and refresh at most
                // every MIN_REFRESH however busy the routing tables are.
                let wait = DEBOUNCE.max(MIN_REFRESH.saturating_sub(last_refresh.elapsed()));
                tokio::time::sleep(wait).await;
                while events.try_recv().is_ok() {}
                blocking(&state, State::refresh).await;
                last_refresh = Instant::now();
            }
            _ = tick.tick() => {
                blocking(&state, State::refresh).await;
                last_refresh = Instant::now();
            }
            _ = verify.tick() => blocking(&state, State::verify).await,
            Some(()) = health_events.recv() => {
                while health_events.try_recv().is_ok() {}
                blocking(&state, State::steer).await;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, state.clone(), down_tx.clone()));
                }
                Err(e) => {
                    // E.g. out of descriptors: back off instead of spinning.
                    warn!("control socket: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    };
    drop(health);
    let _ = std::fs::remove_file(&opts.socket);
    if outcome == "down" {
        info!("stopped forwarding and removed the pinned state; exiting");
    } else {
        info!(
            "{outcome}: exiting; the data plane keeps forwarding (pinned at {}); `moat run` adopts it, `moat down` stops it",
            opts.pin_dir.display()
        );
    }
    Ok(())
}

/// The file beside the control socket where tunnel health is saved.
pub fn health_file(socket: &Path) -> PathBuf {
    let name = socket
        .file_name()
        .map_or("moat".into(), |n| n.to_string_lossy().into_owned());
    socket.with_file_name(format!("{name}.health"))
}

/// Runs `f` on the state in the blocking pool. A panic there is logged
/// and the daemon goes on (the data plane is not touched by it).
async fn blocking(state: &Arc<Mutex<State>>, f: impl FnOnce(&mut State) + Send + 'static) {
    let st = state.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || f(&mut st.lock().unwrap_or_else(|p| p.into_inner()))).await {
        error!("internal error (the daemon goes on): {e}");
    }
}

/// Longest control request accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// One control connection: one request line, one response line.
async fn handle(stream: UnixStream, state: Arc<Mutex<State>>, down: mpsc::UnboundedSender<()>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(rd.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await;
    let response = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let run = tokio::task::spawn_blocking(move || {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    execute(&mut st, req.command)
                })
                .await;
                let response = run.unwrap_or_else(|e| Response {
                    message: format!("internal error: {e}"),
                    ..Response::default()
                });
                if req.command == Command::Down && response.ok {
                    let _ = down.send(());
                }
                response
            }
            Err(e) => Response {
                message: format!("bad request: {e}"),
                ..Response::default()
            },
        },
        _ => return,
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = tokio::time::timeout(Duration::from_secs(30), wr.write_all(text.as_bytes())).await;
    }
}

fn execute(st: &mut State, command: Command) -> Response {
    match command {
        Command::Status => match st.status() {
            Ok(s) => Response {
                ok: true,
                message: format!("generation {}", s.generation),
                status: Some(Box::new(s)),
                ..Response::default()
            },
            Err(e) => Response {
                message: format!("reading the data plane: {e:#}"),
                ..Response::default()
            },
        },
        Command::Reload => {
            info!("reload requested over the control socket");
            st.reload()
        }
        Command::Down => {
            let interfaces: Vec<String> = st.dp.pinned_interfaces().map(str::to_string).collect();
            for i in &interfaces {
                if let Err(e) = st.dp.detach_pinned(i) {
                    return Response {
                        message: format!("detaching {i}: {e}"),
                        ..Response::default()
                    };
                }
            }
            let _ = std::fs::remove_file(&st.health_file);
            match Dataplane::remove_pinned(&st.pins) {
                Ok(_) => Response {
                    ok: true,
                    message: format!(
                        "detached from {}; removed {}",
                        if interfaces.is_empty() {
                            "no interface".to_string()
                        } else {
                            interfaces.join(", ")
                        },
                        st.pins.root().display()
                    ),
                    ..Response::default()
                },
                Err(e) => Response {
                    message: format!("removing pinned state: {e}"),
                    ..Response::default()
                },
            }
        }
    }
}
