//! How a request to the client API is signed (ACL), as the official
//! RocketMQ 5 clients do it: `authorization: MQv2-HMAC-SHA1
//! Credential=<access key>, SignedHeaders=x-mq-date-time, Signature=<hex>`,
//! the lower-case hex HMAC-SHA1 of the `x-mq-date-time` value keyed with the
//! secret key. Shared by the client (signing) and the broker (checking,
//! `raftmq_broker::acl`).

use hmac::Hmac;
use hmac::Mac;
use sha1::Sha1;

/// gRPC metadata key of the signed authorization header.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// gRPC metadata key of the signed date-time header.
pub const DATE_TIME_HEADER: &str = "x-mq-date-time";
/// The only supported authorization method.
pub const AUTH_METHOD: &str = "MQv2-HMAC-SHA1";
/// Length of an HMAC-SHA1 digest, bytes.
pub const SIG_LEN: usize = 20;

/// HMAC-SHA1 of `msg` keyed with `key`.
pub fn hmac_sha1(key: &[u8], msg: &[u8]) -> [u8; SIG_LEN] {
    // HMAC accepts keys of any length (long keys are hashed), so this never
    // fails whatever the key.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC-SHA1 accepts keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Lower-case hex, as the official clients write it.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Builds the `authorization` header value the clients send for
/// `x-mq-date-time: date_time` (lower-case hex signature).
pub fn sign(access_key: &str, secret_key: &str, date_time: &str) -> String {
    let signature = encode_hex(&hmac_sha1(secret_key.as_bytes(), date_time.as_bytes()));
    format!("{AUTH_METHOD} Credential={access_key}, SignedHeaders={DATE_TIME_HEADER}, Signature={signature}")
}

/// Formats Unix ms as an `x-mq-date-time` value in UTC, `20231122T051833Z`.
pub fn format_date_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian, H. Hinnant).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_official_python_client() {
        // The header the Python client 5.1.2 built for AK1/SK1 at 2023-11-22 05:18:33 UTC.
        assert_eq!(format_date_time(1_700_630_313_000), "20231122T051833Z");
        assert_eq!(format_date_time(0), "19700101T000000Z");
        assert_eq!(format_date_time(951_782_400_000), "20000229T000000Z");
        assert_eq!(
            sign("AK1", "SK1", "20231122T051833Z"),
            "MQv2-HMAC-SHA1 Credential=AK1, SignedHeaders=x-mq-date-time, Signature=e9dca337740d7182208d7cedee546eff7aa170d0"
        );
    }
}
