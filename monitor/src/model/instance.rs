//! EC2's default tracking timeouts by instance type. Only TCP established differs: the EC2
//! API reference (`ConnectionTrackingSpecificationRequest`, `TcpEstablishedTimeout`) gives
//! 350 s on Nitro v6 instance types except P6e-GB200, and 432000 s on every other type.
//! Which families run on Nitro v6 is in the EC2 instance types guide (each family's
//! "Platform summary", the Hypervisor column) and AWS's launch announcements of the
//! sixth-generation Nitro cards (from June 2025). A family missing here keeps 432000 s:
//! flows EC2 has forgotten are then still counted, an estimate that errs towards warning.
//! `--tcp-established-timeout` wins over this table, and sets what a lowered ENI uses.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

/// EC2's TCP-established default on all but Nitro v6 types: 5 days.
pub const TCP_ESTABLISHED: Duration = Duration::from_hours(120);
/// EC2's TCP-established default on Nitro v6 types.
pub const TCP_ESTABLISHED_NITRO_V6: Duration = Duration::from_secs(350);

/// Families built on Nitro v6 (the part of a type before its size): those AWS launched
/// with its sixth-generation Nitro cards that could be named with confidence. A family
/// wrongly listed would understate the estimate (a late warning); one missing overstates
/// it (an early one): only the first is worth avoiding, so the list is short.
const NITRO_V6: &[&str] = &[
    // Graviton4 with sixth-generation Nitro cards (network- and EBS-optimised).
    "c8gn",
    "m8gn",
    "m8gb",
    // Intel Xeon 6.
    "c8i",
    "c8i-flex",
    "m8i",
    "m8i-flex",
    "r8i",
    "r8i-flex",
    // Nitro v6, but excluded from the 350 s default by the API reference.
    "p6e-gb200",
];

/// Families of `NITRO_V6` that keep the 432000 s default.
const NITRO_V6_EXCEPTIONS: &[&str] = &["p6e-gb200"];

/// An instance type's family: `c8i-flex.large` is `c8i-flex`. `None` for what is not an
/// instance type (IMDS answered something else).
pub fn family(instance_type: &str) -> Option<&str> {
    let (family, size) = instance_type.split_once('.')?;
    let word = |s: &str| {
        !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (word(family) && word(size)).then_some(family)
}

/// Whether `instance_type` runs on Nitro v6.
pub fn nitro_v6(instance_type: &str) -> bool {
    family(instance_type).is_some_and(|f| NITRO_V6.contains(&f))
}

/// EC2's default TCP-established tracking timeout on `instance_type`.
pub fn tcp_established_default(instance_type: &str) -> Duration {
    match family(instance_type) {
        Some(f) if NITRO_V6.contains(&f) && !NITRO_V6_EXCEPTIONS.contains(&f) => {
            TCP_ESTABLISHED_NITRO_V6
        }
        _ => TCP_ESTABLISHED,
    }
}

/// The TCP-established timeout in use: the flag's, else the instance type's default once
/// IMDS named the type, else (off EC2, or until IMDS answers) EC2's general default.
#[derive(Clone, Debug, Default)]
pub struct TcpEstablished {
    flag: Option<Duration>,
    learned: Arc<OnceLock<Duration>>,
}

impl TcpEstablished {
    pub fn new(flag: Option<Duration>) -> Self {
        Self {
            flag,
            learned: Arc::default(),
        }
    }

    /// Takes `instance_type`'s default (unless the flag set one); the timeout in use.
    pub fn learn(&self, instance_type: &str) -> Duration {
        let _ = self.learned.set(tcp_established_default(instance_type));
        self.get()
    }

    /// Whether the flag set it.
    pub fn flagged(&self) -> bool {
        self.flag.is_some()
    }

    pub fn get(&self) -> Duration {
        self.flag
            .or_else(|| self.learned.get().copied())
            .unwrap_or(TCP_ESTABLISHED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nitro_v6_types_default_to_350_seconds() {
        for t in [
            "c8i.large",
            "c8i-flex.2xlarge",
            "m8i.48xlarge",
            "m8i-flex.large",
            "r8i.metal-96xl",
            "c8gn.medium",
            "m8gb.xlarge",
            "m8gn.large",
        ] {
            assert!(nitro_v6(t), "{t}");
            assert_eq!(tcp_established_default(t), Duration::from_secs(350), "{t}");
        }
    }

    #[test]
    fn other_types_and_the_exception_default_to_five_days() {
        for t in [
            "m5.large",
            "c6gn.16xlarge",
            "m7g.medium",
            "c7i-flex.large",
            "m8g.large",
            "t3.micro",
            "p5.48xlarge",
            "p6e-gb200.36xlarge",
        ] {
            assert_eq!(tcp_established_default(t), Duration::from_hours(120), "{t}");
        }
        assert!(nitro_v6("p6e-gb200.36xlarge"));
        assert!(!nitro_v6("m8g.large"));
    }

    #[test]
    fn what_is_not_an_instance_type_has_no_family() {
        for t in [
            "",
            "c8i",
            ".large",
            "c8i.",
            "C8I.LARGE",
            "c8i.large\n",
            "<html>.x",
        ] {
            assert_eq!(family(t), None, "{t:?}");
            assert_eq!(tcp_established_default(t), TCP_ESTABLISHED, "{t:?}");
        }
        assert_eq!(family("c8i-flex.large"), Some("c8i-flex"));
    }

    #[test]
    fn the_flag_wins_and_the_type_is_learned_once() {
        let unset = TcpEstablished::new(None);
        assert_eq!(unset.get(), TCP_ESTABLISHED);
        assert_eq!(unset.learn("c8i.large"), Duration::from_secs(350));
        assert_eq!(unset.clone().get(), Duration::from_secs(350));
        assert_eq!(unset.learn("m5.large"), Duration::from_secs(350));
        let flagged = TcpEstablished::new(Some(Duration::from_mins(15)));
        assert_eq!(flagged.learn("c8i.large"), Duration::from_mins(15));
        assert!(flagged.flagged() && !unset.flagged());
    }
}
