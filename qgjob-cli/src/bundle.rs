//! Test bundles: the spec files of a submission (plus the project's AppWright config and
//! package manifest) packed into a deterministic `.tar.gz`, so equal content gives an equal
//! sha256 and agents can cache bundles by hash.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{CliError, Result};

/// Project files packed beside the specs when present at the project root.
const PROJECT_FILES: &[&str] = &[
    "appwright.config.ts",
    "appwright.config.js",
    "appwright.config.mjs",
    "appwright.config.cjs",
    "playwright.config.ts",
    "playwright.config.js",
    "package.json",
    "package-lock.json",
];

/// A packed bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The `.tar.gz` bytes.
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`, lower-case hex.
    pub sha256: String,
    /// The spec files, as paths relative to the project root with `/` separators, in the
    /// order the user gave them (each once).
    pub tests: Vec<String>,
    /// Every file in the archive, sorted.
    pub files: Vec<String>,
}

/// Whether a `--test` argument is a glob pattern.
pub fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Expands shell-style braces (`tests/**/*.spec.{js,ts}` → one pattern per alternative),
/// which the glob crate does not know; nested braces expand too. Unbalanced braces are left
/// as they are.
pub fn expand_braces(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('{') else {
        return vec![pattern.to_string()];
    };
    let mut depth = 0;
    let mut close = None;
    let mut commas = Vec::new();
    for (i, c) in pattern[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            ',' if depth == 1 => commas.push(open + i),
            _ => {}
        }
    }
    let Some(close) = close else {
        return vec![pattern.to_string()];
    };
    let (head, tail) = (&pattern[..open], &pattern[close + 1..]);
    let mut bounds = vec![open];
    bounds.extend(&commas);
    bounds.push(close);
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let alt = &pattern[w[0] + 1..w[1]];
        out.extend(expand_braces(&format!("{head}{alt}{tail}")));
    }
    out
}

/// Turns `path` (absolute or relative to `root`) into a clean relative path with `/`
/// separators; refuses anything outside `root`.
pub fn relative_to_root(root: &Path, path: &Path) -> Result<String> {
    let rel: PathBuf = if path.is_absolute() {
        let canon_root = root
            .canonicalize()
            .map_err(|e| CliError::io(format!("resolving {}", root.display()), e))?;
        let canon = path
            .canonicalize()
            .map_err(|e| CliError::io(format!("resolving {}", path.display()), e))?;
        canon
            .strip_prefix(&canon_root)
            .map_err(|_| {
                CliError::Usage(format!(
                    "test {} is outside the project directory {}",
                    path.display(),
                    root.display()
                ))
            })?
            .to_path_buf()
    } else {
        path.to_path_buf()
    };
    let mut parts: Vec<String> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => match p.to_str() {
                Some(p) => parts.push(p.to_string()),
                // A job's test path is a UTF-8 string: a lossy copy would name no file.
                None => {
                    return Err(CliError::Usage(format!(
                        "cannot submit {rel:?}: its name is not valid UTF-8, and a job's test \
                         path must be (rename the file)"
                    )))
                }
            },
            Component::CurDir => {}
            _ => {
                return Err(CliError::Usage(format!(
                    "test {} must be inside the project directory (no `..`)",
                    path.display()
                )))
            }
        }
    }
    if parts.is_empty() {
        return Err(CliError::Usage(format!("{} is not a file", path.display())));
    }
    Ok(parts.join("/"))
}

/// One path component of a `--test` glob.
enum Part {
    /// `**`: any number of folders, none included.
    AnyFolders,
    /// A name without glob characters, taken as it is.
    Literal(String),
    /// A pattern for one name (`*.spec.js`).
    Pattern(glob::Pattern),
}

/// The path components of `pattern` (one brace alternative of a `--test` glob) from where
/// the walk starts: `root` for a relative pattern, the file-system root for an absolute one.
fn glob_parts(root: &Path, pattern: &str) -> std::result::Result<(PathBuf, Vec<Part>), String> {
    // Refuses what the glob crate refuses (`a**`, an unclosed `[`), with its words.
    glob::Pattern::new(pattern).map_err(|e| e.to_string())?;
    let mut start = root.to_path_buf();
    let mut parts = Vec::new();
    for c in Path::new(pattern).components() {
        match c {
            Component::Prefix(_) | Component::RootDir => start.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => parts.push(Part::Literal("..".into())),
            Component::Normal(name) => {
                // `pattern` is a `str`, and so each of its components.
                let name = name.to_string_lossy();
                parts.push(if name == "**" {
                    Part::AnyFolders
                } else if name.contains(['*', '?', '[']) {
                    Part::Pattern(glob::Pattern::new(&name).map_err(|e| e.to_string())?)
                } else {
                    Part::Literal(name.into_owned())
                });
            }
        }
    }
    Ok((start, parts))
}

/// The entries of `dir`, none when it is not a folder. A folder that cannot be read is an
/// error: taking it as empty would leave its specs out of the run without a word.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, std::ffi::OsString)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let read_error = |e| CliError::input(format!("reading {}", dir.display()), e);
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(read_error)? {
        let e = e.map_err(read_error)?;
        out.push((e.path(), e.file_name()));
    }
    Ok(out)
}

/// Adds to `out` the files under `path` that `parts` match, as the glob crate would, except
/// that names that are not UTF-8 are matched too (by their lossy form), where the glob crate
/// skips them without a word: [`relative_to_root`] then refuses them by name instead of the
/// run silently lacking them. Folders that cannot be read are errors, as in [`entries`].
/// Symbolic links are followed, as the glob crate does, but `**` does not walk a folder again
/// beneath itself: `on_path` holds the folders `**` is walking on the way to `path`.
fn walk(
    path: &Path,
    parts: &[Part],
    out: &mut Vec<PathBuf>,
    on_path: &mut Vec<(FolderId, usize)>,
) -> Result<()> {
    let Some((first, rest)) = parts.split_first() else {
        if path.is_file() {
            out.push(path.to_path_buf());
        }
        return Ok(());
    };
    match first {
        Part::Literal(name) => {
            let next = path.join(name);
            if next.symlink_metadata().is_ok() {
                walk(&next, rest, out, on_path)?;
            }
        }
        Part::AnyFolders => {
            // `**` at the end matches folders only, which hold no test.
            if rest.iter().all(|p| matches!(p, Part::AnyFolders)) {
                return Ok(());
            }
            // A folder reached again beneath itself with the same rest of the pattern (a
            // link to an ancestor, `tests/loop -> ..`) would list the same files again under
            // a longer path, over and over until the path is too long to resolve, and with
            // two such links exponentially: it is being walked already, so it adds nothing.
            let pushed = match folder_id(path).map(|id| (id, parts.len())) {
                Some(here) if on_path.contains(&here) => return Ok(()),
                Some(here) => {
                    on_path.push(here);
                    true
                }
                None => false,
            };
            walk(path, rest, out, on_path)?;
            for (child, _) in entries(path)? {
                if child.is_dir() {
                    walk(&child, parts, out, on_path)?;
                }
            }
            if pushed {
                on_path.pop();
            }
        }
        Part::Pattern(pattern) => {
            for (child, name) in entries(path)? {
                if pattern.matches(&name.to_string_lossy()) {
                    walk(&child, rest, out, on_path)?;
                }
            }
        }
    }
    Ok(())
}

/// What a folder is, however it is reached (through links or not): its device and inode.
#[cfg(unix)]
type FolderId = (u64, u64);

/// What a folder is, however it is reached (through links or not): its canonical path.
#[cfg(not(unix))]
type FolderId = PathBuf;

/// The identity of the folder `dir` (following links); none when it is not a folder.
#[cfg(unix)]
fn folder_id(dir: &Path) -> Option<FolderId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    m.is_dir().then(|| (m.dev(), m.ino()))
}

/// The identity of the folder `dir` (following links); none when it is not a folder.
#[cfg(not(unix))]
fn folder_id(dir: &Path) -> Option<FolderId> {
    if dir.is_dir() {
        dir.canonicalize().ok()
    } else {
        None
    }
}

/// Whether a relative path (`/` separators) lies under a `node_modules` folder.
fn in_node_modules(rel: &str) -> bool {
    rel.split('/').any(|c| c == "node_modules")
}

/// Expands the `--test` arguments (paths or globs, relative to `root`) into relative file
/// paths, keeping the given order and dropping duplicates. Folders and globs skip anything
/// under `node_modules` (dependencies' own specs), as Playwright does, unless the argument
/// itself names `node_modules`.
pub fn expand_tests(root: &Path, args: &[String]) -> Result<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for arg in args {
        let mut found: Vec<String> = Vec::new();
        let keep = |rel: &str| {
            !in_node_modules(rel) || arg.split(['/', '\\']).any(|c| c == "node_modules")
        };
        // A file that exists under its literal name is that file, even when the name holds
        // glob characters (`tests/[smoke] login.spec.js`).
        let literal = root.join(arg).exists();
        if has_glob(arg) && !literal {
            for pattern in expand_braces(arg) {
                let (start, parts) = glob_parts(root, &pattern)
                    .map_err(|e| CliError::Usage(format!("invalid glob {arg:?}: {e}")))?;
                let mut paths = Vec::new();
                walk(&start, &parts, &mut paths, &mut Vec::new())?;
                for p in paths {
                    let rel = relative_to_root(root, &p)?;
                    if keep(&rel) {
                        found.push(rel);
                    }
                }
            }
            if found.is_empty() {
                return Err(CliError::Usage(format!("no test file matches {arg:?}")));
            }
            found.sort();
            found.dedup();
        } else {
            let p = Path::new(arg);
            let full = if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            };
            if full.is_dir() {
                // A folder means every spec file under it, as the test runner would take it;
                // its own name is a name, not a pattern (`tests/[smoke]`).
                let spec = glob::Pattern::new("*.spec.*")
                    .map_err(|e| CliError::Other(format!("the spec file pattern: {e}")))?;
                let mut paths = Vec::new();
                let parts = [Part::AnyFolders, Part::Pattern(spec)];
                walk(&full, &parts, &mut paths, &mut Vec::new())?;
                for p in paths {
                    let rel = relative_to_root(root, &p)?;
                    if keep(&rel) {
                        found.push(rel);
                    }
                }
                if found.is_empty() {
                    return Err(CliError::Usage(format!("no *.spec.* file under {arg}")));
                }
                found.sort();
            } else if !full.is_file() {
                return Err(CliError::Usage(format!(
                    "test file {arg} not found (paths are relative to {}; use --no-bundle to \
                     submit paths the agents already have)",
                    root.display()
                )));
            } else {
                found.push(relative_to_root(root, p)?);
            }
        }
        for f in found {
            if seen.insert(f.clone()) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// Packs `tests` (relative to `root`) and the project files found at `root`.
pub fn pack(root: &Path, tests: &[String]) -> Result<Bundle> {
    let mut files: BTreeSet<String> = tests.iter().cloned().collect();
    for f in PROJECT_FILES {
        if root.join(f).is_file() {
            files.insert((*f).to_string());
        }
    }
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in &files {
        let path = root.join(f);
        let data = std::fs::read(&path).map_err(|e| CliError::input(format!("reading {f}"), e))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, f, data.as_slice())
            .map_err(|e| CliError::io(format!("packing {f}"), e))?;
    }
    let gz = tar
        .into_inner()
        .map_err(|e| CliError::io("packing the test bundle", e))?;
    let mut bytes = gz
        .finish()
        .map_err(|e| CliError::io("compressing the test bundle", e))?;
    bytes.flush().ok();
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(Bundle {
        bytes,
        sha256,
        tests: tests.to_vec(),
        files: files.into_iter().collect(),
    })
}

/// sha256 of a byte slice as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn project() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("tests/auth")).unwrap();
        std::fs::write(
            d.path().join("tests/onboarding.spec.js"),
            "test('a', () => {});\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("tests/auth/login.spec.js"),
            "test('b', () => {});\n",
        )
        .unwrap();
        std::fs::write(d.path().join("tests/helper.js"), "// not a spec\n").unwrap();
        std::fs::write(d.path().join("package.json"), "{}\n").unwrap();
        d
    }

    #[test]
    fn braces_expand_like_a_shell() {
        assert_eq!(
            expand_braces("tests/**/*.spec.{js,ts}"),
            vec!["tests/**/*.spec.js", "tests/**/*.spec.ts"]
        );
        assert_eq!(expand_braces("{a,b{1,2}}/x"), vec!["a/x", "b1/x", "b2/x"]);
        assert_eq!(expand_braces("no{brace"), vec!["no{brace"]);
        assert_eq!(expand_braces("plain"), vec!["plain"]);
    }

    #[test]
    fn expands_globs_and_paths_in_order_without_duplicates() {
        let d = project();
        let got = expand_tests(
            d.path(),
            &[
                "tests/onboarding.spec.js".into(),
                "tests/**/*.spec.js".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            got,
            vec!["tests/onboarding.spec.js", "tests/auth/login.spec.js"]
        );
        assert!(expand_tests(d.path(), &["nope/*.spec.js".into()]).is_err());
        assert!(expand_tests(d.path(), &["missing.spec.js".into()]).is_err());
        assert!(expand_tests(d.path(), &["../x.spec.js".into()]).is_err());
        // A folder stands for its spec files (helpers excluded).
        assert_eq!(
            expand_tests(d.path(), &["tests".into()]).unwrap(),
            vec!["tests/auth/login.spec.js", "tests/onboarding.spec.js"]
        );
        // A file named with glob characters is itself, not a pattern.
        std::fs::write(d.path().join("tests/[smoke] a.spec.js"), "").unwrap();
        assert_eq!(
            expand_tests(d.path(), &["tests/[smoke] a.spec.js".into()]).unwrap(),
            vec!["tests/[smoke] a.spec.js"]
        );
    }

    #[test]
    fn folders_and_globs_skip_node_modules() {
        let d = project();
        for f in [
            "node_modules/dep/test/lib.spec.js",
            "tests/node_modules/x/y.spec.js",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        let specs = vec!["tests/auth/login.spec.js", "tests/onboarding.spec.js"];
        assert_eq!(expand_tests(d.path(), &[".".into()]).unwrap(), specs);
        assert_eq!(expand_tests(d.path(), &["tests".into()]).unwrap(), specs);
        assert_eq!(
            expand_tests(d.path(), &["**/*.spec.js".into()]).unwrap(),
            specs
        );
        // Named explicitly, it is taken as asked.
        assert_eq!(
            expand_tests(d.path(), &["node_modules/dep/test/lib.spec.js".into()]).unwrap(),
            vec!["node_modules/dep/test/lib.spec.js"]
        );
        assert_eq!(
            expand_tests(d.path(), &["node_modules/dep".into()]).unwrap(),
            vec!["node_modules/dep/test/lib.spec.js"]
        );
        assert_eq!(
            expand_tests(d.path(), &["node_modules/**/*.spec.js".into()]).unwrap(),
            vec!["node_modules/dep/test/lib.spec.js"]
        );
    }

    /// A job's test path is a UTF-8 string: a spec whose name is not UTF-8 is refused by
    /// name wherever a folder or glob takes it in (the glob crate skips such names without
    /// a word, which made a run without it).
    #[cfg(target_os = "linux")]
    #[test]
    fn names_that_are_not_utf8_are_refused_not_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let d = project();
        let odd = std::ffi::OsStr::from_bytes(b"\xfe.spec.js");
        std::fs::write(d.path().join("tests/auth").join(odd), "").unwrap();
        for arg in [
            "tests",
            "tests/auth",
            "tests/**/*.spec.js",
            "tests/auth/*",
            "tests/*/?.spec.js",
        ] {
            let e = expand_tests(d.path(), &[arg.into()]).unwrap_err();
            assert!(matches!(e, CliError::Usage(_)), "{arg}: {e:?}");
            assert_eq!(
                e.to_string(),
                r#"cannot submit "tests/auth/\xFE.spec.js": its name is not valid UTF-8, and a job's test path must be (rename the file)"#,
                "{arg}"
            );
        }
        // Arguments that do not take it in are unaffected.
        assert_eq!(
            expand_tests(d.path(), &["tests/*.spec.js".into()]).unwrap(),
            vec!["tests/onboarding.spec.js"]
        );
        // A folder whose own name is not UTF-8 too.
        let d = project();
        let dir = d
            .path()
            .join("tests")
            .join(std::ffi::OsStr::from_bytes(b"\xfe"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.spec.js"), "").unwrap();
        let e = expand_tests(d.path(), &["tests".into()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(r#"cannot submit "tests/\xFE/a.spec.js": "#),
            "{e}"
        );
    }

    /// A folder is its spec files, whatever characters its name holds: `tests/[smoke]` is
    /// not a pattern matching `tests/s`.
    #[test]
    fn a_folder_named_with_glob_characters_is_that_folder() {
        let d = project();
        std::fs::create_dir_all(d.path().join("tests/[smoke]")).unwrap();
        std::fs::create_dir_all(d.path().join("tests/s")).unwrap();
        std::fs::write(d.path().join("tests/[smoke]/a.spec.js"), "").unwrap();
        std::fs::write(d.path().join("tests/s/b.spec.js"), "").unwrap();
        assert_eq!(
            expand_tests(d.path(), &["tests/[smoke]".into()]).unwrap(),
            vec!["tests/[smoke]/a.spec.js"]
        );
    }

    /// Links to folders are followed, but a link back to a folder being walked
    /// (`tests/loop -> ..`) adds nothing: the walk ends at once and finds each spec once,
    /// where it used to walk the folder again under ever longer paths (`tests/loop/tests/…`)
    /// until they were too long to resolve, and with two such links, practically for ever.
    #[cfg(unix)]
    #[test]
    fn links_back_to_a_folder_being_walked_add_nothing() {
        use std::os::unix::fs::symlink;
        let d = project();
        symlink("..", d.path().join("tests/loop")).unwrap();
        let spec = glob::Pattern::new("*.spec.*").unwrap();
        let mut paths = Vec::new();
        let parts = [Part::AnyFolders, Part::Pattern(spec)];
        walk(&d.path().join("tests"), &parts, &mut paths, &mut Vec::new()).unwrap();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                d.path().join("tests/auth/login.spec.js"),
                d.path().join("tests/onboarding.spec.js"),
            ]
        );

        // Two links to ancestors, and a linked folder that is no ancestor (walked as any).
        symlink("../..", d.path().join("tests/auth/up")).unwrap();
        std::fs::create_dir_all(d.path().join("shared")).unwrap();
        std::fs::write(d.path().join("shared/common.spec.js"), "").unwrap();
        symlink("../shared", d.path().join("tests/shared")).unwrap();
        let root = d.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got: Vec<_> = ["tests", "tests/**/*.spec.js"]
                .into_iter()
                .map(|arg| expand_tests(&root, &[arg.into()]).map_err(|e| e.to_string()))
                .collect();
            let _ = tx.send(got);
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the walk ends");
        let specs: Vec<String> = [
            "shared/common.spec.js",
            "tests/auth/login.spec.js",
            "tests/onboarding.spec.js",
        ]
        .map(String::from)
        .into();
        assert_eq!(got, vec![Ok(specs.clone()), Ok(specs)]);
    }

    #[test]
    fn bundles_are_deterministic_and_hold_the_project_files() {
        let d = project();
        let tests = vec!["tests/onboarding.spec.js".to_string()];
        let a = pack(d.path(), &tests).unwrap();
        // Touch the file (new mtime, same content): the hash must not change.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(
            d.path().join("tests/onboarding.spec.js"),
            "test('a', () => {});\n",
        )
        .unwrap();
        let b = pack(d.path(), &tests).unwrap();
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.sha256, sha256_hex(&a.bytes));
        assert_eq!(a.files, vec!["package.json", "tests/onboarding.spec.js"]);

        let mut names = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(a.bytes.as_slice()));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            if name.ends_with(".spec.js") {
                assert_eq!(s, "test('a', () => {});\n");
            }
            names.push(name);
        }
        assert_eq!(names, vec!["package.json", "tests/onboarding.spec.js"]);

        std::fs::write(d.path().join("tests/onboarding.spec.js"), "changed\n").unwrap();
        let c = pack(d.path(), &tests).unwrap();
        assert_ne!(a.sha256, c.sha256);
    }
}
