"""The `dipreg` sub-commands: for each, the arguments it adds (defaults read from its run function) and how the
parsed arguments call that function. Importing this module registers them in :data:`~dipreg.cli.registry.COMMANDS`.
"""

from __future__ import annotations

import argparse

from dipreg.cli.options import (
    Defaults,
    csv_list,
    device_group,
    float_list,
    int_list,
    limit_arg,
    model_group,
    option,
    output_group,
    pair_sets_help,
    pairs_group,
    show,
)
from dipreg.cli.registry import RunFunction, command
from dipreg.models import DEFAULT_MODEL_NAME


def _audit_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.lenses import LENSES
    from dipreg.lenses.causal import DEFAULT_NEUTRAL_PROMPT
    from dipreg.lenses.tuned import CORPORA, DEFAULT_CORPUS

    model_group(p, run)
    pairs_group(p, run, pairs_help=pair_sets_help())
    group = p.add_argument_group("lenses")
    option(
        group,
        "--lens",
        type=csv_list,
        default=list(Defaults(run)["lenses"]),
        help=f"comma-separated, from {', '.join(LENSES)}",
    )
    option(
        group,
        "--tuned-lens",
        none=DEFAULT_CORPUS,
        help=f"for --lens tuned: a trained lens (file or folder), or {' | '.join(CORPORA)} for the one "
        "`dipreg tuned-lens train` wrote to its default location",
    )
    option(
        group,
        "--neutral-prompt",
        none=f"the patchscope identity prompt {DEFAULT_NEUTRAL_PROMPT!r}",
        help="for --lens causal: the neutral decoding context whose last token receives the patch ('\\n' = newline)",
    )
    output_group(p, run)


def _lens_options(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    from dipreg.lenses.tuned import tuned_lens_options

    causal = {} if args.neutral_prompt is None else {"neutral_prompt": args.neutral_prompt.replace("\\n", "\n")}
    return {"tuned": tuned_lens_options(args.tuned_lens), "causal": causal}


@command(
    "audit",
    "layer-wise DiD trajectories, dips and commit depths of a pair set",
    "dipreg.audit:run_audit",
    _audit_args,
)
def _audit(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
        args.model,
        args.pairs,
        args.lens,
        args.out,
        batch_size=args.batch_size,
        window=args.window,
        prompt=args.prompt,
        lens_options=_lens_options(args),
    )


def _bench_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.bench import SECTIONS
    from dipreg.bench.run import OPT_IN, section_names

    given = Defaults(run)
    model_group(p, run)
    pairs_group(p, run, pairs_help=f"pair set to time on: {pair_sets_help()}", window=False, prompt=False)
    group = p.add_argument_group("timing")
    option(
        group, "--repeats", type=int, default=given["repeats"], help="timed repetitions per measurement (median kept)"
    )
    option(group, "--naive-pairs", type=int, default=given["naive_pairs"], help="pairs for the slow naive references")
    option(
        group,
        "--only",
        type=csv_list,
        default=given["sections"],
        none=f"all but the opt-in ones: {','.join(section_names())}",
        help=f"comma-separated sections, from {', '.join(SECTIONS)}; opt-in, run only when named here: "
        + "; ".join(f"{name} ({why})" for name, why in OPT_IN.items()),
    )
    group = p.add_argument_group("peers (needs the peers extra)")
    option(
        group,
        "--peers",
        action="store_true",
        default=given["peers"],
        help="add the peers section: dipreg's lenses next to TransformerLens, nnsight and nnterp",
    )
    option(group, "--peers-pairs", type=int, default=given["peers_pairs"], help="pairs the peers are timed on")
    output_group(p, run)


@command(
    "bench",
    "speed and memory ratios against references measured in the same run",
    "dipreg.bench.run:run_bench",
    _bench_args,
)
def _bench(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
        args.model,
        args.pairs,
        args.out,
        repeats=args.repeats,
        batch_size=args.batch_size,
        naive_pairs=args.naive_pairs,
        sections=args.only,
        peers=args.peers,
        peers_pairs=args.peers_pairs,
    )


def _tuned_lens_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.lenses.tuned import CORPORA
    from dipreg.lenses.tuned_training import TrainSettings

    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser(
        "train", help="fit the translators and save them", description="train: fit the translators and save them"
    )
    settings = Defaults(TrainSettings)
    model_group(train, run)
    group = train.add_argument_group("training")
    option(group, "--corpus", required=True, help=f"{' | '.join(CORPORA)} | FILE (one document per line)")
    option(group, "--steps", type=int, default=settings["steps"], help="optimizer steps")
    option(group, "--lr", type=float, default=settings["lr"], help="Adam learning rate")
    option(
        group, "--max-sequences", type=int, default=settings["max_sequences"], help="sequences drawn from the corpus"
    )
    option(
        group,
        "--positions",
        type=int,
        default=settings["positions_per_sequence"],
        help="training positions: the last K tokens of each text",
    )
    option(
        group,
        "--vocab-top-k",
        type=int,
        default=settings["vocab_top_k"],
        help="KL over the union of each position's top-k final tokens; 0 = full vocabulary",
    )
    option(group, "--seed", type=int, default=settings["seed"], help="seeds sampling, the corpus subset and batches")
    output_group(train, run, none="<cache>/tuned-lens/<model-id>/<corpus>")


@command(
    "tuned-lens",
    "train a tuned lens (one affine translator per layer) on a corpus",
    "dipreg.lenses.tuned_training:run_tuned_lens_train",
    _tuned_lens_args,
)
def _tuned_lens(run: RunFunction, args: argparse.Namespace) -> object:
    from dipreg.lenses.tuned_training import TrainSettings

    settings = TrainSettings(
        steps=args.steps,
        lr=args.lr,
        max_sequences=args.max_sequences,
        positions_per_sequence=args.positions,
        vocab_top_k=args.vocab_top_k,
        seed=args.seed,
    )
    return run(args.model, args.corpus, args.out, settings)


def _degrade_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.eval.degradation.operators import OPERATORS
    from dipreg.eval.degradation.presets import PRESETS

    model_group(p, run)
    pairs_group(p, run, pairs_help=pair_sets_help())
    group = p.add_argument_group("degradations")
    option(
        group,
        "--ops",
        default=Defaults(run)["ops"],
        help=f"comma-separated operators op:key=value, op from {', '.join(OPERATORS)}; or a preset name "
        f"({', '.join(PRESETS)}), alone or among the operators",
    )
    output_group(p, run)


@command(
    "degrade",
    "flips under weight/structural degradations, stratified by intact dip and margin",
    "dipreg.eval.degradation.report:run_degrade",
    _degrade_args,
)
def _degrade(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
        args.model,
        args.pairs,
        args.ops,
        args.out,
        batch_size=args.batch_size,
        window=args.window,
        prompt=args.prompt,
    )


def _bridge_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.eval.readouts.interventions import INTERVENTIONS
    from dipreg.eval.readouts.readout import READOUTS
    from dipreg.prompting import SINGLE_CONTEXT_STYLES
    from dipreg.stimuli import VIGNETTE_SETS

    given = Defaults(run)
    model_group(p, run)
    group = pairs_group(
        p,
        run,
        pairs="pairs",
        pairs_help=f"vignette set(s), comma-separated: {' | '.join(VIGNETTE_SETS)}",
        styles=SINGLE_CONTEXT_STYLES,
    )
    option(
        group,
        "--limit",
        type=limit_arg,
        default=given["limit"],
        none="all",
        help="a balanced subset of N vignettes; 0 = all",
    )
    group = p.add_argument_group("readouts and conditions")
    option(
        group,
        "--readouts",
        type=csv_list,
        default=list(given["readouts"]),
        help=f"comma-separated, from {', '.join(READOUTS)}",
    )
    option(
        group,
        "--ops",
        default=given["ops"],
        help="degradations, as for dipreg degrade (ops or a preset name); '' for none",
    )
    option(
        group,
        "--interventions",
        type=csv_list,
        default=list(given["interventions"]),
        help=f"comma-separated prompt interventions, from {', '.join(INTERVENTIONS)}",
    )
    option(group, "--max-new-tokens", type=int, default=given["max_new_tokens"], help="length of free answers")
    option(
        group, "--extractive-tokens", type=int, default=given["extractive_tokens"], help="length of extractive answers"
    )
    option(
        group,
        "--judge",
        default=given["judge"],
        none="no judge",
        help="judge model (HF name or path; 'default' = the embedded model); adds the judge readout",
    )
    output_group(p, run)


@command(
    "bridge",
    "readouts on natural vignettes: clean, degraded and under prompt interventions",
    "dipreg.eval.readouts.bridge:run_bridge",
    _bridge_args,
)
def _bridge(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
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


def _fit_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    p.add_argument(
        "lightning_args",
        nargs=argparse.REMAINDER,
        help="--recipe NAME | --config FILE, then any LightningCLI flag (--model.lr 1e-4, --trainer.max_steps 5); "
        f"--model NAME selects the base model (default: the embedded {DEFAULT_MODEL_NAME})",
    )


@command(
    "fit",
    "LoRA SFT with pluggable auxiliary losses (LightningCLI over the recipes)",
    "dipreg.training.fit:run_fit",
    _fit_args,
)
def _fit(run: RunFunction, args: argparse.Namespace) -> object:
    return run(args.lightning_args)


def _arms_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    # Only the module of run_arms knows its seed and λ defaults; importing it imports Lightning (arms only).
    from dipreg.eval.arms.plan import ARM_RECIPES, DEFAULT_ARMS, ArmsSettings
    from dipreg.eval.arms.runner import DEFAULT_LAMBDAS, DEFAULT_SEEDS

    given = Defaults(run)
    full, quick = ArmsSettings(), ArmsSettings.quick()

    def setting(name: str, none: str = "") -> str:
        """What an unset override means: the ArmsSettings field, and its --quick value where that differs."""
        value, quick_value = getattr(full, name), getattr(quick, name)
        text = none if value is None else show(value)
        if quick_value != value:
            text += f"; with --quick: {none if quick_value is None else show(quick_value)}"
        return text

    model_group(p, run)
    group = p.add_argument_group("arms and seeds")
    option(
        group,
        "--arms",
        type=csv_list,
        default=given["arms"],
        none=show(DEFAULT_ARMS),
        help=f"comma-separated, from {', '.join(ARM_RECIPES)}",
    )
    option(
        group,
        "--lambdas",
        type=float_list,
        default=given["lambdas"],
        none=show(DEFAULT_LAMBDAS),
        help="hinge weights; one arm each per hinge arm (dip_reg, dip_reg_causal, dip_reg_tuned)",
    )
    option(group, "--seeds", type=int_list, default=given["seeds"], none=show(DEFAULT_SEEDS), help="training seeds")
    option(
        group,
        "--quick",
        action="store_true",
        default=given["quick"],
        help="CI-sized smoke run (a few steps, small sets; minutes)",
    )
    group = p.add_argument_group("settings (unset: the full run's value, or --quick's)")
    option(group, "--steps", type=int, none=setting("max_steps", "the recipe's"), help="training steps per arm")
    option(group, "--eval-pairs", none=setting("eval_pairs"), help="evaluation set")
    option(
        group, "--eval-limit", type=int, none=setting("eval_limit", "all"), help="use only the first N evaluation pairs"
    )
    option(
        group,
        "--conditions",
        none=setting("conditions"),
        help="clean plus `dipreg degrade` ops or preset names (the default: clean plus the arms preset)",
    )
    option(group, "--monitor-every", type=int, none=setting("monitor_every"), help="DipMonitor cadence in steps")
    output_group(p, run)


@command(
    "arms",
    "train the recipe arms x seeds with the dip monitor, evaluate under compression, report",
    "dipreg.eval.arms.runner:run_arms",
    _arms_args,
)
def _arms(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
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


def _ladder_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    given = Defaults(run)
    group = p.add_argument_group("model")
    option(group, "--models", required=True, help="BASE:INSTRUCT[,BASE:INSTRUCT...] (HF names or local paths)")
    device_group(p)
    why = "; base models have no chat template and both models must see the same text"
    group = pairs_group(p, run, pairs_help=pair_sets_help(), window=False, prompt_why=why)
    option(group, "--limit", type=int, default=given["limit"], none="all", help="use only the first N pairs")
    group = p.add_argument_group("ladder")
    option(
        group,
        "--no-w3",
        dest="w3",
        action="store_false",
        default=given["w3"],
        help="skip the instruct models' RTN-w3 accuracy (point size)",
    )
    output_group(p, run)


@command(
    "ladder",
    "base vs instruct causal-dip ladder: paired t over items, accuracy check, taxonomy",
    "dipreg.eval.ladder:run_ladder",
    _ladder_args,
)
def _ladder(run: RunFunction, args: argparse.Namespace) -> object:
    return run(
        args.models,
        args.pairs,
        args.out,
        prompt=args.prompt,
        batch_size=args.batch_size,
        limit=args.limit,
        w3=args.w3,
    )


def _prompt_styles_args(p: argparse.ArgumentParser, run: RunFunction) -> None:
    from dipreg.prompting import PROMPT_STYLES

    given = Defaults(run)
    model_group(p, run)
    group = p.add_argument_group("sets and styles")
    option(
        group,
        "--sets",
        type=csv_list,
        default=list(given["sets"]),
        help=f"comma-separated pair sets: {pair_sets_help()} | vignettes (as label-readout pairs)",
    )
    styles = ", ".join(PROMPT_STYLES)
    option(group, "--styles", type=csv_list, default=list(given["styles"]), help=f"comma-separated, from {styles}")
    option(group, "--shots", type=int, default=given["shots"], help="worked examples per item (fewshot)")
    option(group, "--batch-size", metavar="N", type=int, default=given["batch_size"], help="contexts per forward pass")
    output_group(p, run)


@command(
    "prompt-styles",
    "accuracy, strict accuracy and answer shares of every pair set under each prompt style (logit lens)",
    "dipreg.prompt_styles:run_prompt_styles",
    _prompt_styles_args,
)
def _prompt_styles(run: RunFunction, args: argparse.Namespace) -> object:
    return run(args.model, args.sets, args.styles, args.out, batch_size=args.batch_size, shots=args.shots)
