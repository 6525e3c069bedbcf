//! Rebuild when the bpf-linker binary changes: linking the programs needs
//! it, and cargo cannot express a dependency on an installed tool.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
