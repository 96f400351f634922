"""`make demo`: the largest real end-to-end path that exists so far.

Today (before the trainer lands) it builds the tiny local models, starts a real vLLM engine on the
tiny Qwen2-VL, samples a group of completions for an image prompt, and checks that the engine and
transformers agree on their log-probs. Each later capability extends this script until it runs the
``cpu_demo`` training preset.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch
    from PIL import Image

    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf
    from ekipl.models.tiny import build_tiny

    t0 = time.time()
    path = build_tiny("tiny-qwen2-vl")
    for name in ("tiny-qwen2-vl-b", "tiny-qwen2"):
        build_tiny(name)
    print(f"[demo] tiny models ready in {time.time() - t0:.1f}s: {path}")

    proc = hf.load_processor(path)
    image = Image.new("RGB", (112, 84), (40, 90, 200))
    content = [{"type": "image"}, {"type": "text", "text": "How many objects are there?"}]
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    t0 = time.time()
    llm = vb.start_engine(vb.EngineSpec(model=str(path), dtype="float32"))
    print(f"[demo] vLLM engine started in {time.time() - t0:.1f}s")
    [group] = vb.generate(
        llm, [vb.Request(prompt=prompt, images=[image])], vb.sampling_params(n=4, max_tokens=24, seed=0)
    )
    model = hf.load_model(path).eval()
    inputs = proc(text=[prompt], images=[image], return_tensors="pt")
    worst = 0.0
    for i, c in enumerate(group):
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            ref = hf.completion_logprobs(
                model,
                ids,
                len(c.prompt_token_ids),
                pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"],
            )[0]
        gap = (torch.tensor(c.logprobs) - ref).abs().max().item()
        worst = max(worst, gap)
        print(f"[demo] sample {i}: {len(c.token_ids)} tokens, logp {sum(c.logprobs):8.2f}, gap {gap:.1e}")
    ok = worst < 1e-3
    print(f"[demo] vLLM and transformers log-probs agree within 1e-3: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
