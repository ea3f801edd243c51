//! GPU host check of the NCCL collective, run by `scripts/gpu/nccl_check.sh`: two rank processes (this program
//! started twice by itself) join one communicator and run
//!   1. all-reduce in place on torch tensors (f32, bf16, odd length, a CPU tensor staged to the GPU),
//!   2. broadcast and barrier,
//!   3. the bucketed gradient all-reduce,
//!   4. a few timed 64 MiB all-reduces (printed, not judged),
//!   5. a data-parallel value training (the llama_seqcls fixture, 3 optimizer steps) compared with a one-rank
//!      training of the same batches,
//!   6. ZeRO's collectives (all-gather, reduce-scatter on GPU tensors) and the 2-rank fully sharded value training
//!      (`[value] sharding = "full"`, ZeRO-3) compared with the same one-rank training,
//!   7. a rank that leaves: the other's next all-reduce must fail with an error within its deadline, not hang.
//!
//! With one GPU both ranks share it. NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU
//! detected"), unless they look like different hosts: each rank then gets its own NCCL_HOSTID and they talk
//! through NCCL's socket transport. That is a FUNCTIONAL check of this code (rendezvous, in-place calls on
//! torch memory, deadlines, training), never a performance figure. With two or more GPUs each rank gets its
//! own.
//!
//!     cargo run --release -p iro-worker --example nccl_check
#[path = "../tests/support/value_examples.rs"]
mod value_examples;

use value_examples::examples;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use iro_worker::collective::{Collective, Nccl, NcclUniqueId, SingleRank, all_reduce_bucketed};
use iro_worker::train::{DataParallel, ValueInit, ValueTrainConfig, checkpoint, train_value_ranked};
use tch::{Device, Kind, Tensor};

const WORLD: usize = 2;

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, "--rank") {
        Some(rank) => match rank_main(rank.parse().expect("--rank takes a number"), &args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rank {rank}: FAIL: {e}");
                ExitCode::FAILURE
            }
        },
        None => launcher(),
    }
}

/// Creates the unique id (rank 0's job in the cluster, published through the coordinator; here the launcher
/// plays the coordinator), starts both ranks and reports.
fn launcher() -> ExitCode {
    if !tch::Cuda::is_available() {
        eprintln!("nccl_check: libtorch sees no CUDA device (a CPU-only libtorch, or libtorch_cuda.so not linked)");
        return ExitCode::from(2);
    }
    let gpus = tch::Cuda::device_count() as usize;
    let id = match NcclUniqueId::new() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("nccl_check: {e}");
            return ExitCode::from(2);
        }
    };
    let out = std::env::temp_dir().join(format!("iro-nccl-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("temp dir");
    let shared_gpu = gpus < WORLD;
    println!(
        "nccl_check: {gpus} GPU(s); {}",
        if shared_gpu {
            "both ranks on GPU 0 with distinct NCCL_HOSTIDs (socket transport): functional check only"
        } else {
            "one GPU per rank"
        }
    );
    let exe = std::env::current_exe().expect("own path");
    let children: Vec<_> = (0..WORLD)
        .map(|rank| {
            let device = if shared_gpu { 0 } else { rank };
            let mut cmd = Command::new(&exe);
            cmd.args(["--rank", &rank.to_string(), "--device", &device.to_string(), "--id", &id.to_hex()])
                .arg("--out")
                .arg(&out);
            if shared_gpu {
                cmd.env("NCCL_HOSTID", format!("iro-nccl-check-rank-{rank}"));
            }
            cmd.spawn().expect("start a rank process")
        })
        .collect();
    let ok = children.into_iter().enumerate().fold(true, |ok, (rank, mut c)| {
        let status = c.wait().expect("wait for a rank");
        println!("nccl_check: rank {rank} exited with {status}");
        ok && status.success()
    });
    let _ = std::fs::remove_dir_all(&out);
    println!("nccl_check: {}", if ok { "PASS" } else { "FAIL" });
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

fn rank_main(rank: usize, args: &[String]) -> Result<(), String> {
    let device = Device::Cuda(arg(args, "--device").ok_or("--device missing")?.parse().map_err(|_| "bad --device")?);
    let id = NcclUniqueId::from_hex(&arg(args, "--id").ok_or("--id missing")?).map_err(|e| e.to_string())?;
    let out = PathBuf::from(arg(args, "--out").ok_or("--out missing")?);
    let say = |what: &str| println!("rank {rank}: {what}");

    let start = Instant::now();
    let mut nccl = Nccl::new(rank, WORLD, &id, device, Duration::from_secs(120)).map_err(|e| e.to_string())?;
    say(&format!("joined in {:.2} s", start.elapsed().as_secs_f64()));

    // 1. All-reduce in place.
    let e = |e: iro_worker::Error| e.to_string();
    let mut big = Tensor::full([4 * 1024 * 1024 + 3], (rank + 1) as f64, (Kind::Float, device));
    nccl.all_reduce_sum(&mut big).map_err(e)?;
    let (lo, hi) = (big.min().double_value(&[]), big.max().double_value(&[]));
    check(lo == 3.0 && hi == 3.0, || format!("f32 all-reduce gave values in [{lo}, {hi}], expected 3"))?;
    let mut half = Tensor::full([1001], (rank + 1) as f64, (Kind::BFloat16, device));
    nccl.all_reduce_sum(&mut half).map_err(e)?;
    check(half.to_kind(Kind::Float).eq(3.0).all().int64_value(&[]) == 1, || "bf16 all-reduce is not 3".into())?;
    let mut host = Tensor::from_slice(&[rank as f64 + 0.5]);
    nccl.all_reduce_sum(&mut host).map_err(e)?;
    check(host.double_value(&[0]) == 2.0, || format!("staged CPU f64 all-reduce gave {}", host.double_value(&[0])))?;
    say("all-reduce OK (f32 in place, bf16, CPU tensor staged)");

    // 2. Broadcast and barrier.
    let mut b = Tensor::full([777], rank as f64 * 10.0, (Kind::Float, device));
    nccl.broadcast(&mut b, 1).map_err(e)?;
    check(b.eq(10.0).all().int64_value(&[]) == 1, || "broadcast from rank 1 did not arrive".into())?;
    nccl.barrier().map_err(e)?;
    say("broadcast and barrier OK");

    // 3. Buckets of 1 MiB over tensors of mixed sizes.
    let grads: Vec<Tensor> = [300_000i64, 17, 1 << 20, 5]
        .iter()
        .map(|&n| Tensor::full([n], (rank + 1) as f64, (Kind::Float, device)))
        .collect();
    all_reduce_bucketed(&mut nccl, &grads, 1 << 20).map_err(e)?;
    for (i, g) in grads.iter().enumerate() {
        check(g.eq(3.0).all().int64_value(&[]) == 1, || format!("bucketed all-reduce: tensor {i} is not 3"))?;
    }
    say("bucketed all-reduce OK");

    // 4. Timing, for the record only (two ranks on one GPU measure the socket transport, not NVLink).
    let mut t = Tensor::zeros([16 * 1024 * 1024], (Kind::Float, device));
    nccl.all_reduce_sum(&mut t).map_err(e)?;
    let iters = 10;
    let start = Instant::now();
    for _ in 0..iters {
        nccl.all_reduce_sum(&mut t).map_err(e)?;
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    say(&format!(
        "64 MiB all-reduce: {:.2} ms, algbw {:.2} GB/s (functional setup: not a benchmark)",
        secs * 1e3,
        64.0 * 1048576.0 / secs / 1e9
    ));

    // 5. Data-parallel value training vs one rank.
    let cfg = ValueTrainConfig {
        lr: 1e-3,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs: 1,
        batch_size: 4,
        micro_batch_size: 2,
        checkpoint_every: 0,
        seed: 7,
        pad_id: 0,
        sharding: iro_common::config::ValueSharding::None,
        activation_checkpointing: false,
    };
    let data = examples(10, 5);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_seqcls");
    let init = ValueInit::Model { dir: fixture, kind: Kind::Float, device };
    let gang_dir = out.join("gang");
    let gang = DataParallel { collective: &mut nccl, bucket_bytes: 64 * 1024 };
    let report =
        train_value_ranked(&cfg, &data, &init, &gang_dir, false, gang, |_| ControlFlow::Continue(())).map_err(e)?;
    say(&format!("2-rank value training: {} steps, losses {:?}", report.steps, report.losses));
    if rank == 0 {
        let solo_dir = out.join("solo");
        let mut single = SingleRank;
        let solo = DataParallel { collective: &mut single, bucket_bytes: 64 * 1024 };
        train_value_ranked(&cfg, &data, &init, &solo_dir, false, solo, |_| ControlFlow::Continue(())).map_err(e)?;
        let diff = max_abs_diff(&gang_dir, &solo_dir);
        check(diff <= 1e-4, || format!("2-rank and 1-rank weights differ by {diff}"))?;
        say(&format!("2-rank weights match 1-rank weights (max abs diff {diff:.2e})"));
    }
    nccl.barrier().map_err(e)?;

    // 6. All-gather and reduce-scatter, then the same training fully sharded.
    let mine = Tensor::full([1001], (rank + 1) as f64, (Kind::Float, device));
    let mut gathered = Tensor::zeros([2 * 1001], (Kind::Float, device));
    nccl.all_gather(&mine, &mut gathered).map_err(e)?;
    let want = Tensor::cat(
        &[Tensor::ones([1001], (Kind::Float, device)), Tensor::full([1001], 2.0, (Kind::Float, device))],
        0,
    );
    check(gathered.equal(&want), || "all-gather did not put rank r's block at r".into())?;
    let full = Tensor::arange(2 * 777, (Kind::Float, device)) * (rank + 1) as f64;
    let mut block = Tensor::zeros([777], (Kind::Float, device));
    nccl.reduce_scatter_sum(&full, &mut block).map_err(e)?;
    let want = Tensor::arange(2 * 777, (Kind::Float, device)).narrow(0, rank as i64 * 777, 777) * 3.0;
    check(block.equal(&want), || "reduce-scatter did not give rank r block r of the sum".into())?;
    say("all-gather and reduce-scatter OK");
    let zero3 = ValueTrainConfig { sharding: iro_common::config::ValueSharding::Full, ..cfg.clone() };
    let sharded_dir = out.join("sharded");
    let gang = DataParallel { collective: &mut nccl, bucket_bytes: 64 * 1024 };
    let report = train_value_ranked(&zero3, &data, &init, &sharded_dir, false, gang, |_| ControlFlow::Continue(()))
        .map_err(e)?;
    say(&format!("2-rank fully sharded training: {} steps, losses {:?}", report.steps, report.losses));
    if rank == 0 {
        let diff = max_abs_diff(&sharded_dir, &out.join("solo"));
        check(diff <= 1e-4, || format!("sharded 2-rank and 1-rank weights differ by {diff}"))?;
        say(&format!("sharded 2-rank weights match 1-rank weights (max abs diff {diff:.2e})"));
    }
    nccl.barrier().map_err(e)?;

    // 7. Rank 1 leaves; rank 0's next call must fail within its deadline.
    if rank == 1 {
        drop(nccl);
        say("leaving the gang");
        return Ok(());
    }
    nccl.set_deadline(Duration::from_secs(20));
    let start = Instant::now();
    let mut t = Tensor::ones([1024], (Kind::Float, device));
    match nccl.all_reduce_sum(&mut t) {
        Ok(()) => Err("an all-reduce with rank 1 gone succeeded".into()),
        Err(err) => {
            let took = start.elapsed();
            check(took < Duration::from_secs(30), || format!("the failure took {took:?}"))?;
            say(&format!("rank 1 gone: failed in {:.1} s as it should: {err}", took.as_secs_f64()));
            Ok(())
        }
    }
}

fn max_abs_diff(a: &Path, b: &Path) -> f64 {
    let read = |dir: &Path| {
        let mut t = Tensor::read_safetensors(checkpoint::latest(dir).unwrap().join("model.safetensors")).unwrap();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    read(a).iter().zip(read(b).iter()).map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}
