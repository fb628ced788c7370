"""`actsparse profile`: run text through a sparsified model and show per-layer sparsity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from actsparse.cli.common import add_model_argument, at_least, check_output_file, make_console, read_text_file
from actsparse.models.placement import add_placement_arguments
from actsparse.sparsity.registry import RULE_NAMES, RULES
from actsparse.sparsity.spec import TARGETS

DEFAULT_TEXT = (
    "The capital of France is Paris. Activation sparsity means that many entries of the feed-forward "
    "activations of a language model are close to zero, so the matching weights can be skipped."
)
PROMPT = "The capital of France is"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="per-layer sparsity of one target and rule on some text")
    add_model_argument(p)
    p.add_argument("--target", choices=TARGETS, default="input", help="the vector(s) to sparsify")
    p.add_argument(
        "--rule",
        choices=RULE_NAMES,
        default="top_p",
        help="the rule applied to each token; its value: " + "; ".join(f"{r.name}: {r.value}" for r in RULES.values()),
    )
    p.add_argument(
        "--value",
        default="0.9",
        help="the rule's value in its own unit (see --rule); for threshold a calibration file (`actsparse calibrate`)",
    )
    p.add_argument("--text-file", type=Path, help="text to run (default: a short built-in paragraph)")
    p.add_argument(
        "--max-tokens", type=at_least(1, "--max-tokens"), default=512, help="truncate the text to this many tokens"
    )
    p.add_argument(
        "--generate", type=at_least(0, "--generate"), default=8, help=f"greedy tokens to generate after {PROMPT!r}"
    )
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    add_placement_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.sparsity.spec import SparsitySpec

    value = args.value if args.rule == "threshold" else _number(args.value)
    if args.rule == "threshold":
        _check_calibration_file(Path(args.value))
    spec = SparsitySpec(args.target, args.rule, value)  # validated before any model work
    text = read_text_file(args.text_file, "--text-file") if args.text_file else DEFAULT_TEXT
    if args.json:
        check_output_file(args.json)
    import torch  # here: the checks above answer without it
    from rich.table import Table

    from actsparse import load_model, sparsify
    from actsparse.methods import point_spec
    from actsparse.models.placement import from_args

    where = from_args(args)
    console = make_console()
    with console.status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, where.dtype, where.device)
    if RULES[spec.rule].method:  # its data from the model: WINA's norms, the outlier factor, fitted predictors
        with console.status(f"resolving {', '.join(RULES[spec.rule].needs)}"):
            spec = point_spec(model, tokenizer, spec.target, spec.rule, spec.value, None)
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=args.max_tokens).to(model.device)
    prompt = tokenizer(PROMPT, return_tensors="pt").to(model.device)
    with torch.no_grad(), sparsify(model, spec) as stats:
        model(**batch)
        prefill = stats.to_dict()
        stats.reset()
        tokens = _generate(model, tokenizer, prompt["input_ids"], args.generate)
    continuation = tokenizer.decode(tokens, skip_special_tokens=True)

    title = f"{args.model} ({where.dtype} on {where.device}): {spec.label} on {batch['input_ids'].shape[1]} tokens"
    table = Table(title=title)
    table.add_column("layer", justify="right")
    table.add_column("sparsity", justify="right")
    for layer, s in prefill["prefill"]["per_layer"].items():
        table.add_row(layer, f"{s:.1%}")
    table.add_row("all", f"{prefill['prefill']['sparsity']:.1%}", style="bold")
    console.print(table)
    console.print(f"natural exact zeros: {prefill['prefill']['natural_zeros']:.2%}")
    console.print(f"greedy, sparsified: {PROMPT!r} → {continuation!r}")
    if args.json:
        record = {
            "model": args.model,
            "spec": {"target": spec.target, "rule": spec.rule, "value": args.value},
            "tokens": int(batch["input_ids"].shape[1]),
            "dtype": where.dtype,
            "device": where.device,
            "stats": prefill,
            "prompt": PROMPT,
            "continuation": continuation,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--value takes a number in [0, 1] (a calibration file for threshold), got {text!r}") from None


def _check_calibration_file(path: Path) -> None:
    """Refuse a threshold file that is not a JSON object (a list, a number) with a clear message."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read thresholds from {path}: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} holds a JSON {type(data).__name__}, not thresholds: give the file `actsparse calibrate` writes "
            '(an object {"thresholds": {layer: tau}}) or an object {layer: tau}'
        )


def _generate(model, tokenizer, prompt, length: int) -> list[int]:
    """`length` greedy tokens after `prompt` [1, T]: `generate` for causal models; for diffusion models
    (LLaDA, diffusion_gemma) iterative unmasking, one token per step, seeded."""
    import torch

    from actsparse.diffusion import denoiser_for
    from actsparse.diffusion.scoring import generate
    from actsparse.evaluate.encode import Encoder

    denoiser = denoiser_for(model)
    if denoiser is None:
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length, do_sample=False
        )
        return out[0, prompt.shape[1] :].tolist()
    pad = Encoder(tokenizer).pad  # the scorers' padding token
    tokens, _ = generate(
        denoiser, [prompt[0].tolist()], [torch.Generator().manual_seed(0)], length, length, length, pad
    )
    return tokens[0]
