"""The merge methods, one file each, found by name through ``METHODS`` (the one registry: the CLI, ``kvtool eval``,
doctor and the benches take their list and defaults from it)."""

from __future__ import annotations

from typing import Any

from kvtool.errors import KvtoolError
from kvtool.formats.merge_settings import check_merge_dict
from kvtool.merging.methods.attnmerge import AttnMerge
from kvtool.merging.methods.base import MergeMethod, PromptKV, ScoredEviction
from kvtool.merging.methods.h2o import H2O
from kvtool.merging.methods.kvmerger import KVMerger
from kvtool.merging.methods.streaming import Streaming

METHODS: dict[str, type[MergeMethod]] = {
    "kvmerger": KVMerger,
    "attnmerge": AttnMerge,
    "h2o": H2O,
    "streaming": Streaming,
}
DEFAULT_METHOD = "kvmerger"

# The flat settings of kvtool 0.x (one class for every method) and the fields each method read then: a sidecar or
# plan written by it loads as the method it names, less what that method ignored.
_LEGACY_FIELDS = {"method", "budget", "eps", "sigma", "sinks", "recent", "heavy", "size_bias", "protected_layers",
                  "thresholds", "window", "pool", "min_similarity", "merge_keys", "recent_share", "mix",
                  "layer_budget"}
_LEGACY_READ = {"kvmerger": {"eps", "sigma", "sinks", "recent", "heavy", "size_bias"},
                "attnmerge": {"window", "pool", "min_similarity", "merge_keys", "recent_share", "mix", "sinks",
                              "recent", "size_bias"},
                "h2o": set(), "streaming": {"sinks"}}


def method_names() -> str:
    return ", ".join(METHODS)


def make_method(method: str = DEFAULT_METHOD, **fields: Any) -> MergeMethod:
    """The method ``method`` with these settings (each method's own, plus budget / protected_layers /
    layer_budgets), validated."""
    cls = METHODS.get(method) if isinstance(method, str) else None
    if cls is None:
        raise KvtoolError(f"unknown merge method {method!r}; use one of {method_names()}")
    return cls.from_fields(fields)


def method_from_dict(d: Any) -> MergeMethod:
    """A method from its ``to_dict()`` (a plan's or sidecar's ``merge``), or from kvtool 0.x's flat settings."""
    d = dict(check_merge_dict(d))
    name = d.pop("method", DEFAULT_METHOD)
    cls = METHODS.get(name)
    if cls is None:
        raise KvtoolError(f"unknown merge method {name!r}; use one of {method_names()}")
    if ("thresholds" in d or "layer_budget" in d) and set(d) <= _LEGACY_FIELDS:  # kvtool 0.x wrote both
        if d.get("budget") is None and d.get("thresholds"):
            raise KvtoolError("this export merges by calibrated thresholds, which kvtool no longer reads; "
                              "re-export it: kvtool search --merge-budget B, then kvtool export")
        keep = _LEGACY_READ[name] | {"budget", "protected_layers"}
        d = {k: v for k, v in d.items() if k in keep and v is not None}
    return cls.from_fields(d)


def as_method(merge: Any) -> MergeMethod:
    """A ``MergeMethod`` as is, or one from its dict."""
    return merge if isinstance(merge, MergeMethod) else method_from_dict(merge)


__all__ = ["DEFAULT_METHOD", "H2O", "METHODS", "AttnMerge", "KVMerger", "MergeMethod", "PromptKV", "ScoredEviction",
           "Streaming", "as_method", "make_method", "method_from_dict", "method_names"]
