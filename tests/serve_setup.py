"""The shared setup of the serve tests: a tiny model folder per task, adapters a, b, c (and a spare, `late`) with
random vectors, and the offline reference (a separate `PeftModel`, each input run alone with its adapter active)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_dirs import make_model_dir

from ia3 import BASE_ADAPTER, IA3Config, PeftModel, get_peft_model
from ia3.recipe.data import Examples
from ia3.recipe.evaluate import score_batch
from ia3.recipe.features import encode
from ia3.tasks import get_task

LABELS = ["negative", "neutral", "positive"]
TEXTS = [
    "Operating profit rose to EUR 13.1 mn .",
    "Net sales fell",
    "The company said it will cut jobs in Finland .",
    "Sales",
]
TASK_TYPE = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "cls": "SEQ_CLS"}
AUTO = {
    "seq2seq": tf.AutoModelForSeq2SeqLM,
    "causal": tf.AutoModelForCausalLM,
    "cls": tf.AutoModelForSequenceClassification,
}


def serve_config(setup: Setup, **overrides):
    """A `ServeConfig` over `setup`'s model and adapters, in float32 (answers are compared with float32
    references); `overrides` change or add settings."""
    from ia3.serve import ServeConfig  # the serve extra: only the serve tests import this helper

    settings = dict(
        model=str(setup.model_dir),
        adapters_dir=str(setup.adapters),
        task=setup.task,
        max_wait_ms=20,
        max_new_tokens=24,
        dtype="float32",
    )
    settings.update(overrides)
    return ServeConfig(**settings)


# -- fixtures: tiny models, adapters, offline references, live servers -----------------------------------------------
def _base(task: str, model_dir: Path):
    kwargs = {}
    if task == "cls":
        kwargs = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return AUTO[task].from_pretrained(model_dir, **kwargs).eval()


def save_adapter(task: str, model_dir: Path, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)  # init_ia3_weights=False: random vectors (and, for cls, a random head) per adapter
    model = get_peft_model(_base(task, model_dir), IA3Config(task_type=TASK_TYPE[task], init_ia3_weights=False))
    model.save_pretrained(folder)
    return folder


class Setup:
    """One task: model folder, adapters folder (a, b, c), a spare adapter (`late`), the offline reference."""

    def __init__(self, root: Path, task: str) -> None:
        self.task = task
        self.model_dir = make_model_dir(root / "models", task)
        self.adapters = root / f"{task}-adapters"
        self.spare = root / f"{task}-spare"
        folders = {
            name: save_adapter(task, self.model_dir, self.adapters / name, seed)
            for seed, name in enumerate(["a", "b", "c"], start=1)
        }
        folders["late"] = save_adapter(task, self.model_dir, self.spare / "late", 7)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(self.model_dir)
        ref = PeftModel.from_pretrained(_base(task, self.model_dir), folders["a"], adapter_name="a")
        for name in ("b", "c", "late"):
            ref.load_adapter(folders[name], name)
        self.ref = ref.eval()
        self._cache: dict = {}

    def _alone(self, adapter: str, fn):
        if adapter == BASE_ADAPTER:
            with self.ref.disable_adapter():
                return fn()
        self.ref.set_adapter(adapter)
        return fn()

    @torch.no_grad()
    def generate(self, adapter: str, text: str, max_new_tokens: int = 6, num_beams: int = 1) -> str:
        key = ("g", adapter, text, max_new_tokens, num_beams)
        if key not in self._cache:
            tok = self.tokenizer
            ids = tok(text, add_special_tokens=self.task != "causal", return_tensors="pt")["input_ids"]
            out = self._alone(
                adapter,
                lambda: self.ref.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                ),
            )
            if self.task == "causal":
                out = out[:, ids.shape[1] :]
            self._cache[key] = tok.decode(out[0], skip_special_tokens=True)
        return self._cache[key]

    @torch.no_grad()
    def classify(self, adapter: str, text: str) -> tuple[str, list[float]]:
        key = ("c", adapter, text)
        if key not in self._cache:
            if self.task == "cls":
                batch = self.tokenizer(text, return_tensors="pt")
                scores = self._alone(adapter, lambda: self.ref(**batch).logits[0].tolist())
            else:
                enc = encode(get_task(self.task)(self.tokenizer), Examples([text], [0], LABELS), 512, 32)
                model = self.ref.get_base_model()
                scores = self._alone(adapter, lambda: score_batch(model, enc, [0], torch.device("cpu"))[1][0])
            self._cache[key] = (LABELS[max(range(3), key=scores.__getitem__)], scores)
        return self._cache[key]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy machine (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
