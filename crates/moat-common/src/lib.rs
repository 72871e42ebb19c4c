//! Types shared by the XDP data plane and userspace.
//!
//! Every type that crosses into a BPF map lives here once, as `#[repr(C)]`,
//! with padding written out and its size pinned by a const assertion.
//! Network-order fields are byte arrays.
#![cfg_attr(not(test), no_std)]

pub mod flood;
pub mod flowhash;
pub mod limits;
pub mod maps;
pub mod reason;
pub mod rules;

pub use maps::*;
pub use reason::Reason;
