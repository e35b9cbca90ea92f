//! Test-only: an in-process `MessagingService` that records what the client
//! sends and answers with canned data, to check the client's side of the
//! protocol (requests, headers, streams) without a broker.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use raftmq_proto::rocketmq as pb;
use raftmq_proto::rocketmq::messaging_service_server::MessagingService;
use raftmq_proto::rocketmq::messaging_service_server::MessagingServiceServer;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::headers::CLIENT_ID_HEADER;
use crate::pb_duration;
use crate::resource;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type TelemetryTx = mpsc::Sender<Result<pb::TelemetryCommand, Status>>;

/// Everything the mock saw, plus what it hands out.
#[derive(Default)]
pub(crate) struct State {
    /// (method, x-mq-client-id) of every call.
    pub calls: Vec<(&'static str, Option<String>)>,
    pub sends: Vec<pb::SendMessageRequest>,
    pub ends: Vec<pb::EndTransactionRequest>,
    pub acks: Vec<pb::AckMessageRequest>,
    pub changes: Vec<pb::ChangeInvisibleDurationRequest>,
    pub dead_letters: Vec<pb::ForwardMessageToDeadLetterQueueRequest>,
    pub heartbeats: Vec<pb::HeartbeatRequest>,
    pub terminations: Vec<pb::NotifyClientTerminationRequest>,
    pub receives: Vec<pb::ReceiveMessageRequest>,
    pub assignment_queries: Vec<pb::QueryAssignmentRequest>,
    /// Settings the clients sent over Telemetry.
    pub settings: Vec<pb::Settings>,
    /// Open Telemetry streams: (stream id, client id, sender).
    pub streams: Vec<(u64, String, TelemetryTx)>,
    next_stream: u64,
    /// Messages handed out by ReceiveMessage, front first.
    pub to_deliver: VecDeque<pb::Message>,
    /// The retry policy in Settings replies to consumers.
    pub retry: Option<pb::RetryPolicy>,
    /// QueryAssignment answer: (broker, queue id).
    pub assignment: Vec<(String, i32)>,
    /// The route: (broker, queue id).
    pub route: Vec<(String, i32)>,
    /// Stored messages per (broker, queue) for PullMessage / QueryOffset.
    pub stored: HashMap<(String, i32), Vec<pb::Message>>,
}

/// A message as the broker would deliver it.
pub(crate) fn delivered(topic: &str, id: &str, body: &str, queue: i32, offset: i64, attempt: i32) -> pb::Message {
    pb::Message {
        topic: resource(topic),
        user_properties: HashMap::new(),
        system_properties: Some(pb::SystemProperties {
            message_id: id.into(),
            body_encoding: pb::Encoding::Identity as i32,
            message_type: pb::MessageType::Normal as i32,
            receipt_handle: Some(format!("handle-{id}-{attempt}")),
            queue_id: queue,
            queue_offset: Some(offset),
            delivery_attempt: Some(attempt),
            ..Default::default()
        }),
        body: body.as_bytes().to_vec(),
    }
}

#[derive(Clone)]
pub(crate) struct Mock {
    pub state: Arc<Mutex<State>>,
}

fn ok() -> Option<pb::Status> {
    Some(pb::Status { code: pb::Code::Ok as i32, message: String::new() })
}

impl Mock {
    /// Starts the mock on a free local port; returns its address.
    pub async fn start() -> (String, Mock) {
        let mock = Mock { state: Arc::new(Mutex::new(State::default())) };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = MessagingServiceServer::new(mock.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (addr, mock)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn seen<T>(&self, method: &'static str, r: &Request<T>) {
        let id = r.metadata().get(CLIENT_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        self.lock().calls.push((method, id));
    }

    /// Pushes a command down every open Telemetry stream.
    pub async fn push(&self, cmd: pb::TelemetryCommand) {
        let txs: Vec<TelemetryTx> = self.lock().streams.iter().map(|(_, _, tx)| tx.clone()).collect();
        for tx in txs {
            let _ = tx.send(Ok(cmd.clone())).await;
        }
    }

    /// Ends every Telemetry stream from the server side.
    pub fn drop_streams(&self) {
        self.lock().streams.clear();
    }

    /// Waits until `f` holds (panics after 10 s).
    pub async fn wait_for(&self, what: &str, f: impl Fn(&State) -> bool) {
        for _ in 0..1000 {
            if f(&self.lock()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }
}

#[tonic::async_trait]
impl MessagingService for Mock {
    async fn query_route(&self, r: Request<pb::QueryRouteRequest>) -> Result<Response<pb::QueryRouteResponse>, Status> {
        self.seen("QueryRoute", &r);
        let topic = r.into_inner().topic;
        let message_queues = self
            .lock()
            .route
            .iter()
            .map(|(b, q)| pb::MessageQueue {
                topic: topic.clone(),
                id: *q,
                permission: pb::Permission::ReadWrite as i32,
                broker: Some(pb::Broker { name: b.clone(), id: 0, endpoints: None }),
                accept_message_types: vec![],
            })
            .collect();
        Ok(Response::new(pb::QueryRouteResponse { status: ok(), message_queues }))
    }

    async fn heartbeat(&self, r: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.seen("Heartbeat", &r);
        self.lock().heartbeats.push(r.into_inner());
        Ok(Response::new(pb::HeartbeatResponse { status: ok() }))
    }

    async fn send_message(
        &self,
        r: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        self.seen("SendMessage", &r);
        let req = r.into_inner();
        let entries = req
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let sp = m.system_properties.clone().unwrap_or_default();
                pb::SendResultEntry {
                    status: ok(),
                    transaction_id: if sp.message_type == pb::MessageType::Transaction as i32 {
                        format!("tx-{}", sp.message_id)
                    } else {
                        String::new()
                    },
                    message_id: sp.message_id,
                    offset: i as i64,
                    recall_handle: String::new(),
                }
            })
            .collect();
        self.lock().sends.push(req);
        Ok(Response::new(pb::SendMessageResponse { status: ok(), entries }))
    }

    async fn query_assignment(
        &self,
        r: Request<pb::QueryAssignmentRequest>,
    ) -> Result<Response<pb::QueryAssignmentResponse>, Status> {
        self.seen("QueryAssignment", &r);
        let req = r.into_inner();
        let mut st = self.lock();
        let assignments = st
            .assignment
            .iter()
            .map(|(b, q)| pb::Assignment {
                message_queue: Some(pb::MessageQueue {
                    topic: req.topic.clone(),
                    id: *q,
                    broker: Some(pb::Broker { name: b.clone(), id: 0, endpoints: None }),
                    ..Default::default()
                }),
            })
            .collect();
        st.assignment_queries.push(req);
        Ok(Response::new(pb::QueryAssignmentResponse { status: ok(), assignments }))
    }

    type ReceiveMessageStream = BoxStream<pb::ReceiveMessageResponse>;

    async fn receive_message(
        &self,
        r: Request<pb::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        self.seen("ReceiveMessage", &r);
        let req = r.into_inner();
        let n = req.batch_size.max(1) as usize;
        let got: Vec<pb::Message> = {
            let mut st = self.lock();
            st.receives.push(req);
            let k = n.min(st.to_deliver.len());
            st.to_deliver.drain(..k).collect()
        };
        if got.is_empty() {
            // A short long poll.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        use pb::receive_message_response::Content;
        let status = if got.is_empty() {
            pb::Status { code: pb::Code::MessageNotFound as i32, message: "none".into() }
        } else {
            ok().unwrap()
        };
        let mut items = vec![pb::ReceiveMessageResponse { content: Some(Content::Status(status)) }];
        items.extend(got.into_iter().map(|m| pb::ReceiveMessageResponse { content: Some(Content::Message(m)) }));
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    async fn ack_message(&self, r: Request<pb::AckMessageRequest>) -> Result<Response<pb::AckMessageResponse>, Status> {
        self.seen("AckMessage", &r);
        let req = r.into_inner();
        let entries = req
            .entries
            .iter()
            .map(|e| pb::AckMessageResultEntry {
                message_id: e.message_id.clone(),
                receipt_handle: e.receipt_handle.clone(),
                status: ok(),
            })
            .collect();
        self.lock().acks.push(req);
        Ok(Response::new(pb::AckMessageResponse { status: ok(), entries }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        r: Request<pb::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<pb::ForwardMessageToDeadLetterQueueResponse>, Status> {
        self.seen("ForwardMessageToDeadLetterQueue", &r);
        self.lock().dead_letters.push(r.into_inner());
        Ok(Response::new(pb::ForwardMessageToDeadLetterQueueResponse { status: ok() }))
    }

    type PullMessageStream = BoxStream<pb::PullMessageResponse>;

    async fn pull_message(
        &self,
        r: Request<pb::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        self.seen("PullMessage", &r);
        let req = r.into_inner();
        let mq = req.message_queue.unwrap_or_default();
        let key = (mq.broker.map(|b| b.name).unwrap_or_default(), mq.id);
        let start = req.offset.max(0) as usize;
        let msgs: Vec<pb::Message> = self
            .lock()
            .stored
            .get(&key)
            .map(|v| v.iter().skip(start).take(req.batch_size.max(1) as usize).cloned().collect())
            .unwrap_or_default();
        if msgs.is_empty() {
            let wait = req.long_polling_timeout.map(|d| crate::from_pb_duration(&d)).unwrap_or_default();
            tokio::time::sleep(wait.min(Duration::from_millis(200))).await;
        }
        use pb::pull_message_response::Content;
        let next = (start + msgs.len()) as i64;
        let status = if msgs.is_empty() {
            pb::Status { code: pb::Code::MessageNotFound as i32, message: "none".into() }
        } else {
            ok().unwrap()
        };
        let mut items = vec![pb::PullMessageResponse { content: Some(Content::Status(status)) }];
        items.extend(msgs.into_iter().map(|m| pb::PullMessageResponse { content: Some(Content::Message(m)) }));
        items.push(pb::PullMessageResponse { content: Some(Content::NextOffset(next)) });
        Ok(Response::new(Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))))
    }

    async fn update_offset(
        &self,
        _r: Request<pb::UpdateOffsetRequest>,
    ) -> Result<Response<pb::UpdateOffsetResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn get_offset(&self, _r: Request<pb::GetOffsetRequest>) -> Result<Response<pb::GetOffsetResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn query_offset(
        &self,
        r: Request<pb::QueryOffsetRequest>,
    ) -> Result<Response<pb::QueryOffsetResponse>, Status> {
        self.seen("QueryOffset", &r);
        let req = r.into_inner();
        let mq = req.message_queue.unwrap_or_default();
        let key = (mq.broker.map(|b| b.name).unwrap_or_default(), mq.id);
        let len = self.lock().stored.get(&key).map_or(0, Vec::len) as i64;
        let offset = if req.query_offset_policy == pb::QueryOffsetPolicy::End as i32 { len } else { 0 };
        Ok(Response::new(pb::QueryOffsetResponse { status: ok(), offset }))
    }

    async fn end_transaction(
        &self,
        r: Request<pb::EndTransactionRequest>,
    ) -> Result<Response<pb::EndTransactionResponse>, Status> {
        self.seen("EndTransaction", &r);
        self.lock().ends.push(r.into_inner());
        Ok(Response::new(pb::EndTransactionResponse { status: ok() }))
    }

    type TelemetryStream = BoxStream<pb::TelemetryCommand>;

    async fn telemetry(
        &self,
        r: Request<tonic::Streaming<pb::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        self.seen("Telemetry", &r);
        let client_id =
            r.metadata().get(CLIENT_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default();
        let mut inbound = r.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let id = {
            let mut st = self.lock();
            st.next_stream += 1;
            let id = st.next_stream;
            st.streams.push((id, client_id, tx));
            id
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(cmd)) = inbound.message().await {
                let Some(pb::telemetry_command::Command::Settings(s)) = cmd.command else { continue };
                let (reply, tx) = {
                    let mut st = state.lock().unwrap();
                    st.settings.push(s.clone());
                    let mut reply = s;
                    if matches!(reply.pub_sub, Some(pb::settings::PubSub::Subscription(_))) {
                        reply.backoff_policy = st.retry.clone();
                        if let Some(pb::settings::PubSub::Subscription(sub)) = reply.pub_sub.as_mut() {
                            sub.fifo = Some(false);
                            sub.long_polling_timeout = Some(pb_duration(Duration::from_secs(1)));
                        }
                    }
                    let Some(tx) = st.streams.iter().find(|(i, _, _)| *i == id).map(|(_, _, tx)| tx.clone()) else {
                        return;
                    };
                    (reply, tx)
                };
                let cmd = pb::TelemetryCommand {
                    status: ok(),
                    command: Some(pb::telemetry_command::Command::Settings(reply)),
                };
                if tx.send(Ok(cmd)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn notify_client_termination(
        &self,
        r: Request<pb::NotifyClientTerminationRequest>,
    ) -> Result<Response<pb::NotifyClientTerminationResponse>, Status> {
        self.seen("NotifyClientTermination", &r);
        self.lock().terminations.push(r.into_inner());
        Ok(Response::new(pb::NotifyClientTerminationResponse { status: ok() }))
    }

    async fn change_invisible_duration(
        &self,
        r: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<pb::ChangeInvisibleDurationResponse>, Status> {
        self.seen("ChangeInvisibleDuration", &r);
        let req = r.into_inner();
        let receipt_handle = format!("{}-changed", req.receipt_handle);
        self.lock().changes.push(req);
        Ok(Response::new(pb::ChangeInvisibleDurationResponse { status: ok(), receipt_handle }))
    }

    async fn recall_message(
        &self,
        _r: Request<pb::RecallMessageRequest>,
    ) -> Result<Response<pb::RecallMessageResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }

    async fn sync_lite_subscription(
        &self,
        _r: Request<pb::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<pb::SyncLiteSubscriptionResponse>, Status> {
        Err(Status::unimplemented("mock"))
    }
}
