//! Raft transport between the nodes of a group, over gRPC (tonic). openraft's
//! request and response types travel as MessagePack payloads.
//!
//! - Replication is pipelined: one bidirectional stream per follower
//!   (`StreamAppend`) carries append requests back to back; responses come
//!   back in order.
//! - Snapshots stream as chunks ([`crate::snapshot`]): the state machine
//!   files, then the CommitLog segments up to the snapshot's last entry.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::Stream;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::raft::StreamAppendResult;
use raft_log::CommitLog;
use raft_log::fs::FsFile;
use raftmq_proto::raft::SnapshotChunk;

use openraft::BasicNode;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use raftmq_proto::raft::RaftMessage;
use raftmq_proto::raft::raft_service_client::RaftServiceClient;
use raftmq_proto::raft::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::snapshot;
use crate::snapshot::SnapshotDir;
use crate::snapshot::TransferHeader;
use crate::types::Raft;
use crate::types::TypeConfig;

/// Bytes of file data in one snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network while shipping a snapshot.
const SNAPSHOT_CHUNKS_AHEAD: usize = 4;

type C = TypeConfig;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("raft message encodes")
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, io::Error> {
    rmp_serde::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

static SOURCE_IP: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();

/// Makes every outgoing connection of this process bind `ip` as its source
/// (config `bind_source`).
pub fn set_source_ip(ip: std::net::IpAddr) {
    let _ = SOURCE_IP.set(ip);
}

/// Opens lazily-connected channels to peers.
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .local_address(SOURCE_IP.get().copied())
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect_lazy())
}

/// Makes one client per peer.
#[derive(Clone)]
pub struct Network {
    pub group: String,
    /// Read when shipping a snapshot's segments.
    pub log: Arc<CommitLog>,
}

pub struct PeerClient {
    group: String,
    target: u64,
    client: Option<RaftServiceClient<Channel>>,
    addr: String,
    log: Arc<CommitLog>,
}

impl RaftNetworkFactory<C> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let client = channel(&node.addr, Duration::from_millis(500)).ok().map(|c| {
            RaftServiceClient::new(c).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20)
        });
        PeerClient { group: self.group.clone(), target, client, addr: node.addr.clone(), log: self.log.clone() }
    }
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        kind: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<C>> {
        let Some(client) = self.client.as_mut() else {
            let e = io::Error::other(format!("bad address {}", self.addr));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        let mut request = tonic::Request::new(RaftMessage { group: self.group.clone(), payload: encode(req).into() });
        request.set_timeout(option.soft_ttl());
        let result = match kind {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            "pre_vote" => client.pre_vote(request).await,
            "transfer" => client.transfer_leader(request).await,
            _ => unreachable!("rpc kind {kind}"),
        };
        let reply = result.map_err(|s| status_error(kind, self.target, &self.addr, &s))?;
        let r: Result<Resp, String> =
            decode(&reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|msg| {
            RPCError::Network(NetworkError::new(&io::Error::other(format!("remote node {}: {msg}", self.target))))
        })
    }
}

fn status_error(kind: &str, target: u64, addr: &str, s: &tonic::Status) -> RPCError<C> {
    let e = io::Error::other(format!("{kind} to node {target} at {addr}: {}", s.message()));
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

fn net_err(e: impl std::fmt::Display) -> NetworkError<C> {
    NetworkError::new(&io::Error::other(e.to_string()))
}

/// Reads a snapshot's files and the shipped segments into chunks (blocking
/// I/O; run on a blocking thread). Stops when the receiver goes away.
fn produce_chunks(
    group: String,
    header: Vec<u8>,
    sm_dir: PathBuf,
    shipped: raft_log::ShippedLog,
    tx: tokio::sync::mpsc::Sender<SnapshotChunk>,
) -> io::Result<()> {
    let send = |c: SnapshotChunk| tx.blocking_send(c).map_err(|_| io::Error::other("snapshot receiver went away"));
    send(SnapshotChunk { group: group.clone(), header: header.into(), ..Default::default() })?;
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
    let mut ship = |name: String, size: u64, len: u64, read: &dyn Fn(&mut [u8], u64) -> io::Result<()>| {
        let mut offset = 0;
        // An empty file still gets one chunk so the receiver creates it.
        loop {
            let n = (len - offset).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
            read(&mut buf[..n], offset)?;
            send(SnapshotChunk {
                group: group.clone(),
                header: Default::default(),
                data: buf[..n].to_vec().into(),
                file: name.clone(),
                offset,
                file_size: size,
            })?;
            offset += n as u64;
            if offset >= len {
                return Ok::<(), io::Error>(());
            }
        }
    };
    for (rel, path) in snapshot::list_files(&sm_dir)? {
        if rel == snapshot::META_FILE {
            continue;
        }
        let f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        let read = |b: &mut [u8], at: u64| std::os::unix::fs::FileExt::read_exact_at(&f, b, at);
        ship(format!("{}/{rel}", snapshot::SM_PART), len, len, &read)?;
    }
    for seg in &shipped.segments {
        let read = |b: &mut [u8], at: u64| seg.file.read_exact_at(b, at);
        ship(format!("{}/{}", snapshot::LOG_PART, seg.name), seg.size, seg.send_len, &read)?;
    }
    Ok(())
}

impl RaftNetworkV2<C> for PeerClient {
    type SnapshotData = SnapshotDir;

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
    {
        async move {
            let _ = option;
            let Some(mut client) = self.client.clone() else {
                let e = io::Error::other(format!("bad address {}", self.addr));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            };
            let group = self.group.clone();
            let requests = input.map(move |r| RaftMessage { group: group.clone(), payload: encode(&r).into() });
            let (target, addr) = (self.target, self.addr.clone());
            let responses = client
                .stream_append(requests)
                .await
                .map_err(|s| status_error("stream_append", target, &addr, &s))?
                .into_inner();
            let out = responses.map(move |item| {
                let m = item.map_err(|s| status_error("stream_append", target, &addr, &s))?;
                let r: Result<StreamAppendResult<C>, String> =
                    decode(&m.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|msg| RPCError::Network(net_err(format!("remote node {target}: {msg}"))))
            });
            Ok(out.boxed())
        }
        .boxed()
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.call("append", &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call("vote", &rpc, &option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call("pre_vote", &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.call("transfer", &req, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: crate::types::Vote,
        snapshot: crate::types::Snapshot,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let Some(mut client) = self.client.clone() else {
            let e = io::Error::other(format!("bad address {}", self.addr));
            return Err(StreamingError::Unreachable(Unreachable::new(&e)));
        };
        let last = snapshot.meta.last_log_id.ok_or_else(|| net_err("snapshot without a last log id"))?;
        let log = self.log.clone();
        let shipped = tokio::task::spawn_blocking(move || log.ship_upto(last.index))
            .await
            .map_err(net_err)?
            .map_err(|e| net_err(format!("shipping the log up to {last}: {e}")))?;
        let header = TransferHeader {
            vote,
            meta: snapshot.meta.clone(),
            log_purged: shipped.purged,
            log_end_pos: shipped.end_pos,
        };
        tracing::info!(
            target = self.target, %last, segments = shipped.segments.len(),
            bytes = shipped.segments.iter().map(|s| s.send_len).sum::<u64>(), "sending a snapshot"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_AHEAD);
        let (group, sm_dir) = (self.group.clone(), snapshot.snapshot.dir.clone());
        let header = snapshot::encode(&header);
        let producer = tokio::task::spawn_blocking(move || produce_chunks(group, header, sm_dir, shipped, tx));
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = call => r,
        };
        match producer.await.map_err(net_err)? {
            Ok(()) => {}
            Err(e) if reply.is_err() => tracing::debug!(error = %e, "snapshot producer stopped"),
            Err(e) => return Err(net_err(format!("reading the snapshot: {e}")).into()),
        }
        let reply = reply.map_err(|s| match status_error("install_snapshot", self.target, &self.addr, &s) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(net_err(other)),
        })?;
        let r: Result<SnapshotResponse<C>, String> = decode(&reply.into_inner().payload).map_err(net_err)?;
        r.map_err(|msg| net_err(format!("remote node {}: {msg}", self.target)).into())
    }
}

/// The server side: hands requests to the local Raft.
pub struct RaftServer {
    pub group: String,
    pub raft: Arc<Raft>,
    /// Where received snapshots are assembled (`incoming-*` directories).
    pub snapshot_root: PathBuf,
}

/// Writes one received snapshot file chunk by chunk.
struct IncomingFile {
    name: String,
    file: raft_log::fs::StdFile,
}

impl RaftServer {
    /// Receives a snapshot's chunks into a fresh directory; returns the
    /// header and the directory.
    async fn receive_snapshot(
        &self,
        stream: &mut tonic::Streaming<SnapshotChunk>,
        dir: &std::path::Path,
    ) -> Result<TransferHeader, tonic::Status> {
        let bad = |m: String| tonic::Status::invalid_argument(m);
        let io = |e: io::Error| tonic::Status::internal(format!("writing a received snapshot: {e}"));
        let first = stream.message().await?.ok_or_else(|| bad("empty snapshot stream".into()))?;
        if first.group != self.group {
            return Err(tonic::Status::failed_precondition(format!(
                "this node is in group {}, the snapshot is for {}",
                self.group, first.group
            )));
        }
        let header: TransferHeader =
            snapshot::decode(dir, &first.header).map_err(|e| bad(format!("bad snapshot header: {e}")))?;
        snapshot::write_file(&dir.join(snapshot::HEADER_FILE), &first.header).map_err(io)?;
        std::fs::create_dir_all(dir.join(snapshot::SM_PART)).map_err(io)?;
        std::fs::create_dir_all(dir.join(snapshot::LOG_PART)).map_err(io)?;
        let mut current: Option<IncomingFile> = None;
        let mut bytes = 0u64;
        while let Some(c) = stream.message().await? {
            if current.as_ref().is_none_or(|f| f.name != c.file) {
                if let Some(f) = current.take() {
                    f.file.sync_data().map_err(io)?;
                }
                let rel = snapshot::safe_relative(&c.file).map_err(|e| bad(e.to_string()))?;
                if !(c.file.starts_with("sm/") || c.file.starts_with("log/")) {
                    return Err(bad(format!("snapshot file {:?} is neither sm/ nor log/", c.file)));
                }
                let path = dir.join(rel);
                if let Some(p) = path.parent() {
                    std::fs::create_dir_all(p).map_err(io)?;
                }
                let file = raft_log::fs::StdFile::open(&path, true).map_err(io)?;
                // Reserve the whole (segment) file now: a full disk fails the
                // transfer here, not a later append.
                if c.file_size > 0 {
                    file.allocate(c.file_size).map_err(io)?;
                }
                current = Some(IncomingFile { name: c.file.clone(), file });
            }
            let f = current.as_ref().expect("set above");
            if c.offset + c.data.len() as u64 > c.file_size {
                return Err(bad(format!("chunk of {} runs past its file size {}", c.file, c.file_size)));
            }
            f.file.write_all_at(&c.data, c.offset).map_err(io)?;
            bytes += c.data.len() as u64;
        }
        if let Some(f) = current.take() {
            f.file.sync_data().map_err(io)?;
        }
        for d in [dir.join(snapshot::SM_PART), dir.join(snapshot::LOG_PART), dir.to_path_buf()] {
            snapshot::sync_dir(&d).map_err(io)?;
        }
        tracing::info!(last = ?header.meta.last_log_id, bytes, "snapshot received");
        Ok(header)
    }
}

fn reply<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
    let r: Result<T, String> = r.map_err(|e| e.to_string());
    Ok(tonic::Response::new(RaftMessage { group: String::new(), payload: encode(&r).into() }))
}

impl RaftServer {
    fn check(&self, m: &RaftMessage) -> Result<(), tonic::Status> {
        if m.group != self.group {
            return Err(tonic::Status::failed_precondition(format!(
                "this node is in group {}, the message is for {}",
                self.group, m.group
            )));
        }
        Ok(())
    }

    fn payload<T: DeserializeOwned>(m: &RaftMessage) -> Result<T, tonic::Status> {
        decode(&m.payload).map_err(|e| tonic::Status::invalid_argument(format!("bad raft payload: {e}")))
    }
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        req: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let m = req.into_inner();
        self.check(&m)?;
        reply(self.raft.append_entries(Self::payload(&m)?).await)
    }

    async fn vote(&self, req: tonic::Request<RaftMessage>) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let m = req.into_inner();
        self.check(&m)?;
        reply(self.raft.vote(Self::payload(&m)?).await)
    }

    async fn pre_vote(&self, req: tonic::Request<RaftMessage>) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let m = req.into_inner();
        self.check(&m)?;
        reply(self.raft.pre_vote(Self::payload(&m)?).await)
    }

    async fn transfer_leader(
        &self,
        req: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let m = req.into_inner();
        self.check(&m)?;
        reply(self.raft.handle_transfer_leader(Self::payload(&m)?).await)
    }

    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<RaftMessage, tonic::Status>> + Send + 'static>>;

    async fn stream_append(
        &self,
        req: tonic::Request<tonic::Streaming<RaftMessage>>,
    ) -> Result<tonic::Response<Self::StreamAppendStream>, tonic::Status> {
        let group = self.group.clone();
        // A message for another group or one that does not decode ends the
        // stream; the leader then reconnects and probes.
        let requests = req.into_inner().scan((), move |_, item| {
            let r = match item {
                Ok(m) if m.group == group => match decode::<AppendEntriesRequest<C>>(&m.payload) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "bad append in a stream");
                        None
                    }
                },
                Ok(m) => {
                    tracing::warn!(group = %m.group, "append stream for another group");
                    None
                }
                Err(_) => None,
            };
            futures::future::ready(r)
        });
        let out = self.raft.stream_append(requests).map(|r| {
            let r: Result<StreamAppendResult<C>, String> = r.map_err(|e| e.to_string());
            Ok(RaftMessage { group: String::new(), payload: encode(&r).into() })
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let mut stream = req.into_inner();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = self.snapshot_root.join(format!("incoming-{nanos}"));
        std::fs::create_dir_all(&dir).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let header = match self.receive_snapshot(&mut stream, &dir).await {
            Ok(h) => h,
            Err(s) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(s);
            }
        };
        let snap = crate::types::Snapshot { meta: header.meta, snapshot: SnapshotDir { dir: dir.clone() } };
        let r = self.raft.install_full_snapshot(header.vote, snap).await;
        // Installed: the directory was consumed. Refused or failed: drop it.
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        reply(r)
    }
}
