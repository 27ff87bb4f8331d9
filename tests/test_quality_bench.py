"""bench/quality.py end to end on the tiny budget: its JSON line, and resuming an interrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model import checkpoints

ROOT = Path(__file__).resolve().parents[1]


def quality(data_dir: Path, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "bench/quality.py", "--budget", "tiny", "--data-dir", str(data_dir),
                          "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    fresh = quality(tmp_path / "a", tmp_path / "a" / "out")
    assert set(fresh["results"]) == {"maml", "fomaml", "reptile", "metaicl", "base"}
    assert {"maml/icl-metaicl/icl", "maml/adapted-metaicl/adapted (gold_prob)",
            "reptile/adapted-fomaml/adapted"} <= set(fresh["margins"])
    for r in fresh["results"].values():
        assert 0 <= r["icl"] <= 100 and 0 <= r["adapted_gold_prob"] <= 100

    # "interrupted" after 3 of the 6 outer steps; the same command again picks every method up there
    quality(tmp_path / "b", tmp_path / "b" / "out", "--steps", "3")
    resumed = quality(tmp_path / "b", tmp_path / "b" / "out")
    assert resumed["results"] == fresh["results"] and resumed["margins"] == fresh["margins"]
    for method in ("maml", "fomaml", "reptile", "metaicl"):
        runs = [m for m in checkpoints.list_checkpoints(tmp_path / "b") if m["method"] == method]
        assert [m["step"] for m in runs] == [3, 6] and runs[1]["parent"] == runs[0]["id"]
        a = checkpoints.load(tmp_path / "a", [m for m in checkpoints.list_checkpoints(tmp_path / "a")
                                              if m["method"] == method][0]["id"])[0]
        b = checkpoints.load(tmp_path / "b", runs[1]["id"])[0]
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-exact

    # a finished run, run again, trains and scores nothing more
    again = quality(tmp_path / "b", tmp_path / "b" / "out")
    assert again["results"] == fresh["results"]
    assert len(checkpoints.list_checkpoints(tmp_path / "b")) == 8


def test_the_adapt_quality_peer_scores_as_its_peft_model_does():
    """bench/adapt_quality.py scores the PEFT peer by merging its adapter into the weights our
    scorer reads: the logits must be PeftModel's, even where our own LoRA sits on fewer layers."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT))
    from bench.adapt_quality import PEER, merged
    from helpers import tiny_lm
    from model.lm import LoraSpec
    from model.tiny import tiny_model

    ours = tiny_lm(lora=LoraSpec(layers=(-1,)))  # LoRA on the top layer only
    peer = get_peft_model(tiny_model(), LoraConfig(r=PEER["r"], lora_alpha=PEER["alpha"],
                                                   target_modules=list(PEER["targets"]), task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for n, p in peer.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)  # a trained adapter: B no longer zero
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = peer(input_ids=ids).logits
        got = ours(merged(ours, peer), input_ids=ids).logits
        plain = ours(None, input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the outputs
    assert torch.allclose(got, want, atol=1e-5)
