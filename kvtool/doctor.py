"""``kvtool doctor``: the versions in use and a few-second self-test of the sharing runtime on tiny random models of
every supported architecture. Run it first when a number looks wrong, and after upgrading transformers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from packaging.specifiers import SpecifierSet
from transformers import DynamicCache

from kvtool.compat import cache_kwargs
from kvtool.crosslayer.archs import layer_types
from kvtool.crosslayer.attention import TESTED_TRANSFORMERS
from kvtool.crosslayer.kv_check import check_kv_in_effect
from kvtool.crosslayer.runtime import sharing
from kvtool.errors import KvtoolError, first_line
from kvtool.formats.plan import SharingPlan
from kvtool.io.loading import quiet_transformers
from kvtool.io.tiny import TINY_ARCHS, tiny_model
from kvtool.merging.hook import merge
from kvtool.merging.methods import METHODS
from kvtool.versions import versions


@dataclass
class Check:
    arch: str
    name: str
    ok: bool
    detail: str = ""


@torch.no_grad()
def _check_arch(arch: str) -> list[Check]:
    m = tiny_model(arch)
    plan = SharingPlan.nearest_owner(layer_types(m.config), (2, 4, 5))
    ids = torch.randint(3, m.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    out: list[Check] = []

    def run(name: str, fn: Callable[[], str]) -> bool:
        try:
            out.append(Check(arch, name, True, fn()))
        except Exception as e:  # noqa: BLE001 - every failure becomes one reported line
            out.append(Check(arch, name, False, first_line(e)))
        return out[-1].ok

    try:
        ctx = sharing(m, plan)
        ctx.__enter__()
    except Exception as e:  # noqa: BLE001
        return [Check(arch, "install", False, first_line(e))]
    try:
        out.append(Check(arch, "install", True, plan.describe()))

        def cached_equals_uncached() -> str:
            full = m(ids, use_cache=False).logits
            cache = DynamicCache(config=m.config)
            steps = torch.cat([m(ids[:, t : t + 1], use_cache=True, **cache_kwargs(m, cache)).logits
                               for t in range(ids.shape[1])], 1)
            err = float((steps - full).abs().max())
            if err > 1e-3:
                raise KvtoolError(f"token-by-token decoding differs from one uncached forward by {err:.2e}")
            return f"max |Δlogit| {err:.1e}"

        def kv_bytes() -> str:
            return f"holds {check_kv_in_effect(m):.3f} of the base KV, as the plan implies"

        def consumers_skip_kv() -> str:
            calls: dict[int, int] = {j: 0 for j in plan.consumers}
            hooks = []
            for j in plan.consumers:
                attn = m.model.layers[j].self_attn
                for name in ("k_proj", "v_proj", "k_norm", "qkv_proj"):
                    mod = getattr(attn, name, None)
                    if isinstance(mod, torch.nn.Module):
                        hooks.append(mod.register_forward_hook(
                            lambda *_a, j=j: calls.__setitem__(j, calls[j] + 1)))
            try:
                m(ids, use_cache=False)
                m.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
            finally:
                for h in hooks:
                    h.remove()
            called = [j for j, n in calls.items() if n]
            if called:
                raise KvtoolError(f"consumer layers {called} ran their K/V projections")
            return f"layers {plan.consumers} never project K/V"

        def merging_budget() -> str:
            shares = []
            for method in METHODS:
                with merge(m, method=method, budget=0.5, protected_layers=[]):
                    shares.append(check_kv_in_effect(m))  # raises unless every layer holds its exact count
            return "at budget 0.5 " + ", ".join(f"{n} holds {x:.3f}" for n, x in zip(METHODS, shares, strict=True)) \
                + " of the base KV"

        run("cached == uncached", cached_equals_uncached)
        run("KV bytes = plan", kv_bytes)
        run("consumers skip K/V", consumers_skip_kv)
        run("merge budget", merging_budget)
    finally:
        ctx.__exit__(None, None, None)
    return out


def doctor(log: Callable[[Check], None] | None = None) -> list[Check]:
    """Run the self-test on every supported architecture; ``log`` receives each check as it finishes."""
    quiet_transformers()
    checks: list[Check] = []
    for arch in TINY_ARCHS:
        for c in _check_arch(arch):
            checks.append(c)
            if log:
                log(c)
    return checks


def environment() -> dict[str, str]:
    """The versions in use, and whether transformers is inside the range kvtool was tested on."""
    env = versions()
    inside = transformers.__version__ in SpecifierSet(TESTED_TRANSFORMERS)
    env["transformers tested range"] = f"{TESTED_TRANSFORMERS} ({'inside' if inside else 'OUTSIDE'})"
    env["torch threads"] = str(torch.get_num_threads())
    env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    return env
