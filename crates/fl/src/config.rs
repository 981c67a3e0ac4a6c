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
    /// Personalised FL (Ditto, FedRep, pFedMe, FedSA-LoRA, FFA-LoRA).
    pub personal: PersonalCfg,
    /// Offsite tuning (FedOT): clients train the edge layers of a compressed emulator.
    pub offsite: OffsiteCfg,
    /// Client-level differential privacy (DP-FedAvg) with an RDP accountant.
    pub dp: DpCfg,
    /// Secure aggregation (SecAgg+): the server learns only the sum of the clients' updates.
    pub secagg: SecAggCfg,
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

impl Baseline {
    /// The name as the config spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Fl => "fl",
            Self::Global => "global",
            Self::Local => "local",
        }
    }
}

/// Closed sets of values are enums: serde refuses anything else and names the allowed values.
macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name { $($(#[$vm])* #[serde(rename = $s)] $v),+ }
        impl $name {
            /// Every allowed value, as the config spells it.
            pub const ALL: &'static [&'static str] = &[$($s),+];
            pub fn as_str(&self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::str::FromStr for $name {
            type Err = FlError;
            fn from_str(s: &str) -> Result<Self> {
                match s {
                    $($s => Ok(Self::$v),)+
                    _ => Err(FlError::Config(format!(
                        "`{s}` is not one of {}",
                        [$($s),+].join(", ")
                    ))),
                }
            }
        }
    };
}

choice!(
    /// How the emulator's frozen middle layers are stored in the file clients load.
    EmulatorQuant { None = "none", F16 = "f16", Bf16 = "bf16", Q8_0 = "q8_0", Q4_1 = "q4_1" }
);
choice!(
    /// Where differential privacy's noise is added.
    DpMode { None = "none", Central = "central", Local = "local" }
);
choice!(
    /// A generation-based score computed at evaluation rounds.
    AccuracyTask { None = "none", Gsm8k = "gsm8k" }
);
choice!(
    /// The held-out records a generation-based score reads.
    AccuracySplit { Val = "val", Test = "test" }
);
choice!(
    /// Where the clients run.
    Mode { Standalone = "standalone", Distributed = "distributed" }
);
choice!(
    /// The data file's layout (`auto`: from the first record's fields).
    DataFormat {
        Auto = "auto",
        Alpaca = "alpaca",
        CodeAlpaca = "codealpaca",
        Dolly = "dolly",
        Gsm8k = "gsm8k",
        HumanEval = "humaneval",
        Mmlu = "mmlu",
    }
);
choice!(
    /// How records become a prompt.
    TemplateName { Alpaca = "alpaca", Chat = "chat", Raw = "raw" }
);
choice!(
    /// How records are dealt to clients.
    SplitterName { Iid = "iid", Dirichlet = "dirichlet", Meta = "meta", SizeSkew = "size-skew" }
);
choice!(
    /// The dtype the model computes in (adapters stay f32).
    ComputeDtype { F32 = "f32", Bf16 = "bf16" }
);
choice!(
    /// Whether a quantized GGUF base stays quantized in memory.
    QuantPolicy { Keep = "keep", Dequantize = "dequantize" }
);
choice!(
    /// The adapter trained and exchanged.
    AdapterKind {
        Lora = "lora",
        Prefix = "prefix",
        Prompt = "prompt",
        Ptuning = "ptuning",
        Full = "full",
    }
);
choice!(
    /// The learning-rate schedule, one curve over the whole run (rounds × local steps).
    ScheduleName { Constant = "constant", Linear = "linear", Cosine = "cosine" }
);
choice!(
    /// Personalised FL: what each client keeps and trains for itself (`personal` section).
    PersonalMethod {
        /// One global adapter (plus any `federate.local_tensors`).
        None = "none",
        /// A personal adapter per client, pulled towards the global one by λ/2·‖p − g‖².
        Ditto = "ditto",
        /// A personal head (`personal.head` patterns) trained first, then the shared body.
        Fedrep = "fedrep",
        /// Moreau-envelope personalisation: personal θ solved per step, w moved towards it.
        Pfedme = "pfedme",
        /// LoRA A matrices shared and averaged, B matrices kept by each client.
        FedsaLora = "fedsa_lora",
        /// LoRA A frozen at its seeded init (the same everywhere), only B trained and sent.
        FfaLora = "ffa_lora",
    }
);
choice!(
    /// `batch`: `local_update_steps` optimizer steps; `epoch`: that many passes over the data.
    LocalBudget { Batch = "batch", Epoch = "epoch" }
);
choice!(
    /// The clients' optimizer.
    OptimizerKind { Sgd = "sgd", Adamw = "adamw" }
);
choice!(
    /// Tensor encoding on the wire.
    Compression { None = "none", Fp16 = "fp16", Bf16 = "bf16", Int8 = "int8" }
);

// No `deny_unknown_fields` here: serde does not support it with `flatten`; `check_keys` covers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Federate {
    pub mode: Mode,
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
    /// Name patterns (`*` wildcards) of adapter tensors that never leave the clients: each client
    /// keeps and trains its own (FedBN-like; `*lora_B*` keeps B matrices as FedSA-LoRA does).
    pub local_tensors: Vec<String>,
    /// Stop with an error after this many consecutive rounds in which no client succeeded
    /// (0 = never stop; default 1 in standalone, where nothing can recover, 3 in distributed).
    pub max_failed_rounds: Option<usize>,
    /// Clients' own tensors (personal parts, the `local` baseline's adapters) held in memory,
    /// in MB; past it, a client's state waits on disk under `outdir/client_state/` until the
    /// client is sampled again.
    pub client_state_memory_mb: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataCfg {
    /// A preset name (fed-gsm8k-3, fed-mmlu, ...) or a data file.
    pub source: String,
    /// The folder presets' files live in (default `data/`; `FEDLLM_DATA` overrides it).
    pub root: Option<PathBuf>,
    pub test_source: Option<PathBuf>,
    pub format: DataFormat,
    pub template: TemplateName,
    /// Overrides the preset's splitter.
    pub splitter: Option<SplitterName>,
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
    pub dtype: ComputeDtype,
    pub quant: QuantPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterCfg {
    #[serde(rename = "type")]
    pub kind: AdapterKind,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub targets: Option<Vec<String>>,
    pub virtual_tokens: usize,
    /// P-tuning's MLP hidden size, and prefix tuning's with `prefix_projection`.
    pub encoder_hidden: usize,
    /// Prefix tuning: reparametrise the prefix through an MLP.
    pub prefix_projection: bool,
    /// Prompt tuning: initialise the virtual tokens from this text's embeddings.
    pub init_text: Option<String>,
    /// Full fine-tuning: glob patterns over HF names (empty = every parameter).
    pub full_patterns: Vec<String>,
    /// Full fine-tuning: only these layer indices.
    pub full_layers: Option<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainCfg {
    pub local_update_steps: usize,
    pub batch_or_epoch: LocalBudget,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub schedule: ScheduleName,
    pub warmup_steps: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalCfg {
    /// Evaluate every this many rounds, and after round 0 and the last (0 = never).
    pub freq: usize,
    pub batch_size: usize,
    /// Cap the records per evaluated split (client val/test, server test).
    pub max_samples: Option<usize>,
    /// A generation-based score of the global adapter at each evaluation, on the server
    /// (`none`: losses only). `gsm8k`: FS-LLM's 8-shot greedy GSM8K accuracy → the round
    /// record's `server_accuracy`, which `fedllm tune --metric server_accuracy --maximize` ranks.
    pub accuracy: AccuracyTask,
    /// Which held-out records it scores: `val` (the clients' validation parts pooled: tune on
    /// these, never on test) or `test` (the server's test set).
    pub accuracy_split: AccuracySplit,
    /// The first this many records of that split (a fixed subset, the same every round).
    pub accuracy_samples: usize,
    pub accuracy_max_new_tokens: usize,
}

/// Client-level DP-FedAvg: each client's update is clipped to L2 norm `clip` on the client;
/// Gaussian noise of standard deviation `noise_multiplier`·C·(largest client weight / total
/// weight) goes on the weighted mean at the server (`central`), or z·C on each client's update
/// (`local`). The accountant assumes the engine's sampling: a fixed number of clients without
/// replacement, under the replace-one relation (sensitivity 2C, so the accountant's multiplier
/// is z/2); local mode counts every round at full participation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpCfg {
    pub mode: DpMode,
    /// C (`.inf`: no clipping).
    pub clip: f64,
    /// z; with `target_epsilon` it is computed before the run instead.
    pub noise_multiplier: f64,
    /// Adapt C to the `target_quantile` of the update norms (Andrew et al. 2021).
    pub adaptive: bool,
    pub target_quantile: f64,
    pub clip_lr: f64,
    /// σ_b of the noised count of clipped clients (0: clients per round / 20, the paper's).
    pub count_std: f64,
    pub delta: f64,
    /// Choose z so that ε after `federate.total_round_num` rounds is this.
    pub target_epsilon: Option<f64>,
    /// Stop cleanly before a round that would take ε past this.
    pub max_epsilon: Option<f64>,
}

impl Default for DpCfg {
    fn default() -> Self {
        Self {
            mode: DpMode::None,
            clip: 1.0,
            noise_multiplier: 1.0,
            adaptive: false,
            target_quantile: 0.5,
            clip_lr: 0.2,
            count_std: 0.0,
            delta: 1e-5,
            target_epsilon: None,
            max_epsilon: None,
        }
    }
}

/// SecAgg+ (Bell et al. 2020). Clients send Δ = (their tensors − the global ones), weighted
/// by w = samples / `max_weight`, clipped to ±`clip_range`, quantised to `quant_bits` bits and
/// masked; the server adds the masked inputs and removes the masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecAggCfg {
    pub enabled: bool,
    /// Neighbours per client in the sparse graph (even, ≥ 2); absent: every other client.
    pub neighbours: Option<usize>,
    /// Shares needed to rebuild a secret; absent: a majority of a client's neighbours.
    pub threshold: Option<usize>,
    pub clip_range: f64,
    pub quant_bits: u32,
    pub max_weight: f64,
}

impl Default for SecAggCfg {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbours: None,
            threshold: None,
            clip_range: 8.0,
            quant_bits: 24,
            max_weight: 1000.0,
        }
    }
}

impl SecAggCfg {
    /// Neighbours of each of `n` sampled clients.
    pub fn degree(&self, n: usize) -> usize {
        self.neighbours
            .map_or(n.saturating_sub(1), |k| k.min(n.saturating_sub(1)))
    }
    /// t for `n` sampled clients.
    pub fn threshold_for(&self, n: usize) -> usize {
        self.threshold.unwrap_or(self.degree(n) / 2 + 1)
    }
}

/// FS-LLM's offsite tuning: layers [0, l) and [r, L) (l = max(emu_l, 1), r = min(emu_r, L − 1))
/// are the trainable adapter, the middle is compressed by dropping layers. `adapter.type full`
/// trains those layers in full (with the embeddings, final norm and LM head unless
/// `freeze_embeddings`), `adapter.type lora` puts LoRA on them only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffsiteCfg {
    pub enabled: bool,
    pub emu_l: usize,
    pub emu_r: usize,
    /// Of the n middle layers keep round(n·(1 − drop_ratio)), evenly spaced.
    pub drop_ratio: f64,
    pub freeze_embeddings: bool,
    /// The emulator file's frozen middle: `none` (f32), `f16`, `bf16` (Hugging Face bases),
    /// `q8_0`, `q4_1` (GGUF bases). A distributed server always writes the file
    /// (`<outdir>/emulator.gguf` or `<outdir>/emulator/`) for clients to load as `model.path`; a
    /// standalone run writes and trains on it unless `none`.
    pub emulator_quant: EmulatorQuant,
    /// Server-side alignment before the rounds: optimizer steps of knowledge distillation of
    /// the emulator's middle towards the full model's (0 = none).
    pub align_steps: usize,
    pub align_lr: f64,
    pub align_batch_size: usize,
    /// The server's own data for alignment (any `data.format`; required when align_steps > 0).
    pub align_data: Option<PathBuf>,
    /// Share of the alignment data held out to measure the KD loss before and after.
    pub align_held_out: f64,
    pub kd_weight: f64,
    pub lm_weight: f64,
    /// An aligned emulator saved by an earlier run (`<outdir>/emulator.safetensors`): load it
    /// instead of aligning again.
    pub emulator: Option<PathBuf>,
    /// Align, save the emulator, and stop before the federated rounds.
    pub stop_after_align: bool,
}

impl Default for OffsiteCfg {
    fn default() -> Self {
        // FS-LLM's defaults (its llm.offsite_tuning section); its runs: emu_l 2, emu_r 30, drop 0.2.
        Self {
            enabled: false,
            emu_l: 1,
            emu_r: 10,
            drop_ratio: 0.5,
            freeze_embeddings: false,
            emulator_quant: EmulatorQuant::None,
            align_steps: 0,
            align_lr: 1e-4,
            align_batch_size: 4,
            align_data: None,
            align_held_out: 0.1,
            kd_weight: 1.0,
            lm_weight: 0.0,
            emulator: None,
            stop_after_align: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersonalCfg {
    pub method: PersonalMethod,
    /// Ditto and pFedMe: the weight λ of λ/2·‖personal − global‖².
    pub lambda: f64,
    /// Ditto: the personal adapter's optimizer steps per round; FedRep: the head's.
    pub personal_steps: usize,
    /// FedRep: name patterns (`*` wildcards) of the personal head; it never leaves the client.
    pub head: Vec<String>,
    /// pFedMe: inner steps K solving for the personal θ at each local step.
    pub inner_steps: usize,
    /// pFedMe: the inner solver's learning rate.
    pub personal_lr: f64,
    /// pFedMe: the server's step β: w ← (1 − β)·w + β·mean(wᵢ) (1 = FedAvg).
    pub beta: f64,
}

impl Default for PersonalCfg {
    fn default() -> Self {
        Self {
            method: PersonalMethod::None,
            lambda: 0.1,
            personal_steps: 5,
            head: Vec::new(),
            inner_steps: 3,
            personal_lr: 0.01,
            beta: 1.0,
        }
    }
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
    pub compression: Compression,
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
            compression: Compression::None,
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
            personal: PersonalCfg::default(),
            offsite: OffsiteCfg::default(),
            dp: DpCfg::default(),
            secagg: SecAggCfg::default(),
            distributed: DistributedCfg::default(),
            outdir: PathBuf::from("runs/latest"),
        }
    }
}

impl Default for Federate {
    fn default() -> Self {
        Self {
            mode: Mode::Standalone,
            client_num: 3,
            sample_client_num: 3,
            sample_client_rate: None,
            total_round_num: 3,
            baseline: Baseline::Fl,
            strategy: StrategyKind::Fedavg,
            strategy_params: StrategyParams::default(),
            save_freq: 1,
            seed: 0,
            local_tensors: Vec::new(),
            max_failed_rounds: None,
            client_state_memory_mb: 1024,
        }
    }
}

impl Default for DataCfg {
    fn default() -> Self {
        Self {
            source: "fed-gsm8k-3".into(),
            root: None,
            test_source: None,
            format: DataFormat::Auto,
            template: TemplateName::Alpaca,
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
            dtype: ComputeDtype::F32,
            quant: QuantPolicy::Keep,
        }
    }
}

impl Default for AdapterCfg {
    fn default() -> Self {
        Self {
            kind: AdapterKind::Lora,
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: None,
            virtual_tokens: 20,
            encoder_hidden: 128,
            prefix_projection: false,
            init_text: None,
            full_patterns: Vec::new(),
            full_layers: None,
        }
    }
}

impl Default for TrainCfg {
    fn default() -> Self {
        Self {
            local_update_steps: 10,
            batch_or_epoch: LocalBudget::Batch,
            batch_size: 4,
            grad_accum: 1,
            optimizer: OptimizerKind::Sgd,
            lr: 1e-4,
            momentum: 0.0,
            weight_decay: 0.0,
            max_grad_norm: None,
            schedule: ScheduleName::Constant,
            warmup_steps: 0,
        }
    }
}

impl Default for EvalCfg {
    fn default() -> Self {
        Self {
            freq: 1,
            batch_size: 8,
            max_samples: Some(64),
            accuracy: AccuracyTask::None,
            accuracy_split: AccuracySplit::Val,
            accuracy_samples: 32,
            accuracy_max_new_tokens: 256,
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

/// Splits `a.b.c=value` (value parsed as YAML).
fn parse_override(item: &str) -> Result<(&str, Value)> {
    let (key, val) = item
        .split_once('=')
        .ok_or_else(|| FlError::Config(format!("override `{item}` is not key.sub=value")))?;
    let value: Value = serde_yaml::from_str(val)
        .map_err(|e| FlError::Config(format!("override `{item}`: {e}")))?;
    Ok((key, value))
}

/// Sets `key` (dotted) to `value` in a config tree.
fn set(root: &mut Value, key: &str, value: Value) {
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
            return;
        }
        node = m.entry(k).or_insert(Value::Mapping(Default::default()));
    }
}

/// The closed sets, by key (for the JSON Schema).
fn choices() -> Vec<(&'static str, Vec<&'static str>)> {
    use crate::strategy::StrategyKind as S;
    let strategies = [
        S::Fedavg,
        S::Fedprox,
        S::Fedavgm,
        S::Fedadam,
        S::Fedyogi,
        S::Median,
        S::TrimmedMean,
        S::Krum,
        S::Bulyan,
        S::NormBounding,
        S::Fedex,
    ];
    vec![
        ("federate.mode", Mode::ALL.to_vec()),
        ("federate.baseline", vec!["fl", "global", "local"]),
        (
            "federate.strategy",
            strategies.iter().map(|s| s.as_str()).collect(),
        ),
        ("data.format", DataFormat::ALL.to_vec()),
        ("data.template", TemplateName::ALL.to_vec()),
        ("data.splitter", SplitterName::ALL.to_vec()),
        ("model.dtype", ComputeDtype::ALL.to_vec()),
        ("model.quant", QuantPolicy::ALL.to_vec()),
        ("adapter.type", AdapterKind::ALL.to_vec()),
        ("train.batch_or_epoch", LocalBudget::ALL.to_vec()),
        ("train.optimizer", OptimizerKind::ALL.to_vec()),
        ("train.schedule", ScheduleName::ALL.to_vec()),
        ("personal.method", PersonalMethod::ALL.to_vec()),
        ("distributed.compression", Compression::ALL.to_vec()),
        ("eval.accuracy", AccuracyTask::ALL.to_vec()),
        ("offsite.emulator_quant", EmulatorQuant::ALL.to_vec()),
        ("dp.mode", DpMode::ALL.to_vec()),
        ("eval.accuracy_split", AccuracySplit::ALL.to_vec()),
    ]
}

/// A JSON Schema (draft 2020-12) of the run config, so editors can complete and check the YAML:
/// every key with its type (from the defaults) and, for closed sets, the allowed values.
pub fn json_schema() -> serde_json::Value {
    use serde_json::json;
    let choices = choices();
    fn walk(v: &Value, path: &str, choices: &[(&str, Vec<&str>)]) -> serde_json::Value {
        if let Some((_, allowed)) = choices.iter().find(|(k, _)| *k == path) {
            let mut e: Vec<serde_json::Value> = allowed.iter().map(|a| json!(a)).collect();
            if path == "data.splitter" {
                e.push(serde_json::Value::Null);
            }
            return json!({ "enum": e });
        }
        match v {
            Value::Mapping(m) => {
                let props: serde_json::Map<String, serde_json::Value> = m
                    .iter()
                    .filter_map(|(k, v)| {
                        let k = k.as_str()?;
                        let p = if path.is_empty() {
                            k.to_string()
                        } else {
                            format!("{path}.{k}")
                        };
                        Some((k.to_string(), walk(v, &p, choices)))
                    })
                    .collect();
                json!({ "type": "object", "properties": props, "additionalProperties": false })
            }
            Value::Bool(_) => json!({ "type": "boolean" }),
            Value::Number(n) if n.is_f64() => json!({ "type": "number" }),
            Value::Number(_) => json!({ "type": "number" }),
            Value::String(_) => json!({ "type": "string" }),
            Value::Sequence(_) => json!({ "type": "array" }),
            // Optional keys (absent by default) take their type from use; any value is offered.
            _ => json!({}),
        }
    }
    let defaults = serde_yaml::to_value(RunConfig::default()).expect("yaml");
    let mut schema = walk(&defaults, "", &choices);
    schema["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
    schema["title"] = json!("fedllm run config");
    schema
}

/// Config keys holding paths: relative ones written in a config file mean "next to this file".
const PATH_KEYS: [&str; 12] = [
    "model.path",
    "data.source",
    "data.test_source",
    "offsite.align_data",
    "offsite.emulator",
    "data.root",
    "outdir",
    "distributed.tokens_file",
    "distributed.token_file",
    "distributed.tls.ca",
    "distributed.tls.cert",
    "distributed.tls.key",
];

/// Rewrites the relative paths under PATH_KEYS against `base` (a preset name in `data.source`
/// is not a path and stays).
fn resolve_paths(v: &mut Value, base: &Path) {
    fn at<'a>(v: &'a mut Value, parts: &[&str]) -> Option<&'a mut Value> {
        match parts.split_first() {
            None => Some(v),
            Some((first, rest)) => match v {
                Value::Mapping(m) => at(m.get_mut(*first)?, rest),
                _ => None,
            },
        }
    }
    for key in PATH_KEYS {
        let parts: Vec<&str> = key.split('.').collect();
        if let Some(Value::String(s)) = at(v, &parts) {
            let p = Path::new(s.as_str());
            let is_preset = key == "data.source" && fedllm_data::federated::preset(s).is_some();
            if !s.is_empty() && p.is_relative() && !is_preset {
                *s = normalize(&base.join(p)).to_string_lossy().into_owned();
            }
        }
    }
}

/// `a/b/../c` → `a/c`, lexically (the folders need not exist yet).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The override that set `path` (or a key above or below it), if any.
fn overridden(path: &str, overrides: &[String]) -> Option<String> {
    overrides
        .iter()
        .find(|o| {
            let key = o.split_once('=').map_or(o.as_str(), |(k, _)| k);
            path == key
                || path.starts_with(&format!("{key}."))
                || key.starts_with(&format!("{path}."))
        })
        .cloned()
}

/// A config error and whether the file (rather than a command-line override) is at fault.
struct Blamed {
    msg: String,
    on_file: bool,
}

impl RunConfig {
    /// YAML text (possibly empty) plus overrides → a validated config.
    pub fn from_yaml(text: &str, overrides: &[String]) -> Result<Self> {
        Self::parse(text, None, overrides).map_err(|b| FlError::Config(b.msg))
    }

    fn parse(
        text: &str,
        base: Option<&Path>,
        overrides: &[String],
    ) -> std::result::Result<Self, Blamed> {
        let file = |msg: String| Blamed { msg, on_file: true };
        let cli = |msg: String| Blamed {
            msg,
            on_file: false,
        };
        let mut v: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml::from_str(text).map_err(|e| file(format!("invalid YAML: {e}")))?
        };
        let schema = schema_keys();
        check_keys(&v, "", &schema).map_err(|e| file(e.to_string()))?;
        if let Some(base) = base {
            resolve_paths(&mut v, base);
        }
        let cwd = std::env::current_dir().unwrap_or_default();
        for o in overrides {
            let (key, value) = parse_override(o).map_err(|e| cli(e.to_string()))?;
            let mut alone = Value::Mapping(Default::default());
            set(&mut alone, key, value);
            check_keys(&alone, "", &schema).map_err(|e| cli(format!("override `{o}`: {e}")))?;
            // Paths typed on the command line mean the current directory; made absolute when
            // a file is involved, so the saved config resumes from anywhere.
            if base.is_some() {
                resolve_paths(&mut alone, &cwd);
            }
            let mut node = &alone;
            for part in key.split('.') {
                node = &node[part];
            }
            set(&mut v, key, node.clone());
        }
        let cfg: RunConfig =
            // The path names the key at fault ("federate.client_num: invalid type ...").
            serde_path_to_error::deserialize(v).map_err(|e| {
                let path = e.path().to_string();
                let msg = format!("`{path}`: {}", e.inner());
                match overridden(&path, overrides) {
                    Some(o) => cli(format!("override `{o}`: {msg}")),
                    None => file(msg),
                }
            })?;
        let problems = cfg.problems();
        if !problems.is_empty() {
            // Blame the file only when no problem names a key the command line set.
            let on_file = problems.iter().all(|p| {
                let key = p.split_whitespace().next().unwrap_or_default();
                overridden(key, overrides).is_none()
            });
            return Err(Blamed {
                msg: problems.join("; "),
                on_file,
            });
        }
        Ok(cfg)
    }

    /// A config file plus overrides. Relative paths in the file resolve against the file's
    /// folder (so a config works from any directory); those on the command line against the
    /// current directory.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FlError::File {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        Self::parse(&text, Some(&base), overrides).map_err(|b| {
            if b.on_file {
                FlError::File {
                    path: path.into(),
                    msg: b.msg,
                }
            } else {
                FlError::Config(b.msg)
            }
        })
    }

    /// Where presets' files live: `FEDLLM_DATA` when set, else `data.root`, else the data
    /// crate's default (`data/`).
    pub fn data_root(&self) -> PathBuf {
        match (&self.data.root, std::env::var_os("FEDLLM_DATA")) {
            (Some(root), None) => root.clone(),
            _ => fedllm_data::federated::data_root(),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("yaml")
    }

    /// Checks every field's range and every cross-field rule, and reports all that fail at
    /// once (each naming the key, the value and what is allowed). Runs before any model loads.
    pub fn validate(&self) -> Result<()> {
        let errors = self.problems();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(FlError::Config(errors.join("; ")))
        }
    }

    /// What `validate` reports, one line per problem.
    pub fn problems(&self) -> Vec<String> {
        let mut e = Vec::new();
        let mut at_least = |key: &str, v: usize, min: usize| {
            if v < min {
                e.push(format!("{key} must be at least {min}, got {v}"));
            }
        };
        let (f, t, a, d, ev, dist) = (
            &self.federate,
            &self.train,
            &self.adapter,
            &self.data,
            &self.eval,
            &self.distributed,
        );
        at_least("federate.client_num", f.client_num, 1);
        at_least("federate.total_round_num", f.total_round_num, 1);
        at_least("train.local_update_steps", t.local_update_steps, 1);
        at_least("train.batch_size", t.batch_size, 1);
        at_least("train.grad_accum", t.grad_accum, 1);
        at_least("adapter.r", a.r, 1);
        at_least("adapter.virtual_tokens", a.virtual_tokens, 1);
        at_least("adapter.encoder_hidden", a.encoder_hidden, 1);
        at_least("data.tok_len", d.tok_len, 2);
        at_least("eval.batch_size", ev.batch_size, 1);
        at_least("eval.accuracy_samples", ev.accuracy_samples, 1);
        at_least(
            "eval.accuracy_max_new_tokens",
            ev.accuracy_max_new_tokens,
            1,
        );
        at_least("federate.krum_select", f.strategy_params.krum_select, 1);
        for (key, v) in [
            ("data.max_train_per_client", d.max_train_per_client),
            ("eval.max_samples", ev.max_samples),
        ] {
            if let Some(v) = v {
                at_least(key, v, 1);
            }
        }
        // (key, value, lower, lower inclusive, upper, upper inclusive)
        let sp = &f.strategy_params;
        let inf = f64::INFINITY;
        let mut ranges: Vec<(&str, f64, f64, bool, f64, bool)> = vec![
            ("train.lr", t.lr, 0.0, false, inf, false),
            ("train.momentum", t.momentum, 0.0, true, 1.0, false),
            ("train.weight_decay", t.weight_decay, 0.0, true, inf, false),
            ("adapter.alpha", a.alpha, 0.0, false, inf, false),
            ("adapter.dropout", a.dropout as f64, 0.0, true, 1.0, false),
            ("data.alpha", d.alpha, 0.0, false, inf, false),
            ("federate.server_lr", sp.server_lr, 0.0, false, inf, false),
            (
                "federate.server_momentum",
                sp.server_momentum,
                0.0,
                true,
                1.0,
                false,
            ),
            ("federate.beta1", sp.beta1, 0.0, true, 1.0, false),
            ("federate.beta2", sp.beta2, 0.0, true, 1.0, false),
            ("federate.tau", sp.tau, 0.0, false, inf, false),
            (
                "federate.proximal_mu",
                sp.proximal_mu,
                0.0,
                true,
                inf,
                false,
            ),
            ("federate.trim_ratio", sp.trim_ratio, 0.0, true, 0.5, false),
            ("federate.norm_bound", sp.norm_bound, 0.0, false, inf, false),
            (
                "personal.lambda",
                self.personal.lambda,
                0.0,
                false,
                inf,
                false,
            ),
            (
                "personal.personal_lr",
                self.personal.personal_lr,
                0.0,
                false,
                inf,
                false,
            ),
            ("personal.beta", self.personal.beta, 0.0, false, inf, false),
        ];
        if let Some(r) = f.sample_client_rate {
            ranges.push(("federate.sample_client_rate", r, 0.0, false, 1.0, true));
        }
        if let Some(n) = t.max_grad_norm {
            ranges.push(("train.max_grad_norm", n, 0.0, false, inf, false));
        }
        if f.mode == Mode::Distributed {
            ranges.extend([
                (
                    "distributed.join_timeout_s",
                    dist.join_timeout_s,
                    0.0,
                    false,
                    inf,
                    false,
                ),
                (
                    "distributed.round_timeout_s",
                    dist.round_timeout_s,
                    0.0,
                    false,
                    inf,
                    false,
                ),
                (
                    "distributed.connect_timeout_s",
                    dist.connect_timeout_s,
                    0.0,
                    false,
                    inf,
                    false,
                ),
                (
                    "distributed.rate_limit",
                    dist.rate_limit,
                    0.0,
                    false,
                    inf,
                    false,
                ),
            ]);
        }
        for (key, v, lo, lo_in, hi, hi_in) in ranges {
            let ok =
                v.is_finite() && (v > lo || (lo_in && v == lo)) && (v < hi || (hi_in && v == hi));
            if !ok {
                let (l, h) = (if lo_in { "[" } else { "(" }, if hi_in { "]" } else { ")" });
                let hi = if hi.is_infinite() {
                    "∞".to_string()
                } else {
                    hi.to_string()
                };
                e.push(format!("{key} must be in {l}{lo}, {hi}{h}, got {v}"));
            }
        }
        if f.sample_client_rate.is_none()
            && (f.sample_client_num == 0 || f.sample_client_num > f.client_num)
        {
            e.push(format!(
                "federate.sample_client_num must be in 1..={}, got {}",
                f.client_num, f.sample_client_num
            ));
        }
        if sp.krum_byzantine >= f.client_num.max(1) {
            e.push(format!(
                "federate.krum_byzantine must be below federate.client_num ({}), got {}",
                f.client_num, sp.krum_byzantine
            ));
        }
        if f.strategy == crate::strategy::StrategyKind::Bulyan
            && self.clients_per_round() < 4 * sp.krum_byzantine + 3
        {
            e.push(format!(
                "federate.strategy `bulyan` with federate.krum_byzantine = {} needs at least {} clients per round, got {}",
                sp.krum_byzantine,
                4 * sp.krum_byzantine + 3,
                self.clients_per_round()
            ));
        }
        if f.strategy == crate::strategy::StrategyKind::Fedex {
            if sp.fedex_lrs.len() * sp.fedex_steps.len() < 2 {
                e.push(format!(
                    "federate.strategy `fedex` needs at least two arms: federate.fedex_lrs {:?} × federate.fedex_steps {:?}",
                    sp.fedex_lrs, sp.fedex_steps
                ));
            }
            if sp.fedex_lrs.iter().any(|l| !(l.is_finite() && *l > 0.0))
                || sp.fedex_steps.contains(&0)
            {
                e.push(
                    "federate.fedex_lrs must be positive and federate.fedex_steps at least 1"
                        .into(),
                );
            }
            if !(sp.fedex_eta.is_finite() && sp.fedex_eta > 0.0) {
                e.push(format!(
                    "federate.fedex_eta must be in (0, ∞), got {}",
                    sp.fedex_eta
                ));
            }
        }
        if t.schedule != ScheduleName::Constant && t.batch_or_epoch == LocalBudget::Epoch {
            e.push(format!(
                "train.schedule `{}` runs over rounds × local steps, so it needs train.batch_or_epoch: batch",
                t.schedule
            ));
        }
        if let Some(s) = d.splits {
            let sum: f64 = s.iter().sum();
            if s.iter().any(|x| !(x.is_finite() && *x >= 0.0)) || (sum - 1.0).abs() > 1e-6 {
                e.push(format!(
                    "data.splits must be three non-negative fractions (train, val, test) summing to 1, got {s:?}"
                ));
            }
        }
        if matches!(&a.targets, Some(t) if t.is_empty()) {
            e.push("adapter.targets must name at least one module (or be left out for the model's defaults)".into());
        }
        e.extend(self.personal_problems());
        e.extend(self.offsite_problems());
        e.extend(self.dp_problems());
        e.extend(self.secagg_problems());
        if ev.accuracy != AccuracyTask::None {
            if !matches!(a.kind, AdapterKind::Lora | AdapterKind::Full) {
                e.push(format!(
                    "eval.accuracy `{}` generates text, which this project does with lora and full adapters only; adapter.type is {}",
                    ev.accuracy, a.kind
                ));
            }
            if f.baseline == Baseline::Local {
                e.push(format!(
                    "eval.accuracy `{}` scores the global adapter, and federate.baseline local has none",
                    ev.accuracy
                ));
            }
        }
        if self.outdir.as_os_str().is_empty() {
            e.push("outdir must not be empty".into());
        }
        if f.mode == Mode::Distributed {
            if f.baseline == Baseline::Global {
                e.push(
                    "federate.baseline `global` pools all data in one place: standalone only"
                        .into(),
                );
            }
            if dist.chunk_bytes == 0 || dist.chunk_bytes + 1024 > dist.max_message_bytes {
                e.push(format!("distributed.chunk_bytes must be at least 1 and 1 KiB below distributed.max_message_bytes ({}), got {}", dist.max_message_bytes, dist.chunk_bytes));
            }
            for (key, v) in [
                ("distributed.min_clients", dist.min_clients),
                ("distributed.min_received", dist.min_received),
            ] {
                if let Some(v) = v {
                    if v == 0 || v > f.client_num {
                        e.push(format!(
                            "{key} must be in 1..={} (federate.client_num), got {v}",
                            f.client_num
                        ));
                    }
                }
            }
        }
        e
    }

    /// What secure aggregation needs of the rest of the config.
    fn secagg_problems(&self) -> Vec<String> {
        use crate::strategy::StrategyKind as S;
        let a = &self.secagg;
        let mut e = Vec::new();
        if !a.enabled {
            return e;
        }
        if !matches!(self.federate.strategy, S::Fedavg | S::Fedprox) {
            e.push(format!(
                "secagg.enabled: the server sees only the sum of the updates, so federate.strategy must be fedavg or fedprox, got {} (median, Krum and trimmed means need individual updates)",
                self.federate.strategy.as_str()
            ));
        }
        if self.federate.baseline != Baseline::Fl
            || self.personal.method != PersonalMethod::None
            || self.offsite.enabled
        {
            e.push("secagg.enabled needs federate.baseline fl, no personal.method and no offsite tuning".into());
        }
        if self.dp.mode == DpMode::Central || self.dp.adaptive {
            e.push("secagg.enabled composes with dp.mode local only (central noise and adaptive clipping need each client's update or clipping bit)".into());
        }
        let n = self.clients_per_round();
        if let Some(k) = a.neighbours {
            if k < 2 || k % 2 == 1 {
                e.push(format!(
                    "secagg.neighbours must be even and at least 2, got {k}"
                ));
            }
        }
        let (deg, t) = (a.degree(n), a.threshold_for(n));
        if t < 1 || t > deg {
            e.push(format!(
                "secagg.threshold must be in 1..={deg} (each client has {deg} neighbour(s) among {n} per round), got {t}"
            ));
        }
        if !(a.clip_range.is_finite() && a.clip_range > 0.0) {
            e.push(format!(
                "secagg.clip_range must be finite and above 0, got {}",
                a.clip_range
            ));
        }
        if !(a.max_weight.is_finite() && a.max_weight > 0.0) {
            e.push(format!(
                "secagg.max_weight must be finite and above 0, got {}",
                a.max_weight
            ));
        }
        // The sum of n values of b bits must not wrap around 2^32.
        let need = usize::BITS - n.saturating_sub(1).leading_zeros();
        if a.quant_bits < 8 || a.quant_bits + need > 32 {
            e.push(format!(
                "secagg.quant_bits must be in 8..={} for {n} clients per round (their sum must fit in 32 bits), got {}",
                32 - need,
                a.quant_bits
            ));
        }
        e
    }

    /// What differential privacy needs of the rest of the config.
    fn dp_problems(&self) -> Vec<String> {
        use crate::strategy::StrategyKind as S;
        let d = &self.dp;
        let mut e = Vec::new();
        if d.mode == DpMode::None {
            return e;
        }
        if !matches!(self.federate.strategy, S::Fedavg | S::Fedprox) {
            e.push(format!(
                "dp.mode {} calibrates noise to a weighted mean of clipped updates: federate.strategy must be fedavg or fedprox, got {} (median, Krum and trimmed means have no such sensitivity bound)",
                d.mode,
                self.federate.strategy.as_str()
            ));
        }
        if self.federate.baseline != Baseline::Fl || self.personal.method != PersonalMethod::None {
            e.push("dp.mode needs federate.baseline fl and no personal.method".into());
        }
        if d.clip.is_nan() || d.clip <= 0.0 {
            e.push(format!(
                "dp.clip must be above 0 (.inf for none), got {}",
                d.clip
            ));
        }
        if !(d.noise_multiplier >= 0.0 && d.noise_multiplier.is_finite()) {
            e.push(format!(
                "dp.noise_multiplier must be finite and >= 0, got {}",
                d.noise_multiplier
            ));
        }
        if !(d.delta > 0.0 && d.delta < 1.0) {
            e.push(format!("dp.delta must be in (0, 1), got {}", d.delta));
        }
        if !(0.0..=1.0).contains(&d.target_quantile) {
            e.push(format!(
                "dp.target_quantile must be in [0, 1], got {}",
                d.target_quantile
            ));
        }
        if d.adaptive && !d.clip.is_finite() {
            e.push("dp.adaptive needs a finite initial dp.clip".into());
        }
        let count_std = if d.count_std > 0.0 {
            d.count_std
        } else {
            self.clients_per_round() as f64 / 20.0
        };
        if d.adaptive && d.noise_multiplier > 0.0 && d.noise_multiplier >= 2.0 * count_std {
            e.push(format!(
                "dp.adaptive: counting clipped clients with noise σ_b = {count_std} leaves the updates no budget at dp.noise_multiplier {} (need z < 2·σ_b; raise dp.count_std)",
                d.noise_multiplier
            ));
        }
        for (k, v) in [
            ("dp.target_epsilon", d.target_epsilon),
            ("dp.max_epsilon", d.max_epsilon),
        ] {
            if let Some(v) = v {
                if v.is_nan() || v <= 0.0 {
                    e.push(format!("{k} must be above 0, got {v}"));
                }
            }
        }
        if d.target_epsilon.is_some() && !d.clip.is_finite() {
            e.push("dp.target_epsilon needs a finite dp.clip (noise is z·C)".into());
        }
        e
    }

    /// What offsite tuning needs of the rest of the config.
    fn offsite_problems(&self) -> Vec<String> {
        let o = &self.offsite;
        let mut e = Vec::new();
        if !o.enabled {
            return e;
        }
        if !matches!(self.adapter.kind, AdapterKind::Full | AdapterKind::Lora) {
            e.push(format!(
                "offsite.enabled trains the emulator's edge layers: adapter.type must be full or lora, got {}",
                self.adapter.kind
            ));
        }
        if !(0.0..1.0).contains(&o.drop_ratio) {
            e.push(format!(
                "offsite.drop_ratio must be in [0, 1), got {}",
                o.drop_ratio
            ));
        }
        if o.emu_l >= o.emu_r {
            e.push(format!(
                "offsite.emu_l ({}) must be below offsite.emu_r ({})",
                o.emu_l, o.emu_r
            ));
        }
        if o.align_steps > 0 && o.align_data.is_none() && o.emulator.is_none() {
            e.push(
                "offsite.align_steps > 0 needs offsite.align_data (the server's own data)".into(),
            );
        }
        if !(0.0..1.0).contains(&o.align_held_out) {
            e.push(format!(
                "offsite.align_held_out must be in [0, 1), got {}",
                o.align_held_out
            ));
        }
        for (k, v) in [
            ("offsite.align_lr", o.align_lr),
            ("offsite.kd_weight", o.kd_weight),
            ("offsite.lm_weight", o.lm_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                e.push(format!("{k} must be finite and >= 0, got {v}"));
            }
        }
        if o.align_steps > 0 && o.kd_weight == 0.0 && o.lm_weight == 0.0 {
            e.push("offsite alignment needs offsite.kd_weight or offsite.lm_weight above 0".into());
        }
        if o.align_batch_size == 0 {
            e.push("offsite.align_batch_size must be at least 1, got 0".into());
        }
        if self.personal.method != PersonalMethod::None {
            e.push("offsite.enabled does not combine with personal.method".into());
        }
        e
    }

    /// What a personalised method needs of the rest of the config.
    fn personal_problems(&self) -> Vec<String> {
        use PersonalMethod as P;
        let (p, f) = (&self.personal, &self.federate);
        let mut e = Vec::new();
        let m = p.method.as_str();
        if p.method != P::None && f.baseline != Baseline::Fl {
            e.push(format!(
                "personal.method `{m}` personalises federated training: it needs federate.baseline fl, got {}",
                f.baseline.as_str()
            ));
        }
        if matches!(p.method, P::FedsaLora | P::FfaLora) && self.adapter.kind != AdapterKind::Lora {
            e.push(format!(
                "personal.method `{m}` splits LoRA's A and B: it needs adapter.type lora, got {}",
                self.adapter.kind.as_str()
            ));
        }
        if p.method == P::Ditto && p.personal_steps == 0 {
            e.push("personal.personal_steps must be at least 1 for ditto, got 0".into());
        }
        if p.method == P::Pfedme {
            if p.inner_steps == 0 {
                e.push("personal.inner_steps must be at least 1 for pfedme, got 0".into());
            }
            if self.train.batch_or_epoch != LocalBudget::Batch {
                e.push("personal.method `pfedme` counts local steps: it needs train.batch_or_epoch batch".into());
            }
            if f.strategy != crate::strategy::StrategyKind::Fedavg {
                e.push(format!(
                    "personal.method `pfedme` brings its own server step (personal.beta): it needs federate.strategy fedavg, got {}",
                    f.strategy.as_str()
                ));
            }
        }
        e
    }

    /// Consecutive rounds without a successful client after which the run stops.
    pub fn max_failed_rounds(&self) -> usize {
        self.federate
            .max_failed_rounds
            .unwrap_or(match self.federate.mode {
                Mode::Standalone => 1,
                Mode::Distributed => 3,
            })
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

    /// The schema covers exactly the config's keys, lists each closed set's values (the same
    /// the parser accepts), and the shipped configs' keys and values conform to it.
    #[test]
    fn json_schema_matches_the_config() {
        let schema = json_schema();
        fn keys(s: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
            if let Some(p) = s["properties"].as_object() {
                for (k, v) in p {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    out.push(path.clone());
                    keys(v, &path, out);
                }
            }
        }
        let mut got = Vec::new();
        keys(&schema, "", &mut got);
        let mut want = schema_keys();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let at = |path: &str| {
            path.split('.')
                .fold(&schema, |s, k| &s["properties"][k])
                .clone()
        };
        for (key, allowed) in choices() {
            let e = at(key)["enum"].as_array().cloned().unwrap_or_default();
            for a in &allowed {
                assert!(e.contains(&serde_json::json!(a)), "{key}: {a}");
                let ok = RunConfig::from_yaml("", &[format!("{key}={a}")]);
                // Some values need others (distributed mode, epoch budgets): only the value's own
                // key must not be the complaint.
                if let Err(err) = ok {
                    assert!(
                        !err.to_string().contains("is not one of"),
                        "{key}={a}: {err}"
                    );
                    assert!(
                        !err.to_string().contains("unknown variant"),
                        "{key}={a}: {err}"
                    );
                }
            }
        }
        // Every shipped run config, the paper's cells included (their study file is no run
        // config).
        let mut dirs = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")];
        let mut files = Vec::new();
        while let Some(d) = dirs.pop() {
            for f in std::fs::read_dir(d).unwrap() {
                let p = f.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.file_name().is_some_and(|n| n != "experiment.yaml") {
                    files.push(p);
                }
            }
        }
        assert!(files.len() > 60, "{files:?}");
        for p in files {
            let v: Value = serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            fn conform(v: &Value, s: &serde_json::Value, path: &str) {
                if let Value::Mapping(m) = v {
                    for (k, v) in m {
                        let k = k.as_str().unwrap();
                        let sub = &s["properties"][k];
                        assert!(!sub.is_null(), "{path}.{k} not in the schema");
                        conform(v, sub, &format!("{path}.{k}"));
                    }
                } else if let (Some(e), Value::String(x)) = (s["enum"].as_array(), v) {
                    assert!(e.contains(&serde_json::json!(x)), "{path}: {x}");
                }
            }
            conform(&v, &schema, &p.display().to_string());
        }
    }

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
