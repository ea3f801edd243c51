//! Loopback benchmark of the TCP ring all-reduce: R ranks as threads of this process, f32 buffers of 1 MiB to
//! 256 MiB, and each rank's throughput in the two conventions of nccl-tests:
//! - algorithm bandwidth = buffer bytes / time of one all-reduce;
//! - bus bandwidth = algbw · 2(R−1)/R, the bytes each rank actually sends (and receives) per second in a ring,
//!   comparable across R and with the link's speed.
//!
//!     cargo run --release -p iro-worker --example ring_bench [-- --ranks 2,4 --sizes-mib 1,4,16,64,256]
//!
//! On loopback every rank shares the machine's cores and memory bandwidth, so the numbers are a ceiling for
//! the protocol's own overhead, not a network measurement.

use std::time::{Duration, Instant};

use iro_worker::collective::{Collective, RingOptions, TcpRing};
use tch::{Device, Kind, Tensor};

fn list(args: &[String], flag: &str, default: &[usize]) -> Vec<usize> {
    match args.iter().position(|a| a == flag) {
        Some(i) => args
            .get(i + 1)
            .unwrap_or_else(|| panic!("{flag} needs a comma-separated list"))
            .split(',')
            .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{flag}: `{v}` is not a number")))
            .collect(),
        None => default.to_vec(),
    }
}

/// Seconds per all-reduce at `world` ranks for a buffer of `bytes`, as the slowest rank saw it.
fn measure(world: usize, bytes: usize) -> f64 {
    let listeners: Vec<_> = (0..world).map(|_| TcpRing::bind("127.0.0.1:0").unwrap()).collect();
    let endpoints: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    // Enough repetitions for about 1 GiB of buffer per rank, at least 3.
    let iters = (1usize << 30).div_ceil(bytes).clamp(3, 50);
    let opts = RingOptions { deadline: Duration::from_secs(120), ..Default::default() };
    let times: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let endpoints = endpoints.clone();
                s.spawn(move || {
                    let mut ring = TcpRing::connect(rank, endpoints, l, opts).unwrap();
                    let mut t = Tensor::zeros([(bytes / 4) as i64], (Kind::Float, Device::Cpu));
                    ring.all_reduce_sum(&mut t).unwrap(); // warm-up: page faults, socket buffers
                    ring.barrier().unwrap();
                    let start = Instant::now();
                    for _ in 0..iters {
                        ring.all_reduce_sum(&mut t).unwrap();
                    }
                    let took = start.elapsed().as_secs_f64() / iters as f64;
                    // Not timed: the sum is right at both ends of the buffer.
                    let _ = t.fill_(1.0);
                    ring.all_reduce_sum(&mut t).unwrap();
                    let ends = [t.double_value(&[0]), t.double_value(&[(bytes / 4 - 1) as i64])];
                    assert_eq!(ends, [world as f64; 2], "rank {rank}: wrong sum");
                    took
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().fold(0.0, f64::max)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ranks = list(&args, "--ranks", &[2, 4]);
    let sizes = list(&args, "--sizes-mib", &[1, 4, 16, 64, 256]);
    println!(
        "TCP ring all-reduce on loopback, f32, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{:>5} {:>9} {:>11} {:>14} {:>14}", "ranks", "size", "time/call", "algbw/rank", "busbw/rank");
    for &world in &ranks {
        for &mib in &sizes {
            let bytes = mib << 20;
            let secs = measure(world, bytes);
            let algbw = bytes as f64 / secs;
            let busbw = algbw * 2.0 * (world as f64 - 1.0) / world as f64;
            println!(
                "{world:>5} {:>6} MiB {:>8.2} ms {:>9.3} GB/s {:>9.3} GB/s",
                mib,
                secs * 1e3,
                algbw / 1e9,
                busbw / 1e9
            );
        }
    }
}
