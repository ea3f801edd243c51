//! The driver: everything around the pure run state that does IO. One task owns the state (`actor`),
//! stamps commands with a `Clock`, persists them to a `CommandLog` before anyone hears back, and fires
//! `ExpireLeases` at the state's next deadline; the gRPC service (`service`, `wire`) and the status
//! endpoint talk to it through a cheap `Handle`; `serve` binds it all. `manifests` publishes each
//! finished stage's manifest to the run's object store before the next stage is leased.

pub mod actor;
pub mod auth;
pub mod bench;
pub mod clock;
pub mod log;
pub mod manifests;
pub mod routing;
pub mod server;
pub mod service;
pub mod snapshots;
pub mod telemetry;
pub mod tls;
pub mod wire;

#[cfg(test)]
mod tests;

pub use actor::{DriverOptions, Handle, Health, View};
pub use auth::{Bearer, ClusterToken, TOKEN_ENV};
pub use clock::{Clock, ManualClock, SystemClock};
pub use log::{CommandLog, FileLog, MemoryLog, config_sha256};
pub use server::{CoordinatorConfig, RaftOptions, ServerHandle, ServerLimits, serve};
pub use tls::{ClientTls, ServerTls};
