//! The run configuration: YAML with FS-LLM-like sections, overridable as `key.sub=value`.
//! Parse, then validate, then build: an unknown key fails (with a suggestion) before any model
//! is loaded.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::error::{FlError, Result};
use crate::strategy::{StrategyKind, StrategyParams};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub federate: Federate,
    pub data: DataCfg,
    pub model: ModelCfg,
    pub adapter: AdapterCfg,
    pub train: TrainCfg,
    pub eval: EvalCfg,
    /// `federate.mode: distributed`: the gRPC server and clients.
    pub distributed: DistributedCfg,
    /// Where metrics, plots, checkpoints and the final adapter go.
    pub outdir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// Federated training across the clients.
    Fl,
    /// One client holding all clients' data (the paper's "Global").
    Global,
    /// Each client alone, no aggregation (the paper's "Local").
    Local,
}

// No `deny_unknown_fields` here: serde does not support it with `flatten`; `check_keys` covers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Federate {
    pub mode: String,
    pub client_num: usize,
    /// Clients per round; `sample_client_rate` takes precedence when set.
    pub sample_client_num: usize,
    pub sample_client_rate: Option<f64>,
    pub total_round_num: usize,
    pub baseline: Baseline,
    pub strategy: StrategyKind,
    #[serde(flatten)]
    pub strategy_params: StrategyParams,
    /// Checkpoint every this many rounds (0 = never).
    pub save_freq: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataCfg {
    /// A preset name (fed-gsm8k-3, fed-mmlu, ...) or a data file.
    pub source: String,
    pub test_source: Option<PathBuf>,
    pub format: String,
    pub template: String,
    /// Overrides the preset's splitter: iid, dirichlet, meta, size-skew.
    pub splitter: Option<String>,
    pub alpha: f64,
    pub splits: Option<[f64; 3]>,
    pub tok_len: usize,
    /// Cap each client's training records (quick runs).
    pub max_train_per_client: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelCfg {
    pub path: PathBuf,
    /// f32 or bf16
    pub dtype: String,
    /// keep (quantized frozen base) or dequantize
    pub quant: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterCfg {
    /// lora, prefix, prompt, ptuning
    #[serde(rename = "type")]
    pub kind: String,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Option<Vec<String>>,
    pub virtual_tokens: usize,
    pub encoder_hidden: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainCfg {
    pub local_update_steps: usize,
    /// batch: local_update_steps optimizer steps; epoch: that many passes over the local data.
    pub batch_or_epoch: String,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// sgd or adamw
    pub optimizer: String,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalCfg {
    /// Evaluate every this many rounds (0 = only at the end).
    pub freq: usize,
    pub batch_size: usize,
    /// Cap the records per evaluated split (client val/test, server test).
    pub max_samples: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedCfg {
    /// Server: the address to listen on.
    pub listen: String,
    /// Client: the server's URL (`http://` or, with TLS, `https://`).
    pub server: String,
    /// Clients that must join before round 1 (default: all `federate.client_num`).
    pub min_clients: Option<usize>,
    /// How long the server waits for them.
    pub join_timeout_s: f64,
    /// A round (and an evaluation) closes at this deadline with whoever answered.
    pub round_timeout_s: f64,
    /// ... or as soon as this many fit results arrived (default: every asked client).
    pub min_received: Option<usize>,
    /// Tensor encoding on the wire: none (fp32), fp16, bf16, int8 (blockwise absmax).
    pub compression: String,
    /// zstd over the encoded tensor bytes.
    pub zstd: bool,
    /// Bytes per streamed chunk.
    pub chunk_bytes: usize,
    /// Largest accepted gRPC message (one chunk plus framing).
    pub max_message_bytes: usize,
    /// Requests per second allowed per client (a burst of 4x is tolerated).
    pub rate_limit: f64,
    /// Server: YAML/JSON map of client id to its secret token; absent = no token check.
    pub tokens_file: Option<PathBuf>,
    /// Client: file holding this client's token.
    pub token_file: Option<PathBuf>,
    /// Client: keep retrying an unreachable server this long (it may be restarting).
    pub connect_timeout_s: f64,
    pub tls: TlsCfg,
}

/// PEM files. Server: `cert` + `key`, and `ca` + `client_auth` for mTLS. Client: `ca` (the
/// operator's CA), `cert` + `key` for mTLS, `domain` when the URL's host is not the cert's name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsCfg {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_auth: bool,
    pub domain: Option<String>,
}

impl Default for DistributedCfg {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            server: "http://127.0.0.1:50051".into(),
            min_clients: None,
            join_timeout_s: 600.0,
            round_timeout_s: 3600.0,
            min_received: None,
            compression: "none".into(),
            zstd: false,
            chunk_bytes: 1 << 20,
            max_message_bytes: 4 << 20,
            rate_limit: 50.0,
            tokens_file: None,
            token_file: None,
            connect_timeout_s: 300.0,
            tls: TlsCfg::default(),
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            federate: Federate::default(),
            data: DataCfg::default(),
            model: ModelCfg::default(),
            adapter: AdapterCfg::default(),
            train: TrainCfg::default(),
            eval: EvalCfg::default(),
            distributed: DistributedCfg::default(),
            outdir: PathBuf::from("runs/latest"),
        }
    }
}

impl Default for Federate {
    fn default() -> Self {
        Self {
            mode: "standalone".into(),
            client_num: 3,
            sample_client_num: 3,
            sample_client_rate: None,
            total_round_num: 3,
            baseline: Baseline::Fl,
            strategy: StrategyKind::Fedavg,
            strategy_params: StrategyParams::default(),
            save_freq: 1,
            seed: 0,
        }
    }
}

impl Default for DataCfg {
    fn default() -> Self {
        Self {
            source: "fed-gsm8k-3".into(),
            test_source: None,
            format: "auto".into(),
            template: "alpaca".into(),
            splitter: None,
            alpha: 0.5,
            splits: None,
            tok_len: 256,
            max_train_per_client: None,
        }
    }
}

impl Default for ModelCfg {
    fn default() -> Self {
        Self {
            path: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            dtype: "f32".into(),
            quant: "keep".into(),
        }
    }
}

impl Default for AdapterCfg {
    fn default() -> Self {
        Self {
            kind: "lora".into(),
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: None,
            virtual_tokens: 20,
            encoder_hidden: 128,
        }
    }
}

impl Default for TrainCfg {
    fn default() -> Self {
        Self {
            local_update_steps: 10,
            batch_or_epoch: "batch".into(),
            batch_size: 4,
            grad_accum: 1,
            optimizer: "sgd".into(),
            lr: 1e-4,
            momentum: 0.0,
            weight_decay: 0.0,
            max_grad_norm: None,
        }
    }
}

impl Default for EvalCfg {
    fn default() -> Self {
        Self {
            freq: 1,
            batch_size: 8,
            max_samples: Some(64),
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            cur[j] = (prev[j] + 1)
                .min(cur[j - 1] + 1)
                .min(prev[j - 1] + usize::from(a[i - 1] != b[j - 1]));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Every key path of the default config (the schema), e.g. `train.lr`.
fn schema_keys() -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Mapping(m) = v {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                let path = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                walk(v, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &serde_yaml::to_value(RunConfig::default()).expect("yaml"),
        "",
        &mut out,
    );
    out
}

/// Checks every key of `v` against the schema; the first unknown one is an error with the
/// closest known key as a suggestion.
fn check_keys(v: &Value, prefix: &str, schema: &[String]) -> Result<()> {
    if let Value::Mapping(m) = v {
        for (k, val) in m {
            let k = k
                .as_str()
                .ok_or_else(|| FlError::Config(format!("non-string key under `{prefix}`")))?;
            let path = if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            };
            if !schema.contains(&path) {
                let best = schema
                    .iter()
                    .min_by_key(|s| edit_distance(s, &path))
                    .cloned()
                    .unwrap_or_default();
                return Err(FlError::Config(format!(
                    "unknown key `{path}` (did you mean `{best}`?)"
                )));
            }
            // Lists and optional values are leaves.
            if matches!(val, Value::Mapping(_)) {
                check_keys(val, &path, schema)?;
            }
        }
    }
    Ok(())
}

/// Applies `a.b.c=value` (value parsed as YAML) to a config tree.
fn apply_override(root: &mut Value, item: &str) -> Result<()> {
    let (key, val) = item
        .split_once('=')
        .ok_or_else(|| FlError::Config(format!("override `{item}` is not key.sub=value")))?;
    let value: Value = serde_yaml::from_str(val)
        .map_err(|e| FlError::Config(format!("override `{item}`: {e}")))?;
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !matches!(node, Value::Mapping(_)) {
            *node = Value::Mapping(Default::default());
        }
        let Value::Mapping(m) = node else {
            unreachable!()
        };
        let k = Value::String(p.to_string());
        if i + 1 == parts.len() {
            m.insert(k, value);
            return Ok(());
        }
        node = m.entry(k).or_insert(Value::Mapping(Default::default()));
    }
    Ok(())
}

impl RunConfig {
    /// YAML text (possibly empty) plus overrides → a validated config.
    pub fn from_yaml(text: &str, overrides: &[String]) -> Result<Self> {
        let mut v: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text).map_err(|e| FlError::Config(format!("invalid YAML: {e}")))?
        };
        for o in overrides {
            apply_override(&mut v, o)?;
        }
        check_keys(&v, "", &schema_keys())?;
        let cfg: RunConfig =
            // The path names the key at fault ("federate.client_num: invalid type ...").
            serde_path_to_error::deserialize(v).map_err(|e| {
                let inner = e.inner().to_string();
                FlError::Config(format!("`{}`: {inner}", e.path()))
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FlError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::from_yaml(&text, overrides).map_err(|e| match e {
            FlError::Config(m) => FlError::File {
                path: path.into(),
                msg: m,
            },
            e => e,
        })
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("yaml")
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FlError::Config(m));
        let f = &self.federate;
        match f.mode.as_str() {
            "standalone" => {}
            "distributed" => {
                if f.baseline == Baseline::Global {
                    return bad(
                        "federate.baseline `global` pools all data in one place: standalone only"
                            .into(),
                    );
                }
                let d = &self.distributed;
                if !matches!(d.compression.as_str(), "none" | "fp16" | "bf16" | "int8") {
                    return bad(format!(
                        "distributed.compression must be none, fp16, bf16 or int8, got `{}`",
                        d.compression
                    ));
                }
                if d.chunk_bytes == 0 || d.chunk_bytes + 1024 > d.max_message_bytes {
                    return bad("distributed.chunk_bytes must be at least 1 and 1 KiB below distributed.max_message_bytes".into());
                }
                if d.round_timeout_s <= 0.0 || d.join_timeout_s <= 0.0 || d.rate_limit <= 0.0 {
                    return bad("distributed.round_timeout_s, join_timeout_s and rate_limit must be positive".into());
                }
            }
            m => {
                return bad(format!(
                    "federate.mode must be `standalone` or `distributed`, got `{m}`"
                ))
            }
        }
        if f.client_num == 0 || f.total_round_num == 0 {
            return bad(
                "federate.client_num and federate.total_round_num must be at least 1".into(),
            );
        }
        if let Some(r) = f.sample_client_rate {
            if !(r > 0.0 && r <= 1.0) {
                return bad(format!(
                    "federate.sample_client_rate must be in (0, 1], got {r}"
                ));
            }
        } else if f.sample_client_num == 0 || f.sample_client_num > f.client_num {
            return bad(format!(
                "federate.sample_client_num must be in 1..={}, got {}",
                f.client_num, f.sample_client_num
            ));
        }
        if !matches!(self.train.batch_or_epoch.as_str(), "batch" | "epoch") {
            return bad(format!(
                "train.batch_or_epoch must be `batch` or `epoch`, got `{}`",
                self.train.batch_or_epoch
            ));
        }
        if !matches!(self.train.optimizer.as_str(), "sgd" | "adamw") {
            return bad(format!(
                "train.optimizer must be `sgd` or `adamw`, got `{}`",
                self.train.optimizer
            ));
        }
        if self.train.local_update_steps == 0
            || self.train.batch_size == 0
            || self.train.grad_accum == 0
        {
            return bad("train.local_update_steps, train.batch_size and train.grad_accum must be at least 1".into());
        }
        if !matches!(
            self.adapter.kind.as_str(),
            "lora" | "prefix" | "prompt" | "ptuning"
        ) {
            return bad(format!(
                "adapter.type must be lora, prefix, prompt or ptuning, got `{}`",
                self.adapter.kind
            ));
        }
        if !matches!(self.model.dtype.as_str(), "f32" | "bf16")
            || !matches!(self.model.quant.as_str(), "keep" | "dequantize")
        {
            return bad("model.dtype must be f32|bf16 and model.quant keep|dequantize".into());
        }
        Ok(())
    }

    /// Clients trained per round.
    pub fn clients_per_round(&self) -> usize {
        let f = &self.federate;
        match f.sample_client_rate {
            Some(r) => ((r * f.client_num as f64).round() as usize).clamp(1, f.client_num),
            None => f.sample_client_num,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_unknown_keys() {
        let c = RunConfig::from_yaml(
            "train:\n  lr: 0.5\n",
            &[
                "federate.client_num=5".into(),
                "federate.sample_client_num=2".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            (c.train.lr, c.federate.client_num, c.clients_per_round()),
            (0.5, 5, 2)
        );
        let e = RunConfig::from_yaml("train:\n  lrr: 0.5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `train.lrr`") && e.contains("did you mean `train.lr`"),
            "{e}"
        );
        let e = RunConfig::from_yaml("", &["federate.strategy=fedsgd".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fedsgd"), "{e}");
        let e = RunConfig::from_yaml("", &["federate.sample_client_num=9".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sample_client_num"), "{e}");
        // The resolved config round-trips.
        let c2 = RunConfig::from_yaml(&c.to_yaml(), &[]).unwrap();
        assert_eq!(c, c2);
    }
}
