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
/// `EniMonitorLinkLocalPeakHigh` (its condition's record,
/// `node_device:eni_monitor_linklocal_peak_packets_per_second:max_high`): the busiest
/// second's packets to link-local services.
pub const LINKLOCAL_PEAK_HIGH: f64 = 800.0;
/// EC2's limit on packets a second to its link-local services, from one ENI.
pub const LINKLOCAL_LIMIT: f64 = 1024.0;
/// `EniMonitorDnsUnanswered` (its condition's record,
/// `node_device_resolver:eni_monitor_dns_unanswered:ratio_rate5m_high`): the share of a
/// resolver's queries left unanswered.
pub const DNS_UNANSWERED: f64 = 0.01;
