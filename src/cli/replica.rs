//! `iro coordinator`'s flags for running as one replica of three (issue 14): the Raft id, the peers,
//! the peer port and its mTLS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use iro_coordinator::driver::RaftOptions;
use iro_coordinator::raft::{PeerTls, parse_peers};

#[derive(Debug, Args)]
pub struct RaftArgs {
    /// Run as replica N of a Raft group (with --raft-peers): the run state is replicated to every replica,
    /// the leader answers workers, the others answer UNAVAILABLE naming it. Without it: one coordinator.
    /// `from-hostname`: one plus the ordinal a StatefulSet pod's hostname ends in (`iro-coordinator-0` is 1).
    #[arg(long, requires = "raft_peers")]
    pub raft_id: Option<String>,
    /// Every replica's peer address, this one's included: `1=coord-0.coord:7100,2=coord-1.coord:7100,3=...`.
    #[arg(long, requires = "raft_id")]
    pub raft_peers: Option<String>,
    /// Where this replica's peer port listens.
    #[arg(long, default_value = "0.0.0.0:7100")]
    pub raft_listen: SocketAddr,
    /// The gRPC URL workers reach each replica at (the leader hint a follower answers with):
    /// `1=https://coord-0.coord:50051,...`. Default: each peer's host with this replica's --listen port.
    #[arg(long)]
    pub raft_peer_urls: Option<String>,
    /// This replica's PEM certificate on the peer port; it must allow server and client authentication,
    /// since it also authenticates this replica to its peers (mTLS; required unless every replica is on loopback).
    #[arg(long, requires_all = ["raft_tls_key", "raft_tls_ca"])]
    pub raft_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "raft_tls_cert")]
    pub raft_tls_key: Option<PathBuf>,
    /// The PEM CA every replica's peer certificate chains to.
    #[arg(long, requires = "raft_tls_cert")]
    pub raft_tls_ca: Option<PathBuf>,
}

impl RaftArgs {
    /// The replica's options, or None for a single coordinator. `listen` is the gRPC listener and
    /// `tls` whether it speaks TLS (for the default peer URLs).
    pub fn options(&self, listen: SocketAddr, tls: bool) -> anyhow::Result<Option<RaftOptions>> {
        let (Some(id), Some(peers)) = (&self.raft_id, &self.raft_peers) else { return Ok(None) };
        let id = parse_id(id, std::env::var("HOSTNAME").ok().as_deref())?;
        let peers = parse_peers(peers)?;
        let mut options = RaftOptions::new(id, peers.clone(), self.raft_listen);
        let scheme = if tls { "https" } else { "http" };
        options.grpc_urls = match &self.raft_peer_urls {
            Some(urls) => parse_urls(urls)?,
            None => peers
                .iter()
                .map(|(id, address)| {
                    let host = address.rsplit_once(':').map_or(address.as_str(), |(host, _)| host);
                    (*id, format!("{scheme}://{host}:{}", listen.port()))
                })
                .collect(),
        };
        if let Some(missing) = peers.keys().find(|id| !options.grpc_urls.contains_key(id)) {
            anyhow::bail!("--raft-peer-urls: names no URL for replica {missing}");
        }
        options.tls = match (&self.raft_tls_cert, &self.raft_tls_key, &self.raft_tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(PeerTls::load(cert, key, ca)?),
            _ => None,
        };
        Ok(Some(options))
    }
}

/// `--raft-id`: a number, or `from-hostname` (a StatefulSet pod's ordinal plus one; raft reserves 0).
fn parse_id(value: &str, hostname: Option<&str>) -> anyhow::Result<u64> {
    if value != "from-hostname" {
        let id: u64 =
            value.parse().map_err(|_| anyhow::anyhow!("--raft-id: `{value}` is neither a number nor from-hostname"))?;
        anyhow::ensure!(id > 0, "--raft-id: 0 is reserved by raft; replicas are numbered from 1");
        return Ok(id);
    }
    let hostname = hostname.ok_or_else(|| anyhow::anyhow!("--raft-id from-hostname: HOSTNAME is not set"))?;
    let ordinal = hostname.rsplit_once('-').and_then(|(_, n)| n.parse::<u64>().ok()).ok_or_else(|| {
        anyhow::anyhow!("--raft-id from-hostname: `{hostname}` does not end in -N (a StatefulSet pod's ordinal)")
    })?;
    Ok(ordinal + 1)
}

fn parse_urls(spec: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut urls = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((id, url)) = part.split_once('=') else {
            anyhow::bail!("--raft-peer-urls: `{part}`: expected ID=URL")
        };
        let id: u64 = id.trim().parse().map_err(|_| anyhow::anyhow!("--raft-peer-urls: `{part}`: bad id"))?;
        let url = url.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.chars().any(char::is_control) {
            anyhow::bail!("--raft-peer-urls: `{part}`: the URL must be http:// or https://");
        }
        urls.insert(id, url.to_owned());
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::parse_id;

    #[test]
    fn raft_ids_come_from_the_flag_or_the_pod_ordinal() {
        assert_eq!(parse_id("2", None).unwrap(), 2);
        assert_eq!(parse_id("from-hostname", Some("iro-coordinator-0")).unwrap(), 1);
        assert_eq!(parse_id("from-hostname", Some("iro-coordinator-2")).unwrap(), 3);
        assert!(parse_id("0", None).unwrap_err().to_string().contains("reserved"));
        assert!(parse_id("from-hostname", Some("coordinator")).unwrap_err().to_string().contains("-N"));
        assert!(parse_id("from-hostname", None).is_err());
    }
}
