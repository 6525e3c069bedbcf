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
//!
//! The modules form a hierarchy: none depends on one that depends back on
//! it, directly or through others (checked by `layering` below). From the
//! bottom: `spec`, `sys`, `stats`, `ratelimit`, `rootlesskit` use no other
//! module; `engine` (the engines; `engine::handoff` holds the ebpf
//! supervisor's decisions) uses `stats` and `sys`; `dial` (the dial rules
//! and the [`dial::Dial`] trait) uses `spec`; `netns` and `udp` use `dial`;
//! `wire` (every message, typed) uses the counters' modules; `agent`,
//! `port` and `kernel` build on those; `api` and `client` on `port` and
//! `wire`; `startup` on everything.

// Every unsafe block lives in `sys`, each with its SAFETY comment; the
// compiler refuses one anywhere else.
#![deny(unsafe_code)]

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
pub mod srcip;
pub mod startup;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod udp;
pub mod wire;

#[cfg(test)]
mod layering {
    //! The module hierarchy, checked from the sources: which top-level
    //! modules each one names (`crate::x`, `use crate::{x, ..}`) outside its
    //! comments and unit tests, and that these edges have no cycle.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    fn sources(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).expect("src") {
            let p = e.expect("entry").path();
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if p.is_dir() {
                let text: String = sources(&p).into_iter().map(|(_, t)| t).collect();
                out.push((name, text));
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((name, std::fs::read_to_string(&p).expect("read")));
            }
        }
        out
    }

    /// The modules `text` names, without its comments and test module.
    fn uses(text: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut found = BTreeSet::new();
        for line in code.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let group = rest
                    .strip_prefix('{')
                    .map(|g| g.split('}').next().unwrap_or(""));
                let words: Vec<&str> = match group {
                    Some(g) => g.split(',').map(str::trim).collect(),
                    None => vec![rest],
                };
                for w in words {
                    let m: String = w
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if names.contains(&m) {
                        found.insert(m);
                    }
                }
            }
        }
        found
    }

    #[test]
    fn no_module_depends_on_one_that_depends_back() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let files = sources(&src);
        let names: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        let graph: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .map(|(n, t)| {
                let mut u = uses(t, &names);
                u.remove(n);
                (n.clone(), u)
            })
            .collect();
        assert!(
            graph["netns"].contains("dial"),
            "the scan sees edges: {graph:?}"
        );
        // Depth-first search for a path from each module back to itself.
        for start in graph.keys() {
            let mut stack: Vec<Vec<&String>> = vec![vec![start]];
            let mut seen = BTreeSet::new();
            while let Some(path) = stack.pop() {
                let last = path[path.len() - 1];
                for next in &graph[last] {
                    assert!(next != start, "a module cycle: {path:?} -> {next}");
                    if seen.insert(next) {
                        let mut p = path.clone();
                        p.push(next);
                        stack.push(p);
                    }
                }
            }
        }
    }
}
