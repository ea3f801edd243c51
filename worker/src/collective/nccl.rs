//! The GPU collective: NCCL through cudarc, in place on the tensors' device memory.
//!
//! cudarc is built with `dynamic-loading`: libnccl and libcuda are opened at run time, so this compiles on
//! every machine and only fails, with an error saying what is missing, when a rank is actually created on a
//! host without them. (cudarc looks for `libnccl.so`; PyPI's `nvidia-nccl-cu13` ships only `libnccl.so.2`, so
//! GPU hosts need a symlink: see `scripts/gpu/nccl_check.sh`.)
//!
//! Rendezvous: rank 0 creates an [`NcclUniqueId`] (this works without a GPU), publishes its hex form through
//! the coordinator as its endpoint, and every rank passes it to [`Nccl::new`].
//!
//! Stream: collectives are queued on torch's current stream. tch never switches streams, so that is the
//! default (legacy) stream, which NCCL receives as a null stream: the backward kernels that wrote the
//! gradients finish before the all-reduce starts, and the optimizer's kernels wait for it.
//!
//! Deadline: the communicator is non-blocking (`blocking = 0`), so neither joining nor a collective ever
//! blocks the thread inside NCCL. Each call records an event after the collective and polls it and NCCL's
//! async error until done or the deadline, when it aborts the communicator (`ncclCommAbort`), which unblocks
//! the GPU. NCCL cannot say which peer is missing, so the error lists every other rank as a suspect. The same
//! polls watch the rank's [`AbortSignal`]: once the coordinator has taken the gang's lease back, the call
//! aborts the communicator at once rather than at the deadline (review A9).

use std::ffi::CStr;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys};
use cudarc::nccl::sys;
use tch::{Device, Kind, Tensor};

use super::{ABORTED, AbortSignal, Collective, check_blocks, check_rank, name_ranks};
use crate::error::{Error, Result};

/// NCCL's rendezvous token: 128 opaque bytes (an address of rank 0's bootstrap socket, among others).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclUniqueId(pub [u8; 128]);

impl std::fmt::Debug for NcclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclUniqueId({}…)", &self.to_hex()[..16])
    }
}

impl NcclUniqueId {
    /// A fresh id from `ncclGetUniqueId` (needs libnccl, not a GPU). Rank 0 calls this.
    pub fn new() -> Result<Self> {
        ensure_libraries(false)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: libnccl is loaded (checked above) and `id` is a valid out-pointer.
        let r = unsafe { sys::ncclGetUniqueId(&mut id) };
        check(r, "ncclGetUniqueId")?;
        Ok(Self(id.internal.map(|c| c as u8)))
    }

    /// 256 lowercase hex digits: how the id travels as a gang endpoint string.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |why: &str| Error::Collective(format!("NCCL unique id `{text}`: {why}"));
        if text.len() != 256 {
            return Err(bad(&format!("has {} characters, expected 256 hex digits", text.len())));
        }
        let mut out = [0u8; 128];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad("is not hexadecimal"))?;
        }
        Ok(Self(out))
    }
}

/// Checks that libnccl (and libcuda when `cuda`) can be opened, before any cudarc call that would panic.
fn ensure_libraries(cuda: bool) -> Result<()> {
    // SAFETY: these only try to dlopen the libraries by name.
    let nccl = unsafe { sys::is_culib_present() };
    if !nccl {
        return Err(Error::Collective(
            "NCCL: libnccl.so cannot be loaded (pip's nvidia-nccl-cu13 ships only libnccl.so.2: add a libnccl.so \
             symlink next to it and put that folder on LD_LIBRARY_PATH; scripts/gpu/nccl_check.sh does both)"
                .into(),
        ));
    }
    if cuda && !unsafe { cusys::is_culib_present() } {
        return Err(Error::Collective(
            "NCCL: the CUDA driver library libcuda.so cannot be loaded (no GPU driver)".into(),
        ));
    }
    Ok(())
}

fn nccl_error_string(r: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    unsafe { CStr::from_ptr(sys::ncclGetErrorString(r)) }.to_string_lossy().into_owned()
}

fn check(r: sys::ncclResult_t, what: &str) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        e => Err(Error::Collective(format!("NCCL {what}: {e:?} ({})", nccl_error_string(e)))),
    }
}

fn cuda(what: &str) -> impl FnOnce(cu::DriverError) -> Error + '_ {
    move |e| Error::Collective(format!("NCCL: CUDA {what} failed: {e}"))
}

/// `NCCL_VERSION(2, 29, 0)`: the layout of `ncclConfig_t` in the headers cudarc's `nccl-02029` bindings were
/// generated from; NCCL reads only as much of the struct as that version has.
const CONFIG_VERSION: u32 = 2 * 10000 + 29 * 100;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for every field we do not set.
const UNDEF: i32 = i32::MIN;

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`. Spelled out field by field: a different cudarc NCCL feature
/// (a different struct) fails to compile here rather than passing a wrong layout.
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
    }
}

/// One rank of an NCCL communicator on one GPU.
pub struct Nccl {
    rank: usize,
    world: usize,
    ordinal: usize,
    deadline: Duration,
    comm: sys::ncclComm_t,
    dev: cusys::CUdevice,
    ctx: cusys::CUcontext,
    event: cusys::CUevent,
    failed: Option<String>,
    abort: AbortSignal,
}

// SAFETY: the communicator, context and event are plain handles; NCCL and CUDA allow using them from any
// thread, and `&mut self` on every call keeps two threads from using this rank's communicator at once.
unsafe impl Send for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.ordinal)
            .finish_non_exhaustive()
    }
}

impl Nccl {
    /// Joins the communicator of `world` ranks identified by `id` as `rank`, on `device` (which must be
    /// `Device::Cuda(i)`; torch tensors passed later must live there or are staged there). Fails after
    /// `deadline` if not every rank joins.
    pub fn new(rank: usize, world: usize, id: &NcclUniqueId, device: Device, deadline: Duration) -> Result<Self> {
        Self::new_abortable(rank, world, id, device, deadline, AbortSignal::default())
    }

    /// `new`, with joining and every later call aborting the communicator as soon as `abort` is raised.
    pub fn new_abortable(
        rank: usize,
        world: usize,
        id: &NcclUniqueId,
        device: Device,
        deadline: Duration,
        abort: AbortSignal,
    ) -> Result<Self> {
        check_rank("NCCL", rank, world)?;
        let Device::Cuda(ordinal) = device else {
            return Err(Error::Collective(format!("NCCL needs a CUDA device, got {device:?}")));
        };
        ensure_libraries(true)?;
        cu::init().map_err(cuda("cuInit"))?;
        let dev = cu::device::get(ordinal as i32).map_err(cuda("cuDeviceGet"))?;
        // The primary context is the one torch's runtime API uses, so events and NCCL see torch's memory.
        // SAFETY: `dev` comes from cuDeviceGet.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(cuda("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: a retained primary context.
        unsafe { cu::ctx::set_current(ctx) }.map_err(cuda("cuCtxSetCurrent"))?;
        let event =
            cu::event::create(cusys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING).map_err(cuda("cuEventCreate"))?;
        let mut me =
            Self { rank, world, ordinal, deadline, comm: std::ptr::null_mut(), dev, ctx, event, failed: None, abort };
        let mut config = nonblocking_config();
        let unique = sys::ncclUniqueId { internal: id.0.map(|b| b as _) };
        let started = Instant::now();
        // SAFETY: valid out-pointer and config; the library is loaded.
        let r = unsafe { sys::ncclCommInitRankConfig(&mut me.comm, world as i32, unique, rank as i32, &mut config) };
        if let Err(e) = check(r, "ncclCommInitRankConfig") {
            me.comm = std::ptr::null_mut();
            return Err(e);
        }
        me.wait_ready("joining", started + deadline)?;
        tracing::debug!(
            rank,
            world,
            ordinal,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "NCCL communicator ready"
        );
        Ok(me)
    }

    /// Changes the deadline of later calls (e.g. a short one for a health check after a long join).
    pub fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    /// The CUDA device ordinal this rank's communicator lives on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn others(&self) -> Vec<usize> {
        (0..self.world).filter(|&r| r != self.rank).collect()
    }

    /// Aborts the communicator and remembers why: every later call fails at once.
    fn fail(&mut self, what: &str, detail: String) -> Error {
        if !self.comm.is_null() {
            // SAFETY: a communicator we created; abort is allowed at any time, also while operations hang.
            unsafe { sys::ncclCommAbort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
        let message = format!("NCCL rank {}/{} {what}: {detail}", self.rank, self.world);
        tracing::warn!("{message}");
        self.failed = Some(message.clone());
        Error::Collective(message)
    }

    fn timeout(&mut self, what: &str) -> Error {
        let detail = format!(
            "{} did not answer within {:?} (NCCL does not say which of them; the coordinator's heartbeats do)",
            name_ranks(&self.others()),
            self.deadline
        );
        self.fail(what, detail)
    }

    /// Polls the non-blocking communicator until the last call is enqueued (or joining is complete).
    fn wait_ready(&mut self, what: &str, deadline: Instant) -> Result<()> {
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if let Err(e) = check(r, "ncclCommGetAsyncError") {
                return Err(self.fail(what, e.to_string()));
            }
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                e => return Err(self.fail(what, format!("{e:?} ({})", nccl_error_string(e)))),
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(what));
            }
            if self.abort.is_raised() {
                return Err(self.fail(what, ABORTED.to_owned()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Enqueues one collective with `enqueue(comm)` on the default stream and waits for it on the GPU, up to
    /// the deadline.
    fn run(&mut self, what: &str, enqueue: impl FnOnce(sys::ncclComm_t) -> sys::ncclResult_t) -> Result<()> {
        if let Some(m) = &self.failed {
            return Err(Error::Collective(format!(
                "NCCL rank {}/{}: unusable after an earlier failure: {m}",
                self.rank, self.world
            )));
        }
        let deadline = Instant::now() + self.deadline;
        // SAFETY: our retained primary context; the calling thread may differ from the constructing one.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(cuda("cuCtxSetCurrent"))?;
        let r = enqueue(self.comm);
        if let Err(e) = check(r, what) {
            return Err(self.fail(what, e.to_string()));
        }
        self.wait_ready(what, deadline)?;
        // SAFETY: our event; the null stream is the legacy default stream the collective was queued on.
        unsafe { cu::event::record(self.event, std::ptr::null_mut()) }.map_err(cuda("cuEventRecord"))?;
        loop {
            // SAFETY: our event, recorded above.
            match unsafe { cu::event::query(self.event) } {
                Ok(()) => return Ok(()),
                Err(cu::DriverError(cusys::CUresult::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => return Err(self.fail(what, format!("waiting on the GPU failed: {e}"))),
            }
            // A peer that died makes NCCL report an async error; catch it before the deadline.
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                return Err(self.fail(what, format!("{state:?} ({})", nccl_error_string(state))));
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(what));
            }
            if self.abort.is_raised() {
                return Err(self.fail(what, ABORTED.to_owned()));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// `t` as a contiguous tensor on this rank's GPU: itself when it already is one, else a copy.
    fn on_device(&self, t: &Tensor) -> (Tensor, bool) {
        let device = Device::Cuda(self.ordinal);
        if t.device() == device && t.is_contiguous() {
            (t.shallow_clone(), false)
        } else {
            (t.to_device(device).contiguous(), true)
        }
    }
}

fn nccl_type(kind: Kind) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Ok(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::Half => T::ncclFloat16,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Int64 => T::ncclInt64,
        Kind::Int => T::ncclInt32,
        Kind::Uint8 => T::ncclUint8,
        Kind::Int8 => T::ncclInt8,
        k => return Err(Error::Collective(format!("NCCL: dtype {k:?} is not supported"))),
    })
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let dtype = nccl_type(t.kind())?;
        let (buf, staged) = self.on_device(t);
        let (ptr, count) = (buf.data_ptr(), buf.numel());
        // SAFETY: `buf` is a contiguous tensor of `count` elements of `dtype` on this rank's device, alive until
        // the collective has completed (run waits for it); in place is allowed (send == recv buffer).
        self.run("all_reduce_sum", |comm| unsafe {
            sys::ncclAllReduce(ptr, ptr, count, dtype, sys::ncclRedOp_t::ncclSum, comm, std::ptr::null_mut())
        })?;
        if staged {
            tch::no_grad(|| t.copy_(&buf));
        }
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Collective(format!(
                "NCCL broadcast: root {root} is not a rank of a gang of {}",
                self.world
            )));
        }
        let dtype = nccl_type(t.kind())?;
        let (buf, staged) = self.on_device(t);
        let (ptr, count) = (buf.data_ptr(), buf.numel());
        // SAFETY: as in all_reduce_sum.
        self.run("broadcast", |comm| unsafe {
            sys::ncclBroadcast(ptr, ptr, count, dtype, root as i32, comm, std::ptr::null_mut())
        })?;
        if staged {
            tch::no_grad(|| t.copy_(&buf));
        }
        Ok(())
    }

    /// NCCL has no barrier: a one-element all-reduce completes only once every rank has joined it.
    fn barrier(&mut self) -> Result<()> {
        let mut token = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.ordinal)));
        self.all_reduce_sum(&mut token)
    }

    /// `ncclAllGather`: NCCL's receive buffer is exactly the rank-ordered concatenation of the send buffers.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("NCCL all_gather", self.world, input, output)?;
        let dtype = nccl_type(input.kind())?;
        let (send, _) = self.on_device(input);
        let (recv, staged) = self.on_device(output);
        let (send_ptr, recv_ptr, count) = (send.data_ptr(), recv.data_ptr(), send.numel());
        // SAFETY: `send` (count elements) and `recv` (world·count elements, checked above) are contiguous
        // tensors of `dtype` on this rank's device, alive until the collective has completed (run waits).
        self.run("all_gather", |comm| unsafe {
            sys::ncclAllGather(send_ptr, recv_ptr, count, dtype, comm, std::ptr::null_mut())
        })?;
        if staged {
            tch::no_grad(|| output.copy_(&recv.view(output.size().as_slice())));
        }
        Ok(())
    }

    /// `ncclReduceScatter`: rank r receives block r of the sum, as the trait says.
    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("NCCL reduce_scatter_sum", self.world, output, input)?;
        let dtype = nccl_type(input.kind())?;
        let (send, _) = self.on_device(input);
        let (recv, staged) = self.on_device(output);
        let (send_ptr, recv_ptr, count) = (send.data_ptr(), recv.data_ptr(), recv.numel());
        // SAFETY: `send` (world·count elements, checked above) and `recv` (count) are contiguous tensors of
        // `dtype` on this rank's device, alive until the collective has completed; they do not overlap.
        self.run("reduce_scatter_sum", |comm| unsafe {
            sys::ncclReduceScatter(
                send_ptr,
                recv_ptr,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        if staged {
            tch::no_grad(|| output.copy_(&recv.view(output.size().as_slice())));
        }
        Ok(())
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: handles created in `new`, released once here.
        unsafe {
            if !self.comm.is_null() {
                // Abort rather than finalize: finalize waits for the peers, and a drop must not hang.
                sys::ncclCommAbort(self.comm);
            }
            let _ = cu::event::destroy(self.event);
            let _ = cu::primary_ctx::release(self.dev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_hex_round_trip() {
        let mut bytes = [0u8; 128];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let id = NcclUniqueId(bytes);
        assert_eq!(NcclUniqueId::from_hex(&id.to_hex()).unwrap(), id);
        assert!(NcclUniqueId::from_hex("abc").is_err());
    }

    /// On machines without NCCL the constructor must fail with an error, never panic inside cudarc.
    #[test]
    fn missing_nccl_is_an_error_not_a_panic() {
        // SAFETY: only tries to dlopen the library.
        if unsafe { sys::is_culib_present() } {
            return;
        }
        let err = NcclUniqueId::new().unwrap_err().to_string();
        assert!(err.contains("libnccl.so"), "{err}");
    }
}
