"""The ``host`` target: artifacts bit-exact with the reference on integer graphs, float within tolerance."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from onnx import TensorProto

import qcompiler
import target_models as tm
from builders import mlp, save
from qcompiler.errors import TargetError
from qcompiler.pipeline import Pipeline, parse_one
from qcompiler.target import default_targets
from qcompiler.targets.tvm_bridge.kernels import vnni

INTEGER_GRAPHS = {
    "mlp": tm.quantized_mlp,
    "mlp-uint8-asym": lambda: tm.quantized_mlp(asym_input=True),
    "cnn-relu6-maxpool-gap": tm.quantized_cnn,
    "attention-ibert-int16": lambda: tm.attention_block("ibert"),
    "attention-linear": lambda: tm.attention_block("linear"),
    "attention-lut-int8": lambda: tm.attention_block("lut", act16=False, softmax_out=np.int8),
}
FLOAT_GRAPHS = {
    "weight-only-int8": lambda: tm.weight_only_mlp(8),
    "weight-only-int4-blocked": lambda: tm.weight_only_mlp(4),
    "float-cnn": tm.float_cnn,
}


def build(spec: str, model, out_dir):
    """Compile an IR model (no passes) for a target spec; returns the manifest."""
    target = parse_one(spec, default_targets())
    return qcompiler.compile_model(model, target, out_dir, pipeline=Pipeline([])).manifest


@pytest.fixture(scope="module")
def host_builds(tmp_path_factory):
    """Every test graph built once for host: name -> (model, out_dir)."""
    root = tmp_path_factory.mktemp("host")
    built = {}
    for name, make in {**INTEGER_GRAPHS, **FLOAT_GRAPHS}.items():
        build("host", make(), root / name)
        built[name] = (make(), root / name)
    return built


@pytest.mark.parametrize("name", sorted(INTEGER_GRAPHS))
def test_integer_graphs_bit_exact(host_builds, name):
    model, out = host_builds[name]
    tm.assert_runner_bit_exact(qcompiler.load(out), model, 3, name)


@pytest.mark.parametrize("name", sorted(FLOAT_GRAPHS))
def test_float_and_weight_only_graphs_within_tolerance(host_builds, name):
    model, out = host_builds[name]
    feeds = tm.random_feeds(model)
    expected = tm.reference(model, feeds)
    got = qcompiler.load(out).run(feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=f"{name}/{key}")


def test_manifest_records_library_and_llvm_target(host_builds):
    _, out = host_builds["mlp"]
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["target_info"]
    assert info["library"] in manifest["files"]
    assert info["tvm_target"]["kind"] == "llvm" and info["tvm_target"]["mcpu"]
    assert (out / "README.md").is_file()


def test_rebuild_is_byte_identical(host_builds, tmp_path):
    _, first = host_builds["attention-ibert-int16"]
    build("host", INTEGER_GRAPHS["attention-ibert-int16"](), tmp_path / "again")
    assert (first / "model.so").read_bytes() == (tmp_path / "again" / "model.so").read_bytes()
    assert (first / "manifest.json").read_text() == (tmp_path / "again" / "manifest.json").read_text()


def test_explicit_mcpu_option(tmp_path):
    manifest = build("host{mcpu=x86-64}", tm.quantized_mlp(), tmp_path / "generic")
    assert manifest["target_spec"] == "host{mcpu=x86-64}"
    assert manifest["target_info"]["tvm_target"]["mcpu"] == "x86-64"


def test_unsupported_op_is_a_target_error(tmp_path):
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 2], tm.TensorProto.INT8)
    y = g.op("Mystery", [x], tm.QC, name="strange")
    with pytest.raises(TargetError, match=r"node 'strange' \(qcompiler.Mystery\)"):
        build("host", g.model([(y, tm.TensorProto.INT8, [2, 2])]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["float", "weights-int8"])
def test_cli_compiles_and_artifact_runs(cli, tmp_path, preset):
    path = save(mlp(), tmp_path / "mlp.onnx")
    for target in ("reference", "host"):
        done = cli(path, "--target", target, "--preset", preset, "-o", tmp_path / target)
        assert done.returncode == 0, done.stderr
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    expected = qcompiler.load(tmp_path / "reference").run({"x": x})["y"]
    got = qcompiler.load(tmp_path / "host").run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_quantize_linear_saturates_and_maps_nan_to_the_zero_point(tmp_path):
    """The reference's saturating QuantizeLinear: NaN → zero point, ±inf and huge values clamp."""
    g = tm.GraphBuilder(0)
    x = g.input("x", [2, 6])
    q = g.op("QuantizeLinear", [x, g.const(np.float32(0.25)), g.const(np.int8(-3))])
    u = g.op("QuantizeLinear", [x, g.const(np.float32(0.5)), g.const(np.uint8(200))])
    model = g.model([(q, tm.TensorProto.INT8, [2, 6]), (u, tm.TensorProto.UINT8, [2, 6])])
    build("host", model, tmp_path / "out")
    x = np.array([[np.nan, np.inf, -np.inf, 3e38, -3e38, 0.375], [-0.125, 31.9, -32.1, 1e10, 64.0, -0.0]], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = tm.reference(model, {"x": x})
    got = qcompiler.load(tmp_path / "out").run({"x": x})
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


# -- int8 matmuls as scheduled AVX-512 VNNI (vpdpbusd) kernels ------------------------------


def _has_vnni() -> bool:
    from qcompiler.targets.host import HostTarget

    return HostTarget().int8_dot(HostTarget().tvm_target()) == "vnni"


def dense_int8_zero_points() -> tm.ir.Model:
    """int8 x[5, 37] with zero point −3 · (W − 5) [37, 21]: K, N not multiples of 4 / 16."""
    g = tm.GraphBuilder(11)
    x = g.input("x", [5, 37], TensorProto.INT8)
    acc = g.op("MatMulInteger", [x, g.weight((37, 21), -100, 101), g.const(np.int8(-3)), g.const(np.int8(5))], name="fc")
    return g.model([(acc, TensorProto.INT32, [5, 21])])


def dense_uint8_requant() -> tm.ir.Model:
    """uint8 x[2, 3, 64] with zero point 131 → 64→48 (per-column weight zero points) → requantize → 48→20."""
    g = tm.GraphBuilder(12)
    x = g.input("x", [2, 3, 64], TensorProto.UINT8)
    zw = g.rng.integers(-4, 5, 48).astype(np.int8)
    acc = g.op("MatMulInteger", [x, g.weight((64, 48), -120, 121), g.const(np.uint8(131)), g.const(zw)], name="fc1")
    h = g.requant(acc, g.rng.uniform(0.0002, 0.0004, 48), np.uint8(128), axis=2)
    acc = g.op("MatMulInteger", [h, g.weight((48, 20)), g.const(np.uint8(128))], name="fc2")
    return g.model([(acc, TensorProto.INT32, [2, 3, 20])])


def batch_matmul_activations() -> tm.ir.Model:
    """int8 a[2, 3, 7, 13] (zp 4) @ uint8 b[2, 3, 13, 19] (zp 200) and uint8 a @ int8 b: both activations."""
    g = tm.GraphBuilder(13)
    a = g.input("a", [2, 3, 7, 13], TensorProto.INT8)
    b = g.input("b", [2, 3, 13, 19], TensorProto.UINT8)
    c = g.input("c", [2, 3, 7, 13], TensorProto.UINT8)
    d = g.input("d", [2, 3, 13, 33], TensorProto.INT8)
    ab = g.op("MatMulInteger", [a, b, g.const(np.int8(4)), g.const(np.uint8(200))], name="ab")
    cd = g.op("MatMulInteger", [c, d, g.const(np.uint8(7)), g.const(np.int8(-2))], name="cd")
    return g.model([(ab, TensorProto.INT32, [2, 3, 7, 19]), (cd, TensorProto.INT32, [2, 3, 7, 33])])


def int16_by_int8() -> tm.ir.Model:
    """int16 x[4, 50] (zp 300) · int8 W[50, 40]: split into two int8 products (int32 and int64 accumulators)."""
    g = tm.GraphBuilder(14)
    x = g.input("x", [4, 50], TensorProto.INT16)
    acc32 = g.op("IntMatMul", [x, g.weight((50, 40), -60, 61), g.const(np.int16(300))], tm.QC, name="mm32")
    acc64 = g.op("IntMatMul", [x, g.weight((50, 40)), g.const(np.int16(300))], tm.QC, name="mm64", acc_type="int64")
    return g.model([(acc32, TensorProto.INT32, [4, 40]), (acc64, TensorProto.INT64, [4, 40])])


VNNI_GRAPHS = {
    "dense-int8-zero-points": dense_int8_zero_points,
    "dense-uint8-requant": dense_uint8_requant,
    "batch-matmul-activations": batch_matmul_activations,
    "int16-by-int8": int16_by_int8,
    "int8-convs": lambda: tm.int8_convs(fallback=False),
}


@pytest.mark.parametrize("name", sorted(VNNI_GRAPHS))
def test_int8_matmul_kernels_bit_exact(tmp_path, name):
    """Bit-exact with the reference; with VNNI every int8 matmul is a scheduled kernel."""
    model = VNNI_GRAPHS[name]()
    manifest = build("host", model, tmp_path / name)
    info = manifest["target_info"]
    if _has_vnni():
        assert info["int8_dot_kernel"] == "vnni" and info["int8_matmul_kernels"], info
        assert info["int8_matmul_fallback"] == []
    tm.assert_runner_bit_exact(qcompiler.load(tmp_path / name), model, 3, name)


def test_generic_cpu_build_has_no_vnni_kernels(tmp_path):
    info = build("host{mcpu=x86-64}", dense_int8_zero_points(), tmp_path / "generic")["target_info"]
    assert info["int8_dot_kernel"] is None and info["int8_matmul_kernels"] == {}


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_kernels_use_vpdpbusd():
    from qcompiler.targets import tvm_bridge
    from qcompiler.targets.host import HostTarget

    target = HostTarget().tvm_target()
    for name in ("dense-uint8-requant", "batch-matmul-activations"):
        mod, report = tvm_bridge.lower_with_report(VNNI_GRAPHS[name](), int8_dot="vnni")
        assert report["int8_matmul_kernels"] and report["int8_matmul_fallback"] == []
        asm = tvm_bridge.assembly(tvm_bridge.compile(mod, target))
        for kernel in report["int8_matmul_kernels"]:
            assert all("vpdpbusd" in body for body in _kernel_assembly(asm, kernel)), f"{name}: no vpdpbusd in {kernel}"
    convs, report = tvm_bridge.lower_with_report(tm.int8_convs(), int8_dot="vnni")
    covered = sorted(node for nodes in report["int8_matmul_kernels"].values() for node in nodes)
    assert covered == ["batch2", "conv1d", "dilated", "stride2"]  # im2col + the dense kernel
    assert report["int8_matmul_fallback"] == ["depthwise"]  # grouped: the generic conv2d
    asm = tvm_bridge.assembly(tvm_bridge.compile(convs, target))
    for kernel in report["int8_matmul_kernels"]:
        assert all("vpdpbusd" in body for body in _kernel_assembly(asm, kernel)), f"int8-convs: no vpdpbusd in {kernel}"
    plain = tvm_bridge.assembly(tvm_bridge.compile(tvm_bridge.lower(dense_int8_zero_points()), target))
    assert "vpdpbusd" not in plain  # the generic dense kernel does not reach it by itself


def _kernel_assembly(asm: str, kernel: str) -> list[str]:
    """The bodies of a kernel (as built, or fused with the element-wise ops after it: ``fused_<kernel>_…``)
    and of the parallel lambdas that follow each (where its loops run); one per symbol."""
    starts = [m.start() for m in re.finditer(rf"\n(?:fused_)?{kernel}\w*_compute_:", asm)]
    assert starts, f"no symbol for {kernel}"
    bodies = []
    for start in starts:
        pieces = re.split(r"\n\t\.type\t([^,]+),@function", asm[start:])
        text = pieces[0]
        for name, body in zip(pieces[1::2], pieces[2::2]):
            if "parallel_lambda" not in name:
                break
            text += body
        bodies.append(text)
    return bodies


def test_fused_kernels_are_scheduled_for_the_cpu():
    """Every fused element-wise/reduction kernel of an attention block is scheduled
    (inlined, parallel, SIMD); bit-exactness is checked by the tests above on the same builds."""
    import tvm
    from tvm import relax

    from qcompiler.targets import tvm_bridge

    mod = tvm_bridge.lower(tm.attention_block("ibert"))
    with tvm.transform.PassContext(opt_level=3):
        fused = tvm_bridge.fuse(mod)
    kernels = [g.name_hint for g, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    with tvm.target.Target(_host_tvm_target()):
        scheduled = tvm_bridge.schedule_cpu(fused)
    marked = [g.name_hint for g, f in scheduled.functions.items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and tvm_bridge.SCHEDULED in f.attrs]
    assert kernels and len(marked) == len(kernels), sorted(set(kernels) - set(marked))
    text = scheduled.script()
    assert "T.parallel" in text and "T.vectorized" in text


def _host_tvm_target() -> dict:
    from qcompiler.targets.host import HostTarget

    return HostTarget().tvm_target()


@pytest.mark.parametrize("target", ["host", "reference"])
def test_out_of_range_token_ids_are_refused_before_the_call(target, tmp_path):
    """A Gather index fed by a graph input (through a Cast) gets its valid range in the manifest."""
    g = tm.GraphBuilder(0)
    ids = g.input("ids", [1, 6], TensorProto.INT32)
    rows = g.op("Gather", [g.weight((50, 8)), g.op("Cast", [ids], to=TensorProto.INT64)], name="embed", axis=0)
    model = g.model([(rows, TensorProto.INT8, [1, 6, 8])])
    manifest = build(target, model, tmp_path / "out")
    (entry,) = manifest["inputs"]
    assert entry["valid_range"] == {"min": -50, "max": 49, "reason": "it indexes an axis of 50 in node 'embed' (Gather)"}
    runner = qcompiler.load(tmp_path / "out")
    ok = np.array([[0, 49, -1, -50, 7, 3]], np.int32)
    np.testing.assert_array_equal(runner.run({"ids": ok})[rows], tm.reference(model, {"ids": ok})[rows])
    for bad, where in ((50, 1), (-51, 4)):
        ids_bad = ok.copy()
        ids_bad[0, where] = bad
        with pytest.raises(qcompiler.errors.InputError, match=rf"input 'ids' holds {bad} at \[0, {where}\], outside \[-50, 49\]: it indexes an axis of 50 in node 'embed'"):
            runner.run({"ids": ids_bad})


def _fused_and_scheduled(model):
    """The host module of ``model`` after Relax fusion and the int8 kernel schedules."""
    import tvm
    from tvm import relax

    from qcompiler.targets import tvm_bridge

    mod = tvm_bridge.lower(model, int8_dot="vnni")
    with tvm.transform.PassContext(opt_level=3), tvm.target.Target(_host_tvm_target()):
        return vnni.schedule_dot_kernels(tvm_bridge.fuse(mod))


def _dot_kernels(mod) -> dict:
    import tvm

    from qcompiler.targets import tvm_bridge

    return {
        g.name_hint: f for g, f in mod.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and vnni.has_dot_block(f) and g.name_hint.startswith("fused_")
    }


def _parameters(func) -> list[tuple[list[int], str]]:
    """Shape and dtype of each of a kernel's buffer parameters."""
    signature = re.split(r"def \w+\(", func.script())[1].split("):")[0]
    return [([int(d) for d in re.findall(r"\d+", shape.replace("T.int64", ""))], dtype)
            for shape, dtype in re.findall(r'T\.Buffer\(\((.*?)\), "(\w+)"', signature)]


def _output_buffer(func) -> tuple[list[int], str]:
    """Shape and dtype of a kernel's last parameter (its output)."""
    return _parameters(func)[-1]


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_dense_writes_requantized_outputs_directly():
    """Relax fuses the requantize after an int8 dense into the VNNI kernel, whose epilogue then
    writes the 8-bit result tile by tile: no int32 accumulators in memory, no kernel of their own."""
    from qcompiler.targets import tvm_bridge

    kernels = _dot_kernels(_fused_and_scheduled(dense_uint8_requant()))
    outputs = sorted(_output_buffer(k) for k in kernels.values())
    # fc1 + requantize → uint8; fc2 (N = 20, computed as 32 columns) + the slice back to 20
    assert outputs == [([2, 3, 20], "int32"), ([2, 3, 48], "uint8")], sorted(kernels)
    for kernel in kernels.values():
        assert "vpdpbusd" in kernel.script() and tvm_bridge.SCHEDULED in kernel.attrs


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_int16_rows_are_split_inside_the_kernel():
    """int16 × int8: the kernel splits each row into its two uint8 halves next to the products;
    no split, concatenate or recombine kernels are left in the module."""
    import tvm

    mod = _fused_and_scheduled(int16_by_int8())
    names = [g.name_hint for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert not [n for n in names if any(w in n for w in ("concatenate", "bitwise_and", "left_shift"))], names
    for kernel in ("qc_int8_dense_i16_4x48x52_vnni", "qc_int8_dense_i16_acc64_4x48x52_vnni"):
        assert any(n.startswith(kernel) or n.startswith(f"fused_{kernel}") for n in names), names


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_epilogue_folds_a_residual_operand_chain(tmp_path):
    """dense → requantize → integer add with another input (a residual): the other operand's
    chain joins the same epilogue, and the result stays bit-exact with the reference."""
    g = tm.GraphBuilder(21)
    x = g.input("x", [1, 8, 32], TensorProto.INT8)
    skip = g.input("skip", [1, 8, 32], TensorProto.INT8)
    acc = g.op("MatMulInteger", [x, g.weight((32, 32)), g.const(np.int8(3))], name="fc")
    h = g.requant(acc, g.rng.uniform(0.0005, 0.001, 32), np.int8(-2), axis=2)
    y = g.op("IntAdd", [h, g.const(np.int8(-2)), skip, g.const(np.int8(5)), g.const(np.int8(1))], tm.QC,
             name="residual", a_multiplier=3, b_multiplier=5, shift=3)
    model = g.model([(y, TensorProto.INT8, [1, 8, 32])])
    kernels = _dot_kernels(_fused_and_scheduled(model))
    assert [_output_buffer(k) for k in kernels.values()] == [([1, 8, 32], "int8")], sorted(kernels)
    rng = np.random.default_rng(0)
    feeds = {name: rng.integers(-128, 128, (1, 8, 32), dtype=np.int8) for name in ("x", "skip")}
    build("host", model, tmp_path / "out")
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "out").run(feeds)[y], tm.reference(model, feeds)[y])


def test_lookup_tables_fuse_into_the_chain_that_makes_their_index():
    """IntLookup is element-wise in its input: Relax fuses it after the ops that compute the
    index (here the VNNI kernel's epilogue) instead of running an opaque gather of its own."""
    import tvm

    from qcompiler.targets import tvm_bridge

    for int8_dot in (None, "vnni"):
        mod = tvm_bridge.lower(tm.attention_block("ibert"), int8_dot=int8_dot)
        with tvm.transform.PassContext(opt_level=3):
            names = [g.name_hint for g in tvm_bridge.fuse(mod).functions]
        lookups = [n for n in names if "lookup" in n]
        assert len(lookups) == 1 and lookups[0].startswith("fused_") and lookups[0].endswith("_lookup"), lookups


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_batch_matmul_applies_zero_points_and_requantizes_in_its_epilogue():
    """Attention's activation × activation products (Q·Kᵀ, P·V): the zero-point corrections
    and the requantize after them run in the VNNI kernel's epilogue, not as kernels of their own."""
    import tvm

    mod = _fused_and_scheduled(tm.attention_block("ibert"))
    names = [g.name_hint for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    bmm = [n for n in names if "qc_int8_bmm" in n]
    assert len(bmm) == 2 and all(n.startswith("fused_qc_int8_bmm_") and "right_shift" in n for n in bmm), names
    assert "_za" in "".join(bmm)  # a zero point corrected (int8 activations are read as u8: za + 128)
    for name in bmm:
        assert "vpdpbusd" in mod[name].script()


@pytest.mark.parametrize("dtype", [TensorProto.INT8, TensorProto.INT32])
def test_layernorm_variance_from_two_sums_where_int64_holds_them(dtype, tmp_path):
    """IntLayerNorm: Σ(x − mean)² = Σx² − 2·mean·Σx + n·mean² for 8-bit inputs (two row sums
    of x, then the normalise kernel: x − mean never goes through memory); int32 inputs, whose
    squares could overflow int64, keep the sum of squared deviations. Bit-exact either way."""
    import tvm

    from qcompiler.targets import tvm_bridge

    d = 24
    g = tm.GraphBuilder(31)
    x = g.input("x", [3, 5, d], dtype)
    z = np.zeros((), tm.helper.tensor_dtype_to_np_dtype(dtype))
    y = g.op("IntLayerNorm", [x, g.const(z), g.const(np.int8(0)), *tm._ln_consts(g, d, 0.05, 0.03)], tm.QC,
             name="ln", shift=tm._ln_shift(g, d, 0.05, 0.03))
    model = g.model([(y, TensorProto.INT8, [3, 5, d])])
    with tvm.transform.PassContext(opt_level=3):
        fused = tvm_bridge.fuse(tvm_bridge.lower(model))
    kernels = {g.name_hint: f for g, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    centred_in_memory = [n for n, f in kernels.items() if "subtract" in n and _output_buffer(f) == ([3, 5, d], "int64")]
    assert bool(centred_in_memory) == (dtype == TensorProto.INT32)
    build("host", model, tmp_path / "out")
    info = np.iinfo(tm.helper.tensor_dtype_to_np_dtype(dtype))
    low, high = (info.min, info.max) if dtype == TensorProto.INT8 else (-(2**20), 2**20)
    feeds = {"x": np.random.default_rng(0).integers(low, high, (3, 5, d), endpoint=True).astype(info.dtype)}
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "out").run(feeds)[y], tm.reference(model, feeds)[y])


def _scheduled_blocks(func) -> list[tuple[str, int, str]]:
    """(name, points iterated, body) of every block of a scheduled kernel."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    found, stack = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while stack:
        block = stack.pop()
        stmt = sch.get(block)
        points = int(np.prod([int(v.dom.extent) for v in stmt.iter_vars]))
        found.append((stmt.name_hint, points, str(stmt.body)))
        stack.extend(sch.get_child_blocks(block))
    return found


def test_row_statistics_are_computed_once_per_row_not_per_element(tmp_path):
    """IntLayerNorm: the normalise kernel computes the row's mean and σ (a square root and
    its corrections) in a loop over the rows, and its per-element block only reads them; an
    element-wise chain whose inputs all have the output's shape is inlined into one block."""
    import tvm

    from qcompiler.targets import tvm_bridge

    d = 48
    g = tm.GraphBuilder(32)
    x = g.input("x", [3, 5, d], TensorProto.INT8)
    y = g.op("IntLayerNorm", [x, g.const(np.int8(2)), g.const(np.int8(0)), *tm._ln_consts(g, d, 0.05, 0.03)], tm.QC,
             name="ln", shift=tm._ln_shift(g, d, 0.05, 0.03))
    other = g.input("other", [3, 5, d], TensorProto.INT8)
    s = g.op("IntAdd", [y, g.const(np.int8(0)), other, g.const(np.int8(1)), g.const(np.int8(3))], tm.QC,
             name="add", a_multiplier=3, b_multiplier=5, shift=3)
    model = g.model([(s, TensorProto.INT8, [3, 5, d])])
    with tvm.transform.PassContext(opt_level=3), tvm.target.Target(_host_tvm_target()):
        mod = tvm_bridge.schedule_cpu(tvm_bridge.fuse(tvm_bridge.lower(model)))
    kernels = {g.name_hint: f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    normalise = [f for f in kernels.values() if "sqrt" in f.script()]
    assert len(normalise) == 1, sorted(kernels)
    blocks = _scheduled_blocks(normalise[0])
    rooted = [points for _, points, body in blocks if "sqrt" in body]
    assert rooted and all(points == 3 * 5 for points in rooted), blocks  # once per row
    per_element = [body for _, points, body in blocks if points == 3 * 5 * d]
    assert per_element and not any("sqrt" in body for body in per_element), blocks
    chains = [f for n, f in kernels.items() if "sqrt" not in f.script() and "sum" not in n]
    for chain in chains:  # nothing broadcast: one block, as before
        assert len(_scheduled_blocks(chain)) == 1, chain.script()
    feeds = {name: np.random.default_rng(1).integers(-128, 128, (3, 5, d), dtype=np.int8) for name in ("x", "other")}
    build("host", model, tmp_path / "out")
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "out").run(feeds)[s], tm.reference(model, feeds)[s])


def _register_tile(func) -> tuple[int, int]:
    """(rows, 16-column groups) of a scheduled VNNI kernel's accumulator tile."""
    rows, groups = (int(e) for e in re.findall(r"in T\.unroll\(T\.int64\((\d+)\)\)", func.script())[:2])
    return rows, groups


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_tile_leaves_registers_for_the_epilogue_constants(tmp_path):
    """A fused integer GELU brings a dozen scalar constants whose broadcasts LLVM keeps in
    registers for the whole kernel: the accumulator tile shrinks so that they and the tile
    fit the 32 zmm registers (else accumulators spill inside the K loop). A plain requantize
    keeps the full 4 × 4 tile. Both stay bit-exact."""
    from qcompiler.targets import tvm_bridge

    def model(gelu: bool):
        g = tm.GraphBuilder(33)
        x = g.input("x", [1, 8, 64], TensorProto.INT8)
        acc = g.op("IntMatMul", [x, g.weight((64, 64), -60, 61)], tm.QC, name="fc")
        y = g.requant(acc, 0.05 * 0.01 / 0.04, np.int8(0))
        if gelu:
            y = g.op("IntGELU", [y, g.const(np.int8(0)), g.const(np.int8(3))], tm.QC, input_scale=0.04, output_scale=0.03)
        return g.model([(y, TensorProto.INT8, [1, 8, 64])]), y

    tiles = {}
    for gelu in (False, True):
        m, y = model(gelu)
        (kernel,) = _dot_kernels(_fused_and_scheduled(m)).values()
        rows, groups = tiles[gelu] = _register_tile(kernel)
        scalars = sum(all(d == 1 for d in shape) for shape, _ in _parameters(kernel))
        assert rows * groups + rows + groups + scalars <= vnni._ZMM_REGISTERS, (gelu, rows, groups, scalars)
        feeds = {"x": np.random.default_rng(2).integers(-128, 128, (1, 8, 64), dtype=np.int8)}
        build("host", m, tmp_path / f"gelu{gelu}")
        np.testing.assert_array_equal(qcompiler.load(tmp_path / f"gelu{gelu}").run(feeds)[y], tm.reference(m, feeds)[y])
    assert tiles[False] == (4, 4)
    assert tiles[True][0] * tiles[True][1] < 16, tiles


@pytest.mark.skipif(not _has_vnni(), reason="this CPU (LLVM's host target) has no AVX-512 VNNI")
def test_vnni_epilogue_computes_lookup_indices_in_vectors_and_reads_the_table_by_scalar_loads():
    """A table lookup fused into a VNNI epilogue: the index chain (requantize, clamp) runs as
    a vectorised block per tile, the table reads as an unrolled scalar loop (a vector gather
    would be built lane by lane); no full-size intermediate is written."""
    mod = _fused_and_scheduled(tm.attention_block("ibert"))
    kernels = [f for name, f in _dot_kernels(mod).items() if name.endswith("_lookup")]
    assert len(kernels) == 1, sorted(_dot_kernels(mod))
    script = kernels[0].script()
    loop_of = {  # block name → kind of the loop right above it
        block: kind for kind, block in re.findall(r"in T\.(\w+)\([^\n]*\):\n\s*with T\.sblock\(\"(\w+)\"\)", script)
    }
    assert loop_of["lookup"] == "unroll", loop_of
    assert [b for b, kind in loop_of.items() if kind == "vectorized" and b not in ("C_init", "A_halves", "B_packed")], loop_of


@pytest.mark.parametrize("variant", ["ibert", "linear", "lut"])
def test_softmax_is_one_kernel_with_what_follows_bit_exact(variant, tmp_path):
    """IntSoftmax lowers to one kernel (row max, exp, row sum, normalise) into which Relax
    fuses the requantize after it: no separate max or sum kernels. Bit-exact with the
    reference over the last axis and over an inner one."""
    import tvm

    from qcompiler.targets import tvm_bridge

    for axis in (-1, 2):
        g = tm.GraphBuilder(34)
        x = g.input("x", [1, 3, 16, 32], TensorProto.INT8)
        p = g.op("IntSoftmax", [x, g.const(np.int8(0)), g.const(np.uint8(0))], tm.QC, input_scale=0.08,
                 output_scale=1 / 256, variant=variant, axis=axis)
        y = g.requant(p, 0.5, np.int8(-3))
        model = g.model([(y, TensorProto.INT8, [1, 3, 16, 32])])
        with tvm.transform.PassContext(opt_level=3):
            mod = tvm_bridge.fuse(tvm_bridge.lower(model))
        kernels = [g.name_hint for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
        assert len(kernels) == 1 and kernels[0].startswith("fused_int_softmax") and "right_shift" in kernels[0], kernels
        feeds = {"x": np.random.default_rng(3).integers(-128, 128, (1, 3, 16, 32), dtype=np.int8)}
        build("host", model, tmp_path / f"axis{axis}")
        np.testing.assert_array_equal(qcompiler.load(tmp_path / f"axis{axis}").run(feeds)[y], tm.reference(model, feeds)[y])
