"""The two-tower retrieval model in tf_keras, as trained by ``training.job``.

User tower: user id embedding (index 0 is the out-of-vocabulary bucket: unknown users,
and a share of known ones dropped out while training so the model learns to serve new
users), a pooled embedding of the recent items (newest first; a learned weight per
position, so recent items can count more), log(1 + count) per event type, then a
ReLU layer and a linear projection, L2-normalized. The newest ``cfg.newest`` items' own
embeddings also enter the ReLU layer (through their own kernel, ``newest_w``): in a visit the
next item depends on the previous one, which a pooled mean blurs (issue 34; on the sessions
generator validation HR@10 0.325 -> 0.418 with one, neutral on MovieLens-100K). A model without
them (``newest`` 0, or exported before) has no ``newest_w``: the numpy tower follows the
weights it is given.

Item tower: item id embedding (optionally the same table as the history's) beside the
item's features (multi-hot genres where the source has them), linearly projected,
L2-normalized. Score = cosine / temperature.

Content head (where items have genres): the item tower with the id always dropped, the
genres alone linearly projected and L2-normalized, trained by the same softmax in its item's
place among the same candidates, everything but the head held fixed. It embeds an item the model never saw from its catalogue
entry (``recsys.catalogue``) and changes nothing else: dropping a share of the ids from the
tower itself (id dropout 0.05-0.1) cost 5-6% of HR@10 on MovieLens-100K.

Loss: in-batch softmax with log-Q correction (Yi et al. 2019), optionally mixed with
uniformly sampled negatives: every candidate's logit is lowered by the log of its
expected count among the negatives (B * q_j + M / N), duplicates of the positive masked.
Distillation (``cfg.distill_weight`` > 0): mixed with a KL to a teacher's softmax over the same
candidates (``distillation_kl``; the teacher's embeddings come from ``training.distill``).

Its weights are exported to the numpy artifact of ``recsys.model``, which serves without TensorFlow.
"""
from __future__ import annotations

import os

import numpy as np

from recsys import user_input
from recsys.model import ModelConfig
from recsys.user_input import COUNTS, HIST, ITEM, USER


def tf_env() -> dict[str, str]:
    """The environment every process sets before TensorFlow is first imported: tf-keras instead
    of Keras 3 (whose ``fit`` fails under MultiWorkerMirroredStrategy, keras-team/keras#20585),
    and TensorFlow's C++ log lines off unless asked for."""
    return {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def _tf():
    os.environ.update(tf_env())
    import tensorflow as tf
    import tf_keras
    return tf, tf_keras


def build_model(cfg: ModelConfig, n_users: int, n_items: int, item_genres: np.ndarray):
    """The two towers as one tf_keras Model; ``model.user_tower(inputs)`` and ``model.item_tower(idx)``."""
    tf, keras = _tf()

    class TwoTower(keras.Model):
        def __init__(self):
            super().__init__(name="two_tower")
            self.cfg = cfg
            init = keras.initializers.RandomNormal(stddev=0.05, seed=cfg.seed)
            self.user_table = keras.layers.Embedding(n_users + 1, cfg.user_dim, embeddings_initializer=init,
                                                     name="user_table")
            self.hist_table = keras.layers.Embedding(n_items + 1, cfg.dim, embeddings_initializer=init,
                                                     name="hist_table")
            self.item_table = self.hist_table if cfg.share_item_table else keras.layers.Embedding(
                n_items + 1, cfg.dim, embeddings_initializer=init, name="item_table")
            # Position weights start as a decay: newer items count more.
            self.pos_logits = self.add_weight(
                name="pos_logits", shape=(cfg.history,), dtype="float32", trainable=True,
                initializer=keras.initializers.Constant(-np.log1p(np.arange(cfg.history)) * 0.5))
            # The newest cfg.newest items' embeddings enter the hidden layer beside the pooled vector.
            self.newest_in = keras.layers.Dense(cfg.hidden, use_bias=False, name="newest_in") if cfg.newest else None
            self.hidden = keras.layers.Dense(cfg.hidden, name="user_hidden")
            self.user_out = keras.layers.Dense(cfg.dim, name="user_out")
            self.item_out = keras.layers.Dense(cfg.dim, name="item_out")
            self.genres = tf.constant(item_genres.astype(np.float32))
            self.content_out = keras.layers.Dense(cfg.dim, name="content_out") if item_genres.shape[1] else None
            # Items with the same genres share one id here: their content vectors are the same.
            self.genre_set = tf.constant(np.unique(item_genres, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int32))

        def user_tower(self, inputs, training=False):
            """The user embeddings of a batch of encoded users (``recsys.user_input``)."""
            user, hist, counts = inputs[USER], inputs[HIST], inputs[COUNTS]
            if training and cfg.user_dropout > 0:
                keep = tf.random.uniform(tf.shape(user)) >= cfg.user_dropout
                user = tf.where(keep, user, tf.zeros_like(user))
            u = self.user_table(user)
            h = tf.cast(self.hist_table(hist), tf.float32)               # (B, L, d)
            mask = tf.cast(hist > 0, tf.float32)
            w = tf.exp(self.pos_logits)[None, :] * mask                  # (B, L)
            pooled = tf.reduce_sum(h * w[..., None], 1) / tf.maximum(tf.reduce_sum(w, 1, keepdims=True), 1e-6)
            x = tf.concat([tf.cast(u, tf.float32), pooled, counts], axis=1)
            pre = self.hidden(x)
            if self.newest_in is not None:
                pre = pre + self.newest_in(tf.reshape(h[:, :cfg.newest], (-1, cfg.newest * cfg.dim)))
            z = self.user_out(tf.nn.relu(pre))
            return tf.math.l2_normalize(tf.cast(z, tf.float32), axis=1)

        def item_tower(self, item):
            v = self.item_table(item)
            x = tf.concat([tf.cast(v, tf.float32), tf.gather(self.genres, item)], axis=1)
            return tf.math.l2_normalize(tf.cast(self.item_out(x), tf.float32), axis=1)

        def content_tower(self, item):
            return tf.math.l2_normalize(tf.cast(self.content_out(tf.gather(self.genres, item)), tf.float32), axis=1)

        def call(self, inputs, training=False):
            return self.user_tower(inputs, training), self.item_tower(inputs[ITEM])

    model = TwoTower()
    dummy = input_signature(cfg, 1, tf.zeros)
    model(dummy)
    if model.content_out is not None:
        model.content_tower(dummy[ITEM])
    return model


def input_signature(cfg: ModelConfig, n: int, make) -> dict:
    """``make(shape, dtype)`` (``tf.zeros``, ``tf.TensorSpec``) of each user input for ``n`` users
    of a model of ``cfg`` (``recsys.user_input``), and of the example's item."""
    return {**{i.name: make(i.shape(n), i.dtype) for i in user_input.schema(cfg.history).inputs},
            ITEM: make((n,), "int32")}


def distillation_kl(student_logits, teacher_logits, valid, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over each row's ``valid`` candidates
    (both distributions renormalized over them), mean over the rows; no gradient to the teacher.
    A row without a valid candidate adds 0."""
    tf, _ = _tf()
    t = float(temperature)
    off = tf.constant(-1e9, tf.float32)
    s = tf.where(valid, tf.cast(student_logits, tf.float32) / t, off)
    te = tf.where(valid, tf.stop_gradient(tf.cast(teacher_logits, tf.float32)) / t, off)
    log_p, log_q = tf.nn.log_softmax(te, axis=1), tf.nn.log_softmax(s, axis=1)
    kl = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=1)
    kl = tf.where(tf.reduce_any(valid, axis=1), kl, tf.zeros_like(kl))
    return t * t * tf.reduce_mean(kl)


def sampled_softmax_loss(model, batch, log_q, n_items: int, cfg: ModelConfig, training: bool = True,
                         teacher: dict | None = None):
    """In-batch (+ uniform) softmax loss with log-Q correction, mean over the batch.

    ``teacher`` ({"item": (n_items + 1, d_t) the teacher's item embeddings in this vocabulary,
    "known": (n_items + 1,) bool, "temperature": the teacher's}) with ``cfg.distill_weight`` w > 0
    and ``batch["teacher_user"]`` (B, d_t): (1 - w) * this loss + w * ``distillation_kl`` over the
    same candidates, the teacher's logits log-Q corrected as the student's. Candidates the teacher
    does not know (and duplicates of the positive) are left out of the KL, not given a made-up logit.
    """
    tf, _ = _tf()
    u, v = model(batch, training=training)
    item = batch[ITEM]
    bsz = tf.shape(item)[0]
    cand_items = item
    cand_v = v
    if cfg.random_negatives > 0:
        neg = tf.random.uniform([cfg.random_negatives], 1, n_items + 1, dtype=tf.int32)
        cand_items = tf.concat([item, neg], 0)
        cand_v = tf.concat([v, model.item_tower(neg)], 0)
    logits = tf.matmul(u, cand_v, transpose_b=True) / cfg.temperature
    if cfg.logq:
        expected = tf.cast(bsz, tf.float32) * tf.exp(tf.gather(log_q, cand_items)) + \
            float(cfg.random_negatives) / float(n_items)
        logits = logits - tf.math.log(expected)[None, :]
    # Candidates equal to the positive item (other than itself) are not negatives.
    same = tf.equal(item[:, None], cand_items[None, :])
    own = tf.pad(tf.eye(bsz, dtype=tf.bool), [[0, 0], [0, tf.shape(cand_items)[0] - bsz]])
    dup = tf.logical_and(same, tf.logical_not(own))
    student = logits
    logits = tf.where(dup, tf.constant(-1e9, logits.dtype), logits)
    labels = tf.range(bsz)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if model.content_out is not None:
        # The content head, trained among real items (held fixed, like everything but the head):
        # the candidates are the batch's content vectors and its real items. In its item's place
        # the content vector must beat the real candidates (the item's own left out); in the real
        # item's place, the content vectors of other genres must lose to it. Content vectors of
        # items with the same genres are the same vector: left out.
        real = tf.stop_gradient(logits)
        content = tf.matmul(tf.stop_gradient(u), model.content_tower(cand_items), transpose_b=True) / cfg.temperature
        if cfg.logq:
            content = content - tf.math.log(expected)[None, :]
        same = tf.equal(tf.gather(model.genre_set, item)[:, None], tf.gather(model.genre_set, cand_items)[None, :])
        off = tf.constant(-1e9, logits.dtype)
        as_item = tf.concat([tf.where(tf.logical_and(same, tf.logical_not(own)), off, content), tf.where(own, off, real)], 1)
        against_item = tf.concat([tf.where(same, off, content), real], 1)
        loss = loss + tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=as_item) + \
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels + tf.shape(content)[1], logits=against_item)
    if teacher is None or cfg.distill_weight <= 0:
        return tf.reduce_mean(loss)
    t_logits = tf.matmul(batch["teacher_user"], tf.gather(teacher["item"], cand_items),
                         transpose_b=True) / float(teacher["temperature"])
    if cfg.logq:
        t_logits = t_logits - tf.math.log(expected)[None, :]
    valid = tf.logical_and(tf.logical_not(dup), tf.gather(teacher["known"], cand_items)[None, :])
    w = float(cfg.distill_weight)
    return (1.0 - w) * tf.reduce_mean(loss) + w * distillation_kl(student, t_logits, valid, cfg.distill_temperature)


def model_weights(model) -> dict[str, np.ndarray]:
    """The weights the numpy towers need, by name."""
    w = {"user_table": model.user_table.embeddings.numpy(), "hist_table": model.hist_table.embeddings.numpy(),
         "item_table": model.item_table.embeddings.numpy(), "pos_logits": model.pos_logits.numpy(),
         "hidden_w": model.hidden.kernel.numpy(), "hidden_b": model.hidden.bias.numpy(),
         "user_out_w": model.user_out.kernel.numpy(), "user_out_b": model.user_out.bias.numpy(),
         "item_out_w": model.item_out.kernel.numpy(), "item_out_b": model.item_out.bias.numpy()}
    if model.newest_in is not None:
        w["newest_w"] = model.newest_in.kernel.numpy()
    if model.content_out is not None:
        w.update(content_w=model.content_out.kernel.numpy(), content_b=model.content_out.bias.numpy())
    return {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}
