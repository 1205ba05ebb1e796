"""``recsys train | evaluate | models`` (mounted by cli.main).

``register(subparsers)`` adds the subcommands; each handler takes the argparse Namespace
and returns an exit code. Errors print one line on stderr and return 2; the registry is
never touched by a failed run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _source_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--source", required=required,
                   help="archive | synthetic[:events=N,...] | movielens:DIR | csv:PATH")
    p.add_argument("--user-col", default="user_id", help="csv: the user column")
    p.add_argument("--item-col", default="item_id", help="csv: the item column")
    p.add_argument("--ts-col", default="timestamp", help="csv: the timestamp column (seconds or ms)")


def fail(command: str, exc: BaseException) -> int:
    from recsys.errors import RecsysError
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"recsys {command}: {msg}", file=sys.stderr)
    return exc.exit_code if isinstance(exc, RecsysError) else 2


def known_errors():
    """Errors of bad input met while training or evaluating: one line and exit 2, not a traceback.
    Beside the project's own family, numpy's and pyarrow's ValueErrors on malformed data."""
    from pydantic import ValidationError

    from recsys.errors import RecsysError
    return (RecsysError, ValidationError, FileNotFoundError, ValueError)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _teacher_folder(value: str) -> Path:
    """--distill-from: a version name (v0003, 3, current, previous) in the registry, else a folder."""
    import re

    from recsys.registry import Registry
    from recsys.settings import get_settings
    if re.fullmatch(r"v\d{4,}|\d+|current|previous", value) and not Path(value).is_dir():
        return Registry(get_settings().registry_dir).path(value)
    return Path(value)


def cmd_train(args) -> int:
    from recsys.evaluation import figure
    from recsys.settings import get_settings
    from training.job import TUNING_GRID, train
    try:
        overrides = json.loads(args.config) if args.config else {}
        teacher = _teacher_folder(args.distill_from) if args.distill_from else None
        card = train(args.source, workers=args.workers, epochs=args.epochs, use_gpu=args.use_gpu,
                     tune_grid=TUNING_GRID if args.tune else None, progress=progress,
                     mixed_precision=args.mixed_precision, settings=get_settings(), model_config=overrides,
                     max_failures=args.max_failures, resume_from=Path(args.resume_from) if args.resume_from else None,
                     promote=not args.no_promote, teacher=teacher,
                     user_col=args.user_col, item_col=args.item_col, ts_col=args.ts_col)
    except known_errors() as exc:
        return fail("train", exc)
    if args.json:
        print(json.dumps(card, default=str))
    else:
        m = card["metrics"]
        print(f"published {card['version']}: two-tower HR@10 {m['two_tower']['hr@10']:.4f} "
              f"NDCG@10 {m['two_tower']['ndcg@10']:.4f} | popularity {m['popularity']['hr@10']:.4f} "
              f"item-kNN {figure(m['itemknn'])} EASE {figure(m['ease'])} "
              f"recency-weighted EASE {figure(m['recency_ease'])} session-kNN {figure(m['session_knn'])} (test targets, protocol "
              f"{card['data_window']['protocol']}; settings chosen on validation"
              f"{'' if isinstance(card['tuning'], dict) else ', the two-tower config as given'})")
        print(seen_policy_line(card["seen_policy"]))
        print(json.dumps(card, default=str))
    return 0


def seen_policy_line(policy: dict) -> str:
    """The card's seen policy in words: chosen on validation (each candidate's HR@10) or fixed."""
    if "validation" not in policy:
        return f"seen policy {policy['chosen']} (not chosen: {policy['why']})"
    val = ", ".join(f"{name} {m['hr@10']:.4f}" for name, m in policy["validation"].items())
    test = ", ".join(f"{name} {m['hr@10']:.4f}" for name, m in policy["test"].items())
    return f"seen policy {policy['chosen']}: protocol R validation HR@10 {val}; test HR@10 {test}"


def cmd_evaluate(args) -> int:
    from recsys.registry import Registry
    from recsys.settings import get_settings
    from training.job import evaluate_version
    try:
        reg = Registry(get_settings().registry_dir)
        folder = reg.path(args.model)
        result = evaluate_version(folder, args.source, get_settings(), args.user_col, args.item_col, args.ts_col)
    except known_errors() as exc:
        return fail("evaluate", exc)
    print(json.dumps(result, default=str) if args.json else json.dumps(result, indent=1, default=str))
    return 0


def cmd_models(args) -> int:
    from recsys.registry import Registry, RegistryError
    from recsys.settings import get_settings
    reg = Registry(get_settings().registry_dir)
    try:
        if args.action == "list":
            out = reg.summary()
        elif args.action == "show":
            out = reg.show(args.version or "current")
        elif args.action == "promote":
            if not args.version:
                raise RegistryError("promote: give a version")
            out = reg.promote(args.version)
        elif args.action == "candidate":
            if not args.version:
                raise RegistryError("candidate: give a version")
            out = reg.start_experiment(args.version, args.share, shadow=args.shadow)
        elif args.action == "stop":
            out = reg.end_experiment()
        elif args.action == "history":
            from training.scheduler import read_history
            out = read_history(get_settings())
            if not args.json:
                print(format_history(out))
                return 0
        else:
            out = reg.rollback()
    except RegistryError as exc:
        return fail("models", exc)
    print(json.dumps(out, default=str) if args.json else json.dumps(out, indent=1, default=str))
    return 0


def format_history(runs: list[dict]) -> str:
    """The retraining runs as a table, oldest first."""
    rows = [("started", "trigger", "decision", "candidate", "HR@10", "current", "HR@10", "seconds", "reason")]
    for r in runs:
        cand, cur = r.get("candidate") or {}, r.get("current") or {}
        rows.append((r["started_at"], r["trigger"], r["decision"], cand.get("version", "-"),
                     f"{cand['hr@10']:.4f}" if "hr@10" in cand else "-", cur.get("version", "-"),
                     f"{cur['hr@10']:.4f}" if "hr@10" in cur else "-", str(r.get("duration_s", "-")), r["reason"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the two-tower model on Ray Train, evaluate it, publish it")
    _source_options(p)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the model config's)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL collectives")
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (GPUs only)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("--resume-from", default=None, metavar="CHECKPOINT_DIR", help="resume from a checkpoint folder")
    p.add_argument("--config", default=None, help='model config overrides as JSON, e.g. \'{"dim": 32}\'')
    p.add_argument("--no-promote", action="store_true", help="publish without making it current")
    p.add_argument("--distill-from", default=None, metavar="VERSION_OR_PATH",
                   help="distill from a published teacher: a registry version (v0003, current) or a version "
                        "folder; --config's distill_weight (its share of the loss, 0.5 when left at 0) and "
                        "distill_temperature (default 1)")
    p.add_argument("--tune", action="store_true",
                   help="first choose dim, temperature and history on the validation targets (8 trainings)")
    p.add_argument("--json", action="store_true", help="print only the model card, one JSON line")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="evaluate a published model beside the baselines")
    p.add_argument("--model", default="current", help="VERSION | current | previous")
    _source_options(p)
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("models", help="the model registry: list | show V | promote V | rollback | history | "
                                              "candidate V --share S [--shadow] | stop (the experiment)")
    p.add_argument("action", choices=["list", "show", "promote", "rollback", "history", "candidate", "stop"])
    p.add_argument("version", nargs="?", default=None)
    p.add_argument("--share", type=float, default=0.5,
                   help="candidate: the share of users (a stable hash of their pseudonym) in its arm (default 0.5)")
    p.add_argument("--shadow", action="store_true",
                   help="candidate: compute its list for that share beside the served one, never serve it "
                        "(recsys_shadow_overlap, recsys_shadow_latency_ms)")
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_models)

