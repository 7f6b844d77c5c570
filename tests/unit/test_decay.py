"""Recency decay: the fast path against the reference, and decay applied the same way in
bootstrap training, the live fold-in and the changelog."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tests.kit import make_model
from worker.core.als import fold_in, gramian
from worker.core.decay import (
    UNKNOWN,
    US_PER_DAY,
    ages,
    decay_matrix,
    decayed,
    decayed_reference,
)
from worker.core.engine import Recommender
from worker.core.model import AlsParams
from worker.core.state import _HEAD, _MAGIC_V2, _MAGIC_V3, UserState, decode_record, encode_state
from worker.core.wire import RatingEvent
from worker.data.synth import synthesize
from worker.storage import load_model
from worker.train import bootstrap

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def ev(eid: str, user: str, video: str, day: float, action: str = "like") -> RatingEvent:
    return RatingEvent(
        event_id=eid, user_id=user, video_id=video, action=action, ts=T0 + timedelta(days=day)
    )


@pytest.mark.parametrize("mode", ["none", "items", "time"])
@pytest.mark.parametrize("seed", range(6))
def test_decayed_equals_reference(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 40))
    values = rng.uniform(-2, 3, n).astype(np.float32)
    times = rng.integers(0, 5, n) * US_PER_DAY + rng.integers(0, 3, n)  # many ties
    if n and seed % 2:
        times[rng.random(n) < 0.3] = UNKNOWN
    for half_life in (0.5, 3.0, 25.0):
        got = decayed(values, times, mode, half_life)  # type: ignore[arg-type]
        want = decayed_reference(values, times, mode, half_life)  # type: ignore[arg-type]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_ages_by_hand() -> None:
    t = np.array([5, 1, 5, 3, UNKNOWN], dtype=np.int64)
    # items: distinct items touched strictly later; the unknown one counts as the oldest
    np.testing.assert_array_equal(ages(t, "items"), [0, 3, 0, 2, 3])
    days = np.array([2, 0, 1], dtype=np.int64) * US_PER_DAY
    np.testing.assert_array_equal(ages(days, "time"), [0, 2, 1])
    np.testing.assert_array_equal(ages([UNKNOWN, UNKNOWN], "items"), [0, 0])
    np.testing.assert_allclose(decayed([1.0, 1.0, 1.0], days, "time", 1.0), [1, 0.25, 0.5])
    with pytest.raises(ValueError):
        ages(t, "bogus")  # type: ignore[arg-type]


def test_decay_matrix_decays_each_row_alone() -> None:
    m = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]], dtype=np.float32))
    times = np.array([1, 2, 7, 0], dtype=np.int64) * US_PER_DAY
    out = decay_matrix(m, times, "time", 1.0)
    np.testing.assert_allclose(out.toarray(), [[0.5, 2.0, 0.0], [0.0, 3.0, 4.0 / 128]])
    assert decay_matrix(m, None, "time", 1.0) is m


def test_fold_in_with_decay_equals_solve_of_the_decayed_row() -> None:
    model = make_model()
    params = replace(model.params, decay="items", decay_half_life=2.0)
    eng = Recommender(replace(model, params=params))
    for j, v in enumerate(["v100", "v101", "v102", "v7"]):
        eng.apply(ev(f"e{j}", "u3", v, day=j))
    eng.recommend(["u3"])
    st = eng.users["u3"]
    cols = np.array(list(st.row), dtype=np.int64)
    vals = np.array(list(st.row.values()), dtype=np.float32)
    times = np.array([st.touched.get(int(i), UNKNOWN) for i in cols], dtype=np.int64)
    dv = decayed_reference(vals, times, "items", 2.0).astype(np.float64)
    # the normal equations by hand, implicit's convention (c = alpha * v, weight |c| - 1)
    y = model.item_factors.astype(np.float64)
    c = params.alpha * dv
    a = y.T @ y + params.regularization * np.eye(y.shape[1])
    b = np.zeros(y.shape[1])
    for i, ci in zip(cols, c, strict=True):
        a += (abs(ci) - 1.0) * np.outer(y[i], y[i])
        if ci > 0:
            b += ci * y[i]
    np.testing.assert_allclose(st.factors, np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)


def test_engine_lists_change_when_decay_is_on() -> None:
    model = make_model()
    lists = {}
    for mode in ("none", "time"):
        params = replace(model.params, decay=mode, decay_half_life=0.5)  # type: ignore[arg-type]
        eng = Recommender(replace(model, params=params))
        for j in range(12):
            eng.apply(ev(f"e{j}", "u3", f"v{20 + 7 * j}", day=3 * j))
        lists[mode] = eng.recommend(["u3"])[0].video_ids
    assert lists["none"] != lists["time"]


def test_state_times_round_trip_and_old_records_load() -> None:
    eng = Recommender(make_model())
    eng.apply(ev("e1", "u1", "v2", day=1), partition=0, offset=1)
    eng.apply(ev("e2", "u1", "v5", day=3), partition=0, offset=2)
    eng.apply(ev("e3", "u1", "v2", day=2), partition=0, offset=3)  # late event: max stays
    st = eng.users["u1"]
    assert st.touched[2] == int((T0 + timedelta(days=2)).timestamp() * 1e6)  # the latest
    raw = encode_state(st, eng.catalog.items.id_of)
    back = UserState.from_record(decode_record(raw), eng.catalog.ensure)
    assert back.row == st.row and back.touched == st.touched
    assert back.pairs == st.pairs and back.since == st.since
    # a version-2 value (no times) still loads: its entries' times are unknown
    _, applied, part, off, n, ids_len = _HEAD.unpack_from(raw)
    at = _HEAD.size + 8 * n
    v2 = _HEAD.pack(_MAGIC_V2, applied, part, off, n, ids_len) + raw[_HEAD.size : at]
    v2 += raw[at + 8 * n + 9 * n :]  # without the times, pair states and since times
    v3 = _HEAD.pack(_MAGIC_V3, applied, part, off, n, ids_len) + raw[_HEAD.size : at + 8 * n]
    v3 += raw[at + 8 * n + 9 * n :]
    rec3 = decode_record(v3)
    assert rec3["v"] == 3 and rec3["times"] == decode_record(raw)["times"]
    old3 = UserState.from_record(rec3, eng.catalog.ensure)
    assert old3.touched == st.touched and old3.pairs == {} and old3.since == {}
    rec = decode_record(v2)
    assert rec["v"] == 2 and rec["times"] == [UNKNOWN] * n
    old = UserState.from_record(rec, eng.catalog.ensure)
    assert old.row == st.row and old.touched == {}
    assert old.recent_ids == st.recent_ids


@pytest.mark.parametrize("mode", ["items", "time"])
def test_bootstrap_factors_are_the_fold_in_of_stored_rows_with_decay(
    tmp_path: Path, mode: str
) -> None:
    data = tmp_path / "data"
    synthesize(data, users=200, videos=100, events=6000, seed=5, progress=False)
    half_life = 5.0 if mode == "items" else 3.0
    params = AlsParams(
        factors=8, regularization=1.0, alpha=3.0, iterations=3, decay=mode,  # type: ignore[arg-type]
        decay_half_life=half_life,
    )  # fmt: skip
    bootstrap(
        data / "logs.parquet", data / "video_stat.parquet", tmp_path / "m",
        reactions=data / "reactions.parquet", params=params, threads=1, gpu="off",
        progress=False,
    )  # fmt: skip
    model = load_model(tmp_path / "m")
    assert model.params.decay == mode and model.user_row_times is not None
    assert len(model.user_row_times) == model.user_rows.nnz
    eng = Recommender(model)
    users = list(model.users.ids)
    rows = [eng._fold_row(eng.state_of(u)) for u in users]
    undecayed = [model.row_of(i) for i in range(model.n_users)]
    assert any(not np.allclose(r[1], u[1]) for r, u in zip(rows, undecayed, strict=True))
    kw = {"regularization": params.regularization, "alpha": params.alpha}
    want = fold_in(model.item_factors, gramian(model.item_factors), rows, **kw)  # type: ignore[arg-type]
    err = np.linalg.norm(model.user_factors - want, axis=1) / np.maximum(
        np.linalg.norm(want, axis=1), 1e-12
    )
    assert err.max() < 1e-3
    plain = fold_in(model.item_factors, gramian(model.item_factors), undecayed, **kw)  # type: ignore[arg-type]
    assert not np.allclose(model.user_factors, plain, atol=1e-3)
    # the engine's own refold of a stored row gives the stored factors back
    for u in users[:5]:
        eng.users[u].factors = None
    eng.refresh(users[:5])
    got = np.stack([eng.users[u].factors for u in users[:5]])  # type: ignore[misc]
    np.testing.assert_allclose(got, model.user_factors[:5], rtol=1e-3, atol=1e-4)


def test_tune_searches_decay_and_its_half_life() -> None:
    optuna = pytest.importorskip("optuna")
    from worker.eval.tune import DECAY_HALF_LIFE, suggest

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, list[float]] = {}
    for _ in range(40):
        trial = study.ask()
        params, _ = suggest(trial)
        seen.setdefault(params.decay, []).append(params.decay_half_life)
        study.tell(trial, 0.0)
    assert set(seen) == {"none", "items", "time"}
    for mode in ("items", "time"):
        lo, hi = DECAY_HALF_LIFE[mode]
        assert all(lo <= h <= hi for h in seen[mode]) and len(set(seen[mode])) > 1


@pytest.mark.parametrize("mode", ["none", "items", "time"])
def test_decayed_rows_equals_decayed_row_by_row(mode: str) -> None:
    from worker.core.decay import decayed_rows

    rng = np.random.default_rng(11)
    values, times = [], []
    for r in range(30):
        n = int(rng.integers(0, 12)) if r % 5 else 0
        values.append(rng.uniform(-2, 3, n).astype(np.float32))
        t = (rng.integers(0, 6, n) * US_PER_DAY + rng.integers(0, 2, n)).astype(np.int64)
        t[rng.random(n) < (0.3 if r % 3 else 1.0)] = UNKNOWN
        times.append(t)
    got = decayed_rows(values, times, mode, 2.5)  # type: ignore[arg-type]
    for g, v, t in zip(got, values, times, strict=True):
        np.testing.assert_array_equal(g, decayed(v, t, mode, 2.5))  # type: ignore[arg-type]
