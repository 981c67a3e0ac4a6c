//! Prompt templates: FS-LLM's two Alpaca prompts (verbatim) or the model's own chat template.
//! The target is always the record's output followed by EOS; only the target carries loss.

use fedllm_model::{ChatMessage, Tokenizer};

use crate::error::Result;
use crate::record::Record;

pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// FS-LLM's Alpaca prompts.
    Alpaca,
    /// The model's chat template: one user turn (instruction, then input), generation prompt added.
    Chat,
    /// The instruction as is (e.g. HumanEval's raw code prompt).
    Raw,
}

impl std::str::FromStr for Template {
    type Err = crate::DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(Template::Alpaca),
            "chat" => Ok(Template::Chat),
            "raw" => Ok(Template::Raw),
            o => Err(crate::DataError::Config(format!(
                "unknown template `{o}` (alpaca, chat, raw)"
            ))),
        }
    }
}

impl Template {
    pub fn prompt(&self, r: &Record, tok: &Tokenizer) -> Result<String> {
        Ok(match self {
            Template::Alpaca if r.input.is_empty() => {
                ALPACA_NO_INPUT.replace("{instruction}", &r.instruction)
            }
            Template::Alpaca => ALPACA_WITH_INPUT
                .replace("{instruction}", &r.instruction)
                .replace("{input}", &r.input),
            Template::Chat => {
                let content = if r.input.is_empty() {
                    r.instruction.clone()
                } else {
                    format!("{}\n\n{}", r.instruction, r.input)
                };
                tok.apply_chat_template(&[ChatMessage::new("user", &content)], true)?
            }
            Template::Raw => r.instruction.clone(),
        })
    }
}
