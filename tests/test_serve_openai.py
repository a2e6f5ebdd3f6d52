"""The OpenAI surface that clients and eval harnesses need, on a live server with a tiny causal LM (a byte-level
BPE tokenizer, so any text round-trips) and adapters with random ("trained-like") vectors:

* logprobs and echo equal the log-softmax of a plain forward of the row's adapter; a row's logprobs in a mixed
  batch equal the same row alone; logprobs are read after penalties and bias, before the temperature;
* presence / frequency / repetition penalties, logit_bias, min_tokens and ignore_eos pick the tokens a reference
  loop picks; best_of;
* structured output (xgrammar): guided_choice and json_schema outputs always conform; a bad schema fails alone; the
  batched mask writes xgrammar's own values, and a constrained row in a mixed batch answers as it does alone; a
  constrained row ends with its grammar even with ignore_eos; on an encoder-decoder (tiny T5, word-level
  vocabulary) constraints work, and what its vocabulary cannot spell is refused, saying so;
* vLLM's tokenizer endpoints, `--save-tokenizer`, 400s on the OpenAI routes;
* lm-evaluation-harness's `local-completions` against the server (slow).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import transformers as tf  # noqa: E402
from live_server import LiveServer  # noqa: E402
from serve_setup import one_torch_thread, save_adapter  # noqa: E402, F401

from ia3 import PeftModel  # noqa: E402
from ia3.serve import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SENTENCES = [
    ("Profit rose 20 percent.", "positive"),
    ("Sales fell sharply in the quarter.", "negative"),
    ("The company will hold its meeting on Monday.", "neutral"),
    ("Net income doubled from last year.", "positive"),
    ("The firm cut 300 jobs.", "negative"),
    ("Orders grew strongly in Asia.", "positive"),
    ("Operating loss widened to 5 million.", "negative"),
    ("The board met in Helsinki.", "neutral"),
    ("Revenue beat expectations.", "positive"),
    ("Shares dropped after the warning.", "negative"),
    ("The report is published in March.", "neutral"),
    ("Margins improved across all units.", "positive"),
]
LABELS = ["negative", "neutral", "positive"]


class ByteSetup:
    """A tiny GPT-2 with a byte-level BPE tokenizer, adapters a and b, and the offline reference (a PeftModel)."""

    def __init__(self, root: Path) -> None:
        from tokenizers import ByteLevelBPETokenizer

        corpus = [s for s, _ in SENTENCES] + LABELS + ['{"label": "positive", "confident": true}', "Sentiment:"]
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus * 4, vocab_size=400, min_frequency=1, special_tokens=["<pad>", "</s>", "<s>"])
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
        tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}Sentiment:"
        self.model_dir = root / "byte-model"
        tok.save_pretrained(self.model_dir)
        torch.manual_seed(0)
        cfg = tf.GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        )
        tf.GPT2LMHeadModel(cfg).save_pretrained(self.model_dir)
        self.adapters = root / "byte-adapters"
        folders = {n: save_adapter("causal", self.model_dir, self.adapters / n, s) for s, n in ((3, "a"), (4, "b"))}
        self.tokenizer = tok
        base = tf.AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        self.ref = PeftModel.from_pretrained(base, folders["a"], adapter_name="a")
        self.ref.load_adapter(folders["b"], "b")
        self.ref.eval()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, adapter: str, ids: list[int]) -> torch.Tensor:
        """Every position's logits (T, V) of `ids` run alone with `adapter`."""
        self.ref.set_adapter(adapter)
        return self.ref(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def byte(tmp_path_factory):
    return ByteSetup(tmp_path_factory.mktemp("serve-openai"))


@pytest.fixture(scope="module")
def server(byte):
    config = ServeConfig(
        model=str(byte.model_dir),
        adapters_dir=str(byte.adapters),
        task="causal",
        max_wait_ms=20,
        max_new_tokens=48,
        dtype="float32",  # logprobs are compared with a float32 forward
    )
    srv = LiveServer(config)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(byte: ByteSetup, adapter: str, ids: list[int], n: int, **s) -> tuple[list[int], list[float]]:
    """Greedy decoding with the penalty formulas written out: (tokens, each token's logprob, EOS included)."""
    out: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        scores = byte.logits(adapter, ids + out)[-1]
        for token, bias in s.get("logit_bias", {}).items():
            scores[int(token)] += bias
        penalty = s.get("repetition_penalty", 1.0)
        for token in set(ids + out):
            scores[token] = scores[token] / penalty if scores[token] > 0 else scores[token] * penalty
        for token in set(out):
            scores[token] -= out.count(token) * s.get("frequency_penalty", 0.0) + s.get("presence_penalty", 0.0)
        if len(out) < s.get("min_tokens", 0):
            scores[1] = float("-inf")
        lp = scores.log_softmax(-1)
        token = int(scores.argmax())
        logprobs.append(float(lp[token]))
        if token == 1 and not s.get("ignore_eos"):
            break
        out.append(token)
    return out, logprobs


# -- logprobs and echo -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["a", "b"])
def test_echo_logprobs_equal_a_plain_forward(client, byte, adapter):
    ids = byte.ids(SENTENCES[0][0] + " Sentiment:")
    want = byte.logits(adapter, ids).log_softmax(-1)
    out = client.completions.create(model=adapter, prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == byte.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(want[t - 1, ids[t]]), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    as_ids = client.completions.create(
        model=adapter,
        prompt=ids,
        max_tokens=0,
        echo=True,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    ).choices[0]
    assert as_ids.logprobs.tokens == [f"token_id:{t}" for t in ids]
    for t in range(1, len(ids)):  # the token's own logprob and the 3 most likely tokens'
        values, best = want[t - 1].topk(3)
        top = {f"token_id:{i}": v for i, v in zip(best.tolist(), values.tolist())}
        top[f"token_id:{ids[t]}"] = float(want[t - 1, ids[t]])
        got = as_ids.logprobs.top_logprobs[t]
        assert got.keys() == top.keys() and all(abs(got[k] - v) < 1e-4 for k, v in top.items())
    one = client.completions.create(model=adapter, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = one.choices[0].logprobs
    assert len(lp1.token_logprobs) == len(ids) + 1 and lp1.token_logprobs[:-1] == pytest.approx(lp.token_logprobs)
    assert lp1.token_logprobs[-1] == pytest.approx(float(want[-1].max()), abs=1e-4)  # greedy: the best token


def test_logprobs_in_a_mixed_batch_equal_each_row_alone(client, byte):
    prompts = [byte.ids(s) for s, _ in SENTENCES[:6]]
    bodies = [
        dict(model="ab"[i % 2], prompt=p, max_tokens=6, temperature=0, logprobs=i % 4, echo=i % 3 == 0)
        | ({"presence_penalty": 1.0} if i == 4 else {})
        for i, p in enumerate(prompts)
    ]

    def ask(body):
        return client.completions.create(**body).model_dump()["choices"]

    alone = [ask(b) for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, bodies))
    for a, b in zip(alone, together):
        assert a[0]["text"] == b[0]["text"] and a[0]["logprobs"]["tokens"] == b[0]["logprobs"]["tokens"]
        for x, y in zip(a[0]["logprobs"]["token_logprobs"], b[0]["logprobs"]["token_logprobs"]):
            assert (x is None and y is None) or abs(x - y) < 1e-4
        assert [len(t or {}) for t in a[0]["logprobs"]["top_logprobs"]] == [
            len(t or {}) for t in b[0]["logprobs"]["top_logprobs"]
        ]


def test_logprobs_are_read_after_bias_before_temperature(client, byte):
    ids = byte.ids(SENTENCES[1][0])
    bias = {"5": 3.0, "17": -2.0}
    out = client.completions.create(
        model="a",
        prompt=ids,
        max_tokens=5,
        temperature=1.7,
        seed=7,
        logprobs=0,
        logit_bias=bias,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    tokens = [int(t.split(":")[1]) for t in lp.tokens]
    assert len(tokens) == 5
    for i, token in enumerate(tokens):
        scores = byte.logits("a", ids + tokens[:i])[-1]
        for k, v in bias.items():
            scores[int(k)] += v
        assert lp.token_logprobs[i] == pytest.approx(float(scores.log_softmax(-1)[token]), abs=1e-4)
        assert lp.top_logprobs[i] == {f"token_id:{token}": lp.token_logprobs[i]}  # logprobs 0: the token only


def test_streamed_logprobs_equal_the_whole_answer(client, byte):
    ids = byte.ids(SENTENCES[2][0])
    whole = client.completions.create(model="b", prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    chunks = list(
        client.completions.create(model="b", prompt=ids, max_tokens=8, temperature=0, logprobs=2, stream=True)
    )
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-6)
    messages = [{"role": "user", "content": "Profit rose."}]
    chat = client.chat.completions.create(
        model="a", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob for c in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the best token


# -- penalties, bias, min_tokens, ignore_eos, best_of -----------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        dict(presence_penalty=1.5, frequency_penalty=0.8),
        dict(repetition_penalty=1.8),
        dict(logit_bias={"7": 4.0, "9": -100.0}, frequency_penalty=-0.5),
        dict(min_tokens=6, repetition_penalty=1.3),
        dict(ignore_eos=True, presence_penalty=-1.0),
    ],
)
def test_penalties_pick_what_the_reference_loop_picks(client, byte, settings):
    ids = byte.ids(SENTENCES[3][0])
    plain, _ = reference(byte, "b", ids, 12)
    want, want_lp = reference(byte, "b", ids, 12, **settings)
    assert want != plain or settings.get("ignore_eos"), "the settings must change the tokens"
    vllm = {k: v for k, v in settings.items() if k in ("repetition_penalty", "min_tokens", "ignore_eos")}
    openai_fields = {k: v for k, v in settings.items() if k not in vllm}
    out = client.completions.create(
        model="b", prompt=ids, max_tokens=12, temperature=0, logprobs=0, extra_body=vllm, **openai_fields
    )
    assert out.choices[0].text == byte.tokenizer.decode(want)
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(want_lp, abs=1e-4)


def test_best_of_answers_the_n_most_likely(client, byte):
    ids = byte.ids(SENTENCES[4][0])
    out = client.completions.create(
        model="a", prompt=ids, max_tokens=6, temperature=1.0, seed=3, n=2, best_of=5, logprobs=0
    )
    sums = [sum(c.logprobs.token_logprobs) for c in out.choices]
    assert len(out.choices) == 2 and sums == sorted(sums, reverse=True)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="a", prompt=ids, max_tokens=2, n=3, best_of=2)


# -- structured output -----------------------------------------------------------------------------------------------
def test_guided_choice_always_answers_a_choice(client, byte):
    choices = ["positive", "negative", "neutral"]

    def ask(i):
        body = {"guided_choice": choices} if i % 2 else {"structured_outputs": {"choice": choices}}
        return client.completions.create(
            model="ab"[i % 2], prompt=SENTENCES[i][0], max_tokens=10, temperature=1.0, n=4, extra_body=body
        )

    with ThreadPoolExecutor(6) as pool:
        answers = [c.text for out in pool.map(ask, range(6)) for c in out.choices]
    assert len(answers) == 24 and set(answers) <= set(choices) and len(set(answers)) > 1


def test_json_schema_outputs_parse_and_validate_and_a_bad_schema_fails_alone(client, server, byte):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"label": {"enum": LABELS}, "confident": {"type": "boolean"}},
        "required": ["label", "confident"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": schema}}

    def ask(i):
        if i == 3:  # a broken schema among good ones
            bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}}}
            return server.post("/v1/completions", json={"model": "a", "prompt": "x", "response_format": bad})
        return client.completions.create(
            model="ab"[i % 2],
            prompt=SENTENCES[i][0],
            max_tokens=40,
            temperature=1.0,
            n=8,
            extra_body={"response_format": fmt},
        )

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    bad = results.pop(3)
    assert bad.status_code == 400 and "response_format" in bad.json()["error"]["message"], bad.text
    texts = [c.text for out in results for c in out.choices]
    assert len(texts) == 56
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert all(c.finish_reason == "stop" for out in results for c in out.choices)


NOTE_SCHEMA = {  # a label, then a free string that cannot close within the tests' max_tokens
    "type": "object",
    "properties": {"label": {"enum": LABELS}, "note": {"type": "string", "minLength": 200}},
    "required": ["label", "note"],
    "additionalProperties": False,
}


def test_batched_guide_mask_equals_xgrammars_and_a_guided_row_in_a_mixed_batch_equals_it_alone(byte):
    xgr = pytest.importorskip("xgrammar")
    from ia3.serve.decoding import Row, Sampling, next_tokens, shape
    from ia3.serve.guided import Grammars, GuideSpec, XGrammarGuide

    vocab = len(byte.tokenizer)
    make = Grammars(byte.tokenizer, vocab, [1], 10_000).compile(GuideSpec("json_schema", json.dumps(NOTE_SCHEMA)))
    settings = [  # (sampling, guided, logprobs)
        (Sampling(), False, None),
        (Sampling(), True, None),
        (Sampling(temperature=1.0, seed=5), True, None),
        (Sampling(logit_bias=((40, 2.0), (41, -3.0)), presence_penalty=0.5), True, 2),
        (Sampling(temperature=0.8, seed=6), False, 1),
        (Sampling(repetition_penalty=1.3), True, 0),
        (Sampling(min_tokens=30), True, None),
        (Sampling(), True, 3),  # six constrained rows: more than one group of `MASK_ROWS`
    ]

    def rows() -> list[Row]:
        out = []
        for k, (sampling, guided, logprobs) in enumerate(settings):
            row = Row([2, 5], "a", 40, sampling, index=k, logprobs=logprobs, eos=frozenset({1}))
            row.guide = make() if guided else None
            row.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
            out.append(row)
        return out

    batch, alone = rows(), rows()
    torch.manual_seed(0)
    for _ in range(48):  # through the key names and the label into the free text
        logits = torch.randn(len(settings), vocab) * 4
        guided = [i for i, r in enumerate(batch) if r.guide is not None]
        # the batched mask writes what xgrammar's own kernel writes, and leaves the other rows alone
        masked, want = logits.clone(), logits.clone()
        XGrammarGuide.mask_rows(masked, guided, [batch[i].guide for i in guided])
        bitmask = xgr.allocate_token_bitmask(len(settings), vocab)
        for i in guided:
            batch[i].guide.matcher.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab, indices=guided)
        assert torch.equal(masked, want)
        with torch.inference_mode():  # as a model's logits may be: masked in place all the same
            step = logits.clone()
        picks = next_tokens(step, batch)
        for i, (row, twin) in enumerate(zip(batch, alone)):
            assert next_tokens(logits[i : i + 1].clone(), [twin]) == [picks[i]]
            assert row.pending == twin.pending
            if row.logprobs is not None:  # read after the shaping and the mask (the order `Sampling` gives)
                assert row.pending.logprob == float(shape(want[i], row).log_softmax(-1)[picks[i]])
            for r in (row, twin):
                assert r.guide is None or r.guide.accept(picks[i])
                r.tokens.append(picks[i])
    for row in batch:
        if row.guide is not None:
            text = byte.tokenizer.decode(row.tokens)
            assert text.startswith('{"label": "') and text.split('"')[3] in LABELS and '"note": "' in text, text


def test_guided_rows_answer_alike_alone_and_in_a_mixed_batch(client, byte):
    fmt = {"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE_SCHEMA}}
    bodies = [
        dict(model="ab"[i % 2], prompt=byte.ids(s), max_tokens=32, temperature=0, logprobs=i % 3 or None)
        | ({"extra_body": {"response_format": fmt}} if i % 2 == 0 else {"presence_penalty": 0.5 * (i % 3)})
        for i, (s, _) in enumerate(SENTENCES[:8])
    ]

    def ask(body):
        return client.completions.create(**body).model_dump()["choices"][0]

    alone = [ask(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, bodies))
    for body, a, b in zip(bodies, alone, together):
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"] == "length"
        if a["logprobs"] is not None:
            assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)
        if "extra_body" in body:
            assert a["text"].startswith('{"label": "') and a["text"].split('"')[3] in LABELS, a["text"]
            assert '"note": "' in a["text"], a["text"]


def test_a_guided_row_ends_with_its_grammar_even_with_ignore_eos(client, byte):
    out = client.completions.create(
        model="a",
        prompt=byte.ids(SENTENCES[0][0]),
        max_tokens=10,
        temperature=0,
        extra_body={"guided_choice": LABELS, "ignore_eos": True},
    )
    assert out.choices[0].text in LABELS and out.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def t5_server(tmp_path_factory):
    """An encoder-decoder: the tests' tiny T5, whose word-level vocabulary (words and punctuation of the demo data)
    has no `{` or `"` token, and has `p` besides `positive`."""
    from serve_setup import Setup, serve_config

    setup = Setup(tmp_path_factory.mktemp("serve-openai-t5"), "seq2seq")
    srv = LiveServer(serve_config(setup))
    srv.tokenizer = setup.tokenizer
    yield srv
    srv.close()


def test_structured_output_on_an_encoder_decoder_and_what_its_vocabulary_cannot_spell(t5_server):
    body = {"model": "a", "prompt": "Net sales fell", "max_tokens": 8, "temperature": 0}
    for choices in (["negative", "neutral"], ["neutral"]):  # whole words: any token the grammar allows completes
        r = t5_server.post("/v1/completions", json=body | {"guided_choice": choices})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] in choices and r.json()["choices"][0]["finish_reason"] == "stop"
    # JSON needs `{` first: no token can start it, so the request is refused before it is queued, saying why
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}
    for extra in ({"response_format": fmt}, {"response_format": {"type": "json_object"}}):
        r = t5_server.post("/v1/completions", json=body | extra)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "response_format" in message and "vocabulary cannot spell" in message, message
    # `p` starts "positive" but no token continues it: a row that takes it fails, saying why
    p = str(t5_server.tokenizer.convert_tokens_to_ids("p"))
    r = t5_server.post("/v1/completions", json=body | {"guided_choice": ["positive"], "logit_bias": {p: 100}})
    assert r.status_code == 400 and "vocabulary cannot spell" in r.json()["error"]["message"], r.text


# -- tokenizer endpoints, errors ---------------------------------------------------------------------------------
def test_tokenizer_endpoints_and_saved_tokenizer(server, byte, tmp_path):
    info = server.client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["vocab_size"] == len(byte.tokenizer)
    text = SENTENCES[5][0]
    tokens = server.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert tokens == byte.ids(text)
    assert server.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == text
    saved = server.service.save_tokenizer(tmp_path / "tok")
    assert tf.AutoTokenizer.from_pretrained(saved)(text, add_special_tokens=False)["input_ids"] == tokens


def test_openai_routes_answer_400_and_name_ignored_fields(server):
    post = server.post
    checks = [
        {"model": "a", "prompt": "x", "temperature": "0.5"},  # strings are not numbers
        {"model": "a", "prompt": "x", "stream": "true"},
        {"model": "a", "prompt": "x", "stream_options": {"include_usage": True}},
        {"model": "a", "prompt": "x", "max_tokens": 0},
        {"model": "a", "prompt": "x", "logprobs": 21},
        {"model": "a", "prompt": "x", "logit_bias": {"nope": 1}},
        {"model": "a", "prompt": "x", "no_such_field": 1},
        {"model": "a", "prompt": "x", "guided_regex": "[a-z]+", "guided_choice": ["a"]},
    ]
    for body in checks:
        r = post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
    r = post(
        "/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    )
    assert r.status_code == 400
    r = post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2, "use_beam_search": False})
    assert r.status_code == 200 and r.headers["ia3-ignored-fields"] == "use_beam_search"
    assert r.json()["choices"][0]["stop_reason"] is None
    assert post("/v1/generate", json={"adapter": "a", "inputs": "x", "parameters": {"top_k": "1"}}).status_code == 422


# -- lm-evaluation-harness -------------------------------------------------------------------------------------------
MC_TASK = """task: ia3_sentiment_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}\\nSentiment:"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: ["negative", "neutral", "positive"]
metric_list:
  - metric: acc
"""
GEN_TASK = """task: ia3_sentiment_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{sentence}}}}\\nSentiment:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_the_server_scores(server, byte, tmp_path, monkeypatch):
    """lm-eval's `local-completions` (echo + logprobs for multiple choice, greedy generation for generate_until)
    against the live server: its accuracies equal the ones computed from the server's own answers."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the data are local files; nothing is downloaded
    from lm_eval.tasks import TaskManager

    http = server.client
    docs = []
    for i, (sentence, label) in enumerate(SENTENCES * 2):
        context = byte.ids(sentence + "\nSentiment:")
        scores = []
        for choice in LABELS:
            ids = context + byte.ids(" " + choice)
            body = {"model": "a", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
            lp = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
            scores.append(sum(lp[len(context) :]))
        body = {"model": "a", "prompt": context, "max_tokens": 6, "temperature": 0, "stop": ["\n"]}
        greedy = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        # half of the targets are the server's own answers, so the expected accuracy is not trivially 0
        answer = greedy if i % 2 else " " + label
        docs.append(
            {"sentence": sentence, "gold": LABELS.index(label), "answer": answer, "best": scores, "greedy": greedy}
        )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": server.url + "/v1/completions",
            "model": "a",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(byte.model_dir),
            "num_concurrent": 4,
            "max_retries": 1,
        },
        tasks=["ia3_sentiment_mc", "ia3_sentiment_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=False,
    )["results"]
    mc = sum(max(range(3), key=d["best"].__getitem__) == d["gold"] for d in docs) / len(docs)
    assert results["ia3_sentiment_mc"]["acc,none"] == pytest.approx(mc)
    gen = sum(d["greedy"] == d["answer"] for d in docs) / len(docs)
    assert 0.5 <= gen < 1 and mc > 0
    assert results["ia3_sentiment_gen"]["exact_match,none"] == pytest.approx(gen)
