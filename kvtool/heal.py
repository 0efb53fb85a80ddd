"""``kvtool heal``: distil the shared model toward its base on the base's own text, and write it as an export.

Text: by default the base model's own samples (``kvtool.calibration.corpus``: plain and chat-template prompts,
temperature 1, cached under ``$KVTOOL_CACHE``), whose top-k next-token distributions were kept when they were
sampled, so training holds one model and no teacher pass. ``text="calibration"`` distils on calibration chunks
instead (teacher outputs computed once, before training). Loss: KL(base || shared) over the teacher's top-k tokens
at every real token. Budget: ``tokens`` trained; early stopping watches the KL on a validation split of the same
kind of text (never the held-out text, whose perplexity is reported before and after but decides nothing).

What trains (``train``):
- ``attention`` (default): the consumers' query and output projections (and q-norm), the weights that see the
  borrowed K/V. Every owner layer stays exactly the base's.
- ``sources``: also the K/V projections of the owner layers that consumers read (the whole qkv_proj where fused).
- ``layers``: the consumer layers whole (MLPs and norms too), but their unused K/V.
- ``lora``: low-rank updates of rank ``lora_rank`` on the q/k/v/o projections of every layer (a consumer's q/o
  only), owners included, merged into the weights before export, so the export stays a plain checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.atomic import check_writable_dir
from kvtool.calibration.corpus import Corpus, CorpusSettings, generated_corpus
from kvtool.crosslayer.archs import arch_of, decoder_layers, kv_param_names
from kvtool.crosslayer.runtime import apply_sharing
from kvtool.data.texts import heldout_chunks, load_chunks
from kvtool.errors import KvtoolError
from kvtool.formats.heal_settings import TRAIN_TARGETS, HealSettings, check_train
from kvtool.formats.plan import SharingPlan
from kvtool.formats.recipe import Recipe
from kvtool.io.devices import model_device
from kvtool.io.export import export
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import model_and_tokenizer
from kvtool.metrics import perplexity
from kvtool.progress import Log, silent

__all__ = ["TRAIN_TARGETS", "HealSettings", "heal", "trainable_parameters", "topk_kl", "for_device"]

def corpus_settings(s: HealSettings, rows: int) -> CorpusSettings:
    """The generated corpus a heal with ``s`` (resolved for its device, ``for_device``) distils on, ``rows`` rows."""
    return CorpusSettings(rows=rows, seq_len=s.seq_len, top_k=s.top_k, chat_share=s.chat_share,
                          batch_size=s.sample_batch or CorpusSettings.batch_size, seed=s.seed).validated()


# The default budget per device type. CPU: the heal curve's 250k tokens (LoRA: 1.74× → 1.22× base perplexity on
# SmolLM2's 30% map; ~17 min of training on 2 cores, once the corpus is cached). CUDA: the curve had not flattened
# at 250k, and a GPU trains and samples 8M tokens in minutes (an extrapolation: no GPU run was measured).
DEFAULT_TOKENS = {"cpu": 256_000, "cuda": 8_000_000}
# Rows the base samples at once (one corpus shard) per device type. CPU: 128 rows sampled SmolLM2's corpus 1.26×
# as fast as 32 (bench/corpus_speed.py, docs/RESULTS.md); CUDA: more rows fill a GPU (not measured).
DEFAULT_SAMPLE_BATCH = {"cpu": 128, "cuda": 256}


def for_device(s: HealSettings, device: torch.device) -> HealSettings:
    """``s`` with its token budget and sampling batch: its own, or the defaults for ``device``'s type."""
    kind = device.type if device.type in DEFAULT_TOKENS else "cpu"
    return replace(s, tokens=s.tokens if s.tokens is not None else DEFAULT_TOKENS[kind],
                   sample_batch=s.sample_batch if s.sample_batch is not None else DEFAULT_SAMPLE_BATCH[kind])


def trainable_parameters(model: nn.Module, plan: SharingPlan, train: str = "attention") -> list[nn.Parameter]:
    """The q_proj / o_proj / q_norm weights of every layer that reads keys or values elsewhere (the Q rows of a fused
    qkv_proj count as q_proj); with ``train="layers"`` every other weight of those layers too, except the K/V
    projections they never use; with ``train="sources"`` also the K/V projections (and k-norm) of the layers read.
    (``lora`` trains adapters, see ``LoRA``.)"""
    check_train(train)
    params: list[nn.Parameter] = []
    for j in plan.readers:
        layer = decoder_layers(model)[j]
        attn = layer.self_attn
        for name in ("q_proj", "qkv_proj", "o_proj", "q_norm"):
            mod = getattr(attn, name, None)
            if isinstance(mod, nn.Module):
                params += list(mod.parameters())
        if train == "layers":
            params += [p for n, p in layer.named_parameters() if not n.startswith("self_attn.")]
    if train == "sources":
        named = dict(model.named_parameters())
        for i in plan.sources:
            if arch_of(model)["fused"]:  # K/V rows cannot be trained apart from the Q rows of one qkv_proj
                params += list(decoder_layers(model)[i].self_attn.qkv_proj.parameters())
            else:
                params += [named[n] for n in kv_param_names(model, i)]
    return list({id(p): p for p in params}.values())


class LoRA:
    """Rank-``r`` updates ``W + B·A`` on the attention projections of every layer, as forward hooks (the model's
    modules stay as they are); ``merge()`` folds them into the weights and removes the hooks."""

    def __init__(self, model: nn.Module, plan: SharingPlan, rank: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        readers = set(plan.readers)
        self.pairs: list[tuple[nn.Linear, nn.Parameter, nn.Parameter]] = []
        self.hooks = []
        for j, layer in enumerate(decoder_layers(model)):
            attn = layer.self_attn
            names = ("q_proj", "o_proj") if j in readers else ("q_proj", "k_proj", "v_proj", "o_proj")
            if arch_of(model)["fused"]:
                names = ("qkv_proj", "o_proj")
            for name in names:
                lin = getattr(attn, name, None)
                if not isinstance(lin, nn.Linear):
                    continue
                w = lin.weight
                a = nn.Parameter((torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])).to(w))
                b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))
                self.pairs.append((lin, a, b))
                self.hooks.append(lin.register_forward_hook(_lora_hook(a, b)))
        if not self.pairs:
            raise KvtoolError("LoRA found no attention projections (nn.Linear) to adapt in this model")

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.pairs for p in (a, b)]

    @torch.no_grad()
    def merge(self) -> None:
        for lin, a, b in self.pairs:
            lin.weight += (b.float() @ a.float()).to(lin.weight.dtype)
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _lora_hook(a: nn.Parameter, b: nn.Parameter):
    def hook(_mod, args, out):
        return out + (args[0] @ a.t()) @ b.t()
    return hook


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor, top_k: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Top-k token ids and renormalised log-probabilities of the base model at every position of ``ids``."""
    dev = model_device(model)
    tops, logps = [], []
    for s in range(0, ids.shape[0], batch_size):
        lp = torch.log_softmax(model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False).logits.float(), -1)
        v, i = lp.topk(top_k, dim=-1)
        tops.append(i.cpu())
        logps.append(torch.log_softmax(v, -1).cpu())
    return torch.cat(tops), torch.cat(logps)


def topk_kl(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, top: torch.Tensor, logp: torch.Tensor
            ) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) over the teacher's top-k tokens, the student renormalised
    over the same tokens. Only those k logits are computed (the LM head's rows for them), not the whole vocabulary."""
    h = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    w = model.get_output_embeddings().weight[top]  # (B, T, k, d)
    logits = torch.einsum("btd,btkd->btk", h, w).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    student = torch.log_softmax(logits, -1)
    per_token = (logp.exp() * (logp - student)).sum(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


def heal_corpus(model: nn.Module, tokenizer, s: HealSettings, *, log: Log | None = None,
                progress: Callable[[int, int, float], None] | None = None) -> tuple[Corpus, Corpus]:
    """Training and validation rows for ``s`` (the base model, unshared). Generated text: the validation rows are
    the first ``val_rows / 2`` of each of the corpus' first two shards (one plain, one chat where the model has a
    chat template); training takes the rest, as many rows as the token budget needs (at most one pass)."""
    if s.text == "calibration":
        need = math.ceil(s.tokens / s.seq_len)
        chunks = load_chunks(s.data, tokenizer, need + s.val_rows, s.seq_len, seed=s.seed + 17).input_ids
        top, logp = teacher_targets(model, chunks, s.top_k, s.batch_size)
        full = Corpus(chunks, torch.ones_like(chunks), top, logp, Path(), None)
        return full.rows(slice(0, chunks.shape[0] - s.val_rows)), full.rows(slice(chunks.shape[0] - s.val_rows, None))
    per_shard = corpus_settings(s, 1).batch_size
    if s.val_rows > 2 * per_shard:
        raise KvtoolError(f"at most {2 * per_shard} validation rows")
    rows = math.ceil(s.tokens / s.seq_len) + s.val_rows
    corpus = generated_corpus(model, tokenizer, corpus_settings(s, max(rows, 2 * per_shard)), log=log,
                              progress=progress)
    half = s.val_rows // 2
    val_idx = torch.tensor([*range(half), *range(per_shard, per_shard + s.val_rows - half)])
    keep = torch.ones(corpus.ids.shape[0], dtype=torch.bool)
    keep[val_idx] = False
    train_idx = torch.nonzero(keep)[:, 0]
    pick = _index(corpus, train_idx)
    return pick, _index(corpus, val_idx)


def _index(c: Corpus, idx: torch.Tensor) -> Corpus:
    return Corpus(c.ids[idx], c.mask[idx], c.top[idx], c.logp[idx], c.directory, c.tokens_per_second)


def _on(c: Corpus, idx: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, ...]:
    return c.ids[idx].to(dev), c.mask[idx].to(dev), c.top[idx].to(dev), c.logp[idx].to(dev).float()


@torch.no_grad()
def validation_kl(model: nn.Module, val: Corpus, batch_size: int) -> float:
    """The top-k KL on ``val``, weighted by real tokens (model in eval mode)."""
    model.eval()
    dev, total, n = model_device(model), 0.0, 0
    for k in range(0, val.ids.shape[0], batch_size):
        ids, mask, top, logp = _on(val, torch.arange(k, min(k + batch_size, val.ids.shape[0])), dev)
        w = int(mask.sum())
        total, n = total + float(topk_kl(model, ids, mask, top, logp)) * w, n + w
    return total / n


@dataclass
class Distilled:
    """What a training run did: steps, tokens, where it stopped early (``None``: it ran its budget), the best
    validation KL, the per-evaluation history, the ``checkpoint`` results and the training seconds."""

    steps: int
    tokens: int
    early_stop_at: int | None
    best_val: float
    history: list[dict[str, Any]]
    curve: list[dict[str, Any]]
    seconds: float


def distil(model: nn.Module, params: list[nn.Parameter], train: Corpus, val: Corpus, s: HealSettings,
           start_val: float, *, log: Log = silent, progress: Callable[[int, int, float], None] | None = None,
           checkpoint: Callable[[int, nn.Module], dict[str, Any]] | None = None,
           checkpoints: tuple[int, ...] = ()) -> Distilled:
    """Train ``params`` toward the teacher's top-k on ``train`` (AdamW, warm-up then ``s.schedule``) for
    ``s.tokens`` tokens, evaluating on ``val`` every ``s.eval_every`` and stopping after ``s.patience`` evaluations
    without improvement; the best parameters found are left in place, not trainable."""
    dev = model_device(model)
    best_val, best_state = start_val, [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    steps = math.ceil(s.tokens / (s.batch_size * s.seq_len))

    def lr_at(i: int) -> float:
        warm = min(1.0, (i + 1) / 10)
        return warm if s.schedule == "constant" else warm * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = torch.randperm(train.ids.shape[0], generator=torch.Generator().manual_seed(s.seed))
    bad, step, seen, next_eval, history, curve = 0, 0, 0, s.eval_every, [], []
    pending = sorted(c for c in checkpoints if c > 0)
    t0, stopped = time.time(), None
    while seen < s.tokens:
        k = step * s.batch_size % order.numel()
        step += 1
        model.train()
        ids, mask, top, logp = _on(train, order[k : k + s.batch_size], dev)
        loss = topk_kl(model, ids, mask, top, logp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        seen += int(mask.sum())
        loss_value = loss.item()
        if progress:
            progress(min(seen, s.tokens), s.tokens, loss_value)
        if pending and seen >= pending[0] and checkpoint:
            model.eval()
            while pending and seen >= pending[0]:
                pending.pop(0)
            curve.append({"tokens": seen, **checkpoint(seen, model)})
        if seen >= next_eval or seen >= s.tokens:
            next_eval += s.eval_every
            v = validation_kl(model, val, s.batch_size)
            history.append({"step": step, "tokens": seen, "train_kl": round(loss_value, 5), "val_kl": round(v, 5)})
            if v < best_val - 1e-5:
                best_val, bad = v, 0
                best_state = [p.detach().clone() for p in params]
            else:
                bad += 1
                if bad >= s.patience:
                    stopped = seen
                    log(f"early stop after {seen:,} tokens: validation KL stopped improving")
                    break
    seconds = time.time() - t0
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
            p.requires_grad_(False)
    model.eval()
    return Distilled(step, seen, stopped, best_val, history, curve, seconds)


def heal(
    plan: SharingPlan | str | Path,
    *,
    out: str | Path,
    model=None,
    tokenizer=None,
    settings: HealSettings | None = None,
    force: bool = False,
    dtype: str | None = None,
    device: str | None = None,
    log: Log | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    corpus_progress: Callable[[int, int, float], None] | None = None,
    checkpoint: Callable[[int, nn.Module], dict[str, Any]] | None = None,
    checkpoints: tuple[int, ...] = (),
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Distil the shared model toward its base and write it as an export directory (``kvtool.load(out)``).
    ``progress(tokens, budget, kl)`` per step; ``checkpoint(tokens, model)`` is called (model in eval mode, adapters
    in effect) when the tokens trained pass each of ``checkpoints``; what it returns goes into the result's
    ``curve``. ``recipe``: how the plan was made (default: what its details record); the export's recipe is it
    with these heal settings. Returns the heal record that the export's sidecar keeps, with the settings."""
    s = (settings or HealSettings()).validated()
    say = log or silent
    check_writable_dir(out, force)
    if not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    if not plan.readers:
        raise KvtoolError("the plan has no consumer layers: nothing to heal")
    model, tokenizer = model_and_tokenizer(model, tokenizer, fallback=plan.model_source, dtype=dtype,
                                           device=device, what="heal")
    base_fp = model_fingerprint(model)
    check_fingerprint(plan.model_fingerprint, base_fp, "the plan", "pass the --model it was searched on")
    s = for_device(s, model_device(model))
    t0 = time.time()
    train, val = heal_corpus(model, tokenizer, s, log=say, progress=corpus_progress)
    heldout = heldout_chunks(tokenizer).input_ids
    base_ppl, _ = perplexity(model, heldout)
    apply_sharing(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoRA(model, plan, s.lora_rank, s.seed) if s.train == "lora" else None
    params = lora.parameters() if lora else trainable_parameters(model, plan, s.train)
    for p in params:
        p.requires_grad_(True)
    before_ppl, _ = perplexity(model, heldout)
    start_val = validation_kl(model, val, s.batch_size)
    say(f"held-out perplexity: base {base_ppl:.2f}, shared before healing {before_ppl:.2f}; validation KL "
        f"{start_val:.4f}; training {sum(p.numel() for p in params):,} parameters ({s.train}) on "
        f"{train.tokens:,} tokens of {s.text} text, budget {s.tokens:,}")
    run = distil(model, params, train, val, s, start_val, log=say, progress=progress, checkpoint=checkpoint,
                 checkpoints=checkpoints)
    if lora:
        lora.merge()
    after_ppl, _ = perplexity(model, heldout)
    result = {"steps_run": run.steps, "tokens_trained": run.tokens, "early_stop_at": run.early_stop_at,
              "trained_parameters": sum(p.numel() for p in params), "trained": s.train,
              "val_kl_before": round(start_val, 5), "val_kl_after": round(run.best_val, 5),
              "heldout_ppl_base": round(base_ppl, 4), "heldout_ppl_before": round(before_ppl, 4),
              "heldout_ppl_after": round(after_ppl, 4), "history": run.history, "curve": run.curve,
              "train_tokens_per_second": round(run.tokens / max(run.seconds, 1e-9), 1),
              "corpus_tokens_per_second": None if train.tokens_per_second is None
              else round(train.tokens_per_second, 1),
              "seconds": round(time.time() - t0, 1)}
    say(f"held-out perplexity after healing {after_ppl:.2f} (before {before_ppl:.2f}, base {base_ppl:.2f}); "
        f"trained {run.tokens:,} tokens at {result['train_tokens_per_second']:.0f} tokens/s")
    recipe = recipe or Recipe.from_plan(plan)
    export(plan, out=out, model=model, tokenizer=tokenizer, force=force, base_fingerprint=base_fp, heal=result,
           recipe=None if recipe is None else replace(recipe, heal=s))
    return {"settings": s.to_dict(), **result}
