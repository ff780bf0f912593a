"""Subprocess entry point around llama.cpp's ``convert_hf_to_gguf.py``.

Runs the converter unchanged, after one addition: before the GGUF header is
written, the ``ggufship.*`` key-values from ``--extra-kv`` (a JSON object of
strings) are added to the writer. Usage (internal)::

    python -m ggufship.export._convert_runner LLAMA_CPP_DIR EXTRA_KV_JSON -- <converter args>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        sys.stderr.write("usage: _convert_runner LLAMA_CPP_DIR EXTRA_KV_JSON -- ARGS...\n")
        return 2
    root, extra_path, converter_args = Path(argv[0]), Path(argv[1]), argv[3:]
    extra: dict[str, str] = json.loads(extra_path.read_text(encoding="utf-8"))
    sys.path.insert(0, str(root))
    sys.path.insert(1, str(root / "gguf-py"))
    import gguf

    original = gguf.GGUFWriter.write_header_to_file

    def write_header_with_extras(self: gguf.GGUFWriter, *args: object, **kwargs: object) -> None:
        for key, value in sorted(extra.items()):
            self.add_string(key, value)
        original(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_with_extras  # type: ignore[method-assign]
    import convert_hf_to_gguf

    sys.argv = [str(root / "convert_hf_to_gguf.py"), *converter_args]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
