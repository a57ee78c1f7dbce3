//! Auth test helpers: an issuer with keys generated in the test (RSA, EC
//! P-256, Ed25519), its JWKS, tokens, and a server with auth on.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use jsonwebtoken::{
    jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
        EllipticCurveKeyType, Jwk, JwkSet, OctetKeyPairParameters, OctetKeyPairType,
    },
    Algorithm, EncodingKey, Header,
};
use opsd::{config::AuthSettings, Config};
use serde_json::{json, Value};

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "opsd-test";
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// A signing key and its public JWK.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    pub key: EncodingKey,
    pub jwk: Jwk,
}

/// One RSA key per test binary: generating it is the slow part.
fn rsa_der() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let key = rsa::PrivateKey::new(&mut getrandom_04::SysRng, 2048).unwrap();
        key.to_pkcs1_der().unwrap().as_bytes().to_vec()
    })
}

impl SigningKey {
    /// An RSA key (RS256).
    pub fn rsa(kid: &str) -> Self {
        let key = EncodingKey::from_rsa_der(rsa_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.into());
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            key,
            jwk,
        }
    }

    /// A fresh EC P-256 key (ES256).
    pub fn ec(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let jwk = Jwk {
            common: CommonParameters {
                key_id: Some(kid.into()),
                ..Default::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: URL_SAFE_NO_PAD.encode(&raw[1..33]),
                y: URL_SAFE_NO_PAD.encode(&raw[33..65]),
            }),
        };
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk,
        }
    }

    /// A fresh Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> Self {
        let mut seed = [0u8; 32];
        getrandom_04::fill(&mut seed).unwrap();
        // PKCS#8 v1 of an Ed25519 seed (RFC 8410).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let key = EncodingKey::from_ed_der(&der);
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::EdDSA).unwrap();
        jwk.common.key_id = Some(kid.into());
        if let AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters { key_type, .. }) =
            &mut jwk.algorithm
        {
            *key_type = OctetKeyPairType::OctetKeyPair;
        }
        Self {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            key,
            jwk,
        }
    }

    /// A token of `claims`, signed with this key, naming its `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// The JWKS document of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims for `sub`: the issuer, the audience, the scope, an hour left.
pub fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "scope": SCOPE,
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// A token with `alg: none`.
pub fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{body}.")
}

/// A directory for a test's files, removed with it.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "opsd-{name}-{}-{}",
            std::process::id(),
            now_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The two-tenant policy of the auth tests: alice reads tenant A, bob
/// tenant B (and `projects/ab`, the prefix trap), worker-a works in A,
/// admin may do everything.
pub const POLICY: &str = r#"
principals:
  - subject: alice@example.com
    grants:
      - names: ["projects/a/**"]
        permissions: ["operations.*", "reports.get"]
  - subject: bob@example.com
    grants:
      - names: ["projects/b/**", "projects/ab/**"]
        permissions: ["operations.*", "reports.get"]
  - subject: worker-a
    grants:
      - names: ["projects/a/**"]
        permissions: ["workers.*"]
  - subject: worker-b
    grants:
      - names: ["projects/b/**", "projects/ab/**"]
        permissions: ["workers.*"]
  - subject: admin
    grants:
      - names: ["**"]
        permissions: ["*"]
"#;

/// A test configuration with auth on: a JWKS file of `keys` and `policy`
/// written into `dir`.
pub fn config(dir: &Dir, keys: &[&SigningKey], policy: Option<&str>) -> Config {
    let mut config = Config::for_tests();
    config.auth = Some(AuthSettings {
        jwks: dir.write("jwks.json", &jwks(keys)).display().to_string(),
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        policy: policy.map(|p| dir.write("policy.yaml", p)),
        open_reflection: false,
    });
    config
}

/// `request` with `authorization: Bearer {token}`.
pub fn bearer<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
