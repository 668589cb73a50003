"""What a GGUF file says about its model, read from its header with the `gguf` package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    architecture: str | None
    params: str | None  # the size label, e.g. "135M"
    quant: str | None  # e.g. "Q4_1"
    context: int | None
    file_bytes: int


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a field of a type this gguf version cannot render
        return None


def read(path: Path) -> GgufInfo:
    """Raise ValueError when the file is not a readable GGUF."""
    from gguf import GGUFReader, LlamaFileType

    with path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path.name} is not a GGUF file (no GGUF magic)")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ValueError(f"{path.name}: unreadable GGUF header ({exc})") from exc
    arch = _field(reader, "general.architecture")
    file_type = _field(reader, "general.file_type")
    quant = None
    if isinstance(file_type, int):
        try:
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type {file_type}"
    context = _field(reader, f"{arch}.context_length") if arch else None
    return GgufInfo(
        architecture=str(arch) if arch else None,
        params=_field(reader, "general.size_label"),
        quant=quant,
        context=int(context) if isinstance(context, int) else None,
        file_bytes=path.stat().st_size,
    )
