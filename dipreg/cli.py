"""The `dipreg` console script: one sub-command per job, each taking --model and --out.

Sub-command modules are imported only when their command runs, so `dipreg audit` never loads Lightning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rich.console import Console

from dipreg.adapter import UnsupportedModelError
from dipreg.metrics import DEFAULT_WINDOW
from dipreg.models import ModelLoadError
from dipreg.prompting import PROMPT_STYLES

Handler = Callable[[argparse.Namespace], int]
#: name -> (help, add_arguments, handler); later sub-commands register here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a sub-command handler."""

    def register(handler: Handler) -> Handler:
        COMMANDS[name] = (help_text, add_arguments, handler)
        return handler

    return register


def add_common(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--model and --out, shared by every command."""
    parser.add_argument("--model", default=None, help="HF name or local path (default: the embedded SmolLM2-135M)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")


def add_prompt(parser: argparse.ArgumentParser, default: str = "auto", why: str = "") -> None:
    """--prompt: how contexts are shown to the model (``why`` explains a non-``auto`` default)."""
    parser.add_argument(
        "--prompt",
        choices=PROMPT_STYLES,
        default=default,
        help="auto: the chat template when the tokenizer has one (question as user turn, 'Answer:' opening the "
        f"assistant turn), else raw text (default: {default}{why})",
    )


def csv_list(text: str) -> list[str]:
    """Split a comma-separated option into its non-empty parts."""
    return [part.strip() for part in text.split(",") if part.strip()]


def window_arg(text: str) -> tuple[float, float]:
    """Parse ``lo,hi``."""
    parts = csv_list(text)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.25,0.90), got {text!r}")
    return float(parts[0]), float(parts[1])


def add_window(parser: argparse.ArgumentParser) -> None:
    """--window: the relative-depth window of max_wrong_dip."""
    parser.add_argument(
        "--window", type=window_arg, default=DEFAULT_WINDOW, help="dip window LO,HI (default 0.25,0.90)"
    )


def _audit_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/audit")
    p.add_argument("--pairs", default="core", help="core | role_binding | FILE.jsonl (default: core)")
    p.add_argument("--lens", default="logit", type=csv_list, help="comma-separated lenses (default: logit)")
    p.add_argument("--batch-size", type=int, default=16)
    add_window(p)
    add_prompt(p)
    p.add_argument(
        "--tuned-lens",
        default=None,
        help="for --lens tuned: a trained lens (file or folder), or in-domain | out-of-domain for the one "
        "`dipreg tuned-lens train` wrote to its default location (default: out-of-domain)",
    )
    p.add_argument(
        "--neutral-prompt",
        default=None,
        help="for --lens causal: the neutral decoding context whose last token receives the patch "
        "(default: the patchscope identity prompt 'king king\\n1135 1135\\nhello hello\\n?')",
    )


def _lens_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    from dipreg.lenses.tuned import tuned_lens_options

    causal = {} if args.neutral_prompt is None else {"neutral_prompt": args.neutral_prompt.replace("\\n", "\n")}
    return {"tuned": tuned_lens_options(args.tuned_lens), "causal": causal}


@command("audit", "layer-wise DiD trajectories, dips and commit depths of a pair set", _audit_args)
def _audit(args: argparse.Namespace) -> int:
    from dipreg.audit import run_audit

    run_audit(
        args.model,
        args.pairs,
        args.lens,
        args.out,
        batch_size=args.batch_size,
        window=args.window,
        prompt=args.prompt,
        lens_options=_lens_options(args),
    )
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/bench")
    p.add_argument("--pairs", default="core", help="pair set to time on (default: core)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (median kept)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--naive-pairs", type=int, default=32, help="pairs for the slow naive references (default: 32)")
    p.add_argument("--only", type=csv_list, default=None, help="comma-separated section names (default: all)")


@command("bench", "speed and memory ratios against references measured in the same run", _bench_args)
def _bench(args: argparse.Namespace) -> int:
    from dipreg.bench import run_bench

    run_bench(
        args.model,
        args.pairs,
        args.out,
        repeats=args.repeats,
        batch_size=args.batch_size,
        naive_pairs=args.naive_pairs,
        sections=args.only,
    )
    return 0


def _tuned_lens_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train"], help="train: fit the translators and save them")
    add_common(p, "<cache>/tuned-lens/<model-id>/<corpus>")
    p.set_defaults(out=None)
    p.add_argument("--corpus", required=True, help="in-domain | out-of-domain | FILE (one document per line)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-sequences", type=int, default=256, help="sequences drawn from the corpus (default 256)")
    p.add_argument("--positions", type=int, default=8, help="training positions: the last K tokens of each text")
    p.add_argument(
        "--vocab-top-k",
        type=int,
        default=64,
        help="KL over the union of each position's top-k final tokens; 0 = full vocabulary (default 64)",
    )
    p.add_argument("--seed", type=int, default=0)


@command("tuned-lens", "train a tuned lens (one affine translator per layer) on a corpus", _tuned_lens_args)
def _tuned_lens(args: argparse.Namespace) -> int:
    from dipreg.lenses.tuned_training import TrainSettings, run_tuned_lens_train

    settings = TrainSettings(
        steps=args.steps,
        lr=args.lr,
        max_sequences=args.max_sequences,
        positions_per_sequence=args.positions,
        vocab_top_k=args.vocab_top_k,
        seed=args.seed,
    )
    run_tuned_lens_train(args.model, args.corpus, args.out, settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="dipreg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler)
    return parser


def _degrade_args(p: argparse.ArgumentParser) -> None:
    from dipreg.eval.degradation.operators import DEFAULT_OPS

    add_common(p, "runs/degrade")
    p.add_argument("--pairs", default="core", help="core | role_binding | FILE.jsonl (default: core)")
    p.add_argument(
        "--ops", default=DEFAULT_OPS, help=f"comma-separated operators op:key=value (default: {DEFAULT_OPS})"
    )
    p.add_argument("--batch-size", type=int, default=16)
    add_window(p)
    add_prompt(p)


@command("degrade", "flips under weight/structural degradations, stratified by intact dip and margin", _degrade_args)
def _degrade(args: argparse.Namespace) -> int:
    from dipreg.eval.degradation.report import run_degrade

    run_degrade(
        args.model,
        args.pairs,
        args.ops,
        args.out,
        batch_size=args.batch_size,
        window=args.window,
        prompt=args.prompt,
    )
    return 0


def _limit_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--limit must be >= 0 (0 = all vignettes), got {value}")
    return value


def _bridge_args(p: argparse.ArgumentParser) -> None:
    from dipreg.eval.readouts.bridge import DEFAULT_BRIDGE_OPS, DEFAULT_LIMIT
    from dipreg.eval.readouts.interventions import DEFAULT_INTERVENTIONS
    from dipreg.eval.readouts.readout import DEFAULT_READOUTS, READOUT_NAMES

    add_common(p, "runs/bridge")
    p.add_argument("--pairs", default="vignettes", help="vignettes | value_flip | role_binding (default: vignettes)")
    p.add_argument(
        "--readouts",
        type=csv_list,
        default=list(DEFAULT_READOUTS),
        help=f"comma-separated, from {', '.join(READOUT_NAMES)} (default: {','.join(DEFAULT_READOUTS)})",
    )
    p.add_argument(
        "--ops", default=DEFAULT_BRIDGE_OPS, help=f"degradations, as for dipreg degrade (default: {DEFAULT_BRIDGE_OPS})"
    )
    p.add_argument(
        "--interventions",
        type=csv_list,
        default=list(DEFAULT_INTERVENTIONS),
        help=f"prompt interventions (default: {','.join(DEFAULT_INTERVENTIONS)})",
    )
    p.add_argument(
        "--limit",
        type=_limit_arg,
        default=DEFAULT_LIMIT,
        help=f"a balanced subset of N vignettes; 0 = all (default: {DEFAULT_LIMIT})",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="length of free answers (default: 16)")
    p.add_argument("--extractive-tokens", type=int, default=6, help="length of extractive answers (default: 6)")
    p.add_argument(
        "--judge",
        default=None,
        help="judge model (HF name or path; 'default' = the embedded model); adds the judge readout",
    )
    p.add_argument("--batch-size", type=int, default=16)
    add_window(p)
    add_prompt(p)


@command("bridge", "readouts on natural vignettes: clean, degraded and under prompt interventions", _bridge_args)
def _bridge(args: argparse.Namespace) -> int:
    from dipreg.eval.readouts.bridge import run_bridge

    run_bridge(
        args.model,
        args.pairs,
        args.readouts,
        args.ops,
        args.interventions,
        args.out,
        limit=args.limit,
        batch_size=args.batch_size,
        window=args.window,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        extractive_tokens=args.extractive_tokens,
        judge=args.judge,
    )
    return 0


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lightning_args",
        nargs=argparse.REMAINDER,
        help="--recipe NAME | --config FILE, then any LightningCLI flag (--model.lr 1e-4, --trainer.max_steps 5); "
        "--model NAME selects the base model (default: the embedded SmolLM2-135M)",
    )


@command("fit", "LoRA SFT with pluggable auxiliary losses (LightningCLI over the recipes)", _fit_args)
def _fit(args: argparse.Namespace) -> int:
    from dipreg.fit import run_fit

    run_fit(args.lightning_args)
    return 0


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _arms_args(p: argparse.ArgumentParser) -> None:
    add_common(p, "runs/arms")
    p.add_argument("--arms", type=csv_list, default=None, help="output_only,late_only,dip_reg (default: all three)")
    p.add_argument(
        "--lambdas", type=_float_list, default=None, help="hinge weights; one dip_reg arm each (default 0.2)"
    )
    p.add_argument("--seeds", type=_int_list, default=None, help="training seeds (default: 0,1,2)")
    p.add_argument("--quick", action="store_true", help="CI-sized smoke run (a few steps, small sets; minutes)")
    p.add_argument("--steps", type=int, default=None, help="training steps per arm (default: the recipe's)")
    p.add_argument("--eval-pairs", default=None, help="evaluation set (default: strict240)")
    p.add_argument("--eval-limit", type=int, default=None, help="use only the first N evaluation pairs")
    p.add_argument(
        "--conditions", default=None, help="clean plus `dipreg degrade` ops (default: the paper's Table 4 set and more)"
    )
    p.add_argument("--monitor-every", type=int, default=None, help="DipMonitor cadence in steps (default 15)")


@command("arms", "train the recipe arms x seeds with the dip monitor, evaluate under compression, report", _arms_args)
def _arms(args: argparse.Namespace) -> int:
    from dipreg.eval.arms.runner import run_arms

    run_arms(
        args.model,
        args.arms,
        args.lambdas,
        args.seeds,
        quick=args.quick,
        out=args.out,
        max_steps=args.steps,
        eval_pairs=args.eval_pairs,
        eval_limit=args.eval_limit,
        conditions=args.conditions,
        monitor_every=args.monitor_every,
    )
    return 0


def _ladder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="BASE:INSTRUCT[,BASE:INSTRUCT...] (HF names or local paths)")
    p.add_argument("--out", default="runs/ladder", help="output folder (default: runs/ladder)")
    p.add_argument("--pairs", default="core", help="core | role_binding | FILE.jsonl (default: core)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--batch-size", type=int, default=16)
    add_prompt(p, "raw", "; base models have no chat template and both models must see the same text")
    p.add_argument("--no-w3", action="store_true", help="skip the instruct models' RTN-w3 accuracy (point size)")


@command("ladder", "base vs instruct causal-dip ladder: paired t over items, accuracy check, taxonomy", _ladder_args)
def _ladder(args: argparse.Namespace) -> int:
    from dipreg.eval.ladder import run_ladder

    run_ladder(
        args.models,
        args.pairs,
        args.out,
        prompt=args.prompt,
        batch_size=args.batch_size,
        limit=args.limit,
        w3=not args.no_w3,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dipreg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        # LightningCLI parses everything after `fit` (argparse would claim --help, --model, ...).
        args = argparse.Namespace(handler=_fit, lightning_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ModelLoadError, UnsupportedModelError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
