//! The instance's connection-tracking allowance and how much of it is in use. The
//! allowance is instance-wide (every ENI's tracked flows count against it), so this is
//! one figure per node:
//! - the flag (`--conntrack-allowance` T) and the driver (`conntrack_allowance_available`
//!   a): (T - a) / T, exact, from the hypervisor's own count;
//! - the driver alone: T learned as the largest a + tracked seen (tracked is the flow
//!   table's estimate), then (T - a) / T;
//! - the flag alone: tracked / T, the estimate.

/// Where the allowance in use came from: the `source` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Learned,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Learned => "learned",
        }
    }
}

/// One reading of the allowance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assessment {
    pub allowance: u64,
    pub source: Source,
    pub utilization: f64,
}

#[derive(Debug, Default)]
pub struct Allowance {
    /// `--conntrack-allowance`.
    pub flag: Option<u64>,
    learned: u64,
}

impl Allowance {
    pub fn new(flag: Option<u64>) -> Self {
        Self { flag, learned: 0 }
    }

    /// `tracked`: the flow table's estimate over every monitored ENI, when a pass has run;
    /// `available`: the driver's figure, when any ENI reports one.
    pub fn assess(&mut self, tracked: Option<u64>, available: Option<u64>) -> Option<Assessment> {
        #[expect(
            clippy::cast_precision_loss,
            reason = "connection counts are far below 2^52"
        )]
        let ratio = |used: u64, total: u64| used as f64 / total as f64;
        let (allowance, source, used) = match (self.flag, available) {
            (Some(t), Some(a)) => (t, Source::Flag, t.saturating_sub(a)),
            (None, Some(a)) => {
                self.learned = self.learned.max(a.saturating_add(tracked.unwrap_or(0)));
                (
                    self.learned,
                    Source::Learned,
                    self.learned.saturating_sub(a),
                )
            }
            (Some(t), None) => (t, Source::Flag, tracked?),
            (None, None) => return None,
        };
        (allowance > 0).then(|| Assessment {
            allowance,
            source,
            utilization: ratio(used, allowance),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(
        a: &mut Allowance,
        tracked: Option<u64>,
        available: Option<u64>,
    ) -> Option<(u64, Source, f64)> {
        a.assess(tracked, available)
            .map(|x| (x.allowance, x.source, x.utilization))
    }

    #[test]
    fn flag_and_driver_are_exact() {
        let mut a = Allowance::new(Some(1000));
        // The driver counts what the hypervisor tracks; the estimate does not matter.
        assert_eq!(
            at(&mut a, Some(10), Some(250)),
            Some((1000, Source::Flag, 0.75))
        );
        assert_eq!(
            at(&mut a, None, Some(1000)),
            Some((1000, Source::Flag, 0.0))
        );
    }

    #[test]
    fn the_driver_alone_learns_the_allowance() {
        let mut a = Allowance::new(None);
        assert_eq!(
            at(&mut a, Some(200), Some(800)),
            Some((1000, Source::Learned, 0.2))
        );
        // More in use, the same total: the allowance holds.
        assert_eq!(
            at(&mut a, Some(500), Some(500)),
            Some((1000, Source::Learned, 0.5))
        );
        // An estimate that lags (untracked flows) never lowers what was learned.
        assert_eq!(
            at(&mut a, Some(100), Some(400)),
            Some((1000, Source::Learned, 0.6))
        );
    }

    #[test]
    fn the_flag_alone_uses_the_estimate() {
        let mut a = Allowance::new(Some(300));
        assert_eq!(at(&mut a, Some(75), None), Some((300, Source::Flag, 0.25)));
        assert_eq!(at(&mut a, None, None), None, "no pass yet");
        assert_eq!(at(&mut Allowance::new(None), Some(75), None), None);
    }
}
