"""Text in, text out: a model's tokenizer and chat template.

`load_tokenizer(path)` reads either a GGUF file (the tokenizer lives in its
`tokenizer.*` metadata, as llama.cpp writes it) or a Hugging Face checkpoint
directory (tokenizer.json + tokenizer_config.json). The BPE itself runs in the
`tokenizers` package (Hugging Face's Rust tokenizer); lctx only configures it
from the metadata. Chat templates are rendered with jinja2 in a sandbox, as
transformers' `apply_chat_template` does.

GGUF byte-level BPE (tokenizer.ggml.model = "gpt2") is supported. Its text
splitting depends on `tokenizer.ggml.pre`, which names one of llama.cpp's
pre-tokenizers (llama-vocab.cpp); PRE_TOKENIZERS maps each supported name to
llama.cpp's regexes, applied in order as llama.cpp does. An unknown name is an
error: a silently wrong split gives plausible but wrong token ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by tokenizer.ggml.pre.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_DIGIT = r"\p{N}"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's fallback for a file whose pre-tokenizer its converter did not
# recognise ("default", or no tokenizer.ggml.pre). transformers uses the GPT-2
# split alone there; lctx follows llama.cpp, the runtime such files are made for.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT, "gpt2": (_GPT2,), "mpt": (_GPT2,), "olmo": (_GPT2,),
    "smollm": (_DIGIT, _GPT2), "starcoder": (_DIGIT, _GPT2), "refact": (_DIGIT, _GPT2),
    "command-r": (_DIGIT, _GPT2), "codeshell": (_DIGIT, _GPT2),
    "llama-bpe": (_LLAMA3,), "llama3": (_LLAMA3,), "smaug-bpe": (_LLAMA3,), "dbrx": (_LLAMA3,),
    "qwen2": (_QWEN2,), "deepseek-r1-qwen": (_QWEN2,),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A model's tokenizer: `backend` is a `tokenizers.Tokenizer`.

  encode(text) -> list[int] (BOS prepended when add_bos_token: the backend's
  post-processor adds it);
  decode(ids) -> str; apply_chat_template(messages) -> str.
  eos_token_ids: every id that ends generation (the first is the EOS token).
  """
  backend: Any
  bos_token_id: int | None
  eos_token_ids: tuple[int, ...]
  pad_token_id: int | None
  add_bos_token: bool
  chat_template: str | None
  source: str

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def eos_token_id(self) -> int | None:
    return self.eos_token_ids[0] if self.eos_token_ids else None

  def token(self, token_id: int | None) -> str | None:
    return None if token_id is None else self.backend.id_to_token(int(token_id))

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; special tokens written in the text ("<|im_start|>")
    stay whole. BOS is prepended when the model asks for it (add_special_tokens)."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of token ids; ValueError for an id that is not an integer in [0, vocab_size)."""
    bad = [i for i in ids if not isinstance(i, (int, np.integer)) or isinstance(i, bool)
           or not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"decode: ids {bad[:10]} are not token ids in [0, {self.vocab_size})")
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The model's chat template rendered for `messages` ([{"role", "content"}]),
    with jinja2's sandbox, trim_blocks and lstrip_blocks (transformers' settings).
    Raises ValueError when the model defines no template."""
    if not self.chat_template:
      raise ValueError(f"{self.source} defines no chat template (tokenizer.chat_template)")
    return _render(self.chat_template, messages=list(messages),
                   add_generation_prompt=add_generation_prompt,
                   bos_token=self.token(self.bos_token_id) or "",
                   eos_token=self.token(self.eos_token_id) or "")


def _render(template: str, **context) -> str:
  from jinja2 import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  try:
    return env.from_string(template).render(**context)
  except (TemplateError, TypeError) as e:  # TypeError: e.g. a message content of None
    raise ValueError(f"chat template: {type(e).__name__}: {e}") from e


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """The tokenizer of a GGUF file or of a Hugging Face checkpoint directory.

  Raises FileNotFoundError (nothing there) and ValueError (a GGUF without a
  tokenizer, or with a tokenizer model / pre-tokenizer lctx does not build,
  each naming the allowed values).
  """
  path = Path(path).expanduser()
  if path.name == "tokenizer.json" and path.is_file():
    path = path.parent  # its tokenizer_config.json sits beside it
  if path.is_dir():
    return _from_hf_dir(path)
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer at {path} (a .gguf file or an HF checkpoint directory)")
  from lctx.gguf_import import _reader
  return tokenizer_from_gguf_metadata(
      {k: f.contents() for k, f in _reader(path).fields.items() if k.startswith("tokenizer.")},
      source=str(path))


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str = "gguf") -> Tokenizer:
  """A Tokenizer from GGUF `tokenizer.*` metadata (keys as llama.cpp writes them)."""
  from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
  from tokenizers import Tokenizer as Backend

  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    raise ValueError(f"{source}: no tokenizer in the metadata (tokenizer.ggml.model absent)")
  if kind != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; allowed: "
                     f"'gpt2' (byte-level BPE)")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; allowed: "
                     f"{sorted(PRE_TOKENIZERS)}")
  tokens = list(meta["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  if not merges:
    raise ValueError(f"{source}: tokenizer.ggml.merges is empty; a byte-level BPE needs them")
  backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  backend.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type", []))
  # Control tokens (<|im_start|>...) and user-defined ones match whole, never split.
  backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                              for i, t in enumerate(types) if t == _CONTROL])
  backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                      for i, t in enumerate(types) if t == _USER_DEFINED])
  if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"{source}: special tokens outside the {len(tokens)}-token vocabulary")

  def token_id(key):
    value = meta.get(f"tokenizer.ggml.{key}")
    return None if value is None else int(value)

  # BOS / EOS added around the text where the file asks (llama.cpp's rule).
  added = {}
  for end, key in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
    if meta.get(f"tokenizer.ggml.add_{end}_token", False):
      if token_id(key) is None:
        raise ValueError(f"{source}: tokenizer.ggml.add_{end}_token is set but there is no "
                         f"tokenizer.ggml.{key}")
      added[end] = token_id(key)
  if added:
    bos = [tokens[added["bos"]]] if "bos" in added else []
    eos = [tokens[added["eos"]]] if "eos" in added else []
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos), pair=" ".join(bos + ["$A", "$B"] + eos),
        special_tokens=list(dict.fromkeys((tokens[i], i) for i in added.values())))
  add_bos = "bos" in added

  eos = [token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")]
  return Tokenizer(backend=backend, bos_token_id=token_id("bos_token_id"),
                   eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
                   pad_token_id=token_id("padding_token_id"),
                   add_bos_token=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"), source=source)


def _from_hf_dir(path: Path) -> Tokenizer:
  """tokenizer.json (+ tokenizer_config.json, generation_config.json) of an HF checkpoint."""
  from tokenizers import Tokenizer as Backend
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path}: no tokenizer.json (lctx reads HF fast tokenizers only)")
  backend = Backend.from_file(str(path / "tokenizer.json"))
  backend.no_truncation()  # a saved max_length or padding would cut or pad prompts silently
  backend.no_padding()

  def read(name):
    f = path / name
    return json.loads(f.read_text()) if f.is_file() else {}

  tok_config, gen_config = read("tokenizer_config.json"), read("generation_config.json")

  def token_id(token):
    if isinstance(token, dict):  # {"content": "<s>", ...}
      token = token.get("content")
    return None if token is None else backend.token_to_id(token)

  eos = gen_config.get("eos_token_id", read("config.json").get("eos_token_id"))
  eos_ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
  eos_ids = [token_id(tok_config.get("eos_token"))] + eos_ids
  template = tok_config.get("chat_template")
  if template is None and (path / "chat_template.jinja").is_file():
    template = (path / "chat_template.jinja").read_text()
  # tokenizer.json's post-processor adds BOS itself where the model wants it.
  bos = token_id(tok_config.get("bos_token"))
  adds_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
  return Tokenizer(backend=backend, bos_token_id=bos,
                   eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
                   pad_token_id=token_id(tok_config.get("pad_token")), add_bos_token=adds_bos,
                   chat_template=template, source=str(path))
