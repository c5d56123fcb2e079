//! Shared harness for the integration tests: a real throttlefs mount in a
//! temporary directory, torn down on drop (also when the test panics), and
//! helpers to run external tools with a timeout.

#![allow(dead_code)]

pub mod aio;
pub mod attrs;
pub mod faultfs;

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long a daemon may take to mount, and to exit after SIGTERM.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every external command runs under `timeout` so a hang fails the test
/// instead of blocking CI; generous because rate tests run in parallel.
pub const COMMAND_TIMEOUT_SECS: u32 = 120;

/// `THROTTLEFS_TEST_IO_URING=auto|on|off` in the tests' environment: every
/// mount the harness starts gets `-o io_uring=VALUE` (unless its arguments
/// choose the transport themselves), so that the same tests check both
/// transports; `.ci/run` runs the transport-dependent ones again with `on`.
pub const IO_URING_ENV: &str = "THROTTLEFS_TEST_IO_URING";

/// The arguments `IO_URING_ENV` adds to a mount's `args`.
pub fn transport_args(args: &[&str]) -> Vec<String> {
    let chosen = args
        .iter()
        .any(|a| a.contains("io_uring") || a.contains("io-uring"));
    match std::env::var(IO_URING_ENV) {
        Ok(v) if !v.is_empty() && !chosen => vec!["-o".into(), format!("io_uring={v}")],
        _ => Vec::new(),
    }
}

/// Whether the harness mounts with `-o io_uring=on` (`IO_URING_ENV`).
pub fn ring_mode() -> bool {
    std::env::var(IO_URING_ENV).is_ok_and(|v| v == "on")
}

/// With io_uring the daemon holds at most this many requests of the
/// callers on one CPU (its ring entries there, see src/mount.rs); more
/// wait in the kernel, where its queue does not count them.
pub const RING_ENTRIES_PER_CPU: usize = 128;

/// The errno of a request on a file still open after the daemon has gone:
/// ENOTCONN. With io_uring the kernel tears the rings down after the
/// process has exited, and a request that comes in that moment ends with
/// ECONNABORTED instead (queued for a ring entry), or ECANCELED (handed to
/// a ring entry whose thread had exited).
pub fn is_gone_errno(e: i32) -> bool {
    e == libc::ENOTCONN || (ring_mode() && matches!(e, libc::ECONNABORTED | libc::ECANCELED))
}

/// The kernel's switch for FUSE over io_uring: `Some(true)` when set,
/// `None` when the kernel has no such parameter.
pub fn uring_switch() -> Option<bool> {
    let text = fs::read_to_string("/sys/module/fuse/parameters/enable_uring").ok()?;
    Some(text.trim() == "Y")
}

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_throttlefs")
}

/// A temporary `src/` + `mnt/` pair and, once started, the throttlefs daemon
/// mounting `src` on `mnt`.
///
/// Typical use: `let m = Mount::new(); fs::write(m.src_path("f"), ..);
/// m.start(&["--bps-rd", "1M"]);`. Dropping it stops the daemon (SIGTERM,
/// then lazy unmount and SIGKILL if needed) and never leaves a mount behind.
pub struct Mount {
    dir: Option<TempDir>,
    root: PathBuf,
    src: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
    /// Exit status of the daemon once it has been reaped.
    status: Option<ExitStatus>,
    stderr_path: PathBuf,
    stdout_path: PathBuf,
    /// Extra environment of the daemon.
    pub daemon_env: Vec<(String, String)>,
    /// Run in the daemon's process before it execs (e.g. to install a
    /// seccomp filter that hides a kernel feature from it).
    pub daemon_pre_exec: Option<fn() -> std::io::Result<()>>,
}

impl Default for Mount {
    fn default() -> Self {
        Self::new()
    }
}

impl Mount {
    /// Creates the directories; nothing is mounted yet, so the test can put
    /// files into `src_path(..)` first.
    pub fn new() -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("throttlefs-test-")
            .tempdir()
            .expect("create temp dir");
        // Canonical, so it matches the mount point the kernel reports.
        let root = dir.path().canonicalize().expect("canonicalize temp dir");
        let src = root.join("src");
        let mnt = root.join("mnt");
        fs::create_dir(&src).expect("create src");
        fs::create_dir(&mnt).expect("create mnt");
        Mount {
            dir: Some(dir),
            stderr_path: root.join("daemon.stderr"),
            stdout_path: root.join("daemon.stdout"),
            root,
            src,
            mnt,
            child: None,
            status: None,
            daemon_env: Vec::new(),
            daemon_pre_exec: None,
        }
    }

    /// `Mount::new()` then `start(args)`, with no files prepared.
    pub fn start_with(args: &[&str]) -> Mount {
        let mut m = Mount::new();
        m.start(args);
        m
    }

    /// `Mount::new()`, `setup(src_dir)`, then `start(args)`.
    pub fn with_setup(setup: impl FnOnce(&Path), args: &[&str]) -> Mount {
        let mut m = Mount::new();
        setup(&m.src);
        m.start(args);
        m
    }

    /// A second daemon mounting `src` (another mount's source, whose daemon
    /// has exited) on a fresh mount point: `Mount::new()` then
    /// `start_from(src, args)`. Its own `src()` stays empty and unused.
    pub fn with_source(src: &Path, args: &[&str]) -> Mount {
        let mut m = Mount::new();
        m.start_from(src, args);
        m
    }

    /// Spawns `throttlefs ARGS SRC MNT` and waits until the mount is live.
    /// Panics (with the daemon's stderr) if it exits or does not mount
    /// within `MOUNT_TIMEOUT`.
    pub fn start(&mut self, args: &[&str]) {
        let src = self.src.clone();
        self.start_from(&src, args);
    }

    /// Like `start`, but mounts `src` (any directory, e.g. the source of an
    /// earlier mount) instead of this mount's own source directory.
    pub fn start_from(&mut self, src: &Path, args: &[&str]) {
        let mnt = self.mnt.clone();
        let extra = transport_args(args);
        self.spawn(
            extra
                .iter()
                .map(OsStr::new)
                .chain(args.iter().map(OsStr::new))
                .chain([src.as_os_str(), mnt.as_os_str()]),
        );
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        loop {
            if is_mounted(&self.mnt) {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "throttlefs {args:?} exited with {status} before mounting\n{}",
                    self.daemon_output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "throttlefs {args:?} did not mount {} within {MOUNT_TIMEOUT:?}\n{}",
                    self.mnt.display(),
                    self.daemon_output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns the binary in the foreground (`-f`, so the harness owns the
    /// daemon process) with `args` (no source/mountpoint added), stdout and
    /// stderr going to files in the temp dir.
    pub fn spawn<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        assert!(self.child.is_none(), "daemon already started");
        let stderr = File::create(&self.stderr_path).expect("create stderr file");
        let stdout = File::create(&self.stdout_path).expect("create stdout file");
        let mut cmd = Command::new(binary());
        cmd.arg("-f")
            .args(args)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if let Some(f) = self.daemon_pre_exec {
            use std::os::unix::process::CommandExt;
            // SAFETY: the hooks the tests pass make plain syscalls only.
            unsafe { cmd.pre_exec(f) };
        }
        let child = cmd.spawn().expect("spawn throttlefs");
        self.child = Some(child);
        self.status = None;
    }

    /// Runs the binary with `args` (nothing added) and waits for it to exit
    /// by itself within `timeout`; `None` if it did not (it is then stopped
    /// by `Drop`). For command-line tests that expect an early exit.
    pub fn run_to_exit(&mut self, args: &[&str], timeout: Duration) -> Option<ExitStatus> {
        self.spawn(args);
        self.wait_exit(timeout)
    }

    pub fn src(&self) -> &Path {
        &self.src
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    /// The temp dir holding `src/` and `mnt/`; a place for scratch files
    /// outside the mount.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `name` inside the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// `name` inside the source directory (bypassing throttlefs).
    pub fn src_path(&self, name: &str) -> PathBuf {
        self.src.join(name)
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("daemon not started").id() as libc::pid_t
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mnt)
    }

    /// Sends `signal` to the daemon (if it has not been reaped yet).
    pub fn signal(&self, signal: libc::c_int) {
        if let (None, Some(child)) = (self.status, &self.child) {
            // SAFETY: plain kill(2) on our own child's pid, which is not
            // reaped yet (status is None), so the pid cannot be reused.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Reaps the daemon if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let (None, Some(child)) = (self.status, &mut self.child) {
            self.status = child.try_wait().expect("try_wait on daemon");
        }
        self.status
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait up to `EXIT_TIMEOUT`; panics with the daemon's
    /// output if it does not exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_exit(EXIT_TIMEOUT) {
            Some(status) => status,
            None => panic!(
                "throttlefs did not exit within {EXIT_TIMEOUT:?} after SIGTERM\n{}",
                self.daemon_output()
            ),
        }
    }

    /// What the daemon printed so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn daemon_output(&self) -> String {
        format!(
            "--- throttlefs stderr ---\n{}--- throttlefs stdout ---\n{}-------------------------",
            self.stderr(),
            self.stdout()
        )
    }

    fn force_unmount(&self) {
        for (cmd, args) in [
            ("fusermount3", &["-u", "-z"][..]),
            ("umount", &["-l"][..]),
            ("umount", &["-l", "-f"][..]),
        ] {
            if !is_mounted(&self.mnt) {
                return;
            }
            let _ = Command::new(cmd)
                .args(args)
                .arg(&self.mnt)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("{}", self.daemon_output());
        }
        if self.child.is_some() && self.try_wait().is_none() {
            self.signal(libc::SIGTERM);
            let _ = self.wait_exit(EXIT_TIMEOUT);
        }
        self.force_unmount();
        if self.try_wait().is_none()
            && let Some(child) = &mut self.child
        {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
        // Killing the daemon can leave a dead connection mounted.
        self.force_unmount();
        if is_mounted(&self.mnt) {
            // Removing the tree would walk into a mount that may hang: keep
            // the directory rather than risk it.
            eprintln!(
                "warning: could not unmount {}; leaving it",
                self.mnt.display()
            );
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}

/// Mount points listed in this thread's mountinfo (a test may have moved
/// its thread into a mount namespace of its own, see tests/mount_cmd.rs).
pub fn mount_points() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/thread-self/mountinfo")
        .expect("read /proc/thread-self/mountinfo");
    info.lines()
        .filter_map(throttlefs::options::mountinfo_entry)
        .map(|(point, _)| point)
        .collect()
}

/// splitmix64: the random tests' own reproducible randomness (a run is
/// replayed from its seed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// One of `items` (not empty), uniformly.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// The number in environment variable `name` (decimal, or hex after `0x`),
/// `None` when it is unset; panics naming the variable on a bad value, so a
/// typo in a long run's settings is not silently replaced by the default.
pub fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .map(Some)
    .unwrap_or_else(|e| panic!("bad number in {name}: {v:?}: {e}"))
}

/// The seed in environment variable `name` (see `env_number`) alone, or
/// the `default` seeds when it is unset: the long random runs' seeds.
pub fn env_seeds(name: &str, default: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    env_number(name).map_or_else(|| default.collect(), |seed| vec![seed])
}

/// Whether `path` is a mount point right now.
pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Runs `timeout CMD ARGS` and returns its output, whatever the status.
pub fn run_unchecked<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", &COMMAND_TIMEOUT_SECS.to_string(), cmd])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs `CMD ARGS` (under a timeout), asserts it succeeded, shows its output
/// otherwise.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    let out = run_unchecked(cmd, args);
    assert_success(cmd, args, &out);
    out
}

pub fn describe<S: AsRef<OsStr>>(cmd: &str, args: &[S], out: &Output) -> String {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let status = match out.status.code() {
        Some(124) => "124 (timed out)".to_string(),
        Some(code) => code.to_string(),
        None => format!("signal {:?}", out.status.signal()),
    };
    format!(
        "{cmd} {}\nstatus: {status}\n--- stdout ---\n{}--- stderr ---\n{}",
        shown.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `CMD ARGS` like `run` and returns its stdout as text.
pub fn stdout_ok<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> String {
    String::from_utf8(run(cmd, args).stdout)
        .unwrap_or_else(|e| panic!("{cmd}: stdout is not UTF-8: {e}"))
}

/// Runs `throttlefs ARGS` (the commands: set, get, unset, stat, top,
/// completions) and returns its output, whatever the status.
pub fn ctl(args: &[&str]) -> Output {
    run_unchecked(binary(), args)
}

/// `ctl(args)`, asserting success; its stdout as text.
pub fn ctl_ok(args: &[&str]) -> String {
    stdout_ok(binary(), args)
}

/// `getfattr -n NAME --only-values PATH`, the program (for in-process
/// calls see `attrs`): the value as text; `None` when it fails (no such
/// attribute).
pub fn getfattr(path: &Path, name: &str) -> Option<String> {
    let out = run_unchecked(
        "getfattr",
        &[
            OsStr::new("--absolute-names"),
            OsStr::new("-n"),
            OsStr::new(name),
            OsStr::new("--only-values"),
            path.as_os_str(),
        ],
    );
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `setfattr -n NAME -v VALUE PATH`, the program; its output, whatever
/// the status.
pub fn setfattr_out(path: &Path, name: &str, value: &str) -> Output {
    run_unchecked(
        "setfattr",
        &[
            OsStr::new("-n"),
            OsStr::new(name),
            OsStr::new("-v"),
            OsStr::new(value),
            path.as_os_str(),
        ],
    )
}

/// `setfattr -n NAME -v VALUE PATH`, asserting success.
pub fn setfattr(path: &Path, name: &str, value: &str) {
    let out = setfattr_out(path, name, value);
    assert!(
        out.status.success(),
        "setting {name}={value} on {} failed: {}",
        path.display(),
        describe("setfattr", &[name, value], &out)
    );
}

fn assert_success<S: AsRef<OsStr>>(cmd: &str, args: &[S], out: &Output) {
    assert!(
        out.status.success(),
        "command failed: {}",
        describe(cmd, args, out)
    );
}

/// Runs `qemu-io -f FORMAT OPTS -c CMD.. FILE`, asserts success and that no
/// command reported a failure (pattern verification, I/O error), returns
/// stdout.
pub fn qemu_io_fmt(format: &str, file: &Path, opts: &[&str], cmds: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![OsStr::new("-f"), OsStr::new(format)];
    args.extend(opts.iter().map(OsStr::new));
    for c in cmds {
        args.push(OsStr::new("-c"));
        args.push(OsStr::new(c));
    }
    args.push(file.as_os_str());
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lower = stdout.to_lowercase();
    assert!(
        !lower.contains("failed") && !lower.contains("error"),
        "qemu-io reported a failure: {}",
        describe("qemu-io", &args, &out)
    );
    stdout
}

/// `qemu_io_fmt("raw", ..)`.
/// `qemu-img create -f FORMAT FILE SIZE`, asserting success.
pub fn qemu_img_create(format: &str, file: &Path, size: &str) {
    run(
        "qemu-img",
        &[
            OsStr::new("create"),
            OsStr::new("-f"),
            OsStr::new(format),
            file.as_os_str(),
            OsStr::new(size),
        ],
    );
}

pub fn qemu_io(file: &Path, opts: &[&str], cmds: &[&str]) -> String {
    qemu_io_fmt("raw", file, opts, cmds)
}

/// Deterministic pseudo-random bytes (xorshift), different per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Asserts `lower <= elapsed <= upper` with a readable message.
pub fn assert_elapsed_between(what: &str, elapsed: Duration, lower: f64, upper: f64) {
    let secs = elapsed.as_secs_f64();
    assert!(
        secs >= lower,
        "{what}: took {secs:.3} s, faster than the strict lower bound {lower:.3} s: the limit is not enforced"
    );
    assert!(
        secs <= upper,
        "{what}: took {secs:.3} s, slower than the loose upper bound {upper:.3} s"
    );
}

/// The loose upper bound used for rate tests: expected * 1.5 + 2 s.
pub fn loose_upper(expected: f64) -> f64 {
    expected * 1.5 + 2.0
}

/// Runs `CMD ARGS` as nobody (uid/gid 65534, no supplementary groups).
pub fn as_nobody(cmd: &str, args: &[&OsStr]) -> Output {
    let mut all: Vec<&OsStr> = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        .into_iter()
        .map(OsStr::new)
        .collect();
    all.push(OsStr::new(cmd));
    all.extend_from_slice(args);
    run_unchecked("setpriv", &all)
}

/// chmod(2), panicking on failure.
/// A mount with `-o allow_other` (and `args`) whose source holds `ref/`
/// (used directly, the reference) and `dut/` (used through the mount), both
/// made by `setup(dir)`. The test tree is opened up so nobody reaches both.
pub fn mount_ref_dut(setup: impl Fn(&Path), args: &[&str]) -> Mount {
    let mut m = Mount::new();
    for p in [m.root(), m.src(), m.mnt()] {
        chmod(p, 0o755);
    }
    for d in ["ref", "dut"] {
        let dir = m.src_path(d);
        fs::create_dir(&dir).unwrap();
        setup(&dir);
    }
    let mut all = vec!["-o", "allow_other"];
    all.extend_from_slice(args);
    m.start(&all);
    m
}

/// Runs the shell `script` with `$1` = `target`, as nobody (`nobody`) or
/// as this process; its output, whatever the exit status.
pub fn sh_on(nobody: bool, script: &str, target: &Path) -> Output {
    let args = [
        OsStr::new("-c"),
        OsStr::new(script),
        OsStr::new("sh"),
        target.as_os_str(),
    ];
    if nobody {
        as_nobody("sh", &args)
    } else {
        run_unchecked("sh", &args)
    }
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Opens `path` with O_DIRECT for reading, and for writing too if `write`;
/// panics on failure.
pub fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes file `name` (relative to `dir`, usually a mount's source) of
/// `len` pseudo-random bytes (`pattern(len, seed)`); returns the bytes.
pub fn make_file(dir: &Path, name: &str, len: u64, seed: u64) -> Vec<u8> {
    let data = pattern(len as usize, seed);
    fs::write(dir.join(name), &data).unwrap();
    data
}

/// A misuse must be reported at once; 10 s is far more than parsing takes.
pub const USAGE_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Runs throttlefs with `args` (which may contain the placeholders `SRC` and
/// `MNT`, replaced by the test's directories; when neither appears they are
/// appended), expects exit status 2, exactly one non-empty stderr line that
/// contains at least one of `needles` (case-insensitive), and nothing mounted.
pub fn assert_rejected(m: &mut Mount, args: &[&str], needles: &[&str]) {
    let src = m.src().to_str().unwrap().to_owned();
    let mnt = m.mnt().to_str().unwrap().to_owned();
    let mut full: Vec<String> = args
        .iter()
        .map(|a| a.replace("SRC", &src).replace("MNT", &mnt))
        .collect();
    if !args.iter().any(|a| a.contains("SRC") || a.contains("MNT")) {
        full.push(src.clone());
        full.push(mnt.clone());
    }
    let full_refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let before: Vec<_> = fs::read_dir(m.mnt())
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    let status = m.run_to_exit(&full_refs, USAGE_EXIT_WAIT);
    let mounted = m.is_mounted();
    let stderr = m.stderr();
    let Some(status) = status else {
        panic!("throttlefs {full:?} did not exit within {USAGE_EXIT_WAIT:?} (mounted: {mounted})");
    };
    assert_eq!(
        status.code(),
        Some(2),
        "throttlefs {full:?} exited with {status}, expected 2; stderr:\n{stderr}"
    );
    assert!(!mounted, "throttlefs {full:?} mounted something");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "throttlefs {full:?}: expected exactly one stderr line, got:\n{stderr}"
    );
    let line = lines[0].to_lowercase();
    assert!(
        needles.iter().any(|n| line.contains(&n.to_lowercase())),
        "throttlefs {full:?}: stderr line {:?} names none of {needles:?}",
        lines[0]
    );
    assert!(
        m.stdout().is_empty(),
        "throttlefs {full:?} printed on stdout:\n{}",
        m.stdout()
    );
    if let Ok(d) = fs::read_dir(m.mnt()) {
        let after: Vec<_> = d.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        assert_eq!(before, after, "the mountpoint's contents changed");
    }
}

/// `assert_rejected` on a fresh `Mount`.
pub fn rejected(args: &[&str], needles: &[&str]) {
    let mut m = Mount::new();
    assert_rejected(&mut m, args, needles);
}

/// Each thread of process `pid` as (name, its `/proc` status); a thread
/// that exits meanwhile is left out.
pub fn threads(pid: libc::pid_t) -> Vec<(String, String)> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = fs::read_to_string(t.join("comm")).ok()?;
            Some((
                name.trim().to_string(),
                fs::read_to_string(t.join("status")).ok()?,
            ))
        })
        .collect()
}

/// The value of `field` (e.g. `NoNewPrivs`) in a `/proc` status text.
pub fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The errno the daemon's probe `request` (`ACTION[:ARG]`, see
/// src/sandbox/probe.rs; test-only feature `sandbox-probe`) ended with, 0
/// for success, or the errno of the getxattr itself when the daemon did not
/// answer.
pub fn probe(m: &Mount, request: &str) -> Result<i32, i32> {
    let answer = attrs::getxattr(m.mnt(), &format!("user.probe.sandbox.{request}"))
        .map_err(|e| e.raw_os_error().unwrap())?;
    Ok(std::str::from_utf8(&answer).unwrap().parse().unwrap())
}

/// For `Mount::daemon_pre_exec`: a seccomp filter that fails system call
/// `nr` with ENOSYS, as a kernel without the feature behind it does. Root
/// may install it without no_new_privs (CAP_SYS_ADMIN); installed with
/// prctl, which the daemon leaves alone.
pub fn fail_with_enosys(nr: u32) -> std::io::Result<()> {
    const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        // Offset 0 of struct seccomp_data: the system call's number.
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JEQ_K, 0, 1, nr),
        insn(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
