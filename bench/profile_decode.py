"""Where a continuous decode step of `ia3 serve` goes: the server's `Decoder` (ia3.serve.decoding) on SmolLM2-135M
with N running rows over 8 adapters, rows joining and leaving as they finish, under torch.profiler and timers.

Prints (1) each phase's share of the step (timers, no profiler), (2) the operator breakdown (torch.profiler, self
time by category: matmuls, attention, the per-step cache append, cache joins and drops, (IA)^3 gather and scale,
sampling, other ops, and what is in no operator: Python and framework), (3) the hardware limit: the step's FLOPs
and bytes against this CPU's practical peak (a large matmul's GFLOP/s in fp32 and bf16, a large read's GB/s, on the
same threads).

Usage: python bench/profile_decode.py [--rows 32] [--adapters 8] [--steps 30] [--threads 2] [--dtype float32]
       [--prompt-tokens 16-96] [--model smollm2|tiny]   (tiny: a small random Llama, for a quick check of the script itself)
It is a profile, not a timing target: prefer its proportions to its milliseconds on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import common  # noqa: F401  (offline settings, sys.path)
import torch
from torch.profiler import record_function

from ia3 import IA3Config, get_peft_model
from ia3.families import CausalDecodeState
from ia3.layer import IA3Layer
from ia3.serve import decoding
from ia3.serve.decoding import Decoder, Row, Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm"}
ATTENTION = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"}
ATTENTION_PREFIX = ("aten::_scaled_dot_product", "aten::_flash_attention")
# (scope name, the function patched to open it); the innermost scope of an operator decides its category
SCOPES = ("prefill", "join", "drop", "decode", "packed", "ia3.layer", "ia3.gather", "sample", "emit")


class Phases:
    """Wall time per phase (perf_counter), and a `record_function` scope of the same name for the profiler."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.timing = True
        self.prompt_tokens = 0  # prompt tokens admitted

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            with record_function(name):
                result = fn(*args, **kwargs)
            if self.timing:
                self.seconds[name] += time.perf_counter() - start
            return result

        return wrapped


def instrument(phases: Phases, state_class: type) -> None:
    """Patch the decode state's methods, the sampler, the row emitter and the (IA)^3 layer's forward (the last for
    the profiler only: its scope splits a layer's matmul from its scaling)."""
    for name, method in (
        ("prefill", "prefill"), ("join", "extend"), ("drop", "filter"), ("decode", "step"), ("packed", "step_join"),
    ):  # fmt: skip
        original = getattr(state_class, method)
        if method == "prefill":
            fn = original.__func__
            setattr(state_class, method, classmethod(phases.wrap(name, fn)))
        else:
            setattr(state_class, method, phases.wrap(name, original))
    state_class.feed = phases.wrap("prefill", state_class.feed)
    admit = Decoder._admit

    def counted_admit(self: Decoder, *args: Any) -> list[Row]:
        rows = admit(self, *args)
        phases.prompt_tokens += sum(len(r.prompt) for r in rows)
        return rows

    Decoder._admit = counted_admit
    decoding.next_tokens = phases.wrap("sample", decoding.next_tokens)
    Decoder._take = phases.wrap("emit", Decoder._take)
    forward = IA3Layer.forward

    def layer_forward(self: IA3Layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with record_function("ia3.layer"):
            return forward(self, x, *args, **kwargs)

    IA3Layer.forward = layer_forward


def build(model_name: str, n_adapters: int, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(HF model with adapters injected, the PeftModel, tokenizer); vectors 1 + 0.1 N(0, 1), in `dtype`."""
    from ia3.loading import ModelSource, load_tokenizer
    from ia3.tasks import CausalTask

    if model_name == "smollm2":
        import workloads

        model = workloads.smollm2()
        tokenizer = load_tokenizer(ModelSource(workloads.SMOLLM2), CausalTask)
    else:
        import transformers as tf
        from tiny_dirs import tokenizer as tiny_tokenizer

        torch.manual_seed(0)
        tokenizer = tiny_tokenizer()
        cfg = tf.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    model = model.to(dtype).eval()
    peft = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"), "adapter0", autocast_adapter_dtype=False)
    for i in range(1, n_adapters):
        peft.add_adapter(f"adapter{i}", IA3Config(task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in peft.state_dict().items():
            if ".ia3_l." in key:
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=g))
    return peft.get_base_model(), peft, tokenizer


def rows_context(peft: Any) -> Callable[[list[str]], Any]:
    @contextlib.contextmanager
    def rows(adapters: list[str], tokens: torch.Tensor | None = None) -> Iterator[None]:
        manager = peft.base_model.per_example(adapters, tokens)
        with record_function("ia3.gather"):
            manager.__enter__()
        try:
            yield
        finally:
            manager.__exit__(None, None, None)

    return rows


PROMPT = (16, 96)  # prompt lengths drawn from this range (--prompt-tokens)


def feed(decoder: Decoder, rows: int, n_adapters: int, vocab: int, rng: random.Random) -> None:
    """Top the batch up to `rows` rows: prompts of PROMPT random tokens, 8-64 new tokens, every 4th row sampled."""
    running, waiting = decoder.counts()
    new = []
    for _ in range(rows - running - waiting):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(*PROMPT))]
        sampling = (
            Sampling(temperature=0.8, top_p=0.9, seed=rng.randrange(1 << 30)) if rng.random() < 0.25 else Sampling()
        )
        adapter = f"adapter{rng.randrange(n_adapters)}"
        new.append(Row(prompt, adapter, rng.randint(8, 64), sampling, client=adapter))
    decoder.add(new)


def run_steps(decoder: Decoder, steps: int, rows: int, n_adapters: int, vocab: int, rng: random.Random) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        feed(decoder, rows, n_adapters, vocab, rng)
        decoder.step()
    return time.perf_counter() - start


def category(event: Any) -> str:
    """The category of one operator event: by its name and its innermost scope."""
    name, scopes = event.name, []
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in SCOPES:
            scopes.append(parent.name)
        parent = parent.cpu_parent
    scope = scopes[0] if scopes else None
    if "prefill" in scopes:
        return "prefill (joining rows' prompts)"
    if name in MATMUL:
        return "matmul (mm/addmm/linear)"
    if name in ATTENTION or name.startswith(ATTENTION_PREFIX):
        return "attention (SDPA)"
    if scope == "join":
        return "cache join (extend: cat)"
    if scope == "drop":
        return "cache drop (filter: index_select)"
    if scope == "ia3.gather":
        return "(IA)^3 per-row vector gather"
    if scope == "ia3.layer" and name in ("aten::mul", "aten::to", "aten::_to_copy", "aten::copy_"):
        return "(IA)^3 scale (mul)"
    if scope in ("sample", "emit"):
        return "sampling + detokenize"
    if scope == "decode" and name == "aten::cat":
        return "cache append per step (cat)"
    if scope == "decode" and name in ("aten::copy_", "aten::to", "aten::_to_copy"):
        return "copies in step (buffered cache writes, casts)"
    return "other ops (norms, rotary, silu, embed, ...)"


def breakdown(prof: Any, wall: float) -> list[tuple[str, float]]:
    """Self CPU seconds per category; the rest of the wall time is Python / framework (in no operator)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name in SCOPES or event.name.startswith("ProfilerStep"):
            continue
        totals[category(event)] += event.self_cpu_time_total / 1e6
    ops = sum(totals.values())
    totals["Python / framework (in no operator)"] = max(0.0, wall - ops)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def peak(threads: int) -> dict[str, float]:
    """A large matmul's GFLOP/s in fp32 and bf16, and a large read's GB/s (best of 3, after a warm-up)."""
    out = {}
    n = 2048
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = min(_seconds(lambda a=a, b=b: torch.mm(a, b)) for _ in range(3))
        out[f"{name} matmul GFLOP/s"] = 2 * n**3 / best / 1e9
    big = torch.randn(64 * 1024 * 1024)  # 256 MB
    big.sum()
    best = min(_seconds(big.sum) for _ in range(3))
    out["read GB/s"] = big.numel() * 4 / best / 1e9
    return out


def own_matmuls(model: Any, tokens: int, dtype: torch.dtype) -> float:
    """Seconds the step's matmuls take alone at its shapes: every linear layer's weight (the LM head included) times
    `tokens` rows of input, one after another (best of 3). What this CPU's BLAS makes of the step's small-row
    products, beside the large-matmul peak."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(tokens, w.shape[1], dtype=dtype) for w in weights}

    def run() -> None:
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    run()
    return min(_seconds(run) for _ in range(3))


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def limit(
    model: Any, rows: float, context: float, dtype: torch.dtype, hw: dict[str, float], prompt: float = 0.0
) -> list[str]:
    """The step's matmul FLOPs and bytes read against the measured peak: the fastest a step could be. `prompt`:
    joining prompt tokens per step (their matmuls without the LM head, which runs at a prompt's last token only)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    matmul_params = params - embed + (embed if tied else 0)  # the embedding is a lookup; the LM head a matmul
    size = torch.tensor([], dtype=dtype).element_size()
    head = model.get_output_embeddings().weight.numel()
    flops = 2 * matmul_params * rows + 2 * (matmul_params - head) * prompt
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * rows * size
    weights = params * size
    peak_flops = hw["bf16 matmul GFLOP/s" if dtype == torch.bfloat16 else "fp32 matmul GFLOP/s"] * 1e9
    t_compute, t_bytes = flops / peak_flops, (weights + kv) / (hw["read GB/s"] * 1e9)
    return [
        f"params {params / 1e6:.1f} M (matmul {matmul_params / 1e6:.1f} M), {rows:.1f} rows, mean context {context:.0f}",
        f"joining prompt tokens/step: {prompt:.1f}",
        f"FLOPs/step (2 x matmul params x tokens): {flops / 1e9:.2f} GFLOP -> {1e3 * t_compute:.1f} ms at the peak",
        f"bytes/step: weights {weights / 1e6:.0f} MB + KV read {kv / 1e6:.0f} MB -> {1e3 * t_bytes:.1f} ms at the read",
        f"floor: {1e3 * max(t_compute, t_bytes):.1f} ms/step = {rows / max(t_compute, t_bytes):.0f} tokens/s",
        f"the step's own matmuls alone at its shapes: {1e3 * own_matmuls(model, round(rows), dtype):.1f} ms for "
        f"{round(rows)} rows, {1e3 * own_matmuls(model, round(rows + prompt), dtype):.1f} ms with the prompt tokens",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--prompt-tokens", default="16-96", help="prompt lengths, LOW-HIGH (context length)")
    parser.add_argument("--top", type=int, default=0, help="also print torch.profiler's operator table")
    parser.add_argument(
        "--apart", action="store_true", help="joining prompts in their own forward (`ia3 serve --no-packed-steps`)"
    )
    args = parser.parse_args(argv)
    common.quiet_warnings()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    global PROMPT
    low, high = args.prompt_tokens.split("-")
    PROMPT = (int(low), int(high))
    model, peft, tokenizer = build(args.model, args.adapters, dtype)
    phases = Phases()
    instrument(phases, CausalDecodeState)
    decoder = Decoder(
        model, tokenizer, torch.device("cpu"), rows_context(peft), CausalDecodeState, max_rows=args.rows,
        max_prefill_tokens=max(512, PROMPT[1]), packed=not args.apart,
    )  # fmt: skip
    rng, vocab = random.Random(0), min(len(tokenizer), 20000)
    with torch.inference_mode():
        run_steps(decoder, args.warmup, args.rows, args.adapters, vocab, rng)
        phases.seconds.clear()
        steps0, rows0, prompt0, tokens0 = decoder.steps, decoder.row_steps, phases.prompt_tokens, decoder.tokens_out
        wall = run_steps(decoder, args.steps, args.rows, args.adapters, vocab, rng)
        rows = (decoder.row_steps - rows0) / max(1, decoder.steps - steps0)
        prompt = (phases.prompt_tokens - prompt0) / args.steps
        made = decoder.tokens_out - tokens0  # the steps' new tokens (a joining row's first one included)
        context = float(decoder.state.mask.sum(1).float().mean()) if decoder.state is not None else 0.0
        phases.timing = False
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = run_steps(decoder, args.steps, args.rows, args.adapters, vocab, rng)
    tokens = decoder.tokens_out
    print(
        f"\n=== {args.model} {args.dtype}, {args.threads} threads, {rows:.1f} rows/step over {args.adapters} adapters ==="
    )
    print(f"timers (no profiler): {1e3 * wall / args.steps:.1f} ms/step, {made / wall:.0f} tokens/s")
    print("\n| phase (timers) | ms/step | share |\n|---|---|---|")
    for name, sec in sorted(phases.seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {1e3 * sec / args.steps:.2f} | {100 * sec / wall:.1f} % |")
    rest = wall - sum(phases.seconds.values())
    print(f"| scheduler (admit, retire, other) | {1e3 * rest / args.steps:.2f} | {100 * rest / wall:.1f} % |")
    print(f"\nprofiled: {1e3 * profiled / args.steps:.1f} ms/step (profiler overhead included)")
    print("\n| category (torch.profiler self time) | ms/step | share |\n|---|---|---|")
    for name, sec in breakdown(prof, profiled):
        print(f"| {name} | {1e3 * sec / args.steps:.2f} | {100 * sec / profiled:.1f} % |")
    if args.top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    hw = peak(args.threads)
    print("\nthis CPU, " + ", ".join(f"{k} {v:.0f}" for k, v in hw.items()) + f" ({args.threads} threads)")
    for line in limit(model, rows, context, dtype, hw, prompt):
        print(line)
    print(f"({tokens} tokens generated in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
