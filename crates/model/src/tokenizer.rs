//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or the GPT-2-style byte-level
//! BPE embedded in GGUF metadata (rebuilt as a `tokenizer.json` document, so both paths run the
//! same, well-tested encoder). Chat templates are the model's own Jinja, rendered by minijinja.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (EOS and the template's end-of-turn tokens).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos_token_id)
            .field("eos", &self.eos_token_ids)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::format(path, format!("invalid tokenizer: {e}"))
}

/// transformers writes special tokens either as a string or as an AddedToken object.
fn token_str(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::format(path, format!("invalid JSON: {e}")))
}

/// The `tokenizer.json` pre-tokenizer llama.cpp means by a `tokenizer.ggml.pre` name.
fn pre_tokenizer(name: &str) -> Option<Json> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match name {
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "default" | "gpt-2" | "gpt2" | "olmo" => byte_level(true),
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        _ => return None,
    })
}

/// The names written on export, one per distinct pre-tokenizer above.
const EXPORTED_PRE: [&str; 4] = ["gpt-2", "smollm", "llama-bpe", "qwen2"];

/// A pre-tokenizer as the `tokenizers` crate serialises it, so that documents written by
/// different tools (field order, defaults) compare equal when they mean the same thing.
fn canonical_pre(v: &Json) -> Option<Json> {
    let p: tokenizers::PreTokenizerWrapper = serde_json::from_value(v.clone()).ok()?;
    serde_json::to_value(p).ok()
}

impl Tokenizer {
    /// `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`, `config.json`) of a
    /// Hugging Face folder; None when the folder has no tokenizer.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| tok_err(&tj, e))?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        let gc = read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null);
        let mc = read_json(&dir.join("config.json"))?.unwrap_or(Json::Null);
        let chat_template = match tc.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Json::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        let bos_token = token_str(tc.get("bos_token"));
        let eos_token = token_str(tc.get("eos_token"));
        let mut eos = ids(gc.get("eos_token_id"));
        if eos.is_empty() {
            eos = ids(mc.get("eos_token_id"));
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let bos_token_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| ids(mc.get("bos_token_id")).first().copied());
        let pad = token_str(tc.get("pad_token"))
            .and_then(|t| inner.token_to_id(&t))
            .or_else(|| ids(mc.get("pad_token_id")).first().copied());
        let mut t = Self {
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            inner,
            bos_token_id,
            eos_token_ids: eos,
            pad_token_id: pad,
            add_bos: false,
            chat_template,
        };
        t.fill_token_strings();
        Ok(Some(t))
    }

    /// The tokenizer stored in a GGUF's `tokenizer.ggml.*` metadata (GPT-2-style BPE).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let path = &f.path;
        let model = f.meta_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::format(
                path,
                format!(
                    "unsupported GGUF tokenizer model `{model}` (supported: gpt2 byte-level BPE)"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr = f
                .meta(key)
                .and_then(Value::as_array)
                .ok_or_else(|| ModelError::format(path, format!("missing metadata `{key}`")))?;
            arr.iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ModelError::format(path, format!("metadata `{key}` is not a string array"))
                })
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = f
            .meta("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        // token_type 3 = control (special), 4 = user-defined: both are matched verbatim in text.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": types[i] == 3})
            })
            .collect();
        let pre_name = f.meta_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| {
            ModelError::format(
                path,
                format!("unsupported GGUF pre-tokenizer `{pre_name}` (supported: smollm, starcoder, gpt2, llama-bpe, qwen2)"),
            )
        })?;
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = doc.to_string().parse().map_err(|e| tok_err(path, e))?;
        let id = |k: &str| f.meta_u64(k).map(|v| v as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut t = Self {
            inner,
            bos_token_id: bos,
            eos_token_ids: eos.into_iter().collect(),
            pad_token_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: f.meta("tokenizer.ggml.add_bos_token") == Some(&Value::Bool(true)),
            chat_template: f.meta_str("tokenizer.chat_template").map(String::from),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !t.eos_token_ids.contains(&eot) {
                t.eos_token_ids.push(eot);
            }
        }
        t.fill_token_strings();
        Ok(t)
    }

    fn fill_token_strings(&mut self) {
        if self.bos_token.is_empty() {
            if let Some(s) = self.bos_token_id.and_then(|i| self.inner.id_to_token(i)) {
                self.bos_token = s;
            }
        }
        if self.eos_token.is_empty() {
            if let Some(s) = self
                .eos_token_ids
                .first()
                .and_then(|&i| self.inner.id_to_token(i))
            {
                self.eos_token = s;
            }
        }
    }

    /// The `tokenizer.ggml.*` metadata llama.cpp reads for this tokenizer: the inverse of
    /// `from_gguf`, for byte-level BPE tokenizers (GPT-2, SmolLM, LLaMA-3, Qwen2 styles).
    pub fn gguf_metadata(&self) -> Result<Vec<(String, Value)>> {
        let err =
            |m: String| ModelError::Tokenizer(format!("cannot write this tokenizer to GGUF: {m}"));
        let doc: Json = self
            .inner
            .to_string(false)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| err("it does not serialise".into()))?;
        let model = &doc["model"];
        if model["type"] != "BPE"
            || model["byte_fallback"] == true
            || doc["decoder"]["type"] != "ByteLevel"
        {
            return Err(err(format!(
                "only byte-level BPE is written (model {}, decoder {})",
                model["type"], doc["decoder"]["type"]
            )));
        }
        if !doc["normalizer"].is_null() {
            return Err(err(format!(
                "llama.cpp has no normalizer {}",
                doc["normalizer"]["type"]
            )));
        }
        let pre = canonical_pre(&doc["pre_tokenizer"]);
        let pre_name = EXPORTED_PRE
            .into_iter()
            .find(|n| pre_tokenizer(n).and_then(|p| canonical_pre(&p)) == pre && pre.is_some())
            .ok_or_else(|| {
                err(format!(
                    "pre-tokenizer {} has no llama.cpp name",
                    doc["pre_tokenizer"]
                ))
            })?;
        let n = self.vocab_size();
        let mut tokens: Vec<Option<String>> = vec![None; n];
        let mut types = vec![1i32; n];
        let vocab = model["vocab"]
            .as_object()
            .ok_or_else(|| err("no vocab".into()))?;
        let added = doc["added_tokens"].as_array().cloned().unwrap_or_default();
        let entries =
            vocab
                .iter()
                .map(|(t, id)| (t.as_str(), id, None))
                .chain(added.iter().filter_map(|a| {
                    Some((a["content"].as_str()?, &a["id"], Some(a["special"] == true)))
                }));
        for (tok, id, special) in entries {
            let id = id
                .as_u64()
                .filter(|&i| (i as usize) < n)
                .ok_or_else(|| err(format!("token `{tok}` has id {id}")))?
                as usize;
            tokens[id] = Some(tok.to_string());
            // 3 = control (special), 4 = user-defined: llama.cpp matches both verbatim in text.
            if let Some(special) = special {
                types[id] = if special { 3 } else { 4 };
            }
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.map(Value::String)
                    .ok_or_else(|| err(format!("no token has id {i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = model["merges"]
            .as_array()
            .ok_or_else(|| err("no merges".into()))?
            .iter()
            .map(|m| match m {
                // Older files write "a b", newer ones ["a", "b"].
                Json::String(s) => Some(s.clone()),
                Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                _ => None,
            })
            .map(|m| {
                m.map(Value::String)
                    .ok_or_else(|| err("a merge is neither \"a b\" nor [a, b]".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let s = |k: &str, v: Value| (format!("tokenizer.ggml.{k}"), v);
        let mut out = vec![
            s("model", Value::String("gpt2".into())),
            s("pre", Value::String(pre_name.into())),
            s("tokens", Value::Array(tokens)),
            s(
                "token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            s("merges", Value::Array(merges)),
            s("add_bos_token", Value::Bool(self.add_bos)),
        ];
        let id = |k: &str, v: Option<u32>| v.map(|v| s(k, Value::U32(v)));
        out.extend(id("bos_token_id", self.bos_token_id));
        out.extend(id("eos_token_id", self.eos_token_ids.first().copied()));
        out.extend(id("eot_token_id", self.eos_token_ids.get(1).copied()));
        out.extend(id("padding_token_id", self.pad_token_id));
        if let Some(t) = &self.chat_template {
            out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
        Ok(out)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|im_start|>`) are
    /// recognised; `add_bos` prepends BOS when the model asks for it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders the model's chat template over `messages`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        crate::chat::render(
            tpl,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
    }
}
