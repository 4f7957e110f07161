"""lctx.load_tokenizer against transformers' tokenizer of the same GGUF file
(ids, decoding, chat template), its errors, and an HF directory's tokenizer."""

import json
import os

import pytest
from conftest import importorskip, smollm2_gguf

from lctx.tokenizer import PRE_TOKENIZERS, load_tokenizer, tokenizer_from_gguf_metadata

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It's 2024: they've sold 1,234,567 units at $3.99 (a 12.5% rise) -- don't   they?",
    "def f(x):\n    return x ** 2  # squares\n\n\tindented\r\nwindows line",
    "Unicode: café, naïve, Zürich, 東京, Москва, 🙂🚀 and e\u0301 combining.",
    "  leading and trailing spaces   ",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def pair():
  """(lctx tokenizer, transformers tokenizer) of the SmolLM2 GGUF."""
  path = smollm2_gguf()
  transformers = importorskip("transformers")
  folder, name = os.path.split(path)
  return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_gguf_tokenizer(pair, text):
  tok, ref = pair
  ids = tok.encode(text)
  assert ids == ref(text)["input_ids"]
  assert tok.decode(ids) == text == ref.decode(ids)


def test_special_tokens_and_digits(pair):
  tok, _ = pair
  assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.add_bos_token) == (
      1, (2,), 2, False)
  assert tok.token(2) == "<|im_end|>" and tok.vocab_size == 49152
  # Control tokens written in the text stay whole ...
  assert tok.encode("<|im_start|>") == [1]
  # ... and digits split one by one (llama.cpp's "smollm" pre-tokenizer).
  assert len(tok.encode("2024")) == 4


def test_chat_template_equals_transformers(pair):
  tok, ref = pair
  for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Name a colour."}]):
    for gen in (True, False):
      assert tok.apply_chat_template(messages, add_generation_prompt=gen) == (
          ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert text.endswith("<|im_start|>assistant\n")


def _meta(**changes):
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
          "tokenizer.ggml.token_type": [1, 1, 1, 3], "tokenizer.ggml.merges": ["a b"],
          "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.eos_token_id": 3}
  meta.update(changes)
  return {k: v for k, v in meta.items() if v is not None}


def test_small_metadata_bpe_and_bos():
  tok = tokenizer_from_gguf_metadata(_meta())
  assert tok.encode("abab") == [2, 2] and tok.encode("aba") == [2, 0]
  assert tok.encode("<s>ab") == [3, 2]
  bos = tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": True}))
  assert bos.encode("ab") == [3, 2] and bos.encode("ab", add_special_tokens=False) == [2]


def test_errors_name_the_key_and_allowed_values(tmp_path):
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model='llama' is not supported; "
                                       r"allowed: 'gpt2'"):
    tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.model": "llama"}))
  with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='klingon' is not supported; "
                                       r"allowed: \[.*'smollm'"):
    tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": "klingon"}))
  with pytest.raises(ValueError, match="no tokenizer in the metadata"):
    tokenizer_from_gguf_metadata({})
  with pytest.raises(ValueError, match="add_bos_token is set but there is no"):
    tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": True,
                                          "tokenizer.ggml.bos_token_id": None}))
  with pytest.raises(ValueError, match="defines no chat template"):
    tokenizer_from_gguf_metadata(_meta()).apply_chat_template([{"role": "user", "content": "x"}])
  with pytest.raises(FileNotFoundError, match="no tokenizer at"):
    load_tokenizer(tmp_path / "absent.gguf")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(tmp_path)
  assert {"gpt2", "smollm", "llama-bpe", "qwen2"} <= set(PRE_TOKENIZERS)


def test_gguf_without_tokenizer_is_an_error(tmp_path):
  from test_gguf import write_gguf
  with pytest.raises(ValueError, match="no tokenizer in the metadata"):
    load_tokenizer(write_gguf(tmp_path / "bare.gguf"))


def test_hf_directory_tokenizer(tmp_path):
  """tokenizer.json + tokenizer_config.json + generation_config.json, as an
  HF checkpoint has them: the same ids, BOS found from the post-processor,
  EOS ids from the configs, the chat template from tokenizer_config.json."""
  tok = tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": True}))
  tok.backend.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": {"content": "<s>"},
       "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 2]}))
  hf = load_tokenizer(tmp_path)
  assert hf.encode("abab") == tok.encode("abab") == [3, 2, 2]
  assert (hf.bos_token_id, hf.eos_token_ids, hf.add_bos_token) == (3, (3, 2), True)
  assert hf.apply_chat_template([{"role": "user", "content": "ab"}]) == "<s>ab"


def test_default_pre_tokenizer_is_llama_cpps():
  """No tokenizer.ggml.pre (or "default"): llama.cpp's fallback regexes
  (punctuation runs, GPT-2, digit runs, three-digit groups), not GPT-2 alone."""
  from tokenizers import Regex, pre_tokenizers
  split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated")
                                   for r in PRE_TOKENIZERS["default"]])
  assert [p for p, _ in split.pre_tokenize_str("Pay $12345 now!")] == [
      "Pay", " ", "$", "123", "45", " now", "!"]
  no_pre = tokenizer_from_gguf_metadata(_meta(**{"tokenizer.ggml.pre": None}))
  assert no_pre.backend.pre_tokenizer.__getstate__() == tokenizer_from_gguf_metadata(
      _meta(**{"tokenizer.ggml.pre": "default"})).backend.pre_tokenizer.__getstate__()


def test_add_eos_token_and_input_checks():
  meta = _meta(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True,
                  "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>", "</s>"],
                  "tokenizer.ggml.token_type": [1, 1, 1, 3, 3],
                  "tokenizer.ggml.eos_token_id": 4})
  tok = tokenizer_from_gguf_metadata(meta)
  assert tok.encode("ab") == [3, 2, 4] and tok.encode("ab", add_special_tokens=False) == [2]
  for bad in ([5], [-1], [1.5], [True]):
    with pytest.raises(ValueError, match=r"decode: ids .* are not token ids in \[0, 5\)"):
      tok.decode(bad)
  templated = tokenizer_from_gguf_metadata(_meta(**{
      "tokenizer.chat_template": "{{ messages[0]['content'] + '!' }}"}))
  with pytest.raises(ValueError, match="chat template: TypeError"):
    templated.apply_chat_template([{"role": "user", "content": None}])


def test_hf_tokenizer_json_saved_with_truncation_is_not_truncated(tmp_path):
  tok = tokenizer_from_gguf_metadata(_meta())
  tok.backend.enable_truncation(max_length=2)
  tok.backend.enable_padding(length=6, pad_id=3, pad_token="<s>")
  tok.backend.save(str(tmp_path / "tokenizer.json"))
  hf = load_tokenizer(tmp_path / "tokenizer.json")  # the file itself works too
  assert hf.encode("ababab") == [2, 2, 2]
