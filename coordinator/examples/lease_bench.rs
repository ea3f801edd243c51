//! The coordinator's scale benchmark: 1,000 simulated workers and 100,000 tasks through the bare state
//! machine (leases/second), then the p99 latency of LeaseTask through the real gRPC service on loopback
//! (token check and fsync'd command log included).
//!
//! `cargo run --release -p iro-coordinator --example lease_bench [WORKERS TASKS CALLS CONCURRENCY]`

use iro_coordinator::driver::bench::{grpc_lease_latency, state_machine};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let arg = |i: usize, default: u64| args.get(i).copied().unwrap_or(default);
    let (workers, tasks) = (arg(0, 1_000) as u32, arg(1, 100_000) as u32);
    let (calls, concurrency) = (arg(2, 5_000) as usize, arg(3, 64) as usize);

    let s = state_machine(workers, tasks)?;
    println!("state machine: {} workers, {} tasks", s.workers, s.tasks);
    println!("  {:.0} leases/s ({} leases in {:.3} s of LeaseTask)", s.leases_per_second, s.leases, s.lease_seconds);
    println!("  {:.0} lease+complete cycles/s", s.cycles_per_second);
    println!("  replaying the {}-command log: {:.3} s", s.log_commands, s.replay_seconds);

    for (label, dir) in [("fsync'd file log", Some(tempfile::tempdir()?)), ("in-memory log", None)] {
        let g =
            grpc_lease_latency(workers, tasks, calls, concurrency, dir.as_ref().map(|d| d.path().to_owned())).await?;
        println!("gRPC LeaseTask on loopback, {label}: {} calls, {} concurrent clients", g.calls, g.concurrency);
        println!("  p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", g.p50_ms, g.p99_ms, g.max_ms);
        println!("  {:.0} lease+complete cycles/s", g.cycles_per_second);
    }
    Ok(())
}
