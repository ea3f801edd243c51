//! The coordinator as workers and operators see it: a real tonic server and client over loopback
//! sockets, a real command log in a temporary folder, and a manual clock, so lease expiry and worker
//! death are driven by the test instead of waited for. One test binary, one module per concern.

mod pki;
mod support;

mod auth;
mod grpc;
mod manifests;
mod raft;
mod restart;
mod sessions;
mod status;
mod tls;
