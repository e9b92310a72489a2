#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which can't be installed here).

Markdown cells are copied, code cells become ```python blocks followed by their text output; cells marked
`#| hide` are left out; relative links into the course are made relative to the repository root.
`--check` exits 1 when README.md is not what the notebook gives (CI runs it that way).
"""
import re, sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, not this file -->\n\n"

def _fix_links(md: str) -> str:
    # [text](00_setup/00_core.ipynb) -> [text](nbs/00_setup/00_core.ipynb); leave absolute URLs and anchors alone
    md = re.sub(r"\]\((?!https?://|#|/|nbs/)([^)\s]+\.ipynb)\)", r"](nbs/\1)", md)
    return re.sub(r"\]\(\.\./([^)\s]+)\)", r"](\1)", md)       # ../images/x.png (from nbs/) -> images/x.png

def _text_output(outputs) -> str:
    parts = []
    for o in outputs:
        if o.get("output_type") == "stream": parts.append("".join(o.get("text", "")))
        elif "data" in o and "text/plain" in o["data"]: parts.append("".join(o["data"]["text/plain"]))
    return "".join(parts).rstrip()

def render(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    out = [HEADER]
    for c in nb.cells:
        src = c.source.strip()
        if not src or re.match(r"^#\|\s*(hide|export)", src): continue
        if c.cell_type == "markdown": out.append(_fix_links(src) + "\n\n")
        elif c.cell_type == "code":
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
            out.append(f"```python\n{code}\n```\n\n")
            text = _text_output(c.get("outputs", []))
            if text: out.append(f"```\n{text}\n```\n\n")
    return "".join(out).rstrip() + "\n"

if __name__ == "__main__":
    want = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != want:
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py` and commit it.")
        print("README.md is in sync with nbs/index.ipynb")
    else:
        tmp = readme.with_suffix(".md.tmp"); tmp.write_text(want); tmp.replace(readme)
        print(f"wrote {readme}")
