"""The item side of videos new to the model, shared by every worker (pure).

A video that the current model did not train on gets its factors from an item-side
ALS solve against the users who interacted with it. Those users live on different
workers (user state is partitioned by ``user_id``), so the solve has one **owner** per
video, the way user state has one owner per user:

1. after each batch a worker sends a :class:`Contribution` for every new video in a
   touched user's row: the user's current factors and row value for that video, keyed
   by ``(video_id, user_id)`` on the partition of ``video_id``
   (:func:`contribution_partition`);
2. the owner of that partition keeps the latest contribution of each user per video
   (:class:`ItemOwner`) and solves the video's factors exactly (:func:`item_solve`);
3. it publishes them as an :class:`ItemUpdate` with a sequence number, keyed by
   ``video_id``, and every worker installs the same bytes in its catalog.

The solve is exact for one stated system, with the item side fixed as ALS does it:
the base model's users at their trained factors (their gramian, which every worker
computes identically from the model), except the video's own audience, whose live
factors replace their trained ones (users new to the model are added). Live users who
never touched the video stay at their trained factors in the gramian: putting every
live user's drift in it would need every worker's users in every owner.
:func:`item_solve_reference` builds that system explicitly and solves it with
``np.linalg.solve``.

A contribution is a *state*, not a delta: the latest one per ``(video, user)`` wins, so a
contribution sent twice (a worker's batch replayed after kill -9) or re-read (an owner
rebuilding from the topic after a rebalance) changes nothing.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from worker.core.als import Confidence, confidence
from worker.errors import DecodeError

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

_FORMAT = 1


def contribution_partition(video_id: str, n_partitions: int) -> int:
    """The contributions partition (and so the owner) of ``video_id``: CRC-32 of its UTF-8
    bytes modulo the partition count, the same in every process and every client."""
    return zlib.crc32(video_id.encode("utf-8")) % max(1, n_partitions)


def _pack(vec: F32) -> str:
    return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")


def _unpack(text: str) -> F32:
    out: F32 = np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
    return out


def _load(raw: bytes | None, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw or b"")
    except ValueError as exc:
        raise DecodeError("bad_json", f"{what}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") != _FORMAT:
        raise DecodeError("bad_format", f"{what}: not a version-{_FORMAT} object")
    return doc


@dataclass(frozen=True, slots=True)
class Contribution:
    """One user's part in a new video's solve: row value and current factors."""

    video_id: str
    user_id: str
    model_version: str
    value: float  # the user's row value for the video; 0 takes the user out
    factors: F32
    event_ms: int = 0  # Kafka timestamp of the newest event it reflects (freshness)

    def key(self) -> bytes:
        """Compaction key: the latest contribution per ``(video, user)`` is all that counts."""
        return json.dumps([self.video_id, self.user_id]).encode("utf-8")

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": _FORMAT,
                "video_id": self.video_id,
                "user_id": self.user_id,
                "model_version": self.model_version,
                "value": self.value,
                "factors": _pack(self.factors),
                "event_ms": self.event_ms,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | None) -> Contribution:
        doc = _load(raw, "item contribution")
        try:
            return cls(
                video_id=str(doc["video_id"]),
                user_id=str(doc["user_id"]),
                model_version=str(doc["model_version"]),
                value=float(doc["value"]),
                factors=_unpack(str(doc["factors"])),
                event_ms=int(doc.get("event_ms", 0)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError("bad_contribution", f"item contribution: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """A new video's solved factors as its owner publishes them."""

    video_id: str
    model_version: str
    seq: int  # per video, increasing with each solve of the same owner lineage
    factors: F32
    audience: int  # users in the solve
    event_ms: int = 0  # newest event time among the contributions it reflects

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": _FORMAT,
                "video_id": self.video_id,
                "model_version": self.model_version,
                "seq": self.seq,
                "factors": _pack(self.factors),
                "audience": self.audience,
                "event_ms": self.event_ms,
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes | None) -> ItemUpdate:
        doc = _load(raw, "item update")
        try:
            return cls(
                video_id=str(doc["video_id"]),
                model_version=str(doc["model_version"]),
                seq=int(doc["seq"]),
                factors=_unpack(str(doc["factors"])),
                audience=int(doc["audience"]),
                event_ms=int(doc.get("event_ms", 0)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise DecodeError("bad_item_update", f"item update: {exc!r}") from exc


#: One audience member in a solve: (row value, live factors, trained factors or None).
Member = tuple[float, F32, F32 | None]


def item_solve(
    user_gram: F32,
    audience: Sequence[Member],
    *,
    regularization: float,
    alpha: float,
    confidence_mode: Confidence = "implicit",
) -> F32:
    """Exact factors of one new video (see the module docstring for the system).

    ``A = G − Σ t tᵀ + Σ |c| x xᵀ + λI`` and ``b = Σ c⁺ x`` over the audience, where
    ``G`` is the trained users' gramian, ``x`` a member's live factors, ``t`` their trained
    factors (absent for a user new to the model) and ``c`` the signed confidence of
    their row value. In float64; O(|audience| f²).
    """
    f = user_gram.shape[0]
    a = user_gram.astype(np.float64) + regularization * np.eye(f)
    b = np.zeros(f, dtype=np.float64)
    if audience:
        x = np.stack([m[1] for m in audience]).astype(np.float64)
        c = confidence(np.array([m[0] for m in audience], dtype=np.float64), alpha, confidence_mode)
        a += (x * np.abs(c)[:, None]).T @ x
        b += np.where(c > 0, c, 0.0) @ x
        trained = [m[2] for m in audience if m[2] is not None]
        if trained:
            t = np.stack(trained).astype(np.float64)
            a -= t.T @ t
    out: F32 = np.linalg.solve(a, b).astype(np.float32)
    return out


def item_solve_reference(
    trained_users: Sequence[str],
    trained_factors: F32,
    live: dict[str, tuple[float, F32]],
    *,
    regularization: float,
    alpha: float,
    confidence_mode: Confidence = "implicit",
) -> F32:
    """Slow reference: the full item-side system, one user at a time.

    Every trained user at their trained factors, each audience member (``live``:
    user -> (value, live factors)) at their live factors, users new to the model
    appended; confidence 0 (weight 1, preference 0) for everyone outside the audience.
    """
    users: dict[str, F64] = {
        u: trained_factors[j].astype(np.float64) for j, u in enumerate(trained_users)
    }
    for u, (_, x) in live.items():
        users[u] = x.astype(np.float64)
    f = trained_factors.shape[1]
    a = regularization * np.eye(f)
    b = np.zeros(f)
    for u, xu in users.items():
        value = live[u][0] if u in live else 0.0
        c = float(confidence(np.array([value]), alpha, confidence_mode)[0])
        weight = 1.0 if value == 0.0 else abs(c)
        a += weight * np.outer(xu, xu)
        if c > 0:
            b += c * xu
    out: F32 = np.linalg.solve(a, b).astype(np.float32)
    return out


@dataclass
class _OwnedVideo:
    # user -> (row value, live factors, event ms)
    audience: dict[str, tuple[float, F32, int]] = field(default_factory=dict)
    seq: int = 0
    dirty: bool = False


class ItemOwner:
    """The owner side: latest contributions per owned new video, and their solves.

    ``trained_of(user_id)`` gives a user's trained factors (None for a user new to the
    model); ``user_gram`` is the trained users' gramian. Contributions of another model
    version are ignored: their factors live in another space.
    """

    def __init__(
        self,
        *,
        model_version: str,
        user_gram: F32,
        trained_of: Callable[[str], F32 | None],
        regularization: float,
        alpha: float,
        confidence_mode: Confidence = "implicit",
    ) -> None:
        self.model_version = model_version
        self.user_gram = user_gram
        self.trained_of = trained_of
        self.regularization = regularization
        self.alpha = alpha
        self.confidence_mode: Confidence = confidence_mode
        self.videos: dict[str, _OwnedVideo] = {}
        self._seq_seen: dict[str, int] = {}  # highest seq seen on the updates topic
        self.pending: dict[tuple[str, str], Contribution] = {}  # other model versions

    def apply(self, c: Contribution) -> bool:
        """Take one contribution; True when it was for this model version."""
        if c.model_version != self.model_version:
            self.pending[c.video_id, c.user_id] = c
            return False
        video = self.videos.get(c.video_id)
        if video is None:
            video = self.videos[c.video_id] = _OwnedVideo(seq=self._seq_seen.get(c.video_id, 0))
        if c.value == 0.0:
            video.audience.pop(c.user_id, None)
        else:
            video.audience[c.user_id] = (c.value, c.factors, c.event_ms)
        video.dirty = True
        return True

    def saw_update(self, update: ItemUpdate) -> None:
        """Note a published seq (from any owner), so a new owner's seqs continue it."""
        if update.model_version != self.model_version:
            return
        seen = max(self._seq_seen.get(update.video_id, 0), update.seq)
        self._seq_seen[update.video_id] = seen
        video = self.videos.get(update.video_id)
        if video is not None:
            video.seq = max(video.seq, seen)

    def solve(self, video_id: str) -> F32:
        """The exact factors of one owned video from its current audience."""
        audience = self.videos[video_id].audience
        members = [(v, x, self.trained_of(u)) for u, (v, x, _) in sorted(audience.items())]
        return item_solve(
            self.user_gram,
            members,
            regularization=self.regularization,
            alpha=self.alpha,
            confidence_mode=self.confidence_mode,
        )

    def updates(self, video_ids: Iterable[str] | None = None) -> list[ItemUpdate]:
        """Solve the videos changed since the last call (or ``video_ids``), next seq each."""
        chosen = (
            [v for v, st in self.videos.items() if st.dirty]
            if video_ids is None
            else [v for v in video_ids if v in self.videos]
        )
        out: list[ItemUpdate] = []
        for vid in sorted(chosen):
            st = self.videos[vid]
            st.dirty = False
            st.seq += 1
            self._seq_seen[vid] = st.seq
            out.append(
                ItemUpdate(
                    video_id=vid,
                    model_version=self.model_version,
                    seq=st.seq,
                    factors=self.solve(vid),
                    audience=len(st.audience),
                    event_ms=max((ms for _, _, ms in st.audience.values()), default=0),
                )
            )
        return out

    def drop(self, keep: Callable[[str], bool]) -> int:
        """Forget every video for which ``keep(video_id)`` is false (partitions revoked)."""
        gone = [v for v in self.videos if not keep(v)]
        for v in gone:
            del self.videos[v]
        self.pending = {k: c for k, c in self.pending.items() if keep(k[0])}
        return len(gone)

    def take_pending(self, successor: ItemOwner) -> int:
        """Hand the contributions kept for the next model to its owner; returns how many.

        The rest (the model swapped away from, sent by workers that had not swapped yet)
        are dropped, so contributions of old versions never pile up across swaps."""
        mine = [c for c in self.pending.values() if c.model_version == successor.model_version]
        for c in mine:
            successor.apply(c)
        self.pending = {}
        return len(mine)

    @property
    def n_videos(self) -> int:
        return len(self.videos)

    @property
    def contributions(self) -> int:
        return sum(len(v.audience) for v in self.videos.values())
