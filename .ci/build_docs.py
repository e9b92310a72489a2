#!/usr/bin/env python3
"""Build the course's static docs site into `_site/` from the notebooks in `nbs/` — offline, no GPU.

Quarto (what `nbdev_docs` needs) cannot be installed from the package registries, so the site is
built with MkDocs Material + mkdocs-jupyter from nbdev's processed notebooks:

1. stage    copy `nbs/` to a temporary folder and make docs processing safe there: cells carrying a
            test flag from settings.ini (`#| gpu`, `#| slow`, ...) get `#| eval: false`, and so do
            ordinary cells that nbdev would execute only because they contain an import; their
            imports and definitions go to a hidden twin cell instead. So nbdev executes nothing but
            exported code, imports and `show_doc`, and the committed outputs (plots!) stay as they are.
2. process  nbdev's notebook processors (`nbdev.serve.proc_nbs`, the work behind `nbdev_proc_nbs`)
            → `_proc/`: hidden cells dropped, `show_doc` cells added for exported names, front matter.
            The `nbdev_proc_nbs` command itself is not used: without Quarto it tries to download
            Quarto and then runs `pip install -e .[dev]`, and it writes `_quarto.yml` into `nbs/`.
3. polish   `_proc/**/*.ipynb` → `_docs/docs/`: front matter → H1 title and lead paragraph, show_doc
            inputs removed (tag), directive comments stripped, widget outputs and progress-bar noise
            cleaned, the Colab badge served from a local SVG.
4. config   `_docs/mkdocs.yml`: nav by milestone, offline search, no external fonts, scripts or CSS,
            light/dark palette, MathJax 2 served from the `jupyter-server-mathjax` package if installed.
5. build    `mkdocs build --strict` with this file as a hook module (the `on_*` functions at the end):
            links between notebooks and to repository files become site links, nbdev's symbol links
            (to the Quarto site's `doc_host`) point at the right page, CDN scripts are dropped, the
            notebook CSS mkdocs-jupyter inlines into every page is served once, and the page's table
            of contents is taken from the rendered headings. A broken internal link fails the build.

Usage:  python .ci/build_docs.py [--site-dir DIR] [--keep-stage]
Then:   python .ci/check_site.py   (opens every page in headless Chromium)
"""
from __future__ import annotations

import argparse, ast, configparser, copy, hashlib, html, json, logging, os, posixpath, re, shutil
import subprocess, sys, tempfile, time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]  # the repository (this file lives in .ci/)
BUILD = ROOT / "_docs"                     # generated mkdocs.yml, docs/ (polished notebooks, assets), cache
PROC = ROOT / "_proc"                      # where nbdev writes processed notebooks
MANIFEST = "gslm-docs.json"                # build facts handed from this script to its hook (in BUILD)

# Sidebar section titles for the milestone folders under nbs/; other folders get a title-cased name.
MILESTONES = {
    "00_setup": "Setup", "01_theory": "Theory", "02_data": "Data and prompts",
    "03_finetuning": "Fine-tuning", "04_decoding": "Decoding", "05_evaluation": "Evaluation",
    "06_rag": "RAG", "07_rlhf": "RLHF", "08_performance": "Performance",
}
# nbdev directives under which a cell is library code that nbdev must execute to document it.
DEF_DIRECTIVES = {"export", "exports", "exporti", "exec_doc"}
# Files nbdev or Quarto keep in nbs/ that are not part of the site.
NOT_SITE_FILES = {"_quarto.yml", "nbdev.yml", "sidebar.yml", "styles.css", "custom.yml"}
COLAB_BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"
ASSETS = "assets/gslm"                     # the site's own assets, relative to the site root
MATHJAX = "assets/mathjax"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class BuildError(Exception):
    "A failure with a message that says what went wrong and what to do."


def log(msg: str) -> None: print(f"build_docs: {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Small notebook helpers (plain JSON; nbformat is not needed)

def read_nb(path: Path) -> dict:
    try: return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e: raise BuildError(f"cannot read notebook {path}: {e}") from e


def write_nb(nb: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def src_of(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


_re_directive = re.compile(r"^\s*#\s*\|\s*(.*?)\s*$")


def split_directives(src: str) -> tuple[dict[str, str], str]:
    "The leading `#| name: value` lines of a code cell as a dict, and the code after them."
    lines, dirs, i = src.splitlines(keepends=True), {}, 0
    while i < len(lines):
        line = lines[i]
        if not line.strip(): i += 1; continue   # nbdev allows blank lines among directives
        m = _re_directive.match(line)
        if not m: break
        body = m.group(1)
        first = body.split(None, 1)[0] if body else ""
        # `#| echo: false`, `#| eval:false` (Quarto style) or `#| default_exp core`, `#| hide` (nbdev style)
        name, _, value = body.partition(":") if ":" in first else body.partition(" ")
        if name.strip(): dirs[name.strip()] = value.strip()
        i += 1
    return dirs, "".join(lines[i:])


def strip_directive_lines(src: str) -> str:
    "Remove every `#| ...` line (nbdev and Quarto directives) from code shown on the site."
    return "".join(l for l in src.splitlines(keepends=True) if not _re_directive.match(l)).strip("\n")


def settings() -> configparser.SectionProxy:
    cp = configparser.ConfigParser(delimiters=["="], interpolation=None)
    if not cp.read(ROOT / "settings.ini", encoding="utf-8"):
        raise BuildError(f"{ROOT / 'settings.ini'} not found: run this script from the gslm repository")
    return cp["DEFAULT"]


def site_url(cfg) -> str:
    "Where the site is published (settings.ini doc_host + doc_baseurl), with a trailing slash."
    base = cfg.get("doc_baseurl", "").strip("/")
    return cfg.get("doc_host", "").rstrip("/") + "/" + (base + "/" if base else "")


def title_from_name(name: str) -> str:
    "`09_extra_topics` → 'Extra topics' (a fallback for folders and notebooks without a title)."
    s = re.sub(r"^\d+[a-zA-Z]?_", "", name).replace("_", " ").replace("-", " ").strip()
    return (s[:1].upper() + s[1:]) if s else name


def nbdev_html_name(rel: str) -> str:
    "The page nbdev's links point to for notebook `rel` (Quarto drops the number prefix): see nbdev.doclinks._nbpath2html."
    d, f = posixpath.split(rel)
    return posixpath.join(d, re.sub(r"^\d+[a-zA-Z0-9]*_", "", f.lower()).rsplit(".", 1)[0] + ".html")


# ------------------------------------------------------------------------------------------------
# 1. stage: a temporary copy of nbs/ in which nbdev's docs processing executes only what it must

def _imports_and_defs(code: str) -> str | None:
    """The top-level imports, functions and classes of a cell that nbdev would execute because it
    imports something; None when nbdev would not execute it (see nbdev.processors._do_eval)."""
    py = "\n".join(("pass  # " + l) if re.match(r"\s*[%!]", l) else l for l in code.splitlines())
    try: tree = ast.parse(py)
    except SyntaxError: return None                        # nbdev cannot parse it either: not executed
    if not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)): return None
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return "\n".join(ast.get_source_segment(py, n, padded=False) or "" for n in tree.body if isinstance(n, keep))


def _calls_show_doc(code: str) -> bool:
    return bool(re.search(r"^\s*show_doc\s*\(", code, re.MULTILINE))


def stage_notebook(nb: dict, flags: set[str]) -> dict:
    """Make one notebook safe to process for the docs: nothing flagged (gpu, slow, ...) runs, nothing
    is re-executed for its outputs. A flagged cell keeps its flags as cell tags for the site."""
    cells = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code": cells.append(cell); continue
        src = src_of(cell)
        dirs, code = split_directives(src)
        cell_flags = sorted(flags & dirs.keys())
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        tags.extend(f for f in cell_flags if f not in tags and f != "notest")  # shown as badges: gpu, slow
        if "export" in dirs and not dirs["export"].strip():
            # A course shows its code: an exported cell's source stays on the page (nbdev's `exports`),
            # followed by the API card nbdev adds for each exported name.
            src = re.sub(r"^(#\|\s*)export[ \t]*$", r"\1exports", src, count=1, flags=re.M)
        if dirs.keys() & DEF_DIRECTIVES or dirs.get("eval", "").lower() == "false":
            pass                                           # library code (must run) / already skipped
        elif cell_flags:
            src = "#| eval: false\n" + src
        elif not _calls_show_doc(code):
            twin = _imports_and_defs(code)
            if twin is not None:
                if twin.strip():
                    cells.append({"cell_type": "code", "id": f"gslm-twin-{len(cells)}", "execution_count": None,
                                  "metadata": {}, "outputs": [], "source": "#| hide\n#| exec_doc\n" + twin})
                src = "#| eval: false\n" + src
        cell["source"] = src
        cells.append(cell)
    nb["cells"] = cells
    return nb


def stage(nbs: Path, flags: set[str]) -> Path:
    "Copy nbs/ to a temporary folder, notebooks made safe by `stage_notebook`."
    tmp = Path(tempfile.mkdtemp(prefix="gslm-docs-")) / "nbs"
    shutil.copytree(nbs, tmp, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    for p in sorted(tmp.rglob("*.ipynb")):
        write_nb(stage_notebook(read_nb(p), flags), p)
    return tmp


# ------------------------------------------------------------------------------------------------
# 2. process: nbdev's processors → _proc/

# Run in a child process with no GPU visible, hub and network libraries offline and a non-interactive
# matplotlib backend. n_workers=0: one process, so torch & co are imported once (worker processes
# would each import them again: slower on 2 cores).
_PROC_SCRIPT = """
import sys
from pathlib import Path
import nbdev.serve_drv
from nbdev.serve import proc_nbs

_process_one = nbdev.serve_drv.main
def process_one(job):  # name the notebook when nbdev fails on it
    try: return _process_one(job)
    except Exception as e:
        raise RuntimeError(f"nbdev failed on nbs/{Path(job[0]).relative_to(sys.argv[1])}: {e}") from e
nbdev.serve_drv.main = process_one
proc_nbs(sys.argv[1], force=True, n_workers=0)
"""


def process(staged: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", _PROC_SCRIPT, str(staged)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError("nbdev could not process the notebooks (it executes exported cells, imports and "
                         f"show_doc):\n{r.stdout[-4000:]}{r.stderr[-8000:]}".rstrip())
    missing = [p.relative_to(staged) for p in staged.rglob("*.ipynb") if not p.name.startswith(("_", "."))
               and not any(part.startswith(("_", ".")) for part in p.relative_to(staged).parts)
               and not (PROC / p.relative_to(staged)).exists()]
    if missing:
        raise BuildError(f"nbdev produced no processed notebook for {', '.join(map(str, missing))}:\n"
                         f"{r.stdout[-4000:]}{r.stderr[-8000:]}")


# ------------------------------------------------------------------------------------------------
# 3. polish: _proc/ notebooks → _docs/docs/ notebooks that mkdocs-jupyter renders well

_re_source_link = re.compile(r"\[source\]\(([^)\s]+)\)\{[^}]*\}")
_re_fm = re.compile(r"^\s*---\s*\n(.*?)\n---\s*$", re.DOTALL)


def _front_matter(cell: dict) -> dict | None:
    import yaml
    if cell.get("cell_type") != "raw": return None
    m = _re_fm.match(src_of(cell))
    if not m: return None
    try: fm = yaml.safe_load(m.group(1))
    except yaml.YAMLError: return None
    return fm if isinstance(fm, dict) else None


def _clean_stream_text(text: str) -> str:
    "What a terminal would show: for each line only what follows the last carriage return (progress bars)."
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        out.append(parts[-1] if parts else "")
    return "\n".join(out)


def _progress_text(model_id: str, widgets: dict) -> str | None:
    """A tqdm progress bar's final state as text, from the widget state the notebook saved (its text/plain
    fallback shows the bar as it was created: 0%). None for widgets that are not progress bars."""
    box = widgets.get(model_id, {})
    if box.get("model_name") != "HBoxModel": return None
    parts, has_bar = [], False
    for ref in box.get("state", {}).get("children", []):
        child = widgets.get(str(ref).replace("IPY_MODEL_", ""), {})
        st = child.get("state", {})
        if child.get("model_name") in ("FloatProgressModel", "IntProgressModel"):
            frac = min(max(float(st.get("value", 0)) / float(st.get("max") or 1), 0.0), 1.0)
            parts.append("|" + "█" * round(10 * frac) + " " * (10 - round(10 * frac)) + "|")
            has_bar = True
        elif child.get("model_name") == "HTMLModel":
            parts.append(html.unescape(re.sub(r"<[^>]+>", "", str(st.get("value", "")))).replace("\u2007", " "))
    return "".join(parts).strip() if has_bar else None


def _polish_outputs(outputs: list, widgets: dict) -> list:
    res = []
    for o in outputs:
        o = copy.deepcopy(o)
        if o.get("output_type") in ("display_data", "execute_result"):
            data = o.get("data", {})
            view = data.pop(WIDGET_VIEW, None)             # ipywidgets: keep the text/plain fallback
            if view and (bar := _progress_text(str(view.get("model_id", "")), widgets)):
                data["text/plain"] = bar                   # ... or, for a progress bar, its final state
            if not data: continue
            if "text/markdown" in data:                    # show_doc output, in Quarto's dialect
                md = data["text/markdown"]
                md = "".join(md) if isinstance(md, list) else md
                md = re.sub(r"^\s*---\s*\n", "", md)      # the rule above each entry: CSS draws a card instead
                md = _re_source_link.sub(
                    lambda m: f'<a class="gslm-source" href="{html.escape(m.group(1))}" title="Source code">source</a>', md)
                md = re.sub(r"```(\w*)\n\s*\n(.*?)\n\s*\n\s*```", r"```\1\n\2\n```", md, flags=re.DOTALL)
                md = re.sub(r"\(\n\s*\n\)", "()", md)          # `def f(\n    \n)->int:` → `def f()->int:`
                data["text/markdown"] = md
        elif o.get("output_type") == "stream":
            text = o.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            if res and res[-1].get("output_type") == "stream" and res[-1].get("name") == o.get("name"):
                res[-1]["text"] += text                  # merge, so \r-updates of one bar collapse
                continue
            o["text"] = text
        res.append(o)
    for o in res:
        if o.get("output_type") == "stream":
            o["text"] = _clean_stream_text(o["text"])
    return [o for o in res if o.get("output_type") != "stream" or o["text"].strip()]


def polish_notebook(nb: dict, rel: str) -> tuple[dict, str, str]:
    """Turn one of nbdev's processed notebooks into what the site shows. Returns the notebook,
    its title and its description."""
    depth = rel.count("/")
    badge = posixpath.join(*([".."] * depth), ASSETS, "colab-badge.svg") if depth else f"{ASSETS}/colab-badge.svg"
    title = description = ""
    cells = []
    widgets = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    widgets = widgets.get("state", {}) if isinstance(widgets, dict) else {}
    for i, cell in enumerate(nb.get("cells", [])):
        kind, src = cell.get("cell_type"), src_of(cell)
        meta = cell.setdefault("metadata", {})
        tags = [t for t in meta.get("tags", []) if t]
        if i == 0 and (fm := _front_matter(cell)) is not None:
            title, description = str(fm.get("title") or ""), str(fm.get("description") or "")
            body = f"# {title}\n\n{description}" if description else f"# {title}"
            cells.append({"cell_type": "markdown", "id": "gslm-title", "metadata": {"tags": ["gslm-title"]}, "source": body})
            continue
        if kind == "markdown":
            if src.strip().startswith("<!-- WARNING: THIS FILE WAS AUTOGENERATED!"): continue
            cell["source"] = src.replace(COLAB_BADGE_URL, badge)
            if not title and (m := re.search(r"^#\s+(.+)$", src, re.MULTILINE)): title = m.group(1).strip()
        elif kind == "code":
            dirs, _ = split_directives(src)
            if "hide" in dirs or dirs.get("include", "").lower() == "false": continue
            code = strip_directive_lines(src)
            outputs = [] if dirs.get("output", "").lower() == "false" else _polish_outputs(cell.get("outputs", []), widgets)
            if dirs.get("echo", "").lower() == "false":
                tags.append("remove_input")                  # mkdocs-jupyter's remove_tag_config drops it
                if "show_doc" in code: tags.append("gslm-doc")
            if not code.strip() and not outputs: continue
            cell["source"], cell["outputs"] = code, outputs
        elif kind == "raw":
            continue                                       # Quarto-only content
        meta.pop("tags", None)
        if tags: meta["tags"] = list(dict.fromkeys(tags))
        cells.append(cell)
    if not title:                                          # no front matter and no H1: name the page
        title = title_from_name(Path(rel).stem)
        cells.insert(0, {"cell_type": "markdown", "id": "gslm-title", "metadata": {"tags": ["gslm-title"]},
                         "source": f"# {title}"})
    nb["cells"] = cells
    nb.get("metadata", {}).pop("widgets", None)            # no widget state: no widget manager from a CDN
    return nb, title, description


def polish(docs: Path) -> dict[str, dict]:
    "Write polished notebooks and other site files from _proc/ into `docs`; returns {rel path: page facts}."
    pages = {}
    for p in sorted(PROC.rglob("*")):
        rel = p.relative_to(PROC).as_posix()
        if p.is_dir() or p.name in NOT_SITE_FILES or p.suffix in (".py", ".qmd"): continue
        dst = docs / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix != ".ipynb": shutil.copy2(p, dst); continue
        nb, title, description = polish_notebook(read_nb(p), rel)
        write_nb(nb, dst)
        # nav and <title> are plain text: drop markdown's code and emphasis marks
        nav_title = re.sub(r"`([^`]*)`|\*\*(.+?)\*\*|\*(.+?)\*", lambda m: next(g for g in m.groups() if g is not None), title)
        pages[rel] = {"title": title, "nav_title": nav_title, "description": description}
    if "index.ipynb" not in pages:
        raise BuildError("nbs/index.ipynb is missing: it is the home page of the site (and the README's source)")
    return pages


# ------------------------------------------------------------------------------------------------
# 4. config: assets and _docs/mkdocs.yml

COLAB_BADGE_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" aria-label="Open in Colab">
  <title>Open in Colab</title>
  <linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/><stop offset="1" stop-opacity=".1"/></linearGradient>
  <clipPath id="r"><rect width="117" height="20" rx="3" fill="#fff"/></clipPath>
  <g clip-path="url(#r)">
    <rect width="30" height="20" fill="#555"/><rect x="30" width="87" height="20" fill="#F9AB00"/>
    <rect width="117" height="20" fill="url(#s)"/>
  </g>
  <g fill="none" stroke-width="2.6" stroke-linecap="round">
    <path d="M13.2 6.2 A4.6 4.6 0 1 0 13.2 13.8" stroke="#F9AB00"/>
    <path d="M16.8 6.2 A4.6 4.6 0 1 1 16.8 13.8" stroke="#E8710A"/>
  </g>
  <g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" font-size="11">
    <text x="73.5" y="15" fill="#010101" fill-opacity=".3">Open in Colab</text>
    <text x="73.5" y="14" fill="#1f1f1f">Open in Colab</text>
  </g>
</svg>
"""

# Site-wide CSS (MkDocs extra_css): readable notebook pages and tidy API cards.
SITE_CSS = """\
/* gslm docs: notebook pages in MkDocs Material (generated by .ci/build_docs.py) */
.md-typeset .jupyter-wrapper { font-size: .8rem; }
/* the title cell: nbdev's front matter as an H1 and a lead paragraph */
.md-typeset .jupyter-wrapper .celltag_gslm-title h1 { margin-bottom: .4em; }
.md-typeset .jupyter-wrapper .celltag_gslm-title h1 + p {
  font-size: 1.05rem; line-height: 1.5; color: var(--md-default-fg-color--light); margin-top: 0; }
.md-typeset .jupyter-wrapper .anchor-link { display: none; }
/* MathJax's native MathML output: no web fonts for script/fraktur/double-struck (the browser's math font) */
.MathJax_MathML [mathvariant] { font-family: inherit !important; }
"""

# Notebook CSS, linked after the CSS mkdocs-jupyter ships, so it wins at equal specificity.
NOTEBOOK_CSS = """\
/* gslm docs: notebook cells themed by MkDocs Material's colours (generated by .ci/build_docs.py) */
.jupyter-wrapper {
  --jp-content-font-family: var(--md-text-font-family, -apple-system, BlinkMacSystemFont, Helvetica, Arial, sans-serif);
  --jp-code-font-family: var(--md-code-font-family, SFMono-Regular, Consolas, Menlo, "DejaVu Sans Mono", monospace);
  --jp-code-font-size: .85em; --jp-code-line-height: 1.45;
  --jp-content-font-color0: var(--md-default-fg-color); --jp-content-font-color1: var(--md-default-fg-color);
  --jp-ui-font-color1: var(--md-default-fg-color);
  --jp-layout-color0: transparent; --jp-layout-color1: var(--md-default-bg-color);
  --jp-cell-editor-background: var(--md-code-bg-color); --jp-cell-editor-border-color: var(--md-default-fg-color--lightest);
  --jp-border-color1: var(--md-default-fg-color--lightest); --jp-border-color2: var(--md-default-fg-color--lightest);
  --jp-rendermime-table-row-background: var(--md-code-bg-color);
  --jp-rendermime-error-background: rgba(244, 67, 54, .12);
}
.jupyter-wrapper .jp-Notebook { padding: 0; }
.jupyter-wrapper .jp-Cell { padding: 0; margin: .6em 0; }
.jupyter-wrapper .jp-InputArea-editor { border-radius: .2rem; border: none; padding: .3em .6em; }
.jupyter-wrapper .jp-InputArea-editor .highlight-ipynb,
.jupyter-wrapper .jp-InputArea-editor .highlight-ipynb pre { background: transparent; color: var(--md-code-fg-color); }
.jupyter-wrapper .jp-OutputArea-output pre { font-family: var(--jp-code-font-family); font-size: var(--jp-code-font-size); line-height: 1.4; }
.jupyter-wrapper .jp-OutputArea-output { padding: .2em .6em; }
.jupyter-wrapper .jp-OutputArea-output img { max-width: 100%; height: auto; }
.jupyter-wrapper .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"] {
  background: var(--md-code-bg-color); border-left: 3px solid var(--md-default-fg-color--lighter); }
/* code colours from Material's palette, so light and dark both read well */
.highlight-ipynb .k, .highlight-ipynb .kn, .highlight-ipynb .kc, .highlight-ipynb .kd, .highlight-ipynb .kp,
.highlight-ipynb .kr, .highlight-ipynb .ow { color: var(--md-code-hl-keyword-color); font-weight: normal; }
.highlight-ipynb .s, .highlight-ipynb .s1, .highlight-ipynb .s2, .highlight-ipynb .sa, .highlight-ipynb .sb,
.highlight-ipynb .sd, .highlight-ipynb .se, .highlight-ipynb .sh, .highlight-ipynb .si, .highlight-ipynb .sx,
.highlight-ipynb .sr, .highlight-ipynb .ss, .highlight-ipynb .sc { color: var(--md-code-hl-string-color); }
.highlight-ipynb .mi, .highlight-ipynb .mf, .highlight-ipynb .mh, .highlight-ipynb .mo, .highlight-ipynb .il,
.highlight-ipynb .m { color: var(--md-code-hl-number-color); }
.highlight-ipynb .c, .highlight-ipynb .c1, .highlight-ipynb .cm, .highlight-ipynb .ch, .highlight-ipynb .cs,
.highlight-ipynb .cp { color: var(--md-code-hl-comment-color); font-style: normal; }
.highlight-ipynb .nf, .highlight-ipynb .fm { color: var(--md-code-hl-function-color); }
.highlight-ipynb .nc, .highlight-ipynb .nn, .highlight-ipynb .bp, .highlight-ipynb .nb { color: var(--md-code-hl-constant-color); font-weight: normal; }
.highlight-ipynb .nd, .highlight-ipynb .ne { color: var(--md-code-hl-special-color); }
.highlight-ipynb .o, .highlight-ipynb .p { color: var(--md-code-hl-punctuation-color); }
.highlight-ipynb .n, .highlight-ipynb .nv, .highlight-ipynb .na { color: var(--md-code-hl-name-color, var(--md-code-fg-color)); }
/* copy button */
.jupyter-wrapper .zeroclipboard-container { top: .3em; right: .3em; }
.jupyter-wrapper .zeroclipboard-container clipboard-copy { color: var(--md-default-fg-color--light); }
/* show_doc: an API card per documented name */
.jupyter-wrapper .celltag_gslm-doc .jp-OutputArea-output.jp-RenderedMarkdown {
  border: 1px solid var(--md-default-fg-color--lightest); border-left: .2rem solid var(--md-primary-fg-color);
  border-radius: .2rem; padding: .5em 1em .2em; margin: 1.2em 0 .8em; background: var(--md-default-bg-color); }
.jupyter-wrapper .celltag_gslm-doc .jp-RenderedMarkdown h3,
.jupyter-wrapper .celltag_gslm-doc .jp-RenderedMarkdown h4 {
  font-family: var(--jp-code-font-family); font-size: 1.05em; font-weight: 700; margin: .3em 0 .5em; letter-spacing: 0; }
.jupyter-wrapper .celltag_gslm-doc .jp-RenderedMarkdown pre {
  background: var(--md-code-bg-color); border: none; border-radius: .2rem; padding: .5em .8em; margin: .4em 0; }
.jupyter-wrapper .celltag_gslm-doc .jp-RenderedMarkdown p { margin: .5em 0; }
.jupyter-wrapper .celltag_gslm-doc .jp-RenderedMarkdown table { font-size: .9em; margin: .5em 0; }
.jupyter-wrapper a.gslm-source { float: right; font-size: .8em; margin-top: .3em; color: var(--md-default-fg-color--light); }
.jupyter-wrapper a.gslm-source:hover { color: var(--md-accent-fg-color); }
/* code: the copy button sits in the right padding; long lines scroll instead of running under it */
.jupyter-wrapper .jp-InputArea-editor { position: relative; padding-right: 2.4em; }
.jupyter-wrapper .jp-InputArea-editor .highlight-ipynb { overflow-x: auto; }
/* cells that need more than a laptop CPU carry their test flag (gpu, slow, ...) as a badge */
.jupyter-wrapper .celltoolbar, [data-md-color-scheme] .jupyter-wrapper .celltoolbar {
  background: none !important; height: auto; width: auto; padding: .3em 0 0; justify-content: flex-end; }
.jupyter-wrapper .celltoolbar .tags_button_container .tag-container .cell-tag,
[data-md-color-scheme] .jupyter-wrapper .celltoolbar .tags_button_container .tag-container .cell-tag {
  font-family: var(--md-text-font-family, sans-serif); font-size: .6rem; text-transform: uppercase; letter-spacing: .05em;
  height: auto; margin: 0; padding: .1em .7em;
  border-radius: .8em; border: none !important; background-color: var(--md-accent-fg-color--transparent) !important;
  color: var(--md-default-fg-color--light); }
/* tables (pandas) flush left like the prose, not centred */
.jupyter-wrapper .jp-RenderedHTMLCommon table { margin-left: 0; margin-right: 0; }
"""

# MathJax 2 (from the jupyter-server-mathjax package) for the `$...$` nbconvert leaves in the page.
MATHJAX_CONFIG_JS = """\
// gslm docs: MathJax 2 served from this site (generated by .ci/build_docs.py); nothing from a CDN.
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  tex2jax: { inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
             processEscapes: true, processEnvironments: true },
  TeX: { equationNumbers: { autoNumber: "AMS", useLabelIds: true } },
  // Browsers render MathML natively now (Chromium 109+, Firefox, Safari): no web fonts to load.
  menuSettings: { renderer: "NativeMML" },
  "HTML-CSS": { availableFonts: [], imageFont: null, preferredFont: null, font: "STIX-Web", webFont: "STIX-Web" },
  displayAlign: "center", messageStyle: "none", showMathMenu: false, showProcessingMessages: false
};
"""


def vendor_mathjax(docs: Path) -> bool:
    "Copy MathJax 2 from the jupyter-server-mathjax package into the site; False when it is not installed."
    try:
        import importlib.util
        spec = importlib.util.find_spec("jupyter_server_mathjax")
    except (ImportError, ValueError): spec = None
    if spec is None or not spec.origin: return False
    static = Path(spec.origin).parent / "static"
    if not (static / "MathJax.js").exists(): return False
    dst = docs / MATHJAX
    shutil.copytree(static, dst, ignore=lambda d, names: [n for n in names if Path(d).name == "localization" and n != "en"])
    (dst / "gslm-config.js").write_text(MATHJAX_CONFIG_JS, encoding="utf-8")
    return True


def nav_for(pages: dict[str, dict]) -> list:
    "The sidebar: the home page, then one section per folder (milestone), pages in file order."
    tree: dict = {}
    for rel in sorted(pages, key=lambda r: (r != "index.ipynb", r.count("/") > 0, r)):
        node, parts = tree, rel.split("/")
        for d in parts[:-1]: node = node.setdefault(d + "/", {})
        node[parts[-1]] = rel

    def build(node: dict) -> list:
        items = []
        for key, val in node.items():
            if isinstance(val, dict): items.append({MILESTONES.get(key[:-1], title_from_name(key[:-1])): build(val)})
            else: items.append({pages[val]["nav_title"]: val})
        return items
    return build(tree)


def write_config(build: Path, site: Path, pages: dict[str, dict], cfg, mathjax: bool) -> Path:
    import yaml
    conf = {
        "site_name": cfg.get("title", cfg.get("lib_name", "docs")),
        "site_description": cfg.get("description", ""),
        "site_url": site_url(cfg),
        "copyright": f"Copyright {cfg.get('copyright', '')}".strip(),
        "docs_dir": "docs",
        "site_dir": str(site),
        "use_directory_urls": True,
        "strict": True,
        "theme": {
            "name": "material",
            "font": False,                                # no Google Fonts: system fonts
            "palette": [
                {"media": "(prefers-color-scheme: light)", "scheme": "default", "primary": "indigo",
                 "accent": "indigo", "toggle": {"icon": "material/weather-night", "name": "Switch to dark mode"}},
                {"media": "(prefers-color-scheme: dark)", "scheme": "slate", "primary": "indigo",
                 "accent": "light blue", "toggle": {"icon": "material/weather-sunny", "name": "Switch to light mode"}},
            ],
            "features": ["navigation.sections", "navigation.top", "navigation.footer", "navigation.tracking",
                         "toc.follow", "search.highlight", "search.suggest", "content.code.copy"],
        },
        "plugins": [
            {"search": {}},                              # lunr index, built here and searched in the browser
            {"mkdocs-jupyter": {
                "include": ["*.ipynb"], "execute": False, "include_source": False, "no_prompt": True,
                "ignore_h1_titles": True, "include_requirejs": False,
                "remove_tag_config": {"remove_input_tags": ["remove_input"]},
                "cache": True, "cache_dir": str(build / "cache"),
            }},
        ],
        "hooks": [str(Path(__file__).resolve())],
        "extra_css": [f"{ASSETS}/site.css"],
        "extra_javascript": [f"{MATHJAX}/gslm-config.js", f"{MATHJAX}/MathJax.js"] if mathjax else [],
        "extra": {"generator": False,
                  "social": [{"icon": "fontawesome/brands/github", "link": cfg.get("git_url", ""), "name": "Source on GitHub"}]
                  if cfg.get("git_url") else []},
        "markdown_extensions": ["toc", "tables", "admonition", "pymdownx.superfences"],
        "nav": nav_for(pages),
    }
    path = build / "mkdocs.yml"
    path.write_text("# Generated by .ci/build_docs.py — do not edit; rebuild instead.\n"
                    + yaml.safe_dump(conf, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# 5. build

def run_mkdocs(config: Path) -> None:
    "`mkdocs build --strict`: any warning (a broken link, say) fails the build. Prints warnings only."
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)],
                       cwd=BUILD, env=env, capture_output=True, text=True)
    lines = [l for l in (r.stdout + r.stderr).strip().splitlines() if not l.startswith("INFO")]
    if r.returncode != 0:
        raise BuildError("mkdocs build --strict failed (a warning fails the build):\n" + "\n".join(lines[-200:]))
    for line in lines: print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site-dir", type=Path, default=ROOT / "_site", help="output folder (default: _site/)")
    ap.add_argument("--keep-stage", action="store_true", help="keep the temporary staged copy of nbs/")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = settings()
        nbs = ROOT / cfg.get("nbs_path", "nbs")
        if not nbs.is_dir(): raise BuildError(f"notebook folder {nbs} not found")
        flags = set(cfg.get("tst_flags", "").split())
        staged = stage(nbs, flags)
        try:
            log(f"processing notebooks with nbdev (flags never executed: {', '.join(sorted(flags)) or 'none'})")
            process(staged)
        finally:
            if not args.keep_stage: shutil.rmtree(staged.parent, ignore_errors=True)
            else: log(f"staged notebooks kept in {staged}")
        docs = BUILD / "docs"
        shutil.rmtree(docs, ignore_errors=True)
        docs.mkdir(parents=True)
        pages = polish(docs)
        (docs / ASSETS).mkdir(parents=True, exist_ok=True)
        (docs / ASSETS / "colab-badge.svg").write_text(COLAB_BADGE_SVG, encoding="utf-8")
        (docs / ASSETS / "site.css").write_text(SITE_CSS, encoding="utf-8")
        (docs / ASSETS / "notebook.css").write_text(NOTEBOOK_CSS, encoding="utf-8")
        mathjax = vendor_mathjax(docs)
        if not mathjax: log("jupyter-server-mathjax is not installed: math stays as TeX source")
        site = args.site_dir.resolve()
        cfg_path = write_config(BUILD, site, pages, cfg, mathjax)
        (BUILD / MANIFEST).write_text(json.dumps({
            "root": str(ROOT), "nbs": str(nbs.relative_to(ROOT).as_posix()), "pages": pages,
            "doc_url": site_url(cfg),                      # nbdev's symbol links point there
        }, indent=1), encoding="utf-8")
        log(f"rendering {len(pages)} notebooks with MkDocs → {site}")
        run_mkdocs(cfg_path)
    except BuildError as e:
        print(f"build_docs: error: {e}", file=sys.stderr)
        return 1
    n_html = sum(1 for _ in site.rglob("*.html"))
    log(f"done in {time.perf_counter() - t0:.1f} s: {len(pages)} notebook pages, {n_html} HTML files in {site}")
    return 0


# ================================================================================================
# MkDocs hook: mkdocs.yml lists this file under `hooks:`, so MkDocs imports it as a module and calls
# the `on_*` functions below. They fix up the HTML that mkdocs-jupyter renders from each notebook.

_hook_log = logging.getLogger("mkdocs.hooks.gslm")
_state: dict = {}


def _manifest(config) -> dict:
    if "manifest" not in _state:
        _state["manifest"] = json.loads((Path(config.config_file_path).parent / MANIFEST).read_text(encoding="utf-8"))
        _state.update(css={}, repo_files=set(), ids={}, anchors=[])
    return _state["manifest"]


# Script blocks the nbconvert template emits that would fetch from a CDN (MathJax 2 with an empty URL,
# mermaid, the ipywidgets manager, require.js). MathJax is loaded site-wide instead.
_re_mathjax_block = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)
_re_script = re.compile(r"<script\b[^>]*>.*?</script>", re.DOTALL | re.IGNORECASE)
_re_style = re.compile(r"<style\b[^>]*>(.*?)</style>", re.DOTALL | re.IGNORECASE)
_re_attr = re.compile(r"""(\s(?:href|src)\s*=\s*)("[^"]*"|'[^']*')""", re.IGNORECASE)
_re_id = re.compile(r"""\s(?:id|name)\s*=\s*["']([^"']+)["']""")
# nbdev symbol links get their fragment once every page's ids are known (in on_post_page).
_SYM = "#gslm-sym:"
_re_sym = re.compile(re.escape(_SYM) + r"([^|\"]*)\|([^\"]*)")


def _drop_remote_scripts(html_: str) -> str:
    html_ = _re_mathjax_block.sub("", html_)
    def keep(m):
        tag = m.group(0)
        opening = tag[:tag.index(">") + 1]
        src = re.search(r"""\ssrc\s*=\s*["']([^"']*)["']""", opening)
        if src is not None:                                # external file: keep only a local one
            url = src.group(1).strip()
            return "" if not url or re.match(r"(?i)(https?:)?//", url) else tag
        # inline: drop loaders that import from the network (mermaid, the widget manager)
        return "" if re.search(r"""(import\(\s*["']https?://)|(widgets_cdn_url|cdn\.jsdelivr|unpkg\.com|cdnjs)""", tag) else tag
    return _re_script.sub(keep, html_)


def _search_exclude(html_: str) -> str:
    "Keep the copy button's hidden text, its 'Copied!' notice and the ¶ anchors out of the search index."
    html_ = re.sub(r'<a class="anchor-link"', '<a class="anchor-link" data-search-exclude', html_)
    html_ = re.sub(r'<span class="notice"', '<span class="notice" data-search-exclude', html_)
    return re.sub(r'class="clipboard-copy-txt"', 'class="clipboard-copy-txt" data-search-exclude', html_)


def _share_styles(html_: str, page) -> str:
    "Serve the big CSS blocks mkdocs-jupyter inlines into every page as one shared file each."
    from mkdocs.utils import get_relative_url
    links = []
    def repl(m):
        css = m.group(1)
        if len(css) < 2000: return m.group(0)
        name = f"{ASSETS}/nb-{hashlib.sha1(css.encode()).hexdigest()[:12]}.css"
        _state["css"][name] = css
        links.append(name)
        return ""
    html_ = _re_style.sub(repl, html_)
    links.append(f"{ASSETS}/notebook.css")                  # our overrides come last
    tags = "".join(f'<link rel="stylesheet" href="{get_relative_url(n, page.url)}">' for n in dict.fromkeys(links))
    return tags + html_


def _target_url(value: str, page, files, man: dict) -> tuple[str | None, bool]:
    """The URL (relative to `page`) for a link found in a notebook page, and whether it was rewritten.
    None means the link points nowhere in the site."""
    from mkdocs.utils import get_relative_url
    v = html.unescape(value).strip()
    if not v or v.startswith("#"): return value, False
    parts = urlsplit(v)
    frag = unquote(parts.fragment)
    if parts.scheme in ("data", "mailto", "javascript", "tel"): return value, False
    if parts.scheme or parts.netloc:
        if not v.startswith(man["doc_url"]): return value, False     # truly external
        # nbdev's symbol links point at the Quarto site: `<doc_url>00_setup/core.html#get_device`
        rest = unquote(v[len(man["doc_url"]):].split("#")[0])
        if rest in ("", "index.html"): target = "index.ipynb"
        else: target = next((r for r in man["pages"] if nbdev_html_name(r) == rest), None)
        if target is None: return None, True
        url = get_relative_url(files.get_file_from_path(target).url, page.url)
        return (url + f"{_SYM}{target}|{frag}") if frag else url, True
    if v.startswith("/"): return None, True                          # root-absolute breaks under a subpath
    path = unquote(parts.path)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), path))
    suffix = ("?" + parts.query if parts.query else "") + ("#" + parts.fragment if parts.fragment else "")
    if not resolved.startswith("../"):
        f = files.get_file_from_path(resolved) or files.get_file_from_path(posixpath.join(resolved, "index.ipynb"))
        if f is None: return None, True
        if frag and f.src_uri.endswith(".ipynb"): _state["anchors"].append((page.file.src_uri, f.src_uri, frag, v))
        return get_relative_url(f.url, page.url) + suffix, True
    # outside nbs/: a repository file (images/, data/...), copied into the site at the same path
    repo_rel = posixpath.normpath(posixpath.join(man["nbs"], posixpath.dirname(page.file.src_uri), path))
    src = Path(man["root"]) / repo_rel
    if repo_rel.startswith("../") or not src.is_file(): return None, True
    _state["repo_files"].add(repo_rel)
    return get_relative_url(repo_rel, page.url) + suffix, True


def _rewrite_links(html_: str, page, files, man: dict) -> str:
    "Make relative links (written for the notebooks in nbs/) and nbdev's doc links work in the site."
    def fix(m):
        target, changed = _target_url(m.group(2)[1:-1], page, files, man)
        if target is None:
            _hook_log.warning(f"{page.file.src_uri}: broken link {m.group(2)} (no such page or file)")
            return m.group(0)
        return f'{m.group(1)}"{html.escape(target, quote=True)}"' if changed else m.group(0)
    # rewrite outside <script>/<style> only
    out, pos = [], 0
    for m in re.finditer(r"<(script|style)\b.*?</\1>", html_, re.DOTALL | re.IGNORECASE):
        out.append(_re_attr.sub(fix, html_[pos:m.start()])); out.append(m.group(0)); pos = m.end()
    out.append(_re_attr.sub(fix, html_[pos:]))
    return "".join(out)


class _Headings(HTMLParser):
    "Collects the headings (level, id, text) that sit in markdown cells, for the page's table of contents."
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.divs, self.md_depth, self.found, self.cur = [], 0, [], None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            is_md = "jp-MarkdownCell" in (a.get("class") or "").split()
            self.divs.append(is_md); self.md_depth += is_md
        elif re.fullmatch(r"h[1-6]", tag) and self.md_depth and a.get("id") and self.cur is None:
            self.cur = [int(tag[1]), a["id"], []]
        elif tag == "a" and self.cur is not None and "anchor-link" in (a.get("class") or ""):
            self.cur.append("skip")
    def handle_endtag(self, tag):
        if tag == "div" and self.divs: self.md_depth -= self.divs.pop()
        elif self.cur is not None and tag == f"h{self.cur[0]}":
            self.found.append((self.cur[0], self.cur[1], " ".join("".join(self.cur[2]).split())))
            self.cur = None
        elif tag == "a" and self.cur is not None and self.cur[-1] == "skip": self.cur.pop()
    def handle_data(self, data):
        if self.cur is not None and self.cur[-1] != "skip": self.cur[2].append(data)


def _toc(html_: str):
    "A table of contents from the rendered headings, so its links match the headings' ids."
    from mkdocs.structure.toc import get_toc
    p = _Headings(); p.feed(html_)
    root: list = []
    stack: list = []
    for level, id_, name in p.found:
        tok = {"level": level, "id": id_, "name": html.escape(name), "children": []}
        while stack and stack[-1]["level"] >= level: stack.pop()
        (stack[-1]["children"] if stack else root).append(tok)
        stack.append(tok)
    return get_toc(root)


def on_page_content(html_: str, page, config, files) -> str:
    if not page.file.src_uri.endswith(".ipynb"): return html_
    man = _manifest(config)
    html_ = _drop_remote_scripts(html_)
    html_ = _rewrite_links(html_, page, files, man)
    html_ = _share_styles(html_, page)
    html_ = _search_exclude(html_)
    _state["ids"][page.file.src_uri] = set(_re_id.findall(html_))
    page.toc = _toc(html_)
    facts = man["pages"].get(page.file.src_uri)
    if facts:
        page.title = facts["nav_title"]
        if facts.get("description"): page.meta["description"] = facts["description"]
    return html_


def _symbol_fragment(target: str, symbol: str) -> str:
    """The anchor for an nbdev symbol link on page `target`: the symbol's own show_doc heading, else its
    class's (`Timer.__enter__` → `Timer`), else none (the top of the page), as on nbdev's Quarto sites."""
    from mkdocs_jupyter.utils import slugify
    ids = _state["ids"].get(target, set())
    for cand in (symbol, symbol.split(".")[0]):
        for slug in (slugify(cand), cand):
            if slug in ids: return "#" + slug
    return ""


def on_post_page(output: str, page, config) -> str:
    "Every page's ids are known now: give nbdev's symbol links their fragment."
    if "manifest" not in _state: return output
    return _re_sym.sub(lambda m: _symbol_fragment(m.group(1), unquote(m.group(2))), output)


def on_post_build(config) -> None:
    "Check anchors of links between notebooks, write the shared CSS, copy linked repository files."
    if "manifest" not in _state: return
    for src, target, frag, link in _state["anchors"]:
        if frag not in _state["ids"].get(target, set()):
            _hook_log.warning(f"{src}: broken link \"{link}\": {target} has no heading or anchor #{frag}")
    site, root = Path(config.site_dir), Path(_state["manifest"]["root"])
    for name, css in _state["css"].items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(css, encoding="utf-8")
    for rel in sorted(_state["repo_files"]):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, site / rel)


if __name__ == "__main__":
    sys.exit(main())
