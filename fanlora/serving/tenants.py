"""The adapters a server can serve, by name: where each lives, loading it on first use, pinning it per request.

A request names a model: ``base`` or a folder of ``--adapter-dir``. Names are confined to that folder; an adapter
is read, checked and installed on the engine's thread between two steps. At most ``--max-loras`` are resident
in the engine's slots (:meth:`fanlora.serving.engine.Engine.install` evicts the least recently used one no
request holds); up to ``--max-cpu-loras`` parsed adapters stay in host memory
(:class:`fanlora.serving.adapters.HostCache`), so an evicted adapter comes back without reading its folder; a
request for a non-resident adapter while every slot is held waits for a release (up to ``SLOT_WAIT``, then 503).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from fanlora.errors import UserError
from fanlora.serving.adapters import HostCache, read_adapter
from fanlora.serving.api import ApiError
from fanlora.serving.engine import Engine
from fanlora.serving.jobs import Scheduler
from fanlora.serving.slots import SlotsBusy

BASE = "base"
SLOT_WAIT = 120.0  # seconds a request for a non-resident adapter waits for a --max-loras slot before a 503
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Tenants:
    """The adapters a server can serve: names confined to ``--adapter-dir``, loaded on first use, pinned per
    request. Every method here may block (disk, the scheduler's lock): call them from a worker thread."""

    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        adapter_dir: str | Path | None,
        max_cpu_loras: int = 0,
    ) -> None:
        self.engine, self.scheduler = engine, scheduler
        self.root = Path(adapter_dir).resolve() if adapter_dir else None
        self.host = HostCache(max_cpu_loras)  # parsed adapters kept in host memory, least recently used out

    def known(self) -> list[str]:
        """base, the loaded adapters and every folder that would load (a name, inside the folder, with weights)."""
        root = self.root
        on_disk = []
        for p in sorted(root.iterdir()) if root else []:
            if NAME.match(p.name) and p.resolve().is_relative_to(root) and (p / "adapter_model.safetensors").is_file():
                on_disk.append(p.name)
        return sorted({BASE, *self.engine.adapters, *on_disk})

    def path(self, name: str) -> Path:
        unknown = ApiError(
            404, f"unknown model {name!r}: known models are {', '.join(self.known())}", "not_found_error"
        )
        if not NAME.match(name) or self.root is None:
            raise unknown
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or not path.is_dir():
            raise unknown
        return path

    def load(self, name: str, path: Path, cached: bool = False) -> None:
        """Read (or, with ``cached``, take from the host cache) and install ``name``, on the engine's thread
        between two steps; when every --max-loras slot is held by running requests, wait for a release."""

        def work() -> None:
            adapter = self.host.take(name, path) if cached else None
            adapter = adapter or read_adapter(path, self.engine.max_rank)
            self.engine.install(name, adapter)
            self.host.keep(name, path, adapter)

        deadline = time.monotonic() + SLOT_WAIT
        while True:
            try:
                self.scheduler.on_engine(work)
                break
            except UserError as exc:
                raise ApiError(400, f"adapter {name!r} refused: {exc}") from None
            except SlotsBusy as exc:
                if time.monotonic() > deadline:
                    raise ApiError(503, f"{exc}: retry later", "server_error") from None
                with self.engine.table.released:
                    self.engine.table.released.wait(1.0)
        if self.scheduler.metrics is not None:
            self.scheduler.metrics.loads.inc()

    def unload(self, name: str) -> None:
        try:
            self.scheduler.on_engine(lambda: self.engine.unload(name))
        except UserError:
            raise ApiError(404, f"adapter {name!r} is not loaded", "not_found_error") from None

    def admit(self, name: str) -> tuple[str | None, int]:
        """(adapter, pinned slot) for a request's model, loading the adapter on first use."""
        if name == BASE:
            return None, 0
        for _ in range(3):  # an unload may slip in between the load and the pin: load again
            if name not in self.engine.adapters:
                self.load(name, self.path(name), cached=True)
            try:
                return name, self.engine.table.acquire(name)
            except UserError:
                continue
        raise ApiError(503, f"adapter {name!r} is being loaded and unloaded concurrently: retry", "server_error")
