"""Bootstrap training: exact final user solve, model files, and ranking quality."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from worker.core.als import fold_in, gramian
from worker.core.model import AlsParams, Model
from worker.data.ingest import build_interactions
from worker.data.synth import synthesize
from worker.errors import ConfigError, ModelError
from worker.storage import _manifest_digest, load_model
from worker.train import bootstrap, solve_users, train_factors

PARAMS = {"factors": 8, "iterations": 4, "threads": 1, "gpu": "off", "progress": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    synthesize(out, users=300, videos=120, events=8000, seed=4, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Path]:
    out = tmp_path_factory.mktemp("models") / "m1"
    model = bootstrap(
        data_dir / "logs.parquet",
        data_dir / "video_stat.parquet",
        out,
        reactions=data_dir / "reactions.parquet",
        **PARAMS,  # type: ignore[arg-type]
    )
    return model, out


def test_stored_user_factors_are_the_exact_fold_in(trained: tuple[Model, Path]) -> None:
    _, path = trained
    model = load_model(path)
    rows = [model.row_of(u) for u in range(model.n_users)]
    assert any((v < 0).any() for _, v in rows)  # dislikes are in there
    want = fold_in(
        model.item_factors,
        gramian(model.item_factors),
        rows,
        regularization=model.params.regularization,
        alpha=model.params.alpha,
    )
    err = np.linalg.norm(model.user_factors - want, axis=1) / np.maximum(
        np.linalg.norm(want, axis=1), 1e-12
    )
    assert err.max() < 1e-3


def test_model_contents(trained: tuple[Model, Path], data_dir: Path) -> None:
    model, path = trained
    loaded = load_model(path)
    assert loaded.version == model.version
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", model.version)
    assert loaded.params == AlsParams(
        factors=8, regularization=model.params.regularization, alpha=model.params.alpha,
        iterations=4,
    )  # fmt: skip
    assert loaded.n_items == 120  # every metadata video, cold ones included
    assert np.array_equal(loaded.item_factors, model.item_factors)
    assert (loaded.user_rows != model.user_rows).nnz == 0
    for codes, names, want_codes, want_names in (
        (
            loaded.videos.category,
            loaded.videos.categories,
            model.videos.category,
            model.videos.categories,
        ),
        (loaded.videos.author, loaded.videos.authors, model.videos.author, model.videos.authors),
    ):
        assert [names[c] if c >= 0 else None for c in codes] == [
            want_names[c] if c >= 0 else None for c in want_codes
        ]
    summary = loaded.manifest["data_summary"]
    assert summary["rows_read"] == 8000 and summary["layout"] == "seed"
    assert summary["training"]["fit_seconds"] >= 0
    assert summary["training"]["device"] == "cpu"
    assert model.manifest["version"] == model.version


def test_version_is_reproducible_in_its_hash(data_dir: Path, tmp_path: Path) -> None:
    a = bootstrap(
        data_dir / "logs.parquet",
        data_dir / "video_stat.parquet",
        tmp_path / "a",
        **PARAMS,  # type: ignore[arg-type]
    )
    b = bootstrap(
        data_dir / "logs.parquet", data_dir / "video_stat.parquet", tmp_path / "b",
        version="custom-1", **PARAMS,  # type: ignore[arg-type]
    )  # fmt: skip
    assert b.version == "custom-1"
    # Same data and parameters, one thread: the same factors.
    assert np.array_equal(a.item_factors, b.item_factors)


MODEL_FILES = [
    "manifest.json",
    "user_factors.npy",
    "item_factors.npy",
    "user_rows.npz",
    "users.parquet",
    "videos.parquet",
]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_flipped_byte_names_the_file(
    trained: tuple[Model, Path], tmp_path: Path, name: str
) -> None:
    _, path = trained
    copy = tmp_path / "model"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    target = copy / name
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=re.escape(name)):
        load_model(copy)


def test_wrong_format_version_fails(trained: tuple[Model, Path], tmp_path: Path) -> None:
    _, path = trained
    copy = tmp_path / "model"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 999
    manifest["manifest_sha256"] = _manifest_digest(manifest)  # a consistent, newer manifest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="format_version 999"):
        load_model(copy)


def test_gpu_on_without_cuda_is_a_config_error(data_dir: Path, tmp_path: Path) -> None:
    import implicit.gpu

    if implicit.gpu.HAS_CUDA:
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="CUDA"):
        bootstrap(
            data_dir / "logs.parquet", data_dir / "video_stat.parquet", tmp_path / "m",
            **{**PARAMS, "gpu": "on"},  # type: ignore[arg-type]
        )  # fmt: skip


def test_bad_parameters(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        bootstrap(
            data_dir / "logs.parquet", data_dir / "video_stat.parquet", tmp_path / "m",
            **{**PARAMS, "factors": 0},  # type: ignore[arg-type]
        )  # fmt: skip


def test_train_factors_shapes(data_dir: Path) -> None:
    data = build_interactions(
        data_dir / "logs.parquet", data_dir / "video_stat.parquet", progress=False
    )
    params = AlsParams(factors=6, regularization=1.0, alpha=10.0, iterations=2)
    users, items, seconds = train_factors(data.matrix, params, 1, "off")
    assert users.shape == (data.matrix.shape[0], 6) and users.dtype == np.float32
    assert items.shape == (data.matrix.shape[1], 6) and items.dtype == np.float32
    assert seconds > 0
    exact = solve_users(data.matrix, items, params, 1)
    assert exact.shape == users.shape and exact.dtype == np.float32


def precision_at_10(scores: np.ndarray, seen: list[set[int]], truth: list[set[int]]) -> float:
    hits = 0
    for row, s, t in zip(scores, seen, truth, strict=True):
        row = row.astype(np.float64).copy()
        row[list(s)] = -np.inf
        top = np.argpartition(-row, 10)[:10]
        hits += len(set(top.tolist()) & t)
    return hits / (10 * len(truth))


def test_als_beats_popularity_on_held_out_events(tmp_path: Path) -> None:
    """Train on the first 24 days, rank for the last 6: ALS precision@10 > popularity's."""
    synthesize(tmp_path, users=1500, videos=400, events=60_000, seed=9, progress=False)
    split = datetime(2024, 6, 25, tzinfo=timezone.utc)
    model = bootstrap(
        tmp_path / "logs.parquet",
        tmp_path / "video_stat.parquet",
        tmp_path / "model",
        reactions=tmp_path / "reactions.parquet",
        factors=32,
        iterations=10,
        until=split,
        progress=False,
    )
    later = pq.read_table(tmp_path / "logs.parquet").filter(pc.field("event_timestamp") >= split)
    truth: dict[int, set[int]] = {}
    for u, v in zip(
        later["viewer_uid"].to_pylist(), later["rutube_video_id"].to_pylist(), strict=True
    ):
        ui, vi = model.users.get(u), model.items.get(v)
        if ui is not None and vi is not None:
            truth.setdefault(ui, set()).add(vi)
    users = sorted(truth)
    seen = [set(model.row_of(u)[0].tolist()) for u in users]
    new = [truth[u] - s for u, s in zip(users, seen, strict=True)]
    keep = [i for i, t in enumerate(new) if t]
    users = [users[i] for i in keep]
    seen, new = [seen[i] for i in keep], [new[i] for i in keep]
    assert len(users) > 500
    als = precision_at_10(model.user_factors[users] @ model.item_factors.T, seen, new)
    pop = precision_at_10(np.tile(model.videos.popularity, (len(users), 1)), seen, new)
    print(f"precision@10: als={als:.4f} popularity={pop:.4f}")
    assert als > 1.5 * pop, (als, pop)


def test_ids_that_cannot_travel_on_the_wire_are_dropped_and_counted():
    import scipy.sparse as sp

    from worker.core.ids import IdMap
    from worker.core.model import VideoMeta
    from worker.data.ingest import Interactions
    from worker.train import drop_invalid_ids

    m = sp.csr_matrix(np.array([[1.0, 0, 2.0], [0, 1.0, 1.0], [1.0, 1.0, 0]], dtype=np.float32))
    data = Interactions(
        matrix=m,
        users=IdMap(["ok", "bad\nuser", "fine"]),
        items=IdMap(["v1", "v" * 200, "v3"]),
        videos=VideoMeta.empty(3),
        summary={"skipped": {}},
    )
    out = drop_invalid_ids(data)
    assert list(out.users.ids) == ["ok", "fine"] and list(out.items.ids) == ["v1", "v3"]
    assert out.matrix.toarray().tolist() == [[1.0, 2.0], [1.0, 0.0]]
    assert out.summary["skipped"]["invalid_id_values"] == 3


def test_codes_of_equals_a_first_appearance_loop() -> None:
    import pyarrow as pa

    from worker.core.ids import IdMap
    from worker.storage import codes_of

    values = ["b", None, "a", "b", "", "c", None, "a", "é"]
    column = pa.chunked_array([values[:4], values[4:], []], pa.string())
    seen = IdMap()
    want = [seen.add(v) if v is not None else -1 for v in values]
    codes, names = codes_of(column)
    assert codes.dtype == np.int32 and codes.tolist() == want and names == list(seen.ids)
    as_dictionary = pa.chunked_array(
        [pa.array(values[:5]).dictionary_encode(), pa.array(values[5:]).dictionary_encode()]
    )
    assert codes_of(as_dictionary)[0].tolist() == want and codes_of(as_dictionary)[1] == names
    empty_codes, empty_names = codes_of(pa.chunked_array([], pa.string()))
    assert empty_codes.tolist() == [] and empty_names == []


def test_one_plus_bootstrap_stores_the_exact_fold_in_and_its_params(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    bootstrap(
        data_dir / "logs.parquet",
        data_dir / "video_stat.parquet",
        out,
        reactions=data_dir / "reactions.parquet",
        alpha=0.5,
        confidence="one_plus",
        **PARAMS,  # type: ignore[arg-type]
    )
    model = load_model(out)
    assert model.params.confidence == "one_plus" and model.params.alpha == 0.5
    rows = [model.row_of(u) for u in range(model.n_users)]
    want = fold_in(
        model.item_factors,
        gramian(model.item_factors),
        rows,
        regularization=model.params.regularization,
        alpha=0.5,
        confidence_mode="one_plus",
    )
    err = np.linalg.norm(model.user_factors - want, axis=1) / np.maximum(
        np.linalg.norm(want, axis=1), 1e-12
    )
    assert err.max() < 1e-3
    implicit_mode = fold_in(
        model.item_factors, gramian(model.item_factors), rows,
        regularization=model.params.regularization, alpha=0.5,
    )  # fmt: skip
    assert not np.allclose(model.user_factors, implicit_mode, atol=1e-3)


def test_params_from_dict_defaults_and_unknown_keys() -> None:
    p = AlsParams.from_dict({"factors": 4, "regularization": 0.1, "alpha": 2})
    assert p == AlsParams(factors=4, regularization=0.1, alpha=2.0)
    assert AlsParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match=r"unknown AlsParams key.*bogus"):
        AlsParams.from_dict({**p.to_dict(), "bogus": 1})
    assert AlsParams.from_dict({**p.to_dict(), "bogus": 1}, strict=False) == p
    with pytest.raises(ValueError, match="confidence"):
        AlsParams.from_dict({**p.to_dict(), "confidence": "bm25"})


def test_params_file_trains_its_params_and_weights_and_flags_override_it(
    data_dir: Path, tmp_path: Path
) -> None:
    from worker.cli import main
    from worker.storage import read_manifest

    params = tmp_path / "best.json"
    params.write_text(
        json.dumps(
            {
                "factors": 12,
                "regularization": 0.2,
                "alpha": 3.0,
                "iterations": 3,
                "confidence": "one_plus",
                "weights": {"like": 5.0, "dislike": 1.5},
            }
        )
    )
    out = tmp_path / "m"
    argv = ["bootstrap", "--logs", str(data_dir / "logs.parquet")]
    argv += ["--videos", str(data_dir / "video_stat.parquet"), "--out", str(out)]
    argv += ["--reactions", str(data_dir / "reactions.parquet"), "--params", str(params)]
    argv += ["--factors", "6", "--threads", "1", "--gpu", "off", "--quiet"]
    assert main(argv) == 0
    model = load_model(out)
    assert model.params == AlsParams(
        factors=6, regularization=0.2, alpha=3.0, iterations=3, confidence="one_plus"
    )
    weights = read_manifest(out)["data_summary"]["training"]["weights"]
    assert weights["like"] == 5.0 and weights["dislike"] == 1.5 and weights["view"] == 1.0


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"factors": 4, "regularization": 0.1, "alpha": 1, "bogus": 2}', "bogus"),
        ('{"factors": 4, "regularization": 0.1, "alpha": 1, "weights": {"likes": 2}}', "likes"),
        ('{"factors": 4}', "missing"),
        ("[1, 2]", "JSON object"),
        ("{nope", "cannot read"),
    ],
)
def test_a_bad_params_file_is_a_config_error_naming_the_problem(
    tmp_path: Path, text: str, match: str
) -> None:
    from worker.train import read_params

    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_params(f)
