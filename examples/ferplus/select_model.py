"""Choose the FER+ emotion model on validation data only, then (once) measure it on test data.

Validation sets (choices are made here):
  * FER+ PublicTest votes (``ferplus.parquet``, fer_usage=PublicTest): accuracy on the majority,
    macro-F1, neutral recall, NLL/ECE against the votes;
  * FER2013 PublicTest with the original labels (``fer2013_test.parquet``, fer_usage=PublicTest);
  * posed colour photos (``taiwanese_posed.parquet``) through detect + align (the pipeline's code).
Test sets (``--test``, run once for the chosen candidate): FER+ PrivateTest, FER2013 test.

Every candidate is a mix of checkpoints' two heads: p = mean over members of
(a * P(vote head) + (1 - a) * P(FER2013 head)). Head probabilities are computed once per
member and set, then mixed in numpy, so the sweep is cheap.

    python examples/ferplus/select_model.py runs/fp_vgg32/best.pt runs/fp_vgg48/best.pt --out runs/select.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from fer_batch.train.data import load_dataset
from fer_batch.train.engine import load_checkpoint, model_from_checkpoint, predict
from fer_batch.train.metrics import probs_metrics
from fer_batch.types import EMOTIONS

SHARED = Path(os.environ.get("FER_BATCH_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"
log = logging.getLogger("select")


class _CropRecorder:
    """Stands in for a classifier in ``evaluate._predict_detect``: keeps the aligned crops it is given."""

    def __init__(self, spec):
        from fer_batch.preprocess import align_crop

        self.spec, self._align, self.kept = spec, align_crop, []

    def crops(self, image_bgr, kps):
        return self._align(image_bgr, kps, self.spec)

    def __call__(self, crops):
        self.kept.append(np.asarray(crops))
        return np.full((len(crops), len(EMOTIONS)), 1.0 / len(EMOTIONS), np.float32)


def posed_crops(spec, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crops of detected faces, their labels, mask of images with a face) for the posed set."""
    import cv2

    from fer_batch.train.evaluate import _predict_detect

    ds = load_dataset(SHARED / "posed_taiwanese/taiwanese_posed.parquet", 0, "bgr")
    rec = _CropRecorder(spec)
    probs = _predict_detect(rec, ds, threads, 320)
    have = ~np.isnan(probs).any(1)
    crops = rec.kept[0] if rec.kept else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    gray = np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2GRAY)[..., None] for c in crops]) if spec.colour == "gray" else crops
    return gray, ds.labels, have


def head_probs(ckpt: str, images: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    ck = load_checkpoint(ckpt)
    out = []
    for a in (1.0, 0.0):
        model, spec, _ = model_from_checkpoint(ck, head_mix=a)
        out.append(predict(model, images, spec, tta=tta))
    return out[0], out[1]


def summarise(p: np.ndarray, labels: np.ndarray, targets: np.ndarray | None = None) -> dict:
    lab = labels >= 0  # vote metrics here on the labelled rows only
    m = probs_metrics(p[lab], labels[lab], None if targets is None else targets[lab])
    r = {"acc": round(m["accuracy"], 4), "f1": round(m["macro_f1"], 4),
         "recall": {e: round(v["recall"], 3) for e, v in m["per_class"].items()}}
    if targets is not None:
        r.update(nll=round(m["nll"], 4), ece=round(m["ece"], 4))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpts", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mixes", default="1.0,0.9,0.8,0.7,0.6,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--template-from", default="vgg_fer2013", help="Card whose alignment template the posed crops use.")
    ap.add_argument("--blend", default="", help="Also blend each candidate with this registered model's probabilities ...")
    ap.add_argument("--blend-weights", default="0.2,0.3,0.4")
    ap.add_argument("--tta", default="off", choices=("off", "on", "both"),
                    help="Horizontal-flip test-time augmentation of the checkpoints: off, on, or both as separate candidates.")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(a.threads)
    from fer_batch.models import registry
    from fer_batch.preprocess import PreprocessSpec

    # crops as the exported model will make them: the shipped emotion cards' measured FER2013 template
    spec = PreprocessSpec.from_card(registry().get(a.template_from))
    t0 = time.time()
    fp = load_dataset(SHARED / "ferplus/ferplus.parquet", 48, "gray", where="fer_usage=PublicTest")
    f13 = load_dataset(SHARED / "fer2013/fer2013_test.parquet", 48, "gray", where="fer_usage=PublicTest")
    cache = a.out.with_name("posed_crops.npz")
    if cache.is_file():
        z = np.load(cache)
        posed, posed_labels, posed_have = z["crops"], z["labels"], z["have"]
    else:
        posed, posed_labels, posed_have = posed_crops(spec, a.threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, crops=posed, labels=posed_labels, have=posed_have)
    log.info("validation data ready in %.0f s: FER+ %d, FER2013 %d, posed %d (%d with a face)", time.time() - t0, len(fp), len(f13),
             len(posed_labels), int(posed_have.sum()))
    ttas = {"off": [False], "on": [True], "both": [False, True]}[a.tta]
    heads: dict = {}
    for tta in ttas:
        for c in a.ckpts:
            heads[tta, c] = {name: head_probs(c, imgs, tta) for name, imgs in (("ferplus", fp.images), ("fer2013", f13.images), ("posed", posed))}
            log.info("%s (tta %s): head probabilities done", c, tta)
    blend = {}
    if a.blend:
        from fer_batch.classify import EmotionClassifier
        from fer_batch.config import ClassifyConfig

        clf = EmotionClassifier(ClassifyConfig(model=a.blend, batch_size=256, device="cpu", tta=False), threads=a.threads)
        blend = {name: clf(imgs) for name, imgs in (("ferplus", fp.images), ("fer2013", f13.images), ("posed", posed))}
    rows = []
    mixes = [float(x) for x in a.mixes.split(",")]
    subsets = [list(s) for k in range(1, len(a.ckpts) + 1) for s in itertools.combinations(a.ckpts, k)]
    weights = [0.0] + ([float(x) for x in a.blend_weights.split(",")] if blend else [])
    for tta, members, mix, bw in itertools.product(ttas, subsets, mixes, weights):
        def p(name):
            q = np.mean([mix * heads[tta, c][name][0] + (1 - mix) * heads[tta, c][name][1] for c in members], 0)
            return (1 - bw) * q + bw * blend[name] if bw else q
        pp = np.full((len(posed_labels), len(EMOTIONS)), np.nan, np.float32)
        pp[posed_have] = p("posed")
        row = {"members": [str(Path(c).parent.name) + ("" if Path(c).name == "best.pt" else ":" + Path(c).stem) for c in members],
               "tta": tta, "head_mix": mix, "blend": a.blend if bw else None, "blend_weight": bw,
               "ferplus_val": summarise(p("ferplus"), fp.labels, fp.targets),
               "fer2013_val": summarise(p("fer2013"), f13.labels),
               "posed_val": summarise(pp[posed_have], posed_labels[posed_have])}
        row["posed_val"]["acc_all"] = round(float((np.where(posed_have, np.nan_to_num(pp).argmax(1), -1) == posed_labels).mean()), 4)
        rows.append(row)
        log.info("%s tta %s mix %.2f blend %.2f: FER+ %.4f/%.4f neutral %.3f nll %.3f | FER2013 %.4f | posed %.4f", row["members"], tta, mix, bw,
                 row["ferplus_val"]["acc"], row["ferplus_val"]["f1"], row["ferplus_val"]["recall"]["neutral"], row["ferplus_val"]["nll"],
                 row["fer2013_val"]["acc"], row["posed_val"]["acc_all"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
