//! Where a decode step's time goes on SmolLM2-135M-Instruct (f32, CPU, 2 threads): the backbone forward of one new
//! token per row over a cache of ~100 positions, the lm_head projection, and sampling (top-k 50), for the model
//! loaded for inference (`WeightLayout::Transposed` on CPU) with and without MKL's packed GEMM (`model::packed`),
//! and with the checkpoint's own [out, in] matrices, in alternating rounds (best of 3 each), so a busy neighbour
//! slows all of them alike. For issue 3's speed work:
//! `cargo run --release -p iro-worker --example decode_profile [MODEL_DIR]`.

use std::time::Instant;

use iro_worker::generate::left_pad;
use iro_worker::generate::sampler::{RowRng, SamplingParams, sample};
use iro_worker::model::{CausalLm, Checkpoint, packed, positions_from_valid};
use tch::{Device, Kind, Tensor};

/// (backbone, lm_head, sampling) milliseconds per step, averaged over 48 steps.
fn profile(lm: &CausalLm, batch: usize) -> [f64; 3] {
    let params = SamplingParams { temperature: 0.7, top_k: 50, top_p: 1.0 };
    let prompts: Vec<Vec<i64>> =
        (0..batch).map(|r| (0..96).map(|i| 100 + ((r * 7 + i * 13) % 5000) as i64).collect()).collect();
    let (ids, valid) = left_pad(&prompts, 96, 0, Device::Cpu);
    let positions = positions_from_valid(&valid);
    let mut cache = lm.backbone.new_cache(batch as i64, 96 + 80);
    let hidden = lm.backbone.forward(&ids, &valid, &positions, Some(&mut cache));
    let mut logits = lm.logits(&hidden.select(1, -1));
    let mut next = positions.select(1, -1) + 1;
    let mut rngs: Vec<RowRng> = (0..batch as u64).map(RowRng::new).collect();
    let (mut t_back, mut t_head, mut t_sample) = (0.0, 0.0, 0.0);
    let steps = 48;
    for _ in 0..steps {
        let t0 = Instant::now();
        let (tokens, _) = sample(&logits, &params, &mut rngs);
        let t1 = Instant::now();
        let ids = Tensor::from_slice(&tokens).unsqueeze(1);
        let valid = Tensor::ones([batch as i64, 1], (Kind::Bool, Device::Cpu));
        let h = lm.backbone.forward(&ids, &valid, &next.unsqueeze(1), Some(&mut cache));
        let t2 = Instant::now();
        logits = lm.logits(&h.select(1, 0));
        let _ = logits.sum(Kind::Float).double_value(&[]); // force the projection now
        let t3 = Instant::now();
        next = &next + 1;
        t_sample += (t1 - t0).as_secs_f64();
        t_back += (t2 - t1).as_secs_f64();
        t_head += (t3 - t2).as_secs_f64();
    }
    [t_back, t_head, t_sample].map(|t| 1e3 * t / steps as f64)
}

fn main() {
    tch::set_num_threads(2);
    let dir = std::env::args().nth(1).unwrap_or_else(|| "assets/smollm2-135m-instruct".into());
    let load = |ck: Checkpoint| CausalLm::from_checkpoint(&ck).expect("build the model");
    let inference = load(Checkpoint::load(dir.as_ref(), Kind::Float, Device::Cpu).expect("load the model"));
    let hf_layout = load(Checkpoint::load_trainable(dir.as_ref(), Kind::Float, Device::Cpu).expect("load the model"));
    let _g = tch::no_grad_guard();
    for batch in [1usize, 8, 32] {
        let mut best = [[f64::MAX; 3]; 3];
        for _ in 0..3 {
            for (b, (lm, pack)) in best.iter_mut().zip([(&inference, true), (&inference, false), (&hf_layout, false)]) {
                packed::set_enabled(pack);
                let t = profile(lm, batch);
                if t.iter().sum::<f64>() < b.iter().sum::<f64>() {
                    *b = t;
                }
            }
        }
        let labels = ["inference, packed", "inference, mm", "checkpoint layout"];
        for (label, [back, head, samp]) in labels.iter().zip(best) {
            let total = back + head + samp;
            println!(
                "batch {batch:>2}, {label:18}: {total:.1} ms/step = backbone {back:.1} + lm_head {head:.1} + sampling {samp:.1}  ({:.0} tok/s)",
                batch as f64 * 1e3 / total
            );
        }
    }
}
