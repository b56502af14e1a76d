"""A fault soak of `fanlora serve`: minutes of mixed tenants, leaving clients, adapter churn, bad requests and a
``kill -9`` mid-load followed by a restart. Bounded in time, loopback only.

    python benchmarks/soak.py --seconds 330 --out benchmarks/results/soak.txt

The server is the real CLI (``python -m fanlora serve``, a subprocess, 127.0.0.1, an API key) over the
embedded backbone with four random-weight tenants on a setting (``--setting``, or V+O in every layer). First
every (model, prompt) pair is answered once with the server idle: the reference. Then, for ``--seconds``:

- ``--clients`` threads send valid completions (streaming or not, greedy) and check each answer against the
  reference: a 5xx or a different answer is a failure;
- one thread opens requests and walks away mid-answer (streaming and non-streaming);
- one thread unloads and reloads tenants (vLLM's load/unload routes) while the others use them;
- one thread sends bad requests (over-limit, malformed, oversized and chunked bodies, unknown model, empty
  prompt, a seed past int64, unsupported OpenAI fields): each must get its 4xx, never a 5xx;
- one hostile tenant loads and uses bad adapters — NaN weights, one module at rank 4096 (over
  ``--max-lora-rank``), a truncated safetensors file — and sends ``temperature: 1e-40``: each adapter must get
  a 400, the tiny temperature the greedy answer, and every other tenant's answers stay as served alone;
- half-way, the server is killed with SIGKILL right after an adapter load request goes out, and restarted;
  clients retry through the restart (connection errors then are counted apart, not as 5xx);
- one thread sends **bursts of long prompts** (4 × ~700 tokens at once, streamed) while the checking clients'
  short requests go on: every answer, long or short, must equal its reference;
- one thread sends **Zipf(1.1) traffic over 1,000 registered adapters** (``zipf-0000``…, hard links to
  ``tenant-a``'s files, so every answer must equal tenant-a's) through ``--max-loras 16`` slots and a
  ``--max-cpu-loras 32`` host cache: loads, evictions and host-cache hits all the time;
- a **CPU-bound neighbour** (a pure-Python busy loop, its own process) runs through the middle third;
- half-way, the server is killed with SIGKILL right after an adapter load request goes out, and restarted;
  clients retry through the restart (connection errors then are counted apart, not as 5xx);
- at the end, SIGTERM while a stream is running: the stream must end with ``[DONE]`` and the process exit 0.

RSS is read from /proc every 5 s and checked against the flags: no sample may pass the RSS the process had once
warm plus ``--kv-cache-mb`` plus the prefix cache plus the host cache's and the slots' adapters, + 10 %. Growth
from the end of each process's first minute to its end is reported too. The adapter directories are hashed
before and after. Exit status 0 iff no failure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fanlora import atomic
from fanlora.backbone import load_backbone
from fanlora.latency.timing import save_random_adapter
from fanlora.scoring import ScoreTable
from fanlora.setting import Setting
from fanlora.stages.selection import select

KEY = "soak-key"
KV_MB, PREFIX_MB, MAX_LORAS, CPU_LORAS = 512, 64, 16, 32  # the bounds RSS is checked against
ZIPF = [f"zipf-{i:04d}" for i in range(1000)]  # hard links to tenant-a's files
LONG = [f"Document {d}. " + " ".join(f"line {i} of document {d} says nothing much." for i in range(90)) for d in "ab"]
TRANSPORT = (OSError, http.client.HTTPException)  # a connection cut by the kill -9, not an HTTP status
TENANTS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
HOSTILE = ["nan-weights", "rank-4096", "truncated"]
PROMPTS = [
    "Write one sentence about the sea.",
    "List three colours.",
    "What is the capital of Italy?",
    "Explain what a policy deductible is.",
]


def vo_setting(backbone_name: str) -> Setting:
    """V and O in every layer: a setting without running stages a-c (the soak is about the server)."""
    b = load_backbone(backbone_name)
    layout = b.layout
    values = {f"{k}.{n}": (1.0 if k in ("V", "O") else -1.0) for k, n in layout.all_modules()}
    names = {f"{k}.{n}": layout.module_name(k, n) for k, n in layout.all_modules()}
    table = ScoreTable(
        backbone=b.identity, kinds=layout.kinds, num_layers=layout.num_layers, module_names=names, values=values
    )
    return select(table, 2)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
        h.update(oct(p.stat().st_mode).encode())
    return h.hexdigest()


def hostile_adapters(root: Path, template: Path) -> None:
    """Copies of a tenant with NaN weights, with one module at rank 4096, and with a truncated weights file."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = "adapter_model.safetensors"
    tensors = load_file(str(template / weights))
    key_a = next(k for k in sorted(tensors) if "lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    bad = {
        "nan-weights": {**tensors, key_a: torch.full_like(tensors[key_a], float("nan"))},
        "rank-4096": {**tensors, key_a: torch.randn(4096, tensors[key_a].shape[1]),
                      key_b: torch.randn(tensors[key_b].shape[0], 4096)},
    }  # fmt: skip
    for name in HOSTILE:
        shutil.copytree(template, root / name)
        if name in bad:
            save_file(bad[name], str(root / name / weights))
        else:
            data = (root / name / weights).read_bytes()
            (root / name / weights).write_bytes(data[: len(data) // 3])


class Server:
    def __init__(self, setting: Path, adapters: Path) -> None:
        self.cmd = [
            sys.executable, "-m", "fanlora", "serve", "--setting", str(setting), "--adapter-dir", str(adapters),
            "--port", "0", "--api-key", KEY, "--max-tokens", "32", "--max-queue", "64", "--max-batch", "8",
            "--kv-cache-mb", str(KV_MB), "--prefix-cache-mb", str(PREFIX_MB), "--max-loras", str(MAX_LORAS),
            "--max-cpu-loras", str(CPU_LORAS),
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.rss: list[list[tuple[float, int]]] = []  # per process: (time, RSS bytes)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving on http://127.0.0.1:"):
            raise SystemExit(f"the server did not start: {line!r}")
        self.port = int(line.split()[2].split(":")[2].split("/")[0])
        self.rss.append([])

    def sample_rss(self) -> None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except TRANSPORT:
            return
        kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:"))
        self.rss[-1].append((time.monotonic(), kb * 1024))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> tuple[bool, bool]:
        """SIGTERM while a stream runs: (the process exited 0 within 60 s, the stream ended with [DONE])."""
        box: dict = {}

        def stream() -> None:
            body = {"model": TENANTS[0], "prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0, "stream": True}
            with contextlib.suppress(*TRANSPORT):
                box["raw"] = request(self.port, "/v1/completions", body)[1]

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        threading.Event().wait(0.5)  # the stream is being decoded
        self.proc.terminate()
        try:
            exited = self.proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            self.kill()
            exited = False
        thread.join(timeout=10)
        return exited, box.get("raw", b"").rstrip().endswith(b"data: [DONE]")


def request(port: int, path: str, body: bytes | dict, timeout: float = 120, chunked: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        if chunked:
            conn.request("POST", path, iter([data[i : i + 8192] for i in range(0, len(data), 8192)]), headers,
                         encode_chunked=True)  # fmt: skip
        else:
            conn.request("POST", path, data, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def answer(status: int, raw: bytes, stream: bool) -> str | None:
    if status != 200:
        return None
    if not stream:
        return json.loads(raw)["choices"][0]["text"]
    text = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None
            text.append(chunk["choices"][0]["text"])
    return "".join(text)


class Soak:
    def __init__(self, server: Server, seconds: float, clients: int, max_tokens: int) -> None:
        self.server, self.clients, self.max_tokens = server, clients, max_tokens
        self.stop_at = time.monotonic() + seconds
        self.counts = {
            "requests": 0, "errors_5xx": 0, "mismatches": 0, "connection_errors": 0, "disconnects": 0,
            "reloads": 0, "bad_requests": 0, "bad_request_not_4xx": 0, "restarts": 0, "hostile_adapters": 0,
            "hostile_not_400": 0, "tiny_temperature": 0, "long_prompts": 0, "zipf_requests": 0,
        }  # fmt: skip
        self.lock = threading.Lock()
        self.reference: dict[tuple[str, str], str] = {}
        self.failures: list[str] = []

    def add(self, key: str, n: int = 1, failure: str | None = None) -> None:
        with self.lock:
            self.counts[key] += n
            if failure and len(self.failures) < 20:
                self.failures.append(failure)

    def body(self, model: str, prompt: str, stream: bool) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0, "stream": stream}

    def build_reference(self) -> None:
        for model in ["base", *TENANTS]:
            for prompt in PROMPTS + (LONG if model in ("base", TENANTS[1]) else []):
                status, raw = request(self.server.port, "/v1/completions", self.body(model, prompt, False))
                if status != 200:
                    raise SystemExit(f"reference request failed: {status} {raw[:200]!r}")
                self.reference[(model, prompt)] = answer(status, raw, False)

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():  # (a connection error while the server restarts: retried)
            self.check(rng.choice(["base", *TENANTS]), rng.choice(PROMPTS), rng.random() < 0.5, "requests")

    def check(self, model: str, prompt: str, stream: bool, key: str, reference: str | None = None) -> None:
        """One checked request: its answer must equal the reference of ``(model, prompt)`` (or ``reference``)."""
        try:
            status, raw = request(self.server.port, "/v1/completions", self.body(model, prompt, stream))
        except TRANSPORT:
            self.add("connection_errors")
            threading.Event().wait(0.5)
            return
        self.add(key)
        want = reference if reference is not None else self.reference[(model, prompt)]
        if status >= 500:
            self.add("errors_5xx", failure=f"{status} for {model}: {raw[:160]!r}")
        elif answer(status, raw, stream) != want:
            self.add("mismatches", failure=f"{model} {prompt[:40]!r} stream={stream}: {raw[:160]!r}")

    def burst(self, seed: int) -> None:
        """Every ~20 s, four long prompts at once (streamed), beside the checking clients' short ones."""
        rng = random.Random(seed)
        while self.running():
            threading.Event().wait(rng.uniform(10, 30))
            batch = [threading.Thread(target=self.check, args=(m, p, True, "long_prompts"))
                     for m in ("base", TENANTS[1]) for p in LONG]  # fmt: skip
            for t in batch:
                t.start()
            for t in batch:
                t.join()

    def zipf(self, seed: int) -> None:
        """Zipf(1.1) traffic over 1,000 adapters that share tenant-a's weights: each answer is tenant-a's."""
        rng = random.Random(seed)
        weights = [1 / (i + 1) ** 1.1 for i in range(len(ZIPF))]
        while self.running():
            name, prompt = rng.choices(ZIPF, weights)[0], rng.choice(PROMPTS)
            self.check(name, prompt, rng.random() < 0.5, "zipf_requests", self.reference[(TENANTS[0], prompt)])

    def leaver(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            body = self.body(rng.choice(TENANTS), rng.choice(PROMPTS), rng.random() < 0.5)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
                conn.request("POST", "/v1/completions", json.dumps(body), headers)
                threading.Event().wait(rng.uniform(0.05, 0.6))  # then walk away mid-answer
                conn.close()
                self.add("disconnects")
            except TRANSPORT:
                self.add("connection_errors")
            threading.Event().wait(0.5)  # one leaving client at a time

    def churn(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            threading.Event().wait(rng.uniform(2, 5))
            name = rng.choice(TENANTS)
            try:
                status, raw = request(self.server.port, "/v1/unload_lora_adapter", {"lora_name": name})
                if status >= 500:
                    self.add("errors_5xx", failure=f"unload {name}: {status} {raw[:160]!r}")
                status, raw = request(self.server.port, "/v1/load_lora_adapter", {"lora_name": name})
                if status >= 500:
                    self.add("errors_5xx", failure=f"load {name}: {status} {raw[:160]!r}")
                self.add("reloads")
            except TRANSPORT:
                self.add("connection_errors")

    def bad(self, seed: int) -> None:
        rng = random.Random(seed)
        cases = [
            ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 10_000}, False),
            ("/v1/completions", b"{not json", False),
            ("/v1/completions", {"model": "base", "prompt": "word " * 400_000}, False),
            ("/v1/completions", {"model": "base", "prompt": "word " * 400_000}, True),
            ("/v1/completions", {"model": "no-such-tenant", "prompt": "x"}, False),
            ("/v1/completions", {"model": "../tenant-a", "prompt": "x"}, False),
            ("/v1/completions", {"model": "base", "prompt": ""}, False),
            ("/v1/completions", {"model": "base", "prompt": "x", "seed": 2**64, "temperature": 1}, False),
            ("/v1/chat/completions", {"model": "base", "messages": []}, False),
            ("/v1/load_lora_adapter", {"lora_name": "/etc"}, False),
            ("/v1/completions", {"model": "base", "prompt": "x", "logit_bias": {"1": 5}}, False),
            ("/v1/chat/completions", {"model": "base", "messages": [{"role": "tool", "content": "x"}]}, False),
        ]
        while self.running():
            path, body, chunked = rng.choice(cases)
            try:
                status, raw = request(self.server.port, path, body, chunked=chunked)
            except TRANSPORT:
                self.add("connection_errors")
                threading.Event().wait(0.5)
                continue
            self.add("bad_requests")
            if not 400 <= status < 500:
                self.add("bad_request_not_4xx", failure=f"{path} {str(body)[:60]}: {status} {raw[:120]!r}")
            threading.Event().wait(0.3)

    def hostile(self, seed: int) -> None:
        """Bad adapters and a tiny temperature, from one tenant, while the others are checked."""
        rng = random.Random(seed)
        while self.running():
            name = rng.choice(HOSTILE)
            try:
                if rng.random() < 0.5:
                    status, raw = request(self.server.port, "/v1/load_lora_adapter", {"lora_name": name})
                else:
                    status, raw = request(self.server.port, "/v1/completions", self.body(name, PROMPTS[0], False))
                self.add("hostile_adapters")
                if status != 400:
                    self.add("hostile_not_400", failure=f"adapter {name}: {status} {raw[:160]!r}")
                prompt = rng.choice(PROMPTS)
                body = {**self.body("tenant-a", prompt, False), "temperature": 1e-40, "seed": 1}
                status, raw = request(self.server.port, "/v1/completions", body)
                self.add("tiny_temperature")
                if answer(status, raw, False) != self.reference[("tenant-a", prompt)]:
                    self.add("mismatches", failure=f"temperature 1e-40: {status} {raw[:160]!r}")
            except TRANSPORT:
                self.add("connection_errors")
            threading.Event().wait(0.5)

    def kill_mid_load(self) -> None:
        """SIGKILL right after a load request goes out, then restart the server on a new port."""
        threading.Thread(
            target=lambda: self._quiet(request, self.server.port, "/v1/load_lora_adapter", {"lora_name": "tenant-b"}),
            daemon=True,
        ).start()
        threading.Event().wait(0.05)
        self.server.kill()
        self.server.start()
        self.add("restarts")

    @staticmethod
    def _quiet(fn, *args) -> None:
        with contextlib.suppress(*TRANSPORT):
            fn(*args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", help="default: V and O in every layer of the embedded backbone")
    ap.add_argument("--seconds", type=float, default=330)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fanlora-soak-"))
    setting = Setting.read(args.setting) if args.setting else vo_setting("embedded")
    setting.write(work / "setting.json")
    source = setting.backbone.get("source", "embedded")
    for i, name in enumerate(TENANTS):
        save_random_adapter(source, setting, work / "adapters" / name, seed=i)
    hostile_adapters(work / "adapters", work / "adapters" / TENANTS[0])
    template = work / "adapters" / TENANTS[0]
    for name in ZIPF:  # hard links: 1,000 registered adapters, no extra disk
        (work / "adapters" / name).mkdir()
        for f in template.iterdir():
            os.link(f, work / "adapters" / name / f.name)
    adapter_mb = sum(f.stat().st_size for f in template.iterdir()) / 2**20
    before = tree_digest(work / "adapters")
    server = Server(work / "setting.json", work / "adapters")
    server.start()
    soak = Soak(server, args.seconds, args.clients, args.max_tokens)
    soak.build_reference()
    server.sample_rss()
    warm_mb = server.rss[0][-1][1] / 2**20
    bound_mb = 1.10 * (warm_mb + KV_MB + PREFIX_MB + (CPU_LORAS + MAX_LORAS + 2) * adapter_mb)
    soak.stop_at = time.monotonic() + args.seconds
    started = time.monotonic()
    threads = [threading.Thread(target=soak.client, args=(i,)) for i in range(args.clients)]
    helpers = (soak.leaver, soak.churn, soak.bad, soak.hostile, soak.burst, soak.zipf)
    threads += [threading.Thread(target=f, args=(100 + i,)) for i, f in enumerate(helpers)]
    for t in threads:
        t.start()
    killed, busy = False, None
    while soak.running():
        server.sample_rss()
        elapsed = time.monotonic() - started
        if not killed and elapsed > args.seconds / 2:
            soak.kill_mid_load()
            killed = True
        if busy is None and elapsed > args.seconds / 3:  # a CPU-bound neighbour through the middle third
            end = time.time() + args.seconds / 3
            busy = subprocess.Popen([sys.executable, "-c", f"import time\nwhile time.time() < {end}: pass"])
        threading.Event().wait(5)
    if busy is not None:
        busy.kill()
        busy.wait()
    for t in threads:
        t.join()
    server.sample_rss()
    stopped, drained = server.stop()
    after = tree_digest(work / "adapters")
    growth = []
    for samples in server.rss:
        warm = [r for t, r in samples if t - samples[0][0] >= 60] if samples else []
        if len(warm) >= 2:
            growth.append((warm[-1] - warm[0]) / 2**20)
    c = soak.counts
    rss_growth = max(growth) if growth else float("nan")
    peak_mb = max(r for samples in server.rss for _, r in samples) / 2**20
    ok = (
        c["errors_5xx"] == 0 and c["mismatches"] == 0 and c["bad_request_not_4xx"] == 0 and before == after
        and peak_mb <= bound_mb and stopped and drained and c["hostile_not_400"] == 0
    )  # fmt: skip
    lines = [
        f"$ python benchmarks/soak.py {' '.join(sys.argv[1:])}",
        f"fanlora serve (subprocess, loopback), embedded backbone, setting of {setting.n_modules} modules, "
        f"{len(TENANTS)} random tenants + base + {len(ZIPF)} Zipf adapters; {args.clients} checking clients, 1 "
        f"leaving, 1 churning, 1 bad, 1 hostile, 1 bursting, 1 Zipf; a neighbour in the middle third; "
        f"{args.seconds:.0f} s, SIGKILL mid-load + restart half-way; greedy, {args.max_tokens} tokens",
        "counts: " + json.dumps(c),
        "RSS per process (MB, every 5 s): "
        + " | ".join(" ".join(f"{r / 2**20:.0f}" for _, r in s) for s in server.rss),
        f"RSS growth after each process's first minute (MB): {', '.join(f'{g:.1f}' for g in growth)}",
        f"RSS peak {peak_mb:.0f} MiB; bound {bound_mb:.0f} MiB = 1.10 × (warm {warm_mb:.0f} + --kv-cache-mb {KV_MB} "
        f"+ --prefix-cache-mb {PREFIX_MB} + {CPU_LORAS + MAX_LORAS + 2} adapters × {adapter_mb:.1f})",
        f"adapter directories unchanged: {before == after}; SIGTERM mid-stream: exit 0 {stopped}, "
        f"stream ended with [DONE] {drained}",
        *(f"failure: {f}" for f in soak.failures),
        f"RESULT requests={c['requests']} errors_5xx={c['errors_5xx']} mismatches={c['mismatches']} "
        f"disconnects={c['disconnects']} reloads={c['reloads']} restarts={c['restarts']} "
        f"hostile_adapters={c['hostile_adapters']} hostile_not_400={c['hostile_not_400']} "
        f"tiny_temperature={c['tiny_temperature']} long_prompts={c['long_prompts']} zipf_requests={c['zipf_requests']} "
        f"clean_drain={stopped and drained} rss_peak_mb={peak_mb:.0f} rss_bound_mb={bound_mb:.0f} "
        f"rss_growth_mb={rss_growth:.1f}",
    ]
    print("\n".join(lines))
    if args.out:
        atomic.write_text(args.out, "\n".join(lines) + "\n")
    if not os.environ.get("KEEP_SOAK_DIR"):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
