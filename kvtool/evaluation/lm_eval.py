"""``kvtool eval --lm-eval``: lm-evaluation-harness on both variants through its HFLM wrapper."""

from __future__ import annotations

from typing import Any

from kvtool.evaluation.variants import Variants


def run_lm_eval(v: Variants, tasks: list[str], say) -> dict[str, Any]:
    """lm-evaluation-harness on both variants through its HFLM wrapper, when it is installed."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        say("lm-evaluation-harness is not installed (pip install lm-eval); --lm-eval skipped")
        return {"skipped": "lm-evaluation-harness is not installed"}
    res: dict[str, Any] = {}
    for which in ("base", "shared"):
        with v.use(which) as m:
            try:
                out = simple_evaluate(model=HFLM(pretrained=m, tokenizer=v.tokenizer), tasks=tasks)
            except Exception as e:  # noqa: BLE001 - data not reachable, unknown task, ...
                say(f"lm-eval failed: {str(e).splitlines()[0][:200]}")
                return {"skipped": f"lm-eval failed: {str(e).splitlines()[0][:200]}"}
            res[which] = out.get("results", {})
    return res
