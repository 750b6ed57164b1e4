//! The agent's periodic work on the kernel's tables, each on a thread of its own so
//! that scrapes never wait behind it (a pass over a million flows takes a few hundred
//! milliseconds): the flow expiry pass and the DNS timeout sweep. And the clock they
//! share with the programs.

pub mod expiry;
pub mod names;
pub mod senders;
pub mod sweep;

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use log::{error, warn};

pub use self::{expiry::Expiry, names::ResolverNames, senders::SenderGatherer, sweep::Sweeper};

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

/// Starts the sweep and the expiry, and returns their heartbeats. A first expiry pass
/// runs now, once the devices are known: the flows a previous agent left are counted
/// from the first scrape.
pub fn start(
    mut sweeper: Sweeper,
    mut expiry: Expiry,
    senders: SenderGatherer,
) -> Result<Heartbeats> {
    if let Err(e) = expiry.pass(monotonic_s()) {
        warn!("expiring flows: {e}");
    }
    let beats = Heartbeats::default();
    let period = sweeper.period();
    beats.every_on_thread("dns-sweep", period, stall_after(period), move || {
        if let Err(e) = sweeper.sweep(monotonic_ns()) {
            warn!("timing out DNS queries: {e}");
        }
    })?;
    let period = SenderGatherer::PERIOD;
    beats.every_on_thread(
        "linklocal-senders",
        period,
        stall_after(period),
        move || {
            if let Err(e) = senders.gather(monotonic_ns()) {
                warn!("reading link-local senders: {e}");
            }
        },
    )?;
    let period = expiry.period();
    beats.every_on_thread("flow-expiry", period, stall_after(period), move || {
        if let Err(e) = expiry.pass(monotonic_s()) {
            warn!("expiring flows: {e}");
        }
    })?;
    Ok(beats)
}

/// How long a housekeeping thread may go without finishing a pass before it is taken
/// for stalled: ten periods, and never less than a minute (a pass over a million flows
/// on a busy node takes seconds).
pub fn stall_after(period: Duration) -> Duration {
    (period * 10).max(Duration::from_mins(1))
}

/// When each housekeeping thread last finished a pass: what `/healthz` reads, so that a
/// thread that died (a panic) or stalled turns the probe red, and the kubelet restarts
/// an agent whose numbers have stopped moving.
#[derive(Clone, Debug, Default)]
pub struct Heartbeats(Arc<Mutex<Vec<Beat>>>);

#[derive(Debug)]
struct Beat {
    name: String,
    stall: Duration,
    /// `CLOCK_MONOTONIC` nanoseconds of its last pass's end; `DEAD` once it panicked.
    last_ns: Arc<AtomicU64>,
}

const DEAD: u64 = u64::MAX;

impl Heartbeats {
    /// Runs `f` every `period` on a thread named `name`, for the agent's life. A panic
    /// in `f` ends the thread, logged, and marks it dead.
    pub fn every_on_thread(
        &self,
        name: &str,
        period: Duration,
        stall: Duration,
        mut f: impl FnMut() + Send + 'static,
    ) -> Result<()> {
        let last_ns = Arc::new(AtomicU64::new(monotonic_ns()));
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Beat {
                name: name.to_owned(),
                stall,
                last_ns: Arc::clone(&last_ns),
            });
        let thread = name.to_owned();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    if std::panic::catch_unwind(AssertUnwindSafe(&mut f)).is_err() {
                        error!(
                            "the {thread} thread panicked and stopped: /healthz fails from now on"
                        );
                        last_ns.store(DEAD, Ordering::Release);
                        return;
                    }
                    last_ns.store(monotonic_ns(), Ordering::Release);
                }
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(())
    }

    /// What is wrong at `now_ns`: each thread that died or has not finished a pass for
    /// longer than it may, said in a few words.
    pub fn faults(&self, now_ns: u64) -> Vec<String> {
        let beats = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        beats
            .iter()
            .filter_map(|b| {
                let last = b.last_ns.load(Ordering::Acquire);
                if last == DEAD {
                    return Some(format!("{} stopped (panicked)", b.name));
                }
                let quiet = Duration::from_nanos(now_ns.saturating_sub(last));
                (quiet > b.stall).then(|| format!("{} stalled for {}s", b.name, quiet.as_secs()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_panics_or_stalls_is_a_fault() {
        let beats = Heartbeats::default();
        let period = Duration::from_millis(20);
        beats
            .every_on_thread("steady", period, Duration::from_secs(5), || {})
            .unwrap();
        let mut passes = 0;
        beats
            .every_on_thread("breaks", period, Duration::from_secs(5), move || {
                passes += 1;
                assert!(passes < 3, "a pass that breaks");
            })
            .unwrap();
        beats
            .every_on_thread("stuck", period, Duration::from_millis(200), || {
                std::thread::sleep(Duration::from_hours(1));
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            beats.faults(monotonic_ns()),
            ["breaks stopped (panicked)", "stuck stalled for 0s"]
        );
        assert_eq!(
            stall_after(Duration::from_millis(500)),
            Duration::from_mins(1)
        );
        assert_eq!(stall_after(Duration::from_secs(30)), Duration::from_mins(5));
    }
}
