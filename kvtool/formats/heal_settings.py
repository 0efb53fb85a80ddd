"""``HealSettings``: how ``kvtool heal`` distils a shared model toward its base (part of an export's recipe, so a
healed export replays)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvtool.errors import KvtoolError
from kvtool.formats.fields import settings_from_dict

TRAIN_TARGETS = ("attention", "sources", "layers", "lora")
TEXTS = ("generated", "calibration")
SCHEDULES = ("cosine", "constant")


@dataclass
class HealSettings:
    tokens: int | None = None  # real tokens trained (early stopping may end sooner); None: DEFAULT_TOKENS[device]
    text: str = "generated"
    lr: float = 2e-3
    batch_size: int = 4  # rows per step
    seq_len: int = 256  # tokens per row
    val_rows: int = 16
    top_k: int = 64
    train: str = "lora"  # the heal curve: 1.22× vs attention's 1.29× base perplexity at 250k tokens
    lora_rank: int = 16
    schedule: str = "cosine"  # after a 10-step warm-up: cosine to 0 at the budget, or constant
    eval_every: int = 32_768  # tokens between validation passes
    patience: int = 3
    seed: int = 0
    data: str | None = None  # the text for text="calibration" (default: kvtool's calibration set)
    chat_share: float = 0.5  # generated rows whose prompt is a chat request
    sample_batch: int | None = None  # rows the base samples at once (one corpus shard); None: by device type

    def validated(self) -> HealSettings:
        """Self, after checking the settings that would otherwise fail only after the corpus is built."""
        check_train(self.train)
        for name, value, allowed in (("text", self.text, TEXTS), ("schedule", self.schedule, SCHEDULES)):
            if value not in allowed:
                raise KvtoolError(f"unknown heal {name} {value!r}; use {', '.join(allowed)}")
        budget = 1 if self.tokens is None else self.tokens
        if self.sample_batch is not None and self.sample_batch < 1:
            raise KvtoolError("heal settings: the sampling batch must be ≥ 1 rows")
        if min(budget, self.batch_size, self.val_rows, self.eval_every, self.top_k, self.lora_rank) < 1 \
                or self.seq_len < 8 or self.lr <= 0:
            raise KvtoolError("heal settings: tokens, batch size, validation rows, eval interval, top-k and LoRA "
                              "rank must be ≥ 1, rows ≥ 8 tokens, and the learning rate > 0")
        if self.data is not None and self.text != "calibration":
            raise KvtoolError("--data is the text of --text calibration; the generated corpus draws its prompts "
                              "from kvtool's calibration set")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> HealSettings:
        if isinstance(d, dict) and "sample_batch" not in d:  # written by 0.x, which sampled 32 rows at once
            d = {**d, "sample_batch": 32}
        return settings_from_dict(cls, d, "heal settings")


def check_train(train: str) -> None:
    if train not in TRAIN_TARGETS:
        raise KvtoolError(f"unknown heal target {train!r}; use {', '.join(TRAIN_TARGETS)}")
