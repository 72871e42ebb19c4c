//! The flood generator (tests and benchmarks only): runs the `moat_flood`
//! program with BPF_PROG_TEST_RUN in live-frames mode, so that one system
//! call transmits up to a million varied frames out of one interface. The
//! traffic leaves in the calling thread's network namespace: callers run it
//! inside namespaces they created.

use std::time::{Duration, Instant};

use aya::{
    maps::{Array, MapData},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use moat_common::flood::{FloodConfig, FLOOD_L4};

use crate::error::Error;

/// The generator's own BPF object (crates/moat-ebpf, bin moat-flood).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat-flood"));
const PROGRAM: &str = "moat_flood";
const MAP: &str = "FLOOD";
/// Frames per live-frames batch (the kernel allows up to 256).
const BATCH: u32 = 64;
/// Frames of a run's first call, when the generator's pace is not yet
/// known (tens of milliseconds here).
const PROBE: u64 = 1 << 16;
/// The most frames one call can take (the kernel's repeat count is 32 bits).
const MAX_CALL: u64 = u32::MAX as u64;
/// The shortest template the program takes (through a TCP checksum).
pub const MIN_FRAME: usize = FLOOD_L4 + 18;

/// What to send: a template frame and what varies from frame to frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Ethernet + IPv4 (no options) + transport header (+ payload), at
    /// least [`MIN_FRAME`] bytes; its IPv4 checksum right, a UDP checksum 0.
    pub frame: Vec<u8>,
    pub config: FloodConfig,
}

/// What a run sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    /// Frames the program ran on and transmitted.
    pub sent: u64,
    /// The run's wall time, each call's setup included.
    pub elapsed: Duration,
    /// The time the kernel spent in its send loop, as it timed it: the
    /// time frames were flowing. Each call also costs a setup outside
    /// the loop (see [`Flood::run`]) in which nothing is sent.
    pub busy: Duration,
    /// System calls made.
    pub calls: u32,
}

impl Report {
    /// Frames per second while frames were flowing.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.busy.as_secs_f64().max(1e-9)
    }
}

/// The loaded generator.
pub struct Flood {
    ebpf: Ebpf,
    config: Array<MapData, FloodConfig>,
    /// Frames per second of the kernel's send loop, and the setup time of
    /// one call, as last measured: they size the next calls.
    pace: Option<(f64, Duration)>,
}

fn program_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Spec(format!("flood program {PROGRAM}: {e}"))
}

impl Flood {
    /// Loads the program (the verifier checks it) and its settings map.
    pub fn load() -> Result<Flood, Error> {
        let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::MissingProgram { program: PROGRAM })?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        let map = ebpf.take_map(MAP).ok_or(Error::MissingMap { map: MAP })?;
        let config = Array::try_from(map).map_err(Error::map(MAP))?;
        Ok(Flood {
            ebpf,
            config,
            pace: None,
        })
    }

    /// Sends `count` frames made from `template` out of interface `ifindex`
    /// (in the calling thread's namespace), stopping early once `limit` has
    /// passed. The receiving side must take XDP frames (a veth peer needs
    /// an XDP program or GRO).
    ///
    /// Each system call costs a setup in which nothing is sent: the kernel
    /// adds the program to its XDP dispatcher before the send loop and
    /// removes it after, and each change waits for an RCU grace period
    /// (over 10 ms on a kernel ticking at 250 Hz). So a run makes few,
    /// long calls: each is sized to fill the time left, less one setup, at
    /// the pace the kernel timed on the last call (a run's first call, if
    /// none came before, sends a short probe).
    pub fn run(&mut self, template: &Template, ifindex: u32, count: u64, limit: Duration) -> Result<Report, Error> {
        if template.frame.len() < MIN_FRAME {
            return Err(Error::Spec(format!(
                "flood template of {} bytes: at least {MIN_FRAME} needed",
                template.frame.len()
            )));
        }
        self.config.set(0, template.config, 0).map_err(Error::map(MAP))?;
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .ok_or(Error::MissingProgram { program: PROGRAM })?
            .try_into()
            .map_err(program_error)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(template.frame.len() as u32).to_ne_bytes());
        md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let started = Instant::now();
        let (mut sent, mut busy, mut calls) = (0, Duration::ZERO, 0);
        while sent < count {
            let Some(left) = limit.checked_sub(started.elapsed()) else {
                break;
            };
            let n = match self.pace {
                None => PROBE,
                // Not worth a setup that would end past the limit.
                Some((_, setup)) if calls > 0 && left <= setup => break,
                Some((pace, setup)) => (pace * left.saturating_sub(setup).as_secs_f64()) as u64,
            }
            .clamp(u64::from(BATCH), MAX_CALL)
            .min(count - sent);
            let call = Instant::now();
            let run = program.test_run(TestRunOptions {
                data_in: Some(&template.frame),
                data_out: None,
                ctx_in: Some(&md),
                ctx_out: None,
                repeat: n as u32,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH.min(n as u32)),
            });
            match run {
                Ok(r) => {
                    // The kernel gives the loop's time per frame, rounded
                    // down to a whole nanosecond: half a nanosecond a
                    // frame centres the error.
                    let looped = Duration::from_nanos(r.duration.as_nanos() as u64 * n + n / 2);
                    let setup = call.elapsed().saturating_sub(looped);
                    self.pace = Some((n as f64 / looped.as_secs_f64().max(1e-9), setup));
                    sent += n;
                    busy += looped;
                    calls += 1;
                }
                // The kernel stops a run early for a pending signal (or
                // when the frame pool is short): nothing was counted as
                // sent; the loop runs it again, within the time limit.
                Err(aya::programs::ProgramError::SyscallError(e))
                    if matches!(
                        e.io_error.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::ENOMEM)
                    ) =>
                {
                    std::thread::yield_now();
                }
                Err(aya::programs::ProgramError::SyscallError(e)) => {
                    return Err(Error::Spec(format!(
                        "flood program {PROGRAM}: {}: {}",
                        e.call, e.io_error
                    )))
                }
                Err(e) => return Err(program_error(e)),
            }
        }
        Ok(Report {
            sent,
            elapsed: started.elapsed(),
            busy,
            calls,
        })
    }
}
