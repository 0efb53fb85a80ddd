"""A cache layer that holds a compressed prompt (merged or evicted entries) followed by the decoded tokens.

After prefill, every later query of a full-attention layer may see every prompt token, except left padding. So the
only masking a compressed prompt needs is which of its entries are padding; merging and eviction keep those
leading and the same count in each head of a batch row (``pad_entries``), and ``attention_mask`` rebuilds the
mask columns for the compressed entries from that. ``get_seq_length`` counts positions seen, not entries stored,
so position ids, RoPE and the mask sizes transformers derives from it stay those of the uncompressed sequence.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class CompressedLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen = 0  # positions this layer has been given
        self.prompt_len: int | None = None  # positions covered by the compressed prompt, once compressed
        self.pad_entries: torch.Tensor | None = None  # [B] leading padded entries of the compressed prompt

    @property
    def compressed(self) -> bool:
        return self.prompt_len is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.seen += key_states.shape[-2]
        return out

    def get_seq_length(self) -> int:
        return self.seen

    def compress(self, keys: torch.Tensor, values: torch.Tensor, pad_entries: torch.Tensor) -> None:
        """Replace the stored prompt (all of this layer's entries so far) with its compressed form."""
        self.prompt_len = self.seen
        self.keys, self.values, self.pad_entries = keys.contiguous(), values.contiguous(), pad_entries

    def prompt_entries(self) -> int:
        return self.keys.shape[-2] - (self.seen - self.prompt_len)

    def attention_mask(self, mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
        """The mask over ``kv_len`` attended entries, from the mask transformers built over positions
        ([B or 1, 1|H, q, positions]); unchanged when they are the uncompressed positions (a consumer's prefill)."""
        if mask is None or not self.compressed or mask.shape[-1] == kv_len:
            return mask
        T, n = self.prompt_len, self.prompt_entries()
        B = self.pad_entries.shape[0]
        mask = mask.expand(B, *mask.shape[1:])
        # padded entries read position 0 (padding, when the row has any); the rest read the last prompt position
        src = torch.where(torch.arange(n, device=mask.device)[None] < self.pad_entries[:, None].to(mask.device),
                          0, T - 1)
        head = mask[..., :T].gather(-1, src[:, None, None, :].expand(B, *mask.shape[1:3], n))
        return torch.cat([head, mask[..., T:]], dim=-1)

    def reset(self) -> None:
        super().reset()
        self.seen, self.prompt_len, self.pad_entries = 0, None, None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a compressed KV cache cannot be cropped (assisted decoding is not supported with merging)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.pad_entries is not None:
            self.pad_entries = self.pad_entries.index_select(0, beam_idx.to(self.pad_entries.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.pad_entries is not None:
            self.pad_entries = self.pad_entries.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.pad_entries is not None:
            self.pad_entries = self.pad_entries[indices]
