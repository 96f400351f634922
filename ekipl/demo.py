"""`make demo`: the largest real end-to-end path that exists so far.

Before the trainer lands, it: generates the synthetic counting data, builds the tiny local models,
starts a real vLLM engine on the tiny Qwen2-VL, samples a group of completions per prompt (with the
image), scores every candidate with the task's rule-based rewards beside the sample's recorded CoT
trace (the `dataset` auxiliary action), and checks that vLLM's sampling log-probs match
transformers'. Each later capability extends this script until it runs the ``cpu_demo`` preset.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(out: str = "outputs/demo", n_prompts: int = 4, group: int = 4) -> int:
    import torch

    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf
    from ekipl.models.tiny import build_tiny
    from ekipl.tasks.loader import load_task_file
    from ekipl.tasks.prompts import build_messages
    from ekipl.tasks.rewards import score
    from ekipl.tasks.synth import make_dataset

    t0 = time.time()
    paths = make_dataset("counting", Path(out) / "data", n_train=16, n_test=8, seed=0)
    data = load_task_file(paths["train"])
    path = build_tiny("tiny-qwen2-vl")
    build_tiny("tiny-qwen2-vl-b")
    print(f"[demo] synthetic data ({len(data)} rows) and tiny models ready in {time.time() - t0:.1f}s")

    proc = hf.load_processor(path)
    t0 = time.time()
    llm = vb.start_engine(vb.EngineSpec(model=str(path), dtype="float32"))
    print(f"[demo] vLLM engine started in {time.time() - t0:.1f}s")

    samples = [data[i] for i in range(n_prompts)]
    prompts = [
        proc.apply_chat_template(build_messages(s), add_generation_prompt=True, tokenize=False)
        for s in samples
    ]
    images = [s.load_images() for s in samples]
    t0 = time.time()
    groups = vb.generate(
        llm,
        [vb.Request(prompt=p, images=im) for p, im in zip(prompts, images, strict=True)],
        vb.sampling_params(n=group, max_tokens=48, seed=0),
    )
    n_tok = sum(len(c.token_ids) for g in groups for c in g)
    print(f"[demo] sampled {n_prompts}x{group} completions, {n_tok} tokens in {time.time() - t0:.1f}s")

    print("\n| sample | source | accuracy | format | total |\n|---|---|---|---|---|")
    for s, g in zip(samples, groups, strict=True):
        for c in g:
            r = score(c.text, s)
            print(f"| {s.id} | policy | {r.accuracy:.0f} | {r.format:.0f} | {r.total:.0f} |")
        r = score(s.cot, s)
        print(f"| {s.id} | dataset (CoT trace) | {r.accuracy:.0f} | {r.format:.0f} | {r.total:.0f} |")

    model = hf.load_model(path).eval()
    worst = 0.0
    for p, im, g in zip(prompts, images, groups, strict=True):
        inputs = proc(text=[p], images=im, return_tensors="pt")
        c = g[0]
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            ref = hf.completion_logprobs(
                model,
                ids,
                len(c.prompt_token_ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
            )[0]
        worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
    ok = worst < 1e-3
    print(f"\n[demo] max |vLLM - transformers| log-prob gap: {worst:.1e} (within 1e-3: {ok})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
