//! `fedllm chat`: a conversation in the model's chat template, tokens printed as they are
//! decoded, history trimmed to the context window (oldest turns first). Commands: `/reset`,
//! `/system TEXT`, `/save FILE`, `/quit`. With stdin not a terminal, each line is one turn.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedllm_model::generate::{generate_streaming, GenerateConfig, Sampling};
use fedllm_model::ChatMessage;

use crate::ModelArgs;

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// An adapter folder (PEFT files) to chat with
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The system message
    #[arg(long)]
    system: Option<String>,
    /// Tokens per answer at most
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature (absent or 0: greedy)
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: ChatArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let mut model = loaded.model;
    let tok = loaded.tokenizer.context("the model has no tokenizer")?;
    if tok.chat_template.is_none() {
        bail!(
            "{}: the model has no chat template (use `fedllm generate`)",
            a.model.model.display()
        );
    }
    let prefix = match &a.adapter {
        Some(dir) => crate::attach_for_generation(&mut model, dir)?,
        None => None,
    };
    let virtual_len = prefix.as_ref().map_or(0, |c| c.len);
    let context = model.config.context_length();
    let budget = context
        .checked_sub(a.max_new_tokens + virtual_len)
        .filter(|b| *b > 0)
        .with_context(|| {
            format!(
                "--max-new-tokens {} leaves no room in the model's {context}-token context",
                a.max_new_tokens
            )
        })?;
    let mut stop = model.config.eos_token_ids().to_vec();
    stop.extend(&tok.eos_token_ids);
    let sampling = match a.temperature {
        Some(t) if t > 0.0 => Sampling {
            temperature: t,
            top_k: None,
            top_p: a.top_p,
            seed: a.seed,
        },
        _ => Sampling::greedy(),
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_token_ids: stop.clone(),
        stop_strings: vec![],
    };
    let mut system = a.system.clone();
    let mut turns: Vec<ChatMessage> = Vec::new();
    let interactive = std::io::stdin().is_terminal();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout().lock();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(cmd) = text.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "reset" => {
                    turns.clear();
                    eprintln!("(history cleared)");
                }
                "system" => {
                    system = (!arg.trim().is_empty()).then(|| arg.trim().to_string());
                    eprintln!(
                        "(system message {})",
                        if system.is_some() { "set" } else { "removed" }
                    );
                }
                "save" if !arg.trim().is_empty() => {
                    let mut all: Vec<ChatMessage> = system
                        .iter()
                        .map(|s| ChatMessage::new("system", s))
                        .collect();
                    all.extend(turns.iter().cloned());
                    let p = PathBuf::from(arg.trim());
                    std::fs::write(&p, serde_json::to_string_pretty(&all)?)
                        .with_context(|| p.display().to_string())?;
                    eprintln!("(saved {} messages to {})", all.len(), p.display());
                }
                "quit" | "exit" => break,
                _ => eprintln!("(commands: /reset, /system TEXT, /save FILE, /quit)"),
            }
            continue;
        }
        turns.push(ChatMessage::new("user", text));
        let (kept, ids) =
            match fedllm_model::chat::fit_history(&tok, system.as_deref(), &turns, budget) {
                Ok(x) => x,
                Err(e) => {
                    turns.pop();
                    eprintln!("error: {e}");
                    continue;
                }
            };
        turns.drain(..turns.len() - kept);
        let mut shown = String::new();
        let mut answer: Vec<u32> = Vec::new();
        let mut print = |_: usize, t: u32| -> fedllm_model::Result<()> {
            if stop.contains(&t) {
                return Ok(());
            }
            answer.push(t);
            let text = tok.decode(&answer, true)?;
            // Print only complete characters: a token may end inside one.
            if !text.ends_with('\u{fffd}')
                && text.len() > shown.len()
                && text.starts_with(shown.as_str())
            {
                let _ = write!(out, "{}", &text[shown.len()..]);
                let _ = out.flush();
                shown = text;
            }
            Ok(())
        };
        generate_streaming(
            &model,
            Some(&tok),
            prefix.as_ref(),
            &[ids],
            &cfg,
            &mut print,
        )?;
        let full = tok.decode(&answer, true)?;
        if full.len() > shown.len() && full.starts_with(shown.as_str()) {
            write!(out, "{}", &full[shown.len()..])?;
        }
        writeln!(out)?;
        out.flush()?;
        turns.push(ChatMessage::new("assistant", full.trim()));
    }
    Ok(())
}
