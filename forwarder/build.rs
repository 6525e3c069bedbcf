//! Builds the eBPF programs (forwarder-ebpf) with the nightly toolchain and
//! bpf-linker through aya-build; `src/engine/ebpf.rs` embeds the object.
//! `cargo xtask setup` installs both tools. Only with the `ebpf` feature
//! (default): without it there is nothing to build and the ebpf engine is a
//! stand-in that never loads.
//!
//! aya-build relays every line of the inner cargo's progress ("Compiling
//! core …", about 35 of them) as a `cargo:warning`, which cargo prints on
//! every build. To keep that out of the user's terminal, this script runs
//! itself a second time (`FORWARDER_EBPF_BUILD_INNER` set) to call
//! aya-build, reads what that run prints, and passes on the directives
//! cargo needs plus the warnings that are compiler diagnostics. When the
//! eBPF build fails, everything it printed is passed on, so the compiler's
//! error reaches the user.
#[cfg(not(feature = "ebpf"))]
fn main() {}

#[cfg(feature = "ebpf")]
const INNER: &str = "FORWARDER_EBPF_BUILD_INNER";

#[cfg(feature = "ebpf")]
fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    if std::env::var_os(INNER).is_some() {
        return build_ebpf();
    }
    let me = std::env::current_exe().context("cannot find the build script's own path")?;
    let out = std::process::Command::new(&me)
        .env(INNER, "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", me.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Cargo shows a failed build script's stderr: the inner build's
        // output goes there whole, so the compiler's error is shown once.
        for line in text.lines() {
            match line.strip_prefix("cargo:warning=") {
                Some(w) => eprintln!("{w}"),
                None => println!("{line}"),
            }
        }
        anyhow::bail!(
            "building the eBPF programs (forwarder-ebpf) failed: the inner build's output is above"
        );
    }
    for line in text.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(w) if is_progress(w) => {}
            _ => println!("{line}"),
        }
    }
    Ok(())
}

/// Whether a line the inner cargo wrote to stderr is progress (a status
/// word right-aligned in 12 columns: "   Compiling x", "    Finished …")
/// rather than a compiler diagnostic.
#[cfg(feature = "ebpf")]
fn is_progress(line: &str) -> bool {
    let word = line.trim_start();
    let status = word.split(' ').next().unwrap_or_default();
    word.len() < line.len()
        && status.starts_with(|c: char| c.is_ascii_uppercase())
        && status.chars().all(|c| c.is_ascii_alphabetic())
}

#[cfg(feature = "ebpf")]
fn build_ebpf() -> anyhow::Result<()> {
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
