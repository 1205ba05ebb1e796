"""A/B and shadow experiments (``recsys models candidate``), the pure part: which arm a user
is in, how alike two lists are, and the guardrail's sequential test. The registry holds the experiment (recsys/registry.py);
the replicas follow it (serving/app.py)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime


def in_candidate_arm(user_id: str, share: float, salt: str) -> bool:
    """Whether the user (a pseudonym) is in the candidate's share. Stable for a user within an
    experiment; ``salt`` (the candidate version) gives each experiment its own split, so the same
    users are not always the ones that try new models."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


@dataclass(frozen=True)
class ExperimentScope:
    """A running A/B experiment as the online counters see it (issue 35): the guardrail compares
    counters that hold only the lists served since the experiment started, by either arm, so
    both arms cover the same time (the current version's lists from before, or the candidate's
    from an earlier run of it, would compare different days). ``id`` names one run: its
    candidate and start, so a candidate stopped and started again is counted afresh."""
    id: str
    started_ms: int
    current: str
    candidate: str

    @classmethod
    def of(cls, pointers: dict) -> "ExperimentScope | None":
        """The scope of the registry's pointers' A/B experiment; None with none running (or a shadow)."""
        exp, current = pointers.get("experiment"), pointers.get("current")
        if exp is None or exp["shadow"] or current is None:
            return None
        started_ms = int(datetime.fromisoformat(exp["started_at"]).timestamp() * 1000)
        return cls(f"{exp['candidate']}@{started_ms}", started_ms, current, exp["candidate"])

    def arm(self, arm: str) -> str:
        """The counters' name of an arm ("current" or "candidate") in this run."""
        return f"{self.id}|{self.current if arm == 'current' else self.candidate}|{arm}"

    def counts(self, version: str | None, arm: str, served_ms: int) -> str | None:
        """The arm's counters' name that a list (or a hit on it) counts in, or None: a list served
        before the start, or by neither arm's version."""
        if served_ms < self.started_ms or (arm, version) not in (("current", self.current),
                                                                 ("candidate", self.candidate)):
            return None
        return self.arm(arm)


def overlap_at_k(served: list[str], other: list[str], k: int = 10) -> float:
    """The share of the served list's top k that the other list's top k also holds."""
    top = served[:k]
    return len(set(top) & set(other[:k])) / len(top) if top else 1.0


@dataclass(frozen=True)
class GuardVerdict:
    stop: bool
    likelihood_ratio: float
    current_rate: float | None
    candidate_rate: float | None
    lists: tuple[int, int]  # (current, candidate)
    reason: str


def guardrail(current: tuple[int, int], candidate: tuple[int, int], alpha: float = 0.05, effect: float = 0.02,
              min_lists: int = 200) -> GuardVerdict:
    """Whether the candidate arm is significantly worse than the current one online, by a
    mixture sequential probability ratio test (mSPRT; Johari, Pekelis and Walsh, "Always Valid
    Inference", 2017) on the share of lists with a hit. Each arm is (lists, lists with a hit).
    The test may be looked at after every batch: its false-stop rate stays at most ``alpha``
    however often it is checked. ``effect`` is the scale of the normal mixture over the
    difference (the size of effect it is most sensitive to); below ``min_lists`` per arm it
    never stops (the normal approximation needs some lists)."""
    (n_a, x_a), (n_b, x_b) = current, candidate
    rates = (x_a / n_a if n_a else None, x_b / n_b if n_b else None)
    if min(n_a, n_b) < min_lists:
        return GuardVerdict(False, 1.0, *rates, (n_a, n_b), f"waiting for {min_lists} lists per arm")
    p_a, p_b = rates
    variance = max(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b, 1e-12)
    tau2 = effect ** 2
    diff = p_b - p_a
    log_lr = 0.5 * math.log(variance / (variance + tau2)) + tau2 * diff ** 2 / (2 * variance * (variance + tau2))
    lr = math.exp(min(log_lr, 700.0))
    stop = diff < 0 and lr >= 1 / alpha
    reason = (f"candidate worse: hit rate {p_b:.4f} vs {p_a:.4f}, likelihood ratio {lr:.3g} >= {1 / alpha:g}"
              if stop else f"no significant loss (likelihood ratio {lr:.3g} < {1 / alpha:g} or not worse)")
    return GuardVerdict(stop, lr, p_a, p_b, (n_a, n_b), reason)
