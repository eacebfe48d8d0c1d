"""Every build checked against the reference interpreter before ``qcompile`` reports success.

After a target builds its artifact, :func:`verify_build` runs it where this machine can
(reference, host, npu-sim, fpga-sim, arm-neon under qemu) on a few inputs (calibration
samples, or seeded generated ones) and compares with the reference interpreter on the
same final graph. The contract:

* a graph that is integer between its input quantizes and output dequantizes must
  match **bit for bit**;
* where float computation remains, a float result may differ in the last bits (TVM
  and numpy sum in different orders), and a quantize that reads a float island may
  then land one step off. When outputs differ, the build is probed: the island
  quantizes become extra outputs of a second build, and each must be within **one
  quantization step** of the reference; a pure float graph (no quantize) must agree
  to a relative ``1e-3`` of each output's range.

The result goes into the manifest (``verified``). A build that breaks the contract
raises :class:`VerificationError` (exit status 1: a bug in qcompiler) after saving a
reproducer folder: the final graph, the inputs, both outputs and the artifact.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import QCompilerError, TargetError
from .graph import node_label
from .integer_check import first_float_compute

#: Relative tolerance of float outputs of graphs without quantization.
FLOAT_RTOL = 1e-3
#: Quantization steps an island quantize may be off by.
ISLAND_STEPS = 1


class VerificationError(QCompilerError):
    """A build disagrees with the reference interpreter (a bug; the message names the reproducer)."""


def island_quantizes(model: ir.Model) -> list[ir.Node]:
    """QuantizeLinear nodes that read a value computed in float by another node."""
    found = []
    for node in model.graph:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is not None and source.producer() is not None and source.producer().op_type != "DequantizeLinear":
            found.append(node)
    return found


def _differences(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict]:
    out = {}
    for name, want in expected.items():
        have = np.asarray(got[name])
        want = np.asarray(want)
        if have.shape != want.shape or have.dtype != want.dtype:
            out[name] = {"problem": f"{have.dtype}{list(have.shape)} instead of {want.dtype}{list(want.shape)}"}
            continue
        if want.dtype.kind == "f":
            same = (have == want) | (np.isnan(have) & np.isnan(want))
        else:
            same = have == want
        diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
        diff = np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))
        scale = float(np.max(np.abs(np.nan_to_num(want.astype(np.float64))), initial=0.0))
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
        out[name] = {
            "mismatched": int(np.count_nonzero(~same)), "size": int(want.size),
            "max_abs_diff": float(diff.max(initial=0.0)), "range": scale,
            "worst_index": [int(i) for i in worst],
        }
    return out


def verify_build(
    model: ir.Model,
    target,
    load: Callable[[], object],
    samples: list[dict[str, np.ndarray]],
    *,
    build_probe: Callable[[ir.Model, Path], object] | None = None,
    sample_source: str = "generated",
    artifact: Path | None = None,
) -> dict:
    """Run the artifact (``load()`` gives its runner) on ``samples`` against the reference
    interpreter on ``model``; returns the manifest's ``verified`` entry or raises
    :class:`VerificationError`. ``build_probe(model, folder)`` builds a variant of the
    model with the same target and returns its runner (used for float islands)."""
    from .interpreter import ReferenceInterpreter

    if not target.capabilities.runnable_here:
        return {"status": "skipped", "reason": f"target '{target.name}' cannot run on this machine"}
    try:
        runner = load()
        reference = ReferenceInterpreter(model)
        pairs = [(feeds, reference.run(feeds), runner.run(feeds)) for feeds in samples]
    except TargetError as exc:  # e.g. the emulator is missing here
        return {"status": "skipped", "reason": str(exc)}
    entry = {"samples": len(samples), "inputs": sample_source}
    diffs = [_differences(expected, got) for _, expected, got in pairs]
    merged = _merge(diffs)
    if all(d.get("mismatched", 1) == 0 for d in merged.values()):
        return {"status": "bit-exact", **entry}
    float_compute = first_float_compute(model)
    problem = next((f"output '{n}': {d['problem']}" for n, d in merged.items() if "problem" in d), None)
    if problem is None and float_compute is not None:
        islands = island_quantizes(model)
        if not islands:
            bad = {n: d for n, d in merged.items() if d["max_abs_diff"] > FLOAT_RTOL * max(d["range"], 1e-30)}
            if not bad:
                return {"status": "float-within-tolerance", "rtol": FLOAT_RTOL, "outputs": merged, **entry}
            name, d = next(iter(bad.items()))
            problem = (f"output '{name}' differs by {d['max_abs_diff']:.6g} (beyond {FLOAT_RTOL:g} of its range "
                       f"{d['range']:.6g}) at {d['worst_index']}")
        elif build_probe is not None:
            steps, problem = _probe_islands(model, islands, build_probe, [p[0] for p in pairs])
            if problem is None:
                return {"status": "islands-within-one-step", "islands": steps, "outputs": merged, **entry}
        else:
            problem = "outputs differ and the float islands could not be probed"
    if problem is None:
        name, d = next((n, d) for n, d in merged.items() if d["mismatched"])
        problem = (f"output '{name}' differs on {d['mismatched']} of {d['size']} values (max |diff| "
                   f"{d['max_abs_diff']:.6g} at {d['worst_index']}); the graph is integer, so it must be bit-exact")
    folder = _reproducer(model, target, pairs, artifact)
    raise VerificationError(
        f"the {target.name} build disagrees with the reference interpreter: {problem}; reproducer saved in {folder}"
    )


def _merge(diffs: list[dict[str, dict]]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for diff in diffs:
        for name, d in diff.items():
            if "problem" in d or name not in merged:
                merged.setdefault(name, dict(d))
                if "problem" in d:
                    merged[name] = dict(d)
                continue
            m = merged[name]
            if "problem" in m:
                continue
            if d["max_abs_diff"] > m["max_abs_diff"]:
                m["max_abs_diff"], m["worst_index"] = d["max_abs_diff"], d["worst_index"]
            m["mismatched"] += d["mismatched"]
            m["size"] += d["size"]
            m["range"] = max(m["range"], d["range"])
    return merged


def _probe_islands(model: ir.Model, islands: list[ir.Node], build_probe, feeds_list) -> tuple[dict, str | None]:
    """Build the model with every island quantize as an extra output; compare in steps."""
    from .interpreter import ReferenceInterpreter

    probe = ir.from_proto(ir.to_proto(model))
    names = []
    by_name = {n.name: n for n in probe.graph}
    for node in islands:
        value = by_name[node.name].outputs[0]
        if not value.is_graph_output():
            probe.graph.outputs.append(value)
        names.append((node, value.name))
    with tempfile.TemporaryDirectory(prefix="qcompiler-probe-") as tmp:
        runner = build_probe(probe, Path(tmp))
        reference = ReferenceInterpreter(probe)
        steps: dict[str, dict] = {}
        for feeds in feeds_list:
            want = reference.run(feeds)
            have = runner.run(feeds)
            for node, name in names:
                delta = np.abs(np.asarray(have[name], np.int64) - np.asarray(want[name], np.int64))
                entry = steps.setdefault(node.name, {"max_steps": 0, "flipped": 0, "size": 0})
                entry["max_steps"] = max(entry["max_steps"], int(delta.max(initial=0)))
                entry["flipped"] += int(np.count_nonzero(delta))
                entry["size"] += int(delta.size)
    for node, _ in names:
        if steps[node.name]["max_steps"] > ISLAND_STEPS:
            return steps, (f"the island quantize {node_label(node)} is {steps[node.name]['max_steps']} steps off "
                           f"(allowed: {ISLAND_STEPS})")
    return {k: v for k, v in steps.items() if v["flipped"]}, None


def _reproducer(model: ir.Model, target, pairs, artifact: Path | None) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qcompiler-verify-"))
    (folder / "model.onnx").write_bytes(ir.to_proto(model).SerializeToString())
    for index, (feeds, expected, got) in enumerate(pairs):
        np.savez(folder / f"inputs_{index}.npz", **feeds)
        np.savez(folder / f"expected_{index}.npz", **expected)
        np.savez(folder / f"got_{index}.npz", **got)
    if artifact is not None and artifact.exists():
        shutil.copytree(artifact, folder / "artifact")
    (folder / "README.md").write_text(
        f"The {target} build of model.onnx disagreed with qcompiler's reference interpreter.\n\n"
        "inputs_K.npz: the inputs; expected_K.npz: the reference's outputs; got_K.npz: the artifact's.\n"
        "artifact/: the build. Rebuild it with:\n\n"
        f"    qcompile model.onnx --target '{target}' --pipeline eliminate-dead-code -o out --no-verify\n"
    )
    return folder
