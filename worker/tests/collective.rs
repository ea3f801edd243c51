//! Collectives on CPU, every rank a thread of this process on loopback ports: the TCP ring's all-reduce,
//! broadcast and barrier are exact for 2 to 4 ranks and awkward lengths; a rank that never joins, dies or
//! stalls makes the others fail within their deadline with an error naming it (never a hang); all-gather and
//! reduce-scatter place every block for 2 and 3 ranks and name a dead rank the same way; and value
//! training on 2 ranks matches 1 rank, also across a rank killed mid-training and a resumed gang.
#[path = "support/value_examples.rs"]
mod value_examples;

use value_examples::examples;

use std::net::TcpListener;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iro_common::config::ValueSharding;
use iro_worker::collective::{AbortSignal, Collective, RingOptions, SingleRank, TcpRing, all_reduce_bucketed};
use iro_worker::train::{
    DataParallel, Progress, StepMemory, TrainReport, ValueExample, ValueInit, ValueTrainConfig, checkpoint,
    train_value, train_value_ranked,
};
use tch::{Device, Kind, Tensor};

fn opts(deadline_ms: u64) -> RingOptions {
    // Tiny segments so even short test tensors stream as several frames per chunk.
    RingOptions { deadline: Duration::from_millis(deadline_ms), segment_bytes: 24 }
}

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpRing::bind("127.0.0.1:0").unwrap()).collect();
    let eps = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    (ls, eps)
}

/// Runs `body(rank, ring-or-join-error)` on `world` threads joined into one ring and returns what each returned.
fn gang<R: Send>(
    world: usize,
    opts: RingOptions,
    body: impl Fn(usize, iro_worker::Result<TcpRing>) -> R + Sync,
) -> Vec<R> {
    let (ls, eps) = listeners(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (eps, body) = (eps.clone(), &body);
                s.spawn(move || body(rank, TcpRing::connect(rank, eps, l, opts)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// Rank r's input: integers (exact in f32, so sums are exact whatever the order) plus a rank-dependent part.
fn input(rank: usize, len: usize, kind: Kind) -> Tensor {
    let v: Vec<f64> = (0..len).map(|i| ((rank + 1) * 1000 + i * 7 % 13) as f64 - 400.0).collect();
    Tensor::from_slice(&v).to_kind(kind)
}

#[test]
fn ring_all_reduce_is_the_sum_for_2_3_4_ranks_and_awkward_lengths() {
    let lengths = [0usize, 1, 2, 3, 5, 17, 1001];
    for world in [2, 3, 4] {
        let results = gang(world, opts(20_000), |rank, ring| {
            let mut ring = ring.unwrap();
            assert_eq!((ring.rank(), ring.world()), (rank, world));
            let mut out = Vec::new();
            for &len in &lengths {
                for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                    let mut t = input(rank, len, kind);
                    ring.all_reduce_sum(&mut t).unwrap();
                    assert_eq!(t.kind(), kind);
                    out.push(values(&t));
                }
            }
            out
        });
        let mut k = 0;
        for &len in &lengths {
            for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                let want = values(&(0..world).map(|r| input(r, len, Kind::Double)).reduce(|a, b| a + b).unwrap());
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got[k], want, "world {world}, len {len}, {kind:?}, rank {rank}");
                }
                k += 1;
            }
        }
    }
}

/// Random floats: the sum depends on the order of additions, but every rank must get the same bits, or the
/// replicas of a data-parallel training would drift apart.
#[test]
fn every_rank_gets_identical_bits_and_the_sum_is_close() {
    let results = gang(3, opts(20_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut t = Tensor::randn([4099], (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
        let mine = t.copy();
        ring.all_reduce_sum(&mut t).unwrap();
        (mine, t)
    });
    let want = results.iter().map(|(m, _)| m.shallow_clone()).reduce(|a, b| a + b).unwrap();
    for (_, got) in &results {
        assert!(got.equal(&results[0].1), "ranks disagree bitwise");
        assert!(got.allclose(&want, 1e-6, 1e-5, false));
    }
}

/// Views that are not contiguous (and 2-D shapes) are reduced through a host copy and written back.
#[test]
fn non_contiguous_tensors_are_reduced_in_place() {
    let results = gang(2, opts(20_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let base = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]) + rank as f64;
        let mut view = base.tr();
        assert!(!view.is_contiguous());
        ring.all_reduce_sum(&mut view).unwrap();
        base
    });
    let want = (Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]) * 2.0) + 1.0;
    for base in results {
        assert!(base.equal(&want), "{base}");
    }
}

#[test]
fn broadcast_copies_the_root_to_every_rank_for_every_root() {
    let world = 3;
    let results = gang(world, opts(20_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut out = Vec::new();
        for root in 0..world {
            for len in [0i64, 1, 37] {
                let mut f = Tensor::full([len], rank as f64 * 10.0 + root as f64, (Kind::Float, Device::Cpu));
                ring.broadcast(&mut f, root).unwrap();
                out.push(values(&f));
                // Any dtype travels as bytes.
                let mut b = Tensor::full([len], (rank * 10 + root) as i64, (Kind::Uint8, Device::Cpu));
                ring.broadcast(&mut b, root).unwrap();
                out.push(values(&b));
            }
        }
        assert!(ring.broadcast(&mut Tensor::zeros([1], (Kind::Float, Device::Cpu)), world).is_err());
        out
    });
    for got in &results {
        let mut k = 0;
        for root in 0..world {
            for len in [0usize, 1, 37] {
                assert_eq!(got[k], vec![root as f64 * 10.0 + root as f64; len]);
                assert_eq!(got[k + 1], vec![(root * 10 + root) as f64; len]);
                k += 2;
            }
        }
    }
}

#[test]
fn barrier_releases_no_rank_before_the_last_one_arrives() {
    let start = Instant::now();
    let times = gang(4, opts(20_000), |rank, ring| {
        let mut ring = ring.unwrap();
        std::thread::sleep(Duration::from_millis(100 * rank as u64));
        let entered = start.elapsed();
        ring.barrier().unwrap();
        (entered, start.elapsed())
    });
    let last_in = times.iter().map(|t| t.0).max().unwrap();
    for (rank, (_, left)) in times.iter().enumerate() {
        assert!(*left >= last_in, "rank {rank} left at {left:?}, before the last rank entered at {last_in:?}");
    }
}

#[test]
fn gang_of_one_is_a_no_op() {
    let mut single = SingleRank;
    let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
    single.all_reduce_sum(&mut t).unwrap();
    single.broadcast(&mut t, 0).unwrap();
    single.barrier().unwrap();
    assert_eq!(values(&t), vec![1.0, 2.0]);
    let l = TcpRing::bind("127.0.0.1:0").unwrap();
    let ep = l.local_addr().unwrap().to_string();
    let mut ring = TcpRing::connect(0, vec![ep], l, opts(1000)).unwrap();
    ring.all_reduce_sum(&mut t).unwrap();
    ring.barrier().unwrap();
    assert_eq!(values(&t), vec![1.0, 2.0]);
}

/// Buckets smaller than some tensors, tensors of two dtypes: every gradient still gets the gang's sum.
#[test]
fn bucketed_all_reduce_sums_every_tensor() {
    let results = gang(3, opts(20_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let ts = vec![
            input(rank, 10, Kind::Float).view([2, 5]),
            input(rank, 3, Kind::Float),
            input(rank, 40, Kind::Float),
            input(rank, 4, Kind::Double),
            input(rank, 1, Kind::Float),
        ];
        all_reduce_bucketed(&mut ring, &ts, 64).unwrap();
        ts.iter().map(values).collect::<Vec<_>>()
    });
    let shapes = [10usize, 3, 40, 4, 1];
    for got in results {
        for (i, len) in shapes.iter().enumerate() {
            let want = values(&(0..3).map(|r| input(r, *len, Kind::Double)).reduce(|a, b| a + b).unwrap());
            assert_eq!(got[i], want, "tensor {i}");
        }
    }
}

/// ZeRO's two halves on their own: every rank's block lands at its rank's offset (all-gather), and each rank
/// keeps exactly its block of the gang's sum (reduce-scatter), for 2 and 3 ranks, empty and one-element blocks,
/// blocks longer than a segment, every summed dtype, and a 2-D output.
#[test]
fn ring_all_gather_and_reduce_scatter_place_every_block() {
    for world in [2, 3] {
        let results = gang(world, opts(20_000), |rank, ring| {
            let mut ring = ring.unwrap();
            let mut out = Vec::new();
            for n in [0usize, 1, 5, 333] {
                for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                    let mine = input(rank, n, kind);
                    let mut gathered = Tensor::full([(world * n) as i64], -7.0, (kind, Device::Cpu));
                    ring.all_gather(&mine, &mut gathered).unwrap();
                    out.push(values(&gathered));
                    let full = input(rank, world * n, kind);
                    let before = values(&full);
                    let mut block = Tensor::zeros([n as i64], (kind, Device::Cpu));
                    ring.reduce_scatter_sum(&full, &mut block).unwrap();
                    assert_eq!(values(&full), before, "reduce_scatter_sum must leave its input alone");
                    out.push(values(&block));
                }
            }
            // Bytes of any dtype gather, into any shape with the right number of elements.
            let mine = Tensor::full([2], rank as i64 + 1, (Kind::Uint8, Device::Cpu));
            let mut grid = Tensor::zeros([world as i64, 2], (Kind::Uint8, Device::Cpu));
            ring.all_gather(&mine, &mut grid).unwrap();
            out.push(values(&grid));
            out
        });
        for (rank, got) in results.iter().enumerate() {
            let mut k = 0;
            for n in [0usize, 1, 5, 333] {
                for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                    let want_gather: Vec<f64> = (0..world).flat_map(|r| values(&input(r, n, Kind::Double))).collect();
                    assert_eq!(got[k], want_gather, "all_gather: world {world}, n {n}, {kind:?}, rank {rank}");
                    let sum = (0..world).map(|r| input(r, world * n, Kind::Double)).reduce(|a, b| a + b).unwrap();
                    let want_block = values(&sum.narrow(0, (rank * n) as i64, n as i64));
                    assert_eq!(got[k + 1], want_block, "reduce_scatter: world {world}, n {n}, {kind:?}, rank {rank}");
                    k += 2;
                }
            }
            let want: Vec<f64> = (0..world).flat_map(|r| [(r + 1) as f64; 2]).collect();
            assert_eq!(got[k], want);
        }
    }
}

/// Sizes that do not fit the gang (an output that is not world × the input) and dtypes the ring cannot sum are
/// refused on the calling rank before anything is sent; a gang of one copies.
#[test]
fn gather_and_scatter_refuse_mismatched_sizes_and_a_gang_of_one_copies() {
    let results = gang(2, opts(5000), |_, ring| {
        let mut ring = ring.unwrap();
        let mut wrong = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let a = ring.all_gather(&Tensor::zeros([3], (Kind::Float, Device::Cpu)), &mut wrong).unwrap_err();
        let b = ring.reduce_scatter_sum(&Tensor::zeros([6], (Kind::Double, Device::Cpu)), &mut wrong).unwrap_err();
        let mut half = Tensor::zeros([2], (Kind::Half, Device::Cpu));
        let c = ring.reduce_scatter_sum(&Tensor::zeros([4], (Kind::Half, Device::Cpu)), &mut half).unwrap_err();
        // The ring is still usable: nothing was sent.
        ring.barrier().unwrap();
        [a, b, c].map(|e| e.to_string())
    });
    for [a, b, c] in results {
        assert!(a.contains("all_gather") && a.contains("5 elements"), "{a}");
        assert!(b.contains("dtype"), "{b}");
        assert!(c.contains("Half"), "{c}");
    }
    let mut single = SingleRank;
    let mut out = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    single.all_gather(&Tensor::from_slice(&[1.0f32, 2.0, 3.0]), &mut out).unwrap();
    assert_eq!(values(&out), vec![1.0, 2.0, 3.0]);
    let mut out = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    single.reduce_scatter_sum(&Tensor::from_slice(&[4.0f32, 5.0]), &mut out).unwrap();
    assert_eq!(values(&out), vec![4.0, 5.0]);
}

/// A rank that dies before an all-gather or a reduce-scatter is named by the others at once, as in the all-reduce.
#[test]
fn a_rank_that_dies_before_a_gather_or_scatter_is_named() {
    for scatter in [false, true] {
        let (world, dead) = (3, 1);
        let results = gang(world, opts(20_000), |rank, ring| {
            let mut ring = ring.unwrap();
            ring.barrier().unwrap();
            if rank == dead {
                return None;
            }
            let start = Instant::now();
            let err = if scatter {
                let mut out = Tensor::zeros([10], (Kind::Float, Device::Cpu));
                ring.reduce_scatter_sum(&input(rank, 30, Kind::Float), &mut out).unwrap_err()
            } else {
                let mut out = Tensor::zeros([30], (Kind::Float, Device::Cpu));
                ring.all_gather(&input(rank, 10, Kind::Float), &mut out).unwrap_err()
            };
            Some((err, start.elapsed()))
        });
        for (err, took) in results.into_iter().flatten() {
            assert_names(&err, dead);
            let op = if scatter { "reduce_scatter_sum(f32)" } else { "all_gather" };
            assert!(err.to_string().contains(op), "{err}");
            assert!(took < Duration::from_secs(5), "took {took:?} to notice: {err}");
        }
    }
}

fn assert_names(err: &iro_worker::Error, culprit: usize) {
    assert_eq!(err.kind(), "collective", "{err}");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(text.contains(&format!("rank {culprit} did not answer")), "does not blame rank {culprit}: {text}");
}

/// A rank that never joins: its port is closed (`bound = false`) or bound but never served. Everyone else fails
/// at the deadline naming it, including ranks two hops away from it, which only hear about it from others.
#[test]
fn a_rank_that_never_joins_is_named_within_the_deadline() {
    for bound in [false, true] {
        let (world, missing, deadline) = (4, 2, 2000);
        let (ls, eps) = listeners(world);
        let start = Instant::now();
        let errs: Vec<(usize, iro_worker::Error, Duration)> = std::thread::scope(|s| {
            let mut handles = Vec::new();
            let mut keep = Vec::new();
            for (rank, l) in ls.into_iter().enumerate() {
                if rank == missing {
                    if bound {
                        keep.push(l);
                    }
                    continue;
                }
                let eps = eps.clone();
                handles.push(s.spawn(move || {
                    let err = TcpRing::connect(rank, eps, l, opts(deadline)).unwrap_err();
                    (rank, err, start.elapsed())
                }));
            }
            let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
            drop(keep);
            out
        });
        assert_eq!(errs.len(), world - 1);
        for (rank, err, took) in errs {
            assert_names(&err, missing);
            assert!(took < Duration::from_millis(deadline + 2000), "rank {rank} (bound {bound}) took {took:?}: {err}");
        }
    }
}

/// A rank that dies (drops its ring) after some calls: the others' next call fails at once, naming it.
#[test]
fn a_rank_that_dies_is_named_without_waiting_for_the_deadline() {
    let (world, dead, deadline) = (3, 2, 20_000);
    let results = gang(world, opts(deadline), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut t = input(rank, 100, Kind::Float);
        ring.all_reduce_sum(&mut t).unwrap();
        if rank == dead {
            return None;
        }
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut t).unwrap_err();
        // The ring stays failed.
        assert!(ring.barrier().is_err());
        Some((err, start.elapsed()))
    });
    for (err, took) in results.into_iter().flatten() {
        assert_names(&err, dead);
        assert!(took < Duration::from_secs(5), "took {took:?} to notice: {err}");
    }
}

/// A rank that is alive but does not make the call (stalled in compute, or a bug): every rank names it at its
/// deadline, not its own innocent upstream neighbour, thanks to the heartbeats travelling the ring.
#[test]
fn a_stalled_rank_is_named_by_every_other_rank() {
    let (world, stalled, deadline) = (4, 1, 2000);
    let results = gang(world, opts(deadline), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut t = input(rank, 50, Kind::Float);
        if rank == stalled {
            std::thread::sleep(Duration::from_millis(deadline + 2000));
            return None;
        }
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut t).unwrap_err();
        Some((rank, err, start.elapsed()))
    });
    for (rank, err, took) in results.into_iter().flatten() {
        assert_names(&err, stalled);
        assert!(took < Duration::from_millis(deadline + 2000), "rank {rank} took {took:?}: {err}");
    }
}

/// Review A9: survivors of an aborted gang, blocked on a rank that died, must be back asking for work before
/// the next gang's join timeout, not at their collective deadline (10 minutes in the GPU overlays). Raising
/// their abort signal (the task loop does when a heartbeat says the lease is gone) stops the call at once,
/// while joining as well as mid-call; raised on one rank only, the ABORT it sends stops the next ones too.
#[test]
fn a_raised_abort_signal_stops_blocked_ranks_long_before_their_deadline() {
    let (world, stalled, deadline) = (3, 2, 60_000);
    let (ls, eps) = listeners(world);
    let signals: Vec<AbortSignal> = (0..world).map(|_| AbortSignal::default()).collect();
    let (blocked_tx, blocked) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let done = std::sync::Mutex::new(done);
    let results: Vec<Option<(usize, iro_worker::Error, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (eps, abort, blocked_tx, done) = (eps.clone(), signals[rank].clone(), blocked_tx.clone(), &done);
                s.spawn(move || {
                    let mut ring = TcpRing::connect_abortable(rank, eps, l, opts(deadline), abort).unwrap();
                    let mut t = input(rank, 100, Kind::Float);
                    ring.all_reduce_sum(&mut t).unwrap();
                    if rank == stalled {
                        // Stuck (a hung GPU, a paused process): no more calls until the others are done.
                        let _ = done.lock().unwrap().recv();
                        return None;
                    }
                    blocked_tx.send(()).unwrap();
                    let start = Instant::now();
                    let err = ring.all_reduce_sum(&mut t).unwrap_err();
                    Some((rank, err, start.elapsed()))
                })
            })
            .collect();
        // Both live ranks are in their second call, which cannot complete without the stalled one.
        for _ in 0..world - 1 {
            blocked.recv().unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        signals[0].raise();
        // The live ranks come back on their own; the stalled one is let go only after them.
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| {
                if rank == stalled {
                    done_tx.send(()).unwrap();
                }
                handle.join().unwrap()
            })
            .collect()
    });
    for (rank, err, took) in results.into_iter().flatten() {
        let text = err.to_string();
        assert_eq!(err.kind(), "collective", "{text}");
        assert!(text.contains("lease on the gang was taken back"), "rank {rank}: {text}");
        assert!(took < Duration::from_secs(5), "rank {rank} took {took:?} of its {deadline} ms deadline: {text}");
    }

    // Joining: rank 1 never comes, and rank 0 stops waiting for it as soon as its signal is raised.
    let (mut ls, eps) = listeners(2);
    let _absent = ls.pop();
    let abort = AbortSignal::default();
    let raise = abort.clone();
    let start = Instant::now();
    let joining = std::thread::spawn(move || TcpRing::connect_abortable(0, eps, ls.remove(0), opts(deadline), abort));
    std::thread::sleep(Duration::from_millis(300));
    raise.raise();
    let err = joining.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("joining") && err.to_string().contains("taken back"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

#[test]
fn ranks_that_disagree_on_the_call_fail_instead_of_mixing_buffers() {
    let results = gang(2, opts(5000), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut t = input(rank, 8, Kind::Float);
        if rank == 0 { ring.broadcast(&mut t, 0) } else { ring.all_reduce_sum(&mut t) }
    });
    let errors: Vec<String> = results.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
    assert!(!errors.is_empty());
    assert!(errors.iter().any(|e| e.contains("disagree")), "{errors:?}");
}

// ---- data-parallel value training --------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// 10 examples in batches of 4 (micro-batches of 2): 3 steps per epoch, the last batch short (2 examples, one
/// micro-batch, so rank 1 of 2 sits it out), 9 steps in 3 epochs.
fn config() -> ValueTrainConfig {
    ValueTrainConfig {
        lr: 1e-3,
        adam_eps: 1e-5,
        weight_decay: 0.01,
        epochs: 3,
        batch_size: 4,
        micro_batch_size: 2,
        checkpoint_every: 4,
        seed: 7,
        pad_id: 0,
        sharding: iro_common::config::ValueSharding::None,
        activation_checkpointing: false,
    }
}

fn init() -> ValueInit {
    ValueInit::Model { dir: fixture("llama_seqcls"), kind: Kind::Float, device: Device::Cpu }
}

type RankOutcome = Result<TrainReport, iro_worker::Error>;

/// Trains on a ring of `world` thread-ranks sharing `out`; rank `stop.0` breaks after step `stop.1`.
fn train_gang(
    world: usize,
    cfg: &ValueTrainConfig,
    data: &[ValueExample],
    out: &Path,
    resume: bool,
    stop: Option<(usize, usize)>,
) -> Vec<RankOutcome> {
    train_gang_in(world, cfg, data, &|_| out.to_owned(), resume, stop, &mut |_, _| {})
}

/// [`train_gang`] with rank r writing under `dir_of(r)` (the same folder for all: a shared filesystem), and
/// `seen(rank, progress)` called after every step.
fn train_gang_in(
    world: usize,
    cfg: &ValueTrainConfig,
    data: &[ValueExample],
    dir_of: &(dyn Fn(usize) -> PathBuf + Sync),
    resume: bool,
    stop: Option<(usize, usize)>,
    seen: &mut (dyn FnMut(usize, &Progress) + Send),
) -> Vec<RankOutcome> {
    let seen = std::sync::Mutex::new(seen);
    gang(world, opts(30_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let init = init();
        // A bucket smaller than the embedding, so gradients span several buckets.
        let gang = DataParallel { collective: &mut ring, bucket_bytes: 16 * 1024 };
        train_value_ranked(cfg, data, &init, &dir_of(rank), resume, gang, |p| {
            let mut seen = seen.lock().unwrap();
            (*seen)(rank, p);
            match stop {
                Some((r, step)) if r == rank && p.step == step => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        })
        // The ring drops here: for the stopped rank, that is its death as the others see it.
    })
}

fn final_weights(out: &Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(checkpoint::latest(out).unwrap().join("model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

fn max_abs_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_ranks_train_the_same_weights_as_one() {
    let (cfg, data) = (config(), examples(10, 5));
    let one = tempfile::tempdir().unwrap();
    let single = train_value(&cfg, &data, &init(), one.path(), false, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(single.steps, 9);

    let two = tempfile::tempdir().unwrap();
    let ranks: Vec<TrainReport> =
        train_gang(2, &cfg, &data, two.path(), false, None).into_iter().map(|r| r.unwrap()).collect();
    for r in &ranks {
        assert_eq!(r.steps, 9);
        assert_eq!(r.checkpoint, ranks[0].checkpoint, "every rank reports rank 0's checkpoint");
        for (a, b) in single.losses.iter().zip(&r.losses) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "global loss {b} vs one rank's {a}");
        }
    }
    let diff = max_abs_diff(&final_weights(one.path()), &final_weights(two.path()));
    assert!(diff <= 1e-5, "max abs weight difference {diff}");
    // Training moved the weights far more than that, so the comparison means something.
    let start = {
        let mut t = Tensor::read_safetensors(fixture("llama_seqcls").join("model.safetensors")).unwrap();
        t.retain(|(n, _)| final_weights(one.path()).iter().any(|(m, _)| m == n));
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert!(max_abs_diff(&start, &final_weights(one.path())) > 1e-3);
}

/// Every batch has a single micro-batch, so rank 1 never computes one: it still defines (zero) gradients, the
/// buckets line up, and the result is the one-rank training's.
#[test]
fn a_rank_without_micro_batches_still_matches() {
    let mut cfg = config();
    cfg.batch_size = 2;
    cfg.epochs = 1;
    let data = examples(6, 9);
    let one = tempfile::tempdir().unwrap();
    train_value(&cfg, &data, &init(), one.path(), false, |_| ControlFlow::Continue(())).unwrap();
    let two = tempfile::tempdir().unwrap();
    for r in train_gang(2, &cfg, &data, two.path(), false, None) {
        assert_eq!(r.unwrap().steps, 3);
    }
    let diff = max_abs_diff(&final_weights(one.path()), &final_weights(two.path()));
    assert!(diff <= 1e-5, "max abs weight difference {diff}");
}

/// Rank 1 stops after step 6 (its progress callback breaks and its ring is dropped, as a killed process's
/// sockets close). Rank 0 fails at its next collective naming rank 1. Both restart with `resume`, from rank 0's
/// checkpoint at step 4, and end with exactly the weights of a gang that was never interrupted.
#[test]
fn a_gang_killed_mid_training_resumes_to_the_uninterrupted_weights() {
    let (cfg, data) = (config(), examples(10, 5));
    let straight = tempfile::tempdir().unwrap();
    let full: Vec<TrainReport> =
        train_gang(2, &cfg, &data, straight.path(), false, None).into_iter().map(|r| r.unwrap()).collect();

    let resumed = tempfile::tempdir().unwrap();
    let killed = train_gang(2, &cfg, &data, resumed.path(), true, Some((1, 6)));
    let err = killed[0].as_ref().unwrap_err();
    assert_names(err, 1);
    assert_eq!(killed[1].as_ref().unwrap().steps, 6);
    assert_eq!(checkpoint::latest(resumed.path()), Some(checkpoint::checkpoint_dir(resumed.path(), 4)));

    let rest: Vec<TrainReport> =
        train_gang(2, &cfg, &data, resumed.path(), true, None).into_iter().map(|r| r.unwrap()).collect();
    for r in &rest {
        assert_eq!((r.steps, r.losses.len()), (9, 9));
        for (a, b) in full[0].losses.iter().zip(&r.losses) {
            assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "losses {:?} vs {:?}", full[0].losses, r.losses);
        }
    }
    let diff = max_abs_diff(&final_weights(straight.path()), &final_weights(resumed.path()));
    assert!(diff <= 1e-6, "max abs weight difference {diff}");
}

/// Ranks handed different data (or seeing different checkpoints) would train different models under one name:
/// every rank refuses at the start, saying what differs.
#[test]
fn ranks_with_different_data_refuse_to_train() {
    let cfg = config();
    let out = tempfile::tempdir().unwrap();
    let results = gang(2, opts(30_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let data = examples(10 - rank, 5);
        let gang = DataParallel { collective: &mut ring, bucket_bytes: 16 * 1024 };
        train_value_ranked(&cfg, &data, &init(), out.path(), false, gang, |_| ControlFlow::Continue(())).map(|_| ())
    });
    for r in results {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), "collective");
        assert!(err.to_string().contains("examples"), "{err}");
    }
    assert!(checkpoint::latest(out.path()).is_none());
}

// ---- sharded (ZeRO-style) value training -------------------------------------------------------------

fn sharded(mode: ValueSharding) -> ValueTrainConfig {
    ValueTrainConfig { sharding: mode, ..config() }
}

/// ZeRO-3 over the TCP ring: R = 2 and R = 3 ranks, each holding 1/R of the weights, gradients and moments
/// (gathered per bucket for the forward, reduce-scattered after the backward; with activation checkpointing per
/// layer, in both passes), end 6 steps later with the weights of one unsharded rank on the same global batches
/// and seed (≤ 1e-5); so does ZeRO-2 (`optimizer`), and plain data parallelism with checkpointing. The short
/// last batch of each epoch has one micro-batch, so there the other ranks contribute zeros; the buckets (16 KiB,
/// or one per layer) do not divide by R, so they are padded.
#[test]
fn full_sharding_on_2_and_3_ranks_trains_the_weights_of_one_rank() {
    let data = examples(10, 5);
    // Batches of 8 in micro-batches of 2: each rank sums several micro-batches' gradients before the
    // reduce-scatter, so the gang adds them in another order than one rank does (not bit-identical).
    let base = ValueTrainConfig { batch_size: 8, ..config() };
    let one = tempfile::tempdir().unwrap();
    let single = train_value(&base, &data, &init(), one.path(), false, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(single.steps, 6);
    let start = {
        let mut t = Tensor::read_safetensors(fixture("llama_seqcls").join("model.safetensors")).unwrap();
        t.retain(|(n, _)| final_weights(one.path()).iter().any(|(m, _)| m == n));
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    assert!(max_abs_diff(&start, &final_weights(one.path())) > 1e-3, "training must move the weights");
    use ValueSharding::{Full, None as Replicated, Optimizer};
    let cases = [
        (2, Full, false),
        (3, Full, false),
        (2, Optimizer, false),
        // Checkpointed: ZeRO-3's per-layer gather and reduce-scatter, and plain data parallelism recomputing.
        (2, Full, true),
        (3, Full, true),
        (2, Optimizer, true),
        (2, Replicated, true),
    ];
    for (world, mode, checkpointing) in cases {
        let out = tempfile::tempdir().unwrap();
        let cfg = ValueTrainConfig { sharding: mode, activation_checkpointing: checkpointing, ..base.clone() };
        let ranks = train_gang(world, &cfg, &data, out.path(), false, None);
        for r in ranks {
            let r = r.unwrap();
            assert_eq!(r.steps, 6);
            for (a, b) in single.losses.iter().zip(&r.losses) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{mode:?} R={world} {checkpointing}: loss {b} vs {a}"
                );
            }
        }
        // The published checkpoint is the gathered whole model, an HF folder like the unsharded one's.
        let diff = max_abs_diff(&final_weights(one.path()), &final_weights(out.path()));
        eprintln!(
            "{mode:?} R={world} checkpointing {checkpointing}: max abs weight difference to one rank: {diff:.2e}"
        );
        assert!(diff <= 1e-5, "{mode:?} R={world} checkpointing {checkpointing}: max abs weight difference {diff}");
        let ck = checkpoint::latest(out.path()).unwrap();
        if mode != Replicated {
            for rank in 0..world {
                assert!(ck.join(checkpoint::shard_file(rank, world)).exists(), "shard of rank {rank} in {ck:?}");
            }
            assert!(!ck.join("train_state.safetensors").exists());
        }
    }
}

/// At the step, a rank holds P params' 16 bytes each without sharding, 4 + 12/R with `optimizer`, 16/R with
/// `full` (up to the padding of each bucket to a multiple of R).
#[test]
fn sharding_divides_what_a_rank_holds_at_the_step() {
    let (mut cfg, data) = (config(), examples(10, 5));
    cfg.epochs = 1;
    cfg.checkpoint_every = 0;
    let params: u64 = {
        let init = init();
        let ValueInit::Model { dir, kind, device } = &init else { unreachable!() };
        let v = iro_worker::train::TrainableValue::model_from_dir(dir, *kind, *device, 0).unwrap();
        v.params().iter().map(|p| p.numel() as u64).sum()
    };
    for world in [2usize, 3] {
        for mode in [ValueSharding::None, ValueSharding::Optimizer, ValueSharding::Full] {
            let out = tempfile::tempdir().unwrap();
            let mut seen: Vec<StepMemory> = Vec::new();
            let cfg = ValueTrainConfig { sharding: mode, ..cfg.clone() };
            let results = train_gang_in(world, &cfg, &data, &|_| out.path().to_owned(), false, None, &mut |rank, p| {
                if rank == 0 {
                    seen.push(p.memory);
                }
            });
            results.into_iter().for_each(|r| assert_eq!(r.unwrap().steps, 3));
            let m = seen[seen.len() - 1];
            let p4 = 4.0 * params as f64;
            let r = world as f64;
            let (want_params, want_grads, want_opt) = match mode {
                ValueSharding::None => (p4, p4, 2.0 * p4),
                ValueSharding::Optimizer => (p4, p4 / r, 2.0 * p4 / r),
                ValueSharding::Full => (p4 / r, p4 / r, 2.0 * p4 / r),
            };
            // Padding adds fewer than R elements per bucket (a few hundred bytes here).
            for (what, got, want) in [
                ("params", m.params, want_params),
                ("grads", m.grads, want_grads),
                ("optimizer", m.optimizer, want_opt),
            ] {
                let got = got as f64;
                assert!(got >= want && got <= want * 1.01 + 1024.0, "{mode:?} R={world} {what}: {got} vs {want}");
            }
        }
    }
}

/// Full sharding, rank 1 killed after step 6: the gang resumes from the sharded checkpoint of step 4 (every rank
/// its own shard) to exactly the weights of an uninterrupted sharded run, with the ranks sharing one folder and
/// with each rank writing to a folder of its own (no shared filesystem).
#[test]
fn a_sharded_gang_killed_mid_training_resumes_to_the_uninterrupted_weights() {
    let (cfg, data) = (sharded(ValueSharding::Full), examples(10, 5));
    let straight = tempfile::tempdir().unwrap();
    train_gang(2, &cfg, &data, straight.path(), false, None).into_iter().for_each(|r| assert_eq!(r.unwrap().steps, 9));
    for shared in [true, false] {
        let resumed = tempfile::tempdir().unwrap();
        let root = resumed.path().to_owned();
        let dir_of = move |rank: usize| if shared { root.clone() } else { root.join(format!("rank-{rank}")) };
        let killed = train_gang_in(2, &cfg, &data, &dir_of, true, Some((1, 6)), &mut |_, _| {});
        assert_names(killed[0].as_ref().unwrap_err(), 1);
        for rank in 0..2 {
            let ck = checkpoint::checkpoint_dir(&dir_of(rank), 4);
            assert_eq!(checkpoint::latest(&dir_of(rank)), Some(ck.clone()), "shared {shared}, rank {rank}");
            assert!(ck.join(checkpoint::shard_file(rank, 2)).exists(), "shared {shared}, rank {rank}");
        }
        let rest = train_gang_in(2, &cfg, &data, &dir_of, true, None, &mut |_, _| {});
        for r in rest {
            let r = r.unwrap();
            assert_eq!((r.steps, r.losses.len()), (9, 9));
        }
        let diff = max_abs_diff(&final_weights(straight.path()), &final_weights(&dir_of(0)));
        assert!(diff <= 1e-6, "shared {shared}: max abs weight difference {diff}");
    }
}

/// A sharded checkpoint holds R shard files: a gang of another size, or one that does not shard the same way,
/// is refused with an error naming both, before any rank trains.
#[test]
fn a_sharded_checkpoint_refuses_another_number_of_ranks_or_sharding() {
    let (cfg, data) = (sharded(ValueSharding::Full), examples(10, 5));
    let out = tempfile::tempdir().unwrap();
    let killed = train_gang(2, &cfg, &data, out.path(), true, Some((0, 5)));
    assert_eq!(killed[0].as_ref().unwrap().steps, 5);
    for r in train_gang(3, &cfg, &data, out.path(), true, None) {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), "checkpoint", "{err}");
        let text = err.to_string();
        assert!(text.contains("R = 2") && text.contains("R = 3"), "{text}");
    }
    for r in train_gang(2, &sharded(ValueSharding::None), &data, out.path(), true, None) {
        let text = r.unwrap_err().to_string();
        assert!(text.contains("value.sharding") && text.contains("\"full\"") && text.contains("\"none\""), "{text}");
    }
    // Nothing was overwritten: the same gang still resumes.
    for r in train_gang(2, &cfg, &data, out.path(), true, None) {
        assert_eq!(r.unwrap().steps, 9);
    }
}

/// bf16 mixed precision under full sharding: bf16 weights gathered from f32 master shards, gradients summed in
/// f32, AdamW on the f32 shards. R = 2 stays within one bf16 rounding step of one bf16 rank (which accumulates
/// its micro-batches' gradients in bf16 `.grad`s instead), and the published model is bf16.
#[test]
fn bf16_full_sharding_tracks_one_bf16_rank() {
    let data = examples(10, 5);
    let cfg = ValueTrainConfig { batch_size: 8, sharding: ValueSharding::Full, ..config() };
    let bf16 = || ValueInit::Model { dir: fixture("llama_seqcls"), kind: Kind::BFloat16, device: Device::Cpu };
    let one = tempfile::tempdir().unwrap();
    let single = ValueTrainConfig { sharding: ValueSharding::None, ..cfg.clone() };
    train_value(&single, &data, &bf16(), one.path(), false, |_| ControlFlow::Continue(())).unwrap();
    let two = tempfile::tempdir().unwrap();
    let ranks = gang(2, opts(30_000), |_, ring| {
        let mut ring = ring.unwrap();
        let gang = DataParallel { collective: &mut ring, bucket_bytes: 16 * 1024 };
        train_value_ranked(&cfg, &data, &bf16(), two.path(), false, gang, |_| ControlFlow::Continue(()))
    });
    ranks.into_iter().for_each(|r| assert_eq!(r.unwrap().steps, 6));
    let (a, b) = (final_weights(one.path()), final_weights(two.path()));
    assert!(b.iter().all(|(_, t)| t.kind() == Kind::BFloat16));
    let to_f32 =
        |w: &[(String, Tensor)]| w.iter().map(|(n, t)| (n.clone(), t.to_kind(Kind::Float))).collect::<Vec<_>>();
    let diff = max_abs_diff(&to_f32(&a), &to_f32(&b));
    eprintln!("bf16: full sharding R=2 vs one bf16 rank, max abs weight difference {diff:.2e}");
    // One bf16 step at 1.0 (the norms' weights sit there): the two may round a weight to neighbouring values.
    let ulp = 2f64.powi(-7);
    assert!(diff <= ulp, "max abs weight difference {diff}");
}
