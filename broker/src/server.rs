//! One gRPC port per node serving the client API, the admin API and Raft.

use std::net::SocketAddr;
use std::sync::Arc;

use raftmq_proto::admin::admin_service_server::AdminServiceServer;
use raftmq_proto::raft::raft_service_server::RaftServiceServer;
use raftmq_proto::rocketmq::messaging_service_server::MessagingServiceServer;

use crate::admin::Admin;
use crate::messaging::Messaging;
use crate::network::RaftServer;
use crate::node::BrokerNode;

const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Serves until `shutdown` resolves.
pub async fn serve(
    node: Arc<BrokerNode>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let clients = Arc::new(crate::clients::Clients::default());
    crate::clients::spawn_tasks(node.clone(), clients.clone());
    let messaging = MessagingServiceServer::new(Messaging { node: node.clone(), clients })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AdminServiceServer::new(Admin { node: node.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let raft = RaftServiceServer::new(RaftServer {
        group: node.config.broker_name.clone(),
        raft: node.raft.clone(),
        snapshot_root: node.config.data_dir.join("state").join("snapshots"),
    })
    .max_decoding_message_size(256 << 20)
    .max_encoding_message_size(256 << 20);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(messaging)
        .add_service(admin)
        .add_service(raft)
        .serve_with_shutdown(addr, shutdown)
        .await?;
    Ok(())
}
