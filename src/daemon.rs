//! Detaching from the caller once the mount is live, and telling whoever
//! started us (a parent waiting on a pipe, systemd's NOTIFY_SOCKET) that
//! it is.
//!
//! The detach forks while the process still has one thread (fork in a
//! multi-threaded process may leave locks held by threads that do not
//! exist in the child), so `detach` must run before any thread starts.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, OnceLock};

/// What the child sends up the pipe when the mount is live; anything else
/// is the one-line error.
const READY_WORD: &str = "ok";

/// Exit status of the waiting parent when the daemon could not mount
/// (the same as a foreground daemon's).
const MOUNT_FAILED_EXIT_CODE: i32 = 1;

/// Reports the outcome of starting the mount exactly once: to the parent
/// waiting in `detach` (detached mode) and to systemd (when NOTIFY_SOCKET
/// is set). Clones share the one report.
#[derive(Clone)]
pub struct Readiness {
    /// Write end of the pipe to the parent; None in the foreground, and
    /// once reported.
    parent: Arc<Mutex<Option<File>>>,
    detached: bool,
}

impl Readiness {
    /// Foreground: no parent to tell; errors go to stderr as before.
    pub fn foreground() -> Readiness {
        Readiness {
            parent: Arc::new(Mutex::new(None)),
            detached: false,
        }
    }

    pub fn detached(&self) -> bool {
        self.detached
    }

    /// Whether anyone waits for the report: a parent (detached) or systemd
    /// (NOTIFY_SOCKET).
    pub fn awaited(&self) -> bool {
        self.detached || std::env::var_os("NOTIFY_SOCKET").is_some()
    }

    /// The mount is live: let the parent return 0, drop the caller's
    /// terminal (a caller capturing our output waits for its end), and
    /// tell systemd.
    pub fn ready(&self) {
        if let Some(mut pipe) = self.take() {
            redirect_stdio_to_null();
            let _ = pipe.write_all(READY_WORD.as_bytes());
        }
        if let Err(e) = notify(&[sd_notify::NotifyState::Ready]) {
            log::warn!("could not notify systemd of readiness: {e}");
        }
        log::info!("ready");
    }

    /// Starting failed with `msg`. True if a waiting parent got it (and
    /// prints it); false if the caller must print it itself.
    pub fn failed(&self, msg: &str) -> bool {
        match self.take() {
            Some(mut pipe) => pipe.write_all(msg.as_bytes()).is_ok(),
            None => false,
        }
    }

    fn take(&self) -> Option<File> {
        self.parent.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The socket to systemd (`NOTIFY_SOCKET`), connected once at start:
/// `None` without the variable, else the socket or why it could not be
/// connected. Connected before the seccomp filter is installed, which
/// then refuses every new socket and connect (a daemon that could connect
/// to any Unix socket could talk to any local service as root).
static SYSTEMD: OnceLock<Option<Result<UnixDatagram, String>>> = OnceLock::new();

/// Connects to systemd's notification socket if `NOTIFY_SOCKET` names one.
/// Call once, before the seccomp filter.
pub fn connect_systemd() {
    SYSTEMD.get_or_init(|| {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let socket = UnixDatagram::unbound().and_then(|s| s.connect(&path).map(|()| s));
        Some(socket.map_err(|e| format!("connecting to {}: {e}", path.to_string_lossy())))
    });
}

/// Sends `states` to systemd, as `sd_notify::notify` does, on the socket
/// `connect_systemd` connected; nothing without `NOTIFY_SOCKET`.
pub fn notify(states: &[sd_notify::NotifyState]) -> std::io::Result<()> {
    let Some(Some(socket)) = SYSTEMD.get() else {
        return Ok(());
    };
    let socket = socket
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))?;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sent = socket.send(msg.as_bytes())?;
    if sent != msg.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete write",
        ));
    }
    Ok(())
}

/// Forks. The parent waits for the child's report and exits with 0 once
/// the mount is live, or prints the child's one-line error and exits 1;
/// it never returns. The child starts a new session away from the
/// caller's terminal, moves to `/` (so it holds no directory busy; every
/// path it uses is absolute) and returns the handle to report through.
///
/// Must be called while the process has a single thread.
pub fn detach() -> std::io::Result<Readiness> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (mut read_end, write_end) =
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded at this point (see the function's contract).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls; the child is not a group leader, so
            // setsid cannot fail.
            unsafe {
                libc::setsid();
                let _ = libc::chdir(c"/".as_ptr());
            }
            Ok(Readiness {
                parent: Arc::new(Mutex::new(Some(write_end))),
                detached: true,
            })
        }
        _child => {
            drop(write_end);
            let mut report = String::new();
            let _ = read_end.read_to_string(&mut report);
            if report == READY_WORD {
                std::process::exit(0);
            }
            if report.is_empty() {
                report = "the daemon exited before the mount was live".into();
            }
            eprintln!("throttlefs: {report}");
            std::process::exit(MOUNT_FAILED_EXIT_CODE);
        }
    }
}

/// Points stdin, stdout and stderr at /dev/null.
fn redirect_stdio_to_null() {
    let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
        return;
    };
    use std::os::fd::AsRawFd;
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 onto the standard descriptors, which we own.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// Sends log records to syslog (journald reads /dev/log too), filtered
/// like the stderr logger.
struct SyslogLogger {
    filter: env_filter::Filter,
    inner: syslog::BasicLogger,
}

impl log::Log for SyslogLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.filter.matches(record) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Logs to syslog with the filter `spec` (RUST_LOG syntax). Without a
/// syslog socket the detached daemon logs nowhere, as its stderr is gone.
pub fn init_syslog(spec: &str) {
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_DAEMON,
        hostname: None,
        process: "throttlefs".into(),
        // SAFETY: getpid cannot fail.
        pid: unsafe { libc::getpid() } as u32,
    };
    let Ok(logger) = syslog::unix(formatter) else {
        return;
    };
    let filter = env_filter::Builder::new().parse(spec).build();
    log::set_max_level(filter.filter());
    let _ = log::set_boxed_logger(Box::new(SyslogLogger {
        filter,
        inner: syslog::BasicLogger::new(logger),
    }));
}
