"""Smoke tests of the benchmark suite on tiny workloads: every row runs, and the correctness checks the figures
rest on hold (equal losses, equal outputs, one library per memory subprocess). No timing is asserted.

Run: .venv/bin/python -m pytest -q bench/test_bench.py   (about a minute on 2 cores; not part of tests/)
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

MICRO = replace(
    common.QUICK,
    name="micro",
    repeats=2,
    warmup=1,
    big_steps=1,
    big_warmup=0,
    recipe_cap=16,
    recipe_repeats=1,
    load_repeats=2,
    memory_steps=1,
    memory_repeats=1,
)


@pytest.fixture(autouse=True)
def _setup():
    common.quiet_warnings()
    common.configure(1, None)
    yield


def _sane(results):
    assert results
    for r in results:
        assert r.ia3 > 0 and r.ref > 0 and math.isfinite(r.ratio), r
        json.dumps(r.to_json())


@pytest.mark.parametrize("name", ["t5", "gpt2"])
def test_row1_losses_agree(name):
    import row1_train

    result = row1_train.bench_model(name, MICRO)
    _sane([result])
    assert result.extra["losses_agree_atol_1e-5"], result.extra["losses"]
    assert len(result.extra["losses"]["ia3"]) == MICRO.repeats + MICRO.warmup
    assert result.extra["floor_ms"] > 0


def test_row2_recipe_runs():
    if not common.DATA.is_file():
        pytest.skip(f"needs {common.DATA}")
    import row2_recipe

    results = row2_recipe.run(MICRO)
    _sane(results)
    assert results[0].extra["training_examples"] == 16


def test_row3_outputs_agree():
    import row3_inference

    results = row3_inference.bench_model("gpt2", MICRO)
    _sane(results)
    assert results[0].extra["adapted_outputs_agree"]


def test_row4_outputs_agree():
    import row4_per_example

    results = row4_per_example.bench_model("t5", MICRO)
    _sane(results)
    assert results[0].extra["max_logits_diff_vs_peft"] < 1e-5
    assert results[0].extra["generated_tokens_agree"]


@pytest.mark.parametrize("row", ["1", "3", "4"])
def test_smollm2_rows_run_and_agree_with_peft(row):
    """The real-model rows: row 1's losses and row 4's generated tokens equal peft's; row 3's variants agree."""
    import row1_train
    import row3_inference
    import row4_per_example

    if row == "1":
        result = row1_train.bench_model("smollm2", MICRO)
        assert result.extra["losses_agree_atol_1e-5"], result.extra["losses"]
        results = [result]
    elif row == "3":
        results = row3_inference.bench_model("smollm2", MICRO)
        assert results[0].extra["new_tokens"] == 16
    else:
        results = row4_per_example.bench_model("smollm2", MICRO)
        assert results[0].extra["generated_tokens_agree"] and results[0].extra["rows"] == 32
    _sane(results)


def test_row5_child_imports_one_library():
    import row5_memory

    out = common.run_child([row5_memory.__file__, "--child", "gpt2", "ia3", "1", "1"])
    assert out["peft_imported"] is False
    assert out["peak_rss_mib"] >= out["rss_after_setup_mib"] > 0


def test_row6_same_files(tmp_path):
    import row6_adapter_io

    results = row6_adapter_io.bench_model("gpt2", MICRO, tmp_path)
    _sane(results)
    assert results[0].ia3 == results[0].ref  # same tensors, same safetensors layout


def test_table_and_json(tmp_path):
    results = [common.Result("9", "x", 1.0, 2.0, "ms", "peft", 0.6), common.Result("9", "y", 3.0, 2.0, "MiB")]
    text = common.table(results)
    assert "| 9 | x | 1.000 ms | peft: 2.000 ms | 0.500 | <= 0.6 | yes |" in text
    assert results[1].met is None
    out = tmp_path / "b.json"
    common.write_json(out, results, MICRO, 1.0)
    data = json.loads(out.read_text())
    assert set(data["versions"]) == {"torch", "transformers", "peft", "ia3"}
    assert data["machine"]["torch_threads"] == torch.get_num_threads()
    assert data["results"][0]["ratio"] == 0.5
