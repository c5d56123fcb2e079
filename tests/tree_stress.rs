//! Tree-operation stress through a real mount: several threads create,
//! write, rename (across directories and over existing entries), link,
//! unlink, mkdir, rmdir, symlink and set extended attributes in a small
//! name space, so they collide often. The errors these collisions cause
//! (ENOENT, EEXIST, ENOTEMPTY, ...) are expected; any other error fails the
//! test. Afterwards the source tree and the mount must be identical: names,
//! types, modes, sizes, contents, symlink targets, link counts, which
//! entries are hard links of one another, and the user attributes.
//!
//! Reproducible per seed up to thread interleaving. The long run:
//! `TREE_SEED=<seed> TREE_OPS=<n> cargo test --test tree_stress --
//! --ignored tree_stress_long --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::attrs::{lgetxattr, llist_attrs, setxattr};
use common::{KIB, Mount, Rng, env_number, env_seeds, pattern};

/// Threads working on the tree at once.
const THREADS: u64 = 4;
/// Directories an entry may be in ("" is the run's top directory, twice
/// as likely); the nested ones exist only while their parents do. They
/// are made at the start, and come and go with the operations.
const DIRS: &[&str] = &["", "", "d0", "d1", "d0/d2", "d1/d3"];
/// Entry names, mostly used for files and mostly for directories. One
/// time in five an operation takes a name of the other kind, so a file
/// can take a directory's place and the other way round.
const FILE_NAMES: &[&str] = &["a", "b", "c", "e", "f"];
const DIR_NAMES: &[&str] = &["d0", "d1", "d2", "d3"];
/// Symlink targets: relative, dangling, looping, the own directory (none
/// leads outside the mount: setxattr follows them).
const TARGETS: &[&str] = &["a", "../b", "d0/c", "nowhere", "d2", "."];
/// Largest write.
const WRITE_MAX_BYTES: usize = 8 * KIB as usize;
/// Writes land below this offset.
const OFFSET_MAX_BYTES: usize = 16 * KIB as usize;

/// A random path (relative to the run's top directory), mostly of a
/// directory name when `dir_name`.
fn random_path(rng: &mut Rng, dir_name: bool) -> String {
    let dir = rng.pick(DIRS);
    let name = if dir_name == (rng.below(5) != 0) {
        rng.pick(DIR_NAMES)
    } else {
        rng.pick(FILE_NAMES)
    };
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether `errno` is an expected outcome of an operation racing with
/// the others in this name space. EPERM is expected only where `eperm`
/// (a hard link of a directory).
fn expected(errno: i32, eperm: bool) -> bool {
    matches!(
        errno,
        libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::ENOTDIR | libc::EISDIR | libc::ELOOP
    ) || (eperm && errno == libc::EPERM)
}

/// Per operation kind: how many succeeded, how many failed as expected.
type Counts = BTreeMap<String, (usize, usize)>;

/// Whether renaming `from` to `to` would move a directory below itself
/// (EINVAL): `to`'s parent, symlinks resolved, lies inside `from`. A
/// symlink in the path can make this so where the names do not show it.
fn moves_into_itself(from: &Path, to: &Path) -> bool {
    let (Ok(from), Some(Ok(parent))) = (from.canonicalize(), to.parent().map(Path::canonicalize))
    else {
        return false;
    };
    parent.starts_with(from)
}

/// One thread's run: `ops` random operations under `top`. `alone` says
/// no other thread changes the tree, so a rename's EINVAL can be judged
/// exactly beforehand; with others, a concurrent move can put the
/// destination below the source between any check and the call, so an
/// EINVAL from rename is then expected.
fn worker(top: &Path, seed: u64, ops: usize, alone: bool) -> Result<Counts, String> {
    let mut rng = Rng(seed);
    let mut done = Counts::new();
    let mut log: Vec<String> = Vec::new();
    for step in 0..ops {
        let op = rng.below(100);
        // mkdir, rmdir, readdir and one rename in four take directory names.
        let dir_name = (60..=76).contains(&op) || op >= 95 || (25..=28).contains(&op);
        let p = random_path(&mut rng, dir_name);
        let path = top.join(&p);
        let mut eperm = false;
        // For a rename: whether EINVAL is expected (a move into its own
        // subtree, through a symlink).
        let mut rename_einval = false;
        let (what, r): (String, io::Result<()>) = match op {
            0..=19 => {
                let len = rng.below(WRITE_MAX_BYTES + 1);
                let offset = rng.below(OFFSET_MAX_BYTES);
                let trunc = rng.below(4) == 0;
                let data = pattern(len, rng.next());
                let create = rng.below(2) == 0;
                (
                    format!(
                        "{} {p} {offset}+{len}{}",
                        if create { "create-write" } else { "write" },
                        if trunc { " trunc" } else { "" }
                    ),
                    OpenOptions::new()
                        .write(true)
                        .create(create)
                        .truncate(trunc)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .and_then(|f| f.write_all_at(&data, offset as u64)),
                )
            }
            20..=24 => (format!("read {p}"), fs::read(&path).map(|_| ())),
            25..=39 => {
                let mut q = random_path(&mut rng, dir_name);
                // A directory cannot move below itself (EINVAL): not a
                // race, so not generated.
                while q.starts_with(&format!("{p}/")) {
                    q = random_path(&mut rng, dir_name);
                }
                let to = top.join(&q);
                rename_einval = !alone || moves_into_itself(&path, &to);
                let r = fs::rename(&path, &to);
                (format!("rename {p} -> {q}"), r)
            }
            40..=49 => {
                let q = random_path(&mut rng, false);
                eperm = true;
                (
                    format!("link {p} -> {q}"),
                    fs::hard_link(&path, top.join(&q)),
                )
            }
            50..=59 => (format!("unlink {p}"), fs::remove_file(&path)),
            60..=69 => (format!("mkdir {p}"), fs::create_dir(&path)),
            70..=76 => (format!("rmdir {p}"), fs::remove_dir(&path)),
            77..=84 => {
                let target = rng.pick(TARGETS);
                (
                    format!("symlink {p} -> {target}"),
                    std::os::unix::fs::symlink(target, &path),
                )
            }
            85..=94 => {
                // Follows symlinks, as setfattr does; a user.* attribute
                // cannot be set on a symlink itself.
                let (name, value) = if rng.below(3) == 0 {
                    (
                        "user.throttle.bps_rd".to_string(),
                        format!("{}M", 1 + rng.below(8)),
                    )
                } else {
                    (
                        format!("user.t{}", rng.below(3)),
                        format!("v{}", rng.next()),
                    )
                };
                (
                    format!("setxattr {p} {name}={value}"),
                    setxattr(&path, &name, value.as_bytes()),
                )
            }
            _ => (
                format!("readdir {p}"),
                fs::read_dir(&path).and_then(|mut d| d.try_for_each(|e| e.map(|_| ()))),
            ),
        };
        let kind = what.split(' ').next().unwrap_or("").to_string();
        let counts = done.entry(kind).or_insert((0, 0));
        if r.is_ok() {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
        if let Err(e) = r {
            let errno = e.raw_os_error().unwrap_or(0);
            let einval_expected = rename_einval && errno == libc::EINVAL;
            if !(expected(errno, eperm) || einval_expected) {
                let tail = log.len().saturating_sub(20);
                return Err(format!(
                    "seed {seed:#x}, step {step}: {what}: unexpected error {e}\n\
                     this thread's last operations:\n  {}",
                    log[tail..].join("\n  ")
                ));
            }
            log.push(format!("#{step} {what}: {e}"));
        } else {
            log.push(format!("#{step} {what}"));
        }
    }
    Ok(done)
}

/// What is compared of one entry.
#[derive(Debug, PartialEq)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(PathBuf),
    Other(u32),
}

#[derive(Debug, PartialEq)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    /// The user.* attributes (llistxattr + lgetxattr).
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every entry below `root` by relative path, plus each entry's inode
/// number (compared only as a partition: which paths are one file).
fn walk(root: &Path) -> (BTreeMap<PathBuf, Entry>, BTreeMap<PathBuf, u64>) {
    let mut entries = BTreeMap::new();
    let mut inos = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let path = e.unwrap().path();
            let md = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let ft = md.file_type();
            let kind = if ft.is_file() {
                Kind::File(
                    fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
                )
            } else if ft.is_dir() {
                stack.push(path.clone());
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink(fs::read_link(&path).unwrap())
            } else {
                Kind::Other(md.mode() & libc::S_IFMT)
            };
            let xattrs = llist_attrs(&path)
                .into_iter()
                .filter(|n| n.starts_with("user."))
                .map(|n| {
                    let v = lgetxattr(&path, &n)
                        .unwrap_or_else(|e| panic!("getxattr {n} {}: {e}", path.display()));
                    (n, v)
                })
                .collect();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            inos.insert(rel.clone(), md.ino());
            entries.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    // A directory's size is its filesystem's business.
                    size: if ft.is_dir() { 0 } else { md.size() },
                    nlink: md.nlink(),
                    xattrs,
                },
            );
        }
    }
    (entries, inos)
}

/// The sets of paths that share an inode, as sorted path lists.
fn link_groups(inos: &BTreeMap<PathBuf, u64>) -> BTreeSet<Vec<PathBuf>> {
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (p, ino) in inos {
        by_ino.entry(*ino).or_default().push(p.clone());
    }
    by_ino.into_values().collect()
}

/// Asserts that the tree under the mount's `top` equals the source's.
fn assert_same_tree(m: &Mount, top: &str) {
    let (through, through_inos) = walk(&m.path(top));
    let (source, source_inos) = walk(&m.src_path(top));
    let names = |t: &BTreeMap<PathBuf, Entry>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&through),
        names(&source),
        "{top}: the mount lists other names than the source"
    );
    for (path, want) in &source {
        assert_eq!(
            &through[path],
            want,
            "{top}/{}: the mount (left) differs from the source (right)",
            path.display()
        );
    }
    assert_eq!(
        link_groups(&through_inos),
        link_groups(&source_inos),
        "{top}: hard links group differently through the mount"
    );
}

/// Runs `threads` workers for `ops` operations each from `seed` in a
/// fresh directory of `m`, then compares it with the source.
fn stress(m: &Mount, seed: u64, ops: usize, threads: u64) {
    let top = format!("t{seed:x}");
    fs::create_dir(m.path(&top)).unwrap();
    for d in DIRS.iter().filter(|d| !d.is_empty()) {
        let _ = fs::create_dir(m.path(&top).join(d));
    }
    let dir = Arc::new(m.path(&top));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dir = Arc::clone(&dir);
            let seed = seed.wrapping_mul(31).wrapping_add(t);
            std::thread::spawn(move || worker(&dir, seed, ops, threads == 1))
        })
        .collect();
    let mut errors = Vec::new();
    let mut total = Counts::new();
    for h in handles {
        match h.join().expect("worker panicked") {
            Ok(counts) => {
                for (kind, (ok, failed)) in counts {
                    let t = total.entry(kind).or_insert((0, 0));
                    t.0 += ok;
                    t.1 += failed;
                }
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "tree stress, seed {seed:#x} ({ops} ops per thread; replay: TREE_SEED={seed:#x} \
         TREE_OPS={ops} TREE_THREADS={threads}):\n{}",
        errors.join("\n")
    );
    eprintln!("seed {seed:#x}: (succeeded, failed as expected) per operation: {total:?}");
    // The name space is small enough that every kind of operation often
    // finds what it needs; one that never succeeds tested nothing.
    for (kind, (ok, _)) in &total {
        assert!(
            *ok > 0,
            "seed {seed:#x}: no {kind} ever succeeded: {total:?}"
        );
    }
    assert_same_tree(m, &top);
}

const SEEDS: &[u64] = &[0x7ee_0001, 0x7ee_0002, 0x7ee_0003];
const OPS_PER_THREAD: usize = 1000;

#[test]
fn tree_stress_unlimited() {
    let m = Mount::start_with(&[]);
    for &seed in SEEDS {
        stress(&m, seed, OPS_PER_THREAD, THREADS);
    }
}

/// The same with a mount-wide limit, so writes go through the scheduler,
/// on blocking workers.
#[test]
fn tree_stress_limited_blocking_workers() {
    let mut m = Mount::new();
    m.daemon_env = vec![("THROTTLEFS_NO_IO_URING".into(), "1".into())];
    m.start(&["--bps", "1G"]);
    for &seed in SEEDS {
        stress(&m, seed ^ 0x100, OPS_PER_THREAD, THREADS);
    }
}

/// One thread: the run replays exactly, and every rename's EINVAL is
/// judged beforehand.
#[test]
fn tree_stress_one_thread() {
    let m = Mount::start_with(&[]);
    for &seed in SEEDS {
        stress(&m, seed ^ 0x200, OPS_PER_THREAD, 1);
    }
}

/// The long run: TREE_SEED (default: 32 seeds from 1), TREE_OPS
/// operations per thread (default 5000), TREE_THREADS threads (default
/// THREADS).
#[test]
#[ignore]
fn tree_stress_long() {
    let seeds = env_seeds("TREE_SEED", 1..=32);
    let ops = env_number("TREE_OPS").map_or(5000, |n| n as usize);
    let threads = env_number("TREE_THREADS").unwrap_or(THREADS);
    let m = Mount::start_with(&[]);
    for seed in seeds {
        eprintln!("tree stress: seed {seed:#x}, {ops} operations per thread");
        stress(&m, seed, ops, threads);
    }
}
