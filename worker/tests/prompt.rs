//! The TL;DR prompt formatter of the summarize-from-feedback setup: the post is cut at its last newline
//! until the prompt fits the token budget.

use std::path::Path;

use iro_worker::text::Tokenizer;
use iro_worker::text::prompt::{TldrPost, tldr_prompt};

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
