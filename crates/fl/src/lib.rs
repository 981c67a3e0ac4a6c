//! The federated runtime. Server and client are state machines that exchange `message`s; they
//! know nothing of transport. The standalone simulation passes the messages in-process (clients
//! share one frozen base model); the distributed mode carries the same messages over gRPC (`fedllm-transport`, through `Remote`).

pub mod aggregate;
pub mod assemble;
pub mod checkpoint;
pub mod client;
pub mod client_state;
pub mod config;
pub mod dp;
pub mod error;
pub mod finetune;
pub mod manifest;
pub mod message;
pub mod metrics;
pub mod offsite;
pub mod params;
pub mod personal;
pub mod remote;
pub mod secagg;
pub mod server;
pub mod simulation;
pub mod strategy;
pub mod tensorboard;
pub mod tune;

pub use config::RunConfig;
pub use error::{FlError, Result};
pub use remote::{Remote, Role};
pub use simulation::{Simulation, Summary};
