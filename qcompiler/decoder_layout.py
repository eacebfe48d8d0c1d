"""The layout of a decoder artifact (``decoder.json``): shapes and names of its two steps.

See :mod:`qcompiler.decoder` for the steps themselves and :mod:`qcompiler.generate` for
running them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

#: ``decoder.json`` in a decoder artifact folder: the layout, what generate() needs.
DECODER_FILE = "decoder.json"


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """Shapes and names shared by the prefill and decode steps."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    prefill: int
    pad_token_id: int = 0
    #: past/present name → {"scale", "zero_point", "dtype"} where the cache crosses as integers.
    cache_quantization: dict | None = None

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids", *self.past_names()]

    def output_names(self) -> list[str]:
        return ["logits", *self.present_names()]

    def cache_shape(self) -> tuple[int, int, int, int]:
        return (1, self.kv_heads, self.max_context, self.head_dim)

    def save(self, folder: Path) -> None:
        (Path(folder) / DECODER_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> DecoderLayout:
        return cls(**json.loads((Path(folder) / DECODER_FILE).read_text()))
