//! Gradient bucketing: instead of one collective call per parameter (hundreds of small calls, each paying the
//! ring's or NCCL's latency), gradients are flattened into buckets of about `bucket_bytes`, each bucket is
//! summed in one call, and the sums are copied back into the gradients.

use tch::{Device, Kind, Tensor};

use super::Collective;
use crate::error::Result;

/// PyTorch DDP's default bucket (`bucket_cap_mb = 25`).
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Sums `tensors` (typically the parameters' `.grad`) over the gang in place, in buckets of at most
/// `bucket_bytes` (a tensor larger than that gets a bucket of its own). A bucket holds tensors of one dtype and
/// device, in the given order, so every rank that passes the same list builds the same buckets.
/// Undefined tensors are an error: every rank must contribute to every bucket or the layouts would differ.
pub fn all_reduce_bucketed(collective: &mut dyn Collective, tensors: &[Tensor], bucket_bytes: usize) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    if let Some(i) = tensors.iter().position(|t| !t.defined()) {
        return Err(crate::Error::Collective(format!(
            "bucketed all-reduce: tensor {i} of {} is undefined (every rank must pass defined gradients, zeros if \
             it computed none)",
            tensors.len()
        )));
    }
    for bucket in plan_buckets(tensors, bucket_bytes) {
        tch::no_grad(|| -> Result<()> {
            let members: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
            let flat: Vec<Tensor> = members.iter().map(|t| t.reshape([-1])).collect();
            // bf16/f16 gradients are summed in f32: more exact, and what every backend can add.
            let low = matches!(members[0].kind(), Kind::BFloat16 | Kind::Half);
            let mut buffer = Tensor::cat(&flat, 0);
            if low {
                buffer = buffer.to_kind(Kind::Float);
            }
            collective.all_reduce_sum(&mut buffer)?;
            let mut offset = 0i64;
            for t in members {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.copy_(&buffer.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Groups tensor indices into buckets: consecutive tensors of the same dtype and device, closed when the next
/// tensor would push the bucket over `bucket_bytes`.
pub(crate) fn plan_buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0usize;
    let mut current_key: Option<(Kind, Device)> = None;
    for (i, t) in tensors.iter().enumerate() {
        let key = (t.kind(), t.device());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let fits = current_key == Some(key) && current_bytes + bytes <= bucket_bytes;
        if !current.is_empty() && !fits {
            buckets.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += bytes;
        current_key = Some(key);
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_close_at_the_size_and_at_a_dtype_change() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
        // 40 B, 40 B, 80 B (f64), 400 B, 4 B with a 100-byte cap.
        let ts = [f(10), f(10), d(10), f(100), f(1)];
        assert_eq!(plan_buckets(&ts, 100), vec![vec![0, 1], vec![2], vec![3], vec![4]]);
        assert_eq!(plan_buckets(&ts, 10_000), vec![vec![0, 1], vec![2], vec![3, 4]]);
    }
}
