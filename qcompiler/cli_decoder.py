"""``qcompile decoder HF_FOLDER -t TARGET -o OUT --calib-text FILE``: compile a causal LM.

The folder is one ``transformers`` reads (``AutoModelForCausalLM`` and ``AutoTokenizer``);
the calibration text is cut into windows of ``--window-tokens`` tokens. The result is a
decoder artifact (``docs/decoders.md``): try it with ``qcompile generate OUT ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import InputError


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{prog} decoder", description="Compile a causal LM into prefill/decode steps.")
    parser.add_argument("model", help="a folder transformers reads (AutoModelForCausalLM, AutoTokenizer)")
    parser.add_argument("-t", "--target", required=True)
    parser.add_argument("-o", "--out-dir", required=True)
    parser.add_argument("--calib-text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--window-tokens", type=int, default=64, help="tokens per window (default 64)")
    parser.add_argument("--max-context", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--preset", default="w8a8")
    parser.add_argument("--pipeline")
    parser.add_argument("--float-cache", action="store_true", help="keep the KV cache float32 between steps")
    parser.add_argument("--force", action="store_true")
    return parser


def calibration_windows(tokenizer, text: str, windows: int, tokens: int) -> np.ndarray:
    """``[windows, tokens]`` non-overlapping token windows from the start of ``text``."""
    ids = tokenizer(text)["input_ids"]
    count = min(windows, len(ids) // tokens)
    if count < 1:
        raise InputError(f"--calib-text: {len(ids)} tokens, fewer than one window of {tokens}")
    return np.array(ids[: count * tokens], np.int64).reshape(count, tokens)


def run_decoder(argv: list[str], prog: str, out=sys.stdout) -> int:
    from .decoder import compile_decoder

    args = build_parser(prog).parse_args(argv)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (no config.json)")
    try:
        text = Path(args.calib_text).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"--calib-text {args.calib_text}: {exc.strerror}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}: transformers cannot load it: {str(exc).splitlines()[0]}") from None
    windows = calibration_windows(tokenizer, text, args.windows, args.window_tokens)
    manifests = compile_decoder(model, args.target, args.out_dir, calib_ids=windows, max_context=args.max_context,
                                prefill=args.prefill, preset=None if args.pipeline else args.preset,
                                pipeline=args.pipeline, int8_cache=not args.float_cache, force=args.force)
    verified = ", ".join(f"{name} {m['verified']['status']}" for name, m in manifests.items())
    print(f"{prog}: wrote {args.out_dir} (decoder for {args.target}, context {args.max_context}, prefill {args.prefill}; "
          f"{verified}); try: {prog} generate {args.out_dir} --prompt TEXT --tokenizer {folder}", file=out)
    return 0
