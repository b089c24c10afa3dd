import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.distributed
def test_two_process_torchrun_gloo(tmp_path):
    # tests/ for conftest; keep the caller's PYTHONPATH (a source checkout run without installing) behind it
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sd0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    sd1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # DDP kept the replicas identical
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 256 images, 16 per rank per step, 2 ranks: 8 steps, each rank seeing its own half of the data
    assert info[0]["total_steps"] == info[1]["total_steps"] == 8
    assert info[0]["losses"] != info[1]["losses"]  # different data and noise on each rank
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], sd0[k]) for k in sd0)
    assert ckpt["step"] == 8
    assert "2 process(es)" in proc.stdout
