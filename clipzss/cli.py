"""The ``clipzss`` console command.

clipzss train [CONFIG] [key=value ...] [--resume]      train (same as accelerate launch clipzss/train.py)
clipzss prepare DATASET --root DIR                     download + convert a dataset (or generate 'synthetic')
clipzss validate DATASET --root DIR                    report every problem in a dataset root at once
clipzss eval --checkpoint CKPT | --model URI [DATASET --root DIR]   zero-shot / cross-dataset evaluation
clipzss segment IMAGE... --checkpoint CKPT | --model runs:/RUN/student --classes "cat,grass,sky"
clipzss export --checkpoint CKPT | --model URI --classes "a,b" --out DIR   ONNX model + vocabulary + loader
clipzss ablate [--seeds 3]                             the synthetic ablation benchmark (table -> MLflow)
clipzss bench                                          speed figures (K-Means, training step, inference)
clipzss reliability [--out DIR]                        replay crashes, outages, races and bad input: fault -> outcome
clipzss sync RUN_DIR                                   deliver a run's spooled MLflow records (after an outage)
clipzss pretrain-teacher --out DIR                     regenerate the synthetic world's tiny CLIP teacher

A failure prints one ``error: ...`` line and exits 1; ``--debug`` (or CLIPZSS_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipzss.bench import add_arguments as add_bench_arguments
from clipzss.bench import run_from_args as bench_from_args
from clipzss.cli_errors import DEBUG_FLAG, DEBUG_HELP, run_reporting_errors
from clipzss.data.images import DEFAULT_MAX_PIXELS


def _prepare(args: argparse.Namespace) -> int:
    if args.dataset == "synthetic":
        from clipzss.data.synthetic import materialize_world

        print(materialize_world(args.root))
        return 0
    from clipzss.data.prepare import prepare

    print(prepare(args.dataset, args.root, download=not args.no_download))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from clipzss.data.validate import format_problems, validate_dataset

    problems = validate_dataset(args.dataset, args.root, args.split)
    print(format_problems(problems))
    return 1 if problems else 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from clipzss.config import set_value
    from clipzss.data.datasets import build_dataset
    from clipzss.engine.evaluate import evaluate
    from clipzss.metrics import format_table

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    segmenter = _segmenter(args, device)
    cfg = segmenter.cfg
    for item in args.set or []:
        key, _, value = item.partition("=")
        set_value(cfg, key, yaml.safe_load(value), source="--set")
    dataset = args.dataset or cfg.data.dataset
    root = args.root or (cfg.data.root if dataset == cfg.data.dataset else None)
    if root is None:
        raise SystemExit(f"--root is required to evaluate on {dataset!r}")
    split = args.split or (cfg.data.split if dataset == cfg.data.dataset else "default")
    val_set = build_dataset(cfg.data, "val", dataset=dataset, root=root, split=split)
    segmenter.set_vocabulary(val_set.class_names)
    metrics, _ = evaluate(segmenter.student, val_set, segmenter.text, segmenter.alpha, cfg.data, segmenter.device)
    print(format_table(metrics, val_set.class_names, val_set.unseen_ids))
    return 0


def _segmenter(args: argparse.Namespace, device: str = "cpu"):
    """The segmenter of ``--checkpoint`` or ``--model`` (in ``--tracking-uri``'s store)."""
    from clipzss.engine.segmenter import OpenVocabSegmenter

    return OpenVocabSegmenter.load(args.checkpoint, args.model, args.tracking_uri, args.trust_pickle, device)


def _segment(args: argparse.Namespace) -> int:
    from clipzss.data.images import ImageModeError, ImageReadError

    segmenter = _segmenter(args)
    segmenter.set_vocabulary(args.classes.split(","))
    failed = []
    for image in args.images:
        try:
            print(segmenter.segment_file(image, args.out, args.max_pixels))
        except (ImageReadError, ImageModeError) as e:  # the other images are still worth segmenting
            if len(args.images) == 1:
                raise
            print(f"skipped: {e}", file=sys.stderr)
            failed.append(str(e))
    if failed:
        raise ImageReadError(
            f"{len(failed)} of {len(args.images)} image(s) could not be segmented:\n  " + "\n  ".join(failed)
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from clipzss.export import export_segmenter

    export_segmenter(_segmenter(args), args.classes.split(","), args.out)
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from clipzss.ablation import ARMS, AblationError, run_ablation

    arms = args.arms.split(",") if args.arms else list(ARMS)
    try:
        run_ablation(args.seeds, args.out, args.quick, args.set or [], arms, args.jobs, args.select,
                     register_as=args.register_as)  # fmt: skip
    except AblationError as e:  # each failed run's traceback was printed as it failed
        print(f"clipzss ablate: {e}", file=sys.stderr)
        return 1
    return 0


def _reliability(args: argparse.Namespace) -> int:
    from clipzss.reliability import run_reliability

    outcomes = run_reliability(args.out)
    return 0 if all(o.survived and o.lost == 0 for o in outcomes) else 1


def _sync(args: argparse.Namespace) -> int:
    from clipzss.train import deliver_spooled

    left = deliver_spooled(args.run_dir, wait=args.wait)
    return 1 if left else 0


def _pretrain_teacher(args: argparse.Namespace) -> int:
    from clipzss.synthetic_clip import main as pretrain_main

    return pretrain_main(["--out", args.out])


def _pixels(text: str) -> int:
    """A pixel count as typed: ``40000000``, ``4e7`` or ``40M``."""
    scale = 1_000_000 if text[-1:] in "mM" else 1
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r} (e.g. 100000000, 1e8 or 100M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text!r}")
    return value


def _add_model_source(p: argparse.ArgumentParser) -> None:
    """``--checkpoint FILE`` or ``--model URI`` (with its store), and the opt-in for pickled MLflow models."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="an exported model.pt or a training checkpoint")
    source.add_argument(
        "--model", help="an MLflow model URI logged by training: runs:/<run id>/student, models:/<name>/<version>"
    )
    p.add_argument("--tracking-uri", help="MLflow store of --model (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a --model logged as a pickled PyTorch module (mlflow.pytorch): unpickling runs whatever code "
        "the pickle carries, so only for a store that no one else can write to",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    parser = argparse.ArgumentParser(
        prog="clipzss", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, parents=[common]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = sub.add_parser("train", help="train a CLIP-ZSS student", add_help=False)  # train.py parses the rest
    p.set_defaults(func=None)

    p = command("prepare", help="download and convert a dataset into its mmseg layout")
    p.add_argument("dataset")
    p.add_argument("--root", required=True)
    p.add_argument("--no-download", action="store_true", help="convert archives already in --root only")
    p.set_defaults(func=_prepare)

    p = command("validate", help="scan a dataset root and report every problem with its file")
    p.add_argument("dataset")
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="default")
    p.set_defaults(func=_validate)

    p = command("eval", help="evaluate a checkpoint on a dataset's zero-shot split or another vocabulary")
    p.add_argument("dataset", nargs="?", help="default: the checkpoint's training dataset")
    _add_model_source(p)
    p.add_argument("--root", help="dataset root (default: the checkpoint's data.root for its own dataset)")
    p.add_argument("--split", help="zero-shot split name (default: the checkpoint's, or the dataset's default)")
    p.add_argument("--set", nargs="*", help="config overrides for evaluation, e.g. data.test_stride=256")
    p.add_argument("--cpu", action="store_true")
    p.set_defaults(func=_eval)

    p = command("segment", help="segment images with any vocabulary (student only)")
    p.add_argument("images", nargs="+")
    _add_model_source(p)
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,grass,sky"')
    p.add_argument("--out", default="segmentations")
    p.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS / 1e6:g}M; checked before decoding)",
    )
    p.set_defaults(func=_segment)

    p = command("export", help="export the student + a vocabulary as an ONNX model with its loader")
    _add_model_source(p)
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,grass,sky"')
    p.add_argument("--out", required=True, help="folder for model.onnx, deploy.json and segment.py")
    p.set_defaults(func=_export)

    p = command("ablate", help="synthetic ablation benchmark: baseline, +GLM, +PLM, full, supervised")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--quick", action="store_true", help="CI-sized: a few steps per arm, checks the mechanics")
    p.add_argument("--set", nargs="*", help="overrides applied to every arm")
    p.add_argument("--arms", help="comma-separated subset of: baseline,+GLM,+PLM,full,supervised (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="train this many arm x seed runs at once (subprocesses)")
    p.add_argument("--select", action="store_true", help="evaluate on the selection split (choose; report on val)")
    p.add_argument("--register-as", default="", help="registered model of the best student (default: clipzss-EXP)")
    p.set_defaults(func=_ablate)

    p = command("bench", help="print speed figures measured on this machine (and log them to MLflow)")
    add_bench_arguments(p)
    p.set_defaults(func=bench_from_args)

    p = command("reliability", help="replay faults against a real tiny training; print fault -> outcome")
    p.add_argument("--out", help="workspace for the runs (default: a new temporary folder)")
    p.set_defaults(func=_reliability)

    p = command("sync", help="deliver a run's spooled MLflow records once the server answers again")
    p.add_argument("run_dir")
    p.add_argument("--wait", type=float, default=60.0, help="give up after this many seconds (records stay spooled)")
    p.set_defaults(func=_sync)

    p = command("pretrain-teacher", help="regenerate the synthetic world's tiny CLIP teacher")
    p.add_argument("--out", default="clipzss/assets")
    p.set_defaults(func=_pretrain_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a failure prints one ``error: ...`` line and returns 1 (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from clipzss.train import main as train_main

        return run_reporting_errors(lambda: train_main(argv[1:]), argv)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
