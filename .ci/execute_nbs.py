#!/usr/bin/env python
"""Execute course notebooks in place, the way they are committed.

Cells marked `#| gpu` are skipped when no CUDA GPU is present, and cells marked `#| slow` or `#| notest` are
always skipped (as nbdev_test skips them): they keep whatever output they have (e.g. from a run on a GPU). Run a slow
cell by hand when you mean to (e.g. the full pretraining run that writes data/models/gslm-tiny). Usage: python .ci/execute_nbs.py nbs/00_setup/01_models.ipynb ...
"""
import re, sys, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

_FLAG = re.compile(r"^\s*#\|\s*(gpu|notest|slow)\b", re.M)

def execute(path: Path, timeout: int = 1200) -> float:
    try:
        import torch; has_gpu = torch.cuda.is_available()
    except ImportError: has_gpu = False
    nb = nbformat.read(path, as_version=4)
    skipped = []
    for cell in nb.cells:
        if cell.cell_type == "code" and _FLAG.search(cell.source) and not (has_gpu and "gpu" in _FLAG.search(cell.source).group(1)):
            tags = cell.metadata.setdefault("tags", [])
            if "skip-execution" not in tags: tags.append("skip-execution"); skipped.append(cell)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in skipped:
        cell.metadata["tags"].remove("skip-execution")
        if not cell.metadata["tags"]: del cell.metadata["tags"]
    nbformat.write(nb, path)
    return time.perf_counter() - t0

if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"{p}: executed in {execute(Path(p)):.1f} s", flush=True)
