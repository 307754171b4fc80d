"""`make demo`: real emoji, a tiny CLIP trained on CPU, held-out style and held-out concepts.

1. `vlp-data emoji` fetches the Google and the Twitter drawings of the same ~1.9k emoji (npm, cached) and splits the
   emoji *concepts* 80/20 by a hash of their code points, identically for both styles.
2. `vlp fit --config experiments/clip/emoji_heldout_tiny.yaml` trains on the Google drawings of the seen 80%.
3. `vlp validate` with the same recipe evaluates on the Twitter drawings (a style never trained on): retrieval
   R@1/5/10 and zero-shot top-1 over the 10 categories and 99 subcategories, for seen and for unseen concepts.
4. One table, each number next to chance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data_modules.builder import main as vlp_data
from vlp_lightning.cli import VLPCLI

RECIPE = "experiments/clip/emoji_heldout_tiny.yaml"
SPLIT = "seen=0.8,unseen=0.2"


def build_shards(data_dir: Path) -> dict[str, dict]:
    manifests = {}
    for style in ("google", "twitter"):
        out = data_dir / f"emoji-{style}"
        code = vlp_data(["emoji", str(out), "--style", style, "--split", SPLIT, "--seed", "0"])
        if code:
            raise SystemExit(code)
        manifests[style] = json.loads((out / "manifest.json").read_text())
    return manifests


def chance_table(metrics: dict[str, float], manifest: dict) -> str:
    """Rows: metric; columns: seen concepts, unseen concepts, chance for each."""
    counts = manifest["splits"]
    num_categories = len(manifest["classnames"]["cls"])
    num_subcategories = len(manifest["classnames"]["subcategory_id"])
    rows = []
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        for k in (1, 5, 10):
            rows.append((f"retrieval {label} R@{k}", f"retrieval/{{split}}/{direction}_R@{k}",
                         lambda split, k=k: k / counts[split]))
    rows.append((f"zero-shot category top-1 ({num_categories} classes)", "zeroshot/{split}_category/top1",
                 lambda split: 1 / num_categories))
    rows.append((f"zero-shot subcategory top-1 ({num_subcategories} classes)", "zeroshot/{split}_subcategory/top1",
                 lambda split: 1 / num_subcategories))
    header = (f"{'Twitter-style drawings (never trained on)':46s} {'seen concepts':>15s} {'chance':>8s}"
              f" {'unseen concepts':>16s} {'chance':>8s}")
    lines = [header, f"{'':46s} {'n=' + str(counts['seen']):>15s} {'':8s} {'n=' + str(counts['unseen']):>16s}",
             "-" * len(header)]
    for title, key, chance in rows:
        seen = metrics.get(key.format(split="seen"), float("nan"))
        unseen = metrics.get(key.format(split="unseen"), float("nan"))
        lines.append(f"{title:46s} {seen:15.3f} {chance('seen'):8.3f} {unseen:16.3f} {chance('unseen'):8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the emoji shards go")
    parser.add_argument("--max-time", default="00:00:09:00", help="training time limit (DD:HH:MM:SS)")
    parser.add_argument("--max-epochs", type=int, default=40, help="training epochs (the time limit may stop earlier)")
    options = parser.parse_args(argv)

    started = time.time()
    manifests = build_shards(options.data_dir)
    overrides = ["--trainer.max_time", options.max_time, "--trainer.max_epochs", str(options.max_epochs)]
    fit = VLPCLI(args=["fit", "--config", RECIPE, *overrides])
    trained = time.time()
    checkpoint = fit.trainer.checkpoint_callback.last_model_path
    validate = VLPCLI(args=["validate", "--config", RECIPE, "--ckpt_path", checkpoint])
    metrics = {name: float(value) for name, value in validate.trainer.callback_metrics.items()}
    print()
    print(chance_table(metrics, manifests["twitter"]))
    print(f"\ntrained {fit.trainer.global_step} steps in {trained - started:.0f} s (incl. data); total "
          f"{time.time() - started:.0f} s; TensorBoard: tensorboard --logdir runs (runs/clip/emoji_heldout_tiny)")


if __name__ == "__main__":
    main()
