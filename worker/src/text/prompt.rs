//! The prompt formats, each in exactly one place: every phase (rollout, value training, guided search,
//! evaluation) formats prompts through here, so a value model never sees one format in training and
//! another at decode time (a weak point of the original scripts).

use iro_common::config::PromptFormat;

use super::Tokenizer;
use crate::error::{Error, Result};

/// SmolLM2's chat template inserts this system message when the conversation has none.
pub const SMOLLM2_DEFAULT_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// The system message of a Llama-3 prompt when none is given: empty, as the official IRO instruction-following
/// code sends it.
pub const LLAMA3_DEFAULT_SYSTEM: &str = "";

/// The fields of one TL;DR post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TldrPost<'a> {
    pub subreddit: &'a str,
    pub title: &'a str,
    pub post: &'a str,
}

/// A single-turn chat prompt ending where the assistant's answer starts, as the model's chat template
/// renders it with `add_generation_prompt=True`.
pub fn chat_prompt(format: PromptFormat, user: &str, system: Option<&str>) -> Result<String> {
    match format {
        PromptFormat::Chatml => {
            let system = system.unwrap_or(SMOLLM2_DEFAULT_SYSTEM);
            Ok(format!(
                "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            ))
        }
        PromptFormat::Llama3 => {
            // Llama-3-Instruct's template trims each message and prepends BOS to the first one. Without a system
            // message the turn is still rendered, empty: the official IRO code always sends
            // `{"role": "system", "content": ""}` first (worker/tests/fixtures/llama3_chat holds transformers'
            // rendering).
            let system = system.unwrap_or(LLAMA3_DEFAULT_SYSTEM).trim();
            Ok(format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>\
                 <|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                user.trim()
            ))
        }
        PromptFormat::Raw => Ok(user.to_owned()),
        PromptFormat::Tldr => {
            Err(Error::InvalidRequest("the TL;DR format needs subreddit/title/post fields, not a chat message".into()))
        }
    }
}

/// Whether the formatted text already carries its special tokens (so the tokenizer must not add more).
pub fn has_special_tokens(format: PromptFormat) -> bool {
    matches!(format, PromptFormat::Chatml | PromptFormat::Llama3)
}

fn tldr_text(p: &TldrPost<'_>, post: &str) -> String {
    format!("SUBREDDIT: r/{}\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:", p.subreddit, p.title, post)
}

/// The TL;DR prompt of the summarize-from-feedback setup: while the prompt is longer than `max_tokens`,
/// the post is cut at its last newline (or, with no newline left, by one character). Errors when even an
/// empty post does not fit.
pub fn tldr_prompt(p: &TldrPost<'_>, tokenizer: &Tokenizer, max_tokens: usize) -> Result<String> {
    let mut post = p.post;
    loop {
        let text = tldr_text(p, post);
        if tokenizer.encode(&text, false)?.len() <= max_tokens {
            return Ok(text);
        }
        if post.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "TL;DR prompt for title {:?} exceeds {max_tokens} tokens even with an empty post",
                p.title
            )));
        }
        post = match post.rfind('\n') {
            Some(i) => &post[..i],
            None => {
                let last = post.char_indices().last().map_or(0, |(i, _)| i);
                &post[..last]
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_matches_smollm2_template_with_its_default_system_prompt() {
        let s = chat_prompt(PromptFormat::Chatml, "Hi?", None).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3_trims_and_adds_the_empty_system_turn_and_the_generation_header() {
        let s = chat_prompt(PromptFormat::Llama3, "  Hi?\n", None).unwrap();
        assert_eq!(
            s,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let s = chat_prompt(PromptFormat::Llama3, "Hi?", Some(" Be brief. ")).unwrap();
        assert!(s.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"));
    }
}
