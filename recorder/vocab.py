"""The vocabulary as strings and bytes, so the server can decode texts without the tokenizer."""

from __future__ import annotations

import json
import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the characters byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decoder_types(tokenizer) -> set[str]:
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - a slow tokenizer has no backend JSON
        return set()
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if "type" in node:
                found.add(node["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(spec)
    return found


def vocabulary(tokenizer, model_vocab_size: int | None = None) -> tuple[list[str], list[bytes]]:
    """(how each id decodes alone, the bytes it contributes to a text) for ids 0 .. vocab size-1."""
    size = max(len(tokenizer), model_vocab_size or 0)
    raw = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    decoders = _decoder_types(tokenizer)
    byte_level = "ByteLevel" in decoders
    table = _byte_level_decoder() if byte_level else {}
    texts: list[str] = []
    data: list[bytes] = []
    for tid in range(size):
        token = raw[tid] if tid < len(raw) else None
        if token is None:
            texts.append("")
            data.append(b"")
            continue
        if tid in special:
            texts.append(token)
            data.append(token.encode())
            continue
        if byte_level and all(c in table for c in token):
            b = bytes(table[c] for c in token)
        elif (m := _BYTE_TOKEN.match(token)) is not None:
            b = bytes([int(m.group(1), 16)])
        elif "Metaspace" in decoders or "Replace" in decoders or "▁" in token:
            b = token.replace("▁", " ").encode()
        else:
            b = tokenizer.decode([tid]).encode()
        data.append(b)
        texts.append(b.decode("utf-8", errors="replace"))
    return texts, data
