//! Webhook signatures, so receivers can check that a delivery came from us and was not altered:
//! the Standard Webhooks scheme (`webhook-signature: v1,<base64>`) and a plain hex HMAC of the body.

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
}
