"""EAGLE-3 drafter: shapes, cache equivalence, shared frozen embedding, vocabulary map, save/load."""

from types import SimpleNamespace

import torch
from torch import nn

from respec_async.algorithms.distill import unrolled_distill_loss
from respec_async.engine.drafter import DrafterConfig, Eagle3Drafter

H, V = 32, 13


def make_drafter(draft_vocab_ids=None, seed=0):
    torch.manual_seed(seed)
    config = DrafterConfig(hidden_size=H, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=V, draft_vocab_size=V if draft_vocab_ids is None else len(draft_vocab_ids),
                           feature_layers=(1, 1, 0), max_position_embeddings=64)
    embed = nn.Embedding(V, H)
    drafter = Eagle3Drafter(config, embed, draft_vocab_ids)
    for param in drafter.parameters():
        nn.init.normal_(param, std=0.3)
    return drafter, embed


def fake_cache(num_slots, max_seq_len):
    shape = (1, num_slots, 2, max_seq_len, H // 4)
    return SimpleNamespace(k=torch.zeros(shape), v=torch.zeros(shape))


def test_forward_shapes_with_target_features_and_own_hidden():
    drafter, _ = make_drafter()
    ids = torch.randint(0, V, (2, 5))
    logits, hidden = drafter(ids, torch.randn(2, 5, 3 * H))
    assert logits.shape == (2, 5, V) and hidden.shape == (2, 5, H)
    logits2, hidden2 = drafter(ids, hidden)
    assert logits2.shape == (2, 5, V) and hidden2.shape == (2, 5, H)


def test_cached_step_by_step_equals_uncached_causal():
    drafter, _ = make_drafter()
    ids = torch.randint(0, V, (2, 6))
    features = torch.randn(2, 6, 3 * H)
    full_logits, full_hidden = drafter(ids, features)
    cache = fake_cache(num_slots=4, max_seq_len=10)
    slots = torch.tensor([3, 1])
    # a prefix of 4 in one call, then one token at a time
    logits, hidden = drafter(ids[:, :4], features[:, :4], torch.arange(4).expand(2, -1), cache, slots)
    torch.testing.assert_close(logits, full_logits[:, :4], atol=1e-5, rtol=1e-5)
    for t in (4, 5):
        pos = torch.full((2, 1), t)
        logits, hidden = drafter(ids[:, t:t + 1], features[:, t:t + 1], pos, cache, slots)
        torch.testing.assert_close(logits, full_logits[:, t:t + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, full_hidden[:, t:t + 1], atol=1e-5, rtol=1e-5)


def test_cache_with_explicit_mask_and_logits_positions():
    drafter, _ = make_drafter()
    ids = torch.randint(0, V, (1, 4))
    features = torch.randn(1, 4, 3 * H)
    # tokens 2 and 3 are siblings: both see 0, 1 and themselves only
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 2]])
    ref_logits, _ = drafter(ids, features, positions, attn_mask=mask)
    cache = fake_cache(num_slots=2, max_seq_len=8)
    logits, _ = drafter(ids, features, positions, cache, torch.tensor([1]), torch.arange(4)[None], mask,
                        logits_positions=torch.tensor([[3, 2]]))
    torch.testing.assert_close(logits, ref_logits[:, [3, 2]], atol=1e-5, rtol=1e-5)


def test_embedding_is_shared_and_not_trained():
    drafter, embed = make_drafter()
    assert drafter.target_embed is embed
    assert not any(param is embed.weight for param in drafter.parameters())
    assert not any("embed" in name for name in drafter.state_dict())
    logits, _ = drafter(torch.randint(0, V, (1, 3)), torch.randn(1, 3, 3 * H))
    logits.sum().backward()
    assert embed.weight.grad is None
    assert drafter.fc.weight.grad is not None


def test_draft_vocabulary_maps_into_target_ids():
    ids = torch.tensor([0, 3, 4, 9, 12])
    drafter, _ = make_drafter(ids)
    assert torch.equal(drafter.draft_vocab_ids, ids)
    assert torch.equal(drafter.d2t, ids - torch.arange(5))
    assert drafter.t2d.sum() == 5 and bool(drafter.t2d[9]) and not bool(drafter.t2d[1])
    logits, _ = drafter(torch.randint(0, V, (2, 3)), torch.randn(2, 3, 3 * H))
    full = drafter.draft_logits_to_target(logits)
    assert full.shape == (2, 3, V)
    torch.testing.assert_close(full[..., ids], logits)
    assert torch.isinf(full[..., 1]).all()


def test_save_load_round_trip(tmp_path):
    drafter, embed = make_drafter(torch.tensor([1, 2, 5, 7]))
    drafter.save_pretrained(tmp_path / "drafter")
    loaded = Eagle3Drafter.load_pretrained(tmp_path / "drafter", embed)
    assert loaded.config == drafter.config
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids, features = torch.randint(0, V, (1, 4)), torch.randn(1, 4, 3 * H)
    torch.testing.assert_close(loaded(ids, features)[0], drafter(ids, features)[0])


def test_trains_with_the_unrolled_distillation_loss():
    drafter, _ = make_drafter(torch.tensor([0, 2, 3, 5, 8, 11]))
    ids = torch.randint(0, V, (2, 9))
    loss, stats = unrolled_distill_loss(drafter, torch.randn(2, 9, 3 * H), ids, torch.randn(2, 9, V),
                                        torch.ones(2, 9), num_steps=3)
    loss.backward()
    assert torch.isfinite(loss) and len(stats.loss_per_step) == 3
    assert drafter.midlayer.self_attn.q_proj.weight.grad is not None


def test_trains_after_drafting_under_inference_mode():
    drafter, _ = make_drafter()
    ids, features = torch.randint(0, V, (1, 4)), torch.randn(1, 4, 3 * H)
    with torch.inference_mode():
        drafter(ids, features, torch.arange(4)[None] + 40)
    logits, _ = drafter(ids, features)
    logits.sum().backward()
    assert drafter.midlayer.self_attn.q_proj.weight.grad is not None
