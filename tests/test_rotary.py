"""Rotary cos/sin against values computed by hand (math in float64), with and without scaling.

The reference (DeepSeek's modeling_deepseek.py, after GPT-NeoX): angle(p, i) = p * base**(-2i/d)
for i < d/2, repeated for the second half; linear scaling divides p by the factor; dynamic NTK
scaling, once the sequence is longer than max_position_embeddings L, raises the base to
base * (factor * n / L - (factor - 1)) ** (d / (d - 2)) for a sequence of n tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import DeepseekModel, RotaryEmbedding, apply_rotary

HEAD_DIM, BASE, TRAINED = 8, 10000.0, 64


def _config(scaling: dict | None) -> DeepseekConfig:
    return DeepseekConfig(
        vocab_size=11, hidden_size=4 * HEAD_DIM, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=TRAINED, rope_theta=BASE, rope_scaling=scaling,
    )


def _rotary(scaling: dict | None) -> RotaryEmbedding:
    return RotaryEmbedding(_config(scaling))


def _by_hand(positions: list[int], base: float, divide_by: float = 1.0) -> tuple[list[list[float]], list[list[float]]]:
    half = [[p / divide_by * base ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)] for p in positions]
    angles = [row + row for row in half]
    return [[math.cos(a) for a in row] for row in angles], [[math.sin(a) for a in row] for row in angles]


def _check(rotary: RotaryEmbedding, positions: list[int], total: int, cos_sin: tuple) -> None:
    cos, sin = rotary(torch.tensor(positions), total, torch.float32)
    want_cos, want_sin = (torch.tensor(v, dtype=torch.float32) for v in cos_sin)
    torch.testing.assert_close(cos, want_cos, atol=3e-5, rtol=0)
    torch.testing.assert_close(sin, want_sin, atol=3e-5, rtol=0)


POSITIONS = [0, 1, 5, 63, 64, 99]  # past max_position_embeddings too


def test_unscaled_angles():
    _check(_rotary(None), POSITIONS, 100, _by_hand(POSITIONS, BASE))
    # Spot values: position 1 turns the first pair by one radian and the last by 10000**(-3/4) = 0.001.
    cos, sin = _rotary(None)(torch.tensor([1]), 2, torch.float32)
    assert float(sin[0, 0]) == pytest.approx(math.sin(1.0), abs=1e-6)
    assert float(sin[0, 3]) == pytest.approx(math.sin(0.001), abs=1e-7)
    assert float(cos[0, 4]) == pytest.approx(math.cos(1.0), abs=1e-6)


def test_linear_scaling_divides_positions():
    rotary = _rotary({"type": "linear", "factor": 4.0})
    _check(rotary, POSITIONS, 100, _by_hand(POSITIONS, BASE, divide_by=4.0))
    cos, _ = rotary(torch.tensor([4]), 5, torch.float32)
    assert float(cos[0, 0]) == pytest.approx(math.cos(1.0), abs=1e-6)  # position 4 at factor 4 is position 1


def test_dynamic_scaling_within_the_trained_length_is_unscaled():
    _check(_rotary({"type": "dynamic", "factor": 2.0}), [0, 7, 63], TRAINED, _by_hand([0, 7, 63], BASE))


@pytest.mark.parametrize("total", [65, 100, 256])
def test_dynamic_scaling_past_the_trained_length(total):
    factor = 2.0
    # Written out: at 100 tokens, 2 * 100 / 64 - 1 = 2.125, and the base grows by 2.125 ** (8 / 6).
    base = BASE * (factor * total / TRAINED - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    if total == 100:
        assert base == pytest.approx(10000 * 2.125 ** (4 / 3))
    positions = [p for p in POSITIONS if p < total]
    _check(_rotary({"type": "dynamic", "factor": factor}), positions, total, _by_hand(positions, base))


def test_dynamic_scaling_follows_the_sequence_length_back_down():
    rotary = _rotary({"type": "dynamic", "factor": 2.0})
    rotary(torch.tensor([0, 99]), 100, torch.float32)  # a long sequence first
    _check(rotary, [3, 40], 41, _by_hand([3, 40], BASE))


def test_the_model_passes_each_positions_angles():
    # A decode step at absolute position 80 of a dynamic-scaled model uses the 81-token base.
    model = DeepseekModel(_config({"type": "dynamic", "factor": 2.0}))
    seen = []
    model.rotary.register_forward_hook(lambda _m, args, out: seen.append((args[0].tolist(), args[1], out)))
    with torch.inference_mode():
        model.eval()(torch.zeros(1, 81, dtype=torch.long), None)
    ((positions, total, (cos, sin)),) = seen
    assert positions == list(range(81)) and total == 81
    base = BASE * (2.0 * 81 / TRAINED - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    want_cos, want_sin = _by_hand([80], base)
    torch.testing.assert_close(cos[80:], torch.tensor(want_cos), atol=3e-5, rtol=0)
    torch.testing.assert_close(sin[80:], torch.tensor(want_sin), atol=3e-5, rtol=0)


def test_apply_rotary_turns_each_pair_by_its_angle():
    # x = (a0, a1, b0, b1) pairs (a_i, b_i): rotated to (a cos - b sin, a sin + b cos).
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    angles = [0.3, 1.1]
    cos = torch.tensor([[math.cos(a) for a in angles * 2]])
    sin = torch.tensor([[math.sin(a) for a in angles * 2]])
    want = [1 * math.cos(0.3) - 3 * math.sin(0.3), 2 * math.cos(1.1) - 4 * math.sin(1.1),
            1 * math.sin(0.3) + 3 * math.cos(0.3), 2 * math.sin(1.1) + 4 * math.cos(1.1)]
    torch.testing.assert_close(apply_rotary(x, cos, sin), torch.tensor([want]), atol=1e-6, rtol=0)


def test_scaling_read_from_a_config_file_is_applied(tmp_path):
    # A checkpoint's config.json gives the type as a string parsed at run time, not a literal of this
    # file: the scaling must be chosen by the string's value (not by its identity).
    base = _config(None).to_dict()
    for kind, check in (("linear", lambda r: _check(r, [4, 99], 100, _by_hand([4, 99], BASE, divide_by=4.0))),
                        ("dynamic", lambda r: _check(r, [99], 100, _by_hand([99], BASE * (4.0 * 100 / TRAINED - 3.0)
                                                                             ** (HEAD_DIM / (HEAD_DIM - 2)))))):
        path = tmp_path / f"{kind}.json"
        path.write_text(json.dumps({**base, "rope_scaling": {"type": kind, "factor": 4.0}}))
        check(RotaryEmbedding(DeepseekConfig.from_file(path)))


def test_dynamic_scaling_follows_the_sequence_length_up():
    rotary = _rotary({"type": "dynamic", "factor": 2.0})
    _check(rotary, [3, 40], 41, _by_hand([3, 40], BASE))  # a short sequence first: the trained base
    base = BASE * (2.0 * 100 / TRAINED - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    _check(rotary, [3, 99], 100, _by_hand([3, 99], base))


def test_the_frequencies_are_kept_while_the_base_stays():
    # The docstring's promise: a decode step reuses the frequencies (no recomputation per token).
    # Each call names the device anew, as ``positions.device`` does (an equal, not the same, object).
    rotary = _rotary({"type": "dynamic", "factor": 2.0})
    first = rotary._inv_freq(10, torch.device("cpu"))
    assert rotary._inv_freq(11, torch.device("cpu")) is first
    assert rotary._inv_freq(TRAINED, torch.device("cpu")) is first
    longer = rotary._inv_freq(TRAINED + 1, torch.device("cpu"))
    assert longer is not first  # past the trained length the base grows
    assert rotary._inv_freq(TRAINED + 1, torch.device("cpu")) is longer  # and stays while the length does


def test_the_angles_follow_the_positions_to_another_device():
    # A model moved to another device keeps no frequencies of the old one ("meta": no data, any machine).
    rotary = _rotary(None)
    rotary(torch.tensor([1, 2]), 3, torch.float32)
    cos, sin = rotary(torch.tensor([1, 2], device="meta"), 3, torch.float32)
    assert cos.device.type == "meta" and sin.device.type == "meta"
    _check(rotary, [1, 2], 3, _by_hand([1, 2], BASE))  # and back


def test_apply_rotary_turns_the_last_dimension_of_every_head():
    # [heads, tokens, head_dim] = [2, 1, 6]: the pairs are (x0, x3), (x1, x4), (x2, x5) of each
    # head's last dimension, whatever the sizes in front of it.
    rows = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [-1.0, 0.5, 2.0, 0.0, -3.0, 1.5]]
    angles = [0.3, 1.1, 2.0]
    cos = torch.tensor([[math.cos(a) for a in angles * 2]])
    sin = torch.tensor([[math.sin(a) for a in angles * 2]])

    def turned(v: list[float]) -> list[float]:
        a, b = v[:3], v[3:]
        return ([a[i] * math.cos(t) - b[i] * math.sin(t) for i, t in enumerate(angles)]
                + [a[i] * math.sin(t) + b[i] * math.cos(t) for i, t in enumerate(angles)])

    want = torch.tensor([[turned(rows[0])], [turned(rows[1])]])
    torch.testing.assert_close(apply_rotary(torch.tensor([[rows[0]], [rows[1]]]), cos, sin), want, atol=1e-6, rtol=0)
