//! The forwarder's eBPF programs live in `src/main.rs` (the binary that
//! aya-build compiles for bpfel-unknown-none); this library target exists
//! so `forwarder` can declare a build-dependency on the crate.
#![no_std]
