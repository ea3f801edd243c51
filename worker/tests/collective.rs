//! Collectives on CPU, every rank a thread of this process on loopback ports: the TCP ring's all-reduce,
//! broadcast and barrier are exact for 2 to 4 ranks and awkward lengths; a rank that never joins, dies or
//! stalls makes the others fail within their deadline with an error naming it (never a hang); and value
//! training on 2 ranks matches 1 rank, also across a rank killed mid-training and a resumed gang.
#[path = "support/value_examples.rs"]
mod value_examples;

use value_examples::examples;

use std::net::TcpListener;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use iro_worker::collective::{AbortSignal, Collective, RingOptions, SingleRank, TcpRing, all_reduce_bucketed};
use iro_worker::train::{
    DataParallel, TrainReport, ValueExample, ValueInit, ValueTrainConfig, checkpoint, train_value, train_value_ranked,
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
    gang(world, opts(30_000), |rank, ring| {
        let mut ring = ring.unwrap();
        let init = init();
        // A bucket smaller than the embedding, so gradients span several buckets.
        let gang = DataParallel { collective: &mut ring, bucket_bytes: 16 * 1024 };
        train_value_ranked(cfg, data, &init, out, resume, gang, |p| match stop {
            Some((r, step)) if r == rank && p.step == step => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
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
