"""The documentation, checked mechanically: everything an operator can set, read or run is
written down in README.md or a docs/*.md page, and every relative link there resolves.

What "everything" is comes from the code, not from a list kept here:
- environment variables: every name the settings read (recorded while `Settings.from_env`
  runs, and found by a grep of the code for `Env.get("X"` / `environ.get("X"` / `getenv`),
  plus every `${X}` the compose file interpolates; each must have a table row
  (`| \\`X\\` | ...`);
- metrics: every family registered by a `...Metrics.create(registry)` of firehose/ and
  backfill/ on a fresh registry (and every metric constructed with a literal name in the
  source, so none escapes the discovery);
- CLI: every subcommand of `firehose` (argparse, recursively) and each of its options;
- tables: every `CREATE TABLE` in sql/ and in the code (schema_migrations).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from firehose.cli import build_parser
from firehose.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
COMPOSE = ROOT / "docker-compose.python-default.yml"
CODE_DIRS = ("firehose", "backfill")
# README: what a newcomer reads first; the rest lives in docs/ (issue 10).
README_MAX_LINES = 300

_ENV_READ = re.compile(
    r"""(?:\b(?:e|env|Env\([^)]*\))\.get|environ\.get|getenv|environ\[)\(?\s*["']([A-Z][A-Z0-9_]+)["']"""
)
# A name kept in a constant first: `OVERRIDES_ENV = "HANDLE_RESOLUTION_OVERRIDES"`.
_ENV_CONSTANT = re.compile(
    r"""^\s*[A-Z_]*ENV[A-Z_]*\s*(?::\s*\w+\s*)?=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M
)
# The operating system's, read by tests to run subprocesses: not the worker's settings.
OS_VARIABLES = frozenset({"PATH", "PYTHONPATH", "HOME", "TMPDIR", "USER", "VIRTUAL_ENV"})
_METRIC_LITERAL = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"([a-z_:][a-z0-9_:]*)\""
)
_TABLE = re.compile(
    r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([a-z_][a-z0-9_]*)", re.I
)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def doc_files() -> list[Path]:
    return [README, *DOCS]


def doc_text() -> str:
    return "\n".join(p.read_text() for p in doc_files())


def code_files(*dirs: str) -> Iterator[Path]:
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


# --- environment variables -------------------------------------------------------------


class _RecordingEnv(dict[str, str]):
    """An empty environment that remembers every name looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.seen.add(key)
        return super().__contains__(key)


def env_vars_read() -> set[str]:
    env = _RecordingEnv()
    Settings.from_env(env)
    names = set(env.seen)
    assert {"DATABASE_URL", "BACKFILL_DAYS", "RELAY_URL"} <= names, "recording broke"
    for path in code_files(*CODE_DIRS, "bench", "tests"):
        names |= grep_env(path.read_text())
    names |= set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    return names - OS_VARIABLES


def grep_env(source: str) -> set[str]:
    return set(_ENV_READ.findall(source)) | set(_ENV_CONSTANT.findall(source))


def documented_variables() -> set[str]:
    """Names with a table row of their own: `| \\`NAME\\` | ...`."""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", doc_text(), re.M))


def test_every_environment_variable_has_a_table_row() -> None:
    read = env_vars_read()
    missing = sorted(read - documented_variables())
    assert not missing, f"env vars without a `| \\`NAME\\` | ...` row in README/docs: {missing}"


def test_the_env_grep_finds_what_the_settings_read() -> None:
    """The grep half is not blind: it sees every name the recorded run saw."""
    env = _RecordingEnv()
    Settings.from_env(env)
    grepped: set[str] = set()
    for path in code_files(*CODE_DIRS):
        grepped |= grep_env(path.read_text())
    assert env.seen <= grepped, sorted(env.seen - grepped)


# --- metrics -------------------------------------------------------------------------


def _project_modules() -> Iterator[object]:
    for package in CODE_DIRS:
        pkg = importlib.import_module(package)
        yield pkg
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
                continue
            yield importlib.import_module(info.name)


def registered_metrics() -> set[str]:
    """Family names (counters without `_total`) of every `create(registry)` classmethod."""
    names: set[str] = set()
    creators = 0
    for module in _project_modules():
        for obj in vars(module).values():
            if not (isinstance(obj, type) and obj.__module__ == getattr(module, "__name__", "")):
                continue
            create = inspect.getattr_static(obj, "create", None)
            if not isinstance(create, classmethod):
                continue
            bound = getattr(obj, "create")  # noqa: B009 - a classmethod found above
            if list(inspect.signature(bound).parameters) != ["registry"]:
                continue
            registry = CollectorRegistry()
            bound(registry)
            creators += 1
            names |= {family.name for family in registry.collect()}
    assert creators >= 4, "found no Metrics.create: discovery broke"
    return names


def documented_tokens() -> set[str]:
    return set(re.findall(r"`([a-z_][a-z0-9_]*)(?:\{[^`}]*\})?`", doc_text()))


def test_every_metric_is_documented() -> None:
    names = registered_metrics()
    literal = {
        n for path in code_files(*CODE_DIRS) for n in _METRIC_LITERAL.findall(path.read_text())
    }
    # A metric built outside a `create(registry)` would escape the discovery above.
    undiscovered = {n for n in literal if n.removesuffix("_total") not in names}
    assert not undiscovered, f"metrics not registered by a Metrics.create: {sorted(undiscovered)}"
    tokens = documented_tokens()
    prefixes = tuple(p.removesuffix("*") for p in re.findall(r"`([a-z_]+_\*)`", doc_text()))
    missing = sorted(
        n
        for n in names
        if n not in tokens and f"{n}_total" not in tokens and not n.startswith(prefixes)
    )
    assert not missing, f"metrics not documented in README/docs: {missing}"


# --- CLI -----------------------------------------------------------------------------


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


def test_every_cli_command_and_option_is_documented() -> None:
    text = doc_text()
    found = list(subcommands(build_parser()))
    assert len(found) >= 10
    missing: list[str] = []
    for path, sub in found:
        command = "firehose " + " ".join(path)
        if command not in text:
            missing.append(command)
        for action in sub._actions:
            for option in action.option_strings:
                documented = re.search(re.escape(option) + r"(?![\w-])", text)
                if option.startswith("--") and option != "--help" and not documented:
                    missing.append(f"{command} {option}")
    assert not missing, f"not documented in README/docs: {missing}"


# --- tables --------------------------------------------------------------------------


def test_every_table_is_documented() -> None:
    sources = [*sorted((ROOT / "sql").glob("*.sql")), *code_files(*CODE_DIRS)]
    tables = {t.lower() for p in sources for t in _TABLE.findall(p.read_text())}
    assert {"records", "firehose_cursor", "schema_migrations"} <= tables
    missing = sorted(tables - documented_tokens())
    assert not missing, f"tables not documented in README/docs: {missing}"


# --- links ---------------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a page."""
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in out:
            n += 1
            candidate = f"{slug}-{n}"
        out.add(candidate)
    return out


def test_every_relative_link_resolves() -> None:
    broken: list[str] = []
    checked = 0
    for page in doc_files():
        for target in _LINK.findall(_FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 10, "found almost no links: the pattern broke"
    assert not broken, "\n".join(broken)


# --- the README itself -----------------------------------------------------------------


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    first_block = _FENCE.search(text)
    assert first_block is not None
    block = first_block.group(0)
    assert "firehose run --devnet" in block
    assert ".venv/bin/python -m pytest" in block
    # CI runs the README's test command (.ci/run).
    assert ".venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()
    # Every docs page is reachable from the README.
    linked = {
        (README.parent / t.partition("#")[0]).resolve()
        for t in _LINK.findall(text)
        if t.partition("#")[0]
    }
    unlinked = [p.name for p in DOCS if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
