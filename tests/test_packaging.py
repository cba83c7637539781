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
    # Every module of the checkout's package (kernels/ installed as attn_zoo/kernels/).
    modules = {f"attn_zoo/{path.relative_to(ROOT / 'attn_zoo').as_posix()}"
               for path in (ROOT / "attn_zoo").rglob("*.py")}
    modules |= {f"attn_zoo/kernels/{path.relative_to(ROOT / 'kernels').as_posix()}"
                for path in (ROOT / "kernels").rglob("*.py")}
    assert "attn_zoo/parallel/gather.py" in modules
    assert sorted(modules - set(names)) == []
    (metadata,) = [name for name in names if name.endswith(".dist-info/METADATA")]
    requires = [line.split(": ", 1)[1] for line in
                zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist: ")]
    # The launchers the speed app's sweeps run through, and the peers it measures (`bench`).
    for plugin in ("hydra-joblib-launcher", "hydra-submitit-launcher"):
        assert any(line.startswith(plugin) and "extra" not in line for line in requires)
    for peer in ("local-attention", "reformer-pytorch", "transformers"):
        assert any(line.startswith(peer) and 'extra == "bench"' in line for line in requires)
