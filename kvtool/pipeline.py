"""``kvtool.compress``: the whole flow in one call (calibrate → search → export, or heal when the recipe says so),
like llm-compressor's ``oneshot``. The recipe it ran is saved in the export's sidecar, and ``kvtool export --recipe
kvtool.json`` runs it again. It composes the commands below it, so it sits a layer above them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from kvtool.atomic import check_writable_dir
from kvtool.calibration.calibrate import calibrate
from kvtool.errors import KvtoolError, read_json
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import CalibrationSettings, Recipe, SearchSettings
from kvtool.formats.sidecar import read_sidecar
from kvtool.heal import heal
from kvtool.io.export import export
from kvtool.io.loading import model_and_tokenizer, model_origin
from kvtool.progress import Advance, Log, silent
from kvtool.search.search import search
from kvtool.search.strategies import strategy_for


def compress(
    model=None,
    *,
    tokenizer=None,
    out: str | Path,
    recipe: Recipe | str | Path | None = None,
    data: str | None = None,
    target: float | None = None,
    calibration: CalibrationSettings | None = None,
    search_settings: SearchSettings | None = None,
    dtype: str | None = None,
    device: str | None = None,
    force: bool = False,
    progress: Advance | None = None,
    on_try: Callable[[dict], None] | None = None,
    log: Log | None = None,
) -> SharingPlan:
    """Calibrate ``model`` (a path, hub id, None for the embedded default, or a loaded model with its tokenizer),
    search a map, and export it to ``out``; returns the plan. ``recipe`` (a ``Recipe``, or an export's
    ``kvtool.json`` / a recipe JSON) gives every setting at once; otherwise ``calibration`` / ``search_settings``,
    with ``data`` and ``target`` as shortcuts."""
    check_writable_dir(out, force)
    if recipe is not None and not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe is None:
        cal = calibration or CalibrationSettings()
        sea = search_settings or SearchSettings()
        recipe = Recipe(None if model is None or not isinstance(model, (str, Path)) else str(model), dtype,
                        replace(cal, data=data) if data is not None else cal,
                        replace(sea, target=target) if target is not None else sea)
    elif any(x is not None for x in (data, target, calibration, search_settings)):
        raise KvtoolError("give a recipe, or settings, not both")
    strategy_for(recipe.search)  # an unknown order or layout fails before calibration
    given_object = model is not None and not isinstance(model, (str, Path))
    model, tokenizer = model_and_tokenizer(model if model is not None else recipe.model, tokenizer,
                                           dtype=recipe.dtype or dtype, device=device, what="compress")
    if given_object:
        recipe = replace(recipe, model=model_origin(model).source)
    say = log or silent
    say(f"calibrating on {recipe.calibration.samples}×{recipe.calibration.seq_len} tokens")
    stats = calibrate(model, tokenizer=tokenizer, settings=recipe.calibration, progress=progress)
    say(f"searching a map at target {recipe.search.target}")
    plan = search(stats, model=model, settings=recipe.search, on_try=on_try, warn=log).plan
    if recipe.heal is not None:
        say(f"healing {plan.describe()}")
        heal(plan, out=out, model=model, tokenizer=tokenizer, settings=recipe.heal, force=force, recipe=recipe,
             log=log)
    else:
        say(f"exporting {plan.describe()}")
        export(plan, out=out, model=model, tokenizer=tokenizer, force=force, recipe=recipe)
    return plan


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from an export directory, its ``kvtool.json``, or a JSON file holding a recipe."""
    p = Path(path)
    if p.is_dir() or p.name == "kvtool.json":
        side = read_sidecar(p if p.is_dir() else p.parent)
        if not side.get("recipe"):
            raise KvtoolError(f"{p} records no recipe (it was exported from a hand-made plan)")
        return Recipe.from_dict(side["recipe"])
    if not p.exists():
        raise KvtoolError(f"recipe not found: {p}")
    return Recipe.from_dict(read_json(p))
