"""Property tests of the file formats: whatever JSON arrives, parsing gives a valid object or one KvtoolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvtool.errors import KvtoolError
from kvtool.formats.cache_size import stored_entries
from kvtool.formats.heal_settings import HealSettings
from kvtool.formats.merge_settings import MergeBase, layer_counts
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import Recipe
from kvtool.formats.sidecar import SIDECAR, read_sidecar
from kvtool.formats.stats import CalibrationStats
from tests.helpers import json_values as _json_values

json_values = _json_values()


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
    given_up = sum(k != j for j, k in enumerate(plan.k_sources)) + sum(v != j for j, v in enumerate(plan.v_sources))
    assert again.removed_share() == given_up / (2 * plan.num_layers)


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


# --- wrong types at any depth: a valid file of each format with values replaced or removed anywhere inside --------

leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 40) |
          st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6) |
          st.sampled_from(["", "0", "full_attention", "kvmerger", "euclidean", "layer", "null", "\u0000", "é"]))
deep_json = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) |
                         st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
DEEP = [[[[[[[[[[[]]]]]]]]]]]


def _edit(draw, obj):
    """``obj`` with one value somewhere inside it replaced by arbitrary JSON, or one key removed or added."""
    if isinstance(obj, dict) and obj and draw(st.integers(0, 2)):
        k = draw(st.sampled_from(sorted(obj)))
        if draw(st.integers(0, 5)) == 0:
            return {key: v for key, v in obj.items() if key != k}
        return {**obj, k: _edit(draw, obj[k])}
    if isinstance(obj, list) and obj and draw(st.integers(0, 2)):
        i = draw(st.integers(0, len(obj) - 1))
        return [*obj[:i], _edit(draw, obj[i]), *obj[i + 1:]]
    if isinstance(obj, dict) and draw(st.integers(0, 4)) == 0:
        return {**obj, draw(st.text(max_size=8)): draw(deep_json)}
    return draw(deep_json | st.just(DEEP))


@st.composite
def edited(draw, valid):
    obj = valid
    for _ in range(draw(st.integers(1, 3))):
        obj = _edit(draw, obj)
    return obj


def _one_kvtool_error(e: KvtoolError) -> None:
    assert "\n" not in str(e) and str(e).encode("utf-8")


VALID_PLAN = SharingPlan.from_tensors(
    [0, 1, 1, 3, 3, 5], [0, 1, 2, 3, 3, 3], layer_types=["full_attention"] * 6, method="best-first", target=0.3,
    score=0.01, model_name="tiny", model_fingerprint="abc", merge={"method": "kvmerger", "budget": 0.5},
    details={"model": "tiny", "recipe": Recipe().to_dict(), "tries": [1, 2]}).to_dict()


@given(edited(VALID_PLAN))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_plan_edited_anywhere_parses_or_fails_with_one_kvtool_error(d):
    try:
        plan = SharingPlan.from_dict(d)
    except KvtoolError as e:
        _one_kvtool_error(e)
        return
    plan.validate()
    plan.describe()
    json.loads(plan.to_json())


@given(edited(VALID_PLAN))
@example({**VALID_PLAN, "details": 5})
@example({**VALID_PLAN, "details": {"model": [1]}})
@example({**VALID_PLAN, "score": "x"})
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_plan_that_parses_has_the_field_types_its_readers_use(d):
    try:
        plan = SharingPlan.from_dict(d)
    except KvtoolError:
        return
    assert isinstance(plan.details, dict) and isinstance(plan.details.get("model"), (str, type(None)))
    assert isinstance(plan.method, str)
    for v in (plan.target, plan.threshold, plan.score):
        assert v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
    assert all(isinstance(v, (str, type(None))) for v in (plan.model_name, plan.model_fingerprint))
    try:
        Recipe.from_plan(plan)
    except KvtoolError:
        pass


VALID_RECIPE = Recipe(model="tiny", dtype="float32", heal=HealSettings()).to_dict()


@given(edited(VALID_RECIPE))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_recipe_edited_anywhere_parses_or_fails_with_one_kvtool_error(d):
    try:
        r = Recipe.from_dict(d)
    except KvtoolError as e:
        _one_kvtool_error(e)
        return
    json.dumps(r.to_dict())
    r.calibration.validated()
    r.search.validated()


@pytest.fixture(scope="module")
def exported_sidecar(tiny_dir, tmp_path_factory):
    from kvtool.io.export import export

    out = export(SharingPlan([0, 1, 1, 3, 3, 5], merge={"method": "kvmerger", "budget": 0.5, "protected_layers": []}),
                 out=tmp_path_factory.mktemp("exp") / "exp", model=str(tiny_dir))
    return json.loads((out / SIDECAR).read_text())


@given(data=st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_a_sidecar_edited_anywhere_reads_or_fails_with_one_kvtool_error(exported_sidecar, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("side")
    (d / SIDECAR).write_text(json.dumps(data.draw(edited(exported_sidecar))))
    try:
        read_sidecar(d)
    except KvtoolError as e:
        _one_kvtool_error(e)


@pytest.fixture(scope="module")
def calibration(tiny_dir, tmp_path_factory):
    from kvtool.calibration.calibrate import calibrate

    out = tmp_path_factory.mktemp("cal") / "cal"
    calibrate(str(tiny_dir), samples=2, seq_len=8, out=out)
    return out


@given(data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_calibration_json_edited_anywhere_loads_or_fails_with_one_kvtool_error(calibration, tmp_path_factory, data):
    meta = json.loads((calibration / "calibration.json").read_text())
    d = tmp_path_factory.mktemp("cal")
    (d / "stats.safetensors").symlink_to(calibration / "stats.safetensors")
    (d / "calibration.json").write_text(json.dumps(data.draw(edited(meta))))
    try:
        st_ = CalibrationStats.load(d)
    except KvtoolError as e:
        _one_kvtool_error(e)
        return
    assert st_.num_layers == len(list(st_.meta["layer_types"])) == st_.distance().shape[0]
    assert all(isinstance(st_.meta[k], str) for k in ("model_name", "model_fingerprint", "data", "data_hash"))
