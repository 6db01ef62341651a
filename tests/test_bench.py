"""The benchmark suite still works: `thynapse-bench --quick` runs Redis, NATS and a mesh
side by side and loses nothing. Its numbers are not checked here (speed lives in bench/)."""

import json
import shutil
import subprocess

import pytest

from conftest import ROOT

BENCH = ROOT / "target" / "release" / "thynapse-bench"


@pytest.mark.skipif(shutil.which("nats-server") is None or shutil.which("redis-server") is None,
                    reason="needs nats-server and redis-server")
def test_quick_benchmark_runs_and_loses_nothing(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([str(BENCH), "--quick", "--json", str(out), "--dir", str(tmp_path / "mesh")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    scenarios = [r["scenario"] for r in results["rows"]]
    assert any(s.startswith("throughput 1→1, 64 B, different") for s in scenarios)
    assert any(s.startswith("rooms: 64 rooms") for s in scenarios)
    for row in results["rows"]:
        for system, samples in row["row"]["samples"].items():
            for s in samples:
                assert s["lost"] == 0 and s["duplicates"] == 0, (row["scenario"], system, s)
                assert s["value"] > 0, (row["scenario"], system, s)
    assert "| scenario |" in run.stdout
