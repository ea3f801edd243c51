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

fn resources() -> Resources {
    Resources { device: "cuda:0".into(), memory_bytes: 80 << 30, cached_models: vec![] }
}

fn idle_polls(polls: u64) -> Result<(), Box<dyn std::error::Error>> {
    // One rollout shard held by a busy worker keeps the barrier closed; 64 idle workers poll.
    let plan = Plan::new(1, 1, 1, 1);
    let (before_dir, after_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut before = Logged::new(before_dir.path(), &plan, true)?;
    let mut after = Logged::new(after_dir.path(), &plan, false)?;
    let mut state = RunState::new(plan.clone())?;
    let workers: Vec<WorkerId> = (0..65).map(|i| WorkerId::new(format!("w-{i:04}"))).collect();
    let mut now = 1_000u64;
    let send = |state: &mut RunState, before: &mut Logged, after: &mut Logged, command: Command| {
        let reply = state.apply(command.clone()).expect("the bench sends valid commands").reply;
        before.note(state, &command, &reply);
        after.note(state, &command, &reply);
        reply
    };
    for w in &workers {
        let c =
            Command::RegisterWorker { worker_id: w.clone(), name: w.to_string(), resources: resources(), now_ms: now };
        send(&mut state, &mut before, &mut after, c);
    }
    let c = Command::LeaseTask { worker_id: workers[0].clone(), now_ms: now };
    send(&mut state, &mut before, &mut after, c);
    let started = Instant::now();
    for i in 0..polls {
        let worker = workers[1 + (i % 64) as usize].clone();
        if i % 64 == 0 {
            now += 1_000;
            before.flush()?;
            after.flush()?;
        }
        send(&mut state, &mut before, &mut after, Command::LeaseTask { worker_id: worker, now_ms: now });
    }
    before.flush()?;
    after.flush()?;
    let wrote = started.elapsed().as_secs_f64();
    let live = state.durable_digest();
    let (before_entries, after_entries) = (before.entries, after.entries);
    drop((before, after)); // releases the state folders' locks
    let (before_s, before_digest) = restart(before_dir.path(), &plan)?;
    let (after_s, after_digest) = restart(after_dir.path(), &plan)?;
    assert_eq!((before_digest, after_digest), (live, live), "a replay diverged from the live state");
    println!("{polls} idle LeaseTask polls by 64 workers at a barrier ({wrote:.1} s to apply and log both ways)");
    println!("| log | entries | bytes on disk | restart (open + replay) |");
    println!("|---|---|---|---|");
    println!("| every command (before) | {before_entries} | {} | {before_s:.2} s |", dir_bytes(before_dir.path()));
    println!("| durable changes only (now) | {after_entries} | {} | {after_s:.3} s |", dir_bytes(after_dir.path()));
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
    let (iterations, workers_n) = (10u32, 64usize);
    let plan = Plan::new(iterations, 64, 16, 1);
    let (before_dir, after_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut before = Logged::new(before_dir.path(), &plan, true)?;
    let mut after = Logged::new(after_dir.path(), &plan, false)?;
    let mut state = RunState::new(plan.clone())?;
    let send = |state: &mut RunState, before: &mut Logged, after: &mut Logged, command: Command| {
        let reply = state.apply(command.clone()).expect("the bench sends valid commands").reply;
        before.note(state, &command, &reply);
        after.note(state, &command, &reply);
        reply
    };
    let workers: Vec<WorkerId> = (0..workers_n).map(|i| WorkerId::new(format!("w-{i:04}"))).collect();
    let mut doing = vec![Doing::Idle; workers_n];
    let mut now = 1_000u64;
    for w in &workers {
        let c =
            Command::RegisterWorker { worker_id: w.clone(), name: w.to_string(), resources: resources(), now_ms: now };
        send(&mut state, &mut before, &mut after, c);
    }
    let started = Instant::now();
    let mut commands = 0u64;
    while state.current_stage().is_some() {
        now += 1_000;
        for (i, w) in workers.iter().enumerate() {
            commands += 1;
            match doing[i] {
                Doing::Idle => match send(
                    &mut state,
                    &mut before,
                    &mut after,
                    Command::LeaseTask { worker_id: w.clone(), now_ms: now },
                ) {
                    Reply::Lease(Lease::Task { task_id, attempt, .. }) => {
                        let secs = if task_id.phase == iro_coordinator::plan::Phase::Eval { 30 } else { 60 };
                        doing[i] = Doing::Working { task: task_id, attempt, until: now + secs * 1_000 };
                    }
                    Reply::Lease(Lease::GangRank { task_id, attempt, .. }) => {
                        doing[i] = Doing::Joining { task: task_id, attempt };
                    }
                    _ => {}
                },
                Doing::Joining { task, attempt } => {
                    let c = Command::JoinGang {
                        worker_id: w.clone(),
                        task_id: task,
                        attempt,
                        endpoint: "rank-0-of-1".into(),
                        now_ms: now,
                    };
                    if let Reply::GangReady { .. } = send(&mut state, &mut before, &mut after, c) {
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
                    let c = Command::CompleteTask { worker_id: w.clone(), task_id: task, attempt, output, now_ms: now };
                    send(&mut state, &mut before, &mut after, c);
                    doing[i] = Doing::Idle;
                }
                Doing::Working { task, attempt, .. } => {
                    if (now / 1_000 + i as u64) % 10 == 0 {
                        let lease = Some(iro_coordinator::state::LeaseRef { task_id: task, attempt });
                        let progress = Progress { done: 1, total: 2 };
                        send(
                            &mut state,
                            &mut before,
                            &mut after,
                            Command::Heartbeat { worker_id: w.clone(), lease, progress, now_ms: now },
                        );
                    } else {
                        commands -= 1;
                    }
                }
            }
        }
        // Idle workers also heartbeat without a lease every 10 s, and the driver ticks every second.
        for (i, w) in workers.iter().enumerate() {
            if matches!(doing[i], Doing::Idle) && (now / 1_000 + i as u64) % 10 == 0 {
                commands += 1;
                let c = Command::Heartbeat {
                    worker_id: w.clone(),
                    lease: None,
                    progress: Progress::default(),
                    now_ms: now,
                };
                send(&mut state, &mut before, &mut after, c);
            }
        }
        commands += 1;
        send(&mut state, &mut before, &mut after, Command::ExpireLeases { now_ms: now });
        before.flush()?;
        after.flush()?;
    }
    let wrote = started.elapsed().as_secs_f64();
    let live = state.durable_digest();
    let (before_entries, after_entries) = (before.entries, after.entries);
    drop((before, after)); // releases the state folders' locks
    let (before_bytes, after_bytes) = (dir_bytes(before_dir.path()), dir_bytes(after_dir.path()));
    let (before_s, before_digest) = restart(before_dir.path(), &plan)?;
    let (after_s, after_digest) = restart(after_dir.path(), &plan)?;
    assert_eq!((before_digest, after_digest), (live, live), "a replay diverged from the live state");
    // A snapshot of the finished state (as the driver takes every `snapshot_every` entries), then the
    // restart from it.
    let mut log = FileLog::open(after_dir.path(), "bench", &plan, CONFIG_SHA)?;
    log.load(&mut |_| Ok(()))?;
    log.begin_snapshot(state.clone())?.run()?;
    drop(log);
    let (snap_s, snap_digest) = restart(after_dir.path(), &plan)?;
    assert_eq!(snap_digest, live, "the restart from the snapshot diverged");
    println!(
        "\nsimulated run: {workers_n} workers, {iterations} iterations of 64 rollout shards (60 s), a train task (300 s), \
         16 eval shards (30 s); {:.0} simulated minutes, {commands} commands ({wrote:.1} s to apply and log both ways)",
        (now - 1_000) as f64 / 60_000.0
    );
    println!("| log | entries | bytes on disk | restart (open + replay) |");
    println!("|---|---|---|---|");
    println!("| every command (before) | {before_entries} | {before_bytes} | {before_s:.3} s |");
    println!("| durable changes only (now) | {after_entries} | {after_bytes} | {after_s:.3} s |");
    println!("| now, after a snapshot | - | {} | {snap_s:.4} s |", dir_bytes(after_dir.path()));
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let polls = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(10_000_000u64);
    idle_polls(polls)?;
    simulated_run()?;
    Ok(())
}
