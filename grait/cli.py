"""`grait` command line: run a job, validate a data file, prepare the packaged model."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from tqdm import tqdm

from grait.config import METHODS, JobConfig
from grait.data import DataError, load_records
from grait.planning.hardware import compute_classes


def _set_path(tree: dict[str, Any], dotted: str, value: str) -> None:
    """`--set training.epochs=2`: the value is parsed as YAML (numbers, lists, booleans)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SystemExit(f"--set {dotted}: {key} is not a group")
    node[keys[-1]] = yaml.safe_load(value)


def _number(text: str) -> Any:
    """A number if `text` reads as one, else the text (the spec's validation names the field)."""
    try:
        return float(text)
    except ValueError:
        return text


def parse_budget(text: str) -> dict[str, Any]:
    """`--budget`: `auto`, a count (`12`) or a ratio (`ratio:4` = one refusal per 4 knowns).

    Returns the `knowledge` keys it sets; a ratio clears `n_idk` so the ratio rule applies.
    """
    value = text.strip().lower()
    if value == "auto":
        return {"n_idk": "auto"}
    if value.startswith("ratio:"):
        try:
            ratio = float(value.removeprefix("ratio:"))
        except ValueError:
            ratio = 0.0
        if not ratio > 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a ratio must be a number > 0, e.g. ratio:4"
            )
        return {"n_idk": None, "ik_idk_ratio": ratio}
    if value.isdigit():
        return {"n_idk": int(value)}
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected a count (12), auto, or ratio:R (e.g. ratio:4)"
    )


class _Bars:
    """One tqdm bar per stage, fed by pipeline events."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.stage = ""

    def __call__(self, event: Any) -> None:
        if event.kind == "stage_started":
            self._close()
            self.stage = event.stage
            self.bar = tqdm(desc=event.stage, total=None, unit="step", leave=True, file=sys.stderr)
        elif event.kind == "progress" and self.bar is not None and event.stage == self.stage:
            if event.total and self.bar.total != event.total:
                self.bar.total = event.total
            self.bar.n = event.done
            self.bar.refresh()
            if event.message:  # e.g. each budget an `auto` refusal budget tried
                tqdm.write(f"  {event.stage}: {event.message}", file=sys.stderr)
        elif event.kind == "stage_completed":
            self._close()
            tqdm.write(f"  {event.message}", file=sys.stderr)
        elif event.kind == "stage_skipped":
            tqdm.write(f"  {event.stage}: skipped ({event.message})", file=sys.stderr)
        elif event.kind == "warning":
            tqdm.write(f"  warning: {event.message}", file=sys.stderr)
        elif event.kind == "metrics" and event.stage != "training":
            text = event.message or json.dumps(event.data)
            tqdm.write(f"  {event.stage}: {text}", file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _job_config(args: argparse.Namespace) -> JobConfig | None:
    """The spec from YAML plus the command-line overrides (shared by `run` and `plan`)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if args.config:
        raw = yaml.safe_load(Path(args.config).read_text()) or {}
        base = Path(args.config).resolve().parent
    if args.train:
        raw["train"] = {"path": args.train}
    if args.eval:
        raw["evals"] = [{"path": p} for p in args.eval]
    if args.method:
        raw["method"] = args.method
    if args.model:
        raw["base_model"] = args.model
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.budget is not None:
        knowledge = raw.setdefault("knowledge", {})
        if not isinstance(knowledge, dict):
            raise SystemExit("--budget: the spec's knowledge is not a group")
        knowledge.update(args.budget)
    if args.refusal_bias is not None:
        decoding = raw.setdefault("decoding", {})
        if not isinstance(decoding, dict):
            raise SystemExit("--refusal-bias: the spec's decoding is not a group")
        value = args.refusal_bias.strip()
        decoding["refusal_bias"] = value if value == "auto" else _number(value)
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        _set_path(raw, key, value)
    for spec in [raw.get("train")] + list(raw.get("evals") or []):
        if isinstance(spec, dict) and "path" in spec and not Path(spec["path"]).is_absolute():
            spec["path"] = str((base / spec["path"]).resolve())
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        print(f"invalid job spec:\n{exc}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from grait.pipeline import run_pipeline  # heavy (torch): only when running

    config = _job_config(args)
    if config is None:
        return 2
    name = Path(args.config).stem if args.config else "run"
    run_dir = Path(args.run_dir or Path("runs") / f"{name}-{config.method}-seed{config.seed}")
    print(f"run directory: {run_dir}", file=sys.stderr)
    started = time.perf_counter()
    try:
        result = run_pipeline(config, run_dir, progress=_Bars())
    except DataError as exc:
        print(f"data error: {exc}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - started:.0f}s")
    print(f"adapter: {result.adapter_dir}")
    for key in ("report_md", "report_json", "report_plot", "operating_point_plot", "train_set"):
        if key in result.artifacts:
            print(f"{key.replace('_', ' ')}: {result.artifacts[key]}")
    for ev in result.report.get("evals", []):
        tuned = ev["models"][-1]
        ths = "n/a" if tuned["ths"] is None else f"{tuned['ths']:.3f}"
        print(
            f"  {ev['name']}: P_c={tuned['correct']:.3f} P_w={tuned['wrong']:.3f} "
            f"P_r={tuned['refused']:.3f} THS={ths}"
        )
    for w in result.warnings:
        print(f"warning ({w['code']}): {w['message']}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Predicted time and memory per stage; exit 3 when the job would not fit the class."""
    from grait.planning import PlanError, plan_config, render_plan

    config = _job_config(args)
    if config is None:
        return 2
    try:
        plan = plan_config(config, args.compute_class, known_share=args.known_share)
    except (PlanError, DataError) as exc:
        print(f"cannot plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else render_plan(plan))
    return 0 if plan.fits else 3


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        records = load_records(args.file, args.format)
    except DataError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    kinds = Counter(r.kind for r in records)
    options = Counter(len(r.options) for r in records if r.kind == "mcqa")
    print(
        f"valid: {len(records)} records ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})"
    )
    if options:
        print("options per question: " + ", ".join(f"{k}: {v}" for k, v in sorted(options.items())))
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from grait.models import prepare_model

    started = time.perf_counter()
    path = prepare_model(args.alias, force=args.force)
    print(f"{args.alias}: {path} ({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from grait.registry import describe_models

    for m in describe_models():
        state = "prepared" if m["prepared"] else ("installed" if m["installed"] else "missing")
        print(f"{m['id']}\t{state}\t{m['source']}\t{m['path']}")
    return 0


def cmd_config_defaults(args: argparse.Namespace) -> int:
    schema = JobConfig.model_validate({"train": {"path": "TRAIN.jsonl"}}).model_dump(mode="json")
    print(yaml.safe_dump(schema, sort_keys=False))
    return 0


def _spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="job spec YAML")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--model", help="base model alias, directory or hub id")
    p.add_argument("--train", help="training data file (overrides the spec)")
    p.add_argument("--eval", action="append", help="eval data file (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--budget",
        type=parse_budget,
        metavar="N|auto|ratio:R",
        help="refusal budget: a count of unknowns, auto (the largest whose over-refusal on a "
        "held-out slice stays within knowledge.auto.max_over_refusal), or ratio:R "
        "(one refusal per R kept known questions)",
    )
    p.add_argument(
        "--refusal-bias",
        metavar="B|auto",
        help="logit added to the refusal's first token at the first step (decoding."
        "refusal_bias; >0 refuses more), or auto (with --budget auto: chosen on its held-out "
        "slice for knowledge.auto.max_over_refusal)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a knob, e.g. training.epochs=2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grait", description="Refusal-aware instruction tuning (GRAIT)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a job spec (YAML) and print where the adapter and report are"
    )
    _spec_arguments(run)
    run.add_argument("--run-dir", help="where outputs go (rerun with the same dir resumes)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser(
        "plan",
        help="predict each stage's time and peak memory on a compute class (exit 3: won't fit)",
    )
    _spec_arguments(plan)
    plan.add_argument(
        "--compute-class", default="cpu", help="worker class: " + ", ".join(compute_classes())
    )
    plan.add_argument(
        "--known-share",
        type=float,
        default=0.5,
        help="share of training questions the base model is assumed to know",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True
    )
    validate = data.add_parser("validate", help="check a QA file and count its records")
    validate.add_argument("file")
    validate.add_argument(
        "--format",
        default="auto",
        choices=["auto", "canonical", "mmlu", "arc", "nq", "openai_chat"],
    )
    validate.set_defaults(func=cmd_validate)

    models = sub.add_parser("models", help="base models").add_subparsers(
        dest="models_command", required=True
    )
    prepare = models.add_parser(
        "prepare", help="convert the packaged GGUF model into the local cache once"
    )
    prepare.add_argument("alias", nargs="?", default="smollm2-135m-instruct")
    prepare.add_argument("--force", action="store_true")
    prepare.set_defaults(func=cmd_models_prepare)
    models.add_parser("list", help="known models and their state").set_defaults(
        func=cmd_models_list
    )

    config = sub.add_parser("config", help="job spec tools").add_subparsers(
        dest="config_command", required=True
    )
    config.add_parser("defaults", help="print every knob with its default").set_defaults(
        func=cmd_config_defaults
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
