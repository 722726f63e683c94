"""Distributed data-parallel training: 2 CPU processes (gloo) launched with torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from avsm.models.avsm import AVSMConfig

TINY = AVSMConfig(affine_base=4, affine_depth=3, unet_base=4, affine_steps_train=2, affine_steps_test=2,
                  vsvf_steps_train=1, vsvf_steps_test=1, time_steps=4).to_dict()

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from avsm.train.trainer import Trainer, TrainConfig

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    tr = Trainer(cfg)
    assert tr.distributed and dist.get_world_size() == 2
    assert dist.get_backend() == "gloo"
    tr.fit()
    rank = dist.get_rank()
    torch.save({k: v.detach().cpu() for k, v in tr.model.state_dict().items()},
               os.path.join(cfg.out, f"rank{rank}.pt"))
    tr.close()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepared(folder: Path) -> None:
    from avsm.core.coords import identity_map
    from avsm.io.geometry import Grid
    from avsm.io.image import Volume, save_image

    folder.mkdir(parents=True)
    n = 32
    x = identity_map((n, n, n))[0]
    grid = Grid((n, n, n), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    entries = []
    for k, off in enumerate([(0.0, 0.0, 0.0), (0.06, -0.04, 0.03)]):
        c = torch.tensor(off).view(3, 1, 1, 1) + 0.5
        r = (((x - c) / torch.tensor([0.3, 0.36, 0.28]).view(3, 1, 1, 1)) ** 2).sum(0)
        img = (torch.sigmoid((1.0 - r) * 10.0) * 0.6 + 0.4 * torch.exp(-((x - c - 0.07) ** 2).sum(0) / 0.006))
        save_image(Volume(img.clamp(0, 1).numpy(), grid), folder / f"s{k}.nii.gz")
        save_image(Volume((r < 1).numpy().astype("uint8"), grid, None, True), folder / f"s{k}_labels.nii.gz")
        entries.append({"name": f"s{k}", "subject": f"s{k}", "image": f"s{k}.nii.gz",
                        "labels": f"s{k}_labels.nii.gz"})
    (folder / "manifest.json").write_text(json.dumps({"volumes": entries}))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["affine", "vsvf"])
def test_ddp_two_processes_gloo(tmp_path: Path, stage: str) -> None:
    """Both replicas finish a few steps and end with identical weights (gradients were averaged)."""
    data = tmp_path / "prep"
    _prepared(data)
    out = tmp_path / "run"
    cfg = {"data": str(data), "out": str(out), "stage": stage, "epochs": 2, "iters_per_epoch": 2,
           "lr": 1e-3, "seed": 1, "threads": 1, "model": TINY, "val_per_volume": 1}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0 = torch.load(out / "rank0.pt")
    w1 = torch.load(out / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], atol=0, rtol=0, msg=k)
    # training changed the trained part, and only rank 0 wrote the run files
    trained = "affine.net.fc_out.weight" if stage == "affine" else "momentum.out_conv.weight"
    assert float(w0[trained].abs().sum()) > 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for s in steps if s["kind"] == "step") == 4
    assert (out / "last.pt").is_file()
