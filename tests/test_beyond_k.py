"""A model axis beyond the KV heads (m > K, lctx.sharding.Plan): each device
keeps its m-th of the query heads, so its attention costs what it costs with
K = m; only the KV heads are replicated (m / K devices each), never the work.

Compiled per-device FLOPs (lctx.cost.metrics.program_costs, 8 fake devices)
of a K = 4 and K = 2 conversion of a K = 8 model on model:8 against the K = 8
model's: the query heads, MLP and vocabulary split 8 ways in all three, and
each device projects one KV head (K / min(m, K) = 1) in all three, so the
programs' FLOPs differ by nothing but the K/V projections' difference, which
is 0 here (computed below). Before the chunked prefill's cache segment kept
the query heads split over model_rep, it ran the whole segment on every
model_rep device (m / K times the attention over the cache).
"""

import pytest

from lctx.config import ModelConfig
from lctx.cost import metrics

MESH, M = "model:8", 8
T, CHUNK = 2048, 512
# N = 16 query heads, K = 8 KV heads: head_dim 16, D = 128 (attention dominates at T = 2048).
BASE = ModelConfig.from_preset("tiny").replace(num_heads=16, num_kv_heads=8, hidden_size=128,
                                               head_dim=16, intermediate_size=256,
                                               vocab_size=512)


def kv_projection_flops(config: ModelConfig, tokens: int) -> float:
  """Per-device FLOPs of one program's K and V projections: each device
  projects its K / min(m, K) KV heads (replicated beyond K), every layer."""
  heads = config.num_kv_heads // min(M, config.num_kv_heads)
  return 2 * 2 * tokens * config.hidden_size * heads * config.head_dim * config.num_layers


@pytest.mark.parametrize("kind,chunk,kv_compression", [
    ("prefill", None, ""), ("prefill", CHUNK, ""), ("decode", None, ""),
    ("prefill", CHUNK, "int8")])
def test_flops_per_device_do_not_grow_beyond_k(kind, chunk, kv_compression):
  tokens = T if kind == "prefill" else 1
  costs = lambda c: metrics.program_costs(c, MESH, T, 1, kind, chunk=chunk,
                                          kv_compression=kv_compression)
  reference = costs(BASE)
  for K in (4, 2):
    config = BASE.replace(num_kv_heads=K)
    expected = reference.flops + kv_projection_flops(config, tokens) - kv_projection_flops(
        BASE, tokens)
    got = costs(config).flops
    assert got == pytest.approx(expected, rel=0.01), (
        f"{kind} chunk={chunk} {kv_compression or 'dense'}: K={K} on {MESH} does "
        f"{got / expected:.2f}x the per-device FLOPs expected (K=8: {reference.flops:.4g})")
