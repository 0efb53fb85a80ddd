"""The transformers config class of each kvtool export type (``kvtool_llama`` -> ``KvtoolLlamaConfig``): the base's
config class under kvtool's model_type. Module-level classes, so vLLM's worker processes can unpickle them."""

from __future__ import annotations

import transformers

from kvtool_vllm.export_map import BASES

CONFIGS: dict[str, type] = {}
for _base_type, (_config_cls, _, _) in BASES.items():
    _name = f"Kvtool{_config_cls}"
    _cls = type(_name, (getattr(transformers, _config_cls),), {"model_type": f"kvtool_{_base_type}",
                                                                "__module__": __name__, "__qualname__": _name})
    globals()[_name] = CONFIGS[f"kvtool_{_base_type}"] = _cls
