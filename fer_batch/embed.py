"""Face embedding stage: aligned colour chips -> identity embeddings, with an ONNX model from a card.

The default is the ``dlib_face_resnet`` card (dlib's CC0 face-recognition ResNet, converted
by ``fer_batch.convert.dlib_resnet``). As for the emotion classifier, the card drives the
preprocessing: the 5 detected landmarks are mapped onto the card's ``align_template`` by a
similarity transform (``preprocess.align_crop``), the chip is scaled with the card's
mean/std, and the card's ``reid`` section gives the distance thresholds measured for it.

Embeddings are returned L2-normalised, so the cosine similarity is a dot product; the card
records both the raw Euclidean threshold of dlib's convention and the equivalent cosine.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fer_batch.device import checked_provider, ort_providers, ort_session_options, resolve_device
from fer_batch.errors import ModelError
from fer_batch.models import ModelCard, registry
from fer_batch.preprocess import PreprocessSpec, align_crop, prepare

log = logging.getLogger(__name__)

TASK = "face_embedding"


class FaceEmbedder:
    """Identity embeddings of faces given by 5 landmarks.

    Args:
        model: None/``default``: the registry's default ``face_embedding`` card; else a
            registered name or a card path.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        threads: ONNX Runtime intra-op threads (0 = its default).
        models_dir: the registry directory (None: the default pack).
        batch_size: chips per ONNX Runtime call.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", threads: int = 0,
                 models_dir: str | None = None, batch_size: int = 32):
        self.model = model
        self.device = device
        self.threads = int(threads)
        self.models_dir = models_dir
        self.batch_size = int(batch_size)
        self.card: ModelCard | None = None
        self.spec: PreprocessSpec | None = None
        self._sess = None
        self._input = ""
        self._info: dict[str, Any] = {}

    @staticmethod
    def available(models_dir: str | None = None) -> bool:
        """Whether the pack has a default ``face_embedding`` card (its file is checked at setup)."""
        reg = registry(str(models_dir) if models_dir else None)
        return any(c.default for c in reg.cards(TASK))

    def setup(self) -> "FaceEmbedder":
        if self._sess is not None:
            return self
        import onnxruntime as ort

        reg = registry(str(self.models_dir) if self.models_dir else None)
        card = reg.resolve(self.model, TASK).verify()
        spec = PreprocessSpec.from_card(card)
        if spec.template is None:
            raise ModelError(f"{card.card_path}: a face_embedding card needs preprocess.align_template")
        device = resolve_device(self.device)
        try:
            sess = ort.InferenceSession(str(card.path), ort_session_options(self.threads), providers=ort_providers(device))
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"{card.path}: ONNX Runtime cannot load the embedding model: {e}") from e
        inp = sess.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != spec.channels or inp.shape[2] != spec.input_size:
            raise ModelError(f"{card.path}: input {inp.name} has shape {inp.shape}; the card's preprocessing gives "
                             f"(N, {spec.channels}, {spec.input_size}, {spec.input_size})")
        self.card, self.spec, self._sess, self._input = card, spec, sess, inp.name
        self._info = {"name": card.name, "file": str(card.path), "sha256": card.sha256, "device": device,
                      "provider": checked_provider(sess, self.device, device, "face embedder"),
                      "reid_thresh": (card.metrics.get("reid") or {}).get("cosine_threshold")}
        log.info("face embedding model %s on %s", card.name, self._info["provider"])
        return self

    @property
    def reid_thresh(self) -> float:
        """The card's cosine-similarity threshold for "same person" (see the card's ``reid``)."""
        self.setup()
        try:
            return float(self.card.metrics["reid"]["cosine_threshold"])
        except (KeyError, TypeError) as e:
            raise ModelError(f"{self.card.card_path}: metrics.reid.cosine_threshold is missing") from e

    def chips(self, image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """(N, 5, 2) landmarks (InsightFace order) -> (N, S, S, 3) uint8 BGR chips on the card's template."""
        self.setup()
        return align_crop(image_bgr, kps, self.spec)

    def embed_chips(self, chips: np.ndarray, normalise: bool = True) -> np.ndarray:
        """(N, S, S, 3) uint8 BGR chips -> (N, D) float32 embeddings, L2-normalised unless ``normalise=False``."""
        self.setup()
        chips = np.asarray(chips)
        outs = []
        for i in range(0, len(chips), self.batch_size):
            x = prepare(chips[i:i + self.batch_size], self.spec)
            outs.append(self._sess.run(None, {self._input: x})[0].astype(np.float32))
        if not outs:
            return np.zeros((0, int(self._sess.get_outputs()[0].shape[-1])), np.float32)
        e = np.concatenate(outs)
        if not normalise:
            return e
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def __call__(self, image_bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) of the faces with landmarks ``kps`` (N, 5, 2) in ``image_bgr``."""
        return self.embed_chips(self.chips(image_bgr, kps))

    @property
    def info(self) -> dict:
        return dict(self._info)

    def teardown(self) -> None:
        self._sess = None


__all__ = ["FaceEmbedder", "TASK"]
