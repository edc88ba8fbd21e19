//! A tensor-liveness simulator: tensors are created with a byte size and a category,
//! held by any number of owners (a loop variable, an autograd node that saved it), and
//! freed when the last owner lets go, exactly as reference counting frees them in
//! libtorch. The simulator records the peak, the phase it happened in and what was
//! live at that moment.

use super::{Breakdown, Category, Phase};
use crate::units::Bytes;

/// A handle to a simulated tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tensor(usize);

impl Tensor {
    /// A handle to nothing: retaining or releasing it does nothing.
    pub const NONE: Tensor = Tensor(usize::MAX);
}

#[derive(Debug)]
struct Slot {
    bytes: Bytes,
    category: Category,
    owners: u32,
    /// Memory that a user's program may not hold (the low end of the interval leaves it out).
    optional: bool,
}

/// One change of live memory, for timelines and traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub phase: Option<Phase>,
    /// What made the change: an op name, "grad", "optimizer"...
    pub label: &'static str,
    /// The graph node, when one made it.
    pub node: Option<usize>,
    /// Bytes allocated (positive) or freed (negative).
    pub delta: i64,
    pub live: u64,
}

#[derive(Debug, Default)]
pub struct Sim {
    /// Every change of live memory, when recording.
    pub events: Option<Vec<Event>>,
    label: &'static str,
    node: Option<usize>,
    slots: Vec<Slot>,
    /// Allocation granularity: 1 on the CPU (the counting allocator counts requested
    /// bytes), 512 on CUDA (the caching allocator's rounding, which its stats count).
    round: u64,
    /// The caching allocator's reserved memory, modelled when set (CUDA).
    pub pool: Option<super::cuda::Pool>,
    /// The same allocator with `expandable_segments` the other way, when asked for: one
    /// walk answers both settings (the advisor's search).
    pub toggled_pool: Option<super::cuda::Pool>,
    live: Breakdown,
    phase: Option<Phase>,
    pub peak: Bytes,
    pub peak_phase: Option<Phase>,
    pub peak_breakdown: Breakdown,
    /// Each category's highest live bytes.
    pub category_peaks: Breakdown,
    /// Highest live total seen in each phase, in `Phase::ALL` order.
    pub phase_peaks: [Bytes; Phase::ALL.len()],
    /// Live bytes that are optional (see `Slot::optional`).
    optional_live: u64,
    /// The peak without the optional bytes.
    pub peak_low: u64,
    /// The peak with every uncertain kernel buffer at its bound.
    pub peak_high: u64,
    /// Bytes a program may still hold that the estimate has freed (an exported model's
    /// module arguments after their last use, until the call returns): added to the
    /// interval's high end wherever live memory is observed.
    pub held_high: u64,
}

impl Sim {
    pub fn new() -> Sim {
        Sim { round: 1, ..Sim::default() }
    }

    /// A simulator for the CUDA caching allocator: sizes rounded to 512 bytes and
    /// reserved segments modelled.
    pub fn cuda(expandable_segments: bool) -> Sim {
        Sim { round: 512, pool: Some(super::cuda::Pool::new(expandable_segments)), ..Sim::default() }
    }

    /// Owners of a tensor (0 once freed).
    pub fn owners(&self, t: Tensor) -> u32 {
        self.slots.get(t.0).map_or(0, |s| s.owners)
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = Some(phase);
        self.observe();
    }

    pub fn phase(&self) -> Option<Phase> {
        self.phase
    }

    /// Starts recording every change of live memory.
    pub fn record(&mut self) {
        self.events = Some(Vec::new());
    }

    /// Names what the next allocations and frees belong to.
    pub fn set_label(&mut self, label: &'static str, node: Option<usize>) {
        self.label = label;
        self.node = node;
    }

    /// Bytes of a tensor (0 once freed).
    pub fn bytes(&self, t: Tensor) -> u64 {
        self.slots.get(t.0).filter(|s| s.owners > 0).map_or(0, |s| s.bytes.get())
    }

    fn log(&mut self, delta: i64) {
        if let Some(events) = self.events.as_mut() {
            events.push(Event {
                phase: self.phase,
                label: self.label,
                node: self.node,
                delta,
                live: self.live.total().get(),
            });
        }
    }

    pub fn live(&self) -> &Breakdown {
        &self.live
    }

    /// Allocates a tensor with one owner (its creator).
    pub fn alloc(&mut self, bytes: u64, category: Category) -> Tensor {
        let bytes =
            if self.round > 1 && bytes > 0 { bytes.div_ceil(self.round).saturating_mul(self.round) } else { bytes };
        if let Some(pool) = self.pool.as_mut() {
            pool.alloc(self.slots.len(), bytes);
        }
        if let Some(pool) = self.toggled_pool.as_mut() {
            pool.alloc(self.slots.len(), bytes);
        }
        self.slots.push(Slot { bytes: Bytes(bytes), category, owners: 1, optional: false });
        *self.live.get_mut(category) += Bytes(bytes);
        self.observe();
        if bytes > 0 {
            self.log(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        Tensor(self.slots.len() - 1)
    }

    /// Marks a tensor as one a user's program may not hold (the interval's low end
    /// leaves it out).
    pub fn set_optional(&mut self, t: Tensor) {
        if let Some(slot) = self.slots.get_mut(t.0)
            && slot.owners > 0
            && !slot.optional
        {
            slot.optional = true;
            self.optional_live += slot.bytes.get();
        }
    }

    /// A kernel buffer of at most `bytes` whose size the estimator does not know (a
    /// workspace or scratchpad): it raises only the interval's high end.
    pub fn uncertain(&mut self, bytes: u64) {
        let total = self.live.total().get();
        self.peak_high = self.peak_high.max(total.saturating_add(bytes));
    }

    /// Allocates a tensor and frees it at once: a temporary inside one kernel call.
    pub fn transient(&mut self, bytes: u64, category: Category) {
        let t = self.alloc(bytes, category);
        self.release(t);
    }

    /// What a live tensor is for from now on (a gradient that becomes a parameter's
    /// `.grad`, say); its bytes move between categories.
    pub fn recategorize(&mut self, t: Tensor, category: Category) {
        let Some(slot) = self.slots.get_mut(t.0) else {
            return;
        };
        if slot.owners == 0 || slot.category == category {
            return;
        }
        let (bytes, old) = (slot.bytes, slot.category);
        slot.category = category;
        let from = self.live.get_mut(old);
        *from = from.saturating_sub(bytes);
        *self.live.get_mut(category) += bytes;
        self.observe();
    }

    /// Another owner keeps the tensor alive (an autograd node saving it, say).
    pub fn retain(&mut self, t: Tensor) -> Tensor {
        if let Some(slot) = self.slots.get_mut(t.0) {
            slot.owners += 1;
        }
        t
    }

    /// One owner lets go; the last one frees the memory.
    pub fn release(&mut self, t: Tensor) {
        let Some(slot) = self.slots.get_mut(t.0) else {
            return;
        };
        if slot.owners == 0 {
            return;
        }
        slot.owners -= 1;
        if slot.owners == 0 {
            let (bytes, category) = (slot.bytes, slot.category);
            if slot.optional {
                self.optional_live = self.optional_live.saturating_sub(bytes.get());
            }
            if let Some(pool) = self.pool.as_mut() {
                pool.free(t.0);
            }
            if let Some(pool) = self.toggled_pool.as_mut() {
                pool.free(t.0);
            }
            let live = self.live.get_mut(category);
            *live = live.saturating_sub(bytes);
            if bytes.get() > 0 {
                self.log(-i64::try_from(bytes.get()).unwrap_or(i64::MAX));
            }
        }
    }

    fn observe(&mut self) {
        self.category_peaks.max_assign(&self.live);
        let total = self.live.total();
        self.peak_low = self.peak_low.max(total.get().saturating_sub(self.optional_live));
        self.peak_high = self.peak_high.max(total.get().saturating_add(self.held_high));
        if let Some(phase) = self.phase {
            let i = phase.index();
            self.phase_peaks[i] = self.phase_peaks[i].max(total);
        }
        if total > self.peak {
            self.peak = total;
            self.peak_phase = self.phase;
            self.peak_breakdown = self.live.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frees_on_last_release_and_keeps_the_peak() {
        let mut sim = Sim::new();
        sim.set_phase(Phase::Forward);
        let a = sim.alloc(100, Category::Activations);
        sim.retain(a);
        sim.release(a);
        assert_eq!(sim.live().total(), Bytes(100), "one owner left");
        sim.set_phase(Phase::Backward);
        sim.transient(50, Category::Temporaries);
        sim.release(a);
        assert_eq!(sim.live().total(), Bytes(0));
        assert_eq!(sim.peak, Bytes(150));
        assert_eq!(sim.peak_phase, Some(Phase::Backward));
        assert_eq!(sim.peak_breakdown.activations, Bytes(100));
        assert_eq!(sim.phase_peaks[Phase::Forward.index()], Bytes(100));
    }
}
