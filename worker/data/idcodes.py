"""Vectorised id encoding: canonical numeric ids through a direct table, any other id
through Arrow hashing; users numbered by first appearance, videos looked up in the
metadata's order (see :mod:`worker.data.ingest` for the rules)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

#: Numeric ids map through a direct table indexed by the number while the largest
#: number stays below this (2**24 int32 entries = 64 MiB); beyond it ids are hashed.
MAX_DIRECT_ID = 1 << 24
#: Decimal digits that always fit an int64.
_MAX_DIGITS = 18
#: Smallest canonical number with d digits, by d (d = 0 and d > 18 are never canonical).
_LOW = np.array(
    [np.iinfo(np.int64).max, 0]
    + [10 ** (d - 1) for d in range(2, _MAX_DIGITS + 1)]
    + [np.iinfo(np.int64).max],
    dtype=np.int64,
)


# ---- id mapping ------------------------------------------------------------------------------


def as_plain(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A contiguous Arrow array; dictionaries decoded, large/view strings cast to string."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not (pa.types.is_string(arr.type) or pa.types.is_integer(arr.type)):
        arr = pc.cast(arr, pa.string())
    return arr


def _numeric_prefix(value: str) -> str:
    """``"video_45"`` → ``"video_"``: the id without its trailing decimal digits."""
    return value.rstrip("0123456789")


def valid_mask(arr: pa.Array) -> Bool:
    """Non-null mask of ``arr`` (cheap when it has no nulls)."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=np.bool_)
    mask: Bool = pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return mask


def _parse_numeric(arr: pa.Array, prefix: str) -> tuple[I64, Bool]:
    """Parse ``<prefix><canonical decimal>`` ids: (numbers, ok) with ok False for other rows.

    Canonical means ASCII digits only, no sign, no leading zero (so the number maps
    back to exactly one string), at most 18 digits. Nulls are not ok. An integer
    column is its own number (with the empty prefix only).
    """
    n = len(arr)
    if pa.types.is_integer(arr.type):
        if prefix != "":
            return np.zeros(n, np.int64), np.zeros(n, np.bool_)
        nums = pc.cast(arr, pa.int64())
        if nums.null_count:
            nums = pc.fill_null(nums, -1)
        out = nums.to_numpy(zero_copy_only=False)
        return np.maximum(out, 0), valid_mask(arr) & (out >= 0)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.bool_)
    ok = valid_mask(arr)
    validity, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    width = len(prefix.encode())
    if width:
        starts = pc.starts_with(arr, prefix)
        if starts.null_count:
            starts = pc.fill_null(starts, False)
        ok &= starts.to_numpy(zero_copy_only=False)
        # Overwrite the prefix with '0's in a copy of the bytes: the cast then reads the
        # number straight away (leading zeros are fine for it), about twice as fast as
        # slicing the prefix off every string.
        data = np.frombuffer(data_buf, dtype=np.uint8, count=int(offsets[-1])).copy()
        begin = offsets[:-1][ok]
        for k in range(width):
            data[begin + k] = ord("0")
        digits = pa.StringArray.from_buffers(
            n, offsets_buf, pa.py_buffer(data), validity, arr.null_count, arr.offset
        )
    else:
        digits = arr
    try:  # fast path: every row is a number (the cast raises otherwise)
        parsed = pc.cast(digits, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        rest = pc.utf8_slice_codeunits(arr, len(prefix)) if prefix else arr
        good = pc.and_(
            pc.ascii_is_decimal(rest), pc.less_equal(pc.binary_length(rest), _MAX_DIGITS)
        )
        good = pc.fill_null(good, False)
        parsed = pc.cast(pc.if_else(good, rest, "0"), pa.int64())
        ok &= good.to_numpy(zero_copy_only=False)
    if parsed.null_count:
        parsed = pc.fill_null(parsed, 0)
    nums = parsed.to_numpy(zero_copy_only=False)
    n_digits = np.clip(np.diff(offsets) - width, 0, _MAX_DIGITS + 1)
    # A canonical number of d digits is >= 10**(d-1) (or is "0"): this rejects leading
    # zeros and signs ("+5", "-0", "05"), and d = 0 or d > 18 fail through _LOW.
    ok &= (nums >= _LOW[n_digits]) & (nums >= 0)
    return np.where(ok, nums, 0), ok


@dataclass(frozen=True)
class Numbers:
    """Ids of the form ``<prefix><canonical decimal>``, as their numbers."""

    prefix: str
    nums: I64


def as_numbers(arr: pa.Array) -> Numbers | None:
    """The numeric form of every id in ``arr`` (no nulls), or None when one has another form."""
    if len(arr) == 0:
        return None
    first = arr[0].as_py()
    prefix = "" if isinstance(first, int) else _numeric_prefix(str(first))
    nums, ok = _parse_numeric(arr, prefix)
    return Numbers(prefix, nums) if ok.all() else None


class UserEncoder:
    """A growing map from user ids (one Arrow array at a time) to dense int32 codes.

    It starts in numeric mode (a direct table indexed by the id's number; the new
    ids of a batch are numbered in increasing numeric order) and switches, once and
    for good, to hashing mode (``dictionary_encode`` + ``index_in``; the new ids of a
    batch are numbered in order of appearance) when a batch holds an id of another
    form, another prefix, or a number too large for the table.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mode: Literal["numeric", "hash"] = "numeric"
        self._prefix: str | None = None
        self._table = np.full(0, -1, dtype=np.int32)
        self._nums: list[I64] = []  # numbers in code order (numeric mode)
        self._ids: list[pa.Array] = []  # ids in code order (hash mode)
        self._value_set: pa.Array | None = None

    def encode(self, ids: pa.Array, numbers: Numbers | None) -> I32:
        """Codes for ``ids`` (non-null), adding the new ones; ``numbers`` is their numeric form."""
        if self.mode == "numeric":
            if numbers is not None and self._prefix in (None, numbers.prefix):
                codes = self._encode_numeric(numbers)
                if codes is not None:
                    return codes
            if len(ids) == 0:
                return np.zeros(0, dtype=np.int32)
            self._switch_to_hash()
        return self._encode_hash(ids)

    def _encode_numeric(self, numbers: Numbers) -> I32 | None:
        nums = numbers.nums
        top = int(nums.max(initial=-1))
        if top >= MAX_DIRECT_ID:
            return None
        self._prefix = numbers.prefix
        if top >= len(self._table):
            size = max(1 << 16, 1 << math.ceil(math.log2(top + 1)))
            grown = np.full(size, -1, dtype=np.int32)
            grown[: len(self._table)] = self._table
            self._table = grown
        codes = self._table[nums]
        new = codes < 0
        if new.any():
            # A marker table is O(table) where a sort of the batch is O(n log n).
            mark = np.zeros(top + 1, dtype=np.bool_)
            mark[nums[new]] = True
            fresh = np.flatnonzero(mark)
            self._table[fresh] = np.arange(self.n, self.n + len(fresh), dtype=np.int32)
            self._nums.append(fresh.astype(np.int64))
            self.n += len(fresh)
            codes[new] = self._table[nums[new]]
        return codes

    def _switch_to_hash(self) -> None:
        self._ids = [pa.array(self.ids(), pa.string())] if self.n else []
        self._table = np.full(0, -1, dtype=np.int32)
        self._nums = []
        self.mode = "hash"
        self._value_set = None

    def _encode_hash(self, ids: pa.Array) -> I32:
        if not pa.types.is_string(ids.type):
            ids = pc.cast(ids, pa.string())
        enc = ids.dictionary_encode()
        uniq = enc.dictionary
        if self._value_set is None:
            self._value_set = (
                pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())
            )
        known = pc.index_in(uniq, value_set=self._value_set)
        is_new = pc.is_null(known).to_numpy(zero_copy_only=False)
        map_codes = pc.fill_null(known, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        k = int(is_new.sum())
        if k:
            # dictionary_encode lists values in order of first appearance.
            map_codes[is_new] = np.arange(self.n, self.n + k, dtype=np.int32)
            self._ids.append(uniq.filter(pa.array(is_new)))
            self._value_set = None
            self.n += k
        codes: I32 = map_codes[enc.indices.to_numpy(zero_copy_only=False)]
        return codes

    def ids(self) -> list[str]:
        """All ids in code order."""
        if self.mode == "numeric":
            if not self.n:
                return []
            strs = pc.cast(pa.array(np.concatenate(self._nums)), pa.string())
            if self._prefix:
                strs = pc.binary_join_element_wise(self._prefix, strs, "")
            ids: list[str] = strs.to_pylist()
            return ids
        every: list[str] = pa.chunked_array(self._ids, pa.string()).to_pylist()
        return every


class ItemLookup:
    """A fixed map from video ids to item codes (-1 when unknown or null)."""

    def __init__(self, ids: pa.Array) -> None:
        self.ids = ids  # unique, non-null strings
        self.mode: Literal["numeric", "hash"] = "hash"
        self._prefix = ""
        self._table = np.full(0, -1, dtype=np.int32)
        if len(ids):
            prefix = _numeric_prefix(str(ids[0].as_py()))
            nums, ok = _parse_numeric(ids, prefix)
            if ok.all() and int(nums.max()) < MAX_DIRECT_ID:
                self.mode, self._prefix = "numeric", prefix
                self._table = np.full(int(nums.max()) + 1, -1, dtype=np.int32)
                self._table[nums] = np.arange(len(ids), dtype=np.int32)

    def lookup(self, arr: pa.Array) -> I32:
        if self.mode == "numeric":
            nums, ok = _parse_numeric(arr, self._prefix)
            ok &= nums < len(self._table)
            return np.where(ok, self._table[np.where(ok, nums, 0)], -1).astype(np.int32)
        if pa.types.is_integer(arr.type):
            arr = pc.cast(arr, pa.string())
        found = pc.index_in(arr, value_set=self.ids)
        codes: I32 = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int32)
        return codes
