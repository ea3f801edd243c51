//! The train task as a gang of R ranks (`[cluster] train_ranks`): before joining, each rank binds its TCP ring
//! listener and publishes `tcp://host:port` (rank 0 on a GPU also its NCCL unique id, ` nccl:<hex>`) through the
//! coordinator; once every rank has joined, each builds the gang's collective from what all ranks published:
//! NCCL when the ranks run on CUDA, the TCP ring otherwise.

use std::net::TcpListener;
use std::time::Duration;

use tch::Device;

use crate::collective::{AbortSignal, Collective, Nccl, NcclUniqueId, RingOptions, TcpRing};
use crate::error::{Error, Result};

/// The address peers reach this worker at: `IRO_ADVERTISE_HOST` (a pod's IP from the downward API), else
/// loopback (a single machine).
pub const ADVERTISE_ENV: &str = "IRO_ADVERTISE_HOST";

/// What one rank publishes, and the listener behind it (kept until the gang forms).
pub(super) struct Endpoint {
    pub published: String,
    pub listener: TcpListener,
}

pub(super) fn endpoint(rank: u32, device: Device) -> Result<Endpoint> {
    let host = std::env::var(ADVERTISE_ENV).unwrap_or_else(|_| "127.0.0.1".to_owned());
    // Listen on every interface: the advertised address may be one of several.
    let listener = TcpRing::bind("0.0.0.0:0")?;
    let port = listener.local_addr().map_err(|e| Error::Collective(format!("tcp ring listener: {e}")))?.port();
    let mut published = format!("tcp://{host}:{port}");
    if rank == 0 && device.is_cuda() {
        published.push_str(&format!(" nccl:{}", NcclUniqueId::new()?.to_hex()));
    }
    Ok(Endpoint { published, listener })
}

/// The collective of a formed gang; `endpoints[r]` is what rank r published. Its calls stop once `abort` is
/// raised (the task loop raises it when the coordinator takes the lease back).
pub(super) fn collective(
    rank: u32,
    endpoints: &[String],
    listener: TcpListener,
    device: Device,
    deadline: Duration,
    abort: AbortSignal,
) -> Result<Box<dyn Collective>> {
    let world = endpoints.len();
    let nccl = endpoints.first().and_then(|e| e.split_whitespace().find_map(|p| p.strip_prefix("nccl:")));
    if let (Some(hex), true) = (nccl, device.is_cuda()) {
        let id = NcclUniqueId::from_hex(hex)?;
        return Ok(Box::new(Nccl::new_abortable(rank as usize, world, &id, device, deadline, abort)?));
    }
    let addrs = endpoints
        .iter()
        .enumerate()
        .map(|(r, e)| {
            e.split_whitespace().find_map(|p| p.strip_prefix("tcp://")).map(str::to_owned).ok_or_else(|| {
                Error::Collective(format!("rank {r} published `{e}`, which has no tcp://host:port ring address"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = RingOptions { deadline, ..RingOptions::default() };
    Ok(Box::new(TcpRing::connect_abortable(rank as usize, addrs, listener, opts, abort)?))
}
