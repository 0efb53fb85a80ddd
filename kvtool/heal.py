"""``kvtool heal``: a brief distillation of the shared model toward its base, training only the consumer layers.

Choice (documented): by default only consumer layers are trained, so every owner layer, and so every source's K/V,
stays exactly as in the base model. ``train="attention"`` (default) trains the consumers' query and output
projections (and q-norm where the model has one), the weights that see the borrowed K/V; ``train="sources"`` also
the K/V projections of the owner layers that consumers read (the whole qkv_proj where it is fused), so a source
can serve its readers too; ``train="layers"`` trains the consumer layers whole (MLPs and norms too).
Loss: KL(base || shared) of next-token distributions over the teacher's top-k tokens (teacher log-probabilities
are computed once, before training, so no second model is held), optionally plus the MSE of the final hidden
states. Early stopping watches the KL on a validation split of the calibration chunks; the pydoc held-out
perplexity is reported before and after but never used to decide anything. ``generated=N`` adds N training chunks
sampled from the base model itself (continuations of calibration prompts), for more text than the calibration set
holds; the validation split stays calibration text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvtool.atomic import check_writable_dir
from kvtool.crosslayer.archs import arch_of, decoder_layers, kv_param_names
from kvtool.crosslayer.runtime import apply_sharing
from kvtool.data.texts import heldout_chunks, load_chunks
from kvtool.errors import KvtoolError
from kvtool.formats.plan import SharingPlan
from kvtool.io.export import export
from kvtool.io.fingerprint import check_fingerprint, model_fingerprint
from kvtool.io.loading import model_and_tokenizer
from kvtool.metrics import perplexity
from kvtool.progress import Log, silent

TRAIN_TARGETS = ("attention", "sources", "layers")


@dataclass
class HealSettings:
    steps: int = 150
    lr: float = 2e-3
    batch_size: int = 4
    samples: int = 64
    generated: int = 0
    seq_len: int = 128
    val_samples: int = 8
    top_k: int = 64
    hidden_mse: float = 0.0
    eval_every: int = 20
    patience: int = 3
    seed: int = 0
    data: str | None = None
    train: str = "attention"

    def validated(self) -> HealSettings:
        """Self, after checking the settings that would otherwise fail only after the teacher pass."""
        _check_train(self.train)
        if min(self.steps, self.batch_size, self.samples, self.val_samples, self.eval_every) < 1 or self.generated < 0:
            raise KvtoolError("heal settings: steps, batch size, samples and eval interval must be ≥ 1, "
                              "generated ≥ 0")
        return self


def _check_train(train: str) -> None:
    if train not in TRAIN_TARGETS:
        raise KvtoolError(f"unknown heal target {train!r}; use {', '.join(TRAIN_TARGETS)}")


def trainable_parameters(model: nn.Module, plan: SharingPlan, train: str = "attention") -> list[nn.Parameter]:
    """The q_proj / o_proj / q_norm weights of every layer that reads keys or values elsewhere (the Q rows of a fused
    qkv_proj count as q_proj); with ``train="layers"`` every other weight of those layers too, except the K/V
    projections they never use; with ``train="sources"`` also the K/V projections (and k-norm) of the layers read."""
    _check_train(train)
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


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor, top_k: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Top-k token ids and renormalised log-probabilities of the base model, and its final hidden states."""
    dev = next(model.parameters()).device
    tops, logps, hid = [], [], []
    for s in range(0, ids.shape[0], batch_size):
        out = model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False, output_hidden_states=True)
        lp = torch.log_softmax(out.logits.float(), -1)
        v, i = lp.topk(top_k, dim=-1)
        tops.append(i.cpu())
        logps.append(torch.log_softmax(v, -1).cpu())
        hid.append(out.hidden_states[-1].float().cpu())
    return torch.cat(tops), torch.cat(logps), torch.cat(hid)


@torch.no_grad()
def sample_chunks(model: nn.Module, tokenizer, prompts: torch.Tensor, n: int, seed: int, batch_size: int,
                  prompt_len: int = 16) -> torch.Tensor:
    """``n`` chunks as long as ``prompts``' rows, sampled from the (unshared) model after the first ``prompt_len``
    tokens of a prompt row: more distillation text than the calibration set holds, from the base's own
    distribution."""
    dev = next(model.parameters()).device
    seq_len = prompts.shape[1]
    prompt_len = min(prompt_len, seq_len - 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed + 1)
    rows = []
    for s in range(0, n, batch_size):
        p = prompts[torch.arange(s, min(n, s + batch_size)) % prompts.shape[0], :prompt_len].to(dev)
        new = seq_len - prompt_len
        out = model.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=True, temperature=1.0,
                             top_p=0.95, top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        rows.append(out[:, :seq_len].cpu())
    return torch.cat(rows)


def kl_loss(logits: torch.Tensor, top: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens, the student renormalised over the same tokens."""
    student = torch.log_softmax(logits.float().gather(-1, top), -1)
    return (logp.exp() * (logp - student)).sum(-1).mean()


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
) -> dict[str, Any]:
    """Distil the shared model toward its base and write it as an export directory (``kvtool.load(out)``)."""
    s = (settings or HealSettings()).validated()
    say = log or silent
    check_writable_dir(out, force)
    if not isinstance(plan, SharingPlan):
        plan = SharingPlan.load(plan)
    if not plan.readers:
        raise KvtoolError("the plan has no consumer layers: nothing to heal")
    model, tokenizer = model_and_tokenizer(model, tokenizer, fallback=plan.details.get("model"), dtype=dtype,
                                           device=device, what="heal")
    base_fp = model_fingerprint(model)
    check_fingerprint(plan.model_fingerprint, base_fp, "the plan", "pass the --model it was searched on")
    torch.manual_seed(s.seed)
    t0 = time.time()
    chunks = load_chunks(s.data, tokenizer, s.samples + s.val_samples, s.seq_len, seed=s.seed + 17).input_ids
    train, val = chunks[: s.samples], chunks[s.samples :]
    if s.generated:
        say(f"sampling {s.generated} chunks of {s.seq_len} tokens from the base model")
        train = torch.cat([train, sample_chunks(model, tokenizer, train, s.generated, s.seed, s.batch_size * 4)])
        chunks = torch.cat([train, val])
    heldout = heldout_chunks(tokenizer).input_ids
    say(f"teacher outputs on {chunks.shape[0]} chunks of {s.seq_len} tokens")
    top, logp, hid = teacher_targets(model, chunks, s.top_k, s.batch_size)
    base_ppl, _ = perplexity(model, heldout)
    apply_sharing(model, plan)
    params = trainable_parameters(model, plan, s.train)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    dev = next(model.parameters()).device
    orig_dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def val_kl() -> float:
        model.eval()
        total = 0.0
        for k in range(0, val.shape[0], s.batch_size):
            sl = slice(train.shape[0] + k, train.shape[0] + k + s.batch_size)
            logits = model(input_ids=val[k : k + s.batch_size].to(dev), use_cache=False).logits
            total += float(kl_loss(logits, top[sl].to(dev), logp[sl].to(dev))) * logits.shape[0]
        return total / val.shape[0]

    before_ppl, _ = perplexity(model, heldout)
    best_val = val_kl()
    start_val = best_val
    say(f"held-out perplexity: base {base_ppl:.2f}, shared before healing {before_ppl:.2f}; "
        f"validation KL {best_val:.4f}; training {sum(p.numel() for p in params):,} parameters")
    best_state = {id(p): p.detach().clone() for p in params}
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 10) *
                                              0.5 * (1 + math.cos(math.pi * min(i, s.steps) / s.steps)))
    g = torch.Generator().manual_seed(s.seed)
    bad, step, history = 0, 0, []
    for step in range(1, s.steps + 1):
        model.train()
        idx = torch.randint(0, train.shape[0], (s.batch_size,), generator=g)
        out_ = model(input_ids=train[idx].to(dev), use_cache=False, output_hidden_states=s.hidden_mse > 0)
        loss = kl_loss(out_.logits, top[idx].to(dev), logp[idx].to(dev))
        if s.hidden_mse > 0:
            loss = loss + s.hidden_mse * nn.functional.mse_loss(out_.hidden_states[-1].float(), hid[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if progress:
            progress(step, s.steps, loss_value)
        if step % s.eval_every == 0 or step == s.steps:
            v = val_kl()
            history.append({"step": step, "train_kl": round(loss_value, 5), "val_kl": round(v, 5)})
            if v < best_val - 1e-5:
                best_val, bad = v, 0
                best_state = {id(p): p.detach().clone() for p in params}
            else:
                bad += 1
                if bad >= s.patience:
                    say(f"early stop at step {step}: validation KL stopped improving")
                    break
    with torch.no_grad():
        for p in params:
            p.copy_(best_state[id(p)])
            p.requires_grad_(False)
    model.eval()
    model.to(orig_dtype)
    after_ppl, _ = perplexity(model, heldout)
    result = {"settings": asdict(s), "steps_run": step, "trained_parameters": sum(p.numel() for p in params),
              "trained": s.train, "val_kl_before": round(start_val, 5),
              "val_kl_after": round(best_val, 5), "heldout_ppl_base": round(base_ppl, 4),
              "heldout_ppl_before": round(before_ppl, 4), "heldout_ppl_after": round(after_ppl, 4),
              "history": history, "seconds": round(time.time() - t0, 1)}
    say(f"held-out perplexity after healing {after_ppl:.2f} (before {before_ppl:.2f}, base {base_ppl:.2f})")
    export(plan, out=out, model=model, tokenizer=tokenizer, force=force, base_fingerprint=base_fp, heal=result)
    return result
