//! `throttlefs top MOUNTPOINT`: a live table of the mount's open or active
//! files and their groups, redrawn with plain ANSI escapes (no TUI crate:
//! one table and a few keys do not need one). The terminal goes into
//! non-canonical, no-echo mode through termios and is restored on every
//! way out: `q`, end of input, SIGINT/SIGTERM/SIGHUP, an error, a panic.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use super::failure::{Failure, parse};
use super::snapshot::{self, MountSnapshot};
use super::table::{Row, table};
use crate::options::parse_duration;

/// Shortest refresh interval accepted: each refresh is a few syscalls.
const INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Width and height when the terminal does not say.
const DEFAULT_COLUMNS: usize = 80;
const DEFAULT_ROWS: usize = 24;
/// Lines above the table.
const HEADER_LINES: usize = 3;

#[derive(Parser, Debug)]
#[command(
    about = "Live view of a mount's open or active files and groups",
    long_about = "Live view of a throttlefs mount: its open or active files and groups, \
                  with rates over the last second. Keys: a r w i t p sort, q quits."
)]
struct TopCli {
    /// time between refreshes (humantime, or seconds)
    #[arg(
        short = 'd',
        long = "delay",
        value_name = "DURATION",
        default_value = "1"
    )]
    delay: String,
    /// the mount point (root directory of a throttlefs mount)
    mountpoint: PathBuf,
}

/// The clap definition, for the shell completions.
pub(crate) fn command() -> clap::Command {
    <TopCli as clap::CommandFactory>::command()
}

static STOP: AtomicBool = AtomicBool::new(false);
static RESIZED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_resize(_: libc::c_int) {
    RESIZED.store(true, Ordering::SeqCst);
}

fn handle(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: installs an async-signal-safe handler (one atomic store);
    // without SA_RESTART, so poll returns EINTR and the loop sees the flag.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(signal, &sa, std::ptr::null_mut());
    }
}

/// The terminal as it was; put back on drop.
struct Terminal {
    saved: libc::termios,
}

impl Terminal {
    fn enter() -> Result<Terminal, Failure> {
        // SAFETY: tcgetattr/tcsetattr on stdin with valid structures.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return Err(Failure::failed(
                    "top needs a terminal on its input (use stat for a snapshot)",
                ));
            }
            let mut raw = saved;
            // Keys arrive one at a time, unechoed; ISIG stays, so Ctrl-C is
            // SIGINT, handled like q.
            raw.c_lflag &= !(libc::ICANON | libc::ECHO);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &raw);
            // Alternate screen, cursor hidden.
            print!("\x1b[?1049h\x1b[?25l");
            let _ = std::io::stdout().flush();
            Ok(Terminal { saved })
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &self.saved) };
    }
}

fn terminal_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ fills a winsize.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (ws.ws_col as usize, ws.ws_row as usize)
    } else {
        (DEFAULT_COLUMNS, DEFAULT_ROWS)
    }
}

/// What the rows are sorted by, busiest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Bytes per second read and written, then operations, then waiting.
    Activity,
    Read,
    Write,
    Iops,
    Waiting,
    Path,
}

impl Sort {
    fn from_key(key: u8) -> Option<Sort> {
        Some(match key {
            b'a' => Sort::Activity,
            b'r' => Sort::Read,
            b'w' => Sort::Write,
            b'i' => Sort::Iops,
            b't' => Sort::Waiting,
            b'p' => Sort::Path,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Sort::Activity => "activity",
            Sort::Read => "read MiB/s",
            Sort::Write => "write MiB/s",
            Sort::Iops => "IOPS",
            Sort::Waiting => "waiting",
            Sort::Path => "path",
        }
    }

    fn order(self, rows: &mut [Row]) {
        let key = |r: &Row| {
            let a = &r.activity;
            let bytes = a.bytes_per_sec[0] + a.bytes_per_sec[1];
            let ops = a.ops_per_sec[0] + a.ops_per_sec[1];
            match self {
                Sort::Activity => (bytes, ops, a.waiting),
                Sort::Read => (a.bytes_per_sec[0], a.ops_per_sec[0], 0),
                Sort::Write => (a.bytes_per_sec[1], a.ops_per_sec[1], 0),
                Sort::Iops => (ops, bytes, 0),
                Sort::Waiting => (a.waiting, a.wait_ns, 0),
                Sort::Path => (0, 0, 0),
            }
        };
        rows.sort_by(|x, y| key(y).cmp(&key(x)).then_with(|| x.label.cmp(&y.label)));
    }
}

/// The screen for one reading: header, groups, then files, cut to the
/// terminal.
pub fn screen(
    snap: &MountSnapshot,
    sort: Sort,
    took: Duration,
    (columns, lines): (usize, usize),
) -> String {
    let mut groups: Vec<Row> = snap.groups.iter().map(Row::group).collect();
    let mut files: Vec<Row> = snap
        .files
        .iter()
        .map(|f| {
            let mut r = Row::file(f);
            // Paths from the mount root: the header names the mount.
            if let Some(rel) = r.label.strip_prefix(snap.mount.trim_end_matches('/')) {
                r.label = rel.to_string();
            }
            r
        })
        .collect();
    sort.order(&mut groups);
    sort.order(&mut files);
    groups.extend(files);
    let unlisted = if snap.files_unlisted > 0 {
        format!(" (+{} unlisted)", snap.files_unlisted)
    } else {
        String::new()
    };
    let mut out = String::new();
    let header = [
        format!(
            "throttlefs top  {}  files open or active: {}{unlisted}  groups: {}  refresh {:.1} ms",
            snap.mount,
            snap.files.len(),
            snap.groups.len(),
            took.as_secs_f64() * 1000.0
        ),
        format!(
            "sort: {}   keys: a activity  r read  w write  i IOPS  t waiting  p path  q quit",
            sort.name()
        ),
        String::new(),
    ];
    for l in &header {
        let l: String = l.chars().take(columns).collect();
        out.push_str(&l);
        out.push_str("\x1b[K\n");
    }
    let body = table(&groups, false, columns);
    for l in body.lines().take(lines.saturating_sub(HEADER_LINES + 1)) {
        out.push_str(l);
        out.push_str("\x1b[K\n");
    }
    out
}

pub fn main(args: Vec<OsString>) -> Result<(), Failure> {
    let cli: TopCli = parse(args)?;
    let delay = parse_duration(&cli.delay)
        .map_err(|e| Failure::usage(format!("delay: {e}")))?
        .max(INTERVAL_MIN);
    if !snapshot::is_mount_root(&cli.mountpoint) {
        return Err(Failure::failed(format!(
            "{}: not the root of a throttlefs mount",
            cli.mountpoint.display()
        )));
    }
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        handle(s, on_stop);
    }
    handle(libc::SIGWINCH, on_resize);
    let _terminal = Terminal::enter()?;
    let mut sort = Sort::Activity;
    let mut stdout = std::io::stdout();
    'refresh: loop {
        let started = Instant::now();
        let snap = snapshot::of_mount(&cli.mountpoint)?;
        let took = started.elapsed();
        let next = started + delay;
        loop {
            let text = screen(&snap, sort, took, terminal_size());
            let _ = write!(stdout, "\x1b[H{text}\x1b[J");
            let _ = stdout.flush();
            // Wait for a key until the next refresh.
            loop {
                if STOP.load(Ordering::SeqCst) {
                    return Ok(());
                }
                if RESIZED.swap(false, Ordering::SeqCst) {
                    break;
                }
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    continue 'refresh;
                }
                let mut fds = libc::pollfd {
                    fd: libc::STDIN_FILENO,
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut fds, 1, ms) } <= 0 {
                    continue;
                }
                let mut keys = [0u8; 64];
                // SAFETY: reads into a local buffer.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, keys.as_mut_ptr().cast(), keys.len()) };
                if n <= 0 {
                    // End of input: nobody can press q any more.
                    return Ok(());
                }
                let mut redraw = false;
                for &k in &keys[..n as usize] {
                    if k == b'q' || k == b'Q' {
                        return Ok(());
                    }
                    if let Some(s) = Sort::from_key(k) {
                        sort = s;
                        redraw = true;
                    }
                }
                if redraw {
                    break;
                }
            }
        }
    }
}
