"""The recompute path: a high-res call's native maps rebuilt by running native UNet calls
again (exact), when the record keeps replay payloads instead of maps (over its budget) or
there was no native pass (the reference path: img2img, the upscale button).

The host's replay function re-runs one payload through the model of the pass being guided;
the run records the AM layers' inputs into a scratch entry while it does."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Sequence

from .record import EntryMaps, NativeEntry, Role

__all__ = ["Replayer", "ReplayDone", "ReplayUnavailable"]


class ReplayDone(Exception):
    """Raised inside a replayed native UNet once every AM layer is recorded: the rest of
    the network is not needed."""


class ReplayUnavailable(Exception):
    """Raised by a host's replay function when native calls cannot be re-run in this pass
    (e.g. a UNet hook holds high-res inputs). The message becomes the skip reason of every
    AM call that needed a replay; no replay is tried again."""


class Replayer:
    """Rebuilds entries of the native record for the high-res pass. `replay_fn(payload)`
    re-runs one native call; `recording_into(entry)` makes the run record what it sees there."""

    def __init__(self, replay_fn: Callable[[Any], None],
                 recording_into: Callable[[NativeEntry], ContextManager]):
        self.replay_fn: Callable[[Any], None] | None = replay_fn
        self.recording_into = recording_into
        self.replays = 0
        self.unavailable: str | None = None   # why replays stopped, if they did
        self._scratch: NativeEntry | None = None
        self._tried: set[tuple[Role, ...]] = set()   # row roles rebuilt for at the scratch's σ

    def close(self) -> None:
        """No more replays; the scratch entry's maps are freed (the count stays)."""
        self.replay_fn = self._scratch = None
        self._tried = set()

    def maps(self, entry: NativeEntry, roles: Sequence[Role]):
        """(EntryMaps, `Located`) of `entry` for `roles`, rebuilt by replay, or None. A replay
        may cover only its own call's rows (reference path): a split CFG call at the same σ
        (cond chunk, then uncond) adds its rows to the entry rebuilt for the previous one.
        Rows the replays cannot give (a role the first pass never ran) borrow, as on the
        record path; each row layout is rebuilt for once per σ."""
        roles, scratch = tuple(roles), self._scratch
        if scratch is not None and scratch.sigma != entry.sigma:
            scratch, self._tried = None, set()
        if (scratch is None or scratch.locate(roles) is None) and roles not in self._tried:
            self._tried.add(roles)
            scratch = self._scratch = self._rebuild(entry, scratch)
        located = None if scratch is None else scratch.locate(roles, borrow=True)
        if located is None:
            return None
        return EntryMaps(scratch, [s.data for s in scratch.segments]), located

    def _rebuild(self, entry: NativeEntry, scratch: NativeEntry | None) -> NativeEntry | None:
        if self.replay_fn is None or not entry.replays:
            return scratch
        scratch = scratch or NativeEntry(entry.sigma)
        for payload in entry.replays:
            with self.recording_into(scratch), contextlib.suppress(ReplayDone):
                try:
                    self.replay_fn(payload)
                except ReplayUnavailable as e:
                    self.replay_fn, self.unavailable = None, str(e)
                    return None
            self.replays += 1
        return scratch
