"""A real Prometheus (and promtool) for the tests, from Debian's ``prometheus`` package.

The chart's alerts and dashboard are PromQL: what must be pinned down is that Prometheus
parses them, that they evaluate to series on what the operator really exports, and that
an alert fires when its fault happens.  A server per test runs on 127.0.0.1 with its own
config and TSDB in the test's directory; nothing of the machine's own instance
(``/etc/prometheus``, ``/var/lib/prometheus``, port 9090) is read or touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .controlplane import free_port
from .waiting import wait_for

__all__ = ["PrometheusServer", "binary", "prometheus_server", "promtool", "rule_groups", "wait_firing"]

HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install prometheus, or `dptr-testbed node-prereqs --install`"


def binary(name: str) -> Path:
    """``prometheus`` or ``promtool``; a missing one is a broken setup (never a skip)."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin", name), Path("/usr/sbin", name)) if p.exists()), None
    )
    if found is None:
        raise RuntimeError(f"{name} is not installed ({INSTALL_HINT})")
    return Path(found)


def rule_groups(manifests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The rule file a PrometheusRule stands for: its ``spec`` is that file's schema
    (prometheus-operator's PrometheusRuleSpec is ``groups`` as in a rules file)."""
    rules = [m for m in manifests if m.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        raise ValueError(f"expected one PrometheusRule, found {len(rules)}")
    return {"groups": rules[0]["spec"]["groups"]}


@dataclass
class PrometheusServer:
    url: str
    directory: Path

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples, or a scalar as one sample)."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return result

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"].get("alertname") == name and a["state"] == "firing"]

    def targets_up(self) -> bool:
        targets = self._get("/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)


@contextlib.contextmanager
def prometheus_server(
    directory: Path,
    targets: Mapping[str, Sequence[str]],
    *,
    rules: Mapping[str, Any] | None = None,
    interval: str = "1s",
) -> Iterator[PrometheusServer]:
    """Run Prometheus scraping ``targets`` (job name -> ``host:port`` list) every
    ``interval`` and evaluating ``rules`` (a rules file's content) as often."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]}
            for job, addresses in targets.items()
        ],
    }
    if rules is not None:
        (directory / "rules.yaml").write_text(yaml.safe_dump(dict(rules)))
        config["rule_files"] = [str(directory / "rules.yaml")]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                str(binary("prometheus")),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={HOST}:{port}",
                # Debian's defaults point at /usr/share/prometheus; the API needs neither.
                f"--web.console.templates={directory}",
                f"--web.console.libraries={directory}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = PrometheusServer(f"http://{HOST}:{port}", directory)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=60, what="Prometheus ready")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary("promtool")), *args], capture_output=True, text=True, cwd=cwd, check=False, timeout=120
    )


def wait_firing(server: PrometheusServer, name: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Wait until the alert ``name`` fires; its firing instances."""
    firing: list[dict[str, Any]] = wait_for(
        lambda: server.firing(name) or None, timeout=timeout, interval=0.5, what=f"the alert {name} firing"
    )
    return firing
