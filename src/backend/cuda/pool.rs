//! The caching device-memory pool: freed blocks are kept and handed out again instead of
//! going back to the driver (cuMemAlloc/cuMemFree synchronise and cost tens of microseconds;
//! a forward allocates and frees every activation of every layer).
//!
//! The bookkeeping is generic over [`DeviceMemory`], so it is tested without a GPU
//! (tests/cuda_host.rs); `driver::DriverMemory` is the real one.
//!
//! Stream order makes reuse safe without events: the CUDA backend runs every copy and kernel on
//! one stream, so a block freed while a kernel may still read it can only be written again by
//! work queued after that kernel.

use crate::backend::MemoryUse;
use std::collections::BTreeMap;

/// Sizes up to this are rounded to [`SMALL_ROUNDING`]; larger ones to [`LARGE_ROUNDING`].
pub const SMALL_LIMIT: usize = 1 << 20;
/// Granularity of small blocks (the driver aligns allocations to 256 bytes anyway).
pub const SMALL_ROUNDING: usize = 512;
/// Granularity of large blocks: coarse classes make a freed activation fit the next layer's.
pub const LARGE_ROUNDING: usize = 2 << 20;

/// Why an allocation failed.
#[derive(Debug)]
pub enum AllocError {
    /// The device has no room for the block, even after the cache was emptied.
    OutOfMemory,
    /// Any other driver error.
    Driver(anyhow::Error),
}

/// Where the pool gets memory from.
pub trait DeviceMemory {
    /// A new allocation of `bytes`, or `AllocError::OutOfMemory`.
    fn allocate(&mut self, bytes: usize) -> Result<u64, AllocError>;
    /// Gives an allocation made by `allocate` back.
    fn release(&mut self, ptr: u64, bytes: usize);
}

/// A block handed out by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Device address.
    pub ptr: u64,
    /// Size of the block (the request rounded up, or a cached block up to 25% larger).
    pub bytes: usize,
}

/// What the pool holds, in bytes, and how it got it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Bytes in blocks handed out and not yet freed.
    pub in_use_bytes: usize,
    /// Bytes in freed blocks kept for reuse.
    pub cached_bytes: usize,
    /// High-water mark of `in_use_bytes`.
    pub peak_in_use_bytes: usize,
    /// High-water mark of `in_use_bytes + cached_bytes`: what the device had to give.
    pub peak_reserved_bytes: usize,
    /// Allocations asked of the device.
    pub device_allocations: u64,
    /// Requests served from the cache.
    pub reuses: u64,
    /// Times the cache was emptied to make room.
    pub cache_flushes: u64,
}

/// Bytes in use per [`MemoryUse`] (index: [`MemoryUse::index`]), now and at the in-use
/// high-water mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageByUse {
    /// In use now.
    pub now: [usize; MemoryUse::ALL.len()],
    /// In use when `in_use_bytes` last reached its high-water mark.
    pub at_peak: [usize; MemoryUse::ALL.len()],
}

/// The caching allocator.
pub struct Pool<M: DeviceMemory> {
    memory: M,
    /// Freed blocks by size.
    free: BTreeMap<usize, Vec<u64>>,
    stats: PoolStats,
    usage: UsageByUse,
}

/// The size of the block that serves a request of `bytes` (at least one small unit).
pub fn block_size(bytes: usize) -> usize {
    let unit = if bytes <= SMALL_LIMIT {
        SMALL_ROUNDING
    } else {
        LARGE_ROUNDING
    };
    bytes.max(1).div_ceil(unit) * unit
}

impl<M: DeviceMemory> Pool<M> {
    /// An empty pool over `memory`.
    pub fn new(memory: M) -> Pool<M> {
        Pool {
            memory,
            free: BTreeMap::new(),
            stats: PoolStats::default(),
            usage: UsageByUse::default(),
        }
    }

    /// A block of at least `bytes`: the smallest cached block of the right size class up to
    /// 25% larger, else a new allocation; when the device is full, the cache is given back
    /// and the allocation tried once more.
    pub fn allocate(&mut self, bytes: usize) -> Result<Block, AllocError> {
        self.allocate_for(bytes, MemoryUse::Workspace)
    }

    /// [`Pool::allocate`] of a block counted under `use_` until [`Pool::free_for`] gives it
    /// back under the same use.
    pub fn allocate_for(&mut self, bytes: usize, use_: MemoryUse) -> Result<Block, AllocError> {
        let size = block_size(bytes);
        // No size in `free` has an empty list, so the first size in range has a block.
        let cached = self
            .free
            .range(size..=size + size / 4)
            .next()
            .map(|(&s, _)| s);
        let block = match cached {
            Some(cached_size) => {
                let ptrs = self.free.get_mut(&cached_size).expect("size just found");
                let ptr = ptrs.pop().expect("no empty lists are kept");
                if ptrs.is_empty() {
                    self.free.remove(&cached_size);
                }
                let block = Block {
                    ptr,
                    bytes: cached_size,
                };
                self.stats.cached_bytes -= block.bytes;
                self.stats.reuses += 1;
                block
            }
            None => {
                let ptr = match self.memory.allocate(size) {
                    Err(AllocError::OutOfMemory) if self.stats.cached_bytes > 0 => {
                        self.release_cached();
                        self.memory.allocate(size)?
                    }
                    other => other?,
                };
                self.stats.device_allocations += 1;
                Block { ptr, bytes: size }
            }
        };
        self.stats.in_use_bytes += block.bytes;
        self.usage.now[use_.index()] += block.bytes;
        if self.stats.in_use_bytes >= self.stats.peak_in_use_bytes {
            self.stats.peak_in_use_bytes = self.stats.in_use_bytes;
            self.usage.at_peak = self.usage.now;
        }
        self.stats.peak_reserved_bytes = self
            .stats
            .peak_reserved_bytes
            .max(self.stats.in_use_bytes + self.stats.cached_bytes);
        Ok(block)
    }

    /// Takes a block back into the cache.
    pub fn free(&mut self, block: Block) {
        self.free_for(block, MemoryUse::Workspace)
    }

    /// Takes back a block made by [`Pool::allocate_for`] under `use_`.
    pub fn free_for(&mut self, block: Block, use_: MemoryUse) {
        self.usage.now[use_.index()] -= block.bytes;
        self.stats.in_use_bytes -= block.bytes;
        self.stats.cached_bytes += block.bytes;
        self.free.entry(block.bytes).or_default().push(block.ptr);
    }

    /// Gives every cached block back to the device.
    pub fn release_cached(&mut self) {
        for (bytes, ptrs) in std::mem::take(&mut self.free) {
            for ptr in ptrs {
                self.memory.release(ptr, bytes);
            }
        }
        self.stats.cached_bytes = 0;
        self.stats.cache_flushes += 1;
    }

    /// The current numbers.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Bytes in use per use, now and at the in-use high-water mark.
    pub fn usage(&self) -> UsageByUse {
        self.usage
    }

    /// The memory the pool draws from.
    pub fn memory(&self) -> &M {
        &self.memory
    }
}

impl<M: DeviceMemory> Drop for Pool<M> {
    fn drop(&mut self) {
        self.release_cached();
    }
}
