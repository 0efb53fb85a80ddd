"""The ``kvtool`` command line: option parsing and printing only; each command calls one library function.

Library modules are imported inside the commands, so ``kvtool --help`` and ``--version`` import neither torch nor
transformers (this module is the top layer: nothing imports it, so these late imports cannot hide a cycle)."""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvtool.errors import KvtoolError
from kvtool.formats.recipe import CalibrationSettings
from kvtool.version import __version__

app = typer.Typer(
    name="kvtool",
    help="Cut the KV-cache memory of Hugging Face causal LMs: calibrate → search → export → eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF directory, .gguf file or hub id "
                                                                         "(default: embedded SmolLM2-135M-Instruct)")]
DtypeOpt = Annotated[str | None, typer.Option(help="float32 (CPU default), bfloat16 or float16")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto (spread over GPUs with accelerate)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite existing outputs")]
VllmPythonOpt = Annotated[str | None, typer.Option(
    help="the Python of the vLLM environment (default: this one if it has vLLM and kvtool_vllm, else the "
         ".venv-vllm that `.ci/install --vllm` builds)")]


@contextlib.contextmanager
def _bar(what: str, total: int):
    """A rich progress bar; yields the ``advance(n)`` callback the library calls."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=out) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def parse_count(text: str) -> int:
    """A count from ``250000``, ``250k`` or ``1.5M`` (k = 1,000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise KvtoolError(f"cannot read {text!r} as a count; write e.g. 250k or 1M")
    n = int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])
    if n < 1:
        raise KvtoolError(f"{text!r}: the count must be at least 1")
    return n


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn):
    """Turn user-facing errors into one line on stderr and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvtoolError as e:
            _fail(str(e))
        except RuntimeError as e:
            from kvtool.crosslayer.attention import SharingRuntimeError

            if not isinstance(e, SharingRuntimeError):
                raise
            _fail(str(e))
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as e:  # one the library did not word itself (transformers' loaders raise OSError too)
            from kvtool.errors import first_line

            name = getattr(e, "filename", None)
            _fail(f"{name}: {e.strerror or first_line(e)}" if name else first_line(e))

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"kvtool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """kvtool: layer-wise KV sharing (KVSharer and fixed layouts) and KV merging (KVMerger) for HF causal LMs."""


@app.command()
@handle_errors
def calibrate(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory for stats.safetensors + calibration.json")],
    model: ModelOpt = None,
    data: Annotated[str | None, typer.Option(help=".txt (blank-line separated), .jsonl ({text} or {messages}), "
                                                  "a directory of those, 'default' or 'pydoc'")] = None,
    samples: Annotated[int, typer.Option(min=1, help="number of token chunks")] = CalibrationSettings.samples,
    seq_len: Annotated[int, typer.Option(min=2, help="tokens per chunk")] = CalibrationSettings.seq_len,
    seed: Annotated[int, typer.Option(help="which chunks are picked")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Collect per-layer KV statistics (averaged K/V, layer distances, key similarity, baseline outputs)."""
    from kvtool.calibration.calibrate import calibrate as run
    from kvtool.formats.recipe import CalibrationSettings

    settings = CalibrationSettings(data=data, samples=samples, seq_len=seq_len, seed=seed, batch_size=batch_size)
    with _bar("calibrating", samples) as advance:
        stats = run(model, settings=settings, out=out_dir, force=force, dtype=dtype, device=device, progress=advance)
    m = stats.meta
    out.print(f"calibrated [bold]{m['model_name']}[/]: {m['num_layers']} layers, {m['samples']}×{m['seq_len']} "
              f"tokens from {m['data']} in {m['wall_time_s']:.1f} s")
    out.print(f"wrote {out_dir}/stats.safetensors, calibration.json, distance_heatmap.png "
              f"({m['num_layers']}×{m['num_layers']} distance matrices)")


@app.command()
@handle_errors
def search(
    stats: Annotated[Path, typer.Option("--stats", "-s", help="directory written by `kvtool calibrate`")],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="plan JSON to write")] = None,
    target: Annotated[float | None, typer.Option(help="fraction of KV-cache bytes to remove (always met, unless a "
                                                      "guard stops the search: then exit 3)")] = 0.3,
    layers: Annotated[int | None, typer.Option(help="number of whole consumer layers (instead of --target)")] = None,
    max_kl: Annotated[float | None, typer.Option(help="quality guard: stop if the calibration KL (nats) would "
                                                      "exceed X")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="quality guard: stop if the calibration cosine would "
                                                          "fall below T (the paper's orders: accept a pair only "
                                                          "if cosine >= T, default 0.5)")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="when a guard stops the search short of "
                                                                         "the target, still write the plan")] = False,
    granularity: Annotated[str, typer.Option(help="best-first moves: layer (whole layers; the form vLLM-style "
                                                  "per-layer sharing can serve) or tensor (also keys or values "
                                                  "alone)")] = "layer",
    beam_width: Annotated[int, typer.Option(min=1, help="best-first: partial maps kept at each step")] = 1,
    refine: Annotated[int, typer.Option(min=0, help="best-first: at most N one-move swaps tried after the target "
                                                    "is reached")] = 0,
    holdout: Annotated[float, typer.Option(min=0, max=0.9, help="best-first: share of the calibration chunks kept "
                                                             "out of the fit, to choose among the beam's finished "
                                                             "maps and the refinement's swaps by held-out KL")] = 0.0,
    context: Annotated[int, typer.Option(min=1, help="tokens per sequence at which KV bytes are counted (matters "
                                                     "for sliding-window layers)")] = 4096,
    order: Annotated[str, typer.Option(help="best-first (kvtool's default), local (lowest local attention error "
                                            "first), dissimilar (KVSharer as published), similar or random")] =
        "best-first",
    distance: Annotated[str, typer.Option(help="euclidean (paper), kvsharer (official code) or cosine")] = "euclidean",
    validate: Annotated[str | None, typer.Option(help="cosine (paper; default for distance orders) or kl "
                                                      "(default for local and best-first)")] = None,
    pool: Annotated[int, typer.Option(min=1, help="best-first: candidate moves scored per partial map and step")] = 4,
    beam: Annotated[int | None, typer.Option(min=1, hidden=True, help="deprecated: --pool")] = None,
    layout: Annotated[str | None, typer.Option(help="fixed layout instead of a search: adjacent, tail, "
                                                    "grouped")] = None,
    group_size: Annotated[int, typer.Option(help="layers per group for --layout grouped")] = 4,
    seed: Annotated[int, typer.Option(help="seed for --order random")] = 0,
    merge_budget: Annotated[float | None, typer.Option(help="also record prompt-KV merging at this share of the "
                                                            "prompt KV kept")] = None,
    merge_method: Annotated[str | None, typer.Option(help="merge method for --merge-budget (default: kvmerger; "
                                                          "any name in kvtool.METHODS)")] = None,
    merge_allocation: Annotated[str, typer.Option(help="per-layer budgets: even, or calibrated from the keys' "
                                                       "similarity (worse on SmolLM2, see docs/RESULTS.md)")] = "even",
    compare_: Annotated[bool, typer.Option("--compare", help="run every order and layout at --target and "
                                                            "print one table")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="with --compare: write the table as JSON")] = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Find a sharing map: best-first search (default), KVSharer's greedy orders or a fixed layout."""
    if max_kl is not None and min_cosine is not None:
        _fail("give --max-kl or --min-cosine, not both")
    threshold = max_kl if max_kl is not None else min_cosine
    if threshold is not None:
        validate = "kl" if max_kl is not None else "cosine"
    if compare_:
        _compare(stats, target, layers, threshold, seed, model, dtype, device, json_out, force)
        return
    if out_path is None:
        _fail("give --out plan.json (or --compare)")
    if beam is not None:  # 0.x spelling, kept for one release
        err.print("[yellow]warning:[/] --beam is deprecated and will be removed in the next release; use --pool "
                  "(--beam-width is the beam)")
        pool = beam
    import time

    from kvtool.formats.recipe import SearchSettings
    from kvtool.search.search import search as run
    from kvtool.search.strategy import Try

    settings = SearchSettings(target=target, layers=layers, threshold=threshold, order=order, distance=distance,
                              validate=validate, pool=pool, seed=seed, layout=layout, group_size=group_size,
                              merge_budget=merge_budget, merge_method=merge_method or "kvmerger",
                              merge_allocation=merge_allocation, granularity=granularity, beam_width=beam_width,
                              refine=refine, holdout=holdout, context=context, allow_partial=allow_partial)
    t0, tried = time.time(), [0]

    def on_try(r: Try) -> None:
        tried[0] += 1
        mark = ("[green]kept[/]" if r.accepted else
                "[dim]passed over (screening score)[/]" if r.screened else "[dim]rejected[/]")
        el = time.time() - t0
        eta = (f", ETA ~{el / r.removed * (r.needed - r.removed):.0f} s"
               if r.accepted and 0 < r.removed < r.needed else "")
        out.print(f"  [{tried[0]:>3} tried, {r.removed:.0%}/{r.needed:.0%} of KV bytes, {el:.0f} s{eta}]  "
                  f"{r.move:<12} score {r.score:.4f} {mark}", highlight=False)

    res = run(stats, model=model, settings=settings, out=out_path, force=force, dtype=dtype, device=device,
              on_try=on_try, warn=lambda m: err.print(f"[yellow]warning:[/] {m}"))
    p = res.plan
    measured = p.details["measured"]
    score = "" if p.score is None else f", calibration {measured['validate']} {p.score:.4f}"
    tried = f" after {len(res.tries)} tries" if res.tries else ""
    out.print(f"{p.describe()}{tried}{score}; {measured['kv_bytes_removed']:.1%} of the KV bytes removed "
              f"({p.method}), {res.seconds:.1f} s")
    out.print(f"wrote {out_path}")
    if res.partial:
        raise typer.Exit(3)


def _compare(stats, target, layers, threshold, seed, model, dtype, device, json_out, force) -> None:
    from rich.table import Table

    from kvtool.search.compare import compare_maps

    rep = compare_maps(stats, target=target, layers=layers, threshold=threshold, seed=seed, model=model, dtype=dtype,
                       device=device, json_out=json_out, force=force, log=lambda s: out.print(f"  {s}"))
    base = rep["base_ppl"]
    t = Table(title=f"{rep['model']}: sharing maps at target {rep['target']:g} (held-out pydoc perplexity)")
    for c in ("map", "consumers", "calib cosine", "calib KL", "held-out ppl", "× base", "search s"):
        t.add_column(c, justify="left" if c == "map" else "right", no_wrap=c == "map")
    for r in rep["rows"]:
        t.add_row(r["name"], str(r["consumers"]), f"{r['calib_cosine']:.4f}", f"{r['calib_kl']:.4f}",
                  f"{r['heldout_ppl']:.2f}", f"{r['heldout_ppl'] / base:.2f}", f"{r['search_s']:.1f}")
    out.print(t)
    corr = rep["spearman"]
    out.print(f"Spearman correlation with held-out perplexity over these maps: 1 - cosine {corr['cosine']:+.2f}, "
              f"KL {corr['kl']:+.2f}")
    if json_out is not None:
        out.print(f"wrote {json_out}")


@app.command()
@handle_errors
def export(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory to write")],
    plan: Annotated[Path | None, typer.Option("--plan", "-p", help="plan JSON from `kvtool search` (not needed "
                                                                  "when --model is an export or healed dir)")] = None,
    model: ModelOpt = None,
    dtype: Annotated[str | None, typer.Option(help="save weights as float32, bfloat16 or float16")] = None,
    max_shard_size: Annotated[str, typer.Option(help="shard the safetensors above this size")] = "2GB",
    recipe: Annotated[Path | None, typer.Option(help="an export's kvtool.json (or a recipe JSON): calibrate, search "
                                                     "and export again with its settings")] = None,
    force: ForceOpt = False,
) -> None:
    """Write a checkpoint + kvtool.json that loads with sharing on (kvtool.load, or transformers with
    trust_remote_code=True)."""
    if recipe is not None:
        if plan is not None:
            _fail("give --plan or --recipe, not both")
        from kvtool.pipeline import compress

        p = compress(model, out=out_dir, recipe=recipe, dtype=dtype, force=force,
                     log=lambda m: out.print(f"[dim]· {m}[/]"))
        out.print(f"reproduced {p.describe()} from {recipe}")
        path = out_dir
    else:
        from kvtool.io.export import export as run

        path = run(plan, out=out_dir, model=model, dtype=dtype, max_shard_size=max_shard_size, force=force)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out.print(f"exported to {path} ({size / 2**20:.1f} MiB of weights); load it with kvtool.load({str(path)!r}) "
              "or transformers with trust_remote_code=True")


@app.command()
@handle_errors
def compress(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="export directory to write")],
    target: Annotated[float, typer.Option(help="share of the KV-cache bytes removed (as in search)")] = 0.3,
    model: ModelOpt = None,
    data: Annotated[str | None, typer.Option(help="calibration data (see `kvtool calibrate --help`)")] = None,
    samples: Annotated[int, typer.Option(min=1, help="calibration chunks")] = CalibrationSettings.samples,
    seq_len: Annotated[int, typer.Option(min=2, help="tokens per chunk")] = CalibrationSettings.seq_len,
    order: Annotated[str, typer.Option(help="search order (see `kvtool search --help`)")] = "best-first",
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """calibrate → search → export in one go; the export's kvtool.json records the recipe."""
    from kvtool.formats.recipe import CalibrationSettings, SearchSettings
    from kvtool.pipeline import compress as run

    p = run(model, out=out_dir, calibration=CalibrationSettings(data=data, samples=samples, seq_len=seq_len),
            search_settings=SearchSettings(target=target, order=order), dtype=dtype, device=device, force=force,
            log=lambda m: out.print(f"[dim]· {m}[/]"))
    removed = p.details["measured"]["kv_bytes_removed"]
    out.print(f"{p.describe()}; {removed:.1%} of the KV bytes removed ({1 - removed:.2f} of base kept); wrote "
              f"{out_dir}")


@app.command()
@handle_errors
def heal(
    plan: Annotated[Path, typer.Option("--plan", "-p", help="plan JSON from `kvtool search`")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory to write (an export)")],
    model: ModelOpt = None,
    tokens: Annotated[str, typer.Option(help="tokens to train on, e.g. 250k or 1M (early stopping may end "
                                             "sooner); auto: 256k on a CPU, 8M on a GPU")] = "auto",
    text: Annotated[str, typer.Option(help="generated (the base model's own samples, cached under $KVTOOL_CACHE) "
                                           "or calibration (--data, default kvtool's calibration set)")] = "generated",
    train: Annotated[str, typer.Option(help="attention (consumers' q/o projections), sources (also the K/V "
                                            "projections of the layers they read), layers (consumer layers whole, "
                                            "but their unused K/V) or lora (low-rank updates of every layer's "
                                            "attention, merged at export)")] = "lora",
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 2e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="rows per step")] = 4,
    seq_len: Annotated[int, typer.Option(min=8, help="tokens per row")] = 256,
    lora_rank: Annotated[int, typer.Option(min=1, help="rank of --train lora's updates")] = 16,
    sample_batch: Annotated[int | None, typer.Option(min=1, help="rows the base samples at once while it writes "
                                                                 "the corpus (default: 128 on a CPU, 256 on a GPU)")
                            ] = None,
    data: Annotated[str | None, typer.Option(help="training text for --text calibration")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Distil the shared model toward its base on the base's own text and write it as an export."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from kvtool.heal import HealSettings
    from kvtool.heal import heal as run

    s = HealSettings(tokens=None if tokens == "auto" else parse_count(tokens), text=text, train=train, lr=lr,
                     batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, data=data, seed=seed,
                     sample_batch=sample_batch).validated()
    with Progress("[progress.description]{task.description}", BarColumn(), "{task.completed:,.0f}/{task.total:,.0f}",
                  TimeElapsedColumn(), TimeRemainingColumn(), console=out) as bar:
        tasks: dict[str, int] = {}

        def advance(name: str, done: int, total: int, desc: str) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(desc, total=total)
            bar.update(tasks[name], completed=done, total=total, description=desc)

        res = run(plan, out=out_dir, model=model, settings=s, force=force, dtype=dtype, device=device,
                  log=lambda m: bar.console.print(f"[dim]· {m}[/]"),
                  corpus_progress=lambda i, n, _eta: advance("corpus", i, n, "sampling the corpus (shards)"),
                  progress=lambda i, n, kl: advance("train", i, n, f"healing (KL {kl:.3f}, tokens)"))
    out.print(f"healed in {res['seconds']:.0f} s ({res['tokens_trained']:,} tokens at "
              f"{res['train_tokens_per_second']:.0f}/s): held-out perplexity {res['heldout_ppl_before']:.2f} → "
              f"{res['heldout_ppl_after']:.2f} (base {res['heldout_ppl_base']:.2f}); wrote {out_dir}")


@app.command()
@handle_errors
def generate(
    model_dir: Annotated[str, typer.Argument(help="an export, a model directory, a .gguf, or 'default'")],
    prompt: Annotated[str, typer.Argument(help="the prompt (the chat template is applied when there is one)")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    plan: Annotated[Path | None, typer.Option(help="apply this plan to the model on the fly")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="do not apply the chat template")] = False,
    merge_budget: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="merge the prompt KV to this share (default: the export's setting)")] = None,
    merge_method: Annotated[str | None, typer.Option(help="merge method for --merge-budget (default: kvmerger; "
                                                          "any name in kvtool.METHODS)")] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="turn off the export's prompt KV merging")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Stream a continuation of PROMPT from a (shared) model."""
    from kvtool.generate import generate as run

    merge = False if no_merge else None
    if merge_budget is not None:
        if merge_budget <= 0:
            _fail("--merge-budget must be in (0, 1]")
        merge = {"method": merge_method or "kvmerger", "budget": merge_budget}
    run(model_dir, prompt, max_new_tokens=max_new_tokens, plan=plan, sample=sample, chat=not raw, dtype=dtype,
        device=device, merge=merge, on_text=lambda t: print(t, end="", flush=True))


# The spellings `kvtool eval` had before `--set`: each sets these task options.
EVAL_ALIASES: dict[str, tuple[str, ...]] = {
    "--ppl-samples": ("ppl.samples", "fidelity.samples"),
    "--ppl-seq-len": ("ppl.seq_len", "fidelity.seq_len"),
    "--passkey-lengths": ("passkey.lengths",),
    "--speed-batch": ("memory.batch", "speed.batch"),
    "--speed-prompt": ("memory.prompt", "speed.prompt"),
    "--speed-new": ("memory.new", "speed.new"),
    "--repeats": ("memory.repeats", "speed.repeats"),
    "--merge-methods": ("merge.methods",),
    "--merge-length": ("merge.length",),
    "--merge-depths": ("merge.depths",),
    "--merge-ppl-samples": ("merge.ppl_samples",),
    "--serve-prompt": ("serve.prompt",),
    "--serve-new": ("serve.new",),
    "--serve-repeats": ("serve.repeats",),
    "--kv-cache-memory": ("engine.kv_memory",),
    "--kv-cache-dtypes": ("engine.kv_dtypes",),
    "--engine-prompt": ("engine.prompt",),
    "--engine-new": ("engine.new",),
    "--tensor-parallel-size": ("engine.tensor_parallel",),
    "--lm-eval-limit": ("lm_eval.limit",),
}


def split_eval_args(args: list[str]) -> tuple[Path | None, list[str]]:
    """The export directory and the ``--set`` items of ``kvtool eval``'s free arguments: at most one directory, and
    the ``EVAL_ALIASES`` spellings (``--repeats 3`` or ``--repeats=3``)."""
    export_dir: Path | None = None
    sets: list[str] = []
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flag, eq, value = a.partition("=")
            if flag not in EVAL_ALIASES:
                raise KvtoolError(f"kvtool eval has no option {flag} (`kvtool eval --help`; task options: "
                                  "`kvtool eval --list-options`)")
            if not eq:
                value = next(it, None)
                if value is None:
                    raise KvtoolError(f"{flag} needs a value")
            sets += [f"{k}={value}" for k in EVAL_ALIASES[flag]]
        elif export_dir is None:
            export_dir = Path(a)
        else:
            raise KvtoolError(f"one export directory at a time, got {export_dir} and {a}")
    return export_dir, sets


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """``{task: {option: text}}`` from ``--set TASK.OPTION=VALUE`` items."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, name = key.strip().partition(".")
        if not sep or not dot or not task or not name:
            raise KvtoolError(f"--set {item!r}: write TASK.OPTION=VALUE, e.g. passkey.lengths=512,1024")
        out.setdefault(task, {})[name] = value
    return out


@app.command(name="eval", context_settings={"ignore_unknown_options": True})
@handle_errors
def eval_(
    args: Annotated[list[str] | None, typer.Argument(
        metavar="EXPORT_DIR", show_default=False,
        help="a directory written by `kvtool export`; the task options' older spellings (--ppl-samples N, "
             "--repeats N, …, listed by --list-options) may stand here too")] = None,
    plan: Annotated[Path | None, typer.Option("--plan", "-p", help="evaluate this plan on its base model")] = None,
    plans: Annotated[list[Path] | None, typer.Option("--plans", help="several plans: perplexity vs KV bytes "
                                                                     "frontier (repeat the option)")] = None,
    model: ModelOpt = None,
    tasks: Annotated[str | None, typer.Option(help="comma list of tasks (default: ppl,fidelity,generate,passkey,"
                                                   "memory,speed,merge; merge runs when a budget is known); "
                                                   "--list-options lists them all")] = None,
    full: Annotated[bool, typer.Option("--full", help="the whole prompt sets and more timed rounds (several "
                                                      "minutes), not the quick defaults")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="a task option, TASK.OPTION=VALUE (repeat the "
                                                                 "option); --list-options lists them")] = None,
    list_options: Annotated[bool, typer.Option("--list-options", help="list the tasks and their options, then "
                                                                      "exit")] = False,
    data: Annotated[str | None, typer.Option(help="held-out text (default: Python's pydoc topics, held-out "
                                                  "split)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full report here")] = None,
    plots: Annotated[Path | None, typer.Option(help="directory for PNG plots")] = None,
    stats: Annotated[Path | None, typer.Option(help="calibration dir for the distance heatmap")] = None,
    merge_budget: Annotated[list[float] | None, typer.Option(
        "--merge-budget", help="compare the merge methods (KVMerger, attnmerge, H2O and StreamingLLM eviction) at "
                               "this share of the prompt KV (repeat the option; default: the plan's merge "
                               "budget)")] = None,
    kv_budget: Annotated[str | None, typer.Option(help="serve: the KV-cache memory each variant fills with its "
                                                       "largest batch, e.g. 256MiB (adds the serve task)")] = None,
    lm_eval: Annotated[str | None, typer.Option(
        "--lm-eval", help="lm-evaluation-harness tasks, comma list, run offline on both models: kvtool_pydoc_ppl, "
                          "kvtool_passkey, kvtool_pydoc_next (shipped) or any harness task whose data is in the "
                          "local Hugging Face cache; needs pip install 'kvtool[eval]'")] = None,
    engine: Annotated[str | None, typer.Option(help="'vllm': serve the export and its base in vLLM side by side "
                                                    "(KV blocks, concurrency, tokens/s, log-probabilities vs "
                                                    "kvtool.load); runs instead of --tasks")] = None,
    vllm_python: VllmPythonOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Quality, memory and speed of a shared model side by side with its base (quick by default; --full for the
    whole set)."""
    from kvtool.errors import CheckFailed
    from kvtool.evaluation.evaluate import evaluate
    from kvtool.evaluation.frontier import frontier, frontier_table
    from kvtool.evaluation.task import make_task
    from kvtool.evaluation.tasks import TASKS, default_tasks

    if list_options:
        out.print(options_table(TASKS))
        return
    export_dir, old_sets = split_eval_args(args or [])
    options = parse_sets([*old_sets, *(set_ or [])])
    task_list = list(default_tasks() if tasks is None else (t.strip() for t in tasks.split(",") if t.strip()))
    if merge_budget:
        options.setdefault("merge", {})["budgets"] = tuple(merge_budget)
        options.setdefault("serve", {})["merge_budget"] = merge_budget[0]
    if kv_budget is not None:
        options.setdefault("serve", {})["kv_budget"] = kv_budget
        task_list.append("serve")
    if lm_eval:
        options.setdefault("lm_eval", {})["tasks"] = lm_eval
        task_list.append("lm_eval")
    if engine is not None:
        if engine != "vllm":
            _fail(f"--engine {engine!r}: the engine kvtool drives is vllm")
        task_list = ["engine"]
    log = lambda m: out.print(f"[dim]· {m}[/]")  # noqa: E731
    if plans:
        ppl = make_task(TASKS["ppl"], options.get("ppl"), full)
        rep = frontier(plans, model=model, data=data, settings=ppl, plots=plots, json_out=json_out, force=force,
                       dtype=dtype, device=device, log=log)
        out.print(frontier_table(rep))
        if "plots" in rep:
            out.print(f"frontier plot: {rep['plots']['frontier']}")
        return
    try:
        rep = evaluate(export_dir, plan=plan, model=model, tasks=task_list, options=options, full=full, data=data,
                       json_out=json_out, plots=plots, stats=stats, force=force, dtype=dtype, device=device,
                       vllm_python=vllm_python, log=log)
    except CheckFailed as e:
        _print_report(e.report, json_out)
        raise
    _print_report(rep, json_out)


def _print_report(rep: dict, json_out: Path | None) -> None:
    """The side-by-side table (the tasks' rows), each task's own table and notes, and where each second went."""
    from kvtool.evaluation.tasks import TASKS

    results = {name: r for name, r in rep["tasks"].items() if name in TASKS}
    if any(TASKS[name].rows(r) for name, r in results.items()):
        out.print(report_table(rep))
    for name, r in results.items():
        table = TASKS[name].table(r)
        if table is not None:
            out.print(table)
        for line in TASKS[name].notes(r):
            out.print(line, soft_wrap=True, markup=False, highlight=False)
    if rep.get("seconds"):
        steps = " · ".join(f"{k} {s:.0f}" for k, s in rep["seconds"].items())
        quick = "" if rep.get("full") else " (quick settings; --full runs the whole set)"
        out.print(f"seconds: {steps} · total {rep['wall_time_s']:.0f}{quick}", highlight=False, soft_wrap=True)
    if json_out:
        out.print(f"report: {json_out}")
    for name, path in rep.get("plots", {}).items():
        out.print(f"plot ({name}): {path}")


@app.command()
@handle_errors
def serve(
    export_dir: Annotated[Path, typer.Argument(help="a directory written by `kvtool export` (or `kvtool heal`)")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="port on 127.0.0.1")] = 8000,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    kv_cache_memory: Annotated[str, typer.Option(help="KV-cache memory, e.g. 256MiB or 8GiB (per tensor-parallel "
                                                      "worker)")] = "256MiB",
    kv_cache_dtype: Annotated[str, typer.Option(help="auto (the model's dtype), fp8, fp8_e4m3 or fp8_e5m2")] = "auto",
    max_model_len: Annotated[int, typer.Option(min=16, help="longest prompt + completion, in tokens")] = 2048,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="shard the model over this many workers")] = 1,
    served_model_name: Annotated[str | None, typer.Option(help="the model name clients ask for (default: the "
                                                               "export directory's name)")] = None,
    vllm_python: VllmPythonOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="do not echo vLLM's own log")] = False,
) -> None:
    """Serve an export with vLLM's OpenAI-compatible server on 127.0.0.1, sharing on (Ctrl-C stops it)."""
    from kvtool.evaluation.serve import parse_size
    from kvtool.serving import ServeSettings
    from kvtool.serving import serve as run

    settings = ServeSettings(port=port, dtype=dtype, kv_cache_memory=parse_size(kv_cache_memory),
                             kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len,
                             tensor_parallel_size=tensor_parallel_size, served_model_name=served_model_name)

    def ready(cap: dict) -> None:
        f = lambda n: f"{n:,}"  # noqa: E731
        out.print(f"[bold]serving[/] {export_dir} as [bold]{cap['model']}[/] at {cap['url']} "
                  f"({cap['owners']} of {cap['layers']} layers hold KV; Ctrl-C stops it)", highlight=False,
                  soft_wrap=True)
        line = (f"KV cache ({cap['kv_cache_dtype']}): {f(cap['num_blocks'])} blocks × {cap['block_size']} = "
                f"{f(cap['kv_tokens'])} tokens, max concurrency {cap['max_concurrency']:.2f} at {max_model_len} "
                "tokens")
        if "base_num_blocks" in cap:
            line += (f"; the base would get {f(cap['base_num_blocks'])} blocks = {f(cap['base_kv_tokens'])} tokens, "
                     f"{cap['base_max_concurrency']:.2f} ({cap['num_blocks'] / cap['base_num_blocks']:.2f}× with "
                     f"sharing, limit {cap['layers'] / cap['owners']:.2f}×)")
        out.print(line, highlight=False, soft_wrap=True)

    echo = None if quiet else (lambda line: err.out(line.rstrip("\n"), highlight=False))
    run(export_dir, settings, python=vllm_python, on_ready=ready, echo=echo,
        log=lambda m: out.print(f"[dim]· {m}[/]"))
    out.print("stopped")


@app.command()
def doctor() -> None:
    """Print the versions in use and self-test the sharing runtime on tiny models of every supported architecture
    (a few seconds); exit 0 only if every check passes."""
    from kvtool.doctor import doctor as run
    from kvtool.doctor import environment

    for k, v in environment().items():
        out.print(f"{k:>26}  {v}", highlight=False)
    checks = run(log=lambda c: out.print(f"  {'[green]ok[/]  ' if c.ok else '[bold red]FAIL[/]'} {c.arch:<12} "
                                         f"{c.name:<20} {c.detail}", highlight=False, soft_wrap=True))
    failed = [c for c in checks if not c.ok]
    if failed:
        c = failed[0]
        _fail(f"{len(failed)} of {len(checks)} self-checks failed; first: {c.arch} {c.name}: {c.detail}", code=1)
    out.print(f"all {len(checks)} self-checks passed")


def report_table(rep: dict):
    """The base | shared | ratio table of an eval report: the ``rows`` of each task in it."""
    from rich.table import Table

    from kvtool.evaluation.tasks import TASKS

    t = Table(title=f"{rep['model']}: {rep['plan']['description']}", title_justify="left")
    for c in ("task", "metric", "base", "shared", "shared/base"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for name, result in rep["tasks"].items():
        rows = TASKS[name].rows(result) if name in TASKS else []
        for i, row in enumerate(rows):
            t.add_row(name if i == 0 else "", *row)
    return t


def options_table(tasks: dict):
    """Every task of the registry and its options (``--set TASK.OPTION=VALUE``), with the quick defaults."""
    from rich.table import Table

    from kvtool.evaluation.task import option_help

    t = Table(title="kvtool eval tasks and options (--tasks NAME,…; --set TASK.OPTION=VALUE)", title_justify="left")
    for c in ("task", "option", "default", "what"):
        t.add_column(c)
    spelled = {key: flag for flag, keys in EVAL_ALIASES.items() for key in keys}
    for name, cls in tasks.items():
        t.add_row(name + (" *" if cls.default else ""), "", "", cls.help)
        for key, default, text in option_help(cls):
            t.add_row("", key + (f" ({spelled[key]})" if key in spelled else ""), default, text)
    t.caption = "* runs by default; (--flag): the same option's older spelling"
    return t


def main() -> None:
    app(prog_name="kvtool")


if __name__ == "__main__":
    sys.exit(main())
