//! Access control (ACL) for the client API.
//!
//! RocketMQ 5 gRPC clients sign every request: they put the current time in
//! the `x-mq-date-time` metadata header and send
//!
//! ```text
//! authorization: MQv2-HMAC-SHA1 Credential=<accessKey>, SignedHeaders=x-mq-date-time, Signature=<hex>
//! ```
//!
//! where `<hex>` is the hex HMAC-SHA1 of the `x-mq-date-time` value keyed with
//! the account's secret key (the official clients write lower-case hex; both
//! cases are accepted). This module
//!
//! * holds the `[acl]` section of the broker config ([`AclConfig`]),
//! * builds an [`Acl`] from it once, validating every permission string,
//! * authenticates a request ([`Acl::check`]): parses the header, looks up the
//!   access key, verifies the signature in constant time and (optionally)
//!   bounds the clock difference between the client's date-time and the
//!   broker's clock,
//! * authorizes it: the account must hold the requested [`Action`] (PUB or
//!   SUB) on every [`Resource`] (topic or consumer group) of the request.
//!   Admin accounts may do everything.
//!
//! When `enabled` is false (the default) [`Acl::check`] allows every request
//! without looking at its headers; clients such as the Python one send the
//! header even with empty credentials, and that must not matter then.
//!
//! Accepted `x-mq-date-time` formats (only needed for the clock-skew check;
//! the signature covers the value as sent):
//! * `20231122T051833Z` (Python and Java clients). Note: the Python client
//!   formats its *local* time with a `Z` suffix, so on a client host whose
//!   time zone is not UTC the stamp is off by the UTC offset. Set
//!   `max_clock_skew_ms = 0` if such clients must connect.
//! * RFC 3339 such as `2023-11-22T13:18:33.123456789+08:00` (official Rust
//!   crate).

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fmt;

use serde::Deserialize;
use serde::Serialize;

pub use raftmq_proto::auth::AUTH_METHOD;
pub use raftmq_proto::auth::AUTHORIZATION_HEADER;
pub use raftmq_proto::auth::DATE_TIME_HEADER;
use raftmq_proto::auth::SIG_LEN;
#[cfg(test)]
use raftmq_proto::auth::encode_hex;
pub use raftmq_proto::auth::format_date_time;
use raftmq_proto::auth::hmac_sha1;
pub use raftmq_proto::auth::sign;
/// Longest accepted `authorization` or `x-mq-date-time` value, bytes.
pub const MAX_HEADER_LEN: usize = 1024;

/// `[acl]` table of the broker's TOML config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// Verify signatures and permissions. Default: false (off; every request
    /// allowed).
    pub enabled: bool,
    /// Max allowed difference between `x-mq-date-time` and the broker's
    /// clock, ms. Default 900000 (15 min). 0 disables the check.
    pub max_clock_skew_ms: u64,
    /// The accounts. Access keys must be unique. Default: none.
    pub accounts: Vec<Account>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig { enabled: false, max_clock_skew_ms: 900_000, accounts: Vec::new() }
    }
}

/// One account (`[[acl.accounts]]`).
///
/// `Debug` prints the secret key as `<redacted>`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Account {
    /// The access key clients put in `Credential=`. Required, unique; no
    /// whitespace, `,` or `/`.
    pub access_key: String,
    /// The HMAC key. Required (non-empty).
    pub secret_key: String,
    /// Admin accounts may do everything. Default false.
    pub admin: bool,
    /// Permission on topics not listed in `topics`: "DENY" | "PUB" | "SUB" |
    /// "PUB|SUB". Default "DENY".
    pub default_topic_perm: String,
    /// Permission on groups not listed in `groups`; same values (consumer
    /// groups need SUB). Default "DENY".
    pub default_group_perm: String,
    /// Per-topic permissions: entries like "orders=PUB|SUB". Default: none.
    pub topics: Vec<String>,
    /// Per-group permissions: entries like "billing=SUB". Default: none.
    pub groups: Vec<String>,
}

impl Default for Account {
    fn default() -> Self {
        Account {
            access_key: String::new(),
            secret_key: String::new(),
            admin: false,
            default_topic_perm: "DENY".to_string(),
            default_group_perm: "DENY".to_string(),
            topics: Vec::new(),
            groups: Vec::new(),
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("admin", &self.admin)
            .field("default_topic_perm", &self.default_topic_perm)
            .field("default_group_perm", &self.default_group_perm)
            .field("topics", &self.topics)
            .field("groups", &self.groups)
            .finish()
    }
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Send messages.
    Pub,
    /// Receive / ack messages, query offsets.
    Sub,
}

impl Action {
    fn bit(self) -> u8 {
        match self {
            Action::Pub => PERM_PUB,
            Action::Sub => PERM_SUB,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Pub => "PUB",
            Action::Sub => "SUB",
        })
    }
}

/// What a request acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource<'a> {
    Topic(&'a str),
    Group(&'a str),
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Topic(name) => write!(f, "topic {name}"),
            Resource::Group(name) => write!(f, "group {name}"),
        }
    }
}

/// Why a request or a config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    /// Missing or malformed header, unknown access key, bad signature, clock
    /// skew.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The signature is fine but the account lacks the permission.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Invalid `[acl]` configuration.
    #[error("invalid [acl] config: {0}")]
    Config(String),
}

const PERM_PUB: u8 = 1;
const PERM_SUB: u8 = 2;

/// A parsed permission: a set of [`Action`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Perm(u8);

impl Perm {
    fn allows(self, action: Action) -> bool {
        self.0 & action.bit() != 0
    }
}

/// Parses "DENY", "PUB", "SUB", "PUB|SUB" (case-insensitive, either order,
/// spaces around `|` allowed).
fn parse_perm(s: &str) -> Result<Perm, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("DENY") {
        return Ok(Perm(0));
    }
    let mut bits = 0u8;
    for token in s.split('|') {
        let token = token.trim();
        let bit = if token.eq_ignore_ascii_case("PUB") {
            PERM_PUB
        } else if token.eq_ignore_ascii_case("SUB") {
            PERM_SUB
        } else {
            return Err(format!("unknown permission {s:?} (expected DENY, PUB, SUB or PUB|SUB)"));
        };
        bits |= bit;
    }
    Ok(Perm(bits))
}

/// Secret key bytes; `Debug` never prints them.
#[derive(Clone)]
struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
struct AccountEntry {
    secret: Secret,
    admin: bool,
    default_topic: Perm,
    default_group: Perm,
    topics: HashMap<String, Perm>,
    groups: HashMap<String, Perm>,
}

/// The access-control checker, built once from [`AclConfig`].
#[derive(Debug, Clone)]
pub struct Acl {
    enabled: bool,
    max_clock_skew_ms: u64,
    accounts: HashMap<String, AccountEntry>,
}

/// Parses the `topics` / `groups` list of one account.
fn parse_resource_perms(access_key: &str, field: &str, entries: &[String]) -> Result<HashMap<String, Perm>, AclError> {
    let mut map = HashMap::with_capacity(entries.len());
    for entry in entries {
        let Some((name, perm)) = entry.split_once('=') else {
            return Err(AclError::Config(format!(
                "account {access_key}: {field} entry {entry:?} is not NAME=PERM (e.g. \"orders=PUB|SUB\")"
            )));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(AclError::Config(format!("account {access_key}: {field} entry {entry:?} has an empty name")));
        }
        let perm = parse_perm(perm)
            .map_err(|e| AclError::Config(format!("account {access_key}: {field} entry {entry:?}: {e}")))?;
        match map.entry(name.to_string()) {
            MapEntry::Occupied(_) => {
                return Err(AclError::Config(format!("account {access_key}: {field} lists {name} more than once")));
            }
            MapEntry::Vacant(v) => {
                v.insert(perm);
            }
        }
    }
    Ok(map)
}

impl Acl {
    /// Validates the config (permission strings, unique non-empty access
    /// keys, non-empty secret keys, at least one account when enabled) and
    /// builds the checker. Accounts are validated even when ACL is off.
    pub fn new(cfg: &AclConfig) -> Result<Acl, AclError> {
        let mut accounts = HashMap::with_capacity(cfg.accounts.len());
        for (i, account) in cfg.accounts.iter().enumerate() {
            let ak = account.access_key.as_str();
            if ak.is_empty() {
                return Err(AclError::Config(format!("account #{} has an empty access_key", i + 1)));
            }
            if ak.len() > MAX_HEADER_LEN
                || ak.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '/')
            {
                return Err(AclError::Config(format!(
                    "access_key {ak:?} may not contain whitespace, control characters, ',' or '/'"
                )));
            }
            if account.secret_key.is_empty() {
                return Err(AclError::Config(format!("account {ak}: secret_key is empty")));
            }
            let default_topic = parse_perm(&account.default_topic_perm)
                .map_err(|e| AclError::Config(format!("account {ak}: default_topic_perm: {e}")))?;
            let default_group = parse_perm(&account.default_group_perm)
                .map_err(|e| AclError::Config(format!("account {ak}: default_group_perm: {e}")))?;
            let topics = parse_resource_perms(ak, "topics", &account.topics)?;
            let groups = parse_resource_perms(ak, "groups", &account.groups)?;
            let entry = AccountEntry {
                secret: Secret(account.secret_key.as_bytes().to_vec()),
                admin: account.admin,
                default_topic,
                default_group,
                topics,
                groups,
            };
            match accounts.entry(ak.to_string()) {
                MapEntry::Occupied(_) => {
                    return Err(AclError::Config(format!("access_key {ak} is configured more than once")));
                }
                MapEntry::Vacant(v) => {
                    v.insert(entry);
                }
            }
        }
        if cfg.enabled && accounts.is_empty() {
            return Err(AclError::Config(
                "enabled = true but no accounts are configured; every request would be refused".to_string(),
            ));
        }
        Ok(Acl { enabled: cfg.enabled, max_clock_skew_ms: cfg.max_clock_skew_ms, accounts })
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Checks the request headers (`authorization`, `x-mq-date-time`) and
    /// that the account may do `action` on every resource in `resources`
    /// (an empty slice only authenticates). `now_ms` is the broker's clock,
    /// Unix ms. Returns the access key on success (`None` when ACL is off).
    pub fn check(
        &self,
        authorization: Option<&str>,
        date_time: Option<&str>,
        now_ms: u64,
        action: Action,
        resources: &[Resource<'_>],
    ) -> Result<Option<String>, AclError> {
        if !self.enabled {
            return Ok(None);
        }
        let authorization = authorization.ok_or_else(|| {
            AclError::Unauthenticated(format!(
                "missing {AUTHORIZATION_HEADER} header; configure the client's access key and secret key"
            ))
        })?;
        let auth = parse_authorization(authorization)?;
        let date_time = date_time.ok_or_else(|| {
            AclError::Unauthenticated(format!("missing {DATE_TIME_HEADER} header (the signed value)"))
        })?;
        if date_time.len() > MAX_HEADER_LEN {
            return Err(AclError::Unauthenticated(format!(
                "{DATE_TIME_HEADER} header is {} bytes, over the {MAX_HEADER_LEN}-byte limit",
                date_time.len()
            )));
        }
        if date_time.is_empty() {
            return Err(AclError::Unauthenticated(format!("{DATE_TIME_HEADER} header is empty")));
        }
        let ak = auth.access_key;
        let account =
            self.accounts.get(ak).ok_or_else(|| AclError::Unauthenticated(format!("access key {ak} is unknown")))?;

        let expected = hmac_sha1(&account.secret.0, date_time.as_bytes());
        if !constant_time_eq(&expected, &auth.signature) {
            return Err(AclError::Unauthenticated(format!(
                "signature does not match for access key {ak} (wrong secret key?)"
            )));
        }

        if self.max_clock_skew_ms > 0 {
            let client_ms = parse_date_time(date_time).ok_or_else(|| {
                AclError::Unauthenticated(format!(
                    "{DATE_TIME_HEADER} {date_time:?} is not a recognised date-time \
                     (expected e.g. 20231122T051833Z or RFC 3339)"
                ))
            })?;
            let skew = (i128::from(now_ms) - i128::from(client_ms)).unsigned_abs();
            if skew > u128::from(self.max_clock_skew_ms) {
                return Err(AclError::Unauthenticated(format!(
                    "{DATE_TIME_HEADER} {date_time} differs from the broker clock by {skew} ms \
                     (limit {} ms); check the client's clock and time zone",
                    self.max_clock_skew_ms
                )));
            }
        }

        if !account.admin {
            for resource in resources {
                let perm = match resource {
                    Resource::Topic(name) => account.topics.get(*name).copied().unwrap_or(account.default_topic),
                    Resource::Group(name) => account.groups.get(*name).copied().unwrap_or(account.default_group),
                };
                if !perm.allows(action) {
                    return Err(AclError::Forbidden(format!("account {ak} may not {action} {resource}")));
                }
            }
        }
        Ok(Some(ak.to_string()))
    }
}

/// The parts of an `authorization` header that matter.
struct ParsedAuth<'a> {
    access_key: &'a str,
    signature: [u8; SIG_LEN],
}

fn malformed(detail: impl fmt::Display) -> AclError {
    AclError::Unauthenticated(format!("malformed {AUTHORIZATION_HEADER} header: {detail}"))
}

/// Parses `MQv2-HMAC-SHA1 Credential=AK, SignedHeaders=x-mq-date-time,
/// Signature=HEX`. Like the Java proxy, a credential of the form `AK/...`
/// yields `AK`, and unknown items are ignored. `SignedHeaders`, if present,
/// must include `x-mq-date-time`.
fn parse_authorization(header: &str) -> Result<ParsedAuth<'_>, AclError> {
    if header.len() > MAX_HEADER_LEN {
        return Err(AclError::Unauthenticated(format!(
            "{AUTHORIZATION_HEADER} header is {} bytes, over the {MAX_HEADER_LEN}-byte limit",
            header.len()
        )));
    }
    let header = header.trim();
    let (method, rest) = match header.split_once(char::is_whitespace) {
        Some((method, rest)) => (method, rest),
        None => (header, ""),
    };
    if method != AUTH_METHOD {
        return Err(AclError::Unauthenticated(format!(
            "unsupported {AUTHORIZATION_HEADER} method {method:?} (expected {AUTH_METHOD})"
        )));
    }
    let mut credential: Option<&str> = None;
    let mut signed_headers: Option<&str> = None;
    let mut signature: Option<&str> = None;
    for item in rest.split(',') {
        let item = item.trim();
        let Some((key, value)) = item.split_once('=') else {
            return Err(malformed(format_args!("item {item:?} is not KEY=VALUE")));
        };
        let slot = match key.trim() {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => continue,
        };
        if slot.is_some() {
            return Err(malformed(format_args!("{} appears more than once", key.trim())));
        }
        *slot = Some(value.trim());
    }
    let credential = credential.ok_or_else(|| malformed("no Credential"))?;
    let access_key = credential.split('/').next().unwrap_or("").trim();
    if access_key.is_empty() {
        return Err(AclError::Unauthenticated(
            "the request carries an empty access key (Credential=); configure the client's \
             access key and secret key"
                .to_string(),
        ));
    }
    let lacks_date = |signed: &&str| !signed.split(';').any(|h| h.trim().eq_ignore_ascii_case(DATE_TIME_HEADER));
    if let Some(signed) = signed_headers.filter(lacks_date) {
        return Err(malformed(format_args!("SignedHeaders={signed:?} does not include {DATE_TIME_HEADER}")));
    }
    let signature = signature.ok_or_else(|| malformed("no Signature"))?;
    let signature = decode_hex_sig(signature)
        .ok_or_else(|| malformed(format_args!("Signature must be {} hex digits", SIG_LEN * 2)))?;
    Ok(ParsedAuth { access_key, signature })
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8; SIG_LEN], b: &[u8; SIG_LEN]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes exactly 40 hex digits (either case).
fn decode_hex_sig(s: &str) -> Option<[u8; SIG_LEN]> {
    let bytes = s.as_bytes();
    if bytes.len() != SIG_LEN * 2 {
        return None;
    }
    let mut out = [0u8; SIG_LEN];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
    }
    Some(out)
}

/// Parses an `x-mq-date-time` value to Unix ms: `YYYYMMDDTHHMMSSZ` or
/// RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`). `None` if it is
/// neither.
pub fn parse_date_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() > 64 {
        return None;
    }
    if b.len() == 16 && b[8] == b'T' && b[15] == b'Z' {
        let year = num(&b[0..4])?;
        let month = num(&b[4..6])?;
        let day = num(&b[6..8])?;
        let hour = num(&b[9..11])?;
        let min = num(&b[11..13])?;
        let sec = num(&b[13..15])?;
        return to_unix_ms(year, month, day, hour, min, sec, 0, 0);
    }
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = num(&b[0..4])?;
    let month = num(&b[5..7])?;
    let day = num(&b[8..10])?;
    let hour = num(&b[11..13])?;
    let min = num(&b[14..16])?;
    let sec = num(&b[17..19])?;
    let mut rest = &b[19..];
    let mut millis = 0i64;
    if let Some((&b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        for i in 0..3 {
            millis = millis * 10 + frac.get(i).filter(|_| i < n).map_or(0, |c| i64::from(c - b'0'));
        }
        rest = &frac[n..];
    }
    let offset_min = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = num(&[*h1, *h2])?;
            let m = num(&[*m1, *m2])?;
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 60 + m;
            if *sign == b'-' { -off } else { off }
        }
        _ => return None,
    };
    to_unix_ms(year, month, day, hour, min, sec, millis, offset_min)
}

/// All-digit slice to a number.
fn num(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |acc, c| acc * 10 + i64::from(c - b'0')))
}

#[allow(clippy::too_many_arguments)]
fn to_unix_ms(
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    min: i64,
    sec: i64,
    millis: i64,
    offset_min: i64,
) -> Option<i64> {
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    // 60 allows a leap second.
    if hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_min * 60;
    Some(secs * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2023-11-22T05:18:33Z.
    const NOW: u64 = 1_700_630_313_000;
    const DATE: &str = "20231122T051833Z";

    fn account(ak: &str, sk: &str) -> Account {
        Account { access_key: ak.to_string(), secret_key: sk.to_string(), ..Account::default() }
    }

    fn acl_with(accounts: Vec<Account>) -> Acl {
        Acl::new(&AclConfig { enabled: true, accounts, ..AclConfig::default() }).expect("valid config")
    }

    fn unauth(r: Result<Option<String>, AclError>) -> String {
        match r {
            Err(AclError::Unauthenticated(msg)) => msg,
            other => panic!("expected Unauthenticated, got {other:?}"),
        }
    }

    fn forbidden(r: Result<Option<String>, AclError>) -> String {
        match r {
            Err(AclError::Forbidden(msg)) => msg,
            other => panic!("expected Forbidden, got {other:?}"),
        }
    }

    fn config_err(cfg: &AclConfig) -> String {
        match Acl::new(cfg) {
            Err(AclError::Config(msg)) => msg,
            other => panic!("expected Config error, got {other:?}"),
        }
    }

    #[test]
    fn known_vector() {
        // python3: hmac.new(b'secret', b'20231122T051833Z', hashlib.sha1).hexdigest()
        assert_eq!(encode_hex(&hmac_sha1(b"secret", DATE.as_bytes())), "a6e942c1511bf56825c8e9de99f1d0c18a0d0679");
        // python3: hmac.new(b'SK1', b'2023-11-22T13:18:33.123456789+08:00', hashlib.sha1).hexdigest()
        assert_eq!(
            encode_hex(&hmac_sha1(b"SK1", b"2023-11-22T13:18:33.123456789+08:00")),
            "599623b14aed6b4a5cab792bd2d2a8a6196164de"
        );
        assert_eq!(
            sign("AK", "secret", DATE),
            "MQv2-HMAC-SHA1 Credential=AK, SignedHeaders=x-mq-date-time, \
             Signature=a6e942c1511bf56825c8e9de99f1d0c18a0d0679"
        );
    }

    #[test]
    fn python_client_header() {
        // Built exactly as rocketmq/v5/util/signature.py Signature.metadata does.
        let (ak, sk) = ("AK1", "SK1");
        let sig = encode_hex(&hmac_sha1(sk.as_bytes(), DATE.as_bytes()));
        let header = "MQv2-HMAC-SHA1".to_string()
            + " "
            + "Credential"
            + "="
            + ak
            + ", "
            + "SignedHeaders"
            + "="
            + "x-mq-date-time"
            + ", "
            + "Signature"
            + "="
            + &sig;
        // Captured from the Python client (5.1.2) with datetime.now() pinned
        // to 2023-11-22 05:18:33 and Credentials('AK1', 'SK1').
        let captured = "MQv2-HMAC-SHA1 Credential=AK1, SignedHeaders=x-mq-date-time, \
                        Signature=e9dca337740d7182208d7cedee546eff7aa170d0";
        assert_eq!(header, captured);
        assert_eq!(sign(ak, sk, DATE), captured);
        let acl = acl_with(vec![Account { admin: true, ..account(ak, sk) }]);
        let got = acl.check(Some(captured), Some(DATE), NOW, Action::Pub, &[Resource::Topic("t")]);
        assert_eq!(got, Ok(Some("AK1".to_string())));
    }

    #[test]
    fn python_client_empty_credentials() {
        // Python with Credentials(): it still sends the header.
        let captured = "MQv2-HMAC-SHA1 Credential=, SignedHeaders=x-mq-date-time, \
                        Signature=b7cb735f0921295827df26923ddbddf18ad9857e";
        let off = Acl::new(&AclConfig::default()).expect("default config");
        assert_eq!(off.check(Some(captured), Some(DATE), NOW, Action::Sub, &[]), Ok(None));
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let msg = unauth(acl.check(Some(captured), Some(DATE), NOW, Action::Sub, &[]));
        assert!(msg.contains("empty access key"), "{msg}");
    }

    #[test]
    fn rust_crate_rfc3339_header() {
        let date = "2023-11-22T13:18:33.123456789+08:00";
        let acl = acl_with(vec![Account { admin: true, ..account("AK1", "SK1") }]);
        let header = sign("AK1", "SK1", date);
        assert!(header.ends_with("599623b14aed6b4a5cab792bd2d2a8a6196164de"));
        assert_eq!(acl.check(Some(&header), Some(date), NOW, Action::Pub, &[]), Ok(Some("AK1".to_string())));
    }

    #[test]
    fn roundtrip_and_uppercase_hex() {
        let acl = acl_with(vec![Account { admin: true, ..account("AK1", "SK1") }]);
        let header = sign("AK1", "SK1", DATE);
        assert_eq!(
            acl.check(Some(&header), Some(DATE), NOW, Action::Pub, &[Resource::Topic("x")]),
            Ok(Some("AK1".to_string()))
        );
        let (prefix, hex) = header.split_at(header.len() - 40);
        let upper = format!("{prefix}{}", hex.to_ascii_uppercase());
        assert_ne!(upper, header);
        assert_eq!(acl.check(Some(&upper), Some(DATE), NOW, Action::Pub, &[]), Ok(Some("AK1".to_string())));
        // Credential=AK/suffix (Java proxy compatible) and extra spaces.
        let loose = format!("  MQv2-HMAC-SHA1   Credential = AK1/x ,SignedHeaders=x-mq-date-time,  Signature={hex} ");
        assert_eq!(acl.check(Some(&loose), Some(DATE), NOW, Action::Pub, &[]), Ok(Some("AK1".to_string())));
    }

    #[test]
    fn wrong_secret_and_tampered_date() {
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let header = sign("AK1", "other", DATE);
        let msg = unauth(acl.check(Some(&header), Some(DATE), NOW, Action::Pub, &[]));
        assert!(msg.contains("signature does not match"), "{msg}");
        let header = sign("AK1", "SK1", DATE);
        let msg = unauth(acl.check(Some(&header), Some("20231122T051834Z"), NOW, Action::Pub, &[]));
        assert!(msg.contains("signature does not match"), "{msg}");
    }

    #[test]
    fn unknown_key() {
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let header = sign("AK2", "SK1", DATE);
        let msg = unauth(acl.check(Some(&header), Some(DATE), NOW, Action::Pub, &[]));
        assert!(msg.contains("access key AK2 is unknown"), "{msg}");
    }

    #[test]
    fn malformed_headers() {
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let good_sig = encode_hex(&hmac_sha1(b"SK1", DATE.as_bytes()));
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "method"),
            ("Basic abc".to_string(), "unsupported"),
            ("MQv2-HMAC-SHA1".to_string(), "not KEY=VALUE"),
            (format!("MQv1-HMAC-SHA1 Credential=AK1, Signature={good_sig}"), "unsupported"),
            (format!("MQv2-HMAC-SHA1 Signature={good_sig}"), "no Credential"),
            ("MQv2-HMAC-SHA1 Credential=AK1".to_string(), "no Signature"),
            (format!("MQv2-HMAC-SHA1 Credential=AK1, garbage, Signature={good_sig}"), "not KEY=VALUE"),
            (format!("MQv2-HMAC-SHA1 Credential=AK1, Credential=AK1, Signature={good_sig}"), "more than once"),
            (
                format!("MQv2-HMAC-SHA1 Credential=AK1, SignedHeaders=host, Signature={good_sig}"),
                "does not include x-mq-date-time",
            ),
            ("MQv2-HMAC-SHA1 Credential=AK1, Signature=abcd".to_string(), "40 hex digits"),
            (format!("MQv2-HMAC-SHA1 Credential=AK1, Signature={}zz", &good_sig[..38]), "40 hex digits"),
            (format!("MQv2-HMAC-SHA1 Credential=AK1, Signature={}é", &good_sig[..38]), "40 hex digits"),
            (format!("MQv2-HMAC-SHA1 Credential=AK1{}, Signature={good_sig}", "x".repeat(2000)), "1024-byte limit"),
        ];
        for (header, want) in cases {
            let msg = unauth(acl.check(Some(&header), Some(DATE), NOW, Action::Pub, &[]));
            assert!(msg.contains(want), "header {header:?}: {msg}");
        }
        let msg = unauth(acl.check(None, Some(DATE), NOW, Action::Pub, &[]));
        assert!(msg.contains("missing authorization"), "{msg}");
        // Without SignedHeaders it is accepted (the Java proxy ignores it).
        let header = format!("MQv2-HMAC-SHA1 Credential=AK1, Signature={good_sig}");
        assert_eq!(acl.check(Some(&header), Some(DATE), NOW, Action::Pub, &[]), Ok(Some("AK1".to_string())));
    }

    #[test]
    fn missing_or_bad_date() {
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let header = sign("AK1", "SK1", DATE);
        let msg = unauth(acl.check(Some(&header), None, NOW, Action::Pub, &[]));
        assert!(msg.contains("missing x-mq-date-time"), "{msg}");
        let msg = unauth(acl.check(Some(&header), Some(""), NOW, Action::Pub, &[]));
        assert!(msg.contains("empty"), "{msg}");
        let long = "1".repeat(2000);
        let msg = unauth(acl.check(Some(&header), Some(&long), NOW, Action::Pub, &[]));
        assert!(msg.contains("1024-byte limit"), "{msg}");
        // Correctly signed but unparseable date: refused while the skew check is on ...
        let odd = "yesterday";
        let header = sign("AK1", "SK1", odd);
        let msg = unauth(acl.check(Some(&header), Some(odd), NOW, Action::Pub, &[]));
        assert!(msg.contains("not a recognised date-time"), "{msg}");
        // ... and accepted when it is off.
        let acl = Acl::new(&AclConfig { enabled: true, max_clock_skew_ms: 0, accounts: vec![account("AK1", "SK1")] })
            .expect("valid");
        assert_eq!(acl.check(Some(&header), Some(odd), NOW, Action::Pub, &[]), Ok(Some("AK1".to_string())));
    }

    #[test]
    fn clock_skew() {
        let acl = acl_with(vec![account("AK1", "SK1")]);
        let header = sign("AK1", "SK1", DATE);
        let limit = 900_000;
        for now in [NOW - limit, NOW + limit] {
            assert!(acl.check(Some(&header), Some(DATE), now, Action::Pub, &[]).is_ok());
        }
        for now in [NOW - limit - 1, NOW + limit + 1, 0] {
            let msg = unauth(acl.check(Some(&header), Some(DATE), now, Action::Pub, &[]));
            assert!(msg.contains("differs from the broker clock"), "{msg}");
        }
        let off = Acl::new(&AclConfig { enabled: true, max_clock_skew_ms: 0, accounts: vec![account("AK1", "SK1")] })
            .expect("valid");
        assert!(off.check(Some(&header), Some(DATE), 0, Action::Pub, &[]).is_ok());
    }

    #[test]
    fn date_parsing() {
        assert_eq!(parse_date_time(DATE), Some(NOW as i64));
        assert_eq!(parse_date_time("2023-11-22T13:18:33.123456789+08:00"), Some(1_700_630_313_123));
        assert_eq!(parse_date_time("2023-11-22T05:18:33Z"), Some(NOW as i64));
        assert_eq!(parse_date_time("2023-11-22T05:18:33.5z"), Some(NOW as i64 + 500));
        assert_eq!(parse_date_time("2023-11-21T23:18:33-06:00"), Some(NOW as i64));
        assert_eq!(parse_date_time("20000229T235959Z"), Some(951_868_799_000));
        assert_eq!(parse_date_time("19691231T000000Z"), Some(-86_400_000));
        for bad in [
            "",
            "20231322T051833Z",
            "20230229T051833Z",
            "20231122T251833Z",
            "20231122 051833Z",
            "2023112xT051833Z",
            "2023-11-22T05:18:33",
            "2023-11-22T05:18:33.Z",
            "2023-11-22T05:18:33+0800",
            "2023-11-22T05:18:33+08:00x",
            "+023-11-22T05:18:33Z",
        ] {
            assert_eq!(parse_date_time(bad), None, "{bad:?}");
        }
        assert_eq!(format_date_time(NOW), DATE);
        assert_eq!(format_date_time(0), "19700101T000000Z");
        assert_eq!(format_date_time(951_868_799_999), "20000229T235959Z");
        for ms in [0u64, 86_399_999, 951_868_800_000, 4_102_444_800_000] {
            let s = format_date_time(ms);
            assert_eq!(parse_date_time(&s), Some((ms / 1000 * 1000) as i64), "{s}");
        }
    }

    #[test]
    fn permissions() {
        let acl = acl_with(vec![
            Account {
                topics: vec!["orders=PUB".into(), "events = sub|pub".into(), "audit=DENY".into()],
                groups: vec!["billing=SUB".into()],
                default_topic_perm: "SUB".into(),
                ..account("AK1", "SK1")
            },
            Account { admin: true, ..account("ADMIN", "SK2") },
            account("NOBODY", "SK3"),
        ]);
        let h1 = sign("AK1", "SK1", DATE);
        let c = |action, res: &[Resource<'_>]| acl.check(Some(&h1), Some(DATE), NOW, action, res);
        let ok = Ok(Some("AK1".to_string()));
        assert_eq!(c(Action::Pub, &[Resource::Topic("orders")]), ok);
        let msg = forbidden(c(Action::Sub, &[Resource::Topic("orders")]));
        assert_eq!(msg, "account AK1 may not SUB topic orders");
        assert_eq!(c(Action::Pub, &[Resource::Topic("events")]), ok);
        assert_eq!(c(Action::Sub, &[Resource::Topic("events")]), ok);
        forbidden(c(Action::Sub, &[Resource::Topic("audit")]));
        // Default topic perm SUB.
        assert_eq!(c(Action::Sub, &[Resource::Topic("other")]), ok);
        let msg = forbidden(c(Action::Pub, &[Resource::Topic("other")]));
        assert_eq!(msg, "account AK1 may not PUB topic other");
        // Groups: listed SUB, default DENY.
        assert_eq!(c(Action::Sub, &[Resource::Topic("events"), Resource::Group("billing")]), ok);
        let msg = forbidden(c(Action::Sub, &[Resource::Topic("events"), Resource::Group("other")]));
        assert_eq!(msg, "account AK1 may not SUB group other");
        // Every resource must pass.
        forbidden(c(Action::Sub, &[Resource::Group("billing"), Resource::Topic("orders")]));
        // No resources: authentication only.
        assert_eq!(c(Action::Pub, &[]), ok);
        // Names are case-sensitive.
        forbidden(c(Action::Pub, &[Resource::Topic("ORDERS")]));

        let h2 = sign("ADMIN", "SK2", DATE);
        for action in [Action::Pub, Action::Sub] {
            assert_eq!(
                acl.check(Some(&h2), Some(DATE), NOW, action, &[Resource::Topic("anything"), Resource::Group("any")]),
                Ok(Some("ADMIN".to_string()))
            );
        }
        // Admins still need a valid signature.
        let bad = sign("ADMIN", "nope", DATE);
        unauth(acl.check(Some(&bad), Some(DATE), NOW, Action::Pub, &[]));

        let h3 = sign("NOBODY", "SK3", DATE);
        let msg = forbidden(acl.check(Some(&h3), Some(DATE), NOW, Action::Sub, &[Resource::Topic("t")]));
        assert_eq!(msg, "account NOBODY may not SUB topic t");
        forbidden(acl.check(Some(&h3), Some(DATE), NOW, Action::Sub, &[Resource::Group("g")]));
    }

    #[test]
    fn acl_off_allows_everything() {
        let acl =
            Acl::new(&AclConfig { accounts: vec![account("AK1", "SK1")], ..AclConfig::default() }).expect("valid");
        assert!(!acl.enabled());
        for (auth, date) in [
            (None, None),
            (Some("garbage"), Some("garbage")),
            (Some("MQv2-HMAC-SHA1 Credential=AK9, Signature=00"), None),
        ] {
            assert_eq!(acl.check(auth, date, 0, Action::Pub, &[Resource::Topic("t")]), Ok(None));
        }
        assert!(acl_with(vec![account("AK1", "SK1")]).enabled());
    }

    #[test]
    fn bad_configs() {
        let with = |accounts: Vec<Account>| AclConfig { enabled: true, accounts, ..AclConfig::default() };
        let msg = config_err(&with(vec![Account { default_topic_perm: "READ".into(), ..account("AK1", "SK1") }]));
        assert!(msg.contains("default_topic_perm") && msg.contains("READ"), "{msg}");
        let msg = config_err(&with(vec![Account { default_group_perm: "PUB|".into(), ..account("AK1", "SK1") }]));
        assert!(msg.contains("default_group_perm"), "{msg}");
        let msg = config_err(&with(vec![Account { topics: vec!["orders=PUB|DENY".into()], ..account("AK1", "SK1") }]));
        assert!(msg.contains("orders=PUB|DENY"), "{msg}");
        let msg = config_err(&with(vec![Account { topics: vec!["orders".into()], ..account("AK1", "SK1") }]));
        assert!(msg.contains("NAME=PERM"), "{msg}");
        let msg = config_err(&with(vec![Account { groups: vec!["=SUB".into()], ..account("AK1", "SK1") }]));
        assert!(msg.contains("empty name"), "{msg}");
        let msg =
            config_err(&with(vec![Account { groups: vec!["g=SUB".into(), "g=PUB".into()], ..account("AK1", "SK1") }]));
        assert!(msg.contains("more than once"), "{msg}");
        let msg = config_err(&with(vec![account("AK1", "a"), account("AK1", "b")]));
        assert!(msg.contains("access_key AK1 is configured more than once"), "{msg}");
        let msg = config_err(&with(vec![account("", "a")]));
        assert!(msg.contains("empty access_key"), "{msg}");
        let msg = config_err(&with(vec![account("A K", "a")]));
        assert!(msg.contains("may not contain"), "{msg}");
        let msg = config_err(&with(vec![account("AK1", "")]));
        assert!(msg.contains("secret_key is empty"), "{msg}");
        let msg = config_err(&with(vec![]));
        assert!(msg.contains("no accounts"), "{msg}");
        // Bad accounts are rejected even while ACL is off.
        config_err(&AclConfig {
            accounts: vec![Account { default_topic_perm: "ALL".into(), ..account("AK1", "SK1") }],
            ..AclConfig::default()
        });
        assert!(Acl::new(&AclConfig::default()).is_ok());
    }

    #[test]
    fn toml_config() {
        #[derive(Deserialize)]
        struct Root {
            acl: AclConfig,
        }
        let root: Root = toml::from_str(
            r#"
            [acl]
            enabled = true
            [[acl.accounts]]
            access_key = "AK1"
            secret_key = "SK1"
            default_group_perm = "SUB"
            topics = ["orders=PUB|SUB", "logs=PUB"]
            [[acl.accounts]]
            access_key = "root"
            secret_key = "SK2"
            admin = true
            "#,
        )
        .expect("parses");
        let cfg = root.acl;
        assert!(cfg.enabled);
        assert_eq!(cfg.max_clock_skew_ms, 900_000);
        assert_eq!(cfg.accounts.len(), 2);
        assert_eq!(cfg.accounts[0].default_topic_perm, "DENY");
        assert_eq!(cfg.accounts[0].default_group_perm, "SUB");
        assert!(cfg.accounts[1].admin);
        let acl = Acl::new(&cfg).expect("valid");
        let h = sign("AK1", "SK1", DATE);
        assert!(
            acl.check(Some(&h), Some(DATE), NOW, Action::Sub, &[Resource::Topic("orders"), Resource::Group("g")])
                .is_ok()
        );
        // Unknown keys are errors.
        assert!(toml::from_str::<AclConfig>("enable = true").is_err());
        assert!(
            toml::from_str::<AclConfig>("[[accounts]]\naccess_key = \"a\"\nsecret_key = \"b\"\nperm = \"PUB\"")
                .is_err()
        );
        assert_eq!(toml::from_str::<AclConfig>("").expect("empty"), AclConfig::default());
        // Debug never shows secrets.
        let dbg = format!("{cfg:?} {acl:?}");
        assert!(!dbg.contains("SK1") && !dbg.contains("SK2"), "{dbg}");
    }
}
