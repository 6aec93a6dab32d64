// SPELL web extension (loaded through WEB_DIRECTORY in the pack's __init__.py).
// 1. Text outputs: any node of this pack that returns {"ui": {"text": [...]}} shows that text on the node after a
//    run, in a read-only box (not saved in the workflow, not sent with the prompt).
// 2. Search aliases: front ends that do not index a node definition's `search_aliases` (1.32.9, ComfyUI 0.3.75)
//    also find the pack's nodes by them. Newer front ends (1.49.6) index `search_aliases` themselves; there the
//    extension only fills the field when the server did not send it (ComfyUI 0.3.75 sends no SEARCH_ALIASES).
import { app } from "../../scripts/app.js";

const TEXT_WIDGET = "text";
const MARK = "spellText";
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2)[0]);
const ALIASES_URL = new URL("./search_aliases.json", import.meta.url);

function isPackNode(nodeData) {
  return nodeData?.python_module === `custom_nodes.${PACK_FOLDER}` || /^SPELL(\/|$)/.test(nodeData?.category ?? "");
}

function textBox(node) {
  const found = node.widgets?.find((w) => w[MARK]);
  if (found) return found;
  const el = document.createElement("textarea");
  el.className = "comfy-multiline-input spell-text";
  el.readOnly = true;
  el.spellcheck = false;
  el.style.fontFamily = "monospace";
  el.style.fontSize = "11px";
  el.style.whiteSpace = "pre";
  el.style.overflow = "auto";
  const widget = node.addDOMWidget(TEXT_WIDGET, "spell_text", el, {
    serialize: false,
    getValue: () => el.value,
    setValue: (v) => { el.value = v; },
    getMinHeight: () => 80,
  });
  widget.serialize = false;
  widget[MARK] = true;
  return widget;
}

// The box takes the node's free height (a workflow sizes the node for its text); a node too small for a few
// lines grows, and the box scrolls.
function showText(node, texts) {
  const widget = textBox(node);
  widget.value = texts.join("\n\n");
  const [w, h] = node.computeSize();
  if (node.size[0] < w || node.size[1] < h) node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

async function fallbackAliases() {
  try {
    const response = await fetch(ALIASES_URL);
    return response.ok ? await response.json() : {};
  } catch {
    return {};
  }
}

function aliasMatch(def, query) {
  const aliases = def?.search_aliases;
  if (!Array.isArray(aliases) || !aliases.length) return false;
  const words = query.toLowerCase().split(/\s+/).filter((w) => w.length > 1);
  const haystack = aliases.map((a) => a.toLowerCase());
  const name = `${def.display_name ?? ""} ${def.name ?? ""}`.toLowerCase();
  return words.length > 0 && words.some((w) => haystack.some((a) => a.includes(w)))
    && words.every((w) => name.includes(w) || haystack.some((a) => a.includes(w)));
}

// The node search of front end 1.32.9 is a FuseSearch over ["name", "display_name"] held by the nodeDef store;
// its results get the definitions whose aliases match put first. Left alone where `search_aliases` is indexed.
function patchNodeSearch() {
  const pinia = document.getElementById("vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
  const fuseSearch = pinia?._s?.get("nodeDef")?.nodeSearchService?.nodeFuseSearch;
  if (!fuseSearch?.keys || fuseSearch.keys.includes("search_aliases")) return;
  const proto = Object.getPrototypeOf(fuseSearch);
  if (proto.search[MARK]) return;
  const search = proto.search;
  proto.search = function (query, ...rest) {
    const found = search.call(this, query, ...rest);
    if (!query || !this.keys?.includes?.("display_name") || this.keys.includes("search_aliases")) return found;
    const extra = this.data.filter((def) => aliasMatch(def, query) && !found.includes(def));
    return extra.length ? [...extra, ...found] : found;
  };
  proto.search[MARK] = true;
}

app.registerExtension({
  name: "comfyui-spell.ui",
  async addCustomNodeDefs(defs) {
    const fallback = await fallbackAliases();
    for (const [id, def] of Object.entries(defs)) {
      if (isPackNode(def) && !def.search_aliases?.length && fallback[id]) def.search_aliases = fallback[id];
    }
  },
  async setup() {
    patchNodeSearch();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showText(this, Array.isArray(text) ? text.map(String) : [String(text)]);
    };
  },
});
