//! The protocol between server and clients. Every upload names its round and client, so a
//! retried upload is recognised and dropped.

use crate::params::ParamSet;
use crate::strategy::{FitConfig, FitResult};

#[derive(Debug, Clone)]
pub enum ToClient {
    /// Train locally from `params` and report the result.
    Fit {
        round: usize,
        params: ParamSet,
        config: FitConfig,
        seed: u64,
    },
    /// Report the loss of `params` on the named local splits ("val", "test").
    Evaluate {
        round: usize,
        params: ParamSet,
        splits: Vec<String>,
    },
    /// A SecAgg+ stage (setup, key sharing, unmasking); stage 3 is a `Fit` with
    /// `FitConfig::secagg`.
    SecAgg {
        round: usize,
        stage: crate::secagg::protocol::Stage,
    },
    Finish,
}

#[derive(Debug, Clone)]
pub enum ToServer {
    Join {
        client: usize,
    },
    FitRes {
        round: usize,
        result: FitResult,
    },
    EvalRes {
        round: usize,
        client: usize,
        losses: Vec<(String, f64, usize)>,
    },
    Failed {
        round: usize,
        client: usize,
        reason: String,
    },
    SecAgg {
        round: usize,
        client: usize,
        reply: crate::secagg::protocol::Reply,
    },
}
