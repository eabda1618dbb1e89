"""The image's install and start commands, run without Docker: a copy of the build context
as the Dockerfile COPYs it, a fresh virtual environment, the build stage's `pip install`,
then the image's CMD (`python -m firehose`) with the runtime stage's environment against the
devnet and a test database. /healthz answers (also through the HEALTHCHECK command), rows
arrive, and SIGTERM stops it with exit status 0."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import ROOT, DevnetProcess, free_port, wait_for_cursor
from test_deploy import dockerfile_build_context, dockerfile_cmd

pytestmark = pytest.mark.slow

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def build_stage_install() -> list[str]:
    """The build stage's RUN command, split at `&&`, with /opt/venv as a placeholder."""
    match = re.search(r"^RUN (python -m venv /opt/venv.*?)(?<!\\)\n", DOCKERFILE, re.M | re.S)
    assert match, "the build stage's RUN python -m venv ... line"
    command = match.group(1).replace("\\\n", " ")
    return [" ".join(step.split()) for step in command.split("&&")]


def healthcheck_cmd() -> list[str]:
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", DOCKERFILE, re.M | re.S)
    assert match
    value: list[str] = json.loads(match.group(1))
    return value


def test_image_install_and_start_commands_in_a_fresh_venv(tmp_path: Path, db_dsn: str) -> None:
    context = tmp_path / "src"
    context.mkdir()
    for name in dockerfile_build_context(DOCKERFILE):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, context / name)

    venv = tmp_path / "venv"
    steps = build_stage_install()
    assert steps[0] == "python -m venv /opt/venv"
    assert steps[-1].endswith("pip install --no-cache-dir .")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in steps[1:]:
        # The Dockerfile's own pip commands; --no-cache-dir keeps the image small, but here
        # the local wheel cache keeps the test fast (and offline once warm).
        argv = step.replace("/opt/venv", str(venv)).replace(" --no-cache-dir", "").split()
        proc = subprocess.run(
            [*argv, "--quiet", "--disable-pip-version-check"],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, f"{step}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    install_s = time.monotonic() - started
    print(f"fresh venv + pip install . took {install_s:.1f} s")

    devnet = DevnetProcess.start(tmp_path, "--events", "400", "--rate", "100")
    port = free_port()
    home = tmp_path / "home"  # the image's WORKDIR: not the source tree
    home.mkdir()
    run_env = {
        **env,
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "DATA_DIR": str(tmp_path / "data"),
        "METRICS_PORT": str(port),
        "DATABASE_URL": db_dsn,
        "RELAY_URL": devnet.url,
        "START_CURSOR": "0",
    }
    cmd = dockerfile_cmd(DOCKERFILE)
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [str(venv / "bin" / cmd[0]), *cmd[1:]],
        cwd=home,
        env=run_env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "no /healthz:\n" + log_path.read_text()
                time.sleep(0.2)
        # The image's HEALTHCHECK command, with the port this test chose.
        probe = [part.replace(":8000/", f":{port}/") for part in healthcheck_cmd()]
        probe[0] = str(venv / "bin" / probe[0])
        subprocess.run(probe, check=True, cwd=home, env=run_env, timeout=10)
        # It is the installed copy that runs, and it indexes.
        asyncio.run(wait_for_cursor(db_dsn, 100, timeout_s=60))
        assert (
            str(venv)
            in subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import firehose; print(firehose.__file__)"],
                cwd=home,
                env=run_env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )

        worker.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
        assert worker.wait(15) == 0, log_path.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        devnet.stop()
