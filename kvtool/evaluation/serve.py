"""Eval task ``serve``: throughput at a fixed KV-cache memory budget, where memory saved becomes batch gained.

For a prompt length and a number of new tokens, each variant (base, shared, and both with prompt merging when a
merge budget is given) is measured at batch 1 for its KV bytes per sequence (checked against what its map and merge
setting imply), given the largest batch whose cache fits the budget, and timed at that batch in fresh processes,
alternating, repeated. The runs at the largest batch confirm that the measured cache fits the budget.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass
from typing import Any, ClassVar

from kvtool.crosslayer.kv_check import implied_bytes
from kvtool.errors import KvtoolError
from kvtool.evaluation.memory_speed import probe
from kvtool.evaluation.task import EvalContext, EvalTask, opt
from kvtool.evaluation.variants import Variants
from kvtool.io.devices import model_device
from kvtool.merging.methods import MergeMethod, make_method
from kvtool.progress import Log, silent

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from ``256MiB``, ``8GiB``, ``1.5GB`` or a plain number."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise KvtoolError(f"cannot read {text!r} as a size; write e.g. 256MiB or 8GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def serve(v: Variants, kv_budget: int, *, prompt: int = 512, new: int = 64, repeats: int = 3,
          merge: MergeMethod | None = None, log: Log | None = None) -> dict[str, Any]:
    """The ``serve`` entry of an eval report: per variant its KV bytes per sequence, largest batch within
    ``kv_budget`` bytes, the KV measured at that batch, and generated tokens/s there (median of ``repeats``)."""
    say = log or silent
    # the plain rows run without prompt merging (an export's own merge setting included)
    variants = [("base", v.base_args, None, None),
                ("shared", [*v.shared_args, "--merge", "off"], v.plan, None)]
    if merge is not None:
        # the base model has its own layers to merge: layer budgets calibrated for the shared map do not apply
        plain = dataclasses.replace(merge, layer_budgets=None)
        variants += [("base+merge", [*v.base_args, "--merge", json.dumps(plain.to_dict())], None, plain),
                     ("shared+merge", [*v.shared_args, "--merge", json.dumps(merge.to_dict())], v.plan, merge)]
    rows: dict[str, dict[str, Any]] = {}
    for name, args, plan, mg in variants:
        want = implied_bytes(v.base, plan, mg, 1, prompt, new)
        got = probe(args, 1, prompt, new)["kv_bytes"]
        if want is not None and got != want:
            raise KvtoolError(f"serve: {name} holds {got:,} KV bytes per sequence, its map implies {want:,}")
        if got > kv_budget:
            raise KvtoolError(f"serve: a KV budget of {kv_budget:,} bytes holds no {name} sequence of {prompt}+{new} "
                              f"tokens ({got:,} bytes each); give a larger --kv-budget")
        rows[name] = {"kv_bytes_per_seq": got, "max_batch": kv_budget // got, "runs": []}
        say(f"serve: {name} holds {got / 2**20:.2f} MiB of KV per sequence: batch {kv_budget // got} fits")
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, args, _, _ in order:
            row = rows[name]
            res = probe(args, row["max_batch"], prompt, new)
            if res["kv_bytes"] != row["max_batch"] * row["kv_bytes_per_seq"] or res["kv_bytes"] > kv_budget:
                raise KvtoolError(f"serve: {name} at batch {row['max_batch']} holds {res['kv_bytes']:,} KV bytes, "
                                  f"not {row['max_batch']} × {row['kv_bytes_per_seq']:,} within {kv_budget:,}")
            row["runs"].append({k: res[k] for k in ("kv_bytes", "gen_tok_s", "decode_tok_s", "prefill_s")})
    base = rows["base"]
    for row in rows.values():
        for key in ("gen_tok_s", "decode_tok_s"):
            row[key] = statistics.median(x[key] for x in row["runs"])
        row["kv_bytes_at_max_batch"] = row["runs"][0]["kv_bytes"]
        row["max_batch_ratio"] = row["max_batch"] / base["max_batch"]
        row["gen_tok_s_ratio"] = row["gen_tok_s"] / base["gen_tok_s"]
    return {"kv_budget": kv_budget, "prompt": prompt, "new": new, "repeats": repeats,
            "device": str(model_device(v.base)), "max_batch_limit": 1 / (1 - v.plan.removed_share(
                getattr(v.base.config, "sliding_window", None), prompt + new)),
            "merge": None if merge is None else merge.to_dict(), "rows": rows}


@dataclass
class Serve(EvalTask):
    """Throughput within a fixed KV-cache memory, each variant at its largest batch."""

    name: ClassVar[str] = "serve"
    help: ClassVar[str] = "tokens/s at the largest batch a KV budget holds (needs --kv-budget)"
    kv_budget: int | None = opt(None, "KV-cache bytes each variant fills, e.g. 256MiB", parse=parse_size)
    prompt: int = opt(512, "prompt tokens per sequence", min=2)
    new: int = opt(64, "generated tokens per sequence", min=1)
    repeats: int = opt(3, "timed runs per variant", min=1)
    merge_budget: float | None = opt(None, "also with prompt merging at this budget (default: the plan's merge)")

    def check(self, ctx: EvalContext) -> None:
        if not self.kv_budget:
            raise KvtoolError("the serve task needs a KV budget (--kv-budget, e.g. 256MiB)")

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        assert self.kv_budget
        mg = ctx.plan_merge or (make_method(budget=self.merge_budget) if self.merge_budget else None)
        ctx.log(f"throughput within {self.kv_budget / 2**20:.0f} MiB of KV cache ({self.prompt} prompt + "
                f"{self.new} new tokens, {self.repeats} runs each, fresh processes)")
        return serve(ctx.v, self.kv_budget, prompt=self.prompt, new=self.new, repeats=self.repeats, merge=mg,
                     log=ctx.log)

    @staticmethod
    def summary(result: dict[str, Any]) -> dict[str, Any]:
        sh = result["rows"]["shared"]
        return {"serve_max_batch_ratio": sh["max_batch_ratio"], "serve_tok_s_ratio": sh["gen_tok_s_ratio"]}

    @staticmethod
    def table(result: dict[str, Any]) -> Any:
        from rich.table import Table

        sv = result
        t = Table(title=f"Serving within {sv['kv_budget'] / 2**20:,.0f} MiB of KV cache ({sv['prompt']} prompt + "
                        f"{sv['new']} new tokens, {sv['device']}, median of {sv['repeats']}; batch limit of sharing "
                        f"alone {sv['max_batch_limit']:.2f}×)", title_justify="left")
        for c in ("model", "KV MiB / seq", "max batch", "× base", "KV MiB at max", "gen tok/s", "× base",
                  "decode tok/s"):
            t.add_column(c, justify="left" if c == "model" else "right")
        for name, r in sv["rows"].items():
            t.add_row(name, f"{r['kv_bytes_per_seq'] / 2**20:.2f}", str(r["max_batch"]),
                      f"{r['max_batch_ratio']:.2f}", f"{r['kv_bytes_at_max_batch'] / 2**20:.1f}",
                      f"{r['gen_tok_s']:.1f}", f"{r['gen_tok_s_ratio']:.2f}", f"{r['decode_tok_s']:.1f}")
        return t
