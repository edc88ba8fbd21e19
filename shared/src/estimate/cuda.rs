//! The CUDA device model: the caching allocator's segments (what "reserved" is), and the
//! memory a process holds outside it (the context and library handles).
//!
//! Allocator rules (PyTorch's `CUDACachingAllocator`): requests are rounded up to 512 B;
//! blocks of at most 1 MiB come from 2 MiB segments of a small pool; larger requests
//! come from a large pool whose new segments are 20 MiB for requests under 10 MiB and
//! the request rounded up to 2 MiB otherwise; a free block is reused best-fit and split
//! when the remainder is at least 512 B (small) or more than 1 MiB (large); freed blocks
//! merge with free neighbours, and segments are kept (reserved) until `empty_cache()`.
//! With `expandable_segments:True` the large pool is one segment that maps 2 MiB pages
//! as it grows, so reserved follows the live high-water mark instead of fragmenting.

use std::collections::HashMap;

const MIB: u64 = 1 << 20;
const SMALL_MAX: u64 = MIB;
const SMALL_SEGMENT: u64 = 2 * MIB;
const MID_SEGMENT: u64 = 20 * MIB;
const MID_MAX: u64 = 10 * MIB;
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
    /// Live blocks: simulator slot -> (segment, offset, size).
    blocks: HashMap<usize, (usize, u64, u64)>,
    /// Live bytes in the large pool (for expandable segments).
    large_live: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

impl Pool {
    pub fn new(expandable: bool) -> Pool {
        Pool { expandable, ..Pool::default() }
    }

    pub fn alloc(&mut self, id: usize, size: u64) {
        if size == 0 {
            return;
        }
        let small = size <= SMALL_MAX;
        if self.expandable && !small {
            self.large_live += size;
            let mapped = self.large_live.div_ceil(PAGE) * PAGE;
            let small_reserved: u64 = self.segments.iter().map(|s| s.size).sum();
            self.reserved = self.reserved.max(small_reserved + mapped);
            self.peak_reserved = self.peak_reserved.max(self.reserved);
            self.blocks.insert(id, (usize::MAX, 0, size));
            return;
        }
        // Best fit: the smallest free range of the right pool that holds the request.
        let mut best: Option<(usize, usize, u64)> = None;
        for (si, seg) in self.segments.iter().enumerate() {
            if seg.small != small {
                continue;
            }
            for (fi, &(_, len)) in seg.free.iter().enumerate() {
                if len >= size && best.is_none_or(|(_, _, l)| len < l) {
                    best = Some((si, fi, len));
                }
            }
        }
        let (si, fi) = match best {
            Some((si, fi, _)) => (si, fi),
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
                (self.segments.len() - 1, 0)
            }
        };
        let seg = &mut self.segments[si];
        let (offset, len) = seg.free[fi];
        let remainder = len - size;
        let split = if small { remainder >= 512 } else { remainder > SMALL_MAX };
        let taken = if split { size } else { len };
        if split {
            seg.free[fi] = (offset + size, remainder);
        } else {
            seg.free.remove(fi);
        }
        self.blocks.insert(id, (si, offset, taken));
    }

    pub fn free(&mut self, id: usize) {
        let Some((si, offset, size)) = self.blocks.remove(&id) else {
            return;
        };
        if si == usize::MAX {
            self.large_live = self.large_live.saturating_sub(size);
            return;
        }
        let seg = &mut self.segments[si];
        let pos = seg.free.partition_point(|&(o, _)| o < offset);
        seg.free.insert(pos, (offset, size));
        // Merge with the next and previous free neighbours.
        if pos + 1 < seg.free.len() && seg.free[pos].0 + seg.free[pos].1 == seg.free[pos + 1].0 {
            seg.free[pos].1 += seg.free[pos + 1].1;
            seg.free.remove(pos + 1);
        }
        if pos > 0 && seg.free[pos - 1].0 + seg.free[pos - 1].1 == seg.free[pos].0 {
            seg.free[pos - 1].1 += seg.free[pos].1;
            seg.free.remove(pos);
        }
    }
}

/// Memory a CUDA process holds outside the caching allocator, and the allocator-managed
/// workspaces, as documented assumptions (not measured on this GPU by the estimator).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceOverheads {
    /// The CUDA context with lazy module loading (CUDA 12+, `CUDA_MODULE_LOADING=LAZY`,
    /// PyTorch's default): the primary context, the kernels loaded so far and cuBLAS and
    /// cuDNN handles. Public measurements put it at 300-700 MB depending on driver and
    /// libraries; 500 MiB is the middle of that range.
    pub context_bytes: u64,
    /// cuBLAS's workspace, which PyTorch allocates through the caching allocator (so it
    /// counts in `max_memory_allocated`): 32 MiB on compute capability 9.0 and newer,
    /// 4096 KiB x 2 + 16 KiB x 8 before that (PyTorch's defaults).
    pub cublas_workspace_bytes: u64,
}

impl DeviceOverheads {
    pub fn for_compute_capability(major: u32) -> DeviceOverheads {
        let cublas = if major >= 9 { 32 * MIB } else { 4096 * 1024 * 2 + 16 * 1024 * 8 };
        DeviceOverheads { context_bytes: 500 * MIB, cublas_workspace_bytes: cublas }
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
        p.free(0);
        p.alloc(2, 12 * MIB);
        assert_eq!(p.peak_reserved, 16 * MIB);
    }
}
