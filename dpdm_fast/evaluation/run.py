"""``dpdm-fast eval``: the pieces in order (samples -> downstream classifiers / FID -> report)."""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from . import downstream
from .samples import dataset_spec, load_samples, real_split, sample_options


def cache_dir() -> Path:
    return Path(os.environ.get("DPDM_FAST_CACHE", Path.home() / ".cache" / "dpdm_fast"))


def evaluate(samples: str | Path, dataset: str, data_dir: str | Path, out: str | Path, *,
             classifiers: list[str] | None = None, epochs: int = downstream.EPOCHS, fid: bool = False,
             inception_weights: str | Path | None = None, epsilon: float | None = None, seed: int = 0,
             device: str = "cpu", progress: bool = True, fid_network=None,
             input_range: str = "minus_one_one", shuffle: str = "fixed") -> dict:
    """Evaluate a SAMPLES.npz by the paper's protocol and write report.json / report.md into ``out``.

    ``input_range`` / ``shuffle``: the classifiers' inputs and batch order (defaults: DPDM's released code;
    see ``downstream``). The report's ``evaluation_options`` records them and how the samples were made
    (``label_mode``, ``quantize``, as ``dpdm-fast sample`` stores them). ``fid_network``: (name, module) in
    place of Inception (tests use a small stand-in)."""
    from .report import paper_rows, write_report
    from .classifiers import CLASSIFIERS
    spec = dataset_spec(dataset)
    classifiers = ["logreg", "mlp", "cnn"] if classifiers is None else classifiers
    unknown = sorted(set(classifiers) - set(CLASSIFIERS))
    if unknown:
        raise ValueError(f"unknown classifiers {unknown}; choose from {sorted(CLASSIFIERS)}")
    if spec.classes is None:
        classifiers = []
    if not classifiers and not fid:
        raise ValueError(f"nothing to evaluate: no classifiers{' (unlabelled dataset)' if spec.classes is None else ''} "
                         "and no --fid")
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if input_range not in downstream.INPUT_RANGES or shuffle not in downstream.SHUFFLES:
        raise ValueError(f"input_range must be one of {downstream.INPUT_RANGES} and shuffle one of "
                         f"{downstream.SHUFFLES}, got {input_range!r}, {shuffle!r}")
    images, labels, notes = load_samples(samples, dataset, need_labels=bool(classifiers))
    # FID's network and reference statistics first: a missing Inception file must not cost the classifiers' hours
    reference = _fid_reference(dataset, data_dir, inception_weights, device, progress, fid_network) if fid else None
    if epochs != downstream.EPOCHS:
        notes.append(f"reduced protocol: {epochs} epochs instead of the protocol's {downstream.EPOCHS}")
    report = {"dataset": dataset, "samples": str(samples), "n_samples": len(images), "notes": notes, "seed": seed,
              "epsilon": epsilon, "paper": paper_rows(dataset, epsilon), "classifiers": {},
              "evaluation_options": {"input_range": input_range, "shuffle": shuffle, **sample_options(samples)}}
    if classifiers:
        test_x, test_y = real_split(dataset, data_dir, train=False)
        report["protocol"] = {"description": f"{len(images)} samples split 90/10 (seed {seed}); Adam lr "
                                             f"{downstream.LR}, batch {downstream.BATCH}, {epochs} epochs; the epoch "
                                             "with the best synthetic-validation accuracy is selected and its "
                                             f"accuracy on the {len(test_x)} real test images reported",
                              "lr": downstream.LR, "batch_size": downstream.BATCH, "epochs": epochs,
                              "val_fraction": downstream.VAL_FRACTION}
        for name in classifiers:
            result = downstream.train_downstream(name, images, labels, test_x, test_y, epochs=epochs, seed=seed,
                                                 device=device, progress=progress, input_range=input_range,
                                                 shuffle=shuffle)
            report["classifiers"][name] = asdict(result)
    if fid:
        from .fid import fid as fid_of
        network, stats, settings = reference
        report["fid"] = fid_of(images, stats, network, device=device, progress=progress)
        report["fid_settings"] = settings
    write_report(out, report)
    return report


def _fid_reference(dataset, data_dir, inception_weights, device, progress, fid_network):
    """(network, (mu, sigma) of the training set, settings for the report)."""
    from .fid import reference_statistics
    from .inception import weights_path
    weights = None
    if fid_network is None:
        from .inception import load_inception
        weights = weights_path(inception_weights)
        name, network = "inception-v3-compat", load_inception(weights, device)
    else:
        name, network = fid_network
    real = real_split(dataset, data_dir, train=True)[0]
    mu, sigma, cache, computed = reference_statistics(dataset, real, network, name, cache_dir(), weights,
                                                      device=device, progress=progress)
    settings = {"network": name, "reference": f"{dataset} training set ({len(real)} images)",
                "reference_cache": str(cache), "reference_computed_now": computed,
                "description": f"{name} 2048-d pool features of uint8 images (grayscale repeated to 3 channels, "
                               f"resized by the network), against the {dataset} training set's statistics"}
    return network, (mu, sigma), settings


def dp_baseline(dataset: str, data_dir: str | Path, out: str | Path, *, epsilon: float, delta: float = 1e-5,
                epochs: int | None = None, max_steps: int | None = None, seed: int = 0, device: str = "cpu",
                progress: bool = True) -> dict:
    """The CNN trained directly on the real training set with DP-SGD at ``epsilon``; report in ``out``."""
    from .dp_baseline import train_dp_baseline
    from .report import paper_rows, write_report
    spec = dataset_spec(dataset)
    if spec.classes is None:
        raise ValueError(f"the DP baseline is a classifier: {dataset} has no labels")
    x, y = real_split(dataset, data_dir, train=True)
    xt, yt = real_split(dataset, data_dir, train=False)
    result = train_dp_baseline(x, y, xt, yt, epsilon=epsilon, delta=delta, epochs=epochs, max_steps=max_steps,
                               seed=seed, device=device, progress=progress)
    notes = [] if max_steps is None else [f"stopped after {result.steps} steps (--max-steps): not a full run"]
    report = {"dataset": dataset, "notes": notes, "seed": seed, "epsilon": epsilon,
              "paper": paper_rows(dataset, epsilon), "dp_baseline": asdict(result)}
    write_report(out, report)
    return report
