"""Files written before `Decoder._heads` became `Decoder._attention` still load, at any tp.

`tests/data/before_attention_rename/` was written by the code of commit 37a490b (the last with the old
name): a run directory with one DCP checkpoint (model and AdamW state) and an export, and the logits and
one AdamW moment of the model they hold.
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh

from tests.helpers import ROOT
from tp_attention import full_state_dict, load_full_state_dict
from tp_attention.convert import to_nanogpt
from tp_attention.model import GPT
from tp_attention.testing import run_threaded
from train.checkpoints import checkpoint
from train.checkpoints.dcp_metadata import load_metadata
from train.checkpoints.sources import load_source

OLD = ROOT / "tests" / "data" / "before_attention_rename"
EXPECTED = json.loads((OLD / "expected.json").read_text())
IDX = torch.tensor(EXPECTED["idx"])
LOGITS = torch.tensor(EXPECTED["logits"])
CHECKPOINT = OLD / "checkpoints" / "step_00000001"


def test_the_files_hold_the_old_names():
    exported = load_file(OLD / "export" / "model.safetensors")
    saved = load_metadata(CHECKPOINT / ".metadata").state_dict_metadata
    assert "_decoders.0._heads._q.weight" in exported and "model._decoders.0._heads._q.weight" in saved
    assert "optim.exp_avg._decoders.0._heads._q.weight" in saved
    assert not any("_attention" in name for name in [*exported, *saved])
    assert checkpoint.verify(CHECKPOINT) is None


def logits_at_tp(rank: int, world: int, source: str) -> torch.Tensor:
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    model = load_source(OLD / source, mesh.get_group("tp"), mesh).model
    with torch.no_grad():
        return model.eval()(IDX)


def test_an_old_export_and_an_old_checkpoint_load_at_tp1_and_tp2():
    for source in ("export", "checkpoints/step_00000001"):
        loaded = load_source(OLD / source).model.eval()
        assert not hasattr(loaded._decoders[0], "_heads")  # one name, one meaning
        with torch.no_grad():
            assert torch.equal(loaded(IDX), LOGITS), source
        for logits in run_threaded(2, logits_at_tp, source):
            torch.testing.assert_close(logits, LOGITS, rtol=1e-5, atol=1e-6)


def test_an_old_checkpoint_resumes_model_and_adamw_state_and_saves_new_names(tmp_path):
    model = GPT.load(OLD / "export")
    fresh = GPT.from_config(model.config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert checkpoint.load(CHECKPOINT, fresh, fresh_optimizer, None)["step"] == 1
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in fresh.state_dict().items())
    moment = fresh_optimizer.state[fresh._decoders[0]._attention._q.weight]["exp_avg"]
    assert torch.equal(moment, torch.tensor(EXPECTED["exp_avg_q"]))
    shutil.copytree(OLD / "checkpoints", tmp_path / "checkpoints")
    saved = checkpoint.Checkpointer(tmp_path, None, keep=2).save(2, fresh, fresh_optimizer, {"optimizer_steps": 1})
    names = load_metadata(saved / ".metadata").state_dict_metadata
    assert "model._decoders.0._attention._q.weight" in names and not any("_heads" in n for n in names)


def test_an_old_state_dict_loads_through_torch_and_through_the_full_state_dict_loader():
    old = load_file(OLD / "export" / "model.safetensors")
    model = GPT.from_config(GPT.load(OLD / "export").config)
    model.load_state_dict(old)  # strict: every old key found its parameter
    with torch.no_grad():
        assert torch.equal(model.eval()(IDX), LOGITS)
    from_old, from_new = to_nanogpt(old, model.config), to_nanogpt(model.state_dict(), model.config)
    assert from_old.keys() == from_new.keys() and all(torch.equal(from_old[k], from_new[k]) for k in from_new)

    def sharded(rank: int, world: int) -> dict[str, torch.Tensor]:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        shard = GPT.from_config(model.config, tp_group=mesh.get_group("tp"))
        load_full_state_dict(shard, old)
        return full_state_dict(shard)

    for full in run_threaded(2, sharded):
        assert all(torch.equal(full[k], t) for k, t in model.state_dict().items())
