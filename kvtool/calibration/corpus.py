"""The distillation corpus: text the base model samples itself, with its own top-k next-token distributions.

Rows start from varied prompts written from the calibration text (never the held-out split): plain snippets, and
requests rendered with the model's chat template. The base samples each continuation at ``temperature`` with a
fixed seed, and the log-probabilities it sampled from are kept (top-k, renormalised) as the distillation targets,
so no teacher pass is needed later. The corpus is cached once under ``$KVTOOL_CACHE/corpus/<key>/``, keyed by the
model fingerprint and every setting except the size, in shards of one batch each. Shard ``i`` depends only on
``i``, so a larger corpus extends a smaller one, and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvtool.atomic import write_failure, write_json_atomic
from kvtool.compat import cache_kwargs
from kvtool.data.chat import has_chat_template, render_messages
from kvtool.data.texts import read_texts, token_stream
from kvtool.errors import KvtoolError
from kvtool.io.devices import model_device
from kvtool.io.fingerprint import model_fingerprint
from kvtool.io.loading import cache_root
from kvtool.progress import Log, silent

FORMAT = 1
PROMPT_SOURCES = ("default", "pydoc:calib")  # calibration text only: the held-out pydoc split is never a prompt
# Requests around a calibration snippet for the chat rows (written for kvtool).
REQUESTS = (
    "Explain the following in simple words:\n\n{}",
    "Continue this text:\n\n{}",
    "Summarise the passage below in a few sentences.\n\n{}",
    "Write three questions a student might ask about this:\n\n{}",
    "What is the main idea here?\n\n{}",
    "Rewrite this for a ten-year-old:\n\n{}",
    "List the key facts in this text:\n\n{}",
    "Is anything in this passage wrong or unclear? Explain.\n\n{}",
)


@dataclass(frozen=True)
class CorpusSettings:
    """What the base samples; every field but ``rows`` is part of the cache key."""

    rows: int = 1024
    seq_len: int = 256  # tokens per row, prompt included
    prompt_tokens: int = 24  # snippet tokens a prompt starts from
    chat_share: float = 0.5  # share of rows whose prompt is a request in the chat template
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 64  # teacher tokens kept per position
    batch_size: int = 32  # rows per shard (one sampling batch)
    seed: int = 0

    def validated(self) -> CorpusSettings:
        if min(self.rows, self.batch_size, self.top_k, self.prompt_tokens) < 1 or self.seq_len <= self.prompt_tokens:
            raise KvtoolError("corpus settings: rows, batch size, top-k and prompt tokens must be ≥ 1, and a row "
                              "longer than its prompt")
        if not 0.0 <= self.chat_share <= 1.0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise KvtoolError("corpus settings: chat share in [0, 1], temperature > 0, top-p in (0, 1]")
        return self

    def key(self, fingerprint: str) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "rows"}
        blob = json.dumps({"format": FORMAT, "fingerprint": fingerprint, **d}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Corpus:
    """Rows of sampled text, left-padded per shard. ``mask`` marks real tokens; ``top``/``logp`` are the base's
    top-k next-token ids and renormalised log-probabilities at every position (meaningful where ``mask``)."""

    ids: torch.Tensor  # (N, T) int64
    mask: torch.Tensor  # (N, T) int64, 1 = real token
    top: torch.Tensor  # (N, T, k) int64
    logp: torch.Tensor  # (N, T, k) float32
    directory: Path
    tokens_per_second: float | None  # sampling speed of the shards made in this call (None: all cached)

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def rows(self, sl: slice) -> Corpus:
        return Corpus(self.ids[sl], self.mask[sl], self.top[sl], self.logp[sl], self.directory,
                      self.tokens_per_second)


def corpus_dir(fingerprint: str, settings: CorpusSettings) -> Path:
    return cache_root() / "corpus" / settings.key(fingerprint)


def generated_corpus(model: nn.Module, tokenizer, settings: CorpusSettings | None = None, *, log: Log | None = None,
                     progress: Callable[[int, int, float], None] | None = None) -> Corpus:
    """The first ``settings.rows`` rows of the model's corpus (rounded up to whole shards), sampling the shards the
    cache lacks. ``model`` must be the base (no sharing in effect). ``progress(done, total, eta_s)`` per shard."""
    s = (settings or CorpusSettings()).validated()
    say = log or silent
    vocab = model.get_output_embeddings().weight.shape[0]
    if s.top_k > vocab:
        raise KvtoolError(f"corpus top-k {s.top_k} exceeds the model's vocabulary ({vocab})")
    fp = model_fingerprint(model)
    root = corpus_dir(fp, s)
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "corpus.json", {"format": FORMAT, "fingerprint": fp,
                                                 **{k: v for k, v in asdict(s).items() if k != "rows"}})
    except OSError as e:
        raise KvtoolError(f"cannot write the corpus cache {root}: {e.strerror or e}") from e
    shards = math.ceil(s.rows / s.batch_size)
    missing = [i for i in range(shards) if not (root / _shard_name(i)).is_file()]
    rate = None
    if missing:
        say(f"sampling {len(missing)} of {shards} corpus shards ({len(missing) * s.batch_size * s.seq_len:,} tokens) "
            f"into {root}")
        prompts = _PromptSource(tokenizer, s)
        t0, made, sampled = time.time(), 0, 0
        for i in missing:
            ids, mask, top, logp = sample_shard(model, tokenizer, prompts.batch(i), s, seed=_shard_seed(s, i))
            _save_shard(root / _shard_name(i), ids, mask, top, logp)
            made += 1
            sampled += int(mask.sum())
            rate = sampled / max(time.time() - t0, 1e-9)
            if progress:
                eta = (time.time() - t0) / made * (len(missing) - made)
                progress(shards - len(missing) + made, shards, eta)
        say(f"sampled {sampled:,} tokens at {rate:.0f} tokens/s")
    parts = [load_file(root / _shard_name(i)) for i in range(shards)]
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("ids", "mask", "top", "logp")}
    return Corpus(cat["ids"].long(), cat["mask"].long(), cat["top"].long(), cat["logp"].float(), root,
                  rate).rows(slice(0, s.rows))


@torch.no_grad()
def sample_shard(model: nn.Module, tokenizer, prompts: list[list[int]], s: CorpusSettings, seed: int
                 ) -> tuple[torch.Tensor, ...]:
    """One batch: left-padded prompts, continued by sampling to ``s.seq_len`` tokens; the top-k of the distribution
    each token was sampled from (and of the prompt's own next tokens) are the targets."""
    from transformers import DynamicCache

    dev = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    if width >= s.seq_len:
        raise KvtoolError(f"a corpus prompt has {width} tokens, not fewer than a row's {s.seq_len}: use longer "
                          "rows (--seq-len)")
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache)).logits
    tops, logps = [], []
    for _ in range(s.seq_len - width):
        top, logp, last = _targets(logits, s.top_k)
        tops.append(top)
        logps.append(logp)
        nxt = _sample(last, s.temperature, s.top_p, gen)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        if ids.shape[1] == s.seq_len:
            break
        logits = model(input_ids=nxt[:, None], attention_mask=mask, use_cache=True,
                       **cache_kwargs(model, cache)).logits
    # targets at every position: the prefill's for the prompt, one per sampled token after it (the last row
    # position's target comes from the final step's logits)
    logits = model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **cache_kwargs(model, cache)).logits
    top, logp, _ = _targets(logits, s.top_k)
    top = torch.cat([tops[0], *[t[:, -1:] for t in tops[1:]], top], 1)
    logp = torch.cat([logps[0], *[t[:, -1:] for t in logps[1:]], logp], 1)
    return ids.cpu(), mask.cpu(), top.cpu(), logp.cpu()


def _targets(logits: torch.Tensor, k: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` token ids and their renormalised log-probabilities at every position of ``logits`` (B, T, V),
    and the last position's full log-probabilities, ``rows`` rows at a time: a prefill's float32 log-softmax over
    the vocabulary would otherwise hold another copy of every prompt position's logits at once."""
    tops, logps = [], []
    for r in range(0, logits.shape[0], rows):
        lp = torch.log_softmax(logits[r : r + rows].float(), -1)
        v, i = lp.topk(k, dim=-1)
        tops.append(i)
        logps.append(torch.log_softmax(v, -1))
    return torch.cat(tops), torch.cat(logps), torch.log_softmax(logits[:, -1].float(), -1)


def _sample(logp: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logp / temperature, -1)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest set reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        choice = torch.multinomial(sp, 1, generator=gen)
        return si.gather(-1, choice)[:, 0]
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


class _PromptSource:
    """Prompts for shard ``i``: snippets of the calibration text (plain), or requests around them (chat)."""

    def __init__(self, tokenizer, s: CorpusSettings) -> None:
        self.tok, self.s = tokenizer, s
        self.stream = torch.tensor(token_stream([t for src in PROMPT_SOURCES for t in read_texts(src)], tokenizer))
        if len(self.stream) < 4 * s.prompt_tokens:
            raise KvtoolError("the calibration text is too short to draw corpus prompts from")
        self.chat = has_chat_template(tokenizer)

    def is_chat(self, i: int) -> bool:
        share = self.s.chat_share if self.chat else 0.0
        return math.floor((i + 1) * share) > math.floor(i * share)

    def batch(self, i: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(_shard_seed(self.s, i) + 1)
        n = self.s.prompt_tokens
        starts = torch.randint(0, len(self.stream) - n, (self.s.batch_size,), generator=g).tolist()
        snippets = [self.stream[a : a + n].tolist() for a in starts]
        if not self.is_chat(i):
            return snippets
        rows = []
        for snip in snippets:
            req = REQUESTS[int(torch.randint(0, len(REQUESTS), (1,), generator=g))]
            text = render_messages(self.tok, [{"role": "user", "content": req.format(self.tok.decode(snip).strip())}],
                                   generation_prompt=True)
            rows.append(self.tok(text, add_special_tokens=False).input_ids)
        return rows


def _shard_seed(s: CorpusSettings, i: int) -> int:
    return s.seed * 1_000_003 + i


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _save_shard(path: Path, ids, mask, top, logp) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        save_file({"ids": ids.int().contiguous(), "mask": mask.to(torch.uint8).contiguous(),
                   "top": top.int().contiguous(), "logp": logp.half().contiguous()}, str(tmp))
        tmp.replace(path)
    except BaseException as e:  # safetensors' writer raises its own SafetensorError on a full disk
        tmp.unlink(missing_ok=True)
        err = write_failure(path, e)
        if err is e:
            raise
        raise err from e
