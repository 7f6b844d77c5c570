"""Event maps for :func:`worker.eval.convert.convert_interactions`.

An event map turns an interaction log's event type (``view``, ``addtocart``,
``buy`` ...) into a watch fraction and an optional reaction. This module holds
the built-in map, the ``--event-map`` parser and the column mapping step.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from worker.errors import DataError

#: Event type → (watch fraction, reaction or None) for :func:`convert_interactions`.
#: Keys are normalised: lower case, letters and digits only ("add_to_cart" → "addtocart").
#: A product/page view is a short look (a quarter of a watch); adding to a cart or
#: a wishlist is interest without commitment (neutral); buying is a like.
#: Two public e-commerce logs convert with no map at all:
#: Taobao UserBehavior (``pv``, ``cart``, ``fav``, ``buy``) and RetailRocket events.csv
#: (``view``, ``addtocart``, ``transaction``). Taobao's ``pv`` is RetailRocket's ``view``
#: (a page view: 0.25), ``fav`` (favourite) is its wishlist (0.6, neutral: saved, not
#: bought), ``cart`` is ``addtocart`` and ``buy`` is ``transaction`` (1.0, like: the
#: strongest signal either log has). Views are not 0: on both logs they are ~90 % of the
#: rows and most of what is known about a user.
DEFAULT_EVENT_MAP: dict[str, tuple[float, str | None]] = {
    "view": (0.25, None),
    "pageview": (0.25, None),
    "pv": (0.25, None),
    "click": (0.25, None),
    "impression": (0.0, None),
    "addtocart": (0.6, "neutral"),
    "cart": (0.6, "neutral"),
    "addtowishlist": (0.6, "neutral"),
    "wishlist": (0.6, "neutral"),
    "favorite": (0.6, "neutral"),
    "fav": (0.6, "neutral"),
    "transaction": (1.0, "like"),
    "purchase": (1.0, "like"),
    "buy": (1.0, "like"),
    "order": (1.0, "like"),
    "like": (1.0, "like"),
    "neutral": (0.5, "neutral"),
    "dislike": (0.0, "dislike"),
    "removefromcart": (0.0, None),
}
ACTIONS = ("like", "neutral", "dislike")


class UnknownEventTypeError(DataError):
    """Event types of the value column that the event map does not know."""

    def __init__(self, message: str, *, types: list[str]) -> None:
        super().__init__(message)
        self.types = types


def _event_entry(name: str, fraction: object, reaction: object) -> tuple[float, str | None]:
    try:
        value = float(fraction)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"event map {name!r}: fraction {fraction!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise DataError(f"event map {name!r}: fraction {value} is not in [0, 1]")
    if reaction in (None, "", "none"):
        return value, None
    if reaction not in ACTIONS:
        raise DataError(f"event map {name!r}: reaction {reaction!r} not in {ACTIONS}")
    return value, str(reaction)


def parse_event_map(text: str) -> dict[str, tuple[float, str | None]]:
    """The ``--event-map`` value: ``TYPE=FRACTION[:REACTION],...`` or ``@file.json``.

    The JSON file is an object ``{"TYPE": [FRACTION, REACTION or null], ...}`` (a bare
    number is a fraction without a reaction). Entries extend and override
    :data:`DEFAULT_EVENT_MAP` (see :func:`convert_interactions`).
    """
    out: dict[str, tuple[float, str | None]] = {}
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"--event-map {text}: cannot read ({exc})") from None
        except ValueError as exc:
            raise DataError(f"--event-map {text}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise DataError(f"--event-map {text}: expected an object of TYPE: [FRACTION, REACTION]")
        for name, entry in raw.items():
            if isinstance(entry, list) and len(entry) in (1, 2):
                out[str(name)] = _event_entry(name, entry[0], entry[1] if len(entry) > 1 else None)
            elif isinstance(entry, int | float) and not isinstance(entry, bool):
                out[str(name)] = _event_entry(name, entry, None)
            else:
                raise DataError(
                    f"--event-map {text}: {name!r} is {entry!r}; expected [FRACTION, REACTION|null]"
                )
        return out
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, eq, rest = item.partition("=")
        if not eq or not name.strip():
            raise DataError(f"--event-map: {item!r} is not TYPE=FRACTION[:REACTION]")
        fraction, _, reaction = rest.partition(":")
        out[name.strip()] = _event_entry(name.strip(), fraction.strip(), reaction.strip() or None)
    return out


def normalise_event(value: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(value).lower())


def map_events(
    col: pd.Series,
    events: Mapping[str, tuple[float, str | None]],
    path: Path,
    value_col: str,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.object_]]:
    keys = col.map(normalise_event)
    unknown = sorted(set(keys.unique()) - set(events))
    if unknown:
        raise UnknownEventTypeError(
            f"{path}: unknown event types in {value_col!r}: {unknown[:10]}; "
            "pass event_map={type: (watch_fraction, reaction or None)}",
            types=unknown,
        )
    fraction = keys.map(lambda k: events[k][0]).to_numpy(dtype=np.float64)
    action = keys.map(lambda k: events[k][1]).to_numpy(dtype=object)
    return fraction, action
