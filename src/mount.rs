//! The mount: parse the command line, detach, set up the I/O rings and the
//! FUSE session (the mount), enter the sandbox, start the scheduler, the
//! I/O workers and the session threads, serve until unmounted or
//! signalled, then answer everything still queued.
//!
//! Order matters here: `daemon::detach` forks, so it runs before any
//! thread starts; the sandbox (src/sandbox) belongs to the thread that
//! enters it and is inherited by the threads it starts, so it comes after
//! everything that needs the old privileges and before the first thread;
//! and the termination signals are blocked before the first thread
//! starts, so every thread inherits the mask and only the signal thread
//! receives them.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use fuser::{MountOption, SessionACL, Transport, UringConfig};

use throttlefs::fs::ThrottleFs;
use throttlefs::io::{IoPool, PreparedPool};
use throttlefs::options::{IoUringMode, MountConfig, parse_args};
use throttlefs::sandbox::{self, Unmounter};
use throttlefs::scheduler::{Msg, Scheduler, SchedulerRx, SchedulerTx};

use crate::daemon::{self, Readiness};

/// How long a shutdown waits for released requests to finish on the
/// underlying files before the daemon exits anyway.
const SHUTDOWN_IO_GRACE: Duration = Duration::from_secs(30);

/// FUSE session threads; they only hand throttled requests over, but serve
/// unthrottled files inline, so a few are kept.
const FUSE_THREADS_MAX: usize = 16;

/// The kernel's switch for FUSE over io_uring. It is global, for every
/// FUSE mount of the machine, and only root may change it, so the daemon
/// reads it and never writes it: whether FUSE daemons may use io_uring is
/// the administrator's decision (as libfuse leaves it too).
const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Ring entries, with io_uring, for all online CPUs' queues together, and
/// the least and most per CPU. An entry holds one request from its
/// arrival to its answer, a throttled one too, and requests beyond a CPU's
/// entries wait in the kernel whatever their file (see
/// docs/operations.md), so there are many: 128 per CPU on up to 4 CPUs
/// (one caller's 128 requests in flight are held whole), fewer on more. Each has a payload buffer of max_write (1 MiB) plus a page, as
/// address space: pages become resident as large requests use them.
const URING_ENTRIES_TOTAL: usize = 512;
const URING_QUEUE_DEPTH_MIN: usize = 16;
const URING_QUEUE_DEPTH_MAX: usize = 128;

fn uring_queue_depth() -> u16 {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    (URING_ENTRIES_TOTAL / online).clamp(URING_QUEUE_DEPTH_MIN, URING_QUEUE_DEPTH_MAX) as u16
}

/// Mount as the command line `args` says; returns once unmounted (in the
/// foreground) or, detached, in the daemon once unmounted.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let cfg = match parse_args(args) {
        Ok(cfg) => cfg,
        Err((text, 0)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err((msg, code)) => {
            eprintln!("throttlefs: {msg}");
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
    };
    // Detach first: fork is only safe while we have a single thread.
    let ready = if cfg.foreground {
        Readiness::foreground()
    } else {
        match daemon::detach() {
            Ok(ready) => ready,
            Err(e) => {
                eprintln!("throttlefs: detaching: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    init_logging(cfg.verbose, ready.detached());
    daemon::connect_systemd();
    match run(cfg, ready.clone()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            if ready.failed(&msg) {
                // The waiting parent prints it.
            } else if ready.detached() {
                log::error!("{msg}");
            } else {
                eprintln!("throttlefs: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8, detached: bool) {
    // fuser warns about its own second unmount attempt after every clean
    // unmount; that one module is kept at error unless -vv.
    let default = match verbose {
        0 => "warn,fuser::session=error",
        1 => "info,fuser::session=error",
        _ => "debug",
    };
    if detached {
        let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_string());
        daemon::init_syslog(&spec);
        return;
    }
    let env = env_logger::Env::default().default_filter_or(default);
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .init();
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// glibc malloc arenas. Request buffers are allocated on FUSE threads and
/// freed on I/O threads; with glibc's default of one arena per thread
/// (up to 8 per core) that kept fragmenting: under 1024 clients the RSS
/// crept by about 25 KiB/s (60 MiB after a minute), and with two arenas
/// still by about 20 KiB/s. One arena keeps it flat at less than half, with
/// no measurable CPU cost (101-107 us per request either way).
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS_MAX: libc::c_int = 1;

/// Every inode the kernel knows holds one descriptor, so the common soft
/// limit of 1024 is far too low; the hard limit is the administrator's
/// choice (ulimit -Hn, systemd's LimitNOFILE=) and is left alone.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on valid structures.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let mut want = lim.rlim_max;
    if want == libc::RLIM_INFINITY {
        // The kernel refuses more than fs.nr_open.
        want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(lim.rlim_cur);
    }
    if want <= lim.rlim_cur {
        log::info!("file descriptors: limit {}", lim.rlim_cur);
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        log::info!(
            "file descriptors: limit raised from {} to {want}",
            lim.rlim_cur
        );
    } else {
        log::warn!(
            "file descriptors: could not raise the limit from {} to {want}: {}",
            lim.rlim_cur,
            std::io::Error::last_os_error()
        );
    }
}

fn run(cfg: MountConfig, ready: Readiness) -> Result<()> {
    raise_fd_limit();
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX);
    }
    // Block the termination signals before any thread starts, so they all
    // inherit the mask and only the signal thread receives them.
    let signals = termination_signals();
    // SAFETY: setting this thread's signal mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    // The caller's umask is applied per request, on the thread that
    // creates (src/fs.rs `with_umask`), so the process's own must not add to it.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };

    // The unmount helper first, before anything of the mount is open.
    let unmounter = Arc::new(sandbox::unmounter(&cfg, ready.detached())?);

    // Nothing starts a thread before the sandbox (src/sandbox), which the
    // threads then inherit: the I/O rings are made here, the scheduler and
    // the workers start after the mount.
    let (sched_tx, sched_rx) = throttlefs::scheduler::channel();
    let (pool, job_tx) = IoPool::prepare(cfg.io_threads).context("setting up I/O")?;
    let unthrottled = job_tx.direct();
    let scheduler = Scheduler::new(cfg.limits, job_tx);

    let fs = ThrottleFs::new(
        &cfg.source,
        cfg.limits,
        &cfg.groups,
        sched_tx.clone(),
        unthrottled,
        cfg.passthrough,
    )
    .map(|fs| fs.with_image_format(cfg.image_format))
    .with_context(|| format!("opening source '{}'", cfg.source.display()))?;

    let mut options = cfg.fuse_options.clone();
    if !options.iter().any(|o| matches!(o, MountOption::FSName(_))) {
        options.push(MountOption::FSName(
            cfg.source.to_string_lossy().into_owned(),
        ));
    }
    if !options.iter().any(|o| matches!(o, MountOption::Subtype(_))) {
        options.push(MountOption::Subtype("throttlefs".into()));
    }
    // Permission checks are the kernel's, from the underlying owners and
    // modes: the daemon itself runs with the rights to do anything.
    if !options.contains(&MountOption::DefaultPermissions) {
        options.push(MountOption::DefaultPermissions);
    }
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = options;
    fuse_cfg.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_cfg.n_threads = Some(cfg.io_threads.clamp(2, FUSE_THREADS_MAX));
    fuse_cfg.clone_fd = true;
    if cfg.io_uring == IoUringMode::On && uring_switch() == Some(false) {
        // Refuse before mounting when the answer is known.
        anyhow::bail!("{}", uring_unavailable());
    }
    if cfg.io_uring != IoUringMode::Off {
        // Asked for in the INIT reply only if the kernel offers it.
        fuse_cfg.io_uring = Some(UringConfig {
            queue_depth: uring_queue_depth(),
        });
    }

    let notifier = fs.notifier_slot();
    let session = fuser::Session::new(fs, &cfg.mountpoint, &fuse_cfg)
        .with_context(|| format!("mounting on '{}'", cfg.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    match session.transport() {
        Transport::IoUring {
            queues,
            entries,
            entry_payload,
        } => log::info!(
            "transport: io_uring, {queues} queues, {entries} ring entries of {} KiB ({} MiB)",
            entry_payload / 1024,
            (entries * (entry_payload + 4096)).div_ceil(1 << 20)
        ),
        // Dropping the session unmounts.
        Transport::DevFuseRingFailed(e) if cfg.io_uring == IoUringMode::On => anyhow::bail!(
            "io_uring=on: setting up the rings failed (kernel {}): {e}",
            kernel_release()
        ),
        _ if cfg.io_uring == IoUringMode::On => anyhow::bail!("{}", uring_unavailable()),
        Transport::DevFuseNotOffered => log::info!(
            "transport: /dev/fuse (the kernel does not offer io_uring: {})",
            uring_switch_text()
        ),
        Transport::DevFuseRingFailed(e) => {
            log::info!("transport: /dev/fuse (setting up io_uring failed: {e})")
        }
        _ => log::info!("transport: /dev/fuse"),
    }
    log::info!(
        "mounted {} on {}",
        cfg.source.display(),
        cfg.mountpoint.display()
    );

    // Everything that needs the old privileges is done: the source and
    // /dev/fuse are open, the mount is made, the rings are set up.
    sandbox::enter(&cfg)?;
    // Every io_uring instance exists (the I/O workers' and the session's)
    // and the sockets to syslog and systemd are connected: the filter
    // refuses new ones.
    let result = sandbox::seccomp::apply(cfg.seccomp).and_then(|()| {
        serve(
            session,
            &cfg,
            ready,
            signals,
            unmounter.clone(),
            sched_tx,
            sched_rx,
            scheduler,
            pool,
        )
    });
    if result.is_err() {
        // fuser could not unmount from the sandbox: the helper detaches
        // the mount, so that it is not left dead.
        let _ = unmounter.unmount(true);
    }
    result
}

/// Starts the threads (in the sandbox, which they inherit) and serves the
/// mount until it goes away, then answers what is still queued.
#[allow(clippy::too_many_arguments)]
fn serve(
    session: fuser::Session<ThrottleFs>,
    cfg: &MountConfig,
    ready: Readiness,
    signals: libc::sigset_t,
    unmounter: Arc<Unmounter>,
    sched_tx: SchedulerTx,
    sched_rx: SchedulerRx,
    scheduler: Scheduler,
    pool: PreparedPool,
) -> Result<()> {
    let done_tx = sched_tx.clone();
    let scheduler = scheduler
        .spawn(sched_rx)
        .context("starting the scheduler")?;
    // The scheduler thread has its nice value from here on (it drops the
    // capability itself); no other thread needs it.
    sandbox::drop_sys_nice();
    let pool = pool
        .start(move |c| {
            let _ = done_tx.send(Msg::Done(c));
        })
        .context("starting I/O threads")?;

    let signal_tx = sched_tx.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || signal_thread(signals, &unmounter, signal_tx))
        .context("starting the signal thread")?;
    // Only for someone waiting: the probe holds the mount point while the
    // session starts, and an unmount in that moment would find it busy.
    if ready.awaited() {
        let probe = cfg.mountpoint.clone();
        thread::Builder::new()
            .name("ready".into())
            .spawn(move || report_when_live(&probe, &ready))
            .context("starting the readiness thread")?;
    }

    let result = session.run();
    log::info!("unmounted; answering what is still queued");
    let _ = sched_tx.send(Msg::Exit);
    drop(sched_tx);
    let _ = scheduler.join();
    pool.join();
    result.context("serving the mount")
}

/// The kernel's switch: `Some(true)` for Y, `None` without the parameter
/// (a kernel without `CONFIG_FUSE_IO_URING`, before 6.14, or the fuse
/// module not loaded yet).
fn uring_switch() -> Option<bool> {
    let text = std::fs::read_to_string(ENABLE_URING).ok()?;
    Some(matches!(text.trim(), "Y" | "y" | "1"))
}

fn uring_switch_text() -> String {
    match uring_switch() {
        Some(true) => format!("{ENABLE_URING} is Y"),
        Some(false) => format!("{ENABLE_URING} is N"),
        None => format!("no {ENABLE_URING}"),
    }
}

fn kernel_release() -> String {
    // SAFETY: uname into a local structure.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The one line `io_uring=on` fails with.
fn uring_unavailable() -> String {
    let how = match uring_switch() {
        Some(false) => format!("root must set it: echo Y > {ENABLE_URING}"),
        Some(true) => "the kernel did not offer it in INIT".into(),
        None => "it needs Linux 6.14 or later built with CONFIG_FUSE_IO_URING".into(),
    };
    format!(
        "io_uring=on: FUSE over io_uring is not available ({}, kernel {}): {how}; \
         or mount with io_uring=auto or off",
        uring_switch_text(),
        kernel_release()
    )
}

/// The mount is live once it answers a request: statfs goes to the
/// session (after the kernel's INIT handshake), so it returns only when the
/// session threads serve.
fn report_when_live(mountpoint: &std::path::Path, ready: &Readiness) {
    let Ok(path) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: statfs on a NUL-terminated path into a local buffer.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut buf) } == 0 {
        ready.ready();
    } else {
        let err = std::io::Error::last_os_error();
        ready.failed(&format!(
            "mount on '{}' is not answering: {err}",
            mountpoint.display()
        ));
    }
}

/// Waits for SIGINT/SIGTERM/SIGHUP and shuts down without losing a request:
/// queued requests are released at once, then the mount goes away.
fn signal_thread(signals: libc::sigset_t, unmounter: &Unmounter, scheduler: SchedulerTx) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits on a valid, blocked signal set.
        if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
            continue;
        }
        log::info!("signal {sig}: shutting down");
        let _ = daemon::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = scheduler.send(Msg::Drain);
        let err = match unmounter.unmount(false) {
            // The session sees the unmount and main finishes the shutdown.
            Ok(()) => continue,
            Err(err) => err,
        };
        if err.raw_os_error() == Some(libc::EINVAL) {
            // Already unmounted: the session is ending.
            continue;
        }
        // Busy (files still open): detach the mount so no new opens reach
        // us, let every released request finish, then exit; the kernel
        // answers anything later with ENOTCONN when our device closes.
        // Without the unmount helper (killed), the same, and the mount
        // stays as a killed daemon's does.
        if sandbox::is_helper_gone(&err) {
            log::warn!("cannot unmount: {err}; exiting once released I/O is done");
        } else {
            log::warn!("mount busy ({err}); detaching it lazily");
            if let Err(err) = unmounter.unmount(true) {
                log::warn!("lazy unmount failed: {err}");
            }
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if scheduler.send(Msg::WhenIdle(tx)).is_ok() {
            let _ = rx.recv_timeout(SHUTDOWN_IO_GRACE);
        }
        std::process::exit(0);
    }
}
