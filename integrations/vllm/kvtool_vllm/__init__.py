"""kvtool exports in vLLM: the ``vllm.general_plugins`` entry point registers a config type (``kvtool_<base>``) and a
model class (``Kvtool<Base>ForCausalLM``) per base architecture kvtool exports. Consumer layers hold no KV blocks:
vLLM divides the KV memory among the owners only, so the same memory holds layers / owners times the tokens."""

from __future__ import annotations

from kvtool_vllm.export_map import BASES, KvtoolVllmError, SharingMap, arch_name, check_export

__all__ = ["BASES", "KvtoolVllmError", "SharingMap", "TESTED_VLLM", "arch_name", "check_export", "register"]

# The vLLM releases this plugin was tested on (its sharing API is unchanged in 0.33.0's source).
TESTED_VLLM = ("0.32",)


def register() -> None:
    """Register every kvtool architecture with vLLM and every ``kvtool_<base>`` config type with transformers.
    Runs in every vLLM process, so it is idempotent; imports no model code (vLLM loads it by name when needed)."""
    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    if not vllm.__version__.startswith(TESTED_VLLM):
        init_logger(__name__).warning("kvtool_vllm was tested with vLLM %s, this is %s; start-up checks will refuse "
                                      "what they do not recognise", "/".join(TESTED_VLLM), vllm.__version__)
    from kvtool_vllm.configs import CONFIGS

    supported = ModelRegistry.get_supported_archs()
    for base_type in BASES:
        name = arch_name(base_type)
        if name not in supported:
            ModelRegistry.register_model(name, f"kvtool_vllm.models:{name}")
        try:
            AutoConfig.register(f"kvtool_{base_type}", CONFIGS[f"kvtool_{base_type}"])
        except ValueError:  # registered already (this process ran register() before)
            pass
