"""``python -m kvtool_vllm check DIR``: check an export as the plugin will when vLLM loads it (no engine, no weights
read); prints the map, or one line and exit status 2."""

from __future__ import annotations

import json
import sys

from kvtool_vllm.export_map import KvtoolVllmError, check_export


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "check":
        print("usage: python -m kvtool_vllm check EXPORT_DIR", file=sys.stderr)
        return 2
    try:
        smap = check_export(args[1])
    except KvtoolVllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"base_type": smap.base_type, "roots": list(smap.roots), "owners": len(smap.owners),
                      "layers": len(smap.roots), "merge": smap.merge}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
