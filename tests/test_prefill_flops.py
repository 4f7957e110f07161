"""Closed-form prefill FLOPs (convention "exact") against the prefill lctx compiles.

The compiled side is the HLO walker's count of lctx's one-device prefill
program (bf16, abstract shapes; each lowering takes about 1 s on 2 CPU cores).
The closed form counts what a prefill must compute; the compiled program adds
its blocked attention kernel's surplus (half of every diagonal 512 x 512 block,
padding to a multiple of 512) and the norms' and SwiGLU's arithmetic, so it is
never below the closed form.
"""

import functools

import pytest

from lctx.config import ModelConfig
from lctx.cost import analytic as an
from lctx.cost import metrics
from lctx.model.transformer import PREFILL_BLOCK

MODELS = ("llama-3.2-1b", "llama-3.1-8b", "yi-34b")
CONTEXTS = (4096, 50000)

# exact / compiled measured (jax 0.10.2): 1B 0.984 | 0.985, 8B 0.991 | 0.990,
# 34B 0.993 | 0.992 at 4096 | 50000. Llama-3.2-1B (H = 64, attention-heavy)
# misses 1.5% at 4096 by lctx's kernel's own surplus: half of each diagonal
# 512 x 512 block is 1/8 of all attention FLOPs there (test below).
TOLERANCE = {"llama-3.2-1b": 0.017, "llama-3.1-8b": 0.015, "yi-34b": 0.015}


@functools.lru_cache(maxsize=None)
def config(name):
  return ModelConfig.from_preset(name, param_dtype="bfloat16", dtype="bfloat16")


def compiled_flops(name, T):
  return metrics.program_costs(config(name), "model:1", T, 1, "prefill").flops


def blocked_attention_surplus(c, T, block=PREFILL_BLOCK):
  """FLOPs lctx's blocked causal attention computes beyond the T(T+1)/2 visible
  pairs: nb(nb+1)/2 whole block pairs, nb = ceil(T / block), 4*H per pair and head."""
  nb = -(-T // block)
  per_pair = 4 * c.num_layers * c.num_heads * c.head_dim
  return per_pair * (block * block * nb * (nb + 1) // 2 - T * (T + 1) // 2)


@pytest.mark.parametrize("T", CONTEXTS)
@pytest.mark.parametrize("name", MODELS)
def test_exact_prefill_flops_match_compiled(name, T):
  c = config(name)
  exact, hlo = an.prefill_flops(c, T), compiled_flops(name, T)
  # The compiled program only adds to what a prefill must compute (the old
  # count, 2*P*T with the embedding table and all-T logits, was 2%-22% above it).
  assert exact < hlo
  assert exact == pytest.approx(hlo, rel=TOLERANCE[name])
  # With the kernel's surplus added back, all that is left is norm and SwiGLU
  # arithmetic: within 1.5% for every model.
  assert exact + blocked_attention_surplus(c, T) == pytest.approx(hlo, rel=0.015)


def test_exact_prefill_flops_by_hand():
  """llama-3.1-8b at 4096: L=32, D=4096, F=14336, N=32, K=8, H=128, V=128256."""
  # Per layer: Q and O 2*4096*4096 = 33,554,432; K and V 2*4096*1024 = 8,388,608;
  # SwiGLU 3*4096*14336 = 176,160,768; sum 218,103,808; x 32 = 6,979,321,856.
  layers = 32 * (2 * 4096 * 4096 + 2 * 4096 * 8 * 128 + 3 * 4096 * 14336)
  assert layers == 6_979_321_856 == an.layer_matmul_params(config("llama-3.1-8b"))
  # 2 * 6,979,321,856 * 4096 = 57,174,604,644,352 (all tokens through the layers)
  # + 2 * 4096 * 128256 = 1,050,673,152 (the head, last token only)
  # + 2 * 32 * 32 * 128 * 4096 * 4097 = 4,399,120,252,928 (causal attention)
  # + 3 * 32 * 32 * 4096 * 4097 / 2 = 25,776,095,232 (softmax: max, subtract, sum)
  # = 61,600,551,665,664.
  assert an.prefill_flops(config("llama-3.1-8b"), 4096) == 61_600_551_665_664
  assert an.prefill_flops(config("llama-3.1-8b"), 4096) < 6.3e13  # was 7.02e13
  # Tied embeddings (llama-3.2-1b): the table is read as the head, once.
  c = config("llama-3.2-1b")
  assert c.tie_word_embeddings and c.num_params == 1_235_814_400
  assert an.prefill_flops(c, 1) == (2 * an.layer_matmul_params(c) + 2 * 2048 * 128256
                                    + 16 * 32 * 1 * (4 * 64 + 3))  # one pair per head
