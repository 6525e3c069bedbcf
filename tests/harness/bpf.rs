//! Reads the BPF maps a process holds straight from the kernel: the map ids
//! from `/proc/PID/fdinfo`, then `BPF_MAP_GET_FD_BY_ID` and
//! `BPF_MAP_GET_NEXT_KEY` to count the entries. This checks the forwarder's
//! cleanup without trusting the forwarder's own report.

use std::os::fd::{FromRawFd, OwnedFd};

/// One map held by the process.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub id: u32,
    pub map_type: u32,
    pub entries: usize,
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
/// Map types whose keys can be walked (HASH 1, SOCKMAP 15, SOCKHASH 18).
const WALKABLE: [u32; 3] = [1, 15, 18];

#[repr(C)]
#[derive(Default)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct NextKey {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: attr is a properly laid out bpf_attr prefix of the given size.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    }
}

fn count_keys(id: u32, key_size: usize) -> Option<usize> {
    let mut a = GetFdById {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut a);
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut key = vec![0u8; key_size.max(1)];
    let mut next = vec![0u8; key_size.max(1)];
    let mut n = 0usize;
    let mut first = true;
    loop {
        let mut a = NextKey {
            map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut a) != 0 {
            return Some(n);
        }
        first = false;
        n += 1;
        key.copy_from_slice(&next);
        if n > 10_000_000 {
            return Some(n);
        }
    }
}

/// Every hash or socket map the process holds, with its entry count.
pub fn map_entries(pid: u32) -> Vec<MapInfo> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    let mut seen = std::collections::HashSet::new();
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u32> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(map_type), Some(key_size)) =
            (field("map_id:"), field("map_type:"), field("key_size:"))
        else {
            continue;
        };
        if !WALKABLE.contains(&map_type) || !seen.insert(id) {
            continue;
        }
        if let Some(entries) = count_keys(id, key_size as usize) {
            out.push(MapInfo {
                id,
                map_type,
                entries,
            });
        }
    }
    out
}
