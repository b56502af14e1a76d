"""Starting vLLM's OpenAI server from fanlora, to measure it (`fanlora profile --engine vllm`, `benchmarks/vllm.py`,
the vLLM tests): a peer that fanlora's serving is timed against, so it lives with the measurements, not the server.

vLLM lives in its own venv (``.venv-vllm``, built by ``scripts/setup-vllm.sh``: it pins an older transformers
than fanlora needs), so fanlora never imports it: it runs ``python -m vllm.entrypoints.openai.api_server`` from
that venv as a subprocess (vLLM's console script looks for a distribution named ``vllm``, which the CPU build
is not) and waits for ``/health``. The fanlora-vllm plugin in that venv restricts LoRA to the setting when
``FANLORA_SETTING`` names one; ``FANLORA_SETTING=off`` gives stock vLLM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fanlora.errors import UserError

CHECKOUT = Path(__file__).resolve().parents[2]  # a source checkout's root (an installed package has no venv there)
STARTUP_S = 600.0  # a cold CPU start beside other jobs takes 1-2 min; give up well after that


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter: ``$FANLORA_VLLM_PYTHON``, else ``.venv-vllm`` in the working directory, else
    in the source checkout fanlora runs from (an installed fanlora has none: set the variable)."""
    chosen = os.environ.get("FANLORA_VLLM_PYTHON")
    if chosen:
        return Path(chosen) if Path(chosen).is_file() else None
    found = [where / ".venv-vllm" / "bin" / "python" for where in (Path.cwd(), CHECKOUT)]
    return next((path for path in found if path.is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """One vLLM server on loopback over ``model_dir`` (LoRA on), with or without the plugin.

    ``dtype``: float32 on vLLM's CPU build (what the tests and benchmarks here run); on a GPU pass bfloat16 or
    float16 — vLLM's GPU LoRA kernels take only those."""

    model_dir: str
    setting: str | None  # the plugin's FANLORA_SETTING; None: stock vLLM (the plugin stays out)
    adapters: dict[str, str] = field(default_factory=dict)  # --lora-modules name → folder
    max_loras: int = 4
    max_lora_rank: int = 16
    report: str | None = None  # FANLORA_VLLM_REPORT: where the plugin writes the engine's LoRA module tree
    lora: bool = True  # False: vLLM without --enable-lora (the base a LoRA cost is measured against)
    target_modules: list[str] | None = None  # vLLM's --lora-target-modules (by kind, in every layer)
    log: str | None = None
    dtype: str = "float32"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        python = vllm_python()
        if python is None:
            raise UserError("no vLLM venv: run `bash scripts/setup-vllm.sh` (or set FANLORA_VLLM_PYTHON)")
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir]
        cmd += ["--served-model-name", "base", "--dtype", self.dtype, "--max-model-len", "2048"]
        if self.lora:
            cmd += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
        if self.target_modules:
            cmd += ["--lora-target-modules", *self.target_modules]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{name}={path}" for name, path in self.adapters.items())]
        return [*cmd, "--host", "127.0.0.1", "--port", str(self.port)]

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        env["FANLORA_SETTING"] = self.setting or "off"
        env.pop("FANLORA_VLLM_REPORT", None)
        if self.report:
            env["FANLORA_VLLM_REPORT"] = self.report
        return env

    def start(self) -> VllmServer:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(  # its own process group: vLLM's engine and worker processes go with it
            self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.environment(), start_new_session=True
        )
        return self

    def wait(self, timeout: float = STARTUP_S) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {self.proc.returncode}; its log: {self.log}") from None
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {timeout:.0f} s; its log: {self.log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):  # what outlived the API server (engine core, worker)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
