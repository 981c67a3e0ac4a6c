//! fl's messages ↔ protobuf headers (tensors travel separately, see `wire`).

use std::collections::BTreeMap;

use fedllm_fl::message::{ToClient, ToServer};
use fedllm_fl::params::ParamSet;
use fedllm_fl::strategy::{FitConfig, FitResult};

use crate::pb::{ResultHeader, ResultKind, SplitLoss, TaskHeader, TaskKind};
use crate::wire::WireError;

/// The version of the fit instructions' JSON; a client refuses one it does not know.
const FIT_CONFIG_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct VersionedFitConfig {
    v: u32,
    fit: FitConfig,
}

fn encode_fit_config(c: &FitConfig) -> String {
    serde_json::to_string(&VersionedFitConfig {
        v: FIT_CONFIG_VERSION,
        fit: c.clone(),
    })
    .expect("json")
}

fn decode_fit_config(s: &str) -> Result<FitConfig, WireError> {
    let v: VersionedFitConfig = serde_json::from_str(s)
        .map_err(|e| WireError::Malformed(format!("fit instructions: {e}")))?;
    if v.v != FIT_CONFIG_VERSION {
        return Err(WireError::Malformed(format!(
            "fit instructions version {} (this client speaks {FIT_CONFIG_VERSION})",
            v.v
        )));
    }
    Ok(v.fit)
}

pub fn task_header(m: &ToClient) -> (TaskHeader, Option<&ParamSet>) {
    match m {
        ToClient::Fit {
            round,
            params,
            config,
            seed,
        } => (
            TaskHeader {
                kind: TaskKind::Fit as i32,
                round: *round as u32,
                seed: *seed,
                fit_config: encode_fit_config(config),
                splits: vec![],
                tensors: params.len() as u32,
                secagg: String::new(),
            },
            Some(params),
        ),
        ToClient::Evaluate {
            round,
            params,
            splits,
        } => (
            TaskHeader {
                kind: TaskKind::Evaluate as i32,
                round: *round as u32,
                splits: splits.clone(),
                tensors: params.len() as u32,
                ..Default::default()
            },
            Some(params),
        ),
        ToClient::Finish => (
            TaskHeader {
                kind: TaskKind::Finish as i32,
                ..Default::default()
            },
            None,
        ),
        ToClient::SecAgg { round, stage } => (
            TaskHeader {
                kind: TaskKind::Secagg as i32,
                round: *round as u32,
                secagg: serde_json::to_string(stage).expect("json"),
                ..Default::default()
            },
            None,
        ),
    }
}

/// A SecAgg+ body: JSON of the fl type, anything else refused with what was wrong.
fn decode_secagg<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, WireError> {
    serde_json::from_str(s)
        .map_err(|e| WireError::Malformed(format!("secure-aggregation {what}: {e}")))
}

pub fn to_client(h: &TaskHeader, params: ParamSet) -> Result<ToClient, WireError> {
    Ok(match TaskKind::try_from(h.kind) {
        Ok(TaskKind::Fit) => ToClient::Fit {
            round: h.round as usize,
            params,
            config: decode_fit_config(&h.fit_config)?,
            seed: h.seed,
        },
        Ok(TaskKind::Evaluate) => ToClient::Evaluate {
            round: h.round as usize,
            params,
            splits: h.splits.clone(),
        },
        Ok(TaskKind::Finish) => ToClient::Finish,
        Ok(TaskKind::Secagg) => ToClient::SecAgg {
            round: h.round as usize,
            stage: decode_secagg(&h.secagg, "stage")?,
        },
        _ => return Err(WireError::Malformed(format!("task kind {}", h.kind))),
    })
}

pub fn result_header<'a>(run: &str, m: &'a ToServer) -> (ResultHeader, Option<&'a ParamSet>) {
    let base = ResultHeader {
        run: run.to_string(),
        ..Default::default()
    };
    match m {
        ToServer::FitRes { round, result } => (
            ResultHeader {
                client: result.client as u32,
                round: *round as u32,
                kind: ResultKind::FitRes as i32,
                num_samples: result.num_samples as u64,
                metrics: result
                    .metrics
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                tensors: result.params.len() as u32,
                ..base
            },
            Some(&result.params),
        ),
        ToServer::EvalRes {
            round,
            client,
            losses,
        } => (
            ResultHeader {
                client: *client as u32,
                round: *round as u32,
                kind: ResultKind::EvalRes as i32,
                losses: losses
                    .iter()
                    .map(|(s, l, n)| SplitLoss {
                        split: s.clone(),
                        loss: *l,
                        tokens: *n as u64,
                    })
                    .collect(),
                ..base
            },
            None,
        ),
        ToServer::Failed {
            round,
            client,
            reason,
        } => (
            ResultHeader {
                client: *client as u32,
                round: *round as u32,
                kind: ResultKind::Failed as i32,
                reason: reason.clone(),
                ..base
            },
            None,
        ),
        ToServer::SecAgg {
            round,
            client,
            reply,
        } => (
            ResultHeader {
                client: *client as u32,
                round: *round as u32,
                kind: ResultKind::SecaggRes as i32,
                secagg: serde_json::to_string(reply).expect("json"),
                ..base
            },
            None,
        ),
        ToServer::Join { client } => (
            ResultHeader {
                client: *client as u32,
                kind: ResultKind::Failed as i32,
                reason: "join is not a result".into(),
                ..base
            },
            None,
        ),
    }
}

/// What the round loop reads from every fit result.
const FIT_METRICS: [&str; 4] = ["train_loss", "train_tokens", "steps", "nan_skipped"];

pub fn to_server(h: &ResultHeader, params: ParamSet) -> Result<ToServer, WireError> {
    let (round, client) = (h.round as usize, h.client as usize);
    Ok(match ResultKind::try_from(h.kind) {
        Ok(ResultKind::FitRes)
            if !FIT_METRICS
                .iter()
                .all(|k| h.metrics.get(*k).is_some_and(|v| v.is_finite())) =>
        {
            return Err(WireError::Malformed(format!(
                "fit result without finite {}",
                FIT_METRICS.join("/")
            )))
        }
        Ok(ResultKind::FitRes) => ToServer::FitRes {
            round,
            result: FitResult {
                client,
                params,
                num_samples: h.num_samples as usize,
                metrics: h
                    .metrics
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<BTreeMap<_, _>>(),
            },
        },
        Ok(ResultKind::EvalRes) => ToServer::EvalRes {
            round,
            client,
            losses: h
                .losses
                .iter()
                .map(|l| (l.split.clone(), l.loss, l.tokens as usize))
                .collect(),
        },
        Ok(ResultKind::SecaggRes) => ToServer::SecAgg {
            round,
            client,
            reply: decode_secagg(&h.secagg, "reply")?,
        },
        Ok(ResultKind::Failed) => ToServer::Failed {
            round,
            client,
            reason: h.reason.chars().take(500).collect(),
        },
        Err(_) => return Err(WireError::Malformed(format!("result kind {}", h.kind))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fit instructions survive the header round trip, whatever fields they carry.
    #[test]
    fn fit_instructions_round_trip() {
        let config = FitConfig {
            proximal_mu: 0.25,
            start_step: 12,
            lr: Some(3e-4),
            local_steps: Some(7),
            local_tensors: Some(vec!["*lora_B*".into()]),
            report_val: true,
            dp_clip: Some(0.5),
            dp_local_std: 0.125,
            secagg: None,
        };
        let msg = ToClient::Fit {
            round: 4,
            params: ParamSet::new(),
            config: config.clone(),
            seed: 99,
        };
        let (h, _) = task_header(&msg);
        match to_client(&h, ParamSet::new()).unwrap() {
            ToClient::Fit {
                round,
                config: got,
                seed,
                ..
            } => assert_eq!((round, got, seed), (4, config, 99)),
            other => panic!("{other:?}"),
        }
    }

    /// A client refuses instructions it cannot read: another version, or not JSON at all.
    #[test]
    fn unknown_fit_instructions_are_refused() {
        let mut h = TaskHeader {
            kind: TaskKind::Fit as i32,
            round: 1,
            ..Default::default()
        };
        for bad in [
            r#"{"v": 2, "fit": {"proximal_mu": 0.1}}"#,
            "not json",
            "",
            r#"{"v": 1, "fit": {"proximal_mu": "a lot"}}"#,
        ] {
            h.fit_config = bad.to_string();
            let e = to_client(&h, ParamSet::new()).unwrap_err().to_string();
            assert!(e.contains("fit instructions"), "{bad}: {e}");
        }
    }
}
