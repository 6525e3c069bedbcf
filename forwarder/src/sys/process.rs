//! The process and its threads: namespaces, capabilities, resource
//! limits, process handles and the umask.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Moves the calling thread into the network namespace of `fd` (needs
/// CAP_SYS_ADMIN over the namespace's owning user namespace).
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?)
}

/// Sets the process umask for the guard's lifetime.
pub struct Umask(nix::sys::stat::Mode);

impl Umask {
    pub fn set(mask: libc::mode_t) -> Umask {
        Umask(nix::sys::stat::umask(
            nix::sys::stat::Mode::from_bits_truncate(mask),
        ))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

/// Reduces the calling thread's capabilities to `keep` (those of them it
/// holds): the bounding set first (while CAP_SETPCAP may still be
/// effective), then ambient, inheritable, effective and permitted, and sets
/// no_new_privs so no later exec can gain any back.
///
/// capset(2) changes only the calling thread, so every thread that existed
/// before must drop its own; threads created afterwards inherit the reduced
/// sets. Returns an error only when the permitted set could not be reduced.
pub fn drop_thread_capabilities(keep: &[caps::Capability]) -> io::Result<()> {
    use caps::{CapSet, CapsHashSet};
    let permitted = caps::read(None, CapSet::Permitted).map_err(io::Error::other)?;
    let keep: CapsHashSet = permitted
        .iter()
        .filter(|c| keep.contains(c))
        .copied()
        .collect();
    // Best effort: without CAP_SETPCAP the bounding set stays, which only
    // matters to exec of a binary with file capabilities (no_new_privs
    // below covers that too).
    for cap in caps::all() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    let _ = caps::clear(None, CapSet::Ambient);
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(io::Error::other)?;
    caps::set(None, CapSet::Effective, &keep).map_err(io::Error::other)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(io::Error::other)?;
    nix::sys::prctl::set_no_new_privs()?;
    Ok(())
}

/// The calling thread's effective capability set as a bit mask (CapEff of
/// `/proc/thread-self/status`), for logs and checks.
pub fn thread_cap_eff() -> u64 {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(u64::MAX)
}

/// Opens a pidfd for `pid` (Linux 5.3): readable once the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(rustix::process::pidfd_open(
        pid,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// The soft RLIMIT_NOFILE.
pub fn nofile_limit() -> io::Result<u64> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: a forwarder holds two
/// sockets (and in splice mode up to four pipe ends) per connection.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Grows this process's descriptor table to `slots` entries now, so it
/// never has to grow while connections are being set up.
///
/// The kernel doubles a process's descriptor table when a new descriptor
/// does not fit (64, 256, 512, 1,024, ...), and in a process with more than
/// one thread each doubling waits for an RCU grace period before the new
/// descriptor is returned: 8 to 16 ms per doubling on the 2-vCPU machine of
/// the bench (6.18). The thread that waits is whichever made the
/// descriptor (an accept, a dial, a UDP flow's socket), so every
/// connection and datagram behind it waits too: the datagrams of new UDP
/// flows then reach the container's server in one burst that overflows
/// its receive buffer. Growing the table once, early, costs 8 bytes of
/// kernel memory per slot (128 KiB for 16,384) and no wait.
///
/// Any call that makes a descriptor at or above `slots - 1` would do; this
/// duplicates standard error there and closes the copy, which leaves the
/// table at its new size.
pub fn reserve_descriptors(slots: u32) -> io::Result<()> {
    let Some(last) = slots.checked_sub(1) else {
        return Ok(());
    };
    let last = i32::try_from(last).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    drop(rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), last)?);
    Ok(())
}

/// The size of this process's descriptor table (`FDSize` in
/// /proc/self/status).
pub fn descriptor_table_size() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no FDSize in /proc/self/status"))
}

/// Raises RLIMIT_MEMLOCK to unlimited: kernels before 5.11 charge BPF maps
/// to it (newer ones use the memory cgroup, so failure is harmless there).
pub fn raise_memlock_limit() -> io::Result<()> {
    Ok(setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    )?)
}

/// This process's effective uid.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Asks for SIGTERM when the parent thread exits (PR_SET_PDEATHSIG).
pub fn term_with_parent() -> io::Result<()> {
    Ok(nix::sys::prctl::set_pdeathsig(
        nix::sys::signal::Signal::SIGTERM,
    )?)
}

/// Arranges for `cmd`'s child, between fork and exec, to join the user
/// namespace `userns` (when given: allowed to the namespace's owner), then
/// the network namespace `netns` (CAP_SYS_ADMIN over its user namespace),
/// to find `fd3` on descriptor 3, and to get SIGTERM when this thread ends.
pub fn enter_namespaces_on_exec(
    cmd: &mut std::process::Command,
    userns: Option<BorrowedFd<'_>>,
    netns: BorrowedFd<'_>,
    fd3: BorrowedFd<'_>,
) {
    use std::os::unix::process::CommandExt;
    let (user_fd, net_fd, agent_fd) = (
        userns.map(|f| f.as_raw_fd()),
        netns.as_raw_fd(),
        fd3.as_raw_fd(),
    );
    // SAFETY: only async-signal-safe calls between fork and exec (nix's
    // setns, fcntl and prctl are plain syscalls), on descriptors the caller
    // keeps open until spawn returns; borrow_raw's borrows end with the
    // hook.
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            use nix::sched::{setns, CloneFlags};
            // Namespaces first: the namespace files may sit on descriptor
            // 3, which the dup2 below replaces.
            if let Some(u) = user_fd {
                setns(BorrowedFd::borrow_raw(u), CloneFlags::CLONE_NEWUSER)?;
            }
            setns(BorrowedFd::borrow_raw(net_fd), CloneFlags::CLONE_NEWNET)?;
            if agent_fd == 3 {
                // dup2 onto itself would leave close-on-exec set.
                fcntl(
                    BorrowedFd::borrow_raw(3),
                    FcntlArg::F_SETFD(FdFlag::empty()),
                )?;
            } else if libc::dup2(agent_fd, 3) < 0 {
                // By hand: nix's dup2 wants the target as an OwnedFd, and
                // descriptor 3 is not one this process owns.
                return Err(io::Error::last_os_error());
            }
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
            Ok(())
        });
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// Whether thread `tid` of this process is asleep (state `S` in
/// `/proc/self/task/TID/stat`).
pub fn thread_sleeping(tid: i32) -> io::Result<bool> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    // "tid (comm) state ...": comm may hold spaces and parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .ok_or_else(|| io::Error::other(format!("unexpected stat of thread {tid}")))?;
    Ok(state == "S")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_descriptors_grow_the_table_once() {
        // The test harness runs this on a thread of its own: the process
        // has several threads, as the forwarder has.
        let before = descriptor_table_size().unwrap();
        let most = nofile_limit().unwrap();
        let want = (before * 2).max(1024).min(most);
        reserve_descriptors(want as u32).unwrap();
        let after = descriptor_table_size().unwrap();
        assert!(after >= want, "FDSize {after}, asked for {want}");
        // Nothing left open at the top of the table.
        let top = i32::try_from(want - 1).unwrap();
        // SAFETY: fcntl on a number that may not be open only asks.
        assert_eq!(unsafe { libc::fcntl(top, libc::F_GETFD) }, -1);
        reserve_descriptors(0).unwrap();
    }
}
