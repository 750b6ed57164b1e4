//! The agent's periodic work on the kernel's tables, each on a thread of its own so
//! that scrapes never wait behind it (a pass over a million flows takes a few hundred
//! milliseconds): the flow expiry pass and the DNS timeout sweep. And the clock they
//! share with the programs.

pub mod expiry;
pub mod sweep;

use std::time::Duration;

use anyhow::{Context as _, Result};
use log::warn;

pub use self::{expiry::Expiry, sweep::Sweeper};

/// `CLOCK_MONOTONIC` nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `CLOCK_MONOTONIC` seconds, the programs' flow clock.
pub fn monotonic_s() -> u32 {
    u32::try_from(monotonic_ns() / 1_000_000_000).unwrap_or(u32::MAX)
}

/// Starts the sweep and the expiry. A first expiry pass runs now, once the devices are
/// known: the flows a previous agent left are counted from the first scrape.
pub fn start(mut sweeper: Sweeper, mut expiry: Expiry) -> Result<()> {
    if let Err(e) = expiry.pass(monotonic_s()) {
        warn!("expiring flows: {e}");
    }
    let period = sweeper.period();
    every_on_thread("dns-sweep", period, move || {
        if let Err(e) = sweeper.sweep(monotonic_ns()) {
            warn!("timing out DNS queries: {e}");
        }
    })?;
    let period = expiry.period();
    every_on_thread("flow-expiry", period, move || {
        if let Err(e) = expiry.pass(monotonic_s()) {
            warn!("expiring flows: {e}");
        }
    })?;
    Ok(())
}

/// Runs `f` every `period` on a thread named `name`, for the agent's life.
fn every_on_thread(
    name: &str,
    period: Duration,
    mut f: impl FnMut() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                f();
            }
        })
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(())
}
