"""Intra-layer prompt KV compression: KVMerger's merging, the H2O / StreamingLLM eviction baselines, the compressed
cache layer, and the compressor hook that applies them inside the sharing runtime."""
