"""Pipeline parallelism (tp_attention.pipeline): the split, the stage's weights, and one schedule step on real
gloo processes against one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tp_attention.grad_norm import grad_norm
from tp_attention.model import GPT
from tp_attention.pipeline import (
    VIRTUAL,
    build_schedule,
    counted_elsewhere,
    rank_part,
    rank_stages,
    split_model,
    stage_layers,
    stage_views,
    sync_tied_embeddings,
    tied_copies_equal,
)
from tp_attention.testing import assert_close, run_processes

CFG = dict(vocab_size=61, max_seq_len=16, emb_size=32, num_heads=4, head_size=8, num_layers=4, dropout=0.0)


def test_layers_split_evenly_or_as_given():
    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(5, 2, [3, 2]) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match=r"num_layers = 5 must be divisible by pp = 2 \(or give each stage"):
        stage_layers(5, 2)
    for layers in ([4], [4, 0], [1, 1], [2.5, 1.5], [1, 1, 2]):
        with pytest.raises(ValueError, match=r"must give each of pp = 2 stages at least one layer, num_layers = 4"):
            stage_layers(4, 2, layers)


def built(pp: int, index: int, seed: int = 0, virtual: int = 1, **options) -> GPT:
    """What pipeline rank `index` of `pp` holds (`virtual` stages; the whole model at pp=1), built on meta and
    initialised as the trainer does."""
    with torch.device("meta"):
        model = GPT(**CFG, **options)
    order = None
    if pp > 1:
        stages = rank_stages(index, pp, virtual, stage_layers(CFG["num_layers"], pp * virtual))
        order = split_model(model, rank_part(stages))
    model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(seed), order)
    return model


@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False, "position": "rope", "norm": "rmsnorm"}])
def test_each_stage_draws_the_weights_one_process_draws(options):
    whole = built(1, 0, **options).state_dict()
    held = set()
    for pp, virtual in ((2, 1), (4, 1), (2, 2)):
        for index in range(pp):
            stage = built(pp, index, virtual=virtual, **options).state_dict()
            assert stage.keys() <= whole.keys()
            assert all(torch.equal(tensor, whole[name]) for name, tensor in stage.items()), (pp, virtual, index)
            held |= stage.keys()
        assert held == whole.keys()
    tied = "tie_embeddings" not in options
    last = built(2, 1, **options).state_dict()
    assert ("_token_embeddings.weight" in last) == tied  # the LM head's table, on the last stage too
    assert ("_lm_head.weight" in last) != tied


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (4, CFG["max_seq_len"] + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def one_step_on_every_stage(rank: int, world: int, schedule: str, sync: bool):
    """One schedule step (4 micro-batches) at pp = world (2 stages per rank for the interleaved schedules),
    then an SGD update: gradients, the global norm, and whether the two tied copies are still equal."""
    virtual = 2 if schedule in VIRTUAL else 1
    model = built(world, rank, virtual=virtual)
    stages = rank_stages(rank, world, virtual, stage_layers(CFG["num_layers"], world * virtual))
    modules = stage_views(model, stages)
    pipe = build_schedule(modules, model, stages, schedule, 4, dist.group.WORLD, torch.device("cpu"))
    x, y = batch()
    losses = []
    pipe.step(*((x,) if model.stage.first else ()), target=y if model.stage.last else None, losses=losses)
    if sync:
        sync_tied_embeddings(model, dist.group.WORLD)
    norm = grad_norm(model, None, dist.group.WORLD, counted_elsewhere(model))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return grads, norm, tied_copies_equal(model, dist.group.WORLD), [float(v.detach()) for v in losses]


def one_process_reference():
    model = built(1, 0)
    x, y = batch()
    losses = [model(xs, ys) for xs, ys in zip(x.chunk(4), y.chunk(4), strict=True)]
    (sum(losses) / 4).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return (
        grads,
        torch.stack([g.pow(2).sum() for g in grads.values()]).sum().sqrt(),
        [float(v.detach()) for v in losses],
    )


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "interleaved_1f1b", "interleaved_zero_bubble"])
def test_a_schedule_step_gives_one_process_gradients_and_norm_and_keeps_tied_copies_equal(schedule):
    """pp=2 on gloo (interleaved: 4 stages, 2 per rank): every stage's gradients are one process's mean over the
    4 micro-batches, the norm over the stages counts the tied table once, and its two copies stay bitwise equal
    because their gradients are summed (without that sum they part at the first update)."""
    grads, norm, losses = one_process_reference()
    results = run_processes(2, one_step_on_every_stage, schedule, True)
    for rank, (stage_grads, stage_norm, equal, _) in enumerate(results):
        for name, grad in stage_grads.items():
            assert_close(grad, grads[name], rtol=1e-5, atol=1e-7, what=f"stage {rank} gradient of {name}")
        assert_close(stage_norm, norm, rtol=1e-5, atol=0, what=f"stage {rank} global norm")
        assert equal, f"stage {rank}: tied copies differ after an update"
    assert_close(torch.tensor(results[1][3]), torch.tensor(losses), rtol=1e-6, atol=0, what="micro-batch losses")
    if schedule == "1f1b":
        unsynced = run_processes(2, one_step_on_every_stage, schedule, False)
        assert not unsynced[0][2] and not unsynced[1][2]  # the check sees copies that part


def test_the_memory_report_of_a_stage_counts_its_layers_and_its_micro_batches_in_flight():
    """Per stage: its parameters (the two stages' add up to the whole model plus the tied table's second copy);
    activations of its own blocks for each micro-batch the schedule keeps (GPipe: all 4; 1F1B: pp - stage),
    the logits on the last stage only."""
    from tp_attention.config import GPTConfig
    from train.reporting.memory import activation_bytes, layout_report, stage_reports

    cfg = GPTConfig.from_mapping(CFG)
    layout = dict(tp=1, micro_batch=2, seq_len=16)
    whole = layout_report(cfg, **layout)
    gpipe = stage_reports(cfg, 2, None, "gpipe", 4, **layout)
    one_f_one_b = stage_reports(cfg, 2, None, "1f1b", 4, **layout)
    table = CFG["vocab_size"] * CFG["emb_size"] * 4
    assert sum(r["parameters"] for r in gpipe) == whole["parameters"] + table
    blocks = activation_bytes(cfg, 2, 16, 1, layers=2, logits=False)
    assert [r["activations"] for r in gpipe] == [4 * blocks, 4 * activation_bytes(cfg, 2, 16, 1, layers=2)]
    assert [r["activations"] for r in one_f_one_b] == [2 * blocks, activation_bytes(cfg, 2, 16, 1, layers=2)]


def test_an_interleaved_rank_holds_its_stages_blocks_and_each_view_one_stage():
    """pp=2 x 2 virtual stages of 4 layers: rank 0 holds stages 0 and 2 (blocks 0, 2), rank 1 stages 1 and 3;
    each view has its own stage's blocks (and the embedding on stage 0, the head on stage 3) and shares the
    rank model's parameters."""
    for rank, held in ((0, [0, 2]), (1, [1, 3])):
        model = built(2, rank, virtual=2)
        stages = rank_stages(rank, 2, 2, stage_layers(4, 4))
        assert [s.index for s in stages] == held and list(model._decoders.keys()) == [str(i) for i in held]
        for stage, view in zip(stages, stage_views(model, stages), strict=True):
            assert list(view._decoders.keys()) == [str(stage.index)]
            assert (view._token_embeddings is not None) == (stage.index in (0, 3))  # tied: the head's table
            assert (view._norm is not None) == (stage.index == 3)
            mine = {id(p) for p in model.parameters()}
            assert all(id(p) in mine for p in view.parameters())


def test_the_memory_report_of_an_interleaved_rank_counts_its_stages_blocks():
    """pp=2 x 2 virtual stages: each rank keeps two stages' blocks (the whole model's 4 between them) and holds
    about `(v - 1) pp + 2 (pp - 1 - rank) + 1` stage micro-batches in flight (torch's warm-up): 5 and 3 of 8."""
    from tp_attention.config import GPTConfig
    from train.reporting.memory import activation_bytes, stage_reports

    cfg = GPTConfig.from_mapping(CFG)
    reports = stage_reports(cfg, 2, None, "interleaved_1f1b", 4, virtual=2, tp=1, micro_batch=2, seq_len=16)
    blocks = activation_bytes(cfg, 2, 16, 1, layers=2, logits=False)
    assert reports[0]["activations"] == int(5 / 2 * blocks)
    assert reports[1]["activations"] == int(3 / 2 * activation_bytes(cfg, 2, 16, 1, layers=2))


@pytest.mark.parametrize("source", ["export", "hugging_face"])
def test_a_stage_loads_its_part_of_a_whole_models_weights(tmp_path, source):
    """`model.init_from` at pp > 1: each stage reads its own tensors of an export or a Hugging Face directory,
    the other stages' expected there (`whole`) rather than refused as not belonging to the model."""
    from tp_attention.hf import load_weights
    from tp_attention.pipeline import Stage

    whole = built(1, 0)
    path = whole.save(tmp_path / "ours") if source == "export" else whole.save_pretrained(tmp_path / "hf")
    names, expected = list(whole.state_dict()), whole.state_dict()
    for index in range(2):
        with torch.device("meta"):
            stage = GPT(**CFG)
        split_model(stage, Stage(index, 2, stage_layers(CFG["num_layers"], 2)[index]))
        load_weights(stage, path, whole=names)
        assert all(torch.equal(tensor, expected[name]) for name, tensor in stage.state_dict().items())
    with pytest.raises(ValueError, match="not used by"):
        load_weights(stage, path)  # without `whole`: the first stage's tensors do not belong to this one
