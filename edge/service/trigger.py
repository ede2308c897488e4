"""When to classify: every frame (`continuous`), or K frames per item announced by a trigger message.

In `item` mode a photo-eye event (an MQTT message with an item id) starts a vote over the next
`frames_per_item` classified frames, all captured after the trigger arrived; the item gets ONE result:
the deepest label path that at least
`vote_agreement` of its frames agree on (agreement on a parent when the frames disagree below it),
else `unknown`. Items arriving while one is being voted on wait in a bounded queue (`trigger.max_waiting`).

Every accepted trigger ends in exactly one result: a vote, or `unknown` with a reason
(protocol.UnknownReason):
`no_item` when most of its frames showed no product (edge/service/noitem.py), `overflow` for the oldest
waiting item when the queue is full, `timed_out` for an item that got no frame in
`item_timeout_s`, `shutdown` / `source_ended` for the items still waiting when the daemon stops.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from ..kernel.decode import Decision, LevelScore
from ..kernel.protocol import UnknownReason
from ..kernel.taxonomy import Taxonomy

UNKNOWN = Decision(decision="unknown", label=None, path=(), levels=(), top_k=())


@dataclass
class ItemVote:
    item_id: str
    triggered: float  # time.monotonic() when the trigger message came: its frames are captured after it
    started: float  # time.monotonic() when the vote began (the item timeout counts from here)
    decisions: list[Decision | None] = field(default_factory=list)  # None: that frame's inference failed


@dataclass(frozen=True)
class ItemResult:
    item_id: str
    decision: Decision
    frames: int
    agreeing: int
    reason: UnknownReason | None = None  # why the decision is unknown (None when it is not)
    triggered: float = 0.0  # time.monotonic() of its trigger (0.0 for one closed without a vote)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.frames if self.frames else 0.0


def vote(decisions: list[Decision | None], taxonomy: Taxonomy, agreement: float) -> tuple[Decision, int]:
    """(the item's decision, how many frames agree with it) from per-frame decisions."""
    n = len(decisions)
    paths = [d.path if d is not None else () for d in decisions]
    for depth in range(max((len(p) for p in paths), default=0), 0, -1):
        counts = Counter(p[:depth] for p in paths if len(p) >= depth)
        if not counts:
            continue
        prefix, count = counts.most_common(1)[0]
        if count / n >= agreement:
            return _combined(
                prefix, [d for d in decisions if d is not None and d.path[:depth] == prefix], taxonomy
            ), count
    return UNKNOWN, sum(1 for p in paths if not p)


def _combined(path: tuple[str, ...], agreeing: list[Decision], taxonomy: Taxonomy) -> Decision:
    """One decision for `path`: per-level scores averaged over the frames that agree with it."""
    levels = []
    for depth in range(1, len(path) + 1):
        scores = [lv for d in agreeing for lv in d.levels if lv.depth == depth]
        first = scores[0]
        mean = min(round(sum(s.score for s in scores) / len(scores), 6), 1.0)
        levels.append(LevelScore(depth, first.id, first.name, first.slug, mean, True))
    node = taxonomy.by_label.get("/".join(path))
    # an enrolled product (edge/service/enrollment.py) is no node of the trained taxonomy: its path is a
    # leaf where the frames' paths end there, a branch where they agree only on a part of it
    is_leaf = node.is_leaf if node is not None else all(d.path == path for d in agreeing)
    enrolled = all(d.source == "enrolled" and d.path == path for d in agreeing)
    top: Counter[str] = Counter()
    for d in agreeing:
        for label, score in d.top_k:
            top[label] += score / len(agreeing)
    return Decision(
        decision="accepted" if is_leaf else "backed-off",
        label="/".join(path),
        path=path,
        levels=tuple(levels),
        top_k=tuple(
            (label, min(round(score, 6), 1.0)) for label, score in top.most_common(len(agreeing[0].top_k))
        ),
        source="enrolled" if enrolled else "model",
        similarity=round(sum(d.similarity or 0.0 for d in agreeing) / len(agreeing), 6) if enrolled else None,
    )


def _unknown_reason(decisions: list[Decision | None]) -> UnknownReason:
    """Why an item came out unknown: the reason most of its unknown frames gave when that is no_item (no
    product in view) or unfamiliar, else low_confidence; no_frames when no frame was classified."""
    if all(d is None for d in decisions):
        return "no_frames"
    reasons = Counter(d.reason for d in decisions if d is not None and d.decision == "unknown")
    top = reasons.most_common(1)[0][0] if reasons else None
    if top == "no_item":
        return "no_item"
    return "unfamiliar" if top == "unfamiliar" else "low_confidence"


class ItemTrigger:
    """Item votes. Thread-safe: MQTT's control thread calls `trigger`, the inference loop the rest."""

    def __init__(
        self,
        taxonomy: Taxonomy,
        frames_per_item: int,
        agreement: float,
        timeout_s: float,
        max_waiting: int = 100,
    ):
        self.taxonomy = taxonomy
        self.frames_per_item = frames_per_item
        self.agreement = agreement
        self.timeout_s = timeout_s
        self._waiting: deque[tuple[str, float]] = deque()  # (item id, time.monotonic() of its trigger)
        self._max_waiting = max_waiting
        self._current: ItemVote | None = None
        self._closed: UnknownReason | None = None  # set by `close`: later triggers get this at once
        self._lock = threading.Lock()
        self.items = 0
        self.overflowed = 0
        self.timed_out = 0

    def trigger(self, item_id: str) -> ItemResult | None:
        """Queue an item. Returns a result to publish now: the oldest waiting item's `overflow` when the
        queue was full, or this item's own when the trigger is closed (the daemon is stopping)."""
        with self._lock:
            if self._closed is not None:
                self.items += 1
                return ItemResult(item_id, UNKNOWN, 0, 0, self._closed)
            self._waiting.append((item_id, time.monotonic()))
            if len(self._waiting) <= self._max_waiting:
                return None
            oldest, _ = self._waiting.popleft()
            self.overflowed += 1
            self.items += 1
            return ItemResult(oldest, UNKNOWN, 0, 0, "overflow")

    @property
    def busy(self) -> bool:
        """A vote is in progress: a model switch must wait until it ends."""
        return self._current is not None

    def want_frame(self) -> str | None:
        """The item id the next frame is for, starting the next waiting item if none is being voted on."""
        with self._lock:
            if self._current is None and self._waiting and self._closed is None:
                self._current = ItemVote(*self._waiting.popleft(), time.monotonic())
            if self._current is None:
                return None
            return self._current.item_id

    def before_trigger(self, item_id: str, captured: float) -> bool:
        """Was a frame captured (time.monotonic()) before `item_id`'s trigger? Then it shows the belt before
        the item reached the camera, and must not vote on it."""
        with self._lock:
            vote_ = self._current
            return vote_ is not None and vote_.item_id == item_id and captured < vote_.triggered

    def add(self, item_id: str, decision: Decision | None) -> ItemResult | None:
        """Count one frame's decision; the item's result when it had all its frames."""
        with self._lock:
            vote_ = self._current
            if vote_ is None or vote_.item_id != item_id:
                return None
            vote_.decisions.append(decision)
            if len(vote_.decisions) < self.frames_per_item:
                return None
            return self._finish()

    def expire(self) -> ItemResult | None:
        """The current item's result when it ran out of time before getting all its frames."""
        with self._lock:
            if self._current is None or time.monotonic() - self._current.started < self.timeout_s:
                return None
            self.timed_out += 1
            return self._finish("timed_out")

    def close(self, reason: UnknownReason) -> list[ItemResult]:
        """The daemon stops (or its source ended): the current item's vote on what it has, `reason` for
        every waiting item, and for every trigger from now on."""
        with self._lock:
            self._closed = reason
            results = [self._finish(reason)] if self._current is not None else []
            while self._waiting:
                item_id, _ = self._waiting.popleft()
                self.items += 1
                results.append(ItemResult(item_id, UNKNOWN, 0, 0, reason))
            return results

    def _finish(self, no_frames: UnknownReason = "no_frames") -> ItemResult:
        vote_, self._current = self._current, None
        assert vote_ is not None
        self.items += 1
        if not vote_.decisions:
            return ItemResult(vote_.item_id, UNKNOWN, 0, 0, no_frames, vote_.triggered)
        decision, agreeing = vote(vote_.decisions, self.taxonomy, self.agreement)
        reason: UnknownReason | None = None
        if decision.decision == "unknown":
            reason = _unknown_reason(vote_.decisions)
        return ItemResult(vote_.item_id, decision, len(vote_.decisions), agreeing, reason, vote_.triggered)

    def waiting(self) -> int:
        return len(self._waiting)
