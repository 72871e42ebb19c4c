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
