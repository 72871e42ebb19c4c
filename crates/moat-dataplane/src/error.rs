//! Errors of the data plane library.

/// What went wrong talking to the kernel or preparing state for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("BPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map} is missing from the BPF object")]
    MissingMap { map: &'static str },
    #[error("program {program} is missing from the BPF object")]
    MissingProgram { program: &'static str },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("interface {interface}: {message}")]
    Interface { interface: String, message: String },
    #[error("desired state exceeds {what}: {have} > {limit}")]
    Capacity {
        what: &'static str,
        have: usize,
        limit: usize,
    },
    #[error("pinned state {path}: {message}")]
    Pin { path: String, message: String },
    #[error("invalid specification: {0}")]
    Spec(String),
}

impl Error {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
        move |source| Error::Map {
            map,
            source: Box::new(source),
        }
    }
}
