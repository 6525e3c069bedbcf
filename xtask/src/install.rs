//! `cargo xtask install [--prefix PREFIX] [--destdir DIR] [--bin PATH]`:
//! builds the forwarder in release mode (the BPF programs embedded, as
//! `cargo install --path forwarder` builds it) and installs it with its man
//! pages:
//!
//! - `PREFIX/bin/forwarder`, mode 755;
//! - `PREFIX/share/man/man1/forwarder.1` and one page per subcommand
//!   (`forwarder-run.1`, `forwarder-ports-add.1`, …), mode 644, written by
//!   the installed binary's own hidden `man` command, so they describe
//!   exactly the options it has.
//!
//! PREFIX is `/usr/local` unless `--prefix` says otherwise (`~/.local` for
//! one user: man finds `~/.local/share/man` when `~/.local/bin` is in
//! PATH). `--destdir`, as DESTDIR in `make install`, is put in front of
//! every path written (a staging root for a package) and is not part of the
//! installed layout. `--bin` installs a binary built already instead of
//! building one. Each file is written beside its target and renamed over
//! it, so reinstalling under a running forwarder works. The systemd units
//! are per user and stay a manual step (`contrib/systemd/`, the README).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{build_forwarder, run as run_cmd};

#[derive(clap::Args)]
pub struct Args {
    /// Where to install: PREFIX/bin and PREFIX/share/man/man1.
    #[arg(long, value_name = "PREFIX", default_value = "/usr/local")]
    prefix: PathBuf,
    /// A staging root put in front of every path written (as DESTDIR in
    /// `make install`).
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// Install this forwarder binary instead of building one.
    #[arg(long, value_name = "PATH")]
    bin: Option<PathBuf>,
}

/// Where the files go.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    /// `DESTDIR/PREFIX/bin`.
    pub bin_dir: PathBuf,
    /// `DESTDIR/PREFIX/share/man`, the directory `man -M` and MANPATH name.
    pub man_dir: PathBuf,
}

impl Layout {
    /// The layout for `prefix` (absolute), under `destdir` if given.
    pub fn new(destdir: Option<&Path>, prefix: &Path) -> Result<Layout> {
        let Ok(relative) = prefix.strip_prefix("/") else {
            bail!(
                "--prefix must be an absolute path, not {}",
                prefix.display()
            );
        };
        let root = match destdir {
            Some(d) => d.join(relative),
            None => prefix.to_path_buf(),
        };
        Ok(Layout {
            bin_dir: root.join("bin"),
            man_dir: root.join("share/man"),
        })
    }

    /// Where the section 1 pages go.
    pub fn man1(&self) -> PathBuf {
        self.man_dir.join("man1")
    }
}

pub fn run(args: &Args) -> Result<()> {
    let layout = Layout::new(args.destdir.as_deref(), &args.prefix)?;
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => build_forwarder()?,
    };
    for file in install(&bin, &layout)? {
        println!("install: {}", file.display());
    }
    Ok(())
}

/// Installs `bin` and the man pages it writes into `layout`; returns the
/// files written, the binary first.
pub fn install(bin: &Path, layout: &Layout) -> Result<Vec<PathBuf>> {
    if !bin.is_file() {
        bail!("no forwarder binary at {}", bin.display());
    }
    let man1 = layout.man1();
    for dir in [&layout.bin_dir, &man1] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The pages, written by the binary into a scratch directory beside
    // their destination, then put in place one by one.
    let scratch = man1.join(format!(".xtask-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let written = run_cmd(Command::new(bin).arg("man").arg(&scratch))
        .with_context(|| format!("{} man: writing the man pages", bin.display()))
        .and_then(|()| pages_in(&scratch));
    let pages = match written {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&scratch);
            bail!("{} man wrote no pages", bin.display());
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
    };
    let mut files = vec![place(bin, &layout.bin_dir.join("forwarder"), 0o755)?];
    for page in pages {
        let name = page.file_name().context("a page without a name")?;
        files.push(place(&page, &man1.join(name), 0o644)?);
    }
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(files)
}

/// The `*.1` files in `dir`, sorted.
fn pages_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

/// Copies `from` to `to` with `mode`: written beside it, then renamed
/// over it (a running binary cannot be written in place).
fn place(from: &Path, to: &Path, mode: u32) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let name = to.file_name().context("a target without a name")?;
    let tmp = to.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("renaming {} to {}", tmp.display(), to.display()))?;
    Ok(to.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destdir_goes_in_front_of_the_prefix() {
        let l = Layout::new(Some(Path::new("/stage")), Path::new("/usr")).unwrap();
        assert_eq!(l.bin_dir, Path::new("/stage/usr/bin"));
        assert_eq!(l.man1(), Path::new("/stage/usr/share/man/man1"));
        let l = Layout::new(None, Path::new("/usr/local")).unwrap();
        assert_eq!(l.bin_dir, Path::new("/usr/local/bin"));
        assert_eq!(l.man_dir, Path::new("/usr/local/share/man"));
        assert!(Layout::new(None, Path::new("usr/local")).is_err());
    }

    /// The pages there must be: `forwarder.1` and one per subcommand
    /// `--help` shows, nested ones too (`forwarder-ports-add.1`), read
    /// from the command-line definitions.
    fn expected_pages() -> Vec<String> {
        use clap::CommandFactory as _;
        fn walk(cmd: &clap::Command, name: String, out: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub, format!("{name}-{}", sub.get_name()), out);
            }
            out.push(format!("{name}.1"));
        }
        let mut pages = Vec::new();
        walk(
            &forwarder::cli::args::Cli::command(),
            "forwarder".into(),
            &mut pages,
        );
        pages.sort();
        pages
    }

    /// The forwarder under test: FORWARDER_BIN (`cargo xtask test` sets
    /// it), else the workspace's release build.
    fn forwarder_bin() -> PathBuf {
        let bin = std::env::var_os("FORWARDER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::util::root().join("target/release/forwarder"));
        assert!(
            bin.is_file(),
            "no forwarder at {}: build it (cargo build --release -p forwarder) or set FORWARDER_BIN",
            bin.display()
        );
        bin
    }

    /// `man` renders `page` from `man_dir` (named with `-M`, or through
    /// MANPATH); returns the text.
    fn man(man_dir: &Path, page: &str, through_manpath: bool) -> String {
        let mut cmd = Command::new("man");
        if through_manpath {
            cmd.env("MANPATH", man_dir);
        } else {
            cmd.arg("-M").arg(man_dir);
        }
        let out = cmd
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .expect("man (cargo xtask setup installs man-db)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.trim().is_empty(),
            "man {page} from {}: {}\n{text}",
            man_dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// An install into a staging root holds the binary (executable, the
    /// same bytes) and every man page, each of which `man` renders from
    /// there; `forwarder-run` documents the child options.
    #[test]
    fn installs_the_binary_and_every_man_page() {
        use std::os::unix::fs::PermissionsExt;
        let bin = forwarder_bin();
        let stage = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(Some(stage.path()), Path::new("/usr/local")).unwrap();
        let files = install(&bin, &layout).expect("install");
        let installed = stage.path().join("usr/local/bin/forwarder");
        assert_eq!(files.first(), Some(&installed));
        let meta = std::fs::metadata(&installed).expect("the installed binary");
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(
            meta.len(),
            std::fs::metadata(&bin).expect("the binary").len()
        );
        let man1 = stage.path().join("usr/local/share/man/man1");
        let mut pages: Vec<String> = std::fs::read_dir(&man1)
            .expect("man1")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        pages.sort();
        let want = expected_pages();
        assert_eq!(pages, want, "the pages in {}", man1.display());
        assert!(want.len() >= 11, "{want:?}");
        for page in &pages {
            let mode = std::fs::metadata(man1.join(page))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644, "{page}");
            let name = page.trim_end_matches(".1");
            let text = man(&layout.man_dir, name, false);
            assert!(text.contains(name), "{page}:\n{text}");
        }
        let run = man(&layout.man_dir, "forwarder-run", true);
        for opt in [
            "--child-pid",
            "--child-netns",
            "--publish",
            "--max-connections",
        ] {
            assert!(run.contains(opt), "forwarder-run(1) lacks {opt}:\n{run}");
        }
        // Installing again over the first install works (files renamed
        // into place) and leaves no scratch behind.
        install(&bin, &layout).expect("a second install");
        let left: Vec<_> = std::fs::read_dir(&man1)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
