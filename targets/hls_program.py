"""The whole generated C program of fpga-sim: constants, layer functions, the top function
with liveness-shared static buffers, the header and the C-simulation test bench."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .hls_c import STRING_LITERAL_MIN, CodeWriter, Layer, Tensor, c_array_init, c_string_init, comment_text, ctype, identifier


# -- the program -------------------------------------------------------------------------------------


@dataclass
class Buffer:
    """A static buffer of ``qc_top``, shared by tensors whose lifetimes do not overlap."""

    name: str
    ctype: str
    size: int
    bits: int
    users: list[str] = field(default_factory=list)
    free_after: int = -1  # index of the last node that reads the current tensor


class BufferPool:
    """Liveness-based reuse: layers run one after the other, so a tensor's buffer is free once
    its last reader has run. First fit by C type (the smallest free buffer that is big
    enough, else the largest free one, grown)."""

    def __init__(self, program: Program):
        self.program = program
        self.buffers: list[Buffer] = []

    def allocate(self, tensor: Tensor, now: int, last_use: int) -> str:
        free = [b for b in self.buffers if b.ctype == tensor.ctype and b.free_after < now]
        fits = [b for b in free if b.size >= tensor.size]
        if fits:
            buffer = min(fits, key=lambda b: (b.size, b.name))
        elif free:
            buffer = max(free, key=lambda b: (b.size, b.name))
        else:
            buffer = Buffer(f"buf{len(self.buffers)}", tensor.ctype, 0, 0)
            self.buffers.append(buffer)
        buffer.size = max(buffer.size, tensor.size)
        buffer.bits = max(buffer.bits, tensor.bits)
        buffer.users.append(tensor.name)
        buffer.free_after = max(last_use, now)
        return buffer.name


@dataclass
class LayerRecord:
    index: int
    node: ir.Node
    kind: str  # "layer", "alias" (no code: shares its input's buffer) or "folded" (constant)
    layer: Layer | None = None
    call: str = ""


@dataclass
class Program:
    """The whole generated program: constants, layers, top function and test bench."""

    model_name: str
    tensors: dict[str, Tensor]
    unroll: int
    consts: list[str] = field(default_factory=list)  # declarations
    const_info: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (elements, bits)
    records: list[LayerRecord] = field(default_factory=list)
    storage: dict[str, str] = field(default_factory=dict)  # value name -> C expression in qc_top
    buffers: list[Buffer] = field(default_factory=list)  # qc_top's static buffers
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    header_comment: str = ""
    owned: set[str] = field(default_factory=set)  # constant arrays already counted in a layer
    _const_names: dict[str, str] = field(default_factory=dict)
    _taken: set[str] = field(default_factory=set)

    def unique(self, base: str) -> str:
        name = base
        for k in itertools.count(1):
            if name not in self._taken:
                break
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def const_array(self, key: str, values: np.ndarray, bits: int, *, dedupe: bool = True) -> str:
        """Declare ``values`` as a file-scope ``static const`` array (once per ``key``)."""
        if dedupe and key in self._const_names:
            return self._const_names[key]
        values = np.ascontiguousarray(values)
        name = self.unique("c_" + identifier(key))
        self._const_names[key] = name
        declaration = f"static const {ctype(values.dtype)} {name}[{max(values.size, 1)}] ="
        if values.dtype in (np.int8, np.uint8) and values.size >= STRING_LITERAL_MIN:
            body = "\n" + c_string_init(values)
            declaration = f"/* {values.size} bytes as a string literal (exactly sized: no NUL) */\n" + declaration
        else:
            body = " " + (c_array_init(values) if values.size else "{0}")
        self.consts.append(declaration + body + ";")
        self.const_info[name] = (values.size, bits)
        return name

    # -- assembly --------------------------------------------------------------------------------

    def top_signature(self) -> str:
        params = [f"const {t.ctype} in_{k}[{max(t.size, 1)}]" for k, t in enumerate(self.inputs)]
        params += [f"{t.ctype} out_{k}[{max(t.size, 1)}]" for k, t in enumerate(self.outputs)]
        return f"void qc_top({', '.join(params)})"

    def model_source(self, helpers: str) -> str:
        parts = [self.header_comment, '#include <stdint.h>\n#include <math.h>\n#include "qc_model.h"', helpers]
        if self.consts:
            parts.append("/* ---- weights and constant tables (ROM) ---- */\n" + "\n\n".join(self.consts))
        parts.append("/* ---- layers ---- */")
        parts += [r.layer.source() for r in self.records if r.kind == "layer"]
        parts.append(self._top_source())
        return "\n\n".join(parts) + "\n"

    def _top_source(self) -> str:
        w = CodeWriter()
        w.line("/* ---- top function: one call per layer, static buffers between them ---- */")
        for k, t in enumerate(self.inputs):
            w.line(f"/* in_{k}: '{comment_text(t.name)}' {t.dtype} {list(t.shape)} */")
        for k, t in enumerate(self.outputs):
            w.line(f"/* out_{k}: '{comment_text(t.name)}' {t.dtype} {list(t.shape)} */")
        w.line(self.top_signature())
        w.open("{")
        for b in self.buffers:
            shown = ", ".join(comment_text(u) for u in b.users[:4]) + (f", +{len(b.users) - 4} more" if len(b.users) > 4 else "")
            w.line(f"static {b.ctype} {b.name}[{max(b.size, 1)}]; /* {shown} */")
        factor = max(1, math.ceil(self.unroll / 2))
        if factor > 1:
            for b in self.buffers:
                if b.size > factor:
                    w.line(f"#pragma HLS ARRAY_PARTITION variable={b.name} cyclic factor={factor} dim=1")
        for record in self.records:
            if record.kind == "layer":
                w.line(record.call)
        for k, t in enumerate(self.outputs):
            source = self.storage[t.name]
            if source != f"out_{k}":
                w.open(f"for (int i = 0; i < {t.size}; i++) {{")
                w.line("#pragma HLS PIPELINE II=1")
                w.line(f"out_{k}[i] = {source}[i];")
                w.close()
        w.close()
        return w.text()

    def header_source(self) -> str:
        lines = [
            "/* qc_model.h: interface of the generated model (qcompiler fpga-sim). */",
            "#ifndef QC_MODEL_H",
            "#define QC_MODEL_H",
            "#include <stdint.h>",
            f"#define QC_NUM_INPUTS {len(self.inputs)}",
            f"#define QC_NUM_OUTPUTS {len(self.outputs)}",
        ]
        for k, t in enumerate(self.inputs):
            lines.append(f"#define QC_IN_{k}_SIZE {t.size} /* '{comment_text(t.name)}' {t.dtype} {list(t.shape)} */")
        for k, t in enumerate(self.outputs):
            lines.append(f"#define QC_OUT_{k}_SIZE {t.size} /* '{comment_text(t.name)}' {t.dtype} {list(t.shape)} */")
        lines += [self.top_signature() + ";", "#endif", ""]
        return "\n".join(lines)

    def testbench_source(self) -> str:
        """The C-simulation driver: raw little-endian files in, qc_top, files out."""
        w = CodeWriter()
        w.line("/* qc_tb.c: C-simulation test bench for qc_top (qcompiler fpga-sim).")
        w.line("   usage: qc_sim IN_DIR OUT_DIR   reads IN_DIR/input_K.bin, writes OUT_DIR/output_K.bin")
        w.line("   (raw little-endian arrays, row-major, sizes as in qc_model.h). */")
        w.line("#include <stdio.h>")
        w.line("#include <string.h>")
        w.line('#include "qc_model.h"')
        w.line("")
        for k, t in enumerate(self.inputs):
            w.line(f"static {t.ctype} in_{k}[{max(t.size, 1)}];")
        for k, t in enumerate(self.outputs):
            w.line(f"static {t.ctype} out_{k}[{max(t.size, 1)}];")
        w.line("")
        w.line("static int transfer(const char *dir, const char *name, void *data, size_t bytes, int writing)")
        w.open("{")
        w.line("char path[4096];")
        w.line("FILE *f;")
        w.line("size_t done;")
        w.open("if ((size_t)snprintf(path, sizeof path, \"%s/%s\", dir, name) >= sizeof path) {")
        w.line('fprintf(stderr, "qc_sim: path too long: %s/%s\\n", dir, name);')
        w.line("return 1;")
        w.close()
        w.line('f = fopen(path, writing ? "wb" : "rb");')
        w.open("if (!f) {")
        w.line('fprintf(stderr, "qc_sim: cannot open %s\\n", path);')
        w.line("return 1;")
        w.close()
        w.line("done = writing ? fwrite(data, 1, bytes, f) : fread(data, 1, bytes, f);")
        w.open("if (done != bytes || (!writing && fgetc(f) != EOF)) {")
        w.line('fprintf(stderr, "qc_sim: %s: expected exactly %lu bytes\\n", path, (unsigned long)bytes);')
        w.line("fclose(f);")
        w.line("return 1;")
        w.close()
        w.line("return fclose(f) != 0;")
        w.close()
        w.line("")
        w.line("int main(int argc, char **argv)")
        w.open("{")
        w.line("const uint16_t probe = 1;")
        w.open("if (argc != 3) {")
        w.line('fprintf(stderr, "usage: %s IN_DIR OUT_DIR\\n", argv[0]);')
        w.line("return 2;")
        w.close()
        w.open("if (*(const uint8_t *)&probe != 1) {")
        w.line('fprintf(stderr, "qc_sim: the data files are little-endian; this host is not\\n");')
        w.line("return 2;")
        w.close()
        for k, t in enumerate(self.inputs):
            w.line(f'if (transfer(argv[1], "input_{k}.bin", in_{k}, {t.size * t.dtype.itemsize}, 0)) return 1;')
        args = [f"in_{k}" for k in range(len(self.inputs))] + [f"out_{k}" for k in range(len(self.outputs))]
        w.line(f"qc_top({', '.join(args)});")
        for k, t in enumerate(self.outputs):
            w.line(f'if (transfer(argv[2], "output_{k}.bin", out_{k}, {t.size * t.dtype.itemsize}, 1)) return 1;')
        w.line("return 0;")
        w.close()
        return w.text() + "\n"
