"""The fpga-sim resource and timing model (AMD/Xilinx UltraScale+-style fabric).

Deliberately simple and documented in ``docs/fpga-sim.md``:

* **DSP**: one DSP48E2 per signed multiplier up to 27 × 18 bits; a wider product
  is tiled, ``⌈a/27⌉·⌈b/18⌉`` slices in the cheaper orientation. Multiplying by a
  compile-time power of two is a shift (free). Every multiplier of a loop that is
  unrolled ``U`` times exists ``U`` times.
* **BRAM**: an array (weights, tables, buffers between layers) split into ``P``
  cyclic banks uses, per bank of depth ``d`` and width ``w``, the cheapest BRAM18
  aspect ratio (16K×1 … 512×36): ``min ⌈w/cw⌉·⌈d/cd⌉``. Banks of at most 1 Kbit
  go to distributed RAM instead (``⌈d/64⌉·w`` LUTs).
* **LUT**: one LUT per bit of each adder, subtractor, comparator and 2:1 mux; a
  variable shifter costs ``w·⌈log2(s+1)⌉/2``; a pipelined ``w``-bit divider
  ``w²``; each loop counter ``2·bits(trip)``; 40 LUTs of control per layer.
* **Cycles**: every pipelined loop runs at II=1; a nest of ``outer × inner``
  iterations unrolled ``U`` times takes ``outer·⌈inner/U⌉ + depth`` cycles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: BRAM18 aspect ratios (depth, width).
BRAM18_SHAPES = ((16384, 1), (8192, 2), (4096, 4), (2048, 9), (1024, 18), (512, 36))
#: Arrays (per bank) at most this many bits live in distributed RAM / registers.
LUTRAM_MAX_BITS = 1024
#: DSP48E2 multiplier operand widths (signed).
DSP_A_BITS, DSP_B_BITS = 27, 18
#: Control logic (FSM, handshakes) per layer function, in LUTs.
LAYER_CONTROL_LUTS = 40

#: Capacity of a few common parts, for the utilisation figures (BRAM in 18 Kb blocks).
PARTS = {
    "xczu7ev": {"dsp": 1728, "bram18": 624, "lut": 230400, "device": "xczu7ev-ffvc1156-2-e", "board": "ZCU104"},
    "xczu9eg": {"dsp": 2520, "bram18": 1824, "lut": 274080, "device": "xczu9eg-ffvb1156-2-e", "board": "ZCU102"},
    "xc7a100t": {"dsp": 240, "bram18": 270, "lut": 63400, "device": "xc7a100tcsg324-1", "board": "Arty A7-100T"},
}


def dsp_per_multiplier(a_bits: int, b_bits: int) -> int:
    """DSP48E2 slices for one signed ``a_bits × b_bits`` multiplier."""
    if a_bits <= 1 or b_bits <= 1:
        return 0
    return min(
        math.ceil(a_bits / DSP_A_BITS) * math.ceil(b_bits / DSP_B_BITS),
        math.ceil(b_bits / DSP_A_BITS) * math.ceil(a_bits / DSP_B_BITS),
    )


def memory_cost(elements: int, bits: int, banks: int = 1) -> tuple[int, int]:
    """``(bram18, lut)`` of an array of ``elements`` × ``bits`` in ``banks`` cyclic banks."""
    if elements <= 0:
        return 0, 0
    banks = max(1, min(banks, elements))
    depth = math.ceil(elements / banks)
    if depth * bits <= LUTRAM_MAX_BITS:
        return 0, banks * math.ceil(depth / 64) * bits
    per_bank = min(math.ceil(bits / width) * math.ceil(depth / rows) for rows, width in BRAM18_SHAPES)
    return banks * per_bank, 0


def signed_bits(lo: int, hi: int) -> int:
    """Bits of the smallest two's-complement type holding ``[lo, hi]``."""
    need = max(-int(lo), int(hi) + 1, 1)
    return (need - 1).bit_length() + 1


@dataclass
class LayerCost:
    """What a layer's C function instantiates and how long it runs."""

    cycles: int = 0
    macs: int = 0  # multiply-accumulates of the layer's main computation
    multipliers: dict[tuple[int, int], int] = field(default_factory=dict)  # (a_bits, b_bits) -> count
    lut: int = 0
    arrays: dict[str, list] = field(default_factory=dict)  # name -> [elements, bits, banks, kind]

    def mul(self, a_bits: int, b_bits: int, count: int = 1) -> None:
        key = (max(a_bits, b_bits), min(a_bits, b_bits))
        self.multipliers[key] = self.multipliers.get(key, 0) + count

    def rom(self, name: str, elements: int, bits: int, banks: int = 1, kind: str = "constant") -> None:
        """An array this layer owns: ``constant`` (weights, tables) or ``buffer`` (activations)."""
        if name in self.arrays:
            self.arrays[name][2] = max(self.arrays[name][2], banks)
        else:
            self.arrays[name] = [elements, bits, banks, kind]

    def loops(self, dims) -> None:
        self.lut += sum(2 * int(d).bit_length() for d in dims)

    # -- shorthands for LUT logic -------------------------------------------------------

    def adders(self, bits: int, count: int = 1) -> None:
        self.lut += bits * count

    def shifter(self, bits: int, max_shift: int, count: int = 1) -> None:
        self.lut += count * math.ceil(bits * math.ceil(math.log2(max_shift + 1)) / 2)

    def divider(self, bits: int, count: int = 1) -> None:
        self.lut += count * bits * bits

    # -- summary ---------------------------------------------------------------------

    def dsp(self) -> int:
        return sum(dsp_per_multiplier(a, b) * n for (a, b), n in self.multipliers.items())

    def memory(self) -> dict[str, int]:
        """BRAM18 blocks, distributed-RAM LUTs and bytes of the arrays this layer owns."""
        totals = {"bram18": 0, "lutram": 0, "constant_bytes": 0, "buffer_bytes": 0}
        for elements, bits, banks, kind in self.arrays.values():
            bram, lut = memory_cost(elements, bits, banks)
            totals["bram18"] += bram
            totals["lutram"] += lut
            totals[f"{kind}_bytes"] += math.ceil(elements * bits / 8)
        return totals


def utilisation(totals: dict, part: str) -> dict:
    capacity = PARTS[part]
    return {
        "part": capacity["device"],
        "board": capacity["board"],
        **{f"{key}_percent": round(100.0 * totals[key] / capacity[key], 2) for key in ("dsp", "bram18", "lut")},
        "fits": all(totals[key] <= capacity[key] for key in ("dsp", "bram18", "lut")),
    }
