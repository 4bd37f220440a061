"""
The recipe both loops run, held to the same rules: argument checks, batch seeds, unreadable data, the mean over a
short accumulation window, Sinkhorn's global batch, and no host sync on the hot path but the step's decision.
"""

import pytest

from msn_hf import pretraining as pt
from msn_hf.trainer_msn import MSNTrainingArguments

# --- the same refusals in both loops --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("max_grad_norm", -1.0, ">= 0"),
        ("max_grad_norm", float("nan"), ">= 0"),
        ("schedule_stretch", 0.5, ">= 1"),
        ("learning_rate", -1e-3, ">= 0"),
        ("warmup_start_learning_rate", -1.0, ">= 0"),
        ("final_weight_decay", -0.1, ">= 0"),
        ("max_nonfinite_steps", 0, "a positive number"),
    ],
)
def test_both_loops_refuse_the_same_nonsense_with_the_same_line(tmp_path, flag, value, expected):
    with pytest.raises(ValueError) as accelerate_loop:
        pt.PretrainingArguments(**{flag: value})
    with pytest.raises(ValueError) as trainer:
        MSNTrainingArguments(output_dir=str(tmp_path), **{flag: value})
    message = str(accelerate_loop.value)
    assert message.startswith(f"--{flag} must be {expected}") and message.endswith(f"got {value!r}.")
    assert str(trainer.value) == message and "\n" not in message
    # The command line goes through the same check.
    with pytest.raises(ValueError, match=f"^--{flag} must be"):
        pt.parse_args([f"--{flag}", str(value)])
    assert not any(tmp_path.iterdir())  # refused before anything was created


def test_the_edges_of_the_rules_are_accepted_by_both_loops(tmp_path):
    edges = dict(max_grad_norm=0.0, schedule_stretch=1.0, warmup_start_learning_rate=0.0, final_learning_rate=0.0)
    assert pt.PretrainingArguments(**edges).max_grad_norm == 0.0
    assert MSNTrainingArguments(output_dir=str(tmp_path), **edges).schedule_stretch == 1.0
