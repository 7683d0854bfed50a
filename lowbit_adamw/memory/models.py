"""Models built on the meta device from a built-in name, a Hub id, or a config.json."""
from __future__ import annotations

import os

import torch
from torch import nn

from .catalog import MODEL_CONFIGS, builtin_name


def model_class(config):
    """The class a config describes: its own ``architectures[0]`` when transformers has it; else an encoder
    (a masked-LM model type whose config is not a decoder, e.g. BERT) as its masked LM, a causal LM when the
    model type has one, else the bare model."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return AutoModelForMaskedLM
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModel


def from_config(config, **kw) -> nn.Module:
    cls = model_class(config)
    return cls.from_config(config, **kw) if hasattr(cls, "from_config") and cls.__name__.startswith("Auto") else cls._from_config(config, **kw)


def _config(spec: str):
    from transformers import AutoConfig

    name = builtin_name(spec)
    if name is not None:
        fields = dict(MODEL_CONFIGS[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if os.path.isfile(spec) or os.path.isdir(spec):
        return AutoConfig.from_pretrained(os.path.dirname(spec) or "." if os.path.isfile(spec) else spec)
    try:  # a Hub id whose config is already in the local Hugging Face cache (never downloads)
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise ValueError(f"unknown model {spec!r}: use one of {', '.join(['tinylm', *MODEL_CONFIGS])} (any case, Hub ids of "
                         "these included) or a path to a config.json; another Hub id needs its config.json downloaded") from None


def default_dtype(spec) -> torch.dtype | None:
    """The dtype a model is priced in when none is asked for: bf16 for the built-in LLMs (as they are trained and
    fine-tuned), a config's own ``torch_dtype``, else the module's dtype (None)."""
    if not isinstance(spec, str):
        return None
    name = builtin_name(spec)
    if name is not None:
        return None if name in ("tinylm", "gpt2") else torch.bfloat16
    try:
        config = _config(spec)
    except (ImportError, ValueError, OSError):
        return None
    dt = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def load_model(spec: str | nn.Module, dtype: torch.dtype | None = None, device: str | torch.device = "meta") -> nn.Module:
    """A model from a built-in name or Hub id (``MODEL_CONFIGS``, ``"tinylm"``, case-insensitive), a config.json
    path, a Hub id in the local cache, or a module (returned as is)."""
    if isinstance(spec, nn.Module):
        return spec
    with torch.device(device):
        if builtin_name(spec) == "tinylm":
            from ..tinylm import TinyLM

            model = TinyLM()
        else:
            try:
                import transformers  # noqa: F401
            except ImportError as e:
                raise ImportError(f"model {spec!r} needs transformers to build its config: pip install transformers "
                                  "(or use model='tinylm' or pass an nn.Module)") from e
            model = from_config(_config(spec))
    if dtype is not None:
        model = model.to(dtype)
    return model
