"""Host (Python) cost of recompute="mlp"'s MLP on the CPU: lora/recomputed_mlp.py against the torch
checkpoint around lora_mlp it replaced, on a tiny 8-layer Llama where the step is all overhead
(interleaved, 3 rounds each; ms per forward + backward).

    PYTHONPATH=src python bench/host_ab_recomputed_mlp.py
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from mini import mini_model, fixed_batch
from velotune import FastLanguageModel
from velotune.models import prepare_model
import velotune.models.mlp as mlp
torch.set_num_threads(1)
def build():
    model = mini_model("llama", num_hidden_layers=8, dtype=torch.float32, hidden_size=32, intermediate_size=64)
    prepare_model(model, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="unsloth",
                                             random_state=5, recompute="mlp")
    model.train(); return model
batch = fixed_batch(1, 8)
res = {}
for name, on in (("checkpoint", False), ("function", True)) * 3:
    mlp.RECOMPUTED_MLP = on
    model = build()
    def step():
        loss = model(**batch).loss; loss.backward(); model.zero_grad(set_to_none=True)
    for _ in range(5): step()
    t = time.perf_counter()
    for _ in range(30): step()
    res.setdefault(name, []).append((time.perf_counter() - t) / 30 * 1000)
print({k: [round(x, 2) for x in v] for k, v in res.items()})
