//! Mutual TLS per subscription: a client certificate (and its key) to show the endpoint, and a
//! CA bundle to verify the endpoint's certificate against instead of the public roots.
//!
//! The settings (`tls => '{"client_certificate": PEM, "client_key": PEM, "ca_bundle": PEM}'`)
//! are checked at subscribe time with the rustls that the worker's HTTP client uses, so a
//! certificate that does not parse, a key that is not the certificate's or a CA that is not a
//! certificate is refused then (22023, naming the key), never at the first delivery. Messages
//! never contain key material. The PEMs live in `webhooks._secrets.tls` (superusers only);
//! `webhooks._subscriptions.tls` keeps what may be shown: the certificate's subject, issuer and
//! expiry, and how many CA certificates the bundle has.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

const KEYS: &[&str] = &["client_certificate", "client_key", "ca_bundle"];

/// Largest accepted value per key, in bytes (a CA bundle may be a whole root store).
fn max_len(key: &str) -> usize {
    match key {
        "ca_bundle" => 1 << 20,
        _ => 64 << 10,
    }
}

/// A subscription's TLS settings as given (PEM text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
    pub ca_bundle: Option<String>,
}

/// What was parsed: the chain and key to show the server, the roots to verify it against.
struct Parsed {
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    roots: Option<Vec<CertificateDer<'static>>>,
}

impl TlsSettings {
    /// The settings from their JSON text: an object of known keys with string values.
    pub fn parse(text: &str) -> Result<Self, String> {
        let map = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return Err("tls must be a JSON object".into()),
        };
        let mut out = TlsSettings::default();
        for (key, value) in &map {
            if !KEYS.contains(&key.as_str()) {
                let shown: String = key.chars().take(64).collect();
                return Err(format!(
                    "tls has an unknown key \"{shown}\" (known: {})",
                    KEYS.join(", ")
                ));
            }
            let serde_json::Value::String(pem) = value else {
                return Err(format!("tls \"{key}\" must be a string (PEM text)"));
            };
            if pem.len() > max_len(key) {
                return Err(format!(
                    "tls \"{key}\" is {} bytes; at most {} are accepted",
                    pem.len(),
                    max_len(key)
                ));
            }
            let slot = match key.as_str() {
                "client_certificate" => &mut out.client_certificate,
                "client_key" => &mut out.client_key,
                _ => &mut out.ca_bundle,
            };
            *slot = Some(pem.clone());
        }
        if out.client_certificate.is_some() != out.client_key.is_some() {
            return Err("tls \"client_certificate\" and \"client_key\" go together".into());
        }
        if out == TlsSettings::default() {
            return Err(
                "tls names nothing: give \"client_certificate\" and \"client_key\", or \"ca_bundle\" (NULL means no TLS settings)"
                    .into(),
            );
        }
        Ok(out)
    }

    fn parsed(&self) -> Result<Parsed, String> {
        let client = match (&self.client_certificate, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("client_certificate", cert)?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| {
                    "tls \"client_key\" is not a PEM private key (PKCS#8 \"BEGIN PRIVATE KEY\", PKCS#1 \"BEGIN RSA PRIVATE KEY\" or SEC1 \"BEGIN EC PRIVATE KEY\")"
                        .to_string()
                })?;
                Some((chain, key))
            }
            _ => None,
        };
        let roots = match &self.ca_bundle {
            Some(pem) => Some(certificates("ca_bundle", pem)?),
            None => None,
        };
        Ok(Parsed { client, roots })
    }

    /// Checks the settings as the worker will use them (a rustls client configuration is
    /// built from them) and returns what may be shown about them.
    pub fn check(&self) -> Result<serde_json::Value, String> {
        let parsed = self.parsed()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let mut summary = serde_json::Map::new();
        let builder = match &parsed.roots {
            Some(roots) => {
                let mut store = rustls::RootCertStore::empty();
                for (i, cert) in roots.iter().enumerate() {
                    store.add(cert.clone()).map_err(|e| {
                        format!(
                            "tls \"ca_bundle\": certificate {} is not usable as a CA: {e}",
                            i + 1
                        )
                    })?;
                }
                summary.insert(
                    "ca_bundle".into(),
                    serde_json::json!({"certificates": roots.len()}),
                );
                builder.with_root_certificates(store)
            }
            None => builder.with_root_certificates(rustls::RootCertStore::empty()),
        };
        if let Some((chain, key)) = &parsed.client {
            let (subject, issuer, not_after) = describe_certificate(&chain[0]).ok_or_else(
                || {
                    "tls \"client_certificate\": the first certificate is not an X.509 certificate"
                        .to_string()
                },
            )?;
            builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => {
                        "tls \"client_key\" is not the key of \"client_certificate\"".to_string()
                    }
                    _ => format!("tls \"client_key\" cannot be used: {}", key_error(&e)),
                })?;
            summary.insert(
                "client_certificate".into(),
                serde_json::json!({
                    "subject": subject,
                    "issuer": issuer,
                    "not_after": not_after,
                    "chain_length": chain.len(),
                }),
            );
        }
        Ok(serde_json::Value::Object(summary))
    }

    /// The HTTP client's TLS configuration for these settings (checked first, so that a bad
    /// one is an error here, not a panic in the client).
    pub fn ureq_config(&self) -> Result<ureq::tls::TlsConfig, String> {
        self.check()?;
        let parsed = self.parsed()?;
        let mut builder = ureq::tls::TlsConfig::builder();
        if let (Some((chain, _)), Some(pem)) = (parsed.client, &self.client_key) {
            let chain: Vec<ureq::tls::Certificate<'static>> = chain
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            let key = ureq::tls::PrivateKey::from_pem(pem.as_bytes())
                .map_err(|_| "tls \"client_key\" is not a PEM private key".to_string())?;
            builder = builder.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        if let Some(roots) = parsed.roots {
            let roots: Vec<ureq::tls::Certificate<'static>> = roots
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            builder = builder.root_certs(ureq::tls::RootCerts::new_with_certs(&roots));
        }
        Ok(builder.build())
    }
}

/// A rustls error about a key, without anything of the key.
fn key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::General(_) => {
            "its algorithm is not supported (RSA, ECDSA P-256/P-384 or Ed25519)".into()
        }
        other => other.to_string(),
    }
}

/// The certificates of a PEM text, at least one; anything else in it is refused.
fn certificates(key: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out: Vec<CertificateDer<'static>> = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        match item {
            Ok(cert) => out.push(cert),
            Err(_) => return Err(format!("tls \"{key}\" is not valid PEM")),
        }
    }
    if out.is_empty() {
        return Err(format!(
            "tls \"{key}\" has no PEM certificate (\"-----BEGIN CERTIFICATE-----\")"
        ));
    }
    if key == "client_certificate" && describe_certificate(&out[0]).is_none() {
        return Err(format!(
            "tls \"{key}\": the first certificate is not an X.509 certificate"
        ));
    }
    Ok(out)
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// An X.509 Name as `CN=…, O=…` (the usual attributes, in their order; others left out).
fn name(mut rdns: &[u8]) -> String {
    let mut parts = Vec::new();
    while let Some((_, set, rest)) = der(rdns) {
        rdns = rest;
        let mut attrs = set;
        while let Some((_, attr, rest)) = der(attrs) {
            attrs = rest;
            let Some((0x06, oid, value)) = der(attr) else {
                continue;
            };
            let label = match oid {
                [0x55, 0x04, 0x03] => "CN",
                [0x55, 0x04, 0x06] => "C",
                [0x55, 0x04, 0x07] => "L",
                [0x55, 0x04, 0x08] => "ST",
                [0x55, 0x04, 0x0a] => "O",
                [0x55, 0x04, 0x0b] => "OU",
                _ => continue,
            };
            if let Some((_, text, _)) = der(value) {
                let text: String = String::from_utf8_lossy(text)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(256)
                    .collect();
                parts.push(format!("{label}={text}"));
            }
        }
    }
    parts.join(", ")
}

/// UTCTime or GeneralizedTime as `YYYY-MM-DDTHH:MM:SSZ`.
fn time(tag: u8, t: &[u8]) -> Option<String> {
    let t = std::str::from_utf8(t).ok()?;
    let full = match tag {
        0x17 if t.len() >= 12 => {
            let yy: u32 = t[..2].parse().ok()?;
            format!("{}{}", if yy >= 50 { 19 } else { 20 }, &t[..12])
        }
        0x18 if t.len() >= 14 => t[..14].to_string(),
        _ => return None,
    };
    if !full.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    ))
}

/// (subject, issuer, notAfter) of a certificate, or None if it is not one.
fn describe_certificate(cert: &[u8]) -> Option<(String, String, String)> {
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after; // version
    }
    let (0x02, _, rest) = der(rest)? else {
        return None;
    }; // serial
    let (0x30, _, rest) = der(rest)? else {
        return None;
    }; // signature algorithm
    let (0x30, issuer, rest) = der(rest)? else {
        return None;
    };
    let (0x30, validity, rest) = der(rest)? else {
        return None;
    };
    let (0x30, subject, _) = der(rest)? else {
        return None;
    };
    let (_, _, validity_rest) = der(validity)?;
    let (tag, not_after, _) = der(validity_rest)?;
    Some((name(subject), name(issuer), time(tag, not_after)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_refuse_bad_shapes_naming_the_key() {
        let bad = [
            ("[]", "must be a JSON object"),
            ("{}", "names nothing"),
            (r#"{"client_key": "x"}"#, "go together"),
            (r#"{"ca_bundle": 1}"#, "\"ca_bundle\" must be a string"),
            (r#"{"cert": "x"}"#, "unknown key \"cert\""),
        ];
        for (json, want) in bad {
            let e = TlsSettings::parse(json).expect_err(json);
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn pem_that_does_not_parse_is_refused_without_echoing_it() {
        let s = TlsSettings {
            ca_bundle: Some(
                "-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n".into(),
            ),
            ..Default::default()
        };
        let e = s.check().expect_err("bad pem");
        assert!(e.contains("\"ca_bundle\""), "{e}");
        assert!(!e.contains("not base64"), "{e}");
        let s = TlsSettings {
            client_certificate: Some("hello".into()),
            client_key: Some("SECRET-KEY-MATERIAL".into()),
            ..Default::default()
        };
        let e = s.check().expect_err("no pem");
        assert!(e.contains("\"client_certificate\""), "{e}");
        assert!(!e.contains("SECRET"), "{e}");
    }

    #[test]
    fn der_times_and_lengths() {
        assert_eq!(
            time(0x17, b"270101120000Z").as_deref(),
            Some("2027-01-01T12:00:00Z")
        );
        assert_eq!(
            time(0x18, b"20991231235959Z").as_deref(),
            Some("2099-12-31T23:59:59Z")
        );
        assert_eq!(
            der(&[0x30, 0x82, 0x00, 0x01, 0x05]),
            Some((0x30, &[5u8][..], &[][..]))
        );
        assert_eq!(der(&[0x30, 0x05, 0x00]), None);
    }
}
