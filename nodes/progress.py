"""Progress text under a node in the ComfyUI frontend (beside its progress bar)."""

from __future__ import annotations


def progress_text(text: str, node_id) -> None:
    """Show ``text`` under node ``node_id``; without a server (scripts, tests) nothing happens."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (scripts/tests): the log line is enough
        pass
