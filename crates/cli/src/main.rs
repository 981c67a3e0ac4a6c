//! `fedllm`: one binary for every role. Parses arguments and calls the libraries; errors are
//! printed as one line (the anyhow chain with `{:#}`) and give a non-zero exit code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

mod chat_cmd;
mod data_cmd;
mod dist_cmd;
mod eval_cmd;
mod logits_cmd;
mod serve_cmd;
mod train_cmd;
mod tune_cmd;

// Training allocates and frees many large activation buffers per step. glibc's malloc hands
// blocks over 32 MB back to the OS and faults them in again (measured on W1: 30% of the time in
// the kernel zeroing pages); mimalloc with purging disabled reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's option enum: -1 = never return freed memory to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Loading a model for inference runs on 4 KiB pages (`on`), then huge pages come back: with
/// transparent huge pages "always" (as on the W3 machine) the allocator's arenas are backed by
/// 2 MiB pages as soon as any byte of one is touched, and the load's many allocations (the
/// tokenizer's above all) left ~9 MiB of untouched memory resident (`bench generate` b1 peak RSS
/// 185–187 → 176–178 MiB). Off for the whole run it saved ~30 MiB but read 3–8% slower prefills
/// in two alternating comparisons, so the compute keeps huge pages.
fn small_pages(on: bool) {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and changes only how later page
    // faults of this process are served; if it fails (a kernel without it), pages stay as they
    // were, which changes memory use only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, on as libc::c_ulong, 0, 0, 0);
    }
}
use fedllm_model::{
    bench, generate::truncate_at_stop, CausalLm, ChatMessage, GenerateConfig, LoadOptions,
    QuantMode, Sampling,
};

#[derive(Parser)]
#[command(
    name = "fedllm",
    version,
    about = "Federated fine-tuning of large language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt
    #[command(allow_negative_numbers = true)]
    Generate(GenerateArgs),
    /// Chat with a model (and adapter) in its chat template; one turn per stdin line
    Chat(chat_cmd::ChatArgs),
    /// An OpenAI-compatible HTTP server over a model and its adapters
    Serve(serve_cmd::ServeArgs),
    /// Print a model's architecture, size, storage and vocabulary
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Run a federated fine-tuning (standalone simulation) from a YAML config
    #[command(allow_negative_numbers = true)]
    Run {
        /// Run config (YAML, FS-LLM-like sections); optional with --resume
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue the run in this output folder from its last checkpoint
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Hide progress (the per-round bar, or the periodic lines when not on a terminal)
        #[arg(long)]
        no_progress: bool,
        /// Replace the run already in the config's outdir (only its run files are removed)
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Overrides as key.sub=value, e.g. federate.total_round_num=5 train.lr=1e-3
        overrides: Vec<String>,
    },
    /// Federated hyper-parameter search: random, grid, successive halving or Hyperband over
    /// rounds, trials continued from their checkpoints when promoted
    #[command(allow_negative_numbers = true)]
    Tune(Box<tune_cmd::TuneArgs>),
    /// The paper's experiment tables: every cell of a study folder trained, scored and reported
    /// (REPORT.md, SVG plots); resumable after a kill
    #[command(allow_negative_numbers = true)]
    Experiment(ExperimentArgs),
    /// Check a run config without running it: the resolved config, or every problem at once
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Distributed mode: the gRPC server (aggregation, evaluation, checkpoints)
    #[command(allow_negative_numbers = true)]
    Server(Box<dist_cmd::ServerArgs>),
    /// Distributed mode: one organisation's client (trains on its own data)
    #[command(allow_negative_numbers = true)]
    Client(Box<dist_cmd::ClientArgs>),
    /// Make a CA and server/client certificates for trying TLS and mTLS
    Certs(dist_cmd::CertsArgs),
    /// Fine-tune an adapter on local data; writes PEFT files and a metrics log
    #[command(allow_negative_numbers = true)]
    Finetune(Box<train_cmd::FinetuneArgs>),
    /// Fold a LoRA adapter into the base and write a Hugging Face folder or a GGUF file
    Merge {
        #[command(flatten)]
        model: ModelArgs,
        /// Adapter folder (PEFT files)
        #[arg(long)]
        adapter: PathBuf,
        /// Output: a Hugging Face folder (config.json, model.safetensors, tokenizer), or a
        /// `.gguf` file (LLaMA-family bases: llama.cpp's layout and metadata keys, the tokenizer)
        #[arg(long)]
        out: PathBuf,
        /// GGUF output: how the 2-D weights are stored
        #[arg(long, value_enum, default_value = "f16")]
        quant: train_cmd::GgufQuant,
    },
    /// Evaluate a model (+ adapter): HumanEval pass@k, GSM8K, MMLU, loss/perplexity
    #[command(subcommand)]
    Eval(Box<eval_cmd::EvalCmd>),
    /// Federated datasets: split across clients, preview prompts, list presets
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Benchmarks (throughput and memory)
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args)]
struct ExperimentArgs {
    /// The study folder: experiment.yaml and one run config per cell under its table's folder
    study: PathBuf,
    /// Output folder: cells/<table>/<cell>/ (run, logs, scores), REPORT.md, plots, hpo/
    #[arg(long)]
    out: PathBuf,
    /// Only cells whose id (<table>/<cell>) matches: a glob with `*`, else a substring
    /// (`hpo` selects the HPO section)
    #[arg(long)]
    only: Option<String>,
    /// Continue the experiment in --out: finished cells are kept, the rest run or continue
    #[arg(long)]
    resume: bool,
    /// A scale profile of experiment.yaml (`smoke`: tiny models, minutes; not results)
    #[arg(long)]
    scale: Option<String>,
    /// Overrides for every cell, key.sub=value (after the scale's)
    overrides: Vec<String>,
}

fn cmd_experiment(a: ExperimentArgs) -> Result<()> {
    let command = std::iter::once("fedllm".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let o = fedllm_experiment::Options {
        study_dir: a.study,
        out: a.out,
        only: a.only,
        resume: a.resume,
        scale: a.scale,
        overrides: a.overrides,
        exe: std::env::current_exe().context("locating the fedllm binary")?,
        command,
    };
    let t0 = Instant::now();
    let done = fedllm_experiment::run(&o, &mut |l| println!("{l}"))?;
    for (id, why) in &done.not_run {
        println!("not run: {id}: {why}");
    }
    println!(
        "{} finished this time, in {:.1} min; report: {}",
        done.ran.len(),
        t0.elapsed().as_secs_f64() / 60.0,
        done.report.display()
    );
    Ok(())
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a config (and overrides) and print it resolved (paths absolute, defaults filled)
    #[command(allow_negative_numbers = true)]
    Check {
        /// Run config (YAML)
        config: PathBuf,
        /// Overrides as key.sub=value
        overrides: Vec<String>,
    },
    /// Print a JSON Schema of the run config (for editors: completion and checking of the YAML)
    Schema,
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Hugging Face folder (config.json + safetensors) or .gguf file
    #[arg(long)]
    pub model: PathBuf,
    /// Dequantize GGUF weights to the compute dtype, as transformers does (default: keep them
    /// quantized, except for `eval` and `bench train --dtype f32`)
    #[arg(long, conflicts_with = "keep_quantized")]
    pub dequantize: bool,
    /// Keep GGUF weights quantized in memory (the default, except for `eval` and `bench train
    /// --dtype f32`)
    #[arg(long)]
    pub keep_quantized: bool,
    /// Compute in bf16 (fp32 master weights for what is trained)
    #[arg(long)]
    pub bf16: bool,
}

impl ModelArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            dtype: if self.bf16 { DType::BF16 } else { DType::F32 },
            quant: if self.dequantize {
                QuantMode::Dequantize
            } else {
                QuantMode::Keep
            },
            layers: None,
        }
    }

    /// The model for inference (generate, chat, serve, benchmarks): `--dequantize` in f32
    /// keeps the blocks packed, with the dequantized weights' numbers bit for bit.
    pub fn load(&self) -> Result<fedllm_model::Loaded> {
        let mut opts = self.options();
        if opts.quant == QuantMode::Dequantize {
            opts.quant = QuantMode::Packed;
        }
        small_pages(true);
        let loaded = CausalLm::load(&self.model, opts).context("loading model");
        small_pages(false);
        loaded
    }
}

/// Puts the adapter in `dir` on `model` for generation: LoRA and full adapters are attached;
/// prompt-type ones return the virtual-token cache generation continues from.
pub fn attach_for_generation(
    model: &mut CausalLm,
    dir: &std::path::Path,
) -> Result<Option<fedllm_model::KvCache>> {
    let ad = fedllm_peft::io::load(dir, model)
        .with_context(|| format!("loading adapter {}", dir.display()))?;
    ad.attach(model, false)?;
    Ok(ad.generation_prefix(model)?)
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An adapter folder (PEFT files: LoRA, prefix, prompt, P-tuning, full), e.g. a run's
    /// `adapter/` or a personalised client's `adapter_client_<i>/`
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt text (repeat for a batch)
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Vec<String>,
    /// Prompt as comma-separated token ids
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template
    #[arg(long)]
    chat: bool,
    /// System message for --chat
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (the default when no temperature is given)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature (> 0 samples; 0 or absent decodes greedily)
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P
    #[arg(long)]
    top_p: Option<f64>,
    /// Sample only among the K most likely tokens
    #[arg(long)]
    top_k: Option<usize>,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the generated text contains this string (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens
    #[arg(long)]
    ignore_eos: bool,
    /// Print the full output token ids (prompt + new), comma-separated, one line per prompt
    #[arg(long)]
    print_ids: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill and decode throughput, load time and peak RSS (workload W3)
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt tokens for the prefill measurement
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        /// Tokens decoded per measurement
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
        /// Context length before decoding starts
        #[arg(long, default_value_t = 16)]
        decode_ctx: usize,
        /// Batch sizes to measure (comma-separated)
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Repetitions per measurement (the best is reported)
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Logit error of every decode path against the f32 path on real text (every position):
    /// rms, largest difference and how often the top choice differs
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// A data file (JSON, JSONL or .jsonl.gz; e.g. GSM8K's test.jsonl): each record's
        /// instruction, input and output make one text
        #[arg(long)]
        data: PathBuf,
        /// Data file layout (auto detects it from the first record)
        #[arg(long, default_value = "auto")]
        format: String,
        /// Texts read (the file's first)
        #[arg(long, default_value_t = 40)]
        texts: usize,
        /// Tokens per text at most
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Tokens of each text read by one prefill; the rest are decoded one at a time
        /// (teacher-forced), through the decode kernels and the cache (default: all prefilled)
        #[arg(long)]
        prefill_tokens: Option<usize>,
        /// Write the token ids (a JSON list per text) for transformers' side
        /// (scripts/w3/transformers_logits.py)
        #[arg(long)]
        ids_out: Option<PathBuf>,
    },
    /// Decode block products on kept GGUF blocks: ns per block on SmolLM2's shapes, 1 and 8 rows, per path; then GFLOP/s of 256-row prompt products, f32, int16 and int8
    Blocks {
        /// Repetitions per measurement (the best is reported)
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// One round with and without secure aggregation (SecAgg+) over loopback gRPC, clients as
    /// threads answering with synthetic updates: time and wire bytes
    Secagg {
        /// Clients per round to compare
        #[arg(long, value_delimiter = ',', default_value = "3,10,50")]
        clients: Vec<usize>,
        /// Update size in MB of fp32
        #[arg(long, default_value_t = 4.2)]
        mb: f64,
        /// Tensors the update is split into
        #[arg(long, default_value_t = 64)]
        tensors: usize,
        /// Neighbours per client in SecAgg+'s graph (even; default: every other client)
        #[arg(long)]
        neighbours: Option<usize>,
    },
    /// One fit exchange over loopback gRPC (server → client → server): latency, wire bytes, RSS
    Transport {
        /// Update size in MB of fp32 (default: a 4.2 MB-class LoRA update)
        #[arg(long, default_value_t = 4.2)]
        mb: f64,
        /// Tensors the update is split into
        #[arg(long, default_value_t = 64)]
        tensors: usize,
        /// Encodings to compare (none, fp16, bf16, int8; `+zstd` suffix adds zstd)
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,fp16,int8,int8+zstd"
        )]
        compression: Vec<String>,
        /// Exchanges per encoding
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// GFLOP/s of the frozen-weight GEMM on W1's shapes, per kernel path, next to candle f32
    Gemm {
        /// Rows (batch × sequence)
        #[arg(long, default_value_t = 1024)]
        rows: usize,
        /// Repetitions per shape
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Server aggregation speed: FedAvg (and robust rules) over many client updates
    Aggregate {
        /// Client updates aggregated
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Parameters per update (default: LLaMA-7B LoRA r=8 on q,v)
        #[arg(long, default_value_t = 4_194_304)]
        params: usize,
    },
    /// One LoRA training step, workload W1: tokens/s, step time, peak RSS
    Train {
        #[command(flatten)]
        model: ModelArgs,
        /// Compute dtype(s) to measure
        #[arg(long, value_enum, default_value = "both")]
        dtype: train_cmd::BenchDtype,
        /// Optimizer steps measured
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Sequences per step
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per sequence
        #[arg(long, default_value_t = 256)]
        seq: usize,
    },
}

/// Whether the command computes on the main thread, which then joins rayon's pool as worker 0:
/// a forward's parallel loops split from it directly (from outside the pool each loop was
/// handed to the workers while the caller slept on a futex: a sleep and a wake per loop, a few
/// hundred per prompt), and what the forward allocates stays in the main thread's heap, where
/// decoding reuses it (a forward moved to a pool worker left its freed buffers in that
/// worker's heap: +10–30 MiB peak RSS). Servers and the transport benchmarks keep the plain
/// pool: their main thread waits on sockets and would never take a share of the work.
fn computes_on_main(cmd: &Cmd) -> bool {
    !matches!(
        cmd,
        Cmd::Serve(_)
            | Cmd::Server(_)
            | Cmd::Client(_)
            | Cmd::Bench(BenchCmd::Secagg { .. } | BenchCmd::Transport { .. })
    )
}

fn main() -> ExitCode {
    // SAFETY: sets a process-wide allocator option before any worker thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    if let Err(e) = fedllm_kernels::isa::env_cap().and(fedllm_model::qmatvec::env_path()) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if computes_on_main(&cli.cmd) {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global()
        {
            eprintln!("error: thread pool: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: candle appends a backtrace to some errors when RUST_BACKTRACE is set.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Chat(a) => chat_cmd::run(a),
        Cmd::Serve(a) => serve_cmd::run(a),
        Cmd::Info { model } => cmd_info(&model),
        Cmd::Finetune(a) => train_cmd::cmd_finetune(*a),
        Cmd::Run {
            config,
            resume,
            no_progress,
            overwrite,
            overrides,
        } => cmd_run(config, resume, no_progress, overwrite, &overrides),
        Cmd::Tune(t) => tune_cmd::cmd_tune(*t),
        Cmd::Experiment(a) => cmd_experiment(a),
        Cmd::Data(d) => data_cmd::run(d),
        Cmd::Config(ConfigCmd::Check { config, overrides }) => {
            let cfg = fedllm_fl::RunConfig::from_file(&config, &overrides)?;
            print!("{}", cfg.to_yaml());
            Ok(())
        }
        Cmd::Config(ConfigCmd::Schema) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&fedllm_fl::config::json_schema())?
            );
            Ok(())
        }
        Cmd::Server(a) => dist_cmd::cmd_server(*a),
        Cmd::Client(a) => dist_cmd::cmd_client(*a),
        Cmd::Certs(a) => dist_cmd::cmd_certs(a),
        Cmd::Eval(a) => eval_cmd::run(*a),
        Cmd::Merge {
            model,
            adapter,
            out,
            quant,
        } => train_cmd::cmd_merge(&model, &adapter, &out, quant),
        Cmd::Bench(BenchCmd::Aggregate { clients, params }) => cmd_bench_aggregate(clients, params),
        Cmd::Bench(BenchCmd::Gemm { rows, reps }) => cmd_bench_gemm(rows, reps),
        Cmd::Bench(BenchCmd::Blocks { reps }) => cmd_bench_blocks(reps),
        Cmd::Bench(BenchCmd::Logits {
            model,
            data,
            format,
            texts,
            max_tokens,
            prefill_tokens,
            ids_out,
        }) => logits_cmd::cmd_bench_logits(
            &model,
            &data,
            &format,
            texts,
            max_tokens,
            prefill_tokens,
            ids_out.as_deref(),
        ),
        Cmd::Bench(BenchCmd::Secagg {
            clients,
            mb,
            tensors,
            neighbours,
        }) => cmd_bench_secagg(&clients, mb, tensors, neighbours),
        Cmd::Bench(BenchCmd::Transport {
            mb,
            tensors,
            compression,
            rounds,
        }) => cmd_bench_transport(mb, tensors, &compression, rounds),
        Cmd::Bench(BenchCmd::Train {
            model,
            dtype,
            steps,
            batch,
            seq,
        }) => train_cmd::cmd_bench_train(&model, dtype, steps, batch, seq),
        Cmd::Bench(BenchCmd::Generate {
            model,
            prompt_len,
            decode_tokens,
            decode_ctx,
            batch,
            reps,
        }) => cmd_bench_generate(&model, prompt_len, decode_tokens, decode_ctx, &batch, reps),
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if let Some(t) = a.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature must be a finite number >= 0, got {t}");
        }
    }
    if let Some(p) = a.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    let loaded = a.model.load()?;
    let (mut model, tok) = (loaded.model, loaded.tokenizer);
    let prefix = match &a.adapter {
        Some(dir) => attach_for_generation(&mut model, dir)?,
        None => None,
    };
    let vocab = model.config.vocab_size() as u32;
    let prompts: Vec<Vec<u32>> = match &a.prompt_ids {
        Some(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                bail!("--prompt-ids: token id {bad} is outside the vocabulary (size {vocab})");
            }
            vec![ids.clone()]
        }
        None => {
            let tok = tok
                .as_ref()
                .context("the model has no tokenizer; use --prompt-ids")?;
            a.prompt
                .iter()
                .map(|p| {
                    let text = if a.chat {
                        let mut msgs = Vec::new();
                        if let Some(s) = &a.system {
                            msgs.push(ChatMessage::new("system", s));
                        }
                        msgs.push(ChatMessage::new("user", p));
                        tok.apply_chat_template(&msgs, true)?
                    } else {
                        p.clone()
                    };
                    tok.encode(&text, true)
                })
                .collect::<fedllm_model::Result<_>>()?
        }
    };
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("the prompt is empty");
    }
    let sampling = match a.temperature {
        Some(t) if t > 0.0 && !a.greedy => Sampling {
            temperature: t,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        _ => Sampling::greedy(),
    };
    let mut stop_ids = Vec::new();
    if !a.ignore_eos {
        stop_ids.extend(model.config.eos_token_ids());
        if let Some(t) = &tok {
            stop_ids.extend(&t.eos_token_ids);
        }
    }
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_token_ids: stop_ids,
        stop_strings: a.stop.clone(),
    };
    let out = fedllm_model::generate::generate_after(
        &model,
        tok.as_ref(),
        prefix.as_ref(),
        &prompts,
        &cfg,
    )?;
    let mut stdout = std::io::stdout().lock();
    for (p, g) in prompts.iter().zip(&out) {
        if a.print_ids {
            let ids: Vec<String> = p.iter().chain(&g.tokens).map(|i| i.to_string()).collect();
            writeln!(stdout, "{}", ids.join(","))?;
        } else {
            let tok = tok
                .as_ref()
                .context("the model has no tokenizer; use --print-ids")?;
            let text = truncate_at_stop(&tok.decode(&g.tokens, true)?, &a.stop);
            writeln!(stdout, "{text}")?;
        }
    }
    Ok(())
}

fn cmd_run(
    config: Option<PathBuf>,
    resume: Option<PathBuf>,
    no_progress: bool,
    overwrite: bool,
    overrides: &[String],
) -> Result<()> {
    use fedllm_fl::{RunConfig, Simulation};
    let t0 = Instant::now();
    // Config mistakes surface before the model is loaded.
    let cfg = match (&resume, &config) {
        (Some(dir), _) => RunConfig::from_file(&dir.join("config.yaml"), overrides)?,
        (None, Some(c)) => RunConfig::from_file(c, overrides)?,
        (None, None) => bail!("give --config or --resume"),
    };
    if cfg.federate.mode == fedllm_fl::config::Mode::Distributed {
        bail!("federate.mode is `distributed`: start `fedllm server` and one `fedllm client` per organisation (or set federate.mode=standalone)");
    }
    if resume.is_none() {
        fedllm_fl::manifest::claim(&cfg.outdir, overwrite)?;
    }
    let mut sim = match &resume {
        Some(dir) => Simulation::resume(dir, overrides)?,
        None => Simulation::new(cfg)?,
    };
    let c = &sim.cfg;
    eprintln!(
        "run: {} clients ({} per round), {} rounds, strategy {}, baseline {}, adapter {} ({} trainable), data {} → {}",
        c.federate.client_num,
        c.clients_per_round(),
        c.federate.total_round_num,
        c.federate.strategy.as_str(),
        c.federate.baseline.as_str(),
        sim.adapter.config.name(),
        sim.adapter.num_trainable(),
        c.data.source,
        c.outdir.display()
    );
    if resume.is_some() {
        eprintln!("resuming after round {}", sim.server.round);
    }
    let s = sim.run(!no_progress, None, |l| eprintln!("{l}"))?;
    println!("{}", s.table);
    if let (Some(r), Some(l)) = (s.best_round, s.best_loss) {
        println!("best round: {r} (held-out loss {l:.4})");
    }
    let first = s
        .records
        .iter()
        .find_map(|r| r.server_test_loss.or(r.client_val_loss));
    let last = s
        .records
        .iter()
        .rev()
        .find_map(|r| r.server_test_loss.or(r.client_val_loss));
    if let (Some(a), Some(b)) = (first, last) {
        println!("held-out loss before → after: {a:.4} → {b:.4}");
    }
    println!(
        "adapter (final round {}): {}; metrics: {}/metrics.{{jsonl,csv}}, plot: {}/loss.svg, run.json; {:.1} s, peak RSS {:.0} MB",
        sim.server.round,
        s.adapter_dir.display(),
        sim.cfg.outdir.display(),
        sim.cfg.outdir.display(),
        t0.elapsed().as_secs_f64(),
        bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
    );
    Ok(())
}

fn cmd_bench_transport(
    mb: f64,
    tensors: usize,
    compression: &[String],
    rounds: usize,
) -> Result<()> {
    use fedllm_transport::bench::{roundtrip, synthetic};
    let params = synthetic((mb * 1e6) as usize, tensors)?;
    println!(
        "update: {:.1} MB fp32 in {tensors} tensors; {rounds} exchanges each, loopback",
        mb
    );
    for c in compression {
        let mut d = fedllm_fl::config::DistributedCfg::default();
        let (enc, zstd) = match c.strip_suffix("+zstd") {
            Some(e) => (e, true),
            None => (c.as_str(), false),
        };
        d.compression = enc
            .parse()
            .with_context(|| format!("--compression `{c}`"))?;
        d.zstd = zstd;
        let r = roundtrip(&d, params.clone(), rounds)?;
        println!(
            "{c:>10}: {:.3} s per exchange (down + up), {:.0} MB/s; wire down {:.3} MB ({:.4}x raw), up {:.3} MB ({:.4}x); peak RSS {:.0} MB",
            r.seconds,
            2.0 * r.raw_bytes as f64 / 1e6 / r.seconds,
            r.wire_down as f64 / 1e6,
            r.wire_down as f64 / r.raw_bytes as f64,
            r.wire_up as f64 / 1e6,
            r.wire_up as f64 / r.raw_bytes as f64,
            bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}

fn cmd_bench_secagg(
    clients: &[usize],
    mb: f64,
    tensors: usize,
    neighbours: Option<usize>,
) -> Result<()> {
    use fedllm_transport::bench::{secure_round, synthetic};
    let params = synthetic((mb * 1e6) as usize, tensors)?;
    let k = neighbours.map_or("all others".to_string(), |k| k.to_string());
    println!(
        "bench secagg: {mb:.1} MB fp32 updates in {tensors} tensors, one round on loopback, clients as threads, {} cores; SecAgg+ neighbours: {k}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for &n in clients {
        let plain = secure_round(n, params.clone(), None)?;
        let sec = secure_round(n, params.clone(), Some(neighbours))?;
        let mb_of = |b: usize| b as f64 / 1e6;
        println!(
            "{n:>3} clients: plain {:.2} s, wire {:.1} MB down {:.1} MB up | SecAgg+ {:.2} s ({:.2}x), wire {:.1} MB down {:.1} MB up ({:.2}x the bytes) | peak RSS {:.0} MB",
            plain.seconds,
            mb_of(plain.wire_down),
            mb_of(plain.wire_up),
            sec.seconds,
            sec.seconds / plain.seconds,
            mb_of(sec.wire_down),
            mb_of(sec.wire_up),
            (sec.wire_down + sec.wire_up) as f64 / (plain.wire_down + plain.wire_up) as f64,
            bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
    Ok(())
}

fn cmd_bench_gemm(rows: usize, reps: usize) -> Result<()> {
    use fedllm_kernels::isa;
    let paths = isa::available();
    println!(
        "bench gemm: {rows} rows, {} threads, paths {:?} (default: {})",
        candle_core::utils::get_num_threads(),
        paths.iter().map(|i| i.name()).collect::<Vec<_>>(),
        isa::selected().name()
    );
    for r in fedllm_kernels::bench::bench_gemm(rows, &paths, reps.max(1))? {
        let cols: Vec<String> = r
            .gflops
            .iter()
            .map(|(p, g)| format!("{p} {g:.0}"))
            .collect();
        println!(
            "{:13} [{}x{}]x[{}x{}]  GFLOP/s: {}",
            r.what,
            r.m,
            r.k,
            r.k,
            r.n,
            cols.join(", ")
        );
    }
    Ok(())
}

fn cmd_bench_blocks(reps: usize) -> Result<()> {
    use fedllm_model::qmatvec;
    println!(
        "bench blocks: {} threads, paths {:?} (default: {})",
        fedllm_kernels::pool::global().threads(),
        qmatvec::available()
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>(),
        qmatvec::selected().name()
    );
    for r in fedllm_model::bench::bench_blocks(reps)? {
        let cols: Vec<String> = r
            .paths
            .iter()
            .map(|(p, ns, gb)| format!("{p} {ns:.2} ({gb:.1} GB/s)"))
            .collect();
        println!(
            "{:24} {} [{}x{}] m={}  ns/block: {}",
            r.what,
            r.dtype,
            r.n,
            r.k,
            r.m,
            cols.join(", ")
        );
    }
    // What the prompt products above can reach: each instruction's register-only rate.
    for (name, macs, rate) in fedllm_kernels::bench::peak_rates(20_000_000) {
        println!(
            "ceiling {name:28} {macs:>2} mul-adds/instr: {rate:6.1} G/s per core ({:.1} GFLOP/s)",
            2.0 * rate
        );
    }
    for r in fedllm_model::bench::bench_prompt(reps)? {
        let cols: Vec<String> = r
            .products
            .iter()
            .map(|(p, g)| format!("{p} {g:.1}"))
            .collect();
        println!(
            "prompt {:17} Q4_1 [{}x{}] m={}  GFLOP/s: {}",
            r.what,
            r.n,
            r.k,
            r.m,
            cols.join(", ")
        );
    }
    Ok(())
}

fn cmd_bench_aggregate(clients: usize, params: usize) -> Result<()> {
    use fedllm_fl::aggregate;
    let mut rng = fedllm_rng::Rng::new(1);
    let updates: Vec<Vec<f32>> = (0..clients)
        .map(|_| (0..params).map(|_| rng.next_f64() as f32 - 0.5).collect())
        .collect();
    let refs: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
    let weights: Vec<f64> = (0..clients).map(|i| 1.0 + i as f64).collect();
    println!(
        "bench aggregate: {clients} updates of {params} parameters ({:.1} MB each), {} threads",
        params as f64 * 4.0 / 1e6,
        rayon_threads()
    );
    let time = |name: &str, f: &dyn Fn() -> Vec<f32>| {
        let t0 = Instant::now();
        let out = f();
        println!(
            "{name:<14} {:.3} s  (checksum {:.3})",
            t0.elapsed().as_secs_f64(),
            out.iter().take(1000).sum::<f32>()
        );
    };
    time("fedavg", &|| aggregate::weighted_mean(&refs, &weights));
    time("median", &|| aggregate::median(&refs));
    time("trimmed mean", &|| aggregate::trimmed_mean(&refs, 0.1));
    if let Some(rss) = bench::peak_rss_bytes() {
        println!(
            "peak RSS       {:.0} MB (the updates themselves: {:.0} MB)",
            rss as f64 / 1e6,
            (clients * params * 4) as f64 / 1e6
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn cmd_info(m: &ModelArgs) -> Result<()> {
    let t0 = Instant::now();
    let loaded = m.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    let model = &loaded.model;
    let c = &model.config;
    println!("model:        {}", model.source.display());
    println!("architecture: {}", c.arch_name());
    println!(
        "parameters:   {} ({:.1} M)",
        model.num_parameters(),
        model.num_parameters() as f64 / 1e6
    );
    println!("layers:       {}", c.num_layers());
    match c {
        fedllm_model::ModelConfig::Llama(l) => {
            println!(
                "hidden:       {} (heads {}, kv heads {}, head dim {}, mlp {})",
                l.hidden_size, l.num_heads, l.num_kv_heads, l.head_dim, l.intermediate_size
            );
            let scaling = match l.rope_scaling {
                fedllm_model::config::RopeScaling::None => "no scaling".to_string(),
                fedllm_model::config::RopeScaling::Linear(f) => format!("linear scaling ×{f}"),
                fedllm_model::config::RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max,
                } => format!("llama3 scaling ×{factor} (low {low_freq_factor}, high {high_freq_factor}, original context {original_max})"),
            };
            println!("rope:         theta {}, {scaling}", l.rope_theta);
            println!("tied head:    {}", l.tie_word_embeddings);
        }
        fedllm_model::ModelConfig::Gpt2(g) => {
            println!(
                "hidden:       {} (heads {}, mlp {})",
                g.hidden_size, g.num_heads, g.intermediate_size
            );
        }
    }
    println!("vocab:        {}", c.vocab_size());
    println!("context:      {}", c.context_length());
    let stored: Vec<String> = model
        .storage
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    println!("stored as:    {} (elements)", stored.join(", "));
    let quant = model
        .named_weights()
        .iter()
        .filter(|(_, w)| w.blocks().is_some())
        .count();
    println!(
        "in memory:    {} compute, {quant} quantized matrices, {:.1} MiB of weights",
        model.dtype.as_str(),
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
    match &loaded.tokenizer {
        Some(t) => println!(
            "tokenizer:    {} tokens, bos {}, eos {}, chat template: {}",
            t.vocab_size(),
            t.bos_token_id.map_or("none".into(), |b| b.to_string()),
            if t.eos_token_ids.is_empty() {
                "none".to_string()
            } else {
                t.eos_token_ids
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            if t.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        None => println!("tokenizer:    none"),
    }
    println!("load time:    {load_s:.2} s");
    Ok(())
}

fn cmd_bench_generate(
    m: &ModelArgs,
    prompt_len: usize,
    decode_tokens: usize,
    decode_ctx: usize,
    batches: &[usize],
    reps: usize,
) -> Result<()> {
    if prompt_len == 0 || decode_ctx == 0 {
        bail!("--prompt-len and --decode-ctx must be at least 1");
    }
    let t0 = Instant::now();
    let loaded = m.load()?;
    let load_s = t0.elapsed().as_secs_f64();
    let model = &loaded.model;
    let mode = format!(
        "{:?}{}",
        model.dtype,
        if m.dequantize {
            ", dequantized"
        } else {
            ", weights as stored"
        }
    );
    let path = fedllm_model::qmatvec::selected();
    // The Int16 and Int8 paths' prompt rows take their integer GEMM: say which instruction.
    let prompt = match path {
        fedllm_model::qmatvec::Path::Int16 => format!(
            ", prompts on the int16 GEMM ({})",
            fedllm_kernels::gemm_i16::Kernel::best().instruction()
        ),
        fedllm_model::qmatvec::Path::Int8 => ", prompts on the int8 GEMM (vpdpbusd)".to_string(),
        _ => String::new(),
    };
    println!(
        "bench generate: {} ({mode}), {} threads, block products on {} (FEDLLM_DECODE){prompt}",
        m.model.display(),
        candle_core::utils::get_num_threads(),
        path.name()
    );
    println!("load:            {load_s:.3} s");
    if let Some(ns) = bench::core_round_trip_ns(20_000) {
        println!("cores:           a cache line to another thread and back in {ns:.0} ns");
    }
    let r = bench::bench_generate(model, prompt_len, decode_tokens, decode_ctx, batches, reps)?;
    let ms = |phases: &[(&str, f64)]| -> String {
        let parts: Vec<String> = phases
            .iter()
            .map(|(name, s)| format!("{name} {:.2}", s * 1e3))
            .collect();
        parts.join(", ")
    };
    println!(
        "prefill {:>4} tok: {:.1} tokens/s",
        r.prompt_len, r.prefill_tokens_per_s
    );
    println!("  ms in all:     {}", ms(&r.prefill_phases));
    for ((b, tps, ctx), (_, phases)) in r.decode.iter().zip(&r.phases) {
        println!("decode batch {b:>2}: {tps:.1} tokens/s total ({decode_tokens} steps after {ctx} tokens)");
        println!("  ms per step:   {}", ms(phases));
    }
    if let Some(rss) = bench::peak_rss_bytes() {
        println!("peak RSS:        {:.1} MiB", rss as f64 / (1 << 20) as f64);
    }
    Ok(())
}
