"""``qcompile generate OUT``: a quick try of a decoder artifact from the command line.

Prints the prompt and generated token ids (space-separated), or the text with
``--tokenizer`` (a folder ``transformers.AutoTokenizer`` reads).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{prog} generate", description="Generate tokens with a decoder artifact.")
    parser.add_argument("artifact", help="decoder artifact folder (compiled with qcompiler.decoder.compile_decoder)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ids", help="prompt token ids, comma-separated")
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer folder for --prompt and for printing text")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    return parser


def run_generate(argv: list[str], prog: str, out=sys.stdout) -> int:
    from .artifact import load
    from .generate import DecoderRunner

    args = build_parser(prog).parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer {args.tokenizer}: {exc}") from None
    if args.prompt is not None:
        if tokenizer is None:
            raise UserError("--prompt needs --tokenizer (or give --ids)")
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        try:
            ids = [int(t) for t in args.ids.replace(" ", "").split(",") if t]
        except ValueError:
            raise UserError(f"--ids {args.ids!r}: expected comma-separated integers") from None
    runner = load(args.artifact)
    if not isinstance(runner, DecoderRunner):
        raise UserError(f"{args.artifact}: not a decoder artifact (no decoder.json)")
    tokens = runner.generate(ids, args.max_new_tokens, do_sample=args.sample, seed=args.seed,
                             temperature=args.temperature, top_k=args.top_k)
    if tokenizer is not None:
        print(tokenizer.decode(tokens), file=out)
    else:
        print(" ".join(str(t) for t in tokens), file=out)
    return 0
