//! Ownership and mode bits of objects changed or made by another user
//! (`-o allow_other`) must come out as on the plain filesystem, although the
//! daemon does the work as root. Each test runs the same operation as
//! nobody on the source directory and through the mount, then compares.
//!
//! - a write, truncate, fallocate or copy_file_range by nobody clears setuid, and setgid
//!   as the kernel would (group-executable, or the writer is not in the
//!   file's group), on an unthrottled and on a throttled file, and with
//!   `--passthrough`; by root (CAP_FSETID) it keeps them;
//! - chown(-1, -1) and fchown(-1, -1) by root clear setuid, and setgid when
//!   group-executable, with and without `--passthrough`;
//! - files, directories, symlinks and fifos made in a setgid directory get
//!   the directory's group, and new directories keep the setgid bit.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{chmod, run};

/// nobody's group: a file in it keeps setgid when nobody writes it, as
/// nobody is a member (ext4 keeps the bit then unless group-executable).
const NOGROUP_GID: u32 = 65534;
/// A group nobody is not in, for the setgid directory.
const OTHER_GID: u32 = 4242;

/// (uid, gid, mode with type bits) of `p` itself, not following a symlink.
fn owner_and_mode(p: &Path) -> (u32, u32, u32) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (md.uid(), md.gid(), md.mode())
}

/// The mode of `p` as `stat -c %a` asks for it: statx for STATX_MODE
/// alone, which the kernel answers from its attribute cache unless the
/// mode was invalidated (a full stat also asks for the times, which a
/// write invalidates).
fn mode_only(p: &Path) -> u32 {
    let path = common::attrs::cpath(p);
    // SAFETY: statx fills a zeroed, valid out-structure.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MODE,
            &mut stx,
        )
    };
    assert_eq!(
        r,
        0,
        "statx {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    u32::from(stx.stx_mode)
}

fn fmt((uid, gid, mode): (u32, u32, u32)) -> String {
    format!("{uid}, {gid}, {mode:o}")
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// Runs the shell `script` with `$1` = `target`, as nobody or (`root`) as
/// this process, asserting success.
fn sh_as(root: bool, script: &str, target: &Path) {
    let out = common::sh_on(!root, script, target);
    assert!(
        out.status.success(),
        "as {}: sh -c {script:?} {}: {}",
        if root { "root" } else { "nobody" },
        target.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nobody_sh(script: &str, target: &Path) {
    sh_as(false, script, target);
}

/// Runs `f` on a thread of its own with nobody's credentials (raw
/// syscalls change only the calling thread's, unlike the libc wrappers),
/// for system calls no shell tool makes on its own.
fn on_nobody_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: plain syscalls on this thread's credentials.
            unsafe {
                let none: *const libc::gid_t = std::ptr::null();
                assert_eq!(libc::syscall(libc::SYS_setgroups, 0, none), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
            }
            f()
        })
        .join()
        .expect("nobody thread")
    })
}

/// copy_file_range of the file's first bytes to a later offset of itself.
fn copy_within(root: bool, target: &Path) {
    let copy = || -> std::io::Result<()> {
        let f = fs::OpenOptions::new().read(true).write(true).open(target)?;
        let (mut off_in, mut off_out): (libc::loff_t, libc::loff_t) = (0, 4096);
        // SAFETY: valid descriptors and offset pointers.
        let n = unsafe {
            libc::copy_file_range(
                f.as_raw_fd(),
                &mut off_in,
                f.as_raw_fd(),
                &mut off_out,
                4,
                0,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let r = if root { copy() } else { on_nobody_thread(copy) };
    r.unwrap_or_else(|e| panic!("copy_file_range in {}: {e}", target.display()));
}

/// Files (name, mode, gid), all owned by root, that nobody may write.
const PRIVILEGED: [(&str, u32, u32); 5] = [
    ("suid-sgid-gx", 0o6777, 0),
    ("suid", 0o4777, 0),
    ("sgid-gx", 0o2777, 0),
    // Not group-executable: cleared as nobody is not in group root...
    ("sgid-not-member", 0o2767, 0),
    // ...and kept for a member of the file's group.
    ("sgid-member", 0o2767, NOGROUP_GID),
];

/// Modifications, as shell lines on `$1` ("" for `copy_within`).
const OPS: [(&str, &str); 5] = [
    ("copy_file_range", ""),
    ("append", "printf x >> \"$1\""),
    (
        "dd",
        "dd if=/dev/zero of=\"$1\" bs=4096 count=1 conv=notrunc status=none",
    ),
    ("truncate", "truncate -s 100 \"$1\""),
    ("fallocate", "fallocate -l 8192 \"$1\""),
];

/// How `dut/FILE` (mode `was` before) differs from `ref/FILE` after the
/// same operation: on the source under the mount, through the mount, or
/// in its mode alone read right after, before a full stat refreshes the
/// kernel's cache. `None` when they agree.
fn mode_difference(m: &common::Mount, file: &str, was: u32) -> Option<String> {
    let quick = mode_only(&m.path(&format!("dut/{file}")));
    let want = owner_and_mode(&m.src_path(&format!("ref/{file}")));
    let got = owner_and_mode(&m.src_path(&format!("dut/{file}")));
    let seen = owner_and_mode(&m.path(&format!("dut/{file}")));
    (got != want || seen != want || quick != want.2).then(|| {
        format!(
            "{file} (was {was:o}): plain {}, source under the mount {}, \
             seen through the mount {}, its mode alone at once {quick:o}",
            fmt(want),
            fmt(got),
            fmt(seen)
        )
    })
}

/// Each operation, by nobody (or by root, who keeps the bits), leaves the
/// files' modes as on the source.
fn assert_modification_kills_privileges_like_the_source(root: bool, args: &[&str]) {
    let m = common::mount_ref_dut(
        |dir| {
            chmod(dir, 0o777);
            for (op, _) in OPS {
                for (name, mode, gid) in PRIVILEGED {
                    let f = dir.join(format!("{op}-{name}"));
                    fs::write(&f, b"data").unwrap();
                    chown(&f, 0, gid);
                    chmod(&f, mode);
                }
            }
        },
        args,
    );
    let mut diffs = Vec::new();
    for (op, script) in OPS {
        for (name, mode, _) in PRIVILEGED {
            let file = format!("{op}-{name}");
            for target in [
                m.src_path(&format!("ref/{file}")),
                m.path(&format!("dut/{file}")),
            ] {
                if script.is_empty() {
                    copy_within(root, &target);
                } else {
                    sh_as(root, script, &target);
                }
            }
            diffs.extend(mode_difference(&m, &file, mode));
        }
    }
    assert!(diffs.is_empty(), "modes differ:\n{}", diffs.join("\n"));
    // Control: on the plain filesystem nobody's write cleared the bits,
    // root's kept them.
    let plain = owner_and_mode(&m.src_path("ref/append-suid-sgid-gx")).2;
    let expected = if root { 0o6777 } else { 0o777 };
    assert_eq!(plain & 0o7777, expected, "plain filesystem reference");
}

#[test]
fn write_truncate_fallocate_by_another_user_clear_setuid_setgid() {
    assert_modification_kills_privileges_like_the_source(false, &[]);
}

#[test]
fn throttled_write_by_another_user_clears_setuid_setgid() {
    assert_modification_kills_privileges_like_the_source(false, &["--bps-wr", "10M"]);
}

#[test]
fn write_truncate_fallocate_by_root_keep_setuid_setgid() {
    assert_modification_kills_privileges_like_the_source(true, &["--bps-wr", "10M"]);
}

/// With `--passthrough` the kernel writes the unlimited files itself and
/// the daemon clears the bits on FUSE_HANDLE_KILLPRIV_V2's request.
#[test]
fn passthrough_write_by_another_user_clears_setuid_setgid() {
    assert_modification_kills_privileges_like_the_source(false, &["--passthrough"]);
}

#[test]
fn passthrough_write_by_root_keeps_setuid_setgid() {
    assert_modification_kills_privileges_like_the_source(true, &["--passthrough"]);
}

#[test]
fn objects_made_in_a_setgid_directory_take_its_group() {
    let m = common::mount_ref_dut(
        |dir| {
            chown(dir, 0, OTHER_GID);
            chmod(dir, 0o2777);
        },
        &[],
    );
    let script = "cd \"$1\" && umask 022 && : > file && mkdir dir && ln -s file link \
                  && mkfifo fifo && mkdir -m 0700 private && mkdir dir/sub";
    nobody_sh(script, &m.src_path("ref"));
    nobody_sh(script, &m.path("dut"));
    let mut diffs = Vec::new();
    for name in ["file", "dir", "link", "fifo", "private", "dir/sub"] {
        let want = owner_and_mode(&m.src_path(&format!("ref/{name}")));
        let got = owner_and_mode(&m.src_path(&format!("dut/{name}")));
        let seen = owner_and_mode(&m.path(&format!("dut/{name}")));
        if got != want || seen != want {
            diffs.push(format!(
                "{name} (uid, gid, mode): plain {}, source under the mount {}, seen through \
                 the mount {}",
                fmt(want),
                fmt(got),
                fmt(seen)
            ));
        }
    }
    assert!(diffs.is_empty(), "differ:\n{}", diffs.join("\n"));
    // Control: the reference took the directory's group and setgid.
    let (uid, gid, mode) = owner_and_mode(&m.src_path("ref/dir"));
    assert_eq!((uid, gid), (65534, OTHER_GID));
    assert_ne!(mode & 0o2000, 0, "no setgid on the reference directory");
}

#[test]
fn write_by_a_member_through_a_supplementary_group_keeps_setgid() {
    write_by_a_supplementary_member(&[], "printf x >> \"$1\"");
}

#[test]
fn passthrough_write_by_a_member_through_a_supplementary_group_keeps_setgid() {
    // Not O_APPEND, which is never opened in passthrough.
    write_by_a_supplementary_member(
        &["--passthrough"],
        "printf x | dd of=\"$1\" bs=1 seek=2 conv=notrunc status=none",
    );
}

/// `script` ($1: the file) run by nobody with a supplementary group that
/// is the file's, on the source and through a mount with `mount_args`.
fn write_by_a_supplementary_member(mount_args: &[&str], script: &str) {
    let m = common::mount_ref_dut(
        |dir| {
            chmod(dir, 0o777);
            let f = dir.join("f");
            fs::write(&f, b"data").unwrap();
            chown(&f, 0, OTHER_GID);
            chmod(&f, 0o2767);
        },
        mount_args,
    );
    let groups = format!("--groups={OTHER_GID}");
    for target in [m.src_path("ref/f"), m.path("dut/f")] {
        let args = [
            OsStr::new("--reuid=65534"),
            OsStr::new("--regid=65534"),
            OsStr::new(&groups),
            OsStr::new("--"),
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(script),
            OsStr::new("sh"),
            target.as_os_str(),
        ];
        run("setpriv", &args);
    }
    let want = owner_and_mode(&m.src_path("ref/f"));
    assert_eq!(want.2 & 0o7777, 0o2767, "plain filesystem reference");
    assert_eq!(fmt(owner_and_mode(&m.src_path("dut/f"))), fmt(want));
    assert_eq!(fmt(owner_and_mode(&m.path("dut/f"))), fmt(want));
}

/// chown(-1, -1) and fchown(-1, -1) by root change no id but clear setuid,
/// and setgid when group-executable, as on the source. With
/// FUSE_HANDLE_KILLPRIV_V2 (asked for with `--passthrough`) the kernel
/// leaves that to the daemon and sends a SETATTR of the change time alone.
fn assert_chown_to_no_change_kills_privileges_like_the_source(args: &[&str]) {
    let m = common::mount_ref_dut(
        |dir| {
            for (name, mode, gid) in PRIVILEGED {
                for how in ["path", "fd"] {
                    let f = dir.join(format!("{how}-{name}"));
                    fs::write(&f, b"data").unwrap();
                    chown(&f, 0, gid);
                    chmod(&f, mode);
                }
            }
        },
        args,
    );
    let mut diffs = Vec::new();
    for (name, mode, _) in PRIVILEGED {
        for how in ["path", "fd"] {
            let file = format!("{how}-{name}");
            for target in [
                m.src_path(&format!("ref/{file}")),
                m.path(&format!("dut/{file}")),
            ] {
                if how == "path" {
                    std::os::unix::fs::chown(&target, None, None).unwrap();
                } else {
                    let f = fs::File::open(&target).unwrap();
                    std::os::unix::fs::fchown(&f, None, None).unwrap();
                }
            }
            diffs.extend(mode_difference(&m, &file, mode));
        }
    }
    assert!(diffs.is_empty(), "modes differ:\n{}", diffs.join("\n"));
    // Control: on the plain filesystem root's chown cleared setuid.
    let plain = owner_and_mode(&m.src_path("ref/path-suid")).2;
    assert_eq!(plain & 0o7777, 0o777, "plain filesystem reference");
}

#[test]
fn chown_to_no_change_clears_setuid_like_the_source() {
    assert_chown_to_no_change_kills_privileges_like_the_source(&[]);
}

#[test]
fn passthrough_chown_to_no_change_clears_setuid_like_the_source() {
    assert_chown_to_no_change_kills_privileges_like_the_source(&["--passthrough"]);
}
