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
use monitor_common::{FLOW_RECENT_WORDS, recent_bit, recent_period};

/// Shared by every CPU (a per-CPU copy would be a quarter megabyte a CPU); written once a
/// period per flow, read by every segment.
#[map]
static FLOW_RECENT: Array<u64> = Array::with_max_entries(FLOW_RECENT_WORDS, 0);

/// A flow's place in the filter this period.
pub struct Recent {
    word: *mut u64,
    tag: u64,
    bit: u64,
}

impl Recent {
    /// The place of the flow of hash `h`, seen from local side `local`, at second `now`.
    #[inline(always)]
    pub fn of(h: u64, now: u32, local: u8) -> Option<Self> {
        let period = recent_period(now);
        let (index, bit) = recent_bit(h, period, local);
        Some(Self {
            word: FLOW_RECENT.get_ptr_mut(index)?,
            tag: u64::from(period) << 32,
            bit: 1 << bit,
        })
    }

    /// Whether the flow's bit is set this period: it was written to the table this
    /// period, or another flow's bit answers for it.
    #[inline(always)]
    pub fn seen(&self) -> bool {
        // SAFETY: an element of an array map, which the kernel keeps for the program's
        // run; a word is read whole, and a torn view across CPUs cannot happen for an
        // aligned 8-byte load.
        let w = unsafe { core::ptr::read_volatile(self.word) };
        w & !0xffff_ffff == self.tag && w & self.bit != 0
    }

    /// Sets the flow's bit for this period, the word's older bits dropped if its tag is
    /// older.
    #[inline(always)]
    pub fn set(&self) {
        // SAFETY: as in `seen`; a plain store, which another CPU's store may undo (a bit
        // lost: that flow's next segment goes to the table again).
        unsafe {
            let w = core::ptr::read_volatile(self.word);
            let w = if w & !0xffff_ffff == self.tag {
                w
            } else {
                self.tag
            };
            core::ptr::write_volatile(self.word, w | self.bit);
        }
    }
}
