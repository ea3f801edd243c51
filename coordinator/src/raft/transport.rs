//! The peer transport between coordinator replicas: a tonic `RaftPeer` service on its own port, with
//! mutual TLS required (review B11: raft 0.7 parses messages with protobuf 2.28, whose parser has a
//! known stack overflow on crafted input, so only a replica holding a certificate of the cluster's CA
//! may send it bytes), and one sender task per peer.
//!
//! Delivery is best effort, as raft expects: a sender batches what queued up for its peer into one
//! `Deliver` call; a failed call drops the batch and tells the replica the peer is unreachable (raft
//! then probes it instead of streaming), and a dropped or delivered snapshot is reported as such, since
//! raft sends that peer nothing more until told. A full queue drops the message the same way: raft
//! resends what matters.

use std::collections::BTreeMap;
use std::time::Duration;

use iro_proto as pb;
use pb::raft_peer_client::RaftPeerClient;
use pb::raft_peer_server::{RaftPeer, RaftPeerServer};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::driver::tls::{ClientTls, ServerTls};
use crate::error::{Error, Result};

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Messages in one `Deliver` call at most.
const MAX_BATCH: usize = 256;
/// Messages received and not yet stepped, before a sender is told to back off.
pub const INBOX: usize = 8192;
/// A snapshot of a large run is megabytes of JSON; everything else is tiny.
pub const MAX_PEER_MESSAGE_BYTES: usize = 256 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the transport tells the replica about its sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Unreachable(u64),
    Snapshot { peer: u64, delivered: bool },
}

/// The TLS of the peer links: this replica's certificate serves the peer port and authenticates it to
/// its peers; both sides verify the other against `ca`.
#[derive(Clone)]
pub struct PeerTls {
    pub server: ServerTls,
    pub client: ClientTls,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// One certificate (it must allow both server and client authentication, or name no extended key
    /// usage), its key, and the CA every replica's certificate chains to.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>, ca_pem: Vec<u8>) -> Result<Self> {
        let server = ServerTls::from_pem(cert_pem.clone(), key_pem.clone(), Some(ca_pem.clone()))?;
        let client = ClientTls::from_pem(ca_pem, Some((cert_pem, key_pem)))?;
        Ok(Self { server, client })
    }

    pub fn load(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> Result<Self> {
        let read = |field: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::Config { field, message: format!("{}: {e}", path.display()) })
        };
        Self::from_pem(read("raft_tls_cert", cert)?, read("raft_tls_key", key)?, read("raft_tls_ca", ca)?)
    }
}

/// The receiving side: checks each batch and hands its messages to the replica's inbox.
pub struct PeerService {
    id: u64,
    peers: Vec<u64>,
    inbox: mpsc::Sender<Message>,
}

impl PeerService {
    pub fn new(id: u64, peers: Vec<u64>, inbox: mpsc::Sender<Message>) -> Self {
        Self { id, peers, inbox }
    }

    pub fn server(self) -> RaftPeerServer<Self> {
        RaftPeerServer::new(self).max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn deliver(&self, request: Request<pb::RaftBatch>) -> std::result::Result<Response<pb::RaftAck>, Status> {
        let batch = request.into_inner();
        if batch.to != self.id {
            return Err(Status::invalid_argument(format!(
                "to: this is replica {}, not {} (check --raft-peers on the sender)",
                self.id, batch.to
            )));
        }
        if batch.from == self.id || !self.peers.contains(&batch.from) {
            return Err(Status::permission_denied(format!(
                "from: {} is not a peer of replica {}",
                batch.from, self.id
            )));
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for (i, bytes) in batch.messages.iter().enumerate() {
            let message = Message::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("messages[{i}]: not a raft message: {e}")))?;
            if message.from != batch.from || message.to != self.id {
                return Err(Status::invalid_argument(format!(
                    "messages[{i}]: from {} to {} inside a batch from {} to {}",
                    message.from, message.to, batch.from, batch.to
                )));
            }
            messages.push(message);
        }
        for message in messages {
            // Full: the replica is behind; the sender drops this batch and raft resends.
            self.inbox.try_send(message).map_err(|_| Status::resource_exhausted("the replica's inbox is full"))?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }
}

/// The sending side: one queue and task per peer.
pub struct Outbox {
    queues: BTreeMap<u64, mpsc::Sender<Message>>,
    feedback: mpsc::UnboundedSender<Feedback>,
}

impl Outbox {
    /// Starts a sender task per peer (`addresses`: raft id → host:port of its peer port) on the
    /// current runtime. `tls` None only in tests over loopback.
    pub fn start(
        id: u64,
        addresses: &BTreeMap<u64, String>,
        tls: Option<&PeerTls>,
        feedback: mpsc::UnboundedSender<Feedback>,
    ) -> Result<Self> {
        let mut queues = BTreeMap::new();
        for (&peer, address) in addresses {
            if peer == id {
                continue;
            }
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{address}");
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Config { field: "raft_peers", message: format!("{peer}={address}: {e}") })?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true);
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls.client.grpc()).map_err(|e| Error::Config {
                    field: "raft_tls_ca",
                    message: format!("TLS for peer {peer} at {address}: {e}"),
                })?;
            }
            let client = RaftPeerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(send_loop(id, peer, url, client, rx, feedback.clone()));
            queues.insert(peer, tx);
        }
        Ok(Self { queues, feedback })
    }

    /// Queues `message` for its recipient; a full queue or an unknown recipient drops it.
    pub fn send(&self, message: Message) {
        let peer = message.to;
        let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let Some(queue) = self.queues.get(&peer) else {
            tracing::warn!(to = peer, "a raft message for a replica that is not a peer: dropped");
            return;
        };
        if queue.try_send(message).is_err() {
            let _ = self.feedback.send(Feedback::Unreachable(peer));
            if snapshot {
                let _ = self.feedback.send(Feedback::Snapshot { peer, delivered: false });
            }
        }
    }
}

async fn send_loop(
    id: u64,
    peer: u64,
    url: String,
    mut client: RaftPeerClient<Channel>,
    mut rx: mpsc::Receiver<Message>,
    feedback: mpsc::UnboundedSender<Feedback>,
) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        let snapshots = batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).count();
        let mut encoded = Vec::with_capacity(batch.len());
        for message in &batch {
            match message.write_to_bytes() {
                Ok(bytes) => encoded.push(bytes),
                Err(e) => tracing::error!(to = peer, error = %e, "a raft message does not encode: dropped"),
            }
        }
        let result = client.deliver(pb::RaftBatch { from: id, to: peer, messages: encoded }).await;
        match result {
            Ok(_) => {
                if failing {
                    tracing::info!(peer, url, "raft peer reachable again");
                    failing = false;
                }
                for _ in 0..snapshots {
                    let _ = feedback.send(Feedback::Snapshot { peer, delivered: true });
                }
            }
            Err(status) => {
                if !failing {
                    tracing::warn!(peer, url, code = ?status.code(), error = status.message(), "raft peer unreachable");
                    failing = true;
                }
                let _ = feedback.send(Feedback::Unreachable(peer));
                for _ in 0..snapshots {
                    let _ = feedback.send(Feedback::Snapshot { peer, delivered: false });
                }
            }
        }
    }
}
