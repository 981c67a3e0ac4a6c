//! Chat templates: the model's own Jinja source rendered with minijinja, configured as
//! transformers configures jinja2 (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`), so ChatML, Llama 3 and other templates work unmodified.

use minijinja::{context, Environment, Error, ErrorKind};

use crate::error::{ModelError, Result};
use crate::tokenizer::ChatMessage;

pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // Templates use it for "today's date"; a fixed date keeps rendering deterministic.
        fmt.replace("%d", "01")
            .replace("%b", "Jan")
            .replace("%B", "January")
            .replace("%Y", "2025")
            .replace("%m", "01")
    });
    env.add_template("chat", template)
        .map_err(|e| ModelError::Template(e.to_string()))?;
    let tpl = env
        .get_template("chat")
        .map_err(|e| ModelError::Template(e.to_string()))?;
    tpl.render(context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| ModelError::Template(e.to_string()))
}

/// The prompt of a conversation that fits `budget` tokens: the system message (if any) and
/// as many of the latest turns as fit, dropping the oldest first (a user turn with the
/// assistant answer after it). Returns the turns kept and the prompt's token ids; an error when
/// even the last user turn alone does not fit.
pub fn fit_history(
    tok: &crate::Tokenizer,
    system: Option<&str>,
    turns: &[ChatMessage],
    budget: usize,
) -> Result<(usize, Vec<u32>)> {
    let mut start = 0;
    loop {
        let mut msgs: Vec<ChatMessage> = system
            .map(|s| ChatMessage::new("system", s))
            .into_iter()
            .collect();
        msgs.extend_from_slice(&turns[start..]);
        let ids = tok.encode(&tok.apply_chat_template(&msgs, true)?, true)?;
        if ids.len() <= budget {
            return Ok((turns.len() - start, ids));
        }
        if start + 1 >= turns.len() {
            return Err(ModelError::Config(format!(
                "the message takes {} tokens with the system prompt; the context leaves {budget} for it",
                ids.len()
            )));
        }
        // Drop the oldest user turn and the answer that followed it.
        start += if turns.get(start + 1).is_some_and(|m| m.role == "assistant") {
            2
        } else {
            1
        };
        start = start.min(turns.len() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_default_system_prompt() {
        let s = render(CHATML, &[ChatMessage::new("user", "Hi")], true, "", "").unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('bad role') }}{% endif %}{{ messages[0].content.strip() }}";
        assert_eq!(
            render(t, &[ChatMessage::new("user", "  x ")], false, "", "").unwrap(),
            "x"
        );
        let e = render(t, &[ChatMessage::new("system", "x")], false, "", "").unwrap_err();
        assert!(e.to_string().contains("bad role"));
    }
}
