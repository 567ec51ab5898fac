"""The server route behind the controllers' live token view: ``POST /vp2p/tokenize``.

Tokenises with ComfyUI's tokenizer of the CLIP the controller is connected to (``prompt_host.
view_tokenizer``: SD1.x, SD2.x or SDXL from the loader's file header or type; SD1.x with a note
when that cannot be told), each kind made once. Body: ``{source, target, edit, reweight,
blend_source_words, blend_target_words, cross_replace_words, clip}`` with ``clip`` =
``{class_type, inputs}`` of the loader feeding the controller; answer:
``vp2p.token_view.describe_edit``'s JSON plus ``tokenizer`` (its label) and ``notes``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("VideoP2P")

ROUTE = "/vp2p/tokenize"
MAX_BODY_BYTES = 256 * 1024  # two prompts and a few settings; a larger body is refused (413) before it is read
_tokenizers: dict[str, Any] = {}  # ComfyUI tokenizers by kind, made on first use (a cache, not run state)


def tokenize_view(body: dict) -> dict:
    from ..vp2p.token_view import describe_edit
    from .prompt_host import pick_key, tokenized_prompt, view_tokenizer

    text = lambda k: str(body.get(k) or "")
    tokenizer, label, note = view_tokenizer(body.get("clip"), _tokenizers)
    _, inner = pick_key(tokenizer)
    vocab = inner.tokenizer

    def decode(i: int) -> str:
        return vocab.convert_ids_to_tokens(int(i)).replace("</w>", "") if i >= 0 else "<embedding>"

    view = describe_edit(text("source"), text("target"), text("edit") or "auto", text("reweight"), text("blend_source_words"),
                         text("blend_target_words"), lambda t: tokenized_prompt(tokenizer, t), decode, text("cross_replace_words"))
    view["tokenizer"] = label
    view["notes"] = [note] if note else []
    return view


def pack_server(flag: str) -> Any:
    """ComfyUI's running ``PromptServer`` when the routes named by ``flag`` are not on it yet, marked as having
    them; None without a server (scripts, tests) or when they were added before."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, flag, False):
        return None
    setattr(server, flag, True)
    return server


def register_routes() -> None:
    """Add the route to ComfyUI's server (no-op without a running server, e.g. in scripts)."""
    server = pack_server("_vp2p_routes")
    if server is None:
        return
    from aiohttp import web

    @server.routes.post(ROUTE)
    async def tokenize(request: "web.Request") -> "web.Response":
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response({"warnings": [f"The request body is {request.content_length} bytes; at most {MAX_BODY_BYTES} "
                                                   "are read."]}, status=413)
        try:
            raw = await request.read()
            if len(raw) > MAX_BODY_BYTES:
                return web.json_response({"warnings": [f"The request body is larger than {MAX_BODY_BYTES} bytes."]}, status=413)
            body = json.loads(raw.decode("utf-8"))
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"warnings": [f"The request body is larger than {MAX_BODY_BYTES} bytes."]}, status=413)
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"warnings": ["The request body must be JSON."]}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"warnings": [f"The request body must be a JSON object, not a {type(body).__name__}."]},
                                     status=400)
        try:
            return web.json_response(tokenize_view(body))
        except Exception:  # the view reports bad input itself; anything else is a bug: logged, never sent as a traceback
            log.exception("Video-P2P token view failed.")
            return web.json_response({"warnings": ["The token view failed; see the ComfyUI log."]}, status=500)
