"""The pack in the real front end (ComfyUI's own server and its pinned front end, Chromium headless): search
aliases, every example workflow opened from the template browser and run, its text outputs shown on the nodes
by web/spell.js, no console error from the pack's JS. Screenshots: see conftest.py (SPELL_SCREENSHOTS=1)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # aliases.py

import aliases  # noqa: E402
from thumbnails import write_thumbnail  # noqa: E402

PACK = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.stem for p in (PACK / "example_workflows").glob("*.json"))
PACK_JS = "/extensions/comfyui-spell/"
READY = ("() => window.app && app.graph && app.vueAppReady && app.extensionManager"
         " && Object.keys(LiteGraph.registered_node_types).length > 50")
RUN_S = 300
IMAGES_SHOWN = """() => window.spellRun.imageNodes.every(id => {
    const imgs = app.graph.getNodeById(Number(id))?.imgs;
    return imgs?.length && imgs.every(i => i.complete && i.naturalWidth > 0); })"""
REMAKE = os.environ.get("SPELL_SCREENSHOTS") == "1"  # screenshots and template thumbnails are being remade


def test_alias_fallback_matches_the_node_classes():
    """web/search_aliases.json (read where /object_info has no search_aliases) equals the classes' SEARCH_ALIASES."""
    assert aliases.ALIASES_JSON.read_text() == aliases.render(), (
        "web/search_aliases.json is out of date: run .venv/bin/python tests/browser/aliases.py")


@pytest.fixture(scope="module")
def page(server, browser):
    """One page on the server for the module; ``page.spell_errors`` collects console errors from the pack's JS."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # the Nodes 2.0 banner
    pg = context.new_page()
    pg.spell_errors = []

    def on_console(msg):
        where = f"{msg.location.get('url', '')} {msg.text}"
        if msg.type == "error" and PACK_JS in where:
            pg.spell_errors.append(where)

    def on_error(err):
        if PACK_JS in f"{err} {getattr(err, 'stack', '')}":
            pg.spell_errors.append(str(err))

    pg.on("console", on_console)
    pg.on("pageerror", on_error)
    pg.goto(server.url)
    pg.wait_for_function(READY, timeout=90_000)
    assert pg.evaluate("() => app.extensions.some(e => e.name === 'comfyui-spell.ui')"), "web/spell.js not loaded"
    pg.evaluate("""() => {
        window.spellRun = {done: null, texts: {}, images: [], imageNodes: []};
        app.api.addEventListener('executed', e => {
            const node = e.detail?.display_node ?? e.detail?.node, output = e.detail?.output ?? {};
            if (output.text) window.spellRun.texts[node] = output.text;
            if (output.images) { window.spellRun.images.push(...output.images); window.spellRun.imageNodes.push(node); }
        });
        app.api.addEventListener('execution_success', e => { window.spellRun.done = {ok: true}; });
        app.api.addEventListener('execution_error', e => { window.spellRun.done = {ok: false, error: e.detail}; });
    }""")
    yield pg
    context.close()


SEARCH_BOXES = (  # (text field, listed display names): front end 1.32.9's node search box, then 1.49.6's
    ("input[id^='comfy-vue-node-search-box-input']", ".comfy-vue-node-search-container .option-display-name"),
    ("[role=search] input[role=combobox]", "#results-list [data-testid=result-item] .text-foreground > span.truncate"),
)


def search_box_results(page, query: str) -> list[str]:
    """Types ``query`` into the front end's node search box and returns the display names it lists."""
    page.evaluate("() => app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
    page.locator(", ".join(f for f, _ in SEARCH_BOXES)).first.wait_for(state="visible", timeout=10_000)
    field, listed = next((page.locator(f), names) for f, names in SEARCH_BOXES if page.locator(f).is_visible())
    field.fill(query)
    page.wait_for_timeout(700)  # the box debounces typing
    names = page.locator(listed).all_inner_texts()
    page.keyboard.press("Escape")
    field.wait_for(state="hidden", timeout=10_000)
    return [n.strip() for n in names]


@pytest.mark.parametrize("query", ["shield", "diversity", "repellency", "SPELL"])
def test_node_search_finds_sparse_repellency(page, query):
    """The search box lists SPELL Sparse Repellency for each of its aliases (0.3.75 sends none: web/spell.js)."""
    names = search_box_results(page, query)
    assert any("SPELL Sparse Repellency" in n for n in names[:5]), f"{query!r} listed {names[:10]}"


def open_template(page, name: str):
    """Workflow templates dialog -> the pack's section -> the card ``name``; returns the card's thumbnail size."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # front end 1.32.9's dialog, then 1.49.6's
    dialog = page.locator(".workflow-template-selector-dialog, "
                          "[role=dialog]:has([data-testid=template-workflows-content])").first
    dialog.wait_for(state="visible", timeout=20_000)
    dialog.locator("[role=button]", has_text="comfyui-spell").first.click()
    card = dialog.locator(f"[data-testid='template-workflow-{name}']")
    card.wait_for(state="visible", timeout=20_000)
    thumb = card.locator("img").first
    thumb.wait_for(state="visible", timeout=10_000)
    size = page.wait_for_function("img => img.complete && [img.naturalWidth, img.naturalHeight]",
                                  arg=thumb.element_handle(), timeout=10_000).json_value()
    card.click()
    dialog.wait_for(state="hidden", timeout=20_000)
    return size


def run_and_wait(page, name: str) -> dict:
    """Queues the open graph and waits for execution_success; returns {node id: ui text} from 'executed'."""
    page.evaluate("""() => { Object.assign(window.spellRun, {done: null, texts: {}, images: [], imageNodes: []});
        return app.queuePrompt(0, 1); }""")
    page.wait_for_function("() => window.spellRun.done", timeout=RUN_S * 1000)
    done = page.evaluate("() => window.spellRun.done")
    assert done["ok"], f"{name} failed: {done.get('error')}; node errors {page.evaluate('() => app.lastNodeErrors')}"
    return page.evaluate("() => window.spellRun.texts")


def assert_text_shown(page, name: str, texts: dict):
    """Each node that got ui text holds it in the extension's box, and that box is visible on the page."""
    for node_id, text in texts.items():
        shown = page.evaluate("""id => { const n = app.graph.getNodeById(Number(id));
            const w = n?.widgets?.find(w => w.spellText); return w ? [n.type, w.value] : null; }""", node_id)
        assert shown is not None, f"{name}: node {node_id} got text and shows none"
        node_type, value = shown
        assert value == "\n\n".join(text) and value.strip(), f"{name}: {node_type} shows {value!r}"
        page.evaluate("""id => { const n = app.graph.getNodeById(Number(id));
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [60 - n.pos[0], 60 - n.pos[1]]; app.canvas.setDirty(true, true); }""",
                      node_id)
        page.wait_for_timeout(300)
        boxes = page.locator("textarea.spell-text")
        visible = [boxes.nth(i).input_value() for i in range(boxes.count()) if boxes.nth(i).is_visible()]
        assert value in visible, f"{name}: {node_type}'s text box is not visible on the page"
    assert not page.spell_errors, page.spell_errors


SILENT_NODES = {"SpellDemoModelLoader", "SpellDemoClassPrompt"}  # the pack's nodes that send no ui text


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_from_template_browser(server, page, name, screenshot_dir):
    """Opened from the template browser, queued, finished; every text output is shown on its node."""
    jpg = PACK / "example_workflows" / f"{name}.jpg"
    thumb = open_template(page, name)
    if not REMAKE:
        assert jpg.is_file(), f"{jpg.name} missing (SPELL_SCREENSHOTS=1 makes it)"
        assert thumb == list(Image.open(jpg).size), f"the card shows no {jpg.name} ({thumb})"
    expected = {n["type"] for n in json.loads((PACK / "example_workflows" / f"{name}.json").read_text())["nodes"]}
    loaded = set(page.evaluate("() => app.graph.nodes.map(n => n.type)"))
    assert loaded == expected, f"template browser opened another graph: {sorted(loaded)}"
    scale = page.evaluate("() => app.canvas.ds.scale")
    assert scale >= 0.6, f"{name} opens at zoom {scale:.2f}, where LiteGraph draws no text"
    texts = run_and_wait(page, name)
    reporting = expected - SILENT_NODES
    assert bool(texts) == bool({t for t in reporting if t.startswith("Spell")}), (
        f"{name}: ui text from {sorted(texts)}; SPELL nodes that report: {sorted(reporting)}")
    page.wait_for_function(IMAGES_SHOWN, timeout=20_000)  # the screenshot: the graph as it opened, after its run
    page.wait_for_timeout(300)  # a few canvas frames place the DOM widgets
    page.screenshot(path=str(screenshot_dir / f"{name}.png"))
    if REMAKE:
        write_thumbnail(server.url, page.evaluate("() => window.spellRun.images"), jpg)
    assert_text_shown(page, name, texts)


def test_text_shown_with_nodes_2(page):
    """The same box in the front end's Vue node mode ("Nodes 2.0", Comfy.VueNodes.Enabled); a cached re-run."""
    name = "spell_diversity"
    open_template(page, name)
    page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
    try:
        page.wait_for_timeout(1000)
        texts = run_and_wait(page, name)
        assert texts, f"{name}: no node sent ui text"
        assert_text_shown(page, name, texts)
    finally:
        page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
