//! Typed errors of the broker library.

use raftmq_proto::rocketmq::Code;

/// Clone: one failed proposal answers every request batched into it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("topic {0} not found")]
    TopicNotFound(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("message body of {size} bytes is larger than the limit of {limit} bytes")]
    BodyTooLarge { size: usize, limit: u32 },
    #[error("invalid receipt handle: {0}")]
    InvalidReceiptHandle(String),
    #[error("no leader for broker group {0} right now; retry")]
    NoLeader(String),
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Refused(String),
    #[error("illegal filter expression: {0}")]
    BadFilter(String),
    #[error("illegal delivery time: {0}")]
    BadDeliveryTime(String),
    #[error("invalid transaction: {0}")]
    TransactionNotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
}

impl BrokerError {
    /// The RocketMQ status code for a client. Only codes that the official
    /// Rust client 5.0.0 knows (it panics on others).
    pub fn code(&self) -> Code {
        match self {
            BrokerError::TopicNotFound(_) => Code::TopicNotFound,
            BrokerError::BadRequest(_) => Code::BadRequest,
            BrokerError::BodyTooLarge { .. } => Code::MessageBodyTooLarge,
            BrokerError::InvalidReceiptHandle(_) => Code::InvalidReceiptHandle,
            BrokerError::NoLeader(_) | BrokerError::Unreachable(..) => Code::HaNotAvailable,
            BrokerError::Timeout(_) => Code::ProxyTimeout,
            BrokerError::Refused(_) => Code::BadRequest,
            BrokerError::BadFilter(_) => Code::IllegalFilterExpression,
            BrokerError::BadDeliveryTime(_) => Code::IllegalDeliveryTime,
            BrokerError::TransactionNotFound(_) => Code::InvalidTransactionId,
            BrokerError::Unauthorized(_) => Code::Unauthorized,
            BrokerError::Forbidden(_) => Code::Forbidden,
            BrokerError::Corrupt(_) | BrokerError::Storage(_) | BrokerError::Raft(_) => Code::InternalError,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        match self {
            BrokerError::TopicNotFound(_) => tonic::Status::not_found(self.to_string()),
            BrokerError::BadRequest(_)
            | BrokerError::BodyTooLarge { .. }
            | BrokerError::InvalidReceiptHandle(_)
            | BrokerError::BadFilter(_)
            | BrokerError::BadDeliveryTime(_) => tonic::Status::invalid_argument(self.to_string()),
            BrokerError::Refused(_) | BrokerError::TransactionNotFound(_) => {
                tonic::Status::failed_precondition(self.to_string())
            }
            BrokerError::Unauthorized(_) => tonic::Status::unauthenticated(self.to_string()),
            BrokerError::Forbidden(_) => tonic::Status::permission_denied(self.to_string()),
            BrokerError::NoLeader(_) | BrokerError::Unreachable(..) => tonic::Status::unavailable(self.to_string()),
            BrokerError::Timeout(_) => tonic::Status::deadline_exceeded(self.to_string()),
            _ => tonic::Status::internal(self.to_string()),
        }
    }
}

impl From<raft_log::LogError> for BrokerError {
    fn from(e: raft_log::LogError) -> Self {
        if e.is_corruption() { BrokerError::Corrupt(e.to_string()) } else { BrokerError::Storage(e.to_string()) }
    }
}

impl From<rocksdb::Error> for BrokerError {
    fn from(e: rocksdb::Error) -> Self {
        BrokerError::Storage(format!("rocksdb: {e}"))
    }
}

impl From<std::io::Error> for BrokerError {
    fn from(e: std::io::Error) -> Self {
        BrokerError::Storage(e.to_string())
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
