//! The system call filter (seccomp), installed on every thread of the
//! daemon once the mount and all its io_uring instances exist.
//!
//! One BPF program, three outcomes:
//!
//! - the system calls the daemon makes (`allowed`, found by running the
//!   test suite and the benchmarks' loads under strace and `--seccomp=log`,
//!   plus the other spellings of the same operations that another C
//!   library or kernel may use) are allowed;
//! - a few it deliberately never makes once started, which a bug or an
//!   intruder would reach for first and which have a clean failure, are
//!   refused with an errno and the daemon carries on (`refused`): new
//!   sockets and connections of any kind, starting a program or a
//!   process, new io_uring instances or ring registrations (EPERM), and
//!   `clone3` (ENOSYS, so that the C library falls back to `clone`, whose
//!   flags the filter can see);
//! - anything else kills the whole process (`--seccomp=kill`, the default,
//!   as virtiofsd), or is allowed and logged by the kernel
//!   (`--seccomp=log`, for diagnosing a kill).
//!
//! io_uring submissions never pass through the filter: each ring is
//! restricted to its own operations when it is made (src/io/uring.rs and
//! the vendored fuser's uring.rs), and no ring can be made afterwards.

use std::io;

use anyhow::{Result, bail};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

use crate::options::SeccompMode;

/// `_IOC(dir, type, nr, size)`, as the kernel encodes an ioctl request.
const fn ioc(dir: u32, kind: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (kind << 8) | nr) as u64
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// `FUSE_DEV_IOC_MAGIC`.
const FUSE_DEV_IOC: u32 = 229;
/// The only ioctls the daemon makes: fuser's session threads clone the
/// `/dev/fuse` descriptor, and passthrough opens and closes backing files.
const FUSE_DEV_IOC_CLONE: u64 = ioc(IOC_READ, FUSE_DEV_IOC, 0, 4);
const FUSE_DEV_IOC_BACKING_OPEN: u64 = ioc(IOC_WRITE, FUSE_DEV_IOC, 1, 16);
const FUSE_DEV_IOC_BACKING_CLOSE: u64 = ioc(IOC_WRITE, FUSE_DEV_IOC, 2, 4);

/// The `prctl` options used after start: thread names (std) and the
/// scheduler's timer slack.
const PRCTL_OPTIONS: [libc::c_int; 3] = [
    libc::PR_SET_NAME,
    libc::PR_GET_NAME,
    libc::PR_SET_TIMERSLACK,
];

/// `SECCOMP_RET_TRACE` with this value marks "not decided here, go on to
/// the next part" while the parts are compiled; it never reaches the kernel.
const CONTINUE_DATA: u32 = 0x5ecc;

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const BPF_K: u16 = 0x00;

/// The system calls the daemon makes after start, allowed without
/// conditions. Grouped by what needs them; each operation is listed in
/// every spelling a C library may use for it.
const ALLOWED: &[libc::c_long] = &[
    // Memory, threads and their signals (the Rust runtime, the allocator,
    // locks and channels).
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_gettimeofday,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // The scheduler's priority (CAP_SYS_NICE), and dropping that
    // capability afterwards (src/sandbox `drop_sys_nice`).
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_capget,
    libc::SYS_capset,
    // Descriptors.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_io_uring_enter,
    // The passthrough's file operations.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_copy_file_range,
    libc::SYS_flock,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    // Each request runs with the caller's umask, on a thread with its
    // own filesystem context (unshare(CLONE_FS), conditioned below).
    libc::SYS_umask,
    // Shutdown: the signal thread unmounts.
    libc::SYS_umount2,
];

/// The older path-based spellings, which x86_64 still has and some C
/// libraries still use.
#[cfg(target_arch = "x86_64")]
const ALLOWED_LEGACY: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_readlink,
    libc::SYS_mkdir,
    libc::SYS_mknod,
    libc::SYS_symlink,
    libc::SYS_link,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_getdents,
    libc::SYS_dup2,
    libc::SYS_pipe,
    libc::SYS_poll,
    libc::SYS_time,
    libc::SYS_getrlimit,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_LEGACY: &[libc::c_long] = &[];

/// A condition on argument `arg` (a 32-bit value) of a system call.
fn arg32(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

/// One rule per value: the call is matched when argument `arg` is any of
/// `values`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>> {
    values
        .iter()
        .map(|&v| Ok(SeccompRule::new(vec![arg32(arg, SeccompCmpOp::Eq, v)?])?))
        .collect()
}

/// The allowlist: `ALLOWED` and `ALLOWED_LEGACY` as they are, and the
/// calls allowed only with some arguments.
fn allowed_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>> {
    let mut rules: Vec<(i64, Vec<SeccompRule>)> = ALLOWED
        .iter()
        .chain(ALLOWED_LEGACY)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    rules.push((
        libc::SYS_ioctl,
        any_of(
            1,
            &[
                FUSE_DEV_IOC_CLONE,
                FUSE_DEV_IOC_BACKING_OPEN,
                FUSE_DEV_IOC_BACKING_CLOSE,
            ],
        )?,
    ));
    let prctl: Vec<u64> = PRCTL_OPTIONS.iter().map(|&o| o as u64).collect();
    rules.push((libc::SYS_prctl, any_of(0, &prctl)?));
    rules.push((libc::SYS_unshare, any_of(0, &[libc::CLONE_FS as u64])?));
    // Reading a limit (the C library does, for thread stacks); setting one
    // is done before start.
    rules.push((
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::Eq,
            0,
        )?])?],
    ));
    // Threads; a new process is refused in `refused_rules`.
    let thread = libc::CLONE_THREAD as u64;
    rules.push((
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg32(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    ));
    // Logging to syslog, telling systemd and asking the unmount helper,
    // on sockets connected before the filter: `send` and `recv`, with no
    // address.
    for nr in [libc::SYS_sendto, libc::SYS_recvfrom] {
        rules.push((
            nr,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                4,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::Eq,
                0,
            )?])?],
        ));
    }
    Ok(rules)
}

/// What the daemon never does once started, refused with EPERM: a new
/// socket or connection of any kind (syslog's and systemd's sockets are
/// connected before the filter; a daemon that could connect to any Unix
/// socket could talk to every local service as root), a new process or
/// program, a new io_uring instance or any registration on one.
fn refused_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>> {
    let thread = libc::CLONE_THREAD as u64;
    Ok(vec![
        (libc::SYS_socket, Vec::new()),
        (libc::SYS_socketpair, Vec::new()),
        (libc::SYS_connect, Vec::new()),
        (
            libc::SYS_clone,
            vec![SeccompRule::new(vec![arg32(
                0,
                SeccompCmpOp::MaskedEq(thread),
                0,
            )?])?],
        ),
        #[cfg(target_arch = "x86_64")]
        (libc::SYS_fork, Vec::new()),
        #[cfg(target_arch = "x86_64")]
        (libc::SYS_vfork, Vec::new()),
        (libc::SYS_execve, Vec::new()),
        (libc::SYS_execveat, Vec::new()),
        (libc::SYS_io_uring_setup, Vec::new()),
        (libc::SYS_io_uring_register, Vec::new()),
    ])
}

/// `clone3` passes its flags in memory, which a filter cannot read: it is
/// answered ENOSYS, and the C library then uses `clone`.
fn unimplemented_rules() -> Vec<(i64, Vec<SeccompRule>)> {
    vec![(libc::SYS_clone3, Vec::new())]
}

/// Compiles one part of the program: `rules` get `action`, anything else
/// goes on to the next part.
fn part(
    rules: Vec<(i64, Vec<SeccompRule>)>,
    action: SeccompAction,
    otherwise: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(rules.into_iter().collect(), otherwise, action, arch)?;
    Ok(filter.try_into()?)
}

/// The whole program. seccompiler compiles a filter with one action for
/// the calls it lists and one for the rest; the parts are compiled so and
/// joined, each part's "the rest" becoming a jump to the next part, so
/// that the kernel runs (and caches) one filter.
pub fn program(mode: SeccompMode) -> Result<BpfProgram> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let next = SeccompAction::Trace(CONTINUE_DATA);
    let otherwise = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let parts = [
        part(
            refused_rules()?,
            SeccompAction::Errno(libc::EPERM as u32),
            next.clone(),
            arch,
        )?,
        part(
            unimplemented_rules(),
            SeccompAction::Errno(libc::ENOSYS as u32),
            next.clone(),
            arch,
        )?,
        part(allowed_rules()?, SeccompAction::Allow, otherwise, arch)?,
    ];
    let continue_ret = u32::from(next);
    let mut program = BpfProgram::new();
    for mut part in parts {
        let len = part.len();
        for (i, insn) in part.iter_mut().enumerate() {
            if insn.code == BPF_RET | BPF_K && insn.k == continue_ret {
                // Jump to the first instruction after this part.
                *insn = sock_filter {
                    code: BPF_JMP | BPF_JA,
                    jt: 0,
                    jf: 0,
                    k: (len - i - 1) as u32,
                };
            }
        }
        program.extend(part);
    }
    Ok(program)
}

/// Whether the kernel can run a filter that ends in `mode`'s action: a
/// kernel without `CONFIG_SECCOMP_FILTER`, or older than 4.14 (no
/// KILL_PROCESS, no LOG), cannot.
fn kernel_support(mode: SeccompMode) -> io::Result<()> {
    let action: u32 = match mode {
        SeccompMode::Log => libc::SECCOMP_RET_LOG,
        _ => libc::SECCOMP_RET_KILL_PROCESS,
    };
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads the u32 it is given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Installs the filter on every thread of the process (`mode` Kill or
/// Log; nothing for None). Must run once the mount, its rings and the I/O
/// pool's rings exist, and once nothing else needs a system call the
/// filter refuses. A kernel without seccomp fails an explicit `kill` or
/// `log` with one line, and gets one warning by default.
pub fn apply(mode: SeccompMode) -> Result<()> {
    if mode == SeccompMode::None {
        log::info!("seccomp: off (--seccomp=none)");
        return Ok(());
    }
    if let Err(e) = kernel_support(mode) {
        if mode == SeccompMode::Default {
            log::warn!(
                "seccomp: this kernel cannot filter system calls ({e}); running without the filter"
            );
            return Ok(());
        }
        let name = if mode == SeccompMode::Log {
            "log"
        } else {
            "kill"
        };
        bail!(
            "seccomp={name}: this kernel cannot filter system calls ({e}); mount with \
             seccomp=none, or without the option to run unfiltered"
        );
    }
    let allowed = allowed_rules()?.len();
    let program = program(mode)?;
    // TSYNC: the threads already running get it too; new ones inherit it.
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| anyhow::anyhow!("seccomp: installing the filter: {e}"))?;
    if mode == SeccompMode::Log {
        log::warn!(
            "seccomp=log: system calls outside the allowlist are allowed and logged by the kernel (dmesg, audit type 1326)"
        );
    } else {
        log::info!("seccomp: {allowed} system calls allowed, others kill the daemon");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a child process ended: its exit code, or the signal that
    /// killed it.
    #[derive(Debug, PartialEq)]
    enum End {
        Exit(i32),
        Signal(i32),
    }

    /// Runs `f` in a child process under `mode`'s filter; the child exits
    /// with what `f` returns. The program is compiled here: after a fork in
    /// a threaded test process the child only makes system calls.
    fn under_filter(mode: SeccompMode, f: fn() -> i32) -> End {
        if kernel_support(mode).is_err() {
            eprintln!("this kernel has no seccomp filter: nothing to check");
            return End::Exit(0);
        }
        let program = program(mode).unwrap();
        // SAFETY: the child makes system calls only and ends with _exit.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", io::Error::last_os_error()),
            0 => {
                let code = match seccompiler::apply_filter(&program) {
                    Ok(()) => f(),
                    Err(_) => 100,
                };
                // SAFETY: ends the child without running the parent's
                // destructors or atexit handlers.
                unsafe { libc::_exit(code) }
            }
            child => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
                if libc::WIFSIGNALED(status) {
                    End::Signal(libc::WTERMSIG(status))
                } else {
                    End::Exit(libc::WEXITSTATUS(status))
                }
            }
        }
    }

    /// The errno of the failed system call just made, or 0 if it worked.
    fn errno_of(r: libc::c_long) -> i32 {
        if r < 0 {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    /// What the daemon does is allowed; what it never does once started
    /// fails with EPERM (ENOSYS for clone3) and the process lives on.
    fn allowed_and_refused() -> i32 {
        // SAFETY (all of them): system calls with valid or null pointers;
        // descriptors made here are left to _exit to close.
        unsafe {
            if libc::syscall(libc::SYS_getpid) <= 0 {
                return 1;
            }
            if errno_of(libc::syscall(
                libc::SYS_socket,
                libc::AF_UNIX,
                libc::SOCK_DGRAM,
                0,
            )) != libc::EPERM
            {
                return 2;
            }
            let fd = socket_made_before();
            let addr: libc::sockaddr_un = std::mem::zeroed();
            let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if errno_of(
                libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), addr_len)
                    as libc::c_long,
            ) != libc::EPERM
            {
                return 10;
            }
            // A send on a socket connected before the filter, as syslog's
            // and systemd's are.
            if libc::send(fd, b"x".as_ptr().cast(), 1, 0) != 1 {
                return 11;
            }
            if errno_of(libc::syscall(
                libc::SYS_socket,
                libc::AF_INET,
                libc::SOCK_STREAM,
                0,
            )) != libc::EPERM
            {
                return 3;
            }
            if errno_of(libc::syscall(
                libc::SYS_io_uring_setup,
                1,
                std::ptr::null_mut::<u8>(),
            )) != libc::EPERM
            {
                return 4;
            }
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let r = libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                argv.as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
            );
            if errno_of(r) != libc::EPERM {
                return 5;
            }
            match libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) {
                0 => libc::_exit(6),
                r if errno_of(r) != libc::EPERM => return 7,
                _ => {}
            }
            if errno_of(libc::syscall(
                libc::SYS_clone3,
                std::ptr::null_mut::<u8>(),
                0,
            )) != libc::ENOSYS
            {
                return 8;
            }
            if libc::prctl(libc::PR_SET_NAME, c"filtered".as_ptr()) != 0 {
                return 9;
            }
        }
        0
    }

    /// One end of a connected pair of Unix datagram sockets, made before
    /// the fork (and so before the filter).
    fn socket_made_before() -> libc::c_int {
        SOCKET_BEFORE.load(std::sync::atomic::Ordering::SeqCst)
    }
    static SOCKET_BEFORE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

    fn make_socket_before() {
        let mut pair = [0; 2];
        // SAFETY: socketpair fills a two-element array; the descriptors
        // stay open for the test process's life.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, pair.as_mut_ptr()) };
        assert_eq!(r, 0);
        SOCKET_BEFORE.store(pair[0], std::sync::atomic::Ordering::SeqCst);
    }

    /// A datagram sent to an address (not on the connected socket).
    fn sendto_an_address() -> i32 {
        let addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: sendto from a local buffer to a local (empty) address.
        unsafe {
            libc::sendto(
                socket_made_before(),
                b"x".as_ptr().cast(),
                1,
                0,
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        0
    }

    /// A system call the daemon never makes, with no side effect:
    /// `personality(0xffffffff)` only reads the current persona.
    fn unlisted() -> i32 {
        // SAFETY: a query.
        let r = unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u32) };
        if r < 0 { 1 } else { 0 }
    }

    /// An ioctl other than the FUSE device's (TCGETS on stdin).
    fn other_ioctl() -> i32 {
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: TCGETS fills a termios.
        unsafe { libc::ioctl(0, libc::TCGETS, &mut t) };
        0
    }

    #[test]
    fn allowed_calls_work_and_refused_ones_fail_with_an_errno() {
        make_socket_before();
        assert_eq!(
            under_filter(SeccompMode::Kill, allowed_and_refused),
            End::Exit(0)
        );
        assert_eq!(
            under_filter(SeccompMode::Log, allowed_and_refused),
            End::Exit(0)
        );
    }

    #[test]
    fn anything_else_kills_the_process_or_is_only_logged() {
        assert_eq!(
            under_filter(SeccompMode::Kill, unlisted),
            End::Signal(libc::SIGSYS)
        );
        assert_eq!(
            under_filter(SeccompMode::Kill, other_ioctl),
            End::Signal(libc::SIGSYS)
        );
        make_socket_before();
        assert_eq!(
            under_filter(SeccompMode::Kill, sendto_an_address),
            End::Signal(libc::SIGSYS)
        );
        assert_eq!(under_filter(SeccompMode::Log, unlisted), End::Exit(0));
        assert_eq!(under_filter(SeccompMode::Log, other_ioctl), End::Exit(0));
    }

    #[test]
    fn the_program_is_one_filter_within_the_kernels_limit() {
        let program = program(SeccompMode::Kill).unwrap();
        // BPF_MAXINSNS
        assert!(program.len() <= 4096, "{} instructions", program.len());
        let continue_ret = u32::from(SeccompAction::Trace(CONTINUE_DATA));
        assert!(
            !program
                .iter()
                .any(|i| i.code == BPF_RET | BPF_K && i.k == continue_ret)
        );
    }
}
