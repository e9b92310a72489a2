#!/usr/bin/env python
"""Fail when the notebooks and what is generated from them disagree.

Runs nbdev_export and nbdev_clean and checks (in a git checkout) that neither changed a tracked or untracked
file under gslm/ or nbs/; then checks that README.md is what .ci/readme.py makes from nbs/index.ipynb.
"""
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def status() -> str:
    r = subprocess.run(["git", "status", "--porcelain", "--", "gslm", "nbs"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None

def main() -> int:
    before = status()
    for cmd in (["nbdev_export"], ["nbdev_clean"]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode: print(r.stdout, r.stderr); sys.exit(f"{cmd[0]} failed")
    after = status()
    if before is None: print("not a git checkout: skipping the export/clean comparison")
    elif before != after:
        changed = sorted(set(after.splitlines()) - set(before.splitlines()))
        print("nbdev_export / nbdev_clean changed these files:\n  " + "\n  ".join(changed))
        print(subprocess.run(["git", "diff", "--stat", "--", "gslm", "nbs"], cwd=ROOT, capture_output=True, text=True).stdout)
        sys.exit("the notebooks and gslm/ are out of sync: run nbdev_export and nbdev_clean, then commit")
    else: print("nbdev_export and nbdev_clean leave gslm/ and nbs/ unchanged")
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "readme.py"), "--check"]).returncode

if __name__ == "__main__": sys.exit(main())
