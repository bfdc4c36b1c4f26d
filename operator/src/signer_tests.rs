use super::*;
use k8s_openapi::ByteString;
use std::collections::BTreeMap;

const AGENT: &str = "system:serviceaccount:ferry-system:ferry-agent";

fn request(cn: &str, sans: Vec<SanType>) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = node_params(cn).unwrap();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn spec(pem: &str, user: &str, node: Option<&str>) -> CertificateSigningRequestSpec {
    let extra = node.map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])]));
    CertificateSigningRequestSpec {
        request: ByteString(pem.as_bytes().to_vec()),
        signer_name: SIGNER_NAME.into(),
        usages: Some(USAGES.iter().map(|u| u.to_string()).collect()),
        username: Some(user.into()),
        extra,
        ..Default::default()
    }
}

fn dns(n: &str) -> SanType {
    SanType::DnsName(n.try_into().unwrap())
}

#[test]
fn an_agent_gets_a_certificate_for_its_own_node() {
    let s = spec(
        &request("node-a", vec![dns("node-a")]),
        AGENT,
        Some("node-a"),
    );
    let ok = review(&s, AGENT).unwrap();
    assert_eq!(ok.node, "node-a");
    let now = time::OffsetDateTime::now_utc();
    let ca = Ca::generate(now).unwrap();
    let pem = ca.issue(&ok, now, lifetime(&s)).unwrap();
    // The CA survives its round trip through the Secret and still signs.
    let again = Ca::load(&ca.cert_pem, &ca.key_pem).unwrap();
    again.issue(&ok, now, lifetime(&s)).unwrap();
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = der.parse_x509().unwrap();
    assert_eq!(cert.subject().to_string(), "CN=node-a");
    let life = cert.validity().not_after.timestamp() - now.unix_timestamp();
    assert!(
        (NODE_CERT_LIFETIME.as_secs() as i64 - life).abs() < 5,
        "{life}"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let (_, ca_der) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).unwrap();
    let ca_cert = ca_der.parse_x509().unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
}

#[test]
fn a_request_for_another_node_is_denied_naming_both() {
    let s = spec(
        &request("node-a", vec![dns("node-a")]),
        AGENT,
        Some("node-c"),
    );
    let d = review(&s, AGENT).unwrap_err();
    assert_eq!(d.reason, "NodeMismatch");
    assert!(
        d.message.contains("CN=node-a") && d.message.contains("node-c"),
        "{}",
        d.message
    );
}

#[test]
fn other_requesters_and_unbound_tokens_are_denied() {
    let pem = request("node-a", vec![dns("node-a")]);
    let d = review(
        &spec(&pem, "system:serviceaccount:x:y", Some("node-a")),
        AGENT,
    )
    .unwrap_err();
    assert_eq!(d.reason, "NotAnAgent");
    let d = review(&spec(&pem, AGENT, None), AGENT).unwrap_err();
    assert_eq!(d.reason, "NoNodeIdentity");
}

#[test]
fn extra_names_usages_and_garbage_are_denied() {
    let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
    let s = spec(
        &request("node-a", vec![dns("node-a"), ip]),
        AGENT,
        Some("node-a"),
    );
    assert_eq!(review(&s, AGENT).unwrap_err().reason, "BadSubjectAltNames");
    let s = spec(
        &request("node-a", vec![dns("node-b")]),
        AGENT,
        Some("node-a"),
    );
    assert_eq!(review(&s, AGENT).unwrap_err().reason, "BadSubjectAltNames");
    let mut s = spec(
        &request("node-a", vec![dns("node-a")]),
        AGENT,
        Some("node-a"),
    );
    s.usages = Some(vec!["server auth".into(), "cert sign".into()]);
    assert_eq!(review(&s, AGENT).unwrap_err().reason, "BadUsages");
    let s = spec(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        AGENT,
        Some("node-a"),
    );
    assert_eq!(review(&s, AGENT).unwrap_err().reason, "BadRequest");
}

#[test]
fn a_shorter_expiration_is_honoured() {
    let mut s = spec("", AGENT, None);
    assert_eq!(lifetime(&s), NODE_CERT_LIFETIME);
    s.expiration_seconds = Some(3600);
    assert_eq!(lifetime(&s), Duration::from_secs(3600));
    s.expiration_seconds = Some(i32::MAX);
    assert_eq!(lifetime(&s), NODE_CERT_LIFETIME);
}
