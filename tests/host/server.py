"""A real ComfyUI server in a subprocess, for running whole workflows over its HTTP API.

The server is ComfyUI's own ``main.py`` started with the test process's Python. The pack is not
installed into the ComfyUI checkout: an ``--extra-model-paths-config`` yaml adds a temporary
``custom_nodes`` folder holding a symlink to the pack (ComfyUI 0.14.1 honours extra ``custom_nodes``
paths: ``main.py`` ``apply_custom_paths`` → ``utils/extra_config.py`` → ``folder_paths``, and
``nodes.init_external_custom_nodes`` walks every ``custom_nodes`` path). Everything the server would
write (user data, temp files, the assets database, inputs, outputs) is pointed into temporary or
given folders, so the ComfyUI checkout is left untouched. All traffic is loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

HOST = "127.0.0.1"
# The symlink's name becomes the module name ComfyUI imports the pack under; no dots allowed
# (ComfyUI turns dots into "_x_"), and it must not clash with ComfyUI's own top-level modules.
PACK_LINK_NAME = "comfyui_video_p2p"

# A proxy-free opener: the client must only ever talk to the loopback server, even when the
# environment sets http_proxy/HTTP_PROXY (urllib's default opener would honour them).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServerError(RuntimeError):
    """The server refused a prompt, failed executing it, or died."""


def _free_port() -> int:
    """A port free on the loopback interface right now (the short race until the server binds is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyClient:
    """Minimal client of one running ComfyUI server."""

    def __init__(self, base_url: str, process: subprocess.Popen, log_path: Path, output_dir: Path, input_dir: Optional[Path] = None) -> None:
        self.base_url = base_url
        self.process = process
        self.log_path = log_path
        self.output_dir = output_dir
        self.input_dir = input_dir
        self.client_id = uuid.uuid4().hex
        self._object_info: Optional[dict] = None

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict] = None, timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        with _OPENER.open(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def get(self, path: str, timeout: float = 60.0) -> Any:
        """GET ``path`` and decode its JSON answer."""
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 60.0) -> Any:
        """POST ``body`` as JSON to ``path`` and decode its JSON answer."""
        return self._request("POST", path, body, timeout=timeout)

    # -- API --------------------------------------------------------------------------------------
    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server log, for error messages."""
        return self.log()[-chars:]

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process.poll() is None

    def object_info(self) -> dict:
        """The server's ``/object_info`` (cached: node definitions do not change while it runs)."""
        if self._object_info is None:
            self._object_info = self.get("/object_info", timeout=120.0)
        return self._object_info

    def queue_prompt(self, prompt: dict) -> str:
        """POST an API-format prompt; returns its prompt id or raises with the server's validation errors."""
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": uuid.uuid4().hex}
        try:
            answer = self.post("/prompt", body)
        except urllib.error.HTTPError as e:
            # A 400 carries {"error": ..., "node_errors": ...} explaining why the prompt is invalid.
            detail = e.read().decode("utf-8", errors="replace")
            raise ComfyServerError(f"ComfyUI refused the prompt (HTTP {e.code}): {detail}") from None
        if answer.get("node_errors"):
            raise ComfyServerError(f"ComfyUI reported node errors: {json.dumps(answer['node_errors'], indent=1)}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float, poll: float = 0.25) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        Raises :class:`ComfyServerError` with the server's execution error if it failed, and on
        timeout (after asking the server to interrupt) or if the server died.
        """
        deadline = time.monotonic() + timeout
        while True:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry is not None and status.get("completed") is not None:
                if status.get("status_str") != "success" or not status.get("completed"):
                    raise ComfyServerError(f"prompt {prompt_id} failed:\n{_execution_error_text(status)}")
                return entry
            if not self.alive():
                raise ComfyServerError(f"ComfyUI exited (code {self.process.returncode}) while running the prompt; "
                                       f"log tail:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                try:
                    self.post("/interrupt", {})
                except (urllib.error.URLError, OSError, ValueError):  # ValueError: its answer is empty, not JSON
                    pass
                raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float) -> dict:
        """Queue ``prompt``, wait for it and return its history entry (``outputs``, ``status``, …)."""
        return self.wait(self.queue_prompt(prompt), timeout)


def _execution_error_text(status: dict) -> str:
    """The readable part of a failed prompt's status messages (exception, node, traceback)."""
    lines = []
    for kind, data in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            lines.append(f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type', '')}: {data.get('exception_message', '')}")
            lines.extend(line.rstrip("\n") for line in data.get("traceback", []))
    return "\n".join(lines) or json.dumps(status, indent=1)


def _die_with_parent() -> None:
    """In the server's process before it starts (Linux): ask the kernel to SIGKILL it when the test process that
    started it dies. A test worker killed for memory cannot run its fixtures' teardown; without this its servers
    live on as orphans, holding gigabytes that the replacement worker then runs short of."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the fixtures' teardown is the only guard


def _write_extra_paths(path: Path, models_dir: Path, custom_nodes_dir: Path, vp2p_dir: Path, controlnet_dir: Optional[Path] = None,
                       model_folders: Optional[Mapping[str, Path]] = None) -> None:
    """The extra-model-paths yaml. Written as JSON, which is valid YAML, so no yaml writer is needed;
    the paths are absolute so ComfyUI does not resolve them against the yaml's folder. ``vp2p`` is
    the pack's own models folder (tuned weights and caches), kept out of the checkout; ``controlnet``,
    when given, is where ComfyUI's ControlNetLoader looks (besides ComfyUI's own models/controlnet);
    ``model_folders`` adds more (folder name → path, e.g. ``animatediff_models`` for AnimateDiff-Evolved:
    the yaml is read before custom nodes load, and an extension registering the same name later adds its
    own paths to it)."""
    paths = {"checkpoints": str(models_dir.resolve()), "custom_nodes": str(custom_nodes_dir.resolve()), "vp2p": str(vp2p_dir.resolve())}
    if controlnet_dir is not None:
        paths["controlnet"] = str(controlnet_dir.resolve())
    for name, folder in (model_folders or {}).items():
        if name in paths:
            raise ValueError(f"model folder {name!r} is set by the server harness itself")
        paths[name] = str(Path(folder).resolve())
    path.write_text(json.dumps({"vp2p_tests": paths}, indent=2), encoding="utf-8")


@contextmanager
def comfy_server(comfy_path: Path, pack_root: Path, models_dir: Path, output_dir: Path,
                 startup_timeout: float = 120.0, extra_args: tuple[str, ...] = (),
                 controlnet_dir: Optional[Path] = None, vp2p_dir: Optional[Path] = None,
                 extra_custom_nodes: Sequence[Path] = (), model_folders: Optional[Mapping[str, Path]] = None) -> Iterator[ComfyClient]:
    """Run a ComfyUI server (CPU, loopback, free port) with the pack loaded; yields a :class:`ComfyClient`.

    ``models_dir`` is added as a ``checkpoints`` folder, ``controlnet_dir`` (if given) as a ``controlnet``
    folder, ``model_folders`` (if given) as further model folders by name, ``output_dir`` is the output
    directory, ``vp2p_dir`` (if given; else a temporary folder) the pack's ``models/vp2p`` folder with its
    cache. ``extra_custom_nodes`` are other custom node packs (folders) loaded beside the pack, each linked
    into the temporary ``custom_nodes`` folder under its own folder name (AnimateDiff-Evolved and
    VideoHelperSuite for the AnimateDiff templates). The server is always terminated on exit.
    """
    comfy_path, pack_root = Path(comfy_path).resolve(), Path(pack_root).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vp2p_comfy_server_") as tmp_name:
        tmp = Path(tmp_name)
        custom_nodes = tmp / "custom_nodes"
        custom_nodes.mkdir()
        (custom_nodes / PACK_LINK_NAME).symlink_to(pack_root, target_is_directory=True)
        for extra in extra_custom_nodes:
            extra = Path(extra).resolve()
            if not (extra / "__init__.py").is_file():
                raise FileNotFoundError(f"{extra} is not a custom node pack (no __init__.py)")
            link = custom_nodes / extra.name
            if link.exists() or link.is_symlink():
                raise ValueError(f"two custom node packs named {extra.name!r}")
            link.symlink_to(extra, target_is_directory=True)
        for d in ("user", "input", "temp_root", "vp2p"):
            (tmp / d).mkdir()
        extra_paths = tmp / "extra_model_paths.yaml"
        if vp2p_dir is not None:
            vp2p_dir.mkdir(parents=True, exist_ok=True)
        _write_extra_paths(extra_paths, models_dir, custom_nodes, vp2p_dir or tmp / "vp2p", controlnet_dir, model_folders)
        port = _free_port()
        cmd = [
            sys.executable, str(comfy_path / "main.py"),
            "--listen", HOST, "--port", str(port), "--cpu", "--disable-auto-launch",
            "--output-directory", str(output_dir.resolve()),
            "--extra-model-paths-config", str(extra_paths),
            # Keep every write out of the ComfyUI checkout (defaults are all inside it).
            "--user-directory", str(tmp / "user"),
            "--input-directory", str(tmp / "input"),
            "--temp-directory", str(tmp / "temp_root"),  # ComfyUI appends "temp" to this one
            "--database-url", f"sqlite:///{tmp / 'comfyui.db'}",
            "--disable-assets-autoscan",
            # API nodes talk to api.comfy.org; the tests must stay on the loopback.
            "--disable-api-nodes",
            *extra_args,
        ]
        env = dict(os.environ)
        # No __pycache__ written into the ComfyUI checkout or the pack by the server process.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        env["DO_NOT_TRACK"] = "1"
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(var, None)
        log_path = tmp / "server.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(cmd, cwd=str(tmp), env=env, stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        client = ComfyClient(f"http://{HOST}:{port}", process, log_path, output_dir, tmp / "input")
        try:
            _wait_ready(client, startup_timeout)
            yield client
        finally:
            _stop(process)


def _wait_ready(client: ComfyClient, timeout: float) -> None:
    """Block until ``/object_info`` answers (the server only listens once every node is loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        if not client.alive():
            raise ComfyServerError(f"ComfyUI exited during startup (code {client.process.returncode}); log tail:\n"
                                   f"{client.log_tail()}")
        try:
            client.object_info()
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ComfyServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s; log tail:\n{client.log_tail()}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Terminate the server (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)
