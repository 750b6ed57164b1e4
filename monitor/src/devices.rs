//! Which network devices are monitored: `--device` globs over the interfaces of the
//! agent's network namespace, by default the physical NICs.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    path::Path,
    sync::{Arc, RwLock},
};

use anyhow::{Result, anyhow};
use monitor_common::MAX_DEVICES;

/// A monitored device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    /// The ENI id, empty until known.
    pub eni: String,
    /// Index into the kernel's per-device arrays, below `MAX_DEVICES`.
    pub slot: u32,
}

/// The monitored devices by interface index, shared by the collectors.
#[derive(Clone, Debug, Default)]
pub struct Devices(Arc<RwLock<BTreeMap<u32, Device>>>);

impl Devices {
    pub fn replace(&self, devices: impl IntoIterator<Item = Device>) {
        let map = devices.into_iter().map(|d| (d.ifindex, d)).collect();
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = map;
    }

    pub fn snapshot(&self) -> BTreeMap<u32, Device> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Interfaces of this network namespace as (name, ifindex).
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(anyhow!("listing network interfaces: {}", std::io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut cur = list;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned();
            out.push((name, (*cur).if_index));
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// A NIC backed by hardware (an ENA ENI on EC2) has a `device` link in sysfs.
pub fn is_physical(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("device").exists()
}

/// The interfaces matching `globs`, or the physical ones when `globs` is empty, each
/// given a slot. Beyond `MAX_DEVICES` devices the rest are left out, with a warning.
pub fn select(
    interfaces: &[(String, u32)],
    globs: &[glob::Pattern],
    is_physical: impl Fn(&str) -> bool,
) -> Vec<Device> {
    let mut out: Vec<Device> = Vec::new();
    for (name, ifindex) in interfaces {
        let wanted = if globs.is_empty() { is_physical(name) } else { globs.iter().any(|g| g.matches(name)) };
        if !wanted {
            continue;
        }
        let Ok(slot) = u32::try_from(out.len()) else { break };
        if slot >= MAX_DEVICES {
            log::warn!("more than {MAX_DEVICES} devices match; {name} and later ones are not monitored");
            break;
        }
        out.push(Device { name: name.clone(), ifindex: *ifindex, eni: String::new(), slot });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<(String, u32)> {
        [("lo", 1), ("eth0", 2), ("eth1", 3), ("eni1a2b", 4), ("ens5", 5)]
            .iter()
            .map(|&(n, i)| (n.to_owned(), i))
            .collect()
    }

    #[test]
    fn globs_select_by_name() {
        let globs = [glob::Pattern::new("eth*").unwrap()];
        let names: Vec<_> = select(&ifs(), &globs, |_| false).into_iter().map(|d| (d.name, d.slot)).collect();
        assert_eq!(names, [("eth0".to_owned(), 0), ("eth1".to_owned(), 1)]);
    }

    #[test]
    fn default_is_the_physical_nics() {
        let names: Vec<_> =
            select(&ifs(), &[], |n| n == "ens5").into_iter().map(|d| (d.name, d.ifindex, d.slot)).collect();
        assert_eq!(names, [("ens5".to_owned(), 5, 0)]);
    }

    #[test]
    fn this_namespace_has_loopback() {
        let all = interfaces().unwrap();
        assert!(all.iter().any(|(n, i)| n == "lo" && *i >= 1), "{all:?}");
        assert!(!is_physical("lo"));
    }
}
