"""train/checkpoint_save.py: rotation by step number, and which runs stage their checkpoints.
(The kill -9 loop over real checkpoint saves is tests/reliability/test_saves.py.)"""

from velotune.train.checkpoint_save import rotate, stages_atomically


def test_rotate_keeps_the_newest_by_step_number(tmp_path):
    for n in (2, 10, 9, 1):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-best").mkdir()  # not a step: never touched
    (tmp_path / "checkpoint-3.txt").write_text("")  # not a folder
    removed = rotate(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-3.txt",
        "checkpoint-9",
        "checkpoint-best",
    ]
    assert rotate(tmp_path, None) == [] and rotate(tmp_path, 5) == []


def test_stock_in_place_save_where_transformers_needs_the_final_path(tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args())
    assert stages_atomically(trainer)
    for kw in (
        dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps"),
        dict(metric_for_best_model="loss"),
        dict(push_to_hub=True, hub_model_id="x/y"),
    ):
        trainer.args = args(**kw)
        assert not stages_atomically(trainer), kw
