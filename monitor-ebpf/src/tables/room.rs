//! How many flows the tables hold, against `--flow-table-size`, on kernels with BPF
//! atomics (where the sets and `FLOWS` together have more room than that); without, the
//! size of `FLOWS` is the limit.

use core::intrinsics::{AtomicOrdering::SeqCst, atomic_xadd, atomic_xsub};

use aya_ebpf::{macros::map, maps::Array};
use monitor_common::{FLOW_COUNT_BEGUN, FLOW_COUNT_ENDED};

use crate::kernel::layout;

/// Flows the programs began (`FLOW_COUNT_BEGUN`, atomically) and flows the agent's
/// pass ended (`FLOW_COUNT_ENDED`, written by the agent only).
#[map]
static FLOW_COUNT: Array<u64> = Array::with_max_entries(2, 0);

/// Takes room for a new flow; false when the tables hold all they may.
#[inline(always)]
pub fn take() -> bool {
    if !crate::ATOMICS {
        return true;
    }
    let (Some(begun), Some(ended)) = (
        FLOW_COUNT.get_ptr_mut(FLOW_COUNT_BEGUN),
        FLOW_COUNT.get_ptr(FLOW_COUNT_ENDED),
    ) else {
        return true;
    };
    // The count taken first and read after (an atomic add's result is not to be had
    // on every kernel): flows begun at once on other CPUs may make this one give its
    // room back too, never let one more in than there is room for. The add has no
    // fetch, so arm64 runs it unordered (`stadd`); what this needs is coherence on
    // the one word alone: of two CPUs adding at once, the one whose add comes second
    // reads both.
    // SAFETY: words of a map value the kernel keeps for the program's run.
    unsafe {
        atomic_xadd::<u64, u64, { SeqCst }>(begun, 1);
        let held = core::ptr::read_volatile(begun).saturating_sub(core::ptr::read_volatile(ended));
        if held <= u64::from(layout::flow_table_size()) {
            return true;
        }
        atomic_xsub::<u64, u64, { SeqCst }>(begun, 1);
    }
    false
}

/// Gives back the room taken for a flow that did not begin after all.
#[inline(always)]
pub fn give_back() {
    if !crate::ATOMICS {
        return;
    }
    if let Some(begun) = FLOW_COUNT.get_ptr_mut(FLOW_COUNT_BEGUN) {
        // SAFETY: a word of FLOW_COUNT's value, which the kernel keeps for the program's run.
        unsafe { atomic_xsub::<u64, u64, { SeqCst }>(begun, 1) };
    }
}
