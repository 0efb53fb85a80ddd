"""Cross-layer KV sharing at run time: the attention forward shipped with exports, the supported architectures, the
runtime API (apply, remove, observe) and the check that a model's cache holds what its map implies."""
