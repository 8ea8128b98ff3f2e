"""Full-model parity with transformers' DeepseekV4ForCausalLM (fp32, eager), through save_pretrained."""

from __future__ import annotations

import numpy as np
import pytest

import dsv4_jax
from conftest import PARITY_CASES, tiny
from dsv4_jax.model.config import HASH_MOE
from dsv4_jax.model.rope import default_inv_freq, inv_freq_for


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| over the whole tensor."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_logits_match_reference(reference_case, name):
    case = reference_case(name)
    model = dsv4_jax.from_pretrained(case.path, dtype="float32")
    logits = np.asarray(model(case.ids))
    assert logits.shape == case.ref_logits.shape
    assert rel_err(logits, case.ref_logits) < 1e-5
    np.testing.assert_array_equal(logits.argmax(-1), case.ref_logits.argmax(-1))


def test_cases_cover_the_features():
    """Guard the parity matrix itself: each advertised feature is really exercised."""
    kinds, mlps, above, below, bent, batched, odd = set(), set(), False, False, False, False, False
    hc_mults, exact = set(), False
    for cfg, batch, seq in PARITY_CASES.values():
        kinds |= set(cfg.layer_types)
        mlps |= set(cfg.mlp_layer_types)
        hc_mults.add(cfg.hc_mult)
        entries = seq // cfg.csa_compress_rate
        above |= entries > cfg.index_topk
        below |= entries < cfg.index_topk
        exact |= entries == cfg.index_topk
        bent |= not np.allclose(inv_freq_for(cfg, "compress"),
                                default_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta))
        batched |= batch > 1
        odd |= seq % cfg.csa_compress_rate != 0 and seq % cfg.hca_compress_rate != 0
    assert len(kinds) == 3 and len(mlps) == 2
    assert above and below and bent and batched and odd and exact
    assert hc_mults == {2, 3, 4}


def _bf16_vs_fp32(path, ids):
    ref32 = np.asarray(dsv4_jax.from_pretrained(path, dtype="float32")(ids))
    ours16 = np.asarray(dsv4_jax.from_pretrained(path, dtype="bfloat16")(ids))
    assert np.isfinite(ours16).all()
    per_position = np.abs(ours16 - ref32).max(-1) / np.abs(ref32).max()
    return ref32, ours16, per_position


def test_bf16_without_discrete_choices_is_close_to_fp32(tmp_path):
    """bf16 vs fp32 on the same weights where no top-k decision can flip (hash routing only, index_topk
    above the entry count): per-position max |error| / max |logit| stays below 8%, median below 2.5%.
    Measured: median 1.4%, 90th percentile 2.2%, max 5.0%.
    """
    from reference import build_reference

    cfg = tiny(mlp_layer_types=(HASH_MOE,) * 5, index_topk=64)
    build_reference(cfg, seed=3).save_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 67))
    _, _, err = _bf16_vs_fp32(tmp_path, ids)
    print(f"bf16 vs fp32 (no discrete choices): median {np.median(err):.4f}, max {err.max():.4f}")
    assert err.max() < 0.08 and np.median(err) < 0.025


def test_bf16_full_model_tracks_fp32(reference_case):
    """With learned routing and indexer selection, bf16 rounding flips some near-tied top-k choices,
    which changes those tokens' paths (measured: median 2.4%, max 43% at the flipped positions).
    Bound: median per-position error below 3% and greedy tokens equal at >= 80% of positions.
    """
    case = reference_case("mixed")
    ref32, ours16, err = _bf16_vs_fp32(case.path, case.ids)
    print(f"bf16 vs fp32 (full model): median {np.median(err):.4f}, p90 {np.percentile(err, 90):.4f}, "
          f"max {err.max():.4f}")
    assert np.median(err) < 0.03
    assert (ours16.argmax(-1) == ref32.argmax(-1)).mean() >= 0.8
