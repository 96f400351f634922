"""Rollout: selection rules, the action cache, EKIPL groups from real vLLM engines in Ray actors,
auxiliary faults, and the OpenAI-compatible source against a local stub server."""

from __future__ import annotations

import logging
import time

import pytest
from openai_stub import ANSWER, SECRET

from ekipl.rollout import selection
from ekipl.rollout.cache import ActionCache, cache_key
from ekipl.rollout.config import RolloutConfig
from ekipl.rollout.coordinator import RolloutCoordinator
from ekipl.rollout.sources import DatasetSource, OpenAISource, SourceConfig
from ekipl.tasks.rewards import score
from ekipl.tasks.sample import DataError, Sample
from ekipl.types import Action


def act(source, reward, acc=0.0):
    return Action(source=source, token_ids=[1], text="", reward=reward, accuracy=acc)


# --------------------------------------------------------------------------------------------------
# Selection rules on hand-built groups


def test_selection_all_keeps_everything():
    c = [act("policy", 0), act("aux", 1)]
    assert selection.select(c, "all", 1) == c


def test_selection_topg_keeps_the_best_and_breaks_ties_policy_first():
    c = [act("aux", 2.0), act("policy", 1.0), act("aux", 1.0), act("policy", 0.0), act("dataset", 1.0)]
    got = selection.select(c, "topg", 3)
    assert [(a.source, a.reward) for a in got] == [("aux", 2.0), ("policy", 1.0), ("aux", 1.0)]
    got2 = selection.select([act("aux", 1.0), act("policy", 1.0)], "topg", 1)
    assert got2[0].source == "policy"  # the tie goes to the policy
    assert len(selection.select(c, "topg", 10)) == 5


def test_selection_replace_swaps_the_worst_policy_actions_for_the_best_aux():
    c = [act("policy", 0.0), act("policy", 2.0), act("policy", 1.0), act("aux", 0.5), act("aux", 1.5)]
    got = selection.select(c, "replace", 0, num_replace=2)
    assert [(a.source, a.reward) for a in got] == [("policy", 2.0), ("aux", 1.5), ("aux", 0.5)]
    only_one_aux = selection.select(c[:4], "replace", 0, num_replace=2)
    assert sorted(a.reward for a in only_one_aux) == [0.5, 1.0, 2.0]


def test_ties_pass_rate_and_unknown_rule():
    assert selection.all_tied([act("policy", 1.0), act("aux", 1.0)])
    assert not selection.all_tied([act("policy", 1.0), act("aux", 0.0)])
    assert selection.pass_rate([act("policy", 0, 1.0), act("policy", 0, 0.0), act("aux", 0, 1.0)]) == 0.5
    with pytest.raises(ValueError, match="rollout.selection: unknown rule 'best'"):
        selection.select([], "best", 1)
    with pytest.raises(ValueError, match="rollout.selection"):
        RolloutConfig(selection="best")


# --------------------------------------------------------------------------------------------------
# Cache


def test_cache_round_trip_and_key_depends_on_image_bytes_and_params(tmp_path, counting_data):
    s = counting_data[0]
    k1 = cache_key("m", "p", list(s.image_paths), {"k": 2})
    assert k1 == cache_key("m", "p", list(s.image_paths), {"k": 2})
    assert k1 != cache_key("m", "p", list(s.image_paths), {"k": 3})
    assert k1 != cache_key("m", "p", list(counting_data[1].image_paths), {"k": 2})
    cache = ActionCache(tmp_path)
    assert cache.get(k1) is None and cache.misses == 1
    cache.put(k1, ["a", "b"])
    assert cache.get(k1) == ["a", "b"] and cache.hits == 1 and cache.keys() == [k1]
    assert not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------------------------------
# Groups from real engines


@pytest.fixture
def coordinator_factory(policy_router, aux_vlm_source, tiny_vlm, tmp_path):
    from ekipl.models import hf

    proc = hf.load_processor(tiny_vlm)
    made = []

    def make(sources=None, cache=False, **cfg):
        base = dict(n=3, group_size=4, max_tokens=24, selection="all", drop_tied=False)
        base.update(cfg)
        srcs = (
            [aux_vlm_source, DatasetSource(SourceConfig(name="dataset", kind="dataset"))]
            if sources is None
            else sources
        )
        c = RolloutCoordinator(
            RolloutConfig(**base),
            policy_router,
            srcs,
            proc,
            cache=ActionCache(tmp_path / "cache") if cache else None,
        )
        made.append(c)
        return c

    yield make
    for c in made:
        c._pool.shutdown(wait=False)


@pytest.mark.slow
def test_group_mixes_policy_and_two_aux_sources_with_provenance_retokenization_and_rewards(
    coordinator_factory, counting_data
):
    coord = coordinator_factory()
    samples = [counting_data[0], counting_data[1]]
    groups, m = coord.rollout(samples)
    assert len(groups) == 2
    tok = coord.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for g, s in zip(groups, samples, strict=True):
        assert g.sample is s
        sources = [a.source for a in g.actions]
        assert sources.count("policy") == 3 and sources.count("aux_b") == 2 and sources.count("dataset") == 1
        for a in g.actions:
            r = score(a.text, s)
            assert (a.reward, a.accuracy, a.format) == (r.total, r.accuracy, r.format)
            if a.is_policy:
                assert len(a.sampling_logprobs) == len(a.token_ids) > 0
            else:
                assert a.sampling_logprobs is None
                # auxiliary text re-tokenized with the *policy's* tokenizer
                body = a.token_ids[:-1] if a.token_ids[-1] == eos else a.token_ids
                assert tok.decode(body) == a.text
                assert (
                    body
                    == tok(a.text, add_special_tokens=False, split_special_tokens=True)["input_ids"][
                        : len(body)
                    ]
                )
        ds = next(a for a in g.actions if a.source == "dataset")
        assert ds.text == s.cot and ds.reward == 2.0 and ds.token_ids[-1] == eos
    assert m["select/ratio/dataset"] == pytest.approx(2 / 12)
    assert m["reward/dataset/accuracy"] == 1.0 and "reward/aux_b/mean" in m
    assert m["select/aux_win_rate"] == 1.0  # the recorded trace beats the random policy everywhere


@pytest.mark.slow
def test_length_and_truncation_metrics_per_source(coordinator_factory, counting_data):
    """A completion cut at its budget counts as truncated; one ending in the end token does not."""
    trace = DatasetSource(SourceConfig(name="dataset", kind="dataset"))
    samples = [counting_data[0], counting_data[1]]
    coord = coordinator_factory(sources=[trace], max_tokens=5, ignore_eos=True)
    _, m = coord.rollout(samples)
    eos = coord.tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths = [len(coord.tokenizer(s.cot, add_special_tokens=False)["input_ids"]) + 1 for s in samples]
    assert all(a.truncated for _, acts in coord.last_candidates for a in acts if a.is_policy)
    assert (m["length/policy/mean"], m["length/policy/max"], m["length/policy/min"]) == (5.0, 5.0, 5.0)
    assert m["length/policy/truncated_frac"] == 1.0  # every policy completion hit rollout.max_tokens
    assert m["length/dataset/truncated_frac"] == 0.0  # the whole trace, ending in the end token
    assert m["length/dataset/mean"] == sum(lengths) / 2 and m["length/dataset/max"] == max(lengths)
    assert m["length/dataset/min"] == min(lengths)
    cut = coordinator_factory(sources=[trace], max_tokens=5, ignore_eos=True, aux_max_tokens=10)
    _, m2 = cut.rollout(samples)
    traces = [a for _, acts in cut.last_candidates for a in acts if a.source == "dataset"]
    assert all(len(a.token_ids) == 10 and a.token_ids[-1] != eos and a.truncated for a in traces)
    assert m2["length/dataset/truncated_frac"] == 1.0 and m2["length/dataset/max"] == 10.0


@pytest.mark.slow
def test_topg_and_drop_tied_through_the_coordinator(coordinator_factory, counting_data):
    coord = coordinator_factory(selection="topg", group_size=2, drop_tied=True)
    groups, m = coord.rollout([counting_data[2]])
    assert len(groups) == 1 and len(groups[0].actions) == 2
    assert groups[0].actions[0].source == "dataset"  # the only action with a reward
    only_policy = coordinator_factory(sources=[], selection="topg", group_size=2, drop_tied=True)
    groups2, m2 = only_policy.rollout([counting_data[2]])
    assert groups2 == [] and m2["rollout/dropped_groups"] == 1.0  # a random policy ties at zero


@pytest.mark.slow
def test_aux_on_demand_queries_aux_only_below_the_pass_threshold(coordinator_factory, counting_data):
    never = coordinator_factory(aux_on_demand=True, pass_threshold=0.0)
    groups, _ = never.rollout([counting_data[3]])
    assert {a.source for a in groups[0].actions} == {"policy"}
    always = coordinator_factory(aux_on_demand=True, pass_threshold=1.0)
    groups, _ = always.rollout([counting_data[3]])
    assert {a.source for a in groups[0].actions} == {"policy", "aux_b", "dataset"}


@pytest.mark.slow
def test_cache_hits_on_a_second_run(coordinator_factory, counting_data, aux_vlm_source):
    samples = [counting_data[4], counting_data[5]]
    first = coordinator_factory(cache=True)
    g1, _ = first.rollout(samples)
    calls = aux_vlm_source.calls
    second = coordinator_factory(cache=True)  # a resumed run: same cache directory
    second.prefetch(samples)
    g2, _ = second.rollout(samples)
    assert aux_vlm_source.calls == calls, "the second run called the auxiliary engine again"
    assert second.cache.hits == 2
    texts = [[a.text for a in g.actions if a.source == "aux_b"] for g in (g1 + g2)]
    assert texts[:2] == texts[2:]


@pytest.mark.slow
def test_dead_policy_engine_is_a_clear_error(ray_local, counting_data, tiny_vlm):
    from ekipl.engines import vllm_backend as vb
    from ekipl.engines.policy import PolicyEngine
    from ekipl.models import hf
    from ekipl.rollout.policy import PolicyEngineError, PolicyRouter

    dead = (
        ray_local.remote(PolicyEngine)
        .options(num_cpus=0, max_restarts=0)
        .remote(vb.EngineSpec(model="/nonexistent/model", enable_weight_sync=True))
    )
    router = PolicyRouter(None, actors=[dead])
    coord = RolloutCoordinator(RolloutConfig(n=2, max_tokens=8), router, [], hf.load_processor(tiny_vlm))
    with pytest.raises(PolicyEngineError, match="policy engine replica died"):
        coord.rollout([counting_data[0]])


def test_image_placeholder_mismatch_names_the_sample(tiny_vlm, counting_data):
    from ekipl.models import hf

    coord = RolloutCoordinator(
        RolloutConfig(), policy=None, sources=[], processor=hf.load_processor(tiny_vlm)
    )
    s = counting_data[0]
    bad = Sample(
        id="evil-1",
        task="counting",
        problem="What is <|image_pad|> here?",
        answer="1",
        image_paths=s.image_paths,
        source_file="x.json",
        row=3,
    )
    with pytest.raises(
        DataError, match=r"x\.json, row 3 \(id='evil-1'\), field 'problem': the prompt has 2 image"
    ):
        coord.prompt(bad)


# --------------------------------------------------------------------------------------------------
# The openai source against a local stub server


def _openai(url, **kw):
    cfg = dict(
        name="gpt",
        kind="openai",
        base_url=url,
        model="gpt-4o",
        k=1,
        backoff_s=0.01,
        max_retries=4,
        timeout_s=0.5,
        api_key_env="EKIPL_TEST_KEY",
    )
    cfg.update(kw)
    return OpenAISource(SourceConfig(**cfg))


def test_openai_source_retries_429_500_and_garbage_then_succeeds(
    stub_server, counting_data, monkeypatch, caplog
):
    monkeypatch.setenv("EKIPL_TEST_KEY", SECRET)
    stub_server.script[:] = ["429", "500", "garbage"]
    src = _openai(stub_server.url)
    with caplog.at_level(logging.DEBUG):
        out = src.generate([counting_data[0]])
    assert out == [[ANSWER]] and src.retries == 3
    assert len(stub_server.seen) == 4 and all(s["auth"] == f"Bearer {SECRET}" for s in stub_server.seen)
    msg = stub_server.seen[0]["body"]["messages"][0]
    assert msg["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text and "malformed" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(src)


def test_openai_source_times_out_gives_up_and_training_goes_on(
    stub_server, counting_data, monkeypatch, caplog
):
    monkeypatch.setenv("EKIPL_TEST_KEY", SECRET)
    stub_server.script[:] = ["sleep"] * 3
    src = _openai(stub_server.url, max_retries=2, timeout_s=0.2)
    with caplog.at_level(logging.DEBUG):
        t0 = time.perf_counter()
        out = src.generate([counting_data[0]])
    assert out == [[]] and time.perf_counter() - t0 < 5
    assert "timeout" in caplog.text and "giving up" in caplog.text
    assert SECRET not in caplog.text


def test_openai_source_does_not_retry_a_client_error(stub_server, counting_data):
    stub_server.script[:] = ["401"]
    assert _openai(stub_server.url).generate([counting_data[0]]) == [[]] and len(stub_server.seen) == 1


def test_source_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="aux.x.kind"):
        SourceConfig(name="x", kind="magic")
    with pytest.raises(ValueError, match="aux.x.model: no such model directory"):
        SourceConfig(name="x", kind="vllm", model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="aux.x: an openai source needs base_url"):
        SourceConfig(name="x", kind="openai")


def test_router_sends_work_to_the_least_loaded_replica():
    from ekipl.rollout.policy import PolicyRouter

    router = PolicyRouter(None, actors=["a", "b", "c"])  # _pick only reads the in-flight counts
    assert [router._pick(w) for w in (5, 1, 1)] == [0, 1, 2]
    assert router.in_flight == [5, 1, 1]
    assert router._pick(3) == 1 and router._pick(1) == 2 and router.in_flight == [5, 4, 2]


def test_hf_source_generates_k_completions_with_transformers(tiny_vlm_b, counting_data):
    from ekipl.rollout.sources import HFSource

    src = HFSource(SourceConfig(name="hf_b", kind="hf", model=str(tiny_vlm_b), k=2, max_tokens=6))
    out = src.generate([counting_data[0], counting_data[1]])
    assert [len(texts) for texts in out] == [2, 2] and all(isinstance(t, str) for t in out[0])


@pytest.mark.slow
def test_a_hung_aux_source_is_timed_out_and_killed_for_a_restart(
    coordinator_factory, counting_data, aux_vlm_source, aux_holder, monkeypatch, caplog
):
    import ray

    actor = aux_vlm_source.actors[0]

    def restarts() -> int:  # Ray's count of the actor's restarts (the GCS's record)
        return ray._private.state.actors(actor._actor_id.hex())["NumRestarts"]

    before = restarts()
    monkeypatch.setattr(aux_vlm_source.cfg, "max_tokens", 1500)  # far longer than the time limit
    monkeypatch.setattr(aux_vlm_source.cfg, "call_timeout_s", 0.5)
    coord = coordinator_factory()
    with caplog.at_level(logging.WARNING):
        groups, m = coord.rollout([counting_data[2]])
    assert {a.source for a in groups[0].actions} == {"policy", "dataset"}
    assert "GetTimeoutError" in caplog.text and m["aux/failures/aux_b"] == 1.0
    # killed for hanging, so Ray restarts it (that a restarted actor serves again is test_faults':
    # a live run uses it after a kill); the kill is asynchronous
    deadline = time.monotonic() + 30
    while restarts() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert restarts() == before + 1
    aux_holder.retire()  # the next test that wants the source gets a new one


def test_router_takes_one_token_limit_per_request(policy_router):
    """Per-request max_tokens reach the engine through the router (bench/perf/real_step.py makes each
    row of a group as long as the bench drew); a wrong count is refused before anything runs."""
    from ekipl.engines import vllm_backend as vb

    reqs = [vb.Request(prompt="count the dots"), vb.Request(prompt="count the stars")] * 2
    out = policy_router.generate(
        reqs, n=2, temperature=1.0, max_tokens=[3, 9, 1, 5], ignore_eos=True, chunk=3
    )
    assert [[len(c.token_ids) for c in group] for group in out] == [[3, 3], [9, 9], [1, 1], [5, 5]]
    assert {c.finish_reason for group in out for c in group} == {"length"}
    with pytest.raises(ValueError, match="max_tokens: 2 values for 4 requests"):
        policy_router.submit(reqs, n=1, temperature=1.0, max_tokens=[3, 9])


def test_rollouts_ahead_are_taken_at_their_step_and_dropped_past_the_staleness_bound():
    """rollout.max_staleness: a rollout started at step s and taken at step t is t - s updates old;
    older than the bound (a resume with a smaller N), it is dropped and counted; a checkpoint's
    state holds every started rollout and restores them, one-step-off's single dict too."""
    from ekipl.engines import vllm_backend as vb
    from ekipl.rollout.early import EarlyRollouts
    from ekipl.tasks.sample import Sample

    class Done:
        def __init__(self, comps):
            self.comps = comps

        def result(self):
            return self.comps

    def batch(i):
        return [Sample(id=f"s{i}", task="counting", problem="q", answer="1")]

    def comps(i):
        return [[vb.Completion([i], f"t{i}", [-0.5], "stop", [1, 2])]]

    early = EarlyRollouts(max_staleness=2)
    early.start(2, batch(2), Done(comps(2)), started=1)
    early.start(3, batch(3), Done(comps(3)), started=1)
    state = early.state()
    assert [(e["step"], e["started"]) for e in state] == [(2, 1), (3, 1)]
    assert early.take(batch(2), 2) == (comps(2), 1)
    assert early.take(batch(3), 3) == (comps(3), 2)
    restored = EarlyRollouts(max_staleness=1)  # resumed with a smaller bound
    restored.restore(state)
    assert restored.take(batch(2), 2) == (comps(2), 1)
    assert restored.take(batch(3), 3) is None and restored.stale_dropped == 1  # 2 updates old
    one = EarlyRollouts(max_staleness=1)
    one.restore({"step": 5, "sample_ids": ["s5"], "completions": [[vars(c) for c in comps(5)[0]]]})
    assert one.take(batch(5), 5) == (comps(5), 1)
    early.start(7, batch(7), Done(comps(7)), started=6)
    assert early.take(batch(8), 7) is None  # not its batch: generated again


def test_max_staleness_keys_are_checked():
    with pytest.raises(ValueError, match="rollout.max_staleness must be >= 0"):
        RolloutConfig(max_staleness=-1)
    with pytest.raises(ValueError, match="rollout.one_step_off is rollout.max_staleness=1"):
        RolloutConfig(one_step_off=True, max_staleness=3)
    with pytest.raises(
        ValueError, match="rollout.dynamic_sampling: not with rollout.one_step_off or rollout.max_staleness"
    ):
        RolloutConfig(dynamic_sampling=True, max_staleness=2)
    assert RolloutConfig(one_step_off=True).ahead == 1 and RolloutConfig(max_staleness=3).ahead == 3
