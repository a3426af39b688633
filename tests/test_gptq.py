"""GPTQ: the integer weights it picks give layer outputs closer to the full-precision ones on the
calibration inputs than rounding to nearest does, on the same grid; `quantize --calib` runs it end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model, tiny_config

from nativevl.io.gptq import collect_hessians, gptq_quantize, input_key
from nativevl.io.quantize import dequantize_weight, quantize_weight


def output_error(w, q, scale, h) -> float:
    """E ||x (W - Q)^T||^2 over inputs with second moment h."""
    d = (w.double() - dequantize_weight(q, scale).double())
    return float(torch.trace(d @ h.double() @ d.t()))


@pytest.mark.parametrize("bits, group", [(4, 16), (4, None), (8, None)])
def test_gptq_beats_rounding_on_correlated_inputs(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(2000, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    x[:, 5] = 0.0  # a feature no input has
    h = x.t().double() @ x.double() / x.shape[0]
    q, scale = gptq_quantize(w, h, bits, group)
    rq, rscale = quantize_weight(w, bits, group)
    assert q.dtype == torch.int8 and int(q.max()) <= 2 ** (bits - 1) - 1 and int(q.min()) >= -(2 ** (bits - 1))
    assert scale.shape == rscale.shape and torch.all(q[:, 5] == 0)  # the dead column is zeroed
    assert output_error(w, q, scale, h) < 0.7 * output_error(w, rq, rscale, h)


def test_hessians_are_the_inputs_second_moments():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    class Batch:
        def __init__(self, x):
            self.x = x

        def to(self, device):
            return self

        def model_inputs(self):
            return {"input": self.x}

    xs = [torch.randn(5, 8), torch.randn(7, 8)]
    (h,) = collect_hessians(lin, [Batch(x) for x in xs], ["0"], "cpu").values()
    x = torch.cat(xs).double()
    assert torch.allclose(h, x.t() @ x / 12)
    assert input_key("language_model.layers.3.self_attn.v_proj.weight") == "language_model.layers.3.self_attn.q_proj"
    assert input_key("language_model.layers.3.mlp.down_proj.weight") == "language_model.layers.3.mlp.down_proj"


def test_quantize_with_calibration_data_end_to_end(tmp_path, tokenizer):
    """`nativevl quantize --calib META`: GPTQ on calibration records read by the data pipeline (images
    included); every layer's output error on those inputs is below rounding's, and the checkpoint loads."""
    from nativevl.cli import main
    from nativevl.data import synthetic
    from nativevl.io.hf import load_model
    from nativevl.io.quantize import LLM_LINEAR

    cfg = tiny_config()
    base = hf_model(cfg)
    base.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "base", tokenizer=tokenizer)
    meta = synthetic.write_dataset(tmp_path / "calib", n_images=6, n_texts=2, seed=1, size=cfg.vision.image_size)
    args = ["quantize", str(tmp_path / "base"), "--group_size", "16"]
    assert main([*args[:2], str(tmp_path / "gptq"), *args[2:], "--calib", str(meta), "--calib_records", "8"]) == 0
    assert main([*args[:2], str(tmp_path / "rtn"), *args[2:]]) == 0
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]  # one format

    from nativevl.io.gptq import calibration_batches

    batches = calibration_batches(ours, tokenizer, str(meta), 8)
    names = sorted({input_key(n) for n, _ in ours.named_parameters() if LLM_LINEAR.match(n)})
    hessians = collect_hessians(ours, batches, names, "cpu")
    gptq, rtn = load_model(tmp_path / "gptq", dtype=torch.float32), load_model(tmp_path / "rtn", dtype=torch.float32)
    original = dict(ours.named_parameters())
    err = {"gptq": 0.0, "rtn": 0.0}
    for name, p in original.items():
        if LLM_LINEAR.match(name):
            h = hessians[input_key(name)].double()
            for kind, m in (("gptq", gptq), ("rtn", rtn)):
                d = (p.double() - dict(m.named_parameters())[name].double())
                err[kind] += float(torch.trace(d @ h @ d.t()))
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_each_layer_is_calibrated_on_the_model_with_earlier_layers_quantized(tokenizer, tmp_path):
    """GPTQ carries each layer's inputs from the one before (one pass of the model in all); it chooses
    exactly the weights of the reference procedure, which gathers every layer's statistics from whole
    forwards of the model with the earlier layers already quantized."""
    from nativevl.data import synthetic
    from nativevl.io import gptq
    from nativevl.io.hf import load_model
    from nativevl.io.quantize import LLM_LINEAR

    hf_model(tiny_config()).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", dtype=torch.float32)
    meta = synthetic.write_dataset(tmp_path / "calib", n_images=4, n_texts=2, seed=1, size=model.config.vision.image_size)
    batches = gptq.calibration_batches(model, tokenizer, str(meta), 6)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if LLM_LINEAR.match(k)}
    reference = load_model(tmp_path / "hf", dtype=torch.float32)
    params = dict(reference.named_parameters())
    expected = {}
    for layer in range(tiny_config().text.num_hidden_layers):
        names = [n for n in weights if gptq.layer_of(n) == layer]
        hessians = gptq.collect_hessians(reference, batches, sorted({input_key(n) for n in names}), "cpu")
        for n in names:
            expected[n] = gptq_quantize(weights[n], hessians[input_key(n)], 4, 16, device="cpu")
            with torch.no_grad():
                params[n].copy_(dequantize_weight(*expected[n]))
    out = gptq.gptq_model_weights(model, batches, weights, 4, 16, "cpu")
    assert out.keys() == expected.keys()
    for n, (q, scale) in out.items():
        assert torch.equal(q, expected[n][0]) and torch.allclose(scale, expected[n][1], rtol=1e-6, atol=0), n
    layer0 = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(dequantize_weight(*out[layer0]), weights[layer0])  # the model now holds the 4-bit layer 0
    assert torch.equal(dict(model.named_parameters())[layer0], dequantize_weight(*out[layer0]))
