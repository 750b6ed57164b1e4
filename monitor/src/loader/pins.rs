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

/// The layout of the pinned maps. Bump it whenever a pinned map's type, key, value or
/// size changes: an agent never reads a map laid out for another version.
pub const LAYOUT_VERSION: u32 = 4;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory of this layout: the version, and the flow table's size, which a
/// pinned hash map cannot change.
pub fn layout(flow_table_size: u32) -> String {
    format!("v{LAYOUT_VERSION}-flows{flow_table_size}")
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
/// other layout. `None` when `root` is not on a BPF filesystem: the agent then runs with
/// state that ends with it, and says so once.
pub fn prepare(root: &Path, flow_table_size: u32) -> Result<Option<PathBuf>> {
    if !on_bpffs(root) {
        warn!(
            "{} is not on a BPF filesystem (mount the host's bpffs there): tracked flows and counters start over at each restart",
            root.display()
        );
        return Ok(None);
    }
    let layout = layout(flow_table_size);
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        if entry.file_name() != layout.as_str() {
            info!(
                "replacing the state of another layout ({}): its counters and flows start over",
                entry.file_name().to_string_lossy()
            );
            remove(&entry.path())?;
        }
    }
    let dir = root.join(&layout);
    if dir.join(super::maps::names::PINNED[0]).exists() {
        info!("continuing from the state in {}", dir.display());
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(Some(dir))
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.with_context(|| format!("removing {}", path.display()))
}

/// `monitor cleanup`: removes the pinned maps, which frees their memory once no agent
/// holds them. Returns what was removed, `None` when there was nothing.
pub fn cleanup(root: &Path) -> Result<Option<PathBuf>> {
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", root.display())),
        Ok(_) => {
            remove(root)?;
            Ok(Some(root.to_path_buf()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_table_size_is_another_layout() {
        // A pinned hash map cannot be resized: a new size must not reuse the old pins.
        assert_ne!(layout(262_144), layout(1_048_576));
        assert_eq!(layout(262_144), layout(262_144));
        assert!(layout(1_048_576).ends_with("flows1048576"));
    }

    #[test]
    fn a_directory_off_bpffs_keeps_no_state() {
        let dir = std::env::temp_dir().join(format!("em-state-{}", std::process::id()));
        assert_eq!(prepare(&dir, 8).unwrap(), None);
        assert!(!dir.exists(), "nothing is created off bpffs");
        assert_eq!(cleanup(&dir).unwrap(), None);
    }
}
