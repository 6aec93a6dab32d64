"""Runs ComfyUI graphs headless through ComfyUI's own ``execution.PromptExecutor`` and converts
workflows between the UI format (what ``example_workflows/`` and the browser save) and the API format
(what the executor and ``POST /prompt`` take)."""
from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
from dataclasses import dataclass, field

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
_prompt_ids = itertools.count()


class HeadlessServer:
    """What PromptExecutor reports to: the messages are kept instead of sent over a websocket."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class Result:
    success: bool
    outputs: dict = field(default_factory=dict)  # node id -> tuple of the node's outputs
    ui: dict = field(default_factory=dict)  # node id -> UI data (text, images)
    error: str = ""
    executed: list = field(default_factory=list)  # node ids that ran (not from cache)


class Executor:
    """One ComfyUI executor with its caches, like one running ComfyUI server."""

    def __init__(self):
        import execution

        self.server = HeadlessServer()
        # The keys ComfyUI's main.py passes; older executors ignore the ones they do not read
        # ("ram_inactive" is read unconditionally since ComfyUI 0.23).
        self.executor = execution.PromptExecutor(self.server, cache_type=False,
                                                 cache_args={"ram": 0.0, "ram_inactive": 0.0, "lru": 0})

    def run(self, prompt: dict) -> Result:
        """One queue press. The executor gets its own copy of ``prompt``, as each ``POST /prompt`` brings one:
        ComfyUI writes IS_CHANGED results into the prompt's node dicts, and a reused dict would freeze them."""
        import execution

        prompt = copy.deepcopy(prompt)
        prompt_id = f"spell-{next(_prompt_ids)}"
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return Result(False, error=f"{error.get('message')}: {error.get('details')} {node_errors}")
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, {"client_id": "headless"}, outputs)
        result = Result(self.executor.success)
        for event, data in self.server.messages:
            if event == "execution_error":
                result.error = f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
            if event == "executing" and data.get("node") is not None:
                result.executed.append(data["node"])
        for node_id in prompt:
            entry = cached_output(self.executor.caches.outputs, node_id)
            if entry is not None:
                result.outputs[node_id] = tuple(o[0] if len(o) == 1 else o for o in entry.outputs)
        result.ui = dict(self.executor.history_result.get("outputs", {}))
        return result


def cached_output(cache, node_id):
    """The output cache's entry for a node; ``get`` is a coroutine in newer ComfyUI (0.18+), plain before."""
    entry = cache.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return entry


def widget_inputs(node_class) -> list[tuple[str, object]]:
    """(name, spec) of the inputs that are widgets in the UI, in the order of widgets_values."""
    types = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind = spec[0]
            if isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES:
                out.append((name, spec))
    return out


def has_control_widget(name: str, spec) -> bool:
    """INT widgets with a 'control after generate' companion value in widgets_values."""
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """UI-format workflow -> API-format prompt, using the node classes' INPUT_TYPES for widget order.

    Muted nodes (mode 2) are dropped; bypassed nodes (mode 4) are refused (no pass-through here).
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) == 2 or node["type"] in ("Note", "MarkdownNote"):
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed; remove or enable it")
        if node["type"] not in node_classes:
            raise KeyError(f"node type {node['type']!r} (node {node['id']}) is not installed")
        cls = node_classes[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values", []))
        for name, spec in widget_inputs(cls):
            if not values:
                break
            inputs[name] = values.pop(0)
            if has_control_widget(name, spec) and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                values.pop(0)
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
