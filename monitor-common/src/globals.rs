//! The load-time globals of the eBPF object, listed once: kernel layout facts the agent
//! reads from BTF and probes at start, and the sizes and keys it sets at each load.
//! `with_globals!` hands the list to a macro of the caller's: here it names each global
//! (`SKB_HEAD_OFF: &str`, the symbol the loader patches); in the eBPF crate it declares
//! each one and its getter (`layout::skb_head()`).

/// Calls `$m!` with every global as `getter => SYMBOL`, each after its doc comment.
#[macro_export]
macro_rules! with_globals {
    ($m:ident) => {
        $m! {
            skb_head => SKB_HEAD_OFF,
            skb_network_header => SKB_NETWORK_HEADER_OFF,
            skb_transport_header => SKB_TRANSPORT_HEADER_OFF,
            skb_protocol => SKB_PROTOCOL_OFF,
            skb_dev => SKB_DEV_OFF,
            dev_ifindex => DEV_IFINDEX_OFF,
            dev_net => DEV_NET_OFF,
            net_inum => NET_INUM_OFF,
            /// `sock.__sk_common.skc_num` (local port, host order).
            sk_num => SK_NUM_OFF,
            /// `sock.__sk_common.skc_dport` (remote port, network order).
            sk_dport => SK_DPORT_OFF,
            own_netns_inum => OWN_NETNS_INUM,
            /// 1 when the `kfree_skb` raw tracepoint's third argument is the drop reason
            /// (5.17+).
            kfree_skb_has_reason => KFREE_SKB_HAS_REASON,
            /// Reasons at or below this value (`NOT_SPECIFIED` and the non-drops before
            /// it) are not counted.
            reason_not_specified => REASON_NOT_SPECIFIED,
            /// 1 when the kernel has `bpf_ktime_get_coarse_ns` (5.11+).
            have_coarse_clock => HAVE_COARSE_CLOCK,
            /// The key of the flows' hash (two words), random when the flow tables are
            /// made and kept with them (`HASH_KEYS`): no one outside can aim flows at one
            /// set and fingerprint.
            flow_hash_key_lo => FLOW_HASH_KEY_LO,
            flow_hash_key_hi => FLOW_HASH_KEY_HI,
            /// Sets in `FLOW_SETS` as loaded (one on kernels without BPF atomics, which
            /// keep every flow in `FLOWS`).
            flow_sets => FLOW_TABLE_SETS,
            /// `--flow-table-size`: the flows both tables may hold together.
            flow_table_size => FLOW_TABLE_SIZE,
            /// The key of the hash that picks a DNS query's set in `DNS_PENDING`.
            dns_set_key => DNS_SET_KEY,
            /// Sets in `DNS_PENDING` as loaded (`DNS_PENDING_SETS` unless sized
            /// otherwise).
            pending_sets => PENDING_SETS,
            /// 1 on CPUs that make stores visible in program order (`x86_64`): a query is
            /// then published with a plain store rather than an atomic exchange.
            stores_in_order => STORES_IN_ORDER,
        }
    };
}

macro_rules! names {
    ($($(#[$doc:meta])* $getter:ident => $symbol:ident),* $(,)?) => {
        $(
            $(#[$doc])*
            pub const $symbol: &str = stringify!($symbol);
        )*
        /// Every global, for a check that each is set at load.
        pub const ALL: &[&str] = &[$($symbol),*];
    };
}

with_globals!(names);
