"""Baseline for `iro bench generate`: transformers' `generate` on the same folder, prompts and token counts.

Reads a JSON request on stdin: {"model": DIR, "prompts": [[ids...], ...] (already tokenised, one list per row of
the largest batch), "batch_sizes": [..], "new_tokens": N, "threads": T, "temperature", "top_k", "top_p",
"repeats": R, "dtype": "float32" | "bfloat16" | "float16"}. Writes one JSON object on stdout: {"results": [{"batch": B, "tokens_per_second": x, "seconds": s}],
"versions": {...}}. Every row generates exactly N tokens (min_new_tokens = max_new_tokens), as on the Rust side.
Run by `iro bench generate` with the interpreter of `.deps/pycheck` (scripts/assets/check_smollm2.sh makes it).
"""
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    req = json.load(sys.stdin)
    torch.set_num_threads(int(req["threads"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(req["model"], dtype=getattr(torch, req.get("dtype", "float32")))
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    results = []
    warmed = False
    for batch in req["batch_sizes"]:
        rows = req["prompts"][:batch]
        width = max(len(r) for r in rows)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        kwargs = dict(
            attention_mask=mask,
            do_sample=True,
            temperature=req["temperature"],
            top_k=req["top_k"],
            top_p=req["top_p"],
            max_new_tokens=req["new_tokens"],
            min_new_tokens=req["new_tokens"],
            pad_token_id=pad,
        )
        best = None
        with torch.inference_mode():
            if not warmed:
                # This process is fresh each round: one short untimed call takes the first-call costs.
                model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=pad)
                warmed = True
            for _ in range(int(req["repeats"])):
                start = time.perf_counter()
                out = model.generate(ids, **kwargs)
                elapsed = time.perf_counter() - start
                assert out.shape[1] - width == req["new_tokens"], out.shape
                best = elapsed if best is None else min(best, elapsed)
        results.append({"batch": batch, "seconds": best, "tokens_per_second": batch * req["new_tokens"] / best})
    json.dump({"results": results, "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
              sys.stdout)


if __name__ == "__main__":
    main()
