//! The CPU collective: ring all-reduce over TCP (reduce-scatter, then all-gather), the backend for workers
//! without GPUs and the one the data-parallel tests run on.
//!
//! Topology: rank r opens one connection to rank r+1 (its *next*) and accepts one from rank r-1 (its *prev*);
//! data only ever flows prev → r → next. A reader thread drains the prev connection continuously, so a rank
//! that is busy sending never stops its upstream neighbour from sending too (no deadlock on full socket
//! buffers), and the main thread interleaves writing its own frames with folding in what has arrived.
//!
//! Wire format: every frame is a 40-byte little-endian header (kind, op, call number, step, aux, the call's
//! total byte count, payload length) and a payload. Tensor payloads are the tensor's memory as is
//! (little-endian; see the compile-time check below). A chunk streams as frames of at most
//! `segment_bytes`, so a large buffer is reduced while the rest of it is still on the wire, and no rank
//! holds more than about a chunk in flight.
//!
//! Failure: a rank that detects a problem sends an ABORT frame downstream before closing, and every rank that
//! receives one forwards it and fails with the same blame, so the whole gang fails together and names the same
//! ranks. A rank waiting for data sends heartbeats downstream saying whom *it* is waiting for, so a rank deep
//! in the ring whose deadline passes blames the rank that actually stopped answering, not its innocent
//! neighbour.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{ABORTED, AbortSignal, Collective, DEFAULT_DEADLINE, check_blocks, check_rank, name_ranks};
use crate::error::{Error, Result};

// Payloads are tensor memory sent without conversion and declared little-endian on the wire.
#[cfg(not(target_endian = "little"))]
compile_error!("the TCP ring sends tensor memory as is, which is only little-endian on little-endian machines");

/// Knobs of a [`TcpRing`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingOptions {
    /// The longest any one call may take at this rank (construction included) before it fails naming the
    /// ranks that did not answer.
    pub deadline: Duration,
    /// Payload bytes per frame: the unit in which a chunk streams and is folded in while the rest arrives.
    pub segment_bytes: usize,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self { deadline: DEFAULT_DEADLINE, segment_bytes: 1 << 20 }
    }
}

impl RingOptions {
    /// The deadline from `[cluster] collective_deadline_s`, the default segment size.
    pub fn from_cluster(cluster: &iro_common::config::ClusterSection) -> Self {
        Self { deadline: Duration::from_secs(cluster.collective_deadline_s), ..Self::default() }
    }

    /// Heartbeat period and socket poll interval: small against the deadline so blame can travel the ring
    /// before any deadline passes, but not so small that idle waiting costs CPU.
    fn tick(&self) -> Duration {
        (self.deadline / 8).clamp(Duration::from_millis(5), Duration::from_millis(500))
    }
}

const HEADER_BYTES: usize = 40;
const HELLO_BYTES: usize = 16;
const MAGIC: u32 = u32::from_le_bytes(*b"IROR");
const PROTOCOL: u32 = 1;
/// A frame longer than this is not from a ring peer (or the stream is corrupt): refuse rather than allocate it.
const MAX_PAYLOAD: u64 = 1 << 30;
/// `aux` of a heartbeat that names no suspect.
const NO_RANK: u32 = u32::MAX;

const KIND_HELLO: u32 = 1;
const KIND_DATA: u32 = 2;
const KIND_HEARTBEAT: u32 = 3;
const KIND_ABORT: u32 = 4;

/// Which collective a DATA frame belongs to: ranks that disagree on the sequence of calls are caught at the
/// first frame instead of summing unrelated buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    SumF32 = 1,
    SumF64 = 2,
    SumI64 = 3,
    Broadcast = 4,
    Barrier = 5,
    /// Any dtype: blocks travel as raw bytes.
    AllGather = 6,
    ReduceScatterF32 = 7,
    ReduceScatterF64 = 8,
    ReduceScatterI64 = 9,
}

fn op_name(op: u32) -> &'static str {
    match op {
        1 => "all_reduce_sum(f32)",
        2 => "all_reduce_sum(f64)",
        3 => "all_reduce_sum(i64)",
        4 => "broadcast",
        5 => "barrier",
        6 => "all_gather",
        7 => "reduce_scatter_sum(f32)",
        8 => "reduce_scatter_sum(f64)",
        9 => "reduce_scatter_sum(i64)",
        _ => "an unknown collective",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u32,
    op: u32,
    /// Call number: 0 is the join barrier of construction, then 1, 2, ... per call.
    seq: u64,
    step: u32,
    /// Broadcast: the root. Heartbeat: the rank the sender waits on. Otherwise 0.
    aux: u32,
    /// Bytes of the whole tensor of the call (all ranks must pass the same size).
    total: u64,
    len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.op.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.step.to_le_bytes());
        b[20..24].copy_from_slice(&self.aux.to_le_bytes());
        b[24..32].copy_from_slice(&self.total.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        Self {
            kind: u32_at(0),
            op: u32_at(4),
            seq: u64_at(8),
            step: u32_at(16),
            aux: u32_at(20),
            total: u64_at(24),
            len: u64_at(32),
        }
    }

    fn control(kind: u32, seq: u64, aux: u32, len: usize) -> Self {
        Self { kind, op: 0, seq, step: 0, aux, total: 0, len: len as u64 }
    }
}

/// What the reader thread hands the main thread.
enum Incoming {
    Data {
        header: Header,
        payload: Vec<u8>,
    },
    Abort(Failure),
    /// The prev connection ended (EOF, error, or garbage); the string says how.
    Closed(String),
}

/// The last heartbeat from prev: when, in which call, and whom prev was waiting on.
#[derive(Debug, Clone, Copy)]
struct Beat {
    at: Instant,
    seq: u64,
    suspect: Option<usize>,
}

/// Why a call failed: the ranks blamed, what happened, and the rank that first saw it when it was relayed.
#[derive(Debug, Clone)]
struct Failure {
    ranks: Vec<usize>,
    detail: String,
    origin: Option<usize>,
}

impl Failure {
    fn blame(rank: usize, detail: String) -> Self {
        Self { ranks: vec![rank], detail, origin: None }
    }

    /// This rank stops on its `AbortSignal`; nobody is to blame.
    fn aborted() -> Self {
        Self { ranks: Vec::new(), detail: ABORTED.to_owned(), origin: None }
    }

    fn encode_abort(&self, reporter: usize) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 4 * self.ranks.len() + self.detail.len());
        b.extend_from_slice(&(self.origin.unwrap_or(reporter) as u32).to_le_bytes());
        b.extend_from_slice(&(self.ranks.len() as u32).to_le_bytes());
        for r in &self.ranks {
            b.extend_from_slice(&(*r as u32).to_le_bytes());
        }
        b.extend_from_slice(self.detail.as_bytes());
        b
    }

    fn decode_abort(b: &[u8]) -> Option<Self> {
        let u32_at = |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()) as usize);
        let origin = u32_at(0)?;
        let count = u32_at(4)?;
        let ranks: Vec<usize> = (0..count).map(|i| u32_at(8 + 4 * i)).collect::<Option<_>>()?;
        let detail = String::from_utf8_lossy(b.get(8 + 4 * count..)?).into_owned();
        Some(Self { ranks, detail, origin: Some(origin) })
    }
}

/// One call in progress at this rank.
struct Call {
    op: Op,
    seq: u64,
    aux: u32,
    total: u64,
    deadline: Instant,
}

/// A ring member. Construct with [`TcpRing::connect`]; see the module docs for the protocol.
pub struct TcpRing {
    rank: usize,
    world: usize,
    opts: RingOptions,
    /// Calls made so far (the join barrier is call 0).
    seq: u64,
    /// Set by the first failure; every later call fails with it (a ring never recovers in place).
    failed: Option<String>,
    /// None for a gang of one, which needs no sockets.
    links: Option<Links>,
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing").field("rank", &self.rank).field("world", &self.world).finish_non_exhaustive()
    }
}

impl TcpRing {
    /// Binds this rank's listener (`host:port`, port 0 for any free one). Its `local_addr()` is the endpoint
    /// the coordinator publishes to the other ranks; binding before the exchange means a peer that connects
    /// early is queued by the kernel instead of refused.
    pub fn bind(addr: &str) -> Result<TcpListener> {
        TcpListener::bind(addr).map_err(|e| Error::Collective(format!("tcp ring: cannot listen on {addr}: {e}")))
    }

    /// Joins the ring as `rank` of `endpoints.len()`: connects to rank+1's endpoint, accepts rank-1's
    /// connection on `listener` (bound to `endpoints[rank]`), then runs a barrier, so a returned ring is
    /// complete on every rank. Fails within `opts.deadline`, naming the ranks that did not join.
    pub fn connect(rank: usize, endpoints: Vec<String>, listener: TcpListener, opts: RingOptions) -> Result<Self> {
        Self::connect_abortable(rank, endpoints, listener, opts, AbortSignal::default())
    }

    /// `connect`, with every call (joining included) failing at its next tick once `abort` is raised, instead
    /// of at its deadline; the ABORT frame this rank then sends downstream stops the others as quickly.
    pub fn connect_abortable(
        rank: usize,
        endpoints: Vec<String>,
        listener: TcpListener,
        opts: RingOptions,
        abort: AbortSignal,
    ) -> Result<Self> {
        let world = endpoints.len();
        check_rank("tcp ring", rank, world)?;
        if opts.deadline.is_zero() || !(8..=MAX_PAYLOAD as usize).contains(&opts.segment_bytes) {
            return Err(Error::Collective(format!(
                "tcp ring: deadline {:?} must be > 0 and segment_bytes {} within 8..={MAX_PAYLOAD}",
                opts.deadline, opts.segment_bytes
            )));
        }
        let mut ring = Self { rank, world, opts, seq: 0, failed: None, links: None };
        if world == 1 {
            return Ok(ring);
        }
        let started = Instant::now();
        let deadline = started + opts.deadline;
        let links = Links::establish(rank, &endpoints, listener, opts, deadline, abort)?;
        ring.links = Some(links);
        // The join barrier: each rank has only seen its two neighbours so far.
        let call = Call { op: Op::Barrier, seq: 0, aux: 0, total: 0, deadline };
        let links = ring.links.as_mut().unwrap();
        if let Err(f) = links.barrier(&call) {
            return Err(ring.fail(&call, f));
        }
        tracing::debug!(rank, world, elapsed_ms = started.elapsed().as_millis() as u64, "tcp ring joined");
        Ok(ring)
    }

    fn context(&self, call: &Call) -> String {
        let (rank, world) = (self.rank, self.world);
        if call.seq == 0 {
            return format!("tcp ring rank {rank}/{world} joining");
        }
        format!("tcp ring rank {rank}/{world} {} (call {})", op_name(call.op as u32), call.seq)
    }

    /// Turns a failure into the error every rank reports, tells the next rank, and closes the ring.
    fn fail(&mut self, call: &Call, f: Failure) -> Error {
        let who = if f.ranks.is_empty() { String::new() } else { format!("{} did not answer: ", name_ranks(&f.ranks)) };
        let from = match f.origin {
            Some(o) if o != self.rank => format!(" (reported by rank {o})"),
            _ => String::new(),
        };
        let message = format!("{}: {who}{}{from}", self.context(call), f.detail);
        if let Some(links) = self.links.as_mut() {
            links.abort(call.seq, &f);
        }
        tracing::warn!(rank = self.rank, world = self.world, "{message}");
        self.failed = Some(message.clone());
        Error::Collective(message)
    }

    /// Runs one call: numbers it, gives it its deadline, and turns a failure into the gang-wide error.
    fn run(
        &mut self,
        op: Op,
        aux: u32,
        total: u64,
        body: impl FnOnce(&mut Links, &Call) -> std::result::Result<(), Failure>,
    ) -> Result<()> {
        if let Some(m) = &self.failed {
            return Err(Error::Collective(format!(
                "tcp ring rank {}/{}: unusable after an earlier failure: {m}",
                self.rank, self.world
            )));
        }
        self.seq += 1;
        let call = Call { op, seq: self.seq, aux, total, deadline: Instant::now() + self.opts.deadline };
        let links = self.links.as_mut().expect("a ring of more than one rank has links");
        match body(links, &call) {
            Ok(()) => Ok(()),
            Err(f) => Err(self.fail(&call, f)),
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let op = match t.kind() {
            Kind::Float => Op::SumF32,
            Kind::Double => Op::SumF64,
            Kind::Int64 => Op::SumI64,
            k => {
                return Err(Error::Collective(format!(
                    "tcp ring all_reduce_sum: dtype {k:?} is not supported (f32, f64, i64)"
                )));
            }
        };
        if self.world == 1 {
            return Ok(());
        }
        let total = tensor_bytes(t);
        self.run(op, 0, total, |links, call| {
            on_host(t, |host| match op {
                // SAFETY (all three): `host` is a contiguous CPU tensor of exactly this dtype (matched above),
                // borrowed mutably for the whole call, so nothing else touches its memory meanwhile.
                Op::SumF32 => links.all_reduce(call, unsafe { host_slice::<f32>(host) }),
                Op::SumF64 => links.all_reduce(call, unsafe { host_slice::<f64>(host) }),
                _ => links.all_reduce(call, unsafe { host_slice::<i64>(host) }),
            })
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Collective(format!(
                "tcp ring broadcast: root {root} is not a rank of a gang of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        let total = tensor_bytes(t);
        self.run(Op::Broadcast, root as u32, total, |links, call| {
            // SAFETY: a contiguous CPU tensor viewed as its raw bytes (any dtype), borrowed mutably for the call.
            on_host(t, |host| links.broadcast(call, unsafe { host_slice::<u8>(host) }, root))
        })
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.run(Op::Barrier, 0, 0, |links, call| links.barrier(call))
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("tcp ring all_gather", self.world, input, output)?;
        let (rank, n) = (self.rank as i64, input.numel() as i64);
        let place_own = |host: &mut Tensor| {
            tch::no_grad(|| host.view([-1]).narrow(0, rank * n, n).copy_(&input.reshape([-1])));
        };
        if self.world == 1 {
            tch::no_grad(|| output.copy_(&input.reshape(output.size())));
            return Ok(());
        }
        let total = tensor_bytes(output);
        self.run(Op::AllGather, 0, total, |links, call| {
            on_host(output, |host| {
                place_own(host);
                // SAFETY: a contiguous CPU tensor viewed as its raw bytes (any dtype), borrowed mutably for the call.
                links.all_gather(call, unsafe { host_slice::<u8>(host) })
            })
        })
    }

    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("tcp ring reduce_scatter_sum", self.world, output, input)?;
        let op = match input.kind() {
            Kind::Float => Op::ReduceScatterF32,
            Kind::Double => Op::ReduceScatterF64,
            Kind::Int64 => Op::ReduceScatterI64,
            k => {
                return Err(Error::Collective(format!(
                    "tcp ring reduce_scatter_sum: dtype {k:?} is not supported (f32, f64, i64)"
                )));
            }
        };
        let (rank, n) = (self.rank as i64, output.numel() as i64);
        // The partial sums accumulate in a private copy: `input` stays as the caller passed it.
        let mut scratch = tch::no_grad(|| input.detach().reshape([-1]).to_device(Device::Cpu).copy());
        if self.world > 1 {
            let total = tensor_bytes(input);
            self.run(op, 0, total, |links, call| {
                // SAFETY (all three): `scratch` is a fresh contiguous CPU tensor of exactly this dtype (matched
                // above), owned by this call.
                match op {
                    Op::ReduceScatterF32 => links.reduce_scatter(call, unsafe { host_slice::<f32>(&mut scratch) }),
                    Op::ReduceScatterF64 => links.reduce_scatter(call, unsafe { host_slice::<f64>(&mut scratch) }),
                    _ => links.reduce_scatter(call, unsafe { host_slice::<i64>(&mut scratch) }),
                }
            })?;
        }
        let mine = scratch.narrow(0, rank * n, n).to_device(output.device());
        tch::no_grad(|| output.copy_(&mine.view(output.size().as_slice())));
        Ok(())
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Runs `f` on `t`'s elements in contiguous host memory: `t`'s own memory when it is a contiguous CPU tensor
/// (the common case, no copy), otherwise a host copy that is written back only if `f` succeeds.
fn on_host(
    t: &mut Tensor,
    f: impl FnOnce(&mut Tensor) -> std::result::Result<(), Failure>,
) -> std::result::Result<(), Failure> {
    if t.device() == Device::Cpu && t.is_contiguous() {
        return f(t);
    }
    let mut host = t.to_device(Device::Cpu).contiguous();
    f(&mut host)?;
    tch::no_grad(|| t.copy_(&host));
    Ok(())
}

/// The elements of a contiguous CPU tensor as a slice of `T` (`u8` for its raw bytes).
///
/// # Safety
/// `t` must be contiguous, on the CPU, and hold `T`s (or `T = u8`, any dtype); nothing else may access its
/// memory while the slice lives.
unsafe fn host_slice<T>(t: &mut Tensor) -> &mut [T] {
    let len = t.numel() * t.kind().elt_size_in_bytes() / std::mem::size_of::<T>();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: the caller guarantees the layout; `data_ptr` points at the first element (storage offset
    // included) and libtorch allocates CPU memory aligned for every dtype.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<T>(), len) }
}

/// Element types the ring sums. `add_le` folds little-endian wire bytes into `dst`.
trait Elem: Copy + 'static {
    fn add_le(dst: &mut [Self], src: &[u8]);
}

impl Elem for f32 {
    fn add_le(dst: &mut [Self], src: &[u8]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d += f32::from_le_bytes(s.try_into().unwrap());
        }
    }
}

impl Elem for f64 {
    fn add_le(dst: &mut [Self], src: &[u8]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
            *d += f64::from_le_bytes(s.try_into().unwrap());
        }
    }
}

/// Raw bytes, for the collectives that only copy (all-gather): they never add, but `step` is generic.
impl Elem for u8 {
    fn add_le(dst: &mut [Self], src: &[u8]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = d.wrapping_add(*s);
        }
    }
}

impl Elem for i64 {
    fn add_le(dst: &mut [Self], src: &[u8]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
            *d = d.wrapping_add(i64::from_le_bytes(s.try_into().unwrap()));
        }
    }
}

fn as_bytes<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: f32/f64/i64 have no padding and every byte of them is initialised; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; moreover every bit pattern is a valid f32/f64/i64, so writing bytes is sound.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The ring's connections and the protocol on them.
struct Links {
    rank: usize,
    world: usize,
    opts: RingOptions,
    next: TcpStream,
    /// A handle on the prev connection, kept to shut it down (which ends the reader thread).
    prev: TcpStream,
    incoming: Receiver<Incoming>,
    /// Messages taken off `incoming` while looking for an ABORT, not yet consumed.
    pending: VecDeque<Incoming>,
    upstream: Arc<Mutex<Option<Beat>>>,
    reader: Option<JoinHandle<()>>,
    last_beat: Option<Instant>,
    abort: AbortSignal,
}

/// FNV-1a of the endpoint list: a connection from a different gang that reuses a port is refused.
fn gang_id(endpoints: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in endpoints.join("\n").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn resolve(endpoint: &str) -> std::result::Result<SocketAddr, String> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{endpoint}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{endpoint}` resolves to no address"))
}

impl Links {
    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn tick(&self) -> Duration {
        self.opts.tick()
    }

    /// Connects to next and accepts prev, polling both so neither waits on the other, until `deadline`.
    fn establish(
        rank: usize,
        endpoints: &[String],
        listener: TcpListener,
        opts: RingOptions,
        deadline: Instant,
        abort: AbortSignal,
    ) -> Result<Self> {
        let world = endpoints.len();
        let (next_rank, prev_rank) = ((rank + 1) % world, (rank + world - 1) % world);
        let tick = opts.tick();
        let ctx = format!("tcp ring rank {rank}/{world} joining");
        let gang = gang_id(endpoints);
        let next_addr = resolve(&endpoints[next_rank]).map_err(|e| Error::Collective(format!("{ctx}: {e}")))?;
        let own = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| endpoints[rank].clone());
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Collective(format!("{ctx}: cannot poll the listener {own}: {e}")))?;

        let mut next: Option<TcpStream> = None;
        let mut prev: Option<TcpStream> = None;
        let mut connect_error = String::from("not tried");
        let mut last_beat: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if next.is_none() {
                let wait = tick.min(deadline.saturating_duration_since(now)).max(Duration::from_millis(1));
                match TcpStream::connect_timeout(&next_addr, wait).and_then(|s| {
                    s.set_nodelay(true)?;
                    s.set_write_timeout(Some(tick))?;
                    let mut hello = Header::control(KIND_HELLO, gang, 0, HELLO_BYTES).encode().to_vec();
                    for v in [MAGIC, PROTOCOL, rank as u32, world as u32] {
                        hello.extend_from_slice(&v.to_le_bytes());
                    }
                    (&s).write_all(&hello)?;
                    Ok(s)
                }) {
                    Ok(s) => next = Some(s),
                    Err(e) => connect_error = e.to_string(),
                }
            }
            if prev.is_none() {
                match listener.accept() {
                    Ok((s, peer)) => match read_hello(&s, gang, world, deadline) {
                        Ok(r) if r == prev_rank => prev = Some(s),
                        Ok(r) => {
                            tracing::warn!(rank, %peer, "tcp ring: refused rank {r}'s connection (expected rank {prev_rank})")
                        }
                        Err(e) => tracing::warn!(rank, %peer, "tcp ring: refused a connection: {e}"),
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => tracing::warn!(rank, "tcp ring: accept on {own} failed: {e}"),
                }
            }
            if next.is_some() && prev.is_some() {
                break;
            }
            if abort.is_raised() {
                let f = Failure::aborted();
                if let Some(s) = next.take() {
                    send_abort(&s, 0, &f, rank, tick);
                    let _ = s.shutdown(Shutdown::Both);
                }
                return Err(Error::Collective(format!("{ctx}: {ABORTED}")));
            }
            if Instant::now() >= deadline {
                let mut f = Failure { ranks: Vec::new(), detail: String::new(), origin: None };
                let mut parts = Vec::new();
                if next.is_none() {
                    f.ranks.push(next_rank);
                    parts.push(format!(
                        "rank {next_rank} could not be reached at {} within {:?} ({connect_error})",
                        endpoints[next_rank], opts.deadline
                    ));
                }
                if prev.is_none() {
                    if !f.ranks.contains(&prev_rank) {
                        f.ranks.push(prev_rank);
                    }
                    parts.push(format!("rank {prev_rank} did not connect to {own} within {:?}", opts.deadline));
                }
                f.detail = parts.join("; ");
                let message = format!("{ctx}: {} did not answer: {}", name_ranks(&f.ranks), f.detail);
                // Downstream ranks learn the culprit now instead of guessing at their own deadline.
                if let Some(s) = next.take() {
                    send_abort(&s, 0, &f, rank, tick);
                    let _ = s.shutdown(Shutdown::Both);
                }
                return Err(Error::Collective(message));
            }
            if let (Some(s), None) = (&next, &prev) {
                // Tell the ranks downstream that this one is alive and waiting on prev.
                if last_beat.is_none_or(|t| t.elapsed() >= tick) {
                    last_beat = Some(Instant::now());
                    let _ = write_by(
                        s,
                        &Header::control(KIND_HEARTBEAT, 0, prev_rank as u32, 0).encode(),
                        Instant::now() + tick,
                        None,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(2).max(tick / 20));
        }
        let (next, prev) = (next.unwrap(), prev.unwrap());
        let setup = |s: &TcpStream| -> std::io::Result<TcpStream> {
            s.set_nonblocking(false)?;
            s.set_read_timeout(None)?;
            s.try_clone()
        };
        let prev_reader = setup(&prev)
            .map_err(|e| Error::Collective(format!("{ctx}: cannot set up rank {prev_rank}'s connection: {e}")))?;
        let (tx, rx) = mpsc::channel();
        let upstream = Arc::new(Mutex::new(None));
        let beats = upstream.clone();
        let reader = std::thread::Builder::new()
            .name(format!("tcp-ring-{rank}-reader"))
            .spawn(move || read_frames(prev_reader, tx, beats))
            .map_err(|e| Error::Collective(format!("{ctx}: cannot start the reader thread: {e}")))?;
        Ok(Self {
            rank,
            world,
            opts,
            next,
            prev,
            incoming: rx,
            pending: VecDeque::new(),
            upstream,
            reader: Some(reader),
            last_beat,
            abort,
        })
    }

    // ---- sending -------------------------------------------------------------------------------------

    fn write_frame(&mut self, header: &Header, payload: &[u8], deadline: Instant) -> std::result::Result<(), Failure> {
        let next = self.next_rank();
        let abort = Some(&self.abort);
        let result = write_by(&self.next, &header.encode(), deadline, abort)
            .and_then(|()| write_by(&self.next, payload, deadline, abort));
        match result {
            Ok(()) => Ok(()),
            Err(_) if self.abort.is_raised() => Err(Failure::aborted()),
            Err(e) if e.kind() == ErrorKind::TimedOut => Err(Failure::blame(
                next,
                format!("rank {next} stopped taking data for the whole {:?} deadline", self.opts.deadline),
            )),
            Err(e) => Err(self.next_failure(e.to_string(), header)),
        }
    }

    /// A write to next failed. If next closed because of a failure upstream of this rank, the ABORT for it is
    /// on its way round the ring: wait briefly for it so every rank names the same culprit. And if what prev
    /// sent meanwhile shows that the ranks disagree on the call (`sending` is this rank's frame of it), say that:
    /// it is why the peer left.
    fn next_failure(&mut self, reason: String, sending: &Header) -> Failure {
        let until = Instant::now() + 2 * self.tick();
        loop {
            let mut ended = false;
            for m in &self.pending {
                match m {
                    Incoming::Abort(f) => return f.clone(),
                    Incoming::Closed(_) => ended = true,
                    // Prev may legitimately be a step or a call ahead; the same call with another collective or
                    // size is a disagreement.
                    Incoming::Data { header, .. }
                        if sending.kind == KIND_DATA
                            && header.seq == sending.seq
                            && (header.op, header.aux, header.total) != (sending.op, sending.aux, sending.total) =>
                    {
                        let expected = (sending.op, sending.seq, header.step, sending.aux, sending.total);
                        if let Some(f) = self.mismatch(expected, header) {
                            return f;
                        }
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            // Nothing more can arrive after prev's connection ended.
            if ended || now >= until {
                break;
            }
            match self.incoming.recv_timeout(until - now) {
                Ok(m) => self.pending.push_back(m),
                Err(_) => break,
            }
        }
        let next = self.next_rank();
        Failure::blame(next, format!("the connection to rank {next} broke ({reason}); it died or left the gang"))
    }

    /// While waiting on prev, says downstream whom this rank is waiting on, once per tick.
    fn heartbeat(&mut self, seq: u64, deadline: Instant) -> std::result::Result<(), Failure> {
        if self.last_beat.is_some_and(|t| t.elapsed() < self.tick()) {
            return Ok(());
        }
        self.last_beat = Some(Instant::now());
        let suspect = self.suspect(seq);
        let header = Header::control(KIND_HEARTBEAT, seq, suspect as u32, 0);
        self.write_frame(&header, &[], deadline)
    }

    /// Best effort: tell next why this rank fails, then close both connections.
    fn abort(&mut self, seq: u64, f: &Failure) {
        send_abort(&self.next, seq, f, self.rank, self.tick());
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
    }

    // ---- receiving -----------------------------------------------------------------------------------

    /// The rank this one is ultimately waiting on: prev, unless prev said within the last four ticks (half a
    /// deadline; heartbeats come every tick) that it is itself waiting on someone further upstream.
    fn suspect(&self, seq: u64) -> usize {
        let prev = self.prev_rank();
        let beat = *self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        match beat {
            Some(b) if b.at.elapsed() <= 4 * self.tick() && b.seq + 1 >= seq => match b.suspect {
                Some(s) if s != self.rank && s < self.world => s,
                _ => prev,
            },
            _ => prev,
        }
    }

    fn check_data(&self, call: &Call, step: u32, header: &Header) -> std::result::Result<(), Failure> {
        match self.mismatch((call.op as u32, call.seq, step, call.aux, call.total), header) {
            None => Ok(()),
            Some(f) => Err(f),
        }
    }

    /// The failure for a DATA frame from prev that is not the one `expected` (op, call, step, aux, bytes).
    fn mismatch(&self, expected: (u32, u64, u32, u32, u64), got: &Header) -> Option<Failure> {
        let (op, seq, step, aux, total) = expected;
        if (got.op, got.seq, got.step, got.aux, got.total) == expected {
            return None;
        }
        let prev = self.prev_rank();
        Some(Failure::blame(
            prev,
            format!(
                "rank {prev} sent {} call {} step {} (aux {}, {} bytes) while this rank is in {} call {seq} step \
                 {step} (aux {aux}, {total} bytes): the ranks disagree on the sequence of collective calls or their \
                 tensors",
                op_name(got.op),
                got.seq,
                got.step,
                got.aux,
                got.total,
                op_name(op),
            ),
        ))
    }

    fn take(&self, call: &Call, step: u32, msg: Incoming) -> std::result::Result<Vec<u8>, Failure> {
        match msg {
            Incoming::Data { header, payload } => {
                self.check_data(call, step, &header)?;
                Ok(payload)
            }
            Incoming::Abort(f) => Err(f),
            Incoming::Closed(reason) => {
                let prev = self.prev_rank();
                Err(Failure::blame(prev, format!("rank {prev} {reason}; it died or left the gang")))
            }
        }
    }

    /// A DATA frame of `call` at `step` if one has already arrived.
    fn try_data(&mut self, call: &Call, step: u32) -> std::result::Result<Option<Vec<u8>>, Failure> {
        let msg = match self.pending.pop_front() {
            Some(m) => m,
            None => match self.incoming.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => Incoming::Closed("closed the connection".into()),
            },
        };
        self.take(call, step, msg).map(Some)
    }

    /// The next DATA frame of `call` at `step`, waiting until the call's deadline (heartbeating meanwhile).
    fn recv_data(&mut self, call: &Call, step: u32) -> std::result::Result<Vec<u8>, Failure> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return self.take(call, step, m);
            }
            if self.abort.is_raised() {
                return Err(Failure::aborted());
            }
            let now = Instant::now();
            if now >= call.deadline {
                let prev = self.prev_rank();
                let suspect = self.suspect(call.seq);
                let detail = if suspect == prev {
                    format!("no data from rank {prev} within the {:?} deadline", self.opts.deadline)
                } else {
                    format!(
                        "no data within the {:?} deadline: rank {prev} is alive but waits on rank {suspect}, which sends nothing",
                        self.opts.deadline
                    )
                };
                return Err(Failure::blame(suspect, detail));
            }
            self.heartbeat(call.seq, call.deadline)?;
            match self.incoming.recv_timeout((call.deadline - now).min(self.tick())) {
                Ok(m) => return self.take(call, step, m),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return self.take(call, step, Incoming::Closed("closed the connection".into()));
                }
            }
        }
    }

    // ---- the algorithms ------------------------------------------------------------------------------

    /// One ring step: streams `buf[send]` to next while `buf[recv]` arrives from prev and is added in (`add`)
    /// or copied over. An empty chunk still travels as one empty frame, so every step synchronises the pair.
    fn step<T: Elem>(
        &mut self,
        call: &Call,
        step: u32,
        buf: &mut [T],
        send: Range<usize>,
        recv: Range<usize>,
        add: bool,
    ) -> std::result::Result<(), Failure> {
        let size = std::mem::size_of::<T>();
        let seg = (self.opts.segment_bytes / size).max(1);
        let mut got = recv.start;
        let mut frames_in = 0usize;
        let done = |got: usize, frames: usize| if recv.is_empty() { frames > 0 } else { got == recv.end };
        let prev = self.prev_rank();
        let fold = |buf: &mut [T], got: &mut usize, payload: Vec<u8>| -> std::result::Result<(), Failure> {
            let n = payload.len() / size;
            if !payload.len().is_multiple_of(size) || *got + n > recv.end {
                return Err(Failure::blame(
                    prev,
                    format!(
                        "rank {prev} sent {} bytes where this rank expected at most {} elements of {size} bytes",
                        payload.len(),
                        recv.end - *got
                    ),
                ));
            }
            let dst = &mut buf[*got..*got + n];
            if add {
                T::add_le(dst, &payload);
            } else {
                as_bytes_mut(dst).copy_from_slice(&payload);
            }
            *got += n;
            Ok(())
        };
        let mut at = send.start;
        loop {
            let end = (at + seg).min(send.end);
            let bytes = as_bytes(&buf[at..end]);
            let header = Header {
                kind: KIND_DATA,
                op: call.op as u32,
                seq: call.seq,
                step,
                aux: call.aux,
                total: call.total,
                len: bytes.len() as u64,
            };
            self.write_frame(&header, bytes, call.deadline)?;
            at = end;
            // Fold in what has already arrived, so adding overlaps sending.
            while !done(got, frames_in) {
                match self.try_data(call, step)? {
                    Some(p) => {
                        fold(buf, &mut got, p)?;
                        frames_in += 1;
                    }
                    None => break,
                }
            }
            if at >= send.end {
                break;
            }
        }
        while !done(got, frames_in) {
            let p = self.recv_data(call, step)?;
            fold(buf, &mut got, p)?;
            frames_in += 1;
        }
        Ok(())
    }

    /// Reduce-scatter (after step s, rank r holds the sum over ranks r-s-1..r of chunk r-s-1), then
    /// all-gather of the finished chunks. Chunk c's sum is always accumulated in the same order (starting
    /// at rank c), so every rank ends with identical bits.
    fn all_reduce<T: Elem>(&mut self, call: &Call, buf: &mut [T]) -> std::result::Result<(), Failure> {
        let (r, w, n) = (self.rank, self.world, buf.len());
        let chunk = |i: usize| i * n / w..(i + 1) * n / w;
        for s in 0..w - 1 {
            self.step(call, s as u32, buf, chunk((r + w - s) % w), chunk((r + 2 * w - s - 1) % w), true)?;
        }
        for s in 0..w - 1 {
            self.step(call, (w - 1 + s) as u32, buf, chunk((r + 1 + w - s) % w), chunk((r + w - s) % w), false)?;
        }
        Ok(())
    }

    /// The reduce-scatter half of the ring all-reduce, with the blocks numbered so that rank r ends holding
    /// the complete sum of block r (`buf` holds world equal blocks): at step s rank r sends its partial sum of
    /// block r-s-1 and adds prev's partial sum of block r-s-2 into its own, so after step s block r-s-2 holds
    /// the sum over ranks r-s-1..=r, and after w-1 steps block r holds all w. Other blocks are left partial.
    fn reduce_scatter<T: Elem>(&mut self, call: &Call, buf: &mut [T]) -> std::result::Result<(), Failure> {
        let (r, w, n) = (self.rank, self.world, buf.len() / self.world);
        let block = |i: usize| (i % w) * n..(i % w + 1) * n;
        for s in 0..w - 1 {
            self.step(call, s as u32, buf, block(r + 2 * w - s - 1), block(r + 2 * w - s - 2), true)?;
        }
        Ok(())
    }

    /// The all-gather half, rank r starting with block r of `buf` (world equal blocks of bytes) filled: at
    /// step s it forwards block r-s (its own, then the one it got last) and receives block r-s-1 from prev.
    fn all_gather(&mut self, call: &Call, buf: &mut [u8]) -> std::result::Result<(), Failure> {
        let (r, w, n) = (self.rank, self.world, buf.len() / self.world);
        let block = |i: usize| (i % w) * n..(i % w + 1) * n;
        for s in 0..w - 1 {
            self.step(call, s as u32, buf, block(r + w - s), block(r + 2 * w - s - 1), false)?;
        }
        Ok(())
    }

    /// After w-1 empty exchanges every rank has heard, through its prev, from every other rank.
    fn barrier(&mut self, call: &Call) -> std::result::Result<(), Failure> {
        let mut nothing: [f32; 0] = [];
        for s in 0..self.world - 1 {
            self.step(call, s as u32, &mut nothing, 0..0, 0..0, true)?;
        }
        Ok(())
    }

    /// Pipelined along the ring from `root`: each rank forwards every frame as it arrives, except to root.
    fn broadcast(&mut self, call: &Call, buf: &mut [u8], root: usize) -> std::result::Result<(), Failure> {
        let header = |len: usize| Header {
            kind: KIND_DATA,
            op: call.op as u32,
            seq: call.seq,
            step: 0,
            aux: call.aux,
            total: call.total,
            len: len as u64,
        };
        if self.rank == root {
            let seg = self.opts.segment_bytes;
            let mut at = 0;
            loop {
                let end = (at + seg).min(buf.len());
                self.write_frame(&header(end - at), &buf[at..end], call.deadline)?;
                at = end;
                if at >= buf.len() {
                    return Ok(());
                }
            }
        }
        let forward = self.next_rank() != root;
        let prev = self.prev_rank();
        let (mut got, mut frames) = (0usize, 0usize);
        while frames == 0 || got < buf.len() {
            let p = self.recv_data(call, 0)?;
            if got + p.len() > buf.len() {
                return Err(Failure::blame(
                    prev,
                    format!("rank {prev} sent more than the {} bytes of the broadcast", buf.len()),
                ));
            }
            buf[got..got + p.len()].copy_from_slice(&p);
            if forward {
                self.write_frame(&header(p.len()), &p, call.deadline)?;
            }
            got += p.len();
            frames += 1;
        }
        Ok(())
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // Shutting the prev connection down wakes the reader thread's blocking read.
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// Writes all of `bytes` to a stream with a write timeout, retrying until `deadline` (so a slow reader is
/// not an error, a stalled one past the deadline is `TimedOut`).
/// Writes all of `bytes` before `deadline` (each blocked write returns after the socket's write timeout, a
/// tick), or until `abort` is raised.
fn write_by(
    mut s: &TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
    abort: Option<&AbortSignal>,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match s.write(bytes) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::WriteZero, "the connection took no more data")),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(ErrorKind::TimedOut, "write deadline passed"));
                }
                if abort.is_some_and(AbortSignal::is_raised) {
                    return Err(std::io::Error::other(ABORTED));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn send_abort(s: &TcpStream, seq: u64, f: &Failure, reporter: usize, tick: Duration) {
    let body = f.encode_abort(reporter);
    let mut frame = Header::control(KIND_ABORT, seq, 0, body.len()).encode().to_vec();
    frame.extend_from_slice(&body);
    let _ = write_by(s, &frame, Instant::now() + tick, None);
}

/// Reads and checks the HELLO of a freshly accepted connection; returns the connecting rank.
fn read_hello(s: &TcpStream, gang: u64, world: usize, deadline: Instant) -> std::result::Result<usize, String> {
    let wait =
        deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(10), Duration::from_secs(2));
    s.set_nonblocking(false).and_then(|()| s.set_read_timeout(Some(wait))).map_err(|e| e.to_string())?;
    let mut buf = [0u8; HEADER_BYTES + HELLO_BYTES];
    (&mut &*s).read_exact(&mut buf).map_err(|e| format!("no hello: {e}"))?;
    let header = Header::decode(buf[..HEADER_BYTES].try_into().unwrap());
    let field = |i: usize| u32::from_le_bytes(buf[HEADER_BYTES + 4 * i..HEADER_BYTES + 4 * i + 4].try_into().unwrap());
    let (magic, protocol, rank, their_world) = (field(0), field(1), field(2) as usize, field(3) as usize);
    if header.kind != KIND_HELLO || magic != MAGIC {
        return Err("not a tcp ring peer".into());
    }
    if protocol != PROTOCOL {
        return Err(format!("ring protocol {protocol}, this rank speaks {PROTOCOL}"));
    }
    if header.seq != gang || their_world != world {
        return Err(format!("rank {rank} of another gang (world {their_world}, different endpoint list)"));
    }
    Ok(rank)
}

/// The reader thread: turns the prev connection into `Incoming` messages until it ends.
fn read_frames(mut s: TcpStream, tx: Sender<Incoming>, upstream: Arc<Mutex<Option<Beat>>>) {
    let closed = |e: std::io::Error| {
        if e.kind() == ErrorKind::UnexpectedEof {
            "closed the connection".to_owned()
        } else {
            format!("broke the connection ({e})")
        }
    };
    loop {
        let mut head = [0u8; HEADER_BYTES];
        if let Err(e) = s.read_exact(&mut head) {
            let _ = tx.send(Incoming::Closed(closed(e)));
            return;
        }
        let header = Header::decode(&head);
        if header.len > MAX_PAYLOAD {
            let _ = tx.send(Incoming::Closed(format!(
                "sent a {}-byte frame (limit {MAX_PAYLOAD}): a corrupt stream",
                header.len
            )));
            return;
        }
        let mut payload = Vec::with_capacity(header.len as usize);
        match (&mut s).take(header.len).read_to_end(&mut payload) {
            Ok(n) if n as u64 == header.len => {}
            Ok(_) => {
                let _ = tx.send(Incoming::Closed("closed the connection in the middle of a frame".into()));
                return;
            }
            Err(e) => {
                let _ = tx.send(Incoming::Closed(closed(e)));
                return;
            }
        }
        let msg = match header.kind {
            KIND_DATA => Incoming::Data { header, payload },
            KIND_HEARTBEAT => {
                let suspect = (header.aux != NO_RANK).then_some(header.aux as usize);
                *upstream.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Beat { at: Instant::now(), seq: header.seq, suspect });
                continue;
            }
            KIND_ABORT => match Failure::decode_abort(&payload) {
                Some(f) => Incoming::Abort(f),
                None => Incoming::Closed("sent a malformed abort frame".into()),
            },
            other => Incoming::Closed(format!("sent an unknown frame kind {other}: a corrupt stream")),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_abort_round_trip() {
        let h = Header { kind: KIND_DATA, op: 2, seq: 7, step: 3, aux: 1, total: 1 << 33, len: 12 };
        assert_eq!(Header::decode(&h.encode()), h);
        let f = Failure { ranks: vec![1, 3], detail: "gone".into(), origin: None };
        let back = Failure::decode_abort(&f.encode_abort(2)).unwrap();
        assert_eq!((back.ranks, back.detail.as_str(), back.origin), (vec![1, 3], "gone", Some(2)));
    }
}
