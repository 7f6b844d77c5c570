"""The one place that maps wire ids (strings) to matrix rows (ints) and back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class IdMap:
    """A growable, order-preserving bijection between string ids and row indices."""

    __slots__ = ("_ids", "_index")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = list(ids)
        self._index: dict[str, int] = _indexed(self._ids)
        if len(self._index) != len(self._ids):  # duplicates: keep the first occurrence
            self._ids = list(dict.fromkeys(self._ids))
            self._index = _indexed(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def get(self, key: str) -> int | None:
        """Row index of ``key``, or None when unknown."""
        return self._index.get(key)

    def add(self, key: str) -> int:
        """Row index of ``key``, appending it when new."""
        idx = self._index.get(key)
        if idx is None:
            idx = len(self._ids)
            self._index[key] = idx
            self._ids.append(key)
        return idx

    def id_of(self, idx: int) -> str:
        """The string id of row ``idx``."""
        return self._ids[idx]

    @property
    def ids(self) -> Sequence[str]:
        """All ids, in row order (read-only view by convention)."""
        return self._ids

    def copy(self) -> IdMap:
        out = IdMap()
        out._ids = list(self._ids)
        out._index = dict(self._index)
        return out


#: Ids hashed per C call when a map is built. A model loaded in a background thread
#: (a hot swap) then holds the interpreter lock for a few milliseconds at a time, not
#: the ~80 ms one call takes for 200k ids, and the worker's loop keeps its turns.
_CHUNK = 16_384


def _indexed(ids: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for start in range(0, len(ids), _CHUNK):
        stop = min(start + _CHUNK, len(ids))
        index.update(zip(ids[start:stop], range(start, stop), strict=True))
    return index
