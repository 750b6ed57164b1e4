//! Names of the load-time globals in the eBPF object: kernel layout facts the agent
//! reads from BTF and probes at start, and keys it draws at each load.

pub const SKB_HEAD: &str = "SKB_HEAD_OFF";
pub const SKB_NETWORK_HEADER: &str = "SKB_NETWORK_HEADER_OFF";
pub const SKB_TRANSPORT_HEADER: &str = "SKB_TRANSPORT_HEADER_OFF";
pub const SKB_PROTOCOL: &str = "SKB_PROTOCOL_OFF";
pub const SKB_DEV: &str = "SKB_DEV_OFF";
pub const DEV_IFINDEX: &str = "DEV_IFINDEX_OFF";
pub const DEV_NET: &str = "DEV_NET_OFF";
pub const NET_INUM: &str = "NET_INUM_OFF";
/// `sock.__sk_common.skc_num` (local port, host order) and `skc_dport` (remote port,
/// network order).
pub const SK_NUM: &str = "SK_NUM_OFF";
pub const SK_DPORT: &str = "SK_DPORT_OFF";
pub const OWN_NETNS_INUM: &str = "OWN_NETNS_INUM";
/// 1 when the `kfree_skb` raw tracepoint's third argument is the drop reason (5.17+).
pub const KFREE_SKB_HAS_REASON: &str = "KFREE_SKB_HAS_REASON";
/// Reasons at or below this value (`NOT_SPECIFIED` and the non-drops before it)
/// are not counted.
pub const REASON_NOT_SPECIFIED: &str = "REASON_NOT_SPECIFIED";
/// 1 when the kernel has `bpf_ktime_get_coarse_ns` (5.11+).
pub const HAVE_COARSE_CLOCK: &str = "HAVE_COARSE_CLOCK";
/// The key of the flows' hash (two words), random when the flow tables are made and
/// kept with them (`HASH_KEYS`): no one outside can aim flows at one set and fingerprint.
pub const FLOW_HASH_KEY_LO: &str = "FLOW_HASH_KEY_LO";
pub const FLOW_HASH_KEY_HI: &str = "FLOW_HASH_KEY_HI";
/// Sets in `FLOW_SETS` as loaded (one on kernels without BPF atomics, which keep every
/// flow in `FLOWS`).
pub const FLOW_TABLE_SETS: &str = "FLOW_TABLE_SETS";
/// `--flow-table-size`: the flows both tables may hold together.
pub const FLOW_TABLE_SIZE: &str = "FLOW_TABLE_SIZE";
/// The key of the hash that picks a DNS query's set in `DNS_PENDING`.
pub const DNS_SET_KEY: &str = "DNS_SET_KEY";
/// Sets in `DNS_PENDING` as loaded (`DNS_PENDING_SETS` unless sized otherwise).
pub const PENDING_SETS: &str = "PENDING_SETS";
/// 1 on CPUs that make stores visible in program order (`x86_64`): a query is then
/// published with a plain store rather than an atomic exchange.
pub const STORES_IN_ORDER: &str = "STORES_IN_ORDER";
