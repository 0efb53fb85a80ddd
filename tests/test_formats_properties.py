"""Property tests of the file formats: whatever JSON arrives, parsing gives a valid object or one KvtoolError."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import stored_entries
from kvtool.formats.merge_settings import MergeBase, layer_counts
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import Recipe
from kvtool.formats.sidecar import SIDECAR, read_sidecar

json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) |
                           st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                                          max_size=6), max_leaves=20)


@st.composite
def valid_plans(draw):
    L = draw(st.integers(1, 24))
    types = draw(st.lists(st.sampled_from(["full_attention", "sliding_attention"]), min_size=L, max_size=L))
    consumers = draw(st.lists(st.integers(1, max(1, L - 1)), max_size=L, unique=True)) if L > 1 else []
    return SharingPlan.nearest_owner(types, sorted(consumers))


@given(valid_plans())
@settings(deadline=None)
def test_plans_round_trip_through_json(plan):
    again = SharingPlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert again.kv_fraction == (plan.num_layers - len(plan.consumers)) / plan.num_layers


@given(st.dictionaries(st.sampled_from(["kv_source_layers", "version", "method", "merge", "layer_types", "bogus"]),
                       json_values, max_size=5))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_plan_json_parses_or_fails_with_one_kvtool_error(d):
    try:
        plan = SharingPlan.from_dict(d)
    except KvtoolError as e:
        assert "\n" not in str(e)
        return
    plan.validate()


@given(json_values)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_recipe_json_parses_or_fails_with_one_kvtool_error(d):
    try:
        Recipe.from_dict(d)
    except KvtoolError as e:
        assert "\n" not in str(e)


@given(json_values)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_sidecar_json_reads_or_fails_with_one_kvtool_error(tmp_path_factory, d):
    p = tmp_path_factory.mktemp("side")
    (p / SIDECAR).write_text(json.dumps(d))
    try:
        read_sidecar(p)
    except KvtoolError as e:
        assert "\n" not in str(e)


@given(valid_plans(), st.floats(0.05, 1.0), st.integers(2, 300), st.integers(0, 20))
@settings(deadline=None)
def test_compressed_entries_never_exceed_the_uncompressed_ones(plan, budget, prompt, new):
    types = plan.layer_types
    try:
        kept = layer_counts(MergeBase(budget=budget, protected_layers=[]), plan.kv_source_layers, types, prompt)
    except KvtoolError:
        return
    full = stored_entries(plan.kv_source_layers, types, 16, prompt, new)
    merged = stored_entries(plan.kv_source_layers, types, 16, prompt, new, kept)
    assert all(0 <= m <= f for m, f in zip(merged, full, strict=True))
    assert all(f == 0 for j, f in enumerate(full) if plan.kv_source_layers[j] != j)
