//! Reads the BPF maps a process holds straight from the kernel: the map ids
//! from `/proc/PID/fdinfo`, then `BPF_MAP_GET_FD_BY_ID` and
//! `BPF_MAP_GET_NEXT_KEY` to count the entries. This checks the forwarder's
//! cleanup without trusting the forwarder's own report.

use std::os::fd::{FromRawFd, OwnedFd};

/// One map held by the process.
#[derive(Debug, Clone)]
pub struct MapInfo {
    pub id: u32,
    /// The map's name as the kernel knows it (at most 15 bytes).
    pub name: String,
    pub map_type: u32,
    pub entries: usize,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const HASH: u32 = 1;
const SOCKMAP: u32 = 15;
const SOCKHASH: u32 = 18;
/// Map types whose entries are counted (HASH, SOCKMAP, SOCKHASH).
const WALKABLE: [u32; 3] = [HASH, SOCKMAP, SOCKHASH];

#[repr(C)]
#[derive(Default)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `bpf_attr` for BPF_MAP_LOOKUP_ELEM.
#[repr(C)]
#[derive(Default)]
struct Lookup {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
#[derive(Default)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_map_info`, up to and including the name.
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
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

/// Counts the entries of map `id`. Hash maps hold exactly the keys
/// BPF_MAP_GET_NEXT_KEY walks; a SOCKMAP (an array) walks every index, so
/// each slot is looked up: ENOENT means empty, success (the socket's
/// cookie) a socket. The kernel answers lookups only for 8-byte values, so
/// SOCKMAPs with 4-byte values cannot be counted and are left out.
fn count_keys(
    id: u32,
    map_type: u32,
    key_size: usize,
    value_size: usize,
) -> Option<(String, usize)> {
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
    let mut head = MapInfoHead::default();
    let mut a = InfoByFd {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<MapInfoHead>() as u32,
        info: &mut head as *mut MapInfoHead as u64,
    };
    let name = if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a) == 0 {
        let end = head.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&head.name[..end]).into_owned()
    } else {
        String::new()
    };
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
            return Some((name, n));
        }
        first = false;
        key.copy_from_slice(&next);
        if map_type == SOCKMAP {
            let mut value = vec![0u8; value_size.max(8)];
            let mut a = Lookup {
                map_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
                key: key.as_ptr() as u64,
                value: value.as_mut_ptr() as u64,
                ..Default::default()
            };
            if bpf(BPF_MAP_LOOKUP_ELEM, &mut a) != 0 {
                continue;
            }
        }
        n += 1;
        if n > 10_000_000 {
            return Some((name, n));
        }
    }
}

/// Whether the kernel still has a map with this id.
pub fn map_exists(id: u32) -> bool {
    let mut a = GetFdById {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut a);
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT);
    }
    // SAFETY: a fresh descriptor we own; closing it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// The ids of every BPF map and every BPF program the process holds a
/// descriptor of, read from `/proc/PID/fdinfo` (`map_id:`, `prog_id:`).
pub fn object_ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut maps, mut progs) = (Vec::new(), Vec::new());
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (maps, progs);
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("map_id:") {
                maps.extend(v.trim().parse::<u32>().ok());
            } else if let Some(v) = l.strip_prefix("prog_id:") {
                progs.extend(v.trim().parse::<u32>().ok());
            }
        }
    }
    for v in [&mut maps, &mut progs] {
        v.sort_unstable();
        v.dedup();
    }
    (maps, progs)
}

/// Whether the kernel still has a program with this id.
pub fn prog_exists(id: u32) -> bool {
    let mut a = GetFdById {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut a);
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT);
    }
    // SAFETY: a fresh descriptor we own; closing it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}

/// Every hash or socket map the process holds, with its entry count
/// (except SOCKMAPs with 4-byte values, see [`count_keys`]).
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
        let value_size = field("value_size:").unwrap_or(0);
        if map_type == SOCKMAP && value_size != 8 {
            continue;
        }
        if let Some((name, entries)) =
            count_keys(id, map_type, key_size as usize, value_size as usize)
        {
            out.push(MapInfo {
                id,
                name,
                map_type,
                entries,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    //! The leak check must see entries when there are some, or it would
    //! pass whatever the forwarder does: maps made here, filled and emptied.

    use super::*;
    use std::os::fd::AsRawFd;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

    #[repr(C)]
    #[derive(Default)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }

    fn create(map_type: u32, key_size: u32, value_size: u32, name: &str) -> OwnedFd {
        let mut a = Create {
            map_type,
            key_size,
            value_size,
            max_entries: 8,
            ..Default::default()
        };
        a.map_name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = bpf(BPF_MAP_CREATE, &mut a);
        assert!(
            fd >= 0,
            "BPF_MAP_CREATE {name}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    fn update<K, V>(map: &OwnedFd, key: &K, value: &V) {
        let mut a = Lookup {
            map_fd: map.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
            _pad: 0,
        };
        assert_eq!(
            bpf(BPF_MAP_UPDATE_ELEM, &mut a),
            0,
            "update: {}",
            std::io::Error::last_os_error()
        );
    }

    fn delete<K>(map: &OwnedFd, key: &K) {
        let mut a = Lookup {
            map_fd: map.as_raw_fd() as u32,
            key: key as *const K as u64,
            ..Default::default()
        };
        assert_eq!(
            bpf(BPF_MAP_DELETE_ELEM, &mut a),
            0,
            "delete: {}",
            std::io::Error::last_os_error()
        );
    }

    fn find<'a>(maps: &'a [MapInfo], name: &str) -> &'a MapInfo {
        maps.iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not among {maps:?}"))
    }

    #[test]
    fn counts_entries_of_hash_sockmap_and_sockhash() {
        crate::require_root();
        let ns = crate::Netns::new("bpf");
        // An established connection, made inside the test's namespace.
        let (client, server) = ns.run(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (s, _) = l.accept().expect("accept");
            (c, s)
        });
        let hash = create(HASH, 8, 8, "fwt_hash");
        let sockmap = create(SOCKMAP, 4, 8, "fwt_sockmap");
        let sockhash = create(SOCKHASH, 8, 4, "fwt_sockhash");
        update(&hash, &1u64, &10u64);
        update(&hash, &2u64, &20u64);
        update(&sockmap, &3u32, &(client.as_raw_fd() as u64));
        update(&sockhash, &7u64, &server.as_raw_fd());
        let maps = map_entries(std::process::id());
        assert_eq!(find(&maps, "fwt_hash").entries, 2, "{maps:?}");
        assert_eq!(find(&maps, "fwt_sockmap").entries, 1, "{maps:?}");
        assert_eq!(find(&maps, "fwt_sockhash").entries, 1, "{maps:?}");
        delete(&hash, &1u64);
        delete(&hash, &2u64);
        delete(&sockmap, &3u32);
        delete(&sockhash, &7u64);
        let maps = map_entries(std::process::id());
        for name in ["fwt_hash", "fwt_sockmap", "fwt_sockhash"] {
            assert_eq!(find(&maps, name).entries, 0, "{maps:?}");
        }
    }
}
