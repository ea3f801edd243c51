//! Text in and out of the models: tokenizers and the prompt formats (chat templates, TL;DR), each in one place.

pub mod prompt;
pub mod tokenizer;

pub use tokenizer::Tokenizer;
