"""Who the load-test shoppers are and what they do: pure logic, no Locust import.

A Locust user plays one shopper per *visit*: it draws a user id from a popularity-skewed
population (a few heavy shoppers, a long tail, and a share of brand-new ids that were never
seen), asks for recommendations first, then keeps browsing: mostly more recommendations,
sometimes an event (view, click, add to cart, purchase) on an item it was just shown (or a
popular one) for that same user. After about ``session_mean`` requests it leaves and the
Locust user becomes another shopper.

With ``taste_source`` (a synthetic source spec, ``recsys.sources``), shoppers have taste: the
returning ones are that source's users ``u<k>``, drawn by its activity, each in the source's
taste cluster; after every list they are shown they click its items by taste and rank
(``reactions``), and those clicks (some followed by a cart and a purchase) are posted on their
next requests. Their other events are of items drawn mostly from their own cluster, as the
source's sessions are. A model that learnt the source's tastes then earns more clicks online
than one that did not (``recsys chaos guardrail``).

Every knob is a field of ``ShopperConfig``, read from ``LOADTEST_<FIELD>`` environment
variables (e.g. ``LOADTEST_EVENT_SHARE=0.3``, ``LOADTEST_EVENT_MIX=view=6,click=3,purchase=1``).
"""
from __future__ import annotations

import hashlib
import itertools
import os
import random
import time
import uuid
from dataclasses import dataclass, fields

import numpy as np

from recsys.events import EventType

EVENT_TYPES = tuple(t.value for t in EventType)


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
    # Taste (empty: none). A click on a shown item of the shopper's own cluster has chance
    # click_match at rank 1, of another cluster click_other; both fall as 1 / rank**position_decay.
    taste_source: str = ""        # e.g. synthetic:users=2000,items=1000,clusters=20,categories=1
    click_match: float = 0.3
    click_other: float = 0.02
    position_decay: float = 1.0
    buy_share: float = 0.2        # a click goes on to the cart with this chance, a cart to a purchase

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ShopperConfig":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f"LOADTEST_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(getattr(cls, f.name))(raw)
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


class Taste:
    """A synthetic source's taste clusters: its users, which cluster each user and item is in,
    and how it draws items (``recsys.sources.SyntheticSource``)."""

    def __init__(self, spec: str):
        from recsys.sources import SyntheticSource, open_source
        self.source = open_source(spec)
        if not isinstance(self.source, SyntheticSource):
            raise ValueError(f"taste_source {spec!r}: give a synthetic source spec (synthetic:...)")
        src = self.source
        self.user_cum = np.cumsum(src.user_activity)
        self.item_cum = np.cumsum(src.item_pop)
        self.cluster_cum = [np.cumsum(p) for p in src.cluster_pop]

    def user_cluster(self, user_id: str) -> int:
        """The source's cluster of ``u<k>``; anyone else (a new user) gets one by a hash of the id."""
        k = _number(user_id, "u")
        if k is not None and k < self.source.users:
            return int(self.source.user_cluster[k])
        return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:4], "big") % self.source.clusters

    def item_cluster(self, item_id: str) -> int | None:
        k = _number(item_id, "i")
        return int(self.source.item_cluster[k]) if k is not None and k < self.source.items else None

    def user(self, rng: random.Random) -> str:
        return f"u{_draw(rng, self.user_cum)}"

    def item(self, rng: random.Random, cluster: int) -> str:
        """An item of ``cluster`` with the source's ``taste`` chance, else one by global popularity."""
        if rng.random() < self.source.taste:
            return f"i{self.source.cluster_items[cluster][_draw(rng, self.cluster_cum[cluster])]}"
        return f"i{_draw(rng, self.item_cum)}"


def _number(name: str, prefix: str) -> int | None:
    """k of ``<prefix><k>``, else None."""
    rest = name[len(prefix):]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def _draw(rng: random.Random, cum: np.ndarray) -> int:
    return min(int(cum.searchsorted(rng.random() * cum[-1], side="right")), len(cum) - 1)


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
        self.taste = Taste(config.taste_source) if config.taste_source else None

    def shopper(self) -> tuple[str, bool]:
        """A user id for the next visit, and whether it is a brand-new user."""
        if self.rng.random() < self.config.new_user_share:
            return f"new-{uuid.uuid4().hex[:12]}", True
        if self.taste:
            return self.taste.user(self.rng), False
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

    def item(self, shown: list[str] | None = None, user_id: str = "") -> str:
        """A background event's item: with taste, mostly of the user's cluster (the list's items get
        ``reactions`` instead); else often a shown one, or one by popularity."""
        if self.taste:
            return self.taste.item(self.rng, self.taste.user_cluster(user_id))
        if shown and self.rng.random() < self.config.shown_item_share:
            return self.rng.choice(shown)
        return f"i{self.rng.choices(self._item_ranks, cum_weights=self._item_cum)[0]}"

    def event(self, user_id: str, shown: list[str] | None = None) -> dict:
        """One event as the API takes it, with a fresh unique event_id."""
        etype = self.rng.choices(self._types, weights=self._type_weights)[0]
        return self._event(user_id, self.item(shown, user_id), etype)

    def reactions(self, user_id: str, shown: list[str]) -> list[dict]:
        """The events a shopper with taste makes on a list just shown (rank 1 first): each item is
        clicked with chance click_match (the shopper's cluster) or click_other, / rank**position_decay;
        a click goes on to add_to_cart, and that to a purchase, each with chance buy_share.
        Nothing without a taste source."""
        if not self.taste:
            return []
        c, out = self.config, []
        cluster = self.taste.user_cluster(user_id)
        for rank, item in enumerate(shown, start=1):
            p = (c.click_match if self.taste.item_cluster(item) == cluster else c.click_other) / rank ** c.position_decay
            if self.rng.random() >= p:
                continue
            out.append(self._event(user_id, item, "click"))
            for etype in ("add_to_cart", "purchase"):
                if self.rng.random() >= c.buy_share:
                    break
                out.append(self._event(user_id, item, etype))
        return out

    def _event(self, user_id: str, item_id: str, etype: str) -> dict:
        event = {"event_id": f"lt-{uuid.uuid4().hex}", "user_id": user_id, "item_id": item_id,
                 "type": etype, "ts": int(time.time() * 1000)}
        if etype == "rating":
            event["value"] = float(self.rng.randint(1, 5))
        elif etype == "purchase":
            event["value"] = round(self.rng.uniform(5, 200), 2)
        return event
