"""One home for what starts, measures or breaks the system on one machine: the local stack,
the process launcher, the benches, the fault scenarios and the capacity planner. The product
packages (recsys, serving, training) import nothing from here."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
