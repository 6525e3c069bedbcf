//! forwarder as a library: everything but the command line, which
//! `main.rs` puts on top. The library target exists so the parsers and
//! decoders can be linked without the BPF object (the fuzz targets in
//! `fuzz/`) and so `cargo test -p forwarder --lib --no-default-features`
//! runs on stable as an ordinary user (no root, nightly or bpf-linker).
//!
//! The cargo feature `ebpf` (default) builds the BPF programs
//! (`forwarder-ebpf`, with nightly and bpf-linker, see `build.rs`) and embeds
//! them in [`engine::ebpf`]. Without it that module is a stand-in whose
//! engine never loads: auto mode picks splice and `--mode ebpf` fails with a
//! message saying the binary was built without the feature.

pub mod agent;
pub mod api;
pub mod client;
pub mod dial;
pub mod engine;
pub mod fuzz;
pub mod kernel;
pub mod netns;
pub mod port;
pub mod ratelimit;
pub mod rootlesskit;
pub mod spec;
pub mod startup;
pub mod stats;
pub mod sys;
pub mod udp;
pub mod wire;
