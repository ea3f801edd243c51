//! Activation checkpointing per decoder layer (`[value] activation_checkpointing`): the layer-by-layer
//! recomputing backward gives the plain backward's gradients, and holds less activation memory at its peak.
//!
//! Memory is read from glibc's allocator (`mallinfo2`), with every allocation of 64 KiB or more forced to its own
//! mapping (`M_MMAP_THRESHOLD`) so that the count covers every thread's large blocks (the arena counters cover
//! only the main arena). Activations of the batch below are 128 KiB and up, so they are all counted; this file
//! holds one test so that no other test allocates meanwhile.

use std::path::Path;

use iro_worker::train::layerwise::{Grads, checkpointed_micro, stage_groups};
use iro_worker::train::{TrainableValue, ValueBatch, ValueExample, build_batch, squared_error_sum};
use tch::{Device, Kind, Tensor};

#[repr(C)]
struct MallInfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

unsafe extern "C" {
    fn mallinfo2() -> MallInfo2;
    fn mallopt(param: i32, value: i32) -> i32;
}

const M_MMAP_THRESHOLD: i32 = -3;

/// Bytes in blocks of at least the mmap threshold, in every thread.
fn mapped_bytes() -> i64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    unsafe { mallinfo2() }.hblkhd as i64
}

fn value() -> TrainableValue {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_seqcls");
    TrainableValue::model_from_dir(&dir, Kind::Float, Device::Cpu, 3).unwrap()
}

/// Four sequences of 256 tokens (56 prompt, 200 response): long enough for each layer's activations to dwarf
/// the allocator's noise.
fn batch() -> ValueBatch {
    let examples: Vec<ValueExample> = (0..4)
        .map(|i| ValueExample {
            prompt: (0..56).map(|t| 4 + (t * 7 + i * 13) % 500).collect(),
            response: (0..200).map(|t| 4 + (t * 11 + i * 5) % 500).collect(),
            reward: [1.0, -0.5, 2.0, 0.25][i as usize],
        })
        .collect();
    let refs: Vec<&ValueExample> = examples.iter().collect();
    build_batch(&refs, 0, Device::Cpu).unwrap()
}

fn grads(value: &TrainableValue) -> Vec<Tensor> {
    value.params().iter().map(|p| p.grad().copy()).collect()
}

fn zero(value: &TrainableValue) {
    for p in value.params() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// The plain backward: one graph over the whole forward. Returns the loss sum and the activation bytes the graph
/// holds after the forward.
fn plain(value: &TrainableValue, b: &ValueBatch, scale: f64) -> (f64, i64) {
    let before = mapped_bytes();
    let values = value.values(&b.ids, &b.valid, &b.positions);
    let sum = squared_error_sum(&values, &b.target_mask, &b.rewards);
    let held = mapped_bytes() - before;
    (&sum * scale).backward();
    (sum.double_value(&[]), held)
}

/// The checkpointed backward. Returns the loss sum and the most activation bytes held at any of its peaks.
fn checkpointed(value: &TrainableValue, b: &ValueBatch, scale: f64) -> (f64, i64) {
    let groups = stage_groups(value).unwrap();
    let before = mapped_bytes();
    let mut peak = 0i64;
    let mut probe = || peak = peak.max(mapped_bytes() - before);
    let sum = checkpointed_micro(value, &groups, Some(b), scale, &mut Grads::Replicated, &mut probe).unwrap();
    (sum, peak)
}

#[test]
fn checkpointed_layers_give_the_plain_gradients_with_less_activation_memory() {
    // SAFETY: sets an allocator tunable before the allocations measured here.
    assert_eq!(unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) }, 1);
    let (value, b) = (value(), batch());
    let scale = 1.0 / b.target_mask.sum(Kind::Float).double_value(&[]);
    // Warm-up: the gradients (parameter-sized) exist from here on, so neither measurement counts them.
    plain(&value, &b, scale);
    checkpointed(&value, &b, scale);

    zero(&value);
    let (loss_plain, held_plain) = plain(&value, &b, scale);
    let want = grads(&value);
    zero(&value);
    let (loss_ckpt, held_ckpt) = checkpointed(&value, &b, scale);
    let got = grads(&value);

    assert!((loss_plain - loss_ckpt).abs() <= 1e-6 * loss_plain.abs().max(1.0), "{loss_plain} vs {loss_ckpt}");
    let names: Vec<String> = value.named_params().into_iter().map(|(n, _)| n).collect();
    let mut largest = 0.0f64;
    for ((name, w), g) in names.iter().zip(&want).zip(&got) {
        let diff = (w - g).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name}: checkpointed gradient differs by {diff}");
        largest = largest.max(w.abs().max().double_value(&[]));
    }
    assert!(largest > 1e-3, "the gradients are not all ~0 ({largest}), so the comparison means something");
    println!("activation bytes held at the peak: plain {held_plain}, checkpointed {held_ckpt}");
    assert!(held_plain > 1 << 20, "the plain graph held only {held_plain} bytes: the measurement sees nothing");
    assert!(held_ckpt < held_plain, "checkpointed peak {held_ckpt} is not below the plain {held_plain}");
}
