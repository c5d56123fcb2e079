//! POSIX ACLs through the mount (`-o allow_other`) must be enforced as on
//! the plain source filesystem, not just stored. Each test does the same
//! thing on `ref/` in the source directory and on `dut/` through the mount,
//! as nobody where access is checked, and compares:
//!
//! - a deny entry `u:nobody:---` on a 0644 file refuses nobody's read;
//! - a grant entry `u:nobody:rw` on a 0600 file allows nobody's read/write;
//! - a default ACL on a directory is inherited by files and directories
//!   made in it (the umask is then ignored); without one the umask applies;
//! - chmod after setfacl updates the mask.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use common::{Mount, chmod, describe, run, run_unchecked};

/// A mount with `-o allow_other` whose source holds `ref/` (used directly)
/// and `dut/` (used through the mount), opened up so nobody reaches both.
fn mount_pair() -> Mount {
    common::mount_ref_dut(|dir| chmod(dir, 0o777), &[])
}

/// `name` on the reference side (source) and on the side under test
/// (through the mount).
fn pair(m: &Mount, name: &str) -> [PathBuf; 2] {
    [
        m.src_path(&format!("ref/{name}")),
        m.path(&format!("dut/{name}")),
    ]
}

/// Runs the shell `script` with `$1` = `target` as nobody (or root);
/// returns whether it succeeded and its stdout.
fn sh(nobody: bool, script: &str, target: &Path) -> (bool, String) {
    let out = common::sh_on(nobody, script, target);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `script` on both sides, asserts both give the same result and
/// returns it.
fn same(m: &Mount, nobody: bool, script: &str, name: &str) -> (bool, String) {
    let [r, d] = pair(m, name);
    let want = sh(nobody, script, &r);
    let got = sh(nobody, script, &d);
    assert_eq!(
        got, want,
        "`{script}` on {name}: through the mount vs source"
    );
    want
}

fn setfacl(m: &Mount, args: &[&str], name: &str) {
    for p in pair(m, name) {
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.push(p.as_os_str());
        run("setfacl", &all);
    }
}

/// `getfacl -cp` of `name` (no header, absolute names), equal on both
/// sides.
fn getfacl(m: &Mount, name: &str) -> String {
    let [r, d] = pair(m, name);
    let text = |p: &Path| {
        let args = [OsStr::new("-cp"), p.as_os_str()];
        let out = run_unchecked("getfacl", &args);
        assert!(out.status.success(), "{}", describe("getfacl", &args, &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let want = text(&r);
    assert_eq!(
        text(&d),
        want,
        "getfacl {name}: through the mount vs source"
    );
    want
}

fn make_file(m: &Mount, name: &str, mode: u32) {
    for p in pair(m, name) {
        fs::write(&p, b"secret\n").unwrap();
        chmod(&p, mode);
    }
}

const READ: &str = "cat \"$1\"";
const WRITE: &str = "echo more >> \"$1\"";

#[test]
fn deny_entry_refuses_read() {
    let m = mount_pair();
    make_file(&m, "f", 0o644);
    assert_eq!(same(&m, true, READ, "f"), (true, "secret\n".into()));
    setfacl(&m, &["-m", "u:nobody:---"], "f");
    assert_eq!(same(&m, true, READ, "f"), (false, String::new()));
    assert!(getfacl(&m, "f").contains("user:nobody:---"));
}

#[test]
fn grant_entry_allows_read_and_write() {
    let m = mount_pair();
    make_file(&m, "f", 0o600);
    assert_eq!(same(&m, true, READ, "f"), (false, String::new()));
    assert!(!same(&m, true, WRITE, "f").0);
    setfacl(&m, &["-m", "u:nobody:rw"], "f");
    assert_eq!(same(&m, true, READ, "f"), (true, "secret\n".into()));
    assert!(same(&m, true, WRITE, "f").0);
    assert_eq!(same(&m, true, READ, "f"), (true, "secret\nmore\n".into()));
}

#[test]
fn default_acl_is_inherited() {
    let m = mount_pair();
    for p in pair(&m, "d").into_iter().chain(pair(&m, "plain")) {
        fs::create_dir(&p).unwrap();
        chmod(&p, 0o777);
    }
    setfacl(&m, &["-d", "-m", "u:nobody:rwx,g::rwx,o::r-x"], "d");
    // With a default ACL the umask is ignored; without one it applies.
    let make =
        "umask 077 && echo x > \"$1/new\" && mkdir \"$1/sub\" && stat -c %a \"$1/new\" \"$1/sub\"";
    let (ok, modes) = same(&m, true, make, "d");
    assert!(ok);
    assert_eq!(modes, "664\n775\n");
    let acl = getfacl(&m, "d/new");
    assert!(acl.contains("user:nobody:rwx\t#effective:rw-"), "{acl}");
    let acl = getfacl(&m, "d/sub");
    assert!(acl.contains("default:user:nobody:rwx"), "{acl}");
    let (ok, modes) = same(&m, true, make, "plain");
    assert!(ok);
    assert_eq!(modes, "600\n700\n");
    getfacl(&m, "plain/new");
}

#[test]
fn chmod_updates_the_mask() {
    let m = mount_pair();
    make_file(&m, "f", 0o644);
    setfacl(&m, &["-m", "u:nobody:rw"], "f");
    assert!(same(&m, true, WRITE, "f").0);
    for p in pair(&m, "f") {
        chmod(&p, 0o640);
    }
    let acl = getfacl(&m, "f");
    assert!(acl.contains("mask::r--"), "{acl}");
    assert!(!same(&m, true, WRITE, "f").0);
    assert_eq!(same(&m, true, READ, "f"), (true, "secret\nmore\n".into()));
    // Removing the ACL leaves the mode bits alone in charge again.
    setfacl(&m, &["-b"], "f");
    assert_eq!(same(&m, true, READ, "f"), (false, String::new()));
    assert_eq!(
        same(&m, false, "stat -c %a \"$1\"", "f"),
        (true, "640\n".into())
    );
}
