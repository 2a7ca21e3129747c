"""Each benchmark script runs end to end on a tiny model / a few images and prints one JSON object
with the keys the README documents (no timing assertions: the numbers depend on the machine)."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = ["--model", "LVViT", "--img-size", "32", "--num-classes", "7", "--model-arg", "embed_dim=32",
              "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--model-arg", "stem=patch16"]


def run_script(name, *args, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", name), *args, "--json-out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert json.loads(out.read_text()) == result
    return result


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_train_tiny(tmp_path):
    result = run_script("bench_train.py", *TINY_MODEL, "--batch-size", "4", "--warmup", "1", "--repeats", "2",
                        "--map-size", "4", tmp_path=tmp_path)
    assert result["benchmark"] == "train" and result["batch_size"] == 4 and result["img_size"] == 32
    assert result["num_classes"] == 7 and result["timing"]["repeats"] == 2
    for key in ("images_per_s", "step_ms", "peak_rss_mb", "loss"):
        assert positive(result[key]), key
    assert result["images_per_s"] == pytest.approx(4 / result["timing"]["median_s"])
    assert result["timing"]["min_s"] <= result["timing"]["median_s"] <= result["timing"]["max_s"]
    # patch16 stem (32*3*16*16 + 32), cls + pos (1+4)*32+32, 2 blocks, norm, two heads
    block = 2 * 32 + 32 * 96 + 32 * 32 + 32 + 2 * 32 + 32 * 96 + 96 + 96 * 32 + 32
    assert result["params"] == 3 * 256 * 32 + 32 + 32 + 5 * 32 + 2 * block + 64 + 2 * (32 * 7 + 7)
    assert result["env"]["omp_num_threads"] == "1"   # the caller's setting is kept


def test_bench_train_from_config(tmp_path):
    config = os.path.join(REPO, "configs", "lvvit", "lvvit_tiny.yaml")
    # the config's loss, optimizer and amp sections with a tiny model in place of lvvit_t
    result = run_script("bench_train.py", "-c", config, *TINY_MODEL, "--num-classes", "5", "--batch-size", "2",
                        "--warmup", "1", "--repeats", "1", tmp_path=tmp_path)
    assert result["model"] == "LVViT" and result["num_classes"] == 5 and positive(result["images_per_s"])
    assert result["amp"] == "AMP off (float32)"


def test_bench_train_config_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_train.py"), "--model", "lvvit_t",
                           "--model-arg", "depth=2"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "depth" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_eval_tiny(tmp_path):
    result = run_script("bench_eval.py", *TINY_MODEL, "--batch-size", "3", "--warmup", "1", "--repeats", "2",
                        tmp_path=tmp_path)
    assert result["benchmark"] == "eval" and set(result["modes"]) == {"eager", "jit_load", "predictor"}
    for mode in result["modes"].values():
        assert positive(mode["images_per_s"]) and positive(mode["batch_ms"])
    assert positive(result["modes"]["jit_load"]["saved_mb"])
    assert set(result["max_abs_diff_vs_eager"]) == {"jit_load", "predictor"}
    assert all(diff < 1e-4 for diff in result["max_abs_diff_vs_eager"].values())


def test_bench_data_tiny(tmp_path):
    result = run_script("bench_data.py", "--img-size", "32", "--num-images", "6", "--passes", "1",
                        "--batch-size", "4", "--map-size", "4", tmp_path=tmp_path)
    assert result["benchmark"] == "data" and result["label_maps"] is True and result["grid"] == [2, 2]
    assert positive(result["samples_per_s"]) and positive(result["samples_per_cpu_s"])
    stages = result["stage_ms_per_sample"]
    for stage in ("decode", "label_map_load", "label_map_warp", "RandAugment", "RandomResizedCrop", "to_uint8",
                  "targets", "collate"):
        assert stage in stages and stages[stage] >= 0, stage
    assert "Normalize" not in stages and positive(result["finish_ms_per_batch"])   # on the trainer's device
    # image uint8 [3, 32, 32] per sample, one erasing box, plus compact targets for 4 tokens
    by_key = result["bytes_per_sample_by_key"]
    assert by_key["image"] == 3 * 32 * 32 and by_key["erase_boxes"] == 4 * 4
    assert by_key["token_bg"] == 4 * 4 and by_key["token_probs"] % (4 * 4) == 0
    assert result["bytes_per_sample"] == pytest.approx(sum(by_key.values()))


def test_bench_decode_tiny(tmp_path):
    result = run_script("bench_decode.py", "--num-images", "3", "--passes", "1", "--target", "250", tmp_path=tmp_path)
    assert result["benchmark"] == "decode" and result["num_images"] == 3 and result["budget_ms_per_sample"] == 4.0
    rows = result["decoders"]
    assert {"passl", "pil", "opencv_1/8"} <= set(rows)
    for row in rows.values():
        assert positive(row["cpu_ms_per_image"]) and row["budget_share"] == pytest.approx(row["cpu_ms_per_image"] / 4)
    # the pipeline's decoder gives PIL's pixels; the 1/8-scale row is not compared (another size)
    assert rows["passl"]["max_abs_diff_vs_pil"] == 0 and "max_abs_diff_vs_pil" not in rows["opencv_1/8"]


@pytest.mark.slow
def test_bench_startup_tiny(tmp_path):
    root = tmp_path / "tree"
    args = ("--num-images", "40", "--root", str(root), "--workers", "1", "--batch-size", "4")
    built = run_script("bench_startup.py", *args, "--stores", "npy,packed", "--starts", "first-warm", "--no-memory-pass",
                       tmp_path=tmp_path)
    assert [(r["store"], r["maps_read"]) for r in built["results"]] == [("npy", 40), ("packed", 40)]
    # maps written just before a check are re-read by the next start (their mtime may not have settled);
    # dated back, they are trusted once checked again
    for path in root.rglob("*"):
        os.utime(path, (1_600_000_000, 1_600_000_000))
    result = run_script("bench_startup.py", *args, "--stores", "npy,packed", "--starts", "second-warm,first-warm",
                        tmp_path=tmp_path)
    assert result["benchmark"] == "startup" and result["num_images"] == 40
    assert [(r["store"], r["start"], r["maps_read"]) for r in result["results"]] == [
        ("npy", "second-warm", 40), ("npy", "first-warm", 40), ("packed", "second-warm", 40), ("packed", "first-warm", 40)]
    for run in result["results"]:
        assert positive(run["dataset_ready_s"]) and run["first_batch_s"] >= run["dataset_ready_s"]
        if run["start"] == "second-warm":          # the memory pass follows the warm later start
            assert len(run["workers_after_pass"]) == 1 and positive(run["workers_after_pass"][0]["uss_mb"])
            assert run["pass_batches"] >= 16
        else:
            assert "workers_after_pass" not in run
    # a later start reads no map, and the packed store's first start left the npy store's index alone
    again = run_script("bench_startup.py", *args, "--stores", "npy,packed", "--starts", "second-warm",
                       "--no-memory-pass", tmp_path=tmp_path)
    assert [(r["store"], r["maps_read"]) for r in again["results"]] == [("npy", 0), ("packed", 0)]


def test_bench_cpu_fast_tiny(tmp_path):
    result = run_script("bench_cpu_fast.py", *TINY_MODEL, "--batch-size", "2", "--rounds", "2", "--repeats", "1",
                        tmp_path=tmp_path)
    assert result["benchmark"] == "cpu_fast" and result["env"]["device"] == "cpu"
    rows = result["rows"]
    assert {"normalize", "reverse_batch_stem", "reverse_batch_aux", "dense_loss", "train_step"} <= set(rows)
    assert any(name.startswith("linear_32x96") for name in rows)
    for row in rows.values():
        assert positive(row["plain"]["cpu_ms"]) and positive(row["fast"]["wall_ms"]) and row["plain"]["calls"] >= 2
    dense = rows["dense_loss"]
    assert dense["plain"]["loss"] == pytest.approx(dense["fast"]["loss"], rel=1e-5) and dense["max_abs_grad_diff"] < 1e-5


def test_bench_ema_tiny(tmp_path):
    result = run_script("bench_ema.py", *TINY_MODEL, "--rounds", "2", "--repeats", "2", tmp_path=tmp_path)
    assert result["benchmark"] == "ema" and result["tensors"] > 0
    for version in ("loop", "flat"):
        assert positive(result["rows"][version]["cpu_ms"]) and result["rows"][version]["updates"] == 4
    assert result["rows"]["flat"]["kernels"] <= 4 < result["tensors"] <= result["rows"]["loop"]["kernels"]
