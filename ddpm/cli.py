"""`python -m ddpm {prepare,classifier,fid-stats,train,sample,evaluate,compare,bench,recipe}`.

The DVC stage scripts in `stages/` call `ddpm.pipeline.entry.run_stage`, which runs the same workflow
functions as these commands.
Problems the user can fix (`UserError`) print one short message and exit 2 (a traceback only with
`--debug`); SIGINT/SIGTERM during training checkpoint and exit 128 + signal number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from ddpm.config import CompileMode, Config, EvaluateConfig, load_config
from ddpm.errors import UserError
from ddpm.pipeline.entry import configure_logging, exit_process, guarded, repo_root
from ddpm.pipeline.layout import Layout


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _cmd_prepare(cfg: Config, args) -> None:
    from ddpm.data.datasets import prepare

    _print_json(prepare(cfg, Layout.under(repo_root()).prepared))


def _cmd_classifier(cfg: Config, args) -> None:
    from ddpm.pipeline.classifier import classifier_stage

    _print_json(classifier_stage(cfg, Layout.under(repo_root())))


def _cmd_fid_stats(cfg: Config, args) -> None:
    from ddpm.pipeline.fid_stats import fid_stats_stage

    _print_json(fid_stats_stage(cfg, Layout.under(repo_root())))


def _cmd_train(cfg: Config, args) -> None:
    from ddpm.pipeline.train import train

    _print_json(train(cfg, Layout.under(repo_root())))


def _cmd_sample(cfg: Config, args) -> None:
    from ddpm.pipeline.sample import sample_cli, sample_stage

    if args.out is None:
        _print_json(sample_stage(cfg, Layout.under(repo_root())))
    else:
        sample_cli(cfg, args)


def _cmd_evaluate(cfg: Config, args) -> None:
    from ddpm.pipeline.evaluate import evaluate_stage

    sweep = None if args.guidance_sweep is None else _guidance_sweep(cfg, args.guidance_sweep)
    _print_json(evaluate_stage(cfg, Layout.under(repo_root()), sweep=sweep))


def _cmd_compare(cfg: Config, args) -> None:
    from ddpm.tracking.compare import compare_runs
    from ddpm.tracking.store import tracking_uri

    metrics = [m for m in (args.metrics or "").split(",") if m] or None
    print(compare_runs(args.experiment or cfg.tracking.experiment, tracking_uri(repo_root()),
                       run_ids=args.runs or None, markdown=args.markdown, metrics=metrics,
                       where=args.where, sort=args.sort))


def _cmd_bench(cfg: Config, args) -> None:
    from ddpm.pipeline.bench import bench_cli

    bench_cli(cfg, args)


def _cmd_recipe(cfg: Config, args) -> None:
    from ddpm.pipeline.recipe import run_recipe

    run_recipe(Path(args.path), cfg.to_dict(), args.set_params, args.queue, args.print_only)


def _ints(text: str) -> list[int]:
    """'128,256' -> [128, 256] (argparse type: a bad value is a usage error naming the option)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _positive(text: str) -> int:
    """One positive integer (argparse type)."""
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _guidance_sweep(cfg: Config, text: str) -> list[float]:
    """--guidance-sweep '0,1,2', checked by the rules of evaluate.guidance_sweep; errors name the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
        EvaluateConfig.model_validate({**cfg.evaluate.model_dump(), "guidance_sweep": values})
    except ValueError:  # a float() failure or pydantic's ValidationError (a ValueError)
        raise UserError(f"--guidance-sweep takes guidance scales >= 0 separated by commas, got {text!r}") from None
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm", description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="prepare the dataset into data/prepared/").set_defaults(fn=_cmd_prepare)
    sub.add_parser("classifier", help="train the evaluation classifier").set_defaults(fn=_cmd_classifier)
    sub.add_parser("fid-stats", help="Inception statistics of the training set").set_defaults(fn=_cmd_fid_stats)
    sub.add_parser("train", help="train (or resume) the diffusion model").set_defaults(fn=_cmd_train)
    s = sub.add_parser("sample", help="the sample stage, or with --out a grid of chosen classes")
    s.add_argument("--checkpoint", default="models/ema.pt")
    s.add_argument("--classes", help="class names or indices, comma-separated (default: all)")
    s.add_argument("--n", type=int, default=8, help="samples per class")
    s.add_argument("--guidance", type=float, help="guidance scale w (default: sample.guidance_scale)")
    s.add_argument("--sampler", choices=["ddpm", "ddim", "dpm_solver"], help="default: sample.sampler")
    s.add_argument("--steps", type=int, help="default: sample.steps")
    s.add_argument("--spacing", choices=["time", "logsnr"], help="default: sample.spacing")
    s.add_argument("--eta", type=float, help="DDIM eta (default: sample.eta)")
    s.add_argument("--seed", type=int, help="default: seed")
    s.add_argument("--out", help="write a PNG grid here instead of running the sample stage")
    s.set_defaults(fn=_cmd_sample)
    e = sub.add_parser("evaluate", help="metrics of the samples and the guidance sweep")
    e.add_argument("--guidance-sweep", help="comma-separated guidance scales (default: evaluate.guidance_sweep)")
    e.set_defaults(fn=_cmd_evaluate)
    c = sub.add_parser("compare", help="MLflow runs side by side: params that differ, final metrics")
    c.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    c.add_argument("runs", nargs="*", help="run ids (default: every run of the experiment)")
    c.add_argument("--markdown", action="store_true", help="a markdown table, one row per run (for the README)")
    c.add_argument("--metrics", help="comma-separated metric names to show (default: every final metric); "
                   "NAME@STEP is NAME's value at STEP, e.g. sweep/class_accuracy@200 (guidance 2)")
    c.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs whose param KEY equals VALUE (repeatable), e.g. sample.sampler=dpm_solver")
    c.add_argument("--sort", metavar="[-]METRIC", help="order runs by a final metric ('-' prefix: descending)")
    c.set_defaults(fn=_cmd_compare)
    b = sub.add_parser("bench", help="training and sampling throughput (optionally against diffusers)")
    b.add_argument("--batch-size", type=_ints, default=[128], help="one or more, comma-separated (default 128)")
    b.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--rounds", type=_positive, default=3, help="interleaved timed rounds; the median is reported")
    b.add_argument("--precision", default="all", help="fp32, bf16, fp16 or all (those the device supports)")
    b.add_argument("--compile", choices=["on", "off", "both"], default="off")
    b.add_argument("--compile-mode", choices=list(get_args(CompileMode)), default="default",
                   help="torch.compile mode (reduce-overhead / max-autotune use CUDA graphs on a GPU)")
    b.add_argument("--channels-last", choices=["on", "off", "both"], default="on", help="memory format (default on)")
    b.add_argument("--vs", choices=["diffusers"], help="also time diffusers' UNet2DModel, A/B interleaved")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--reference", action="store_true", help="the DDPM reference network, not params.yaml's")
    b.set_defaults(fn=_cmd_bench)
    r = sub.add_parser("recipe", help="run a recipe file of params overrides as `dvc exp run -S ...`")
    r.add_argument("path", help="a YAML file of overrides nested like params.yaml, e.g. recipes/quickstart.yaml")
    r.add_argument("-S", dest="set_params", action="append", default=[], metavar="KEY=VALUE",
                   help="add or replace an override (repeatable; DVC's grid syntax a,b queues a grid with --queue)")
    r.add_argument("--queue", action="store_true", help="queue the experiment(s) (dvc exp run --queue)")
    r.add_argument("--print", dest="print_only", action="store_true", help="print the command instead of running it")
    r.set_defaults(fn=_cmd_recipe)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, validate the params file, run one command."""
    args = _parser().parse_args(argv)
    root = repo_root()
    configure_logging()

    def go():
        params = Path(args.params)
        cfg = load_config(params if params.is_absolute() else root / params)
        args.fn(cfg, args)

    return guarded(go, args.debug)


if __name__ == "__main__":
    exit_process(main())
