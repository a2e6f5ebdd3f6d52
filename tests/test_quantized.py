"""(IA)^3 over quantised bases: bitsandbytes 8-bit / 4-bit (nf4) linears and torchao int8 weight-only linears.

References are the same layers computed with the dequantised weight (what the quantised kernel stands for), the
real `peft` package for the adapter format and `prepare_model_for_kbit_training`, and the unquantised model for
the recipe. Each backend's tests skip when its package is not installed.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
import transformers as tf
from conftest import ia3_layers
from torch import nn

import ia3
from ia3.quantization import QuantizedMergeError, quantization_config, quantization_of

BACKENDS = ["int8", "nf4", "torchao-int8"]
PACKAGE = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "torchao-int8": "torchao"}
# |quantised layer - the same layer with the dequantised weight| (fp32 on CPU): the kernels dequantise the weight
# and run a float matmul, so only the summation order differs
TOL = {"int8": 1e-5, "nf4": 1e-5, "torchao-int8": 1e-5}


def _needs(backend: str):
    return pytest.importorskip(PACKAGE[backend])


def _quantize_linear(linear: nn.Linear, backend: str) -> nn.Module:
    """A quantised copy of `linear` (bitsandbytes quantises when the layer is moved to its device)."""
    _needs(backend)
    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = nn.Sequential(copy.deepcopy(linear))
        quantize_(holder, Int8WeightOnlyConfig())
        return holder[0].requires_grad_(False)
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if backend == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, quant_type="nf4", compute_dtype=torch.float32
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").requires_grad_(False)


def _dequantised(layer: nn.Module, backend: str) -> torch.Tensor:
    weight = layer.weight
    if backend == "torchao-int8":
        return weight.dequantize()
    import bitsandbytes.functional as F

    if backend == "int8":
        return F.int8_vectorwise_dequant(weight.data, weight.SCB)
    return F.dequantize_4bit(weight.data, weight.quant_state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feedforward", [False, True], ids=["output_side", "input_side"])
def test_forward_and_grads_match_the_dequantised_layer(backend, feedforward):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    quantised = _quantize_linear(linear, backend)
    assert quantization_of(quantised) is not None and quantization_of(linear) is None
    layer = ia3.IA3Layer.from_module(quantised, is_feedforward=feedforward)
    layer.add_adapter("a", init_ones=False)
    vector = layer.ia3_l["a"]
    assert vector.dtype == torch.float32 and tuple(vector.shape) == ((1, 64) if feedforward else (48, 1))
    with torch.no_grad():
        vector.copy_(torch.rand_like(vector) + 0.5)  # 0.5 .. 1.5: far from the identity
    x = torch.randn(3, 5, 64)
    weight = _dequantised(quantised, backend).float()
    reference_vector = vector.detach().clone().requires_grad_(True)
    if feedforward:
        reference = nn.functional.linear(x * reference_vector.reshape(-1), weight, linear.bias.detach())
    else:
        reference = nn.functional.linear(x, weight, linear.bias.detach()) * reference_vector.reshape(-1)
    out = layer(x)
    torch.testing.assert_close(out, reference, atol=TOL[backend], rtol=1e-5)
    unscaled = nn.functional.linear(x, weight, linear.bias.detach())
    assert (unscaled - reference).abs().max() > 100 * TOL[backend]  # the check above sees a missing vector

    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reference.backward(grad_out)
    assert vector.grad is not None
    torch.testing.assert_close(vector.grad, reference_vector.grad, atol=1e-4, rtol=1e-4)
    assert all(p.grad is None for p in quantised.parameters())


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """What a parameter holds, comparable with `torch.equal` (torchao's tensors: their dequantised values)."""
    return tensor.dequantize() if type(tensor).__module__.startswith("torchao") else tensor.data


def _t5() -> tf.T5ForConditionalGeneration:
    # 64 wide, not tests/models.py's 32: bitsandbytes' CPU inference kernel for 4-bit weights (used in eval mode
    # without grad on CPUs with AVX512-BF16) cannot repack a layer with fewer input features than its block (64)
    return models.t5(0, d_model=64, d_kv=16, d_ff=128, dropout_rate=0.0)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    _t5().save_pretrained(folder)
    return folder


def _load(folder, backend: str | None):
    if backend is not None:
        _needs(backend)
    config = quantization_config(backend or "none")
    kwargs = {"quantization_config": config, "device_map": "cpu"} if config is not None else {}
    return tf.T5ForConditionalGeneration.from_pretrained(folder, **kwargs).eval()


BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8, 1], [9, 10, 11, 1, 0]]), "labels": torch.tensor([[12, 13, 1]] * 2)}
BATCH["attention_mask"] = (BATCH["input_ids"] != 0).long()


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_moves_only_the_vectors(t5_dir, backend):
    base = _load(t5_dir, backend)
    targets = [name for name, m in base.named_modules() if name.endswith((".k", ".v", ".wo"))]
    assert all(quantization_of(base.get_submodule(n)) for n in targets if not n.endswith(".wo"))
    # every tensor of every base module (the modules themselves stay in the model, wrapped)
    frozen = [(m, n, _raw(t).clone()) for m in base.modules() for n, t in [*m.named_parameters(recurse=False)]]
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(**BATCH).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for module, name, value in frozen:  # the quantised codes (and every other base tensor) are untouched
        assert torch.equal(_raw(getattr(module, name)), value), name


def test_ones_adapter_equals_the_quantised_base_and_differs_from_full_precision(t5_dir):
    """With every vector at one (PEFT's init) the output is the quantised base's own; and nf4's rounding shows, so
    the model compared really is quantised."""
    plain, quantised = _load(t5_dir, None), _load(t5_dir, "nf4")
    with torch.no_grad():
        base_loss = float(quantised(**BATCH).loss)
        model = ia3.get_peft_model(quantised, ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
        assert float(model(**BATCH).loss) == pytest.approx(base_loss, abs=1e-6)
        assert abs(float(plain(**BATCH).loss) - base_loss) > 1e-4


def _randomise(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            for vector in layer.ia3_l.values():
                vector.copy_(torch.rand(vector.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_is_refused_and_changes_nothing(t5_dir, backend):
    model = ia3.get_peft_model(_load(t5_dir, backend), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    _randomise(model)
    with torch.no_grad():
        before = model(**BATCH).logits
    layer = next(layer for layer in ia3_layers(model).values() if quantization_of(layer.base_layer))
    for attempt in (
        model.merge_adapter,
        lambda: model.merge_adapter(safe_merge=True),
        model.merge_and_unload,
        layer.merge,
        layer.to_module,
    ):
        with pytest.raises(QuantizedMergeError, match=r"quantised layer .*--model.quantization none"):
            attempt()
    assert not model.base_model.merged
    assert all(isinstance(m, ia3.IA3Layer) for m in ia3_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(**BATCH).logits, before, atol=0, rtol=0)


def test_a_refused_merge_leaves_full_precision_layers_unmerged():
    """A model mixing plain and quantised targets: the plain layer, first in order, is not merged either."""
    _needs("int8")
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", nn.Linear(8, 8))
    net.add_module("b", _quantize_linear(nn.Linear(8, 8), "int8"))
    model = ia3.get_peft_model(net, ia3.IA3Config(target_modules=["a", "b"]))
    _randomise(model)
    plain = model.base_model.model.a
    weight = plain.base_layer.weight.detach().clone()
    with pytest.raises(QuantizedMergeError):
        model.merge_and_unload()
    assert plain.merged_adapters == [] and torch.equal(plain.base_layer.weight, weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_example_adapters(t5_dir, backend):
    model = ia3.get_peft_model(_load(t5_dir, backend), ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    model.add_adapter("other", ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    _randomise(model)
    names = ["default", "other"]
    with torch.no_grad():
        mixed = model(**BATCH, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone = model(**BATCH).logits[row]
            torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=1e-5)
        model.set_adapter("default")
        other_row0 = model(**BATCH, adapter_names=["other", "other"]).logits[0]
        assert (other_row0 - mixed[0]).abs().max() > 1e-3  # the adapters really differ


@pytest.mark.parametrize("backend", ["int8", "nf4"])
def test_peft_round_trip_on_a_bitsandbytes_base(t5_dir, tmp_path, backend):
    """An adapter PEFT trains on a bitsandbytes base loads in ia3 and gives PEFT's outputs, and the reverse."""
    peft = pytest.importorskip("peft")
    config = dict(task_type="SEQ_2_SEQ_LM", target_modules=["k", "v", "wi", "wo"], feedforward_modules=["wo", "wi"])
    theirs = peft.get_peft_model(_load(t5_dir, backend), peft.IA3Config(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "ia3_l" in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
        expected = theirs(**BATCH).logits
    theirs.save_pretrained(tmp_path / "peft")

    mine = ia3.PeftModel.from_pretrained(_load(t5_dir, backend), tmp_path / "peft")
    assert any(quantization_of(layer.base_layer) for layer in ia3_layers(mine).values())
    with torch.no_grad():
        got = mine(**BATCH).logits
        assert (got - _load(t5_dir, backend)(**BATCH).logits).abs().max() > 1e-3  # the vectors act
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    mine = ia3.get_peft_model(_load(t5_dir, backend), ia3.IA3Config(**config))
    _randomise(mine, seed=2)
    with torch.no_grad():
        expected = mine(**BATCH).logits
    mine.save_pretrained(tmp_path / "ia3")
    theirs = peft.PeftModel.from_pretrained(_load(t5_dir, backend), tmp_path / "ia3")
    with torch.no_grad():
        torch.testing.assert_close(theirs(**BATCH).logits, expected, atol=1e-5, rtol=1e-5)


def _prepared_state(model) -> dict:
    embeds = model.get_input_embeddings()(torch.tensor([[3, 4]]))
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "dtype": {n: p.dtype for n, p in model.named_parameters()},
        "checkpointing": model.is_gradient_checkpointing,
        "embeddings_require_grad": embeds.requires_grad,
    }


@pytest.mark.parametrize(
    ("backend", "kwargs"),
    [
        ("int8", {}),
        ("int8", {"use_gradient_checkpointing": False}),
        ("nf4", {"gradient_checkpointing_kwargs": {"use_reentrant": False}}),
        ("torchao-int8", {}),
        (None, {}),
    ],
)
def test_prepare_model_for_kbit_training_matches_peft(t5_dir, backend, kwargs):
    peft = pytest.importorskip("peft")
    if backend is not None:
        _needs(backend)

    def load():
        config = quantization_config(backend or "none", compute_dtype=torch.bfloat16)
        extra = {"quantization_config": config, "device_map": "cpu"} if config is not None else {}
        return tf.T5ForConditionalGeneration.from_pretrained(t5_dir, dtype=torch.bfloat16, **extra)

    mine, theirs = load(), load()
    assert ia3.prepare_model_for_kbit_training(mine, **kwargs) is mine
    peft.prepare_model_for_kbit_training(theirs, **kwargs)
    got, expected = _prepared_state(mine), _prepared_state(theirs)
    assert got == expected
    assert not any(got["requires_grad"].values())
    if backend is None or backend == "int8":  # bf16 non-quantised parameters (norms, embeddings) became fp32
        assert all(dtype != torch.bfloat16 for dtype in got["dtype"].values())
    else:  # torchao owns its dtypes; nf4 Params4bit stay as they are
        assert any(dtype != torch.float32 for dtype in got["dtype"].values())


# -- the recipe ----------------------------------------------------------------------------------------------------
def test_recipe_setting_is_checked():
    from ia3.recipe.config import ConfigError, ModelArgs, build_config

    assert ModelArgs().quantization == "none"
    with pytest.raises(ConfigError, match=r"--model.quantization must be one of \['none', 'int8', 'nf4'"):
        build_config(overrides={"model.quantization": "int4"})
    # a GGUF base is dequantised, then quantised by transformers' loader (ia3.base_models.load_pretrained)
    assert build_config(overrides={"model.quantization": "int8", "model.name": "x.gguf"}).model.name == "x.gguf"
    assert build_config(overrides={"model.quantization": "nf4"}).model.quantization == "nf4"


def test_missing_backend_is_named_before_loading(monkeypatch, tmp_path):
    import importlib.util

    import ia3.loading as loading
    from ia3.recipe.config import ModelArgs
    from ia3.tasks import TASKS

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    loaded = []
    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: loaded.append(1))
    args = ModelArgs(name=str(tmp_path), quantization="nf4")
    with pytest.raises(ValueError, match=r"model.quantization nf4 .* needs the bitsandbytes package.*pick one of"):
        loading.load_base_model(args.source, TASKS["seq2seq"], ["a", "b"])
    assert not loaded


def _cls_dir(path):
    """A BERT classifier folder with tests/tiny_dirs.py's tokenizer, 64 wide (see `_t5`)."""
    from tiny_dirs import tokenizer

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = tf.BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=160,
        pad_token_id=0,
    )
    tf.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_recipe_loads_and_trains_a_quantised_base(tmp_path, backend):
    _needs(backend)
    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    model_dir = _cls_dir(tmp_path / "cls")
    cfg = build_config(
        overrides={
            "output_dir": str(tmp_path / "run"),
            "model.name": str(model_dir),
            "model.task": "cls",
            "model.quantization": backend,
            "data.dataset": "demo",
            "data.text_column": "text",
            "data.subset": "none",
            "data.val_split": "0.2",
            "train.epochs": "2",  # train, evaluate, train again: bitsandbytes switches kernels between them
            "train.batch_size": "16",
            "train.max_eval_samples": "16",
            "train.precision": "fp32",
            "train.plots": "false",
        }
    )
    import ia3.recipe.train as train_module

    seen = {}
    real = train_module.get_peft_model

    def spy(base, config):
        seen["quantised"] = sorted({quantization_of(m) or "-" for m in base.modules() if isinstance(m, nn.Linear)})
        seen["classifier"] = quantization_of(base.classifier)
        return real(base, config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "get_peft_model", spy)
        metrics = train(cfg, progress=False)
    assert any(kind != "-" for kind in seen["quantised"]), seen
    assert seen["classifier"] is None  # the head trains in full: kept in full precision
    assert 0 <= metrics["accuracy"] <= 1
    saved = ia3.PeftModel.from_pretrained(
        tf.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3), tmp_path / "run"
    )
    assert any(
        not torch.equal(v, torch.ones_like(v)) for layer in ia3_layers(saved).values() for v in layer.ia3_l.values()
    )
    if backend == "int8":  # `ia3 merge` of such a run merges into the full-precision base
        from ia3.recipe.adapters import merge_to_full_model

        merged_dir = merge_to_full_model(tmp_path / "run", tmp_path / "merged")
        merged = tf.AutoModelForSequenceClassification.from_pretrained(merged_dir)
        assert not any(quantization_of(m) for m in merged.modules())


def test_4bit_layer_trains_again_after_evaluation():
    """train -> eval (no grad) -> train on a bitsandbytes 4-bit layer: with `keep_4bit_weights_trainable_on_cpu`
    the eval pass leaves the weight in the layout the training kernel reads (on CPUs with AVX512-BF16 it
    otherwise repacks it for an inference kernel without backward, and the second training step fails)."""
    _needs("nf4")
    from ia3.quantization import keep_4bit_weights_trainable_on_cpu

    torch.manual_seed(0)
    layer = ia3.IA3Layer.from_module(_quantize_linear(nn.Linear(64, 64), "nf4"))
    layer.add_adapter("a")
    reference = layer.weight.data.clone()
    assert keep_4bit_weights_trainable_on_cpu(layer) == 1
    x = torch.randn(4, 64)
    layer.train()
    layer(x).sum().backward()
    layer.eval()
    with torch.no_grad():
        evaluated = layer(x)
    assert torch.equal(layer.weight.data, reference)
    layer.train()
    layer(x).sum().backward()
    torch.testing.assert_close(evaluated, layer(x).detach())


@pytest.mark.parametrize("backend", ["int8", "torchao-int8"])
def test_serve_a_quantised_base_with_several_adapters(tmp_path, backend):
    """`ia3 serve --quantization`: one quantised base, adapters a and b and the base in concurrent requests; each
    answer equals the same quantised model generating that input alone with that adapter."""
    _needs(backend)
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from concurrent.futures import ThreadPoolExecutor

    from live_server import LiveServer
    from tiny_dirs import tokenizer

    from ia3.loading import ModelSource, load_base_model
    from ia3.serve import ServeConfig
    from ia3.tasks import TASKS

    tok = tokenizer()
    model_dir = tmp_path / "model"
    base = _t5()
    base.resize_token_embeddings(len(tok))
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for seed, name in enumerate(["a", "b"], start=1):
        torch.manual_seed(seed)
        model = tf.T5ForConditionalGeneration.from_pretrained(model_dir)
        ia3.get_peft_model(model, ia3.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False)).save_pretrained(
            tmp_path / "adapters" / name
        )
    texts = ["Operating profit rose to EUR 13.1 mn .", "Net sales fell", "Sales"]
    server = LiveServer(
        ServeConfig(
            model=str(model_dir),
            adapters_dir=str(tmp_path / "adapters"),
            task="seq2seq",
            quantization=backend,
            max_new_tokens=6,
            max_wait_ms=50,
        )
    )
    try:
        served = server.service.engine.base
        assert any(quantization_of(m) for m in served.modules()), "the served base is not quantised"
        with ThreadPoolExecutor(3) as pool:
            futures = {
                a: pool.submit(
                    server.post,
                    "/v1/generate",
                    json={"adapter": a, "inputs": texts, "parameters": {"max_new_tokens": 6}},
                )
                for a in ("a", "b", ia3.BASE_ADAPTER)
            }
            answers = {a: f.result() for a, f in futures.items()}
    finally:
        server.close()
    ref = ia3.PeftModel.from_pretrained(
        load_base_model(ModelSource(str(model_dir), quantization=backend), TASKS["seq2seq"], []),
        tmp_path / "adapters" / "a",
        adapter_name="a",
    )
    ref.load_adapter(tmp_path / "adapters" / "b", "b")
    ref.eval()
    for adapter, response in answers.items():
        assert response.status_code == 200, response.text
        for text, out in zip(texts, response.json()["outputs"]):
            ids = torch.tensor([tok(text)["input_ids"]])
            with torch.no_grad():
                if adapter == ia3.BASE_ADAPTER:
                    with ref.disable_adapter():
                        gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
                else:
                    ref.set_adapter(adapter)
                    gen = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
            assert out["text"] == tok.decode(gen[0], skip_special_tokens=True), (adapter, text)
