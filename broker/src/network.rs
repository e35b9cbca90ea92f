//! Raft transport between the nodes of a group, over gRPC (tonic). openraft's
//! request and response types travel as MessagePack payloads.

use std::io;
use std::sync::Arc;
use std::time::Duration;

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

use crate::types::Raft;
use crate::types::TypeConfig;

type C = TypeConfig;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("raft message encodes")
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, io::Error> {
    rmp_serde::from_slice(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Opens lazily-connected channels to peers.
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect_lazy())
}

/// Makes one client per peer.
#[derive(Clone)]
pub struct Network {
    pub group: String,
}

pub struct PeerClient {
    group: String,
    target: u64,
    client: Option<RaftServiceClient<Channel>>,
    addr: String,
}

impl RaftNetworkFactory<C> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let client = channel(&node.addr, Duration::from_millis(500)).ok().map(|c| {
            RaftServiceClient::new(c).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20)
        });
        PeerClient { group: self.group.clone(), target, client, addr: node.addr.clone() }
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
        let reply = result.map_err(|s| {
            let e = io::Error::other(format!("{kind} to node {} at {}: {}", self.target, self.addr, s.message()));
            match s.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let r: Result<Resp, String> =
            decode(&reply.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|msg| {
            RPCError::Network(NetworkError::new(&io::Error::other(format!("remote node {}: {msg}", self.target))))
        })
    }
}

impl RaftNetworkV2<C> for PeerClient {
    type SnapshotData = Vec<u8>;

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
        _vote: openraft::impls::Vote<raft_log::store::AdvLeaderId>,
        _snapshot: openraft::storage::Snapshot<raft_log::store::AdvLeaderId, u64, BasicNode, Vec<u8>>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let e = io::Error::other("snapshot transfer is not implemented: the group keeps its whole log");
        Err(StreamingError::Unreachable(Unreachable::new(&e)))
    }
}

/// The server side: hands requests to the local Raft.
pub struct RaftServer {
    pub group: String,
    pub raft: Arc<Raft>,
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

    async fn install_snapshot(
        &self,
        _req: tonic::Request<tonic::Streaming<raftmq_proto::raft::SnapshotChunk>>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        Err(tonic::Status::unimplemented("snapshot transfer is not implemented: the group keeps its whole log"))
    }
}
