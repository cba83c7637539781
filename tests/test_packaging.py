"""The wheel installs `attn_zoo` alone (kernels as `attn_zoo.kernels`): no top-level
`experiments` or `kernels` package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_attn_zoo_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("attn_zoo-*.whl")
    top_level = {
        name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()
        if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"attn_zoo"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "attn_zoo/variants/local.py" in names
    assert "attn_zoo/kernels/__init__.py" in names
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    requires = [line.split(": ", 1)[1] for line in
                zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist: ")]
    # The launchers the speed app's sweeps run through, and the peers it measures (`bench`).
    for plugin in ("hydra-joblib-launcher", "hydra-submitit-launcher"):
        assert any(line.startswith(plugin) and "extra" not in line for line in requires)
    for peer in ("local-attention", "reformer-pytorch", "transformers"):
        assert any(line.startswith(peer) and 'extra == "bench"' in line for line in requires)
