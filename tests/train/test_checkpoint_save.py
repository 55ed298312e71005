"""train/checkpoint_save.py: rotation by step number, and which runs stage their checkpoints.
(The kill -9 loop over real checkpoint saves is tests/reliability/test_saves.py.)"""
from types import SimpleNamespace

from velotune.train.checkpoint_save import rotate, stages_atomically


def test_rotate_keeps_the_newest_by_step_number(tmp_path):
    for n in (2, 10, 9, 1):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-best").mkdir()          # not a step: never touched
    (tmp_path / "checkpoint-3.txt").write_text("")  # not a folder
    removed = rotate(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3.txt", "checkpoint-9",
                                                           "checkpoint-best"]
    assert rotate(tmp_path, None) == [] and rotate(tmp_path, 5) == []


def _trainer(**args):
    base = dict(world_size=1, load_best_model_at_end=False, metric_for_best_model=None, push_to_hub=False)
    return SimpleNamespace(args=SimpleNamespace(**{**base, **args}), hp_search_backend=None)


def test_stock_in_place_save_where_transformers_needs_the_final_path():
    assert stages_atomically(_trainer())
    assert not stages_atomically(_trainer(world_size=2))
    assert not stages_atomically(_trainer(load_best_model_at_end=True))
    assert not stages_atomically(_trainer(metric_for_best_model="loss"))
    assert not stages_atomically(_trainer(push_to_hub=True))
