"""Peak memory and step time of (IA)^3 training on the mt0-large architecture with a quantised base.

Variants (each in a fresh subprocess, loading the same saved random-weight model with transformers'
`from_pretrained`, which quantises tensor by tensor as it loads):

* `fp32`: the reference, as `bench/large_model_memory.py` loads it;
* `int8`: bitsandbytes LLM.int8() linears (`--model.quantization int8`), the rest in bf16;
* `nf4`: bitsandbytes 4-bit NormalFloat linears (`--model.quantization nf4`, compute in bf16), the rest in bf16.

transformers keeps the input embeddings and `lm_head` out of bitsandbytes' quantisation; for mt0-large they are
2 x 256 M parameters (2 GB of the 4.9 GB in fp32), so they are loaded in bf16 in the quantised variants
(`--rest-dtype`), as one would on a GPU. Each child runs `--steps` AdamW steps on the vectors (batch 2, 32 input
tokens, 8 label tokens; the same batch for all variants) after one untimed warm-up step, and reports the peak
resident set of the training steps alone (`VmHWM` reset after loading, through /proc/self/clear_refs), the peak of
the whole process (loading included) and the median step time.

Targets (issue 13): int8 training-step peak <= 0.35 x fp32, nf4 <= 0.25 x fp32. Writes the table to stdout and
JSON to `bench/results/quantized_memory.json`. Needs ~12 GB free RAM, ~5 GB of disk (or `--model-dir` holding the
model `bench/large_model_memory.py` saved) and several minutes on 2 CPU cores. `--tiny` runs the same code on a
small MT5 in seconds (a smoke test; its figures mean nothing).

Usage: python bench/quantized_memory.py [--model-dir DIR] [--steps 3] [--variants fp32,int8,nf4] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from common import RESULTS, Result, environment, table  # noqa: E402
from large_model_memory import GB, _reset_peak, _status, build, mt0_large_config  # noqa: E402

VARIANTS = ("fp32", "int8", "nf4")
TARGETS = {"int8": 0.35, "nf4": 0.25}
BATCH_ROWS, INPUT_TOKENS, LABEL_TOKENS = 2, 32, 8


def _tiny_config():
    return mt0_large_config(
        vocab_size=1024, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4
    )


def build_tiny(model_dir: Path) -> dict:
    import torch
    from transformers import MT5ForConditionalGeneration

    torch.manual_seed(0)
    model = MT5ForConditionalGeneration(_tiny_config())
    model.save_pretrained(model_dir)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def measure(model_dir: Path, variant: str, steps: int, rest_dtype: str) -> dict:
    """Load `model_dir` as `variant`, wrap it, train; memory and time figures."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    import ia3
    from ia3.quantization import keep_4bit_weights_trainable_on_cpu, quantization_config

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    _reset_peak()
    start = time.perf_counter()
    kwargs: dict = {}
    if variant != "fp32":
        dtype = getattr(torch, rest_dtype)
        kwargs = {
            "quantization_config": quantization_config(variant, compute_dtype=dtype),
            "device_map": "cpu",
            "dtype": dtype,
        }
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, **kwargs)
    # not `prepare_model_for_kbit_training`: it casts the bf16 embeddings and lm_head to fp32 (as PEFT's does),
    # 1 GB more here; `get_peft_model` freezes the base all the same
    keep_4bit_weights_trainable_on_cpu(model)
    load_seconds = time.perf_counter() - start
    load_peak = _status()["VmHWM"]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    peft_model = ia3.get_peft_model(model, ia3.IA3Config(task_type="SEQ_2_SEQ_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, vocab, (BATCH_ROWS, INPUT_TOKENS), generator=g),
        "attention_mask": torch.ones(BATCH_ROWS, INPUT_TOKENS, dtype=torch.long),
        "labels": torch.randint(2, vocab, (BATCH_ROWS, LABEL_TOKENS), generator=g),
    }
    peft_model.train()

    def step() -> float:
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step()]  # warm-up: kernels, allocator, AdamW state
    rss_before = _status()["VmRSS"]
    resettable = _reset_peak()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    status = _status()
    import resource

    return {
        "variant": variant,
        "base_bytes": base_bytes,
        "load_seconds": round(load_seconds, 1),
        "load_peak_gb": round(load_peak / GB, 3),
        "rss_before_steps_gb": round(rss_before / GB, 3),
        "step_peak_gb": round(status["VmHWM"] / GB, 3),
        "process_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
        "peak_reset_after_loading": resettable,
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="the saved random model (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from fp32,int8,nf4")
    parser.add_argument("--rest-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="a small MT5 instead of mt0-large (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        if args._child == "build":
            result = build_tiny(args.model_dir) if args.tiny else build(args.model_dir)
        else:
            result = measure(args.model_dir, args._child, args.steps, args.rest_dtype)
        print("RESULT " + json.dumps(result))
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "fp32" not in variants:
        sys.exit(f"--variants takes fp32 (always, the reference) and some of {list(VARIANTS[1:])}; got {variants}")
    out = args.out or RESULTS / ("quantized_memory_tiny.json" if args.tiny else "quantized_memory.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def child(what: str, model_dir: Path) -> dict:
        cmd = [sys.executable, __file__, "--_child", what, "--model-dir", str(model_dir), "--steps", str(args.steps)]
        cmd += ["--rest-dtype", args.rest_dtype] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{what} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
        return json.loads(line[len("RESULT ") :])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mt0-large-random-") as tmp:
        model_dir = args.model_dir or Path(tmp)
        if not any(model_dir.glob("*.safetensors")):
            print(f"building the model with random weights in {model_dir} ...", file=sys.stderr)
            child("build", model_dir)
        measured = {}
        for variant in variants:
            print(f"{variant}: loading in a fresh process and training ...", file=sys.stderr)
            measured[variant] = child(variant, model_dir)

    ref = measured["fp32"]
    name = "tiny MT5" if args.tiny else "mt0-large"
    results = []
    for variant in [v for v in variants if v != "fp32"]:
        m = measured[variant]
        extra = {k: m[k] for k in ("base_bytes", "load_peak_gb", "process_peak_gb", "load_seconds")}
        results.append(
            Result(
                "Q",
                f"{name} step peak RSS, {variant}",
                m["step_peak_gb"],
                ref["step_peak_gb"],
                "GB",
                "fp32",
                None if args.tiny else TARGETS[variant],
                extra,
            )
        )
        results.append(Result("Q", f"{name} step time, {variant}", m["step_seconds"], ref["step_seconds"], "s", "fp32"))
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": f"{name} architecture (MT5, random weights)",
        "batch": {"rows": BATCH_ROWS, "input_tokens": INPUT_TOKENS, "label_tokens": LABEL_TOKENS},
        "rest_dtype": args.rest_dtype,
        "steps": args.steps,
        "seconds": round(time.perf_counter() - start, 1),
        **environment(),
        "variants": measured,
        "results": [r.to_json() for r in results],
    }
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
