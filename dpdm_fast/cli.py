"""Command line: ``dpdm-fast <command> ...``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

KNOWN_DATASET_SIZES = {"mnist_28": 60000, "fmnist_28": 60000, "celeba_32": 162770, "celeba_64": 162770}


def cmd_info(args: argparse.Namespace) -> int:
    """Show the resolved config, the network size and the DP noise it implies."""
    from omegaconf import OmegaConf

    from .config import load_config, validate_counts
    from .models import build_network

    cfg = load_config(args.config, args.overrides)
    print(OmegaConf.to_yaml(cfg))
    net = build_network(cfg.model.network)
    print(f"network: NCSNpp, {sum(p.numel() for p in net.parameters()):,} parameters")
    validate_counts(cfg)
    public = cfg.data.public_size
    n = public if public is not None else KNOWN_DATASET_SIZES.get(cfg.data.name)
    if n is None:
        print("dataset size unknown (set data.public_size): noise multiplier not computed")
        return 0
    from .training import plan_privacy

    plan = plan_privacy(n_examples=n, batch_size=cfg.train.batch_size, n_epochs=cfg.train.n_epochs,
                        epsilon=cfg.dp.epsilon, delta=cfg.dp.delta, max_grad_norm=cfg.dp.max_grad_norm,
                        accountant=cfg.dp.accountant, size_is_public=public is not None)
    print(plan.describe())
    if cfg.dp.max_physical_batch_size == "auto" or args.probe:
        _print_pass_plan(cfg, plan, args)
    return 0


def _print_pass_plan(cfg, plan, args: argparse.Namespace) -> None:
    """The memory probe's plan (dp.max_physical_batch_size: auto) and the projected time per step and epoch."""
    from .training.loop import amp_mode, resolve_device
    from .training.memory_plan import AUTO, fixed_pass_size, plan_passes

    device = resolve_device(args.device)
    _keep_freed_cpu_memory(device, announce=True)    # as training would: the probe measures what it will run
    passes = plan_passes(cfg, device, amp_mode(args.amp))
    print(passes.describe(plan.expected_batch_size, plan.steps_per_epoch, cfg.dp.n_splits))
    measured, K = passes.planned, cfg.loss.n_noise_samples
    step_s = passes.seconds_per_step(plan.expected_batch_size)
    print(f"  the planned pass: {measured.examples * K / measured.seconds:,.0f} rows/s ({measured.examples} examples x "
          f"K={K} in {measured.seconds:.2f} s); the run's {plan.total_steps} steps about {step_s * plan.total_steps / 3600:.1f} h")
    if cfg.dp.max_physical_batch_size != AUTO:
        configured = fixed_pass_size(cfg)
        step_s = passes.seconds_per_step(plan.expected_batch_size, configured)
        print(f"  the configured passes of {configured} examples: about {passes.peak_bytes(configured) / 2**30:.2f} "
              f"GiB each ({'fits' if configured <= passes.examples_per_pass else 'does NOT fit'} in "
              f"{passes.memory_fraction:.0%} of the free memory), a step about {step_s:.0f} s, the run's "
              f"{plan.total_steps} steps about {step_s * plan.total_steps / 3600:.1f} h")


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) a DPDM run of a config; exit status 130 / 143 after a SIGINT / SIGTERM stop.

    Under torchrun, this process is one rank of a distributed run; with --nproc-per-node / --nnodes
    (defaults: the config's setup.*) above 1 and no torchrun, it starts torchrun itself."""
    import os

    from .config import load_config
    from .training import ranks as rank_env
    from .training import train

    cfg = load_config(args.config, args.overrides)
    if "RANK" not in os.environ:    # not already a rank of torchrun
        setup = cfg.setup
        nproc = args.nproc_per_node if args.nproc_per_node is not None else setup.n_gpus_per_node
        nnodes = args.nnodes if args.nnodes is not None else setup.n_nodes
        if nproc < 1 or nnodes < 1:
            raise ValueError(f"--nproc-per-node {nproc} and --nnodes {nnodes} must be >= 1")
        if nproc * nnodes > 1:
            return rank_env.launch(
                _train_argv_for_ranks(args), nproc, nnodes,
                node_rank=args.node_rank if args.node_rank is not None else setup.node_rank,
                master_addr=args.master_addr or setup.master_address,
                master_port=args.master_port if args.master_port is not None else setup.master_port)
    ranks, device = rank_env.init_from_environment(args.device)
    from .training.loop import resolve_device
    _keep_freed_cpu_memory(resolve_device(device), announce=ranks.is_main)
    try:
        result = train(cfg, args.workdir or cfg.setup.workdir, resume=args.resume, max_steps=args.max_steps,
                       amp=args.amp, device=device, progress=not args.no_progress)
    finally:
        rank_env.shutdown()
    return {None: 0, "SIGINT": 130, "SIGTERM": 143}[result.interrupted]


def _keep_freed_cpu_memory(device, announce: bool) -> None:
    """On the CPU, freed pass buffers stay in the process for the next pass (``engine.cpu_allocator``)."""
    if device.type == "cpu":
        from .engine.cpu_allocator import keep_freed_memory

        message = keep_freed_memory()
        if announce:
            print(message, flush=True)


def _train_argv_for_ranks(args: argparse.Namespace) -> list[str]:
    """The command line each rank runs: this one without the launcher's options."""
    argv = [args.config, *args.overrides]
    for flag, value in (("--workdir", args.workdir), ("--max-steps", args.max_steps), ("--device", args.device)):
        if value is not None:
            argv += [flag, str(value)]
    if args.amp is not None:
        argv += ["--amp", args.amp]
    argv += [flag for flag, on in (("--resume", args.resume), ("--no-progress", args.no_progress)) if on]
    return argv


def cmd_sample(args: argparse.Namespace) -> int:
    """Samples of a checkpoint (EMA weights) to an .npz of uint8 images and int64 labels, plus a grid PNG."""
    import time

    from .generate import generate, label_mode, load_for_sampling, sample_labels, sampler_settings, write_samples
    from .training.loop import resolve_device

    device = resolve_device(args.device)
    model, cfg = load_for_sampling(args.checkpoint, args.config, args.overrides, use_ema=not args.no_ema,
                                   device=device)
    if args.sampler is not None:
        cfg.sampler.type = args.sampler     # the config's own settings for that sampler (s_churn, ...) apply
    options = sampler_settings(cfg)
    if args.steps is not None:
        options["num_steps"] = args.steps
    if args.guidance is not None:
        options["guid_scale"] = args.guidance
    labels = sample_labels(args.n, args.labels, cfg.data.n_classes, seed=args.seed)
    start = time.perf_counter()
    images = generate(model, cfg, args.n, labels, seed=args.seed, batch_size=args.batch, sampler_options=options,
                      device=device, progress=not args.no_progress, quantize=args.quantize)
    npz, png = write_samples(images, labels, args.out, options={
        "label_mode": label_mode(args.labels, cfg.data.n_classes), "quantize": args.quantize})
    print(f"wrote {args.n} samples to {npz} and a grid to {png} ({options['type']} sampler, "
          f"{options['num_steps']} steps, guidance {options['guid_scale']:g}, {time.perf_counter() - start:.0f} s on {device})")
    return 0


def _grid(text: str) -> list[tuple[int, int]]:
    if text == "full":
        from .benchmarks.runner import FULL_GRID
        return FULL_GRID
    try:
        return [tuple(int(v) for v in cell.split("x")) for cell in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 8x4,16x8 (B x K) or be 'full', got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    """Time and memory of every DP engine on the DPDM networks, side by side."""
    import warnings
    from pathlib import Path

    from .benchmarks import ENGINES, WORKLOADS
    from .benchmarks.report import write_json, write_outputs
    from .benchmarks.runner import CPU_QUICK_GRID, GPU_GRID, run_grid

    warnings.filterwarnings("ignore")
    engines = args.engines.split(",")
    workloads = args.workloads.split(",")
    for name, known in [(engines, ENGINES), (workloads, WORKLOADS)]:
        bad = [n for n in name if n not in known]
        if bad:
            raise ValueError(f"unknown {bad}; choose from {sorted(known)}")
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch build sees no CUDA device")
    if args.distributed is not None:
        return _bench_distributed(args, workloads)
    grid = args.grid or (GPU_GRID if args.device.startswith("cuda") else CPU_QUICK_GRID)
    result = run_grid(engines, workloads, grid, repeats=args.repeats, device=args.device, threads=args.threads,
                      memory=not args.no_memory, isolate=args.isolate, max_step_s=args.max_step_s,
                      max_rows=args.max_rows, on_row=lambda partial: write_json(partial, Path(args.out)))
    paths = write_outputs(result, Path(args.out))
    print(paths["table"].read_text())
    print(f"wrote {paths['json']}, {paths['table']}" + (f", {paths['plot']}" if paths["plot"] else ""))
    return 0


def _bench_distributed(args: argparse.Namespace, workloads: list[str]) -> int:
    from pathlib import Path

    from .benchmarks.distributed import run_distributed, write_distributed
    if args.distributed < 2:
        raise ValueError(f"--distributed {args.distributed}: give the number of processes to compare with one (>= 2)")
    from .benchmarks import WORKLOADS
    if any(WORKLOADS[w].task != "diffusion" for w in workloads):
        raise ValueError("--distributed times the diffusion workloads only (small, mnist or celeba)")
    if len(workloads) != 1:
        raise ValueError("--distributed times one workload at a time (--workloads small, mnist or celeba)")
    grid = args.grid or [(16, 2), (32, 4)]
    result = run_distributed(args.distributed, workloads[0], grid, args.repeats, args.threads, args.device)
    paths = write_distributed(result, Path(args.out))
    print(paths["table"].read_text())
    print(f"wrote {paths['json']}, {paths['table']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpdm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolve a config and show the network and the DP noise it implies")
    info.add_argument("config", help="YAML config, e.g. configs/mnist_28/train_eps_10.0.yaml")
    info.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    info.add_argument("--probe", action="store_true",
                      help="measure memory and time per pass on the device (always done for "
                           "dp.max_physical_batch_size: auto): the largest pass that fits, time per step and epoch")
    info.add_argument("--device", default=None, help="where to probe (cuda when present, else cpu)")
    info.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                      help="probe under autocast, as `train --amp`")
    info.set_defaults(func=cmd_info)
    tr = sub.add_parser("train", help="train a differentially private diffusion model from a config")
    tr.add_argument("config", help="YAML config, e.g. configs/mnist_28/quick_cpu.yaml")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.add_argument("--workdir", default=None, help="where checkpoints, samples and metrics go (default setup.workdir)")
    tr.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in the workdir")
    tr.add_argument("--max-steps", type=int, default=None,
                    help="stop with a checkpoint after this step of the full schedule (resume later with --resume)")
    tr.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                    help="autocast for the forward pass: bf16 (the default of --amp alone) or fp16 with a fixed loss "
                         "scale (GPUs without bf16, e.g. V100 and T4); the clipping is of the unscaled gradients")
    tr.add_argument("--device", default=None, help="cuda when present, else cpu")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = tr.add_argument_group("several processes (started through torchrun; or run under torchrun directly)")
    dist.add_argument("--nproc-per-node", type=int, default=None,
                      help="processes on this machine, one per GPU (default setup.n_gpus_per_node)")
    dist.add_argument("--nnodes", type=int, default=None, help="machines (default setup.n_nodes)")
    dist.add_argument("--node-rank", type=int, default=None, help="this machine's index (default setup.node_rank)")
    dist.add_argument("--master-addr", default=None, help="address of node 0 (default setup.master_address)")
    dist.add_argument("--master-port", type=int, default=None, help="free port on node 0 (default setup.master_port)")
    tr.set_defaults(func=cmd_train)
    sa = sub.add_parser("sample", help="draw samples from a checkpoint into an .npz (+ a grid PNG)")
    sa.add_argument("checkpoint", help="WORKDIR/checkpoint.pt, or a checkpoint of the original DPDM release")
    sa.add_argument("--config", default=None, help="the config of a DPDM-release checkpoint (ours carry theirs)")
    sa.add_argument("overrides", nargs="*", help="key.sub=value overrides (e.g. sampler.s_churn=100)")
    sa.add_argument("--n", type=int, default=60000)
    sa.add_argument("--sampler", choices=("ddim", "edm"), default=None, help="default: the config's sampler.type")
    sa.add_argument("--steps", type=int, default=None, help="default: the config's sampler.num_steps")
    sa.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale w")
    sa.add_argument("--labels", default="random", help="'random' (uniform over the classes, seeded by --seed: DPDM's "
                    "released sampling), 'balanced' (n / classes each; 'all' is its older name) or a class index")
    sa.add_argument("--quantize", choices=("truncate", "round"), default="truncate",
                    help="floats to uint8: 'truncate' as DPDM's released code (default) or 'round'")
    sa.add_argument("--batch", type=int, default=500)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--out", default="samples.npz")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--device", default=None)
    sa.add_argument("--no-progress", action="store_true")
    sa.set_defaults(func=cmd_sample)
    bench = sub.add_parser("bench", help="benchmark every DP engine side by side (quick CPU grid by default)")
    bench.add_argument("--engines", default="nonprivate,dpdm_fast,opacus_kavg,opacus_ghost,functorch")
    bench.add_argument("--workloads", default="mnist", help="comma list of: mnist, small, celeba, lstm_lm")
    bench.add_argument("--grid", type=_grid, default=None,
                       help="cells as BxK, e.g. 8x4,16x8,32x4, or 'full' (B in 16,64,256,1024 x K in 1,2,8,32)")
    bench.add_argument("--max-step-s", type=float, default=None,
                       help="do not run an engine on a cell whose step would take longer (extrapolated from "
                            "its smaller cells); such cells are reported as too slow")
    bench.add_argument("--max-rows", type=int, default=None,
                       help="do not run cells with more rows (B x K) than this; reported as too slow")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bench.add_argument("--isolate", action="store_true",
                       help="time each engine alone in fresh processes (one per step, engines taking turns) "
                            "instead of interleaved in one process")
    bench.add_argument("--distributed", type=int, default=None, metavar="N",
                       help="time the engine on N processes (gloo on the CPU, one GPU each with --device cuda) against "
                            "one process, on the first workload and --grid (default 16x2,32x4): examples/s, scaling "
                            "efficiency, and the all-reduce's cost; --threads is per process")
    bench.add_argument("--out", default="bench/out", help="folder for results.json, results.md, results.png")
    bench.set_defaults(func=cmd_bench)
    ev = sub.add_parser("eval", help="downstream accuracy and FID of samples (the paper's protocol), or the DP-SGD "
                                     "classifier baseline (--dp-baseline)")
    ev.add_argument("samples", nargs="?", default=None, help="SAMPLES.npz as `dpdm-fast sample` writes it")
    ev.add_argument("--dataset", required=True, choices=("mnist", "fmnist", "celeba"))
    ev.add_argument("--data-dir", required=True, help="the real dataset (its test set for accuracy, its training "
                                                       "set for FID statistics and the DP baseline)")
    ev.add_argument("--classifiers", default="logreg,mlp,cnn", help="comma list of logreg, mlp, cnn ('' for none)")
    ev.add_argument("--epochs", type=int, default=None, help="override the protocol's 50 epochs (recorded in the "
                                                            "report as a reduced protocol); DP baseline: its epochs")
    ev.add_argument("--fid", action="store_true", help="also compute FID (Inception-v3 from torch-fidelity)")
    ev.add_argument("--inception-weights", default=None, help="the Inception weights file, for offline machines")
    ev.add_argument("--epsilon", type=float, default=None, help="the samples' training eps (selects the paper's row); "
                                                                "with --dp-baseline: the target eps")
    ev.add_argument("--delta", type=float, default=1e-5, help="DP baseline's delta")
    ev.add_argument("--dp-baseline", action="store_true", help="train the CNN on the real data with DP-SGD instead")
    ev.add_argument("--max-steps", type=int, default=None, help="DP baseline: stop after this many steps (a check)")
    ev.add_argument("--input-range", choices=("minus_one_one", "zero_one"), default="minus_one_one",
                    help="classifier inputs in [-1, 1] (DPDM's released evaluation, default) or [0, 1]")
    ev.add_argument("--shuffle", choices=("fixed", "per_epoch"), default="fixed",
                    help="training order: the same every epoch (released, default) or reshuffled per epoch")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default="eval_out", help="folder for report.json and report.md")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)
    au = sub.add_parser("audit", help="empirical privacy audit (one training run with canaries): a lower bound on eps")
    au.add_argument("config", nargs="?", default=None,
                    help=f"training config to audit (default {DEFAULT_AUDIT_CONFIG}: 1-2 minutes on 2 CPU cores)")
    au.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    au.add_argument("--canaries", type=int, default=None,
                    help="m canaries, each included with probability 1/2 (default 1000; --mode blackbox: one per "
                         "class in each of --runs runs)")
    au.add_argument("--mode", choices=("gradient", "layer", "input", "blackbox"), default="gradient",
                    help="gradient: white-box canaries with a fixed gradient direction on an extra parameter vector "
                         "(the strongest audit); layer: white-box canaries whose gradient lies in one of the "
                         "network's own layers (--canary-layer); input: black-box image canaries scored by their "
                         "loss; blackbox: final model only, from a worst-case start, canaries spread over "
                         "--runs runs (default config " + DEFAULT_BLACKBOX_CONFIG + ")")
    au.add_argument("--runs", type=int, default=100,
                    help="--mode blackbox: independent training runs of 10 canaries each (~10 s each on 2 CPU cores)")
    au.add_argument("--init-steps", type=int, default=300,
                    help="--mode blackbox: start every run from the network trained this many non-private steps on "
                         "2,000 held-out real images (the worst case of Annamalai and De Cristofaro); 0: the "
                         "config's random start")
    au.add_argument("--canary-layer", default=None,
                    help="--mode layer: the network layer (a name from network.named_modules(), e.g. "
                         "all_modules.6.Conv_1; default: the largest Conv2d)")
    au.add_argument("--trainer", action="store_true",
                    help="audit the real Trainer end to end (layer canaries among the training examples; EMA, "
                         "checkpoints, warm-up stages if configured, an interruption and --resume in the middle); "
                         "its run is written to OUT/run")
    au.add_argument("--backend", default=None, choices=("torch", "triton", "cuda", "auto"),
                    help="the engine backend to audit (default: the config's dp.backend); the report names it")
    au.add_argument("--noise-multiplier", type=float, default=None,
                    help="override the calibrated noise (0: no noise, to check that the audit detects the leak)")
    au.add_argument("--real-examples", type=int, default=None,
                    help="how many real training examples to train on (default 1000; --mode blackbox: 100 per run)")
    au.add_argument("--confidence", type=float, default=0.95)
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--device", default=None)
    au.add_argument("--out", default="audit_out", help="folder for report.json, report.md and scores.png")
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(func=cmd_audit)
    return parser


DEFAULT_AUDIT_CONFIG = "configs/audit/mnist_quick.yaml"
DEFAULT_BLACKBOX_CONFIG = "configs/audit/mnist_blackbox.yaml"


def cmd_audit(args: argparse.Namespace) -> int:
    """One-run privacy audit: a lower bound on eps from canaries, against the claimed eps."""
    from pathlib import Path

    from .audit.report import verdict, write_report
    from .audit.run import audit
    from .config import load_config

    config = args.config
    if config is None or "=" in config:   # no CONFIG: the packaged default setting (overrides still apply)
        if config is not None:
            args.overrides = [config, *args.overrides]
        default = DEFAULT_BLACKBOX_CONFIG if args.mode == "blackbox" else DEFAULT_AUDIT_CONFIG
        config = Path(__file__).resolve().parents[1] / default
        if not config.exists():
            raise FileNotFoundError(f"the default audit config {default} is missing: give a CONFIG")
    overrides = list(args.overrides) + ([f"dp.backend={args.backend}"] if args.backend else [])
    cfg = load_config(config, overrides)
    if args.trainer:
        from .audit.trainer_audit import audit_trainer
        if args.mode != "gradient" or args.noise_multiplier is not None:
            raise ValueError("--trainer audits the Trainer as configured, with layer canaries: drop --mode and "
                             "--noise-multiplier (change the config's dp.* instead)")
        result = audit_trainer(cfg, Path(args.out) / "run", canaries=args.canaries or 1000,
                               real_examples=args.real_examples or 1000,
                               confidence=args.confidence, seed=args.seed, canary_layer=args.canary_layer,
                               device=args.device, progress=not args.no_progress)
    elif args.mode == "blackbox":
        from .audit.blackbox import blackbox_audit
        if args.canaries is not None:
            raise ValueError("--mode blackbox puts one canary per class in each run: set how many with --runs")
        result = blackbox_audit(cfg, runs=args.runs, real_examples=args.real_examples or 100,
                                init_steps=args.init_steps,
                                noise_multiplier=args.noise_multiplier, confidence=args.confidence, seed=args.seed,
                                device=args.device, progress=not args.no_progress)
    else:
        result = audit(cfg, canaries=args.canaries or 1000, mode=args.mode, noise_multiplier=args.noise_multiplier,
                       real_examples=args.real_examples or 1000, confidence=args.confidence, seed=args.seed,
                       canary_layer=args.canary_layer, device=args.device, progress=not args.no_progress)
    paths = write_report(result, args.out)
    print(verdict(result))
    print(f"claimed eps {result['claimed_epsilon']:g}, audited lower bound {result['epsilon_lower_bound']:.4f} "
          f"({result['best_estimator']}) at {100 * result['confidence']:.0f}% confidence; "
          + ", ".join(f"{name} {e['epsilon']:.3f}" for name, e in result["estimators"].items())
          + f"; backend {result['backend']}; report in {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Downstream classifiers and FID of a SAMPLES.npz, or the DP-SGD classifier baseline."""
    from .evaluation import run
    from .evaluation.inception import InceptionUnavailable
    from .evaluation.samples import SamplesError
    try:
        if args.dp_baseline:
            if args.samples is not None:
                raise ValueError("--dp-baseline trains on the real data: give no SAMPLES.npz")
            if args.epsilon is None:
                raise ValueError("--dp-baseline needs --epsilon (the privacy budget of the DP-SGD classifier)")
            report = run.dp_baseline(args.dataset, args.data_dir, args.out, epsilon=args.epsilon, delta=args.delta,
                                     epochs=args.epochs, max_steps=args.max_steps, seed=args.seed, device=args.device,
                                     progress=not args.no_progress)
            b = report["dp_baseline"]
            print(f"DP-SGD CNN on real {args.dataset}: test accuracy {b['test_accuracy']:.4f} at eps={b['epsilon']:.3f} "
                  f"(delta={b['delta']:g}, {b['steps']} steps); report in {args.out}")
            return 0
        if args.samples is None:
            raise ValueError("give SAMPLES.npz (from `dpdm-fast sample`), or --dp-baseline")
        classifiers = [c for c in args.classifiers.split(",") if c]
        report = run.evaluate(args.samples, args.dataset, args.data_dir, args.out, classifiers=classifiers,
                              epochs=run.downstream.EPOCHS if args.epochs is None else args.epochs, fid=args.fid,
                              inception_weights=args.inception_weights, epsilon=args.epsilon, seed=args.seed,
                              device=args.device, progress=not args.no_progress, input_range=args.input_range,
                              shuffle=args.shuffle)
    except (SamplesError, InceptionUnavailable) as e:
        print(f"dpdm-fast: error: {e}", file=sys.stderr)
        return 2
    for name, c in report["classifiers"].items():
        print(f"{name}: real test accuracy {c['test_accuracy']:.4f} (epoch {c['best_epoch']} of {c['epochs']})")
    if "fid" in report:
        print(f"FID: {report['fid']:.3f}")
    print(f"report in {args.out}/report.json and report.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .engine.distributed import ReplicaError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may also come after the options (argparse stops collecting positionals there)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, CheckpointError, ReplicaError) as e:  # ConfigError is a ValueError
        print(f"dpdm-fast: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2


def _rank_prefix() -> str:
    import os
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""


if __name__ == "__main__":
    sys.exit(main())
