//! Where a file's limits come from, and pushing them to the scheduler.
//!
//! A file's limits are its own `user.throttle.*` attributes if it has
//! any, else those of the nearest directory above it that has any (the
//! mount's root included), else the mount options; its throttle group is
//! found the same way. Group limits are stored on the mount's root
//! (`user.throttle.group.NAME.*`), else come from `--group`. Sets are
//! validated whole before anything is stored.
//!
//! Resolution is lazy: a change to a directory bumps `tree_gen`, and a
//! file resolved at an older value is resolved again before its next use
//! (open, request, `user.throttle.effective`); open files at once.
//!
//! What the passthrough (`super`) calls:
//! - `ensure_limits(node)`: bring a file's limits up to date before use;
//! - `refresh(node)`, `directory_changed()`, `after_change(node)`: an
//!   object moved or its attributes changed;
//! - `resolve_stale()`: before a report that lists files;
//! - `set_limit`, `remove_limit`, `set_group`, `set_group_limit`,
//!   `remove_group_limit`: setxattr/removexattr of our names;
//! - `generated_attr(node, attr)`, `group_stats(node, group)`: the
//!   read-only attributes;
//! - `known_groups()`, `push_group_limits(group)`: at mount time.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuser::{Errno, INodeNo};

use super::{
    InodeRef, Result, ThrottleFs, XATTR_VALUE_MAX_BYTES, get_raw, last_errno, list_names,
    proc_path, remove_raw, set_raw, stat_fd,
};
use crate::options::{is_per_gb_name, per_gb_in_group};
use crate::qos::{self, QosSettings};
use crate::scheduler::Msg;
use crate::sizing::{self, IMAGE_FORMAT, ImageFormat};
use crate::stats::{self, Effective, Origin};
use crate::throttle::Limits;
use crate::xattr::{self, Attr, OwnSet};

/// How long a FUSE thread waits for the scheduler's report on a group.
const GROUP_STATS_TIMEOUT: Duration = Duration::from_secs(5);

impl ThrottleFs {
    /// Resolve a file's limits if they never were, or if a directory
    /// changed since they were.
    pub(super) fn ensure_limits(&self, node: &InodeRef) {
        let current = self.tree_gen.load(Ordering::SeqCst);
        if node.resolved_gen.load(Ordering::SeqCst) == current {
            return;
        }
        let _one = node.resolving.lock().expect("resolving");
        // Another thread may have done it while this one waited.
        if node.resolved_gen.load(Ordering::SeqCst) != self.tree_gen.load(Ordering::SeqCst) {
            self.resolve_and_send(node);
        }
    }

    /// Work out a file's limits again and hand them to the scheduler.
    pub(super) fn refresh(&self, node: &InodeRef) {
        let _one = node.resolving.lock().expect("resolving");
        self.resolve_and_send(node);
    }

    /// `refresh`, with the node's `resolving` lock held: of two racing
    /// resolutions, the one that read the attributes last sends last.
    fn resolve_and_send(&self, node: &InodeRef) {
        // Read before the walk: a change during it leaves the file stale,
        // to be resolved again at its next use.
        let generation = self.tree_gen.load(Ordering::SeqCst);
        let mut eff = self.resolve(node);
        // Per-GiB limits are made concrete, and sent, with the lock held:
        // a write that resizes the disk meanwhile re-evaluates after this
        // one (`sizing::reevaluate`), never before.
        let mut stored = node.shared.effective.lock().expect("effective");
        sizing::attach(&node.shared, &self.scheduler);
        sizing::derive(&mut eff, node.fd, &node.shared.size_watch);
        let limits = eff.limits;
        let group = eff.group.as_ref().map(|(g, _)| g.clone());
        let qos = eff.qos.qos();
        if !limits.is_unlimited() || group.is_some() {
            // From now on requests go to the scheduler; it sets the flag
            // again once the file (and its group, which only it knows) is
            // unlimited and idle.
            node.shared.bypass.store(false, Ordering::SeqCst);
        }
        *stored = Some(eff);
        let _ = self.scheduler.send(Msg::Limits {
            file: node.ino,
            limits,
            group,
            qos,
            shared: node.shared.clone(),
        });
        drop(stored);
        node.resolved_gen.store(generation, Ordering::SeqCst);
    }

    /// A directory's limits, group or place changed: any file resolved so
    /// far may inherit differently. Each is resolved again before its next
    /// use; open files at once, so their queued requests are retuned now.
    pub(super) fn directory_changed(&self) {
        self.tree_gen.fetch_add(1, Ordering::SeqCst);
        let mut open: HashMap<u64, Arc<InodeRef>> = HashMap::new();
        for f in self.files.read().expect("file lock").values() {
            open.entry(f.node.ino).or_insert_with(|| f.node.clone());
        }
        for node in open.values().filter(|n| n.is_file()) {
            self.ensure_limits(node);
        }
    }

    /// Bring every file resolved so far up to date, before a report that
    /// lists them (a group's members).
    pub(super) fn resolve_stale(&self) {
        let current = self.tree_gen.load(Ordering::SeqCst);
        let stale = self.file_inodes().into_iter().filter(|n| {
            let resolved = n.resolved_gen.load(Ordering::SeqCst);
            resolved != 0 && resolved != current
        });
        for node in stale {
            self.ensure_limits(&node);
        }
    }

    pub(super) fn after_change(&self, node: &InodeRef) {
        if node.is_dir() {
            self.directory_changed();
        } else if node.is_file() {
            self.refresh(node);
        }
    }

    /// The limits in force for `node`, whole sets only: its own if it has
    /// any, else those of the nearest ancestor directory that has any
    /// (the mount's root included), else the mount options. Its throttle
    /// group is found the same way, independently, from the same walk.
    fn resolve(&self, node: &InodeRef) -> Effective {
        // Walked once, and only if the node itself does not settle both.
        let dirs = OnceCell::new();
        let (limits, origin) = self
            .find_up(node, &dirs, |fd| self.own_limits(fd))
            .unwrap_or((self.limits, Origin::Mount));
        let group = self.find_up(node, &dirs, |fd| self.own_group(fd));
        let image_format = self
            .find_up(node, &dirs, |fd| self.own_image_format(fd))
            .unwrap_or((self.image_format, Origin::Mount));
        let mut qos = QosSettings::default();
        for name in qos::NAMES {
            if let Some((value, origin)) = self.find_up(node, &dirs, |fd| self.own_qos(fd, name)) {
                qos.put(name, value, origin);
            }
        }
        Effective {
            limits,
            origin,
            group,
            qos,
            sizing: None,
            image_format,
        }
    }

    /// An object's own `user.throttle.image_format`, if it has a valid one.
    fn own_image_format(&self, fd: RawFd) -> Option<ImageFormat> {
        let name = format!("{}{IMAGE_FORMAT}", xattr::PREFIX);
        self.own_attr(fd, &name, "it", ImageFormat::parse_bytes)
    }

    /// An object's own attribute `name` parsed by `parse`, if it has one
    /// and it is valid; an invalid one (written on the source directly) is
    /// ignored with a warning that names `what`.
    fn own_attr<T>(
        &self,
        fd: RawFd,
        name: &str,
        what: &str,
        parse: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
    ) -> Option<T> {
        let name = CString::new(name).expect("no NUL");
        let value = get_raw(&proc_path(fd), &name).ok()?;
        match parse(&value) {
            Ok(v) => Some(v),
            Err(why) => {
                log::warn!("{}: ignoring {what}: {why}", self.display_path(fd));
                None
            }
        }
    }

    /// setxattr of `user.throttle.image_format` on a file or directory:
    /// validated, stored in canonical form, and the per-GiB limits of the
    /// files it reaches sized again at once.
    pub(super) fn set_image_format(
        &self,
        node: &InodeRef,
        name: &CString,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let label = self.display_path(node.fd);
        let format = ImageFormat::parse_bytes(value).map_err(|why| {
            log::warn!("{label}: refused: {why}");
            Errno::EINVAL
        })?;
        if !node.is_file() && !node.is_dir() {
            return Err(Errno::EINVAL);
        }
        set_raw(node.fd, name, format.as_str().as_bytes(), flags)?;
        log::info!("{label}: {IMAGE_FORMAT}={}", format.as_str());
        self.after_change(node);
        Ok(())
    }

    /// An object's own `user.throttle.<name>` (weight or a reservation), if
    /// it has a valid one.
    fn own_qos(&self, fd: RawFd, name: &str) -> Option<u64> {
        let attr = format!("{}{name}", xattr::PREFIX);
        self.own_attr(fd, &attr, "it", |value| {
            qos::parse(name, &String::from_utf8_lossy(value))
        })
    }

    /// setxattr of `user.throttle.weight`, `reserve_iops` or `reserve_bps`
    /// on a file or directory: validated, stored in canonical form,
    /// applied at once (to queued requests too).
    pub(super) fn set_qos(
        &self,
        node: &InodeRef,
        name: &CString,
        setting: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let label = self.display_path(node.fd);
        let canon = qos::canonical(setting, value).map_err(|why| {
            log::warn!("{label}: {setting} refused: {why}");
            Errno::EINVAL
        })?;
        if !node.is_file() && !node.is_dir() {
            return Err(Errno::EINVAL);
        }
        set_raw(node.fd, name, canon.as_bytes(), flags)?;
        log::info!("{label}: {setting}={canon}");
        self.after_change(node);
        Ok(())
    }

    /// The first of `node` (unless a directory: origin File) and then the
    /// directories it inherits from (`directories_above`, walked into
    /// `dirs` on first use; origin Directory) for which `check` finds
    /// something.
    fn find_up<T>(
        &self,
        node: &InodeRef,
        dirs: &OnceCell<Vec<OwnedFd>>,
        check: impl Fn(RawFd) -> Option<T>,
    ) -> Option<(T, Origin)> {
        if !node.is_dir()
            && let Some(found) = check(node.fd)
        {
            return Some((found, Origin::File));
        }
        dirs.get_or_init(|| self.directories_above(node))
            .iter()
            .find_map(|dir| {
                let found = check(dir.as_raw_fd())?;
                Some((found, Origin::Directory(self.display_path(dir.as_raw_fd()))))
            })
    }

    /// The directories whose attributes `node` inherits, nearest first: a
    /// directory itself, or a file's directory, then each parent up to the
    /// source root. Directories are walked through "..": each has exactly
    /// one parent. Empty unless the walk reaches the source root: a
    /// directory moved out of the source behind our back must not lend its
    /// files limits stored outside the source.
    fn directories_above(&self, node: &InodeRef) -> Vec<OwnedFd> {
        let start = if node.is_dir() {
            node.fd
        } else {
            let parent = node.parent.load(Ordering::Relaxed);
            match self.inode(INodeNo(parent)) {
                Ok(p) => p.fd,
                Err(_) => return Vec::new(),
            }
        };
        // SAFETY: dup of a descriptor we hold.
        let first = unsafe { libc::fcntl(start, libc::F_DUPFD_CLOEXEC, 0) };
        if first < 0 {
            self.note_fd_error(last_errno(), "resolving limits");
            return Vec::new();
        }
        // SAFETY: fresh descriptor.
        let mut dirs = vec![unsafe { OwnedFd::from_raw_fd(first) }];
        loop {
            let dir = dirs.last().expect("non-empty").as_raw_fd();
            let Ok(st) = stat_fd(dir) else {
                return Vec::new();
            };
            if (st.st_dev, st.st_ino) == self.root_key {
                return dirs;
            }
            // SAFETY: *at call on a directory descriptor we hold.
            let up = unsafe {
                libc::openat(
                    dir,
                    c"..".as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if up < 0 {
                self.note_fd_error(last_errno(), "resolving limits");
                return Vec::new();
            }
            // SAFETY: fresh descriptor.
            let up = unsafe { OwnedFd::from_raw_fd(up) };
            match stat_fd(up.as_raw_fd()) {
                Ok(ust) if (ust.st_dev, ust.st_ino) != (st.st_dev, st.st_ino) => dirs.push(up),
                // The filesystem root, and no source root on the way: the
                // object is not under the source any more.
                _ => return Vec::new(),
            }
        }
    }

    /// An object's own `user.throttle.group`, if it has a valid one.
    fn own_group(&self, fd: RawFd) -> Option<String> {
        self.own_attr(fd, xattr::GROUP, "its group", xattr::group_name)
    }

    /// An object's own limits, `None` when it has none. A stored set that
    /// is invalid (written on the source directly) is ignored with a
    /// warning.
    fn own_limits(&self, fd: RawFd) -> Option<Limits> {
        let set = match self.own_set(fd) {
            Ok(set) if set.is_empty() => return None,
            Ok(set) => set,
            Err(e) => {
                log::warn!(
                    "{}: reading throttle attributes: {e:?}",
                    self.display_path(fd)
                );
                return None;
            }
        };
        match set.limits() {
            Ok(limits) => Some(limits),
            Err(why) => {
                log::warn!(
                    "{}: ignoring its throttle attributes: {why}",
                    self.display_path(fd)
                );
                None
            }
        }
    }

    /// The `user.throttle.<limit>` attributes stored on an object.
    fn own_set(&self, fd: RawFd) -> Result<OwnSet> {
        self.stored_set(fd, |attr| match attr {
            Attr::Limit(limit) => Some(limit),
            _ => None,
        })
    }

    /// The limits stored in an object's attributes: those `pick` maps to a
    /// limit name, with their stored text.
    fn stored_set(&self, fd: RawFd, pick: impl Fn(Attr) -> Option<String>) -> Result<OwnSet> {
        let path = proc_path(fd);
        let names = list_names(&path).map_err(Errno::from)?;
        let mut set = OwnSet::default();
        for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let Some(limit) = xattr::classify(name).and_then(&pick) else {
                continue;
            };
            let cname = CString::new(name).map_err(|_| Errno::EINVAL)?;
            match get_raw(&path, &cname) {
                Ok(v) => {
                    set.values
                        .insert(limit, String::from_utf8_lossy(&v).into_owned());
                }
                // Removed in between: not part of the set.
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(Errno::from(e)),
            }
        }
        Ok(set)
    }

    /// setxattr of `user.throttle.<limit>`: validated against the whole
    /// resulting set, stored on the underlying object, applied at once.
    pub(super) fn set_limit(
        &self,
        node: &InodeRef,
        name: &CString,
        limit: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let label = self.display_path(node.fd);
        self.store_limit(
            node.fd,
            name,
            &label,
            || self.own_set(node.fd),
            limit,
            value,
            flags,
        )?;
        self.after_change(node);
        Ok(())
    }

    /// removexattr of `user.throttle.<limit>`: the rest of the set must
    /// still be valid on its own.
    pub(super) fn remove_limit(&self, node: &InodeRef, name: &CString, limit: &str) -> Result<()> {
        let label = self.display_path(node.fd);
        self.unstore_limit(node.fd, name, &label, self.own_set(node.fd)?, limit)?;
        self.after_change(node);
        Ok(())
    }

    /// Store one limit of a set (a file's or directory's own, or a group's
    /// on the root) in attribute `name` of `fd`: the value in canonical
    /// form, once the whole resulting set, read by `current`, is valid.
    /// `label` names the set in the log line that says why a value is
    /// refused.
    #[allow(clippy::too_many_arguments)] // one set, its place, and the value
    fn store_limit(
        &self,
        fd: RawFd,
        name: &CString,
        label: &str,
        current: impl FnOnce() -> Result<OwnSet>,
        limit: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let canon = xattr::canonical(limit, value).map_err(|why| {
            log::warn!("{label}: {limit} refused: {why}");
            Errno::EINVAL
        })?;
        let mut set = current()?;
        set.values.insert(limit.to_string(), canon.clone());
        set.limits().map_err(|why| {
            log::warn!("{label}: {limit}={canon} refused: {why}");
            Errno::EINVAL
        })?;
        set_raw(fd, name, canon.as_bytes(), flags)?;
        log::info!("{label}: {limit}={canon}");
        Ok(())
    }

    /// Remove one limit of `set`, stored in attribute `name` of `fd`, if
    /// the rest of the set stays valid on its own.
    fn unstore_limit(
        &self,
        fd: RawFd,
        name: &CString,
        label: &str,
        mut set: OwnSet,
        limit: &str,
    ) -> Result<()> {
        if set.values.remove(limit).is_none() {
            return Err(Errno::NO_XATTR);
        }
        if !set.is_empty() {
            set.limits().map_err(|why| {
                log::warn!("{label}: removing {limit} refused: {why}");
                Errno::EINVAL
            })?;
        }
        remove_raw(fd, name)?;
        log::info!("{label}: {limit} removed");
        Ok(())
    }

    /// setxattr of `user.throttle.group` on a file or directory.
    pub(super) fn set_group(
        &self,
        node: &InodeRef,
        name: &CString,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        let group = xattr::group_name(value).map_err(|why| {
            log::warn!("{}: refused: {why}", self.display_path(node.fd));
            Errno::EINVAL
        })?;
        if !node.is_file() && !node.is_dir() {
            return Err(Errno::EINVAL);
        }
        set_raw(node.fd, name, group.as_bytes(), flags)?;
        log::info!("{}: group {group}", self.display_path(node.fd));
        self.after_change(node);
        Ok(())
    }

    /// The root, where group limits live; other inodes refuse them.
    fn require_root(&self, node: &InodeRef, what: &str) -> Result<()> {
        if node.ino == INodeNo::ROOT.0 {
            Ok(())
        } else {
            log::warn!(
                "{}: {what}: group limits are set on the mount's root directory",
                self.display_path(node.fd)
            );
            Err(Errno::EINVAL)
        }
    }

    /// A group's limits as stored on the root: `user.throttle.group.NAME.*`.
    fn group_own_set(&self, group: &str) -> Result<OwnSet> {
        let root = self.inode(INodeNo::ROOT)?;
        self.stored_set(root.fd, |attr| match attr {
            Attr::GroupLimit { group: g, limit } if g == group => Some(limit),
            _ => None,
        })
    }

    /// Groups named by the mount options or by attributes on the root.
    pub(super) fn known_groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.group_defaults.keys().cloned().collect();
        if let Ok(root) = self.inode(INodeNo::ROOT) {
            let names = list_names(&proc_path(root.fd)).unwrap_or_default();
            for name in names.split(|b| *b == 0) {
                if let Some(Attr::GroupLimit { group, .. }) = xattr::classify(name) {
                    groups.push(group);
                }
            }
        }
        groups.sort();
        groups.dedup();
        groups
    }

    /// A group's limits in force: its set on the root if it has any
    /// (whole sets, as for files), else the mount option's, else none.
    fn group_limits(&self, group: &str) -> (Limits, &'static str) {
        match self.group_own_set(group) {
            Ok(set) if !set.is_empty() => match set.limits() {
                Ok(limits) if limits.per_gb.iter().any(|p| p.is_set()) => log::warn!(
                    "group {group}: ignoring its attributes on the root: a group has no size for per-GiB limits"
                ),
                Ok(limits) => return (limits, "root"),
                Err(why) => log::warn!("group {group}: ignoring its attributes on the root: {why}"),
            },
            Ok(_) => {}
            Err(e) => log::warn!("group {group}: reading its attributes: {e:?}"),
        }
        match self.group_defaults.get(group) {
            Some(limits) => (*limits, "mount"),
            None => (Limits::default(), "none"),
        }
    }

    pub(super) fn push_group_limits(&self, group: &str) {
        let (limits, _) = self.group_limits(group);
        let _ = self.scheduler.send(Msg::GroupLimits {
            name: group.to_string(),
            limits,
        });
    }

    /// setxattr of `user.throttle.group.NAME.<limit>` on the root.
    pub(super) fn set_group_limit(
        &self,
        node: &InodeRef,
        name: &CString,
        group: &str,
        limit: &str,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.require_root(node, limit)?;
        let label = format!("group {group}");
        if is_per_gb_name(limit) {
            log::warn!("{label}: refused: {}", per_gb_in_group(limit));
            return Err(Errno::EINVAL);
        }
        let current = || self.group_own_set(group);
        self.store_limit(node.fd, name, &label, current, limit, value, flags)?;
        self.push_group_limits(group);
        Ok(())
    }

    pub(super) fn remove_group_limit(
        &self,
        node: &InodeRef,
        name: &CString,
        group: &str,
        limit: &str,
    ) -> Result<()> {
        self.require_root(node, limit)?;
        let label = format!("group {group}");
        self.unstore_limit(node.fd, name, &label, self.group_own_set(group)?, limit)?;
        self.push_group_limits(group);
        Ok(())
    }

    /// `user.throttle.group.NAME.stats` on the root: where the limits come
    /// from and what they are, the members, requests waiting, totals.
    pub(super) fn group_stats(&self, node: &InodeRef, group: &str) -> Option<Vec<u8>> {
        if node.ino != INodeNo::ROOT.0 {
            return None;
        }
        // Members are the files the scheduler knows in the group.
        self.resolve_stale();
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.scheduler
            .send(Msg::GroupStats {
                name: group.to_string(),
                reply: tx,
            })
            .ok()?;
        let report = rx.recv_timeout(GROUP_STATS_TIMEOUT).ok()?;
        let (limits, source) = self.group_limits(group);
        let mut out = format!("source={source}\n");
        for (name, value) in xattr::set_limits(&limits) {
            out.push_str(&format!("{name}={value}\n"));
        }
        out.push_str(&format!("members={}\n", report.members.len()));
        let mut tail = format!(
            "waiting={}\nread_bytes={}\nread_ops={}\nwrite_bytes={}\nwrite_ops={}\n",
            report.waiting, report.bytes[0], report.ops[0], report.bytes[1], report.ops[1]
        );
        tail += &qos::render_group_reservations(&report, &limits);
        stats::render_buckets(&mut tail, "", &report.buckets);
        // One line per member until the value would pass what an xattr may
        // hold; then only how many were left out.
        let mut unlisted = 0;
        for (listed, member) in report.members.iter().enumerate() {
            let path = self
                .inode(INodeNo(*member))
                .map(|n| self.display_path(n.fd))
                .unwrap_or_else(|_| format!("inode {member}"));
            let line = format!("member={path}\n");
            if out.len() + line.len() + tail.len() + xattr::UNLISTED_LINE_BYTES
                > XATTR_VALUE_MAX_BYTES
            {
                unlisted = report.members.len() - listed;
                break;
            }
            out.push_str(&line);
        }
        if unlisted > 0 {
            out.push_str(&format!("members_unlisted={unlisted}\n"));
        }
        out.push_str(&tail);
        Some(out.into_bytes())
    }

    /// `user.throttle.stats`: the file's counters, then its buckets and
    /// its group's as the scheduler has them now (empty where it has none).
    fn file_stats(&self, node: &InodeRef) -> String {
        let mut out = node.shared.render_stats();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let buckets = self
            .scheduler
            .send(Msg::FileBuckets {
                file: node.ino,
                reply: tx,
            })
            .ok()
            .and_then(|()| rx.recv_timeout(GROUP_STATS_TIMEOUT).ok())
            .unwrap_or_default();
        // A file never opened is resolved for this answer only.
        let eff = node.shared.effective.lock().expect("effective").clone();
        let eff = eff.unwrap_or_else(|| self.resolve(node));
        let file = buckets
            .file
            .unwrap_or_else(|| stats::empty_readings(eff.limits));
        stats::render_buckets(&mut out, "", &file);
        let group = buckets.group.or_else(|| {
            let (name, _) = eff.group.as_ref()?;
            Some(stats::empty_readings(self.group_limits(name).0))
        });
        if let Some(group) = group {
            stats::render_buckets(&mut out, "group_", &group);
        }
        out
    }

    fn generated_attr_applies(&self, node: &InodeRef, attr: &Attr) -> bool {
        match attr {
            Attr::Effective => node.is_file() || node.is_dir(),
            Attr::Stats => node.is_file(),
            _ => false,
        }
    }

    /// The read-only attributes' text; `None` where they do not apply.
    pub(super) fn generated_attr(&self, node: &InodeRef, attr: &Attr) -> Option<Vec<u8>> {
        if !self.generated_attr_applies(node, attr) {
            return None;
        }
        match attr {
            Attr::Effective => {
                // A file opened before is kept up to date; one never opened
                // is resolved for this answer only.
                if node.is_file() && node.resolved_gen.load(Ordering::SeqCst) != 0 {
                    self.ensure_limits(node);
                }
                let eff = node.shared.effective.lock().expect("effective").clone();
                let eff = eff.unwrap_or_else(|| {
                    let mut eff = self.resolve(node);
                    // Sized for this answer only: nothing to watch yet. A
                    // directory shows its per-GiB rates as they are.
                    if node.is_file() {
                        sizing::derive(&mut eff, node.fd, &sizing::SizeWatch::default());
                    }
                    eff
                });
                let passthrough = node.shared.passthrough_handles();
                Some(xattr::render_effective(&eff, passthrough).into_bytes())
            }
            Attr::Stats => Some(self.file_stats(node).into_bytes()),
            _ => None,
        }
    }
}
