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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def search() -> None:
    """Find a sharing map (KVSharer greedy search, orders and fixed layouts)."""
    _not_yet("search")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export() -> None:
    """Write a checkpoint + kvtool.json that loads with sharing on."""
    _not_yet("export")


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def eval_() -> None:
    """Quality, memory and speed of a shared model side by side with its base."""
    _not_yet("eval")


def main() -> None:
    app(prog_name="kvtool")


if __name__ == "__main__":
    sys.exit(main())
