"""The seed-compatible notebook API, on a tiny synthesized dataset.

The two README snippets are taken from :mod:`worker.notebook`'s docstring and
executed as written; only the three paths are replaced by tmp_path ones.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from worker import notebook as nb
from worker.core.als import fold_in_reference
from worker.core.engine import row_arrays
from worker.core.scoring import Weights
from worker.errors import ModelError

USERS, VIDEOS, EVENTS = 300, 200, 20_000
# Small and quick: the tests check plumbing and invariants, not model quality.
TRAIN: dict[str, Any] = {"factors": 16, "iterations": 3, "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from worker.data.synth import synthesize

    root = tmp_path_factory.mktemp("nb-data")
    synthesize(root, users=USERS, videos=VIDEOS, events=EVENTS, seed=11, progress=False)
    return {
        "root": root,
        "logs": root / "logs.parquet",
        "videos": root / "video_stat.parquet",
        "reactions": root / "reactions.parquet",
    }


@pytest.fixture(scope="module")
def model_dir(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.train import bootstrap

    out = tmp_path_factory.mktemp("nb-model") / "als"
    bootstrap(data["logs"], data["videos"], out, reactions=data["reactions"], **TRAIN)
    return out


@pytest.fixture
def session(model_dir: Path) -> Iterator[nb.Session]:
    s = nb.Session.open(model_dir)
    yield s


@pytest.fixture(autouse=True)
def _no_current_session() -> Iterator[None]:
    nb.set_session(None)
    yield
    nb.set_session(None)


def _snippet(number: int) -> str:
    """Snippet ``number`` of the module docstring, dedented."""
    doc = nb.__doc__ or ""
    start = doc.index(f"Snippet {number}:")
    block = doc[doc.index("::\n", start) + 3 :]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


def _run_snippets(data: dict[str, Path], model_dir: Path) -> dict[str, Any]:
    code = _snippet(1).replace('"models/als"', repr(str(model_dir)))
    code = code.replace('"data/logs.parquet"', repr(str(data["logs"])))
    code = code.replace('"data/video_stat.parquet"', repr(str(data["videos"])))
    assert str(model_dir) in code and str(data["logs"]) in code
    namespace: dict[str, Any] = {"print": lambda *a, **k: None}
    exec(compile(code, "snippet1", "exec"), namespace)
    first = list(namespace["recommendations"])
    namespace["first_recommendations"] = first
    namespace["initial_before"] = dict(namespace["initial_ratings"])
    random.seed(1234)
    exec(compile(_snippet(2), "snippet2", "exec"), namespace)
    return namespace


def test_snippets_are_in_the_docstring() -> None:
    one, two = _snippet(1), _snippet(2)
    assert "load_model_and_indices(" in one and "run_recommendation_system(" in one
    assert "presicion_colab(ratings)" in two
    assert re.search(r"weights=\[4, 1, 2\]", two)


def test_readme_snippets_run(data: dict[str, Path], model_dir: Path) -> None:
    ns = _run_snippets(data, model_dir)
    model, user_index, video_index = ns["model"], ns["user_index"], ns["video_index"]
    assert len(video_index) == model.n_items and len(user_index) == model.n_users
    assert video_index.id_of(video_index["video_1"]) == "video_1"

    # Snippet 1: 10 unique known ids, none watched, none rated (so none disliked).
    first = ns["first_recommendations"]
    assert len(first) == 10 and len(set(first)) == 10
    assert all(v in video_index for v in first)
    assert not set(first) & set(ns["watched_videos"])
    assert not set(first) & set(ns["initial_before"])

    # Snippet 2: 15 rounds of 10 new videos each; precision is likes over shown.
    ratings = ns["ratings"]
    assert len(ratings) == 15
    shown = [v for answers in ratings for v in answers]
    assert len(shown) == 150 and len(set(shown)) == 150
    assert not set(shown) & set(ns["initial_before"]) and not set(shown) & set(ns["watched_videos"])
    likes = sum(a == "like" for answers in ratings for a in answers.values())
    assert nb.presicion_colab(ratings) == pytest.approx(likes / 150)


def test_load_trains_when_missing(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    with pytest.raises(ModelError, match="does not exist"):
        nb.load_model_and_indices(out)
    with pytest.raises(ModelError, match="no model loaded"):
        nb.run_recommendation_system({"video_1": "like"}, [], "x")
    custom = Weights(like=3.0, dislike=1.0)
    model, user_index, video_index = nb.load_model_and_indices(
        out, data["logs"], data["videos"], batch_size=5_000, weights=custom, **TRAIN
    )
    assert (out / "manifest.json").is_file()
    assert model.params.factors == TRAIN["factors"]
    assert len(user_index) == model.n_users and len(video_index) == model.n_items
    assert nb.current_session().model is model
    assert len(nb.run_recommendation_system({"video_1": "like"}, [], "x")) == 10
    # A second call loads what the first one saved.
    again = nb.load_model_and_indices(out, data["logs"], data["videos"])
    assert again.model.version == model.version
    # Events are scored with the weights the model was trained with.
    assert nb.current_session().weights == custom
    assert nb.training_weights(again.model) == custom


def test_corrupt_model_is_not_retrained(data: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ModelError):
        nb.load_model_and_indices(broken, data["logs"], data["videos"])


def test_fold_in_is_exact_and_rebuilt_per_call(session: nb.Session) -> None:
    ratings = {"video_5": "like", "video_6": "dislike", "video_7": "neutral"}
    watched: nb.WatchedLike = ["video_5", ("video_8", 30.0)]
    first = nb.run_recommendation_system(ratings, watched, "fresh", session=session)
    second = nb.run_recommendation_system(ratings, watched, "fresh", session=session)
    assert first == second  # rebuilt from the arguments, nothing counted twice
    dur5 = float(session.model.videos.duration_s[session.video_index["video_5"]])
    as_dict: nb.WatchedLike = {"video_5": dur5, "video_8": 30.0}  # the same views, as a dict
    assert nb.run_recommendation_system(ratings, as_dict, "fresh", session=session) == first

    w = Weights()
    history = session.history("fresh")
    assert history["video_5"] == pytest.approx(w.view + w.like)
    assert history["video_6"] == pytest.approx(-w.dislike)
    assert history["video_7"] == pytest.approx(w.neutral)
    dur8 = float(session.model.videos.duration_s[session.video_index["video_8"]])
    assert history["video_8"] == pytest.approx(w.view * min(30.0 / dur8, w.watch_cap))

    st = session.recommender.state_of("fresh")
    assert st.factors is not None
    model = session.model
    expected = fold_in_reference(
        model.item_factors,
        [row_arrays(st.row)],
        regularization=model.params.regularization,
        alpha=model.params.alpha,
    )[0]
    np.testing.assert_allclose(st.factors, expected, rtol=1e-3, atol=1e-4)

    # The list is the exact top 10 of the unseen videos (up to float32 rounding).
    scores = model.item_factors @ st.factors
    seen = {session.video_index[v] for v in history}
    picked = [session.video_index[v] for v in first]
    assert not set(picked) & seen
    others = [i for i in range(model.n_items) if i not in seen and i not in set(picked)]
    assert scores[picked].min() >= scores[others].max() - 1e-5
    assert list(scores[picked]) == sorted(scores[picked], reverse=True)


def test_never_recommends_disliked_or_watched(session: nb.Session) -> None:
    disliked = {f"video_{i}": "dislike" for i in range(0, 60)}
    ratings = {**disliked, "video_100": "like"}
    watched = [f"video_{i}" for i in range(60, 120)]
    recs = nb.run_recommendation_system(ratings, watched, "picky", session=session)
    assert len(recs) == 10
    assert not set(recs) & (set(ratings) | set(watched))
    # Dislikes only: the popularity fallback, still without the disliked videos.
    only_dislikes = nb.run_recommendation_system(disliked, [], "grumpy", session=session)
    assert len(only_dislikes) == 10 and not set(only_dislikes) & set(disliked)


def test_known_user_starts_from_bootstrap_row(session: nb.Session) -> None:
    user = session.user_index.id_of(0)
    trained = set(session.history(user))
    assert trained
    recs = nb.generate_recommendations(user, 10, session=session)
    assert len(recs) == 10 and not set(recs) & trained
    assert len(nb.generate_recommendations(user, 3, session=session)) == 3


def test_module_session_and_batch(model_dir: Path) -> None:
    nb.load_model_and_indices(model_dir)
    ratings: dict[str, nb.RatingsLike] = {
        "a": {"video_1": "like", "video_2": "like"},
        "b": [("video_3", "like"), ("video_4", "dislike")],
        "c": {"video_5": "neutral"},
    }
    watched: dict[str, nb.WatchedLike] = {"a": ["video_9"], "d": [("video_10", 100.0)]}
    batch = nb.run_recommendation_system_batch(ratings, watched)
    assert set(batch) == {"a", "b", "c", "d"}
    for user, recs in batch.items():
        one = nb.run_recommendation_system(ratings.get(user), watched.get(user), user)
        assert recs == one
        assert len(recs) == 10


def test_strict_session_rejects_unknown_videos(model_dir: Path) -> None:
    strict = nb.Session.open(model_dir, strict=True)
    with pytest.raises(KeyError, match="not in the model"):
        strict.run({"no_such_video": "like"}, [], "u")
    lenient = nb.Session.open(model_dir)
    recs = lenient.run({"no_such_video": "like"}, [], "u")
    assert "no_such_video" not in recs and len(recs) == 10


def test_reactions_are_normalised() -> None:
    assert nb.normalise_reaction(" Like ") == "like"
    assert nb.normalise_reaction("not watched") == nb.NOT_WATCHED
    assert nb.normalise_reaction("skip") == nb.NOT_WATCHED
    with pytest.raises(ValueError, match="unknown reaction"):
        nb.normalise_reaction("love")


def test_precision_colab_math() -> None:
    assert nb.presicion_colab is nb.precision_colab
    rounds = [
        {"v1": "like", "v2": "dislike", "v3": "neutral", "v4": "like"},
        {"v5": "not_watched", "v6": "like"},
    ]
    assert nb.precision_colab(rounds) == pytest.approx(3 / 6)
    assert nb.precision_colab([["like", "dislike"], ["neutral"]]) == pytest.approx(1 / 3)
    assert nb.precision_colab(["like", "like", "dislike", "neutral"]) == pytest.approx(0.5)
    assert nb.precision_colab([]) == 0.0
    assert nb.precision_colab([{}]) == 0.0
    with pytest.raises(TypeError):
        nb.precision_colab([1, 2])


def test_answer_policy_is_pure() -> None:
    truth = {"a": "like", "b": "dislike", "c": "neutral"}
    rng = np.random.default_rng(0)
    assert nb.answer_for("a", truth, "truth", rng) == "like"
    assert nb.answer_for("b", truth, "truth", rng) == "dislike"
    assert nb.answer_for("c", truth, "truth", rng) == "neutral"
    assert nb.answer_for("z", truth, "truth", rng) == nb.NOT_WATCHED
    draws = Counter(nb.answer_for("a", truth, "random", rng) for _ in range(7000))
    assert set(draws) == {"like", "dislike", "neutral"}
    assert draws["like"] / 7000 == pytest.approx(4 / 7, abs=0.03)
    assert draws["dislike"] / 7000 == pytest.approx(1 / 7, abs=0.02)
    same = [nb.answer_for("a", {}, "random", np.random.default_rng(5)) for _ in range(3)]
    assert len(set(same)) == 1  # determined by the generator alone
    with pytest.raises(ValueError, match="policy"):
        nb.answer_for("a", truth, "oracle", rng)  # type: ignore[arg-type]


def test_simulation_precision_comes_from_truth(session: nb.Session, data: dict[str, Path]) -> None:
    reactions = pd.read_parquet(data["reactions"])
    logs = pd.read_parquet(data["logs"])
    videos = pd.read_parquet(data["videos"])
    user = reactions["user_id"].value_counts().index[0]
    truth = nb.truth_from_frames(user, reactions=reactions, logs=logs, videos=videos)
    assert truth and set(truth.values()) <= {"like", "dislike", "neutral"}

    result = nb.simulate_session(session, "sim-user", truth, rounds=8, initial={"video_1": "like"})
    assert len(result.shown) == len(result.answers) == len(result.strategies) == 8
    flat = [v for shown in result.shown for v in shown]
    assert len(flat) == len(set(flat)) == 80 and "video_1" not in flat
    for shown, answers in zip(result.shown, result.answers, strict=True):
        assert list(answers) == shown
        for v, a in answers.items():
            assert a == truth.get(v, nb.NOT_WATCHED)
    hits = sum(truth.get(v) == "like" for v in flat)
    assert result.precision == pytest.approx(hits / 80)
    assert result.round_precision[0] == pytest.approx(
        sum(truth.get(v) == "like" for v in result.shown[0]) / 10
    )

    rand = nb.simulate_session(session, "sim-user", truth, rounds=8, answer="random", seed=3)
    likes = sum(a == "like" for answers in rand.answers for a in answers.values())
    assert rand.precision == pytest.approx(likes / 80)
    again = nb.simulate_session(session, "sim-user", truth, rounds=8, answer="random", seed=3)
    assert again.answers == rand.answers


def test_simulation_stops_when_catalogue_is_exhausted(session: nb.Session) -> None:
    result = nb.simulate_session(session, "binge", {}, rounds=30, k=10)
    flat = [v for shown in result.shown for v in shown]
    assert len(flat) == len(set(flat)) == session.model.n_items
    assert len(result.shown) == -(-session.model.n_items // 10)
    assert result.precision == 0.0


def test_preprocess_logs_batch_matches_weights() -> None:
    w = Weights()
    logs = pd.DataFrame(
        {
            "viewer_uid": ["u1", "u1", "u2", "u3", "u4", "u5", "u6", None],
            "rutube_video_id": ["v1", "v1", "v2", "v9", "v3", "v1", "v1", "v1"],
            "total_watchtime": [30.0, 60.0, 500.0, 300.0, 90.0, 0.0, np.nan, 10.0],
        }
    )
    # Durations in ms, as in the Rutube dump: detected from the median (v3 has none).
    videos = pd.DataFrame(
        {"video_id": ["v1", "v2", "v3"], "duration": [120_000.0, 400_000.0, np.nan]}
    )
    out = nb.preprocess_logs_batch(logs, videos).set_index(["user_id", "video_id"])["value"]
    assert out[("u1", "v1")] == pytest.approx(
        w.event_value("view", 30, 120) + w.event_value("view", 60, 120)
    )
    assert out[("u2", "v2")] == pytest.approx(w.event_value("view", 500, 400))  # capped at 1
    assert out[("u4", "v3")] == pytest.approx(w.event_value("view", 90, None))  # no duration
    # Unknown video, zero or missing watch time, null user: dropped, as ingest does.
    assert set(out.index) == {("u1", "v1"), ("u2", "v2"), ("u4", "v3")}
    seconds = nb.preprocess_logs_batch(logs, videos, duration_unit="s")
    value = seconds.set_index(["user_id", "video_id"])["value"]
    assert value[("u1", "v1")] == pytest.approx(90 / 120_000)  # read as seconds when told


def test_preprocess_and_matrix_agree_with_ingest(data: dict[str, Path]) -> None:
    from worker.data.ingest import build_interactions

    matrix, user_index, video_index = nb.create_interaction_matrix_in_batches(
        data["logs"], data["videos"], batch_size=3_000
    )
    ref = build_interactions(data["logs"], data["videos"], progress=False)
    assert sorted(user_index) == sorted(ref.users.ids)
    assert list(video_index) == list(ref.items.ids)
    aligned = ref.matrix[[ref.users.get(u) for u in user_index]]  # row order may differ
    assert (matrix != aligned).nnz == 0

    logs = pd.read_parquet(data["logs"])
    videos = pd.read_parquet(data["videos"])
    parts = [nb.preprocess_logs_batch(logs.iloc[i : i + 7_000], videos) for i in (0, 7_000, 14_000)]
    frame = pd.concat(parts).groupby(["user_id", "video_id"], as_index=False)["value"].sum()
    rows = np.array([user_index[u] for u in frame["user_id"]])
    cols = np.array([video_index[v] for v in frame["video_id"]])
    np.testing.assert_allclose(
        np.asarray(matrix[rows, cols]).ravel(), frame["value"].to_numpy(), rtol=1e-5
    )
    assert len(frame) == matrix.nnz

    with_reactions = nb.create_interaction_matrix_in_batches(
        data["logs"], data["videos"], reactions_path=data["reactions"]
    )
    assert (with_reactions.matrix != matrix).nnz > 0


# ---- the seed's README snippets, as written ------------------------------------------------
#: The seed's two README snippets, verbatim (README.md shows the same text, checked in
#: tests/unit/test_readme.py). The seed's style is kept: paths in module globals passed
#: positionally, and ``ratings`` as running counts per reaction.
SEED_SNIPPET_1 = """\
from worker.notebook import load_model_and_indices, run_recommendation_system

model_filepath = 'models/als_model'
logs_path = 'data/logs.parquet'
video_data_path = 'data/video_stat.parquet'

model, user_to_index, video_to_index = load_model_and_indices(model_filepath, logs_path, video_data_path)

initial_ratings = {'video_1': 'like', 'video_2': 'dislike', 'video_3': 'neutral'}
watched_videos = ['video_1', 'video_2', 'video_3', 'video_4']
user_id = 'new_user'

recommendations = run_recommendation_system(initial_ratings, watched_videos, user_id)
print("Recommendations:", recommendations)
"""
SEED_SNIPPET_2 = """\
import random
from worker.notebook import presicion_colab

ratings = {'like': 0, 'dislike': 0, 'neutral': 0}
for round_number in range(15):
    recommendations = run_recommendation_system(initial_ratings, watched_videos, user_id)
    for video_id in recommendations:
        rating = random.choice(['like', 'dislike', 'neutral'])
        ratings[rating] += 1
        initial_ratings[video_id] = rating

print("Precision:", presicion_colab(ratings))
"""


def _with_paths(code: str, paths: dict[str, Path]) -> str:
    """The snippet with its quoted paths, and nothing else, replaced."""
    for literal, path in paths.items():
        assert code.count(f"'{literal}'") == 1, literal
        code = code.replace(f"'{literal}'", repr(str(path)))
    return code


def test_seed_snippets_run_verbatim(data: dict[str, Path], tmp_path: Path) -> None:
    printed: list[tuple[Any, ...]] = []
    ns: dict[str, Any] = {"print": lambda *a, **k: printed.append(a)}
    paths = {
        "models/als_model": tmp_path / "als_model",  # missing: the snippet trains it
        "data/logs.parquet": data["logs"],
        "data/video_stat.parquet": data["videos"],
    }
    exec(compile(_with_paths(SEED_SNIPPET_1, paths), "seed-snippet-1", "exec"), ns)
    assert (tmp_path / "als_model" / "manifest.json").is_file()
    first = list(ns["recommendations"])
    assert len(first) == 10 and len(set(first)) == 10
    assert not set(first) & set(ns["watched_videos"])
    assert printed[-1] == ("Recommendations:", ns["recommendations"])
    before = set(ns["initial_ratings"])

    random.seed(7)
    exec(compile(SEED_SNIPPET_2, "seed-snippet-2", "exec"), ns)
    ratings = ns["ratings"]
    assert sum(ratings.values()) == 150  # 15 rounds of 10 videos
    rated = set(ns["initial_ratings"]) - before
    assert len(rated) == 150  # each round showed 10 videos not shown before
    # Precision is likes over all rated videos, from the running counts as the seed kept them.
    want = ratings["like"] / (ratings["like"] + ratings["dislike"] + ratings["neutral"])
    assert 0 < ratings["like"] < 150
    assert want != pytest.approx(1 / 3)  # what iterating the dict's three keys would give
    assert printed[-1] == ("Precision:", pytest.approx(want))
    per_video = Counter(ns["initial_ratings"][v] for v in rated)
    assert dict(per_video) == {k: n for k, n in ratings.items() if n}


def test_seed_globals_style_names_the_keyword_arguments(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """The seed's notebook read ``logs_path``/``video_data_path`` as globals; refold asks
    for them as arguments, and says so when a model must be trained."""
    ns: dict[str, Any] = {"__name__": "seed_notebook"}
    code = (
        "from worker.notebook import load_model_and_indices\n"
        f"logs_path = {str(data['logs'])!r}\n"
        f"video_data_path = {str(data['videos'])!r}\n"
        f"model_filepath = {str(tmp_path / 'missing')!r}\n"
        "load_model_and_indices(model_filepath)\n"
    )
    with pytest.raises(ModelError) as info:
        exec(compile(code, "seed-globals", "exec"), ns)
    msg = str(info.value)
    assert "logs_path=logs_path" in msg and "videos_path=video_data_path" in msg
    assert "globals" in msg
    assert not (tmp_path / "missing").exists()  # nothing trained from a guess


def test_precision_colab_on_running_counts() -> None:
    assert nb.presicion_colab({"like": 6, "dislike": 2, "neutral": 4}) == pytest.approx(6 / 12)
    assert nb.presicion_colab({"like": 0, "dislike": 0, "neutral": 0}) == 0.0
    assert nb.presicion_colab({"like": 3, "dislike": 1, "neutral": 0}) == pytest.approx(3 / 4)
    # one round as a {video_id: reaction} dict is still a round, not counts
    assert nb.presicion_colab({"v1": "like", "v2": "dislike"}) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="unknown reaction"):
        nb.presicion_colab({"love": 3})
    with pytest.raises(ValueError, match=">= 0"):
        nb.presicion_colab({"like": -1, "dislike": 2})
