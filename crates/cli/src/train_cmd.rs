//! `fedllm finetune`, `fedllm merge`, `fedllm bench train`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, ValueEnum};
use fedllm_model::{bench::peak_rss_bytes, CausalLm, LoadOptions, MatmulPrecision, QuantMode};
use fedllm_peft::{io, merge};
use fedllm_train::finetune::Budget;

use crate::ModelArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AdapterKind {
    Lora,
    Prefix,
    Prompt,
    Ptuning,
    Full,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptKind {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SchedKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Args)]
pub struct AdapterArgs {
    /// Adapter type
    #[arg(long, value_enum, default_value = "lora")]
    pub adapter: AdapterKind,
    /// LoRA rank r
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (the update is scaled by alpha / r)
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// LoRA dropout probability on the adapter's input
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// Comma-separated module names (or suffixes) LoRA attaches to [default: PEFT's per
    /// architecture: q_proj,v_proj for LLaMA, c_attn for GPT-2]
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Virtual tokens for prefix / prompt / P-tuning
    #[arg(long, default_value_t = 20)]
    pub virtual_tokens: usize,
    /// Prompt tuning: initialise from this text's token embeddings
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// P-tuning MLP / prefix projection hidden size
    #[arg(long, default_value_t = 128)]
    pub encoder_hidden: usize,
    /// Prefix tuning: reparametrise the prefix through an MLP (hidden size --encoder-hidden)
    #[arg(long)]
    pub prefix_projection: bool,
    /// Full fine-tuning: glob patterns over HF names (default: every parameter)
    #[arg(long, value_delimiter = ',')]
    pub full_patterns: Vec<String>,
    /// Full fine-tuning: only these layer indices
    #[arg(long, value_delimiter = ',')]
    pub full_layers: Option<Vec<usize>>,
}

impl AdapterArgs {
    /// The run config's adapter section these flags describe (built by the same code as `run`).
    pub fn section(&self) -> fedllm_fl::config::AdapterCfg {
        use fedllm_fl::config::AdapterKind as K;
        fedllm_fl::config::AdapterCfg {
            kind: match self.adapter {
                AdapterKind::Lora => K::Lora,
                AdapterKind::Prefix => K::Prefix,
                AdapterKind::Prompt => K::Prompt,
                AdapterKind::Ptuning => K::Ptuning,
                AdapterKind::Full => K::Full,
            },
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets: self.lora_targets.clone(),
            virtual_tokens: self.virtual_tokens,
            encoder_hidden: self.encoder_hidden,
            prefix_projection: self.prefix_projection,
            init_text: self.prompt_init_text.clone(),
            full_patterns: self.full_patterns.clone(),
            full_layers: self.full_layers.clone(),
        }
    }
}

#[derive(Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: Alpaca-style JSON/JSONL (or Dolly, GSM8K, CodeAlpaca, ...)
    #[arg(long)]
    pub data: PathBuf,
    /// auto, alpaca, codealpaca, dolly, gsm8k, humaneval, mmlu
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// alpaca (FS-LLM's prompts), chat (the model's template), raw
    #[arg(long, default_value = "alpaca")]
    pub template: String,
    /// Held-out data for the loss before and after training
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Optimizer steps to train
    #[arg(long, required_unless_present = "epochs", conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training data (instead of --steps)
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per micro-batch
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Learning rate
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Micro-batches accumulated per optimizer step
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptKind,
    /// Weight decay (decoupled for AdamW)
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// SGD momentum
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// Learning-rate schedule over the run
    #[arg(long, value_enum, default_value = "constant")]
    pub schedule: SchedKind,
    /// Linear warm-up steps before the schedule
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this value
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Maximum tokens per sample (prompt + target)
    #[arg(long, default_value_t = 256)]
    pub tok_len: usize,
    /// Seed for adapter initialisation, shuffling and dropout
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: PEFT adapter files + metrics.jsonl
    #[arg(long)]
    pub out: PathBuf,
}

pub fn cmd_finetune(a: FinetuneArgs) -> Result<()> {
    use fedllm_fl::config::{OptimizerKind, ScheduleName, TrainCfg};
    use fedllm_fl::finetune::{finetune, Event, Finetune};
    let job = Finetune {
        data: a.data.clone(),
        eval_data: a.eval_data.clone(),
        format: a.format.parse()?,
        template: a.template.parse()?,
        model: a.model.model.clone(),
        load: a.model.options(),
        adapter: a.adapter.section(),
        train: TrainCfg {
            batch_size: a.batch_size,
            grad_accum: a.grad_accum,
            optimizer: match a.optimizer {
                OptKind::Adamw => OptimizerKind::Adamw,
                OptKind::Sgd => OptimizerKind::Sgd,
            },
            lr: a.lr,
            momentum: a.momentum,
            weight_decay: a.weight_decay,
            max_grad_norm: a.max_grad_norm,
            schedule: match a.schedule {
                SchedKind::Constant => ScheduleName::Constant,
                SchedKind::Linear => ScheduleName::Linear,
                SchedKind::Cosine => ScheduleName::Cosine,
            },
            warmup_steps: a.warmup_steps,
            ..Default::default()
        },
        budget: match (a.steps, a.epochs) {
            (Some(s), _) => Budget::Steps(s),
            (None, Some(e)) => Budget::Epochs(e),
            (None, None) => bail!("give --steps or --epochs"),
        },
        tok_len: a.tok_len,
        seed: a.seed,
        out: a.out.clone(),
    };
    let done = finetune(&job, |e| {
        match e {
        Event::Data(p, rep) => eprintln!(
            "data: {} records read, {} kept, {} empty dropped ({})",
            rep.read,
            rep.kept,
            rep.empty,
            p.display()
        ),
        Event::Tokenised(r) => eprintln!(
            "tokenised: {} samples, {} dropped (no target token within tok_len {}), {} truncated",
            r.kept, r.dropped_no_target, a.tok_len, r.truncated
        ),
        Event::HeldOut(p, r) => eprintln!(
            "held-out: {} samples, {} dropped (no target token within tok_len {}), {} truncated ({})",
            r.kept,
            r.dropped_no_target,
            a.tok_len,
            r.truncated,
            p.display()
        ),
        Event::Adapter { kind, trainable } => {
            eprintln!("adapter: {kind} with {trainable} trainable parameters")
        }
        Event::HeldOutLoss {
            after,
            loss,
            tokens,
        } => eprintln!(
            "held-out loss {} {loss:.4} ({tokens} tokens)",
            if after { "after: " } else { "before:" }
        ),
        Event::Step(s) => eprintln!(
            "step {:>4}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tokens/s{}",
            s.step,
            s.loss,
            s.lr,
            s.grad_norm,
            s.tokens_per_s,
            if s.skipped {
                "  (skipped: non-finite)"
            } else {
                ""
            }
        ),
    }
    })?;
    eprintln!(
        "saved {} ({} steps, {} skipped for non-finite loss), metrics in {}",
        a.out.display(),
        done.steps,
        done.skipped,
        done.metrics.display()
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum GgufQuant {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_1")]
    Q4_1,
}

pub fn cmd_merge(
    model: &ModelArgs,
    adapter: &std::path::Path,
    out: &std::path::Path,
    quant: GgufQuant,
) -> Result<()> {
    let opts = LoadOptions {
        quant: QuantMode::Dequantize,
        ..model.options()
    };
    let loaded = CausalLm::load(&model.model, opts).context("loading model")?;
    let a = io::load(adapter, &loaded.model).context("loading adapter")?;
    let weights = merge::merged_weights(&loaded.model, &a)?;
    if out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        use candle_core::quantized::GgmlDType as G;
        let ty = match quant {
            GgufQuant::F32 => G::F32,
            GgufQuant::F16 => G::F16,
            GgufQuant::Q8_0 => G::Q8_0,
            GgufQuant::Q4_1 => G::Q4_1,
        };
        merge::write_gguf(&loaded.model, loaded.tokenizer.as_ref(), &weights, ty, out)?;
    } else {
        merge::write_hf_folder(&loaded.model, &weights, loaded.tokenizer.as_ref(), out)?;
    }
    println!(
        "merged {} into {} ({} tensors)",
        adapter.display(),
        out.display(),
        weights.len()
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum BenchDtype {
    F32,
    Bf16,
    Both,
}

pub fn cmd_bench_train(
    m: &ModelArgs,
    dtype: BenchDtype,
    steps: usize,
    batch: usize,
    seq: usize,
) -> Result<()> {
    if dtype == BenchDtype::Both {
        // One process per dtype, so each peak RSS is its own.
        let exe = std::env::current_exe()?;
        for d in ["f32", "bf16"] {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "train", "--model"]).arg(&m.model);
            cmd.args([
                "--dtype",
                d,
                "--steps",
                &steps.to_string(),
                "--batch",
                &batch.to_string(),
                "--seq",
                &seq.to_string(),
            ]);
            if m.keep_quantized {
                cmd.arg("--keep-quantized");
            }
            if m.dequantize {
                cmd.arg("--dequantize");
            }
            let st = cmd.status()?;
            if !st.success() {
                bail!("bench train --dtype {d} failed");
            }
        }
        return Ok(());
    }
    // Activations stay f32 either way; bf16 is the arithmetic of the frozen products (torch
    // autocast's split). f32 dequantizes the base like the PyTorch reference; bf16 keeps it
    // quantized, the kernels widening it panel by panel. --keep-quantized/--dequantize override.
    let bf16 = dtype == BenchDtype::Bf16;
    let keep = m.keep_quantized || (bf16 && !m.dequantize);
    let opts = LoadOptions {
        dtype: DType::F32,
        quant: if keep {
            QuantMode::Keep
        } else {
            QuantMode::Dequantize
        },
        ..m.options()
    };
    let mut model = CausalLm::load(&m.model, opts)
        .context("loading model")?
        .model;
    let precision = if bf16 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    model.set_matmul_precision(precision);
    let path = fedllm_model::linear::kernel_path(precision).unwrap_or("candle");
    eprintln!("bench train: frozen products on the {path} path");
    let r = fedllm_train::bench::bench_train(&mut model, batch, seq, steps)?;
    let rss = peak_rss_bytes().map(|b| b as f64 / 1e6).unwrap_or(f64::NAN);
    println!(
        "RESULT fedllm dtype={} base={} kernels={path} tokens_per_s={:.1} step_s={:.3} peak_rss_mb={rss:.0} threads={}",
        if bf16 { "bf16" } else { "fp32" },
        if keep { "quantized" } else { "dequantized" },
        r.tokens_per_s,
        r.median_step_s,
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
