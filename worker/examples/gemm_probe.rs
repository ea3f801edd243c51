//! The dense layers of one SmolLM2-135M decode step (30 layers × q, k, v, o, gate, up, down on the real weights),
//! timed with HF's [out, in] matrices (`x·Wᵀ`, what `linear` does) against contiguous [in, out] copies (`x·W`), and
//! against q/k/v and gate/up fused into one matrix each, and against MKL's packed copies of the [in, out] matrices
//! (`model::packed`; a single row is not packed and runs x·W). The variants alternate, best of 15 rounds each, so a
//! busy neighbour slows all of them alike. These are the measurements behind `WeightLayout::Transposed` and the
//! packed GEMM's row range.
//! `cargo run --release -p iro-worker --example gemm_probe [MODEL_DIR]`

use std::time::Instant;

use iro_worker::model::Checkpoint;
use iro_worker::model::packed::PackedWeight;
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Milliseconds for one pass over every layer's matrices; the last matrix of a layer takes the MLP's width.
fn pass(layers: &[Vec<Tensor>], x: &Tensor, wide: &Tensor, transposed: bool) -> f64 {
    let start = Instant::now();
    for layer in layers {
        for (j, w) in layer.iter().enumerate() {
            let input = if j + 1 == layer.len() { wide } else { x };
            let _ = if transposed { input.mm(w) } else { input.linear::<Tensor>(w, None) };
        }
    }
    start.elapsed().as_secs_f64() * 1e3
}

/// Like `pass` with x·W, through the packed copies (the plain product where a call is not packed).
fn packed_pass(layers: &[Vec<PackedWeight>], plain: &[Vec<Tensor>], x: &Tensor, wide: &Tensor) -> f64 {
    let start = Instant::now();
    for (layer, plain) in layers.iter().zip(plain) {
        for (j, (p, w)) in layer.iter().zip(plain).enumerate() {
            let input = if j + 1 == layer.len() { wide } else { x };
            let _ = p.matmul(input, None).unwrap_or_else(|| input.mm(w));
        }
    }
    start.elapsed().as_secs_f64() * 1e3
}

fn main() {
    tch::set_num_threads(2);
    let dir = std::env::args().nth(1).unwrap_or_else(|| "assets/smollm2-135m-instruct".into());
    let ck = Checkpoint::load_trainable(dir.as_ref(), Kind::Float, Device::Cpu).expect("load the model");
    let _g = tch::no_grad_guard();
    let named: std::collections::HashMap<&str, &Tensor> = ck.weights.tensors().collect();
    let layers: Vec<Vec<Tensor>> = (0..)
        .map_while(|i| {
            NAMES
                .iter()
                .map(|n| named.get(format!("model.layers.{i}.{n}.weight").as_str()).map(|t| t.shallow_clone()))
                .collect()
        })
        .collect();
    assert!(!layers.is_empty(), "no Llama layers found in {dir}");
    let transpose = |ls: &[Vec<Tensor>]| -> Vec<Vec<Tensor>> {
        ls.iter().map(|l| l.iter().map(|w| w.tr().contiguous()).collect()).collect()
    };
    let fused: Vec<Vec<Tensor>> = layers
        .iter()
        .map(|l| vec![Tensor::cat(&l[0..3], 0), l[3].shallow_clone(), Tensor::cat(&l[4..6], 0), l[6].shallow_clone()])
        .collect();
    let (layers_t, fused_t) = (transpose(&layers), transpose(&fused));
    let packed: Vec<Vec<PackedWeight>> = layers_t
        .iter()
        .map(|l| l.iter().map(|w| PackedWeight::new(w, true).expect("MKL's packed GEMM in this libtorch")).collect())
        .collect();
    let (hidden, wide) = (layers[0][0].size()[1], layers[0][6].size()[1]);
    println!("{} layers; ms per decode step's dense layers, best of 15 alternating rounds", layers.len());
    for batch in [1i64, 2, 4, 8, 16, 32, 64, 128] {
        let x = Tensor::randn([batch, hidden], (Kind::Float, Device::Cpu));
        let xw = Tensor::randn([batch, wide], (Kind::Float, Device::Cpu));
        let mut best = [f64::MAX; 5];
        for _ in 0..15 {
            best[0] = best[0].min(pass(&layers, &x, &xw, false));
            best[1] = best[1].min(pass(&layers_t, &x, &xw, true));
            best[2] = best[2].min(pass(&fused, &x, &xw, false));
            best[3] = best[3].min(pass(&fused_t, &x, &xw, true));
            best[4] = best[4].min(packed_pass(&packed, &layers_t, &x, &xw));
        }
        println!(
            "batch {batch:>3}: x·Wᵀ {:.1} | x·W {:.1} ({:.2}×) | fused x·Wᵀ {:.1} | fused x·W {:.1} | packed {:.1} ({:.2}× x·W)",
            best[0],
            best[1],
            best[0] / best[1],
            best[2],
            best[3],
            best[4],
            best[1] / best[4]
        );
    }
}
