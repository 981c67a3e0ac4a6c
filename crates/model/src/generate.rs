//! Autoregressive generation with a KV cache: greedy or seeded sampling (temperature, top-k,
//! top-p), stop on EOS ids or stop strings, and batches of prompts of different lengths
//! (left-padded; positions follow the mask, as transformers' `generate` does).

use candle_core::{Result as CResult, Tensor};

use crate::cache::KvCache;
use crate::error::Result;
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;
use fedllm_rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    StopString,
    Length,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens only (an EOS that stopped generation is included, as transformers does).
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// The greedy choice: the first largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, v as f64 / s.temperature))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = s.top_k.filter(|&k| k > 0) {
        cand.truncate(k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, v)| (v - max).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(p) = s.top_p.filter(|&p| p < 1.0) {
        // Keep the smallest prefix whose mass reaches p (at least one token).
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, &q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= z);
    }
    let r = rng.next_f64();
    let mut cum = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        cum += q;
        if r < cum {
            return cand[i].0 as u32;
        }
    }
    cand[probs.len() - 1].0 as u32
}

/// One token per cached row read: the next logits of each row.
fn decode_step(model: &CausalLm, cache: &mut KvCache, next: Vec<u32>) -> Result<Vec<Vec<f32>>> {
    let input = Tensor::from_vec(next, (cache.mask.len(), 1), &model.device)?;
    let hidden = model.forward_hidden(&input, None, Some(cache))?;
    Ok(last_logits(model, &hidden)?)
}

fn last_logits(model: &CausalLm, hidden: &Tensor) -> CResult<Vec<Vec<f32>>> {
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?;
    model.logits(&last)?.squeeze(1)?.to_vec2::<f32>()
}

/// Generates continuations for each prompt. Rows that finish leave the batch.
pub fn generate(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    generate_after(model, tokenizer, None, prompts, cfg)
}

/// The cache of a prompt prefix that many prompts share (few-shot examples): computed once,
/// then every batch starts from it instead of re-reading the shots.
pub fn prefix_cache(model: &CausalLm, prefix: &[u32]) -> Result<KvCache> {
    prefix_cache_after(model, None, prefix)
}

/// `prefix_cache` continuing `start` (a prompt-type adapter's virtual tokens), so few-shot
/// examples are read after them, as the adapter saw every input in training. Read in chunks
/// like any prompt.
pub fn prefix_cache_after(
    model: &CausalLm,
    start: Option<&KvCache>,
    prefix: &[u32],
) -> Result<KvCache> {
    let mut cache = start.cloned().unwrap_or_else(KvCache::new);
    if !prefix.is_empty() {
        read_in_chunks(model, &mut cache, &[prefix.to_vec()], None)?;
    }
    Ok(cache)
}

/// Token ids of a text that prompts will continue, minus its last two tokens: BPE tokenizes a
/// text's end differently from the same characters inside a longer text ("\n\n" alone is one
/// token, before a word two), and the tail must be re-read with what follows.
pub fn prefix_ids(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    ids.truncate(ids.len().saturating_sub(2));
    Ok(ids)
}

/// `prompt` minus `prefix` when the prompt's tokens start with the prefix's (a tokenizer may
/// merge across the boundary; then the prompt is used whole).
pub fn strip_prefix<'a>(prompt: &'a [u32], prefix: &[u32]) -> Option<&'a [u32]> {
    prompt.strip_prefix(prefix).filter(|rest| !rest.is_empty())
}

/// `generate` for prompts that continue a shared one-row `prefix` cache (`prefix_cache`).
pub fn generate_after(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    generate_streaming(model, tokenizer, prefix, prompts, cfg, &mut |_, _| Ok(()))
}

/// `generate_after` that hands every new token to `on_token(prompt index, token)` as soon as
/// it is chosen (chat prints tokens as they come).
pub fn generate_streaming(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generation>> {
    let n = prompts.len();
    let mut out = blank(prompts)?;
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let (mut cache, mut logits) = prefill(model, prefix, prompts, cfg.max_new_tokens)?;
    let mut rng = Rng::new(cfg.sampling.seed);
    // `active[j]` = original index of the j-th row still in the batch.
    let mut active: Vec<usize> = (0..n).collect();
    for step in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (j, &row) in active.iter().enumerate() {
            let tok = sample(&logits[j], &cfg.sampling, &mut rng);
            let g = &mut out[row];
            g.tokens.push(tok);
            on_token(row, tok)?;
            if !check_finish(g, tok, tokenizer, cfg)? {
                keep.push(j);
                next.push(tok);
            }
        }
        if keep.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if keep.len() != active.len() {
            cache.select_rows(&keep)?;
            active = keep.iter().map(|&j| active[j]).collect();
        }
        logits = decode_step(model, &mut cache, next)?;
    }
    Ok(out)
}

/// One empty generation per prompt; an empty prompt is an error.
fn blank(prompts: &[Vec<u32>]) -> Result<Vec<Generation>> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(crate::ModelError::Config(format!("prompt {i} is empty")));
    }
    Ok(prompts
        .iter()
        .map(|_| Generation {
            tokens: vec![],
            finish: Finish::Length,
        })
        .collect())
}

/// Most tokens (rows × positions) one prefill forward reads: a long or wide prompt is read in
/// chunks of positions, so activations and attention scores stay bounded (the cache is what
/// grows). Each position's numbers are the same either way: products are per row, and the
/// attention of a chunk sees the cached positions before it through the same mask.
pub const PREFILL_TOKENS: usize = 512;

/// The prompts (left-padded to one length) read after `prefix`: their cache, with room for
/// `room` more positions, and each one's next-token logits.
pub fn prefill(
    model: &CausalLm,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    room: usize,
) -> Result<(KvCache, Vec<Vec<f32>>)> {
    let n = prompts.len();
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(n);
    let mut mask = Vec::with_capacity(n);
    for p in prompts {
        let pad = len - p.len();
        ids.push([vec![0u32; pad], p.clone()].concat());
        mask.push([vec![0u8; pad], vec![1u8; p.len()]].concat());
    }
    let padded = mask.iter().any(|m| m[0] == 0);
    let mut cache = match prefix {
        Some(p) if p.len > 0 => {
            if p.mask.len() != 1 {
                return Err(crate::ModelError::Config(
                    "a shared prefix cache must hold one row".into(),
                ));
            }
            KvCache::sharing(p, n)?
        }
        _ => KvCache::new(),
    };
    cache.reserve(room);
    let hidden = read_in_chunks(model, &mut cache, &ids, padded.then_some(mask.as_slice()))?;
    let logits = last_logits(model, &hidden)?;
    Ok((cache, logits))
}

/// Rows of equal length (`mask` marks their padding) read into `cache`, at most
/// `PREFILL_TOKENS` tokens a forward: the hidden states of the last chunk's last positions
/// (`CausalLm::forward_hidden_last`; the last row is the last position's).
fn read_in_chunks(
    model: &CausalLm,
    cache: &mut KvCache,
    ids: &[Vec<u32>],
    mask: Option<&[Vec<u8>]>,
) -> Result<Tensor> {
    let (n, len) = (ids.len(), ids[0].len());
    let step = (PREFILL_TOKENS / n.max(1)).max(32);
    let mut hidden = None;
    for a in (0..len).step_by(step) {
        let z = (a + step).min(len);
        let chunk: Vec<u32> = ids.iter().flat_map(|r| r[a..z].iter().copied()).collect();
        let input = Tensor::from_vec(chunk, (n, z - a), &model.device)?;
        let m: Option<Vec<Vec<u8>>> = mask.map(|m| m.iter().map(|r| r[a..z].to_vec()).collect());
        hidden = Some(model.forward_hidden_last(&input, m.as_deref(), cache)?);
    }
    Ok(hidden.expect("rows are not empty"))
}

/// Whether `g` just finished with its last token `tok` (end of sequence or a stop string).
fn check_finish(
    g: &mut Generation,
    tok: u32,
    tokenizer: Option<&Tokenizer>,
    cfg: &GenerateConfig,
) -> Result<bool> {
    if cfg.stop_token_ids.contains(&tok) {
        g.finish = Finish::Eos;
    } else if !cfg.stop_strings.is_empty() {
        if let Some(tk) = tokenizer {
            let text = tk.decode(&g.tokens, false)?;
            if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                g.finish = Finish::StopString;
            }
        }
    }
    Ok(g.finish != Finish::Length)
}

/// A batch decoding step by step whose rows may join and leave between steps (continuous
/// batching). Products are per row and padding is masked, so a row decodes as it would alone:
/// bit for bit on the VNNI decode path; on the f32 paths up to the last bits where a long
/// prompt alone takes the GEMM and, in a small batch, the block products (the tested prompts'
/// tokens agree). Used by `generate_continuous` (evaluation) and by the server, whose requests
/// join a running batch.
pub struct Running<'a> {
    model: &'a CausalLm,
    prefix: Option<&'a KvCache>,
    room: usize,
    cache: KvCache,
    rows: usize,
}

impl<'a> Running<'a> {
    /// An empty batch; joining prompts continue `prefix` and reserve `room` new tokens.
    pub fn new(model: &'a CausalLm, prefix: Option<&'a KvCache>, room: usize) -> Self {
        Running {
            model,
            prefix,
            room,
            cache: KvCache::new(),
            rows: 0,
        }
    }

    /// Reads `prompts` as new rows after the current ones: their next-token logits.
    pub fn join(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        let (c, l) = prefill(self.model, self.prefix, prompts, self.room)?;
        if self.rows == 0 {
            self.cache = c;
        } else {
            self.cache.append_rows(&c)?;
        }
        self.rows += prompts.len();
        Ok(l)
    }

    /// Keeps only these rows (in this order); the others leave.
    pub fn keep(&mut self, rows: &[usize]) -> Result<()> {
        if rows.len() == self.rows && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        if rows.is_empty() {
            self.cache = KvCache::new();
        } else {
            self.cache.select_rows(rows)?;
        }
        self.rows = rows.len();
        Ok(())
    }

    /// Feeds each row its next token: the logits after it.
    pub fn step(&mut self, next: Vec<u32>) -> Result<Vec<Vec<f32>>> {
        decode_step(self.model, &mut self.cache, next)
    }
}

/// Greedy generation for many prompts, at most `slots` decoding together: when a row finishes,
/// the next waiting prompts are read and join the batch (continuous batching), so no slot idles
/// behind the longest answer of a fixed batch; every result equals decoding its prompt alone.
/// `on_done(i, generation)` hears each prompt as it finishes; results in prompt order.
pub fn generate_continuous(
    model: &CausalLm,
    tokenizer: Option<&Tokenizer>,
    prefix: Option<&KvCache>,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    slots: usize,
    on_done: &mut dyn FnMut(usize, &Generation) -> Result<()>,
) -> Result<Vec<Generation>> {
    if cfg.sampling.temperature > 0.0 {
        return Err(crate::ModelError::Config(
            "continuous batching decodes greedily (a sampled row's draws would depend on its neighbours)".into(),
        ));
    }
    let n = prompts.len();
    let mut out = blank(prompts)?;
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let slots = slots.max(1);
    let mut waiting = 0..n;
    let mut active: Vec<usize> = Vec::new();
    let mut batch = Running::new(model, prefix, cfg.max_new_tokens);
    let mut logits: Vec<Vec<f32>> = Vec::new();
    let mut rng = Rng::new(cfg.sampling.seed);
    loop {
        let join: Vec<usize> = waiting.by_ref().take(slots - active.len()).collect();
        let ps: Vec<Vec<u32>> = join.iter().map(|&i| prompts[i].clone()).collect();
        logits.extend(batch.join(&ps)?);
        active.extend(join);
        if active.is_empty() {
            return Ok(out);
        }
        let mut next = Vec::with_capacity(active.len());
        let mut keep = Vec::with_capacity(active.len());
        for (j, &row) in active.iter().enumerate() {
            let tok = sample(&logits[j], &cfg.sampling, &mut rng);
            let g = &mut out[row];
            g.tokens.push(tok);
            if check_finish(g, tok, tokenizer, cfg)? || g.tokens.len() == cfg.max_new_tokens {
                on_done(row, g)?;
            } else {
                keep.push(j);
                next.push(tok);
            }
        }
        batch.keep(&keep)?;
        active = keep.iter().map(|&j| active[j]).collect();
        logits = if active.is_empty() {
            Vec::new()
        } else {
            batch.step(next)?
        };
    }
}

/// Cuts a generated text at the first stop string.
pub fn truncate_at_stop(text: &str, stops: &[String]) -> String {
    let cut = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut rng = Rng::new(0);
        assert_eq!(
            sample(&[1.0, 3.0, 3.0, 2.0], &Sampling::greedy(), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let s = Sampling {
            temperature: 0.7,
            top_k: Some(1),
            top_p: None,
            seed: 3,
        };
        let mut rng = Rng::new(3);
        assert_eq!(
            sample(&logits, &s, &mut rng),
            sample(&logits, &Sampling::greedy(), &mut rng)
        );
        let s = Sampling {
            temperature: 1.0,
            top_k: Some(10),
            top_p: Some(0.9),
            seed: 3,
        };
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &s, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // p(token 0) ≈ 0.87 > top_p: only token 0 may be drawn.
        let logits = [4.0f32, 2.0, 0.0, -1.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.8),
            seed: 1,
        };
        let mut rng = Rng::new(1);
        assert!((0..100).all(|_| sample(&logits, &s, &mut rng) == 0));
    }

    #[test]
    fn stop_string_truncation() {
        let stops = vec!["\ndef".to_string(), "\nclass".to_string()];
        assert_eq!(
            truncate_at_stop("  return 1\nclass X\ndef y", &stops),
            "  return 1"
        );
    }
}
