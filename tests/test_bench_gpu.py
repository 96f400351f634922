"""bench/perf/gpu.py, the GPU section of the benchmarks, runs where there is no vLLM and no Ray (the lent
GPU machines' image): here on the CPU with the tiny VLM, through the same code as on CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_bench_runs_without_vllm_or_ray(tmp_path, tiny_vlm):
    # Packages named ray and vllm that refuse to import stand in for their absence.
    for name in ("ray", "vllm"):
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machines')\n"
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "absent"), str(ROOT)]))
    out = tmp_path / "gpu.json"
    args = ["--model", str(tiny_vlm), "--stages", "2", "--repeats", "1", "--group", "4", "--tokens", "8"]
    args += ["--variants", "pack", "--longest", "8"]  # one learner variant (CUDA runs all four)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.perf.gpu", *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    (step,) = r["learner"]
    assert step["stage"] == 2 and step["rows"] == 2 * 4 and step["dtype"] == "fp32"
    assert step["completion_tokens"] == 2 * 4 * 8
    assert 0 < step["ref_s"] < step["step_s"] and step["update_s"] > 0 and math.isfinite(step["loss"])
    # The export wrote the whole model (fp32) and was timed against its floor.
    n_bytes = step["params"] * 4
    assert step["export_bytes"] >= n_bytes and step["export_s"] > 0 and step["floor_s"] > 0
    # The objective on the device agrees with float64 for every off-policy mode and aggregation.
    from ekipl.algo import objective as O

    assert {(o["offpolicy"], o["aggregation"]) for o in r["objective"]} == {
        (m, a) for m in O.OFFPOLICY for a in O.AGGREGATIONS
    }
    for o in r["objective"]:
        assert o["loss_diff"] < 1e-5 and o["grad_diff"] < 1e-5 * max(o["grad_scale"], 1.0), o
    assert r["generate"]["new_tokens"] == 2 * 4 * 8 and r["generate"]["tok_s"] > 0
    # The variant: skewed completion lengths (at most --tokens), packed without padding.
    (v,) = r["variants"]
    assert v["variant"] == "pack" and v["padding_frac"] == 0.0 and v["budget"] > 0 and v["update_s"] > 0
    assert v["rows"] == 2 * 4 and v["completion_tokens"] <= 2 * 4 * 8 and math.isfinite(v["loss"])
    assert 2 <= v["completions"][0] < v["completions"][1] <= 8  # skewed: not all one length
    # Every table is printed.
    for header in ("| model | params |", "| ZeRO | MB |", "| off-policy |", "| HF generate |", "| learner |"):
        assert header in proc.stdout
