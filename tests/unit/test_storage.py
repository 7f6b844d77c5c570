"""Model storage: ``user_rows.npz`` in scipy's sparse layout, and the older layout still loads."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from tests.kit import make_model
from worker.core.model import Model
from worker.errors import ModelError
from worker.storage import _manifest_digest, load_model, save_model


def _old_layout_npz(rows: sp.csr_matrix) -> bytes:
    """``user_rows.npz`` as refold wrote it before the scipy layout (the old writer's code)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        indptr=rows.indptr.astype(np.int64),
        indices=rows.indices.astype(np.int32),
        data=rows.data.astype(np.float32),
        shape=np.array(rows.shape, dtype=np.int64),
    )
    return buf.getvalue()


def _rewrite(path: Path, name: str, blob: bytes) -> None:
    """Replace one file of a model directory and re-sign the manifest, as a writer would."""
    (path / name).write_bytes(blob)
    manifest: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(blob).hexdigest()
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def model_and_dir(tmp_path: Path) -> tuple[Model, Path]:
    model = make_model(n_users=30, n_items=40, factors=4, per_user=5)
    return model, save_model(model, tmp_path / "model")


def test_scipy_load_npz_opens_the_rows(model_and_dir: tuple[Model, Path]) -> None:
    model, path = model_and_dir
    rows = sp.load_npz(path / "user_rows.npz")  # scipy's reader; allow_pickle=False inside
    assert rows.format == "csr" and rows.shape == model.user_rows.shape
    assert (rows != model.user_rows).nnz == 0
    with np.load(path / "user_rows.npz", allow_pickle=False) as z:
        assert z["format"].item() == b"csr"
        assert z["data"].dtype == np.float32


def test_rows_written_by_scipy_load(model_and_dir: tuple[Model, Path]) -> None:
    """A file written by ``scipy.sparse.save_npz`` itself (another tool) loads as the rows."""
    model, path = model_and_dir
    buf = io.BytesIO()
    sp.save_npz(buf, model.user_rows.tocsr(), compressed=True)
    _rewrite(path, "user_rows.npz", buf.getvalue())
    assert (load_model(path).user_rows != model.user_rows).nnz == 0


def test_old_layout_still_loads(model_and_dir: tuple[Model, Path]) -> None:
    model, path = model_and_dir
    _rewrite(path, "user_rows.npz", _old_layout_npz(model.user_rows.tocsr()))
    with np.load(path / "user_rows.npz", allow_pickle=False) as z:
        assert "format" not in z.files  # really the old layout
    loaded = load_model(path)
    assert (loaded.user_rows != model.user_rows).nnz == 0
    assert np.array_equal(loaded.user_factors, model.user_factors)


def test_a_non_csr_matrix_is_a_clear_error(model_and_dir: tuple[Model, Path]) -> None:
    model, path = model_and_dir
    buf = io.BytesIO()
    sp.save_npz(buf, model.user_rows.tocsc())
    _rewrite(path, "user_rows.npz", buf.getvalue())
    with pytest.raises(ModelError, match=re.escape("'csc'")):
        load_model(path)


def test_a_pickled_npz_is_refused(model_and_dir: tuple[Model, Path]) -> None:
    _, path = model_and_dir
    buf = io.BytesIO()
    np.savez(buf, shape=np.array([30, 40]), data=np.array([{"x": 1}], dtype=object))
    _rewrite(path, "user_rows.npz", buf.getvalue())
    with pytest.raises(ModelError, match="unreadable"):
        load_model(path)
