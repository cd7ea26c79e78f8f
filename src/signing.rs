//! Webhook signatures, so receivers can check that a delivery came from us and was not altered:
//! the Standard Webhooks scheme (`webhook-signature: v1,<base64>`), a plain hex HMAC of the body,
//! the configurable `hmac` style (header, hex or base64, a prefix such as `sha256=`, the body or
//! `timestamp.body` signed, an optional timestamp header) that receivers written for other
//! platforms already verify (GitHub's `X-Hub-Signature-256`, Shopify's `X-Shopify-Hmac-Sha256`,
//! a seed's `X-Veendo-Signature`), and Stripe's `t=<unix>,v1=<hex>` header.

use std::fmt;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of every signing secret.
const SECRET_PREFIX: &str = "whsec_";

/// Standard base64 that decodes with or without trailing `=` padding.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a secret cannot be used for Standard Webhooks signing. The message never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningError {
    /// The secret does not start with `whsec_`.
    MissingPrefix,
    /// The part after `whsec_` is not standard base64.
    InvalidBase64,
}

impl fmt::Display for SigningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingPrefix => {
                write!(f, "signing secret does not start with \"{SECRET_PREFIX}\"")
            }
            Self::InvalidBase64 => write!(
                f,
                "signing secret is not valid base64 after \"{SECRET_PREFIX}\""
            ),
        }
    }
}

impl std::error::Error for SigningError {}

/// HMAC-SHA256 of `data` under `key` (RFC 2104).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The HMAC key of a `whsec_<base64>` secret: the decoded base64 (padding optional).
pub fn standard_key(secret: &str) -> Result<Vec<u8>, SigningError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SigningError::MissingPrefix)?;
    LENIENT_BASE64
        .decode(encoded)
        .map_err(|_| SigningError::InvalidBase64)
}

/// Standard Webhooks signature: `v1,` + base64 of HMAC-SHA256 over `{msg_id}.{timestamp}.{body}`.
pub fn sign_standard(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SigningError> {
    let key = standard_key(secret)?;
    let mut signed = format!("{msg_id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    Ok(format!(
        "v1,{}",
        STANDARD.encode(hmac_sha256(&key, &signed))
    ))
}

/// The `webhook-signature` header value: one `v1,…` signature per secret, space-separated.
/// During secret rotation pass the newest secret first, then the ones still in their grace period.
pub fn standard_signature_header(
    secrets: &[&str],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SigningError> {
    let signatures = secrets
        .iter()
        .map(|secret| sign_standard(secret, msg_id, timestamp, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(signatures.join(" "))
}

/// Lowercase hex HMAC-SHA256 of the raw body, keyed by the UTF-8 bytes of the whole secret
/// (including `whsec_`), for receivers that verify a simple hex digest.
pub fn sign_hex(secret: &str, body: &[u8]) -> String {
    hex::encode(hmac_sha256(secret.as_bytes(), body))
}

/// A new secret: `whsec_` + padded standard base64 of 24 bytes from the OS CSPRNG.
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; 24];
    getrandom::getrandom(&mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", STANDARD.encode(key)))
}

/// Header names pg_webhooks sets itself (or the HTTP client does): never a signature's header.
use crate::shape::RESERVED_HEADERS;

/// How an `hmac` signature is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

/// How the timestamp header of an `hmac` signature writes the attempt's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampFormat {
    /// Unix seconds, as `webhook-timestamp`.
    Unix,
    /// `2026-12-01T22:20:56Z` (UTC, whole seconds).
    Iso8601,
}

/// The `hmac` style's settings (`signature_options`), validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HmacOptions {
    /// The header carrying the signature.
    pub header: String,
    pub encoding: Encoding,
    /// Written before the encoded MAC, e.g. `sha256=`.
    pub prefix: String,
    /// Whether `{timestamp}.{body}` is signed rather than the body alone.
    pub signs_timestamp: bool,
    /// A header carrying the timestamp (besides `webhook-timestamp`, always sent).
    pub timestamp_header: Option<String>,
    pub timestamp_format: TimestampFormat,
}

/// The options' keys, in the order the normalized form lists them.
const OPTION_KEYS: &[&str] = &[
    "header",
    "encoding",
    "prefix",
    "signed",
    "timestamp_header",
    "timestamp_format",
];

/// A name from user input, short enough for a message.
fn shown(name: &str) -> String {
    let mut out: String = name.chars().take(64).collect();
    if out.len() < name.len() {
        out.push('…');
    }
    out
}

/// Whether `name` can be the header a signature or timestamp goes in; `what` names the
/// argument in the message.
pub fn check_header_name(what: &str, name: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+.^_`|~-".contains(c);
    if name.is_empty() || name.len() > 256 || !name.chars().all(token) {
        return Err(format!(
            "{what}: invalid header name \"{}\" (letters, digits and !#$%&'*+.^_`|~- only, at most 256)",
            shown(name)
        ));
    }
    if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{what}: header \"{name}\" is set by pg_webhooks and cannot carry a signature"
        ));
    }
    Ok(())
}

impl Default for HmacOptions {
    fn default() -> Self {
        HmacOptions {
            header: "X-Webhook-Signature".into(),
            encoding: Encoding::Hex,
            prefix: String::new(),
            signs_timestamp: false,
            timestamp_header: None,
            timestamp_format: TimestampFormat::Unix,
        }
    }
}

impl HmacOptions {
    /// Validates what a caller gave: `signature_header` and the `signature_options` JSON
    /// text. Every problem is said naming the key; nothing of a value but names is echoed.
    pub fn parse(signature_header: Option<&str>, options: Option<&str>) -> Result<Self, String> {
        let mut out = HmacOptions::default();
        let map = match options {
            None => serde_json::Map::new(),
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => return Err("signature_options must be a JSON object".into()),
            },
        };
        for key in map.keys() {
            if !OPTION_KEYS.contains(&key.as_str()) {
                return Err(format!(
                    "signature_options has an unknown key \"{}\" (known: {})",
                    shown(key),
                    OPTION_KEYS.join(", ")
                ));
            }
        }
        let string = |key: &str| -> Result<Option<&str>, String> {
            match map.get(key) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
                Some(_) => Err(format!("signature_options \"{key}\" must be a string")),
            }
        };
        let header = string("header")?;
        match (header, signature_header) {
            (Some(a), Some(b)) if a != b => {
                return Err(
                    "signature_header and signature_options \"header\" name different headers"
                        .into(),
                )
            }
            _ => {}
        }
        if let Some(h) = header.or(signature_header) {
            check_header_name("signature_options \"header\"", h)?;
            out.header = h.to_string();
        }
        out.encoding = match string("encoding")? {
            None | Some("hex") => Encoding::Hex,
            Some("base64") => Encoding::Base64,
            Some(_) => {
                return Err("signature_options \"encoding\" must be \"hex\" or \"base64\"".into())
            }
        };
        if let Some(prefix) = string("prefix")? {
            if prefix.len() > 64 || !prefix.chars().all(|c| (' '..='~').contains(&c)) {
                return Err(
                    "signature_options \"prefix\" must be at most 64 printable ASCII characters"
                        .into(),
                );
            }
            out.prefix = prefix.to_string();
        }
        out.signs_timestamp = match string("signed")? {
            None | Some("body") => false,
            Some("timestamp.body") => true,
            Some(_) => {
                return Err(
                    "signature_options \"signed\" must be \"body\" or \"timestamp.body\"".into(),
                )
            }
        };
        if let Some(h) = string("timestamp_header")? {
            check_header_name("signature_options \"timestamp_header\"", h)?;
            if h.eq_ignore_ascii_case(&out.header) {
                return Err(
                    "signature_options \"timestamp_header\" must differ from the signature's header"
                        .into(),
                );
            }
            out.timestamp_header = Some(h.to_string());
        }
        out.timestamp_format = match string("timestamp_format")? {
            None | Some("unix") => TimestampFormat::Unix,
            Some("iso8601") => TimestampFormat::Iso8601,
            Some(_) => {
                return Err(
                    "signature_options \"timestamp_format\" must be \"unix\" or \"iso8601\"".into(),
                )
            }
        };
        if map.contains_key("timestamp_format") && out.timestamp_header.is_none() {
            return Err(
                "signature_options \"timestamp_format\" needs a \"timestamp_header\" (webhook-timestamp is always unix seconds)"
                    .into(),
            );
        }
        Ok(out)
    }

    /// The options as stored (`_subscriptions.signature_options`) and shown by the view:
    /// every key, defaults filled in (the timestamp's keys only with a timestamp header); the
    /// header is `signature_header`'s too. `parse` reads it back as it is.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::json!({
            "header": self.header,
            "encoding": match self.encoding { Encoding::Hex => "hex", Encoding::Base64 => "base64" },
            "prefix": self.prefix,
            "signed": if self.signs_timestamp { "timestamp.body" } else { "body" },
        });
        if let Some(header) = &self.timestamp_header {
            out["timestamp_header"] = header.as_str().into();
            out["timestamp_format"] = match self.timestamp_format {
                TimestampFormat::Unix => "unix",
                TimestampFormat::Iso8601 => "iso8601",
            }
            .into();
        }
        out
    }

    /// The options the worker reads back from the stored form; what was validated once is
    /// taken as it is (a value it cannot read gives the default).
    pub fn from_stored(header: Option<&str>, options: Option<&str>) -> Self {
        let mut out = HmacOptions::parse(None, options).unwrap_or_default();
        if let Some(h) = header {
            out.header = h.to_string();
        }
        out
    }

    /// The timestamp as the timestamp header writes it (and as it is signed).
    pub fn timestamp_text(&self, unix: i64) -> String {
        match (self.timestamp_header.is_some(), self.timestamp_format) {
            (true, TimestampFormat::Iso8601) => iso8601_utc(unix),
            _ => unix.to_string(),
        }
    }

    /// The signature header's value for this body at `unix` seconds.
    pub fn sign(&self, secret: &str, unix: i64, body: &[u8]) -> String {
        let mac = if self.signs_timestamp {
            let mut signed = format!("{}.", self.timestamp_text(unix)).into_bytes();
            signed.extend_from_slice(body);
            hmac_sha256(secret.as_bytes(), &signed)
        } else {
            hmac_sha256(secret.as_bytes(), body)
        };
        let encoded = match self.encoding {
            Encoding::Hex => hex::encode(mac),
            Encoding::Base64 => STANDARD.encode(mac),
        };
        format!("{}{encoded}", self.prefix)
    }
}

/// Stripe's `Stripe-Signature` value: `t=<unix>,v1=<hex>` with one `v1` per live secret
/// (newest first), each the hex HMAC-SHA256 over `{t}.{body}` keyed by the secret's UTF-8 bytes.
pub fn stripe_signature_header(secrets: &[&str], unix: i64, body: &[u8]) -> String {
    let mut signed = format!("{unix}.").into_bytes();
    signed.extend_from_slice(body);
    let mut out = format!("t={unix}");
    for secret in secrets {
        out.push_str(",v1=");
        out.push_str(&hex::encode(hmac_sha256(secret.as_bytes(), &signed)));
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` of unix seconds (proleptic Gregorian, UTC).
pub fn iso8601_utc(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Whether a secret the subscriber brings can sign in `style`. The message never shows it.
pub fn check_secret(style: &str, secret: &str) -> Result<(), String> {
    if style == "standard" {
        let key = standard_key(secret).map_err(|e| {
            format!("{e}: a secret for signature => 'standard' is \"{SECRET_PREFIX}\" + base64 of 24 to 64 bytes")
        })?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!(
                "signing secret decodes to {} bytes; Standard Webhooks secrets are 24 to 64 bytes",
                key.len()
            ));
        }
        return Ok(());
    }
    if !(8..=1024).contains(&secret.len()) {
        return Err(format!(
            "signing secret is {} bytes long; it must be 8 to 1024 bytes",
            secret.len()
        ));
    }
    if secret.chars().any(char::is_control) {
        return Err("signing secret has a control character (such as a tab or a newline)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc4231_case_1() {
        let mac = hmac_sha256(&[0x0b; 20], b"Hi There");
        assert_eq!(
            hex::encode(mac),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    #[test]
    fn hmac_sha256_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn sign_standard_matches_standard_webhooks_vector_1() {
        let sig = sign_standard(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Ok("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }

    #[test]
    fn sign_standard_matches_standard_webhooks_vector_2() {
        let sig = sign_standard(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Ok("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=")
        );
    }

    #[test]
    fn standard_key_accepts_padded_and_unpadded_base64() {
        assert_eq!(standard_key("whsec_aGk="), Ok(b"hi".to_vec()));
        assert_eq!(standard_key("whsec_aGk"), Ok(b"hi".to_vec()));
    }

    #[test]
    fn signature_header_has_one_signature_per_secret_newest_first() {
        let newest = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let older = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let header =
            standard_signature_header(&[newest, older], id, ts, body).expect("valid secrets");
        let expected = format!(
            "{} {}",
            sign_standard(newest, id, ts, body).expect("valid secret"),
            sign_standard(older, id, ts, body).expect("valid secret"),
        );
        assert_eq!(header, expected);
        assert!(header.starts_with("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE= v1,"));
    }

    #[test]
    fn signature_header_fails_if_any_secret_is_bad() {
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(
            standard_signature_header(&[good, "nope"], "msg", 1, b"{}"),
            Err(SigningError::MissingPrefix)
        );
    }

    #[test]
    fn hex_signature_is_hmac_keyed_by_the_whole_secret_string() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign_hex(secret, body);
        assert_eq!(sig, hex::encode(hmac_sha256(secret.as_bytes(), body)));
        assert_eq!(sig.len(), 64);
        assert!(sig
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(
            sign_hex("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn generated_secrets_are_prefixed_24_random_bytes() {
        let first = generate_secret().expect("OS random source");
        let second = generate_secret().expect("OS random source");
        assert!(first.starts_with("whsec_"));
        assert_eq!(standard_key(&first).map(|key| key.len()), Ok(24));
        assert_ne!(first, second);
    }

    #[test]
    fn secret_without_prefix_is_rejected_without_echoing_it() {
        let secret = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let err = standard_key(secret).expect_err("no prefix");
        assert_eq!(err, SigningError::MissingPrefix);
        assert!(!err.to_string().contains(secret));
    }

    #[test]
    fn secret_with_bad_base64_is_rejected_without_echoing_it() {
        let secret = "whsec_not*base64!";
        let err = sign_standard(secret, "msg", 1, b"{}").expect_err("bad base64");
        assert_eq!(err, SigningError::InvalidBase64);
        assert!(!err.to_string().contains("not*base64!"));
    }

    #[test]
    fn hmac_defaults_are_the_hex_style() {
        let o = HmacOptions::parse(None, None).expect("defaults");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(o.header, "X-Webhook-Signature");
        assert_eq!(o.sign("Jefe", 1, body), sign_hex("Jefe", body));
    }

    #[test]
    fn hmac_base64_prefix_and_timestamp() {
        let o = HmacOptions::parse(
            None,
            Some(r#"{"header":"X-Hub-Signature-256","prefix":"sha256="}"#),
        )
        .expect("github");
        assert_eq!(
            o.sign("Jefe", 0, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let o = HmacOptions::parse(None, Some(r#"{"encoding":"base64"}"#)).expect("shopify");
        assert_eq!(
            o.sign("Jefe", 0, b"what do ya want for nothing?"),
            STANDARD.encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?"))
        );
        let o = HmacOptions::parse(
            None,
            Some(r#"{"signed":"timestamp.body","timestamp_header":"X-Ts","timestamp_format":"iso8601"}"#),
        )
        .expect("iso");
        assert_eq!(o.timestamp_text(1614265330), "2021-02-25T15:02:10Z");
        assert_eq!(
            o.sign("k", 1614265330, b"{}"),
            hex::encode(hmac_sha256(b"k", b"2021-02-25T15:02:10Z.{}"))
        );
    }

    #[test]
    fn hmac_options_refuse_bad_input_naming_the_key() {
        let bad = [
            (r#"[]"#, "must be a JSON object"),
            (r#"{"nope": 1}"#, "unknown key \"nope\""),
            (r#"{"encoding": "b32"}"#, "\"encoding\""),
            (r#"{"header": 5}"#, "\"header\" must be a string"),
            (r#"{"header": "a b"}"#, "invalid header name"),
            (r#"{"header": "Webhook-Signature"}"#, "set by pg_webhooks"),
            (r#"{"prefix": "a\nb"}"#, "\"prefix\""),
            (r#"{"signed": "all"}"#, "\"signed\""),
            (
                r#"{"timestamp_format": "unix"}"#,
                "needs a \"timestamp_header\"",
            ),
            (
                r#"{"timestamp_header": "x-webhook-signature"}"#,
                "must differ",
            ),
        ];
        for (json, want) in bad {
            let e = HmacOptions::parse(None, Some(json)).expect_err(json);
            assert!(e.contains(want), "{json}: {e}");
        }
        let e = HmacOptions::parse(Some("X-A"), Some(r#"{"header": "X-B"}"#)).expect_err("two");
        assert!(e.contains("different headers"), "{e}");
        let deep = "[".repeat(10_000);
        assert!(HmacOptions::parse(None, Some(&deep)).is_err());
    }

    #[test]
    fn stored_options_round_trip() {
        let o = HmacOptions::parse(
            Some("X-Sig"),
            Some(r#"{"encoding":"base64","prefix":"v0=","signed":"timestamp.body","timestamp_header":"X-Ts"}"#),
        )
        .expect("valid");
        let stored = o.to_json().to_string();
        assert_eq!(HmacOptions::from_stored(Some("X-Sig"), Some(&stored)), o);
        // Without a timestamp header too (the stored form then has no timestamp keys).
        let o = HmacOptions::parse(
            None,
            Some(r#"{"header":"X-Hub-Signature-256","prefix":"sha256="}"#),
        )
        .expect("valid");
        let stored = o.to_json().to_string();
        assert!(!stored.contains("timestamp"), "{stored}");
        assert_eq!(
            HmacOptions::from_stored(Some("X-Hub-Signature-256"), Some(&stored)),
            o
        );
    }

    #[test]
    fn stripe_header_has_t_and_one_v1_per_secret() {
        let h = stripe_signature_header(&["whsec_a", "whsec_b"], 1614265330, b"{}");
        let v1 = |k: &str| hex::encode(hmac_sha256(k.as_bytes(), b"1614265330.{}"));
        assert_eq!(
            h,
            format!("t=1614265330,v1={},v1={}", v1("whsec_a"), v1("whsec_b"))
        );
    }

    #[test]
    fn iso8601_of_known_instants() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(1_649_367_553), "2022-04-07T21:39:13Z");
        assert_eq!(iso8601_utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn brought_secrets_are_checked_without_being_echoed() {
        assert!(check_secret("hmac", "your_secret_key").is_ok());
        assert!(check_secret("hex", "1234567").is_err());
        assert!(check_secret("hmac", &"x".repeat(1025)).is_err());
        let e = check_secret("hmac", "abc\tdefghij").expect_err("tab");
        assert!(!e.contains("abc"), "{e}");
        assert!(check_secret("standard", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        let e = check_secret("standard", "your_secret_key").expect_err("no prefix");
        assert!(!e.contains("your_secret_key"), "{e}");
        assert!(check_secret("standard", "whsec_aGk=").is_err(), "2 bytes");
    }
}
