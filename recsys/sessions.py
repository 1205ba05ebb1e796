"""Synthetic shoppers with real-time structure: ``synthetic:generator=sessions,...``.

What a stale model cannot know and a fresh one can:

- **Sessions.** Visits start as a Poisson process over ``days`` ending at ``end`` (``now`` by
  default, so replayed history and live events form one timeline; a fixed ``end`` in ms makes the
  timestamps reproducible). Within a visit events are ``dwell_s`` apart (median; log-normal,
  sigma 1, capped at 20 min); a user's next visit starts more than ``SESSION_GAP_MS`` after the
  last one ended, so the 30-minute rule recovers the visits exactly.
- **Intent.** Each user has a long-term mixture of ``MIXTURE`` taste clusters. Each visit draws
  its intent from it, or (``explore``) a cluster the user has never touched; within a visit the
  intent changes with chance ``switch`` per item.
- **Order.** Each item has ``degree`` out-neighbours (complements, sequels; mostly in its own
  cluster). The next item follows that sparse graph from the previous one (``follow``, neighbours
  outside the intent weighted ``OFF_INTENT``), returns to an item already seen in the visit
  (``revisit``), or is drawn from the intent's cluster (``taste``) or global popularity.
- **Funnel.** Each item visit is a view, then a click (``click``), a cart (``cart``) and a
  purchase (``purchase``), each conditional on the step before.
- **Anonymous visitors.** A share ``anonymous`` of visits comes from new ids (``a<k>``), seen in
  no earlier visit, with an intent drawn uniformly.
- **Drift.** Per week, a user's mixture loses one cluster to one outside it with chance
  ``drift`` (1 - exp(-drift * weeks) since the user's last visit). ``shift_at`` still moves every
  mixture cluster c to (c + 1 + clusters // 2) % clusters after that fraction of the events.

Where the parameters come from (fixed before any model is tuned):

- ``SESSION_GAP_MS`` (``recsys.evaluation``) = 30 min: the inactivity cut of web-usage mining since Catledge & Pitkow
  (1995, 25.5 min), still the common session definition (Carevic et al., "Session modelling",
  TPDL 2020, doi:10.1007/978-3-030-58219-7_6).
- ``session_items`` = 4 (geometric, median 3): the OTTO session log (otto-de/recsys-dataset,
  test split, 1.67M sessions) has median 4 and mean 8.3 events per session; with the funnel below
  (1.14 events per item visit) 4 visits give 4.6 events per session.
- ``click`` = 0.35: today's generator's value; no public log separates a listing view from a click.
- ``cart`` = 0.25, so carts are 8.75% of item views: OTTO train, 16.9M carts / 194.7M clicks =
  8.7% (RetailRocket: 69,332 carts / 2,664,312 views = 2.6%).
- ``purchase`` = 0.30: OTTO train, 5.10M orders / 16.9M carts = 30.2%; RetailRocket, 22,457
  transactions / 69,332 carts = 32.4%.
- ``revisit`` = 0.3: about a third of next clicks in public click sessions return to an item
  already viewed in the same session (issue 34, measured on a public session log).
- ``anonymous`` = 0.25: RetailRocket has 1.41M visitors for 2.76M events (1.96 events per
  visitor), so most of its visitors are seen once; 0.25 is a choice below that, not a figure.
- ``dwell_s`` = 30, ``explore`` = 0.1, ``switch`` = 0.05, ``follow`` = 0.5, ``degree`` = 8,
  ``drift`` = 0.25: choices, not taken from a published figure.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np

from recsys.evaluation import SESSION_GAP_MS
from recsys.events import Event, EventType
from recsys.sources import SourceError, SyntheticSource, _draw

MIXTURE = 3            # clusters in a user's long-term mixture
OFF_INTENT = 0.25      # weight of a graph neighbour outside the intent's cluster
NEIGHBOUR_IN_CLUSTER = 0.8  # share of an item's out-neighbours drawn from its own cluster
MAX_DWELL_MS = 20 * 60 * 1000
USER_TRIES = 8         # draws of a known user free to start a visit, then the visit is anonymous
CHUNK_SESSIONS = 4096
TYPES = (EventType.view, EventType.click, EventType.add_to_cart, EventType.purchase)


class State(NamedTuple):
    """The generator's true state at one event: what the oracle knows."""

    user_id: str
    item: int          # item index (the id is ``{season}{item}``)
    season: str
    type: int          # index into TYPES
    ts: int
    intent: int        # the cluster the item visit was drawn for
    prev: int          # the previous item visit of the session, -1 at its first
    session: int       # the visit's number, in start order
    anonymous: bool
    explored: bool     # the session's intent was a cluster the user had never touched


@dataclass
class SessionSource(SyntheticSource):
    """Sessions, intents, order within a visit, anonymous visitors and drift (module docstring).

    The catalogue (clusters, popularity) and users' activity are ``SyntheticSource``'s; a user's
    first mixture cluster is ``user_cluster``. ``start_ms`` and ``events_per_s`` do not apply:
    the timeline is ``days`` long and ends at ``end``. Streamed: the visits in flight, the graph and
    per-user state (O(users x clusters) bits) are all that is held.
    """

    days: float = 28.0
    end: str = "now"
    session_items: float = 4.0
    dwell_s: float = 30.0
    click: float = 0.35
    cart: float = 0.25
    purchase: float = 0.30
    explore: float = 0.1
    switch: float = 0.05
    follow: float = 0.5
    revisit: float = 0.3
    degree: int = 8
    anonymous: float = 0.25
    drift: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        self.name = "synthetic-sessions"
        if self.end != "now" and not str(self.end).isdigit():
            raise SourceError(f"synthetic: end={self.end!r}: give now or a time in ms since the epoch")
        self.end_ms = int(time.time() * 1000) if self.end == "now" else int(self.end)
        rng = np.random.default_rng(self.seed + 3)
        others = np.argsort(rng.random((self.users, self.clusters)), axis=1)
        others = others[others != self.user_cluster[:, None]].reshape(self.users, self.clusters - 1)
        self.mixture = np.concatenate([self.user_cluster[:, None], others[:, :MIXTURE - 1]], axis=1)
        weights = -np.sort(-rng.dirichlet(np.ones(self.mixture.shape[1]), size=self.users), axis=1)
        self.mixture_cdf = np.cumsum(weights, axis=1)
        # The item graph: ``degree`` out-neighbours per item, mostly in its cluster, by popularity.
        same = rng.random((self.items, self.degree)) < NEIGHBOUR_IN_CLUSTER
        nbr = self._cdf_items.searchsorted(rng.random((self.items, self.degree)), side="right")
        for c, members in enumerate(self.cluster_items):
            rows = np.flatnonzero(self.item_cluster == c)
            pick = members[self._cdf_cluster[c].searchsorted(rng.random((len(rows), self.degree)), side="right")]
            nbr[rows] = np.where(same[rows], pick, nbr[rows])
        self.neighbours = nbr.astype(np.int32)
        self.edge_weight = rng.pareto(1.0, size=(self.items, self.degree)) + 1.0

    # ---- the timeline: visit starts, lengths and gaps, from their own random stream ----------

    def _mean_depth(self) -> float:
        return 1 + self.click * (1 + self.cart * (1 + self.purchase))

    def _shapes(self) -> Iterator[tuple]:
        """Chunks of (starts, visits per session, depth per item visit, gap per event), relative ms,
        exactly ``events`` events in all. Drawn twice (once for the timeline's span, once to emit)."""
        rng = np.random.default_rng(self.seed + 2)
        sessions = max(1.0, self.events / (self.session_items * self._mean_depth()))
        mean_gap = self.days * 86_400_000 / sessions
        t, produced = 0.0, 0
        while produced < self.events:
            starts = t + np.cumsum(rng.exponential(mean_gap, CHUNK_SESSIONS))
            t = float(starts[-1])
            visits = rng.geometric(1.0 / self.session_items, CHUNK_SESSIONS)
            u = rng.random((int(visits.sum()), 3))
            clicked = u[:, 0] < self.click
            carted = clicked & (u[:, 1] < self.cart)
            depth = 1 + clicked + carted + (carted & (u[:, 2] < self.purchase))
            per_session = np.add.reduceat(depth, np.concatenate([[0], np.cumsum(visits)[:-1]]))
            gaps = np.minimum(rng.lognormal(math.log(self.dwell_s * 1000), 1.0, int(depth.sum())), MAX_DWELL_MS)
            cum = produced + np.cumsum(per_session)
            keep = int(np.searchsorted(cum, self.events)) + 1  # sessions up to the one reaching ``events``
            if keep <= CHUNK_SESSIONS:
                per_session[keep - 1] -= int(cum[keep - 1]) - self.events
                n_visits, n_events = int(visits[:keep].sum()), int(per_session[:keep].sum())
                starts, visits, depth, gaps, per_session = (starts[:keep], visits[:keep], depth[:n_visits],
                                                            gaps[:n_events], per_session[:keep])
            produced += int(per_session.sum())
            yield starts, visits, depth, gaps, per_session

    def _span(self) -> float:
        """Relative time of the last event."""
        last = 0.0
        for starts, _, _, gaps, per_session in self._shapes():
            first = np.concatenate([[0], np.cumsum(per_session)[:-1]])
            g = gaps.copy()
            g[first] = 0.0  # a session's first event is at its start
            last = max(last, float((starts + np.add.reduceat(g, first)).max()))
        return last

    # ---- the content: users, intents, items, from the seed's own stream -----------------------

    def events_iter(self) -> Iterator[Event]:
        for k, s in enumerate(self.states()):
            yield Event(event_id=f"ses{self.seed}-{k}", user_id=s.user_id, item_id=f"{s.season}{s.item}",
                        type=TYPES[s.type], ts=s.ts)

    def states(self) -> Iterator[State]:
        """Every event's true state, in time order (ties: visit start order)."""
        offset = self.end_ms - self._span()
        rng = np.random.default_rng(self.seed + 1)
        shift_index = int(self.shift_at * self.events) if 0 < self.shift_at < 1 else None
        new_items_index = int(self.new_items_at * self.events) if 0 < self.new_items_at < 1 else None
        last_end = np.full(self.users, -np.inf)
        last_seen = np.zeros(self.users)
        touched = np.zeros((self.users, self.clusters), dtype=bool)
        mixture = self.mixture.copy()
        heap: list = []
        started, emitted, sessions, anonymous = 0, 0, 0, 0
        for starts, visits, depth, gaps, per_session in self._shapes():
            v0 = np.concatenate([[0], np.cumsum(visits)[:-1]])
            e0 = np.concatenate([[0], np.cumsum(per_session)[:-1]])
            for j in range(len(starts)):
                start = float(starts[j])
                while heap and heap[0][0] < start:
                    emitted, state = self._emit(heap, emitted, new_items_index)
                    yield state
                shifted = shift_index is not None and started >= shift_index
                events = self._session(rng, start, depth[v0[j]:v0[j] + visits[j]], gaps[e0[j]:e0[j] + per_session[j]],
                                       int(per_session[j]), sessions, shifted, last_end, last_seen,
                                       touched, mixture, anonymous)
                anonymous += events[0][1].anonymous
                sessions += 1
                started += int(per_session[j])
                for k, (t, state) in enumerate(events):
                    heapq.heappush(heap, (t, state.session, k, state._replace(ts=round(offset + t))))
        while heap:
            emitted, state = self._emit(heap, emitted, new_items_index)
            yield state

    @staticmethod
    def _emit(heap, emitted, new_items_index):
        state = heapq.heappop(heap)[3]
        season = "n" if new_items_index is not None and emitted >= new_items_index else "i"
        return emitted + 1, state._replace(season=season)

    def _session(self, rng, start, depth, gaps, n_events, session, shifted, last_end, last_seen, touched,
                 mixture, anonymous) -> list:
        """One visit's events as (relative time, state), its user and intents drawn here."""
        user = -1
        if rng.random() >= self.anonymous:
            for _ in range(USER_TRIES):
                u = _draw(rng, self._cdf_users)
                if last_end[u] + SESSION_GAP_MS < start:
                    user = u
                    break
        explored = False
        if user < 0:
            user_id, intent = f"a{anonymous}", int(rng.integers(0, self.clusters))
        else:
            user_id = f"u{user}"
            weeks = (start - last_seen[user]) / (7 * 86_400_000)
            if rng.random() < 1 - math.exp(-self.drift * weeks):
                outside = np.setdiff1d(np.arange(self.clusters), mixture[user])
                if len(outside):
                    mixture[user, rng.integers(0, mixture.shape[1])] = outside[rng.integers(0, len(outside))]
            last_seen[user] = start
            untouched = np.flatnonzero(~touched[user])
            untouched = untouched[~np.isin(untouched, mixture[user])]
            if rng.random() < self.explore and len(untouched):
                intent, explored = int(untouched[rng.integers(0, len(untouched))]), True
            else:
                intent = self._from_mixture(rng, mixture, user, shifted)
        out, t, k, seen, prev = [], start, 0, [], -1
        for d in depth:
            if k >= n_events:
                break
            if prev >= 0 and rng.random() < self.switch:
                intent = self._from_mixture(rng, mixture, user, shifted) if user >= 0 else int(rng.integers(0, self.clusters))
            item = self._next_item(rng, intent, prev, seen)
            if user >= 0:
                touched[user, self.item_cluster[item]] = True
            for step in range(int(d)):
                if k >= n_events:
                    break
                t += float(gaps[k]) if k else 0.0
                out.append((t, State(user_id, item, "i", step, 0, intent, prev, session, user < 0, explored)))
                k += 1
            seen.append(item)
            prev = item
        if user >= 0:
            last_end[user] = t
        return out

    def _from_mixture(self, rng, mixture, user, shifted) -> int:
        c = int(mixture[user, int(self.mixture_cdf[user].searchsorted(rng.random() * self.mixture_cdf[user, -1],
                                                                      side="right"))])
        return (c + 1 + self.clusters // 2) % self.clusters if shifted else c

    def _next_item(self, rng, intent: int, prev: int, seen: list) -> int:
        if prev >= 0:
            r = rng.random()
            if r < self.revisit:
                return int(seen[rng.integers(0, len(seen))])
            if r < self.revisit + (1 - self.revisit) * self.follow:
                w = self._edge_probabilities(prev, intent)
                return int(self.neighbours[prev, _draw(rng, np.cumsum(w))])
        if rng.random() < self.taste:
            return int(self.cluster_items[intent][_draw(rng, self._cdf_cluster[intent])])
        return _draw(rng, self._cdf_items)

    def _edge_probabilities(self, prev: int, intent: int) -> np.ndarray:
        w = self.edge_weight[prev] * np.where(self.item_cluster[self.neighbours[prev]] == intent, 1.0, OFF_INTENT)
        return w / w.sum()

    # ---- the oracle ---------------------------------------------------------------------------

    def next_item_probabilities(self, intent: int, prev: int) -> np.ndarray:
        """The true probability of each item index being the next item visit, given the state, up to
        the revisit share (an item already seen in the visit, never a protocol-B candidate)."""
        p = self.taste * np.bincount(self.cluster_items[intent], weights=self.cluster_pop[intent],
                                     minlength=self.items) + (1 - self.taste) * self.item_pop
        if prev < 0:
            return p
        graph = np.bincount(self.neighbours[prev], weights=self._edge_probabilities(prev, intent), minlength=self.items)
        return self.follow * graph + (1 - self.follow) * p

    def states_at(self, keys: set) -> dict:
        """The state of the first event of each (user_id, item_id, ts) in ``keys``."""
        out = {}
        for s in self.states():
            key = (s.user_id, f"{s.season}{s.item}", s.ts)
            if key in keys and key not in out:
                out[key] = s
        return out


    @staticmethod
    def item_indices(item_ids) -> tuple[np.ndarray, np.ndarray]:
        """(season letter, item index) of each id ``i<k>``/``n<k>``."""
        ids = np.asarray(item_ids).astype(str)
        return np.array([s[0] for s in ids]), np.array([int(s[1:]) for s in ids])
