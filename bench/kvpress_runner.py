"""Run NVIDIA kvpress presses on given token ids and report KV bytes, passkey hits and long-context perplexity.

kvpress (0.5.5 pins transformers < 5.3) cannot share kvtool's environment, so this script imports neither kvtool nor
anything of this repository: ``bench/vs_kvpress.py`` runs it with the kvpress environment's Python and reads its
output. kvpress is used as an installed library only.

    <kvpress venv>/bin/python bench/kvpress_runner.py --model DIR --inputs in.json --out out.json [--threads 1]
                                                      [--resume]

``out.json`` is rewritten after every row (``"complete": false`` until the end), press by press with both budgets
each; ``--resume`` keeps the rows of an earlier ``out.json`` of the same ``in.json`` (by its SHA-256).

``in.json``:
  budgets        share of the prompt KV KEPT (kvpress ``compression_ratio`` = 1 - budget)
  presses        short names (``PRESSES``); unknown ones are skipped and reported
  passkey        [{"input_ids": [...], "key": "12345"}]; the whole prompt is compressed at prefill (as kvtool
                 does); an optional "context_len" compresses only the first ids and reads the rest uncompressed,
                 as kvpress's pipeline reads a question
  long_context   [{"input_ids": [...], "context": C}]: the first C ids are compressed at prefill, the rest read in
                 one continuation forward and scored
  max_new_tokens (default 8)

Prefill runs ``model.model`` under the press, like ``KVPressTextGenerationPipeline``. Tokens after the compressed
prompt get their true positions through ``position_ids`` (prompt_len, prompt_len + 1, ...) while ``cache_position``
and the mask are left to transformers, which derives them from the compressed cache length: every kept prompt entry
is visible and the new tokens are causal among themselves. That is what the pipeline's ``generate_answer`` does
(checked answer for answer against the pipeline on passkey prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvpress  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

# short name -> (kvpress class, constructor kwargs besides compression_ratio (kvpress's defaults, spelled out),
# whether its prefill needs eager attention (the attention weights), the ScorerPress it wraps, if any)
PRESSES: dict[str, tuple[str, dict[str, Any], bool, str | None]] = {
    "streaming": ("StreamingLLMPress", {"n_sink": 4}, False, None),
    "observed_attention": ("ObservedAttentionPress", {}, True, None),
    "snapkv": ("SnapKVPress", {"window_size": 64, "kernel_size": 5}, False, None),
    "tova": ("TOVAPress", {}, False, None),
    "expected_attention": ("ExpectedAttentionPress", {"n_future_positions": 512, "n_sink": 4,
                                                      "use_covariance": True, "use_vnorm": True, "epsilon": 0.0},
                           False, None),
    "knorm": ("KnormPress", {}, False, None),
    "keydiff": ("KeyDiffPress", {}, False, None),
    "merging_tova": ("MergingPress", {}, False, "tova"),  # merge-on-evict around TOVA
}


def available(name: str) -> bool:
    spec = PRESSES.get(name)
    return spec is not None and getattr(kvpress, spec[0], None) is not None and (spec[3] is None
                                                                                  or available(spec[3]))


def make_press(name: str, budget: float) -> tuple[Any, dict[str, Any], bool]:
    """(press, the kwargs it was built with, needs eager attention) keeping ``budget`` of the prompt KV."""
    cls_name, extra, eager, inner = PRESSES[name]
    ratio = round(1.0 - float(budget), 12)  # kvpress's compression_ratio is the share removed
    if inner is not None:
        press, kw, eager_in = make_press(inner, budget)
        return getattr(kvpress, cls_name)(press=press, **extra), {"press": inner, **kw, **extra}, eager or eager_in
    kwargs = {"compression_ratio": ratio, **extra}
    return getattr(kvpress, cls_name)(**kwargs), kwargs, eager


def kv_stats(cache: Any) -> tuple[int, list[int]]:
    """(bytes of every K/V tensor in the cache, entries per layer)."""
    nbytes, lens = 0, []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        lens.append(int(k.shape[-2]))
    return nbytes, lens


class Runner:
    def __init__(self, model_dir: str, threads: int) -> None:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        self.base_attn = self.model.config._attn_implementation
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    @contextlib.contextmanager
    def _attn(self, impl: str | None) -> Iterator[None]:
        if impl is None or impl == self.base_attn:
            yield
            return
        self.model.set_attn_implementation(impl)
        try:
            yield
        finally:
            self.model.set_attn_implementation(self.base_attn)

    def prefill(self, ids: list[int], press: Any, eager: bool) -> tuple[Any, torch.Tensor]:
        """Prefill ``ids`` into a fresh cache under ``press`` (``model.model``, as kvpress's pipeline does);
        returns (cache, logits of the last position)."""
        cache = DynamicCache()
        x = torch.tensor([ids], dtype=torch.long)
        ctx = press(self.model) if press is not None else contextlib.nullcontext()
        with self._attn("eager" if eager else None), ctx:
            out = self.model.model(input_ids=x, past_key_values=cache)
        return cache, self.model.lm_head(out.last_hidden_state[:, -1:, :])[0, -1].float()

    def step(self, ids: list[int], cache: Any, start: int) -> torch.Tensor:
        """Logits of ``ids`` read over the (compressed) cache at their true positions ``start``, ``start + 1``, …"""
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start, start + len(ids), dtype=torch.long)[None]
        return self.model(input_ids=x, past_key_values=cache, position_ids=pos).logits[0].float()

    def passkey(self, item: dict[str, Any], press: Any, eager: bool, new: int) -> tuple[bool, str, int, list[int]]:
        ids = list(item["input_ids"])
        c = int(item.get("context_len") or len(ids))
        cache, logits = self.prefill(ids[:c], press, eager)
        nbytes, lens = kv_stats(cache)
        if c < len(ids):
            logits = self.step(ids[c:], cache, c)[-1]
        gen = [int(logits.argmax())]
        pos = len(ids)
        while len(gen) < new and gen[-1] not in self.eos:  # greedy, as kvtool's passkey task (generate) decodes
            logits = self.step([gen[-1]], cache, pos)[-1]
            pos += 1
            gen.append(int(logits.argmax()))
        text = self.tok.decode(gen)
        m = re.search(r"\d{5}", text)  # kvtool.data.passkey.answer_ok
        return m is not None and m.group(0) == str(item["key"]), text, nbytes, lens

    def long_context(self, item: dict[str, Any], press: Any, eager: bool) -> tuple[float, int]:
        """Summed NLL of ``ids[context:]`` read in one forward after a compressed prefill of ``ids[:context]``."""
        ids = list(item["input_ids"])
        c = int(item["context"])
        cache, last = self.prefill(ids[:c], press, eager)
        rows = [last[None]]
        if len(ids) - c > 1:
            rows.append(self.step(ids[c:-1], cache, c))
        logits = torch.cat(rows, 0).double()
        return float(F.cross_entropy(logits, torch.tensor(ids[c:]), reduction="sum")), len(ids) - c

    def reference_nll(self, item: dict[str, Any]) -> tuple[float, int]:
        """The same NLL from one plain forward over the whole window, no cache (a check of the "none" row)."""
        ids = list(item["input_ids"])
        c = int(item["context"])
        logits = self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        return float(F.cross_entropy(logits[c - 1 : -1], torch.tensor(ids[c:]), reduction="sum")), len(ids) - c

    def row(self, name: str, budget: float | None, inp: dict[str, Any], new: int) -> dict[str, Any]:
        press, kwargs, eager = (None, None, False) if name == "none" else make_press(name, budget)
        t0 = time.perf_counter()
        cases = inp.get("passkey", [])
        hits, texts, kv_bytes, kv_lens, prompt_len = [], [], None, None, None
        for i, item in enumerate(cases):
            ok, text, nb, lens = self.passkey(item, press, eager, new)
            hits.append(ok)
            texts.append(text)
            if i == len(cases) // 2:  # the prompt kvtool's merge task measures KV bytes on
                kv_bytes, kv_lens = nb, lens
                prompt_len = int(item.get("context_len") or len(item["input_ids"]))
        nll, n = 0.0, 0
        for item in inp.get("long_context", []):
            a, b = self.long_context(item, press, eager)
            nll, n = nll + a, n + b
        return {"press": name, "budget": budget, "kvpress_class": None if press is None else type(press).__name__,
                "kvpress_kwargs": kwargs, "prefill_attention": "eager" if eager else self.base_attn,
                "kv_bytes_prefill": kv_bytes, "kv_entries_per_layer": sorted(set(kv_lens)) if kv_lens else None,
                "prompt_len": prompt_len, "passkey": sum(hits) / len(hits) if hits else None, "passkey_hits": hits,
                "passkey_outputs": texts, "ppl": math.exp(nll / n) if n else None, "nll": nll, "tokens": n,
                "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip the plain no-cache perplexity check")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier --out made from the same inputs and measure only the rest")
    a = ap.parse_args(argv)
    with open(a.inputs) as f:
        inp = json.load(f)
    new = int(inp.get("max_new_tokens", 8))
    digest = hashlib.sha256(open(a.inputs, "rb").read()).hexdigest()
    done: dict[tuple[str, float | None], dict[str, Any]] = {}
    if a.resume and os.path.isfile(a.out):
        with open(a.out) as f:
            old = json.load(f)
        if old.get("inputs_sha256") == digest:
            done = {(r["press"], r["budget"]): r for r in old["rows"] if "error" not in r}
    runner = Runner(a.model, a.threads)
    wanted = list(inp.get("presses", []))
    presses = [n for n in wanted if available(n)]
    skipped = [n for n in wanted if n not in presses]
    out = {"kvpress_version": version("kvpress"), "transformers_version": transformers.__version__,
           "torch_version": torch.__version__, "model": os.path.abspath(a.model), "threads": a.threads,
           "max_new_tokens": new, "inputs_sha256": digest, "presses_skipped": skipped, "reference": None,
           "rows": [], "complete": False}

    def save() -> None:  # after every row, so a stopped run keeps what it measured (and --resume goes on)
        with open(a.out + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    with torch.inference_mode():
        # press by press, both budgets each, so a run stopped early still has whole presses
        for name, b in [("none", None)] + [(p, float(b)) for p in presses for b in inp.get("budgets", [])]:
            if (name, b) in done:
                out["rows"].append(done[(name, b)])
                continue
            try:
                r = runner.row(name, b, inp, new)
            except Exception as e:  # noqa: BLE001 - reported in the output, the other presses still run
                print(f"kvpress {name} budget {b}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                out["rows"].append({"press": name, "budget": b, "error": f"{type(e).__name__}: {e}"})
                save()
                continue
            print(f"kvpress {name:18s} budget {b!s:>4}: KV {r['kv_bytes_prefill']} B, passkey {r['passkey']:.2f}, "
                  f"long-context ppl {r['ppl']:.3f} ({r['seconds']} s)", file=sys.stderr, flush=True)
            out["rows"].append(r)
            save()
        if not a.no_reference and inp.get("long_context"):
            nll, n = 0.0, 0
            for item in inp["long_context"]:
                x, y = runner.reference_nll(item)
                nll, n = nll + x, n + y
            out["reference"] = {"ppl_no_cache": math.exp(nll / n), "nll": nll, "tokens": n}
    out["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
