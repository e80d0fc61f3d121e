"""``fer-batch train | evaluate | export``: fine-tune, measure and ship emotion models."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from fer_batch.errors import ConfigError, FerBatchError

log = logging.getLogger(__name__)


def _fail(e: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {e}")
    raise typer.Exit(2 if isinstance(e, ConfigError) else 1)


def _passive_omp() -> None:
    """OpenMP threads sleep instead of spinning while they wait (set before torch is imported).

    On a shared CPU, spinning threads burn their time slices: measured here under load, a
    training step cost 1.5 CPU-s with the default policy and 0.4 CPU-s with PASSIVE.
    """
    import os

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _ints(s: str, what: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"{what}: expected comma-separated integers, got {s!r}") from e


def train(
    data: str = typer.Argument(..., help="Training data: image-folder tree (one sub-folder per class), Parquet (image + label, or image + one vote column per emotion, e.g. FER+) or FER2013 CSV."),
    out: Path = typer.Option(..., "--out", help="Run folder: last.pt (every epoch), best.pt, history.jsonl."),
    val: str = typer.Option(None, "--val", help="Separate validation DATA (else --val-fraction of DATA, duplicates kept on one side)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    drop_unknown: bool = typer.Option(False, "--drop-unknown", help="Skip images whose label maps onto none of the 7 emotions (else an error)."),
    where: str = typer.Option(None, "--where", help="Parquet only: train on rows where COLUMN=V1[,V2] (e.g. fer_usage=Training)."),
    val_where: str = typer.Option(None, "--val-where", help="The same for --val (e.g. fer_usage=PublicTest)."),
    hard_label: str = typer.Option(None, "--hard-label", help="Vote data: also learn this hard-label column (e.g. fer2013_label)."),
    hard_weight: float = typer.Option(0.0, "--hard-weight", help="Weight of --hard-label: loss weight of its head (--hard-mode head) or its share of the target (--hard-mode target)."),
    hard_mode: str = typer.Option("head", "--hard-mode", help="head: a second output head learns the hard label (multi-task; export mixes the heads) | target: (1-w) x votes + w x one-hot."),
    head_mix: float = typer.Option(1.0, "--head-mix", help="Two-head models: output = mix x P(vote head) + (1-mix) x P(hard-label head); export can override."),
    arch: str = typer.Option("vgg", "--arch", help="vgg | resnet | mini_xception | tv:NAME (any torchvision classifier)."),
    widths: str = typer.Option("32,64,128,256", "--widths", help="Channel widths per stage (vgg/resnet)."),
    depth: int = typer.Option(2, "--depth", help="Convs per stage (vgg)."),
    blocks: str = typer.Option("1,1,1,1", "--blocks", help="Residual blocks per stage (resnet)."),
    dropout: float = typer.Option(0.3, "--dropout"),
    size: int = typer.Option(48, "--size", help="Face crop side (the FER2013 framing)."),
    crop: int = typer.Option(40, "--crop", help="Centre crop fed to the network (0 = none); random-jittered in training."),
    colour: str = typer.Option("gray", "--colour", help="gray | rgb"),
    epochs: int = typer.Option(60, "--epochs"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(0.1, "--lr"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (Nesterov) | adamw"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    warmup_epochs: float = typer.Option(2.0, "--warmup-epochs"),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing"),
    class_balance: str = typer.Option("sqrt", "--class-balance", help="none | sqrt | inverse (loss weights) | sampler (balanced sampling)."),
    flip: float = typer.Option(0.5, "--aug-flip"),
    scale: float = typer.Option(0.15, "--aug-scale"),
    translate: float = typer.Option(0.08, "--aug-translate"),
    rotate: float = typer.Option(12.0, "--aug-rotate"),
    brightness: float = typer.Option(0.25, "--aug-brightness"),
    contrast: float = typer.Option(0.25, "--aug-contrast"),
    erase: float = typer.Option(0.3, "--aug-erase"),
    mixup: float = typer.Option(0.0, "--mixup", help="Probability of mixup per batch."),
    cutmix: float = typer.Option(0.0, "--cutmix", help="Probability of CutMix per batch."),
    init: str = typer.Option(None, "--init", help="Start from: a fer-batch checkpoint, 'mini_xception_fer' (the shipped baseline), 'onnx:NAME#K' (member K of a shipped fer-batch VGG export, e.g. onnx:vgg_fer2013#1), or a local weights file (torchvision state dict / safetensors)."),
    freeze_epochs: int = typer.Option(0, "--freeze-epochs", help="Train only the classification head for the first N epochs."),
    backbone_lr_mult: float = typer.Option(1.0, "--backbone-lr-mult", help="Discriminative LR: backbone lr = lr x this."),
    patience: int = typer.Option(15, "--patience", help="Early stopping: epochs without a better validation macro-F1."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0 = default)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda[:N]"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CPUs with AVX512-BF16/AMX, AMP on CUDA) | fp32 | bf16 | fp16"),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    max_steps_per_epoch: int = typer.Option(0, "--max-steps-per-epoch", hidden=True),
    time_budget: float = typer.Option(0.0, "--time-budget", help="Minutes: when the measured pace would overrun, the cosine schedule is re-planned with fewer epochs (a shared CPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    keep_epochs: bool = typer.Option(False, "--keep-epochs", help="Also keep every epoch's checkpoint as OUT/epochs/epNN.pt (for weight averaging)."),
) -> None:
    """Train (or fine-tune) an emotion classifier; checkpoints carry their arguments and label order."""
    _passive_omp()
    from fer_batch.train.augment import AugmentConfig
    from fer_batch.train.engine import TrainArgs, main

    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    try:
        if colour not in ("gray", "rgb"):
            raise ConfigError(f"--colour: expected gray|rgb, got {colour!r}")
        a: dict = {"name": arch, "dropout": dropout}
        if arch == "vgg":
            a.update(widths=_ints(widths, "--widths"), depth=depth)
        elif arch == "resnet":
            a.update(widths=_ints(widths, "--widths"), blocks=_ints(blocks, "--blocks"))
        pre = {"size": size, "colour": colour, "mean": [0.5] * (1 if colour == "gray" else 3), "std": [0.5] * (1 if colour == "gray" else 3)}
        if crop:
            pre["crop"] = crop
        aug = AugmentConfig(flip, scale, translate, rotate, brightness, contrast, erase, mixup, cutmix)
        cmd = "fer-batch train " + shlex.join(sys.argv[sys.argv.index("train") + 1 :] if "train" in sys.argv else [])
        args = TrainArgs(data=data, out=str(out), val=val, val_fraction=val_fraction, drop_unknown=drop_unknown, where=where,
                         val_where=val_where, hard_label=hard_label, hard_weight=hard_weight, hard_mode=hard_mode, head_mix=head_mix, arch=a,
                         preprocess=pre, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                         warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, class_balance=class_balance,
                         augment=aug.to_dict(), init=init, freeze_epochs=freeze_epochs, backbone_lr_mult=backbone_lr_mult,
                         patience=patience, seed=seed, threads=threads, device=device, precision=precision,
                         channels_last=channels_last, max_steps_per_epoch=max_steps_per_epoch,
                         time_budget_min=time_budget, keep_epochs=keep_epochs, command=cmd)
        best = main(args, resume=resume)
    except FerBatchError as e:
        _fail(e)
    typer.echo(f"best checkpoint: {best}")


def evaluate(
    model: str = typer.Argument(..., help="A registered model name, 'default', a card/ONNX path, or a training checkpoint (.pt)."),
    data: str = typer.Argument(..., help="Image-folder tree, Parquet (image, label) or FER2013 CSV."),
    tta: bool = typer.Option(None, "--tta/--no-tta", help="Horizontal-flip test-time augmentation (default: as the model card says)."),
    detect: bool = typer.Option(False, "--detect", help="Images are photos, not face crops: detect + align with the pipeline's code (no face = wrong)."),
    exclude_dups_of: str = typer.Option(None, "--exclude-duplicates-of", help="Drop images whose pixels (pixel_md5) also occur in this DATA (e.g. the training set)."),
    json_out: Path = typer.Option(None, "--json", help="Write all metrics as JSON."),
    png: Path = typer.Option(None, "--png", help="Confusion-matrix PNG (default with --json: beside it); vote data adds a reliability diagram beside it."),
    where: str = typer.Option(None, "--where", help="Parquet only: evaluate rows where COLUMN=V1[,V2] (e.g. fer_usage=PrivateTest)."),
    predictions: Path = typer.Option(None, "--predictions", help="Write one row per image (row, label, p_<emotion>) to this Parquet file."),
    calibrated: bool = typer.Option(True, "--calibrated/--uncalibrated", help="Apply the card's fitted temperature (default) or not."),
    batch_size: int = typer.Option(256, "--batch-size"),
    threads: int = typer.Option(0, "--threads"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda[:N] | auto"),
    det_size: int = typer.Option(320, "--det-size", help="Detector canvas for --detect."),
    drop_unknown: bool = typer.Option(False, "--drop-unknown"),
    limit: int = typer.Option(0, "--limit", help="Only the first N images (0 = all)."),
    every: int = typer.Option(1, "--every", help="Only every K-th image (a fixed, class-mixed subset)."),
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR"),
) -> None:
    """Accuracy, macro-F1, per-class precision/recall/F1 and confusion matrix of a model on DATA."""
    _passive_omp()
    from fer_batch.train.evaluate import format_report, run, write_outputs

    try:
        m = run(model, data, tta=tta, detect=detect, exclude_dups_of=exclude_dups_of, batch_size=batch_size, threads=threads,
                device=device, models_dir=str(models_dir) if models_dir else None, drop_unknown=drop_unknown, limit=limit, det_size=det_size, every=every,
                where=where, predictions=predictions, calibrated=calibrated)
        if json_out and png is None:
            png = json_out.with_suffix(".confusion.png")
        write_outputs(m, json_out, png)
    except FerBatchError as e:
        _fail(e)
    typer.echo(format_report(m))


def export(
    ckpt: list[str] = typer.Argument(..., help="A training checkpoint (best.pt / last.pt), read weights-only; several: one ensemble (mean probabilities) in one ONNX file."),
    name: str = typer.Option(..., "--name", help="Model name: writes MODELS_DIR/NAME.yaml and MODELS_DIR/NAME/emotion_NAME.onnx."),
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR", help="Registry directory (default: the pack)."),
    fp16: bool = typer.Option(False, "--fp16", help="fp16 weights inside the graph (for GPUs; fp32 input/output)."),
    store_fp16: bool = typer.Option(False, "--store-fp16", help="Store the weights as fp16 (half the file), computed in fp32 as before; the parity check measures the rounding."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="The card's default for flip test-time augmentation (the pipeline follows it)."),
    test: str = typer.Option(None, "--test", help="Measure metrics on this DATA for the card (full, with and without TTA)."),
    train_data: str = typer.Option(None, "--train-data", help="With --test: also report metrics without test images duplicated in this DATA."),
    detect_metrics: bool = typer.Option(False, "--detect-metrics", help="With --test: also measure the detect+align path."),
    default: bool = typer.Option(False, "--default", help="Mark the new card as the default emotion model (unmarks the others)."),
    description: str = typer.Option("", "--description"),
    head_mix: float = typer.Option(None, "--head-mix", help="Two-head checkpoints: output = mix x P(vote head) + (1-mix) x P(hard-label head) (default: the run's)."),
    threads: int = typer.Option(2, "--threads", help="Threads for the faces/s measurement."),
) -> None:
    """Export a checkpoint (or an ensemble of several) to ONNX (dynamic batch) with a PyTorch parity check, and write its model card."""
    _passive_omp()
    import yaml

    from fer_batch.models import default_models_dir
    from fer_batch.train.export import export as do_export
    from fer_batch.train.export import faces_per_second

    try:
        mdir = Path(models_dir) if models_dir else default_models_dir()
        card_path = do_export(ckpt, name, mdir, fp16=fp16, tta=tta, store_fp16=store_fp16, default=False, description=description,
                              head_mix=head_mix)
        if test:
            card_path = _measure_card(card_path, test, train_data, detect_metrics, threads)
        card = yaml.safe_load(card_path.read_text())
        from fer_batch.preprocess import PreprocessSpec

        spec = PreprocessSpec.from_dict(card["preprocess"])
        onnx_file = card_path.parent / card["file"]
        use_tta = bool(card["preprocess"].get("tta"))
        card["metrics"]["cpu_faces_per_s_batch64"] = round(faces_per_second(onnx_file, spec, 64, threads, tta=use_tta), 1)
        if use_tta:
            card["metrics"]["cpu_faces_per_s_batch64_no_tta"] = round(faces_per_second(onnx_file, spec, 64, threads), 1)
        card["metrics"]["cpu_faces_per_s_note"] = f"ONNX Runtime CPU, {threads} threads, batch 64, preprocessing included, tta={bool(card['preprocess'].get('tta'))}"
        card["metrics"]["file_mb"] = round(onnx_file.stat().st_size / 1e6, 2)
        card["default"] = bool(default)
        card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=110))
        if default:
            _make_default(mdir, name)
    except FerBatchError as e:
        _fail(e)
    typer.echo(f"card: {card_path}")
    typer.echo(card_path.read_text())


def _measure_card(card_path: Path, test: str, train_data: str | None, detect_metrics: bool, threads: int) -> Path:
    import yaml

    from fer_batch.train.evaluate import run

    card = yaml.safe_load(card_path.read_text())
    m: dict = {"data": test, "tta_default": bool(card["preprocess"].get("tta"))}
    for use_tta in (False, True):
        r = run(str(card_path), test, tta=use_tta, threads=threads)
        sfx = "_tta" if use_tta else ""
        m[f"test_accuracy{sfx}"] = round(r["accuracy"], 4)
        m[f"test_macro_f1{sfx}"] = round(r["macro_f1"], 4)
        if train_data:
            r2 = run(str(card_path), test, tta=use_tta, threads=threads, exclude_dups_of=train_data)
            m[f"test_nodup_accuracy{sfx}"] = round(r2["accuracy"], 4)
            m[f"test_nodup_macro_f1{sfx}"] = round(r2["macro_f1"], 4)
            m["nodup_excluded"] = r2["excluded_duplicates"]
        if detect_metrics and use_tta == m["tta_default"]:
            r3 = run(str(card_path), test, tta=use_tta, threads=threads, detect=True)
            m[f"test_detect_accuracy{sfx}"] = round(r3["accuracy"], 4)
            m[f"test_detect_macro_f1{sfx}"] = round(r3["macro_f1"], 4)
            m["test_detect_no_face"] = r3["no_prediction"]
    m["command"] = f"fer-batch evaluate {card['name']} {test} [--tta|--no-tta] [--exclude-duplicates-of {train_data}] [--detect]"
    sub = run(str(card_path), test, tta=False, threads=threads, every=7)
    m["regression_subset"] = {"data": Path(test).name, "every": 7, "n": sub["n"], "accuracy": round(sub["accuracy"], 4),
                              "macro_f1": round(sub["macro_f1"], 4),
                              "command": f"fer-batch evaluate {card['name']} {test} --no-tta --every 7"}
    card["metrics"] = m
    card_path.write_text(yaml.safe_dump(card, sort_keys=False, width=110))
    return card_path


def _make_default(mdir: Path, name: str) -> None:
    """Set ``default: true`` on NAME's card and false on every other emotion card (one line each)."""
    import re

    import yaml

    for p in sorted(mdir.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text())
        if not isinstance(raw, dict) or raw.get("task") != "emotion_classification":
            continue
        want = raw.get("name") == name
        text = p.read_text()
        if re.search(r"(?m)^default:", text):
            text = re.sub(r"(?m)^default:.*$", f"default: {str(want).lower()}", text)
        else:
            text = text.replace("\nfile:", f"\ndefault: {str(want).lower()}\nfile:", 1)
        p.write_text(text)


def calibrate(
    model: str = typer.Argument(..., help="A registered emotion model name or card path."),
    data: str = typer.Argument(..., help="Vote data (Parquet with one vote column per emotion, e.g. FER+)."),
    where: str = typer.Option(None, "--where", help="Rows to fit on, e.g. fer_usage=PublicTest (never the test split)."),
    threads: int = typer.Option(0, "--threads"),
    models_dir: Path = typer.Option(None, "--models-dir", envvar="FER_BATCH_MODELS_DIR"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the fit; leave the card unchanged."),
) -> None:
    """Fit the temperature that makes p_* match annotators' vote shares; store it in the model card."""
    _passive_omp()
    import yaml

    from fer_batch.train.calibrate import calibrate as do_calibrate

    try:
        cal = do_calibrate(model, data, where=where, models_dir=str(models_dir) if models_dir else None, threads=threads, write=not dry_run)
    except FerBatchError as e:
        _fail(e)
    typer.echo(yaml.safe_dump({"calibration": cal}, sort_keys=False, width=110))



def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("export")(export)
    app.command("calibrate")(calibrate)
