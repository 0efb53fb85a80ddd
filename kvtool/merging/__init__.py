"""Prompt-KV merging inside a layer: the methods (``methods/``, one file each: KVMerger, attnmerge, H2O,
StreamingLLM), the row operations they share, the merged cache layer, and the hook that applies a method inside
the sharing runtime."""
