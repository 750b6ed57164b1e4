//! Which resolvers are named in the `resolver` label. The programs count by resolver
//! slot; the agent gives slots to addresses: Amazon's resolvers always, and up to
//! `MAX_NAMED_RESOLVERS` others, the failing and the busiest of the last minutes. A
//! resolver quiet for `idle` gives its slot up: its series go, and what it counted is
//! reported under `retired` from then on, so that a device's sums never go backwards.
//! Not `other`: a departed resolver's lifetime counts arriving in one step would read to
//! `rate()` as a burst of the servers without a name, and page. A slot given up drains
//! for `grace` (every query it counted has ended by then) before it is retired (its
//! counts moved to `retired`) and may be given again.

use std::{collections::BTreeMap, net::IpAddr};

use monitor_common::{MAX_NAMED_RESOLVERS, RESOLVER_OTHER, RESOLVER_RETIRED, RESOLVER_SLOTS};

use super::dns::AmazonResolvers;

/// Seconds a named resolver must have been quiet before a newcomer takes its name when
/// every name is taken (at most the idle time): two live resolvers never take turns, and
/// a spray of one-off addresses cannot push a live resolver out.
pub const QUIET_TO_YIELD: u64 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    Named {
        ip: IpAddr,
        last_active: u64,
    },
    /// Given up; counts from queries made while it was named may still come.
    Draining {
        until: u64,
    },
}

/// What a sweep saw since the last one.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    /// `CLOCK_MONOTONIC` seconds.
    pub now: u64,
    /// Servers without a slot that queries went to, with how many.
    pub queried: Vec<(IpAddr, u64)>,
    /// Slots that counted queries.
    pub active: Vec<u8>,
    /// Servers of queries that went unanswered, with how many.
    pub failing: Vec<(IpAddr, u64)>,
}

/// What a pass decided, for the agent to tell the programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Addresses given a slot.
    pub named: Vec<(IpAddr, u8)>,
    /// Addresses that gave their slot up (it drains before it is retired).
    pub released: Vec<(IpAddr, u8)>,
    /// Slots drained: their counts are to be moved to `other` now.
    pub retired: Vec<u8>,
}

/// A server without a name that was queried or failed recently.
#[derive(Clone, Copy, Debug, Default)]
struct Candidate {
    queries: u64,
    unanswered: u64,
    last_seen: u64,
}

/// Unanswered queries that make a server without a name failing, first in line for one.
pub const FAILING: u64 = 3;

/// Servers without a name remembered at once, the busiest and most failing kept.
pub const CANDIDATES: usize = 64;

#[derive(Debug)]
pub struct ResolverSlots {
    slots: Vec<Slot>,
    /// Servers waiting for a name: one queried while every name was live gets one when a
    /// name frees, if it was seen within the idle time.
    candidates: BTreeMap<IpAddr, Candidate>,
    amazon: AmazonResolvers,
    /// Seconds of quiet after which a resolver gives its slot up.
    idle: u64,
    /// Seconds a slot drains before it is retired.
    grace: u64,
}

impl ResolverSlots {
    /// Slots that continue from `named` (address, slot), as a restarted agent finds
    /// them. Whether they are still active is not known (the spray of a pod may have
    /// named them): each is taken as last active just long enough ago that a second of
    /// quiet lets a newcomer take its name, as one quiet that long would on a running
    /// agent; one that counts a query keeps it.
    pub fn new(
        amazon: AmazonResolvers,
        named: &[(IpAddr, u8)],
        idle: u64,
        grace: u64,
        now: u64,
    ) -> Self {
        let mut slots = vec![Slot::Free; RESOLVER_SLOTS as usize];
        let last_active = (now + 1).saturating_sub(QUIET_TO_YIELD.min(idle));
        for (ip, slot) in named {
            if let Some(s) = slots.get_mut(usize::from(*slot))
                && *slot != RESOLVER_OTHER
            {
                *s = Slot::Named {
                    ip: *ip,
                    last_active,
                };
            }
        }
        Self {
            slots,
            candidates: BTreeMap::new(),
            amazon,
            idle,
            grace,
        }
    }

    /// The slot `ip` is named in.
    pub fn slot_of(&self, ip: IpAddr) -> Option<u8> {
        self.named().find(|(_, a)| *a == ip).map(|(s, _)| s)
    }

    /// Every named slot and its address.
    pub fn named(&self) -> impl Iterator<Item = (u8, IpAddr)> + '_ {
        self.slots.iter().zip(0u8..).filter_map(|(s, n)| match s {
            Slot::Named { ip, .. } => Some((n, *ip)),
            _ => None,
        })
    }

    /// The `resolver` label of `slot`: the named address; `retired` for a slot given up
    /// (from the moment it is) and for [`RESOLVER_RETIRED`]; else `other`.
    pub fn label(&self, slot: u8) -> String {
        match self.slots.get(usize::from(slot)) {
            Some(Slot::Named { ip, .. }) => ip.to_string(),
            Some(Slot::Draining { .. }) => "retired".to_owned(),
            _ if slot == RESOLVER_RETIRED => "retired".to_owned(),
            _ => "other".to_owned(),
        }
    }

    /// Every named resolver with its kind (`amazon`, `custom`), by address.
    pub fn info(&self) -> Vec<(String, &'static str)> {
        let mut out: Vec<(String, &'static str)> = self
            .named()
            .map(|(_, ip)| {
                let kind = if self.amazon.contains(&ip) {
                    "amazon"
                } else {
                    "custom"
                };
                (ip.to_string(), kind)
            })
            .collect();
        out.sort();
        out
    }

    fn custom_named(&self) -> usize {
        self.named()
            .filter(|(_, ip)| !self.amazon.contains(ip))
            .count()
    }

    fn free_slot(&self) -> Option<u8> {
        self.slots
            .iter()
            .zip(0u8..)
            .skip(1)
            .find(|(s, _)| **s == Slot::Free)
            .map(|(_, n)| n)
    }

    fn name(&mut self, ip: IpAddr, now: u64, changes: &mut Changes) -> bool {
        let Some(n) = self.free_slot() else {
            return false;
        };
        self.slots[usize::from(n)] = Slot::Named {
            ip,
            last_active: now,
        };
        changes.named.push((ip, n));
        true
    }

    fn release(&mut self, n: u8, now: u64, changes: &mut Changes) {
        if let Some(Slot::Named { ip, .. }) = self.slots.get(usize::from(n)).cloned() {
            self.slots[usize::from(n)] = Slot::Draining {
                until: now + self.grace,
            };
            changes.released.push((ip, n));
        }
    }

    /// The named custom resolver quiet the longest, not failing now: (slot, last active).
    fn quietest(&self, failing: &[(IpAddr, u64)]) -> Option<(u8, u64)> {
        self.slots
            .iter()
            .zip(0u8..)
            .filter_map(|(s, n)| match s {
                Slot::Named { ip, last_active }
                    if !self.amazon.contains(ip) && !failing.iter().any(|(f, _)| f == ip) =>
                {
                    Some((n, *last_active))
                }
                _ => None,
            })
            .min_by_key(|(n, last)| (*last, *n))
    }

    /// Names Amazon's resolvers that have no slot yet.
    pub fn name_amazon(&mut self, ips: impl IntoIterator<Item = IpAddr>, now: u64) -> Changes {
        let mut changes = Changes::default();
        for ip in ips {
            if self.slot_of(ip).is_none() && !self.name(ip, now, &mut changes) {
                log::warn!("no resolver slot left for Amazon's resolver {ip}: counted as other");
            }
        }
        changes
    }

    /// Adds what this pass saw to the candidates; forgets those not seen within the idle
    /// time, and past `CANDIDATES` the least busy.
    fn remember(&mut self, a: &Activity) {
        for (ip, n) in &a.queried {
            if self.slot_of(*ip).is_none() {
                let c = self.candidates.entry(*ip).or_default();
                c.queries += n;
                c.last_seen = a.now;
            }
        }
        for (ip, n) in &a.failing {
            if self.slot_of(*ip).is_none() {
                let c = self.candidates.entry(*ip).or_default();
                c.unanswered += n;
                c.last_seen = a.now;
            }
        }
        let idle = self.idle;
        self.candidates
            .retain(|_, c| a.now.saturating_sub(c.last_seen) < idle);
        if self.candidates.len() > CANDIDATES {
            // The least busy go, found by one sort, not a scan each (pods choose how many
            // servers a sweep sees: thousands in a spray).
            let mut ranked: Vec<(u64, u64, IpAddr)> = self
                .candidates
                .iter()
                .map(|(ip, c)| (c.queries + c.unanswered, c.last_seen, *ip))
                .collect();
            ranked.sort_unstable();
            let excess = ranked.len() - CANDIDATES;
            for (_, _, ip) in ranked.into_iter().take(excess) {
                self.candidates.remove(&ip);
            }
        }
    }

    /// One pass over what a sweep saw.
    pub fn pass(&mut self, a: &Activity) -> Changes {
        let mut changes = Changes::default();
        self.age(a, &mut changes);
        self.remember(a);
        self.name_candidates(a, &mut changes);
        changes
    }

    /// Marks active the named slots that were, retires the slots drained, and gives up
    /// the custom names idle for `idle` seconds.
    fn age(&mut self, a: &Activity, changes: &mut Changes) {
        let now = a.now;
        for (n, slot) in self.slots.iter_mut().enumerate() {
            let failing = |ip: &IpAddr| a.failing.iter().any(|(f, _)| f == ip);
            match slot {
                Slot::Named { ip, last_active }
                    if a.active.iter().any(|s| usize::from(*s) == n) || failing(ip) =>
                {
                    *last_active = now;
                }
                Slot::Draining { until } if *until <= now => {
                    *slot = Slot::Free;
                    changes
                        .retired
                        .push(u8::try_from(n).unwrap_or(RESOLVER_OTHER));
                }
                _ => {}
            }
        }
        let idle: Vec<u8> = self
            .slots
            .iter()
            .zip(0u8..)
            .filter_map(|(s, n)| match s {
                Slot::Named { ip, last_active }
                    if !self.amazon.contains(ip)
                        && now.saturating_sub(*last_active) >= self.idle =>
                {
                    Some(n)
                }
                _ => None,
            })
            .collect();
        for n in idle {
            self.release(n, now, changes);
        }
    }

    /// Names the candidates, the failing first, then the busiest; once every name is
    /// taken a newcomer takes one quiet for a while, if there is one.
    fn name_candidates(&mut self, a: &Activity, changes: &mut Changes) {
        let now = a.now;
        // The failing first (a one-off address sprayed by a pod is not failing, a
        // resolver is), then the busiest.
        let rank = |c: &Candidate| {
            (
                c.unanswered >= FAILING,
                c.queries + c.unanswered,
                c.unanswered,
            )
        };
        let mut candidates: Vec<(IpAddr, Candidate)> =
            self.candidates.iter().map(|(ip, c)| (*ip, *c)).collect();
        candidates.sort_by(|(xa, x), (ya, y)| (rank(y), *xa).cmp(&(rank(x), *ya)));
        for (ip, _) in candidates {
            if self.amazon.contains(&ip) {
                if self.name(ip, now, changes) {
                    self.candidates.remove(&ip);
                }
                continue;
            }
            if self.custom_named() >= MAX_NAMED_RESOLVERS {
                // Every name taken: the newcomer takes a name quiet for a while, if there
                // is one.
                match self.quietest(&a.failing) {
                    Some((n, last))
                        if now.saturating_sub(last) >= QUIET_TO_YIELD.min(self.idle) =>
                    {
                        self.release(n, now, changes);
                    }
                    _ => break,
                }
            }
            if self.name(ip, now, changes) {
                self.candidates.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn custom(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn slots() -> ResolverSlots {
        let amazon = AmazonResolvers::default();
        amazon.add(ip("169.254.169.253"));
        ResolverSlots::new(amazon, &[], 300, 3, 0)
    }

    #[test]
    fn amazon_is_always_named_and_never_idle() {
        let mut s = slots();
        let c = s.name_amazon([ip("169.254.169.253")], 0);
        assert_eq!(c.named, [(ip("169.254.169.253"), 1)]);
        let c = s.pass(&Activity {
            now: 10_000,
            ..Activity::default()
        });
        assert_eq!(c, Changes::default());
        assert_eq!(s.label(1), "169.254.169.253");
        assert_eq!(s.info(), [("169.254.169.253".to_owned(), "amazon")]);
    }

    #[test]
    fn the_busiest_are_named_up_to_the_bound_and_the_rest_are_other() {
        let mut s = slots();
        let queried: Vec<_> = (1..=20).map(|i| (custom(i), u64::from(i))).collect();
        let c = s.pass(&Activity {
            now: 1,
            queried,
            ..Activity::default()
        });
        assert_eq!(c.named.len(), MAX_NAMED_RESOLVERS);
        // The busiest (20 queries) first; the four quietest stay other.
        assert_eq!(c.named[0], (custom(20), 1));
        for i in 1..=4 {
            assert_eq!(s.slot_of(custom(i)), None, "{i}");
        }
        assert_eq!(s.label(0), "other");
        assert_eq!(s.label(31), "other");
        // A live name is not taken by a newcomer, however busy.
        let c = s.pass(&Activity {
            now: 2,
            queried: vec![(custom(99), 1000)],
            active: (1..=16).collect(),
            ..Activity::default()
        });
        assert!(c.named.is_empty(), "{c:?}");
    }

    #[test]
    fn a_failing_resolver_takes_the_first_name_that_goes_quiet() {
        let mut s = slots();
        let queried: Vec<_> = (1..=16).map(|i| (custom(i), 10)).collect();
        s.pass(&Activity {
            now: 1,
            queried,
            ..Activity::default()
        });
        // All names taken and live: a failing newcomer waits (it is other meanwhile).
        let c = s.pass(&Activity {
            now: 2,
            active: (1..=16).collect(),
            failing: vec![(custom(50), 3)],
            ..Activity::default()
        });
        assert_eq!(c, Changes::default());
        // Slot 1 goes quiet; the newcomer, still failing, takes the first name quiet for
        // long enough, before any busy newcomer.
        let c = s.pass(&Activity {
            now: 2 + QUIET_TO_YIELD,
            active: (2..=16).collect(),
            queried: vec![(custom(70), 1000)],
            failing: vec![(custom(50), 3)],
        });
        assert_eq!(c.released.len(), 1);
        let (gone, freed) = c.released[0];
        assert_eq!(s.slot_of(gone), None);
        assert_eq!(c.named.len(), 1);
        assert_eq!(c.named[0].0, custom(50));
        assert_ne!(
            c.named[0].1, freed,
            "a slot drains before it is given again"
        );
        assert_eq!(s.slot_of(custom(70)), None, "every name is live again");
        // The drained slot is retired after the grace (3 s), then free again.
        let c = s.pass(&Activity {
            now: 5 + QUIET_TO_YIELD,
            active: (2..=17).collect(),
            ..Activity::default()
        });
        assert_eq!(c.retired, [freed]);
    }

    #[test]
    fn a_quiet_resolver_gives_its_slot_up_and_it_is_retired_after_the_grace() {
        let mut s = slots();
        s.pass(&Activity {
            now: 0,
            queried: vec![(custom(1), 1)],
            ..Activity::default()
        });
        assert_eq!(s.slot_of(custom(1)), Some(1));
        let c = s.pass(&Activity {
            now: 299,
            ..Activity::default()
        });
        assert_eq!(c, Changes::default());
        let c = s.pass(&Activity {
            now: 300,
            ..Activity::default()
        });
        assert_eq!(c.released, [(custom(1), 1)]);
        // Its counts are `retired` from now on, never `other`.
        assert_eq!(s.label(1), "retired");
        assert_eq!(s.label(RESOLVER_RETIRED), "retired");
        assert_eq!(s.label(2), "other");
        assert!(s.info().is_empty());
        let c = s.pass(&Activity {
            now: 303,
            ..Activity::default()
        });
        assert_eq!(c.retired, [1]);
        // Back again: named anew.
        let c = s.pass(&Activity {
            now: 304,
            queried: vec![(custom(1), 1)],
            ..Activity::default()
        });
        assert_eq!(c.named, [(custom(1), 1)]);
    }

    #[test]
    fn a_restart_continues_from_the_slots_found() {
        let s = ResolverSlots::new(
            AmazonResolvers::default(),
            &[(custom(7), 5), (custom(8), 0), (custom(9), 200)],
            300,
            3,
            0,
        );
        assert_eq!(s.slot_of(custom(7)), Some(5));
        assert_eq!(s.slot_of(custom(8)), None, "slot 0 is other");
        assert_eq!(s.slot_of(custom(9)), None, "past the slots");
        assert_eq!(s.label(5), custom(7).to_string());
    }

    #[test]
    fn after_a_restart_that_followed_a_spray_a_new_resolver_is_named_within_a_second() {
        // Every custom name held by a spray's one-off addresses when the agent restarts.
        let sprayed: Vec<(IpAddr, u8)> = (0..16u8)
            .map(|i| (custom(u32::from(i) + 100), i + 2))
            .collect();
        let now = 1000;
        let mut s = ResolverSlots::new(AmazonResolvers::default(), &sprayed, 300, 4, now);
        let fresh = custom(1);
        // Half a second on, nothing named yet is quiet long enough.
        let c = s.pass(&Activity {
            now,
            queried: vec![(fresh, 5)],
            ..Activity::default()
        });
        assert!(c.named.is_empty(), "{c:?}");
        // A second on: the quietest sprayed name yields, the fresh resolver takes it.
        let c = s.pass(&Activity {
            now: now + 1,
            queried: vec![(fresh, 5)],
            ..Activity::default()
        });
        assert_eq!(c.released, [(custom(100), 2)]);
        assert_eq!(c.named.len(), 1, "{c:?}");
        assert!(s.slot_of(fresh).is_some());
        // A restored name that counts queries keeps it.
        let mut s = ResolverSlots::new(AmazonResolvers::default(), &sprayed, 300, 4, now);
        let c = s.pass(&Activity {
            now: now + 1,
            queried: vec![(fresh, 5)],
            active: (2..=17).collect(),
            ..Activity::default()
        });
        assert!(c.named.is_empty() && c.released.is_empty(), "{c:?}");
    }
}
