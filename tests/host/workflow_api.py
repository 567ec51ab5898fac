"""UI-format workflows (what the ComfyUI frontend saves) → API-format prompts (what ``POST /prompt`` takes).

The frontend does this conversion in the browser (``graphToPrompt``); the tests need it without a
browser. A UI workflow stores, per node, the links into its input sockets and a flat list
``widgets_values`` with one entry per widget, in the order the node's widgets were created — which
is the order of the widget inputs in the server's ``/object_info`` (``input_order``: required, then
optional), plus an extra value right after every widget with ``control_after_generate`` (the
"fixed/increment/randomize" combo the frontend adds below seeds) and after image/video/file upload
combos (the upload button's value).

Frontend-only nodes are resolved the way the frontend resolves them: notes are dropped, ``Reroute``
nodes are followed to their source, ``PrimitiveNode`` values are inlined into their targets, muted
nodes (mode 2) are left out, bypassed nodes (mode 4) pass a link through from an input of the
output's type. What the frontend does that this module cannot reproduce faithfully (subgraphs,
legacy group nodes, dynamic V3 inputs, custom widgets) raises :class:`WorkflowConversionError`
instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

# Node types that exist only in the frontend (never in /object_info).
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPE = "Reroute"
PRIMITIVE_TYPE = "PrimitiveNode"
FRONTEND_ONLY_TYPES = NOTE_TYPES | {REROUTE_TYPE, PRIMITIVE_TYPE}

# LiteGraph node modes.
MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted": not executed, its outputs are absent
MODE_BYPASS = 4  # outputs are fed from matching inputs

# Input types the frontend draws as plain value widgets (a list type is a legacy COMBO).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# Options that make the frontend add an upload widget after a combo, whose value is serialised too.
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "file_upload")


class WorkflowConversionError(ValueError):
    """The workflow cannot be converted faithfully."""


@dataclass(frozen=True)
class _Link:
    id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


@dataclass(frozen=True)
class _Widget:
    """One entry of ``widgets_values``: the value of input ``name`` or an extra value that follows it."""

    name: str
    kind: str  # "value", "control" (control_after_generate) or "upload"


# An API input: a literal, or [node id, output slot].
ApiInput = Union[Any, list]


def _links(workflow: dict) -> dict[int, _Link]:
    """Links by id; accepts the 0.4 array form and the 1.x object form."""
    out: dict[int, _Link] = {}
    for raw in workflow.get("links") or []:
        if isinstance(raw, dict):
            link = _Link(int(raw["id"]), str(raw["origin_id"]), int(raw["origin_slot"]), str(raw["target_id"]),
                         int(raw["target_slot"]), str(raw.get("type", "*")))
        else:
            lid, oid, oslot, tid, tslot, ltype = raw[:6]
            link = _Link(int(lid), str(oid), int(oslot), str(tid), int(tslot), str(ltype))
        out[link.id] = link
    return out


def _defined_composite_types(workflow: dict) -> tuple[set[str], set[str]]:
    """(subgraph ids, legacy group-node types) the workflow defines itself."""
    subgraphs = {str(sg.get("id")) for sg in (workflow.get("definitions") or {}).get("subgraphs", [])}
    groups = set()
    for name in ((workflow.get("extra") or {}).get("groupNodes") or {}):
        # The frontend has used both separators for group-node types over time.
        groups.update({f"workflow>{name}", f"workflow/{name}"})
    return subgraphs, groups


def _all_nodes(workflow: dict) -> Iterable[dict]:
    """Top-level nodes and the nodes inside subgraph definitions."""
    yield from workflow.get("nodes") or []
    for sg in (workflow.get("definitions") or {}).get("subgraphs", []):
        yield from sg.get("nodes") or []


def missing_node_types(workflow: dict, object_info: dict) -> list[str]:
    """Node types used by ``workflow`` that the server does not know: what the frontend would report
    as missing nodes when loading it. Frontend-only nodes and the workflow's own subgraphs and group
    nodes are not missing."""
    subgraphs, groups = _defined_composite_types(workflow)
    known = set(object_info) | FRONTEND_ONLY_TYPES | subgraphs | groups
    return sorted({str(n.get("type")) for n in _all_nodes(workflow) if str(n.get("type")) not in known})


def _input_spec(node_info: dict, name: str) -> list:
    inputs = node_info.get("input", {})
    for section in ("required", "optional"):
        if name in inputs.get(section, {}):
            return inputs[section][name]
    raise KeyError(name)


def _ordered_inputs(node_info: dict) -> list[str]:
    """Input names in the frontend's creation order: ``input_order`` when the server sends it
    (ComfyUI ≥ 0.3), else the JSON key order, required before optional; hidden inputs never."""
    order = node_info.get("input_order")
    inputs = node_info.get("input", {})
    names: list[str] = []
    for section in ("required", "optional"):
        names += list(order.get(section, [])) if order else list(inputs.get(section, {}))
    return names


def _is_widget(spec: list) -> bool:
    """Whether the frontend draws this input as a widget (whose value lands in ``widgets_values``)."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    if isinstance(kind, list):
        return True
    return kind in WIDGET_TYPES or opts.get("widgetType") in WIDGET_TYPES


def _widget_layouts(node_info: dict) -> list[list[_Widget]]:
    """Possible layouts of ``widgets_values`` for a node type, most likely first.

    Upload buttons are serialised by some frontend versions and not others, so a layout with and one
    without their values are both offered; the caller picks the one whose length matches.
    """
    with_upload: list[_Widget] = []
    without_upload: list[_Widget] = []
    for name in _ordered_inputs(node_info):
        spec = _input_spec(node_info, name)
        if not _is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        for layout in (with_upload, without_upload):
            layout.append(_Widget(name, "value"))
            if opts.get("control_after_generate"):
                layout.append(_Widget(name, "control"))
        if any(opts.get(o) for o in UPLOAD_OPTIONS):
            with_upload.append(_Widget(name, "upload"))
    return [with_upload] if with_upload == without_upload else [with_upload, without_upload]


def _widget_values(node: dict, node_info: dict) -> dict[str, Any]:
    """Input name → widget value for one node."""
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):
        # Some nodes serialise their widgets by name; only the node's declared inputs are used.
        return {name: values[name] for name in _ordered_inputs(node_info) if name in values}
    layouts = _widget_layouts(node_info)
    for layout in layouts:
        if len(layout) == len(values):
            return {w.name: v for w, v in zip(layout, values) if w.kind == "value"}
    expected = " | ".join(str([f"{w.name}" if w.kind == "value" else f"<{w.kind} of {w.name}>" for w in lay])
                          for lay in layouts)
    raise WorkflowConversionError(
        f"node {node.get('id')} ({node.get('type')}): {len(values)} widgets_values {values!r} do not match the "
        f"widgets /object_info declares: {expected}")


class _Converter:
    """One conversion; holds the node and link tables."""

    def __init__(self, workflow: dict, object_info: dict) -> None:
        self.workflow = workflow
        self.object_info = object_info
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes") or []}
        self.links = _links(workflow)
        self.subgraphs, self.groups = _defined_composite_types(workflow)

    def _link_on_input(self, node: dict, index: int) -> Optional[_Link]:
        inputs = node.get("inputs") or []
        if index < 0 or index >= len(inputs):
            return None
        link_id = inputs[index].get("link")
        if link_id is None:
            return None
        if int(link_id) not in self.links:
            raise WorkflowConversionError(f"node {node.get('id')} ({node.get('type')}) input {index} names link "
                                          f"{link_id}, which is not in the workflow's links")
        return self.links[int(link_id)]

    def _bypass_input_index(self, node: dict, slot: int, out_type: str) -> int:
        """The input a bypassed node feeds output ``slot`` from: the input at the same index if its type
        matches, else the first input of that type (the frontend's rule)."""
        inputs = node.get("inputs") or []
        if slot < len(inputs) and inputs[slot].get("type") == out_type:
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == out_type:
                return i
        return -1

    def resolve(self, link: _Link, seen: frozenset[str] = frozenset()) -> Optional[tuple[str, Any]]:
        """Where a link's value really comes from: ``("link", [node_id, slot])``, ``("value", v)`` for a
        primitive, or ``None`` when the source is muted/unconnected (the input is then left out)."""
        origin = self.nodes.get(link.origin_id)
        if origin is None:
            raise WorkflowConversionError(f"link {link.id} starts at node {link.origin_id}, which does not exist")
        if link.origin_id in seen:
            raise WorkflowConversionError(f"link {link.id}: cycle through reroute/bypassed node {link.origin_id}")
        seen = seen | {link.origin_id}
        ntype = str(origin.get("type"))
        mode = origin.get("mode", MODE_ALWAYS)
        if ntype == REROUTE_TYPE:
            upstream = self._link_on_input(origin, 0)
            return None if upstream is None else self.resolve(upstream, seen)
        if ntype == PRIMITIVE_TYPE:
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowConversionError(f"primitive node {link.origin_id} has no value")
            return ("value", values[0])
        if ntype in self.subgraphs or ntype in self.groups:
            raise WorkflowConversionError(f"node {link.origin_id} is a subgraph/group node ({ntype}); not supported")
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            outputs = origin.get("outputs") or []
            out_type = str(outputs[link.origin_slot].get("type")) if link.origin_slot < len(outputs) else link.type
            index = self._bypass_input_index(origin, link.origin_slot, out_type)
            if index < 0:
                raise WorkflowConversionError(
                    f"bypassed node {link.origin_id} ({ntype}) has no {out_type} input to pass through to its output "
                    f"{link.origin_slot}; the frontend would silently drop link {link.id}")
            upstream = self._link_on_input(origin, index)
            return None if upstream is None else self.resolve(upstream, seen)
        return ("link", [link.origin_id, link.origin_slot])

    def convert_node(self, node: dict) -> dict:
        ntype = str(node["type"])
        info = self.object_info[ntype]
        declared = set(_ordered_inputs(info))
        inputs: dict[str, ApiInput] = dict(_widget_values(node, info))
        for index, inp in enumerate(node.get("inputs") or []):
            link = self._link_on_input(node, index)
            # A widget converted to a socket keeps the widget's name in "widget"; "name" may be a label.
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if name not in declared:
                raise WorkflowConversionError(f"node {node['id']} ({ntype}) has an input {name!r} that "
                                              f"/object_info does not declare (dynamic inputs are not supported)")
            if link is None:
                continue
            resolved = self.resolve(link)
            if resolved is None:
                # Muted or unconnected source: the frontend sends no value for a linked socket.
                inputs.pop(name, None)
                continue
            inputs[name] = resolved[1]
        title = node.get("title") or info.get("display_name") or ntype
        return {"class_type": ntype, "inputs": inputs, "_meta": {"title": title}}

    def convert(self) -> dict[str, dict]:
        missing = missing_node_types(self.workflow, self.object_info)
        if missing:
            raise WorkflowConversionError(f"node types unknown to the server: {missing}")
        prompt: dict[str, dict] = {}
        for node_id, node in self.nodes.items():
            ntype = str(node.get("type"))
            mode = node.get("mode", MODE_ALWAYS)
            if ntype in FRONTEND_ONLY_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
                continue  # resolved through the links of the nodes that use them
            if ntype in self.subgraphs or ntype in self.groups:
                raise WorkflowConversionError(f"node {node_id} is a subgraph/group node ({ntype}); not supported")
            if mode != MODE_ALWAYS:
                raise WorkflowConversionError(f"node {node_id} ({ntype}) has unsupported mode {mode}")
            prompt[node_id] = self.convert_node(node)
        return prompt


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow into the API prompt format ``POST /prompt`` takes.

    ``object_info`` is the server's ``/object_info``. Returns ``{node_id: {"class_type", "inputs",
    "_meta"}}``; linked inputs are ``[source_node_id, output_slot]``. Raises
    :class:`WorkflowConversionError` for anything that cannot be converted faithfully.
    """
    if not isinstance(workflow, dict) or "nodes" not in workflow:
        raise WorkflowConversionError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    return _Converter(workflow, object_info).convert()
