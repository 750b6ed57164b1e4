//! `FLOW_RECENT`: which established TCP flows were written to the flow tables this
//! refresh period, so that a segment that changes nothing EC2 tracks (no SYN, FIN or
//! RST, on a flow seen both ways and open) costs one look into a quarter megabyte that
//! stays in the CPU's cache instead of a miss on the flow's own line. EC2 forgets an
//! established connection after minutes to days of idleness; its "last seen" needs
//! refreshing once a period, not once a segment.
//!
//! A word is `period << 32 | bits`: a bit set in a word of an older period reads as
//! clear, so the filter empties itself as periods turn, without a pass. It can answer
//! yes wrongly (another flow's bit), never no wrongly for long: a race between CPUs only
//! loses bits or resets a word, which sends the next segment to the table again. A wrong
//! yes delays one refresh by one period; the period is mixed into the hash, so a flow
//! meets other bits each period (`recent_bit`).

use aya_ebpf::{macros::map, maps::Array};
use monitor_common::{
    FLOW_AB, FLOW_BA, FLOW_RECENT_SIZE, FLOW_RECENT_WORDS,
    proto::{IPPROTO_TCP, TCP_FIN, TCP_RST, TCP_SYN},
    recent_bit, recent_period, recent_size_bits,
};

use super::flows::CLOSED;

/// Shared by every CPU (a per-CPU copy would be a quarter megabyte a CPU); written once a
/// period per flow, read by every segment. The word after the filter's is its size, the
/// index bits the agent wrote (`FLOW_RECENT_SIZE`): on a line of its own, read by every
/// segment and written only when the flows tracked call for another size.
#[map]
static FLOW_RECENT: Array<u64> = Array::with_max_entries(FLOW_RECENT_WORDS + 1, 0);

/// A segment as the filter's two functions take it: its protocol and TCP flags in one
/// scalar (a BPF call passes five arguments at most).
#[inline(always)]
pub fn segment(proto: u8, tcp_flags: u8) -> u32 {
    u32::from(proto) << 8 | u32::from(tcp_flags)
}

/// Whether the filter answers for `segment`: a TCP segment without SYN, FIN or RST.
#[inline(always)]
fn plain(segment: u32) -> bool {
    segment >> 8 == u32::from(IPPROTO_TCP) && segment & u32::from(TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// The flow's word in the filter this period, its tag and its bit: None only if the
/// index were out of the array, which `recent_bit` rules out. A segment that reads the
/// size as it changes looks at another word than the last: a clear bit sends it to the
/// table, another flow's bit delays its refresh as any wrong yes does.
#[inline(always)]
fn place(h: u64, now: u32, local: u8) -> Option<(*mut u64, u64, u64)> {
    let period = recent_period(now);
    // SAFETY: an element of an array map, which the kernel keeps for the program's run.
    let size = unsafe { core::ptr::read_volatile(FLOW_RECENT.get_ptr(FLOW_RECENT_SIZE)?) };
    let (index, bit) = recent_bit(h, period, local, recent_size_bits(size));
    Some((
        FLOW_RECENT.get_ptr_mut(index)?,
        u64::from(period) << 32,
        1 << bit,
    ))
}

// Both functions stand alone in the program and decide everything inside, from scalars
// the caller holds anyway: a decision the caller kept across the flow tables (a pointer,
// a flag) split the verifier's states there and, on 6.1, walked it past its million
// instructions.

/// Whether `segment`, of the flow of hash `h` seen from local side `local` at second
/// `now`, goes no further: a plain TCP segment whose flow's bit is set this period (it
/// was written to the table this period, or another flow's bit answers for it).
#[inline(never)]
pub fn seen(h: u64, now: u32, local: u8, segment: u32) -> bool {
    if !plain(segment) {
        return false;
    }
    let Some((word, tag, bit)) = place(h, now, local) else {
        return false;
    };
    // SAFETY: an element of an array map, which the kernel keeps for the program's run;
    // an aligned 8-byte load cannot be torn by another CPU's store.
    let w = unsafe { core::ptr::read_volatile(word) };
    w & !0xffff_ffff == tag && w & bit != 0
}

/// After `segment` was written to the table and left the flow with `flags`: sets the
/// flow's bit for the period of `now` if the segment is plain and the table holds both
/// directions of an open flow (until then a segment may still bring what the table
/// lacks). A word of an older period has its bits dropped first.
#[inline(never)]
pub fn mark(h: u64, now: u32, local: u8, segment: u32, flags: u8) {
    if !plain(segment) || flags & (FLOW_AB | FLOW_BA) != FLOW_AB | FLOW_BA || flags & CLOSED != 0 {
        return;
    }
    let Some((word, tag, bit)) = place(h, now, local) else {
        return;
    };
    // SAFETY: as in `seen`; a plain store, which another CPU's store may undo (a bit
    // lost: that flow's next segment goes to the table again).
    unsafe {
        let w = core::ptr::read_volatile(word);
        let w = if w & !0xffff_ffff == tag { w } else { tag };
        core::ptr::write_volatile(word, w | bit);
    }
}
