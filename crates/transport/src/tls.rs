//! TLS from the operator's PEM files, and `fedllm certs`: a CA plus server and client
//! certificates for trying the secure setup (operators with a PKI bring their own).

use std::path::Path;

use fedllm_fl::config::TlsCfg;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::{read_file, Result, TransportError};

fn need<'a>(p: &'a Option<std::path::PathBuf>, what: &str) -> Result<&'a Path> {
    p.as_deref().ok_or_else(|| {
        TransportError::Config(format!("distributed.tls.{what} is required with TLS"))
    })
}

/// None when no TLS file is configured.
pub fn server_config(t: &TlsCfg) -> Result<Option<ServerTlsConfig>> {
    if t.cert.is_none() && t.key.is_none() {
        if t.client_auth {
            return Err(TransportError::Config(
                "distributed.tls.client_auth needs tls.cert, tls.key and tls.ca".into(),
            ));
        }
        return Ok(None);
    }
    let id = Identity::from_pem(
        read_file(need(&t.cert, "cert")?)?,
        read_file(need(&t.key, "key")?)?,
    );
    let mut c = ServerTlsConfig::new().identity(id);
    if t.client_auth {
        c = c.client_ca_root(Certificate::from_pem(read_file(need(&t.ca, "ca")?)?));
    }
    Ok(Some(c))
}

pub fn client_config(t: &TlsCfg) -> Result<Option<ClientTlsConfig>> {
    if t.ca.is_none() {
        return Ok(None);
    }
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read_file(need(&t.ca, "ca")?)?));
    if t.cert.is_some() || t.key.is_some() {
        c = c.identity(Identity::from_pem(
            read_file(need(&t.cert, "cert")?)?,
            read_file(need(&t.key, "key")?)?,
        ));
    }
    if let Some(d) = &t.domain {
        c = c.domain_name(d.clone());
    }
    Ok(Some(c))
}

/// Writes ca.pem, server.pem/server.key (for `names`) and client-<i>.pem/.key for `clients`.
pub fn generate(dir: &Path, names: &[String], clients: usize) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let err = |e: rcgen::Error| TransportError::Config(format!("certificate generation: {e}"));
    let write = |name: &str, text: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| TransportError::File {
            path: p,
            msg: e.to_string(),
        })
    };
    std::fs::create_dir_all(dir).map_err(|e| TransportError::File {
        path: dir.into(),
        msg: e.to_string(),
    })?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fedllm CA");
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    write("ca.pem", ca.pem())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, cn: &str, file: &str| -> Result<()> {
        let key = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(sans).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        write(&format!("{file}.pem"), cert.pem())?;
        write(&format!("{file}.key"), key.serialize_pem())
    };
    leaf(names.to_vec(), "fedllm server", "server")?;
    for i in 0..clients {
        leaf(
            vec![format!("client-{i}")],
            &format!("client-{i}"),
            &format!("client-{i}"),
        )?;
    }
    Ok(())
}
