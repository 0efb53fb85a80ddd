"""Intra-layer prompt KV compression: KVMerger's merging, attnmerge (keep by the last queries' attention, merge the
dropped tokens into their most similar kept one), the H2O / StreamingLLM eviction baselines, the compressed cache
layer, and the compressor hook that applies them inside the sharing runtime."""
