//! What identifies this client to the broker: the `x-mq-client-id` header
//! (plus language and protocol headers) on every call, the access point and
//! the user agent in Settings.

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use raftmq_proto::rocketmq as pb;
use tonic::metadata::AsciiMetadataValue;

use crate::ClientError;
use crate::Result;

/// The header the broker keys per-client state (Telemetry streams,
/// assignments, held messages) by.
pub const CLIENT_ID_HEADER: &str = "x-mq-client-id";

static CLIENT_SEQ: AtomicU64 = AtomicU64::new(0);

/// This machine's host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`, or
/// `localhost`).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A new client id, unique per client instance: `host@pid@counter@nanos`
/// (nanoseconds since the epoch in base 36), like the official Python
/// client's `host@pid@index@time`.
pub fn new_client_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let host: String = hostname().chars().map(|c| if c.is_ascii_graphic() && c != '@' { c } else { '_' }).collect();
    format!("{host}@{}@{}@{}", std::process::id(), CLIENT_SEQ.fetch_add(1, Ordering::Relaxed), base36(nanos))
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// An access key and its secret, for a broker with ACL on.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("access_key", &self.access_key).finish_non_exhaustive()
    }
}

static CREDENTIALS: std::sync::RwLock<Option<Credentials>> = std::sync::RwLock::new(None);

/// Signs the requests of every client made after this call (process-wide),
/// as the official clients do: `authorization: MQv2-HMAC-SHA1
/// Credential=<ak>, SignedHeaders=x-mq-date-time, Signature=<hex>`. Without
/// a call, `RAFTMQ_ACCESS_KEY` and `RAFTMQ_SECRET_KEY` are used when both
/// are set; otherwise requests are not signed.
pub fn set_credentials(c: Option<Credentials>) {
    *CREDENTIALS.write().unwrap_or_else(|e| e.into_inner()) = c;
}

fn credentials() -> Option<Credentials> {
    if let Some(c) = CREDENTIALS.read().unwrap_or_else(|e| e.into_inner()).clone() {
        return Some(c);
    }
    match (std::env::var("RAFTMQ_ACCESS_KEY"), std::env::var("RAFTMQ_SECRET_KEY")) {
        (Ok(access_key), Ok(secret_key)) if !access_key.is_empty() => Some(Credentials { access_key, secret_key }),
        _ => None,
    }
}

/// Adds the client headers to every request of a stub.
#[derive(Clone)]
pub(crate) struct Headers {
    client_id: AsciiMetadataValue,
    credentials: Option<Credentials>,
}

impl Headers {
    pub(crate) fn new(client_id: &str) -> Result<Self> {
        let client_id = client_id
            .parse()
            .map_err(|_| ClientError::Input(format!("client id {client_id:?} is not a valid header value")))?;
        Ok(Self { client_id, credentials: credentials() })
    }
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        md.insert(CLIENT_ID_HEADER, self.client_id.clone());
        md.insert("x-mq-language", AsciiMetadataValue::from_static("RUST"));
        md.insert("x-mq-protocol", AsciiMetadataValue::from_static("GRPC_V2"));
        md.insert("x-mq-client-version", AsciiMetadataValue::from_static(env!("CARGO_PKG_VERSION")));
        if let Some(c) = &self.credentials {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis());
            let date = raftmq_proto::auth::format_date_time(now.unwrap_or(0) as u64);
            let auth = raftmq_proto::auth::sign(&c.access_key, &c.secret_key, &date);
            match (date.parse(), auth.parse()) {
                (Ok(d), Ok(a)) => {
                    md.insert(raftmq_proto::auth::DATE_TIME_HEADER, d);
                    md.insert(raftmq_proto::auth::AUTHORIZATION_HEADER, a);
                }
                _ => return Err(tonic::Status::invalid_argument("credentials are not valid header values")),
            }
        }
        Ok(req)
    }
}

/// `host:port` strings as the protocol's `Endpoints` (scheme from the first
/// host: IPv4, IPv6 or domain name).
pub(crate) fn access_point(addrs: &[String]) -> pb::Endpoints {
    let addresses: Vec<pb::Address> = addrs
        .iter()
        .map(|a| {
            let (host, port) = match a.rsplit_once(':') {
                Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse().unwrap_or(0)),
                None => (a.clone(), 0),
            };
            pb::Address { host, port }
        })
        .collect();
    let scheme = match addresses.first().and_then(|a| a.host.parse::<IpAddr>().ok()) {
        Some(IpAddr::V4(_)) => pb::AddressScheme::IPv4,
        Some(IpAddr::V6(_)) => pb::AddressScheme::IPv6,
        None => pb::AddressScheme::DomainName,
    };
    pb::Endpoints { scheme: scheme as i32, addresses }
}

/// The user agent sent in Settings.
pub(crate) fn user_agent() -> pb::Ua {
    pb::Ua {
        language: pb::Language::Rust as i32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        platform: std::env::consts::OS.to_string(),
        hostname: hostname(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print_the_secret() {
        let c = Credentials { access_key: "AK1".into(), secret_key: "SK1".into() };
        assert!(!format!("{c:?}").contains("SK1"), "the secret never prints");
    }

    #[test]
    fn client_ids_are_unique_and_valid_headers() {
        let a = new_client_id();
        let b = new_client_id();
        assert_ne!(a, b);
        assert_eq!(a.split('@').count(), 4, "{a}");
        assert!(Headers::new(&a).is_ok());
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }

    #[test]
    fn access_point_schemes() {
        let e = access_point(&["127.0.0.1:8081".into(), "127.0.0.1:8082".into()]);
        assert_eq!(e.scheme, pb::AddressScheme::IPv4 as i32);
        assert_eq!(e.addresses[1], pb::Address { host: "127.0.0.1".into(), port: 8082 });
        assert_eq!(access_point(&["[::1]:80".into()]).scheme, pb::AddressScheme::IPv6 as i32);
        assert_eq!(access_point(&["mq.local:80".into()]).scheme, pb::AddressScheme::DomainName as i32);
    }
}
