//! Fuzz target: see `forwarder::fuzz::agent_message` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| forwarder::fuzz::agent_message(data));
