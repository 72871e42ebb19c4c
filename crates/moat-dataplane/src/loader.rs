//! Loading the BPF object, attaching it, and typed handles on its maps.

use std::path::{Path, PathBuf};

pub use aya::programs::XdpMode;
use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLinkId,
        Xdp,
    },
    Ebpf, EbpfLoader,
};
use moat_common::{Counter, CustomerStats, DecapKey, DecapValue, DestValue, EcmpTable, Tunnel, TunnelStats};

use aya_obj::programs::XdpAttachType;

use crate::{error::Error, mmap::MmapWords};
use moat_common::limits::{DIR_NODE, DIR_NODES, DIR_ROOT};

/// The BPF object built from crates/moat-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat"));
/// The XDP program's name in the object.
pub const PROGRAM: &str = "moat_ingress";
/// Benchmark harnesses in the same object (never attached): the pipeline
/// with the packet restored after each run, and the restore alone.
pub const BENCH_PROGRAMS: [&str; 2] = ["moat_bench", "moat_bench_nop"];

/// Typed handles on every map of the data plane.
pub struct Maps {
    pub dest4: LpmTrie<MapData, [u8; 4], DestValue>,
    pub dest6: LpmTrie<MapData, [u8; 16], DestValue>,
    pub dir4_root: MmapWords,
    pub dir4_nodes: MmapWords,
    pub dir6_root: MmapWords,
    pub dir6_nodes: MmapWords,
    /// The `ACTIVE` words (`moat_common::active`).
    pub active: MmapWords,
    pub source4: LpmTrie<MapData, [u8; 8], u32>,
    pub source6: LpmTrie<MapData, [u8; 20], u32>,
    pub route_sets: Array<MapData, u32>,
    pub ecmp_tables: Array<MapData, EcmpTable>,
    pub tunnels: Array<MapData, Tunnel>,
    pub tunnel_slot: Array<MapData, u32>,
    pub decap: HashMap<MapData, DecapKey, DecapValue>,
    pub local_addrs: HashMap<MapData, [u8; 4], u32>,
    pub cls_set: Array<MapData, moat_common::rules::ClsSet>,
    pub cls_slot: Array<MapData, moat_common::rules::ClsSlot>,
    pub cls_key: Array<MapData, moat_common::rules::ClsKey>,
    pub cls_node: Array<MapData, moat_common::rules::ClsNode>,
    pub cls_bitmap: Array<MapData, [u64; moat_common::rules::CLS_WORDS]>,
    pub cls_direct: MmapWords,
    pub cls_trie: MmapWords,
    pub cls_term: Array<MapData, moat_common::rules::ClsTerm>,
    pub customer_fw: Array<MapData, u32>,
    pub cls_digest: Array<MapData, u64>,
    pub rule_stats: PerCpuArray<MapData, Counter>,
    pub rl_rule: Array<MapData, u64>,
    pub reflect_ports: Array<MapData, u64>,
    pub reason_stats: PerCpuArray<MapData, Counter>,
    pub customer_stats: PerCpuArray<MapData, CustomerStats>,
    pub tunnel_stats: PerCpuArray<MapData, TunnelStats>,
}

/// Where the program comes from: a freshly loaded object (tests,
/// benchmarks; nothing outlives the process) or a pin on bpffs.
enum Origin {
    Object(Box<Ebpf>),
    Pinned(Box<Xdp>),
}

/// A loaded data plane: the program, its maps, and the interfaces it is attached to.
pub struct Dataplane {
    origin: Origin,
    pub maps: Maps,
    links: Vec<(String, XdpLinkId)>,
    /// Attachments pinned under the pin directory (they outlive the process).
    pinned_links: Vec<(String, PinnedLink)>,
    pin_dir: Option<PinDir>,
    /// The last state applied successfully (ids, names), for the next compile.
    pub(crate) applied: Option<crate::compile::Compiled>,
}

/// Identifies this build's BPF object (FNV-1a of its bytes): a pinned
/// program is adopted only by the build that loaded it.
pub fn build_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The layout of pinned state under a pin directory (on bpffs):
/// `maps/NAME`, `programs/moat_ingress-BUILD`, `links/INTERFACE` (bpffs
/// refuses names with dots).
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> PinDir {
        PinDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }
    pub fn program(&self) -> PathBuf {
        self.root.join("programs").join(format!("{PROGRAM}-{}", build_id()))
    }
    pub fn programs(&self) -> PathBuf {
        self.root.join("programs")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn link(&self, interface: &str) -> PathBuf {
        self.links().join(escape(interface))
    }
}

/// An interface name as a bpffs entry name: bpffs refuses dots (VLAN
/// interfaces such as `eth0.100` have them), so `%` and `.` are escaped.
fn escape(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2e")
}

fn unescape(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

/// Where the maps come from while the data plane is being opened.
enum Source<'a> {
    Object(&'a mut Ebpf, Option<&'a PinDir>),
    Pins(&'a PinDir),
}

fn pin_err(what: &Path, e: impl std::fmt::Display) -> Error {
    Error::Pin {
        path: what.display().to_string(),
        message: e.to_string(),
    }
}

impl Source<'_> {
    fn map(&mut self, name: &'static str) -> Result<Map, Error> {
        match self {
            Source::Object(ebpf, pins) => {
                let map = ebpf.take_map(name).ok_or(Error::MissingMap { map: name })?;
                if let Some(pins) = pins {
                    let path = pins.map(name);
                    map.pin(&path).map_err(|e| pin_err(&path, e))?;
                }
                Ok(map)
            }
            Source::Pins(pins) => {
                let path = pins.map(name);
                let data = MapData::from_pin(&path).map_err(|e| pin_err(&path, e))?;
                Map::from_map_data(data).map_err(Error::map(name))
            }
        }
    }

    fn typed<T>(&mut self, name: &'static str) -> Result<T, Error>
    where
        T: TryFrom<Map, Error = aya::maps::MapError>,
    {
        T::try_from(self.map(name)?).map_err(Error::map(name))
    }

    fn mmap(&mut self, name: &'static str, words: u32) -> Result<MmapWords, Error> {
        match self.map(name)? {
            Map::Array(data) => MmapWords::new(data, words as usize, name),
            _ => Err(Error::MissingMap { map: name }),
        }
    }

    fn maps(&mut self) -> Result<Maps, Error> {
        Ok(Maps {
            dest4: self.typed("DEST4")?,
            dest6: self.typed("DEST6")?,
            dir4_root: self.mmap("DIR4_ROOT", 2 * DIR_ROOT)?,
            dir4_nodes: self.mmap("DIR4_NODES", 2 * DIR_NODES * DIR_NODE)?,
            dir6_root: self.mmap("DIR6_ROOT", 2 * DIR_ROOT)?,
            dir6_nodes: self.mmap("DIR6_NODES", 2 * DIR_NODES * DIR_NODE)?,
            active: self.mmap("ACTIVE", moat_common::active::WORDS)?,
            source4: self.typed("SOURCE4")?,
            source6: self.typed("SOURCE6")?,
            route_sets: self.typed("ROUTE_SETS")?,
            ecmp_tables: self.typed("ECMP_TABLES")?,
            tunnels: self.typed("TUNNELS")?,
            tunnel_slot: self.typed("TUNNEL_SLOT")?,
            decap: self.typed("DECAP")?,
            local_addrs: self.typed("LOCAL_ADDRS")?,
            cls_set: self.typed("CLS_SET")?,
            cls_slot: self.typed("CLS_SLOT")?,
            cls_key: self.typed("CLS_KEY")?,
            cls_node: self.typed("CLS_NODE")?,
            cls_bitmap: self.typed("CLS_BITMAP")?,
            cls_direct: self.mmap(
                "CLS_DIRECT",
                2 * moat_common::rules::CLS_DIRECT_TABLES * moat_common::rules::CLS_DIRECT_WORDS,
            )?,
            cls_trie: self.mmap("CLS_TRIE", 2 * moat_common::rules::CLS_TRIE_WORDS)?,
            cls_term: self.typed("CLS_TERM")?,
            customer_fw: self.typed("CUSTOMER_FW")?,
            cls_digest: self.typed("CLS_DIGEST")?,
            rule_stats: self.typed("RULE_STATS")?,
            rl_rule: self.typed("RL_RULE")?,
            reflect_ports: self.typed("REFLECT_PORTS")?,
            reason_stats: self.typed("REASON_STATS")?,
            customer_stats: self.typed("CUSTOMER_STATS")?,
            tunnel_stats: self.typed("TUNNEL_STATS")?,
        })
    }
}

/// How [`Dataplane::open_pinned`] found the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was pinned: the object was loaded and pinned.
    Loaded,
    /// A running data plane of this build was adopted (same program, same maps).
    Adopted,
}

impl Dataplane {
    /// Loads the object and the program (verifier included); attaches
    /// nothing and pins nothing: everything goes when the value is dropped.
    pub fn load() -> Result<Self, Error> {
        Self::load_object(None)
    }

    fn load_object(pins: Option<&PinDir>) -> Result<Self, Error> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        if let Some(pins) = pins {
            for dir in [pins.root().join("maps"), pins.programs(), pins.links()] {
                std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e))?;
            }
        }
        let maps = Source::Object(&mut ebpf, pins).maps()?;
        let mut dp = Dataplane {
            origin: Origin::Object(Box::new(ebpf)),
            maps,
            links: Vec::new(),
            pinned_links: Vec::new(),
            pin_dir: pins.cloned(),
            applied: None,
        };
        let program = dp.program_mut()?;
        program.load().map_err(|e| Error::Program {
            program: PROGRAM,
            source: Box::new(e),
        })?;
        if let Some(pins) = pins {
            let path = pins.program();
            program.pin(&path).map_err(|e| pin_err(&path, e))?;
        }
        Ok(dp)
    }

    /// Opens the data plane pinned under `pins`: adopts it when this build
    /// pinned it (the program keeps running, the maps keep their contents,
    /// every pinned attachment stays), or loads and pins a new one when
    /// nothing is pinned. A pin directory holding another build's program
    /// is an error: nothing is changed.
    pub fn open_pinned(pins: &PinDir) -> Result<(Self, Opened), Error> {
        let program_path = pins.program();
        if program_path.exists() {
            let program = Xdp::from_pin(&program_path, XdpAttachType::Interface).map_err(|e| Error::Program {
                program: PROGRAM,
                source: Box::new(e),
            })?;
            let maps = Source::Pins(pins).maps()?;
            let mut pinned_links = Vec::new();
            if let Ok(entries) = std::fs::read_dir(pins.links()) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let link = PinnedLink::from_pin(&path).map_err(|e| pin_err(&path, e))?;
                    pinned_links.push((unescape(&entry.file_name().to_string_lossy()), link));
                }
            }
            pinned_links.sort_by(|a, b| a.0.cmp(&b.0));
            let dp = Dataplane {
                origin: Origin::Pinned(Box::new(program)),
                maps,
                links: Vec::new(),
                pinned_links,
                pin_dir: Some(pins.clone()),
                applied: None,
            };
            return Ok((dp, Opened::Adopted));
        }
        if let Ok(entries) = std::fs::read_dir(pins.programs()) {
            if let Some(other) = entries.flatten().next() {
                return Err(Error::Pin {
                    path: other.path().display().to_string(),
                    message: format!(
                        "pinned by another moat build (this build is {}); that data plane keeps forwarding, \
                         unmanaged, until the build that pinned it runs again or `moat down` stops it \
                         (replacing a running data plane in place is not supported yet)",
                        build_id()
                    ),
                });
            }
        }
        if pins.root().join("maps").exists() {
            return Err(Error::Pin {
                path: pins.root().display().to_string(),
                message: "holds maps but no program (a partial pin directory); remove it with `moat down`".into(),
            });
        }
        match Self::load_object(Some(pins)) {
            Ok(dp) => Ok((dp, Opened::Loaded)),
            Err(e) => {
                // Nothing was pinned before: leave nothing half-pinned behind.
                let _ = Self::remove_pinned(pins);
                Err(e)
            }
        }
    }

    /// Removes everything pinned under `pins`: attachments first (this
    /// stops forwarding), then the program and the maps. Returns the
    /// interfaces detached. A missing directory is not an error.
    pub fn remove_pinned(pins: &PinDir) -> Result<Vec<String>, Error> {
        let mut detached = Vec::new();
        if let Ok(entries) = std::fs::read_dir(pins.links()) {
            for entry in entries.flatten() {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                detached.push(unescape(&entry.file_name().to_string_lossy()));
            }
        }
        for dir in [pins.programs(), pins.root().join("maps")] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                }
            }
        }
        for dir in [
            pins.links(),
            pins.programs(),
            pins.root().join("maps"),
            pins.root().to_path_buf(),
        ] {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(pin_err(&dir, e)),
            }
        }
        detached.sort();
        Ok(detached)
    }

    pub(crate) fn program(&self) -> Result<&Xdp, Error> {
        self.program_named(PROGRAM)
    }

    pub(crate) fn program_named(&self, name: &'static str) -> Result<&Xdp, Error> {
        let ebpf = match &self.origin {
            Origin::Pinned(p) if name == PROGRAM => return Ok(p),
            Origin::Pinned(_) => return Err(Error::MissingProgram { program: name }),
            Origin::Object(ebpf) => ebpf,
        };
        let p = ebpf.program(name).ok_or(Error::MissingProgram { program: name })?;
        p.try_into().map_err(|e| Error::Program {
            program: name,
            source: Box::new(e),
        })
    }

    fn program_mut_named(&mut self, name: &'static str) -> Result<&mut Xdp, Error> {
        let ebpf = match &mut self.origin {
            Origin::Pinned(p) if name == PROGRAM => return Ok(p),
            Origin::Pinned(_) => return Err(Error::MissingProgram { program: name }),
            Origin::Object(ebpf) => ebpf,
        };
        let p = ebpf.program_mut(name).ok_or(Error::MissingProgram { program: name })?;
        p.try_into().map_err(|e| Error::Program {
            program: name,
            source: Box::new(e),
        })
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, Error> {
        self.program_mut_named(PROGRAM)
    }

    /// Loads the benchmark harness programs (they share the maps).
    pub fn load_bench_programs(&mut self) -> Result<(), Error> {
        for name in BENCH_PROGRAMS {
            self.program_mut_named(name)?.load().map_err(|e| Error::Program {
                program: name,
                source: Box::new(e),
            })?;
        }
        Ok(())
    }

    /// Attaches the program to `interface` (in the caller's network
    /// namespace). With a pin directory the attachment is pinned too and
    /// outlives the process; an interface already attached is left as is.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), Error> {
        if self.pinned_links.iter().any(|(i, _)| i == interface) {
            return Ok(());
        }
        let id = self
            .program_mut()?
            .attach(interface, mode)
            .map_err(|e| Error::Interface {
                interface: interface.to_string(),
                message: format!("attaching XDP ({mode:?}): {e}"),
            })?;
        if let Some(pins) = &self.pin_dir {
            let path = pins.link(interface);
            let link = self.program_mut()?.take_link(id).map_err(|e| Error::Program {
                program: PROGRAM,
                source: Box::new(e),
            })?;
            let fd = FdLink::try_from(link).map_err(|e| Error::Interface {
                interface: interface.to_string(),
                message: format!("the XDP attachment is not a BPF link and cannot be pinned: {e}"),
            })?;
            let pinned = fd.pin(&path).map_err(|e| pin_err(&path, e))?;
            self.pinned_links.push((interface.to_string(), pinned));
            return Ok(());
        }
        self.links.push((interface.to_string(), id));
        Ok(())
    }

    /// Detaches from one interface attached through the pin directory.
    pub fn detach_pinned(&mut self, interface: &str) -> Result<bool, Error> {
        let Some(at) = self.pinned_links.iter().position(|(i, _)| i == interface) else {
            return Ok(false);
        };
        let (_, link) = self.pinned_links.remove(at);
        let path = self.pin_dir.as_ref().map(|p| p.link(interface)).unwrap_or_default();
        link.unpin().map_err(|e| pin_err(&path, e))?;
        Ok(true)
    }

    /// Interfaces with a pinned attachment (they outlive the process).
    pub fn pinned_interfaces(&self) -> impl Iterator<Item = &str> {
        self.pinned_links.iter().map(|(i, _)| i.as_str())
    }

    /// The kernel's id of the program (as shown by `bpftool prog`).
    pub fn program_id(&self) -> Result<u32, Error> {
        Ok(self.program_info()?.id())
    }

    /// The instructions the kernel's verifier processed to load the
    /// program, of its limit of 1,000,000 (`None`: the kernel does not say).
    pub fn verified_instructions(&self) -> Result<Option<u32>, Error> {
        Ok(self.program_info()?.verified_instruction_count())
    }

    /// What the kernel reports of the loaded program.
    fn program_info(&self) -> Result<aya::programs::ProgramInfo, Error> {
        self.program()?.info().map_err(|e| Error::Program {
            program: PROGRAM,
            source: Box::new(e),
        })
    }

    /// Detaches from every interface attached without pinning.
    pub fn detach_all(&mut self) -> Result<(), Error> {
        let links = std::mem::take(&mut self.links);
        for (interface, id) in links {
            self.program_mut()?.detach(id).map_err(|e| Error::Interface {
                interface: interface.clone(),
                message: format!("detaching XDP: {e}"),
            })?;
        }
        Ok(())
    }

    /// The state last applied successfully: pass it to [`crate::compile`]
    /// so ids stay stable from one configuration to the next.
    pub fn applied(&self) -> Option<&crate::compile::Compiled> {
        self.applied.as_ref()
    }

    /// Forgets what the last apply kept about the maps (the ids stay): the
    /// next apply reads the maps back and rewrites whatever differs, e.g.
    /// after something other than moat changed them.
    pub fn resync(&mut self) {
        if let Some(applied) = self.applied.as_mut() {
            applied.state = crate::apply::Carry(None);
            applied.rules_unknown = true;
        }
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(i, _)| i.as_str())
    }
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::{BPF_CALL, BPF_JMP, BPF_PSEUDO_CALL};

    /// Every program of the data plane is one function: a BPF-to-BPF call
    /// costs tens of nanoseconds per packet on CPUs whose return-stack
    /// mitigations make every return slow, and the compiler makes one
    /// silently (an outlined closure, a `memset` for a large zeroed value,
    /// a program body it stops inlining).
    #[test]
    fn the_programs_make_no_bpf_to_bpf_calls() {
        let obj = aya_obj::Object::parse(super::OBJECT).expect("the data plane object parses");
        assert!(
            obj.functions.values().any(|f| f.name == super::PROGRAM),
            "no function {} in the object",
            super::PROGRAM
        );
        for f in obj.functions.values() {
            for (i, insn) in f.instructions.iter().enumerate() {
                let call = u32::from(insn.code) == BPF_JMP | BPF_CALL && u32::from(insn.src_reg()) == BPF_PSEUDO_CALL;
                assert!(!call, "{} calls another BPF function at instruction {i}", f.name);
            }
        }
    }
}
