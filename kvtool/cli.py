"""The ``kvtool`` command line: option parsing and printing only; the work is done by the library."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kvtool import __version__
from kvtool.errors import KvtoolError

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
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as e:
            _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))

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
    samples: Annotated[int, typer.Option(min=1, help="number of token chunks")] = 32,
    seq_len: Annotated[int, typer.Option(min=2, help="tokens per chunk")] = 128,
    seed: Annotated[int, typer.Option(help="which chunks are picked")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Collect per-layer KV statistics (averaged K/V, layer distances, key similarity, baseline outputs)."""
    from kvtool.calibrate import calibrate as run

    stats = run(model, data=data, samples=samples, seq_len=seq_len, seed=seed, out=out_dir, force=force,
                dtype=dtype, device=device, batch_size=batch_size, show_progress=True)
    m = stats.meta
    out.print(f"calibrated [bold]{m['model_name']}[/]: {m['num_layers']} layers, {m['samples']}×{m['seq_len']} "
              f"tokens from {m['data']} in {m['wall_time_s']:.1f} s")
    out.print(f"wrote {out_dir}/stats.safetensors, calibration.json, distance_heatmap.png "
              f"({m['num_layers']}×{m['num_layers']} distance matrices)")


def _not_yet(name: str) -> None:
    _fail(f"`kvtool {name}` is not yet available in this version", 2)


@app.command()
@handle_errors
def search(
    stats: Annotated[Path, typer.Option("--stats", "-s", help="directory written by `kvtool calibrate`")],
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="plan JSON to write")] = None,
    target: Annotated[float | None, typer.Option(help="fraction of layers that stop storing KV")] = 0.3,
    layers: Annotated[int | None, typer.Option(help="number of consumer layers (instead of --target)")] = None,
    threshold: Annotated[float | None, typer.Option(help="accept a pair if cosine >= T (default 0.5) "
                                                         "or KL <= T nats (default 0.5)")] = None,
    order: Annotated[str, typer.Option(help="dissimilar (KVSharer), similar or random")] = "dissimilar",
    distance: Annotated[str, typer.Option(help="euclidean (paper), kvsharer (official code) or cosine")] = "euclidean",
    validate: Annotated[str, typer.Option(help="cosine (paper) or kl")] = "cosine",
    layout: Annotated[str | None, typer.Option(help="fixed layout instead of a search: adjacent, tail, "
                                                    "grouped")] = None,
    group_size: Annotated[int, typer.Option(help="layers per group for --layout grouped")] = 4,
    seed: Annotated[int, typer.Option(help="seed for --order random")] = 0,
    merge_budget: Annotated[float | None, typer.Option(help="also record KVMerger thresholds for this budget "
                                                            "(fraction of prompt KV kept)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="fail if the target is not reached")] = False,
    compare_: Annotated[bool, typer.Option("--compare", help="run every order and layout at --target and "
                                                            "print one table")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="with --compare: write the table as JSON")] = None,
    model: ModelOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Find a sharing map: KVSharer's greedy search (or a fixed layout) validated on the calibration set."""
    from kvtool.search import search as run

    if compare_:
        _compare(stats, target, layers, threshold, seed, model, dtype, device, json_out, force)
        return
    if out_path is None:
        _fail("give --out plan.json (or --compare)")

    def on_try(r: dict) -> None:
        mark = "[green]kept[/]" if r["accepted"] else "[red]rejected[/]"
        out.print(f"  {r['j']:>3} ← {r['source']:<3} score {r['score']:.4f} {mark}", highlight=False)

    res = run(stats, model=model, target=target, layers=layers, threshold=threshold, order=order,
              distance=distance, validate=validate, seed=seed, layout=layout, group_size=group_size, strict=strict,
              merge_budget=merge_budget, out=out_path, force=force, dtype=dtype, device=device, on_try=on_try,
              warn=lambda m: err.print(f"[yellow]warning:[/] {m}"))
    p = res.plan
    score = "" if p.score is None else f", final score {p.score:.4f}"
    tried = f" after {len(res.tries)} pairs" if res.tries else ""
    out.print(f"{p.describe()}{tried}{score}; KV kept {p.kv_fraction:.2f} of base, {res.seconds:.1f} s")
    out.print(f"wrote {out_path}")


def _compare(stats, target, layers, threshold, seed, model, dtype, device, json_out, force) -> None:
    from rich.table import Table

    from kvtool.atomic import check_writable_file, write_json_atomic
    from kvtool.calibrate import CalibrationStats
    from kvtool.compare import compare, rank_correlation, rows_as_dicts
    from kvtool.loading import load
    from kvtool.search import num_consumers

    if json_out is not None:
        check_writable_file(json_out, force)
    st = CalibrationStats.load(stats)
    m, tok = load(model if model is not None else st.meta.get("model"), dtype=dtype, device=device)
    if layers is not None:
        target = num_consumers(st.num_layers, None, layers) / st.num_layers
    rows = compare(st, m, tok, target, seed=seed, threshold=threshold, log=lambda s: out.print(f"  {s}"))
    base = rows[0].heldout_ppl
    t = Table(title=f"{st.meta['model_name']}: sharing maps at target {target:g} (held-out pydoc perplexity)")
    for c in ("map", "consumers", "calib cosine", "calib KL", "held-out ppl", "× base", "search s"):
        t.add_column(c, justify="left" if c == "map" else "right")
    for r in rows:
        t.add_row(r.name, str(r.consumers), f"{r.calib_cosine:.4f}", f"{r.calib_kl:.4f}", f"{r.heldout_ppl:.2f}",
                  f"{r.heldout_ppl / base:.2f}", f"{r.search_s:.1f}")
    out.print(t)
    corr = rank_correlation(rows[1:])
    out.print(f"Spearman correlation with held-out perplexity over these maps: 1 - cosine {corr['cosine']:+.2f}, "
              f"KL {corr['kl']:+.2f}")
    if json_out is not None:
        write_json_atomic(json_out, {"target": target, "rows": rows_as_dicts(rows), "spearman": corr})
        out.print(f"wrote {json_out}")


@app.command()
@handle_errors
def export(
    plan: Annotated[Path, typer.Option("--plan", "-p", help="plan JSON from `kvtool search`")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="directory to write")],
    model: ModelOpt = None,
    dtype: Annotated[str | None, typer.Option(help="save weights as float32, bfloat16 or float16")] = None,
    max_shard_size: Annotated[str, typer.Option(help="shard the safetensors above this size")] = "2GB",
    force: ForceOpt = False,
) -> None:
    """Write a checkpoint + kvtool.json that loads with sharing on (kvtool.load, or transformers with
    trust_remote_code=True)."""
    from kvtool.export import export as run

    path = run(plan, out=out_dir, model=model, dtype=dtype, max_shard_size=max_shard_size, force=force)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out.print(f"exported to {path} ({size / 2**20:.1f} MiB of weights); load it with kvtool.load({str(path)!r}) "
              "or transformers with trust_remote_code=True")


@app.command()
@handle_errors
def generate(
    model_dir: Annotated[str, typer.Argument(help="an export, a model directory, a .gguf, or 'default'")],
    prompt: Annotated[str, typer.Argument(help="the prompt (the chat template is applied when there is one)")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    plan: Annotated[Path | None, typer.Option(help="apply this plan to the model on the fly")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="do not apply the chat template")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Stream a continuation of PROMPT from a (shared) model."""
    from kvtool.generation import stream

    stream(model_dir, prompt, max_new_tokens=max_new_tokens, plan=plan, sample=sample, chat=not raw, dtype=dtype,
           device=device)


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_() -> None:
    """Quality, memory and speed of a shared model side by side with its base."""
    _not_yet("eval")


def main() -> None:
    app(prog_name="kvtool")


if __name__ == "__main__":
    sys.exit(main())
