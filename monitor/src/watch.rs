//! Devices come and go (EKS attaches ENIs at run time): rtnetlink link events trigger a
//! reconcile that attaches to new matching devices and lets go of vanished ones.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use log::{info, warn};
use monitor_common::{LinkLocalSecond, MAX_DEVICES};
use tokio::io::unix::AsyncFd;

use crate::{
    devices::{self, Device, Devices},
    loader::{Attachments, ClassifierLinks, Programs, attach::CLASSIFIERS, maps::Monitored},
    tables::slots::SlotArray,
};

/// The per-slot arrays zeroed when a slot changes hands.
pub struct SlotArrays {
    pub linklocal_packets: SlotArray<u64>,
    pub linklocal_seconds: SlotArray<LinkLocalSecond>,
    pub flows_created: SlotArray<u64>,
}

impl SlotArrays {
    fn reset(&self, slot: u32) -> Result<()> {
        self.linklocal_packets.reset(slot)?;
        self.linklocal_seconds.reset(slot)?;
        self.flows_created.reset(slot)
    }
}

/// Owns the programs (so the classifiers stay attached while it lives) and the
/// `MONITORED` map, and keeps both equal to the devices wanted.
pub struct Watcher {
    programs: Programs,
    monitored: Monitored,
    globs: Vec<glob::Pattern>,
    devices: Devices,
    slots: SlotArrays,
    links: HashMap<u32, ClassifierLinks>,
    /// Devices whose classifiers did not all attach, by ifindex: tried again with
    /// backoff until they do, with no restart.
    retries: HashMap<u32, Retry>,
}

impl Watcher {
    /// Watches for the devices `globs` match, attaching `programs` to each and giving it
    /// a slot in `monitored` and in the per-device arrays of `slots`; `devices` is what
    /// the collectors read of them.
    pub fn new(
        programs: Programs,
        monitored: Monitored,
        globs: Vec<glob::Pattern>,
        devices: Devices,
        slots: SlotArrays,
    ) -> Self {
        Self {
            programs,
            monitored,
            globs,
            devices,
            slots,
            links: HashMap::new(),
            retries: HashMap::new(),
        }
    }

    /// The devices watched, as the collectors read them.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Which programs are attached where, as `/readyz` and the collectors read it.
    pub fn attachments(&self) -> &Attachments {
        self.programs.attachments()
    }
}

/// When to try a device's attach again, and how long to wait after that.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    at: Instant,
    wait: Duration,
}

/// The first wait before an attach is tried again; it doubles up to `LAST_RETRY_WAIT`.
const FIRST_RETRY_WAIT: Duration = Duration::from_secs(1);
const LAST_RETRY_WAIT: Duration = Duration::from_mins(1);

impl Retry {
    fn first(now: Instant) -> Self {
        Self {
            at: now + FIRST_RETRY_WAIT,
            wait: FIRST_RETRY_WAIT,
        }
    }

    fn next(self, now: Instant) -> Self {
        let wait = (self.wait * 2).min(LAST_RETRY_WAIT);
        Self {
            at: now + wait,
            wait,
        }
    }
}

/// Keeps the devices still present (and their slots: a device renamed in place is the
/// same device), adds new ones in free slots.
fn plan(current: &BTreeMap<u32, Device>, wanted: &[(String, u32)]) -> Vec<Device> {
    let mut used: Vec<u32> = wanted
        .iter()
        .filter_map(|(_, i)| current.get(i).map(|d| d.slot))
        .collect();
    let mut out = Vec::new();
    for (name, ifindex) in wanted {
        if let Some(d) = current.get(ifindex) {
            out.push(Device {
                name: name.clone(),
                ..d.clone()
            });
            continue;
        }
        let Some(slot) = (0..MAX_DEVICES).find(|s| !used.contains(s)) else {
            warn!("more than {MAX_DEVICES} devices; {name} is not monitored");
            continue;
        };
        used.push(slot);
        out.push(Device::new(name, *ifindex, slot));
    }
    out
}

impl Watcher {
    /// Takes over the devices a previous agent left in the pinned `MONITORED` map that
    /// are still here and still wanted: they keep their slots, so their per-slot counts
    /// go on rather than start over. Their classifiers are attached by the reconcile.
    pub fn adopt_pinned(&mut self) -> Result<()> {
        let interfaces = devices::interfaces()?;
        let wanted = devices::select(&interfaces, &self.globs, devices::is_physical);
        let pinned = self.monitored.entries();
        let mut adopted: Vec<Device> = Vec::new();
        for (ifindex, slot) in pinned {
            let Some((name, _)) = wanted.iter().find(|(_, i)| *i == ifindex) else {
                continue;
            };
            if slot < MAX_DEVICES && !adopted.iter().any(|d| d.slot == slot) {
                info!("{name} keeps slot {slot} from the previous agent");
                adopted.push(Device::new(name, ifindex, slot));
            }
        }
        self.devices.replace(adopted);
        Ok(())
    }

    /// Makes the monitored set equal to the matching interfaces of this namespace.
    pub fn reconcile(&mut self) -> Result<()> {
        let interfaces = devices::interfaces()?;
        let wanted = devices::select(&interfaces, &self.globs, devices::is_physical);
        let current = self.devices.snapshot();
        let next = plan(&current, &wanted);

        for (ifindex, old) in &current {
            let gone = match next.iter().find(|d| d.ifindex == *ifindex) {
                None => {
                    info!("{} is gone; no longer monitored", old.name);
                    true
                }
                Some(d) if d.name != old.name => {
                    // Same device, same slot; its hooks are recorded under the new name.
                    info!("{} is now {}", old.name, d.name);
                    true
                }
                Some(_) => false,
            };
            if gone {
                let links = self.links.remove(ifindex).unwrap_or_default();
                self.retries.remove(ifindex);
                self.programs.detach_classifiers(&old.name, links);
            }
        }
        let added: Vec<Device> = next
            .iter()
            .filter(|d| !current.contains_key(&d.ifindex))
            .cloned()
            .collect();
        for d in &added {
            self.slots
                .reset(d.slot)
                .with_context(|| format!("preparing slot {} for {}", d.slot, d.name))?;
        }
        self.monitored
            .set(next.iter().map(|d| (d.name.as_str(), d.ifindex, d.slot)))?;
        self.devices.replace(next.clone());
        let now = Instant::now();
        for d in &next {
            if self.links.contains_key(&d.ifindex) {
                continue;
            }
            info!("monitoring {}", d.name);
            let links = self.programs.attach_classifiers(&d.name);
            if links.len() < CLASSIFIERS.len() && self.programs.classifiers_loaded() {
                self.retries.insert(d.ifindex, Retry::first(now));
            }
            self.links.insert(d.ifindex, links);
        }
        self.retry_due(now);
        Ok(())
    }

    /// Tries again each device whose attach failed and whose wait is over: the hooks it
    /// lacks only, so a working direction is never detached for it.
    pub fn retry_due(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .retries
            .iter()
            .filter(|(_, r)| r.at <= now)
            .map(|(i, _)| *i)
            .collect();
        let devices = self.devices.snapshot();
        for ifindex in due {
            let (Some(d), Some(links)) = (devices.get(&ifindex), self.links.get_mut(&ifindex))
            else {
                self.retries.remove(&ifindex);
                continue;
            };
            if self.programs.attach_missing(&d.name, links) {
                info!("{}: every hook attached on a later try", d.name);
                self.retries.remove(&ifindex);
            } else if let Some(r) = self.retries.get_mut(&ifindex) {
                *r = r.next(now);
                info!("{}: trying the attach again in {:?}", d.name, r.wait);
            }
        }
    }

    /// When the next attach is due to be tried again, if any is.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|r| r.at).min()
    }
}

/// A netlink socket subscribed to link events.
fn link_events() -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls with a zeroed, filled sockaddr_nl.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or_default();
        addr.nl_groups = u32::try_from(libc::RTMGRP_LINK).unwrap_or_default();
        let len = u32::try_from(size_of::<libc::sockaddr_nl>()).unwrap_or_default();
        if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads whatever is queued; the content does not matter, only that links changed.
fn drain(fd: &OwnedFd) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        // SAFETY: reading into a buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                // Events were lost: a reconcile covers them anyway.
                _ if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
                _ => Err(e),
            };
        }
    }
}

/// Reconciles on every burst of link events, for as long as the agent runs. The watcher
/// owns the programs: this never returns, so nothing is detached before shutdown, even
/// when link events cannot be had (devices that appear later are then not picked up).
pub async fn run(mut watcher: Watcher) {
    let events = link_events()
        .map_err(anyhow::Error::from)
        .and_then(|socket| {
            // SAFETY: the AsyncFd owns the socket, which stays open for its whole life.
            unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("{e}"))
        });
    let events = match events {
        Ok(e) => e,
        Err(e) => {
            warn!(
                "subscribing to rtnetlink link events: {e:#}; devices that appear later are not monitored"
            );
            return std::future::pending().await;
        }
    };
    loop {
        let waited = async {
            let mut ready = events.readable().await?;
            ready.clear_ready();
            drain(events.get_ref())?;
            // A device arrives as a burst of events (create, rename, up): take them together.
            tokio::time::sleep(Duration::from_millis(100)).await;
            drain(events.get_ref())
        };
        // Or an attach to try again, whichever comes first.
        let retry = watcher.next_retry();
        let due = async {
            match retry {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = waited => {
                if let Err(e) = r {
                    warn!("reading link events: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Err(e) = watcher.reconcile() {
                    warn!("updating monitored devices: {e:#}");
                }
            }
            () = due => watcher.retry_due(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str, ifindex: u32, slot: u32) -> Device {
        Device {
            name: name.into(),
            ifindex,
            eni: format!("eni-{ifindex}"),
            mac: String::new(),
            slot,
        }
    }

    #[test]
    fn slots_are_kept_and_freed_ones_reused() {
        let current: BTreeMap<u32, Device> =
            [dev("eth0", 2, 0), dev("eth1", 3, 1), dev("eth2", 4, 2)]
                .into_iter()
                .map(|d| (d.ifindex, d))
                .collect();
        // eth1 went away, eth3 arrived.
        let wanted = vec![
            ("eth0".to_owned(), 2),
            ("eth2".to_owned(), 4),
            ("eth3".to_owned(), 7),
        ];
        let next = plan(&current, &wanted);
        let view: Vec<_> = next
            .iter()
            .map(|d| (d.name.as_str(), d.slot, d.eni.as_str()))
            .collect();
        assert_eq!(
            view,
            [("eth0", 0, "eni-2"), ("eth2", 2, "eni-4"), ("eth3", 1, "")]
        );
    }

    #[test]
    fn a_device_renamed_in_place_keeps_its_slot_under_its_new_name() {
        let current: BTreeMap<u32, Device> = [dev("eth0", 2, 0), dev("eth1", 3, 1)]
            .into_iter()
            .map(|d| (d.ifindex, d))
            .collect();
        let wanted = vec![("eth0".to_owned(), 2), ("ens6".to_owned(), 3)];
        let next = plan(&current, &wanted);
        let view: Vec<_> = next
            .iter()
            .map(|d| (d.name.as_str(), d.ifindex, d.slot, d.eni.as_str()))
            .collect();
        assert_eq!(view, [("eth0", 2, 0, "eni-2"), ("ens6", 3, 1, "eni-3")]);
    }
}
