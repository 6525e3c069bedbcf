//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer):
//! each takes arbitrary bytes, decodes them exactly as the forwarder decodes
//! that kind of input, and panics if the decoder panics or one of the
//! properties below fails. They live in the library so the unit tests can
//! replay every input the fuzzers ever found (`fuzz/regressions/`) without
//! the fuzzing toolchain.
//!
//! - [`port_spec_text`]: the `-p` / `ports add` spec parser. An accepted
//!   spec has ports in 1-65535, prints as a spec that parses back to itself,
//!   converts to the API's JSON form and back unchanged, and gets a dial
//!   plan for each address it listens on that targets its child port. A
//!   refused one gets a message naming the spec.
//! - [`api_port_body`]: a `POST /v1/ports` body, decoded and validated into
//!   a spec (or the 400 message). An accepted body re-encoded the way `GET
//!   /v1/ports` reports it decodes to the same spec, whose text form does
//!   too.
//! - [`agent_message`]: one datagram on the dial agent's socket, decoded as a
//!   request (the agent's side) and as a reply (the forwarder's side). Every
//!   error reply the agent would send fits in one datagram of
//!   [`crate::child::agent::MAX_MESSAGE`] bytes, so the forwarder reads it whole.

use crate::child::agent;
use crate::child::dial;
use crate::parent::api;
use crate::wire::spec::{ApiSpec, PortSpec};

/// Checks the properties of a spec that was accepted from `input`.
fn accepted_spec(input: &str, spec: &PortSpec) {
    assert!(
        spec.parent_port != 0 && spec.child_port != 0,
        "{input:?} accepted with port 0: {spec:?}"
    );
    let shown = spec.to_string();
    match shown.parse::<PortSpec>() {
        Ok(again) => assert_eq!(
            &again, spec,
            "{input:?} prints as {shown:?}, which parses to something else"
        ),
        Err(e) => panic!("{input:?} prints as {shown:?}, which is refused: {e}"),
    }
    let api = ApiSpec::from(spec);
    assert_eq!(
        PortSpec::try_from(&api).as_ref(),
        Ok(spec),
        "{input:?}: its API form {api:?} decodes to something else"
    );
    let addrs = spec.listen_addrs();
    assert!(!addrs.is_empty(), "{input:?} listens nowhere");
    for (addr, _) in addrs {
        let plan = dial::plan(spec, addr.is_ipv6());
        assert_eq!(
            plan.target.port(),
            spec.child_port,
            "{input:?}: dial plan {plan:?} for a listener on {addr}"
        );
        if let Some(f) = plan.fallback {
            assert!(
                plan.target.is_ipv6() && f.is_ipv4() && f.port() == spec.child_port,
                "{input:?}: fallback {plan:?}"
            );
        }
    }
}

/// The port spec parser (`forwarder run -p`, `forwarder ports add`).
pub fn port_spec_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // clap hands the parser UTF-8 only
    };
    match text.parse::<PortSpec>() {
        Ok(spec) => accepted_spec(text, &spec),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{text:?}")),
                "the error for {text:?} does not name it: {msg}"
            );
        }
    }
}

/// A `POST /v1/ports` body.
pub fn api_port_body(data: &[u8]) {
    match api::decode_port_spec(data) {
        Ok((spec, given)) => {
            let input = String::from_utf8_lossy(data);
            accepted_spec(&input, &spec);
            let listed = serde_json::to_vec(&given)
                .unwrap_or_else(|e| panic!("{input:?}: cannot re-encode {given:?}: {e}"));
            match api::decode_port_spec(&listed) {
                Ok((again, _)) => assert_eq!(again, spec, "{input:?} re-encoded differs"),
                Err(e) => panic!("{input:?} re-encoded as {listed:?} is refused: {e}"),
            }
        }
        Err(msg) => assert!(!msg.is_empty(), "empty 400 message"),
    }
}

/// One datagram on the dial agent's socket, read by either side.
pub fn agent_message(data: &[u8]) {
    match agent::decode_request(data) {
        Ok(req) => {
            accepted_spec(&String::from_utf8_lossy(data), &req.spec);
            let _ = dial::plan(&req.spec, req.ipv6_listener);
        }
        Err(reply) => {
            assert!(!reply.ok && reply.errno == Some(libc::EINVAL), "{reply:?}");
            assert!(
                reply.message.as_deref().is_some_and(|m| !m.is_empty()),
                "an error reply without a message: {reply:?}"
            );
            let sent = serde_json::to_vec(&reply)
                .unwrap_or_else(|e| panic!("cannot encode the reply {reply:?}: {e}"));
            assert!(
                sent.len() <= agent::MAX_MESSAGE,
                "the error reply to a {}-byte request is {} bytes, more than the {} the \
                 forwarder reads: {}",
                data.len(),
                sent.len(),
                agent::MAX_MESSAGE,
                String::from_utf8_lossy(&sent)
            );
        }
    }
    if let Some(reply) = crate::parent::agent::decode_reply(data) {
        // What the forwarder does with a reply's address: unparsable ones
        // are tolerated, never a panic.
        let _ = reply
            .reached
            .as_deref()
            .map(str::parse::<std::net::SocketAddr>);
    }
}

#[cfg(test)]
mod tests {
    //! Replays the fuzzers' seeds and every input they found that failed
    //! once (`fuzz/regressions/TARGET/`): a fixed crash stays fixed.

    use std::path::PathBuf;

    /// The input files for `target` under `fuzz/seeds` and
    /// `fuzz/regressions`.
    fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut out = Vec::new();
        for kind in ["seeds", "regressions"] {
            let dir = root.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if let Ok(b) = std::fs::read(&p) {
                    out.push((p, b));
                }
            }
        }
        out
    }

    fn replay(target: &str, check: fn(&[u8])) {
        let all = inputs(target);
        assert!(!all.is_empty(), "no seeds for {target} in fuzz/seeds");
        for (path, data) in all {
            if let Err(e) = std::panic::catch_unwind(|| check(&data)) {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{}: {why}", path.display());
            }
        }
    }

    #[test]
    fn port_spec_text_inputs() {
        replay("port_spec_text", super::port_spec_text);
    }

    #[test]
    fn api_port_body_inputs() {
        replay("api_port_body", super::api_port_body);
    }

    #[test]
    fn agent_message_inputs() {
        replay("agent_message", super::agent_message);
    }
}
