"""Peak-season load profiles: named, piecewise-linear schedules of concurrent shoppers.

Pure logic (no Locust import), so the schedule is unit-tested without gevent. The Locust
shape class in ``loadtest/locustfile.py`` follows ``Profile.users_at`` once a second.

Every profile has the same phases, in this order:

  baseline   steady everyday traffic (``base`` users)
  ramp       the season warms up (base -> ramp_to users)
  surge      the rush (ramp_to -> peak users, several times the baseline, fast)
  peak       sustained peak (the p99 SLO is measured here)
  decay      back down (peak -> base users)
  cooldown   baseline again, long enough for Serve's downscale_delay_s to bring the
             replicas back to the minimum

A shopper waits ``wait_min..wait_max`` seconds between requests (about 1 request/s each),
so users ~ requests/s while the service keeps up.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

PHASES = ("baseline", "ramp", "surge", "peak", "decay", "cooldown")


@dataclass(frozen=True)
class Phase:
    name: str
    duration_s: float
    users_from: int
    users_to: int

    def users_at(self, t: float) -> int:
        """Users ``t`` seconds into this phase (linear from users_from to users_to)."""
        if self.duration_s <= 0:
            return self.users_to
        frac = min(max(t / self.duration_s, 0.0), 1.0)
        return int(round(self.users_from + (self.users_to - self.users_from) * frac))


@dataclass(frozen=True)
class Profile:
    name: str
    base: int                 # baseline users
    ramp_to: int              # users at the end of the ramp
    peak: int                 # users during the sustained peak
    baseline_s: float
    ramp_s: float
    surge_s: float
    peak_s: float
    decay_s: float
    cooldown_s: float
    wait_min_s: float = 0.5   # think time between a shopper's requests
    wait_max_s: float = 1.5
    description: str = ""
    phases: tuple[Phase, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        spec = [("baseline", self.baseline_s, self.base, self.base),
                ("ramp", self.ramp_s, self.base, self.ramp_to),
                ("surge", self.surge_s, self.ramp_to, self.peak),
                ("peak", self.peak_s, self.peak, self.peak),
                ("decay", self.decay_s, self.peak, self.base),
                ("cooldown", self.cooldown_s, self.base, self.base)]
        object.__setattr__(self, "phases", tuple(Phase(*p) for p in spec))

    @property
    def duration_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def windows(self) -> dict[str, tuple[float, float]]:
        """Phase name -> (start, end) in seconds from the start of the test."""
        out, t = {}, 0.0
        for p in self.phases:
            out[p.name] = (t, t + p.duration_s)
            t += p.duration_s
        return out

    def phase_at(self, t: float) -> Phase | None:
        """The phase running ``t`` seconds into the test; None once the test is over."""
        if t < 0:
            return self.phases[0]
        start = 0.0
        for p in self.phases:
            if t < start + p.duration_s:
                return p
            start += p.duration_s
        return None

    def users_at(self, t: float) -> int | None:
        """Target users ``t`` seconds into the test; None once it is over (the shape stops Locust)."""
        phase = self.phase_at(t)
        if phase is None:
            return None
        return phase.users_at(t - self.windows()[phase.name][0])

    def spawn_rate(self) -> float:
        """Users/s to start or stop: fast enough to follow the steepest phase within a tick."""
        steepest = max(abs(p.users_to - p.users_from) / p.duration_s for p in self.phases if p.duration_s > 0)
        return max(10.0, 2 * steepest)

    def spec(self) -> dict:
        """The constructor arguments, to hand a profile to the Locust process (LOADTEST_PROFILE_SPEC)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def to_json(self) -> dict:
        return {"name": self.name, "duration_s": self.duration_s, "base": self.base, "ramp_to": self.ramp_to,
                "peak": self.peak, "wait_s": [self.wait_min_s, self.wait_max_s],
                "phases": {name: [round(a, 3), round(b, 3)] for name, (a, b) in self.windows().items()}}


# Sized on 2 cores (Serve tops out near 300-400 req/s there): the peak drives one replica
# past target_ongoing_requests=4, so the autoscaler adds replicas, without drowning the
# machine (Locust, Serve, Kafka, Redis and the stream worker all share the 2 cores).
PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", base=4, ramp_to=8, peak=60,
        baseline_s=10, ramp_s=10, surge_s=15, peak_s=30, decay_s=10, cooldown_s=30,
        wait_min_s=0.0, wait_max_s=0.1,
        description="CI: every phase, under 2 minutes"),
    "peak": Profile(
        name="peak", base=4, ramp_to=8, peak=70,
        baseline_s=60, ramp_s=90, surge_s=40, peak_s=180, decay_s=90, cooldown_s=60,
        wait_min_s=0.0, wait_max_s=0.1,
        description="peak season for people: ~8.5 minutes"),
}

# `recsys chaos replica-kill|controller-kill`: a flat load at about half of what Locust and two
# Serve replicas reach together on 2 cores (the peak profile's 70 shoppers: about 650 req/s).
CHAOS_PROFILE = Profile(name="chaos", base=35, ramp_to=35, peak=35, baseline_s=5, ramp_s=0, surge_s=0, peak_s=40,
                        decay_s=0, cooldown_s=0, wait_min_s=0.0, wait_max_s=0.1,
                        description="chaos: 35 shoppers for 45 s, a fault a third of the way in")


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown load profile {name!r}; known: {', '.join(PROFILES)}") from None
