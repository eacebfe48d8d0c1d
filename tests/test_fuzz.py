"""Property-based fuzzing: whatever the input, only documented UserError subclasses escape.

Targets: the ONNX importer (byte-level mutations of real models; field-level
mutations of protobuf structures built with onnx.helper), the pipeline-spec parser
(random text, structured near-miss specs), target specs, ``--input-shape`` and
calibration files.

Normal test run: the ``qcompiler-ci`` hypothesis profile, a fixed number of
derandomised examples per target (a few seconds in all). Longer run, e.g. ten
minutes per target with fresh random examples::

    QCOMPILER_FUZZ_SECONDS=600 pytest -q -p no:cacheprovider tests/test_fuzz.py

Each target then repeats batches of the ``qcompiler-long`` profile until its time is
up. ``HYPOTHESIS_PROFILE`` selects a profile explicitly. See docs/hardening.md.
"""

from __future__ import annotations

import io
import os
import string
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from builders import cnn_bn, init, make_model, mlp, tensor
from qcompiler import errors
from qcompiler.calibdata import CalibrationData, InputSpec
from qcompiler.cli import parse_input_shapes
from qcompiler.onnx_import import load_onnx
from qcompiler.opset import SUPPORTED_OPS
from qcompiler.pipeline import Pipeline, default_registry, parse_one
from qcompiler.target import default_targets

_COMMON = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile("qcompiler-ci", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile("qcompiler-long", max_examples=2000, **_COMMON)

FUZZ_SECONDS = float(os.environ.get("QCOMPILER_FUZZ_SECONDS", "0") or 0)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("qcompiler-long" if FUZZ_SECONDS else "qcompiler-ci")
settings.load_profile(PROFILE)

IMPORT_ERRORS = (
    errors.ModelFormatError, errors.UnsafeModelError, errors.UnsupportedOpError,
    errors.ShapeError, errors.NumericsError,
)
#: Every UserError subclass qcompiler.errors documents.
USER_ERRORS = tuple(
    cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.UserError)
)
#: QCOMPILER_FUZZ_COMPILE=1: compile every model the importer accepts (reference target,
#: float preset) and fail on anything but a UserError: fuzzes the passes too.
COMPILE_AFTER_IMPORT = os.environ.get("QCOMPILER_FUZZ_COMPILE") == "1"


def run_for_a_while(test) -> None:
    """One batch (CI), or batches until QCOMPILER_FUZZ_SECONDS have passed (long runs)."""
    deadline = time.monotonic() + FUZZ_SECONDS
    test()
    while time.monotonic() < deadline:
        test()


def only(allowed: tuple[type[Exception], ...], call, *args, **kwargs):
    """Call; a documented error of ``allowed`` is fine, anything else fails the example."""
    try:
        return call(*args, **kwargs)
    except allowed as exc:
        assert type(exc) in allowed, f"undocumented subclass {type(exc).__name__}"
        assert str(exc).strip(), "an error without a message"
        return None


# -- seeds ----------------------------------------------------------------------------------


def kitchen_sink() -> onnx.ModelProto:
    """Many attribute kinds, a Constant, int64 shape tensors, float16 and a Reshape."""
    r = np.random.default_rng(1)
    inits = [
        init("w", r.standard_normal((4, 2, 3, 3)).astype(np.float32)),
        init("shape", np.array([1, -1], np.int64)),
        init("half", r.standard_normal(4).astype(np.float16)),
        init("idx", np.array([0, 2], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[1, 1], group=1),
        helper.make_node("Transpose", ["c"], ["t"], name="tr", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["flat"], name="reshape"),
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.float32(0.5).reshape(()))),
        helper.make_node("Mul", ["flat", "k"], ["m"], name="scale"),
        helper.make_node("Cast", ["half"], ["half32"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", ["half32", "idx"], ["g"], name="gather", axis=0),
        helper.make_node("ReduceSum", ["g"], ["gs"], name="gsum", keepdims=1),
        helper.make_node("Add", ["m", "gs"], ["a"], name="add"),
        helper.make_node("Softmax", ["a"], ["y"], name="softmax", axis=-1),
    ]
    return make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [1, 64])], inits)


SEEDS = {"mlp": mlp(), "cnn_bn": cnn_bn(), "kitchen_sink": kitchen_sink()}
SEED_BYTES = {name: proto.SerializeToString() for name, proto in SEEDS.items()}


def external_seed() -> tuple[bytes, bytes]:
    """mlp() with w1 in external data: the model bytes and the data file's bytes."""
    proto = mlp()
    w1 = proto.graph.initializer[0]
    payload = w1.raw_data
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(len(payload)))):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString(), payload


EXTERNAL_MODEL, EXTERNAL_DATA = external_seed()
SEED_BYTES["external"] = EXTERNAL_MODEL


@pytest.fixture(scope="module")
def workdir():
    """A model folder (with weights.bin) inside a parent that holds a file the model must not read."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "model"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(EXTERNAL_DATA)
        (Path(root) / "secret.bin").write_bytes(EXTERNAL_DATA)
        yield folder


def import_bytes(folder: Path, data: bytes, input_shapes=None):
    path = folder / "model.onnx"
    path.write_bytes(data)
    model = only(IMPORT_ERRORS, load_onnx, path, input_shapes=input_shapes)
    if model is not None and COMPILE_AFTER_IMPORT:
        import qcompiler

        only(USER_ERRORS, qcompiler.compile, model, "reference", folder.parent / "out", preset="float", force=True)
    return model


# -- importer: byte-level mutations --------------------------------------------------------


@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(SEED_BYTES[draw(st.sampled_from(sorted(SEED_BYTES)))])
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate", "varint"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x12, 0x3A, 0x42]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:  # a huge varint where a length or value was
            data[at : at + 1] = b"\xff" * draw(st.integers(1, 10)) + b"\x01"
    return bytes(data)


def test_importer_survives_byte_mutations(workdir):
    @given(data=mutated_bytes())
    def check(data):
        import_bytes(workdir, data)

    run_for_a_while(check)


# -- importer: field-level mutations of real protobuf structures ------------------------------

NAMES = st.sampled_from(["x", "y", "w", "w1", "b1", "h0", "c", "shape", "", "ghost", "x\x00", "é", "a" * 300])
OP_TYPES = st.sampled_from(sorted(SUPPORTED_OPS[""]) + ["", "Foo", "If", "Loop", "Det", "NonZero", "relu"])
DOMAINS = st.sampled_from(["", "ai.onnx", "qcompiler", "com.microsoft", "ai.onnx.ml", "\x00"])
DIMS = st.lists(st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 16, 2**31, 2**40, 2**63 - 1]), max_size=5)
ATTR_NAMES = st.sampled_from(["axis", "perm", "to", "pads", "strides", "alpha", "value", "keepdims", "group", "epsilon", "mode", "bogus"])
TEXT = st.text(max_size=20)


@st.composite
def small_tensor(draw, name: str = "t") -> onnx.TensorProto:
    dtype = draw(st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_, np.float64]))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    array = np.asarray(draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))), np.float64)
    with np.errstate(all="ignore"):
        array = array.reshape(shape).astype(dtype)
    return numpy_helper.from_array(array, name)


@st.composite
def attribute(draw) -> onnx.AttributeProto:
    name = draw(ATTR_NAMES)
    kind = draw(st.sampled_from(["int", "float", "string", "ints", "floats", "tensor", "graph", "raw"]))
    if kind == "int":
        return helper.make_attribute(name, draw(st.integers(-(2**63), 2**63 - 1)))
    if kind == "float":
        return helper.make_attribute(name, draw(st.floats(width=32)))
    if kind == "string":
        return helper.make_attribute(name, draw(TEXT))
    if kind == "ints":
        return helper.make_attribute(name, draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=6)))
    if kind == "floats":
        return helper.make_attribute(name, draw(st.lists(st.floats(width=32), min_size=1, max_size=4)))
    if kind == "tensor":
        return helper.make_attribute(name, draw(small_tensor(name)))
    if kind == "graph":
        body = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [tensor("a", [1])], [tensor("b", [1])])
        return helper.make_attribute(name, body)
    attr = onnx.AttributeProto(name=name, type=draw(st.sampled_from(sorted(onnx.AttributeProto.AttributeType.values()))))  # a type that lies
    if draw(st.booleans()):
        attr.i = 3
    else:
        attr.f = 1.5
    return attr


@st.composite
def mutated_model(draw) -> tuple[onnx.ModelProto, dict | None]:
    proto = onnx.ModelProto()
    proto.CopyFrom(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    graph = proto.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from([
            "op_type", "domain", "node_input", "node_output", "drop_input", "add_attr", "drop_attr",
            "init_dims", "init_dtype", "init_raw", "init_external", "init_rename", "input_shape",
            "input_type", "output", "value_info", "opset", "ir_version", "node_order", "duplicate_node",
            "drop_node", "constant", "sparse", "function", "metadata",
        ]))
        nodes = list(graph.node)
        node = graph.node[draw(st.integers(0, len(nodes) - 1))] if nodes else None
        inits = list(graph.initializer)
        tensor_ = graph.initializer[draw(st.integers(0, len(inits) - 1))] if inits else None
        if kind == "op_type" and node is not None:
            node.op_type = draw(OP_TYPES)
        elif kind == "domain" and node is not None:
            node.domain = draw(DOMAINS)
        elif kind == "node_input" and node is not None:
            if node.input:
                node.input[draw(st.integers(0, len(node.input) - 1))] = draw(NAMES)
            else:
                node.input.append(draw(NAMES))
        elif kind == "node_output" and node is not None and node.output:
            node.output[draw(st.integers(0, len(node.output) - 1))] = draw(NAMES)
        elif kind == "drop_input" and node is not None and node.input:
            del node.input[draw(st.integers(0, len(node.input) - 1))]
        elif kind == "add_attr" and node is not None:
            node.attribute.append(draw(attribute()))
        elif kind == "drop_attr" and node is not None and node.attribute:
            del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
        elif kind == "init_dims" and tensor_ is not None:
            del tensor_.dims[:]
            tensor_.dims.extend(draw(DIMS))
        elif kind == "init_dtype" and tensor_ is not None:
            tensor_.data_type = draw(st.integers(0, 30) | st.just(1234))
        elif kind == "init_raw" and tensor_ is not None:
            tensor_.raw_data = tensor_.raw_data[: draw(st.integers(0, len(tensor_.raw_data)))] + draw(st.binary(max_size=8))
        elif kind == "init_external" and tensor_ is not None:
            tensor_.ClearField("raw_data")
            tensor_.data_location = TensorProto.EXTERNAL
            for key in draw(st.lists(st.sampled_from(["location", "offset", "length", "checksum", "bogus"]), max_size=4)):
                entry = tensor_.external_data.add()
                entry.key = key
                entry.value = draw(st.sampled_from(
                    ["weights.bin", "../secret.bin", "/etc/hostname", "sub/../weights.bin", "", "0", "-1",
                     "99999999999999999999", "2048", "x\x00y", "a" * 300, ".", "model.onnx"]
                ) | TEXT)
        elif kind == "init_rename" and tensor_ is not None:
            tensor_.name = draw(NAMES)
        elif kind == "input_shape" and graph.input:
            vi = graph.input[draw(st.integers(0, len(graph.input) - 1))]
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for value in draw(DIMS):
                dim = shape.dim.add()
                if draw(st.booleans()):
                    dim.dim_value = value
                else:
                    dim.dim_param = draw(TEXT)
        elif kind == "input_type" and graph.input:
            vi = graph.input[draw(st.integers(0, len(graph.input) - 1))]
            if draw(st.booleans()):
                vi.type.tensor_type.elem_type = draw(st.integers(0, 30))
            else:
                vi.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1])))
        elif kind == "output" and graph.output:
            vi = graph.output[draw(st.integers(0, len(graph.output) - 1))]
            if draw(st.booleans()):
                vi.name = draw(NAMES)
            else:
                vi.type.tensor_type.shape.ClearField("dim")
                for value in draw(DIMS):
                    vi.type.tensor_type.shape.dim.add().dim_value = value
        elif kind == "value_info":
            graph.value_info.append(tensor(draw(NAMES), draw(DIMS), draw(st.integers(0, 16))))
        elif kind == "opset":
            entry = proto.opset_import.add() if draw(st.booleans()) else proto.opset_import[0]
            entry.domain = draw(DOMAINS)
            entry.version = draw(st.integers(-1, 40))
        elif kind == "ir_version":
            proto.ir_version = draw(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 20))
        elif kind == "node_order" and nodes:
            reordered = draw(st.permutations(nodes))
            del graph.node[:]
            graph.node.extend(reordered)
        elif kind == "duplicate_node" and node is not None:
            graph.node.append(node)
        elif kind == "drop_node" and node is not None:
            graph.node.remove(node)
        elif kind == "constant":
            value = draw(small_tensor("value"))
            graph.node.insert(0, helper.make_node("Constant", [], [draw(NAMES) or "k"], value=value))
        elif kind == "sparse":
            values = numpy_helper.from_array(np.ones(2, np.float32), draw(NAMES))
            indices = numpy_helper.from_array(np.array(draw(st.lists(st.integers(-5, 50), min_size=2, max_size=2)), np.int64), "")
            graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, draw(DIMS)))
        elif kind == "function":
            body = [helper.make_node(draw(OP_TYPES), ["a"], ["b"])]
            fn = helper.make_function("local", draw(st.sampled_from(["F", "Relu"])), ["a"], ["b"], body, [helper.make_opsetid("", 17)])
            proto.functions.append(fn)
            if node is not None and draw(st.booleans()):
                node.domain, node.op_type = fn.domain, fn.name
                proto.opset_import.append(helper.make_opsetid("local", 1))
        elif kind == "metadata":
            entry = proto.metadata_props.add()
            entry.key, entry.value = draw(TEXT), draw(TEXT)
    shapes = None
    if draw(st.booleans()) and graph.input:
        shapes = {
            draw(NAMES | st.just(graph.input[0].name)): tuple(draw(st.lists(st.integers(-2, 2**41), max_size=4)))
        }
    return proto, shapes


def test_importer_survives_field_mutations(workdir):
    @given(case=mutated_model())
    def check(case):
        proto, shapes = case
        try:
            data = proto.SerializeToString()
        except Exception:  # noqa: BLE001 - protobuf refused to serialise this mutation
            return
        import_bytes(workdir, data, input_shapes=shapes)

    run_for_a_while(check)


# -- the pipeline-spec parser and target specs -----------------------------------------------

SPEC_CHARS = string.ascii_letters + string.digits + "-_.{}=,;:\"\\ \t\n+*%#'" + "éλ\x00"


def _pass_vocabulary():
    registry = default_registry()
    names, options = [], []
    for cls in registry:
        names.append(cls.name)
        options.extend(spec.name for spec in cls.options())
    return registry, sorted(names), sorted(set(options))


REGISTRY, PASS_NAMES, OPTION_NAMES = _pass_vocabulary()


def _typo(name: str):
    return st.sampled_from([name, name[:-1], name + "s", name.upper(), name.replace("-", "_"), name[1:]])


VALUES = st.sampled_from([
    "int8", "int4:per-group:32", "int8:per-channel", "int16:per-tensor", "int9", "int4:per-group:0",
    "int4:per-group:-3", "int8:per-group:99999999999999999999", "0", "-1", "1e400", "nan", "inf",
    "true", "maybe", "none", "a;b;c", ";", '""', '"x,y"', "9" * 5000, "0x10", "1_000", "MatMul;Conv",
]) | st.text(alphabet=SPEC_CHARS, max_size=12)


@st.composite
def near_miss_spec(draw) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(PASS_NAMES).flatmap(_typo) | st.text(alphabet=SPEC_CHARS, max_size=8))
        options = []
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from(OPTION_NAMES).flatmap(_typo)) if OPTION_NAMES else "x"
            value = draw(VALUES)
            quoted = draw(st.booleans())
            options.append(f'{key}="{value}"' if quoted else f"{key}={value}")
        text = name + ("{" + ",".join(options) + "}" if options or draw(st.booleans()) else "")
        parts.append(text)
    spec = ",".join(parts)
    for _ in range(draw(st.integers(0, 2))):  # then break it a little
        if not spec:
            break
        at = draw(st.integers(0, len(spec) - 1))
        spec = draw(st.sampled_from([spec[:at], spec[:at] + spec[at + 1 :], spec[:at] + draw(st.sampled_from(list("{},=\"\\ "))) + spec[at:]]))
    return spec


def check_spec(spec: str) -> None:
    pipeline = only((errors.PipelineError,), Pipeline.parse, spec, REGISTRY)
    if pipeline is not None:  # what parses prints canonically, and the canonical text is stable
        canonical = str(pipeline)
        assert str(Pipeline.parse(canonical, REGISTRY)) == canonical


def test_pipeline_parser_survives_random_text():
    @given(spec=st.text(alphabet=SPEC_CHARS, max_size=60) | st.text(max_size=30))
    def check(spec):
        check_spec(spec)

    run_for_a_while(check)


def test_pipeline_parser_survives_near_miss_specs():
    @given(spec=near_miss_spec())
    def check(spec):
        check_spec(spec)

    run_for_a_while(check)


def test_target_specs():
    targets = default_targets()
    names = sorted(cls.name for cls in targets)

    @given(spec=st.sampled_from(names).flatmap(_typo).flatmap(
        lambda n: st.sampled_from([n, n + "{", n + "{}", n + "{x=1}", n + "{mcpu=}", n + '{mcpu="a,b"}', n + ",", n + "," + n])
    ) | st.text(alphabet=SPEC_CHARS, max_size=30))
    def check(spec):
        only((errors.TargetError,), parse_one, spec, targets)

    run_for_a_while(check)


# -- --input-shape and calibration files --------------------------------------------------------


def test_input_shape_flag_parser():
    item = st.text(alphabet="xX,=-+0123456789 abé\x00", max_size=24) | st.builds(
        lambda n, dims: f"{n}={'x'.join(dims)}",
        st.sampled_from(["x", "", "a=b"]),
        st.lists(st.sampled_from(["1", "0", "-1", "+2", "007", "9" * 30, "", "N", "9" * 5000]), max_size=4),
    )

    @given(items=st.lists(item, max_size=3))
    def check(items):
        only((errors.ShapeError,), parse_input_shapes, items)

    run_for_a_while(check)


SPECS = [InputSpec("x", (1, 4), np.dtype(np.float32)), InputSpec("ids", (1, 3), np.dtype(np.int64))]


def _npz_seed() -> bytes:
    buf = io.BytesIO()
    r = np.random.default_rng(0)
    np.savez(buf, x=r.standard_normal((3, 1, 4)).astype(np.float32), ids=r.integers(0, 9, (3, 1, 3)))
    return buf.getvalue()


NPZ_SEED = _npz_seed()


def test_calibration_files(workdir):
    @given(data=st.data())
    def check(data):
        raw = bytearray(NPZ_SEED)
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
            if kind == "flip":
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == "truncate":
                del raw[max(at, 1):]
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        path = workdir / "calib.npz"
        path.write_bytes(bytes(raw))
        calib = only((errors.CalibrationDataError,), CalibrationData.from_path, path)
        if calib is not None and only((errors.CalibrationDataError,), calib.bind, SPECS) is not None:
            for sample in calib:
                assert set(sample) == {"x", "ids"}

    run_for_a_while(check)


def test_zip_members_are_checked_before_reading(workdir):
    """A structured npz whose members hold random .npy headers."""
    @given(shape=st.lists(st.integers(0, 2**62), max_size=4), descr=st.sampled_from(["<f4", "<i8", "|O", "<U3", "V8"]))
    def check(shape, descr):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
        buf.write(bytes(48))
        path = workdir / "calib.npz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", buf.getvalue())
        calib = CalibrationData.from_path(path)
        only((errors.CalibrationDataError,), calib.bind, SPECS[:1])

    run_for_a_while(check)
