//! Config → library objects, written once: the adapter, the trainer, the model's load options,
//! the data format, template and splitter. `fedllm run`, `server`, `client` and `finetune` all
//! build through here, so a setting one of them accepts means the same in the others.

use candle_core::DType;
use fedllm_data::record::Format;
use fedllm_data::split::Splitter;
use fedllm_data::template::Template;
use fedllm_model::{CausalLm, LoadOptions, QuantMode};
use fedllm_peft::full::FullConfig;
use fedllm_peft::lora::{default_targets, LoraConfig};
use fedllm_peft::prefix::PrefixConfig;
use fedllm_peft::prompt::PromptConfig;
use fedllm_peft::ptuning::PtuningConfig;
use fedllm_peft::AdapterConfig;
use fedllm_train::{OptimizerConfig, Schedule, ScheduleKind, TrainConfig};

use crate::config::{
    AdapterCfg, AdapterKind, ComputeDtype, DataFormat, ModelCfg, OptimizerKind, QuantPolicy,
    ScheduleName, SplitterName, TemplateName, TrainCfg,
};

pub fn adapter_config(a: &AdapterCfg, model: &CausalLm) -> AdapterConfig {
    match a.kind {
        AdapterKind::Prefix => AdapterConfig::Prefix(PrefixConfig {
            num_virtual_tokens: a.virtual_tokens,
            prefix_projection: a.prefix_projection,
            encoder_hidden_size: a.prefix_projection.then_some(a.encoder_hidden),
        }),
        AdapterKind::Prompt => AdapterConfig::Prompt(PromptConfig {
            num_virtual_tokens: a.virtual_tokens,
            init_text: a.init_text.clone(),
        }),
        AdapterKind::Ptuning => AdapterConfig::Ptuning(PtuningConfig {
            num_virtual_tokens: a.virtual_tokens,
            encoder_hidden_size: a.encoder_hidden,
        }),
        AdapterKind::Lora => AdapterConfig::Lora(LoraConfig {
            r: a.r,
            alpha: a.alpha,
            dropout: a.dropout,
            target_modules: a.targets.clone().unwrap_or_else(|| default_targets(model)),
            use_rslora: false,
            init: "kaiming".into(),
            layers_to_transform: None,
        }),
        AdapterKind::Full => AdapterConfig::Full(FullConfig {
            patterns: a.full_patterns.clone(),
            layers: a.full_layers.clone(),
            non_layer: false,
        }),
    }
}

/// The trainer's settings; `total_steps` is the length of the learning-rate schedule (for a
/// federated run, every round's local steps together: the schedule is one curve over the run).
pub fn train_config(t: &TrainCfg, total_steps: usize) -> TrainConfig {
    TrainConfig {
        lr: t.lr,
        optimizer: match t.optimizer {
            OptimizerKind::Adamw => OptimizerConfig::adamw(t.weight_decay),
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                momentum: t.momentum,
                weight_decay: t.weight_decay,
                nesterov: false,
            },
        },
        schedule: Schedule {
            kind: match t.schedule {
                ScheduleName::Constant => ScheduleKind::Constant,
                ScheduleName::Linear => ScheduleKind::Linear,
                ScheduleName::Cosine => ScheduleKind::Cosine,
            },
            warmup_steps: t.warmup_steps,
            total_steps,
        },
        grad_accum: t.grad_accum,
        max_grad_norm: t.max_grad_norm,
    }
}

pub fn load_options(m: &ModelCfg) -> LoadOptions {
    LoadOptions {
        dtype: match m.dtype {
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F32 => DType::F32,
        },
        quant: match m.quant {
            QuantPolicy::Keep => QuantMode::Keep,
            QuantPolicy::Dequantize => QuantMode::Dequantize,
        },
        ..Default::default()
    }
}

pub fn splitter(name: SplitterName, alpha: f64) -> Splitter {
    match name {
        SplitterName::Iid => Splitter::Iid,
        SplitterName::Dirichlet => Splitter::Dirichlet { alpha, min_size: 1 },
        SplitterName::Meta => Splitter::Meta,
        SplitterName::SizeSkew => Splitter::SizeSkew { gamma: 1.0 },
    }
}

pub fn format(f: DataFormat) -> Format {
    match f {
        DataFormat::Auto => Format::Auto,
        DataFormat::Alpaca | DataFormat::CodeAlpaca => Format::Alpaca,
        DataFormat::Dolly => Format::Dolly,
        DataFormat::Gsm8k => Format::Gsm8k,
        DataFormat::HumanEval => Format::HumanEval,
        DataFormat::Mmlu => Format::Mmlu,
    }
}

pub fn template(t: TemplateName) -> Template {
    match t {
        TemplateName::Alpaca => Template::Alpaca,
        TemplateName::Chat => Template::Chat,
        TemplateName::Raw => Template::Raw,
    }
}
