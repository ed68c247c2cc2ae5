"""A seed ensemble of finished runs as one model, in one run folder.

Members are runs of the same recipe on the same patient split (``--seed``)
that differ only in ``--init-seed`` (weights, dropout, augmentation stream).
The ensemble is one Keras graph with the layout the export and its heads
expect: every member's trunk (renamed ``m1_...``, ``m2_...``) up to its last
feature map, the maps concatenated along channels, one global average pooling
named ``gap`` and one dense unit whose kernel is the members' kernels stacked
and divided by their number. Its logit is therefore exactly the mean of the
members' logits; the ``cam`` head (mean of the map = logit) and the ``ood``
head (Mahalanobis distance of the concatenated pooled features) work
unchanged. The averaged logit is calibrated again on validation (Platt) and
the threshold chosen by the members' own rule, as ``train`` does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .runfolder import BEST, CONFIG, SPLIT, RunFolder, RunFolderError


class EnsembleError(ValueError):
    """The runs cannot form one ensemble (reason names the run)."""


def _member(path: Path) -> RunFolder:
    try:
        return RunFolder.load(path)
    except RunFolderError as exc:
        raise EnsembleError(str(exc)) from None


def build_ensemble(members: list, name: str | None = None):
    """One Keras model averaging the logits of ``members`` (models from our builders)."""
    import keras

    from .heads import GAP_LAYER, has_heads_support
    from .models import INPUT_NAME, OUTPUT_NAME

    for i, m in enumerate(members, 1):
        if not has_heads_support(m):
            raise EnsembleError(f"member {i} does not end in '{GAP_LAYER}' + one dense unit")
    shape = tuple(members[0].inputs[0].shape[1:])
    if any(tuple(m.inputs[0].shape[1:]) != shape for m in members):
        raise EnsembleError("members have different input shapes")
    inp = keras.Input(shape=shape, name=INPUT_NAME)
    maps, kernels, biases = [], [], []
    for i, m in enumerate(members, 1):
        trunk = keras.Model(m.inputs, m.get_layer(GAP_LAYER).input)
        prefix = f"m{i}_"

        def renamed(layer, prefix=prefix):
            cfg = layer.get_config()
            cfg["name"] = prefix + layer.name
            if "dtype" in cfg:
                cfg["dtype"] = "float32"
            return layer.__class__.from_config(cfg)

        clone = keras.models.clone_model(trunk, input_tensors=[inp], clone_function=renamed)
        for layer in trunk.layers:
            if layer.weights:
                clone.get_layer(prefix + layer.name).set_weights(layer.get_weights())
        maps.append(clone.outputs[0])
        kernel, bias = m.get_layer(OUTPUT_NAME).get_weights()
        kernels.append(kernel)
        biases.append(bias)
    fmap = keras.layers.Concatenate(axis=-1, name="member_maps")(maps)
    pooled = keras.layers.GlobalAveragePooling2D(name=GAP_LAYER)(fmap)
    dense = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=OUTPUT_NAME)
    model = keras.Model(inp, dense(pooled),
                        name=name or f"{members[0].name}_x{len(members)}")
    n = len(members)
    dense.set_weights([np.concatenate(kernels, axis=0).astype(np.float32) / n,
                       (np.sum(biases, axis=0) / n).astype(np.float32)])
    return model


def ensemble_runs(runs: list[str | Path], out: str | Path, *, force: bool = False,
                  progress=None) -> dict:
    """Combine finished run folders into the run folder ``out``; returns its
    ``val_metrics.json`` record (with each member's own clean and zoom-row metrics).

    Raises:
        EnsembleError: fewer than two runs, a run not finished, different splits,
            image sizes or threshold rules, or ``out`` exists without ``force``.
    """
    import keras

    from pneumo_edge.io import write_json

    from .train import TrainConfig, finish_run, validation_inputs

    say = progress or (lambda msg: None)
    runs = [Path(r) for r in runs]
    out = Path(out)
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least two run folders")
    if len({r.resolve() for r in runs}) != len(runs):
        raise EnsembleError("the same run folder is listed twice")
    if out.resolve() in {r.resolve() for r in runs}:
        raise EnsembleError(f"{out}: the output folder is one of the members")
    if out.exists() and any(out.iterdir()) and not force:
        raise EnsembleError(f"{out}: folder exists and is not empty (use --force)")
    folders = [_member(r) for r in runs]
    first = folders[0]
    key = lambda ss: [(s.path, s.label, s.patient) for s in ss]  # noqa: E731
    for run, member in zip(runs[1:], folders[1:]):
        if (key(member.validation) != key(first.validation)
                or key(member.train) != key(first.train)):
            raise EnsembleError(f"{run}: its patient split differs from {runs[0]}'s "
                                "(members must share --seed and the data)")
        for field_ in ("img_size", "channels", "threshold_rule", "data"):
            if member.config.get(field_) != first.config.get(field_):
                raise EnsembleError(f"{run}: {field_} {member.config.get(field_)!r} differs "
                                    f"from {runs[0]}'s {first.config.get(field_)!r}")
    cfgs = [TrainConfig.from_dict(m.config) for m in folders]
    seeds = [c.weights_seed for c in cfgs]
    if len(set(seeds)) != len(seeds):
        say(f"warning: members share an init seed ({seeds}); they may be near copies")

    # every input read (images, models) before anything is written
    _, y_val, val_inputs = validation_inputs(first.validation, first.preprocess)
    say(f"building one graph from {len(runs)} members")
    from .models import register_custom_layers

    register_custom_layers()
    members = [keras.models.load_model(m.keras_path, compile=False) for m in folders]
    model = build_ensemble(members)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / BEST)
    shutil.copyfile(first.path / SPLIT, out / SPLIT)
    cfg = cfgs[0]
    cfg.out = str(out)
    member_records = []
    train_seconds = 0.0
    for member, seed in zip(folders, seeds):
        val = member.val.record
        train_seconds += float(val.get("train_seconds") or 0.0)
        member_records.append({
            "run": str(member.path), "init_seed": seed,
            "threshold": val.get("threshold"), "metrics": val.get("metrics"),
            "shifted_metrics": val.get("shifted_metrics"),
            "best_epoch": val.get("best_epoch"), "epochs_run": val.get("epochs_run")})
    ensemble = {"members": [str(r) for r in runs], "init_seeds": seeds,
                "combine": "mean of the members' calibrated logits, then Platt scaling"}
    write_json(out / CONFIG, first.config | {"out": str(out), "arch": model.name,
                                            "ensemble": ensemble})

    say("calibrating and choosing the threshold on validation")
    return finish_run(out, cfg, val_inputs, y_val, first.validation, {
        "ensemble": ensemble, "members": member_records,
        "best_epoch": None, "epochs_run": None, "train_seconds": round(train_seconds, 1)})
