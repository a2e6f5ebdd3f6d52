"""The server's vector tables (`ia3.serve.vectors.VectorBank`): a batch through them equals the same batch through
the model's own per-example adapters (`PeftModel.per_example`), exactly, however adapters were added, removed,
re-added into freed rows, the tables grown, or widened to new layers."""

from __future__ import annotations

import models as M
import pytest
import torch
from conftest import randomize
from safetensors.torch import save

import ia3
from ia3.functional import PREFIX, unwrapped_name
from ia3.serve.vectors import RawVectors, VectorBank

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20], [21, 22, 23, 24]])
SUBSET = {"target_modules": ["v_proj"], "feedforward_modules": []}  # fewer layers than the default targets
WIDER = {"target_modules": ["q_proj", "v_proj"], "feedforward_modules": []}  # q_proj: a layer new to the tables


def _model(names: dict[str, dict]) -> ia3.PeftModel:
    """A tiny Llama with one (IA)^3 adapter per name (config extras as given), random vectors around 1."""
    model = None
    for seed, (name, extra) in enumerate(names.items(), start=1):
        config = ia3.IA3Config(task_type="CAUSAL_LM", **extra)
        if model is None:
            model = ia3.get_peft_model(M.llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        randomize(model, name, seed=seed, spread=0.9)
    assert model is not None
    return model.eval()


def _relayout(bank: VectorBank, model: ia3.PeftModel) -> VectorBank:
    """Cover the model's layers, as the engine does after injecting."""
    tuner = model.base_model
    layers = [(f"{PREFIX}{unwrapped_name(n)}.ia3_l", layer) for n, layer in tuner.ia3_layers()]
    bank.relayout(layers, [w for _, w in tuner.wrappers()])
    return bank


def _bank(model: ia3.PeftModel, capacity: int = 64) -> VectorBank:
    return _relayout(VectorBank(capacity), model)


def _vectors(model: ia3.PeftModel, name: str) -> dict[str, torch.Tensor]:
    return model.adapter_state_dict(name)


@torch.no_grad()
def _logits(model: ia3.PeftModel, rows) -> torch.Tensor:
    with rows:
        return model(input_ids=IDS).logits


def test_rows_equal_per_example_adapters():
    model = _model({"a": {}, "b": {}, "s": SUBSET})
    bank = _bank(model, capacity=2)  # grows while the three are added
    for name in ("a", "b", "s"):
        bank.add(name, _vectors(model, name))
    names = ["a", "b", ia3.BASE_ADAPTER, "s", "a"]
    want = _logits(model, model.base_model.per_example(names))
    assert torch.equal(_logits(model, bank.rows(names)), want)
    assert len(bank) == 3 and bank.has("s") and not bank.has(ia3.BASE_ADAPTER)
    # on exit the rows in force before come back: none here, so the active adapter (a) applies to every row again
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, _logits(model, model.base_model.per_example(["a"] * 5)))


def test_freed_rows_are_reused_clean_and_unknown_names_are_the_base():
    model = _model({"a": {}, "s": SUBSET})
    bank = _bank(model, capacity=1)
    bank.add("a", _vectors(model, "a"))
    assert bank.remove("a") and not bank.remove("a")
    bank.add("s", _vectors(model, "s"))  # into a's freed row: the layers s leaves alone must be ones again
    names = ["s", "a", ia3.BASE_ADAPTER, "s", "s"]
    # "a" is no longer in the bank: its row runs as the base model
    want = _logits(model, model.base_model.per_example(["s", ia3.BASE_ADAPTER, ia3.BASE_ADAPTER, "s", "s"]))
    assert torch.equal(_logits(model, bank.rows(names)), want)


def test_many_adapters_grow_the_tables_and_keep_every_row():
    model = _model({f"n{i}": {} for i in range(12)})
    bank = _bank(model, capacity=1)
    for i in range(12):
        bank.add(f"n{i}", _vectors(model, f"n{i}"))
    names = ["n11", "n0", "n5", "n7", "n3"]
    assert torch.equal(_logits(model, bank.rows(names)), _logits(model, model.base_model.per_example(names)))


def test_relayout_to_new_layers_keeps_the_rows():
    model = _model({"a": {}})
    bank = _bank(model)
    bank.add("a", _vectors(model, "a"))
    assert not bank.problems(_vectors(model, "a"))
    model.add_adapter("w", ia3.IA3Config(task_type="CAUSAL_LM", **WIDER))  # wraps q_proj
    randomize(model, "w", seed=9, spread=0.9)
    problems = bank.problems(_vectors(model, "w"))
    assert problems and "q_proj" in problems[0]
    with pytest.raises(ValueError, match="q_proj"):
        bank.add("w", _vectors(model, "w"))
    assert not bank.has("w")
    _relayout(bank, model)  # q_proj joins the tables: a keeps its vectors, ones there
    bank.add("w", _vectors(model, "w"))
    names = ["w", "a", ia3.BASE_ADAPTER, "a", "w"]
    assert torch.equal(_logits(model, bank.rows(names)), _logits(model, model.base_model.per_example(names)))


def test_adds_and_removes_on_other_threads_never_touch_the_rows_a_batch_uses():
    """Two threads add and remove 40 adapters over and over (the tables grow meanwhile) while batches of the two
    pinned adapters run: every batch's rows are exactly theirs."""
    import threading

    model = _model({"a": {}, "b": {}})
    bank = _bank(model, capacity=2)
    vectors = {n: _vectors(model, n) for n in ("a", "b")}
    for name, tensors in vectors.items():
        bank.add(name, tensors)
    churn = {f"x{i}": {k: torch.full_like(v, 2.0 + i) for k, v in vectors["a"].items()} for i in range(40)}
    want = _logits(model, model.base_model.per_example(["a", "b", "b", "a", "b"]))
    stop = threading.Event()

    def worker(offset: int) -> None:
        while not stop.is_set():
            for i in range(offset, 40, 2):
                bank.add(f"x{i}", churn[f"x{i}"])
            for i in range(offset, 40, 2):
                bank.remove(f"x{i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            assert torch.equal(_logits(model, bank.rows(["a", "b", "b", "a", "b"])), want)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(bank) == 2


def _raw(tensors: dict[str, torch.Tensor]) -> RawVectors:
    raw = RawVectors.parse(save(tensors, {"format": "pt"}))
    assert raw is not None
    return raw


def test_rows_from_a_files_bytes_equal_rows_from_its_tensors():
    """An adapter copied from its safetensors bytes (one call per table) and from its tensors: the same row, also
    for a bf16 file, a file covering some layers (ones elsewhere), and a file of mixed dtypes (the tensor path)."""
    model = _model({"a": {}, "s": SUBSET})
    a, s = _vectors(model, "a"), _vectors(model, "s")
    mixed = {k: (v.half() if i % 2 else v) for i, (k, v) in enumerate(a.items())}
    cases = {"full": a, "bf16": {k: v.bfloat16() for k, v in a.items()}, "subset": s, "mixed": mixed}
    bank = _bank(model)
    for name, tensors in cases.items():
        bank.add(f"{name}-t", tensors)
        bank.add(f"{name}-r", _raw(tensors))
    assert _raw(a).row(bank._keys[0]) is not None and _raw(mixed).row(bank._keys[0]) is None  # the paths taken
    for name in cases:
        assert torch.equal(_logits(model, bank.rows([f"{name}-t"] * 5)), _logits(model, bank.rows([f"{name}-r"] * 5)))
    full = _logits(model, bank.rows(["full-r", "subset-r", "base", "full-t", "subset-t"]))
    assert torch.equal(full, _logits(model, model.per_example(["a", "s", "__base__", "a", "s"])))


def test_malformed_files_are_not_parsed_and_wrong_sizes_are_named():
    model = _model({"a": {}})
    data = save(_vectors(model, "a"), {"format": "pt"})
    assert RawVectors.parse(data[: len(data) - 10]) is None  # truncated: offsets past the end
    assert RawVectors.parse(b"\xff" * 8 + data[8:]) is None  # a header length past the end
    assert RawVectors.parse(data[:8] + b"x" + data[9:]) is None  # not JSON
    assert RawVectors.parse(b"") is None
    bad = {k: v[:-1] for k, v in _vectors(model, "a").items()}
    problems = _bank(model).problems(_raw(bad))
    assert problems and "the layer takes" in problems[0]
    ints = _bank(model).problems(_raw({k: v.long() for k, v in _vectors(model, "a").items()}))
    assert ints and "non-float" in ints[0]
