//! The alert rules' thresholds, for `monitor status` to flag what the rules would page
//! on. `deploy/alerts/rules.yml` carries the same numbers in its expressions (`PromQL`
//! cannot read these); the deploy test finds each one there, in the rule named beside
//! it, so the two cannot drift apart.

/// `EniMonitorConntrackAllowanceHigh`: the share of the allowance in use.
pub const CONNTRACK_HIGH: f64 = 0.8;
/// `EniMonitorConntrackAllowanceCritical`.
pub const CONNTRACK_CRITICAL: f64 = 0.9;
/// `EniMonitorConntrackAllowanceExhaustionPredicted`: how far ahead a full allowance is
/// foreseen (`predict_linear`'s 900 s).
pub const EXHAUSTION_HORIZON_MINUTES: f64 = 15.0;
/// `EniMonitorLinkLocalPeakHigh`: the busiest second's packets to link-local services.
pub const LINKLOCAL_PEAK_HIGH: f64 = 800.0;
/// EC2's limit on packets a second to its link-local services, from one ENI.
pub const LINKLOCAL_LIMIT: f64 = 1024.0;
/// `EniMonitorDnsUnanswered`: the share of a resolver's queries left unanswered.
pub const DNS_UNANSWERED: f64 = 0.01;
