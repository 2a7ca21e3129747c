"""The example demo end to end on a shortened schedule: dataset, annotator, label maps, LV-ViT with and
without token labeling, table, results.json. The token-labeling model must clear a floor well above
chance (10 classes: 10%); see FLOOR for how it was chosen."""
import json
import os

import numpy as np
import pytest

# Short schedule: 60 train / 20 val scenes per class, annotator 4 epochs, LV-ViT 6 epochs.
SHORT = dict(train_per_class=60, val_per_class=20, annotator_epochs=4, lvvit_epochs=6)
# PROVISIONAL: not yet measured. The digit-scene generator is still being tuned (issue 6 part 1) and the
# floor must be chosen from several runs on its final version, well below the lowest and well above
# chance (10%); until then the test is skipped rather than asserting an unmeasured number.
FLOOR = 20.0


@pytest.mark.slow
@pytest.mark.skip(reason="floor not yet measured on the final digit_scenes generator; see FLOOR")
def test_demo_runs_end_to_end_and_token_labeling_clears_the_floor(tmp_path):
    from passl.demo import run_demo
    lines = []
    summary = run_demo(str(tmp_path / "digits"), str(tmp_path / "demo"), progress=False, log=lines.append, **SHORT)
    tl, cls = summary["rows"]
    assert tl["method"].endswith("token labeling") and cls["method"].endswith("class token only")
    # the label maps cover every training image: [2, 5, 8, 10] float16 for 80x64 scenes (stride-8 annotator)
    assert summary["labels"]["written"] == 600 and summary["labels"]["map_shape"] == [2, 5, 8, 10]
    label_map = np.load(tmp_path / "demo" / "labels" / "3_three" / "3_three_0000.npy")
    assert label_map.dtype == np.float16 and label_map.shape == (2, 5, 8, 10)
    assert set(np.unique(label_map[1])) <= set(range(10))
    for row in summary["rows"]:
        assert os.path.isfile(os.path.join(row["output_dir"], "eval.json"))
        assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    assert tl["top1"] >= FLOOR, f"token labeling reached only {tl['top1']:.1f}% top-1 (floor {FLOOR}%)"
    with open(tmp_path / "demo" / "results.json") as f:
        assert json.load(f)["rows"][0]["top1"] == tl["top1"]
    table = "\n".join(lines)
    assert "val top-1" in table and "LV-ViT + token labeling" in table and "demo done in" in lines[-1]
