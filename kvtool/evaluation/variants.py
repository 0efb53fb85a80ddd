"""The two models ``kvtool eval`` compares."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kvtool.crosslayer.kv_check import check_kv_in_effect
from kvtool.crosslayer.runtime import active_plan, apply_sharing, remove_sharing, sharing
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.formats.sidecar import read_sidecar
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import load, model_origin


@dataclass
class Variants:
    """The base model and the shared one: one model object under a sharing context (plan), or two (export)."""

    base: nn.Module
    tokenizer: Any
    plan: SharingPlan
    shared_model: nn.Module | None = None  # an export; None means "base under ``plan``"
    base_arg: str | None = None  # how a subprocess loads the base
    shared_args: list[str] = field(default_factory=list)  # ... and the shared variant
    unhealed: bool = False  # the export is healed: quality tasks also run "unhealed", the base under its plan

    @property
    def names(self) -> tuple[str, ...]:
        """The variants the quality tasks compare: base, shared, and for a healed export the unhealed map."""
        return ("base", "unhealed", "shared") if self.unhealed else ("base", "shared")

    @property
    def base_args(self) -> list[str]:
        """How a subprocess (``kvtool.evaluation.probe``) loads the base."""
        return ["--model", self.base_arg] if self.base_arg else []

    @property
    def name(self) -> str:
        return model_origin(self.base).name

    @contextlib.contextmanager
    def use(self, which: str) -> Iterator[nn.Module]:
        if which == "unhealed":
            with sharing(self.base, self.plan):
                yield self.base
            return
        if which == "base" or self.shared_model is not None:
            yield self.base if which == "base" else self.shared_model
            return
        with sharing(self.base, self.plan):
            yield self.base


def load_variants(export_dir: str | Path | None, plan: SharingPlan | str | Path | None, model: str | None,
                  dtype: str | None = None, device: str | None = None, tmpdir: str | None = None) -> Variants:
    """Load the base and the shared variant (an export, or the base under ``plan``), checking that they belong
    together and that the shared one holds the KV its map implies."""
    if (export_dir is None) == (plan is None):
        raise KvtoolError("give an exported directory or --plan (not both)")
    dev_args = (["--device", device] if device else []) + (["--dtype", dtype] if dtype else [])
    if export_dir is not None:
        side = read_sidecar(export_dir)
        shared, tok = load(export_dir, dtype=dtype, device=device, merge=False)  # the merge task turns it on
        base_src = model or side["base_model"].get("source")
        base, _ = load(base_src, dtype=dtype, device=device)
        check_fingerprint(side["base_model"]["fingerprint"], model_fingerprint(base), "this export",
                          "pass --model BASE")
        return Variants(base, tok, active_plan(shared), shared, base_src, ["--model", str(export_dir), *dev_args],
                        unhealed=bool(side.get("heal")))
    if not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    base_src = model if model is not None else plan.model_source
    base, tok = load(base_src, dtype=dtype, device=device)
    check_fingerprint(plan.model_fingerprint, model_fingerprint(base), "the plan",
                      "pass the --model it was searched on")
    apply_sharing(base, plan)  # validates the plan for this model
    try:
        check_kv_in_effect(base)
    finally:
        remove_sharing(base)
    tmp = tempfile.mkdtemp(prefix="kvtool-eval-", dir=tmpdir)
    atexit.register(shutil.rmtree, tmp, True)
    plan_file = Path(tmp) / "plan.json"
    plan_file.write_text(plan.to_json())
    model_args = ["--model", base_src] if base_src else []
    return Variants(base, tok, plan, None, base_src, [*model_args, "--plan", str(plan_file), *dev_args])
