"""The example workflows, loaded into the real ComfyUI frontend in headless Chromium.

For each ``example_workflows/*.json`` a real ComfyUI server (the pack loaded, :mod:`tests.host.server`)
serves its own frontend (``comfyui_frontend_package``) to a headless Chromium driven by playwright. The
workflow is loaded through the frontend's own ``app.loadGraphData`` and must come out whole: no node type
the frontend reports missing (neither in the list it hands to extensions nor as its missing-nodes dialog),
every node of the file in the graph with its type registered and its widget values kept, the tooltips of
the pack's nodes shown by the canvas on hover, and no JavaScript error. A screenshot of the fitted graph is
the workflow's thumbnail: written next to the JSON file (``<name>.jpg``) only with
``VP2P_WRITE_THUMBNAILS=1``, otherwise into a temporary folder.

Skipped when the ``playwright`` package or a Chromium binary (``CHROMIUM_PATH``, ``/usr/bin/chromium``,
``chromium``/``chromium-browser`` on the PATH) is missing — in CI (``CI`` set) that fails instead, unless
``VP2P_SKIP_FRONTEND=1`` skips them on purpose. Playwright only drives the given binary (``executable_path``):
never run ``playwright install``, which downloads a browser. The browser only ever reaches the loopback
server: every other request is aborted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import pytest

from tests.group_summary import SKIP_FRONTEND_ENV, in_ci, skipped_on_purpose
from tests.host.animatediff import ADE_DIR, VHS_DIR, community_available
from tests.host.server import ComfyClient, comfy_server

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
PACK_PREFIX = "VP2P_"
# Templates that need AnimateDiff-Evolved and VideoHelperSuite (../shared/community) beside the pack.
COMMUNITY_PREFIX = "animatediff_"
# Where VideoHelperSuite's node documentation takes its pictures from (blocked: the page only reaches the server).
VHS_DOCS_ASSETS = "https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite/assets/"

VIEWPORT = {"width": 1024, "height": 640}
# Rendered at twice the CSS resolution, so the text of a whole fitted workflow stays readable.
DEVICE_SCALE = 2
THUMBNAIL_QUALITY = 85
THUMBNAIL_MAX_BYTES = 200_000
APP_READY_TIMEOUT_MS = 60_000
TOOLTIP_TIMEOUT_MS = 3_000
# Hidden in the thumbnail: the one control focus mode leaves over the canvas (its "Show Menu" button).
THUMBNAIL_HIDE_CSS = 'button[aria-label="Show Menu"] { visibility: hidden !important; }'
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-proxy-server"]

# Server-side user settings, stored before the page is opened (the frontend reads them at start-up):
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no new-user flow (templates browser) over the canvas
    "Comfy.Workflow.ShowMissingNodesWarning": True,  # the missing-nodes dialog is one of the checked signals
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.EnableTooltips": True,
    "LiteGraph.Node.TooltipDelay": 100,  # ms of hover before a canvas tooltip shows (default 500)
    "Comfy.VueNodes.Enabled": False,  # the classic canvas renderer, whose NodeTooltip the hover test reads
    "Comfy.Minimap.Visible": False,  # nothing over the graph in the thumbnail
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,  # no zoom controls over the canvas
    # No "where from" badge over the pack's nodes: it would show the harness's folder name for the pack.
    "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # full-detail nodes (text drawn) at any zoom
}

# -- the JavaScript run in the page -------------------------------------------------------------------

# Ready once the app is set up (``window.app`` is assigned after ``app.setup``, which registers every node
# definition from /object_info), every server node type is a registered LiteGraph type, and the start-up
# workflow has been loaded (the workflow store has an active workflow), so no start-up load races ours.
JS_APP_READY = """(types) => {
  const app = window.app, LG = window.LiteGraph;
  if (!app || !app.canvas || !app.graph || !LG || !LG.registered_node_types) return false;
  if (!app.extensionManager?.workflow?.activeWorkflow) return false;
  return types.every((t) => t in LG.registered_node_types);
}"""

# The frontend hands the node types it could not resolve to the ``afterConfigureGraph`` extension hook
# (``ComfyApp.loadGraphData``); a probe extension records them for every load.
JS_INSTALL_PROBE = """() => {
  if (window.__vp2pProbe) return;
  window.__vp2pProbe = {loads: []};
  window.app.registerExtension({
    name: "VP2P.tests.missingNodesProbe",
    afterConfigureGraph(missing) {
      window.__vp2pProbe.loads.push((missing || []).map((m) => (typeof m === "string" ? m : m.type)));
    },
  });
}"""

JS_LOAD = """async ([workflow, name]) => {
  const before = window.__vp2pProbe.loads.length;
  await window.app.loadGraphData(workflow, true, true, name);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return window.__vp2pProbe.loads.slice(before);
}"""

# Open dialogs: the keys in the frontend's "dialog" pinia store (the missing-nodes dialog is
# "global-missing-nodes", dialogService ``showLoadWorkflowWarning``; null if the store is unreachable) and
# the text of the dialogs in the page.
JS_DIALOGS = """() => {
  const store = window.app.extensionManager._p?._s?.get("dialog");
  return {
    keys: store ? store.dialogStack.map((d) => d.key) : null,
    text: Array.from(document.querySelectorAll('[role="dialog"]')).map((d) => d.innerText).join("\\n"),
  };
}"""

JS_GRAPH = """() => {
  const LG = window.LiteGraph;
  return window.app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, registered: n.type in LG.registered_node_types,
    comfyClass: n.comfyClass ?? null, hasErrors: !!n.has_errors,
    widgets: (n.widgets || []).map((w) => ({name: w.name, type: w.type, value: w.value,
                                            options: w.options?.values ?? null})),
    inputs: (n.inputs || []).map((i) => i.name),
    definition: n.constructor?.nodeData ? {
      inputs: Object.fromEntries(Object.entries(n.constructor.nodeData.inputs || {})
        .map(([k, v]) => [k, v.tooltip ?? null])),
      outputs: (n.constructor.nodeData.outputs || []).map((o) => o.tooltip ?? null),
      description: n.constructor.nodeData.description ?? "",
    } : null,
  }));
}"""

# The loaded graph saved back by the frontend: each node's widget values, and the links.
JS_SERIALIZED = """() => {
  const data = window.app.graph.serialize();
  return {widgets: Object.fromEntries(data.nodes.map((n) => [String(n.id), n.widgets_values ?? null])),
          links: data.links.map((l) => (Array.isArray(l) ? l
            : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]))};
}"""

# Focus mode hides the menus and panels (nothing of the UI over the canvas), for hovering and the thumbnail.
JS_FOCUS_MODE = """async () => {
  const em = window.app.extensionManager;
  if (!em.focusMode) await em.command.execute("Workspace.ToggleFocusMode");
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return em.focusMode;
}"""

# Page coordinates of the places of a node that show a tooltip on hover (title, input slots that are
# not widgets, output slots, widgets), from the canvas's own slot and widget geometry, with the node
# centred at scale 1. ``free`` says whether the canvas itself is the element at that point.
JS_HOVER_TARGETS = """async (id) => {
  const app = window.app, LG = window.LiteGraph, node = app.graph.getNodeById(id);
  app.canvas.ds.scale = 1;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const rect = app.canvas.canvas.getBoundingClientRect();
  const page = (p) => {
    const o = app.canvas.ds.convertOffsetToCanvas(p);  // graph -> canvas element coordinates
    return [rect.left + o[0], rect.top + o[1]];
  };
  const targets = [{kind: "title", name: "", at: page([node.pos[0] + node.size[0] / 2, node.pos[1] - LG.NODE_TITLE_HEIGHT / 2])}];
  const linkedWidgets = new Set();
  (node.inputs || []).forEach((inp, i) => {
    // a widget converted to a linked socket is hovered at its socket (its widget is not drawn)
    if (inp.widget && inp.link != null) linkedWidgets.add(inp.widget.name);
    if (!inp.widget || inp.link != null) targets.push({kind: "input", name: inp.widget?.name ?? inp.name, at: page(node.getInputPos(i))});
  });
  (node.outputs || []).forEach((out, i) => targets.push({kind: "output", name: String(i), at: page(node.getOutputPos(i))}));
  // frontend-only view widgets (serialize false, e.g. the token view) are no inputs and carry no input tooltip
  (node.widgets || []).filter((w) => !linkedWidgets.has(w.name) && w.serialize !== false).forEach((w) => {
    const h = w.computedHeight ?? LG.NODE_WIDGET_HEIGHT;
    targets.push({kind: "widget", name: w.name, at: page([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2])});
  });
  for (const t of targets) t.free = document.elementFromPoint(t.at[0], t.at[1]) === app.canvas.canvas;
  return targets;
}"""

JS_TOOLTIP_IS = """(text) => {
  const el = document.querySelector(".node-tooltip");
  return !!el && el.textContent.trim() === text;
}"""
# Each node's rectangle on the canvas as drawn (title bar included): [id, x, y, w, h].
JS_NODE_RECTS = """() => window.app.graph.nodes.map((n) => [n.id, ...Array.from(n.boundingRect)])"""
JS_TOOLTIP_TEXT = """() => document.querySelector(".node-tooltip")?.textContent.trim() ?? null"""

# The view fitted to the nodes with the canvas's own DragAndScale.fitToBounds (as the frontend's "fit view"
# command does, with a smaller margin). VideoHelperSuite draws its widgets' text only above the canvas's
# ``low_quality_zoom_threshold`` (0.5 when the canvas has none), whatever LiteGraph.Canvas.MinFontSizeForLOD says:
# 0, so that its widgets show their values at the fitted scale as every other node's do.
JS_FIT_VIEW = """async () => {
  const app = window.app;
  app.canvas.deselectAll?.();
  app.canvas.low_quality_zoom_threshold = 0;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph.nodes) {
    const [x, y, w, h] = n.boundingRect;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.94});
  app.canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  return app.canvas.ds.scale;
}"""


# -- environment -------------------------------------------------------------------------------------

def chromium_path() -> Optional[str]:
    """The Chromium binary to drive: ``CHROMIUM_PATH``, ``/usr/bin/chromium`` or one on the PATH."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if Path(env).is_file() and os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def write_thumbnails() -> bool:
    return os.environ.get("VP2P_WRITE_THUMBNAILS") == "1"


def _post_settings(client: ComfyClient, settings: dict) -> None:
    """Store user settings on the server (``POST /settings``; it answers with an empty body)."""
    req = urllib.request.Request(client.base_url + "/settings", data=json.dumps(settings).encode("utf-8"),
                                 method="POST", headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    with opener.open(req, timeout=30) as resp:
        assert resp.status == 200, f"POST /settings answered {resp.status}"
    stored = client.get("/settings")
    assert all(stored.get(k) == v for k, v in settings.items()), f"settings not stored: {stored}"


def _unavailable(reason: str) -> NoReturn:
    """Skip for want of a browser; in CI fail instead, unless VP2P_SKIP_FRONTEND=1 asked for the skip."""
    if in_ci():
        pytest.fail(f"{reason}; in CI the frontend tests must run (set {SKIP_FRONTEND_ENV}=1 to skip them on purpose)",
                    pytrace=False)
    pytest.skip(reason)


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright, sync API); skips without playwright or a Chromium binary."""
    if skipped_on_purpose(SKIP_FRONTEND_ENV):
        pytest.skip(f"skipped on purpose ({SKIP_FRONTEND_ENV}=1)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the python 'playwright' package is not installed (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        _unavailable(f"CHROMIUM_PATH={os.environ['CHROMIUM_PATH']} is not an executable file" if os.environ.get("CHROMIUM_PATH")
                     else "no Chromium binary (set CHROMIUM_PATH or install /usr/bin/chromium: apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def frontend_server(comfy_path, chromium, tmp_path_factory) -> Iterator[ComfyClient]:
    """A ComfyUI server for the frontend: the pack loaded, no models (only node definitions matter here), and
    AnimateDiff-Evolved and VideoHelperSuite beside it when their snapshots are there (the animatediff_* templates
    use their nodes, and their frontend extensions are loaded with every template)."""
    models = tmp_path_factory.mktemp("frontend_models")
    extra = (ADE_DIR, VHS_DIR) if community_available() else ()
    with comfy_server(comfy_path, ROOT, models, tmp_path_factory.mktemp("frontend_output"), extra_custom_nodes=extra) as client:
        _post_settings(client, FRONTEND_SETTINGS)
        yield client


class FrontendPage:
    """One browser page on the server's frontend, recording page errors, console errors and requests."""

    def __init__(self, browser: Any, client: ComfyClient) -> None:
        self.client = client
        self.context = browser.new_context(viewport=VIEWPORT, device_scale_factor=DEVICE_SCALE)
        self.page = self.context.new_page()
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.console_warnings: list[str] = []
        self.http_errors: list[str] = []
        self.blocked: list[str] = []
        self.page.on("pageerror", lambda e: self.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))
        self.page.on("console", self._on_console)
        self.page.on("response", lambda r: r.status >= 400 and self.http_errors.append(f"{r.status} {r.url}"))
        self.page.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        if route.request.url.startswith(self.client.base_url + "/"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def _on_console(self, msg: Any) -> None:
        where = (msg.location or {}).get("url", "")
        if msg.type == "error":
            self.console_errors.append(f"{msg.text} ({where})")
        elif msg.type == "warning":
            self.console_warnings.append(f"{msg.text} ({where})")

    def open(self, node_types: list[str]) -> None:
        self.page.goto(self.client.base_url + "/", wait_until="load")
        self.page.wait_for_function(JS_APP_READY, arg=node_types, timeout=APP_READY_TIMEOUT_MS, polling=100)
        self.page.evaluate(JS_INSTALL_PROBE)

    def unexpected_console_errors(self) -> list[str]:
        """Console errors other than failed resource loads (a fresh user folder has no user.css,
        workflows folder or templates file; the browser logs each 404 as an error), the missing-models
        dialog's size look-up of a template's model URL and the pictures of VideoHelperSuite's node
        documentation (no network here: the page may only reach the server, its Content Security Policy
        blocks the rest)."""
        offline = ("violates the following Content Security Policy", "Refused to connect because it violates",
                   "Error fetching file size: TypeError: Failed to fetch")
        return [e for e in self.console_errors
                if not e.startswith("Failed to load resource")
                and not (any(o in e for o in offline) and (self._model_url_or_dialog(e) or self._community_docs_asset(e)))]

    @staticmethod
    def _model_url_or_dialog(error: str) -> bool:
        return "MissingModelsWarning" in error and ("huggingface.co/" in error or "fetchFileSize" in error)

    @staticmethod
    def _community_docs_asset(error: str) -> bool:
        return error.startswith(("Loading the image ", "Loading media from ")) and VHS_DOCS_ASSETS in error

    def report(self) -> str:
        return (f"page errors: {self.page_errors}\nconsole errors: {self.console_errors}\n"
                f"console warnings: {self.console_warnings}\nHTTP errors: {self.http_errors}\n"
                f"blocked requests: {self.blocked}\nserver log tail:\n{self.client.log_tail(3000)}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def frontend(chromium, frontend_server) -> Iterator[FrontendPage]:
    fp = FrontendPage(chromium, frontend_server)
    try:
        fp.open(sorted(frontend_server.object_info()))
        yield fp
    finally:
        fp.close()


# -- checks ------------------------------------------------------------------------------------------

def _input_tooltips(info: dict) -> dict[str, Optional[str]]:
    """Every input of a node definition from /object_info, with its tooltip (None without one)."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out[name] = opts.get("tooltip")
    return out


def _expected_tooltip(info: dict, kind: str, name: str) -> Optional[str]:
    if kind == "title":
        return info.get("description") or None
    if kind == "output":
        tips = info.get("output_tooltips") or []
        return tips[int(name)] if int(name) < len(tips) else None
    return _input_tooltips(info).get(name)


def _hover_tooltips(fp: FrontendPage, node_id: int, info: dict) -> tuple[set[tuple[str, str]], list[str]]:
    """Hover every tooltip place of a node; returns the (kind, name) places whose tooltip showed, and problems."""
    page = fp.page
    problems, shown_ok = [], set()
    for target in page.evaluate(JS_HOVER_TARGETS, node_id):
        kind, name = target["kind"], target["name"]
        expected = _expected_tooltip(info, kind, name)
        if not expected:
            problems.append(f"node {node_id}: no tooltip defined for {kind} {name!r}")
            continue
        x, y = target["at"]
        if not target["free"]:
            problems.append(f"node {node_id}: {kind} {name!r} at ({x:.0f}, {y:.0f}) is not on the visible canvas")
            continue
        page.mouse.move(5, VIEWPORT["height"] - 5)
        page.mouse.move(x, y, steps=3)
        try:
            page.wait_for_function(JS_TOOLTIP_IS, arg=expected.strip(), timeout=TOOLTIP_TIMEOUT_MS, polling=50)
            shown_ok.add((kind, name))
        except Exception:  # playwright's TimeoutError
            shown = page.evaluate(JS_TOOLTIP_TEXT)
            problems.append(f"node {node_id} {kind} {name!r} at ({x:.0f}, {y:.0f}): "
                            f"tooltip shown {shown!r}, expected {expected!r}")
    page.mouse.move(5, VIEWPORT["height"] - 5)
    return shown_ok, problems


def _save_thumbnail(png: bytes, path: Path) -> tuple[int, int]:
    """The screenshot as a JPEG at ``path``; returns its size in pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.save(path, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True, progressive=True)
    return rgb.size


def _image_spread(path: Path) -> float:
    """Standard deviation of the grey levels: near 0 for a blank (or loading) screen."""
    from PIL import Image, ImageStat

    with Image.open(path) as im:
        return ImageStat.Stat(im.convert("L")).stddev[0]


# -- tests -------------------------------------------------------------------------------------------

def test_example_workflows_exist():
    assert WORKFLOWS, "no example_workflows/*.json"


@pytest.mark.parametrize("workflow_path", [pytest.param(p, id=p.stem) for p in WORKFLOWS])
def test_example_workflow_in_frontend(workflow_path: Path, frontend: FrontendPage, tmp_path: Path):
    if workflow_path.stem.startswith(COMMUNITY_PREFIX) and not community_available():
        pytest.skip("no ../shared/community (AnimateDiff-Evolved, VideoHelperSuite) for this template")
    client, page = frontend.client, frontend.page
    object_info = client.object_info()
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    file_nodes = {str(n["id"]): n for n in workflow["nodes"]}

    # 1. Load through the frontend's own API; the missing types it reports to extensions must be none.
    loads = page.evaluate(JS_LOAD, [workflow, workflow_path.stem])
    assert len(loads) == 1, f"afterConfigureGraph ran {len(loads)} times for one load\n{frontend.report()}"
    assert loads[0] == [], f"the frontend reports missing node types {loads[0]}\n{frontend.report()}"

    # 1b. The checkpoint (and ControlNet) the template expects: this server has no models, so the frontend offers each
    # one for download from its ``properties.models`` (name, URL, folder); then the dialog is closed for the checks below.
    models = [m for n in workflow["nodes"] for m in (n.get("properties") or {}).get("models", [])]
    assert models and all(m.get("url", "").startswith("https://") and m.get("directory") for m in models), \
        "the template does not say which models it expects (properties.models with name, url, directory)"
    page.wait_for_function(f"() => {{ const d = ({JS_DIALOGS})(); return d.keys.includes('global-missing-models-warning'); }}",
                           timeout=10_000)
    offered = page.evaluate(JS_DIALOGS)["text"]
    assert all(m["name"] in offered for m in models), f"the missing-models dialog does not offer {models}: {offered}"
    page.evaluate("""() => window.app.extensionManager._p._s.get("dialog").closeDialog({ key: "global-missing-models-warning" })""")
    page.wait_for_function(f"() => ({JS_DIALOGS})().keys.length === 0", timeout=10_000)

    # 2. Every node of the file is in the graph with its registered type and its widget values.
    graph = {str(n["id"]): n for n in page.evaluate(JS_GRAPH)}
    assert set(graph) == set(file_nodes), f"graph nodes {sorted(graph)} != file nodes {sorted(file_nodes)}"
    for nid, fnode in file_nodes.items():
        gnode = graph[nid]
        assert gnode["type"] == fnode["type"] and gnode["registered"], f"node {nid}: {gnode['type']} not registered"
        assert not gnode["hasErrors"], f"node {nid} ({fnode['type']}) is flagged with errors"
        if fnode["type"] in object_info:
            assert gnode["comfyClass"] == fnode["type"] and gnode["definition"] is not None, \
                f"node {nid} ({fnode['type']}) was not built from its node definition"
    saved = page.evaluate(JS_SERIALIZED)
    for nid, fnode in file_nodes.items():
        if "widgets_values" in fnode:
            assert saved["widgets"][nid] == fnode["widgets_values"], \
                f"node {nid} ({fnode['type']}): the frontend changed the widget values " \
                f"{fnode['widgets_values']} -> {saved['widgets'][nid]}"
    # No link dropped or rewired (the frontend drops a link whose slot no longer exists).
    assert sorted(map(tuple, saved["links"])) == sorted(map(tuple, workflow["links"])), \
        f"links changed on load: {saved['links']} (file: {workflow['links']})"
    # No node covers another as the frontend draws them (title bar included): a node that grew when an input was
    # added must not hide the one below it, and hovering must reach each node's own slots and widgets.
    rects = page.evaluate(JS_NODE_RECTS)
    covered = [(a[0], b[0]) for i, a in enumerate(rects) for b in rects[i + 1:]
               if min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1]) and min(a[2] + a[4], b[2] + b[4]) > max(a[2], b[2])]
    assert not covered, f"nodes overlap on the canvas (id pairs): {covered}; rects [id, x, y, w, h]: {rects}"

    # 3. Our nodes: the frontend's definitions carry a tooltip for every input and output, the combo values
    #    are valid options, and the canvas shows each tooltip on hover.
    ours = [nid for nid, n in file_nodes.items() if n["type"].startswith(PACK_PREFIX)]
    assert ours, "the workflow uses no node of the pack"
    assert page.evaluate(JS_FOCUS_MODE), "focus mode did not turn on"
    problems = []
    for nid in ours:
        gnode, info = graph[nid], object_info[file_nodes[nid]["type"]]
        server_tips = _input_tooltips(info)
        assert server_tips and all(server_tips.values()), f"{info['name']}: inputs without a tooltip: {server_tips}"
        assert gnode["definition"]["inputs"] == server_tips, \
            f"{info['name']}: frontend input tooltips {gnode['definition']['inputs']} != /object_info {server_tips}"
        outputs = gnode["definition"]["outputs"]
        assert all(outputs) and (outputs or info.get("output_node")), f"{info['name']}: outputs without a tooltip: {outputs}"
        for w in gnode["widgets"]:
            if w["type"] == "combo":
                assert w["value"] in (w["options"] or []), f"node {nid}: {w['name']}={w['value']!r} not in {w['options']}"
        shown_ok, p = _hover_tooltips(frontend, int(nid), info)
        problems += p
        # Every input showed its tooltip, as a slot (linked types) or as a widget.
        hovered_inputs = {name for kind, name in shown_ok if kind in ("input", "widget")}
        missed = sorted(set(server_tips) - hovered_inputs)
        if missed:
            problems.append(f"node {nid} ({info['name']}): no tooltip shown for the inputs {missed}")
        if ("title", "") not in shown_ok or not all(("output", str(i)) in shown_ok for i in range(len(info["output"]))):
            problems.append(f"node {nid} ({info['name']}): description or output tooltips not all shown: {sorted(shown_ok)}")
    assert not problems, "tooltips:\n" + "\n".join(problems)

    # 4. The thumbnail: the graph fitted into the canvas, without menus.
    scale = page.evaluate(JS_FIT_VIEW)
    assert 0.1 < scale <= 1.5, f"fitted scale {scale}"
    page.mouse.move(5, VIEWPORT["height"] - 5)
    png = page.locator("#graph-canvas").screenshot(type="png", style=THUMBNAIL_HIDE_CSS, animations="disabled")
    out = workflow_path.with_suffix(".jpg") if write_thumbnails() else tmp_path / f"{workflow_path.stem}.jpg"
    size = _save_thumbnail(png, out)
    assert size == (VIEWPORT["width"] * DEVICE_SCALE, VIEWPORT["height"] * DEVICE_SCALE), size
    assert 0 < out.stat().st_size <= THUMBNAIL_MAX_BYTES, f"{out}: {out.stat().st_size} bytes"
    assert _image_spread(out) > 8.0, f"{out} looks blank"

    # 5. Nothing reported since: no missing-nodes (or any) dialog, no JavaScript errors.
    dialogs = page.evaluate(JS_DIALOGS)
    assert dialogs["keys"] is not None, "the frontend's dialog store was not found"
    assert "global-missing-nodes" not in dialogs["keys"], dialogs["text"]
    assert not dialogs["keys"], f"dialogs open after loading: {dialogs}"
    assert not frontend.page_errors, frontend.report()
    assert not frontend.unexpected_console_errors(), frontend.report()


def test_frontend_reports_a_missing_node(frontend: FrontendPage):
    """The signals above work: an unknown type is reported to extensions and in the missing-nodes dialog."""
    plain = next(p for p in WORKFLOWS if not p.stem.startswith(COMMUNITY_PREFIX))  # no node of other packs
    workflow = json.loads(plain.read_text(encoding="utf-8"))
    ghost = {"id": workflow["last_node_id"] + 1, "type": "VP2P_NoSuchNode", "pos": [0, -200], "size": [200, 60],
             "flags": {}, "order": len(workflow["nodes"]), "mode": 0, "inputs": [], "outputs": [], "properties": {},
             "widgets_values": []}
    workflow["nodes"] = workflow["nodes"] + [ghost]
    workflow["last_node_id"] = ghost["id"]
    loads = frontend.page.evaluate(JS_LOAD, [workflow, "missing_node_probe"])
    assert loads == [["VP2P_NoSuchNode"]], loads
    frontend.page.wait_for_function(f"() => {{ const d = ({JS_DIALOGS})(); "
                                    "return d.keys.includes('global-missing-nodes') && d.text.includes('VP2P_NoSuchNode'); }",
                                    timeout=10_000)
    assert not frontend.page_errors, frontend.report()


def test_pack_node_definitions_in_frontend(frontend: FrontendPage):
    """Every node of the pack is registered in the frontend with a description and a tooltip for every
    input and output, the same as /object_info gives."""
    object_info = frontend.client.object_info()
    ours = sorted(t for t in object_info if t.startswith(PACK_PREFIX))
    assert ours, "the server did not load the pack:\n" + frontend.client.log_tail()
    defs = frontend.page.evaluate("""(types) => Object.fromEntries(types.map((t) => {
      const d = window.LiteGraph.registered_node_types[t]?.nodeData;
      return [t, d ? {description: d.description ?? "", category: d.category ?? "",
                      inputs: Object.fromEntries(Object.entries(d.inputs || {}).map(([k, v]) => [k, v.tooltip ?? null])),
                      outputs: (d.outputs || []).map((o) => o.tooltip ?? null)} : null];
    }))""", ours)
    problems = []
    for t in ours:
        info, d = object_info[t], defs[t]
        if d is None:
            problems.append(f"{t}: not registered with a node definition")
            continue
        if not d["description"] or d["description"] != info.get("description"):
            problems.append(f"{t}: description {d['description']!r}")
        server_tips = _input_tooltips(info)
        if not all(server_tips.values()) or d["inputs"] != server_tips:
            problems.append(f"{t}: input tooltips {d['inputs']} (server: {server_tips})")
        if len(d["outputs"]) != len(info["output"]) or not all(d["outputs"]):
            problems.append(f"{t}: output tooltips {d['outputs']}")
    assert not problems, "\n".join(problems)
    assert not frontend.page_errors, frontend.report()


JS_TOKEN_VIEW = """async ([id, changes]) => {
  const node = window.app.graph.getNodeById(id);
  for (const [name, value] of Object.entries(changes)) {
    const w = node.widgets.find((w) => w.name === name);
    w.value = value;
    w.callback?.(value);
  }
  const el = node.vp2pElement;
  const deadline = Date.now() + 10000;
  const want = JSON.stringify(changes);
  while (Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 100));
    if (node.vp2pView && el.innerHTML && node.__vp2pSeen !== el.innerHTML) break;
  }
  node.__vp2pSeen = el.innerHTML;
  return {html: el.innerHTML, view: node.vp2pView, request: node.vp2pRequest,
          statuses: (node.vp2pView?.target || []).map((v) => [v.word, v.status]),
          shown: Array.from(el.querySelectorAll("span[data-status]")).map((s) => s.dataset.status).filter(Boolean),
          warnings: Array.from(el.querySelectorAll(".vp2p-warning")).map((w) => w.textContent)};
}"""


def test_controller_token_view(frontend: FrontendPage):
    """The live token view: tokens and word status under the controller (the source prompt followed
    through its link), and warnings when replace cannot apply or a blend word is missing."""
    workflow = json.loads((ROOT / "example_workflows" / "video_p2p_edit.json").read_text(encoding="utf-8"))
    page = frontend.page
    page.evaluate(JS_LOAD, [workflow, "token_view"])
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "VP2P_P2PController")
    first = page.evaluate(JS_TOKEN_VIEW, [node_id, {}])
    assert first["view"] and first["view"]["kind"] == "replace" and not first["warnings"], first
    assert ["robot", "swapped"] in first["statuses"] and ["beach", "kept"] in first["statuses"]
    assert "swapped" in first["shown"] and "robot" in first["html"]  # drawn under the node
    assert first["view"]["token_count"]["limit"] == 75
    second = page.evaluate(JS_TOKEN_VIEW, [node_id, {"edit": "replace", "target_prompt": "a tall robot is running on the beach",
                                                     "blend_target_words": "dog"}])
    text = " ".join(second["warnings"])
    assert "edit=refine" in text and "'dog' is not a word of the target prompt" in text, second
    third = page.evaluate(JS_TOKEN_VIEW, [node_id, {"edit": "auto", "blend_target_words": "robot"}])
    assert third["view"]["kind"] == "refine" and not third["warnings"] and ["tall", "added"] in third["statuses"], third
    # the connected CLIP's loader is sent; this server has no checkpoint, so SD1.x is assumed and the view says so
    loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert third["request"]["clip"] == {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": loader["widgets_values"][0]}}
    assert third["view"]["tokenizer"] == "SD1.x CLIP-L" and "assumed" in third["view"]["notes"][0]
    weighted = page.evaluate(JS_TOKEN_VIEW, [node_id, {"target_prompt": "a tall (robot:1.3) is running on the beach"}])
    robot = next(v for v in weighted["view"]["target"] if v["word"] == "robot")
    assert robot["weight"] == 1.3 and "(1.3)" in weighted["html"] and not weighted["warnings"], weighted
    assert page.evaluate("() => String(window.app.queuePrompt).includes('P2P Controller')") is False  # queueing is not wrapped
    assert not frontend.page_errors, frontend.report()


def test_fatezero_controller_token_view(frontend: FrontendPage):
    """The FateZero Controller has the view too: its blend_words are source words, latent_blend_target_words target words."""
    workflow = json.loads((ROOT / "example_workflows" / "fatezero_shape_edit.json").read_text(encoding="utf-8"))
    page = frontend.page
    page.evaluate(JS_LOAD, [workflow, "token_view_fatezero"])
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "VP2P_FateZeroController")
    first = page.evaluate(JS_TOKEN_VIEW, [node_id, {}])
    assert first["view"] and first["view"]["kind"] and not first["warnings"], first
    assert first["request"]["clip"]["class_type"] == "CheckpointLoaderSimple" and "blend_source_words" in first["request"]
    second = page.evaluate(JS_TOKEN_VIEW, [node_id, {"blend_words": "zebra", "latent_blend_target_words": "zebra"}])
    text = " ".join(second["warnings"])
    assert "'zebra' is not a word of the source prompt" in text and "'zebra' is not a word of the target prompt" in text, second
    assert not frontend.page_errors, frontend.report()


# What users type into the node search box, and the node each must find (by its search aliases, not its name).
SEARCHES = {
    "null text": "Shared Null-Text Invert",
    "prompt to prompt": "P2P Controller",
    "fatezero": "FateZero Controller",
    "text-to-set": "Inflate to T2S",
    "tune-a-video": "Tune on Video",
    "frame stride": "Select Frames (start, stride, cap)",
}


def test_node_search_box_finds_the_pack_by_its_aliases(frontend: FrontendPage):
    """The frontend's own node search box (double-click on the canvas) lists each pack node for what users search."""
    page = frontend.page
    page.evaluate("() => { window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true); }")  # an empty canvas
    box = page.locator("#graph-canvas").bounding_box()
    page.mouse.dblclick(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    search = page.locator(".comfy-vue-node-search-container input").first
    search.wait_for(state="visible", timeout=10_000)
    for query, display_name in SEARCHES.items():
        search.fill(query)
        try:  # the result list follows the input after a debounce
            page.wait_for_function("([name]) => Array.from(document.querySelectorAll('.option-display-name'))"
                                   ".slice(0, 10).some((o) => o.innerText.includes(name))", arg=[display_name], timeout=5_000)
        except Exception:
            pass
        names = [t.strip() for t in page.locator(".option-display-name").all_inner_texts()][:10]
        assert any(display_name in n for n in names), f"{query!r}: the search box lists {names}"
    page.keyboard.press("Escape")
    assert not frontend.page_errors, frontend.report()
