//! Builds the eBPF programs (forwarder-ebpf) with the nightly toolchain and
//! bpf-linker through aya-build; `src/engine/ebpf.rs` embeds the object.
//! `cargo xtask setup` installs both tools. Only with the `ebpf` feature
//! (default): without it there is nothing to build and the ebpf engine is a
//! stand-in that never loads.
#[cfg(not(feature = "ebpf"))]
fn main() {}

#[cfg(feature = "ebpf")]
fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("forwarder/ has no parent directory"))?
        .join("forwarder-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "forwarder-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
