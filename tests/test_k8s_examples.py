"""The Kubernetes examples in examples/k8s: valid YAML that runs the documented commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from selfheal.fleet import FleetError, parse_shard

from .tenants import next_value, seed

K8S = Path(__file__).resolve().parent.parent / "examples" / "k8s"


def load(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((K8S / name).read_text()))
    assert len(docs) == 1
    doc: dict[str, Any] = docs[0]
    return doc


def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    [c] = pod_spec["containers"]
    result: dict[str, Any] = c
    return result


def env_names(c: dict[str, Any]) -> list[str]:
    return [e["name"] for e in c.get("env", [])]


class TestCronJobCheck:
    def test_runs_check_on_schedule(self) -> None:
        """The CronJob runs `selfheal check` over the tenants every 15 minutes."""
        doc = load("cronjob-check.yaml")
        assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
        spec = doc["spec"]
        assert spec["schedule"] == "*/15 * * * *"
        assert spec["concurrencyPolicy"] == "Forbid"
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0  # the exit code is the alert: no retries
        pod = job["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        c = container(pod)
        assert c["command"] == ["selfheal"]
        assert c["args"][0] == "check"
        assert c["args"][c["args"].index("--databases") + 1] == "tenant%"
        assert "DATABASE_URL" in env_names(c)


class TestIndexedJobFix:
    def test_indexed_job_shards_fix(self) -> None:
        """The Indexed Job runs `fix --shard $(JOB_COMPLETION_INDEX)/N` with N = completions."""
        doc = load("indexed-job-fix.yaml")
        assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "Job")
        spec = doc["spec"]
        assert spec["completionMode"] == "Indexed"
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        c = container(pod)
        assert c["command"] == ["selfheal"]
        args = c["args"]
        assert args[0] == "fix"
        shard = args[args.index("--shard") + 1]
        assert shard == f"$(JOB_COMPLETION_INDEX)/{spec['completions']}"
        env = {e["name"]: e for e in c["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")
        assert "DATABASE_URL" in env
        # Every index Kubernetes hands out is a valid shard.
        for index in range(spec["completions"]):
            parse_shard(shard.replace("$(JOB_COMPLETION_INDEX)", str(index)))
        with pytest.raises(FleetError):
            parse_shard(shard.replace("$(JOB_COMPLETION_INDEX)", str(spec["completions"])))


class TestEntrypoint:
    def run(self, dsn: str, **env: str) -> subprocess.CompletedProcess[str]:
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return subprocess.run(
            ["sh", str(K8S / "entrypoint.sh"), "sh", "-c", "echo app started"],
            env={**os.environ, "PATH": path, "DATABASE_URL": dsn, **env},
            capture_output=True, text=True, timeout=60, check=False,
        )

    @pytest.fixture(autouse=True)
    def _needs_cli(self) -> None:
        # `make test` installs the project, console script included.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        assert shutil.which("selfheal", path=path) is not None, (
            "the selfheal script is not installed next to this Python: pip install -e ."
        )

    def test_fixes_when_asked(self, conn: psycopg.Connection, dsn: str) -> None:
        """SELFHEAL_FIX_ON_START=1 heals the database, then starts the app."""
        seed(conn, users=6)
        proc = self.run(dsn, SELFHEAL_FIX_ON_START="1", SELFHEAL_FIX_ARGS="--table users")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "app started"
        assert next_value(dsn, "public.users_id_seq") == 7

    def test_fixes_then_guards_when_asked(self, conn: psycopg.Connection, dsn: str) -> None:
        """SELFHEAL_GUARD_ON_START=1 installs the guard after the fix; an explicit id
        written afterwards by a plain client no longer drifts the sequence."""
        seed(conn, users=6)
        proc = self.run(dsn, SELFHEAL_FIX_ON_START="1", SELFHEAL_GUARD_ON_START="1",
                        SELFHEAL_FIX_ARGS="--table users")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "app started"
        conn.execute("INSERT INTO users (id) VALUES (40)")
        assert next_value(dsn, "public.users_id_seq") == 41

    def test_leaves_database_alone_by_default(self, conn: psycopg.Connection,
                                              dsn: str) -> None:
        """Without the variable the app starts and nothing is touched."""
        seed(conn, users=6)
        proc = self.run(dsn)
        assert (proc.returncode, proc.stdout) == (0, "app started\n")
        assert next_value(dsn, "public.users_id_seq") == 1

    def test_failure_stops_start(self, dsn: str) -> None:
        """A failing fix stops the start with its exit code."""
        proc = self.run("postgresql://nobody@127.0.0.1:1/x?connect_timeout=2",
                        SELFHEAL_FIX_ON_START="1")
        assert proc.returncode == 2
        assert "app started" not in proc.stdout
