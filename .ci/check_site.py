#!/usr/bin/env python3
"""Open every page of the built docs site in headless Chromium and fail on anything broken.

Serves `_site/` from an in-process HTTP server on 127.0.0.1 (a free port), mounted at the path of
the site's URL (from sitemap.xml, e.g. /gslm/, as on GitHub Pages), and visits every HTML file found
by walking the folder (a few tabs at a time). A page fails on:
  - a console error or an uncaught JavaScript exception,
  - a failed request or an HTTP error status, and any request that leaves the local server,
  - an internal link (href/src of a, img, link, script, source, iframe) to a missing file, or to an
    anchor (#id) that the target page does not have.
Chromium is Debian's (`apt-get install chromium`), driven by Playwright's Python package with the
browser at /usr/bin/chromium (never `playwright install`: that downloads a browser build).

Usage:  python .ci/check_site.py [--site DIR] [--screenshots DIR] [--chromium PATH] [--tabs N]
Prints: check_site: N pages checked, E console errors, F failed requests, B broken links (T s)
"""
from __future__ import annotations

import argparse, asyncio, functools, http.server, importlib.util, os, posixpath, re, shutil, sys, tempfile, threading, time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
# The offline flags from DESIGN.md. Playwright passes --headless itself (headless=True) and
# --user-data-dir (launch_persistent_context on a fresh temporary folder).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Pages to screenshot with --screenshots (site-relative URLs; a missing page is skipped and named).
SCREENSHOTS = {"home": "", "models": "00_setup/01_models/"}
LINK_SELECTOR = "a[href], img[src], link[href], script[src], source[src], iframe[src]"
PAGE_FACTS_JS = """sel => ({
    ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
    links: Array.from(document.querySelectorAll(sel)).map(e => e.href || e.src).filter(u => typeof u === 'string' && u)
})"""


def site_base_path(site: Path) -> str:
    "The URL path the site is published under (from sitemap.xml's first <loc>), e.g. '/gslm/'."
    sm = site / "sitemap.xml"
    if sm.exists():
        m = re.search(r"<loc>\s*([^<\s]+)\s*</loc>", sm.read_text(encoding="utf-8", errors="replace"))
        if m and urlsplit(m.group(1)).path.startswith("/"):
            return posixpath.join(urlsplit(m.group(1)).path, "")
    return "/"


class _Handler(http.server.SimpleHTTPRequestHandler):
    "Serves the site under `base`; anything outside it is a 404."
    base = "/"
    protocol_version = "HTTP/1.1"                          # keep-alive: fewer connections per page
    def translate_path(self, path):
        p = urlsplit(path).path
        if not p.startswith(self.base): return str(Path(self.directory) / "__outside_the_site_path__")
        return super().translate_path("/" + p[len(self.base):])
    def log_message(self, *args): pass                     # quiet: the browser side reports failures


def serve(site: Path, base: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    "Start the server in a thread; returns it and its origin ('http://127.0.0.1:PORT/')."
    handler = type("Handler", (_Handler,), {"base": base})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"


def page_urls(site: Path) -> list[str]:
    "Every HTML file in the site as a site-relative URL ('' for the home page, 'a/b/' for a/b/index.html)."
    urls = []
    for p in site.rglob("*.html"):
        rel = p.relative_to(site).as_posix()
        urls.append(rel[: -len("index.html")] if rel == "index.html" or rel.endswith("/index.html") else rel)
    return sorted(urls, key=lambda u: (u != "", u))


def target_file(site: Path, base: str, url: str) -> Path | None:
    "The file a same-server URL points to, or None when it is outside the site."
    path = unquote(urlsplit(url).path)
    if not path.startswith(base): return None
    f = site / path[len(base):]
    return f / "index.html" if (path.endswith("/") or f.is_dir()) else f


@dataclass
class PageReport:
    rel: str
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    targets: list[str] = field(default_factory=list)   # same-server URLs found in the page


async def settle(inflight: set, timeout_s: float, quiet_s: float = 0.3) -> bool:
    """Wait until no request has been in flight for `quiet_s` (lazy loads after `load`: the search index,
    MathJax). Chromium's own networkidle event can stall in background tabs, so this counts requests."""
    end, quiet_since = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        if inflight: quiet_since = None
        elif quiet_since is None: quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s: return True
        await asyncio.sleep(0.05)
    return False


async def visit(ctx, url: str, rel: str, timeout_s: float) -> PageReport:
    "Load one page in its own tab; collect what went wrong, its element ids and its links."
    from playwright.async_api import Error as PWError
    rep, inflight = PageReport(rel), set()
    page = await ctx.new_page()
    page.on("request", lambda r: inflight.add(r))
    page.on("requestfinished", lambda r: inflight.discard(r))
    page.on("requestfailed", lambda r: inflight.discard(r))
    page.on("console", lambda m: m.type == "error" and rep.console.append(
        f"console error: {m.text} ({m.location.get('url', '')}:{m.location.get('lineNumber', '')})"))
    page.on("pageerror", lambda e: rep.console.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: rep.requests.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and rep.requests.append(f"HTTP {r.status}: {r.url}"))
    try:
        await page.goto(url, wait_until="load", timeout=timeout_s * 1000)
        if not await settle(inflight, timeout_s):
            rep.requests.append("requests still pending after %.0f s: %s" % (timeout_s, ", ".join(r.url for r in inflight)))
        facts = await page.evaluate(PAGE_FACTS_JS, LINK_SELECTOR)
        rep.ids, rep.targets = set(facts["ids"]), list(dict.fromkeys(facts["links"]))
    except PWError as e:
        rep.requests.append(f"page did not load: {str(e).splitlines()[0]}")
    finally:
        await page.close()
    return rep


async def take_screenshots(ctx, root_url: str, out: Path, names: list[str]) -> list[Path]:
    "Full-page light screenshots and a first-screen dark one of each page in `names` (keys of SCREENSHOTS)."
    out.mkdir(parents=True, exist_ok=True)
    page, shots = await ctx.new_page(), []
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        for name in names:
            await page.goto(root_url + SCREENSHOTS[name], wait_until="networkidle")
            await page.evaluate("localStorage.clear()")   # Material remembers the palette: follow the media query
            await page.reload(wait_until="networkidle")
            path = out / (f"{name}.png" if scheme == "light" else f"{name}-dark.png")
            await page.screenshot(path=str(path), full_page=scheme == "light")
            shots.append(path)
    await page.close()
    return shots


async def check(site: Path, args) -> tuple[list[PageReport], list[Path]]:
    from playwright.async_api import async_playwright
    base = site_base_path(site)
    httpd, origin = serve(site, base)
    root_url = origin + base[1:]
    pages = page_urls(site)
    profile = tempfile.mkdtemp(prefix="gslm-chromium-")      # a fresh --user-data-dir
    try:
        async with async_playwright() as pw:
            ctx = await pw.chromium.launch_persistent_context(
                profile, executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900}, service_workers="block")
            # Nothing may leave the local server: such requests are aborted (and reported as failed).
            await ctx.route(re.compile(r"^(?!" + re.escape(origin) + r")"), lambda route: route.abort("blockedbyclient"))
            sem = asyncio.Semaphore(max(1, args.tabs))

            async def one(rel):
                async with sem: return await visit(ctx, root_url + rel, rel, args.timeout)
            reports = await asyncio.gather(*(one(rel) for rel in pages))
            shots = []
            if args.screenshots:                          # after the checks, so they start from a fresh profile
                shots = await take_screenshots(ctx, root_url, args.screenshots,
                                               [n for n, u in SCREENSHOTS.items() if u in pages])
            for p in ctx.pages: await p.close()
            await ctx.close()
    finally:
        httpd.shutdown()
        shutil.rmtree(profile, ignore_errors=True)

    # internal links: the file must exist; an anchor must exist in the page it points to
    ids = {target_file(site, base, root_url + r.rel): r.ids for r in reports}
    for r in reports:
        for link in r.targets:
            if not link.startswith(origin): continue      # external links are not followed
            f, shown = target_file(site, base, link), link[len(origin) - 1:]
            if f is None or not f.is_file():
                r.links.append(f"broken link: {shown}")
            elif (frag := unquote(urlsplit(link).fragment)) and f in ids and frag not in ids[f]:
                r.links.append(f"broken anchor: {shown} (no id '{frag}' there)")
    return reports, shots


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=ROOT / "_site", help="built site (default: _site/)")
    ap.add_argument("--screenshots", type=Path, help="write PNGs of the home and gslm.models pages here")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium",
                    help="the Chromium binary (default: $CHROMIUM, else chromium on PATH)")
    ap.add_argument("--tabs", type=int, default=3, help="pages loaded at once (default 3)")
    ap.add_argument("--timeout", type=float, default=30, help="seconds allowed per page load (default 30)")
    args = ap.parse_args(argv)

    site = args.site.resolve()
    if not (site / "index.html").is_file():
        print(f"check_site: error: {site}/index.html not found: build the site first (python .ci/build_docs.py)", file=sys.stderr)
        return 1
    if not Path(args.chromium).exists():
        print(f"check_site: error: no Chromium at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 1
    if importlib.util.find_spec("playwright") is None:
        print("check_site: error: the playwright package is missing: pip install playwright "
              "(and never run `playwright install`)", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    reports, shots = asyncio.run(check(site, args))
    n = {k: sum(len(getattr(r, k)) for r in reports) for k in ("console", "requests", "links")}
    for r in reports:
        msgs = list(dict.fromkeys(r.console + r.requests + r.links))
        if msgs: print(f"check_site: /{r.rel}\n" + "".join(f"    {m}\n" for m in msgs), end="")
    if args.screenshots:
        missing = [name for name, u in SCREENSHOTS.items() if u not in {r.rel for r in reports}]
        print("check_site: screenshots: " + ", ".join(map(str, shots))
              + (f" (no page yet for {', '.join(missing)})" if missing else ""))
    print(f"check_site: {len(reports)} pages checked, {n['console']} console errors, {n['requests']} failed requests, "
          f"{n['links']} broken links ({time.perf_counter() - t0:.1f} s)")
    return 1 if any(n.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
