"""Classification stage: aligned face crops -> 7 emotion probabilities, with an ONNX model from a card.

The card drives everything: which file (sha256-verified at setup), how crops are made from
landmarks (``preprocess.align_template``), how crops become the tensor (``preprocess``), the
label order of the outputs (mapped onto ``fer_batch.types.EMOTIONS``), and whether flip
test-time augmentation is on by default (``preprocess.tta``; ``ClassifyConfig.tta`` overrides),
and the fitted temperature (``calibration.temperature``) that turns the model's probabilities
into calibrated ones, ``p_i ~ p_i ** (1 / T)`` renormalised (the same as dividing the logits
by T). Everything that classifies (process, evaluate, the Ray workers) goes through here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fer_batch.config import ClassifyConfig
from fer_batch.device import checked_provider, ort_providers, ort_session_options, resolve_device
from fer_batch.errors import ModelError
from fer_batch.models import ModelCard, registry
from fer_batch.preprocess import PreprocessSpec, align_crop, prepare
from fer_batch.types import EMOTIONS

log = logging.getLogger(__name__)


def apply_temperature(p: np.ndarray, t: float) -> np.ndarray:
    """Probabilities (N, K) with their logits divided by ``t`` (> 1 softens, < 1 sharpens)."""
    z = np.log(np.clip(p.astype(np.float64), 1e-12, 1.0)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


class EmotionClassifier:
    """Emotion classifier over an ONNX model registered with a card.

    Args:
        cfg: ``model`` (None/``default``: the registry's default emotion model; a name or a
            path to a card or a model file with a card beside it), ``batch_size`` (larger is
            faster per face, uses more memory), ``device`` (``cpu``, ``cuda[:N]``, ``auto``), ``tta``
            (flip test-time augmentation: about half the speed for a point or so of accuracy;
            None follows the card).
        threads: ONNX Runtime intra-op threads (0 = its default).
        models_dir: the registry directory (None: the default pack).
        calibrated: apply the card's temperature (False only to measure calibration itself).
    """

    def __init__(self, cfg: ClassifyConfig, threads: int = 0, models_dir: str | None = None, calibrated: bool = True):
        self.cfg = cfg
        self.calibrated = bool(calibrated)
        self._temperature = 1.0
        self.threads = int(threads)
        self.models_dir = models_dir
        self.card: ModelCard | None = None
        self.spec: PreprocessSpec | None = None
        self._sess = None
        self._input = ""
        self._order: np.ndarray | None = None
        self._tta = False
        self._info: dict[str, Any] = {}
        self._softmax = False

    def setup(self) -> None:
        if self._sess is not None:
            return
        import onnxruntime as ort

        reg = registry(str(self.models_dir) if self.models_dir else None)
        card = reg.resolve(self.cfg.model, "emotion_classification").verify()
        spec = PreprocessSpec.from_card(card)
        device = resolve_device(self.cfg.device)
        so = ort_session_options(self.threads)
        try:
            sess = ort.InferenceSession(str(card.path), so, providers=ort_providers(device))
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"{card.path}: ONNX Runtime cannot load the emotion model: {e}") from e
        inp = sess.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != spec.channels):
            raise ModelError(f"{card.path}: input {inp.name} has shape {shape}; the card's preprocessing gives (N, {spec.channels}, {spec.input_size}, {spec.input_size})")
        out = sess.get_outputs()[0]
        if out.shape[-1] not in (len(card.labels), None) and not isinstance(out.shape[-1], str):
            raise ModelError(f"{card.path}: output has {out.shape[-1]} classes, the card lists {len(card.labels)} labels")
        self.card, self.spec, self._sess, self._input = card, spec, sess, inp.name
        # card label order -> EMOTIONS order: probs_emotions[:, label_index[j]] = probs_model[:, j]
        self._order = np.asarray(card.label_index(), np.int64)
        self._tta = spec.tta if self.cfg.tta is None else bool(self.cfg.tta)
        self._softmax = str(card.input.get("output", "probs")) == "logits"
        t = float((card.calibration or {}).get("temperature", 1.0)) if self.calibrated else 1.0
        if not (t > 0 and np.isfinite(t)):
            raise ModelError(f"{card.card_path}: calibration.temperature must be a positive number, got {t}")
        self._temperature = t
        self._info = {"name": card.name, "file": str(card.path), "sha256": card.sha256,
                      "provider": checked_provider(sess, self.cfg.device, device, "emotion classifier"), "tta": self._tta, "device": device,
                      "temperature": t}
        log.info("emotion model %s on %s (tta=%s)", card.name, self._info["provider"], self._tta)

    def crops(self, image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """(N, 5, 2) landmarks -> (N, S, S, 3) uint8 BGR crops aligned to the card's template."""
        self.setup()
        return align_crop(image_bgr, kps, self.spec)

    def _run(self, x: np.ndarray) -> np.ndarray:
        p = self._sess.run(None, {self._input: x})[0].astype(np.float32)
        if self._softmax:
            p = np.exp(p - p.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
        return p

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3|1) uint8 crops -> (N, 7) float32 probabilities in ``EMOTIONS`` order."""
        self.setup()
        crops = np.asarray(crops)
        n = len(crops)
        out = np.zeros((n, len(EMOTIONS)), np.float32)
        if n == 0:
            return out
        bs = self.cfg.batch_size
        for i in range(0, n, bs):
            x = prepare(crops[i : i + bs], self.spec)
            p = self._run(x)
            if self._tta:
                p = 0.5 * (p + self._run(np.ascontiguousarray(x[..., ::-1])))
            if self._temperature != 1.0:
                p = apply_temperature(p, self._temperature)
            out[i : i + bs][:, self._order] = p
        return out

    @property
    def info(self) -> dict:
        return dict(self._info)

    def teardown(self) -> None:
        self._sess = None
