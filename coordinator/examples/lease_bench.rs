//! The coordinator's scale benchmark: 1,000 simulated workers and 100,000 tasks through the bare state
//! machine (leases/second), then the p99 latency of LeaseTask through the real gRPC service on loopback
//! (token check and fsync'd command log included).
//!
//! `cargo run --release -p iro-coordinator --example lease_bench [WORKERS TASKS CALLS CONCURRENCY]`

use iro_coordinator::driver::bench::{grpc_lease_latency, grpc_lease_latency_replicated, state_machine};

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

    let mut single = None;
    for (label, dir) in [("fsync'd file log", Some(tempfile::tempdir()?)), ("in-memory log", None)] {
        let g =
            grpc_lease_latency(workers, tasks, calls, concurrency, dir.as_ref().map(|d| d.path().to_owned())).await?;
        println!("gRPC LeaseTask on loopback, {label}: {} calls, {} concurrent clients", g.calls, g.concurrency);
        println!("  p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", g.p50_ms, g.p99_ms, g.max_ms);
        println!("  {:.0} lease+complete cycles/s", g.cycles_per_second);
        single.get_or_insert(g);
    }
    let dir = tempfile::tempdir()?;
    let (g, elected_s) =
        grpc_lease_latency_replicated(workers, tasks, calls, concurrency, dir.path().to_owned()).await?;
    println!(
        "gRPC LeaseTask on loopback, 3 Raft replicas (fsync'd Raft logs): {} calls, {} concurrent clients",
        g.calls, g.concurrency
    );
    println!("  first leader elected {:.2} s after start", elected_s);
    println!("  p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", g.p50_ms, g.p99_ms, g.max_ms);
    println!("  {:.0} lease+complete cycles/s", g.cycles_per_second);
    if let Some(one) = single {
        println!(
            "  3 replicas vs one coordinator (both fsync'd): {:.2}x the throughput, {:.2}x the p99",
            g.cycles_per_second / one.cycles_per_second.max(1e-9),
            g.p99_ms / one.p99_ms.max(1e-9)
        );
    }
    Ok(())
}
