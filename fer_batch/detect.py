"""Face detection stage: InsightFace's own detector code on a model pack -> ``FaceDetections``.

The pack is either the registry's default ``face_detection`` card (RetinaFace-MobileNet0.25
exported behind InsightFace's SCRFD contract; its sha256 is verified at setup) or a standard
InsightFace pack directory the user already has (buffalo_l, buffalo_s, ...). Nothing is ever
downloaded: only existing files are used, and a missing, corrupt or mismatching file is a
``ModelError``, never a silent fallback.

Models are loaded with ``insightface.model_zoo.get_model`` and run through its ``SCRFD``
(``prepare``/``detect``: letterbox to ``det_size`` at the top-left, score threshold, NMS) and,
where the pack has one, its ``ArcFaceONNX`` recognition model with
``insightface.utils.face_align.norm_crop``. ONNX Runtime providers are chosen explicitly from
the requested device and the provider that actually runs is reported in ``info``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fer_batch.config import DetectConfig
from fer_batch.device import checked_provider, ort_providers, ort_session_options, resolve_device
from fer_batch.errors import ModelError
from fer_batch.models import ModelCard, registry, sha256_file
from fer_batch.types import FaceDetections, Frame

log = logging.getLogger(__name__)


def _onnx_signature(path: Path) -> tuple[list[list[Any]], int]:
    """(input shapes, number of outputs) of an ONNX file, without loading external weights."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        m = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    shapes = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in m.graph.input]
    if not shapes:
        raise ModelError(f"{path}: ONNX model has no inputs")
    return shapes, len(m.graph.output)


def _route(path: Path) -> str | None:
    """Which InsightFace role a pack file plays, by the same shape rules as its ``ModelRouter``."""
    shapes, n_out = _onnx_signature(path)
    if n_out >= 5:
        return "detection"
    s = shapes[0]
    if len(shapes) == 1 and n_out == 1 and len(s) == 4 and isinstance(s[2], int) and s[2] == s[3]:
        if s[2] >= 112 and s[2] % 16 == 0 and s[2] != 192:
            return "recognition"
    return None


GPU_BATCH = 8  # frames per detector run on a GPU (dynamic-batch models only)


class _Replay:
    """Stands in for an ORT session: returns precomputed outputs (one item of a batch run)."""

    def __init__(self, outputs: list):
        self.outputs = outputs

    def run(self, names, feeds):
        return self.outputs


def _letterbox(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The detector canvas for ``img``, exactly as InsightFace's ``SCRFD._detect_candidates``
    builds it: resized to fit ``size`` (width, height), placed top-left on black."""
    import cv2

    im_ratio = float(img.shape[0]) / img.shape[1]
    model_ratio = float(size[1]) / size[0]
    if im_ratio > model_ratio:
        new_height = size[1]
        new_width = int(new_height / im_ratio)
    else:
        new_width = size[0]
        new_height = int(new_width * im_ratio)
    out = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    out[:new_height, :new_width, :] = cv2.resize(img, (new_width, new_height))
    return out


class FaceDetector:
    """Detect faces and 5 landmarks in BGR frames with InsightFace's SCRFD class.

    Args:
        cfg: ``det_thresh`` (raising it drops doubtful faces: fewer false positives, more
            misses), ``nms_thresh`` (raising it keeps more overlapping boxes), ``det_size``
            (larger finds smaller faces at a cost roughly proportional to its area),
            ``min_face`` (boxes whose shorter side is smaller are dropped), ``max_faces``
            (0 = all; else the largest, most central faces, InsightFace's own ranking), and
            ``pack`` (None: the default card; a directory: an InsightFace pack; else a
            registered face_detection model name or card path).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        threads: ONNX Runtime intra-op threads (0 = its default).
        models_dir: the model registry's directory (None: the default pack).
        batch_size: frames per detector run in ``detect_batch`` (None: ``GPU_BATCH`` on a
            GPU, 1 on CPU; always 1 for models with a fixed batch dimension).
    """

    def __init__(self, cfg: DetectConfig, device: str = "cpu", threads: int = 0, models_dir: str | None = None,
                 batch_size: int | None = None):
        self.cfg = cfg
        self.device = device
        self.threads = int(threads)
        self.models_dir = models_dir
        self._batch_req = batch_size
        self.batch_size = 1  # frames per detector run (after setup)
        self._det = None
        self._rec = None
        self._info: dict[str, Any] = {}

    # --- resolution of the pack ---------------------------------------------------------
    def _resolve(self) -> tuple[str, Path, str, Path | None]:
        """(model name, detector file, its sha256, recognition file or None)."""
        pack = self.cfg.pack
        if pack and Path(pack).expanduser().is_dir():
            return self._resolve_dir(Path(pack).expanduser().resolve())
        reg = registry(str(self.models_dir) if self.models_dir else None)
        card: ModelCard = reg.resolve(pack, "face_detection")
        card.verify()  # missing file or sha256 mismatch -> ModelError
        return card.name, Path(card.path), card.sha256, None

    def _resolve_dir(self, d: Path) -> tuple[str, Path, str, Path | None]:
        files = sorted(d.glob("*.onnx"))
        seen = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        dets, recs = [], []
        for f in files:
            role = _route(f)
            if role == "detection":
                dets.append(f)
            elif role == "recognition":
                recs.append(f)
        if not dets:
            raise ModelError(
                f"pack directory {d} has no face detector (an ONNX file with >= 5 outputs); "
                f"files seen: {seen or '(none)'}"
            )
        if len(dets) > 1:
            raise ModelError(f"pack directory {d} has several detectors {[p.name for p in dets]}; keep one")
        if len(recs) > 1:
            raise ModelError(f"pack directory {d} has several recognition models {[p.name for p in recs]}; keep one")
        det = dets[0]
        return f"{d.name}/{det.stem}", det, sha256_file(det), (recs[0] if recs else None)

    # --- stage API ----------------------------------------------------------------------
    def setup(self) -> None:
        """Load the models (idempotent). Raises ``ModelError`` for any unusable model."""
        if self._det is not None:
            return
        from insightface.model_zoo import get_model
        from insightface.model_zoo.scrfd import SCRFD

        name, det_file, sha, rec_file = self._resolve()
        device = resolve_device(self.device)  # ConfigError if cuda is asked for and unusable
        providers = ort_providers(device)
        so = ort_session_options(self.threads)
        try:
            det = get_model(str(det_file), providers=providers, sess_options=so)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"{det_file}: onnxruntime cannot load the detector: {e}") from e
        if not isinstance(det, SCRFD):
            raise ModelError(f"{det_file}: InsightFace did not route it as a detector (got {type(det).__name__})")
        if not det.use_kps:
            raise ModelError(f"{det_file}: detector has no 5-point landmark outputs (needed for alignment)")
        used = checked_provider(det.session, self.device, device, "detector")
        det.prepare(0, det_thresh=self.cfg.det_thresh, nms_thresh=self.cfg.nms_thresh,
                    input_size=None if self.cfg.det_size == "auto" else self.cfg.det_size)  # fmt: skip
        rec = None
        if rec_file is not None:
            try:
                rec = get_model(str(rec_file), providers=providers, sess_options=so)
            except Exception as e:
                raise ModelError(f"{rec_file}: onnxruntime cannot load the recognition model: {e}") from e
            rec.prepare(0)
        self._det, self._rec = det, rec
        self.batch_size = self._choose_batch(det, device)
        self._info = {
            "name": name,
            "file": str(det_file),
            "sha256": sha,
            "provider": used,
            "det_size": self.cfg.det_size if self.cfg.det_size == "auto" else list(self.cfg.det_size),
            "recognition": str(rec_file) if rec_file else None,
            "batch_size": self.batch_size,
        }
        log.info("face detector %s (%s) on %s, det_size %s", name, det_file, used, self.cfg.det_size)

    def _choose_batch(self, det, device: str) -> int:
        """Frames per detector run: ``GPU_BATCH`` on a GPU when the model's batch dimension is
        dynamic (one run amortises the launch and transfer costs), else 1 (on CPU batching
        gains nothing and delays the first results)."""
        shape = det.session.get_inputs()[0].shape
        dynamic = (not isinstance(shape[0], int) and getattr(det, "batched", False)
                   and getattr(det, "static_input_size", None) is None)
        if not dynamic:
            return 1
        if self._batch_req is not None:
            return max(1, int(self._batch_req))
        return GPU_BATCH if device.startswith("cuda") else 1

    def detect_batch(self, frames: list[Frame]) -> list[FaceDetections]:
        """Faces of several frames with one ONNX Runtime run (same results as one call each).

        The frames are letterboxed and stacked into one ``(N, 3, H, W)`` blob; InsightFace's
        own decoding, thresholding and NMS then run per frame on that frame's slice of the
        outputs (its session is stood in for by the precomputed slice).
        """
        if self._det is None:
            self.setup()
        if self.batch_size <= 1 or len(frames) <= 1:
            return [self(f) for f in frames]
        det = self._det
        h, w = frames[0].image.shape[:2]
        if any(f.image.shape[:2] != (h, w) for f in frames):  # one canvas per batch
            return [self(f) for f in frames]
        size = self.cfg.input_size(h, w)
        blobs = [det._prepare_input_blob(_letterbox(f.image, size), size) for f in frames]
        session = det._session_for_input_size(size)
        outs = session.run(det.output_names, {det.input_name: np.concatenate(blobs)})
        results = []
        try:
            for i, f in enumerate(frames):
                item = [o[i : i + 1] for o in outs]
                det._session_for_input_size = lambda _size, _item=item: _Replay(_item)
                det._prepare_input_blob = lambda _img, _size, _b=blobs[i]: _b
                results.append(self(f))
        finally:
            det.__dict__.pop("_session_for_input_size", None)
            det.__dict__.pop("_prepare_input_blob", None)
        return results

    def __call__(self, frame: Frame) -> FaceDetections:
        """Faces of one BGR frame, sorted by score; boxes and landmarks in frame pixels."""
        if self._det is None:
            self.setup()
        img = frame.image
        size = self.cfg.input_size(img.shape[0], img.shape[1])
        det, kps = self._det.detect(img, input_size=size, max_num=0, det_thresh=self.cfg.det_thresh)
        if len(det) == 0:
            return FaceDetections.empty()
        xyxy = det[:, :4]
        side = np.minimum(xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1])
        keep = np.where(side >= self.cfg.min_face)[0]
        if self.cfg.max_faces > 0 and len(keep) > self.cfg.max_faces:
            keep = keep[self._largest_central(det[keep], img.shape)[: self.cfg.max_faces]]
            keep = np.sort(keep)  # back to score order
        n = len(keep)
        return FaceDetections(
            frame_index=np.full(n, frame.index, np.int64),
            timestamp_s=np.full(n, frame.timestamp_s, np.float64),
            xyxy=det[keep, :4],
            det_score=det[keep, 4],
            kps=kps[keep],
        )

    @staticmethod
    def _largest_central(det: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Indices ranked as InsightFace's ``max_num`` does: area minus 2x squared centre offset."""
        area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
        cy, cx = shape[0] // 2, shape[1] // 2
        off = ((det[:, 0] + det[:, 2]) / 2 - cx) ** 2 + ((det[:, 1] + det[:, 3]) / 2 - cy) ** 2
        return np.argsort(-(area - 2.0 * off), kind="stable")

    @property
    def info(self) -> dict:
        """Model name, file, sha256, provider actually used, det_size (after ``setup``)."""
        if self._det is None:
            self.setup()
        return dict(self._info)

    @property
    def has_recognition(self) -> bool:
        """Whether the pack has a recognition (embedding) model, e.g. buffalo_l's w600k_r50."""
        if self._det is None:
            self.setup()
        return self._rec is not None

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings (N, D) of the faces with landmarks ``kps`` (N, 5, 2).

        Faces are aligned with ``insightface.utils.face_align.norm_crop`` at the model's
        input size. Raises ``ModelError`` if the pack has no recognition model.
        """
        if not self.has_recognition:
            raise ModelError(f"pack {self._info.get('name')} has no recognition model; embeddings are unavailable")
        from insightface.utils import face_align

        kps = np.asarray(kps, np.float32).reshape(-1, 5, 2)
        if len(kps) == 0:
            return np.zeros((0, int(self._rec.output_shape[-1])), np.float32)
        size = int(self._rec.input_size[0])
        crops = [face_align.norm_crop(image, landmark=k, image_size=size) for k in kps]
        if isinstance(self._rec.input_shape[0], int) and self._rec.input_shape[0] == 1:
            feats = np.concatenate([self._rec.get_feat(c) for c in crops])
        else:
            feats = self._rec.get_feat(crops)
        feats = np.asarray(feats, np.float32).reshape(len(crops), -1)
        return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)

    def teardown(self) -> None:
        """Release the ONNX Runtime sessions."""
        self._det = None
        self._rec = None
