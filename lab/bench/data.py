"""``recsys bench data``: the archive's examples on Ray Data against the in-memory path.

For each size, a synthetic log is written straight into an archive by the archiver's own writer
(``recsys.archive.write_events``), then each engine prepares it in a fresh process (a private
Ray for the Ray Data engine) that reports wall time, examples per second and the peak memory
(anonymous resident memory, sampled every second) of the driver and of the largest Ray process,
with the largest by kind; and the driver's ``ru_maxrss``, which also counts the object store's
shared pages it read. The Ray Data run also streams the test stage's examples once through a
dataset iterator, as the workers would. The in-memory path is skipped above
``training.memory_max_events``, where it no longer fits.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from recsys.settings import Settings


def _heap_bytes(pid: int) -> int:
    """A process's anonymous resident memory (``RssAnon``): its heap, without the object store's
    shared pages or mapped files, which are bounded by the store's size and spilled beyond it."""
    with open(f"/proc/{pid}/status") as fh:
        return 1024 * next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))


def _peaks(stop: threading.Event, out: dict) -> None:
    """Sample, every second, the heap of this process and of each kind of Ray process (raylet,
    gcs_server, ray::<task or actor>)."""
    import psutil
    me = psutil.Process()
    while not stop.wait(1.0):
        for p in [me, *me.children(recursive=True)]:
            try:
                kind = "driver" if p.pid == me.pid else p.name().split(":")[-1] or p.name()
                out[kind] = max(out.get(kind, 0), _heap_bytes(p.pid))
            except (OSError, psutil.Error, StopIteration):
                pass


def measure(settings: Settings, engine: str) -> dict:
    """One engine on ``settings.archive_dir``, in this process: {seconds, examples, driver/worker peak MB}."""
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_peaks, args=(stop, peaks), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if engine == "memory":
        from recsys.model import ModelConfig
        from training.data import Prepared, load_table
        table, _, _ = load_table("archive", settings)
        n = Prepared(table, None, ModelConfig(), settings.features.recent_items).n_train
    else:
        from training.job import ensure_ray
        from training.ray_data import ArchiveData
        ensure_ray(2, False)
        data = ArchiveData(settings, 50, settings.features.recent_items, settings.training.data_block_rows)
        n = sum(len(b["item"]) for b in data.examples(0).iter_batches(batch_size=4096, batch_format="numpy"))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return {"engine": engine, "seconds": round(seconds, 1), "examples": n, "examples_per_s": round(n / seconds),
            "driver_peak_mb": round(peaks.pop("driver", 0) / 2**20),
            "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_mb": round(max(peaks.values()) / 2**20) if peaks else None,
            "peak_mb_by_process": {k: round(v / 2**20) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1])[:6]}}


def bench(settings: Settings, sizes: list[int], users_per_event: float = 0.02, progress=print) -> dict:
    """Both engines at each size (events), on synthetic logs of ``users_per_event`` users per event.

    Passes when the Ray Data engine's largest Ray process (its heap) grows less than 2x from the
    smallest size to the largest: the per-task memory is set by ``training.data_block_rows``, not
    by the log. The driver holds O(users + items + target users), reported apart."""
    from recsys.archive import write_events
    from recsys.sources import SyntheticSource
    runs = []
    for events in sizes:
        users = max(100, int(events * users_per_event))
        folder = Path(settings.home) / "bench-data" / f"e{events}-u{users}"
        archive_dir = folder / "archive"
        if not archive_dir.is_dir():
            progress(f"writing {events:,} synthetic events of {users:,} users to {archive_dir}")
            write_events(archive_dir, SyntheticSource(events=events, users=users,
                                                      items=max(1000, events // 200)).events_iter())
        for engine in ("memory", "ray_data"):
            if engine == "memory" and events > settings.training.memory_max_events:
                runs.append({"events": events, "engine": engine, "skipped": "above training.memory_max_events"})
                continue
            env = {**os.environ, **{k: v for k, v in settings.updated(archive_dir=archive_dir).environment().items() if v}}
            out = subprocess.run([sys.executable, "-m", "lab.bench.data", engine], env=env, capture_output=True,
                                 text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{engine} at {events:,} events failed: {out.stderr[-2000:]}")
            runs.append({"events": events, "users": users, **json.loads(out.stdout.strip().splitlines()[-1])})
            progress(json.dumps(runs[-1]))
    streamed = sorted((r for r in runs if r["engine"] == "ray_data"), key=lambda r: r["events"])
    growth = {"events": streamed[-1]["events"] / streamed[0]["events"],
              "largest_ray_process_heap": round(streamed[-1]["worker_peak_mb"] / streamed[0]["worker_peak_mb"], 2),
              "driver_heap": round(streamed[-1]["driver_peak_mb"] / streamed[0]["driver_peak_mb"], 2),
              "users": round(streamed[-1]["users"] / streamed[0]["users"], 2)}
    return {"runs": runs, "ray_data_growth": growth,
            "pass": len(streamed) > 1 and growth["largest_ray_process_heap"] < 2.0}


if __name__ == "__main__":
    from recsys.settings import get_settings
    print(json.dumps(measure(get_settings(), sys.argv[1])))
