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
//! The source tree follows the architecture (docs/architecture.md), each
//! folder's `mod.rs` saying what lives there and what it may use. From the
//! bottom:
//!
//! - [`sys`], the platform layer, and [`wire`], every serialized type (the
//!   port API, events, the agent's messages, port specs, counters), use no
//!   other module;
//! - [`child`]: dialing inside the container's namespace (dial rules,
//!   the in-process dialer, source addresses, the dial agent);
//! - [`engine`]: the TCP engines, their counters and kernel probes;
//!   [`udp`]: the UDP relay, its flow table, counters and batch I/O;
//! - [`parent`]: the port manager, the API server, the agent's client and
//!   RootlessKit attach;
//! - [`cli`]: the arguments and the API client;
//! - [`startup`] runs it all in the order least privilege needs; [`fuzz`]
//!   holds the fuzz targets' entry points.
//!
//! No module uses one that uses it back, nor any folder (checked by
//! `layering` below).

// Every unsafe block lives in `sys`, each with its SAFETY comment; the
// compiler refuses one anywhere else.
#![deny(unsafe_code)]
// The docs are written for `cargo doc --document-private-items`: the
// public surface is kept narrow, and module docs link to the private
// modules they describe.
#![allow(rustdoc::private_intra_doc_links)]
// Without the BPF object the ebpf engine is a stand-in, and the helpers
// only it uses (sys's TCP probes, the handoff decisions) have no caller;
// dead code is checked in the default build.
#![cfg_attr(not(feature = "ebpf"), allow(dead_code))]

pub mod child;
pub mod cli;
pub mod engine;
pub mod fuzz;
pub mod parent;
pub mod startup;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub(crate) mod udp;
pub mod wire;

#[cfg(test)]
mod layering {
    //! The module hierarchy, checked from the sources. Each file is a
    //! module (`udp/relay.rs` is `udp::relay`, a folder's `mod.rs` the
    //! folder); each top-level folder or file is a unit. A module uses
    //! another when its code outside comments and its test module names it
    //! (`crate::a::b`, `use crate::{a, b::c}`, `super::x`); a folder's
    //! `mod x;` and `pub use x::..` lines only lay it out. Checked: no
    //! cycle among modules, none among units, and every unit a folder uses
    //! is named on its `mod.rs`'s "May use:" line.

    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    struct Module {
        path: String,
        unit: String,
        code: String,
        allowed: Option<BTreeSet<String>>,
    }

    fn walk(dir: &Path, prefix: &[String], out: &mut Vec<Module>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("src")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if p.is_dir() {
                let mut sub = prefix.to_vec();
                sub.push(stem.to_string());
                walk(&p, &sub, out);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") || prefix.is_empty() && stem == "lib" {
                continue;
            }
            let mut path = prefix.to_vec();
            if stem != "mod" {
                path.push(stem.to_string());
            }
            let text = std::fs::read_to_string(&p).expect("read");
            let allowed = (stem == "mod" && prefix.len() == 1).then(|| may_use(&text));
            out.push(Module {
                unit: path[0].clone(),
                path: path.join("::"),
                code: code(&text, stem == "mod"),
                allowed,
            });
        }
    }

    /// The units named on a folder's "May use:" line (up to its full stop).
    fn may_use(text: &str) -> BTreeSet<String> {
        let start = text
            .find("May use:")
            .unwrap_or_else(|| panic!("a folder's mod.rs says what it may use:\n{text}"));
        let rest = &text[start..];
        let line = &rest[..rest.find('.').unwrap_or(rest.len())];
        line.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The code of a file: no comments, no test module, and for a folder's
    /// `mod.rs` no module declarations or re-exports of its children.
    fn code(text: &str, folder: bool) -> String {
        let body = text.split("#[cfg(test)]\nmod ").next().unwrap_or_default();
        body.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("//"))
            .filter(|l| {
                let decl = l.starts_with("mod ")
                    || l.starts_with("pub mod ")
                    || l.starts_with("pub use ") && !l.starts_with("pub use crate::");
                !(folder && decl)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The paths a `use` tree at the start of `s` names: `a::b`,
    /// `a::{b, c::d}`, `{a, b}`.
    fn tree(s: &str) -> Vec<String> {
        let s = s.trim_start();
        if let Some(group) = s.strip_prefix('{') {
            let mut items = Vec::new();
            let (mut depth, mut start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        items.extend(tree(&group[start..i]));
                        return items;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.extend(tree(&group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return items;
        }
        let ident: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() || !ident.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Vec::new();
        }
        match s[ident.len()..].strip_prefix("::") {
            Some(rest) => {
                let subs = tree(rest);
                if subs.is_empty() {
                    vec![ident]
                } else {
                    subs.into_iter().map(|t| format!("{ident}::{t}")).collect()
                }
            }
            None => vec![ident],
        }
    }

    /// The modules `m` uses: each named path cut to its longest prefix that
    /// is a module.
    fn uses(m: &Module, known: &BTreeSet<String>) -> BTreeSet<String> {
        let parent = match m.path.rsplit_once("::") {
            Some((p, _)) => p.to_string(),
            None => String::new(),
        };
        let mut found = BTreeSet::new();
        for (anchor, base) in [("crate::", String::new()), ("super::", parent)] {
            for (i, _) in m.code.match_indices(anchor) {
                if m.code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                for t in tree(&m.code[i + anchor.len()..]) {
                    let full = if base.is_empty() {
                        t
                    } else {
                        format!("{base}::{t}")
                    };
                    let mut segs: Vec<&str> = full.split("::").collect();
                    while !segs.is_empty() && !known.contains(&segs.join("::")) {
                        segs.pop();
                    }
                    if segs.is_empty() && anchor == "super::" && !base.is_empty() {
                        found.insert(base.clone());
                    } else if !segs.is_empty() {
                        found.insert(segs.join("::"));
                    }
                }
            }
        }
        found.remove(&m.path);
        found
    }

    fn assert_acyclic(graph: &BTreeMap<String, BTreeSet<String>>, what: &str) {
        for start in graph.keys() {
            let mut stack: Vec<Vec<&String>> = vec![vec![start]];
            let mut seen = BTreeSet::new();
            while let Some(path) = stack.pop() {
                let last = path[path.len() - 1];
                for next in graph.get(last).into_iter().flatten() {
                    assert!(next != start, "a {what} cycle: {path:?} -> {next}");
                    if seen.insert(next) {
                        let mut p = path.clone();
                        p.push(next);
                        stack.push(p);
                    }
                }
            }
        }
    }

    #[test]
    fn modules_and_folders_form_a_hierarchy() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut modules = Vec::new();
        walk(&src, &[], &mut modules);
        let known: BTreeSet<String> = modules.iter().map(|m| m.path.clone()).collect();
        let unit_of: BTreeMap<&str, &str> = modules
            .iter()
            .map(|m| (m.path.as_str(), m.unit.as_str()))
            .collect();
        let graph: BTreeMap<String, BTreeSet<String>> = modules
            .iter()
            .map(|m| (m.path.clone(), uses(m, &known)))
            .collect();
        let mut units: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, tos) in &graph {
            let u = unit_of[from.as_str()].to_string();
            let e = units.entry(u.clone()).or_default();
            e.extend(tos.iter().map(|t| unit_of[t.as_str()].to_string()));
            e.remove(&u);
        }
        // The scan sees edges of every kind.
        assert!(graph["child::netns"].contains("child::dial"), "{graph:?}");
        assert!(graph["udp::relay"].contains("child::dial"), "{graph:?}");
        assert!(graph["udp::relay"].contains("udp::flows"), "{graph:?}");
        assert!(units["startup"].contains("parent"), "{units:?}");
        assert_acyclic(&graph, "module");
        assert_acyclic(&units, "folder");
        for m in modules.iter().filter(|m| m.allowed.is_some()) {
            let allowed = m.allowed.as_ref().expect("folder");
            let extra: Vec<_> = units[&m.unit].difference(allowed).collect();
            assert!(
                extra.is_empty(),
                "{} uses {extra:?}, which its mod.rs's \"May use:\" line does not name",
                m.unit
            );
        }
    }

    #[test]
    fn the_scan_reads_use_trees() {
        assert_eq!(tree("a::b::C;"), ["a::b"]);
        assert_eq!(tree("{a, b::{c, d}};"), ["a", "b::c", "b::d"]);
        assert_eq!(tree("a::{self, B};"), ["a::self"]);
    }
}
