//! Times one decode-step attention call at SmolLM2-135M's shapes (batch 32, 9 query heads over 3 kv heads,
//! 200 cached positions in a 300-slot cache) four ways: libtorch's `enable_gqa` flag, keys/values repeated per
//! query head, and the grouped-query reshape `model::attention::attend` uses (with a bool and a float mask).
//! `cargo run --release -p iro-worker --example sdpa_probe`
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn main() {
    tch::set_num_threads(2);
    let (b, h, hkv, d, cap, s) = (32i64, 9i64, 3i64, 64i64, 300i64, 200i64);
    let q = Tensor::randn([b, h, 1, d], (Kind::Float, Device::Cpu));
    let kc = Tensor::randn([b, hkv, cap, d], (Kind::Float, Device::Cpu));
    let vc = Tensor::randn([b, hkv, cap, d], (Kind::Float, Device::Cpu));
    let k = kc.narrow(2, 0, s);
    let v = vc.narrow(2, 0, s);
    let mask = Tensor::ones([b, 1, 1, s], (Kind::Bool, Device::Cpu));
    let fmask = Tensor::zeros([b, 1, 1, s], (Kind::Float, Device::Cpu));
    let n = 300;
    for round in 0..2 {
        let t = Instant::now();
        for _ in 0..n {
            let _ = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, None, true);
        }
        let a = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let t = Instant::now();
        for _ in 0..n {
            let k2 = k.repeat_interleave_self_int(h / hkv, 1, None);
            let v2 = v.repeat_interleave_self_int(h / hkv, 1, None);
            let _ = Tensor::scaled_dot_product_attention(&q, &k2, &v2, Some(&mask), 0.0, false, None, false);
        }
        let bb = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let t = Instant::now();
        for _ in 0..n {
            // GQA as a reshape: queries of a kv group become extra rows, no copy of K/V.
            let qg = q.view([b, hkv, h / hkv, d]);
            let o = Tensor::scaled_dot_product_attention(&qg, &k, &v, Some(&mask), 0.0, false, None, false);
            let _ = o.view([b, h, 1, d]);
        }
        let c = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let t = Instant::now();
        for _ in 0..n {
            let qg = q.view([b, hkv, h / hkv, d]);
            let o = Tensor::scaled_dot_product_attention(&qg, &k, &v, Some(&fmask), 0.0, false, None, false);
            let _ = o.view([b, h, 1, d]);
        }
        let e = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        // Plain math for one query per row: scores = scale·q·kᵀ + mask in one baddbmm, softmax, one bmm.
        let g = h / hkv;
        let fmask3 = fmask.expand([b, hkv, 1, s], false).reshape([b * hkv, 1, s]);
        let t = Instant::now();
        for _ in 0..n {
            let qg = q.reshape([b * hkv, g, d]);
            let k3 = k.reshape([b * hkv, s, d]);
            let v3 = v.reshape([b * hkv, s, d]);
            let scores = fmask3.baddbmm(&qg, &k3.transpose(1, 2), 1.0, 1.0 / (d as f64).sqrt());
            let o = scores.softmax(-1, Kind::Float).bmm(&v3);
            let _ = o.view([b, h, 1, d]);
        }
        let m = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!(
            "round {round}: gqa-flag {a:.0} us, repeat_interleave {bb:.0} us, grouped-queries bool {c:.0} us, grouped float {e:.0} us, math {m:.0} us"
        );
    }
}
