//! Per-device kernel arrays, indexed by the device's slot. A slot freed by a device
//! that went away is zeroed before another device takes it, so no count carries over.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context as _, Result};
use aya::{
    Pod,
    maps::{MapData, PerCpuArray, PerCpuValues},
};

/// A per-CPU array shared between its reader (a collector) and the device watcher.
pub struct SlotArray<T: Pod> {
    map: Arc<Mutex<PerCpuArray<MapData, T>>>,
    /// Entries per slot.
    stride: u32,
}

impl<T: Pod> Clone for SlotArray<T> {
    fn clone(&self) -> Self {
        Self {
            map: Arc::clone(&self.map),
            stride: self.stride,
        }
    }
}

impl<T: Pod + Default> SlotArray<T> {
    pub fn new(map: PerCpuArray<MapData, T>, stride: u32) -> Self {
        Self {
            map: Arc::new(Mutex::new(map)),
            stride,
        }
    }

    /// Every CPU's value of entry `i` of `slot`.
    pub fn get(&self, slot: u32, i: u32) -> Vec<T> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(slot * self.stride + i), 0)
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Zeroes every entry of `slot` on every CPU.
    pub fn reset(&self, slot: u32) -> Result<()> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        for i in 0..self.stride {
            let zeros =
                PerCpuValues::try_from(vec![T::default(); cpus]).context("per-CPU zeros")?;
            map.set(slot * self.stride + i, zeros, 0)
                .with_context(|| format!("zeroing slot {slot}"))?;
        }
        Ok(())
    }
}

impl<T: Pod> std::fmt::Debug for SlotArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotArray")
            .field("stride", &self.stride)
            .finish_non_exhaustive()
    }
}
