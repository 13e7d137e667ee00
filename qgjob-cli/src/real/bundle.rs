//! Safe unpacking of test bundles (`.tar.gz` archives of spec files and project config).
//!
//! A bundle comes from a user, so nothing in it may write outside the target directory:
//! absolute paths, `..` components, links of any kind pointing out of the tree, device
//! files and FIFOs are refused, as are archives whose entries or total size exceed a bound
//! (a gzip bomb stops at the bound, not at the disk's end). Nothing is ever written
//! through a link: every directory on an entry's path must be a real directory (made here
//! if missing), and an entry's own name is replaced, never followed, when it already
//! exists. Checking link targets as text cannot do that on its own: chained links that
//! each look harmless (`a/b/l -> ../..`, `esc -> a/b/l/../../..`) resolve out of the tree
//! together.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use thiserror::Error;

/// Size bounds for unpacking.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single file.
    pub max_entry_bytes: u64,
    /// Largest total of all files.
    pub max_total_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 64 << 20,
            max_total_bytes: 256 << 20,
            max_entries: 20_000,
        }
    }
}

/// Why a bundle was refused or could not be unpacked.
#[derive(Debug, Error)]
pub enum BundleError {
    /// Reading the archive or writing a file failed.
    #[error("cannot unpack the test bundle: {0}")]
    Io(#[from] std::io::Error),
    /// An entry's path is absolute or climbs out with `..`.
    #[error("the test bundle has an unsafe path: {0}")]
    UnsafePath(String),
    /// A link points outside the bundle.
    #[error("the test bundle has a link out of the bundle: {0}")]
    UnsafeLink(String),
    /// A device file, FIFO or other special entry.
    #[error("the test bundle has a special file: {0}")]
    SpecialFile(String),
    /// Too big or too many entries.
    #[error("the test bundle is too large: {0}")]
    TooLarge(String),
}

/// Checks that `p` is relative and never climbs above its root; returns it normalised
/// (without `.` components).
fn safe_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether a link placed at `at` (relative to the root) with target `target` stays inside
/// the root.
fn link_stays_inside(at: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = at.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

/// Unpacks the gzip-compressed tar `archive` into `dest` (created if missing), enforcing
/// `limits`. Returns the number of bytes written. On error `dest` may hold a partial tree;
/// callers unpack into a temporary directory and rename it on success.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<u64, BundleError> {
    let file = fs::File::open(archive)?;
    unpack_reader(file, dest, limits)
}

/// [`unpack`] from any reader of `.tar.gz` bytes.
pub fn unpack_reader<R: Read>(r: R, dest: &Path, limits: Limits) -> Result<u64, BundleError> {
    fs::create_dir_all(dest)?;
    // The tar reader takes long-name and PAX header entries into memory whole, before any
    // per-entry bound applies: bound the whole decompressed stream instead (the files'
    // bytes, plus a header block and some slack per entry). A stream cut short is a tar
    // error, not a partial success: the last entry comes out short or missing.
    let stream_cap = limits
        .max_total_bytes
        .saturating_add((limits.max_entries as u64).saturating_mul(4 * 512))
        .saturating_add(1 << 20);
    let mut ar = tar::Archive::new(GzDecoder::new(r).take(stream_cap));
    let mut total: u64 = 0;
    let mut count = 0usize;
    for entry in ar.entries()? {
        let mut entry = entry?;
        count += 1;
        if count > limits.max_entries {
            return Err(BundleError::TooLarge(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw = entry.path()?.into_owned();
        let shown = raw.display().to_string();
        let rel = safe_relative(&raw).ok_or_else(|| BundleError::UnsafePath(shown.clone()))?;
        if rel.as_os_str().is_empty() {
            continue; // the archive's "./" root
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                real_parent(dest, &rel, &shown)?;
                ensure_real_dir(&target, &shown)?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let size = entry.header().size()?;
                if size > limits.max_entry_bytes {
                    return Err(BundleError::TooLarge(format!(
                        "{shown} is {size} bytes (limit {})",
                        limits.max_entry_bytes
                    )));
                }
                real_parent(dest, &rel, &shown)?;
                // Never write through an existing link (a previous entry could have
                // planted one).
                replace(&target, &shown)?;
                let mut out = fs::File::create(&target)?;
                // The header's size can lie about what the gzip stream holds: bound the copy.
                let budget = limits
                    .max_entry_bytes
                    .min(limits.max_total_bytes.saturating_sub(total));
                let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut out)?;
                if n > budget {
                    return Err(BundleError::TooLarge(format!(
                        "more than {} bytes in total",
                        limits.max_total_bytes
                    )));
                }
                total += n;
                if let Ok(mode) = entry.header().mode() {
                    use std::os::unix::fs::PermissionsExt;
                    // Keep the executable bit, drop setuid/setgid/sticky and world-write.
                    let mode = (mode & 0o755) | 0o600;
                    fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
                }
            }
            T::Symlink => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| BundleError::UnsafeLink(shown.clone()))?
                    .into_owned();
                if !link_stays_inside(&rel, &link) {
                    return Err(BundleError::UnsafeLink(format!(
                        "{shown} -> {}",
                        link.display()
                    )));
                }
                real_parent(dest, &rel, &shown)?;
                if fs::symlink_metadata(&target).is_ok() {
                    return Err(BundleError::UnsafePath(format!("{shown} appears twice")));
                }
                std::os::unix::fs::symlink(&link, &target)?;
            }
            T::Link => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| BundleError::UnsafeLink(shown.clone()))?
                    .into_owned();
                let unsafe_link =
                    || BundleError::UnsafeLink(format!("{shown} -> {}", link.display()));
                let src_rel = safe_relative(&link).ok_or_else(unsafe_link)?;
                // A hard link is a copy of a regular file unpacked before it, reached
                // through real directories only.
                if !is_real_path(dest, &src_rel) {
                    return Err(unsafe_link());
                }
                let src = dest.join(&src_rel);
                let meta = fs::symlink_metadata(&src).map_err(|_| unsafe_link())?;
                if !meta.is_file() {
                    return Err(unsafe_link());
                }
                real_parent(dest, &rel, &shown)?;
                total += meta.len();
                if total > limits.max_total_bytes {
                    return Err(BundleError::TooLarge(format!(
                        "more than {} bytes in total",
                        limits.max_total_bytes
                    )));
                }
                if src == target {
                    continue;
                }
                replace(&target, &shown)?;
                fs::copy(&src, &target)?;
            }
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => {}
            _ => return Err(BundleError::SpecialFile(shown)),
        }
    }
    verify_links(&dest.canonicalize()?, dest)?;
    Ok(total)
}

/// Makes the directories the entry `rel` goes in under `dest`, one at a time, refusing a
/// path through anything but real directories (a link unpacked earlier, or a file).
fn real_parent(dest: &Path, rel: &Path, shown: &str) -> Result<(), BundleError> {
    let mut dir = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            dir.push(c);
            ensure_real_dir(&dir, shown)?;
        }
    }
    Ok(())
}

/// Makes `dir` unless it exists; refuses it when it exists as anything but a directory
/// (a link to a directory included).
fn ensure_real_dir(dir: &Path, shown: &str) -> Result<(), BundleError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => Err(BundleError::UnsafeLink(format!(
            "{shown} (its path goes through a link)"
        ))),
        Ok(_) => Err(BundleError::UnsafePath(format!(
            "{shown} (its path goes through a file)"
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(fs::create_dir(dir)?),
        Err(e) => Err(e.into()),
    }
}

/// Whether every directory on the path to `rel` under `dest` is a real directory.
fn is_real_path(dest: &Path, rel: &Path) -> bool {
    let mut dir = dest.to_path_buf();
    rel.parent().is_none_or(|parent| {
        parent.components().all(|c| {
            dir.push(c);
            fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir())
        })
    })
}

/// Removes whatever is at `path` (a file or a link, never followed), so the next write
/// creates a fresh file there.
fn replace(path: &Path, shown: &str) -> Result<(), BundleError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => Err(BundleError::UnsafePath(format!(
            "{shown} is both a directory and a file"
        ))),
        Ok(_) => Ok(fs::remove_file(path)?),
        Err(_) => Ok(()),
    }
}

/// Every link must resolve inside `root`: each was checked on its own, but a chain of
/// links (`a -> ..`, `b -> a/..`) can still climb out, and a dangling one could be filled
/// in later.
fn verify_links(root: &Path, dir: &Path) -> Result<(), BundleError> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let ft = entry.file_type()?;
        if ft.is_symlink() {
            let shown = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .display()
                .to_string();
            match path.canonicalize() {
                Ok(real) if real.starts_with(root) => {}
                _ => return Err(BundleError::UnsafeLink(shown)),
            }
        } else if ft.is_dir() {
            verify_links(root, &path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    /// Builds a tar.gz with raw headers, so malicious names can be written (the `tar`
    /// builder refuses some of them itself).
    fn archive(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            {
                // Write the name bytes directly: set_path refuses `..` and absolute paths.
                let gnu = h.as_gnu_mut().expect("gnu header");
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            }
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if let Some(l) = link {
                h.set_link_name(l).expect("link name");
            }
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    fn unpack_bytes(bytes: &[u8], limits: Limits) -> (tempfile::TempDir, Result<u64, BundleError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let r = unpack_reader(bytes, &dest, limits);
        (dir, r)
    }

    use tar::EntryType as T;

    #[test]
    fn unpacks_files_dirs_and_inner_links() {
        let bytes = archive(&[
            ("tests/", T::Directory, b"", None),
            ("tests/a.spec.js", T::Regular, b"test('a')", None),
            ("package.json", T::Regular, b"{}", None),
            ("tests/link.js", T::Symlink, b"", Some("a.spec.js")),
            ("copy.js", T::Link, b"", Some("tests/a.spec.js")),
        ]);
        let (dir, r) = unpack_bytes(&bytes, Limits::default());
        let n = r.expect("unpacks");
        let out = dir.path().join("out");
        assert_eq!(
            fs::read(out.join("tests/a.spec.js")).expect("file"),
            b"test('a')"
        );
        assert_eq!(
            fs::read(out.join("tests/link.js")).expect("via link"),
            b"test('a')"
        );
        assert_eq!(
            fs::read(out.join("copy.js")).expect("hard link copy"),
            b"test('a')"
        );
        assert_eq!(n, 9 + 2 + 9);
    }

    #[test]
    fn refuses_paths_out_of_the_tree() {
        for name in ["../evil.js", "tests/../../evil.js", "/etc/evil.js"] {
            let bytes = archive(&[(name, T::Regular, b"x", None)]);
            let (dir, r) = unpack_bytes(&bytes, Limits::default());
            assert!(
                matches!(r, Err(BundleError::UnsafePath(_))),
                "{name}: {r:?}"
            );
            assert!(!dir.path().join("evil.js").exists());
        }
    }

    #[test]
    fn refuses_links_out_of_the_tree() {
        for (at, to) in [
            ("escape", "../outside"),
            ("a/b/escape", "../../../outside"),
            ("abs", "/etc/passwd"),
        ] {
            let bytes = archive(&[(at, T::Symlink, b"", Some(to))]);
            let (_d, r) = unpack_bytes(&bytes, Limits::default());
            assert!(
                matches!(r, Err(BundleError::UnsafeLink(_))),
                "{at} -> {to}: {r:?}"
            );
        }
        let bytes = archive(&[("h", T::Link, b"", Some("/etc/passwd"))]);
        let (_d, r) = unpack_bytes(&bytes, Limits::default());
        assert!(matches!(r, Err(BundleError::UnsafeLink(_))), "{r:?}");
        // An inner link that stays inside is fine even when it goes up a level.
        let bytes = archive(&[
            ("a/x.js", T::Regular, b"1", None),
            ("a/b/up", T::Symlink, b"", Some("../x.js")),
        ]);
        let (_d, r) = unpack_bytes(&bytes, Limits::default());
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn refuses_writing_through_a_planted_directory_link() {
        let outside = tempfile::tempdir().expect("tempdir");
        // `dir` -> `.` stays inside, so a write through it lands inside too; but a link to
        // an absolute directory is refused before anything is written through it.
        let bytes = archive(&[
            (
                "d",
                T::Symlink,
                b"",
                Some(outside.path().to_str().expect("utf8")),
            ),
            ("d/evil.js", T::Regular, b"x", None),
        ]);
        let (_d, r) = unpack_bytes(&bytes, Limits::default());
        assert!(matches!(r, Err(BundleError::UnsafeLink(_))), "{r:?}");
        assert!(!outside.path().join("evil.js").exists());
    }

    /// Links that each stay inside on their own but climb out together, then `last`, an
    /// entry written through them: `<d dirs>/l1 -> ..` × d (the root) and
    /// `esc -> <d dirs>/l1/` + `..` × (d + 1) + `victim`, where `d` exceeds the root's
    /// depth below `/`, so `esc` resolves to `/victim`.
    fn chained_escape(
        victim: &Path,
        root_depth: usize,
        last: (&str, tar::EntryType, &[u8], Option<&str>),
    ) -> Vec<u8> {
        let d = root_depth + 1;
        let deep: Vec<String> = (0..d).map(|i| format!("a{i}")).collect();
        let deep = deep.join("/");
        let up = |n: usize| vec![".."; n].join("/");
        let l1 = format!("{deep}/l1");
        let root = up(d);
        let esc = format!("{l1}/{}/{}", up(d + 1), victim.to_str().expect("utf8"));
        archive(&[
            ("payload", T::Regular, b"OVERWRITTEN", None),
            (l1.as_str(), T::Symlink, b"", Some(root.as_str())),
            ("esc", T::Symlink, b"", Some(esc.as_str())),
            last,
        ])
    }

    #[test]
    fn chained_links_never_let_an_entry_write_outside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        // How deep `dest` is below `/`.
        let depth = dest.components().count() - 1;
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "original").expect("victim");
        let rel = |p: &Path| p.strip_prefix("/").expect("absolute").to_path_buf();
        for last in [
            ("esc", T::Link, &b""[..], Some("payload")),
            ("esc", T::Regular, &b"OVERWRITTEN"[..], None),
            ("esc/sub/", T::Directory, &b""[..], None),
        ] {
            let bytes = chained_escape(&rel(&victim), depth, last);
            let _ = std::fs::remove_dir_all(&dest);
            // Refused, or `esc` replaced by a file of the tree: either way not followed.
            let r = unpack_reader(&bytes[..], &dest, Limits::default());
            if r.is_ok() {
                assert!(dest.join("esc").is_file(), "{last:?}");
            }
            assert_eq!(
                std::fs::read_to_string(&victim).expect("victim"),
                "original",
                "{last:?} wrote outside"
            );
        }
        // A link to where nothing exists yet creates nothing there either.
        let fresh = dir.path().join("fresh.txt");
        let bytes = chained_escape(&rel(&fresh), depth, ("esc", T::Link, b"", Some("payload")));
        let _ = std::fs::remove_dir_all(&dest);
        let _ = unpack_reader(&bytes[..], &dest, Limits::default());
        assert!(!fresh.exists());
        let bytes = chained_escape(
            &rel(&dir.path().join("newdir")),
            depth,
            ("esc/sub/", T::Directory, b"", None),
        );
        let _ = std::fs::remove_dir_all(&dest);
        let _ = unpack_reader(&bytes[..], &dest, Limits::default());
        assert!(!dir.path().join("newdir").exists());
    }

    #[test]
    fn refuses_link_chains_and_dangling_links() {
        let bytes = archive(&[
            ("a/", T::Directory, b"", None),
            ("a/y", T::Symlink, b"", Some("..")),
            ("a/z", T::Symlink, b"", Some("y/../..")),
        ]);
        let (_d, r) = unpack_bytes(&bytes, Limits::default());
        assert!(matches!(r, Err(BundleError::UnsafeLink(_))), "{r:?}");
        let bytes = archive(&[("dangling", T::Symlink, b"", Some("later/x"))]);
        let (_d, r) = unpack_bytes(&bytes, Limits::default());
        assert!(matches!(r, Err(BundleError::UnsafeLink(_))), "{r:?}");
    }

    #[test]
    fn a_huge_extended_header_stops_at_the_stream_bound() {
        // A 64 MiB PAX header (the tar reader holds it in memory whole, before any
        // per-entry bound), then a small file: without a bound on the whole stream this
        // unpacks "fine" after the agent took the 64 MiB.
        let value_len: usize = 64 << 20;
        let body_len = value_len + " comment=\n".len();
        // A PAX record's length counts its own digits.
        let mut record_len = body_len + 1;
        while record_len.to_string().len() + body_len != record_len {
            record_len = record_len.to_string().len() + body_len;
        }
        let mut record = format!("{record_len} comment=").into_bytes();
        record.extend(std::iter::repeat_n(b'a', value_len));
        record.push(b'\n');
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        let mut h = tar::Header::new_ustar();
        h.set_path("pax").expect("path");
        h.set_entry_type(T::XHeader);
        h.set_size(record.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &record[..]).expect("append pax");
        let mut h = tar::Header::new_ustar();
        h.set_path("ok.txt").expect("path");
        h.set_size(2);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"ok"[..]).expect("append file");
        let bytes = b.into_inner().expect("tar").finish().expect("gz");
        let limits = Limits {
            max_entry_bytes: 1 << 20,
            max_total_bytes: 1 << 20,
            max_entries: 100,
        };
        let (_d, r) = unpack_bytes(&bytes, limits);
        assert!(r.is_err(), "{r:?}");
        // Within the bound, the same kind of header is fine.
        let (_d, r) = unpack_bytes(
            &bytes,
            Limits {
                max_total_bytes: 128 << 20,
                ..limits
            },
        );
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn refuses_special_files() {
        for kind in [T::Char, T::Block, T::Fifo] {
            let bytes = archive(&[("dev", kind, b"", None)]);
            let (_d, r) = unpack_bytes(&bytes, Limits::default());
            assert!(
                matches!(r, Err(BundleError::SpecialFile(_))),
                "{kind:?}: {r:?}"
            );
        }
    }

    #[test]
    fn enforces_size_and_count_limits() {
        let big = vec![b'x'; 1000];
        let limits = Limits {
            max_entry_bytes: 999,
            max_total_bytes: 10_000,
            max_entries: 10,
        };
        let (_d, r) = unpack_bytes(&archive(&[("big", T::Regular, &big, None)]), limits);
        assert!(matches!(r, Err(BundleError::TooLarge(_))), "{r:?}");

        let limits = Limits {
            max_entry_bytes: 1000,
            max_total_bytes: 1500,
            max_entries: 10,
        };
        let (_d, r) = unpack_bytes(
            &archive(&[("a", T::Regular, &big, None), ("b", T::Regular, &big, None)]),
            limits,
        );
        assert!(matches!(r, Err(BundleError::TooLarge(_))), "{r:?}");

        let many: Vec<(String, T, &[u8], Option<&str>)> = (0..5)
            .map(|i| (format!("f{i}"), T::Regular, &b"x"[..], None))
            .collect();
        let many: Vec<_> = many
            .iter()
            .map(|(n, k, d, l)| (n.as_str(), *k, *d, *l))
            .collect();
        let limits = Limits {
            max_entries: 4,
            ..Limits::default()
        };
        let (_d, r) = unpack_bytes(&archive(&many), limits);
        assert!(matches!(r, Err(BundleError::TooLarge(_))), "{r:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (_d, r) = unpack_bytes(b"not a gzip stream", Limits::default());
        assert!(matches!(r, Err(BundleError::Io(_))), "{r:?}");
    }
}
