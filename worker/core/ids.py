"""The one place that maps wire ids (strings) to matrix rows (ints) and back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class IdMap:
    """A growable, order-preserving bijection between string ids and row indices."""

    __slots__ = ("_ids", "_index")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = list(ids)
        self._index: dict[str, int] = dict(zip(self._ids, range(len(self._ids)), strict=True))
        if len(self._index) != len(self._ids):  # duplicates: keep the first occurrence
            unique = list(dict.fromkeys(self._ids))
            self._ids = unique
            self._index = dict(zip(unique, range(len(unique)), strict=True))

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
