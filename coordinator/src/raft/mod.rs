//! Replication of the run state over Raft (issue 14): three replicas of the pure `RunState`, each
//! applying the same committed log. `iro coordinator --raft-id N --raft-peers ...` runs one replica;
//! without those flags (and in `iro run --workers N`) the single-process driver (`driver::actor`) runs.
//!
//! - `storage`: `raft::Storage` on the command log's segment and snapshot formats.
//! - `replica`: one `RawNode`, its storage and the `RunState` its committed entries build; the Ready
//!   loop. Synchronous and clock-free: the deterministic simulation (`tests/sim.rs`) drives it directly.
//! - `node`: the replicated driver: a replica on a thread of its own behind the same `driver::Handle` the
//!   gRPC service and the status endpoint use; followers answer `NotLeader`, which the service turns
//!   into UNAVAILABLE with the leader's URL (`iro-leader`, `driver::routing`); leader-only side effects.
//! - `transport`: the peer port (tonic `RaftPeer`, mTLS) and the per-peer senders.
//! - `entry`: what an entry and a snapshot carry, and how an entry applies.
//! - `log`: raft-rs's `slog` records forwarded to `tracing`.
//!
//! ## Decisions, and why
//! - **raft-rs 0.7 with the `protobuf-codec` feature** (the default codec; the default logger is off).
//!   Both codecs were built offline from the crate registry on this project's machines: `protobuf-codec`
//!   builds with its pure-Rust code generator, while `prost-codec` fails in raft-proto's build script
//!   ("Could not find `protoc`": prost-build 0.11 needs a system `protoc`, and our vendored one is wired
//!   only into the `proto` crate) and would add prost 0.11 beside the workspace's 0.14. The price is
//!   `protobuf` 2.28 (RUSTSEC-2024-0437, a stack overflow on crafted input): the peer transport must let
//!   only authenticated replicas send bytes that raft parses (review B11: mTLS between replicas).
//! - **Entries are the existing command encoding in a versioned envelope, not bincode.** `Entry.data` is
//!   `{"v":1,"cmd":<Command as serde_json>}` (`entry`), snapshots `{"v":1,"state":<RunState>}`. The design
//!   card's bincode does not fit: bincode 2 cannot decode the internally tagged serde enums the run state
//!   uses (`RunStatus`, `TaskState`: `#[serde(tag)]` needs `deserialize_any`), nor round-trip
//!   `#[serde(skip)]`, so a snapshot would encode fine and fail only when a follower installs it; it has
//!   no schema evolution, so adding a field to a command would make every old entry unreadable; and it is
//!   no longer developed (3.0.0 is a `compile_error!` placeholder). JSON is already the command log's
//!   format, is covered by the replay tests, evolves with `#[serde(default)]`, and at ≲100 entries/s the
//!   fsync and the network round trip cost far more than encoding. The version field lets a behaviour
//!   change ship as a new envelope version that every replica of a rolling upgrade applies alike.
//! - **State-machine changes Raft forces live here, not in `state/`** (see `replica`): worker ids are
//!   assigned in apply (`entry::Body::Register`), the leader stamps time and applying never lets it run
//!   backwards, a grace follows every election, and only the leader proposes expiry. `state/` is
//!   unchanged. Session and lease nonces (review A6, another change) must likewise be chosen by the
//!   proposer and carried in the entry, never drawn while applying.
//!
//! ## Where this differs from review Part B
//! - Segments are numbered by write order, not by first index (a record may replace entries of an
//!   earlier segment), and old ones are deleted as a prefix once the older kept snapshot covers every
//!   index they name. Snapshot files use the command log's checksummed format (`{index}.snap`), with the
//!   term and ConfState in the body; the HardState is a record kind in the same segments.
//! - Snapshots are taken synchronously in the Ready loop (B4 wants a blocking thread). The replicated
//!   driver runs the whole loop on a thread of its own, so a snapshot (or an fsync) delays that replica's
//!   commands, never the gRPC and status servers.
//! - A new leader starts its own manifest writer and rewrites the manifests of every finished stage
//!   rather than reading a replicated watermark (B6): a manifest is a pure function of the applied state,
//!   so the rewrite changes no byte, and costs one small write per finished stage per election.
//! - Sessions are checked where an entry applies (`Body::InSession`), not when proposing, so a
//!   registration committed in between cannot let a stale session through.
//! - Leader time (B7): `max(applied time, clamp(wall, steady, steady + max_clock_lead_ms))` with `steady`
//!   the applied time at election plus the monotonic time since, so neither a fast nor a slow wall clock
//!   moves state time by more than the bound.
//! - Every command is replicated, idle polls and lease-less heartbeats included: the single-process
//!   driver's `changes_only_liveness` shortcut would let replicas' liveness differ. Keeping liveness as
//!   leader soft state (B6.4) is the later optimisation.

pub mod entry;
mod log;
pub mod node;
pub mod replica;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod tests;

pub use entry::{Body, ENTRY_VERSION, Envelope, ProposalId};
pub use node::{NodeConfig, RaftStatus, parse_peers};
pub use replica::{LocalTime, Outcome, PeerProgress, Replica, ReplicaConfig, Request};
pub use storage::{Durability, RaftStorage};
pub use transport::{Outbox, PeerService, PeerTls};
