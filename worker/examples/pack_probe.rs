//! What packing SmolLM2-135M's matrices for MKL's packed GEMM (`model::packed`) costs: the packing call of every
//! dense matrix and the output head for 8 rows, then 32, 8, 32 (the later packs reuse the first one's memory), each
//! followed by a packed product, with the process's resident memory after each. For issue 3's speed work:
//! `cargo run --release -p iro-worker --example pack_probe [MODEL_DIR]`.

use std::time::Instant;

use iro_worker::model::Checkpoint;
use iro_worker::model::packed::PackedWeight;
use tch::{Device, Kind, Tensor};

fn resident() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS")).and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_else(|| "?".into())
}

/// Seconds for one product through every matrix (the plain `mm` where the packed path declines).
fn pass(matrices: &[(Tensor, PackedWeight, i64)], rows: i64) -> f64 {
    let start = Instant::now();
    for (w, p, k) in matrices {
        let x = Tensor::ones([rows, *k], (Kind::Float, Device::Cpu));
        let _ = p.matmul(&x, None).unwrap_or_else(|| if w.size()[0] == *k { x.mm(w) } else { x.mm(&w.tr()) });
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    tch::set_num_threads(2);
    let dir = std::env::args().nth(1).unwrap_or_else(|| "assets/smollm2-135m-instruct".into());
    let ck = Checkpoint::load_trainable(dir.as_ref(), Kind::Float, Device::Cpu).expect("load the model");
    let _g = tch::no_grad_guard();
    // The dense layers as inference keeps them ([in, out] copies), and the tied head as the [V, H] embedding.
    let mut matrices: Vec<(Tensor, PackedWeight, i64)> = ck
        .weights
        .tensors()
        .filter(|(n, t)| t.dim() == 2 && n.contains(".layers."))
        .map(|(_, t)| {
            let w = t.tr().contiguous();
            let p = PackedWeight::new(&w, true).expect("MKL's packed GEMM in this libtorch");
            let k = w.size()[0];
            (w, p, k)
        })
        .collect();
    let (_, embedding) = ck.weights.tensors().find(|(n, _)| n.ends_with("embed_tokens.weight")).expect("embeddings");
    let head = PackedWeight::new(embedding, false).expect("MKL's packed GEMM in this libtorch");
    matrices.push((embedding.shallow_clone(), head, embedding.size()[1]));
    println!("{} matrices, resident {} kB after loading", matrices.len(), resident());
    for rows in [8i64, 32, 8, 32] {
        let plain = pass(&matrices, rows); // a new row count's first call takes the plain path
        let packing = pass(&matrices, rows); // the second packs, then multiplies
        let packed = pass(&matrices, rows);
        println!(
            "{rows:>2} rows: plain {plain:.3} s, pack + product {packing:.3} s, product {packed:.3} s, resident {} kB",
            resident()
        );
    }
}
