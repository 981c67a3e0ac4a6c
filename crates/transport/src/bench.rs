//! `fedllm bench transport`: one fit exchange of a synthetic update over loopback gRPC (server
//! sends the global set, the client echoes it back), timed, with bytes on the wire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use fedllm_fl::config::DistributedCfg;
use fedllm_fl::message::{ToClient, ToServer};
use fedllm_fl::params::ParamSet;
use fedllm_fl::strategy::{FitConfig, FitResult};
use fedllm_fl::Remote;

use crate::client::{run_with, ClientOptions};
use crate::error::{Result, TransportError};
use crate::server::{serve, ServeOptions};

#[derive(Debug, Clone)]
pub struct BenchResult {
    pub raw_bytes: usize,
    pub seconds: f64,
    pub wire_down: usize,
    pub wire_up: usize,
}

/// `tensors` tensors holding `bytes` of fp32 in all.
pub fn synthetic(bytes: usize, tensors: usize) -> Result<ParamSet> {
    let per = (bytes / 4 / tensors.max(1)).max(1);
    let mut rng = fedllm_rng::Rng::new(11);
    (0..tensors.max(1))
        .map(|i| {
            let v: Vec<f32> = (0..per).map(|_| rng.normal() as f32 * 0.02).collect();
            let t = Tensor::from_vec(v, per, &Device::Cpu)
                .map_err(|e| TransportError::Net(e.to_string()))?;
            Ok((format!("layers.{i}.weight"), t))
        })
        .collect()
}

pub fn roundtrip(d: &DistributedCfg, params: ParamSet, rounds: usize) -> Result<BenchResult> {
    let mut d = d.clone();
    d.listen = "127.0.0.1:0".into();
    let quiet: crate::server::Log = Arc::new(|_: &str| {});
    let mut remote = serve(
        &d,
        ServeOptions {
            run: "bench".into(),
            client_num: 1,
            expect: params.clone(),
            log: quiet,
        },
    )?;
    d.server = format!("http://{}", remote.addr);
    let expect = params.clone();
    let client = std::thread::spawn(move || {
        let o = ClientOptions {
            client: 0,
            token: None,
            straggle: Duration::ZERO,
        };
        run_with(
            &d,
            &o,
            &expect,
            |m| match m {
                ToClient::Fit { round, params, .. } => Ok(Some(ToServer::FitRes {
                    round,
                    result: FitResult {
                        client: 0,
                        params,
                        num_samples: 1,
                        metrics: BTreeMap::from(
                            ["train_loss", "train_tokens", "steps", "nan_skipped"]
                                .map(|k| (k.to_string(), 0.0)),
                        ),
                    },
                })),
                _ => Ok(None),
            },
            |_| {},
        )
    });
    remote.wait_for_clients(1)?;
    let raw_bytes = params.values().map(|t| t.elem_count() * 4).sum();
    let t0 = Instant::now();
    for round in 1..=rounds.max(1) {
        let got = remote.exchange(
            round,
            vec![(
                0,
                ToClient::Fit {
                    round,
                    params: params.clone(),
                    config: FitConfig::default(),
                    seed: 0,
                },
            )],
            1,
        )?;
        if got.len() != 1 {
            return Err(TransportError::Net("the echo client did not answer".into()));
        }
    }
    let seconds = t0.elapsed().as_secs_f64() / rounds.max(1) as f64;
    let (down, up) = remote.take_wire_bytes();
    remote.finish();
    drop(remote);
    let _ = client.join();
    Ok(BenchResult {
        raw_bytes,
        seconds,
        wire_down: down.values().sum::<usize>() / rounds.max(1),
        wire_up: up.values().sum::<usize>() / rounds.max(1),
    })
}

/// One federated round with `clients` client threads on loopback gRPC, each answering a fit
/// with the global set nudged (no training), aggregated as FedAvg in the clear or under
/// SecAgg+ (`secure`: `neighbours` per client, None = all). Seconds for the whole round and
/// wire bytes (all clients, both ways).
pub fn secure_round(
    clients: usize,
    params: ParamSet,
    secure: Option<Option<usize>>,
) -> Result<BenchResult> {
    let mut d = DistributedCfg {
        listen: "127.0.0.1:0".into(),
        round_timeout_s: 600.0,
        join_timeout_s: 120.0,
        ..Default::default()
    };
    let quiet: crate::server::Log = Arc::new(|_: &str| {});
    let mut remote = serve(
        &d,
        ServeOptions {
            run: "bench".into(),
            client_num: clients,
            expect: params.clone(),
            log: quiet,
        },
    )?;
    d.server = format!("http://{}", remote.addr);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (d, expect) = (d.clone(), params.clone());
            std::thread::spawn(move || {
                let o = ClientOptions {
                    client: c,
                    token: None,
                    straggle: Duration::ZERO,
                };
                let mut states = BTreeMap::new();
                run_with(
                    &d,
                    &o,
                    &expect,
                    |m| fedllm_fl::secagg::client::answer(&mut states, c, m, |m| nudge(c, m)),
                    |_| {},
                )
            })
        })
        .collect();
    remote.wait_for_clients(clients)?;
    let raw_bytes = params.values().map(|t| t.elem_count() * 4).sum();
    let fits: Vec<(usize, ToClient)> = (0..clients)
        .map(|c| {
            let m = ToClient::Fit {
                round: 1,
                params: params.clone(),
                config: FitConfig::default(),
                seed: 0,
            };
            (c, m)
        })
        .collect();
    let t0 = Instant::now();
    let aggregated = match secure {
        Some(neighbours) => {
            let cfg = fedllm_fl::config::SecAggCfg {
                enabled: true,
                neighbours,
                ..Default::default()
            };
            let mut ask = |m: Vec<(usize, ToClient)>, min: usize| remote.exchange(1, m, min);
            let o =
                fedllm_fl::secagg::round::run(1, fits, &cfg, 7, clients, &mut ask, &mut |_| {})?;
            o.mean_delta.is_ok() && o.survivors.len() == clients
        }
        None => {
            let got = remote.exchange(1, fits, clients)?;
            let flat: Vec<Vec<f32>> = got
                .iter()
                .filter_map(|m| match m {
                    ToServer::FitRes { result, .. } => {
                        fedllm_fl::params::flatten(&result.params).ok()
                    }
                    _ => None,
                })
                .collect();
            let views: Vec<&[f32]> = flat.iter().map(|v| v.as_slice()).collect();
            let _mean = fedllm_fl::aggregate::weighted_mean(&views, &vec![1.0; views.len()]);
            views.len() == clients
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    if !aggregated {
        return Err(TransportError::Net(
            "not every client's update was aggregated".into(),
        ));
    }
    let (down, up) = remote.take_wire_bytes();
    remote.finish();
    drop(remote);
    for t in threads {
        let _ = t.join();
    }
    Ok(BenchResult {
        raw_bytes,
        seconds,
        wire_down: down.values().sum(),
        wire_up: up.values().sum(),
    })
}

/// A bench client's "training": the global values scaled by 1 + 0.01·(c + 1), 10 samples.
fn nudge(c: usize, m: ToClient) -> fedllm_fl::Result<Option<ToServer>> {
    let ToClient::Fit { round, params, .. } = m else {
        return Ok(None);
    };
    let params = params
        .into_iter()
        .map(|(k, t)| Ok((k, (t * (1.0 + 0.01 * (c + 1) as f64))?)))
        .collect::<candle_core::Result<ParamSet>>()?;
    Ok(Some(ToServer::FitRes {
        round,
        result: FitResult {
            client: c,
            params,
            num_samples: 10,
            metrics: BTreeMap::from(
                ["train_loss", "train_tokens", "steps", "nan_skipped"]
                    .map(|k| (k.to_string(), 0.0)),
            ),
        },
    }))
}
