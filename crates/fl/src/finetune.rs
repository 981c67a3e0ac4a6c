//! Local fine-tuning of one adapter on one data file (`fedllm finetune`): the federated run's
//! assembly path (`assemble`) without the federation. The caller says what to print.

use std::path::{Path, PathBuf};

use fedllm_data::record::Format;
use fedllm_data::template::Template;
use fedllm_data::{LoadReport, TokenizeReport};
use fedllm_model::{CausalLm, LoadOptions};
use fedllm_peft::Adapter;
use fedllm_train::finetune::{heldout_loss, train_loop, Budget, LoopOptions};
use fedllm_train::{StepStats, Trainer};

use crate::assemble::{adapter_config, train_config};
use crate::config::{AdapterCfg, TrainCfg};
use crate::error::{FlError, Result};

/// One fine-tuning job. `train.local_update_steps` is ignored: `budget` says how long.
pub struct Finetune {
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub format: Format,
    pub template: Template,
    pub model: PathBuf,
    pub load: LoadOptions,
    pub adapter: AdapterCfg,
    pub train: TrainCfg,
    pub budget: Budget,
    pub tok_len: usize,
    pub seed: u64,
    /// PEFT adapter files and metrics.jsonl go here.
    pub out: PathBuf,
}

/// What happens, in order, for the caller to report.
pub enum Event<'a> {
    Data(&'a Path, &'a LoadReport),
    Tokenised(&'a TokenizeReport),
    HeldOut(&'a Path, &'a TokenizeReport),
    Adapter {
        kind: &'static str,
        trainable: usize,
    },
    /// The held-out loss before (false) or after (true) training, and its token count.
    HeldOutLoss {
        after: bool,
        loss: f64,
        tokens: usize,
    },
    Step(&'a StepStats),
}

/// What a finished job wrote.
pub struct Done {
    pub steps: usize,
    pub skipped: usize,
    pub metrics: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> FlError {
    FlError::File {
        path: path.into(),
        msg: e.to_string(),
    }
}

pub fn finetune(job: &Finetune, mut on: impl FnMut(Event)) -> Result<Done> {
    let (records, rep) = fedllm_data::load(&job.data, &job.format)?;
    on(Event::Data(&job.data, &rep));
    let loaded = CausalLm::load(&job.model, job.load.clone())?;
    let mut model = loaded.model;
    let tok = loaded
        .tokenizer
        .ok_or_else(|| FlError::Config("the model has no tokenizer".into()))?;
    let (samples, trep) = fedllm_data::tokenize_all(&records, job.template, &tok, job.tok_len)?;
    on(Event::Tokenised(&trep));
    let pad = tok
        .pad_token_id
        .or(tok.eos_token_ids.first().copied())
        .unwrap_or(0);
    // Held-out samples are cut at the same tok_len as training (the loss `fedllm eval loss
    // --tok-len` reports for the same file and length).
    let eval = match &job.eval_data {
        Some(p) => {
            let (r, _) = fedllm_data::load(p, &job.format)?;
            let (s, rep) = fedllm_data::tokenize_all(&r, job.template, &tok, job.tok_len)?;
            on(Event::HeldOut(p, &rep));
            Some(s)
        }
        None => None,
    };
    let adapter = Adapter::init(
        &model,
        adapter_config(&job.adapter, &model),
        job.seed,
        Some(&tok),
    )?;
    adapter.attach(&mut model, true)?;
    on(Event::Adapter {
        kind: adapter.config.name(),
        trainable: adapter.num_trainable(),
    });
    let t = &job.train;
    let total_steps = match job.budget {
        Budget::Steps(n) => n,
        Budget::Epochs(e) => samples.len().div_ceil(t.batch_size * t.grad_accum) * e,
    };
    let mut trainer = Trainer::new(train_config(t, total_steps))?;
    let heldout = |after: bool, on: &mut dyn FnMut(Event)| -> Result<()> {
        if let Some(ev) = &eval {
            let (loss, tokens) = heldout_loss(&model, Some(&adapter), ev, t.batch_size, pad)?;
            on(Event::HeldOutLoss {
                after,
                loss,
                tokens,
            });
        }
        Ok(())
    };
    heldout(false, &mut on)?;
    std::fs::create_dir_all(&job.out).map_err(|e| io(&job.out, e))?;
    let metrics = job.out.join("metrics.jsonl");
    let _ = std::fs::remove_file(&metrics);
    let opts = LoopOptions {
        budget: job.budget,
        batch_size: t.batch_size,
        pad_id: pad,
        seed: job.seed,
        group_by_length: false,
        metrics: Some(metrics.clone()),
    };
    let stats = train_loop(&model, &adapter, &mut trainer, &samples, &opts, |s| {
        on(Event::Step(s))
    })?;
    heldout(true, &mut on)?;
    let base = job
        .model
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    fedllm_peft::io::save(&adapter, &model, &job.out, &base)?;
    Ok(Done {
        steps: stats.iter().filter(|s| !s.skipped).count(),
        skipped: trainer.nan_skipped,
        metrics,
    })
}
