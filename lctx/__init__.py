"""lctx: long-context serving costs from a runnable JAX/Flax Llama-family model."""

from lctx import sharding
from lctx.cache import KVCache, init_cache
from lctx.config import ModelConfig
from lctx.convert import mha_to_gqa
from lctx.engine import decode_step, forward, generate, kept_positions, prefill
from lctx.model.params import abstract_params, init_params, stack_layers, unstack_layers
from lctx.sampling import SamplingConfig

__all__ = [
    "KVCache", "ModelConfig", "SamplingConfig", "abstract_params", "decode_step", "forward",
    "generate", "init_cache", "init_params", "kept_positions", "load_gguf_checkpoint", "load_hf_checkpoint", "load_tokenizer",
    "mha_to_gqa", "prefill", "restore_params",
    "save_params", "sharding", "stack_layers", "unstack_layers",
]


def __getattr__(name):
  # Checkpoint I/O pulls in orbax and safetensors: import it on first use only.
  if name in ("load_hf_checkpoint", "save_params", "restore_params"):
    from lctx import checkpoint
    return getattr(checkpoint, name)
  if name == "load_gguf_checkpoint":  # pulls in the gguf package
    from lctx import gguf_import
    return gguf_import.load_gguf_checkpoint
  if name == "load_tokenizer":  # pulls in tokenizers (and gguf for .gguf files)
    from lctx import tokenizer
    return tokenizer.load_tokenizer
  raise AttributeError(f"module 'lctx' has no attribute {name!r}")
