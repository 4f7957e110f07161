"""Closed-form costs against FRAMEWORK.md targets T1-T15 (values typed from its table)."""

from types import SimpleNamespace

import pytest

from lctx.config import ModelConfig
from lctx.cost import analytic as an
from lctx.cost.analytic import GB, GiB

BF16 = "bfloat16"


@pytest.fixture(scope="module")
def yi():
  return ModelConfig.from_preset("yi-34b")


def a100(host=32e9):
  """Local stand-in for an A100 80GB SXM HardwareSpec."""
  return SimpleNamespace(name="a100-80g-sxm", flops=lambda dtype: {"bfloat16": 312e12}[dtype],
                         hbm_bytes=80e9, hbm_bandwidth=2.039e12,
                         interconnect_bandwidth=600e9, host_bandwidth=host)


def close(actual, expected, rel):
  return actual == pytest.approx(expected, rel=rel)


def test_t1_kv_bytes_per_token(yi):
  assert an.kv_bytes_per_token(yi, BF16) == 245_760


@pytest.mark.parametrize("T,gib", [(100_000, 22.888), (4_000, 0.9155)])  # T2, T3
def test_t2_t3_kv_per_user_gib(yi, T, gib):
  assert close(an.kv_bytes_per_user(yi, T, BF16) / GiB, gib, 0.005)


def test_t4_kv_at_50k(yi):
  kv = an.kv_bytes_per_user(yi, 50_000, BF16)
  assert kv == 12_288_000_000
  assert round(kv / GiB, 2) == 11.44


def test_t5_weights(yi):
  assert an.num_params(yi, "paper") == 34e9
  assert an.weight_bytes(yi, BF16, "paper") == 68e9
  assert an.weight_bytes(yi, BF16, "paper", paper_params=34e9) == 68e9
  assert an.weight_bytes(yi, BF16) == 2 * yi.num_params


@pytest.mark.parametrize("T,seconds,rel", [(4_000, 0.894, 0.01), (50_000, 14.34, 0.02)])
def test_t6_t7_prefill_paper(yi, T, seconds, rel):
  t = an.prefill_seconds(yi, T, a100(), 1, BF16, "paper")
  assert close(t, seconds, rel)
  if T == 50_000:  # the paper prints 14.1 s: its formula gives 14.34, a 1.7% gap
    assert close(t, 14.1, 0.02) and not close(t, 14.1, 0.01)


def test_prefill_exact_flops_50k(yi):
  T = 50_000
  # Yi-34B: L=60, D=7168, F=20480, N=56, K=8, H=128, V=64000. Per layer the
  # matrices Q and O 2*7168*7168 = 102,760,448, K and V 2*7168*1024 = 14,680,064,
  # SwiGLU 3*7168*20480 = 440,401,920: 557,842,432 (557,856,768 less the two
  # norms); x 60 = 33,470,545,920.
  #   all tokens through the layers  2 * 33,470,545,920 * 50,000 = 3,347,054,592,000,000
  #   head, last token only          2 * 7168 * 64000             =           917,504,000
  #   causal attention, T(T+1)/2 pairs  2*60*56*128 * 50,000 * 50,001 = 2,150,443,008,000,000
  #   softmax, 3 per pair and head      3*60*56 * 1,250,025,000         =    12,600,252,000,000
  #   total                                                        = 5,510,098,769,504,000
  assert an.prefill_flops(yi, T) == 5_510_098_769_504_000
  # On one A100 (312e12 bf16 FLOP/s): 5.5101e15 / 312e12 = 17.66 s (paper: 14.1 s;
  # FRAMEWORK.md's 17.8 s counts 2*P*T with the embedding table and all-T logits).
  assert close(an.prefill_seconds(yi, T, a100(), 1, BF16), 17.6606, 1e-4)
  assert close(an.recompute_seconds(yi, T, a100(), 1, BF16), 17.6606, 1e-4)
  assert close(an.prefill_seconds(yi, T, 312e12, 2, BF16),
               an.prefill_seconds(yi, T, a100(), 1, BF16) / 2, 1e-12)
  # The paper convention is unchanged: 2 * 34e9 * T + L * D * T^2.
  assert an.prefill_flops(yi, T, "paper") == 2 * 34e9 * T + 60 * 7168 * T**2


def test_decode_roofline_exact_compute_has_no_embedding_lookup(yi):
  # B = 1000 users, compute-bound: 2 * B * (layer matrices + head) / C, not 2 * B * P.
  hw = a100()
  per_token = 2 * (33_470_545_920 + 7168 * 64000)
  assert an.flops_per_token(yi) == per_token
  assert an.flops_per_token(yi, "paper") == 2 * 34e9
  t = an.decode_step_seconds(yi, 1000, 1_000, hw, 1, BF16, model="roofline")
  assert close(t, 1000 * 245_760 * 1_000 / 2.039e12 + 1000 * per_token / 312e12, 1e-12)


@pytest.mark.parametrize("T,ms", [(50_000, 9.84), (4_000, 8.46)])  # T8, T9
def test_t8_t9_decode_paper(yi, T, ms):
  t = an.decode_step_seconds(yi, 1, T, a100(), 4, BF16, "paper")
  assert close(t * 1e3, ms, 0.01)
  assert close(an.decode_step_seconds(yi, 1, T, 2.039e12, 1, BF16, "paper") * 250, ms, 0.01)


def test_decode_exact_reads_only_looked_up_rows(yi):
  B, T = 3, 4_000
  exact = an.decode_step_bytes(yi, B, T, BF16)
  full = 2 * yi.num_params + B * 245_760 * T
  assert full - exact == (64_000 - B) * 7168 * 2  # ~0.92 GB
  tied = yi.replace(tie_word_embeddings=True)
  assert an.decode_step_bytes(tied, B, T, BF16) == 2 * tied.num_params + B * 245_760 * T


def test_decode_roofline(yi):
  hw = a100()
  # Small B: memory-bound, equal to the memory form.
  assert close(an.decode_step_seconds(yi, 1, 4_000, hw, 1, BF16, "paper", model="roofline"),
               an.decode_step_seconds(yi, 1, 4_000, hw, 1, BF16, "paper"), 1e-12)
  # B = 1000 > B_crit ~ 153: weights term replaced by compute 2*B*P/C.
  t = an.decode_step_seconds(yi, 1000, 1_000, hw, 2, BF16, "paper", model="roofline")
  expected = (1000 * 245_760 * 1_000 / 2.039e12 + 2 * 1000 * 34e9 / 312e12) / 2
  assert close(t, expected, 1e-12)


@pytest.mark.parametrize("unit,users", [("GiB", 1), ("GB", 0)])  # T10
def test_t10_concurrency_one_gpu(yi, unit, users):
  c = an.concurrency(yi, 50_000, a100(), 1, BF16, "paper", unit=unit)
  assert c.users == users and c.free_bytes == 12e9


def test_t11_concurrency_four_gpus(yi):
  c = an.concurrency(yi, 50_000, a100(), 4, BF16, "paper")
  assert c.users == 20 and c.shortfall_bytes == 0 and c.free_bytes == 252e9


@pytest.mark.parametrize("T,unit,users", [(100_000, "GiB", 4), (4_000, "GiB", 100),
                                          (100_000, "GB", 3), (4_000, "GB", 93)])  # T12
def test_t12_concurrency_two_gpus(yi, T, unit, users):
  assert an.concurrency(yi, T, a100(), 2, BF16, "paper", unit=unit).users == users


@pytest.mark.parametrize("host,seconds", [(32e9, 0.768), (20e9, 1.229)])  # T13
def test_t13_context_switch(yi, host, seconds):
  assert close(an.context_switch_seconds(yi, 50_000, a100(host), BF16), seconds, 0.01)
  assert close(an.context_switch_seconds(yi, 50_000, host, BF16), seconds, 0.01)
  assert close(an.context_switch_seconds(yi, 50_000, host, BF16, T_in=50_000), seconds, 0.01)


@pytest.mark.parametrize("g,users", [(1, 0), (2, 7), (4, 20), (8, 46)])  # T14
def test_t14_concurrency_vs_devices(yi, g, users):
  assert an.concurrency(yi, 50_000, a100(), g, BF16, "paper", unit="GB").users == users


def test_t15_mha_variant(yi):
  mha = yi.replace(num_kv_heads=56)
  assert an.kv_bytes_per_token(mha, BF16) == 1_720_320 == 7 * 245_760


def test_concurrency_nothing_fits(yi):
  # One GPU, exact weights (68.78 GB) + 8 GB reserve: 3.22 GB free < 12.288 GB per user.
  c = an.concurrency(yi, 50_000, a100(), 1, BF16, reserve_bytes=8e9)
  assert c.users == 0
  assert close(c.shortfall_bytes, 12.288e9 - (80e9 - 2 * yi.num_params - 8e9), 1e-12)
  # Weights alone exceed HBM: still 0 users, never negative.
  c = an.concurrency(yi, 4_000, 40e9, 1, BF16)
  assert c.users == 0 and c.free_bytes < 0 and c.shortfall_bytes > 0.983e9


def test_report_helpers():
  assert an.to_unit(12.288e9, "GB") == 12.288
  assert an.fmt_bytes(12.288e9, "GiB", 2) == "11.44 GiB"


@pytest.mark.parametrize("call,match", [
    (lambda c: an.prefill_flops(c, 4_000, "approx"), "convention"),
    (lambda c: an.kv_bytes_per_user(c, 0), "T"),
    (lambda c: an.kv_bytes_per_user(c, -5), "T"),
    (lambda c: an.kv_bytes_per_user(c, 4.5), "T"),
    (lambda c: an.decode_step_bytes(c, 0, 4_000), "B"),
    (lambda c: an.prefill_seconds(c, 4_000, a100(), 0), "g"),
    (lambda c: an.concurrency(c, 4_000, a100(), True), "g"),
    (lambda c: an.weight_bytes(c, "int4"), "dtype"),
    (lambda c: an.concurrency(c, 4_000, a100(), unit="MB"), "unit"),
    (lambda c: an.concurrency(c, 4_000, a100(), reserve_bytes=-1), "reserve_bytes"),
    (lambda c: an.decode_step_seconds(c, 1, 4_000, a100(), model="peak"), "model"),
    (lambda c: an.decode_step_seconds(c, 1, 4_000, object()), "hbm_bandwidth"),
    (lambda c: an.context_switch_seconds(c, 4_000, 0), "host_bandwidth"),
    (lambda c: an.num_params(c, "paper", paper_params=0), "paper_params"),
])
def test_bad_inputs(yi, call, match):
  with pytest.raises(ValueError, match=match):
    call(yi)


def test_paper_targets_table():
  """lctx.cost.paper: every T1-T15 figure within 2% of what the paper prints
  (T7: its formula gives 14.34 s against the printed 14.1 s), counts exact."""
  from lctx.config import ModelConfig
  from lctx.cost import paper
  from lctx.cost.hardware import load_hardware
  rows = paper.targets(ModelConfig.from_preset("yi-34b"), load_hardware("a100-80g-sxm"))
  assert [t.id for t in rows][:3] == ["T1", "T2", "T3"] and len({t.id for t in rows}) == 15
  for t in rows:
    assert abs(t.diff_percent) <= (2.0 if t.id == "T7" else 0.6), t
    if t.unit == "users":
      assert t.ours == t.paper, t
  assert 1.0 < next(t for t in rows if t.id == "T7").diff_percent < 2.0
