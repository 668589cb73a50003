"""KV keys. Model names such as `llama3.1:8b` are not valid NATS KV keys, so every name that
goes into a key passes through one reversible encoding: letters, digits and '-' stay, every
other byte becomes `_xx` (lower-case hex). `llama3.1:8b` -> `llama3_2e1_3a8b`.
"""

from __future__ import annotations

import re

_KEEP = re.compile(r"[A-Za-z0-9-]")
_TOKEN = re.compile(r"_([0-9a-f]{2})|([A-Za-z0-9-])")
NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def encode_name(name: str) -> str:
    """Reversible, injective mapping of any string to a valid KV key token."""
    if not name:
        raise ValueError("cannot encode an empty name")
    out = []
    for ch in name:
        if _KEEP.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode())
    return "".join(out)


def decode_name(token: str) -> str:
    pos, raw = 0, bytearray()
    while pos < len(token):
        m = _TOKEN.match(token, pos)
        if m is None:
            raise ValueError(f"not an encoded name: {token!r} (bad at offset {pos})")
        raw.extend(bytes([int(m.group(1), 16)]) if m.group(1) else m.group(2).encode())
        pos = m.end()
    return raw.decode()


def check_node_id(node_id: str) -> str:
    if not NODE_ID_RE.match(node_id):
        raise ValueError(f"invalid node id {node_id!r}: use a-z 0-9 and '-' (start alnum)")
    return node_id


def node_key(node_id: str) -> str:
    return f"node.{check_node_id(node_id)}"


def reg_key(node_id: str) -> str:
    """A node's registration (written only by its own agent)."""
    return f"reg.{check_node_id(node_id)}"


def model_key(model: str) -> str:
    return f"model.{encode_name(model)}"
