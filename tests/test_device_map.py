"""`from_pretrained(device_map=...)`: layers split at decoder-layer boundaries, CPU and disk offload through
accelerate's hooks, every cache tensor on its layer's device, and generate() giving the tokens of the plain model.

On CPU every layer executes on "cpu"; what is tested is the offload machinery (weights on the meta device between
forwards, loaded by accelerate's hooks) and the placement logic. The same maps over several GPUs run on a GPU
machine (see the README's "Several devices").
"""

import re

import pytest
import torch
from accelerate import cpu_offload, infer_auto_device_map
from accelerate.utils import compute_module_sizes

import hybrid_lm
from hybrid_lm.modeling_hybrid_lm import DECODER_LAYER_CLASSES
from hybrid_lm.transformers_compat import CACHE_NAME
from builders import tiny_model

NO_EOS = dict(eos_token_id=None, bos_token_id=None)
LAYOUTS = {
    "hybrid": {},
    "all-mamba": dict(layers_block_type=["mamba"] * 4),
    "all-attention": dict(layers_block_type=["attention"] * 4, use_rope=True, sliding_window=6),
}
# A map of the 4-layer tiny models over "cpu" and "disk": in the hybrid, a Mamba layer with a dense MLP (0), an
# attention layer with experts (3) and the head are offloaded to disk.
CPU_AND_DISK = {
    "model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.layers.2": "cpu",
    "model.layers.3": "disk", "model.final_layernorm": "cpu", "lm_head": "disk",
}


def prompt(batch=2, length=9, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded():
    rows = [prompt(1, 4, seed=1)[0], prompt(1, 9, seed=2)[0], prompt(1, 6, seed=3)[0]]
    input_ids = torch.zeros(len(rows), 11, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, 11 - len(row):] = row
        attention_mask[i, 11 - len(row):] = 1
    return input_ids, attention_mask


def test_no_split_modules_are_the_decoder_layer_classes():
    model = tiny_model()
    assert set(model._no_split_modules) == {cls.__name__ for cls in DECODER_LAYER_CLASSES.values()}
    assert {type(layer).__name__ for layer in model.model.layers} <= set(model._no_split_modules)


def _budgets(model):
    """max_memory dicts, in bytes, that force the 4 tiny layers over several devices."""
    sizes = compute_module_sizes(model)
    layer = max(sizes[f"model.layers.{i}"] for i in range(4))
    head = sizes["model.embed_tokens"] + sizes["lm_head"]
    return {
        "two-gpus-and-cpu": {0: head + int(1.5 * layer), 1: 2 * layer, "cpu": 10**9},
        "cpu-and-disk": {"cpu": head + int(2.5 * layer), "disk": 10**9},
        "gpu-cpu-disk": {0: head + layer, "cpu": 2 * layer, "disk": 10**9},
    }


@pytest.mark.parametrize("budget", ["two-gpus-and-cpu", "cpu-and-disk", "gpu-cpu-disk"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_infer_auto_device_map_splits_only_between_decoder_layers(budget, layout):
    """The maps accelerate infers from `_no_split_modules` name whole decoder layers (GPU ids need no GPU here)."""
    model = tiny_model(**LAYOUTS[layout])
    device_map = infer_auto_device_map(model, max_memory=_budgets(model)[budget],
                                       no_split_module_classes=model._no_split_modules)
    inside_a_layer = [name for name in device_map if re.fullmatch(r"model\.layers\.\d+\..+", name)]
    assert not inside_a_layer, f"split inside a decoder layer: {device_map}"
    layer_devices = {device_map.get(f"model.layers.{i}", device_map.get("model.layers")) for i in range(4)}
    assert None not in layer_devices and len(layer_devices) >= 2, f"no split between layers: {device_map}"


def _execution_device(layer) -> torch.device:
    """Where accelerate's hooks run the layer (its own hook's, or its modules' when only those have one)."""
    for module in layer.modules():
        if getattr(getattr(module, "_hf_hook", None), "execution_device", None) is not None:
            return torch.device(module._hf_hook.execution_device)
    return next(layer.parameters()).device


def _assert_cache_on_layer_devices(model, cache):
    for i, (layer, cache_layer) in enumerate(zip(model.model.layers, cache.layers)):
        expected = _execution_device(layer)
        tensors = {name: getattr(cache_layer, name, None) for name in ("keys", "values")}
        tensors.update({f"{name}[0]": getattr(cache_layer, name, {}).get(0) for name in ("conv_states",
                                                                                           "recurrent_states")})
        tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.numel()}
        assert tensors, f"cache layer {i} holds no tensor"
        for name, tensor in tensors.items():
            assert tensor.device == expected, f"layer {i} {name} on {tensor.device}, its layer runs on {expected}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{layout: (folder, plain model)}."""
    folders = {}
    for layout, overrides in LAYOUTS.items():
        model = tiny_model(**overrides, **NO_EOS)
        folder = tmp_path_factory.mktemp(layout)
        model.save_pretrained(folder)
        folders[layout] = (folder, model)
    return folders


def _offloaded(kind, folder, tmp_path):
    if kind == "cpu-and-disk":
        return hybrid_lm.HybridLMForCausalLM.from_pretrained(folder, device_map=CPU_AND_DISK,
                                                             offload_folder=tmp_path / "offload")
    if kind == "auto-max-memory":
        plain = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder)
        model = hybrid_lm.HybridLMForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory=_budgets(plain)["cpu-and-disk"], offload_folder=tmp_path / "offload")
        assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values(), model.hf_device_map
        return model
    # every module's weights kept in CPU memory and loaded for its forward: the hooks that "cpu" entries of a map get
    # on a GPU machine (there the execution device is the GPU)
    return cpu_offload(hybrid_lm.HybridLMForCausalLM.from_pretrained(folder), execution_device=torch.device("cpu"))


@pytest.mark.parametrize("kind", ["cpu-and-disk", "auto-max-memory", "cpu-offload"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_offloaded_model_generates_the_tokens_of_the_plain_model(saved, layout, kind, tmp_path):
    folder, plain = saved[layout]
    model = _offloaded(kind, folder, tmp_path).eval()
    offloaded = [name for name, param in model.named_parameters() if param.is_meta]
    assert offloaded, "nothing was offloaded: the test would prove nothing"
    assert any("layers." in name for name in offloaded)
    assert any(".mamba." in name for name in offloaded) or "mamba" not in model.config.layers_block_type

    input_ids = prompt()
    torch.testing.assert_close(model(input_ids).logits, plain(input_ids).logits, rtol=0, atol=1e-6)
    # after a forward the offloaded weights are back on the meta device
    assert [name for name, param in model.named_parameters() if param.is_meta] == offloaded

    _assert_generates_the_same(model, plain, _generate_runs())


def _assert_generates_the_same(model, plain, runs):
    """Each of `runs` ({name: generate kwargs}) gives `plain`'s tokens (from its dynamic cache), and each cache tensor
    is on its layer's device."""
    device = plain.device
    for name, kwargs in runs.items():
        kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        reference = {key: value for key, value in kwargs.items() if key != "cache_implementation"}
        expected = plain.generate(**reference, max_new_tokens=6)
        out = model.generate(**kwargs, max_new_tokens=6, return_dict_in_generate=True)
        torch.testing.assert_close(out.sequences.to(device), expected, msg=f"{name} generation differs")
        _assert_cache_on_layer_devices(model, getattr(out, CACHE_NAME))


def _generate_runs():
    input_ids, (padded, mask) = prompt(), left_padded()
    return {
        "greedy": dict(input_ids=input_ids, do_sample=False),
        "left-padded": dict(input_ids=padded, attention_mask=mask, do_sample=False),
        "beam": dict(input_ids=input_ids, num_beams=3, num_return_sequences=2, do_sample=False),
        "static": dict(input_ids=padded, attention_mask=mask, do_sample=False, cache_implementation="static"),
    }


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_map_over_two_gpus_cpu_and_disk(saved, layout, kind, tmp_path):
    """Layers on cuda:0, cuda:1, CPU-offloaded (run on cuda:0) and disk-offloaded: the plain model's tokens, and
    keys/values and Mamba states on the GPU that runs their layer."""
    folder, _ = saved[layout]
    plain = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder).to("cuda:0").eval()
    if kind == "explicit":
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": "cpu",
                      "model.layers.3": 1, "model.final_layernorm": 1, "lm_head": "disk"}
        model = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder, device_map=device_map,
                                                             offload_folder=tmp_path / "offload")
    else:
        model = hybrid_lm.HybridLMForCausalLM.from_pretrained(
            folder, device_map="auto", max_memory=_budgets(plain)["two-gpus-and-cpu"])
    assert {0, 1} <= set(model.hf_device_map.values()), model.hf_device_map
    devices = {_execution_device(layer) for layer in model.model.layers}
    assert devices == {torch.device("cuda:0"), torch.device("cuda:1")}, devices
    _assert_generates_the_same(model.eval(), plain, _generate_runs())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_gpu_with_cpu_and_disk_offload(saved, layout, kind, tmp_path):
    """A model larger than its GPU budget: layers on cuda:0, CPU-offloaded and disk-offloaded (both run on cuda:0),
    giving the plain model's tokens with every cache tensor on the GPU."""
    folder, _ = saved[layout]
    plain = hybrid_lm.HybridLMForCausalLM.from_pretrained(folder).to("cuda:0").eval()
    if kind == "explicit":
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
                      "model.layers.3": 0, "model.final_layernorm": 0, "lm_head": "cpu"}
    else:
        device_map = "auto"
    model = hybrid_lm.HybridLMForCausalLM.from_pretrained(
        folder, device_map=device_map, max_memory=None if kind == "explicit" else _budgets(plain)["gpu-cpu-disk"],
        offload_folder=tmp_path / "offload")
    placed = set(model.hf_device_map.values())
    assert 0 in placed and ({"cpu", "disk"} & placed), model.hf_device_map
    assert {_execution_device(layer) for layer in model.model.layers} == {torch.device("cuda:0")}
    _assert_generates_the_same(model.eval(), plain, _generate_runs())
