//! A BPF array of u64 words mapped into our memory (BPF_F_MMAPABLE):
//! reads see the live words, writes are single atomic word stores.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;

use crate::error::Error;

pub struct MmapWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for MmapWords {}

impl MmapWords {
    pub fn new(map: MapData, words: usize, name: &'static str) -> Result<Self, Error> {
        let bytes = words * 8;
        // SAFETY: mapping the map's own fd, shared, for its full size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Map {
                map: name,
                source: Box::new(aya::maps::MapError::IoError(std::io::Error::last_os_error())),
            });
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or(Error::MissingMap { map: name })?;
        Ok(MmapWords {
            ptr,
            len: words,
            _map: map,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len` u64 words and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn get(&self, i: u32) -> u64 {
        self.words()[i as usize].load(Ordering::Acquire)
    }

    pub fn set(&self, i: u32, v: u64) {
        self.words()[i as usize].store(v, Ordering::Release);
    }
}

impl Drop for MmapWords {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 8) };
    }
}
