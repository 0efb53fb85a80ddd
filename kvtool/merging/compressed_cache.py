"""A cache layer that holds a compressed prompt (merged or evicted entries) followed by the decoded tokens.

After prefill, every later query of a full-attention layer may see every prompt token, except left padding. So the
only masking a compressed prompt needs is which of its entries are padding; merging and eviction keep those
leading and the same count in each head of a batch row (``pad_entries``), and ``attention_mask`` rebuilds the
mask columns for the compressed entries from that. ``get_seq_length`` counts positions seen, not entries stored,
so position ids, RoPE and the mask sizes transformers derives from it stay those of the uncompressed sequence.
The layer carries everything its mask needs (``prompt_len``, ``pad_entries``, ``log_sizes``), so the sharing
runtime's attention forward remaps the mask from it (``kvtool_attention_mask``) whether or not merging is still
on. A forward that would not remap it (transformers' own, once kvtool's runtime is removed) is refused in
``update`` with a clear error instead of failing on a mask of the wrong size.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from kvtool.errors import KvtoolError


class CompressedLayer(DynamicLayer):
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen = 0  # positions this layer has been given
        self.prompt_len: int | None = None  # positions covered by the compressed prompt, once compressed
        self.pad_entries: torch.Tensor | None = None  # [B] leading padded entries of the compressed prompt
        self.log_sizes: torch.Tensor | None = None  # [B, H, entries] log of the tokens merged into each entry

    @property
    def compressed(self) -> bool:
        return self.prompt_len is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kvtool_runtime: bool = False,
               **kwargs):
        if self.compressed and not kvtool_runtime:
            raise KvtoolError("this KV cache holds a prompt compressed by kvtool, and the model no longer runs "
                              "kvtool's attention: decode it inside `kvtool.merge(...)` or after "
                              "`kvtool.apply_merge(model, ...)`")
        out = super().update(key_states, value_states, *args, **kwargs)
        self.seen += key_states.shape[-2]
        return out

    def get_seq_length(self) -> int:
        return self.seen

    def compress(self, keys: torch.Tensor, values: torch.Tensor, pad_entries: torch.Tensor,
                 sizes: torch.Tensor | None = None) -> None:
        """Replace the stored prompt (all of this layer's entries so far) with its compressed form; ``sizes``
        [B, H, entries] (tokens per merged entry) turns on size-weighted attention."""
        self.prompt_len = self.seen
        self.keys, self.values, self.pad_entries = keys.contiguous(), values.contiguous(), pad_entries
        self.log_sizes = None if sizes is None else sizes.to(keys.dtype).log()

    def prompt_entries(self) -> int:
        return self.keys.shape[-2] - (self.seen - self.prompt_len)

    def kvtool_attention_mask(self, mask: torch.Tensor | None, kv_len: int, q_heads: int, q_len: int,
                       dtype: torch.dtype) -> torch.Tensor | None:
        """The mask over ``kv_len`` attended entries, from the mask transformers built over positions
        ([B or 1, 1|H, q, positions]); unchanged when they are the uncompressed positions (a consumer's prefill).
        With merged sizes, an entry of m tokens gets + log m on its logits (so a merged run keeps the attention
        mass its tokens had together), and the mask becomes additive and per head."""
        if not self.compressed or (mask is not None and mask.shape[-1] == kv_len):
            return mask
        if mask is not None:
            mask = self._gather(mask)
        if self.log_sizes is None:
            return mask
        B, H, n = self.log_sizes.shape
        low = torch.finfo(dtype).min
        if mask is None:
            add = torch.zeros(B, 1, q_len, kv_len, dtype=dtype, device=self.keys.device)
        elif mask.dtype == torch.bool:
            add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, low)
        else:
            add = mask.to(dtype)
        add = add.expand(B, q_heads, q_len, kv_len).clone()
        add[..., :n] += self.log_sizes.repeat_interleave(q_heads // H, dim=1)[:, :, None, :]
        return add.clamp_min(low)

    def _gather(self, mask: torch.Tensor) -> torch.Tensor:
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
        self.seen, self.prompt_len, self.pad_entries, self.log_sizes = 0, None, None, None

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a compressed KV cache cannot be cropped (assisted decoding is not supported with merging)")

    def _per_row(self, fn) -> None:
        """Apply a batch-dimension operation to the per-row side tensors too."""
        for name in ("pad_entries", "log_sizes"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._per_row(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._per_row(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._per_row(lambda t: t[indices])
