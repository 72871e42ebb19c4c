//! The performance baseline: a bare XDP program returning XDP_DROP (two
//! instructions), loaded with the raw bpf(2) call, and timed with
//! BPF_PROG_TEST_RUN exactly like moat's program.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// `union bpf_attr` is at most this large for the commands used here.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn zero() -> Attr {
        Attr([0; 160])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes([self.0[off], self.0[off + 1], self.0[off + 2], self.0[off + 3]])
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, zero-initialised bpf_attr of sufficient size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Runs the XDP program `fd` once on `data` with BPF_PROG_TEST_RUN;
/// returns its action and output (at most `data.len() + 256` bytes).
pub fn run_fd(fd: std::os::fd::BorrowedFd<'_>, data: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; data.len() + 256];
    let mut a = Attr::zero();
    a.put_u32(0, fd.as_raw_fd() as u32); // prog_fd
    a.put_u32(8, data.len() as u32); // data_size_in
    a.put_u32(12, out.len() as u32); // data_size_out
    a.put_u64(16, data.as_ptr() as u64); // data_in
    a.put_u64(24, out.as_mut_ptr() as u64); // data_out
    a.put_u32(32, 1); // repeat
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    out.truncate(a.get_u32(12) as usize);
    Ok((a.get_u32(4), out))
}

/// A loaded bare XDP_DROP program.
pub struct BareDrop {
    fd: OwnedFd,
}

impl BareDrop {
    pub fn load() -> io::Result<BareDrop> {
        // r0 = XDP_DROP (1); exit
        let insns: [u64; 2] = [
            0xb7 | (1u64 << 32), // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1
            0x95,                // BPF_JMP | BPF_EXIT
        ];
        let license = b"GPL\0";
        let mut a = Attr::zero();
        a.put_u32(0, BPF_PROG_TYPE_XDP);
        a.put_u32(4, insns.len() as u32);
        a.put_u64(8, insns.as_ptr() as u64);
        a.put_u64(16, license.as_ptr() as u64);
        let fd = bpf(BPF_PROG_LOAD, &mut a)?;
        // SAFETY: the kernel returned a new file descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(BareDrop { fd })
    }

    /// Kernel-measured mean ns per run over `repeat` runs in one call.
    pub fn time_repeat(&self, data: &[u8], repeat: u32) -> io::Result<f64> {
        let mut a = Attr::zero();
        a.put_u32(0, self.fd.as_raw_fd() as u32); // prog_fd
        a.put_u32(8, data.len() as u32); // data_size_in
        a.put_u64(16, data.as_ptr() as u64); // data_in
        a.put_u32(32, repeat); // repeat
        bpf(BPF_PROG_TEST_RUN, &mut a)?;
        let retval = a.get_u32(4);
        if retval != 1 {
            return Err(io::Error::other(format!("bare drop returned {retval}")));
        }
        Ok(f64::from(a.get_u32(36))) // duration
    }

    /// Pins the program at `path` (on a BPF filesystem), e.g. for
    /// `ip link set dev DEV xdpdrv pinned PATH`.
    pub fn pin(&self, path: &std::path::Path) -> io::Result<()> {
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let mut a = Attr::zero();
        a.put_u64(0, path.as_ptr() as u64); // pathname
        a.put_u32(8, self.fd.as_raw_fd() as u32); // bpf_fd
        bpf(BPF_OBJ_PIN, &mut a)?;
        Ok(())
    }

    /// Mean over `runs` single-run calls (the same method as moat's rewriting paths).
    pub fn time_single(&self, data: &[u8], runs: u32) -> io::Result<f64> {
        let mut total = 0.0;
        for _ in 0..runs {
            total += self.time_repeat(data, 1)?;
        }
        Ok(total / f64::from(runs.max(1)))
    }
}

static PINS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A bare XDP_DROP program pinned on a BPF filesystem of its own under
/// /run (`ip -n` mounts a sysfs of its own, hiding /sys/fs/bpf), for
/// `ip link set ... xdpdrv pinned`; unpinned and unmounted on drop
/// (attachments keep the program alive).
pub struct PinnedBareDrop {
    prog: BareDrop,
    dir: PathBuf,
    pin: PathBuf,
}

impl PinnedBareDrop {
    pub fn new() -> io::Result<PinnedBareDrop> {
        let prog = BareDrop::load()?;
        let dir = PathBuf::from(format!(
            "/run/moat-bpf-{}-{}",
            std::process::id(),
            PINS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        crate::netns::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir))?;
        let pin = dir.join("drop");
        let d = PinnedBareDrop { prog, dir, pin };
        d.prog.pin(&d.pin)?;
        Ok(d)
    }
    /// Attaches the program to `dev` in `ns` (native XDP).
    pub fn attach(&self, ns: &crate::netns::NetNs, dev: &str) {
        ns.ip(&[
            "link",
            "set",
            "dev",
            dev,
            "xdpdrv",
            "pinned",
            self.pin.to_str().expect("path"),
        ]);
    }
}

impl Drop for PinnedBareDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
        let _ = Command::new("umount").arg(&self.dir).output();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
