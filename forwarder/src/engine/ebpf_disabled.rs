//! Stand-in for the ebpf engine in a build without the `ebpf` cargo
//! feature (no BPF object embedded, so no nightly or bpf-linker needed):
//! the engine never loads. Auto mode therefore runs splice, and `--mode
//! ebpf` fails at start with [`EbpfError::NotBuilt`].

use super::{Conn, Engine, EngineKind};

/// Accepted and ignored here.
pub use super::EbpfOptions as Options;

/// Why the ebpf engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this forwarder was built without the `ebpf` cargo feature, so it holds no BPF \
         programs (build it with default features: `cargo xtask setup` installs the nightly \
         toolchain and bpf-linker they need); --mode splice runs without BPF"
    )]
    NotBuilt,
}

/// The ebpf engine of a build without BPF programs: cannot exist.
pub enum EbpfEngine {}

/// Loaded programs of a build without BPF programs: cannot exist.
pub enum Loaded {}

impl EbpfEngine {
    /// Always fails with [`EbpfError::NotBuilt`].
    pub fn load(_opts: Options) -> Result<Loaded, EbpfError> {
        Err(EbpfError::NotBuilt)
    }
}

impl Loaded {
    /// Unreachable: no `Loaded` exists.
    pub fn has_local_path(&self) -> bool {
        match *self {}
    }

    /// Unreachable: no `Loaded` exists.
    pub fn local_off_reason(&self) -> Option<&str> {
        match *self {}
    }

    /// Unreachable: no `Loaded` exists.
    pub fn probe_unprivileged_map_access(&self) -> std::io::Result<()> {
        match *self {}
    }

    /// Unreachable: no `Loaded` exists.
    pub fn keep_capability_on_map_thread(&mut self, _cap: caps::Capability) -> std::io::Result<()> {
        match *self {}
    }

    /// Unreachable: no `Loaded` exists.
    pub fn start(self) -> Result<EbpfEngine, EbpfError> {
        match self {}
    }
}

impl Engine for EbpfEngine {
    fn kind(&self) -> EngineKind {
        match *self {}
    }

    fn run(&self, _conn: Conn) -> super::Forwarding {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_loads_and_says_why() {
        let err = match EbpfEngine::load(Options::default()) {
            Ok(_) => panic!("a build without the ebpf feature loaded the ebpf engine"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("without the `ebpf` cargo feature"), "{err}");
        assert!(err.contains("--mode splice"), "{err}");
    }
}
