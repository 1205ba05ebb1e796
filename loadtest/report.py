"""What a load test measured: per-second timeline, SLO verdicts, the plot. Pure logic
(numpy; matplotlib only for the plot), so SLO evaluation is unit-tested on made-up samples.

Times are seconds from the start of the load shape (``t0``); phase windows come from the
profile (``Profile.windows()``).
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RECS = "/v1/recommendations/[user]"
EVENTS = "/v1/events"
# A 503'd attempt (Retry-After), which the shopper then retried: not an error unless the last try fails too.
RECS_RETRIED = "/v1/recommendations/[user] [retried after 503]"
EVENTS_RETRIED = "/v1/events [retried after 503]"


@dataclass
class Requests:
    """Raw request samples: start time (s from t0), route, latency (ms), success."""
    t: np.ndarray
    route: np.ndarray
    latency_ms: np.ndarray
    ok: np.ndarray

    @classmethod
    def empty(cls) -> "Requests":
        return cls(np.zeros(0), np.zeros(0, dtype=object), np.zeros(0), np.zeros(0, dtype=bool))

    @classmethod
    def read_csv(cls, path: Path, t0: float) -> "Requests":
        """requests.csv as written by the locustfile (start_s,route,latency_ms,ok,status)."""
        if not Path(path).exists():
            return cls.empty()
        t, route, lat, ok = [], [], [], []
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    parsed = float(row["start_s"]) - t0, float(row["latency_ms"]), row["ok"] == "1", row["route"]
                except (TypeError, ValueError, KeyError):
                    continue  # a line cut short by a killed Locust
                t.append(parsed[0])
                lat.append(parsed[1])
                ok.append(parsed[2])
                route.append(parsed[3])
        return cls(np.array(t, dtype=float), np.array(route, dtype=object), np.array(lat, dtype=float),
                   np.array(ok, dtype=bool))

    def __len__(self) -> int:
        return len(self.t)

    def between(self, start: float, end: float) -> "Requests":
        m = (self.t >= start) & (self.t < end)
        return Requests(self.t[m], self.route[m], self.latency_ms[m], self.ok[m])


@dataclass(frozen=True)
class Budgets:
    p99_ms: float = 500.0          # p99 latency during the sustained peak
    max_error_rate: float = 0.001  # failed / all requests over the whole test


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if len(values) else None


def timeline(req: Requests, replicas: list[tuple[float, int]], users_at, end_s: float,
             start_s: float = 0.0) -> list[dict]:
    """One row per second: requests/s (all, recommendations, events), errors/s, p50/p99 (ms),
    target users, and the replicas last sampled in that second (or before it)."""
    rows = []
    rep = sorted(replicas)
    j, last = 0, None
    order = np.argsort(req.t, kind="stable")
    t_sorted = req.t[order]
    for sec in range(int(math.floor(start_s)), int(math.ceil(end_s))):
        lo, hi = np.searchsorted(t_sorted, [sec, sec + 1])
        idx = order[lo:hi]
        lat = req.latency_ms[idx]
        while j < len(rep) and rep[j][0] < sec + 1:
            last = rep[j][1]
            j += 1
        users = users_at(sec) if users_at else None
        rows.append({"t": sec, "rps": int(len(idx)), "recs_rps": int(np.sum(req.route[idx] == RECS)),
                     "events_rps": int(np.sum(req.route[idx] == EVENTS)), "errors": int(np.sum(~req.ok[idx])),
                     "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "users": users, "replicas": last})
    return rows


def replicas_at(replicas: list[tuple[float, int]], t: float) -> int | None:
    """The last replica count sampled at or before t (the first one if none was)."""
    rep = sorted(replicas)
    if not rep:
        return None
    before = [n for ts, n in rep if ts <= t]
    return before[-1] if before else rep[0][1]


def surge_to_first_new_replica_s(replicas: list[tuple[float, int]], windows: dict[str, tuple[float, float]]
                                 ) -> float | None:
    """Seconds from the surge's start to the first sample with more replicas than at the ramp's
    start (negative: they rose during the ramp); None when none came."""
    ramp_start, surge_start = windows["ramp"][0], windows["surge"][0]
    baseline = replicas_at(replicas, ramp_start)
    first = next((t for t, n in sorted(replicas) if t >= ramp_start and n > baseline), None)
    return None if first is None else round(first - surge_start, 2)


def reversals(replicas: list[tuple[float, int]]) -> int:
    """How often the replica count turned from rising to falling or back: one for a surge that
    is met and then released, more for an autoscaler that oscillates."""
    counts = [n for _, n in sorted(replicas)]
    steps = [b - a for a, b in zip(counts, counts[1:]) if b != a]
    return sum(1 for x, y in zip(steps, steps[1:]) if (x > 0) != (y > 0))


MAX_REVERSALS = 1  # up for the surge, down after it


def evaluate(req: Requests, replicas: list[tuple[float, int]] | None, windows: dict[str, tuple[float, float]],
             posted: int, found: int | None, budgets: Budgets = Budgets(),
             min_replicas: int | None = None) -> list[dict]:
    """The SLO verdicts: one dict per SLO with name, passed, measured, threshold, detail."""
    slos = []

    peak = req.between(*windows["peak"])
    p99 = _pct(peak.latency_ms, 99)
    slos.append({"name": "p99_during_peak", "passed": p99 is not None and p99 <= budgets.p99_ms,
                 "measured": p99, "threshold": budgets.p99_ms,
                 "detail": f"p99 of {len(peak)} requests in the sustained peak "
                           f"({windows['peak'][0]:g}-{windows['peak'][1]:g} s), ms"})

    errors = int(np.sum(~req.ok))
    rate = errors / len(req) if len(req) else None
    slos.append({"name": "error_rate", "passed": rate is not None and rate <= budgets.max_error_rate,
                 "measured": None if rate is None else round(rate, 6), "threshold": budgets.max_error_rate,
                 "detail": f"{errors} failed of {len(req)} requests"})

    if not replicas:
        for name in ("replicas_up_in_surge", "replicas_steady", "replicas_down_after"):
            slos.append({"name": name, "passed": False, "measured": None, "threshold": None,
                         "detail": "no replica samples (Serve's status API not reachable)"})
    else:
        # The season's rush is the ramp plus the surge: replicas must start it at the minimum
        # (the baseline needs no more) and be higher by the end of the sustained peak.
        ramp_start, surge_start, peak_end = windows["ramp"][0], windows["surge"][0], windows["peak"][1]
        baseline = replicas_at(replicas, ramp_start)
        at_surge = replicas_at(replicas, surge_start)
        during = [n for t, n in replicas if surge_start <= t <= peak_end]
        top = max(during) if during else None
        final = sorted(replicas)[-1][1]
        floor = baseline if min_replicas is None else min(baseline, min_replicas)
        up_ok = top is not None and top > baseline and (min_replicas is None or baseline == min_replicas)
        slos.append({"name": "replicas_up_in_surge", "passed": up_ok,
                     "measured": {"baseline": baseline, "at_surge_start": at_surge, "max": top},
                     "threshold": {"min_replicas": min_replicas},
                     "detail": "replicas at the end of the baseline (should be the minimum) -> most during surge and peak"})
        turns = reversals(replicas)
        slos.append({"name": "replicas_steady", "passed": turns <= MAX_REVERSALS, "measured": turns,
                     "threshold": MAX_REVERSALS,
                     "detail": "times the running replica count turned between rising and falling (oscillation)"})
        slos.append({"name": "replicas_down_after", "passed": top is not None and final <= floor < top,
                     "measured": {"max": top, "final": final}, "threshold": {"back_to": floor},
                     "detail": "replicas after the decay and cool-down, back to where they started"})

    slos.append({"name": "nothing_lost", "passed": found is not None and posted > 0 and found == posted,
                 "measured": {"posted": posted, "in_redis": found}, "threshold": {"missing": 0},
                 "detail": "event ids answered 202 whose dedup marker is in Redis after the stream worker caught up"})
    return slos


def headline(req: Requests, replicas: list[tuple[float, int]], windows: dict[str, tuple[float, float]],
             wanted: list[tuple[float, int]] | None = None) -> dict:
    """The figures people quote: peak throughput, latency at peak, replicas min -> max -> final,
    how soon the autoscaler decided (``wanted``: replicas starting included) and the first new
    replica ran after the surge began, and how often the count reversed."""
    peak = req.between(*windows["peak"])
    dur = windows["peak"][1] - windows["peak"][0]
    per_s = np.bincount(np.floor(req.t[req.t >= 0]).astype(int)) if len(req) else np.zeros(1)
    smooth = np.convolve(per_s, np.ones(5) / 5, mode="valid") if len(per_s) >= 5 else per_s
    counts = [n for _, n in replicas]
    return {"requests": int(len(req)), "errors": int(np.sum(~req.ok)),
            "events_posted_requests": int(np.sum(req.route == EVENTS)),
            "events_retried_after_503": int(np.sum(req.route == EVENTS_RETRIED)),
            "recs_retried_after_503": int(np.sum(req.route == RECS_RETRIED)),
            "peak_rps_5s": round(float(smooth.max()), 1) if len(smooth) else 0.0,
            "peak_phase_rps": round(len(peak) / dur, 1) if dur > 0 else None,
            "peak_p50_ms": _pct(peak.latency_ms, 50), "peak_p99_ms": _pct(peak.latency_ms, 99),
            "peak_p99_recs_ms": _pct(peak.latency_ms[peak.route == RECS], 99),
            "peak_p99_events_ms": _pct(peak.latency_ms[peak.route == EVENTS], 99),
            "overall_p99_ms": _pct(req.latency_ms, 99),
            "replicas": {"start": replicas_at(replicas, windows["surge"][0]),
                         "max": max(counts) if counts else None, "final": counts[-1] if counts else None},
            "surge_to_scale_up_decision_s": surge_to_first_new_replica_s(wanted, windows) if wanted else None,
            "surge_to_first_new_replica_s": surge_to_first_new_replica_s(replicas, windows) if replicas else None,
            "replica_reversals": reversals(replicas) if replicas else None}


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        Path(path).write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


PHASE_COLORS = {"baseline": "#f2f2f2", "ramp": "#e3eefc", "surge": "#fde2c8", "peak": "#fbc7c7",
                "decay": "#e2f4e0", "cooldown": "#f2f2f2", "after": "#ffffff"}


def plot(rows: list[dict], windows: dict[str, tuple[float, float]], path: Path, title: str,
         p99_budget_ms: float | None = None, stream: dict[str, list[tuple[float, float]]] | None = None) -> Path:
    """Stacked panels against time: requests/s, p50/p99 latency, errors/s, replicas (and users),
    and with ``stream`` ({"lag": [(t, records)], "freshness_p99_s": [(t, s)]}, from Prometheus)
    the stream worker's consumer lag and freshness."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([r["t"] for r in rows])
    col = lambda k: np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=float)  # noqa: E731
    ratios = [3, 3, 1.5, 2] + ([2] if stream else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(11, 9 + 2 * bool(stream)), sharex=True,
                             gridspec_kw={"height_ratios": ratios})
    for ax in axes:
        for name, (a, b) in windows.items():
            ax.axvspan(a, b, color=PHASE_COLORS.get(name, "#ffffff"), zorder=0, lw=0)
        ax.grid(alpha=0.3)
    for name, (a, b) in windows.items():
        axes[0].text((a + b) / 2, 1.01, name, transform=axes[0].get_xaxis_transform(), ha="center",
                     va="bottom", fontsize=8)

    ax = axes[0]
    ax.plot(t, col("rps"), label="all", color="black", lw=1.2)
    ax.plot(t, col("recs_rps"), label="recommendations", color="tab:blue", lw=0.8)
    ax.plot(t, col("events_rps"), label="events", color="tab:orange", lw=0.8)
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    ax.plot(t, col("p50_ms"), label="p50", color="tab:green", lw=1)
    ax.plot(t, col("p99_ms"), label="p99", color="tab:red", lw=1)
    if p99_budget_ms:
        a, b = windows["peak"]
        ax.hlines(p99_budget_ms, a, b, colors="tab:red", linestyles="dashed", label=f"p99 budget {p99_budget_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (per s)")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[2]
    ax.bar(t, col("errors"), width=1.0, color="tab:red")
    ax.set_ylabel("errors/s")
    ax.set_ylim(bottom=0, top=max(1.0, float(np.nanmax(col("errors"))) * 1.2 if len(t) else 1.0))

    ax = axes[3]
    ax.step(t, col("replicas"), where="post", color="tab:purple", lw=1.5, label="replicas (Serve)")
    ax.set_ylabel("replicas")
    top = np.nanmax(col("replicas")) if len(t) and not np.all(np.isnan(col("replicas"))) else 1
    ax.set_ylim(0, top + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    twin = ax.twinx()
    twin.plot(t, col("users"), color="gray", lw=1, ls="--", label="Locust users (target)")
    twin.set_ylabel("users")
    _legend(ax, twin)
    if stream:
        ax = axes[4]
        lag = np.array(stream.get("lag") or [(np.nan, np.nan)], dtype=float)
        ax.step(lag[:, 0], lag[:, 1], where="post", color="tab:brown", lw=1.2, label="consumer lag (records)")
        ax.set_ylabel("lag (records)")
        ax.set_ylim(bottom=0, top=max(10.0, float(np.nanmax(lag[:, 1])) * 1.2 if np.any(~np.isnan(lag[:, 1])) else 10.0))
        twin = ax.twinx()
        fresh = np.array(stream.get("freshness_p99_s") or [(np.nan, np.nan)], dtype=float)
        twin.plot(fresh[:, 0], fresh[:, 1], color="tab:cyan", lw=1.2, marker=".", label="freshness p99 (s)")
        twin.axhline(1.0, color="tab:cyan", ls="dashed", lw=0.8, label="freshness budget 1 s")
        twin.set_ylabel("freshness p99 (s)")
        twin.set_ylim(bottom=0)
        _legend(ax, twin)
    axes[-1].set_xlabel("seconds since the start of the load")

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def summary_line(slos: list[dict]) -> str:
    return ", ".join(f"{s['name']} {'PASS' if s['passed'] else 'FAIL'}" for s in slos)


def as_dict(obj) -> dict:
    return asdict(obj)


def _legend(ax, twin) -> None:
    """One legend for a panel and its twin axis."""
    lines, more = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
