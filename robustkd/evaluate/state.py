"""Exact text forms of the tensors a long evaluation hands back as its resumable state (JSON-able)."""

from __future__ import annotations

import base64
import json

import torch
from torch import Tensor


def pack_bits(flags: Tensor) -> str:
    """A bool tensor as a '0'/'1' string: compact JSON, and exact."""
    return "".join("1" if f else "0" for f in flags.tolist())


def unpack_bits(text: str, n: int) -> Tensor:
    if not isinstance(text, str) or len(text) != n or set(text) - {"0", "1"}:
        raise ValueError(f"expected {n} flags")
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def pack_generator(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def unpack_generator(generator: torch.Generator, text: str) -> None:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def pack_tensor(tensor: Tensor) -> str:
    """A tensor's raw bytes as base64 text: exact, NaN and signed zeros included."""
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return base64.b64encode(raw).decode("ascii")


def unpack_tensor(text: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """The tensor :func:`pack_tensor` wrote; ValueError when the text does not hold exactly that many values."""
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    out = torch.empty(shape, dtype=dtype)
    if len(raw) != out.numel() * out.element_size():
        raise ValueError(f"expected {out.numel()} values of {dtype}")
    if raw:  # frombuffer refuses an empty buffer
        out.copy_(torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape))
    return out


def settings_match(state: dict, settings: dict) -> bool:
    """Whether a saved state was made with these settings (compared as JSON, as it was saved)."""

    def canonical(value: object) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    return canonical(state.get("settings")) == canonical(settings)
