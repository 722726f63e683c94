"""Memory of writing a registration's outputs: linear in the voxel count, a few fields' worth.

Each measurement runs in a fresh subprocess: the inputs are built, the process's peak
resident set (``VmHWM``) is reset through ``/proc/self/clear_refs``, then the outputs
are computed and written as ``avsm register`` does (one forward pass, then the ANTs
fields and the compact file), and the new peak minus the resident set before is the
memory of the outputs (after one warm-up run, so lazy imports and caches are not counted).
Slabs are made small (``SLAB_VOXELS``) so several are used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile
    import numpy as np, torch
    torch.set_num_threads(1)
    import avsm.transform as T
    from avsm.api import identity_result
    from avsm.export.itk import write_transforms
    from avsm.io.geometry import Grid
    from avsm.io.image import Volume
    from avsm.io.outputs import OutputTransaction
    from avsm.models.vsvf import VelocityStep, low_res_shape
    from avsm.pipeline import forward_outputs
    from avsm.transform import RegistrationResult

    D, H, W = (int(v) for v in sys.argv[1].split("x"))
    T.SLAB_VOXELS = 1 << 18
    grid = Grid((D, H, W), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    vol = Volume(rng.random((D, H, W), dtype=np.float32), grid)
    base = identity_result(vol, vol, spacing=2.0)
    low = low_res_shape(base.fixed_grid.shape)
    v = torch.from_numpy(rng.standard_normal((1, 3, *low)).astype(np.float32)) * 0.002
    res = RegistrationResult.from_steps(fixed_grid=base.fixed_grid, moving_grid=base.moving_grid,
                                        fixed_original=grid, moving_original=grid, A=base.A, b=base.b,
                                        steps=[VelocityStep(v)], method="test")

    def status(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(key)) * 1024

    def outputs(out):
        with OutputTransaction() as tx:
            fwd = forward_outputs(res, vol, warp_field=True)
            fields = {"warp": fwd.warp_field}
            fwd = None
            write_transforms(res, os.path.join(out, "t_"), tx, fields=fields)

    outputs(tempfile.mkdtemp())  # warm-up: lazy imports, thread pools, caches
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status("VmRSS:")
    outputs(tempfile.mkdtemp())
    print(json.dumps({"increase": status("VmHWM:") - before, "field": 3 * D * H * W * 4}))
''')


def _measure(shape: str) -> dict:
    # big arrays always mmapped (returned to the system when freed): RSS before = what is in use
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, shape], capture_output=True, text=True, env=env,
                          timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_output_memory_is_linear_and_a_few_fields() -> None:
    small, large = _measure("96x128x128"), _measure("192x256x128")  # 1.6 M and 6.3 M voxels
    slabs = 48 * 2**20  # the slab temporaries (SLAB_VOXELS = 2**18 voxels, float64 maps)
    for m in (small, large):
        # the field being written or computed, the warped image (1/3 field) and the slabs;
        # measured: 1.36 fields + 28 MB
        assert m["increase"] < 2.0 * m["field"] + slabs, m
    # linear: each extra field's worth of voxels costs at most 2 fields (measured 1.36)
    marginal = (large["increase"] - small["increase"]) / (large["field"] - small["field"])
    assert marginal < 2.0, (small, large)
    assert large["increase"] > large["field"]  # it did hold a full field (the test can fail)
