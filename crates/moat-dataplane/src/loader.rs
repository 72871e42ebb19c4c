//! Loading the BPF object, attaching it, and typed handles on its maps.

pub use aya::programs::XdpMode;
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp},
    Ebpf, EbpfLoader,
};
use moat_common::{Counter, CustomerStats, DecapKey, DecapValue, DestValue, EcmpTable, Tunnel, TunnelStats};

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
    pub dir_active: MmapWords,
    pub source4: LpmTrie<MapData, [u8; 8], u32>,
    pub source6: LpmTrie<MapData, [u8; 20], u32>,
    pub route_sets: Array<MapData, u32>,
    pub ecmp_tables: Array<MapData, EcmpTable>,
    pub tunnels: Array<MapData, Tunnel>,
    pub tunnel_slot: Array<MapData, u32>,
    pub decap: HashMap<MapData, DecapKey, DecapValue>,
    pub local_addrs: HashMap<MapData, [u8; 4], u32>,
    pub reason_stats: PerCpuArray<MapData, Counter>,
    pub customer_stats: PerCpuArray<MapData, CustomerStats>,
    pub tunnel_stats: PerCpuArray<MapData, TunnelStats>,
}

/// A loaded data plane: the program, its maps, and the interfaces it is attached to.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: Maps,
    links: Vec<(String, XdpLinkId)>,
    /// The last state applied successfully (ids, names), for the next compile.
    pub(crate) applied: Option<crate::compile::Compiled>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingProgram { program: name })?;
    T::try_from(map).map_err(Error::map(name))
}

fn take_mmap(ebpf: &mut Ebpf, name: &'static str, words: u32) -> Result<MmapWords, Error> {
    match ebpf.take_map(name).ok_or(Error::MissingMap { map: name })? {
        aya::maps::Map::Array(data) => MmapWords::new(data, words as usize, name),
        _ => Err(Error::MissingMap { map: name }),
    }
}

impl Dataplane {
    /// Loads the object and the program (verifier included); attaches nothing.
    pub fn load() -> Result<Self, Error> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        let maps = Maps {
            dest4: take(&mut ebpf, "DEST4")?,
            dest6: take(&mut ebpf, "DEST6")?,
            dir4_root: take_mmap(&mut ebpf, "DIR4_ROOT", 2 * DIR_ROOT)?,
            dir4_nodes: take_mmap(&mut ebpf, "DIR4_NODES", 2 * DIR_NODES * DIR_NODE)?,
            dir6_root: take_mmap(&mut ebpf, "DIR6_ROOT", 2 * DIR_ROOT)?,
            dir6_nodes: take_mmap(&mut ebpf, "DIR6_NODES", 2 * DIR_NODES * DIR_NODE)?,
            dir_active: take_mmap(&mut ebpf, "DIR_ACTIVE", 2)?,
            source4: take(&mut ebpf, "SOURCE4")?,
            source6: take(&mut ebpf, "SOURCE6")?,
            route_sets: take(&mut ebpf, "ROUTE_SETS")?,
            ecmp_tables: take(&mut ebpf, "ECMP_TABLES")?,
            tunnels: take(&mut ebpf, "TUNNELS")?,
            tunnel_slot: take(&mut ebpf, "TUNNEL_SLOT")?,
            decap: take(&mut ebpf, "DECAP")?,
            local_addrs: take(&mut ebpf, "LOCAL_ADDRS")?,
            reason_stats: take(&mut ebpf, "REASON_STATS")?,
            customer_stats: take(&mut ebpf, "CUSTOMER_STATS")?,
            tunnel_stats: take(&mut ebpf, "TUNNEL_STATS")?,
        };
        let mut dp = Dataplane {
            ebpf,
            maps,
            links: Vec::new(),
            applied: None,
        };
        dp.program_mut()?.load().map_err(|e| Error::Program {
            program: PROGRAM,
            source: Box::new(e),
        })?;
        Ok(dp)
    }

    pub(crate) fn program(&self) -> Result<&Xdp, Error> {
        self.program_named(PROGRAM)
    }

    pub(crate) fn program_named(&self, name: &'static str) -> Result<&Xdp, Error> {
        let p = self.ebpf.program(name).ok_or(Error::MissingProgram { program: name })?;
        p.try_into().map_err(|e| Error::Program {
            program: name,
            source: Box::new(e),
        })
    }

    fn program_mut_named(&mut self, name: &'static str) -> Result<&mut Xdp, Error> {
        let p = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram { program: name })?;
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

    /// Attaches the program to `interface` (in the caller's network namespace).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), Error> {
        let id = self
            .program_mut()?
            .attach(interface, mode)
            .map_err(|e| Error::Interface {
                interface: interface.to_string(),
                message: format!("attaching XDP ({mode:?}): {e}"),
            })?;
        self.links.push((interface.to_string(), id));
        Ok(())
    }

    /// Detaches from every interface.
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

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.iter().map(|(i, _)| i.as_str())
    }
}
