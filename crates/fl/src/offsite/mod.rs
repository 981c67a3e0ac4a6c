//! Offsite tuning (FedOT, FS-LLM's `offsite_tuning/`): the model owner keeps the full model and
//! hands clients an emulator — the edge layers intact, the middle compressed by dropping
//! layers. Clients train the edge layers (the adapter); the server plugs them back into the
//! full model. The emulator is a view of the full model (`CausalLm::select_layers`: tensors
//! shared, names keep their original layer index), so trained edge tensors carry the full
//! model's names and plug in as they are.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use fedllm_model::CausalLm;
use fedllm_peft::AdapterConfig;
use sha2::{Digest, Sha256};

use crate::config::OffsiteCfg;
use crate::error::{FlError, Result};

pub mod align;
pub mod handoff;

/// FS-LLM's split of `layers` layers: the middle is [l, r) with l = max(emu_l, 1) and
/// r = min(emu_r, L − 1), so at least the first and the last layer are trainable.
pub fn bounds(layers: usize, emu_l: usize, emu_r: usize) -> Result<(usize, usize)> {
    let l = emu_l.max(1);
    let r = emu_r.min(layers.saturating_sub(1));
    if l >= r {
        return Err(FlError::Config(format!(
            "offsite: emu_l {emu_l} and emu_r {emu_r} leave no middle layer in a {layers}-layer model (need max(emu_l, 1) < min(emu_r, {}))",
            layers.saturating_sub(1)
        )));
    }
    Ok((l, r))
}

/// Python's `round` (half to even), which FS-LLM's `drop_layer` uses.
fn round_half_even(x: f64) -> usize {
    let f = x.floor();
    let d = x - f;
    let n = if d > 0.5 || (d == 0.5 && f % 2.0 != 0.0) {
        f + 1.0
    } else {
        f
    };
    n.max(0.0) as usize
}

/// FS-LLM's `drop_layer`: of `n` middle layers keep k = round(n·(1 − drop_ratio)), at positions
/// int(i·(n − 1)/(k − 1)) for i in 0..k (relative to the middle's first layer). FS-LLM divides
/// by zero when k = 1; here the one kept layer is the first.
pub fn kept(n: usize, drop_ratio: f64) -> Vec<usize> {
    let k = round_half_even(n as f64 * (1.0 - drop_ratio)).min(n);
    match k {
        0 => vec![],
        1 => vec![0],
        _ => (0..k)
            .map(|i| (i as f64 * (n - 1) as f64 / (k - 1) as f64) as usize)
            .collect(),
    }
}

/// Which original layers an emulator of `full` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// The trainable adapter layers: [0, l) and [r, L).
    pub edges: Vec<usize>,
    /// The full model's middle [l, r) (the server's secret).
    pub middle: Vec<usize>,
    /// The middle layers the emulator keeps (frozen), original indices.
    pub kept: Vec<usize>,
}

impl Layout {
    pub fn new(layers: usize, cfg: &OffsiteCfg) -> Result<Self> {
        let (l, r) = bounds(layers, cfg.emu_l, cfg.emu_r)?;
        Ok(Self {
            edges: (0..l).chain(r..layers).collect(),
            middle: (l..r).collect(),
            kept: kept(r - l, cfg.drop_ratio)
                .into_iter()
                .map(|i| l + i)
                .collect(),
        })
    }

    /// The emulator's layers, ascending.
    pub fn emulator_layers(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.edges.iter().chain(&self.kept).copied().collect();
        v.sort_unstable();
        v
    }

    /// The emulator of `full`: its edge layers and the kept middle ones (tensors shared).
    pub fn emulator(&self, full: &CausalLm) -> Result<CausalLm> {
        Ok(full.select_layers(&self.emulator_layers())?)
    }

    /// The adapter offsite tuning trains: full fine-tuning of the edge layers (with the
    /// embeddings, final norm and LM head unless frozen) or LoRA restricted to them.
    pub fn adapter_config(&self, base: AdapterConfig, cfg: &OffsiteCfg) -> Result<AdapterConfig> {
        match base {
            AdapterConfig::Full(mut c) => {
                c.layers = Some(self.edges.clone());
                c.non_layer = !cfg.freeze_embeddings;
                Ok(AdapterConfig::Full(c))
            }
            AdapterConfig::Lora(mut c) => {
                c.layers_to_transform = Some(self.edges.clone());
                Ok(AdapterConfig::Lora(c))
            }
            other => Err(FlError::Config(format!(
                "offsite tuning trains full or LoRA adapters, not {}",
                other.name()
            ))),
        }
    }
}

/// The full model's middle layers as the server holds them: name → sha256 of the tensor's
/// bytes (f32, row-major), for the test that no client ever receives one.
pub fn middle_hashes(full: &CausalLm, layout: &Layout) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, w) in full.named_weights() {
        let in_middle =
            fedllm_peft::full::layer_of(&name).is_some_and(|l| layout.middle.contains(&l));
        if in_middle {
            out.insert(name, tensor_hash(&w.dequantize(candle_core::DType::F32)?)?);
        }
    }
    Ok(out)
}

/// sha256 of a tensor's values as f32 bytes.
pub fn tensor_hash(t: &Tensor) -> Result<String> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Saves the emulator's kept middle layers (after alignment); the layout they belong to goes
/// beside them (`.json`).
pub fn save_emulator(path: &Path, emulator: &CausalLm, layout: &Layout) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for (name, w) in emulator.named_weights() {
        if fedllm_peft::full::layer_of(&name).is_some_and(|l| layout.kept.contains(&l)) {
            tensors.insert(name, w.dequantize(candle_core::DType::F32)?);
        }
    }
    let io = |p: &Path, e: String| FlError::File {
        path: p.into(),
        msg: e,
    };
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| io(path, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e.to_string()))?;
    let j = path.with_extension("json");
    std::fs::write(&j, layout_json(layout).to_string()).map_err(|e| io(&j, e.to_string()))
}

fn layout_json(layout: &Layout) -> serde_json::Value {
    serde_json::json!({"edges": layout.edges, "middle": layout.middle, "kept": layout.kept})
}

/// Loads a saved emulator's middle into `emulator`; its layout must be this run's.
pub fn load_emulator(path: &Path, emulator: &mut CausalLm, layout: &Layout) -> Result<()> {
    let err = |msg: String| FlError::File {
        path: path.into(),
        msg,
    };
    let j = path.with_extension("json");
    let text = std::fs::read_to_string(&j).map_err(|e| FlError::File {
        path: j.clone(),
        msg: format!("{e} (a saved emulator comes with its layout file)"),
    })?;
    let got: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let want = layout_json(layout);
    if got != want {
        return Err(err(format!(
            "emulator layout {got} differs from this run's {want} (offsite.emu_l, emu_r, drop_ratio)"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &emulator.device)?;
    let expected: Vec<String> = emulator
        .named_weights()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| fedllm_peft::full::layer_of(n).is_some_and(|l| layout.kept.contains(&l)))
        .collect();
    if let Some(n) = expected.iter().find(|n| !tensors.contains_key(*n)) {
        return Err(err(format!("missing tensor `{n}`")));
    }
    let new: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(emulator.dtype)?)))
        .collect::<Result<_>>()?;
    emulator.replace_weights(&new)?;
    Ok(())
}

/// The full model with the trained edge tensors plugged in (the server's plug-in evaluation).
pub struct Plugin {
    pub model: CausalLm,
    pub adapter: fedllm_peft::Adapter,
}

/// What a run with offsite tuning starts from: the emulator clients train on, the server's
/// plug-in model, and the alignment's report (when it aligned).
pub struct Prepared {
    pub emulator: CausalLm,
    pub layout: Layout,
    /// The run's adapter restricted to the edge layers (clients and plug-in train/use this).
    pub adapter: AdapterConfig,
    pub plugin: Plugin,
    pub align: Option<align::AlignReport>,
}

/// Builds the emulator of `full` (restoring a saved one, or aligning and saving it under
/// `outdir/emulator.safetensors`; a resumed run reloads that instead of aligning again) and the
/// plug-in model for `adapter`.
pub fn prepare(
    cfg: &crate::config::RunConfig,
    resumed: bool,
    full: CausalLm,
    tokenizer: &fedllm_model::Tokenizer,
    adapter: AdapterConfig,
    pad_id: u32,
) -> Result<Prepared> {
    let o = &cfg.offsite;
    let layout = Layout::new(full.config.num_layers(), o)?;
    let mut emulator = layout.emulator(&full)?;
    let mut report = None;
    let saved = cfg.outdir.join("emulator.safetensors");
    if let Some(p) = &o.emulator {
        load_emulator(p, &mut emulator, &layout)?;
    } else if o.align_steps > 0 && resumed && saved.exists() {
        load_emulator(&saved, &mut emulator, &layout)?;
    } else if o.align_steps > 0 {
        let path = o.align_data.as_ref().expect("validated");
        let (records, _) =
            fedllm_data::record::load(path, &crate::assemble::format(cfg.data.format))?;
        let template = crate::assemble::template(cfg.data.template);
        let (samples, _) =
            fedllm_data::tokenize_all(&records, template, tokenizer, cfg.data.tok_len)?;
        // The held-out share is the file's tail: fixed, so runs compare on the same samples.
        let n_held = (samples.len() as f64 * o.align_held_out).round() as usize;
        let (train, held) = samples.split_at(samples.len() - n_held.min(samples.len()));
        let c = align::AlignCfg {
            steps: o.align_steps,
            lr: o.align_lr,
            batch_size: o.align_batch_size,
            kd_weight: o.kd_weight,
            lm_weight: o.lm_weight,
            seed: cfg.federate.seed,
        };
        let r = align::align(&full, &mut emulator, &layout, train, held, &c, pad_id)?;
        std::fs::create_dir_all(&cfg.outdir).map_err(|e| FlError::File {
            path: cfg.outdir.clone(),
            msg: e.to_string(),
        })?;
        save_emulator(&saved, &emulator, &layout)?;
        let j = cfg.outdir.join("align.json");
        std::fs::write(&j, serde_json::to_string_pretty(&r).expect("json")).map_err(|e| {
            FlError::File {
                path: j,
                msg: e.to_string(),
            }
        })?;
        report = Some(r);
    }
    let adapter = layout.adapter_config(adapter, o)?;
    let mut model = full;
    let plug = fedllm_peft::Adapter::init(&model, adapter.clone(), cfg.federate.seed, None)?;
    plug.attach(&mut model, false)?;
    Ok(Prepared {
        emulator,
        layout,
        adapter,
        plugin: Plugin {
            model,
            adapter: plug,
        },
        align: report,
    })
}
