//! Fuzz target: see `forwarder::fuzz::api_port_body` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forwarder::fuzz::api_port_body(data));
