"""Does `torch.compile` of the continuous decoder's decode forward pay on this CPU? (issue 20, item 4)

The server's `Decoder` (ia3.serve.decoding) runs SmolLM2-135M with N rows over 8 adapters until the batch is full
and its cache buffered (as bench/profile_decode.py does); then, on that running batch, with the per-row (IA)^3
vectors set as the server sets them, each variant of `torch.compile` (inductor) of the model call inside
`CausalDecodeState.step` is measured against the eager call:

- compile time: the first compiled call (the inductor cache under /tmp makes a second run of the script faster);
- graphs and graph breaks (`torch._dynamo.explain`): does the in-place cache write or the row scales break it?
- correctness: the largest |logit difference| and the share of rows whose argmax agrees; the largest difference
  again with every row moved to another adapter (new row scales, same shapes: no recompile is expected);
- speed: eager and compiled steps interleaved (A, B, A, B, ...) on the same batch, each step's cache column rolled
  back after it, so both sides see the same shapes; the median of each and the ratio eager / compiled;
- recompiles: the decoder then runs `--churn` more steps with the compiled step (rows join and leave, the cache
  grows): the graphs compiled during them and the steps that took over a second (a static variant recompiles at
  every new batch shape, so it churns `--churn-static` steps only).

Usage: python bench/compile_decode.py [--dtype float32|bfloat16] [--variants dynamic,static] [--rows 32]
       [--repeats 8] [--churn 12] [--model smollm2|tiny] [--out bench/results/compile_decode.json]
Variants: dynamic (dynamic=True), static (dynamic=False: one graph per batch shape), autotune (static,
mode="max-autotune-no-cudagraphs"), frozen and frozen-dynamic (inductor's freezing, static or dynamic=True). One torch thread and one inductor compile thread by default (a shared machine).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import common  # noqa: E402
import profile_decode  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ia3.families import BufferLayer, CausalDecodeState, cache_argument, keep_logits  # noqa: E402
from ia3.serve.decoding import Decoder  # noqa: E402

VARIANTS = {
    "dynamic": {"dynamic": True},
    "static": {"dynamic": False},
    "autotune": {"dynamic": False, "mode": "max-autotune-no-cudagraphs"},
    # inductor's freezing: the parameters become constants (weights prepacked for oneDNN); the row scales, plain
    # tensor attributes of the layers, stay inputs of the graph
    "frozen": {"dynamic": False, "options": {"freezing": True}},
    "frozen-dynamic": {"dynamic": True, "options": {"freezing": True}},
}


class Forward(nn.Module):
    """The decode step's model call as `CausalDecodeState.step` makes it, as a module `torch.compile` can take:
    `unwrap` finds the model under `.module`, so the state asks the real model for its arguments."""

    def __init__(self, model: nn.Module, compiled: Any = None) -> None:
        super().__init__()
        self.module = model
        self.call = model if compiled is None else compiled

    def forward(self, **inputs: Any) -> Any:
        return self.call(**inputs)


class CompiledStepState(CausalDecodeState):
    """`CausalDecodeState` whose decode step (only) calls `forward` (prefill and joins stay eager)."""

    forward: nn.Module | None = None

    def step(self, model: nn.Module, tokens: list[int]) -> torch.Tensor:
        return super().step(self.forward or model, tokens)


def step_inputs(decoder: Decoder) -> dict[str, Any]:
    """The model call's inputs for one decode step of the running batch (room made for the new column)."""
    state = decoder.state
    state._room(len(state.mask), 0, 1)
    mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)
    return {
        "input_ids": torch.tensor(decoder.last)[:, None],
        "attention_mask": mask,
        "position_ids": state.positions[:, None],
        "use_cache": True,
        **keep_logits(decoder.model, 1),
        cache_argument(decoder.model): state.cache,
    }


def one_step(decoder: Decoder, call: Any, rows: Any, adapters: list[str] | None = None) -> tuple[torch.Tensor, float]:
    """One decode forward of the running batch with `call` (its rows on `adapters`, default their own), its column
    then rolled back; (logits, seconds)."""
    start = time.perf_counter()
    with rows(adapters or [r.adapter for r in decoder.running]):
        logits = call(**step_inputs(decoder)).logits[:, -1]
    seconds = time.perf_counter() - start
    roll_back(decoder)
    return logits, seconds


def roll_back(decoder: Decoder) -> None:
    """Forget the column a decode forward wrote (the state's mask and positions were not advanced)."""
    for layer in decoder.state.cache.layers:
        assert isinstance(layer, BufferLayer)
        layer.window(layer.rows, layer.start, layer.end - 1)


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure(decoder: Decoder, rows: Any, name: str, repeats: int, adapters: int) -> dict[str, Any]:
    """Compile the model call (variant `name`) and measure it against eager on the running batch."""
    torch._dynamo.reset()
    inputs = step_inputs(decoder)
    with rows([r.adapter for r in decoder.running]):
        explained = torch._dynamo.explain(decoder.model)(**inputs)
    roll_back(decoder)
    torch._dynamo.reset()
    compiled = torch.compile(decoder.model, **VARIANTS[name])
    before = graphs()
    got, compile_s = one_step(decoder, compiled, rows)
    want, _ = one_step(decoder, decoder.model, rows)
    # the same batch with every row on another adapter: new row scales, the same shapes
    other = [f"adapter{(int(r.adapter.removeprefix('adapter')) + 1) % adapters}" for r in decoder.running]
    got_other, _ = one_step(decoder, compiled, rows, other)
    want_other, _ = one_step(decoder, decoder.model, rows, other)
    eager, fast = [], []
    for _ in range(repeats):
        eager.append(one_step(decoder, decoder.model, rows)[1])
        fast.append(one_step(decoder, compiled, rows)[1])
    return {
        "variant": name,
        "rows": len(decoder.running),
        "columns": int(decoder.state.mask.shape[1]) + 1,
        "compile_s": round(compile_s, 1),
        "graphs": explained.graph_count,
        "graph_breaks": explained.graph_break_count,
        "break_reasons": [str(b.reason) for b in explained.break_reasons][:5],
        "graphs_compiled_at_start": graphs() - before,
        "max_abs_logit_diff": float((got.float() - want.float()).abs().max()),
        "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
        "other_scales_max_abs_logit_diff": float((got_other.float() - want_other.float()).abs().max()),
        "eager_ms": round(1e3 * statistics.median(eager), 1),
        "compiled_ms": round(1e3 * statistics.median(fast), 1),
        "speedup": round(statistics.median(eager) / statistics.median(fast), 3),
        "compiled": compiled,
    }


def churn(decoder: Decoder, compiled: Any, steps: int, args: argparse.Namespace, rng: random.Random) -> dict:
    """Run `steps` decoder steps with the compiled decode step; rows join and leave and the cache grows."""
    CompiledStepState.forward = Forward(decoder.model, compiled)
    before, slow, shapes = graphs(), 0, set()
    try:
        for _ in range(steps):
            profile_decode.feed(decoder, args.rows, args.adapters, args.vocab, rng)
            start = time.perf_counter()
            decoder.step()
            slow += time.perf_counter() - start > 1.0
            if decoder.state is not None:
                shapes.add((len(decoder.running), int(decoder.state.mask.shape[1])))
    finally:
        CompiledStepState.forward = None
    return {"churn_steps": steps, "churn_shapes": len(shapes), "churn_graphs": graphs() - before, "churn_slow": slow}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variants", default="dynamic,static", help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=12, help="decoder steps before measuring")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved steps per side")
    parser.add_argument("--churn", type=int, default=12, help="decoder steps with the compiled step after")
    parser.add_argument("--churn-static", type=int, default=3, help="at most this many for a static variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS / "compile_decode.json"))
    args = parser.parse_args(argv)
    common.quiet_warnings()
    torch.set_num_threads(args.threads)
    model, peft, tokenizer = profile_decode.build(args.model, args.adapters, profile_decode.DTYPES[args.dtype])
    rows = profile_decode.rows_context(peft)
    decoder = Decoder(model, tokenizer, torch.device("cpu"), rows, CompiledStepState, max_rows=args.rows)
    rng = random.Random(0)
    args.vocab = min(len(tokenizer), 20000)
    results = []
    with torch.inference_mode():
        profile_decode.run_steps(decoder, args.warmup, args.rows, args.adapters, args.vocab, rng)
        for name in args.variants.split(","):
            result = measure(decoder, rows, name, args.repeats, args.adapters)
            steps = args.churn if VARIANTS[name]["dynamic"] else min(args.churn, args.churn_static)
            result.update(churn(decoder, result.pop("compiled"), steps, args, rng))
            results.append(result)
            print({k: v for k, v in result.items() if k != "break_reasons"}, flush=True)
    print(f"\n=== {args.model} {args.dtype}, {args.threads} thread(s), torch {torch.__version__} ===")
    print("| variant | rows x columns | compile (s) | graphs / breaks | max abs logit diff (own / other adapters) | argmax agree |"
          " eager ms | compiled ms | eager / compiled | churn: steps, shapes, graphs compiled, steps > 1 s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['rows']} x {r['columns']} | {r['compile_s']} | {r['graphs']} / "
            f"{r['graph_breaks']} | {r['max_abs_logit_diff']:.2g} / {r['other_scales_max_abs_logit_diff']:.2g} | {r['argmax_agree']:.3f} | {r['eager_ms']} | "
            f"{r['compiled_ms']} | {r['speedup']:.2f}x | {r['churn_steps']}, {r['churn_shapes']}, "
            f"{r['churn_graphs']}, {r['churn_slow']} |"
        )
    common.save_report(args.out, {"settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
