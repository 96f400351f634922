"""Guidance where the policy fails, and full batches: the gated advantage rule against a hand-computed
group, replace_failed, the gate (no auxiliary request for a prompt the policy solved) and what
guidance costs, dynamic sampling's round limit, and a dynamic-sampling run resumed step-equal."""

from __future__ import annotations

import math
import shutil
import textwrap

import pytest
import torch
from runs import SMALL, compose, rows

from ekipl.algo.objective import group_advantages
from ekipl.rollout import selection
from ekipl.types import Action

REWARDS = textwrap.dedent(
    """
    def solved(completion, sample):
        return 1.0  # every answer right: the policy solves every prompt

    def failed(completion, sample):
        return 0.0  # every answer wrong, every group tied

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):  # verl's contract
        return float(len(solution_str) % 2)  # half the 2-sample groups tie
    """
)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


def test_gated_advantages_against_a_hand_computed_group():
    # one group: two policy actions (one correct, r=1; one wrong, r=0) and one trace (r=2, correct)
    r = torch.tensor([1.0, 0.0, 2.0])
    pol = torch.tensor([True, True, False])
    ok = torch.tensor([True, False, True])
    g = torch.zeros(3, dtype=torch.long)
    # whole group: mean 1, population std sqrt(2/3): the correct policy action gets 0 (not < 0),
    # so the rule keeps grpo
    s = math.sqrt(2 / 3)
    want = [(1 - 1) / s, (0 - 1) / s, (2 - 1) / s]
    assert group_advantages(r, g, pol, "gated", eps=0.0, correct=ok).tolist() == pytest.approx(want)
    # a second trace (r=2) pulls the mean to 1.25: the correct policy action would get -0.25/std,
    # so the group uses the policy's own statistics: mean 0.5, std 0.5
    r2, pol2 = torch.tensor([1.0, 0.0, 2.0, 2.0]), torch.tensor([True, True, False, False])
    ok2 = torch.tensor([True, False, True, True])
    g2 = torch.zeros(4, dtype=torch.long)
    assert group_advantages(r2, g2, pol2, "grpo", eps=0.0)[0] < 0
    got = group_advantages(r2, g2, pol2, "gated", eps=0.0, correct=ok2)
    assert got.tolist() == pytest.approx([(1 - 0.5) / 0.5, (0 - 0.5) / 0.5, (2 - 0.5) / 0.5, (2 - 0.5) / 0.5])
    # a correct action that is not the policy's never switches the rule
    ok3 = torch.tensor([False, False, True, True])
    assert group_advantages(r2, g2, pol2, "gated", eps=0.0, correct=ok3).tolist() == pytest.approx(
        group_advantages(r2, g2, pol2, "grpo", eps=0.0).tolist()
    )


def _a(source, reward, accuracy):
    return Action(source=source, token_ids=[1], text="", reward=reward, accuracy=accuracy)


def test_replace_failed_swaps_only_failed_policy_actions_for_better_ones():
    right, wrong1, wrong2 = _a("policy", 2.0, 1.0), _a("policy", 1.0, 0.0), _a("policy", 0.0, 0.0)
    trace, weak = _a("dataset", 2.0, 1.0), _a("aux", 0.5, 0.0)
    cands = [right, wrong1, wrong2, trace, weak]
    assert selection.select(cands, "replace_failed", 3, num_replace=1) == [right, wrong1, trace]
    # two swaps: the trace replaces the worst failure; the weak aux action (0.5) still beats wrong2
    # only, which is already gone, and does not beat wrong1 (1.0): one swap
    assert selection.select(cands, "replace_failed", 3, num_replace=2) == [right, wrong1, trace]
    # nothing failed: nothing is displaced, however good the external action
    assert selection.select([right, trace], "replace_failed", 1, num_replace=2) == [right]


@pytest.fixture
def gated_coordinator(policy_router, tiny_vlm, reward_file):
    from ekipl.models import hf
    from ekipl.rollout.config import RolloutConfig
    from ekipl.rollout.coordinator import RolloutCoordinator
    from ekipl.rollout.sources import DatasetSource, SourceConfig
    from ekipl.tasks.scorer import Scorer

    made = []

    def make(reward, **cfg):
        scorer = Scorer(function=f"{reward_file}:{reward}")
        src = DatasetSource(SourceConfig(name="dataset", kind="dataset", price_per_1k_tokens=2.0))
        base = dict(n=2, group_size=2, max_tokens=8, selection="replace_failed", drop_tied=True)
        c = RolloutCoordinator(
            RolloutConfig(**{**base, **cfg}), policy_router, [src], hf.load_processor(tiny_vlm), scorer
        )
        made.append((c, scorer))
        return c

    yield make
    for c, scorer in made:
        c.shutdown()
        scorer.close()


@pytest.mark.slow
def test_the_gate_asks_no_aux_for_a_solved_prompt_and_counts_what_guidance_costs(
    gated_coordinator, counting_data
):
    samples = [counting_data[0], counting_data[1]]
    solved = gated_coordinator("solved", gate_threshold=0.0)
    groups, m = solved.rollout(samples, step=1)
    assert m["aux/requests_total"] == 0.0 and m["aux/tokens_total"] == 0.0
    assert all(a.is_policy for g in solved.last_candidates for a in g[1])
    failed = gated_coordinator("failed", gate_threshold=0.0)
    _, m = failed.rollout(samples, step=1)
    assert m["aux/requests/dataset"] == 2.0  # both prompts failed: k=1 trace each
    tokens = sum(len(failed.tokenizer(s.cot, add_special_tokens=False)["input_ids"]) for s in samples)
    assert m["aux/tokens/dataset"] == tokens and m["aux/cost_usd/dataset"] == pytest.approx(
        tokens / 1000 * 2.0
    )
    always = gated_coordinator("solved")  # the paper's recipe: every prompt, prefetched or not
    _, m = always.rollout(samples, step=1)
    assert m["aux/requests_total"] == 2.0


@pytest.mark.slow
def test_gate_prefetch_starts_guidance_for_prompts_that_failed_their_last_visit(
    gated_coordinator, counting_data
):
    samples = [counting_data[0], counting_data[1]]
    failed = gated_coordinator("failed", gate_threshold=0.0, gate_prefetch=True)
    failed.prefetch(samples)  # never seen: nothing starts early
    _, m = failed.rollout(samples, step=1)
    assert (m["aux/gate_prefetched"], m["aux/gate_on_demand"], m["aux/requests_total"]) == (0.0, 2.0, 2.0)
    failed.prefetch(samples)  # both failed at their visit: their traces are asked now
    assert len(failed.gate._started) == 2  # the gate holds the started requests
    _, m = failed.rollout(samples, step=2)
    assert (m["aux/gate_prefetched"], m["aux/gate_on_demand"], m["aux/requests_total"]) == (2.0, 2.0, 4.0)
    assert [[a.text for a in acts if not a.is_policy] for _, acts in failed.last_candidates] == [
        [s.cot] for s in samples
    ]
    assert failed.gate_state() == {s.id: 0.0 for s in samples}
    # a resumed run remembers the visits; a prompt solved now lets its early answer go, still paid for
    solved = gated_coordinator("solved", gate_threshold=0.0, gate_prefetch=True)
    solved.restore_gate({samples[0].id: 0.0, samples[1].id: 1.0})
    solved.prefetch(samples)
    _, m = solved.rollout(samples, step=1)
    assert (m["aux/gate_prefetched"], m["aux/gate_unused"], m["aux/requests_total"]) == (0.0, 1.0, 1.0)
    assert all(a.is_policy for _, acts in solved.last_candidates for a in acts)
    with pytest.raises(ValueError, match="rollout.gate_prefetch"):
        from ekipl.rollout.config import RolloutConfig

        RolloutConfig(gate_prefetch=True)


@pytest.mark.slow
def test_dynamic_sampling_stops_at_the_round_limit(gated_coordinator, counting_data):
    coord = gated_coordinator("failed", selection="topg", max_sample_rounds=3, dynamic_sampling=True)
    batches = iter(
        [[counting_data[2], counting_data[3]], [counting_data[4], counting_data[5]], [counting_data[6]]]
    )
    drawn = []

    def more():
        drawn.append(next(batches))
        return drawn[-1]

    groups, m = coord.rollout([counting_data[0], counting_data[1]], step=1, more=more)
    assert groups == [] and len(drawn) == 2  # every group tied: 3 batches, then it stops
    assert (m["rollout/sample_rounds"], m["rollout/prompts_drawn"], m["rollout/groups_kept"]) == (
        3.0,
        6.0,
        0.0,
    )
    assert m["rollout/dropped_groups"] == 6.0


@pytest.mark.slow
def test_dynamic_sampling_fills_the_batch_and_a_resumed_run_is_step_equal(ray_local, tmp_path, reward_file):
    """GRPO with a reward that ties half the 2-sample groups (a verl-style ``compute_score`` file,
    called as verl calls it, with non-zero rewards and no errors): extra rounds fill the batch; a run
    resumed from step 2's checkpoint redoes step 3 as the uninterrupted run did (the sampler's
    position, which the extra rounds move, is in the checkpoint). The learner trains LoRA adapters
    (learner.lora): its checkpoints hold the adapters alone, with their optimizer state, and the
    resume is step-equal with them too."""
    from ekipl.train import run

    overrides = [
        *(o for o in SMALL if not o.startswith("aux.")),
        "algorithm=grpo",
        "aux=none",
        f"reward.function={reward_file}:compute_score",  # a verl reward file, as it is
        "rollout.n=2",
        "rollout.group_size=2",
        "rollout.dynamic_sampling=true",
        "rollout.max_sample_rounds=4",
        "rollout.max_tokens=12",
        "learner.world_size=1",  # resume equality does not need a second rank
        "learner.lora.rank=4",
        "learner.lr=1e-3",
        "trainer.steps=3",
        "trainer.save_every=1",
    ]
    ref = tmp_path / "ref"
    run(compose([*overrides, f"trainer.output_dir={ref}"]))
    got = rows(ref)
    assert all(r["reward/errors"] == 0 for r in got) and any(r["reward/policy/mean"] > 0 for r in got)
    assert all(r["rollout/sample_rounds"] <= 4 and r["rollout/groups_kept"] <= 2 for r in got)
    assert any(r["rollout/sample_rounds"] > 1 for r in got), [r["rollout/sample_rounds"] for r in got]
    assert all(r["rollout/prompts_drawn"] == 2 * r["rollout/sample_rounds"] for r in got)
    saved = torch.load(
        ref / "checkpoints" / "step_000002" / "learner" / "ds" / "mp_rank_00_model_states.pt",
        weights_only=False,
    )["module"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:3]
    again = tmp_path / "again"
    shutil.copytree(ref, again)
    shutil.rmtree(again / "checkpoints" / "step_000003")
    assert run(compose([*overrides, f"trainer.output_dir={again}", "trainer.resume=auto"]))["start_step"] == 2
    resumed = rows(again)
    for key in ("rollout/sample_rounds", "rollout/prompts_drawn", "rollout/groups_kept"):
        assert resumed[2][key] == got[2][key], key
    for k in ("reward/policy/mean", "rollout/policy_tokens", "actor/pg_loss", "actor/entropy"):
        assert resumed[2][k] == pytest.approx(got[2][k], rel=1e-6, abs=1e-7), k
