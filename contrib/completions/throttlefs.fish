# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_throttlefs_global_optspecs
    string join \n f/foreground bps= bps-rd= bps-wr= iops= iops-rd= iops-wr= o= v io-threads= io-uring= sandbox= seccomp= image-format= group= passthrough h/help V/version
end

function __fish_throttlefs_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_throttlefs_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_throttlefs_using_subcommand
    set -l cmd (__fish_throttlefs_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c throttlefs -n "__fish_throttlefs_needs_command" -l bps -d 'limit total (read + write) bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l bps-rd -d 'limit read bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l bps-wr -d 'limit write bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l iops -d 'limit total operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l iops-rd -d 'limit read operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l iops-wr -d 'limit write operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -s o -d 'limit (NAME=VALUE, see below) or FUSE mount option; repeatable' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l io-threads -d 'I/O worker threads (1 to 1024, default 8; with io_uring, at most one per core)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l io-uring -d 'FUSE requests over io_uring: auto (when the kernel offers it), on (or fail), off (/dev/fuse only, the default)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l sandbox -d 'confine the daemon once mounted: landlock (the default: only the source directory, only the capabilities it needs; asked for explicitly, a kernel without Landlock fails the mount), none' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l seccomp -d 'system calls the daemon never makes: kill (the default: they kill it), log (they are logged by the kernel, for diagnosing), none' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l image-format -d 'how per-GiB limits size a disk where no user.throttle.image_format says: raw (the file\'s size), qcow2 (the header\'s virtual size), auto (probe the header, the default)' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l group -d 'limits shared by the files of throttle group NAME, e.g. tenant1:bps=20M,iops=400; repeatable' -r
complete -c throttlefs -n "__fish_throttlefs_needs_command" -s f -l foreground -d 'stay in the foreground, logging to stderr, instead of detaching once the mount is live (and logging to syslog)'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -s v -d 'more log output; repeat for even more'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -l passthrough -d 'open files without a limit in FUSE passthrough: the kernel reads and writes them itself (needs CAP_SYS_ADMIN; a limit set later applies from the next open)'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -s h -l help -d 'Print help'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -s V -l version -d 'Print version'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "stat" -d 'One snapshot of a mount\'s or a file\'s rates, limits and group'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "top" -d 'Live view of a mount\'s open or active files and groups'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "set" -d 'Set limits or the throttle group of a file or directory'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "get" -d 'Show the limits and group of a file, a directory or a group'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "unset" -d 'Remove limits or the group membership of a file or directory'
complete -c throttlefs -n "__fish_throttlefs_needs_command" -a "completions" -d 'Print the shell completion script for SHELL on standard output'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand stat" -l json -d 'JSON instead of a table'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand stat" -l prometheus -d 'Prometheus text exposition format (for node_exporter\'s textfile collector)'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand stat" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand top" -s d -l delay -d 'time between refreshes (humantime, or seconds)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand top" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l bps -d 'limit total (read + write) bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l bps-rd -d 'limit read bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l bps-wr -d 'limit write bytes per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l iops -d 'limit total operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l iops-rd -d 'limit read operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l iops-wr -d 'limit write operations per second (0 = unlimited)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -s o -d 'any limit by its name (bps_max, iops_size, ...); repeatable' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l group -d 'join throttle group NAME (files below a directory inherit it)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l weight -d 'share of its group when the group is saturated, 1 to 10000 (default 100)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l reserve-iops -d 'operations/s reserved in its group while it has requests waiting' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l reserve-bps -d 'bytes/s reserved in its group while it has requests waiting' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l image-format -d 'how per-GiB limits size the disk: raw (the file\'s size), qcow2 (the header\'s virtual size) or auto (probe; files below a directory inherit it)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -l group-limits -d 'set the limits of throttle group NAME instead (PATH: the mount point)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand set" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand get" -l group-limits -d 'show the limits of throttle group NAME instead (PATH: the mount point)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand get" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand unset" -l group-limits -d 'remove limits of throttle group NAME instead (PATH: the mount point)' -r
complete -c throttlefs -n "__fish_throttlefs_using_subcommand unset" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c throttlefs -n "__fish_throttlefs_using_subcommand completions" -s h -l help -d 'Print help'
