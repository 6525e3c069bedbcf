//! Fuzz target: see `forwarder::fuzz::port_spec_text` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forwarder::fuzz::port_spec_text(data));
