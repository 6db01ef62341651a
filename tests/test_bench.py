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
    assert any(s.endswith("different transmitter, encrypted") for s in scenarios)
    for row in results["rows"]:
        for system, samples in row["row"]["samples"].items():
            for s in samples:
                assert s["lost"] == 0 and s["duplicates"] == 0, (row["scenario"], system, s)
                assert s["value"] > 0, (row["scenario"], system, s)
    assert "| scenario |" in run.stdout
    # The machine's wake-up cost is measured and printed beside the results.
    assert results["wakeup_us"]["round_trip_same_cpu_us"] > 0
    assert results["wakeup_us"]["idle_one_way_same_cpu_us"] > 0
    assert "Wake-up round trip" in run.stdout and "One way to a thread idle for 1 ms" in run.stdout


@pytest.mark.skipif(shutil.which("nats-server") is None or shutil.which("redis-server") is None,
                    reason="needs nats-server and redis-server")
def test_pinned_servers_run_on_the_one_cpu(tmp_path):
    """`--pin-servers 0` confines redis-server, nats-server and every mesh process (the
    transmitters and sidecars `thynapse up` starts) to CPU 0, as the kernel reports it."""
    out = tmp_path / "results.json"
    run = subprocess.run([str(BENCH), "--quick", "--pin-servers", "0", "--filter", "64 B, different",
                          "--json", str(out), "--dir", str(tmp_path / "mesh")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["servers_pinned_to_cpu"] == 0
    cpus = results["server_cpus"]
    assert "redis-server" in cpus and "nats-server" in cpus
    assert any(name.startswith("transmitter ") for name in cpus)
    assert sum(name.startswith("sidecar ") for name in cpus) == 16  # 12 bench + 4 workers
    assert set(cpus.values()) == {"0"}, cpus
    assert "confined to CPU 0" in run.stdout
    for row in results["rows"]:
        for samples in row["row"]["samples"].values():
            assert all(s["lost"] == 0 and s["value"] > 0 for s in samples), row
