//! The prompt formatters: the TL;DR prompt of the summarize-from-feedback setup (the post is cut at its last
//! newline until the prompt fits the token budget), and the Llama-3 chat prompt against what transformers renders.

use std::path::Path;

use iro_common::config::PromptFormat;
use iro_common::data::{Example, Prompt};
use iro_worker::pipeline::data::prompt_items;
use iro_worker::text::Tokenizer;
use iro_worker::text::prompt::{TldrPost, chat_prompt, tldr_prompt};

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/neox_parallel")).unwrap()
}

#[test]
fn a_short_post_is_kept_whole_in_the_paper_format() {
    let p =
        TldrPost { subreddit: "relationships", title: "Should I call her?", post: "We met last week.\nIt went well." };
    let s = tldr_prompt(&p, &tokenizer(), 512).unwrap();
    assert_eq!(
        s,
        "SUBREDDIT: r/relationships\n\nTITLE: Should I call her?\n\nPOST: We met last week.\nIt went well.\n\nTL;DR:"
    );
}

#[test]
fn a_long_post_is_cut_at_its_last_newlines_until_it_fits() {
    let tok = tokenizer();
    let paragraphs: Vec<String> =
        (0..12).map(|i| format!("Paragraph {i} says something about the old mill.")).collect();
    let post = paragraphs.join("\n");
    let p = TldrPost { subreddit: "tifu", title: "Long story", post: &post };
    let full = tldr_prompt(&p, &tok, 10_000).unwrap();
    let budget = tok.encode(&full, false).unwrap().len() / 2;
    let cut = tldr_prompt(&p, &tok, budget).unwrap();
    assert!(tok.encode(&cut, false).unwrap().len() <= budget);
    // Whole paragraphs are dropped from the end, and the one after the kept ones would not have fit.
    let kept = cut.split("POST: ").nth(1).unwrap().strip_suffix("\n\nTL;DR:").unwrap();
    let n = kept.split('\n').count();
    assert_eq!(kept, paragraphs[..n].join("\n"));
    let one_more = TldrPost { post: &paragraphs[..n + 1].join("\n"), ..p.clone() };
    assert!(tok.encode(&tldr_prompt(&one_more, &tok, 10_000).unwrap(), false).unwrap().len() > budget);
}

#[test]
fn a_prompt_that_cannot_fit_is_a_clear_error() {
    let p = TldrPost { subreddit: "x", title: "a title far too long for the budget", post: "text" };
    let err = tldr_prompt(&p, &tokenizer(), 5).unwrap_err().to_string();
    assert!(err.contains("exceeds 5 tokens"), "{err}");
}

/// worker/tests/fixtures/llama3_chat (scripts/fixtures/make_chat_fixture.py): Llama-3-8B-Instruct's chat template
/// applied by transformers to `[{"role": "system", "content": ""}, {"role": "user", ...}]`, as the official IRO
/// code formats instructions, on a tokenizer whose post-processor prepends `<|begin_of_text|>` like Llama-3's.
#[test]
fn llama3_prompts_match_transformers_with_the_empty_system_turn_and_one_bos() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama3_chat");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let bos = reference["bos_token_id"].as_i64().unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for (i, case) in cases.iter().enumerate() {
        let messages = case["messages"].as_array().unwrap();
        assert_eq!((messages[0]["role"].as_str(), messages[0]["content"].as_str()), (Some("system"), Some("")));
        let user = messages[1]["content"].as_str().unwrap();
        let want_text = case["text"].as_str().unwrap();
        let want_ids: Vec<i64> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(chat_prompt(PromptFormat::Llama3, user, None).unwrap(), want_text, "case {i}");

        // The ids every phase uses (`prompt_items`: the policy's one formatter and its special-token rule).
        let example = Example {
            id: format!("{i}"),
            prompt: Prompt::Instruction { instruction: user.to_owned(), dataset: None },
            reference: None,
        };
        let items = prompt_items(&[example], &[0], PromptFormat::Llama3, 512, &tok, 0).unwrap();
        assert_eq!(items[0].text, want_text, "case {i}");
        assert_eq!(items[0].ids, want_ids, "case {i}: exactly the ids of apply_chat_template(tokenize=True)");
        assert_eq!(items[0].ids.iter().filter(|&&t| t == bos).count(), 1, "case {i}: one BOS");
        // The fixture's post-processor does add a BOS of its own: encoding with it on would double it.
        let doubled: Vec<i64> = serde_json::from_value(case["ids_with_post_processor"].clone()).unwrap();
        assert_eq!(tok.encode(want_text, true).unwrap(), doubled, "case {i}");
        assert_eq!(&doubled[..2], &[bos, bos]);
    }
}
