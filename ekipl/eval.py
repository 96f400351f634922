"""``python -m ekipl.eval``: a policy through vLLM on ID and OOD splits, with the task metrics.

Per split and model it reports, with Reason-RFT's evaluation scoring (``score(evaluation=True)``:
exact counts, geometry choices/numbers/math equivalence, TRANCE partial credit per step):

* ``accuracy``  -- mean accuracy of the greedy answer (temperature 0);
* ``format``    -- share of greedy answers in the ``<think>..</think><answer>..</answer>`` form
  (``--format-rule``: ``strict`` or ``reason_rft``, see :mod:`ekipl.tasks.rewards`);
* ``pass@1`` / ``pass@k`` -- from ``n`` samples at ``temperature`` per problem, with the unbiased
  estimator ``pass@k = E[1 - C(n - c, k) / C(n, k)]`` over problems, where ``c`` counts samples
  with accuracy 1 (full marks); ``--k 1 2 4 8 16`` reports every k from the same n samples (n
  defaults to the largest k): the reasoning boundary as a curve.

A ``--greedy-split`` is scored greedy only (no samples): a large final test split evaluated in the
same engine as the pass@k splits. Every split starts from an empty prefix cache, so its numbers do
not depend on which splits came before it.

Writes ``eval.json`` and ``eval.md`` (a Markdown table) to ``--out``, and every problem's greedy
and sampled completions with their scores to ``--out``/``completions/<model>.<split>.jsonl`` (read
them when a number surprises you). Several models of one
architecture share one engine: the next model's weights are loaded into it (no second start).

    python -m ekipl.eval --model outputs/run/policy --split id=data/test_id.json \\
        --split ood=data/test_ood.json --k 4 --out outputs/run/eval
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from collections.abc import Collection
from pathlib import Path

from ekipl.tasks.sample import DataError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k) (1.0 when n - c < k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(greedy: list[tuple[float, float]], sampled: list[list[float]], k) -> dict:
    """Split metrics from greedy (accuracy, format) pairs and per-problem sampled accuracies;
    ``k``: one k or several, each reported as ``pass@k`` beside ``pass@1``."""
    n_prob = max(len(greedy), 1)
    out = {
        "problems": len(greedy),
        "accuracy": sum(a for a, _ in greedy) / n_prob,
        "format": sum(f for _, f in greedy) / n_prob,
    }
    if sampled:
        n = len(sampled[0])
        correct = [sum(a >= 1.0 for a in accs) for accs in sampled]
        for kk in sorted({1, *([k] if isinstance(k, int) else k)}):
            out[f"pass@{kk}"] = sum(pass_at_k(n, c, kk) for c in correct) / len(sampled)
    return out


def score_split(samples, greedy, sampled, k, scorer=None) -> tuple[dict, list[dict]]:
    """The split's metrics and one record per problem (its completions with their scores), from the
    greedy completion texts (one per sample) and the sampled ones (a list per sample, or empty).
    ``scorer``: the run's :class:`~ekipl.tasks.scorer.Scorer` (default: the built-in rewards)."""
    from ekipl.tasks.scorer import Scorer

    scorer = scorer or Scorer()
    pairs, accs, records = [], [], []
    greedy_scores = scorer.score_batch(list(greedy[: len(samples)]), list(samples), evaluation=True)
    flat = [(t, s) for s, texts in zip(samples, sampled, strict=True) for t in texts] if sampled else []
    flat_scores = iter(scorer.score_batch([t for t, _ in flat], [s for _, s in flat], evaluation=True))
    for i, s in enumerate(samples):
        r = greedy_scores[i]
        pairs.append((r.accuracy, r.format))
        rec = {
            "id": s.id,
            "answer": s.answer,
            "greedy": {"text": greedy[i], "accuracy": r.accuracy, "format": r.format},
        }
        if sampled:
            scored = [next(flat_scores) for _ in sampled[i]]
            accs.append([x.accuracy for x in scored])
            rec["samples"] = [
                {"text": t, "accuracy": x.accuracy, "format": x.format}
                for t, x in zip(sampled[i], scored, strict=True)
            ]
        records.append(rec)
    return summarize(pairs, accs, k), records


def split_requests(processor, samples, system_prompt: bool = False) -> list:
    """The engine requests of a split: each problem's chat prompt (rendered as training renders it,
    :func:`~ekipl.tasks.prompts.render_prompt`) with its images."""
    from ekipl.engines import vllm_backend as vb
    from ekipl.tasks.prompts import render_prompt

    return [
        vb.Request(prompt=render_prompt(processor, s, system_prompt), images=s.load_images()) for s in samples
    ]


def evaluate_split(
    llm,
    processor,
    samples,
    k,
    n: int,
    temperature: float,
    max_tokens: int,
    seed=0,
    scorer=None,
    system_prompt: bool = False,
):
    """Greedy and sampled answers for ``samples`` from one engine: (metrics, per-problem records).
    The engine's prefix cache is emptied first, so the split is scored as in a fresh engine.
    ``system_prompt``: the prompt as a run with ``rollout.system_prompt=true`` trains on it."""
    from ekipl.engines import vllm_backend as vb

    vb.forget_prefixes(llm)
    requests = split_requests(processor, samples, system_prompt)
    banned = vb.placeholder_token_ids(llm)
    greedy_p = vb.sampling_params(n=1, temperature=0.0, max_tokens=max_tokens, banned_token_ids=banned)
    greedy = [c.text for (c,) in vb.generate(llm, requests, greedy_p)]
    sampled = []
    if n > 0:
        params = vb.sampling_params(
            n=n, temperature=temperature, max_tokens=max_tokens, banned_token_ids=banned
        )
        sampled = [[c.text for c in group] for group in vb.generate(llm, requests, params, seed=seed)]
    return score_split(samples, greedy, sampled, k, scorer)


def evaluate(
    models: dict[str, str],
    splits: dict[str, list],
    k: int | list[int] = 4,
    n: int | None = None,
    temperature: float = 1.0,
    max_tokens: int = 512,
    max_model_len: int = 4096,
    seed: int = 0,
    dtype: str = "auto",
    records: dict | None = None,
    scorer=None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    greedy_only: Collection[str] = (),
    max_num_seqs: int | None = None,
    engine=None,
    system_prompt: bool = False,
) -> list[dict]:
    """Rows ``{"model", "split", metrics...}`` for every model x split. Models after the first are
    loaded into the first one's engine (they must share its architecture). ``records``, when given,
    receives each (model, split)'s per-problem completions and scores (:func:`write` saves them).
    ``scorer``: how answers are scored (default: the built-in task rewards); ``min_pixels`` /
    ``max_pixels``: the image budget, for the engine and the processor alike; ``greedy_only``: the
    splits scored without samples; ``max_num_seqs``: the engine's sequences in flight (None: the
    engine's default); ``engine``: the engine's settings
    (:class:`~ekipl.engines.vllm_backend.EngineKeys`; it supersedes ``max_num_seqs``);
    ``system_prompt``: prompts as ``rollout.system_prompt=true`` renders them. On CPU the
    samples depend on the sequences in flight (one generator, reseeded per split, draws for
    the whole batch); the greedy answers did not in bench/learn/boundary.py's check."""
    from ekipl.engines import vllm_backend as vb
    from ekipl.models import hf

    n = (k if isinstance(k, int) else max(k)) if n is None else n
    names = list(models)
    first = models[names[0]]
    keys = engine or vb.EngineKeys(max_num_seqs=max_num_seqs)
    section = types.SimpleNamespace(
        **vars(keys),
        dtype=dtype,
        max_model_len=max_model_len,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        mm_cache_gb=0.0,
    )
    llm = vb.start_engine(vb.engine_spec(section, first, seed, enable_weight_sync=len(names) > 1))
    processor = hf.load_processor(first, min_pixels, max_pixels)
    rows = []
    for name in names:
        if models[name] != first:
            weights = Path(models[name]) / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{models[name]}: no model.safetensors to load into the engine")
            vb.load_weights_from_file(llm, str(weights))
        for split, samples in splits.items():
            n_split = 0 if split in greedy_only else n
            metrics, recs = evaluate_split(
                llm, processor, samples, k, n_split, temperature, max_tokens, seed, scorer, system_prompt
            )
            if records is not None:
                records[(name, split)] = recs
            rows.append({"model": name, "split": split, **metrics})
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: one row per model x split ("-" where a row lacks a metric: a greedy-only
    split's pass@k)."""
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in ("model", "split")))
    head = "| model | split | " + " | ".join(metrics) + " |"
    sep = "|---|---|" + "---|" * len(metrics)
    body = []
    for r in rows:
        cells = ["-" if m not in r else f"{r[m]:.0f}" if m == "problems" else f"{r[m]:.3f}" for m in metrics]
        body.append(f"| {r['model']} | {r['split']} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_records(records: list[dict], path: Path) -> Path:
    """One JSON line per problem: its greedy and sampled completions with their scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write(rows: list[dict], out: Path, records: dict | None = None) -> tuple[Path, Path]:
    """``eval.json`` and ``eval.md``, and with ``records`` each model x split's completions as
    ``completions/<model>.<split>.jsonl`` beside them."""
    out.mkdir(parents=True, exist_ok=True)
    for (model, split), recs in (records or {}).items():
        write_records(recs, out / "completions" / f"{model}.{split}.jsonl")
    (out / "eval.json").write_text(json.dumps(rows, indent=1))
    (out / "eval.md").write_text(table(rows) + "\n")
    return out / "eval.json", out / "eval.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ekipl.eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="NAME=PATH or PATH: a directory, a cached HF id, or a tiny/warm-start name; repeatable",
    )
    p.add_argument(
        "--split",
        action="append",
        required=True,
        help="NAME=SOURCE: a .json/.jsonl/.parquet file, a save_to_disk dir or a hub NAME@SPLIT; repeatable",
    )
    p.add_argument(
        "--greedy-split",
        action="append",
        default=[],
        help="NAME=SOURCE as --split, scored greedy only (no samples, no pass@k); repeatable",
    )
    p.add_argument("--image-root", default=None)
    p.add_argument("--task", default=None, help="the task when the rows do not say it")
    for col, default in (("prompt", "problem"), ("answer", "answer"), ("image", "image"), ("cot", "cot")):
        p.add_argument(f"--{col}-key", default=default, help=f"the {col} column (default {default})")
    p.add_argument("--k", type=int, nargs="+", default=[4], help="pass@k, for one k or several (1 2 4 8 16)")
    p.add_argument(
        "--n", type=int, default=None, help="samples per problem (default: the largest k; 0: greedy only)"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--dtype", default="auto", help="the engine's dtype (auto: the model's config)")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="sequences in flight in the engine (default: the engine's, 64); on 2 CPU cores 256 was "
        "~20%% faster; on CPU the sampled answers (not the greedy ones) depend on it",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="the engine's share of its GPU (default: 0.85 on GPU, 0.15 of NUMA node 0's RAM on CPU)",
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no CUDA graphs (default: graphs on GPU, eager on CPU)",
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs of the engine (vLLM TP)")
    p.add_argument(
        "--system-prompt",
        action="store_true",
        help="render prompts with the R1-style system message, as a run with rollout.system_prompt=true "
        "trained on them",
    )
    p.add_argument("--limit", type=int, default=0, help="first N problems of each split (0: all)")
    p.add_argument("--format-rule", default="strict", help="strict or reason_rft (see ekipl.tasks.rewards)")
    p.add_argument("--reward-function", default="", help="FILE.py:NAME, as reward.function in training")
    p.add_argument("--reward-kwargs", default="{}", help="JSON keyword arguments of --reward-function")
    p.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per reward call")
    p.add_argument("--min-pixels", type=int, default=None, help="image budget (as model.min_pixels)")
    p.add_argument("--max-pixels", type=int, default=None, help="image budget (as model.max_pixels)")
    p.add_argument("--out", default="outputs/eval")
    return p


def _pairs(values, what) -> dict[str, str]:
    out = {}
    for v in values:
        name, _, path = v.partition("=") if "=" in v else ("", "", v)
        out[name or Path(path).name] = path
    if len(out) != len(values):
        raise DataError(f"--{what}: names must be unique")
    return out


def _scorer(args):
    from ekipl.tasks.rewards import FORMAT_RULES, RewardWeights
    from ekipl.tasks.scorer import RewardFunctionError, Scorer

    if args.format_rule not in FORMAT_RULES:
        raise DataError(f"--format-rule: unknown {args.format_rule!r}; known: {FORMAT_RULES}")
    try:
        kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        raise DataError(f"--reward-kwargs: not JSON: {e.msg}") from None
    if not isinstance(kwargs, dict):
        raise DataError("--reward-kwargs: expected a JSON object")
    try:
        return Scorer(
            RewardWeights(format_rule=args.format_rule),
            args.reward_function,
            kwargs,
            args.reward_timeout,
            key="--reward-function",
        )
    except RewardFunctionError as e:
        raise DataError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from ekipl.config import ConfigError
    from ekipl.modelref import resolve_model
    from ekipl.tasks.loader import Columns, load_task_file
    from ekipl.tasks.scorer import RewardFunctionError

    records: dict = {}
    args = _parser().parse_args(argv)
    scorer = None
    try:
        scorer = _scorer(args)
        models = {
            name: resolve_model(path, key=f"--model {name}")
            for name, path in _pairs(args.model, "model").items()
        }
        columns = Columns(args.prompt_key, args.answer_key, args.image_key, args.cot_key)
        splits = {}
        sampled, greedy = _pairs(args.split, "split"), _pairs(args.greedy_split, "greedy-split")
        both = set(greedy) & set(sampled)
        if both:
            raise DataError(f"--split and --greedy-split both name {sorted(both)}: names must be unique")
        for name, path in (sampled | greedy).items():
            ds = load_task_file(
                path,
                image_root=args.image_root,
                task=args.task,
                columns=columns,
                tasks=scorer.tasks,
                image_dir=Path(args.out) / "images",
            )
            splits[name] = list(ds)[: args.limit or None]
        first = next((s for samples in splits.values() for s in samples), None)
        if first is not None:
            try:  # one call of --reward-function on a real row before the engine starts
                scorer.probe(first)
            except RewardFunctionError as e:
                raise DataError(str(e)) from None
        if args.n is not None and args.n < 0:
            raise DataError(f"--n {args.n}: samples per problem must be >= 0 (0: greedy only)")
        if args.n is not None and 0 < args.n < max(args.k):
            raise DataError(f"--n {args.n} is smaller than --k {max(args.k)}: pass@k needs n >= k samples")
        if min(args.k) < 1:
            raise DataError("--k must be >= 1")
        if args.max_num_seqs is not None and args.max_num_seqs < 1:
            raise DataError(f"--max-num-seqs {args.max_num_seqs}: must be >= 1")
        from ekipl.engines.vllm_backend import EngineKeys

        engine = EngineKeys(
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
            tensor_parallel_size=args.tensor_parallel_size,
        )
        try:
            tp = args.tensor_parallel_size
            engine.check_engine_keys("eval", tp if tp > 1 else 0, "gpus")
        except ValueError as e:
            raise DataError(str(e).replace("eval.", "--").replace("_", "-")) from None
        rows = evaluate(
            models,
            splits,
            k=args.k if len(args.k) > 1 else args.k[0],
            n=args.n,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            dtype=args.dtype,
            records=records,
            scorer=scorer,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            greedy_only=set(greedy),
            engine=engine,
            system_prompt=args.system_prompt,
        )
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"ekipl eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        if scorer is not None:
            scorer.close()
    if scorer.errors:
        print(
            f"ekipl eval: {scorer.errors} reward call(s) failed and scored 0 (see the log)", file=sys.stderr
        )
    js, md = write(rows, Path(args.out), records)
    print(table(rows))
    print(f"\nwritten: {js}, {md}, and each problem's completions under {Path(args.out) / 'completions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
