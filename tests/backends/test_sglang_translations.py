"""Every translation the SGLang backend makes, on real data and without SGLang: completions
our engine really sampled, shaped as SGLang returns them (meta_info as 0.5.23 builds it), and
back; a real target's weights manifest as the update request; a real EAGLE-3 drafter's tensors
under SGLang's draft names; a plan as SGLang's adaptive config; and the configs refused."""

from __future__ import annotations

import pytest

from respec_async.backends.sglang import (
    adaptive_config,
    completion_from_output,
    draft_update_tensors,
    engine_kwargs,
    external_corpus_request,
    refuse_unsupported,
    sampling_params,
    sglang_draft_parameter,
    stale_corpora,
    update_request,
)
from respec_async.config import ConfigError, config_from_dict
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request, SDConfig
from respec_async.engine.sampling import SamplingParams
from respec_async.sd.solver import plan_runs
from tests.engine.test_engine import tiny_models
from transport.weights import manifest_of, plan_buckets


def cuda_config(**generator):
    return config_from_dict({"model": {"device": "cuda"}, "generator": generator})


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=5)


def as_sglang_output(completion, sd: bool) -> dict:
    """A finished SGLang result for what our engine sampled (skip_tokenizer_init: no text)."""
    meta = {"id": str(completion.request_id), "prompt_tokens": len(completion.prompt_ids),
            "completion_tokens": len(completion.output_ids), "weight_version": "3",
            "finish_reason": ({"type": "stop", "matched": completion.output_ids[-1]}
                              if completion.finish_reason == "stop" else
                              {"type": "length", "length": len(completion.output_ids)}),
            "output_token_logprobs": [(lp, tok, None) for lp, tok in zip(completion.logprobs, completion.output_ids)]}
    if sd and completion.num_verify_steps:  # SGLang adds them only after a verify step
        meta.update(spec_verify_ct=completion.num_verify_steps, spec_num_correct_drafts=completion.num_accepted,
                    spec_num_proposed_drafts=completion.num_drafted,
                    spec_accept_length=len(completion.output_ids) / completion.num_verify_steps)
    return {"output_ids": list(completion.output_ids), "meta_info": meta}


@pytest.mark.parametrize("sd", [None, SDConfig(3, 1, 3)])
def test_an_sglang_result_becomes_the_completion_our_engine_would_give(models, sd):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, seed=1)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(7,))
    completions = engine.generate([Request(f"{i}:0:{i}", [1, 2, 3 + i], params) for i in range(4)], sd)
    assert {c.finish_reason for c in completions} <= {"stop", "length"}
    assert sd is None or any(c.num_verify_steps for c in completions)
    for c in completions:
        back = completion_from_output(as_sglang_output(c, sd is not None), str(c.request_id), c.prompt_ids)
        assert back.output_ids == c.output_ids and back.logprobs == pytest.approx(c.logprobs)
        assert back.finish_reason == c.finish_reason and back.prompt_ids == c.prompt_ids
        if sd is None or c.num_verify_steps == 0:
            assert back.num_verify_steps == back.num_drafted == 0 and back.acceptance_length == 0.0
            assert back.num_decode_steps == len(c.output_ids) - 1
        else:
            assert (back.num_verify_steps, back.num_accepted, back.num_drafted) == \
                   (c.num_verify_steps, c.num_accepted, c.num_drafted)
            assert back.num_decode_steps == c.num_verify_steps
            assert back.acceptance_length == pytest.approx(len(c.output_ids) / c.num_verify_steps)


def test_an_aborted_or_inconsistent_result_is_an_error_not_a_rollout(models):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=1, max_seq_len=64, seed=1)
    c = engine.generate([Request("0:0:0", [1, 2], SamplingParams(max_new_tokens=5))])[0]
    aborted = as_sglang_output(c, sd=False)
    aborted["meta_info"]["finish_reason"] = {"type": "abort", "message": "weights updated", "status_code": None}
    with pytest.raises(RuntimeError, match="did not finish"):
        completion_from_output(aborted, "0:0:0", c.prompt_ids)
    short = as_sglang_output(c, sd=False)
    short["meta_info"]["output_token_logprobs"] = short["meta_info"]["output_token_logprobs"][:-1]
    with pytest.raises(RuntimeError, match="log-probs are for"):
        completion_from_output(short, "0:0:0", c.prompt_ids)


def test_a_weights_manifest_becomes_the_update_request_sent_one_tensor_per_broadcast(models):
    target, _ = models
    state = target.state_dict()
    manifest = manifest_of(state)
    request = update_request(manifest, "actor-7", "target", version=12)
    assert request["names"] == list(state) and request["group_name"] == "actor-7"
    assert request["dtypes"] == ["float32"] * len(state)
    assert request["shapes"] == [list(t.shape) for t in state.values()]
    assert request["selector"] == "target" and request["weight_version"] == "12" and request["flush_cache"] is False
    # SGLang receives each named tensor with its own broadcast, in the request's order.
    assert plan_buckets(manifest, bucket_bytes=1) == [[i] for i in range(len(manifest))]
    with pytest.raises(ValueError, match="'all' draft tensors reach the target"):
        update_request(manifest, "actor-7", "all", version=12)


# LlamaForCausalLMEagle3's parameters for a one-layer draft (sglang/srt/models/llama_eagle3.py).
SGLANG_DRAFT_PARAMETERS = {
    "model.fc.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
    "model.layers.0.hidden_norm.weight", "model.norm.weight", "lm_head.weight",
}


def test_our_drafter_fills_every_parameter_of_sglangs_eagle3_draft_and_nothing_else(models):
    _, drafter = models
    sent = draft_update_tensors(drafter.state_dict())
    assert "d2t" not in sent and "t2d" not in sent  # read once at launch by SGLang
    landed = {}
    for name in sent:
        parameter, shard = sglang_draft_parameter(name)
        landed.setdefault(parameter, set()).add(shard)
    assert set(landed) == SGLANG_DRAFT_PARAMETERS
    assert landed["model.layers.0.self_attn.qkv_proj.weight"] == {"q", "k", "v"}
    assert landed["model.layers.0.mlp.gate_up_proj.weight"] == {0, 1}
    assert all(shards == {None} for p, shards in landed.items() if "qkv" not in p and "gate_up" not in p)


def test_a_drafter_whose_vocabulary_map_changed_is_refused(models):
    _, drafter = models
    state = drafter.state_dict()
    launched = state["d2t"].clone()
    draft_update_tensors(state, launched_d2t=launched)  # the same map: fine
    other = launched.clone()
    other[0] += 1
    changed = dict(state, d2t=other)
    with pytest.raises(ValueError, match="d2t"):
        draft_update_tensors(changed, launched_d2t=launched)


def test_the_adaptive_plan_becomes_sglangs_bucketed_candidate_steps():
    plan = plan_runs([("4,1,4", 2.1)] * 3 + [("2,1,2", 1.3)] * 5 + [("plain", 1.0)] * 56)
    assert adaptive_config(plan) == {"1": {"candidate_steps": [0, 4]}, "4": {"candidate_steps": [0, 2]},
                                     "9": {"candidate_steps": [0]}}
    with pytest.raises(ValueError, match="EAGLE chains only"):
        adaptive_config(plan_runs([("3,2,6", 1.5)] * 4))
    with pytest.raises(ValueError, match="EAGLE chains only"):
        adaptive_config(plan_runs([("history:4,1,4", 1.5)] * 4))


def test_launch_arguments_for_each_sd_mode():
    base = engine_kwargs(cuda_config(max_batch_size=32, max_seq_len=512), "/m")
    assert base == {"model_path": "/m", "dtype": "float32", "skip_tokenizer_init": True, "random_seed": 0,
                    "max_running_requests": 32, "context_length": 512}
    static = engine_kwargs(cuda_config(sd="static", sd_num_steps=3, sd_top_k=2, sd_num_draft_tokens=5), "/m", "/d")
    assert (static["speculative_algorithm"], static["speculative_draft_model_path"]) == ("EAGLE3", "/d")
    # SGLang counts the root among its draft tokens: our n verified drafts are its n + 1.
    assert (static["speculative_num_steps"], static["speculative_eagle_topk"],
            static["speculative_num_draft_tokens"]) == (3, 2, 6)
    assert "speculative_accept_threshold_single" not in static  # exact unless asked
    relaxed = engine_kwargs(cuda_config(sd="static", sd_relaxed_threshold_single=0.8, sd_relaxed_threshold_acc=0.5),
                            "/m", "/d")
    assert (relaxed["speculative_accept_threshold_single"], relaxed["speculative_accept_threshold_acc"]) == (0.8, 0.5)
    history = engine_kwargs(cuda_config(sd="static", sd_source="history", sd_num_steps=4, sd_top_k=2,
                                        sd_num_draft_tokens=6), "/m")
    assert history["speculative_algorithm"] == "NGRAM" and history["speculative_num_draft_tokens"] == 7
    # Room for earlier epochs' corpora (SGLang refuses a budget over its draft tokens - 1), and
    # the tokenizer SGLang needs to take a corpus.
    assert 1 <= history["speculative_ngram_external_sam_budget"] <= 7 - 1
    assert history["skip_tokenizer_init"] is False
    adaptive = engine_kwargs(cuda_config(sd="adaptive", sd_grid=["1,1,1", "5,1,5"]), "/m", "/d", "/plan.json")
    assert adaptive["speculative_adaptive"] is True and adaptive["speculative_adaptive_config"] == "/plan.json"
    assert (adaptive["speculative_num_steps"], adaptive["speculative_num_draft_tokens"]) == (5, 6)
    with pytest.raises(ConfigError, match="model.drafter_path"):
        engine_kwargs(cuda_config(sd="static"), "/m")


@pytest.mark.parametrize(("raw", "key"), [
    ({"sampling": {"top_p": 0.9}}, "sampling.top_p"),
    ({"sampling": {"top_k": 20}}, "sampling.top_k"),
    ({"model": {"device": "cpu"}}, "model.device"),
    ({"generator": {"sd": "adaptive", "sd_grid": ["4,1,4", "history:4,1,4"]}}, "generator.sd_grid"),
    ({"generator": {"sd": "adaptive", "sd_grid": ["3,2,6"]}}, "generator.sd_grid"),
])
def test_configs_sglang_cannot_serve_exactly_are_refused_by_key(raw, key):
    raw = {"model": {"device": "cuda"}, **raw} if "model" not in raw else raw
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        refuse_unsupported(config_from_dict(raw))


def test_sampling_parameters():
    assert sampling_params(SamplingParams(temperature=0.7, max_new_tokens=9, stop_token_ids=(2,)), seed=11) == {
        "max_new_tokens": 9, "temperature": 0.7, "stop_token_ids": [2], "sampling_seed": 11}
    with pytest.raises(ValueError, match="top-p / top-k"):
        sampling_params(SamplingParams(top_p=0.9))


def test_an_epochs_rollouts_become_an_external_corpus_sglang_tokenizes_back_to_them(models):
    from respec_async.engine.tokenizer import build_char_tokenizer
    from respec_async.tasks.arithmetic import ALPHABET

    tokenizer = build_char_tokenizer(ALPHABET)
    rollouts = [tokenizer.encode("8+5+0=13;7+9+1=17; ans 573"), [], tokenizer.encode("3+4+0=7; ans 7")]
    request = external_corpus_request(2, rollouts, tokenizer.decode)
    assert request["corpus_id"] == "respec-rollouts-epoch-2"
    # What SGLang's tokenizer manager does with documents: encode each (no special tokens).
    assert [tokenizer.encode(d) for d in request["documents"]] == [rollouts[0], rollouts[2]]  # the empty one left out
    loaded = ["respec-rollouts-epoch-0", "respec-rollouts-epoch-1", "respec-rollouts-epoch-2", "someone-elses"]
    assert stale_corpora(loaded, epoch=2, keep_epochs=2) == ["respec-rollouts-epoch-0"]
    assert stale_corpora(loaded, epoch=2, keep_epochs=1) == ["respec-rollouts-epoch-0", "respec-rollouts-epoch-1"]
