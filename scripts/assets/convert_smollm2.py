#!/usr/bin/env python3
"""Turns a llama-architecture GGUF (SmolLM2-135M-Instruct) back into a Hugging Face model folder.

The demo needs a real causal LM, and the only copy a package registry ships is llama.cpp's quantised GGUF. This
writes what `transformers` and our Rust loader both read: config.json, model.safetensors (float32),
tokenizer.json, tokenizer_config.json and generation_config.json. Run by scripts/assets.sh; usable alone:

    python convert_smollm2.py --gguf FILE.gguf --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def die(msg: str) -> None:
    print(f"convert_smollm2: error: {msg}", file=sys.stderr)
    sys.exit(1)


try:
    from gguf import GGUFReader, GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
except ImportError as e:  # pragma: no cover - reported to the user of assets.sh
    die(f"missing Python package ({e}); run scripts/assets.sh, which installs gguf numpy safetensors tokenizers")

# GGUF token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp's "smollm" pre-tokenizer: every digit on its own, then the GPT-2 split regex. In `tokenizers` terms that
# is Digits(individual_digits) followed by the byte-level pre-tokenizer with its built-in GPT-2 regex.
SUPPORTED_PRE = {"smollm", "gpt2", "starcoder"}

# GGUF tensor name (inside blk.N) -> HF name (inside model.layers.N)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class Gguf:
    def __init__(self, path: Path):
        self.path = path
        self.reader = GGUFReader(str(path))
        self.arch = self.get("general.architecture")
        if self.arch != "llama":
            die(f"{path}: general.architecture is {self.arch!r}; this converter handles 'llama' only")

    def get(self, key: str, default=None, required: bool = True):
        field = self.reader.fields.get(key)
        if field is None:
            if required and default is None:
                die(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def hp(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)


def tidy_float(x: float) -> float:
    """GGUF stores hyperparameters as float32 (1e-5 reads back as 9.99999975e-06); print the value it was meant as."""
    return float(f"{float(np.float32(x)):.7g}")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the row permutation llama.cpp applies to q_proj/k_proj when it writes a GGUF.

    HF's Llama rotates the two halves of each head (dims i and i + d/2 form a pair); llama.cpp's kernel rotates
    adjacent dims (2i, 2i+1). The converter therefore reorders each head's rows from [half, pair] order to
    [pair, half] order. Here each head's rows are read as (d/2, 2) and transposed back to (2, d/2).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        die(f"cannot un-permute a tensor with {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(g: Gguf, n_head: int, n_kv_head: int) -> tuple[dict[str, np.ndarray], bool]:
    out: dict[str, np.ndarray] = {}
    has_output = False
    for t in g.reader.tensors:
        expected = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (the fastest dim) first
        try:
            w = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except NotImplementedError as e:
            die(f"{g.path}: tensor {t.name}: cannot dequantise type {t.tensor_type.name}: {e}")
        w = np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(expected))
        if not np.isfinite(w).all():
            die(f"{g.path}: tensor {t.name} has non-finite values after dequantisation")

        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf, has_output = "lm_head.weight", True
        elif name.startswith("blk."):
            _, idx, kind, suffix = name.split(".", 3)
            if kind not in LAYER_NAMES or suffix != "weight":
                die(f"{g.path}: unexpected tensor {name}")
            hf = f"model.layers.{int(idx)}.{LAYER_NAMES[kind]}.weight"
            if kind == "attn_q":
                w = unpermute_rotary(w, n_head)
            elif kind == "attn_k":
                w = unpermute_rotary(w, n_kv_head)
        elif name == "rope_freqs.weight":
            die(f"{g.path}: has rope_freqs (Llama-3 style rope scaling), which this converter does not handle")
        else:
            die(f"{g.path}: unexpected tensor {name}")
        out[hf] = np.ascontiguousarray(w)
    return out, has_output


def build_tokenizer(g: Gguf) -> tuple[Tokenizer, dict]:
    model = g.get("tokenizer.ggml.model")
    pre = g.get("tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        die(f"{g.path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is handled")
    if pre not in SUPPORTED_PRE:
        die(f"{g.path}: tokenizer.ggml.pre is {pre!r}; handled: {sorted(SUPPORTED_PRE)}")
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    types: list[int] = g.get("tokenizer.ggml.token_type")
    merges: list[str] = g.get("tokenizer.ggml.merges")
    if len(tokens) != len(types):
        die(f"{g.path}: {len(tokens)} tokens but {len(types)} token types")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        die(f"{g.path}: the token list has duplicates")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            die(f"{g.path}: malformed merge {m!r}")
        pairs.append((a, b))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    digits = pre in ("smollm", "starcoder")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_TYPE_CONTROL:
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    for a in added:  # adding must not have assigned new ids
        if tok.token_to_id(a.content) != vocab[a.content]:
            die(f"tokenizer: added token {a.content!r} got a new id")

    def tok_name(key: str):
        i = g.get(f"tokenizer.ggml.{key}", required=False)
        return (int(i), tokens[int(i)]) if i is not None else (None, None)

    special = {k: tok_name(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    return tok, special


def check_tokenizer(tok: Tokenizer, vocab_size: int) -> None:
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        die(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens, config says {vocab_size}")
    samples = [
        "Hello, world! The year 2024 has 366 days.",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "  indented   spaces\tand tabs\n\nnewlines, naïve café — ünïcödé 東京 🙂",
        "def f(x):\n    return x**2  # it's 'quoted' and \"double\"",
    ]
    for s in samples:
        enc = tok.encode(s, add_special_tokens=False)
        back = tok.decode(enc.ids, skip_special_tokens=False)
        if back != s:
            die(f"tokenizer: round trip failed for {s!r}: got {back!r} from ids {enc.ids}")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False).ids
    if ids[0] != tok.token_to_id("<|im_start|>") or ids[-1] != tok.token_to_id("<|im_end|>"):
        die(f"tokenizer: special tokens are not matched whole (ids {ids})")
    digits = tok.encode("12345", add_special_tokens=False).tokens
    if digits != list("12345"):
        die(f"tokenizer: digits are not split one by one ({digits})")


SMOKE_PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
    "It is located on the Seine river, in the north of the country. The city is known for its museums, "
    "including the Louvre, and for landmarks such as the Eiffel Tower and the cathedral of Notre-Dame."
)
# Mean next-token NLL on SMOKE_PASSAGE (68 tokens): 1.99 with the right q/k un-permutation, 3.73 without it.
# (A short prompt cannot tell them apart: at small distances RoPE barely rotates, so "The capital of France is"
# still ends in " Paris" with the rows in the wrong order.)
SMOKE_MAX_NLL = 2.6


def numpy_forward(weights: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Float32 Llama forward pass in numpy over one sequence; returns log-probabilities (T, vocab)."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = h // nh, cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(T), inv)
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)

    def rope(x):  # x: (heads, T, hd), HF rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    x = weights["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, weights[p + "input_layernorm.weight"])
        q = (a @ weights[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (a @ weights[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (a @ weights[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, h)
        x = x + o @ weights[p + "self_attn.o_proj.weight"].T
        m = rms(x, weights[p + "post_attention_layernorm.weight"])
        g = m @ weights[p + "mlp.gate_proj.weight"].T
        u = m @ weights[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ weights[p + "mlp.down_proj.weight"].T
    x = rms(x, weights["model.norm.weight"])
    logits = x @ weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).T
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def numpy_smoke_test(weights: dict[str, np.ndarray], cfg: dict, tok: Tokenizer) -> str:
    """Scores a short English passage with the converted weights: a wrong q/k un-permutation or dequantisation
    shows up as a high loss here, before anything downstream loads the folder."""
    ids = tok.encode(SMOKE_PASSAGE, add_special_tokens=False).ids
    lp = numpy_forward(weights, cfg, ids)
    nll = float(-np.mean([lp[t, ids[t + 1]] for t in range(len(ids) - 1)]))
    top1 = float(np.mean([lp[t].argmax() == ids[t + 1] for t in range(len(ids) - 1)]))
    if not np.isfinite(nll) or nll > SMOKE_MAX_NLL:
        die(
            f"numpy smoke test: mean next-token loss {nll:.3f} on an English passage (expected about 2.0, "
            f"at most {SMOKE_MAX_NLL}); the q/k un-permutation or the dequantisation is wrong"
        )
    return f"mean next-token loss {nll:.3f} (limit {SMOKE_MAX_NLL}), top-1 accuracy {top1:.2f}, {len(ids)} tokens"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--skip-smoke-test", action="store_true")
    args = ap.parse_args()
    if not args.gguf.is_file():
        die(f"GGUF file not found: {args.gguf}")
    args.out.mkdir(parents=True, exist_ok=True)

    g = Gguf(args.gguf)
    n_layer = int(g.hp("block_count"))
    hidden = int(g.hp("embedding_length"))
    n_head = int(g.hp("attention.head_count"))
    n_kv_head = int(g.hp("attention.head_count_kv", n_head))
    head_dim = hidden // n_head
    rope_dim = int(g.hp("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        die(f"rope.dimension_count {rope_dim} != head dim {head_dim} (partial rotary is not handled)")
    if g.get(f"{g.arch}.rope.scaling.type", required=False) not in (None, "none"):
        die("rope scaling is set in the GGUF; this converter does not handle it")

    print(f"  reading {args.gguf.name}: {len(g.reader.tensors)} tensors")
    tok, special = build_tokenizer(g)
    vocab_size = int(g.hp("vocab_size", len(g.get("tokenizer.ggml.tokens"))))

    weights, has_output = convert_weights(g, n_head, n_kv_head)
    emb = weights["model.embed_tokens.weight"]
    if emb.shape != (vocab_size, hidden):
        die(f"token_embd has shape {emb.shape}, expected ({vocab_size}, {hidden})")
    expected = 2 + n_layer * len(LAYER_NAMES) + (1 if has_output else 0)
    if len(weights) != expected:
        die(f"found {len(weights)} tensors, expected {expected}")

    bos_id, bos = special["bos"]
    eos_id, eos = special["eos"]
    pad_id, pad = special["padding"]
    unk_id, unk = special["unknown"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(g.hp("feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": tidy_float(g.hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": tidy_float(g.hp("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(g.hp("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    check_tokenizer(tok, vocab_size)

    if not args.skip_smoke_test:
        print(f"  numpy smoke test: {numpy_smoke_test(weights, cfg, tok)}")

    save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(args.out / "model.safetensors", 0o644)  # safetensors creates it owner-only
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(args.out / "tokenizer.json"))

    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False, required=False)),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False, required=False)),
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "additional_special_tokens": [t for t in ("<|im_start|>", "<|im_end|>") if tok.token_to_id(t) is not None],
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    template = g.get("tokenizer.chat_template", required=False)
    if template:
        tok_cfg["chat_template"] = template
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (args.out / "special_tokens_map.json").write_text(
        json.dumps({k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token",
                                             "additional_special_tokens")}, indent=2) + "\n"
    )
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    (args.out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    n_params = sum(w.size for w in weights.values())
    print(
        f"  wrote {len(weights)} tensors ({n_params / 1e6:.1f}M parameters, float32), vocab {vocab_size}, "
        f"bos={bos_id} {bos!r} eos={eos_id} {eos!r} pad={pad_id} {pad!r} unk={unk_id} {unk!r}, "
        f"chat template {'yes' if template else 'no'}"
    )


if __name__ == "__main__":
    main()
