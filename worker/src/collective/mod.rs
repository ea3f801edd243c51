//! Collectives for data-parallel value training: every rank of a gang holds the same value function, computes
//! gradients on its share of each effective batch, and sums them with the others' before the optimizer step.
//!
//! Backends: [`SingleRank`] (one process, every call a no-op), [`TcpRing`] (ring all-reduce over TCP for CPU
//! workers, as gloo is for torch.distributed) and [`Nccl`] (NCCL through cudarc on GPUs, in place on the
//! tensors' device memory). The trainer never knows which one it has.
//!
//! No call can hang forever: every backend bounds each call by a deadline and fails with
//! [`Error::Collective`](crate::Error::Collective), naming the ranks that did not answer. A failed collective
//! stays failed: the gang is aborted and restarted from its last checkpoint, never patched up in place.

pub mod bucket;
pub mod nccl;
pub mod single;
pub mod tcp_ring;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tch::Tensor;

pub use bucket::{DEFAULT_BUCKET_BYTES, all_reduce_bucketed};
pub use nccl::{Nccl, NcclUniqueId};
pub use single::SingleRank;
pub use tcp_ring::{RingOptions, TcpRing};

use crate::error::Result;

/// How long one collective call may take when the config says nothing (`[cluster] collective_deadline_s`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);

/// Raised by the task loop when the coordinator takes the gang's lease back (a heartbeat answered "stop": the
/// gang was aborted or fenced) or on shutdown: every collective call blocked on its peers then fails at its
/// next poll (well under a millisecond for NCCL, one tick of the TCP ring) instead of at its deadline, which
/// may be many minutes away. A survivor of an aborted gang is so back asking for work within about a
/// heartbeat, long before the next gang's join timeout (review A9). Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct AbortSignal(Arc<AtomicBool>);

impl AbortSignal {
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a rank says when its call stops on an `AbortSignal`.
pub(crate) const ABORTED: &str = "stopped by this worker: its lease on the gang was taken back (the gang was aborted or \
                                  fenced), or it is shutting down";

/// One rank's handle on a gang of `world` ranks. Every rank must make the same calls in the same order with
/// tensors of the same shape and dtype; a rank that does not (or dies, or stalls) makes the others' calls fail
/// at their deadline with an error that names it.
pub trait Collective: Send {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `t` on every rank by the element-wise sum of all ranks' `t`. Every rank ends with the same
    /// bits (the summation order does not depend on the rank), so replicas that apply the same update stay equal.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Copies rank `root`'s `t` into every other rank's `t`.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
    /// Concatenates every rank's `input` (n elements, the same n and dtype on every rank) into `output`
    /// (world·n elements of that dtype, any shape, read in row-major order): afterwards block r of `output`,
    /// elements `r·n..(r+1)·n`, is rank r's `input`, on every rank. ZeRO-3 gathers a parameter bucket this way
    /// before it is used.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
    /// Sums `input` (world·n elements, the same on every rank in size and dtype) over the gang and keeps only
    /// block `rank` of the sum, elements `rank·n..(rank+1)·n`, in `output` (n elements). `input` is not
    /// changed. ZeRO-2/3 reduce a gradient bucket this way: each rank ends with the summed gradient of the
    /// shard it updates and no more.
    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()>;
}

/// `rank 3` or `ranks 1, 3`: how every collective error names the ranks it blames.
pub fn name_ranks(ranks: &[usize]) -> String {
    match ranks {
        [one] => format!("rank {one}"),
        many => {
            let list: Vec<String> = many.iter().map(|r| r.to_string()).collect();
            format!("ranks {}", list.join(", "))
        }
    }
}

/// Checks the tensors of an all-gather (`small` = input, `large` = output) or a reduce-scatter (`small` =
/// output, `large` = input): one dtype, and `large` holds exactly `world` times the elements of `small`.
fn check_blocks(what: &str, world: usize, small: &Tensor, large: &Tensor) -> Result<()> {
    if small.kind() != large.kind() {
        return Err(crate::Error::Collective(format!(
            "{what}: the shard is {:?} but the full buffer is {:?} (they must have one dtype)",
            small.kind(),
            large.kind()
        )));
    }
    if large.numel() != world * small.numel() {
        return Err(crate::Error::Collective(format!(
            "{what}: the full buffer has {} elements, not world ({world}) x the shard's {}",
            large.numel(),
            small.numel()
        )));
    }
    Ok(())
}

/// Checks `rank < world` and `world >= 1`, the precondition of every backend's constructor.
fn check_rank(backend: &str, rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(crate::Error::Collective(format!(
            "{backend}: rank {rank} is not in a gang of {world} (ranks are 0..world and world >= 1)"
        )));
    }
    Ok(())
}
