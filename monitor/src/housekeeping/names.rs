//! The one owner of the resolvers' names. Three events change them: the agent's start
//! (the names a previous agent gave, continued, and Amazon's resolvers), IMDS naming a
//! VPC's resolver, and each sweep (resolvers that come and go). Each goes through
//! `change`, which decides and applies under one lock: the programs told of every
//! address given up or named, and each retired slot's counts moved to `other`. A scrape
//! reads the names under the same lock, so it never labels a slot's counts with a name
//! they were not made under.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use anyhow::Result;
use log::warn;
use monitor_common::RESOLVER_OTHER;

use crate::{
    loader::maps::Addresses,
    model::resolvers::{Changes, ResolverSlots},
    tables::dns::DnsTables,
};

#[derive(Clone)]
pub struct ResolverNames {
    slots: Arc<Mutex<ResolverSlots>>,
    addrs: Addresses,
    dns: DnsTables,
}

impl ResolverNames {
    /// Takes the names over. Slots a killed agent had given up but not yet retired are
    /// retired now, before any is given again.
    pub fn new(slots: ResolverSlots, addrs: Addresses, dns: DnsTables) -> Self {
        let kept: Vec<u8> = slots.named().map(|(slot, _)| slot).collect();
        dns.retire_unnamed(&kept);
        Self {
            slots: Arc::new(Mutex::new(slots)),
            addrs,
            dns,
        }
    }

    /// Decides with `decide` and applies what it changed; what it changed. A failure to
    /// tell the programs is logged, and the rest applied all the same.
    pub fn change(&self, decide: impl FnOnce(&mut ResolverSlots) -> Changes) -> Changes {
        self.apply(decide).0
    }

    /// Names Amazon's resolvers among `ips` that have no slot yet; the first failure to
    /// tell the programs, once every name is applied.
    pub fn name_amazon(&self, ips: impl IntoIterator<Item = IpAddr>, now: u64) -> Result<()> {
        self.apply(|slots| slots.name_amazon(ips, now))
            .1
            .map_or(Ok(()), Err)
    }

    fn apply(
        &self,
        decide: impl FnOnce(&mut ResolverSlots) -> Changes,
    ) -> (Changes, Option<anyhow::Error>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = decide(&mut slots);
        let mut failed = None;
        let mut tell = |ip: IpAddr, slot: u8| {
            if let Err(e) = self.addrs.set_resolver(ip, slot) {
                warn!("{e:#}");
                failed.get_or_insert(e);
            }
        };
        for (ip, _) in &changes.released {
            tell(*ip, RESOLVER_OTHER);
        }
        for slot in &changes.retired {
            self.dns.retire(*slot);
        }
        for (ip, slot) in &changes.named {
            tell(*ip, *slot);
        }
        (changes, failed)
    }

    /// The names in force, held while the caller reads them.
    pub fn read(&self) -> MutexGuard<'_, ResolverSlots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
