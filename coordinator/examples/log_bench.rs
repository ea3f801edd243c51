//! What the command log costs on disk and at restart (issue 13, review A4/A7), before and after the
//! driver stopped logging commands that change only liveness:
//!
//! 1. `IDLE_POLLS` idle LeaseTask polls (workers waiting at a phase barrier, as during a long train step):
//!    the log as the old driver wrote it (every applied command) against what it writes now.
//! 2. A simulated 64-worker, 10-iteration run (rollout shards of 60 s, a 300 s train task, eval shards of
//!    30 s, 10 s heartbeats, idle workers polling every second, an ExpireLeases tick every second), both ways,
//!    and the restart after a snapshot.
//!
//! Every log goes through the real `FileLog` (fsync'd segments) in a temporary folder; a restart is
//! `FileLog::open` + `load` replaying into a fresh `RunState`.
//!
//! `cargo run --release -p iro-coordinator --example log_bench [IDLE_POLLS]` (default 10,000,000)

use std::path::Path;
use std::time::Instant;

use iro_coordinator::driver::log::Recovered;
use iro_coordinator::driver::{CommandLog, FileLog};
use iro_coordinator::state::{Command, Lease, Output, Plan, Progress, Reply, Resources, RunState, TaskId, WorkerId};

const CONFIG_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { dir_bytes(&p) } else { e.metadata().map_or(0, |m| m.len()) }
        })
        .sum()
}

/// One log under test: the commands it was given (batched per simulated second) and whether it keeps
/// the liveness-only ones.
struct Logged {
    log: FileLog,
    keep_liveness: bool,
    batch: Vec<Command>,
    entries: u64,
}

impl Logged {
    fn new(dir: &Path, plan: &Plan, keep_liveness: bool) -> Result<Self, Box<dyn std::error::Error>> {
        let mut log = FileLog::open(dir, "bench", plan, CONFIG_SHA)?;
        log.load(&mut |_| Ok(()))?;
        Ok(Self { log, keep_liveness, batch: Vec::new(), entries: 0 })
    }

    fn note(&mut self, state: &RunState, command: &Command, reply: &Reply) {
        if self.keep_liveness || !state.changes_only_liveness(command, reply) {
            self.batch.push(command.clone());
        }
    }

    /// One group commit, as the driver does per batch of queued commands.
    fn flush(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        if !self.batch.is_empty() {
            self.log.append(&self.batch)?;
            self.entries += self.batch.len() as u64;
            self.batch.clear();
        }
        Ok(())
    }
}

/// The live run state and the two logs of the same commands: every one (the old policy) and only the
/// durable changes (now).
struct Bench {
    plan: Plan,
    state: RunState,
    dirs: [tempfile::TempDir; 2],
    logs: [Logged; 2],
}

/// One log's size and restart cost.
struct Row {
    entries: u64,
    bytes: u64,
    restart_s: f64,
}

impl Bench {
    fn new(plan: Plan) -> Result<Self, Box<dyn std::error::Error>> {
        let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
        let logs = [Logged::new(dirs[0].path(), &plan, true)?, Logged::new(dirs[1].path(), &plan, false)?];
        Ok(Self { state: RunState::new(plan.clone())?, plan, dirs, logs })
    }

    fn send(&mut self, command: Command) -> Reply {
        let reply = self.state.apply(command.clone()).expect("the bench sends valid commands").reply;
        for log in &mut self.logs {
            log.note(&self.state, &command, &reply);
        }
        reply
    }

    fn register(&mut self, workers: &[WorkerId], now_ms: u64) {
        for w in workers {
            let resources = Resources { device: "cuda:0".into(), memory_bytes: 80 << 30, cached_models: vec![] };
            self.send(Command::RegisterWorker {
                worker_id: w.clone(),
                name: w.to_string(),
                resources,
                now_ms,
                session: String::new(),
            });
        }
    }

    fn flush(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        self.logs.iter_mut().try_for_each(Logged::flush)
    }

    /// Closes both logs, restarts each and checks it rebuilds the live state; then, on the log of durable
    /// changes, takes a snapshot of the final state (as the driver does every `snapshot_every` entries) and
    /// restarts from it. Returns [every command, durable changes, after the snapshot].
    fn finish(self) -> Result<[Row; 3], Box<dyn std::error::Error>> {
        let Self { plan, state, dirs, logs } = self;
        let live = state.durable_digest();
        let entries = logs.each_ref().map(|l| l.entries);
        drop(logs); // releases the state folders' locks
        let mut rows = Vec::new();
        for (dir, entries) in dirs.iter().zip(entries) {
            let bytes = dir_bytes(dir.path());
            let (restart_s, digest) = restart(dir.path(), &plan)?;
            assert_eq!(digest, live, "a replay diverged from the live state");
            rows.push(Row { entries, bytes, restart_s });
        }
        let mut log = FileLog::open(dirs[1].path(), "bench", &plan, CONFIG_SHA)?;
        log.load(&mut |_| Ok(()))?;
        log.begin_snapshot(state)?.run()?;
        drop(log);
        let (restart_s, digest) = restart(dirs[1].path(), &plan)?;
        assert_eq!(digest, live, "the restart from the snapshot diverged");
        rows.push(Row { entries: 0, bytes: dir_bytes(dirs[1].path()), restart_s });
        Ok(rows.try_into().map_err(|_| "three rows")?)
    }
}

fn print(rows: &[Row; 3]) {
    println!("| log | entries | bytes on disk | restart (open + replay) |");
    println!("|---|---|---|---|");
    for (label, row) in ["every command (before)", "durable changes only (now)"].iter().zip(rows) {
        println!("| {label} | {} | {} | {:.4} s |", row.entries, row.bytes, row.restart_s);
    }
    println!("| now, after a snapshot | - | {} | {:.4} s |", rows[2].bytes, rows[2].restart_s);
}

/// Reopens the log in `dir` and replays it into a fresh state: a coordinator restart. Returns seconds
/// and the rebuilt state's durable digest.
fn restart(dir: &Path, plan: &Plan) -> Result<(f64, u64), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut log = FileLog::open(dir, "bench", plan, CONFIG_SHA)?;
    let mut state = RunState::new(plan.clone())?;
    log.load(&mut |item| {
        match item {
            Recovered::Snapshot { state: snap, .. } => state = *snap,
            Recovered::Entry { command, .. } => {
                let _ = state.apply(command);
            }
        }
        Ok(())
    })?;
    Ok((started.elapsed().as_secs_f64(), state.durable_digest()))
}

fn workers(n: usize) -> Vec<WorkerId> {
    (0..n).map(|i| WorkerId::new(format!("w-{i:04}"))).collect()
}

fn idle_polls(polls: u64) -> Result<(), Box<dyn std::error::Error>> {
    // One rollout shard held by a busy worker keeps the barrier closed; 64 idle workers poll.
    let mut bench = Bench::new(Plan::new(1, 1, 1, 1))?;
    let workers = workers(65);
    let mut now = 1_000u64;
    bench.register(&workers, now);
    bench.send(Command::LeaseTask { worker_id: workers[0].clone(), now_ms: now });
    let started = Instant::now();
    for i in 0..polls {
        if i % 64 == 0 {
            now += 1_000;
            bench.flush()?;
        }
        bench.send(Command::LeaseTask { worker_id: workers[1 + (i % 64) as usize].clone(), now_ms: now });
    }
    bench.flush()?;
    let wrote = started.elapsed().as_secs_f64();
    let rows = bench.finish()?;
    println!("{polls} idle LeaseTask polls by 64 workers at a barrier ({wrote:.1} s to apply and log both ways)");
    print(&rows);
    Ok(())
}

/// What a simulated worker is doing.
#[derive(Clone, Copy)]
enum Doing {
    Idle,
    Joining { task: TaskId, attempt: u32 },
    Working { task: TaskId, attempt: u32, until: u64 },
}

fn simulated_run() -> Result<(), Box<dyn std::error::Error>> {
    let iterations = 10u32;
    let mut bench = Bench::new(Plan::new(iterations, 64, 16, 1))?;
    let workers = workers(64);
    let mut doing = vec![Doing::Idle; workers.len()];
    let mut now = 1_000u64;
    bench.register(&workers, now);
    let started = Instant::now();
    while bench.state.current_stage().is_some() {
        now += 1_000;
        for (i, w) in workers.iter().enumerate() {
            // Heartbeats every 10 s, staggered across workers.
            let heartbeat_due = (now / 1_000 + i as u64).is_multiple_of(10);
            match doing[i] {
                Doing::Idle => {
                    match bench.send(Command::LeaseTask { worker_id: w.clone(), now_ms: now }) {
                        Reply::Lease(Lease::Task { task_id, attempt, .. }) => {
                            let secs = if task_id.phase == iro_coordinator::plan::Phase::Eval { 30 } else { 60 };
                            doing[i] = Doing::Working { task: task_id, attempt, until: now + secs * 1_000 };
                        }
                        Reply::Lease(Lease::GangRank { task_id, attempt, .. }) => {
                            doing[i] = Doing::Joining { task: task_id, attempt };
                        }
                        _ => {}
                    }
                    if heartbeat_due && matches!(doing[i], Doing::Idle) {
                        let progress = Progress::default();
                        bench.send(Command::Heartbeat { worker_id: w.clone(), lease: None, progress, now_ms: now });
                    }
                }
                Doing::Joining { task, attempt } => {
                    let endpoint = "rank-0-of-1".into();
                    let c = Command::JoinGang { worker_id: w.clone(), task_id: task, attempt, endpoint, now_ms: now };
                    if let Reply::GangReady { .. } = bench.send(c) {
                        doing[i] = Doing::Working { task, attempt, until: now + 300_000 };
                    }
                }
                Doing::Working { task, attempt, until } if now >= until => {
                    let output = Output {
                        key: format!("runs/bench/{task}.attempt-{attempt}"),
                        sha256: "a".repeat(64),
                        records: 64,
                        tokens: 64 * 200,
                    };
                    bench.send(Command::CompleteTask {
                        worker_id: w.clone(),
                        task_id: task,
                        attempt,
                        output,
                        now_ms: now,
                    });
                    doing[i] = Doing::Idle;
                }
                Doing::Working { task, attempt, .. } => {
                    if heartbeat_due {
                        let lease = Some(iro_coordinator::state::LeaseRef { task_id: task, attempt });
                        let progress = Progress { done: 1, total: 2 };
                        bench.send(Command::Heartbeat { worker_id: w.clone(), lease, progress, now_ms: now });
                    }
                }
            }
        }
        // The driver ticks every second.
        bench.send(Command::ExpireLeases { now_ms: now });
        bench.flush()?;
    }
    let wrote = started.elapsed().as_secs_f64();
    let rows = bench.finish()?;
    println!(
        "\nsimulated run: {} workers, {iterations} iterations of 64 rollout shards (60 s), a train task (300 s), \
         16 eval shards (30 s); {:.0} simulated minutes, {} commands ({wrote:.1} s to apply and log both ways)",
        workers.len(),
        (now - 1_000) as f64 / 60_000.0,
        rows[0].entries
    );
    print(&rows);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let polls = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(10_000_000u64);
    idle_polls(polls)?;
    simulated_run()?;
    Ok(())
}
