"""bench/perf/real_step.py's workload: both trainers must see the same prompts and make each completion
exactly its drawn length (the bench itself needs TRL, which `make test` does not install)."""

from __future__ import annotations

import torch


def test_force_lengths_ends_each_row_of_transformers_generate_at_its_length(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from bench.perf.real_step import ForceLengths

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype="float32")
    prompt = tok(["count the dots"] * 3, return_tensors="pt")
    eos, lengths = tok.eos_token_id, [2, 7, 4]
    force = ForceLengths(lengths, prompt.input_ids.shape[1], [eos])
    torch.manual_seed(0)
    out = model.generate(
        **prompt,
        do_sample=True,
        max_new_tokens=20,
        pad_token_id=eos,
        eos_token_id=eos,
        logits_processor=LogitsProcessorList([force]),
    )
    completion = out[:, prompt.input_ids.shape[1] :]
    assert [int((row == eos).nonzero()[0]) + 1 for row in completion] == lengths
    assert completion.shape[1] == max(lengths)  # generation stops once every row has ended


def test_the_bench_prompts_are_all_exactly_prompt_len_tokens(tiny_lm):
    from bench.perf.real_step import PROMPT_LEN, samples
    from ekipl.models import hf
    from ekipl.tasks.prompts import render_prompt

    processor = hf.load_processor(str(tiny_lm))
    tok = getattr(processor, "tokenizer", processor)
    got = samples(str(tiny_lm), 3)
    assert len({s.problem for s in got}) == 3
    assert [len(tok(render_prompt(processor, s)).input_ids) for s in got] == [PROMPT_LEN] * 3
