"""Loading a model and tokenizer from a local folder or a hub id, with one-line errors."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import InputError, UnsupportedModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _refuse_early(ref: str) -> None:
    """Build the architecture on the meta device (no weights, no memory) and adapt it, so an unsupported or
    dense model is refused before gigabytes of weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapt

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"cannot read the config of {ref} ({first[:160]}); no hub is reachable here: "
                         "pass a local folder") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsupportedModelError(f"cannot trace {ref}: {first[:200]}") from None
    adapt(skeleton)


def load_model(ref: str, *, device: str | None = None, dtype: str = "auto", device_map: str | None = None):
    """Return (model, tokenizer) for a local folder or a hub id.

    `device_map` (e.g. "auto") spreads a big model over several GPUs with accelerate; the tracer's hooks
    copy from whichever device each layer lives on.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(ref).expanduser()
    looks_local = path.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref)
    if looks_local and not path.exists():
        raise InputError(f"model path {ref} does not exist; pass a local model folder or a hub id like org/name")
    if looks_local and not (path / "config.json").exists():
        raise InputError(f"{ref} has no config.json; pass a folder saved with save_pretrained() or a hub id")
    if dtype not in DTYPES:
        raise InputError(f"unknown --dtype {dtype}; use one of {', '.join(sorted(set(DTYPES)))}")
    torch_dtype = DTYPES[dtype] if DTYPES[dtype] == "auto" else getattr(torch, DTYPES[dtype])
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep non-interactive stderr to our own one-line messages
    _refuse_early(str(path) if looks_local else ref)
    kwargs = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else ref, **kwargs)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UnsupportedModelError(f"cannot load {ref}: {first}") from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(
            f"cannot load model {ref} ({first[:160]}); no hub is reachable here: pass a local folder"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_local else ref)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(f"cannot load the tokenizer of {ref} ({first[:160]}); save it next to the model") from None
    if device and not device_map:
        model = model.to(device)
    return model.eval(), tokenizer
