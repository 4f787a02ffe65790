"""MFU's two halves: the model FLOPs of a step against a count by hand, the attention pairs a
batch's masks let through, and the peak (the faster of the compute dtype and float32, measured
once per process, never below a rate a step reached nor the best an earlier run measured)."""

import json

import jax
import numpy as np

from mistral_jax.arch import configs
from train.compute import flops

# Per layer: q [8, 2 x 4] 64 weights, k and v [8, 1 x 4] 32 each, o 64, gate / up / down 128
# each: 576. The LM head [8, 32]: 256.
TINY = configs.MistralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=4, sliding_window=None)


def test_full_fine_tuning_is_six_flops_per_weight_and_twelve_per_pair_and_head_dim():
    step = flops.training_flops(TINY)
    assert step.per_token == 6 * (2 * 576 + 256)
    assert step.per_pair == 2 * 12 * 2 * 4  # layers x 12 x heads x head_dim


def test_lora_counts_no_weight_gradient_of_frozen_weights():
    """LoRA rank 2 on q and v: a frozen weight costs 4 FLOPs a token above the lowest adapter
    (forward 2, input gradient 2) and 2 below it; the adapters x A B their own products."""
    step = flops.training_flops(TINY, lora_targets=["q", "v"], lora_rank=2)
    # An adapter of a weight [n_in, n_out] at rank r: forward 2r(n_in + n_out); backward dB
    # 2r n_out, d(xA) 2r n_out, dA 2r n_in, and dx 2r n_in when something below is trained.
    q_adapter = 2 * 2 * (8 + 8) + 2 * 2 * 8 + 2 * 2 * 8 + 2 * 2 * 8  # 160, no dx
    v_adapter = 2 * 2 * (8 + 4) + 2 * 2 * 4 + 2 * 2 * 4 + 2 * 2 * 8  # 112, no dx
    layer0 = (2 * (64 + 32 + 32)  # q, k, v read the embedding: nothing trained below them
              + 4 * (64 + 3 * 128)  # o and the MLP lie above q's adapter
              + q_adapter + v_adapter)
    layer1 = 4 * 576 + (q_adapter + 2 * 2 * 8) + (v_adapter + 2 * 2 * 8)  # dx everywhere
    head = 4 * 256
    assert (layer0, layer1) == (2320, 2640)
    assert step.per_token == layer0 + layer1 + head == 5984
    # Attention, per pair and per head dim and head: forward 4; layer 0 backward: dV, dP, dQ
    # (q and v are adapted, k is not: no dK); layer 1 backward: all 8.
    assert step.per_pair == 2 * 4 * (4 + 6) + 2 * 4 * (4 + 8)
    # The count before: 6 per weight, as if every weight were trained; 1.41x too many.
    assert flops.training_flops(TINY).per_token / step.per_token > 1.4


def test_lora_on_the_mlp_alone_needs_no_backward_through_layer_0s_attention():
    step = flops.training_flops(TINY, lora_targets=["down"], lora_rank=1)
    assert step.per_pair == 2 * 4 * 4 + 2 * 4 * 12  # layer 0 forward only
    down = 2 * (16 + 8) + 4 * 8 + 2 * 16  # forward, dB and d(xA), dA; no dx in layer 0
    layer0 = 2 * (64 + 32 + 32 + 64 + 2 * 128) + 2 * 128 + down
    layer1 = 4 * 576 + down + 2 * 16
    assert step.per_token == layer0 + layer1 + 4 * 256


def test_gpt2_layers_are_counted_too():
    gpt2 = configs.preset("gpt2-tiny")
    d, f = gpt2.n_embd, gpt2.n_inner
    step = flops.training_flops(gpt2)
    assert step.per_token == 6 * gpt2.n_layer * (4 * d * d + 2 * d * f) + 6 * d * gpt2.vocab_size


def test_attention_pairs_follow_the_mask():
    segments = np.array([[0, 0, 0, 1, 1, -1]])  # two documents, then padding
    assert flops.attention_pairs(segments, None, True) == (1 + 2 + 3) + (1 + 2)
    assert flops.attention_pairs(segments, None, False) == 1 + 2 + 3 + 4 + 5
    assert flops.attention_pairs(segments, 2, True) == (1 + 2 + 2) + (1 + 2)
    batch = np.stack([segments, segments])[:, None]  # [grad_accum, micro, seq]
    assert flops.attention_pairs(batch, None, True) == 2 * 9
    # A row of one causal document, as the bench feeds: (T + 1) / 2 keys a query on average.
    assert flops.training_flops_per_token(TINY, 6) == (
        flops.training_flops(TINY).per_token + flops.training_flops(TINY).per_pair * 21 / 6)


class Chip:
    """A device as the peak sees one."""

    platform, process_index, device_kind = "gpu", 0, "a chip the test made up"


def test_the_peak_is_the_faster_dtype_measured_once_per_process(monkeypatch, tmp_path):
    """A step in bfloat16 keeps norms, softmax and the loss in float32: on a CPU whose bfloat16
    matmul is slower, the float32 one is the peak the step can reach. A step seen faster than
    the peak means the machine was busy when it was measured: it is measured again, and the
    peak is never below what a step reached."""
    calls = []

    def measured(devices, dtype, n, runs):
        calls.append((len(devices), dtype))
        return {"float32": 100.0, "bfloat16": 40.0}[dtype]

    monkeypatch.setattr(flops, "matmul_flops_per_s", measured)
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path))
    chips = [Chip(), Chip()]
    assert flops.peak_flops_per_s(chips, "bfloat16") == 100.0
    assert flops.peak_flops_per_s(chips, "bfloat16", at_least=90.0) == 100.0
    assert flops.peak_flops_per_s(chips, "float32") == 100.0
    assert sorted(calls) == [(2, "bfloat16"), (2, "float32"), (2, "float32")]  # once each
    assert flops.peak_flops_per_s(chips, "float32", at_least=150.0) == 150.0
    assert flops.peak_flops_per_s(chips, "float32") == 150.0
    assert len(calls) == 4  # measured again once, for the step that reached 150


def test_a_run_on_a_busy_machine_divides_by_the_best_an_earlier_run_measured(monkeypatch,
                                                                            tmp_path):
    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path))
    rates = iter([100.0, 60.0, 130.0])
    monkeypatch.setattr(flops, "matmul_flops_per_s", lambda *args: next(rates))
    chips = [Chip()]
    assert flops.peak_flops_per_s(chips, "float32") == 100.0
    monkeypatch.setattr(flops, "_PEAKS", {})  # the next run: a new process, a busier machine
    assert flops.peak_flops_per_s(chips, "float32") == 100.0
    monkeypatch.setattr(flops, "_PEAKS", {})  # a quieter one
    assert flops.peak_flops_per_s(chips, "float32") == 130.0
    (kept,) = json.loads((tmp_path / "peaks.json").read_text()).items()
    assert kept[0].startswith("gpu a chip the test made up x1; ") and kept[1] == 130.0
    assert kept[0].endswith(f"; jax {jax.__version__}; float32")


def test_a_cpu_peak_is_the_real_device_that_fake_ones_share():
    assert flops.peak_devices(jax.devices()) == jax.devices()[:1]  # the 8 of tests/conftest.py
    chips = [Chip(), Chip()]
    assert flops.peak_devices(chips) == chips
