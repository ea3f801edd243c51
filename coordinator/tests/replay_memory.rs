//! Review A4: loading the command log streams it, so the memory a restart needs is bounded by the run
//! state and one record, not by the length of the history. A counting allocator (this test binary's
//! own, hence a file of its own with a single test) measures the peak heap during `load`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use iro_coordinator::driver::log::Recovered;
use iro_coordinator::driver::{CommandLog, FileLog};
use iro_coordinator::state::{Command, Plan, RunState};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts the bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is `System.alloc`'s.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn plan() -> Plan {
    Plan::new(1, 3, 1, 1)
}

/// Writes `entries` ExpireLeases entries (they leave the state's size alone) in batches of 5 000 (few
/// fsyncs, so the test stays quick on a real disk), then returns the log file's size and the peak
/// heap growth while loading and replaying it.
fn peak_while_loading(entries: u64) -> (u64, usize) {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = FileLog::open(dir.path(), "mem", &plan(), "hash").unwrap();
        log.load(&mut |_| Ok(())).unwrap();
        let batch: Vec<Command> = (0..5_000).map(|i| Command::ExpireLeases { now_ms: 1_000_000 + i }).collect();
        for _ in 0..entries / 5_000 {
            log.append(&batch).unwrap();
        }
    }
    let bytes: u64 =
        std::fs::read_dir(dir.path().join("wal")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    let mut log = FileLog::open(dir.path(), "mem", &plan(), "hash").unwrap();
    let mut state = RunState::new(plan()).unwrap();
    let mut applied = 0u64;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    log.load(&mut |item| {
        if let Recovered::Entry { command, .. } = item {
            let _ = state.apply(command);
            applied += 1;
        }
        Ok(())
    })
    .unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    assert_eq!(applied, entries);
    (bytes, peak)
}

#[test]
fn replaying_200k_entries_needs_no_more_memory_than_replaying_20k() {
    let (small_bytes, small_peak) = peak_while_loading(20_000);
    let (big_bytes, big_peak) = peak_while_loading(200_000);
    eprintln!("log {small_bytes} B: peak {small_peak} B; log {big_bytes} B: peak {big_peak} B");
    assert!(big_bytes > 9 * small_bytes);
    // Reading the whole file (the old `read_to_end`) would need at least the file's size.
    assert!(big_peak < big_bytes as usize / 8, "{big_peak} B to load a {big_bytes} B log");
    assert!(big_peak < 2 * small_peak + (64 << 10), "{big_peak} B vs {small_peak} B for a tenth of the history");
}
