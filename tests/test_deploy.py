"""Deployment artefacts: the systemd unit and the Prometheus rules pass their own tools' checks."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamd.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "streamd.service"
RULES = ROOT / "deploy" / "prometheus" / "streamd-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "streamd-rules.test.yml"
MAX_EXPOSURE = 2.5


def tool(name: str, package: str) -> str:
    """Absolute path of a required external tool; a missing one is a failure, never a skip."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: .ci/run should have installed it (Debian package {package!r})")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at an executable that exists on this machine.

    ``systemd-analyze verify`` insists that the ExecStart binary exists, and the deployed
    path (/opt/streamd/bin/streamd) does not exist here, so run this interpreter as
    ``python -m streamd`` instead; everything else is the file as shipped.
    """
    text = UNIT.read_text()
    deployed = "ExecStart=/opt/streamd/bin/streamd "
    assert text.count(deployed) == 1, f"expected one {deployed!r} line in {UNIT}"
    unit = tmp_path / "streamd.service"
    unit.write_text(text.replace(deployed, f"ExecStart={sys.executable} -m streamd "))
    return unit


class TestSystemdUnit:
    def test_verify(self, verifiable_unit: Path) -> None:
        """systemd-analyze verify reports nothing at all for the unit."""
        result = run(tool("systemd-analyze", "systemd"), "verify", str(verifiable_unit))
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr

    def test_security_exposure(self, verifiable_unit: Path) -> None:
        """The hardening keeps systemd's overall exposure score at or below 2.5 ("OK")."""
        result = run(tool("systemd-analyze", "systemd"), "security", "--offline=true", str(verifiable_unit))
        assert result.returncode == 0, result.stderr
        match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
        assert match is not None, result.stdout
        score = float(match.group(1))
        assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{result.stdout}"

    def test_declares_the_service_contract(self) -> None:
        """The settings the daemon relies on are present (notify, reload by SIGHUP, runtime dir)."""
        lines = set(UNIT.read_text().splitlines())
        for expected in (
            "Type=notify",
            "NotifyAccess=main",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "KillMode=mixed",
            "RuntimeDirectory=streamd",
            "StateDirectory=streamd",
            "EnvironmentFile=-/etc/default/streamd",
        ):
            assert expected in lines, expected

    def test_local_producers_can_reach_an_ipc_ingest(self) -> None:
        """The runtime directory is traversable and its sockets writable by the streamd-ingest group only."""
        lines = set(UNIT.read_text().splitlines())
        for expected in ("Group=streamd-ingest", "RuntimeDirectoryMode=0750", "UMask=0007"):
            assert expected in lines, expected


class TestShippedConfig:
    def test_sockets_bind_to_loopback_only(self) -> None:
        """The production example exposes no unauthenticated ZeroMQ socket beyond this host."""
        config = load_config(ROOT / "deploy" / "streamd.toml")
        for endpoint in (*config.ingest.endpoints, config.publish.endpoint):
            assert endpoint.startswith(("tcp://127.0.0.1:", "ipc://")), endpoint


class TestMakefile:
    def test_demo_installs_only_the_package_and_test_adds_the_extras(self, tmp_path: Path) -> None:
        """make demo skips the test dependencies; make test and make lint install them."""
        venv = f"VENV={tmp_path / 'venv'}"
        demo = run(tool("make", "make"), "-n", "-C", str(ROOT), "demo", venv).stdout
        assert "pip install -q -e .\n" in demo and "[test]" not in demo, demo
        for target in ("test", "lint"):
            plan = run(tool("make", "make"), "-n", "-C", str(ROOT), target, venv).stdout
            assert "pip install -q -e '.[test]'" in plan, plan


class TestPrometheusRules:
    def test_check_rules(self) -> None:
        """promtool accepts the rules file."""
        result = run(tool("promtool", "prometheus"), "check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests(self) -> None:
        """Every alert fires and stays quiet where the promtool unit tests say it should."""
        result = run(tool("promtool", "prometheus"), "test", "rules", str(RULES_TEST))
        assert result.returncode == 0, result.stdout + result.stderr
