"""``recsys loadtest``: the peak-season load test against the running Serve app.

``register(subparsers)`` adds the subcommand to the ``recsys`` parser; ``python -m loadtest.cli``
runs it on its own. Exit code 0 when every SLO passes, 1 when one fails, 2 when the test
could not run (no app answering, Locust failed to start).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from loadtest.shapes import PROFILES, Profile, get_profile


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of shoppers, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def chosen_profile(name: str, peak_users: int | None = None) -> Profile:
    """The named profile; with ``peak_users``, its shape with that many shoppers at the peak
    (the capacity search of ``--peak-users``)."""
    profile = get_profile(name)
    return profile if peak_users is None else dataclasses.replace(profile, peak=peak_users)


def handler(args: argparse.Namespace) -> int:
    from loadtest import report, runner
    from recsys.settings import get_settings
    from lab.serve_local import base_url

    settings = get_settings()
    profile = chosen_profile(args.profile, args.peak_users)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    opts = runner.Options(
        profile=profile, host=(args.host or base_url(settings)).rstrip("/"),
        out=Path(args.out) if args.out else runner.default_out(profile.name),
        with_stream_worker=args.with_stream_worker,
        budgets=report.Budgets(p99_ms=args.p99_budget_ms, max_error_rate=args.max_error_rate),
        cooldown_max_s=args.cooldown_max_s, catchup_idle_s=args.catchup_idle_s,
        stop_stream_worker_after_s=args.stop_stream_worker_after)
    try:
        summary = runner.run(settings, opts, progress=log)
    except runner.LoadTestError as exc:
        print(f"recsys loadtest: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        h = summary["headline"]
        print(f"profile {args.profile}: {'PASS' if summary['passed'] else 'FAIL'}")
        for slo in summary["slos"]:
            print(f"  {'PASS' if slo['passed'] else 'FAIL'}  {slo['name']}: {json.dumps(slo['measured'])} "
                  f"(threshold {json.dumps(slo['threshold'])}; {slo['detail']})")
        print(f"  peak {h['peak_rps_5s']} req/s (5 s mean), p50/p99 at peak {h['peak_p50_ms']}/{h['peak_p99_ms']} ms, "
              f"replicas {h['replicas']['start']} -> {h['replicas']['max']} -> {h['replicas']['final']}, "
              f"first new replica {h['surge_to_first_new_replica_s']} s after the surge's start")
        print(f"  report: {summary['files']['folder']}")
    return 0 if summary["passed"] else 1


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("loadtest", help="peak-season Locust load test against the running Serve app, with SLO checks",
                              description="Runs Locust headless with a peak-season shape against the Serve app, samples "
                                          "Serve's replicas every second, checks that every accepted event reached Redis, "
                                          "and writes a report folder (Locust HTML/CSV, timeline, plot, summary.json). "
                                          "Exit 0 if every SLO passes, 1 otherwise.")
    p.add_argument("--profile", default="smoke", choices=sorted(PROFILES),
                   help="load profile (loadtest/shapes.py): smoke (<2 min) or peak (~8.5 min)")
    p.add_argument("--peak-users", dest="peak_users", type=_positive_int, default=None, metavar="N",
                   help="the profile's shoppers at the sustained peak (default: the profile's own)")
    p.add_argument("--host", default=None, help="base URL of the app (default: the settings' Serve address)")
    p.add_argument("--out", default=None, help="report folder (default reports/loadtest-<profile>-<UTC timestamp>/)")
    p.add_argument("--json", action="store_true", help="print summary.json as one JSON line (progress goes to stderr)")
    p.add_argument("--with-stream-worker", dest="with_stream_worker", action="store_true", default=True,
                   help="run a stream worker in this process for the test's duration (the default)")
    p.add_argument("--no-stream-worker", dest="with_stream_worker", action="store_false",
                   help="rely on an external stream worker (`recsys stream`) instead")
    p.add_argument("--p99-budget-ms", type=float, default=500.0, help="p99 latency budget during the sustained peak")
    p.add_argument("--max-error-rate", type=float, default=0.001, help="largest failed/all ratio that passes")
    p.add_argument("--cooldown-max-s", type=float, default=45.0,
                   help="after the load, wait at most this long for the replicas back at the minimum")
    p.add_argument("--catchup-idle-s", type=float, default=10.0,
                   help="the nothing-lost check stops waiting after this long without new events in Redis")
    p.add_argument("--stop-stream-worker-after", type=float, default=None, metavar="SECONDS",
                   help=argparse.SUPPRESS)  # fault injection for tests: the nothing-lost SLO must then fail
    p.set_defaults(func=handler)
    return p

