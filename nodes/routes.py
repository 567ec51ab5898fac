"""The server route behind the controller's live token view: ``POST /vp2p/tokenize``.

Uses the CLIP tokenizer SD1.x uses (ComfyUI's ``comfy/sd1_tokenizer``), loaded once on the
first request. Body: ``{source, target, edit, reweight, blend_source_words, blend_target_words}``;
answer: ``vp2p.token_view.describe_edit``'s JSON.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("VideoP2P")

ROUTE = "/vp2p/tokenize"
_tokenizer: dict[str, Any] = {}  # the one SD1.x tokenizer, loaded lazily (a cache, not run state)


def _sd1_tokenizer() -> Any:
    if "hf" not in _tokenizer:
        import comfy.sd1_clip

        sd = comfy.sd1_clip.SDTokenizer()
        _tokenizer["hf"], _tokenizer["context"] = sd.tokenizer, int(sd.max_length)  # 77, not the HF tokenizer's limit
    return _tokenizer["hf"]


def tokenize_view(body: dict) -> dict:
    from ..vp2p.prompt_align import hf_encoder
    from ..vp2p.token_view import describe_edit

    tok = _sd1_tokenizer()
    text = lambda k: str(body.get(k) or "")
    return describe_edit(text("source"), text("target"), text("edit") or "auto", text("reweight"),
                         text("blend_source_words"), text("blend_target_words"), hf_encoder(tok),
                         lambda i: tok.convert_ids_to_tokens(int(i)).replace("</w>", ""), _tokenizer["context"])


def register_routes() -> None:
    """Add the route to ComfyUI's server (no-op without a running server, e.g. in scripts)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None or getattr(server, "_vp2p_routes", False):
        return

    @server.routes.post(ROUTE)
    async def tokenize(request: "web.Request") -> "web.Response":
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"warnings": ["The request body must be JSON."]}, status=400)
        return web.json_response(tokenize_view(body if isinstance(body, dict) else {}))

    server._vp2p_routes = True
