"""`ia3 serve --dtype`: which dtype `auto` picks, the flag, and a bfloat16 server whose greedy answers agree with a
float32 reference wherever the reference's choice is clear (issue 20).

bfloat16 keeps 8 bits of mantissa, so a token whose two best logits are nearly tied may flip; the test compares each
answer's tokens up to the first position whose float32 top-2 margin is small. The tiny random models' logits are
small (standard deviation about 0.1, bfloat16's error on them about 0.003), so the margin is measured in units of
the position's logit standard deviation: > 0.5 of it (about 20x the error seen) counts as clear.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from live_server import LiveServer  # noqa: E402
from serve_setup import TEXTS, Setup, one_torch_thread  # noqa: E402, F401

from ia3 import (
    BASE_ADAPTER,  # noqa: E402
    cli,  # noqa: E402
    loading,  # noqa: E402
)
from ia3.serve import ServeConfig  # noqa: E402
from ia3.serve import engine as serve_engine  # noqa: E402
from ia3.settings import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLEAR = 0.5  # a top-2 margin above this many standard deviations of the position's logits is a clear choice
NEW_TOKENS = 8


def test_auto_is_bfloat16_only_where_the_device_has_units_for_it(monkeypatch):
    cpu = torch.device("cpu")
    for units, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(serve_engine, "bfloat16_units", lambda device, units=units: units)
        assert serve_engine.serve_dtype(ServeConfig(model="m"), cpu) == want
        quantised = ServeConfig(model="m", quantization="int8")
        assert serve_engine.serve_dtype(quantised, cpu) == torch.float32  # a quantised base keeps float32
        for name in ("float32", "bfloat16", "float16"):
            assert serve_engine.serve_dtype(ServeConfig(model="m", dtype=name), cpu) == getattr(torch, name)


def test_bfloat16_units_reads_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    for flags, want in (({"avx512f", "amx_bf16"}, True), ({"avx512_bf16"}, True), ({"avx2", "avx512f"}, False)):
        monkeypatch.setattr(loading, "cpu_flags", lambda flags=flags: flags)
        assert loading.bfloat16_units(cpu) is want
    assert loading.bfloat16_units(torch.device("meta")) is False


def test_dtype_flag_and_its_check():
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--adapters", "a", "--dtype", "bfloat16"])
    assert cli.serve_config(args).dtype == "bfloat16"
    assert ServeConfig(model="m").dtype == "auto"
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        ServeConfig(model="m", dtype="int4")


@torch.no_grad()
def clear_prefix(setup: Setup, adapter: str, text: str) -> tuple[list[int], bool]:
    """The float32 reference's greedy tokens up to its first unclear choice, and whether they end with EOS."""
    tok, model = setup.tokenizer, setup.ref
    causal = setup.task == "causal"
    ids = tok(text, add_special_tokens=not causal, return_tensors="pt")["input_ids"]
    out = [] if causal else [model.get_base_model().config.decoder_start_token_id]
    tokens: list[int] = []
    for _ in range(NEW_TOKENS):
        if causal:
            inputs = {"input_ids": torch.cat([ids, torch.tensor([tokens], dtype=torch.long)], 1)}
        else:
            inputs = {"input_ids": ids, "decoder_input_ids": torch.tensor([out + tokens])}
        logits = setup._alone(adapter, lambda inputs=inputs: model(**inputs).logits[0, -1])
        top = logits.topk(2).values
        if float(top[0] - top[1]) <= CLEAR * float(logits.std()):
            return tokens, False
        tokens.append(int(logits.argmax()))
        if tokens[-1] == tok.eos_token_id:
            return tokens[:-1], True
    return tokens, False


@pytest.mark.parametrize("task", ["causal", "seq2seq"])
def test_bfloat16_server_agrees_with_float32_where_the_choice_is_clear(tmp_path, task):
    setup = Setup(tmp_path, task)
    srv = LiveServer(
        ServeConfig(
            model=str(setup.model_dir), adapters_dir=str(setup.adapters), task=task, dtype="bfloat16", max_wait_ms=20
        )
    )
    try:
        engine = srv.service.engine
        assert engine.dtype == torch.bfloat16 and engine.base.get_output_embeddings().weight.dtype == torch.bfloat16
        assert engine.vectors.dtypes == {torch.bfloat16}  # the vectors scale in the served dtype, not float32
        compared = 0
        for adapter in ("a", "b", BASE_ADAPTER):
            body = {"adapter": adapter, "inputs": TEXTS, "parameters": {"max_new_tokens": NEW_TOKENS}}
            r = srv.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            for text, output in zip(TEXTS, r.json()["outputs"]):
                tokens, ended = clear_prefix(setup, adapter, text)
                want = setup.tokenizer.decode(tokens, skip_special_tokens=True)
                got = output["text"]
                assert got == want if ended else got.startswith(want), (adapter, text, got, want)
                compared += len(tokens)
        assert compared >= 10  # not vacuous: enough clear tokens were compared
    finally:
        srv.close()
