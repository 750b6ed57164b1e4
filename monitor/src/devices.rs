//! Which network devices are monitored: `--device` globs over the interfaces of the
//! agent's network namespace, by default the physical NICs.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

/// A monitored device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ifindex: u32,
    /// The ENI id, empty until known.
    pub eni: String,
    /// The hardware address, empty when it cannot be read.
    pub mac: String,
    /// Index into the kernel's per-device arrays, below `MAX_DEVICES`.
    pub slot: u32,
}

impl Device {
    /// A device newly monitored in `slot`, its MAC read now.
    pub fn new(name: &str, ifindex: u32, slot: u32) -> Self {
        Self {
            name: name.to_owned(),
            ifindex,
            eni: String::new(),
            mac: mac_address(name).unwrap_or_default(),
            slot,
        }
    }
}

/// The monitored devices by interface index, shared by the collectors.
#[derive(Clone, Debug, Default)]
pub struct Devices(Arc<RwLock<BTreeMap<u32, Device>>>);

impl Devices {
    pub fn replace(&self, devices: impl IntoIterator<Item = Device>) {
        let map = devices.into_iter().map(|d| (d.ifindex, d)).collect();
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = map;
    }

    pub fn set_eni(&self, ifindex: u32, eni: &str) {
        if let Some(d) = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&ifindex)
        {
            eni.clone_into(&mut d.eni);
        }
    }

    pub fn snapshot(&self) -> BTreeMap<u32, Device> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Devices a per-device map holds keys of but that are not monitored (gone, or left in
/// pinned maps by an earlier agent), with when they were first found so, one record a
/// map's owner (what one deletes, another may still hold): each ENI
/// attached is a new interface index, and a long-lived node would otherwise fill the
/// maps with the keys of ENIs long gone.
#[derive(Clone, Debug, Default)]
pub struct Departed(Arc<Mutex<BTreeMap<u32, Instant>>>);

/// How long a device's keys outlive it: a device renamed or re-added in the meantime
/// keeps them, and a key counted by the programs just before the agent saw its device
/// is never taken for one of a device gone.
pub const LINGER: Duration = Duration::from_mins(1);

impl Departed {
    /// Of the interface indexes `keyed` in a map, those whose keys are to be deleted at
    /// `now`: not among `monitored` for `LINGER`. `other` (0) is never one.
    pub fn due(
        &self,
        keyed: impl IntoIterator<Item = u32>,
        monitored: &BTreeMap<u32, Device>,
        now: Instant,
    ) -> BTreeSet<u32> {
        let mut departed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        departed.retain(|ifindex, _| !monitored.contains_key(ifindex));
        let mut due = BTreeSet::new();
        for ifindex in keyed {
            if ifindex == monitor_common::DEVICE_OTHER || monitored.contains_key(&ifindex) {
                continue;
            }
            let since = *departed.entry(ifindex).or_insert(now);
            if now.duration_since(since) >= LINGER {
                due.insert(ifindex);
            }
        }
        departed.retain(|ifindex, _| !due.contains(ifindex));
        due
    }
}

/// Interfaces of this network namespace as (name, ifindex).
pub fn interfaces() -> Result<Vec<(String, u32)>> {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(anyhow!(
                "listing network interfaces: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut out = Vec::new();
        let mut cur = list;
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.push((name, (*cur).if_index));
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// The MAC address of `name` in this network namespace, as IMDS spells it
/// (`0e:1a:2b:3c:4d:5e`).
pub fn mac_address(name: &str) -> Result<String> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: a valid socket and an ifreq naming the device; the kernel fills the
    // hardware address on success.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) } < 0 {
        return Err(anyhow!(
            "reading the MAC address of {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member of the union.
    let mac = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(mac[..6]
        .iter()
        .map(|b| format!("{:02x}", (*b).cast_unsigned()))
        .collect::<Vec<_>>()
        .join(":"))
}

/// A socket to issue interface ioctls on (`SIOCGIFHWADDR`, `SIOCETHTOOL`).
pub fn control_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A zeroed `ifreq` naming `device`.
pub fn ifreq(device: &str) -> std::io::Result<libc::ifreq> {
    if device.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("interface name {device:?} too long"),
        ));
    }
    // SAFETY: ifreq is plain data, valid zeroed.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(device.as_bytes()) {
        *dst = (*src).cast_signed();
    }
    Ok(req)
}

/// A NIC backed by hardware (an ENA ENI on EC2) has a `device` link in sysfs.
pub fn is_physical(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("device")
        .exists()
}

/// The interfaces matching `globs`, or the physical ones when `globs` is empty.
pub fn select(
    interfaces: &[(String, u32)],
    globs: &[glob::Pattern],
    is_physical: impl Fn(&str) -> bool,
) -> Vec<(String, u32)> {
    interfaces
        .iter()
        .filter(|(name, _)| {
            if globs.is_empty() {
                is_physical(name)
            } else {
                globs.iter().any(|g| g.matches(name))
            }
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<(String, u32)> {
        [
            ("lo", 1),
            ("eth0", 2),
            ("eth1", 3),
            ("eni1a2b", 4),
            ("ens5", 5),
        ]
        .iter()
        .map(|&(n, i)| (n.to_owned(), i))
        .collect()
    }

    #[test]
    fn globs_select_by_name() {
        let globs = [glob::Pattern::new("eth*").unwrap()];
        let names: Vec<_> = select(&ifs(), &globs, |_| false)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["eth0", "eth1"]);
    }

    #[test]
    fn default_is_the_physical_nics() {
        assert_eq!(
            select(&ifs(), &[], |n| n == "ens5"),
            [("ens5".to_owned(), 5)]
        );
    }

    #[test]
    fn loopback_has_the_zero_mac() {
        assert_eq!(mac_address("lo").unwrap(), "00:00:00:00:00:00");
        assert!(mac_address("no-such-if0").is_err());
        assert!(mac_address("a-name-far-too-long-for-linux").is_err());
    }

    #[test]
    fn this_namespace_has_loopback() {
        let all = interfaces().unwrap();
        assert!(all.iter().any(|(n, i)| n == "lo" && *i >= 1), "{all:?}");
        assert!(!is_physical("lo"));
    }
}

#[cfg(test)]
mod departed_tests {
    use super::*;

    #[test]
    fn a_device_gone_a_minute_has_its_keys_deleted_and_other_never() {
        let departed = Departed::default();
        let eth0 = Device {
            name: "eth0".into(),
            ifindex: 2,
            eni: String::new(),
            mac: String::new(),
            slot: 0,
        };
        let monitored = BTreeMap::from([(2, eth0)]);
        let t0 = Instant::now();
        assert!(departed.due([0, 2, 7], &monitored, t0).is_empty());
        assert!(
            departed
                .due([0, 2, 7], &monitored, t0 + LINGER / 2)
                .is_empty()
        );
        assert_eq!(
            departed.due([0, 2, 7, 9], &monitored, t0 + LINGER),
            BTreeSet::from([7])
        );
        // 9 was first found later; 7 is forgotten once deleted.
        assert!(
            departed
                .due([9], &monitored, t0 + LINGER + LINGER / 2)
                .is_empty()
        );
        assert_eq!(
            departed.due([9], &monitored, t0 + LINGER * 2),
            BTreeSet::from([9])
        );
        // A device monitored again keeps its keys.
        assert!(departed.due([2], &BTreeMap::new(), t0).is_empty());
        assert!(departed.due([2], &monitored, t0 + LINGER * 3).is_empty());
    }
}
