//! Raft transport between the nodes of a group, over gRPC (tonic). openraft's
//! request and response types travel as MessagePack payloads.
//!
//! - Replication is pipelined: one bidirectional stream per follower
//!   (`StreamAppend`) carries append requests back to back; responses come
//!   back in order.
//! - Snapshots stream as chunks ([`crate::snapshot`]): the state machine
//!   files, then the CommitLog segments up to the snapshot's last entry.
//! - openraft leaves time limits to the transport: a replication stream
//!   that cannot open in [`STREAM_OPEN_TIMEOUT`], or leaves an append
//!   unanswered for [`STREAM_ANSWER_TIMEOUT`], ends with an error, and its
//!   request side is dropped with it ([`SessionRequests`]); openraft then
//!   opens another.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::task::Poll;
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

/// Longest wait for a replication stream to open (a peer answers with its
/// headers at once; connecting has its own 500 ms limit).
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// An append sent on a replication stream and still unanswered after between
/// one and two of these ends the stream as broken. A follower answers after
/// its fsync, far sooner; a stream this quiet is stuck (a peer or proxy that
/// holds the connection open and forwards nothing), and without the limit
/// the leader would never replicate to that follower again.
pub const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

type C = TypeConfig;

/// The request side of one replication stream, shared with its session:
/// when the session ends (its answers are dropped, or the stream never
/// opened) [`CloseRequests`] drops the inner stream at once, whatever the
/// HTTP/2 layer still does with the request body. openraft's request stream
/// holds its replication state lock while it waits for new entries, so a
/// body left behind in a dead connection would keep every later session of
/// that follower from starting.
struct SessionRequests<S> {
    inner: Arc<Mutex<Option<S>>>,
    /// Requests handed to the transport so far.
    sent: Arc<AtomicU64>,
}

impl<S: Stream + Unpin> Stream for SessionRequests<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let mut slot = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = slot.as_mut() else { return Poll::Ready(None) };
        let r = s.poll_next_unpin(cx);
        match &r {
            Poll::Ready(Some(_)) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(None) => *slot = None,
            Poll::Pending => {}
        }
        r
    }
}

/// Drops a session's request stream when the session ends.
struct CloseRequests<S>(Arc<Mutex<Option<S>>>);

impl<S> CloseRequests<S> {
    fn close(&self) {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(inner);
    }
}

impl<S> Drop for CloseRequests<S> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The answers of one replication stream, watched for a stall (see
/// [`STREAM_ANSWER_TIMEOUT`]).
struct AnswerWatch<S> {
    /// `None` once the stream ended.
    responses: Option<tonic::Streaming<RaftMessage>>,
    close: CloseRequests<S>,
    sent: Arc<AtomicU64>,
    answered: u64,
    /// At the end of the last quiet period that left requests unanswered:
    /// the answer count then.
    stalled_at: Option<u64>,
    target: u64,
    addr: String,
    /// The peer client's: set when this stream is found stuck.
    stale: Arc<AtomicBool>,
}

impl<S> AnswerWatch<S> {
    /// The next answer; after an error or the end, the stream is over (and
    /// its requests dropped).
    async fn next_answer(&mut self) -> Option<Result<StreamAppendResult<C>, RPCError<C>>> {
        loop {
            let responses = self.responses.as_mut()?;
            let r = match tokio::time::timeout(STREAM_ANSWER_TIMEOUT, responses.next()).await {
                Ok(None) => None,
                Ok(Some(item)) => {
                    self.answered += 1;
                    self.stalled_at = None;
                    Some(item.map_err(|s| status_error("stream_append", self.target, &self.addr, &s)).and_then(|m| {
                        let r: Result<StreamAppendResult<C>, String> =
                            decode(&m.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                        r.map_err(|msg| RPCError::Network(net_err(format!("remote node {}: {msg}", self.target))))
                    }))
                }
                Err(_) => {
                    let unanswered = self.sent.load(Ordering::Relaxed) > self.answered;
                    if !(unanswered && self.stalled_at == Some(self.answered)) {
                        self.stalled_at = unanswered.then_some(self.answered);
                        continue;
                    }
                    tracing::warn!(target_node = self.target, addr = %self.addr, "replication stream stuck; ending it");
                    self.stale.store(true, Ordering::Relaxed);
                    Some(Err(RPCError::Network(net_err(format!(
                        "stream_append to node {} at {}: an append unanswered for over {STREAM_ANSWER_TIMEOUT:?}",
                        self.target, self.addr
                    )))))
                }
            };
            if !matches!(r, Some(Ok(_))) {
                self.responses = None;
                self.close.close();
            }
            return r;
        }
    }
}

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
    /// Set when a stream on `client` timed out: the next call opens a new
    /// channel (a wedged connection or channel is not used again).
    stale: Arc<AtomicBool>,
}

/// A client of a peer's Raft service over a new, lazily connected channel
/// (`None`: the address does not parse).
fn peer_client(addr: &str) -> Option<RaftServiceClient<Channel>> {
    channel(addr, Duration::from_millis(500))
        .ok()
        .map(|c| RaftServiceClient::new(c).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20))
}

impl RaftNetworkFactory<C> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            group: self.group.clone(),
            target,
            client: peer_client(&node.addr),
            addr: node.addr.clone(),
            log: self.log.clone(),
            stale: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl PeerClient {
    /// Replaces a channel a timed-out stream left stale.
    fn renew_if_stale(&mut self) {
        if self.stale.swap(false, Ordering::Relaxed) {
            tracing::info!(target_node = self.target, addr = %self.addr, "new channel after a stuck replication stream");
            self.client = peer_client(&self.addr);
        }
    }

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
            self.renew_if_stale();
            let Some(mut client) = self.client.clone() else {
                let e = io::Error::other(format!("bad address {}", self.addr));
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            };
            let slot = Arc::new(Mutex::new(Some(input)));
            let close = CloseRequests(slot.clone());
            let sent = Arc::new(AtomicU64::new(0));
            let group = self.group.clone();
            let requests = SessionRequests { inner: slot, sent: sent.clone() }
                .map(move |r| RaftMessage { group: group.clone(), payload: encode(&r).into() });
            let (target, addr) = (self.target, self.addr.clone());
            let responses = match tokio::time::timeout(STREAM_OPEN_TIMEOUT, client.stream_append(requests)).await {
                Ok(r) => r.map_err(|s| status_error("stream_append", target, &addr, &s))?.into_inner(),
                Err(_) => {
                    self.stale.store(true, Ordering::Relaxed);
                    let e = io::Error::other(format!(
                        "stream_append to node {target} at {addr}: not open after {STREAM_OPEN_TIMEOUT:?}"
                    ));
                    return Err(RPCError::Unreachable(Unreachable::new(&e)));
                }
            };
            let answers = AnswerWatch {
                responses: Some(responses),
                close,
                sent,
                answered: 0,
                stalled_at: None,
                target,
                addr,
                stale: self.stale.clone(),
            };
            let out = futures::stream::unfold(answers, |mut w| async move {
                let r = w.next_answer().await?;
                Some((r, w))
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

#[cfg(test)]
mod tests {
    use raftmq_proto::raft::raft_service_server::RaftServiceServer;

    use super::*;
    use crate::types::Vote;

    #[tokio::test]
    async fn a_session_s_requests_are_dropped_when_it_ends_even_if_the_transport_keeps_the_body() {
        // Like openraft's request stream: it waits for new entries holding
        // its replication state lock.
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let l = lock.clone();
        let inner = futures::stream::unfold((), move |()| {
            let l = l.clone();
            async move {
                let _guard = l.lock_owned().await;
                futures::future::pending::<()>().await;
                Some((1u32, ()))
            }
        })
        .boxed();
        let slot = Arc::new(Mutex::new(Some(inner)));
        let mut body = SessionRequests { inner: slot.clone(), sent: Arc::new(AtomicU64::new(0)) };
        // The transport polls the body once, then keeps it without polling.
        assert!(futures::poll!(body.next()).is_pending());
        assert!(lock.try_lock().is_err(), "the request stream holds the lock");
        drop(CloseRequests(slot));
        assert!(lock.try_lock().is_ok(), "ending the session freed it");
        assert_eq!(body.next().await, None, "the body the transport kept ends");
    }

    /// A peer that takes a replication stream and never answers it.
    struct Silent;

    #[tonic::async_trait]
    impl RaftService for Silent {
        async fn append_entries(
            &self,
            _: tonic::Request<RaftMessage>,
        ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("silent"))
        }
        async fn vote(&self, _: tonic::Request<RaftMessage>) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("silent"))
        }
        async fn pre_vote(
            &self,
            _: tonic::Request<RaftMessage>,
        ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("silent"))
        }
        async fn transfer_leader(
            &self,
            _: tonic::Request<RaftMessage>,
        ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("silent"))
        }
        type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<RaftMessage, tonic::Status>> + Send + 'static>>;
        async fn stream_append(
            &self,
            req: tonic::Request<tonic::Streaming<RaftMessage>>,
        ) -> Result<tonic::Response<Self::StreamAppendStream>, tonic::Status> {
            // Reads every request, answers none.
            let mut requests = req.into_inner();
            tokio::spawn(async move { while let Some(Ok(_)) = requests.next().await {} });
            Ok(tonic::Response::new(Box::pin(futures::stream::pending())))
        }
        async fn install_snapshot(
            &self,
            _: tonic::Request<tonic::Streaming<SnapshotChunk>>,
        ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("silent"))
        }
    }

    #[tokio::test]
    async fn a_replication_stream_left_unanswered_ends_with_an_error_and_a_new_channel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(RaftServiceServer::new(Silent)).serve(addr));
        tokio::time::sleep(Duration::from_millis(200)).await;

        let dir = tempfile::tempdir().unwrap();
        let (log, _) =
            CommitLog::open(dir.path(), raft_log::LogConfig::small_for_tests(), Arc::new(raft_log::StdFs)).unwrap();
        let mut network = Network { group: "g".into(), log: Arc::new(log) };
        let node = BasicNode { addr: addr.to_string() };
        let mut peer = network.new_client(2, &node).await;
        let append = AppendEntriesRequest::<C> {
            vote: Vote { leader_id: raft_log::store::AdvLeaderId { term: 1, node_id: 1 }, committed: true },
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        };
        let input = futures::stream::iter([append]).chain(futures::stream::pending());
        let option = RPCOption::new(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let mut answers = peer.stream_append(Box::pin(input), option).await.expect("the stream opens");
        let first = answers.next().await.expect("an item, not the end");
        let waited = started.elapsed();
        let e = first.expect_err("no answer is an error");
        assert!(e.to_string().contains("unanswered"), "{e}");
        assert!(waited >= STREAM_ANSWER_TIMEOUT && waited < 3 * STREAM_ANSWER_TIMEOUT, "{waited:?}");
        assert!(answers.next().await.is_none(), "the stream is over");
        drop(answers);
        assert!(peer.stale.load(Ordering::Relaxed), "the next session gets a new channel");
        peer.renew_if_stale();
        assert!(!peer.stale.load(Ordering::Relaxed));
    }
}
