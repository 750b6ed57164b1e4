//! The flow tables: the EC2 tracking model's one row per flow, in its set of `FLOW_SETS` or in
//! `FLOWS`.

use core::mem::offset_of;

use crate::{
    Addr,
    hash::{GOLDEN_64, XXH64_PRIME_2, XXH64_PRIME_3},
    labelled,
    proto::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

/// Key of `FLOWS`: a direction-agnostic 5-tuple on one device. The (address, port) pair
/// that sorts first is side `a`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_a: Addr,
    pub addr_b: Addr,
    pub port_a: u16,
    pub port_b: u16,
    pub ifindex: u32,
    /// IP protocol number.
    pub proto: u8,
    pub pad: [u8; 3],
}
/// The classifiers build and hash a key as its 11 words.
pub const FLOW_KEY_WORDS: usize = 11;
const _: () = assert!(size_of::<FlowKey>() == FLOW_KEY_WORDS * 4);

impl FlowKey {
    /// The key as its words, as the classifiers build it.
    pub const fn words(&self) -> [u32; FLOW_KEY_WORDS] {
        flow_key_words(
            &self.addr_a,
            &self.addr_b,
            self.port_a,
            self.port_b,
            self.ifindex,
            self.proto,
        )
    }

    /// Whether both sides are IPv4 (mapped) addresses.
    pub fn is_v4(&self) -> bool {
        let mapped = [0, 0, crate::V4_MAPPED_WORD];
        self.addr_a[..3] == mapped && self.addr_b[..3] == mapped
    }

    /// The set of `FLOW_SETS` (of `sets`) an IPv4 flow lives in, by the programs' hash
    /// keyed with `seed`.
    pub fn set(&self, seed: u64, sets: u32) -> u32 {
        flow_set(flow_hash_v4(&self.words(), seed), sets)
    }
}

/// A flow's key as the words `FlowKey` lays out, from its sides (side a first): what the
/// classifiers build and hash a word at a time.
#[inline]
pub const fn flow_key_words(
    a: &Addr,
    b: &Addr,
    port_a: u16,
    port_b: u16,
    ifindex: u32,
    proto: u8,
) -> [u32; FLOW_KEY_WORDS] {
    [
        a[0],
        a[1],
        a[2],
        a[3],
        b[0],
        b[1],
        b[2],
        b[3],
        port_a as u32 | ((port_b as u32) << 16),
        ifindex,
        proto as u32,
    ]
}

const K: u64 = GOLDEN_64;
/// Keys the second lane (and the IPv4 hash) apart from the first.
const K2: u64 = XXH64_PRIME_2;
const K3: u64 = XXH64_PRIME_3;

#[inline]
const fn pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | ((hi as u64) << 32)
}

#[inline]
const fn round(h: u64, v: u64) -> u64 {
    let h = (h ^ v).wrapping_mul(K);
    h ^ (h >> 29)
}

/// Joins two lanes into the hash.
#[inline]
const fn finish(x: u64, y: u64) -> u64 {
    let h = x.wrapping_add(y.wrapping_mul(K2));
    let h = (h ^ (h >> 32)).wrapping_mul(K);
    h ^ (h >> 29)
}

/// A keyed 64-bit hash of a flow's key words, in two lanes of three rounds that the CPU
/// runs side by side (one chain of six multiplications waits on each in turn), joined at
/// the end. Its top 32 bits pick a set (of the per-CPU cache, of `FLOW_SETS`), its low
/// bits are the fingerprint.
#[inline]
pub const fn flow_hash(w: &[u32; FLOW_KEY_WORDS], seed: u64) -> u64 {
    let (mut x, mut y) = (seed, seed ^ K2);
    x = round(x, pair(w[0], w[1]));
    y = round(y, pair(w[2], w[3]));
    x = round(x, pair(w[4], w[5]));
    y = round(y, pair(w[6], w[7]));
    x = round(x, pair(w[8], w[9]));
    y = round(y, w[10] as u64);
    finish(x, y)
}

/// `flow_hash` of an IPv4 flow's key, whose addresses' first three words are the same
/// for every IPv4 flow: one round a lane over the words that differ, keyed apart from
/// `flow_hash` so that the two kinds of key are no likelier to meet than any two keys.
#[inline]
pub const fn flow_hash_v4(w: &[u32; FLOW_KEY_WORDS], seed: u64) -> u64 {
    let x = round(seed ^ K3, pair(w[3], w[7]));
    let y = round(seed ^ K2 ^ K3, pair(w[8], w[9]));
    // The protocol by a multiplication of its own, beside the lanes: keys that differ in
    // it alone always differ in the hash.
    finish(x, y ^ (w[10] as u64).wrapping_mul(K3))
}

/// The set of `sets` a hash picks, by its top 32 bits (multiply and shift: any number of
/// sets).
#[inline]
pub const fn flow_set(h: u64, sets: u32) -> u32 {
    (((h >> 32) * sets as u64) >> 32) as u32
}

/// Value of `FLOWS`.
///
/// Each `FLOW_*` bit has a byte of its own (`marks`, byte `i` for bit `1 << i`), set to 1
/// with a plain one-byte store: two CPUs setting different bits of one flow (a FIN each
/// way) write different bytes, and neither can undo the other, on every kernel and
/// without atomics (which kernels before 5.12 lack for anything but an add). A read-or-
/// write of a shared flags byte could lose one and leave a closed connection
/// "established" for days.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `CLOCK_MONOTONIC` seconds.
    pub first_seen: u32,
    pub last_seen: u32,
    /// The `FLOW_*` bits, a byte each (`marks_of`).
    pub marks: u64,
}
const _: () = assert!(size_of::<Flow>() == 16);

/// The byte of each `FLOW_*` bit set (any non-zero byte reads as set).
pub const FLOW_MARK_BYTES: u64 = 0x0001_0101_0101_0101;

/// `bits` (the seven `FLOW_*` bits) spread out, bit `i` to byte `i`: multiplied by
/// `2^(7i)` bit `i` lands on bit `8i`, and no two products overlap.
#[inline]
pub const fn marks_of(bits: u8) -> u64 {
    ((bits & 0x7f) as u64).wrapping_mul(0x0000_0408_1020_4081) & FLOW_MARK_BYTES
}

/// The `FLOW_*` bits of `marks`: a byte that is not zero is its bit set. Each byte is
/// folded to its low bit, and the low bits gathered into the top byte by one multiply
/// (bit `8i` times `2^(56-7i)` lands on bit `56+i`; no other product reaches the top
/// byte).
#[inline]
pub const fn bits_of(marks: u64) -> u8 {
    let mut x = marks;
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    ((x & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8 & 0x7f
}

impl Flow {
    pub const fn new(first_seen: u32, last_seen: u32, bits: u8) -> Self {
        Self {
            first_seen,
            last_seen,
            marks: marks_of(bits),
        }
    }

    /// The `FLOW_*` bits.
    pub const fn flags(&self) -> u8 {
        bits_of(self.marks)
    }
}

/// A packet went from side a to side b.
pub const FLOW_AB: u8 = 1;
/// A packet went from side b to side a.
pub const FLOW_BA: u8 = 2;
pub const FLOW_FIN_AB: u8 = 4;
pub const FLOW_FIN_BA: u8 = 8;
pub const FLOW_RST: u8 = 16;
/// Side a (or b) is local: the node or one of its pods, the sender of an egress packet.
pub const FLOW_LOCAL_A: u8 = 32;
pub const FLOW_LOCAL_B: u8 = 64;

/// Sets of each CPU's cache of recently refreshed flows in front of `FLOWS`: four ways of
/// 8 bytes each (half a cache line), 48 KiB per CPU.
pub const FLOW_CACHE_SETS: u32 = 1536;
/// Ways of each `FLOW_CACHE_SETS` set.
pub const FLOW_CACHE_WAYS: usize = 4;

/// Words of `FLOW_RECENT`, the filter of TCP flows refreshed this period: 32 bits each
/// below a 32-bit period tag, 256 KiB shared by every CPU (a million bits, about one in
/// ten set at 100 000 flows). The programs use the first `1 << bits` of them, `bits` the
/// word after them (`FLOW_RECENT_SIZE`), which the agent sizes to the flows tracked
/// (`recent_index_bits`): a filter no larger than its flows need stays in the caches
/// that the kernel's own per-connection work sweeps.
pub const FLOW_RECENT_WORDS: u32 = 1 << FLOW_RECENT_INDEX_BITS;
/// The index of `FLOW_RECENT`'s size word: how many index bits the programs use.
pub const FLOW_RECENT_SIZE: u32 = FLOW_RECENT_WORDS;
/// The most index bits (the whole filter), what the programs use before the agent sizes it.
pub const FLOW_RECENT_INDEX_BITS: u32 = 15;
/// The fewest index bits: 64 words, 512 bytes.
pub const FLOW_RECENT_MIN_INDEX_BITS: u32 = 6;
/// Flows a filter word stands for at most, as the agent sizes it: four flows to 32 bits
/// set about one bit in eight (`1 - e^(-4/32)`), fewer when the words round up.
const FLOWS_A_WORD: u64 = 4;

/// The index bits for a filter that holds `flows` flows with one bit in eight or fewer
/// set: the fewest words of at most `FLOWS_A_WORD` flows each, a power of two.
#[inline]
pub const fn recent_index_bits(flows: u64) -> u32 {
    let words = flows.div_ceil(FLOWS_A_WORD);
    let bits = if words <= 1 {
        0
    } else {
        64 - (words - 1).leading_zeros()
    };
    if bits < FLOW_RECENT_MIN_INDEX_BITS {
        FLOW_RECENT_MIN_INDEX_BITS
    } else if bits > FLOW_RECENT_INDEX_BITS {
        FLOW_RECENT_INDEX_BITS
    } else {
        bits
    }
}

/// The index bits a size word the agent wrote names: unset (0), the whole filter;
/// anything else clamped to the filter's range.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    reason = "at most FLOW_RECENT_INDEX_BITS"
)]
pub const fn recent_size_bits(word: u64) -> u32 {
    if word == 0 || word > FLOW_RECENT_INDEX_BITS as u64 {
        FLOW_RECENT_INDEX_BITS
    } else if word < FLOW_RECENT_MIN_INDEX_BITS as u64 {
        FLOW_RECENT_MIN_INDEX_BITS
    } else {
        word as u32
    }
}
/// A refresh period of `FLOW_RECENT`: `CLOCK_MONOTONIC` seconds `>> FLOW_RECENT_SHIFT`.
pub const FLOW_RECENT_SHIFT: u32 = 2;
/// The period's length in seconds: the most a refresh is late when the flow's bit is its
/// own.
pub const FLOW_RECENT_PERIOD_S: u32 = 1 << FLOW_RECENT_SHIFT;
/// Periods the agent waits past EC2's established timeout before it lets an established
/// TCP flow go: a flow is let go early only if the filter answered it wrongly in each of
/// these periods, each with a hash of its own (odds the filter's fill to this power).
pub const FLOW_RECENT_GRACE_PERIODS: u32 = 8;
/// Mixes the period into `FLOW_RECENT`'s hash, so a flow meets other flows' bits anew
/// each period.
const K_PERIOD: u64 = 0xd6e8_feb8_6659_fd93;

/// The refresh period of `second`.
#[inline]
pub const fn recent_period(second: u32) -> u32 {
    second >> FLOW_RECENT_SHIFT
}

/// A flow's word and bit in `FLOW_RECENT` in `period`, from its hash and the local side
/// the packet brings (`FLOW_LOCAL_A` or `FLOW_LOCAL_B`), in a filter of `bits` index
/// bits (`recent_size_bits`): the word from the top `bits` bits of one multiplication,
/// the bit from the 5 below the most the index takes, so a flow's bit stays the same
/// whatever the filter's size.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    reason = "the index has `bits` bits, FLOW_RECENT_INDEX_BITS at most"
)]
pub const fn recent_bit(h: u64, period: u32, local: u8, bits: u32) -> (u32, u32) {
    let x = (h ^ (period as u64).wrapping_mul(K_PERIOD) ^ local as u64).wrapping_mul(K);
    (
        (x >> (64 - bits)) as u32,
        ((x >> (59 - FLOW_RECENT_INDEX_BITS)) & 31) as u32,
    )
}

/// Slots of each `FLOW_SETS` set: two IPv4 flows to a cache line.
pub const FLOW_SET_SLOTS: usize = SLOTS_A_SET as usize;
const SLOTS_A_SET: u32 = 2;

/// One IPv4 flow of `FLOW_SETS`: its key and its row of `FLOWS` in 32 bytes. Words a
/// program reads whole while another CPU may write them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSlot {
    /// Side a's address in the low half, side b's in the high half: the last word of each
    /// IPv4-mapped `Addr`, as it lies in memory.
    pub addrs: u64,
    /// The key's ports word (`port_a | port_b << 16`) in the low half, the device's
    /// ifindex in the high half.
    pub ports_dev: u64,
    /// `first_seen` in the low half, `last_seen` in the high half.
    pub seen: u64,
    /// `SLOT_CLAIMED` or `SLOT_VALID`, the flow's `FLOW_*` bits at `SLOT_FLAGS_SHIFT`,
    /// its protocol at `SLOT_PROTO_SHIFT` and a fingerprint of its key at
    /// `SLOT_FP_SHIFT`; changed only by compare-and-exchange and atomic or.
    pub ctl: u64,
}
/// A slot's words; the control word is the last.
pub const FLOW_SETS_SLOT_WORDS: usize = 4;
const _: () = assert!(size_of::<FlowSlot>() == FLOW_SETS_SLOT_WORDS * 8);

impl FlowSlot {
    /// The index of each word in a slot, from the struct itself: both sides address a
    /// slot word by word (a program may be writing the others), never through a
    /// reference to the whole.
    pub const ADDRS: usize = offset_of!(Self, addrs) / 8;
    pub const PORTS_DEV: usize = offset_of!(Self, ports_dev) / 8;
    pub const SEEN: usize = offset_of!(Self, seen) / 8;
    pub const CTL: usize = offset_of!(Self, ctl) / 8;
}

/// One set of `FLOW_SETS`, a cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub slots: [FlowSlot; FLOW_SET_SLOTS],
}
const _: () = assert!(size_of::<FlowSet>() == 64);

impl FlowSet {
    /// Word `word` (`FlowSlot::ADDRS` ...) of slot `i` of the set at `set`. Only the
    /// address is computed, so it is safe; reading or writing it is the caller's to
    /// argue. The byte offset of the slots first, then the word: the sum taken whole
    /// compiles to other eBPF, which 6.1's verifier walks a third longer (951 000
    /// instructions of `tc_ingress` on arm64, against 627 000).
    #[inline]
    // The slots begin the set (a multiple of 8 bytes, asserted below) and the set is
    // 64-byte aligned: the word pointer is aligned.
    #[allow(clippy::cast_ptr_alignment)]
    pub fn slot_word(set: *mut Self, i: usize, word: usize) -> *mut u64 {
        set.cast::<u8>()
            .wrapping_add(offset_of!(Self, slots))
            .cast::<u64>()
            .wrapping_add(i * FLOW_SETS_SLOT_WORDS + word)
    }
}
const _: () = assert!(offset_of!(FlowSet, slots) % 8 == 0);

/// A program is writing a new flow into the slot; only the flow's fingerprint, protocol
/// and bits are there yet (unless `SLOT_VALID` is set too).
pub const SLOT_CLAIMED: u64 = 1;
/// The slot holds a flow: set, with the flow's bits, once the rest of it is written.
pub const SLOT_VALID: u64 = 2;
/// A slot with neither bit is free, whatever else its control word holds.
pub const SLOT_STATE_MASK: u64 = SLOT_CLAIMED | SLOT_VALID;
/// In slot 0's control word, marks of the whole set: flows of it live in `FLOWS` (the
/// set was full when they began), so a flow missing from the set is looked for there.
pub const SET_SPILLED: u64 = 4;
/// A flow of the set went to `FLOWS` since the agent's pass last cleared this: the pass
/// takes `SET_SPILLED` away only when no flow of the set is in `FLOWS` and none went
/// there while it looked.
pub const SET_SPILLED_AGAIN: u64 = 8;
/// The marks a slot's claim and release keep.
pub const SET_MARKS: u64 = SET_SPILLED | SET_SPILLED_AGAIN;
pub const SLOT_FLAGS_SHIFT: u32 = 8;
pub const SLOT_PROTO_SHIFT: u32 = 16;
pub const SLOT_FP_SHIFT: u32 = 24;

impl FlowSlot {
    /// The words an IPv4 flow's slot holds its key in (`addrs`, `ports_dev`), from the
    /// key's words.
    #[inline]
    pub const fn key_of(w: &[u32; FLOW_KEY_WORDS]) -> [u64; 2] {
        [
            w[3] as u64 | ((w[7] as u64) << 32),
            w[8] as u64 | ((w[9] as u64) << 32),
        ]
    }

    /// The flow of a slot as the hash table would hold it.
    pub fn flow(&self) -> (FlowKey, Flow) {
        let mapped = [0, 0, crate::V4_MAPPED_WORD];
        let [a, b] = halves(self.addrs);
        let [ports, ifindex] = halves(self.ports_dev);
        let [first_seen, last_seen] = halves(self.seen);
        let p = ports.to_le_bytes();
        let ctl = self.ctl.to_le_bytes();
        let key = FlowKey {
            addr_a: [mapped[0], mapped[1], mapped[2], a],
            addr_b: [mapped[0], mapped[1], mapped[2], b],
            port_a: u16::from_le_bytes([p[0], p[1]]),
            port_b: u16::from_le_bytes([p[2], p[3]]),
            ifindex,
            proto: ctl[(SLOT_PROTO_SHIFT / 8) as usize],
            pad: [0; 3],
        };
        let flow = Flow::new(first_seen, last_seen, ctl[(SLOT_FLAGS_SHIFT / 8) as usize]);
        (key, flow)
    }

    /// Whether the slot holds a flow.
    pub const fn is_valid(&self) -> bool {
        self.ctl & SLOT_VALID != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_gives_back_the_key_and_flow_it_was_written_from() {
        let key = FlowKey {
            addr_a: crate::addr_from_ip("10.0.0.2".parse().unwrap()),
            addr_b: crate::addr_from_ip("192.168.7.9".parse().unwrap()),
            port_a: 443,
            port_b: 51_234,
            ifindex: 70_000,
            proto: 6,
            pad: [0; 3],
        };
        assert!(key.is_v4());
        let [addrs, ports_dev] = FlowSlot::key_of(&key.words());
        let slot = FlowSlot {
            addrs,
            ports_dev,
            seen: 7 | (9 << 32),
            ctl: SLOT_VALID
                | (u64::from(FLOW_AB | FLOW_RST) << SLOT_FLAGS_SHIFT)
                | (6 << SLOT_PROTO_SHIFT),
        };
        let flow = Flow::new(7, 9, FLOW_AB | FLOW_RST);
        assert_eq!(slot.flow(), (key, flow));
        assert!(slot.is_valid());
        let v6 = FlowKey {
            addr_a: crate::addr_from_ip("fd00::1".parse().unwrap()),
            ..key
        };
        assert!(!v6.is_v4());
    }

    #[test]
    fn each_flow_bit_is_a_byte_of_its_own_and_reads_back() {
        for bits in 0..=0x7f_u8 {
            let marks = marks_of(bits);
            for i in 0..8 {
                let byte = (marks >> (8 * i)) & 0xff;
                assert_eq!(byte, u64::from(bits >> i & 1), "bits {bits:#x} byte {i}");
            }
            assert_eq!(bits_of(marks), bits);
            // Any value in a set byte reads as set (a byte written by an add, or any
            // garbage a future writer leaves), and the eighth byte is ignored.
            let loud = (marks * 0xa5) | (0xff << 56);
            assert_eq!(bits_of(loud), bits, "{loud:#x}");
        }
    }

    #[test]
    fn the_filter_is_sized_to_its_flows_and_a_flow_keeps_its_bit_at_every_size() {
        let sizes = [0, 1, 256, 257, 2000, 20_000, 100_000, 131_072, 10_000_000]
            .map(|n: u64| (n, recent_index_bits(n)));
        assert_eq!(
            sizes,
            [
                (0, 6),
                (1, 6),
                (256, 6),
                (257, 7),
                (2000, 9),
                (20_000, 13),
                (100_000, 15),
                (131_072, 15),
                (10_000_000, 15)
            ]
        );
        // No size holds more than four flows a word, below the whole filter.
        for n in [300_u64, 2000, 5000, 20_000, 100_000] {
            let words = 1_u64 << recent_index_bits(n);
            assert!(n <= 4 * words, "{n} flows in {words} words");
            assert!(
                n > 2 * words || words == 64,
                "{n} flows in {words} words: too many"
            );
        }
        assert_eq!(recent_size_bits(0), FLOW_RECENT_INDEX_BITS);
        assert_eq!(recent_size_bits(1), FLOW_RECENT_MIN_INDEX_BITS);
        assert_eq!(recent_size_bits(9), 9);
        assert_eq!(recent_size_bits(16), FLOW_RECENT_INDEX_BITS);
        assert_eq!(recent_size_bits(u64::MAX), FLOW_RECENT_INDEX_BITS);
        for h in [0_u64, 1, 0xdead_beef_cafe_f00d, u64::MAX] {
            let (whole, bit) = recent_bit(h, 7, FLOW_LOCAL_A, FLOW_RECENT_INDEX_BITS);
            for bits in FLOW_RECENT_MIN_INDEX_BITS..=FLOW_RECENT_INDEX_BITS {
                let (index, b) = recent_bit(h, 7, FLOW_LOCAL_A, bits);
                assert!(index < 1 << bits, "{h:#x}: index {index} of {bits} bits");
                assert_eq!(index, whole >> (FLOW_RECENT_INDEX_BITS - bits));
                assert_eq!(b, bit);
            }
        }
    }
}

/// The low and high halves of a word.
const fn halves(w: u64) -> [u32; 2] {
    let b = w.to_le_bytes();
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// `FLOW_SETS` sets for a flow table of `flows` (`--flow-table-size`): slots for three
/// quarters as many, 24 bytes a flow of the table's size, which with the buckets of
/// `FLOWS` (16 bytes a flow) keeps the maps within their idle budget at the default size.
pub const fn flow_sets_for(flows: u32) -> u32 {
    let sets = flows / 4 * 3 / SLOTS_A_SET;
    if sets == 0 { 1 } else { sets }
}

/// `FLOW_COUNT` entries: flows the programs began, and flows the agent's pass ended.
pub const FLOW_COUNT_BEGUN: u32 = 0;
pub const FLOW_COUNT_ENDED: u32 = 1;

/// `HASH_KEYS` holds the keys of the programs' hashes, kept beside the tables they pick
/// sets in so that a restarted agent finds what it left there: these entries.
pub const HASH_KEYS: u32 = 3;
pub const HASH_KEY_DNS: u32 = 0;
pub const HASH_KEY_FLOW_LO: u32 = 1;
pub const HASH_KEY_FLOW_HI: u32 = 2;

labelled! {
    /// Protocol classes of the flow metrics: the index into a device's `FLOWS_CREATED`,
    /// and the `protocol` label.
    FlowClass {
        Tcp = 0 => "tcp",
        Udp = 1 => "udp",
        /// ICMP and `ICMPv6`.
        Icmp = 2 => "icmp",
        Other = 3 => "other",
    }
}

impl FlowClass {
    /// The class of an IP protocol number.
    #[inline]
    pub const fn from_proto(proto: u8) -> Self {
        match proto {
            IPPROTO_TCP => Self::Tcp,
            IPPROTO_UDP => Self::Udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Self::Icmp,
            _ => Self::Other,
        }
    }
}
