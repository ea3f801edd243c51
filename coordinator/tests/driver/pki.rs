//! A certificate authority made at test time (rcgen): the coordinator's server certificate for loopback,
//! and client certificates for workers, so the TLS tests need no files checked in and nothing expires.

use iro_coordinator::driver::{ClientTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        self.leaf_for(name, sans, vec![usage])
    }

    fn leaf_for(&self, name: &str, sans: &[&str], usages: Vec<ExtendedKeyUsagePurpose>) -> Leaf {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// The coordinator's certificate, for `127.0.0.1` and `localhost`.
    pub fn server(&self) -> Leaf {
        self.leaf("coordinator", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A coordinator replica's certificate: it serves the peer port and authenticates to the others.
    pub fn peer(&self) -> Leaf {
        let both = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.leaf_for("replica", &["127.0.0.1", "localhost"], both)
    }

    pub fn client(&self, name: &str) -> Leaf {
        self.leaf(name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// TLS for the coordinator; with `mtls`, gRPC callers need a certificate of this CA.
    pub fn server_tls(&self, mtls: bool) -> ServerTls {
        let leaf = self.server();
        let client_ca = mtls.then(|| self.ca_pem().into_bytes());
        ServerTls::from_pem(leaf.cert.into_bytes(), leaf.key.into_bytes(), client_ca).unwrap()
    }

    /// A client that trusts this CA, with no certificate of its own.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::from_pem(self.ca_pem().into_bytes(), None).unwrap()
    }

    /// A client that trusts `trusted`'s CA and presents a certificate of this one.
    pub fn client_tls_with_cert(&self, trusted: &Pki, name: &str) -> ClientTls {
        let leaf = self.client(name);
        ClientTls::from_pem(trusted.ca_pem().into_bytes(), Some((leaf.cert.into_bytes(), leaf.key.into_bytes())))
            .unwrap()
    }
}
