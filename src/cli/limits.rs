//! `iro coordinator`'s limits on what one gRPC client may ask of it (review A12): flags for every field of
//! `ServerLimits`, whose defaults they start from.

use std::time::Duration;

use clap::Args;
use iro_coordinator::driver::ServerLimits;

/// The smallest message limit accepted: a failure report may carry 32 KiB of error text, and a registration
/// 16 KiB of cached model names, and neither may be cut off by the transport.
const MIN_MESSAGE_BYTES: usize = 48 * 1024;

#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest gRPC request the coordinator decodes, in bytes; larger ones are refused before any handler.
    #[arg(long, default_value_t = ServerLimits::default().max_message_bytes, value_parser = message_bytes)]
    pub grpc_max_message_bytes: usize,
    /// HTTP/2 streams (calls in flight) one gRPC connection may hold open; a worker needs three.
    #[arg(
        long,
        default_value_t = ServerLimits::default().max_concurrent_streams,
        value_parser = clap::value_parser!(u32).range(3..)
    )]
    pub grpc_max_concurrent_streams: u32,
    /// Calls one gRPC connection may have in service at once; more wait.
    #[arg(long, default_value_t = ServerLimits::default().concurrency_per_connection, value_parser = at_least_three)]
    pub grpc_concurrency_per_connection: usize,
    /// Seconds a gRPC call may take before it ends with `Cancelled` (workers retry).
    #[arg(
        long,
        default_value_t = ServerLimits::default().request_timeout.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub grpc_request_timeout_s: u64,
    /// Seconds between HTTP/2 pings on an idle gRPC connection, so a worker gone without a FIN is noticed.
    #[arg(
        long,
        default_value_t = ServerLimits::default().keepalive_interval.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub grpc_keepalive_interval_s: u64,
}

impl LimitArgs {
    pub fn to_limits(&self) -> ServerLimits {
        ServerLimits {
            max_message_bytes: self.grpc_max_message_bytes,
            max_concurrent_streams: self.grpc_max_concurrent_streams,
            concurrency_per_connection: self.grpc_concurrency_per_connection,
            request_timeout: Duration::from_secs(self.grpc_request_timeout_s),
            keepalive_interval: Duration::from_secs(self.grpc_keepalive_interval_s),
        }
    }
}

fn message_bytes(value: &str) -> Result<usize, String> {
    let n: usize = value.parse().map_err(|e| format!("{e}"))?;
    if n < MIN_MESSAGE_BYTES {
        return Err(format!("{n} is below {MIN_MESSAGE_BYTES}: a worker's failure report must fit"));
    }
    Ok(n)
}

fn at_least_three(value: &str) -> Result<usize, String> {
    let n: usize = value.parse().map_err(|e| format!("{e}"))?;
    if n < 3 {
        return Err(format!("{n} is below 3: a worker has a heartbeat, a task call and a gang call in flight"));
    }
    Ok(n)
}
