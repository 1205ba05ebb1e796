"""Who the load-test shoppers are and what they do: pure logic, no Locust import.

A Locust user plays one shopper per *visit*: it draws a user id from a popularity-skewed
population (a few heavy shoppers, a long tail, and a share of brand-new ids that were never
seen), asks for recommendations first, then keeps browsing: mostly more recommendations,
sometimes an event (view, click, add to cart, purchase) on an item it was just shown (or a
popular one) for that same user. After about ``session_mean`` requests it leaves and the
Locust user becomes another shopper.

Every knob is a field of ``ShopperConfig``, read from ``LOADTEST_<FIELD>`` environment
variables (e.g. ``LOADTEST_EVENT_SHARE=0.3``, ``LOADTEST_EVENT_MIX=view=6,click=3,purchase=1``).
"""
from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from dataclasses import dataclass, fields

EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating")


@dataclass(frozen=True)
class ShopperConfig:
    known_users: int = 5000       # returning shoppers u1..uN, rank 1 the most active
    user_skew: float = 1.1        # Zipf exponent of how often each returning shopper visits
    new_user_share: float = 0.1   # share of visits by a brand-new user id (cold start)
    items: int = 2000             # catalogue i1..iN for events not on a shown item
    item_skew: float = 1.0        # Zipf exponent of item popularity
    shown_item_share: float = 0.7  # share of events on an item the shopper was just recommended
    event_share: float = 0.2      # share of requests (after a visit's first) that post an event
    session_mean: float = 8.0     # mean requests per visit
    k: int = 10                   # recommendations asked for
    event_mix: str = "view=60,click=25,add_to_cart=10,purchase=5"  # type=weight, comma-separated

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ShopperConfig":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f"LOADTEST_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(getattr(cls, f.name))(raw) if f.name != "event_mix" else raw
        config = cls(**values)
        config.mix()  # fail early on a bad mix
        return config

    def mix(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        names, weights = [], []
        for part in filter(None, (p.strip() for p in self.event_mix.split(","))):
            name, _, weight = part.partition("=")
            if name not in EVENT_TYPES:
                raise ValueError(f"event_mix: unknown event type {name!r}; known: {', '.join(EVENT_TYPES)}")
            names.append(name)
            weights.append(float(weight or 1))
        if not names or sum(weights) <= 0:
            raise ValueError(f"event_mix {self.event_mix!r} has no positive weight")
        return tuple(names), tuple(weights)


def zipf_cum_weights(n: int, skew: float) -> list[float]:
    """Cumulative weights of ranks 1..n with weight 1/rank**skew (for random.choices)."""
    return list(itertools.accumulate(1.0 / r ** skew for r in range(1, n + 1)))


class Population:
    """Draws shoppers and items; one per Locust process, shared by its users."""

    def __init__(self, config: ShopperConfig, seed: int | None = None):
        self.config = config
        self.rng = random.Random(seed)
        self._user_ranks = range(1, config.known_users + 1)
        self._user_cum = zipf_cum_weights(config.known_users, config.user_skew)
        self._item_ranks = range(1, config.items + 1)
        self._item_cum = zipf_cum_weights(config.items, config.item_skew)
        self._types, self._type_weights = config.mix()

    def shopper(self) -> tuple[str, bool]:
        """A user id for the next visit, and whether it is a brand-new user."""
        if self.rng.random() < self.config.new_user_share:
            return f"new-{uuid.uuid4().hex[:12]}", True
        rank = self.rng.choices(self._user_ranks, cum_weights=self._user_cum)[0]
        return f"u{rank}", False

    def visit_length(self) -> int:
        """Requests in one visit: geometric with mean session_mean (at least 1)."""
        p = 1.0 / max(self.config.session_mean, 1.0)
        n = 1
        while self.rng.random() > p:
            n += 1
        return n

    def wants_event(self) -> bool:
        return self.rng.random() < self.config.event_share

    def item(self, shown: list[str] | None = None) -> str:
        if shown and self.rng.random() < self.config.shown_item_share:
            return self.rng.choice(shown)
        return f"i{self.rng.choices(self._item_ranks, cum_weights=self._item_cum)[0]}"

    def event(self, user_id: str, shown: list[str] | None = None) -> dict:
        """One event as the API takes it, with a fresh unique event_id."""
        etype = self.rng.choices(self._types, weights=self._type_weights)[0]
        event = {"event_id": f"lt-{uuid.uuid4().hex}", "user_id": user_id, "item_id": self.item(shown),
                 "type": etype, "ts": int(time.time() * 1000)}
        if etype == "rating":
            event["value"] = float(self.rng.randint(1, 5))
        elif etype == "purchase":
            event["value"] = round(self.rng.uniform(5, 200), 2)
        return event
