//! Running the loaded program on a packet with BPF_PROG_TEST_RUN: for
//! tests (verdict and output bytes) and benchmarks (kernel-timed runs).

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp};

use crate::{
    error::Error,
    loader::{Dataplane, BENCH_PROGRAMS, PROGRAM},
};

/// Headroom for encapsulation in the output buffer.
const GROWTH: usize = 256;

/// A program run: the XDP action and the packet as the program left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub action: u32,
    pub data: Vec<u8>,
}

/// The `struct xdp_md` passed as context: data offsets and the ingress interface.
fn xdp_md(len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    md
}

/// Runs `program` `repeat` times on `data` as if received on
/// `ingress_ifindex` (0: the namespace's loopback); returns the last run's
/// result and the kernel-measured mean nanoseconds per run.
fn exec(
    program: &Xdp,
    name: &'static str,
    data: &[u8],
    repeat: u32,
    ingress_ifindex: u32,
) -> Result<(RunResult, f64), Error> {
    let mut out = vec![0u8; data.len() + GROWTH];
    let md = xdp_md(data.len(), ingress_ifindex);
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in: (ingress_ifindex != 0).then_some(&md[..]),
            ctx_out: None,
            repeat,
            attrs: TestRunAttrs::new(),
        })
        .map_err(|e| Error::Program {
            program: name,
            source: Box::new(e),
        })?;
    out.truncate(r.data_size_out as usize);
    Ok((
        RunResult {
            action: r.return_value,
            data: out,
        },
        r.duration.as_nanos() as f64,
    ))
}

impl Dataplane {
    /// A duplicate of the program's file descriptor, for running it with
    /// BPF_PROG_TEST_RUN from another thread while this one applies.
    pub fn program_fd(&self) -> Result<std::os::fd::OwnedFd, Error> {
        use std::os::fd::AsFd;
        let prog = self.program()?;
        let fd = prog.fd().map_err(|e| Error::Program {
            program: PROGRAM,
            source: Box::new(e),
        })?;
        fd.as_fd().try_clone_to_owned().map_err(|e| Error::Interface {
            interface: "program".into(),
            message: format!("duplicating its descriptor: {e}"),
        })
    }

    /// Runs the program once on `data`, as if received on `ingress_ifindex`
    /// (0: the test-run default, the namespace's loopback).
    pub fn run(&self, data: &[u8], ingress_ifindex: u32) -> Result<RunResult, Error> {
        Ok(exec(self.program()?, PROGRAM, data, 1, ingress_ifindex)?.0)
    }

    /// Kernel-measured mean nanoseconds per run over `repeat` runs of one
    /// syscall. The kernel reuses the buffer between repeats, so this is
    /// only meaningful for paths that do not rewrite the packet.
    pub fn time_repeat(&self, data: &[u8], repeat: u32, ingress_ifindex: u32) -> Result<f64, Error> {
        Ok(exec(self.program()?, PROGRAM, data, repeat, ingress_ifindex)?.1)
    }

    /// Like [`Dataplane::time_repeat`] through the benchmark harness, which
    /// restores the packet after every run (`nop`: the harness alone).
    /// Needs [`Dataplane::load_bench_programs`].
    pub fn time_harness(&self, data: &[u8], repeat: u32, nop: bool, ingress_ifindex: u32) -> Result<f64, Error> {
        let name = BENCH_PROGRAMS[usize::from(nop)];
        Ok(exec(self.program_named(name)?, name, data, repeat, ingress_ifindex)?.1)
    }

    /// Runs the benchmark harness `repeat` times and returns the buffer as
    /// the last run left it: the input again when the harness restores correctly.
    pub fn run_harness(&self, data: &[u8], repeat: u32, ingress_ifindex: u32) -> Result<RunResult, Error> {
        let name = BENCH_PROGRAMS[0];
        Ok(exec(self.program_named(name)?, name, data, repeat, ingress_ifindex)?.0)
    }
}
