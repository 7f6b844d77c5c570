"""The README is for users: short, and every command and setting in it is real."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.unit.test_notebook import SEED_SNIPPET_1, SEED_SNIPPET_2
from worker.cli import build_parser
from worker.config import ArchiveSettings, KafkaSettings, TopicSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 330  # users' reference: commands, settings, wire formats; the rest in docs/


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _shell_commands(page: Path) -> list[str]:
    """Each command of the page's bash blocks: continuations joined, ``&&`` split, comments
    and a trailing ``&`` removed."""
    out = []
    for block in _code_blocks(page.read_text(), "bash"):
        lines = [line.split(" #", 1)[0].rstrip() for line in block.splitlines()]
        joined = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        for line in joined.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                if command.strip():
                    out.append(command.strip().removesuffix("&").strip())
    return out


def _commands() -> list[tuple[str, str]]:
    return [(p.name, c) for p in PAGES for c in _shell_commands(p)]


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; the reference belongs in docs/"


def test_pages_have_commands() -> None:
    names = {c.split()[0] for _, c in _commands()}
    assert {"refold", "scripts/demo", "scripts/test"} <= names


@pytest.mark.parametrize(("page", "command"), _commands())
def test_every_command_exists(page: str, command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "refold":
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:  # argparse reports the bad flag on stderr
            pytest.fail(f"{page}: `{command}` is not a valid refold command ({exc})")
    elif argv[0].startswith("scripts/"):
        assert (ROOT / argv[0]).is_file(), f"{page}: {argv[0]} does not exist"
    elif argv[0] == "source":
        assert argv[1] == ".venv/bin/activate", f"{page}: unexpected `{command}`"
    else:
        pytest.fail(f"{page}: `{command}` is neither a refold command nor a script")


def _settings_table() -> dict[str, str]:
    rows = re.findall(r"^\| `(REFOLD_[A-Z_]+)` \| ([^|]+) \|", README.read_text(), flags=re.M)
    return {name: default.strip() for name, default in rows}


def _expected_default(value: object) -> str:
    return "unset" if value is None else f"`{value}`"


def test_settings_table_covers_every_setting_with_its_default() -> None:
    table = _settings_table()
    expected = {}
    for cls in (KafkaSettings, TopicSettings, WorkerSettings, ArchiveSettings):
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            expected[f"{prefix}{name}".upper()] = _expected_default(field.default)
    assert sorted(set(expected) - set(table)) == [], "settings missing from the README table"
    assert sorted(set(table) - set(expected)) == [], "README table names unknown settings"
    wrong = {k: (table[k], v) for k, v in expected.items() if table[k] != v}
    assert wrong == {}, "README default differs from the setting's (README, code)"


def test_readme_shows_the_seed_snippets_as_the_tests_run_them() -> None:
    blocks = _code_blocks(README.read_text(), "python")
    assert SEED_SNIPPET_1 in blocks and SEED_SNIPPET_2 in blocks


def test_links_to_docs_exist() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", page.read_text()):
            base = ROOT if page == README else page.parent
            assert (base / target).is_file(), f"{page.name} links to missing {target}"
