//! `rqemu-fs` against raw FUSE requests that try to leave the shared directory, sent straight
//! to the daemon by `rqemu-vhost-driver`'s FUSE client (no guest kernel in the way: a Linux
//! guest resolves `..` and symlinks itself and never sends most of these). `LOOKUP ..` at the
//! root, names with `/`, symlinks pointing outside used as directories or opened, `RENAME` and
//! `LINK` across the root, forged node ids. Every attempt must fail or stay inside; the host
//! then checks that nothing outside the share was read, created, moved or changed.
//!
//! Needs root (the daemon confines itself with a mount namespace + pivot_root) and
//! `cargo build -p rqemu-fs`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use rqemu_e2e::fs::{spawn_rqemu_fs, FsDaemonOptions};
use rqemu_vhost_driver::fs::{FsError, FsOptions, FuseClient};

const S_IFMT: u32 = libc::S_IFMT;

/// Every file under `dir` (not following symlinks): path → (mode, size, mtime, content digest
/// for regular files).
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, u64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            let key = p.strip_prefix(dir).unwrap().display().to_string();
            out.insert(key, (m.mode(), m.len(), m.mtime(), content));
        }
    }
    out
}

/// Failed expectations, collected so that one run reports every request that got through
/// and what changed on the host.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    /// `r` must be a server error reply (any errno: the point is that it did not succeed).
    fn refused<T: std::fmt::Debug>(&mut self, what: &str, r: Result<T, FsError>) {
        match r {
            Err(e) if e.errno().is_some() => {}
            Err(e) => self.0.push(format!("{what}: not an error reply but {e}")),
            Ok(v) => self
                .0
                .push(format!("{what}: succeeded ({v:?}); it must be refused")),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }
}

#[test]
fn fs_raw_fuse_escape_attempts_change_nothing_outside() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "rqemu-fs needs root (mount namespace, pivot_root)");
    let work = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let out = outside.path();
    let shared = out.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let marker = format!("RQEMU-SECRET-{}", std::process::id());
    std::fs::write(out.join("secret"), &marker).unwrap();
    std::fs::write(out.join("victim"), b"victim content").unwrap();
    std::fs::create_dir(out.join("victim-dir")).unwrap();
    std::fs::write(shared.join("file.txt"), b"inside").unwrap();
    std::fs::create_dir(shared.join("sub")).unwrap();
    std::os::unix::fs::symlink(out, shared.join("out_abs")).unwrap();
    std::os::unix::fs::symlink("..", shared.join("out_rel")).unwrap();
    let outside_before = {
        let mut s = snapshot(out);
        s.retain(|k, _| !k.starts_with("shared"));
        s
    };
    let root_parent_before: Vec<_> = std::fs::read_dir("/")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let (mut daemon, _dev) = spawn_rqemu_fs(work.path(), &shared, &FsDaemonOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut c = FuseClient::connect_init(daemon.socket(), &FsOptions::default())
        .unwrap_or_else(|e| panic!("connecting to rqemu-fs: {e}\n{}", daemon.log()));
    c.timeout = Duration::from_secs(20);

    let share_ino = std::fs::metadata(&shared).unwrap().ino();
    let out_ino = std::fs::metadata(out).unwrap().ino();
    let mut f = Failures::default();
    let root = c.getattr(1).unwrap();
    assert_eq!(root.attr.ino, share_ino, "node 1 is the shared directory");

    // LOOKUP ".." (and ".") at the root: refused, or the root itself, never its parent.
    for name in ["..", "."] {
        match c.lookup(1, name) {
            Ok(e) => {
                f.check(e.attr.ino == share_ino, || {
                    format!(
                        "LOOKUP {name:?} at the root gave inode {} (outside dir: {out_ino})",
                        e.attr.ino
                    )
                });
                for n in ["secret", "victim", "shared"] {
                    f.refused(&format!("LOOKUP {n} under {name}"), c.lookup(e.nodeid, n));
                }
            }
            Err(e) => assert!(e.errno().is_some(), "LOOKUP {name:?}: {e}"),
        }
    }
    // From a subdirectory, ".." is the root, and ".." again is still the root.
    let sub = c.lookup(1, "sub").unwrap();
    if let Ok(up) = c.lookup(sub.nodeid, "..") {
        f.check(up.attr.ino == share_ino, || {
            "sub/.. is not the share".into()
        });
        if let Ok(up2) = c.lookup(up.nodeid, "..") {
            f.check(up2.attr.ino == share_ino, || {
                format!("sub/../.. left the share: inode {}", up2.attr.ino)
            });
            f.refused("LOOKUP secret in sub/../..", c.lookup(up2.nodeid, "secret"));
        }
    }
    // Names are single path components.
    for name in ["../secret", "../victim", "sub/../../secret", "/etc/passwd"] {
        f.refused(&format!("LOOKUP {name:?}"), c.lookup(1, name));
    }

    // Symlinks pointing out: they are links, not directories, and opening one does not
    // follow it out of the share.
    for link in ["out_abs", "out_rel"] {
        let e = c.lookup(1, link).unwrap();
        assert_eq!(e.attr.mode & S_IFMT, libc::S_IFLNK, "{link} is a symlink");
        f.refused(
            &format!("LOOKUP secret in {link}"),
            c.lookup(e.nodeid, "secret"),
        );
        f.refused(
            &format!("CREATE in {link}"),
            c.create(e.nodeid, "rqemu-esc-created", libc::O_RDWR as u32, 0o644),
        );
        f.refused(
            &format!("MKDIR in {link}"),
            c.mkdir(e.nodeid, "rqemu-esc-dir", 0o755),
        );
        f.refused(
            &format!("RENAME file.txt into {link}"),
            c.rename(1, "file.txt", e.nodeid, "rqemu-esc-moved", 0),
        );
    }
    let target = out.join("secret").display().to_string();
    let evil = c.symlink(1, "evil", &target).unwrap();
    assert_eq!(c.readlink(evil.nodeid).unwrap(), target.as_bytes());
    let evil_rel = c.symlink(1, "evil_rel", "../secret").unwrap();
    for (name, e) in [("evil", evil), ("evil_rel", evil_rel)] {
        match c.open(e.nodeid, libc::O_RDONLY as u32) {
            Ok(o) => {
                let data = c.read(e.nodeid, o.fh, 0, 4096).unwrap_or_default();
                f.check(!String::from_utf8_lossy(&data).contains(&marker), || {
                    format!("OPEN of symlink {name} read the file outside the share")
                });
            }
            Err(e) => assert!(e.errno().is_some(), "OPEN {name}: {e}"),
        }
        match c.open(e.nodeid, (libc::O_WRONLY | libc::O_TRUNC) as u32) {
            Ok(o) => {
                let _ = c.write(e.nodeid, o.fh, 0, b"overwritten");
            }
            Err(e) => assert!(e.errno().is_some(), "OPEN {name} for writing: {e}"),
        }
    }

    // Names with "/" or ".." in creating operations.
    f.refused("MKDIR ../x", c.mkdir(1, "../rqemu-esc-dir", 0o755));
    f.refused(
        "CREATE ../x",
        c.create(1, "../rqemu-esc-created", libc::O_RDWR as u32, 0o644),
    );
    f.refused("SYMLINK ../x", c.symlink(1, "../rqemu-esc-link", "/"));

    // RENAME and LINK across the root.
    f.refused(
        "RENAME file.txt to ../x",
        c.rename(1, "file.txt", 1, "../rqemu-esc-moved", 0),
    );
    f.refused(
        "RENAME ../victim in",
        c.rename(1, "../victim", 1, "stolen", 0),
    );
    f.refused(
        "RENAME .. of the root",
        c.rename(1, "..", 1, "rqemu-esc-parent", 0),
    );
    f.refused(
        "RENAME sub/.. (the root) into sub",
        c.rename(sub.nodeid, "..", sub.nodeid, "rqemu-esc-root", 0),
    );
    f.refused(
        "RENAME2 EXCHANGE file.txt with ../victim",
        c.rename(1, "file.txt", 1, "../victim", libc::RENAME_EXCHANGE),
    );
    f.refused(
        "RENAME2 EXCHANGE sub with ..",
        c.rename(1, "sub", 1, "..", libc::RENAME_EXCHANGE),
    );
    f.refused(
        "LINK the root into itself",
        c.link(1, 1, "rqemu-esc-rootlink"),
    );
    match c.lookup(1, "file.txt") {
        Ok(file) => f.refused("LINK to ../x", c.link(file.nodeid, 1, "../rqemu-esc-hl")),
        Err(e) => f.0.push(format!("file.txt is gone from the share: {e}")),
    }

    // Forged node ids.
    for node in [0, 0xdead_beef, u64::MAX] {
        f.refused(&format!("GETATTR of node {node:#x}"), c.getattr(node));
        f.refused(
            &format!("LOOKUP secret in node {node:#x}"),
            c.lookup(node, "secret"),
        );
    }

    // The daemon still serves, and the share holds what it should.
    f.check(c.statfs(1).is_ok(), || {
        "the daemon stopped answering".into()
    });
    assert!(daemon.is_running(), "rqemu-fs died; log:\n{}", daemon.log());
    drop(c);
    let st = daemon
        .terminate(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(st.success(), "rqemu-fs exited with {st}");

    // Nothing outside the share changed: same files, modes, sizes, mtimes and contents.
    let outside_after = {
        let mut s = snapshot(out);
        s.retain(|k, _| !k.starts_with("shared"));
        s
    };
    f.check(outside_after.keys().eq(outside_before.keys()), || {
        format!(
            "files outside the share: {:?}, were {:?}",
            outside_after.keys().collect::<Vec<_>>(),
            outside_before.keys().collect::<Vec<_>>()
        )
    });
    for (k, v) in &outside_before {
        f.check(outside_after.get(k) == Some(v), || {
            format!("{k} outside the share changed")
        });
    }
    let root_parent_after: Vec<_> = std::fs::read_dir("/")
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    f.check(root_parent_after == root_parent_before, || {
        format!("entries of / changed: {root_parent_after:?}")
    });
    let mut inside: Vec<String> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    inside.sort();
    f.check(
        inside == ["evil", "evil_rel", "file.txt", "out_abs", "out_rel", "sub"],
        || format!("entries of the share: {inside:?}"),
    );
    f.check(
        std::fs::read(shared.join("file.txt")).ok().as_deref() == Some(&b"inside"[..]),
        || "file.txt changed".into(),
    );
    assert!(
        f.0.is_empty(),
        "{} escape check(s) failed:\n{}",
        f.0.len(),
        f.0.join("\n")
    );
}
