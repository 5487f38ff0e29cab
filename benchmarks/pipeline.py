"""Input pipeline vs train step (CPU): can the Grain pipeline feed the tiny_lm demo?

    # the demo's mesh (data=2, fsdp=2, tensor=2 on 8 fake CPU devices), ~1.5 min on 2 cores
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/pipeline.py
    python benchmarks/pipeline.py                                  # one CPU device, mesh data=1
    python benchmarks/pipeline.py --prepared workdirs/shapes_data  # reuse a prepared directory
    python benchmarks/pipeline.py --batches 80 --chunks 4 --steps 2 --e2e-steps 0   # quick (~50 s)
    python benchmarks/pipeline.py --profile on                     # also cProfile the pipeline

1. Data: unless `--prepared DIR` is given, `cm3jax.data.prepare.prepare` writes a small
   shapes dataset (experiments/shapes_data.py with `--records` train and
   `--validation-records` validation scenes) into a temporary directory, removed at the end.
2. Pipeline: experiments/tiny_lm.py with `data.source = 'prepared:DIR'`, iterating
   `make_dataset(config, 'train', 0, 1)` with `data.num_workers` = 0 (reader threads only,
   the demo's setting), 1 and 2 (Grain `mp_prefetch` worker processes), plus num_workers=0
   with `num_threads=0` (everything on the calling thread). All iterators are opened and
   warmed up (`--warmup-batches`, which also starts the worker processes), then `--chunks`
   rounds each time `--batches / --chunks` batches of every configuration in turn
   (alternating the order). tokens/s = batches x global_batch_size x seq_len / seconds
   (every slot of a packed row, padding included; the real-token fraction is reported).
   worker scaling = tokens/s(2 workers) / tokens/s(1 worker).
3. Train step: the real tiny_lm step (`cm3jax.train.tasks.create(...).compile()`) on every device
   the process has (mesh from `cm3jax.config.validate`: with >= 8 devices the demo's
   fsdp=2, tensor=2, data=rest, else fsdp=tensor=1; `--fsdp/--tensor` override), fed one
   fixed pipeline batch as global arrays (`make_array_from_process_local_data` on the batch
   sharding), timed with block_until_ready over `--steps` steps after compile + 2 steps.
4. End to end (`--e2e-steps`): the loop's own pattern, next(iterator) -> global arrays ->
   train step, with the demo's pipeline running concurrently; reports the fraction of wall
   time spent waiting for data (the loop's `data_wait_fraction`).

The host's 2 cores are shared with other jobs, so headlines are best-of (least-disturbed)
chunk / step times; medians are in the JSON. ratio = pipeline tokens/s in the demo's
setting (tiny_lm's data.num_workers, 0) / train-step tokens/s; target >= 10 (input never
stalls training). If the target is missed (or with `--profile on`) the pipeline is
profiled with cProfile on one thread (num_threads=0, num_workers=0), top functions printed.

Worker processes on a 2-core host compete with each other and with the main process
(which still unpickles and copies each batch out of shared memory), so 2 vs 1 workers
cannot scale past ~2x here; the number printed is what was measured.

The last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepared", default="", help="prepared data dir (default: a temporary one)")
    p.add_argument("--records", type=int, default=3000, help="train scenes to prepare")
    p.add_argument("--validation-records", type=int, default=300, help="validation scenes")
    p.add_argument("--batches", type=int, default=320, help="timed batches per configuration")
    p.add_argument("--chunks", type=int, default=8, help="timed rounds the batches are split into")
    p.add_argument("--warmup-batches", type=int, default=12,
                   help="untimed batches per configuration first (starts threads and workers)")
    p.add_argument("--workers", default="0,1,2", help="data.num_workers values to measure")
    p.add_argument("--steps", type=int, default=5, help="timed train steps")
    p.add_argument("--e2e-steps", type=int, default=6,
                   help="end-to-end steps (iterator + step); 0 = skip")
    p.add_argument("--fsdp", type=int, default=0, help="mesh.fsdp (0 = 2 on >= 8 devices, else 1)")
    p.add_argument("--tensor", type=int, default=0,
                   help="mesh.tensor (0 = 2 on >= 8 devices, else 1)")
    p.add_argument("--profile", choices=("auto", "on", "off"), default="auto",
                   help=f"cProfile the pipeline: auto = only when ratio < {TARGET_RATIO:g}")
    p.add_argument("--profile-batches", type=int, default=60)
    p.add_argument("--profile-top", type=int, default=15)
    return p.parse_args(argv)


def load_experiment(name: str):
    """`get_config()` of experiments/<name>.py, loaded from the file path."""
    path = os.path.join(REPO, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def prepare_data(args, workdir: str) -> dict:
    """experiments/shapes_data.py with fewer scenes, prepared into `workdir`."""
    from cm3jax.data.prepare import prepare

    config = load_experiment("shapes_data")
    config.prepare.shapes_records.train = args.records
    config.prepare.shapes_records.validation = args.validation_records
    per_worker = max(1, -(-args.records // config.prepare.num_workers))  # a shard per worker
    config.prepare.records_per_shard = min(config.prepare.records_per_shard, per_worker)
    return prepare(config, workdir)


def demo_config(data_dir: str, **data_overrides):
    """experiments/tiny_lm.py reading `data_dir`, with `config.data` overrides."""
    config = load_experiment("tiny_lm")
    config.data.source = "prepared:" + data_dir
    for key, value in data_overrides.items():
        config.data[key] = value
    return config


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def measure_pipelines(configs: dict, args) -> dict:
    """tokens/s of make_dataset(config, 'train', 0, 1) per named config, in interleaved rounds.

    All iterators are opened and warmed up first; each round then times one chunk of every
    configuration (alternating the order), so load from other jobs hits all of them alike.
    An idle iterator only holds its small prefetch buffer (a few documents, or one batch per
    worker process); untimed batches before each chunk drain it.
    """
    from cm3jax.data.pipeline import make_dataset

    per_chunk = max(1, args.batches // args.chunks)
    iterators, results = {}, {}
    try:
        for name, config in configs.items():
            start = time.perf_counter()
            iterators[name] = iter(make_dataset(config, "train", 0, 1))
            for _ in range(args.warmup_batches):
                next(iterators[name])
            results[name] = {
                "warmup_s": time.perf_counter() - start, "chunks": [], "real": 0, "loss": 0,
                "tokens_per_batch": config.data.global_batch_size * config.data.seq_len,
                "drain": max(1, int(config.data.num_workers)),
            }
        for r in range(args.chunks):
            for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:
                iterator, res = iterators[name], results[name]
                for _ in range(res["drain"]):
                    next(iterator)
                start = time.perf_counter()
                for _ in range(per_chunk):
                    batch = next(iterator)
                seconds = time.perf_counter() - start
                res["chunks"].append(per_chunk * res["tokens_per_batch"] / seconds)
                res["real"] += int(np.count_nonzero(batch["segment_ids"]))
                res["loss"] += int(np.count_nonzero(batch["loss_mask"]))
                res["last_batch"] = batch
    finally:
        for iterator in iterators.values():
            _close(iterator)
        iterators.clear()
        gc.collect()  # releases the worker processes' shared-memory batches
    for res in results.values():
        sampled = args.chunks * res["tokens_per_batch"]  # the last batch of every chunk
        res.update(best=max(res["chunks"]), median=statistics.median(res["chunks"]),
                   real_fraction=res.pop("real") / sampled,
                   loss_fraction=res.pop("loss") / sampled)
    return results


def profile_pipeline(data_dir: str, args) -> tuple[str, list[dict]]:
    """cProfile of the whole pipeline on the calling thread (num_threads=0, num_workers=0)."""
    from cm3jax.data.pipeline import make_dataset

    config = demo_config(data_dir, num_threads=0, num_workers=0)
    iterator = iter(make_dataset(config, "train", 0, 1))
    for _ in range(3):
        next(iterator)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.profile_batches):
        next(iterator)
    profiler.disable()
    _close(iterator)
    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(args.profile_top)
    stats = pstats.Stats(profiler)
    ranked = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.profile_top]
    top = [{"function": f"{os.path.basename(filename)}:{line}({name})", "calls": calls,
            "tottime_s": tottime, "cumtime_s": cumtime,
            "tottime_fraction": tottime / stats.total_tt}
           for (filename, line, name), (_, calls, tottime, cumtime, _) in ranked]
    return text.getvalue(), top


def make_train_step(config, args, local_batch: dict):
    """The compiled tiny_lm train step on every device: returns (run_one_step, info)."""
    import jax

    from cm3jax import config as config_lib
    from cm3jax.models import accounting
    from cm3jax.train import partitioning, tasks

    demo_mesh = jax.device_count() >= 8
    config.mesh.fsdp = args.fsdp or (2 if demo_mesh else 1)
    config.mesh.tensor = args.tensor or (2 if demo_mesh else 1)
    config.mesh.data = -1
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = partitioning.make_mesh(mesh_shape)
    task = tasks.create(config, mesh)
    spec = task.spec
    start = time.perf_counter()
    train_step, _ = task.compile()
    compile_s = time.perf_counter() - start
    fixed = task.global_batch(local_batch)
    holder = {"state": spec.init()}

    def run(batch=None) -> float:
        state, metrics = train_step(holder["state"], fixed if batch is None else batch)
        jax.block_until_ready((state, metrics))
        holder["state"] = state  # the old state was donated
        return float(metrics["loss"])

    info = {
        "compile_s": compile_s, "mesh": mesh_shape, "task": task,
        "params": accounting.param_count(spec.abstract["params"]),
        "flops_per_token": accounting.flops_per_token(spec.model_config, config.data.seq_len),
    }
    return run, info


def time_train_step(run, steps: int) -> dict:
    losses = [run(), run()]  # warm-up after compiling
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(run())
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times), "all_s": times,
            "loss": [losses[0], losses[-1]]}


def end_to_end(config, args, run, task) -> dict:
    """The loop's pattern: next(iterator) -> global arrays -> step, pipeline running alongside."""
    from cm3jax.data.pipeline import make_dataset

    iterator = iter(make_dataset(config, "train", 0, 1))
    try:
        run(task.global_batch(next(iterator)))  # starts the pipeline's threads
        wait = 0.0
        start = time.perf_counter()
        for _ in range(args.e2e_steps):
            t0 = time.perf_counter()
            batch = task.global_batch(next(iterator))
            wait += time.perf_counter() - t0
            run(batch)
        elapsed = time.perf_counter() - start
    finally:
        _close(iterator)
    tokens = args.e2e_steps * config.data.global_batch_size * config.data.seq_len
    return {"tokens_per_sec": tokens / elapsed, "data_wait_fraction": wait / elapsed,
            "data_wait_s_per_step": wait / args.e2e_steps}


def run_benchmark(args, data_dir: str) -> dict:
    import grain
    import jax

    from cm3jax import vocab as vocab_lib
    from cm3jax.data.pipeline import check_prepared_vocab

    config = demo_config(data_dir)
    check_prepared_vocab(data_dir, vocab_lib.from_config(config.vocab))
    seq_len, global_batch = config.data.seq_len, config.data.global_batch_size
    tokens_per_batch = seq_len * global_batch
    demo_name = f"workers_{int(config.data.num_workers)}"

    # 1. The pipeline: the demo's threads, one thread, worker processes.
    configs = {}
    for w in (int(w) for w in args.workers.split(",")):
        configs[f"workers_{w}"] = demo_config(data_dir, num_workers=w)
        if w == 0:
            configs["workers_0_threads_0"] = demo_config(data_dir, num_workers=0, num_threads=0)
    if demo_name not in configs:
        configs[demo_name] = demo_config(data_dir)
    pipeline = measure_pipelines(configs, args)
    for name, r in pipeline.items():
        print(f"pipeline {name}: {r['best']:,.0f} tok/s best of {args.chunks} chunks (median "
              f"{r['median']:,.0f}; open + {args.warmup_batches} batches {r['warmup_s']:.2f} s; "
              f"{100 * r['real_fraction']:.1f}% real tokens)", flush=True)

    # 2. The train step on the same config, fed a pipeline batch.
    run, info = make_train_step(demo_config(data_dir), args, pipeline[demo_name]["last_batch"])
    step = time_train_step(run, args.steps)
    step_tps = tokens_per_batch / step["best_s"]
    step_tps_median = tokens_per_batch / step["median_s"]
    gflops = step_tps * info["flops_per_token"] / 1e9
    print(f"train step: {info['params'] / 1e6:.2f}M params, mesh {info['mesh']} on "
          f"{jax.device_count()} device(s), compiled in {info['compile_s']:.1f} s; "
          f"{step['best_s']:.3f} s/step best of {args.steps} (median {step['median_s']:.3f}) = "
          f"{step_tps:,.0f} tok/s ({gflops:.1f} GFLOP/s at "
          f"{info['flops_per_token'] / 1e6:.2f} MFLOP/token); "
          f"loss {step['loss'][0]:.3f} -> {step['loss'][1]:.3f}", flush=True)

    # 3. Both together, as the loop runs them.
    e2e = None
    if args.e2e_steps > 0:
        e2e = end_to_end(demo_config(data_dir), args, run, info["task"])
        print(f"end to end ({args.e2e_steps} steps, pipeline {demo_name} alongside): "
              f"{e2e['tokens_per_sec']:,.0f} tok/s, data wait "
              f"{100 * e2e['data_wait_fraction']:.1f}% "
              f"({1000 * e2e['data_wait_s_per_step']:.1f} ms/step)", flush=True)

    demo = pipeline[demo_name]
    ratio = demo["best"] / step_tps
    ratio_median = demo["median"] / step_tps_median
    scaling = scaling_median = None
    if "workers_1" in pipeline and "workers_2" in pipeline:
        scaling = pipeline["workers_2"]["best"] / pipeline["workers_1"]["best"]
        scaling_median = pipeline["workers_2"]["median"] / pipeline["workers_1"]["median"]
    profile_text, profile_top = None, None
    if args.profile == "on" or (args.profile == "auto" and ratio < TARGET_RATIO):
        profile_text, profile_top = profile_pipeline(data_dir, args)

    print(f"\n{'':<30} {'tok/s best':>12} {'tok/s median':>13} {'x train step':>13}")
    for name, r in pipeline.items():
        print(f"{'pipeline ' + name:<30} {r['best']:>12,.0f} {r['median']:>13,.0f} "
              f"{r['best'] / step_tps:>12.1f}x")
    print(f"{'train step (consumption)':<30} {step_tps:>12,.0f} {step_tps_median:>13,.0f} "
          f"{1.0:>12.1f}x")
    print(f"ratio pipeline {demo_name} / train step: {ratio:.0f}x best-of ({ratio_median:.0f}x "
          f"medians); target >= {TARGET_RATIO:g}x {'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    if scaling is not None:
        print(f"worker scaling 2 vs 1: {scaling:.2f}x best-of ({scaling_median:.2f}x medians) "
              f"on {os.cpu_count()} cores")
    if profile_text:
        print(f"\ncProfile, {args.profile_batches} batches on one thread (num_threads=0, "
              f"num_workers=0):\n{profile_text}")

    return {
        "benchmark": "pipeline",
        "ratio": ratio,
        "ratio_median": ratio_median,
        "target_ratio": TARGET_RATIO,
        "pipeline_tokens_per_sec": {k: v["best"] for k, v in pipeline.items()},
        "pipeline_tokens_per_sec_median": {k: v["median"] for k, v in pipeline.items()},
        "pipeline_open_and_warmup_s": {k: v["warmup_s"] for k, v in pipeline.items()},
        "pipeline_real_token_fraction": demo["real_fraction"],
        "pipeline_loss_token_fraction": demo["loss_fraction"],
        "worker_scaling_2_vs_1": scaling,
        "worker_scaling_2_vs_1_median": scaling_median,
        "demo_pipeline": demo_name,
        "num_threads": int(config.data.num_threads),
        "prefetch": int(config.data.prefetch),
        "train_step_tokens_per_sec": step_tps,
        "train_step_tokens_per_sec_median": step_tps_median,
        "train_step_s": step["best_s"],
        "train_step_s_all": step["all_s"],
        "train_step_compile_s": info["compile_s"],
        "train_step_gflops_per_sec": gflops,
        "train_loss": step["loss"],
        "flops_per_token": info["flops_per_token"],
        "params": info["params"],
        "end_to_end": e2e,
        "seq_len": seq_len,
        "global_batch_size": global_batch,
        "mesh": info["mesh"],
        "devices": jax.device_count(),
        "batches": args.chunks * max(1, args.batches // args.chunks),
        "steps": args.steps,
        "profile_top": profile_top,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "grain": getattr(grain, "__version__", None),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; this is not an absl program
    tmp = None
    try:
        if args.prepared:
            data_dir, prepare_s = args.prepared, None
        else:
            tmp = tempfile.mkdtemp(prefix="cm3jax_pipeline_bench_")
            data_dir = os.path.join(tmp, "shapes_data")
            start = time.perf_counter()
            prepare_data(args, data_dir)
            prepare_s = time.perf_counter() - start
            print(f"prepared {args.records} train / {args.validation_records} validation scenes "
                  f"in {prepare_s:.1f} s -> {data_dir}", flush=True)
        result = run_benchmark(args, data_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.update(prepared=args.prepared or None, records=None if args.prepared else args.records,
                  prepare_s=prepare_s)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
