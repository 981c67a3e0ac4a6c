pub mod pb {
    tonic::include_proto!("fedllm.v1");
}
pub mod convert;
pub mod error;
pub mod tls;
pub mod wire;

pub use error::{Result, TransportError};
#[cfg(feature = "bench")]
pub mod bench;
pub mod client;
pub mod server;
