//! Socket settings the lab's endpoints and captures share.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Asks for a receive buffer of `bytes` past the system limit (root only;
/// otherwise the default stays, which only makes bursts drop sooner).
pub fn force_receive_buffer(fd: BorrowedFd<'_>, bytes: libc::c_int) {
    // SAFETY: setsockopt(2) with a c_int option of the stated size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Pins the calling thread to `cpu` (BPF test runs and live-frame floods
/// execute on the CPU that calls them).
pub fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "pin to CPU {cpu}: {}", std::io::Error::last_os_error());
}

/// Pins thread or process `pid` (e.g. a NAPI thread) to `cpu`.
pub fn pin_pid(pid: u32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on a thread id.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Kernel threads whose name starts with `prefix` (NAPI threads are
/// `napi/<device>-<id>`).
pub fn napi_threads(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(prefix)))
        .collect()
}
