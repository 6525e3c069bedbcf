//! `cargo xtask links` (and the first step of `cargo xtask test`): every
//! relative link in the project's Markdown resolves.
//!
//! - Files: every Markdown file git knows of (`git ls-files --cached
//!   --others --exclude-standard '*.md'`, so a new doc counts before it is
//!   committed and `target/` does not); without git, `README.md` and the
//!   `.md` files under `docs/`, `bench/` and `contrib/`.
//! - Links: inline links and images, `[text](target)` and
//!   `![alt](target)`, and reference definitions, `[label]: target`;
//!   nothing inside fenced code blocks or code spans.
//! - Targets with a scheme (`https:`, `http:`, `mailto:`, …) are not
//!   checked. A relative target must name a file or directory that exists,
//!   relative to the linking file (a leading `/` means the repository
//!   root), inside the repository. Its `#anchor`, if any, must equal the
//!   GitHub slug of a heading of the target when that is a Markdown file
//!   (or of the linking file itself for a bare `#anchor`): lowercase,
//!   punctuation other than `-` and `_` dropped, spaces turned into `-`,
//!   and `-1`, `-2`, … appended to repeated headings.
//!
//! Every dead link is reported as `file:line: target: why`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::util::{output, root};

/// A link that does not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLink {
    /// The linking file, relative to the repository root.
    pub file: PathBuf,
    /// 1-based line of the link's target.
    pub line: usize,
    /// The target as written.
    pub target: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for DeadLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.target,
            self.why
        )
    }
}

/// Checks the repository's Markdown; fails listing every dead link.
pub fn run() -> Result<()> {
    let root = root();
    let files = markdown_files(&root)?;
    let dead = check(&root, &files)?;
    if dead.is_empty() {
        println!(
            "links: every relative link in {} Markdown files resolves",
            files.len()
        );
        return Ok(());
    }
    let list: Vec<String> = dead.iter().map(|d| format!("  {d}")).collect();
    bail!(
        "{} dead link{} in the Markdown files (fix the target or the heading):\n{}",
        dead.len(),
        if dead.len() == 1 { "" } else { "s" },
        list.join("\n")
    )
}

/// The Markdown files to check, relative to `root`, sorted.
pub fn markdown_files(root: &Path) -> Result<Vec<PathBuf>> {
    let listed = output(
        Command::new("git")
            .current_dir(root)
            .args([
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
                "--",
            ])
            .arg("*.md"),
    );
    let mut files: Vec<PathBuf> = match listed {
        Ok(text) => text
            .split('\0')
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            // A tracked file deleted from the work tree links nowhere.
            .filter(|f| root.join(f).is_file())
            .collect(),
        Err(_) => {
            let mut found = Vec::new();
            if root.join("README.md").is_file() {
                found.push(PathBuf::from("README.md"));
            }
            for dir in ["docs", "bench", "contrib"] {
                walk_markdown(root, Path::new(dir), &mut found)?;
            }
            found
        }
    };
    files.sort();
    files.dedup();
    Ok(files)
}

/// Adds the `.md` files under `root/dir` (as paths relative to `root`).
fn walk_markdown(root: &Path, dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    let full = root.join(dir);
    if !full.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(&full).with_context(|| format!("reading {}", full.display()))? {
        let entry = entry.with_context(|| format!("reading {}", full.display()))?;
        let rel = dir.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            walk_markdown(root, &rel, found)?;
        } else if is_markdown(&rel) {
            found.push(rel);
        }
    }
    Ok(())
}

/// Checks `files` (relative to `root`); returns the dead links in file and
/// line order.
pub fn check(root: &Path, files: &[PathBuf]) -> Result<Vec<DeadLink>> {
    let mut anchors: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    let mut dead = Vec::new();
    for file in files {
        let path = root.join(file);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for link in links(&text) {
            if let Some(why) = resolve(root, file, &text, &link.target, &mut anchors)? {
                dead.push(DeadLink {
                    file: file.clone(),
                    line: link.line,
                    target: link.target,
                    why,
                });
            }
        }
    }
    Ok(dead)
}

/// Why `target`, linked from `file`, is dead; None if it resolves.
fn resolve(
    root: &Path,
    file: &Path,
    text: &str,
    target: &str,
    anchors: &mut HashMap<PathBuf, HashSet<String>>,
) -> Result<Option<String>> {
    if target.is_empty() {
        return Ok(Some("empty target".into()));
    }
    if has_scheme(target) {
        return Ok(None);
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(percent_decode(a))),
        None => (target, None),
    };
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let path = percent_decode(path);
    if path.is_empty() {
        // `#anchor`: a heading of the linking file itself.
        return Ok(anchor.and_then(|a| {
            (!headings(text).contains(&a)).then(|| format!("no heading `{a}` in this file"))
        }));
    }
    let Some(rel) = join(file, &path) else {
        return Ok(Some("points outside the repository".into()));
    };
    let full = root.join(&rel);
    if !full.exists() {
        return Ok(Some(format!("{} does not exist", rel.display())));
    }
    let Some(anchor) = anchor else {
        return Ok(None);
    };
    if !full.is_file() || !is_markdown(&rel) {
        // Anchors of directories and of other files (`#L10`) are GitHub's.
        return Ok(None);
    }
    if !anchors.contains_key(&rel) {
        let t = fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))?;
        anchors.insert(rel.clone(), headings(&t));
    }
    Ok((!anchors[&rel].contains(&anchor))
        .then(|| format!("no heading `{anchor}` in {}", rel.display())))
}

/// `target` resolved against the directory of `file` (both relative to the
/// repository root), `..` and `.` folded; None if it leaves the root.
fn join(file: &Path, target: &str) -> Option<PathBuf> {
    let start = match target.strip_prefix('/') {
        Some(_) => PathBuf::new(),
        None => file.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let mut parts: Vec<Component<'_>> = Vec::new();
    let joined = start.join(target.trim_start_matches('/'));
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(_) => parts.push(c),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

fn is_markdown(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("md"))
}

/// Whether a target starts with a URI scheme (`https:`, `mailto:`, …).
fn has_scheme(target: &str) -> bool {
    let Some((scheme, _)) = target.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// `%XX` escapes decoded (invalid ones kept as written).
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A link found in a Markdown text.
#[derive(Debug, PartialEq, Eq)]
struct Link {
    /// 1-based line of the target.
    line: usize,
    target: String,
}

/// The lines of a Markdown text outside fenced code blocks, with their
/// 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<(char, usize)> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = &line[indent..];
        let marker = rest.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| rest.chars().take_while(|c| *c == m).count());
        match fence {
            Some((m, n)) => {
                if indent <= 3 && marker == Some(m) && run >= n && rest[run..].trim().is_empty() {
                    fence = None;
                }
            }
            None if indent <= 3 && run >= 3 => fence = marker.map(|m| (m, run)),
            None => out.push((i + 1, line)),
        }
    }
    out
}

/// `line` with its code spans removed (`` `x` `` and ``` ``x`` ```).
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let run = after.chars().take_while(|c| *c == '`').count();
        let ticks = &after[..run];
        let body = &after[run..];
        // The span ends at the next run of exactly as many backticks.
        let mut end = None;
        let mut from = 0;
        while let Some(p) = body[from..].find(ticks) {
            let at = from + p;
            let len = body[at..].chars().take_while(|c| *c == '`').count();
            if len == run {
                end = Some(at);
                break;
            }
            from = at + len;
        }
        match end {
            Some(at) => rest = &body[at + run..],
            None => {
                // No closing run: the backticks are literal.
                out.push_str(ticks);
                rest = body;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The links of a Markdown text: inline links and images, and reference
/// definitions.
fn links(text: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (n, raw) in prose_lines(text) {
        let line = without_code_spans(raw);
        if let Some(target) = reference_definition(&line) {
            out.push(Link { line: n, target });
            continue;
        }
        let mut from = 0;
        while let Some(p) = line[from..].find("](") {
            let start = from + p + 2;
            match inline_target(&line[start..]) {
                Some((target, used)) => {
                    out.push(Link { line: n, target });
                    from = start + used;
                }
                None => from = start,
            }
        }
    }
    out
}

/// The target of an inline link whose `(` came just before `s`, and how
/// many bytes of `s` it used; None if the parenthesis is not closed.
fn inline_target(s: &str) -> Option<(String, usize)> {
    let s_trim = s.trim_start();
    let lead = s.len() - s_trim.len();
    if let Some(inner) = s_trim.strip_prefix('<') {
        let end = inner.find('>')?;
        let close = inner[end..].find(')')?;
        return Some((inner[..end].to_string(), lead + 1 + end + close + 1));
    }
    let mut depth = 0usize;
    let mut end = None;
    for (i, c) in s_trim.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => {
                end = Some(i);
                break;
            }
            ')' => depth -= 1,
            _ => {}
        }
    }
    let end = end?;
    let inside = s_trim[..end].trim();
    // An optional title follows the target after whitespace.
    let target = inside.split_whitespace().next().unwrap_or("");
    Some((target.to_string(), lead + end + 1))
}

/// The target of a reference definition (`[label]: target`), if `line` is
/// one.
fn reference_definition(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = line[indent..].strip_prefix('[')?;
    if rest.starts_with('^') {
        return None; // a footnote
    }
    let close = rest.find("]:")?;
    if close == 0 || rest[..close].contains('[') {
        return None;
    }
    let target = rest[close + 2..].split_whitespace().next()?;
    let target = target
        .strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(target);
    Some(target.to_string())
}

/// The anchors of a Markdown text's headings (ATX `# …` and setext), as
/// GitHub makes them, repeated headings numbered.
fn headings(text: &str) -> HashSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    let mut previous: Option<(usize, &str)> = None;
    for (n, line) in prose_lines(text) {
        let heading = atx_heading(line).or_else(|| {
            let (pn, prev) = previous?;
            let underline = line.trim();
            let is_underline = !underline.is_empty()
                && (underline.chars().all(|c| c == '=') || underline.chars().all(|c| c == '-'));
            (pn + 1 == n && is_underline && is_paragraph(prev)).then(|| prev.trim())
        });
        if let Some(h) = heading {
            let base = slug(h);
            let mut anchor = base.clone();
            while seen.contains_key(&anchor) {
                let count = seen.entry(base.clone()).or_insert(0);
                *count += 1;
                anchor = format!("{base}-{count}");
            }
            seen.insert(anchor.clone(), 0);
            anchors.insert(anchor);
            previous = None;
        } else {
            previous = Some((n, line));
        }
    }
    anchors
}

/// The text of an ATX heading (`## Title ##`), if `line` is one.
fn atx_heading(line: &str) -> Option<&str> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let body = &rest[level..];
    if !body.is_empty() && !body.starts_with([' ', '\t']) {
        return None;
    }
    // A closing run of `#`, if preceded by a space, is not part of the text.
    let body = body.trim();
    let trimmed = body.trim_end_matches('#');
    let body = if trimmed.is_empty() || trimmed.ends_with([' ', '\t']) {
        trimmed.trim_end()
    } else {
        body
    };
    Some(body)
}

/// Whether a line can be the text of a setext heading (not a list item,
/// table row, quote, HTML block or indented code).
fn is_paragraph(line: &str) -> bool {
    let t = line.trim_start();
    let indent = line.len() - t.len();
    !(t.is_empty()
        || indent > 3
        || t.starts_with(['|', '>', '<', '#', '*', '+'])
        || t.starts_with("- ")
        || t.starts_with(|c: char| c.is_ascii_digit()) && t.contains(". "))
}

/// GitHub's anchor for a heading: the rendered text (link targets dropped)
/// lowercased, every character but letters, digits, `-`, `_` and spaces
/// dropped, spaces turned into `-`.
pub fn slug(heading: &str) -> String {
    let text = link_texts(heading);
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// `text` with each `[label](target)` replaced by its label (images'
/// `!` included).
fn link_texts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find("](") {
        let (before, after) = rest.split_at(p);
        match inline_target(&after[2..]) {
            Some((_, used)) => {
                out.push_str(before);
                rest = &after[2 + used..];
            }
            None => {
                out.push_str(&rest[..p + 2]);
                rest = &after[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("xtask-links-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("temporary directory");
            TempDir(dir)
        }

        fn write(&self, rel: &str, text: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("directory");
            fs::write(path, text).expect("write");
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn slugs_are_githubs() {
        for (heading, want) in [
            ("The ParentIP rule", "the-parentip-rule"),
            ("Source addresses", "source-addresses"),
            (
                "On other kernels: `cargo xtask vm-test`",
                "on-other-kernels-cargo-xtask-vm-test",
            ),
            (
                "Beside RootlessKit (rootless Docker, nerdctl)",
                "beside-rootlesskit-rootless-docker-nerdctl",
            ),
            ("The `ebpf` cargo feature", "the-ebpf-cargo-feature"),
            (
                "The throttle's release (2026-11-29)",
                "the-throttles-release-2026-11-29",
            ),
            ("2026-11-29 10:09 UTC: UDP", "2026-11-29-1009-utc-udp"),
            ("IPv6 → IPv4", "ipv6--ipv4"),
            ("snake_case and hy-phen", "snake_case-and-hy-phen"),
            ("  Trimmed  ", "trimmed"),
            ("Größe und Maß", "größe-und-maß"),
            ("See [the API](api.md#access) now", "see-the-api-now"),
            ("What? Why! 100%", "what-why-100"),
        ] {
            assert_eq!(slug(heading), want, "{heading:?}");
        }
    }

    #[test]
    fn repeated_headings_are_numbered_and_code_is_not_a_heading() {
        let text = "# A\n\n## A\n\nText\n\n### A\n\n```sh\n# not a heading\n```\n\n\
                    Setext title\n============\n\n# a-1\n\n    # indented code\n";
        let got = headings(text);
        let want: HashSet<String> = ["a", "a-1", "a-2", "setext-title", "a-1-1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn atx_headings_lose_their_closing_hashes() {
        assert_eq!(atx_heading("## Title ##"), Some("Title"));
        assert_eq!(atx_heading("# C#"), Some("C#"));
        assert_eq!(atx_heading("#hashtag"), None);
        assert_eq!(atx_heading("####### seven"), None);
    }

    #[test]
    fn links_are_found_outside_code() {
        let text = "See [a](a.md) and ![chart](x.svg \"title\").\n\
                    `[not](a link)` and ``[nor](this)``\n\
                    ```\n[in](fence.md)\n```\n\
                    [multi\nline](b.md#x) [p](c(1).md)\n\
                    [ref]: docs/r.md\n\
                    [e](<with space.md>)\n";
        let got: Vec<(usize, String)> = links(text)
            .into_iter()
            .map(|l| (l.line, l.target))
            .collect();
        let want: Vec<(usize, String)> = [
            (1, "a.md"),
            (1, "x.svg"),
            (7, "b.md#x"),
            (7, "c(1).md"),
            (8, "docs/r.md"),
            (9, "with space.md"),
        ]
        .iter()
        .map(|(n, t)| (*n, t.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn targets_resolve_against_the_linking_file() {
        assert_eq!(
            join(Path::new("docs/a.md"), "../bench/r.md"),
            Some(PathBuf::from("bench/r.md"))
        );
        assert_eq!(
            join(Path::new("docs/a.md"), "/README.md"),
            Some(PathBuf::from("README.md"))
        );
        assert_eq!(
            join(Path::new("README.md"), "./docs/./x.md"),
            Some(PathBuf::from("docs/x.md"))
        );
        assert_eq!(join(Path::new("README.md"), "../outside.md"), None);
        assert!(has_scheme("https://example.com"));
        assert!(has_scheme("mailto:a@b"));
        assert!(!has_scheme("docs/a.md#x:y"));
        assert_eq!(percent_decode("with%20space.md"), "with space.md");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn dead_files_and_dead_anchors_are_reported_with_their_lines() {
        let dir = TempDir::new("dead");
        dir.write(
            "README.md",
            "# Top\n\
             [ok](docs/guide.md) [ok](docs/guide.md#the-second-part)\n\
             [dead file](docs/missing.md)\n\
             [dead anchor](docs/guide.md#no-such-part)\n\
             [self](#top) [web](https://example.com/x.md) [dir](docs/)\n\
             [self dead](#bottom)\n",
        );
        dir.write(
            "docs/guide.md",
            "# Guide\n\n## The second part\n\n[back](../README.md#top)\n\
             [up and out](../../elsewhere.md)\n",
        );
        let files = [PathBuf::from("README.md"), PathBuf::from("docs/guide.md")];
        let dead = check(&dir.0, &files).expect("check");
        let got: Vec<String> = dead.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "README.md:3: docs/missing.md: docs/missing.md does not exist",
                "README.md:4: docs/guide.md#no-such-part: no heading `no-such-part` in docs/guide.md",
                "README.md:6: #bottom: no heading `bottom` in this file",
                "docs/guide.md:6: ../../elsewhere.md: points outside the repository",
            ]
        );
    }

    #[test]
    fn without_git_the_doc_directories_are_walked() {
        let dir = TempDir::new("walk");
        dir.write("README.md", "# R\n");
        dir.write("docs/a.md", "# A\n");
        dir.write("contrib/systemd/notes.md", "# N\n");
        dir.write("docs/not-markdown.txt", "x\n");
        let mut found = Vec::new();
        for d in ["docs", "bench", "contrib"] {
            walk_markdown(&dir.0, Path::new(d), &mut found).expect("walk");
        }
        found.sort();
        assert_eq!(
            found,
            [
                PathBuf::from("contrib/systemd/notes.md"),
                PathBuf::from("docs/a.md")
            ]
        );
    }
}
