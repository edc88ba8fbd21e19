//! The CUDA device model: the caching allocator's segments (what "reserved" is), and the
//! memory a process holds outside it (the context and library handles).
//!
//! Allocator rules (PyTorch's `CUDACachingAllocator`): requests are rounded up to 512 B;
//! blocks of at most 1 MiB come from 2 MiB segments of a small pool; larger requests
//! come from a large pool whose new segments are 20 MiB for requests under 10 MiB and
//! the request rounded up to 2 MiB otherwise; a free block is reused best-fit and split
//! when the remainder is at least 512 B (small) or more than 1 MiB (large); freed blocks
//! merge with free neighbours, and segments are kept (reserved) until `empty_cache()`.
//! With `expandable_segments:True` the large pool is one segment that maps 20 MiB pages
//! as it grows, so reserved follows the live high-water mark instead of fragmenting.
//! (Constants: `c10/core/AllocatorConfig.h` and `c10/cuda/CUDACachingAllocator.cpp` in
//! PyTorch 2.11.)

use std::collections::BTreeSet;

const MIB: u64 = 1 << 20;
const SMALL_MAX: u64 = MIB;
const SMALL_SEGMENT: u64 = 2 * MIB;
const MID_SEGMENT: u64 = 20 * MIB;
const MID_MAX: u64 = 10 * MIB;
/// Expandable segments map the large pool in 20 MiB pages (the small pool in 2 MiB ones).
const LARGE_PAGE: u64 = 20 * MIB;
const PAGE: u64 = 2 * MIB;

#[derive(Debug, Default, Clone)]
struct Segment {
    size: u64,
    small: bool,
    /// Free ranges `(offset, size)`, sorted by offset.
    free: Vec<(u64, u64)>,
}

/// A model of the caching allocator's pools, driven by the simulator's allocations.
#[derive(Debug, Default, Clone)]
pub struct Pool {
    expandable: bool,
    segments: Vec<Segment>,
    /// Every free range of each pool (small, large) as `(size, segment, offset)`: the
    /// first entry at or above a request's size is the best fit, the smallest range and,
    /// among equals, the lowest segment and offset (the order a linear scan finds them).
    free_small: BTreeSet<(u64, usize, u64)>,
    free_large: BTreeSet<(u64, usize, u64)>,
    /// Live blocks by simulator slot: (segment, offset, size).
    blocks: Vec<Option<(usize, u64, u64)>>,
    /// Live bytes in the large pool (for expandable segments).
    large_live: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

impl Pool {
    pub fn new(expandable: bool) -> Pool {
        Pool { expandable, ..Pool::default() }
    }

    fn free_set(&mut self, small: bool) -> &mut BTreeSet<(u64, usize, u64)> {
        if small { &mut self.free_small } else { &mut self.free_large }
    }

    fn set_block(&mut self, id: usize, block: (usize, u64, u64)) {
        if self.blocks.len() <= id {
            self.blocks.resize(id + 1, None);
        }
        self.blocks[id] = Some(block);
    }

    pub fn alloc(&mut self, id: usize, size: u64) {
        if size == 0 {
            return;
        }
        let small = size <= SMALL_MAX;
        if self.expandable && !small {
            self.large_live += size;
            let mapped = self.large_live.div_ceil(LARGE_PAGE) * LARGE_PAGE;
            let small_reserved: u64 = self.segments.iter().map(|s| s.size).sum();
            self.reserved = self.reserved.max(small_reserved + mapped);
            self.peak_reserved = self.peak_reserved.max(self.reserved);
            self.set_block(id, (usize::MAX, 0, size));
            return;
        }
        // Best fit: the smallest free range of the right pool that holds the request.
        let best = self.free_set(small).range((size, 0, 0)..).next().copied();
        let (si, offset, len) = match best {
            Some((len, si, offset)) => {
                self.free_set(small).remove(&(len, si, offset));
                (si, offset, len)
            }
            None => {
                let seg_size = if small {
                    SMALL_SEGMENT
                } else if size < MID_MAX {
                    MID_SEGMENT
                } else {
                    size.div_ceil(PAGE) * PAGE
                };
                self.segments.push(Segment { size: seg_size, small, free: vec![(0, seg_size)] });
                self.reserved += seg_size;
                self.peak_reserved = self.peak_reserved.max(self.reserved);
                (self.segments.len() - 1, 0, seg_size)
            }
        };
        let remainder = len - size;
        let split = if small { remainder >= 512 } else { remainder > SMALL_MAX };
        let taken = if split { size } else { len };
        let seg = &mut self.segments[si];
        let fi = seg.free.partition_point(|&(o, _)| o < offset);
        if split {
            seg.free[fi] = (offset + size, remainder);
            self.free_set(small).insert((remainder, si, offset + size));
        } else {
            seg.free.remove(fi);
        }
        self.set_block(id, (si, offset, taken));
    }

    pub fn free(&mut self, id: usize) {
        let Some((si, offset, size)) = self.blocks.get_mut(id).and_then(Option::take) else {
            return;
        };
        if si == usize::MAX {
            self.large_live = self.large_live.saturating_sub(size);
            return;
        }
        let small = self.segments[si].small;
        let seg = &mut self.segments[si];
        let mut pos = seg.free.partition_point(|&(o, _)| o < offset);
        let (mut start, mut len) = (offset, size);
        // Merge with the next and previous free neighbours.
        let mut gone = Vec::new();
        if pos < seg.free.len() && start + len == seg.free[pos].0 {
            let (o, l) = seg.free.remove(pos);
            gone.push((l, si, o));
            len += l;
        }
        if pos > 0 && seg.free[pos - 1].0 + seg.free[pos - 1].1 == start {
            let (o, l) = seg.free.remove(pos - 1);
            gone.push((l, si, o));
            start = o;
            len += l;
            pos -= 1;
        }
        seg.free.insert(pos, (start, len));
        let set = self.free_set(small);
        for g in gone {
            set.remove(&g);
        }
        set.insert((len, si, start));
    }
}

/// Memory a CUDA process holds outside the caching allocator, and the allocator-managed
/// library workspaces. Sources in `docs/estimator.md`; the context's library part has no
/// published per-library figure, so it is an interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceOverheads {
    /// The context as the step leaves it: the primary context with lazy module loading
    /// (PyTorch's default since CUDA 11.7, the driver's default from 12.2) and the kernel
    /// images the step's libraries loaded — the point between `context_low` and
    /// `context_high`.
    pub context_bytes: u64,
    /// A bare context: 426 MiB measured for PyTorch 2.10 with CUDA 13 (287 MB with CUDA
    /// 11.7's lazy loading).
    pub context_low: u64,
    /// With every library the step uses fully loaded: the eager figure reported before
    /// lazy loading (over 1000 MB) plus cuDNN's engine kernels for convolutional models.
    pub context_high: u64,
    /// cuBLAS's workspace, which PyTorch allocates through the caching allocator (so it
    /// counts in `max_memory_allocated`): `:4096:2:16:8` (8 MiB + 128 KiB) by default,
    /// 32 MiB on compute capability 9.0 (`CublasHandlePool.cpp`) and, from PyTorch's
    /// 2026 changes, on Blackwell.
    pub cublas_workspace_bytes: u64,
}

/// The kernel libraries a step loads, which decide the context's library part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Libraries {
    /// cuDNN (convolutions).
    pub cudnn: bool,
}

impl DeviceOverheads {
    pub fn for_compute_capability(cc: (u32, u32), libs: Libraries) -> DeviceOverheads {
        let cublas = if cc == (9, 0) || cc.0 >= 10 { 32 * MIB } else { 4096 * 1024 * 2 + 16 * 1024 * 8 };
        let context_low = 426 * MIB;
        // PyTorch's own kernels, cuBLAS and cuBLASLt loaded lazily as the step uses them;
        // cuDNN's engines on top for convolutional models (device-level measurements of
        // CNNs and ViT on an A100 leave about 1.1 GB that does not grow with the batch).
        let (context_bytes, context_high) = if libs.cudnn { (1024 * MIB, 1280 * MIB) } else { (640 * MIB, 1024 * MIB) };
        DeviceOverheads { context_bytes, context_low, context_high, cublas_workspace_bytes: cublas }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blocks_share_a_two_mib_segment_and_large_ones_round_to_pages() {
        let mut p = Pool::new(false);
        p.alloc(0, 512);
        p.alloc(1, 4096);
        assert_eq!(p.reserved, 2 * MIB);
        p.alloc(2, 3 * MIB);
        assert_eq!(p.reserved, 22 * MIB, "a 3 MiB request opens a 20 MiB segment");
        p.alloc(3, 5 * MIB);
        assert_eq!(p.reserved, 22 * MIB, "and the next 5 MiB fits in its remainder");
        p.alloc(4, 13 * MIB);
        assert_eq!(p.reserved, 36 * MIB, "over 10 MiB: its own segment of 14 MiB");
        p.free(4);
        p.alloc(5, 13 * MIB + 512);
        assert_eq!(p.reserved, 36 * MIB, "the freed 14 MiB block is reused");
        p.free(2);
        p.free(3);
        p.alloc(6, 18 * MIB);
        assert_eq!(p.reserved, 36 * MIB, "freed neighbours merge back into 20 MiB");
    }

    #[test]
    fn expandable_segments_follow_the_live_high_water_mark() {
        let mut p = Pool::new(true);
        p.alloc(0, 11 * MIB);
        p.alloc(1, 3 * MIB);
        assert_eq!(p.reserved, 20 * MIB, "14 MiB live maps one 20 MiB page");
        p.free(0);
        p.alloc(2, 12 * MIB);
        assert_eq!(p.peak_reserved, 20 * MIB, "15 MiB live still fits the page");
        p.alloc(3, 6 * MIB);
        assert_eq!(p.peak_reserved, 40 * MIB, "21 MiB live needs a second page");
    }
}
