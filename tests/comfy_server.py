"""A real ComfyUI server with this pack installed, for end-to-end tests.

`ComfyServer` starts ComfyUI (the tree scripts/setup.sh puts in .cache/comfyui) as a
subprocess on a free loopback port, with a throw-away base directory:

    <base>/custom_nodes/ComfyUI-VibeVoice-Offload -> symlink to this repo
    <base>/models/vibevoice/                       -> `models_dir`, the test controls it
    <base>/input, <base>/output, <base>/temp, <base>/user

ComfyUI 0.3.75's `--base-directory` moves models/, custom_nodes/, input/, output/,
temp/ and user/ together, so the pack is installed exactly as a user installs it (a
folder in custom_nodes/), `folder_paths.models_dir` is the temp models folder, and
nothing is written into the shared ComfyUI tree. Its stdout/stderr go to a log file
under test-artifacts/ (kept after the run for CI).

The same object is the HTTP client (stdlib urllib, loopback only): object_info(),
queue(), wait(), interrupt(), free(), log_text().
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
PACK_FOLDER_NAME = "ComfyUI-VibeVoice-Offload"

# Flags Debian's Chromium needs here: root (no sandbox), no GPU, and no background
# connections (this machine's network is closed; they would only add noise).
CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class ComfyError(RuntimeError):
    """ComfyUI answered with an HTTP error; `status` and `body` say what it said."""

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def block_external_requests(context_or_page) -> None:
    """Abort every browser request that is not to localhost (playwright, sync API).

    The frontend calls api.comfy.org and other hosts on load; on this closed network
    those would hang or fail noisily, and tests must not depend on them anyway.
    """

    def handle(route):
        host = urllib.parse.urlsplit(route.request.url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1") or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            route.abort()

    context_or_page.route("**/*", handle)


class ComfyServer:
    """One ComfyUI process plus a small client for its HTTP API."""

    def __init__(
        self,
        comfyui_dir: Path | str,
        *,
        repo_root: Path | str = REPO_ROOT,
        log_path: Path | str | None = None,
        python: str = sys.executable,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.comfyui_dir = Path(comfyui_dir).resolve()
        self.repo_root = Path(repo_root).resolve()
        self.log_path = Path(log_path) if log_path else ARTIFACTS_DIR / "comfyui-server.log"
        self.python = python
        self.extra_args = list(extra_args or [])
        self.env = env
        self.port: int | None = None
        self.base_dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.boot_mark = 0  # log_mark() once the server answered: its start-up log ends there
        self._log_file = None
        self._symlink: Path | None = None
        # Loopback only: ignore any http_proxy variables of the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # ---- folders the test controls ---------------------------------------------------
    @property
    def models_dir(self) -> Path:
        """`models/vibevoice` of this server: put test checkpoints here (one folder each)."""
        return self._require_base() / "models" / "vibevoice"

    @property
    def input_dir(self) -> Path:
        return self._require_base() / "input"

    @property
    def output_dir(self) -> Path:
        return self._require_base() / "output"

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def _require_base(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("server not started")
        return self.base_dir

    # ---- process -----------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ComfyServer":
        self.base_dir = Path(tempfile.mkdtemp(prefix="vibevoice-comfy-"))
        # temp/ comes from --base-directory (ComfyUI's --temp-directory appends "temp")
        for sub in ("custom_nodes", "models/vibevoice", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        # ComfyUI imports every folder of <base>/custom_nodes as a package: link the
        # checkout there under the name users clone it as.
        self._symlink = self.base_dir / "custom_nodes" / PACK_FOLDER_NAME
        self._symlink.symlink_to(self.repo_root, target_is_directory=True)

        self.port = free_port()
        base = str(self.base_dir)
        cmd = [
            self.python, "main.py",
            "--cpu",  # torch is a CUDA build; without --cpu ComfyUI looks for a GPU
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--base-directory", base,
            "--output-directory", os.path.join(base, "output"),
            "--input-directory", os.path.join(base, "input"),
            # default is <comfyui>/user/comfyui.db, i.e. shared between runs
            "--database-url", f"sqlite:///{os.path.join(base, 'user', 'comfyui.db')}",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.setdefault(var, "1")

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self._log_file.write("$ " + " ".join(cmd) + f"\n(cwd {self.comfyui_dir})\n\n")
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfyui_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest does not hit it half-way
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_mark = self.log_mark()
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self.object_info()
                return
            except (OSError, ComfyError) as e:  # not listening yet
                last_error = e
            time.sleep(0.5)
        raise TimeoutError(
            f"ComfyUI did not answer GET /object_info within {timeout:.0f} s ({last_error}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server (kill after 10 s) and remove the temp base folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # Unlink first so the clean-up can never walk into the repository.
        if self._symlink is not None and self._symlink.is_symlink():
            self._symlink.unlink()
        self._symlink = None
        if self.base_dir is not None and not os.environ.get("VIBEVOICE_KEEP_COMFY_BASE"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- log -----------------------------------------------------------------------------
    def log_text(self, since: int = 0, until: int | None = None) -> str:
        """The server's log so far, or between two values of log_mark() (`boot_mark`: the
        end of its start-up), so a test reads only what happened in its own time."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read() if until is None else f.read(max(until - since, 0))
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", errors="replace")

    def log_mark(self) -> int:
        """Current end of the log, to read only what a test caused: log_text(since=mark)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload: Any = None, timeout: float = 30.0) -> Any:
        """JSON request to the server; returns the decoded JSON (or text, or None)."""
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw
            raise ComfyError(f"{method} {path} -> HTTP {e.code}: {raw[:2000]}", e.code, parsed) from None
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return body.decode(errors="replace")

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, payload: Any = None, **kw) -> Any:
        return self.request("POST", path, {} if payload is None else payload, **kw)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (all nodes) or /object_info/<node_class> (one)."""
        path = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self.get(path)

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST an API-format graph to /prompt; returns its prompt_id.

        A graph ComfyUI rejects raises ComfyError whose .body has "node_errors".
        """
        answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        return answer["prompt_id"]

    def history(self, prompt_id: str | None = None) -> dict:
        return self.get("/history" if prompt_id is None else f"/history/{prompt_id}")

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll /history/<id> until the prompt has finished; returns its history entry.

        The entry has "outputs" and "status" ({"status_str": "success"|"error",
        "completed": bool, "messages": [...]}); an interrupted prompt ends as "error"
        with an "execution_interrupted" message. Check the status yourself.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None:
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"ComfyUI exited with code {self.proc.returncode} while running {prompt_id}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(poll)

    def interrupt(self) -> None:
        """Cancel the prompt that is running now (the UI's Cancel button)."""
        self.post("/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """POST /free: ComfyUI acts on it after the current prompt, in its worker thread."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def queue_state(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}."""
        return self.get("/queue")

    def system_stats(self) -> dict:
        return self.get("/system_stats")
