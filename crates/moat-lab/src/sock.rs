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
