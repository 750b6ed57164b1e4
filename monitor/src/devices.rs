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
use monitor_common::MAX_DEVICES;

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

/// The monitored devices by interface index, shared by the collectors, and the devices
/// gone within `LINGER`, whose counters are still shown.
#[derive(Clone, Debug, Default)]
pub struct Devices(Arc<RwLock<Known>>);

#[derive(Debug, Default)]
struct Known {
    monitored: BTreeMap<u32, Device>,
    /// Devices no longer monitored, with when they went (at most `MAX_DEVICES`, the
    /// latest).
    gone: BTreeMap<u32, (Device, Instant)>,
}

impl Devices {
    pub fn replace(&self, devices: impl IntoIterator<Item = Device>) {
        self.replace_at(devices, Instant::now());
    }

    /// Makes `devices` the monitored set at `now`; those it no longer has are gone from
    /// `now`.
    pub fn replace_at(&self, devices: impl IntoIterator<Item = Device>, now: Instant) {
        let next: BTreeMap<u32, Device> = devices.into_iter().map(|d| (d.ifindex, d)).collect();
        let mut known = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let before = std::mem::take(&mut known.monitored);
        for (ifindex, d) in before {
            if !next.contains_key(&ifindex) {
                known.gone.insert(ifindex, (d, now));
            }
        }
        known.gone.retain(|ifindex, (_, since)| {
            !next.contains_key(ifindex) && now.saturating_duration_since(*since) < LINGER
        });
        while known.gone.len() > MAX_DEVICES as usize {
            let oldest = known.gone.iter().min_by_key(|(_, (_, since))| *since);
            let Some((&ifindex, _)) = oldest else { break };
            known.gone.remove(&ifindex);
        }
        known.monitored = next;
    }

    pub fn set_eni(&self, ifindex: u32, eni: &str) {
        let mut known = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = known.monitored.get_mut(&ifindex) {
            eni.clone_into(&mut d.eni);
        }
    }

    /// The monitored devices.
    pub fn snapshot(&self) -> BTreeMap<u32, Device> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .monitored
            .clone()
    }

    /// The devices whose counters are shown at `now`: the monitored ones, and each gone
    /// less than `LINGER` ago, with the counts it had, so that a counter ends rather
    /// than vanishes between two scrapes and loses its last increase. A gone device is
    /// shown only while no device monitored has its name (its series would add up with
    /// the new device's, then fall back when it goes) or its slot (whose counts are the
    /// new device's), and of gone devices of one name only the one gone last.
    pub fn counted(&self, now: Instant) -> BTreeMap<u32, Device> {
        let known = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let mut out = known.monitored.clone();
        let mut gone: Vec<&(Device, Instant)> = known
            .gone
            .values()
            .filter(|(_, since)| now.saturating_duration_since(*since) < LINGER)
            .collect();
        gone.sort_by_key(|(_, since)| std::cmp::Reverse(*since));
        for (d, _) in gone {
            if !out.values().any(|m| m.name == d.name || m.slot == d.slot) {
                out.insert(d.ifindex, d.clone());
            }
        }
        out
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
        .map(|b| format!("{:02x}", b.to_ne_bytes()[0]))
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
        // `c_char` is signed on x86_64 and unsigned on aarch64: the byte either way.
        *dst = libc::c_char::from_ne_bytes([*src]);
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

    fn dev(name: &str, ifindex: u32, slot: u32) -> Device {
        Device {
            name: name.to_owned(),
            ifindex,
            eni: String::new(),
            mac: String::new(),
            slot,
        }
    }

    /// (name, ifindex) of the devices counted at `t`.
    fn counted(devices: &Devices, t: Instant) -> Vec<(String, u32)> {
        devices
            .counted(t)
            .into_values()
            .map(|d| (d.name, d.ifindex))
            .collect()
    }

    #[test]
    fn a_gone_device_is_counted_for_a_while_unless_its_name_or_slot_is_taken() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let n = |name: &str, ifindex: u32| (name.to_owned(), ifindex);
        let devices = Devices::default();
        devices.replace_at([dev("eth0", 2, 0), dev("eth1", 3, 1)], t0);
        // eth1 goes: its counters are still shown for `LINGER`, then not.
        devices.replace_at([dev("eth0", 2, 0)], t0 + s(1));
        assert_eq!(devices.snapshot().len(), 1);
        let both = vec![n("eth0", 2), n("eth1", 3)];
        assert_eq!(counted(&devices, t0 + s(2)), both);
        assert_eq!(counted(&devices, t0 + LINGER), both);
        assert_eq!(counted(&devices, t0 + s(1) + LINGER), [n("eth0", 2)]);
        // A new eth1 (another ifindex, eth1's free slot): the gone one is no longer
        // shown, its name now the new device's.
        devices.replace_at([dev("eth0", 2, 0), dev("eth1", 7, 1)], t0 + s(3));
        assert_eq!(counted(&devices, t0 + s(4)), [n("eth0", 2), n("eth1", 7)]);
        // A device gone whose slot a device of another name took: not shown either.
        devices.replace_at([dev("eth0", 2, 0), dev("eth2", 8, 1)], t0 + s(5));
        assert_eq!(counted(&devices, t0 + s(6)), [n("eth0", 2), n("eth2", 8)]);
        // Two gone of one name (eth2 gone, then a new eth2 gone): the one gone last.
        devices.replace_at([dev("eth0", 2, 0)], t0 + s(7));
        devices.replace_at([dev("eth0", 2, 0), dev("eth2", 9, 1)], t0 + s(8));
        devices.replace_at([dev("eth0", 2, 0)], t0 + s(9));
        assert_eq!(counted(&devices, t0 + s(10)), [n("eth0", 2), n("eth2", 9)]);
        // A gone device monitored again is monitored, once.
        devices.replace_at([dev("eth0", 2, 0), dev("eth2", 9, 1)], t0 + s(11));
        assert_eq!(counted(&devices, t0 + s(12)), [n("eth0", 2), n("eth2", 9)]);
        // Churn past the devices' number keeps at most `MAX_DEVICES` gone.
        for i in 0..3 * MAX_DEVICES {
            devices.replace_at([dev("eth0", 2, 0), dev("eth9", 100 + i, 1)], t0 + s(13));
        }
        devices.replace_at([dev("eth0", 2, 0)], t0 + s(13));
        let known = devices.0.read().unwrap();
        assert_eq!(known.gone.len(), MAX_DEVICES as usize);
    }

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
