//! Copying by whole words. For copies from 16 bytes up, the compiler emits
//! calls to `memmove`, which on BPF is a byte loop of its own (hundreds of
//! instructions per packet); volatile word loads and stores keep a copy
//! inline and short.

use core::ptr::{read_volatile, write_volatile};

/// `*dst = *src`, word by word.
#[inline(always)]
pub fn copy<const N: usize>(dst: &mut [u64; N], src: &[u64; N]) {
    for i in 0..N {
        // SAFETY: both indexes are in bounds of arrays of N words.
        unsafe { write_volatile(&mut dst[i], read_volatile(&src[i])) };
    }
}

/// `*dst` set to all-zero bytes by 32-bit stores: for 16 bytes and more,
/// `core::mem::zeroed` becomes a call to `memset`, a call per packet that
/// the kernel does not inline.
///
/// # Safety
/// `dst` is valid for writes of a `T`, of a size that is a multiple of 4
/// and an alignment of at least 4.
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(4) && core::mem::align_of::<T>() >= 4) };
    let p = dst as *mut u32;
    for i in 0..core::mem::size_of::<T>() / 4 {
        // SAFETY: inside `*dst`, aligned (the caller's promise, checked above).
        unsafe { write_volatile(p.add(i), 0) };
    }
}
