"""The model side of the server: tokenizer, base model with its adapters, and one batched call per batch.

Threads: the model runs on the batcher's worker thread only. Requests are tokenised one by one on a separate
tokenizer thread (`encode_one`, `choices`), so one request's unencodable input fails that request alone, with its own
copy of the tokenizer (a fast tokenizer is not shared between threads); the worker decodes with another copy.
Tokenisation, scoring and generation are the task's (`ia3.tasks`), exactly as in the recipe: seq2seq and cls inputs
get the tokenizer's special tokens; causal prompts get BOS only when the tokenizer adds one, and no EOS. Batches pad
to their longest row (causal rows on the left, with position ids that skip the padding), so each row's answer
equals the same input run alone (to float32 rounding).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ia3.config import IA3Config
from ia3.families import DecodeState
from ia3.functional import PREFIX, unwrapped_name
from ia3.loading import ModelSource, bfloat16_units, default_device, load_base_model, load_tokenizer
from ia3.peft_model import get_peft_model
from ia3.serialization import WEIGHTS_NAME, load_tensors
from ia3.serve.budget import Budgets, Speed
from ia3.serve.config import ServeConfig
from ia3.serve.decoding import Decoder, Sampling, distributions
from ia3.serve.errors import ApiError
from ia3.serve.vectors import RawVectors, VectorBank
from ia3.settings import RECIPE_FILE, ConfigError, read_settings_file
from ia3.targets import find_targets, resolve_config
from ia3.tasks import LabelLengthError, Task
from ia3.tuner import BASE_ADAPTER, TASK_HEADS, contiguous_head_input

log = logging.getLogger("ia3.serve")
WHOLE_READ_BYTES = 64 << 20  # adapter files up to this size are read whole, then parsed
LAYOUT_ADAPTER = "ia3_serve_layout"  # the name under which `prepare_vectors` injects layers (deleted at once)


@dataclass(frozen=True)
class GenerateParams:
    """The settings of a static generation batch (every row of the batch shares them)."""

    max_new_tokens: int
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None


@dataclass
class Generated:
    """One answer: its new tokens (EOS excluded), text and why it ended ("stop": EOS; "length": the token limit)."""

    tokens: list[int]
    text: str
    finish_reason: str


@dataclass
class AdapterFiles:
    """An adapter read from disk (on a loading thread): its config, and its weights as the file's bytes (`raw`, for
    a copy into the vector tables) or as tensors (parsed from them when first asked for, or read by the tensor
    reader for a file too large or malformed to take whole)."""

    config: IA3Config
    folder: Path
    source: str
    raw: RawVectors | None = None
    parsed: dict[str, torch.Tensor] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self.parsed is None:
            assert self.raw is not None
            self.parsed = self.raw.tensors()
        return self.parsed

    @property
    def vectors(self) -> dict[str, torch.Tensor] | RawVectors:
        """What the vector tables copy from: the bytes when there are any."""
        return self.raw if self.raw is not None else self.tensors

    @property
    def nbytes(self) -> int:
        if self.raw is not None:
            return self.raw.nbytes
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_adapter(folder: Path, config: IA3Config, source: str) -> AdapterFiles:
    """Read `folder`'s safetensors weights (any thread): a file up to `WHOLE_READ_BYTES` whole, kept as bytes with
    its header parsed (`RawVectors`: no tensor made, see `ia3.serve.vectors`); a larger or malformed one by
    `load_tensors`, which raises ValueError naming the problem for a truncated or corrupt file."""
    path = folder / WEIGHTS_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))  # four system calls in all, not seven
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size) if size <= WHOLE_READ_BYTES else b""
        finally:
            os.close(fd)
        raw = RawVectors.parse(data) if len(data) == size else None
    except OSError:  # the tensor reader says what is wrong
        raw = None
    if raw is not None:
        return AdapterFiles(config, folder, source, raw=raw)
    return AdapterFiles(config, folder, source, parsed=load_tensors(path))


class MemoryTrim:
    """Hands the C heap's free pages back to the system (glibc's `malloc_trim`), at most every `every_s` seconds.

    A running batch's cache is a few large buffers (SmolLM2, 32 rows: ~250 MB); freed, glibc keeps most of their
    pages (its mmap threshold rises after the first large free), so a server's RSS stays at its busiest moment's.
    Called when the batch empties: measured by `bench/serve_adapters.py`, which compares RSS at idle moments."""

    def __init__(self, trim: Callable[[int], int], every_s: float = 5.0) -> None:
        self.trim = trim
        self.every_s = every_s
        self.last = -math.inf

    @classmethod
    def of_this_system(cls) -> MemoryTrim | None:
        """None where the C library has no `malloc_trim` (not glibc)."""
        try:
            return cls(ctypes.CDLL(None).malloc_trim)  # the process's own symbols, the C library's among them
        except (OSError, AttributeError):
            return None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.trim(0)  # ctypes lets go of the GIL for the call


def model_name(adapter: str) -> str:
    """The name an adapter has inside the model: its own, or for a Hub id (`owner/name`, which may hold dots) a
    name derived from it."""
    if "/" not in adapter and "." not in adapter:
        return adapter
    return "hub_" + hashlib.sha1(adapter.encode()).hexdigest()[:24]


def _gave_up_criterion(stop):
    """A transformers stopping criterion that ends every row once `stop()` says the batch's requests gave up."""
    from transformers import StoppingCriteria

    class GaveUp(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            return torch.full((input_ids.shape[0],), bool(stop()), dtype=torch.bool, device=input_ids.device)

    return GaveUp()


SAMPLED = Sampling(temperature=1.0, top_p=0.9)  # how the speed probe's rows pick their tokens


def _best_time(fn, timed: bool = True) -> float:
    """The faster of two runs of `fn` after a warm-up: its wall time, or (`timed=False`) the seconds it returns."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start if timed else result)
    return max(min(runs[1:]), 1e-9)


def serve_dtype(config: ServeConfig, device: torch.device) -> torch.dtype:
    """The dtype `config.dtype` names; `auto`: bfloat16 where `device` has matrix units for it (a quantised base
    keeps float32), else float32."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if config.quantization == "none" and bfloat16_units(device):
        return torch.bfloat16
    return torch.float32


def labels_from_recipes(adapter_folders: list[Path]) -> list[str] | None:
    """`data.label_names` of the first adapter folder with a `recipe.yaml` (as `ia3 train` writes) that names them."""
    for folder in adapter_folders:
        path = folder / RECIPE_FILE
        if path.is_file():
            try:
                data = read_settings_file(path)
            except ConfigError:  # not a run's settings: no labels from it
                continue
            names = (data.get("data") or {}).get("label_names")
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return names
    return None


class Engine:
    """Tokenizer + base model (+ `PeftModel` once an adapter is loaded); runs whole batches."""

    def __init__(self, config: ServeConfig, task_class: type[Task], label_names: list[str] | None) -> None:
        self.config = config
        source = ModelSource(config.model, gguf_file=config.gguf_file, quantization=config.quantization)
        tokenizer = load_tokenizer(source, task_class)
        self.task = task_class(tokenizer, prompt=config.prompt, chat_template=config.chat_template)
        self.device = torch.device(config.device) if config.device else default_device()
        self.dtype = serve_dtype(config, self.device)
        model = load_base_model(source, task_class, label_names or [], dtype=self.dtype)
        log.info("serving %s in %s on %s", config.model, str(self.dtype).removeprefix("torch."), self.device)
        if not task_class.generates and not label_names:  # a classifier's labels are its head's classes
            label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self.label_names = list(label_names) if label_names else None
        self.base = model.to(self.device).eval().requires_grad_(False)  # the HF model; adapters wrap its layers
        contiguous_head_input(self.base)  # also while no adapter is loaded (see its docstring)
        self.peft = None  # ia3 PeftModel, created with the first adapter: it wraps the targeted layers
        self.vectors: VectorBank | None = None  # every adapter's vectors, once the model has layers for them
        self._layout_lock = threading.RLock()  # held while layers are injected, and while they are looked up
        self._targets_of: dict[tuple, list[tuple[str, bool]] | None] = {}
        self.tokenizer = tokenizer
        self.max_input_tokens = self._input_budget()
        # the tokenizer thread's copy: it truncates on the left (the end of an input, next to the answer, stays)
        request_tokenizer = copy.deepcopy(tokenizer)
        request_tokenizer.truncation_side = "left"
        self.request_task = task_class(request_tokenizer, prompt=config.prompt, chat_template=config.chat_template)
        self._choices: dict[tuple[str, ...], list[list[int]]] = {}
        if self.label_names and task_class.generates:
            self.choices(tuple(self.label_names))  # a label too long for max_label_tokens fails at start
        self.decoder: Decoder | None = None
        self.static_reason = self._continuous_reason()
        self.budgets = Budgets.of(config, self._measure_speed(), self.max_input_tokens)
        if self.static_reason is None:
            assert task_class.decode_state is not None
            self.decoder = Decoder(
                self.base,
                copy.deepcopy(tokenizer),
                self.device,
                self._rows,
                task_class.decode_state,
                max_rows=config.max_batch_size,
                max_prefill_tokens=self.budgets.prefill_tokens,
                max_rows_per_request=config.request_rows,
                burst_prefill=config.burst_prefill,
                on_idle=MemoryTrim.of_this_system(),
                max_positions=self.positions if task_class.answer_follows_prompt else None,
                adapter_loaded=self.has_adapter,
                packed=config.packed_steps and self._packs(task_class.decode_state),
            )

    @torch.inference_mode()
    def _measure_speed(self) -> Speed | None:
        """How fast the base model prefills a prompt and decodes a request's rows here (best of two short runs
        after a warm-up; about a second on a small model on a CPU). None if the measurement fails."""
        length = max(1, min(128, self.max_input_tokens))
        vocab = max(6, min(len(self.tokenizer), 1000))
        ids = [5 + i % (vocab - 5) for i in range(length)]
        try:
            state_class = self.task.decode_state
            if self.static_reason is None and state_class is not None:
                pad = self.task.pad_id
                prefill = _best_time(lambda: state_class.prefill(self.base, [ids], pad, self.device))
                rows = self.config.request_rows

                def decode() -> float:  # the rows sampled (top-p), the dearer way to pick their tokens
                    state, _ = state_class.prefill(self.base, [ids[:8]] * rows, pad, self.device)
                    start = time.perf_counter()
                    for _ in range(4):
                        logits = state.step(self.base, [ids[0]] * rows)
                        distributions(logits.float(), [SAMPLED] * rows)
                    return time.perf_counter() - start

                return Speed(length / prefill, rows * 4 / _best_time(decode, timed=False), rows)
            choices = [[ids[0]]] if self.task.generates else [[]]
            return Speed(length / _best_time(lambda: self.task.score(self.base, [ids], choices, self.device)))
        except Exception as err:  # a model the probe cannot drive: the budgets fall back to fixed defaults
            log.warning("could not measure the model's speed (%s: %s); fixed default budgets", type(err).__name__, err)
            return None

    def _continuous_reason(self) -> str | None:
        """None when generation decodes continuously, else why it runs in static batches."""
        if self.config.batching != "continuous":
            return "--batching static"
        state = self.task.decode_state
        if state is None:
            return f"task {self.task.name} does not generate"
        return state.unsupported(self.base, self.device)

    def _packs(self, state: type[DecodeState]) -> bool:
        """Whether packed steps (`ia3.packed`) give this model's logits: tried once at start against the plain
        path (a reason is logged where not)."""
        reason = state.unpacked(
            self.base, self.device, lambda rows, tokens=None: self._rows([BASE_ADAPTER] * rows, tokens)
        )
        if reason is not None:
            log.info("packed steps off for this model (prompts and decode steps run apart): %s", reason)
        return reason is None

    @property
    def vocab_size(self) -> int:
        """The model's logits width (token ids run below it)."""
        head = self.base.get_output_embeddings() if hasattr(self.base, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return max(int(head.weight.shape[0]), len(self.tokenizer))
        return max(int(getattr(self.base.config, "vocab_size", 0) or 0), len(self.tokenizer))

    @property
    def positions(self) -> int | None:
        cfg = self.base.config
        value = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        return int(value) if value else None

    def _input_budget(self) -> int:
        positions = self.positions
        budget = self.config.max_input_tokens
        if positions:
            # a decoder-only model writes its answer in the positions after the prompt
            reserve = (
                max(self.config.max_new_tokens, self.config.max_label_tokens) if self.task.answer_follows_prompt else 0
            )
            budget = min(budget, int(positions) - reserve)
        if budget < 1:
            raise ValueError(
                f"The model takes {positions} positions: nothing is left for the input after "
                f"max_new_tokens / max_label_tokens; lower them"
            )
        return budget

    # -- adapters ----------------------------------------------------------------------------------------------------
    def fits(self, files: AdapterFiles) -> bool:
        """Whether `files` installs as a copy into the vector tables (any thread, nothing in the model changes):
        its config adds no modules to save, targets only layers the model already has (on the same side), and its
        file has exactly one vector of the right size for each of them."""
        if self.vectors is None:
            return False
        targets = self._targets(files.config)
        columns = self.vectors.columns()
        if targets is None or any(key not in columns or columns[key].is_feedforward != ff for key, ff in targets):
            return False
        vectors = files.vectors
        return set(vectors.keys()) == {key for key, _ in targets} and not self.vectors.problems(vectors)

    def install_adapter(self, name: str, files: AdapterFiles) -> None:
        """Add adapter `name` from tensors already read. When it `fits`, a copy into the vector tables, safe on any
        thread; else (worker thread only) its layers are injected into the model first, strictly: a file that does
        not fit this model raises ValueError and leaves the other adapters as they were."""
        inner = model_name(name)
        if self.fits(files):
            assert self.vectors is not None
            self.vectors.add(inner, files.vectors)
        else:
            self._inject(inner, files.config, files)

    def prepare_vectors(self) -> None:
        """Wrap the layers the task's default (IA)^3 config targets and make the (empty) vector tables now, so that
        the first adapters requested install as copies like the rest instead of waiting, all of them, for the worker
        to inject the first (a server with an adapters folder that has none in it yet). Nothing for a task whose
        adapters train whole modules (a classifier's head), or a model with no default targets."""
        if self.vectors is not None or TASK_HEADS.get(self.task.peft_task_type or ""):
            return
        try:
            self._inject(LAYOUT_ADAPTER, IA3Config(task_type=self.task.peft_task_type))
        except ValueError as err:
            log.info("vector tables made with the first adapter instead (%s)", err)

    def _inject(self, inner: str, config: IA3Config, files: AdapterFiles | None = None) -> None:
        """The slow path (worker thread, or before it starts): inject the layers `config` targets, load `files`'
        tensors, and widen the vector tables to the model's layers; the adapter's vectors then live in the tables
        (and in the model too when it has modules to save, whose copies cannot be gathered). Without `files`,
        only the layers."""
        config = dataclasses.replace(config, inference_mode=True, init_ia3_weights=True)
        with self._layout_lock:
            # vectors in the served dtype (autocast off): bf16 weights scale by bf16 vectors, no casts per layer
            if self.peft is None:
                self.peft = get_peft_model(self.base, config, adapter_name=inner, autocast_adapter_dtype=False)
            else:
                self.peft.base_model.inject_adapter(inner, config, autocast_adapter_dtype=False)
            tuner = self.peft.base_model
            if files is not None:
                try:
                    self.peft.load_adapter_state_dict(files.tensors, inner, source=files.source)
                except BaseException:
                    tuner.delete_adapter(inner)
                    raise
            self.base.eval()
            if self.vectors is None:
                self.vectors = VectorBank(self.config.max_loaded_adapters or 64)
            layers = [(f"{PREFIX}{unwrapped_name(n)}.ia3_l", layer) for n, layer in tuner.ia3_layers()]
            self.vectors.relayout(layers, [w for _, w in tuner.wrappers()])
            if files is not None:
                vectors = self.peft.adapter_state_dict(inner)
                self.vectors.add(inner, {k: v for k, v in vectors.items() if k.endswith(".ia3_l")})
            if files is None or not any(inner in w.modules_to_save for _, w in tuner.wrappers()):
                tuner.delete_adapter(inner)  # its layers stay, its vectors live in the tables
            self._targets_of.clear()

    def _targets(self, config: IA3Config) -> list[tuple[str, bool]] | None:
        """(PEFT key, scales the input) of each layer `config` targets in this model; None when it has modules to
        save or targets nothing here. Cached per targeting fields."""
        key = (
            config.task_type,
            repr(config.target_modules),
            repr(config.exclude_modules),
            repr(config.feedforward_modules),
            repr(config.modules_to_save),
        )
        if key not in self._targets_of:
            with self._layout_lock:  # the module walk must not see an injection half done
                if key not in self._targets_of:  # once: a burst of first loads waits for one walk, not one each
                    self._targets_of[key] = self._walk_targets(config)
        return self._targets_of[key]

    def _walk_targets(self, config: IA3Config) -> list[tuple[str, bool]] | None:
        try:
            resolved = resolve_config(config, self.base)
            saves = resolved.modules_to_save or TASK_HEADS.get(resolved.task_type or "")
            found = None if saves else find_targets(resolved, self.base)
        except ValueError:  # the slow path says why
            return None
        return None if found is None else [(f"{PREFIX}{unwrapped_name(t.name)}.ia3_l", t.is_feedforward) for t in found]

    def has_adapter(self, name: str) -> bool:
        return name == BASE_ADAPTER or (self.vectors is not None and self.vectors.has(model_name(name)))

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name`: any thread when it lives in the vector tables only (`needs_worker` False), else on
        the worker thread."""
        inner = model_name(name)
        if self.vectors is None or not self.vectors.remove(inner):
            raise ApiError(404, "adapter_not_found", f"Adapter {name!r} is not loaded")
        if self.needs_worker(name):
            assert self.peft is not None
            self.peft.delete_adapter(inner)

    def needs_worker(self, name: str) -> bool:
        """Whether deleting `name` changes the model (an adapter with modules to save), so must run on the worker."""
        return self.peft is not None and model_name(name) in self.peft.peft_config

    def _rows(self, adapters: list[str], tokens: torch.Tensor | None = None):
        """Batch row `i` runs `adapters[i]` (`VectorBank.rows`; `tokens`: each token's row of a packed batch)."""
        if self.vectors is None:
            assert all(a == BASE_ADAPTER for a in adapters)
            return nullcontext()
        if all(a == BASE_ADAPTER for a in adapters) and not (self.peft is not None and self.peft.peft_config):
            return self.vectors.no_rows()  # no layer has an adapter of its own: the base model, no scaling
        return self.vectors.rows([model_name(a) for a in adapters], tokens)

    # -- inputs (the tokenizer thread) -----------------------------------------------------------------------------
    def encode_one(self, text: str, where: str) -> tuple[list[int], int]:
        """Token ids of one input (with the prompt and special tokens) and how many tokens truncation dropped.

        Raises:
            ApiError: 413 when the input is too long and truncation is `refuse`; 422 when it gives no tokens or the
                tokenizer cannot encode it (`where` names the field).
        """
        task, limit = self.request_task, self.max_input_tokens
        try:
            full = task.encode([text], 1 << 30)[0]
            ids = full if len(full) <= limit or self.config.truncation == "refuse" else task.encode([text], limit)[0]
        except ValueError as err:  # e.g. the prompt alone fills the limit
            raise ApiError(422, "invalid_input", f"{where}: {err}") from None
        except Exception as err:
            raise ApiError(
                422, "invalid_input", f"{where}: the tokenizer cannot encode this text ({type(err).__name__})"
            ) from None
        if len(ids) > limit:
            raise ApiError(
                413,
                "input_too_long",
                f"{where} is {len(ids)} tokens; this server takes at most {limit} (--max-input-tokens); shorten it "
                f"(or run the server with --truncation left)",
            )
        if not ids:
            raise ApiError(422, "invalid_input", f"{where} gives no tokens")
        return ids, len(full) - len(ids)

    def encode_raw(self, text: str | list[int], where: str) -> tuple[list[int], int]:
        """Token ids of an OpenAI-style prompt: the text as it is (no recipe prompt around it; BOS or the
        tokenizer's special tokens as the task adds them), or token ids as given. Truncated or refused as
        `encode_one`."""
        task, limit = self.request_task, self.max_input_tokens
        try:
            if isinstance(text, list):
                vocab = len(task.tokenizer)
                bad = next((t for t in text if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ApiError(
                        422, "invalid_input", f"{where}: token id {bad} is not in the vocabulary (0-{vocab - 1})"
                    )
                full, head = list(text), 0
            else:
                full, head = task.plain_prompt(text)
        except ApiError:
            raise
        except Exception as err:
            raise ApiError(
                422, "invalid_input", f"{where}: the tokenizer cannot encode this text ({type(err).__name__})"
            ) from None
        if not full:
            raise ApiError(422, "invalid_input", f"{where} gives no tokens")
        if len(full) <= limit:
            return full, 0
        if self.config.truncation == "refuse":
            raise ApiError(
                413,
                "input_too_long",
                f"{where} is {len(full)} tokens; this server takes at most {limit} (--max-input-tokens); shorten it "
                f"(or run the server with --truncation left)",
            )
        kept = task.truncate(full, limit, head)  # a leading BOS stays; the oldest text goes
        return kept, len(full) - len(kept)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (truncated as `encode_one` does)."""
        return [self.encode_one(t, f"inputs[{i}]")[0] for i, t in enumerate(texts)]

    def choices(self, labels: tuple[str, ...]) -> list[list[int]]:
        """Token ids of each label as the model must produce it (the task's choices)."""
        cached = self._choices.get(labels)
        if cached is None:
            try:
                cached = self.request_task.encode_choices(list(labels), self.config.max_label_tokens)
            except LabelLengthError as err:
                raise ApiError(
                    422,
                    "invalid_labels",
                    f"parameters.labels: label {err.label!r} is {len(err.tokens)} "
                    f"tokens long; this server allows {err.limit} (--max-label-tokens)",
                ) from None
            except Exception as err:
                raise ApiError(
                    422, "invalid_labels", f"parameters.labels: the tokenizer cannot encode them ({type(err).__name__})"
                ) from None
            if len(self._choices) > 256:
                self._choices.clear()
            self._choices[labels] = cached
        return cached

    # -- running (worker thread) -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, ids: list[list[int]], adapters: list[str], params: GenerateParams, stop=None) -> list[Generated]:
        """One static batch through the task's generation; `stop()` (optional) -> True ends it early (every request
        of the batch gave up)."""
        from transformers import StoppingCriteriaList

        kwargs: dict = dict(num_beams=params.num_beams, do_sample=params.do_sample, num_return_sequences=1)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_gave_up_criterion(stop)])
        with self._rows(adapters):
            generated = self.task.generate_tokens(self.base, ids, self.device, params.max_new_tokens, **kwargs)
        decode = self.tokenizer.decode
        return [Generated(g.tokens, decode(g.tokens, skip_special_tokens=True), g.finish_reason) for g in generated]

    @torch.inference_mode()
    def classify(self, ids: list[list[int]], adapters: list[str], labels: tuple[str, ...]) -> list[list[float]]:
        """One score per label for each row: the head's logits (cls), else each label's mean token log-probability
        (rank classification, as the recipe's evaluation)."""
        choices = self.choices(labels) if self.task.generates else [[] for _ in labels]
        with self._rows(adapters):
            scores, _, _ = self.task.score(self.base, ids, choices, self.device)
        return scores.tolist()
