//! State that survives the agent: the flow table, DNS queries in flight, the counters
//! and the device slots, as maps pinned in a BPF filesystem. A restarted or upgraded
//! agent whose map layout matches continues from them; one with another layout replaces
//! them. Links are never pinned: the programs detach when the agent is gone.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use log::{info, warn};

/// Where the state lives by default (the `DaemonSet` mounts the host's bpffs there).
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/eni-monitor";

/// What the pinned maps' keys and values mean, where a change of meaning leaves their
/// shapes as they were (a field renamed in place, a count split by a new key field that
/// filled padding): bump it then. Every change of shape changes the layout by itself.
pub const MEANING: u32 = 1;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A map as the kernel describes it: what must match before a pinned map is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The directory of a layout: a hash of `MEANING` and every pinned map's name and shape
/// (the flow table's size among them, which a pinned hash map cannot change), and that
/// size, for whoever lists the directory.
pub fn layout(shapes: &[(&str, MapShape)], flow_table_size: u32) -> String {
    // FNV-1a, 64 bits: stable across builds and toolchains, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&MEANING.to_le_bytes());
    for (name, shape) in shapes {
        eat(name.as_bytes());
        for w in [
            shape.map_type,
            shape.key_size,
            shape.value_size,
            shape.max_entries,
            shape.flags,
        ] {
            eat(&w.to_le_bytes());
        }
    }
    format!("{h:016x}-flows{flow_table_size}")
}

/// Whether `name` is a layout directory this agent (or an earlier release) made: the
/// only entries of the state directory it ever removes.
fn is_layout(name: &str) -> bool {
    let Some((head, size)) = name.split_once("-flows") else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(size) {
        return false;
    }
    // This release's: a 64-bit hash; earlier ones: a hand-kept version, `v3`.
    (head.len() == 16 && head.bytes().all(|b| b.is_ascii_hexdigit()))
        || head.strip_prefix('v').is_some_and(digits)
}

/// Undoes the octal escapes of a path in `/proc/self/mountinfo` (`\040` a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(c) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(c);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is where a BPF filesystem is mounted at its root (the host's
/// `/sys/fs/bpf`, where the CNI and the network-policy agent pin theirs), rather than a
/// directory inside one or a directory of one bind-mounted into a container.
fn is_bpffs_root(path: &Path, mountinfo: &str) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    // The last mount at a point is the one in force.
    let mut root_of_bpffs = false;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(root), Some(point), Some(fstype)) =
            (fields.get(3), fields.get(4), fields.get(sep + 1))
        else {
            continue;
        };
        if Path::new(&unescape(point)) == path {
            root_of_bpffs = *fstype == "bpf" && *root == "/";
        }
    }
    root_of_bpffs
}

/// Refuses a state directory that is the root of a BPF filesystem: the agent would own
/// every other program's pins there.
fn refuse_bpffs_root(root: &Path) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if is_bpffs_root(root, &mountinfo) {
        anyhow::bail!(
            "--state-dir {} is the root of a BPF filesystem, where other programs pin theirs: give the agent a directory of its own in it ({DEFAULT_DIR} by default)",
            root.display()
        );
    }
    Ok(())
}

/// Whether `path`, or the nearest directory above it that exists, is on a BPF filesystem.
fn on_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed statfs to fill.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

/// Prepares `root/<layout>` for the maps to be pinned in, replacing the state of any
/// other layout of this agent's; whatever else `root` holds is left as it is. `None`
/// when `root` is not on a BPF filesystem: the agent then runs with state that ends with
/// it, and says so once. A `root` that is a BPF filesystem's own root is refused.
pub fn prepare(root: &Path, layout: &str) -> Result<Option<PathBuf>> {
    if !on_bpffs(root) {
        warn!(
            "{} is not on a BPF filesystem (mount the host's bpffs there): tracked flows and counters start over at each restart",
            root.display()
        );
        return Ok(None);
    }
    refuse_bpffs_root(root)?;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == layout {
            continue;
        }
        if is_layout(&name) {
            info!(
                "replacing the state of another layout ({name}): its counters and flows start over"
            );
            remove(&entry.path())?;
        } else {
            warn!(
                "leaving {} in the state directory: not this agent's",
                entry.path().display()
            );
        }
    }
    let dir = root.join(layout);
    if dir.join(super::maps::names::PINNED[0]).exists() {
        info!("continuing from the state in {}", dir.display());
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(Some(dir))
}

/// Removes the pin of each map in `dir` whose kernel description differs from `want`
/// (the shape this agent makes it), saying so once a map: it is made afresh, never read
/// with the wrong layout. Returns the names replaced.
pub fn replace_mismatched(dir: &Path, want: &[(&'static str, MapShape)]) -> Vec<&'static str> {
    let mut replaced = Vec::new();
    for (name, want) in want {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let found = aya::maps::MapInfo::from_pin(&path).map(|info| MapShape {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        });
        let why = match found {
            Ok(found) if found == *want => continue,
            Ok(found) => format!("the kernel has it as {found}, this agent makes it {want}"),
            Err(e) => format!("unreadable: {e}"),
        };
        if let Err(e) = unpin(&path, &format!("{why}; its counts start over")) {
            warn!("{e:#}");
        }
        replaced.push(*name);
    }
    replaced
}

/// Removes the pin of a map at `path` that cannot be continued from, saying `why` once:
/// the load makes the map afresh. Every pin the agent drops goes through here.
pub fn unpin(path: &Path, why: &str) -> Result<()> {
    warn!("replacing the pinned map {}: {why}", path.display());
    remove(path)
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.with_context(|| format!("removing {}", path.display()))
}

/// `monitor cleanup`: removes the pinned maps (every layout directory of this agent's
/// under `root`), which frees their memory once no agent holds them, and `root` itself
/// once empty; anything else there is left. Returns what was removed, empty when there
/// was nothing. A `root` that is a BPF filesystem's own root is refused.
pub fn cleanup(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", root.display())),
        Ok(entries) => entries,
    };
    refuse_bpffs_root(root)?;
    let mut removed = Vec::new();
    let mut left = false;
    for entry in entries {
        let entry = entry?;
        if is_layout(&entry.file_name().to_string_lossy()) {
            remove(&entry.path())?;
            removed.push(entry.path());
        } else {
            warn!("leaving {}: not this agent's", entry.path().display());
            left = true;
        }
    }
    if !left {
        match std::fs::remove_dir(root) {
            Ok(()) => removed.push(root.to_path_buf()),
            // The DaemonSet's mount of the host's directory: the host keeps it, empty.
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                info!("{} is a mount point: left, empty", root.display());
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", root.display())),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(value_size: u32, max_entries: u32) -> MapShape {
        MapShape {
            map_type: 1,
            key_size: 4,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    #[test]
    fn a_change_of_shape_or_size_is_another_layout() {
        let base = [("FLOWS", shape(8, 262_144)), ("HASH_KEYS", shape(4, 1))];
        let name = layout(&base, 262_144);
        assert_eq!(name, layout(&base, 262_144));
        assert!(name.ends_with("-flows262144"), "{name}");
        assert!(is_layout(&name));
        // A pinned hash map cannot be resized; a value that grew cannot be read.
        let resized = [("FLOWS", shape(8, 1_048_576)), ("HASH_KEYS", shape(4, 1))];
        let grown = [("FLOWS", shape(16, 262_144)), ("HASH_KEYS", shape(4, 1))];
        assert_ne!(layout(&resized, 262_144), name);
        assert_ne!(layout(&grown, 262_144), name);
    }

    #[test]
    fn only_layout_names_are_the_agents() {
        for ours in ["v3-flows262144", "0123456789abcdef-flows64"] {
            assert!(is_layout(ours), "{ours}");
        }
        for theirs in [
            "tc",
            "cilium",
            "aws-node",
            "v3",
            "vx-flows1",
            "0123456789abcdef-flows",
            "0123456789abcdeg-flows64",
            "globals",
        ] {
            assert!(!is_layout(theirs), "{theirs}");
        }
    }

    #[test]
    fn the_root_of_a_bpffs_is_told_from_a_directory_in_one() {
        let dir = std::env::temp_dir().join(format!("em bpf-{}", std::process::id()));
        let inner = dir.join("eni-monitor");
        std::fs::create_dir_all(&inner).unwrap();
        let point = dir.to_string_lossy().replace(' ', "\\040");
        let inner_point = inner.to_string_lossy().replace(' ', "\\040");
        // The filesystem's root mounted there; a directory of it bind-mounted elsewhere.
        let root = format!("30 20 0:25 / {point} rw,relatime shared:9 - bpf bpf rw\n");
        let bind = format!("31 20 0:25 /eni-monitor {inner_point} rw - bpf bpf rw\n");
        assert!(is_bpffs_root(&dir, &root));
        assert!(!is_bpffs_root(&inner, &root));
        assert!(!is_bpffs_root(&inner, &(root.clone() + &bind)));
        let tmpfs = format!("32 20 0:26 / {point} rw - tmpfs tmpfs rw\n");
        assert!(!is_bpffs_root(&dir, &tmpfs));
        // Mounted over: the last mount at a point is the one in force.
        assert!(!is_bpffs_root(&dir, &(root.clone() + &tmpfs)));
        assert!(is_bpffs_root(&dir, &(tmpfs + &root)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_off_bpffs_keeps_no_state() {
        let dir = std::env::temp_dir().join(format!("em-state-{}", std::process::id()));
        assert_eq!(prepare(&dir, "0123456789abcdef-flows8").unwrap(), None);
        assert!(!dir.exists(), "nothing is created off bpffs");
        assert!(cleanup(&dir).unwrap().is_empty());
    }
}
