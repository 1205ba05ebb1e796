"""Unit tests of the pure recommendation path (a tiny in-memory model; no I/O)."""
import numpy as np

from recsys.features import UserFeatures
from serving.recommend import embed_together, recommend


class TinyModel:
    """Items on a line: the user embedding points at the last item the user saw."""

    version = "v-test"

    def __init__(self, n=20):
        self.item_ids = [f"i{j}" for j in range(n)]
        self.emb = np.eye(n)

    def user_embedding(self, users):
        q = np.zeros((len(users), len(self.item_ids)))
        for row, u in enumerate(users):
            j = int(u.recent[0][1:])
            q[row] = 0.1
            q[row, j] = 1.0
            q[row, (j + 1) % len(self.item_ids)] = 0.9
            q[row, (j + 2) % len(self.item_ids)] = 0.8
        return q

    def search(self, queries, n):
        scores = queries @ self.emb.T
        idx = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        return idx, np.take_along_axis(scores, idx, axis=1)


TRENDING = [("i7", 5.0), ("i3", 4.0), ("i9", 3.0), ("i1", 2.0)]


def test_new_user_gets_trending_items():
    rec = recommend(TinyModel(), UserFeatures("new", [], set(), {}), 3, TRENDING)
    assert rec.fallback and rec.items == ["i7", "i3", "i9"] and rec.model_version == "v-test"


def test_no_model_yet_answers_with_trending():
    rec = recommend(None, UserFeatures("u", ["i1"], {"i1"}, {"click": 1}), 2, TRENDING)
    assert rec.fallback and rec.items == ["i7", "i3"] and rec.model_version is None


def test_seen_items_are_never_recommended():
    user = UserFeatures("u", ["i4"], {"i4", "i5"}, {"click": 2})
    rec = recommend(TinyModel(), user, 3, TRENDING)
    assert not rec.fallback
    assert rec.items[0] == "i6"  # i4 and i5 score higher but were seen
    assert not set(rec.items) & user.seen and len(rec.items) == 3
    assert set(rec.stages_ms) == {"user_tower", "ann", "filter"}


def test_a_user_who_saw_almost_everything_is_topped_up_from_trending():
    model = TinyModel(5)
    user = UserFeatures("u", ["i0"], {"i0", "i1", "i2", "i3"}, {"view": 4})
    rec = recommend(model, user, 3, [("i9", 1.0), ("i4", 0.5), ("i8", 0.1)])
    assert rec.items == ["i4", "i9", "i8"]


def test_a_batch_across_a_model_swap_embeds_each_request_with_its_own_model():
    old, new = TinyModel(), TinyModel()
    new.user_embedding = lambda users: -TinyModel.user_embedding(new, users)  # another version
    users = [UserFeatures(f"u{j}", [f"i{j}"], {f"i{j}"}, {"view": 1}) for j in range(4)]
    batch = [(old, users[0]), (new, users[1]), (old, users[2]), (new, users[3])]
    out = embed_together(batch)
    for (model, user), emb in zip(batch, out):
        assert emb.shape == (1, 20)
        np.testing.assert_array_equal(emb, model.user_embedding([user]))


def test_a_precomputed_query_gives_the_same_answer_as_the_model():
    user = UserFeatures("u", ["i4"], {"i4", "i5"}, {"click": 2})
    model = TinyModel()
    assert recommend(model, user, 3, TRENDING, query=model.user_embedding([user])).items == \
        recommend(model, user, 3, TRENDING).items
